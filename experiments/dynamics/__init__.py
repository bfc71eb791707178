"""Kernel dynamics: kernel snapshots along training, the linearised model, the kernel predictor
and kernel similarity measures."""
