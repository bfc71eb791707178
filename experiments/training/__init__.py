"""Training: the run config, the fine-tuning loop, its checkpoints, callbacks, records and the
methods it prepares; process helpers (folder locks) and per-step memory accounting."""
