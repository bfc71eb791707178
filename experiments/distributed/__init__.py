"""Distributed jobs: the tiled kernel job (torchrun) and the sweep of training units."""
