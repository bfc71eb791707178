"""Training: the run config, the fine-tuning loop, its checkpoints and callbacks, the methods it
prepares and per-step memory accounting."""
