"""Offline data sets: seeded, stratified splits carved once, recorded and read back."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from experiments.data.datasets import (
    DATASETS,
    SplitRecordError,
    TextSplits,
    load_dataset,
    load_rotten_tomatoes,
    read_lazyload_entry,
    split_record_path,
    stratified_split,
)
from experiments.data.offline import OfflineResourceMissing
from experiments.records import read_json, write_json


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PROPULSION_NTK_CACHE", str(tmp_path / "cache"))


def _frames(s: TextSplits) -> list[pd.DataFrame]:
    return [s.train, s.validation, s.test]


def _record(name: str, **kwargs) -> dict:
    return read_json(split_record_path(name, **kwargs))


# name, rows, labels (the published sizes of the packaged training sets)
SIZES = [("rotten_tomatoes", 8530, 2), ("imdb", 25000, 2), ("bbc_news", 2225, 5)]


@pytest.mark.parametrize(("name", "rows", "num_labels"), SIZES, ids=[s[0] for s in SIZES])
def test_every_data_set_loads_with_its_published_size(name, rows, num_labels):
    s = load_dataset(name)
    assert s.name == name and s.num_labels == num_labels == len(s.label_names)
    assert sum(len(f) for f in _frames(s)) == rows
    for f in _frames(s):
        assert list(f.columns) == ["text", "label"]
        assert f["label"].dtype == np.int64 and f["label"].between(0, num_labels - 1).all()
        assert all(isinstance(t, str) and t for t in f["text"])
    assert set(s.train["label"]) == set(range(num_labels))
    assert abs(len(s.train) - 0.8 * rows) <= 1 and abs(len(s.validation) - 0.1 * rows) <= 1
    small = load_dataset(name, max_examples=100, seed=1)
    assert [len(f) for f in _frames(small)] == [80, 10, 10]


def test_splits_are_deterministic_disjoint_and_recorded():
    a = load_rotten_tomatoes(seed=3, max_examples=400)
    path = split_record_path("rotten_tomatoes", seed=3, max_examples=400)
    assert path.exists()
    path.unlink()  # carving again from nothing gives the same splits
    b = load_rotten_tomatoes(seed=3, max_examples=400)
    for x, y in zip(_frames(a), _frames(b), strict=True):
        pd.testing.assert_frame_equal(x, y)
    assert a.fingerprint == b.fingerprint and len(a.fingerprint) == 64
    splits = _record("rotten_tomatoes", seed=3, max_examples=400)["splits"]
    ids = [set(splits[name]) for name in ("train", "validation", "test")]
    assert [len(i) for i in ids] == [320, 40, 40]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    assert a.train["label"].mean() == 0.5 and a.num_labels == 2
    other = load_rotten_tomatoes(seed=4, max_examples=400)
    assert set(other.train["text"]) != set(a.train["text"]) and other.fingerprint != a.fingerprint


def test_a_later_call_reads_the_record_instead_of_carving():
    kwargs = {"seed": 0, "max_examples": 60}
    before = load_dataset("bbc_news", **kwargs)
    path = split_record_path("bbc_news", **kwargs)
    record = read_json(path)
    moved = record["splits"]["train"].pop(0)
    record["splits"]["test"] = sorted([*record["splits"]["test"], moved])
    write_json(record, path)  # a deliberate change, with its checksum
    after = load_dataset("bbc_news", **kwargs)
    assert len(after.train) == len(before.train) - 1 and len(after.test) == len(before.test) + 1
    assert before.train["text"].iloc[0] in set(after.test["text"])
    assert after.fingerprint != before.fingerprint


def test_changed_source_data_is_refused_naming_the_record(tmp_path):
    load_dataset("rotten_tomatoes", max_examples=50, split_dir=tmp_path / "mine")
    path = split_record_path("rotten_tomatoes", max_examples=50, split_dir=tmp_path / "mine")
    assert path.parent == tmp_path / "mine"
    record = read_json(path)
    record["source_fingerprint"] = "0" * 64  # as if the package's CSV had changed since
    write_json(record, path)
    with pytest.raises(SplitRecordError, match=f"changed since.*delete {path}"):
        load_dataset("rotten_tomatoes", max_examples=50, split_dir=tmp_path / "mine")


@pytest.mark.parametrize("damage", ["truncated", "overlap", "out_of_range", "other_seed", "other_row"])
def test_damaged_records_are_refused(damage):
    load_dataset("bbc_news", max_examples=40)
    path = split_record_path("bbc_news", max_examples=40)
    text = path.read_text()
    record = json.loads(text)
    if damage == "truncated":
        path.write_text(text[: len(text) // 2])
    else:
        if damage == "overlap":
            record["splits"]["test"].append(record["splits"]["train"][0])
        elif damage == "out_of_range":
            record["splits"]["test"].append(10**6)
        elif damage == "other_seed":
            record["seed"] = 7
        else:  # another valid, unused row: only the checksum can tell
            used = {i for ids in record["splits"].values() for i in ids}
            record["splits"]["train"][0] = min(set(range(100)) - used)
        path.write_text(json.dumps(record))
    with pytest.raises(SplitRecordError, match="delete"):
        load_dataset("bbc_news", max_examples=40)


def test_splits_are_stratified_to_within_two_rows():
    s = load_dataset("bbc_news", seed=5)
    total = pd.concat(_frames(s))["label"].value_counts()
    for frame, fraction in zip(_frames(s), (0.8, 0.1, 0.1), strict=True):
        counts = frame["label"].value_counts()
        assert (abs(counts - fraction * total) <= 2).all(), (counts, total)
    sub = load_dataset("bbc_news", seed=5, max_examples=500)
    sub_total = pd.concat(_frames(sub))["label"].value_counts()
    assert len(pd.concat(_frames(sub))) == 500
    assert (abs(sub_total - 500 * total / total.sum()) <= 1).all()


def test_bbc_news_reads_the_one_windows_1252_article():
    s = load_dataset("bbc_news")
    texts = pd.concat(_frames(s))["text"]
    assert texts.str.contains("a £15.8m signing from Parma", regex=False).sum() == 1
    assert s.label_names == ("business", "entertainment", "politics", "sports", "tech")


def test_max_examples_larger_than_the_data_keeps_everything():
    s = load_dataset("bbc_news", max_examples=10**6)
    assert sum(len(f) for f in _frames(s)) == 2225


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"name": "sst2"}, "rotten_tomatoes, imdb, bbc_news, fine_food"),
     ({"name": "imdb", "fractions": (0.9, 0.2, -0.1)}, "fractions"),
     ({"name": "imdb", "fractions": (0.0, 0.5, 0.5)}, "fractions"),
     ({"name": "imdb", "seed": -1}, "seed"),
     ({"name": "imdb", "max_examples": 1}, "max_examples"),
     ({"name": "bbc_news", "max_examples": 4}, "use more examples")],
    ids=["unknown", "negative", "no_train", "seed", "max_examples", "too_few"],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        load_dataset(**kwargs)


def test_datasets_names():
    assert DATASETS == ("rotten_tomatoes", "imdb", "bbc_news", "fine_food")


@pytest.mark.parametrize("fractions", [(0.5, 0.5), (0.7, 0.4, -0.1), (0.5, 0.2, 0.2)])
def test_bad_fractions(fractions):
    frame = pd.DataFrame({"text": list("abcd"), "label": [0, 1, 0, 1]})
    with pytest.raises(ValueError, match="fractions"):
        stratified_split(frame, fractions, seed=0)


@pytest.mark.parametrize("seed", range(5))
def test_stratified_split_partitions_any_labelling(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 1 + seed, size=int(rng.integers(1, 300)))
    frame = pd.DataFrame({"text": [f"row {i}" for i in range(len(labels))], "label": labels})
    parts = stratified_split(frame, (0.6, 0.3, 0.1), seed)
    texts = [set(p["text"]) for p in parts]
    assert sum(len(t) for t in texts) == len(frame) and set().union(*texts) == set(frame["text"])
    for part, fraction in zip(parts, (0.6, 0.3, 0.1), strict=True):
        for c in np.unique(labels):
            assert abs((part["label"] == c).sum() - fraction * (labels == c).sum()) <= 2
    again = stratified_split(frame, (0.6, 0.3, 0.1), seed)
    for x, y in zip(parts, again, strict=True):
        pd.testing.assert_frame_equal(x, y)


def test_hand_made_splits_get_a_content_fingerprint():
    frame = pd.DataFrame({"text": ["a", "b"], "label": [0, 1]})
    a = TextSplits(frame, frame, frame, num_labels=2)
    b = TextSplits(frame.copy(), frame, frame, num_labels=2)
    c = TextSplits(frame.assign(label=[1, 0]), frame, frame, num_labels=2)
    assert a.fingerprint == b.fingerprint != c.fingerprint
    with pytest.raises(ValueError, match="label_names"):
        TextSplits(frame, frame, frame, num_labels=2, label_names=("x",))
    with pytest.raises(ValueError, match="columns"):
        TextSplits(frame.rename(columns={"text": "sentence"}), frame, frame, num_labels=2)


# ---------------------------------------------------------------------------------------------
# fine-food reviews: an R lazy-load database inside a Debian package (optional)


@pytest.mark.parametrize("kind", ["Z", "2", "1", "0", "none"])
def test_lazyload_entries_decompress(kind):
    import bz2
    import lzma
    import zlib

    data = b"X\n" + bytes(range(256)) * 50
    lzma2 = [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}]
    payload = {"Z": b"Z" + lzma.compress(data, format=lzma.FORMAT_RAW, filters=lzma2),
               "2": b"2" + bz2.compress(data), "1": b"1" + zlib.compress(data), "0": b"0" + data,
               "none": zlib.compress(data)}[kind]
    entry = len(data).to_bytes(4, "big") + payload
    rdb = b"junk" + entry + b"more"
    assert read_lazyload_entry(rdb, 4, len(entry)) == data
    bad = (len(data) + 1).to_bytes(4, "big") + payload
    with pytest.raises(ValueError, match="header says"):
        read_lazyload_entry(bad, 0, len(bad))


def test_fine_food_without_apt_names_the_commands(monkeypatch):
    import shutil

    real = shutil.which
    monkeypatch.setattr(shutil, "which",
                        lambda tool, *a, **k: None if tool == "apt-get" else real(tool, *a, **k))
    with pytest.raises(OfflineResourceMissing, match="apt-get download r-cran-modeldata && dpkg-deb -x"):
        load_dataset("fine_food")


@pytest.mark.slow
def test_fine_food_loads_5000_reviews():
    pytest.importorskip("rdata", reason="pip install 'rdata>=0.11'")
    try:
        s = load_dataset("fine_food")
    except OfflineResourceMissing as exc:  # no apt here: the message says what to run
        pytest.skip(str(exc))
    assert s.label_names == ("great", "other") and s.num_labels == 2
    assert [len(f) for f in _frames(s)] == [4000, 500, 500]
    total = pd.concat(_frames(s))["label"].value_counts().sort_index().tolist()
    assert total == [2600 + 658, 1400 + 342]  # modeldata's training + testing tables
    assert pd.concat(_frames(s))["text"].str.len().min() > 0
