"""Seeded, stratified splits of the offline Rotten Tomatoes sentences."""

from __future__ import annotations

import pandas as pd
import pytest

from experiments.data import load_rotten_tomatoes, stratified_split


def test_splits_are_deterministic_disjoint_and_stratified():
    a = load_rotten_tomatoes(seed=3, max_examples=400)
    b = load_rotten_tomatoes(seed=3, max_examples=400)
    for x, y in zip((a.train, a.validation, a.test), (b.train, b.validation, b.test), strict=True):
        pd.testing.assert_frame_equal(x, y)
    texts = [set(s["text"]) for s in (a.train, a.validation, a.test)]
    assert not (texts[0] & texts[1] or texts[0] & texts[2] or texts[1] & texts[2])
    assert sum(len(s) for s in (a.train, a.validation, a.test)) == 400
    assert a.num_labels == 2
    assert abs(a.train["label"].mean() - 0.5) < 0.02
    other = load_rotten_tomatoes(seed=4, max_examples=400)
    assert set(other.train["text"]) != texts[0]


def test_full_rotten_tomatoes_has_8530_sentences():
    s = load_rotten_tomatoes(seed=0)
    assert len(s.train) + len(s.validation) + len(s.test) == 8530


@pytest.mark.parametrize("fractions", [(0.5, 0.5), (0.7, 0.4, -0.1), (0.5, 0.2, 0.2)])
def test_bad_fractions(fractions):
    frame = pd.DataFrame({"text": list("abcd"), "label": [0, 1, 0, 1]})
    with pytest.raises(ValueError, match="fractions"):
        stratified_split(frame, fractions, seed=0)
