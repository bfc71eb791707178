"""Token ids of text splits: truncated, right-padded, cached on disk and checked by hash."""

from __future__ import annotations

import json
import warnings

import pandas as pd
import pytest
import torch

from experiments.data.datasets import TextSplits, load_dataset
from experiments.data.encoding import EncodedSplits, encode_splits, tokenizer_identity
from experiments.data.models import load_tokenizer

pytestmark = pytest.mark.realmodel

LONG = "the film runs on and on , " * 40
TEXTS = ["a gripping , beautifully acted film .", "dull .", LONG, "not worth it ."]


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PROPULSION_NTK_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("minilm")


class Counting:
    """A tokenizer that counts how often it tokenises (attributes pass through)."""

    def __init__(self, tok, pad_token_id="same"):
        self.tok, self.calls = tok, 0
        self._pad = tok.pad_token_id if pad_token_id == "same" else pad_token_id

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.tok(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.tok, name)

    def __len__(self):
        return len(self.tok)

    @property
    def pad_token_id(self):
        return self._pad


def tiny(labels=(0, 1, 0, 1), num_labels=2) -> TextSplits:
    frame = pd.DataFrame({"text": TEXTS, "label": list(labels)})
    return TextSplits(frame, frame.iloc[:2].reset_index(drop=True), frame.iloc[2:].reset_index(drop=True),
                      num_labels=num_labels, name="tiny")


def _equal(a: EncodedSplits, b: EncodedSplits) -> bool:
    return a.fingerprint == b.fingerprint and all(
        torch.equal(getattr(getattr(a, s), f), getattr(getattr(b, s), f))
        for s in ("train", "validation", "test") for f in ("input_ids", "attention_mask", "labels"))


@pytest.mark.parametrize("max_length", [2, 5, 16, 64])
def test_rows_are_truncated_and_right_padded(tokenizer, max_length):
    enc = encode_splits(tiny(), tokenizer, max_length=max_length)
    train = enc.train
    assert train.input_ids.shape == train.attention_mask.shape == (4, max_length)
    assert train.input_ids.dtype == train.attention_mask.dtype == train.labels.dtype == torch.int64
    assert train.labels.tolist() == [0, 1, 0, 1] and enc.num_labels == 2
    for i, text in enumerate(TEXTS):
        full = tokenizer(text)["input_ids"]
        n = min(len(full), max_length)
        assert train.attention_mask[i].tolist() == [1] * n + [0] * (max_length - n)
        assert train.input_ids[i, n:].eq(tokenizer.pad_token_id).all()
        expected = full if len(full) <= max_length else [*full[: max_length - 1], tokenizer.sep_token_id]
        assert train.input_ids[i, :n].tolist() == expected  # [CLS] ... [SEP], truncated inside
    assert torch.equal(enc.validation.input_ids, train.input_ids[:2])
    assert torch.equal(enc.test.input_ids, train.input_ids[2:])


def test_batch_trims_to_the_longest_real_row(tokenizer):
    enc = encode_splits(tiny(), tokenizer, max_length=64)
    short = enc.train.batch([1, 3])
    width = int(enc.train.attention_mask[[1, 3]].sum(1).max())
    assert short["input_ids"].shape == (2, width) and width < 64
    assert torch.equal(short["input_ids"], enc.train.input_ids[[1, 3], :width])
    assert short["labels"].tolist() == [1, 1]
    assert enc.train.batch([2])["input_ids"].shape == (1, 64)


def test_cache_hit_equals_miss_without_tokenising(tokenizer, tmp_path):
    counting = Counting(tokenizer)
    splits = load_dataset("rotten_tomatoes", max_examples=60)
    miss = encode_splits(splits, counting, max_length=32)
    calls = counting.calls
    assert calls > 0 and len(list((tmp_path / "cache" / "tokens").glob("*.safetensors"))) == 1
    hit = encode_splits(splits, counting, max_length=32)
    assert counting.calls == calls and _equal(hit, miss)
    other = encode_splits(splits, counting, max_length=33)  # another key, another file
    assert counting.calls > calls and other.fingerprint != miss.fingerprint
    assert len(list((tmp_path / "cache" / "tokens").glob("*.safetensors"))) == 2
    explicit = encode_splits(splits, tokenizer, max_length=32, cache_dir=tmp_path / "elsewhere")
    assert _equal(explicit, miss) and len(list((tmp_path / "elsewhere").glob("*.json"))) == 1


def test_the_key_follows_the_content_and_the_tokenizer(tokenizer):
    a = encode_splits(tiny(), tokenizer, max_length=16)
    b = encode_splits(tiny(labels=(1, 1, 0, 1)), tokenizer, max_length=16)
    assert a.fingerprint != b.fingerprint and b.train.labels.tolist() == [1, 1, 0, 1]
    ident = tokenizer_identity(tokenizer)
    assert ident["vocab_size"] == 30522 and len(ident["sha256"]) == 64
    assert tokenizer_identity(load_tokenizer("minilm")) == ident  # stable across loads and calls


@pytest.mark.parametrize("damage", ["flip", "truncate", "sidecar"])
def test_a_damaged_cache_is_rebuilt_with_a_warning(tokenizer, tmp_path, damage):
    first = encode_splits(tiny(), tokenizer, max_length=16)
    (path,) = (tmp_path / "cache" / "tokens").glob("*.safetensors")
    sidecar = path.with_suffix(".json")
    if damage == "flip":
        raw = bytearray(path.read_bytes())
        raw[-3] ^= 0xFF  # inside the tensor data: still loads, but the hash differs
        path.write_bytes(bytes(raw))
    elif damage == "truncate":
        path.write_bytes(path.read_bytes()[:100])
    else:
        sidecar.unlink()
    with pytest.warns(UserWarning, match="rebuilding"):
        again = encode_splits(tiny(), tokenizer, max_length=16)
    assert _equal(again, first)
    assert json.loads(sidecar.read_text())["fingerprint"] == first.fingerprint
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _equal(encode_splits(tiny(), tokenizer, max_length=16), first)


@pytest.mark.parametrize(
    ("labels", "num_labels"), [((0, 1, 2, 1), 2), ((0, -1, 0, 1), 2)], ids=["above", "negative"])
def test_labels_outside_the_head_raise(tokenizer, labels, num_labels):
    with pytest.raises(ValueError, match=r"labels must be integers in 0\.\.1"):
        encode_splits(tiny(labels, num_labels), tokenizer, max_length=16)


@pytest.mark.parametrize("max_length", [1, 0, 2.5])
def test_bad_max_length(tokenizer, max_length):
    with pytest.raises(ValueError, match="max_length"):
        encode_splits(tiny(), tokenizer, max_length=max_length)


def test_a_tokenizer_without_pad_token_raises(tokenizer):
    with pytest.raises(ValueError, match="pad token"):
        encode_splits(tiny(), Counting(tokenizer, pad_token_id=None), max_length=16)


def test_a_missing_text_raises(tokenizer):
    frame = pd.DataFrame({"text": ["fine .", None], "label": [0, 1]})
    with pytest.raises(ValueError, match=r"rows \[1\] have no text"):
        encode_splits(TextSplits(frame, frame, frame, num_labels=2), tokenizer, max_length=8)
