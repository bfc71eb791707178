"""Data: text data sets and their splits, token-id caches, offline resources and the models."""
