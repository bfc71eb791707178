"""Token ids of a data set's splits, padded on the right, cached on disk.

:class:`EncodedSplit` holds one split as tensors; :meth:`EncodedSplit.batch` trims a batch to
its longest real sequence, so short sentences cost short forwards. :func:`encode_splits`
tokenises a :class:`~experiments.data.datasets.TextSplits` once and caches the tensors as safetensors
(default ``$PROPULSION_NTK_CACHE/tokens``), with a JSON sidecar holding the file's sha256.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from experiments.data.datasets import SPLITS, TextSplits
from experiments.data.offline import cache_dir as _cache_root
from experiments.records import read_json, verify_file, write_bytes, write_json

__all__ = ["EncodedSplit", "EncodedSplits", "encode_splits", "tokenizer_identity"]

PADDING_SIDE = "right"
CACHE_VERSION = 1


@dataclass(frozen=True)
class EncodedSplit:
    """One split: ``input_ids`` and ``attention_mask`` of shape (n, T), right-padded; ``labels`` (n,)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        n = self.labels.shape[0]
        if self.input_ids.ndim != 2 or self.input_ids.shape != self.attention_mask.shape:
            raise ValueError(
                f"input_ids {tuple(self.input_ids.shape)} and attention_mask "
                f"{tuple(self.attention_mask.shape)} must both be (n, T)"
            )
        if self.input_ids.shape[0] != n or self.labels.ndim != 1:
            raise ValueError(f"labels {tuple(self.labels.shape)} must be ({self.input_ids.shape[0]},)")

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def batch(self, indices: Sequence[int] | torch.Tensor, device: str | torch.device | None = None
              ) -> dict[str, torch.Tensor]:
        """Rows ``indices`` as ``{"input_ids", "attention_mask", "labels"}``, trimmed to the longest row."""
        index = torch.as_tensor(indices, dtype=torch.long)
        mask = self.attention_mask[index]
        length = max(int(mask.sum(dim=1).max().item()), 1) if len(index) else 1
        out = {
            "input_ids": self.input_ids[index, :length],
            "attention_mask": mask[:, :length],
            "labels": self.labels[index],
        }
        if device is not None:
            out = {k: v.to(device) for k, v in out.items()}
        return out


@dataclass(frozen=True)
class EncodedSplits:
    """Encoded train / validation / test splits of one data set with one tokenizer."""

    train: EncodedSplit
    validation: EncodedSplit
    test: EncodedSplit
    num_labels: int
    fingerprint: str  # hash of (split record, tokenizer, max_length): what the cache is keyed on


def tokenizer_identity(tokenizer: Any) -> dict[str, Any]:
    """What makes a tokenizer's output what it is: name, vocabulary size and a sha256 of its rules.

    The hash covers the vocabulary, the special tokens and their ids, and (for fast tokenizers)
    the whole serialised pipeline (normaliser, pre-tokeniser, model, post-processor).
    """
    h = hashlib.sha256()
    h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    specials = {k: str(v) for k, v in tokenizer.special_tokens_map.items()}
    h.update(json.dumps([sorted(specials.items()), tokenizer.pad_token_id]).encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # truncation/padding state changes with every call: not part of the rules
        rules = {k: v for k, v in json.loads(backend.to_str()).items() if k not in ("truncation", "padding")}
        h.update(json.dumps(rules, sort_keys=True).encode())
    return {"name_or_path": str(getattr(tokenizer, "name_or_path", "")), "vocab_size": len(tokenizer),
            "sha256": h.hexdigest()}


def _encode_split(texts: Sequence[str], labels: np.ndarray, tokenizer: Any, max_length: int, pad_id: int
                  ) -> EncodedSplit:
    """Token ids truncated to ``max_length`` (special tokens kept), right-padded with ``pad_id``."""
    n = len(texts)
    input_ids = torch.full((n, max_length), pad_id, dtype=torch.int64)
    attention_mask = torch.zeros((n, max_length), dtype=torch.int64)
    if n:
        rows = tokenizer(list(texts), truncation=True, max_length=max_length, padding=False,
                         return_attention_mask=False, return_token_type_ids=False)["input_ids"]
        for i, row in enumerate(rows):
            if not 0 < len(row) <= max_length:
                raise RuntimeError(f"tokenizer returned {len(row)} tokens for row {i} "
                                   f"(max_length {max_length})")
            input_ids[i, :len(row)] = torch.as_tensor(row, dtype=torch.int64)
            attention_mask[i, :len(row)] = 1
    return EncodedSplit(input_ids, attention_mask, torch.tensor(np.asarray(labels), dtype=torch.int64))


def _save(path: Path, sidecar: Path, encoded: EncodedSplits, meta: dict[str, Any]) -> None:
    """Tensors first, then the sidecar with their hash: a sidecar always describes a complete file."""
    from safetensors.torch import save

    tensors = {f"{s}.{field}": getattr(getattr(encoded, s), field).contiguous()
               for s in SPLITS for field in ("input_ids", "attention_mask", "labels")}
    digest = write_bytes(path, save(tensors, metadata={"fingerprint": encoded.fingerprint}))
    write_json({**meta, "sha256": digest}, sidecar)


def _load(path: Path, sidecar: Path, fingerprint: str, num_labels: int, sizes: dict[str, int]
          ) -> EncodedSplits | None:
    """The cached splits, or None (with a warning) when the file is missing, damaged or does not match."""
    if not path.exists() and not sidecar.exists():
        return None
    try:
        meta = read_json(sidecar, require_checksum=False)
        if meta.get("fingerprint") != fingerprint:
            raise ValueError("sidecar describes another encoding")
        from safetensors.torch import load_file

        tensors = load_file(str(verify_file(path, meta.get("sha256"), "rebuilding it")))
        splits = {s: EncodedSplit(tensors[f"{s}.input_ids"], tensors[f"{s}.attention_mask"],
                                  tensors[f"{s}.labels"]) for s in SPLITS}
        if {s: len(v) for s, v in splits.items()} != sizes:
            raise ValueError("split sizes differ from the data")
    except Exception as exc:  # any damage means: rebuild
        warnings.warn(f"token cache {path} is damaged or incomplete ({exc}); rebuilding it", stacklevel=3)
        return None
    return EncodedSplits(splits["train"], splits["validation"], splits["test"], num_labels, fingerprint)


def encode_splits(splits: TextSplits, tokenizer: Any, *, max_length: int,
                  cache_dir: str | Path | None = None) -> EncodedSplits:
    """Tokenise every split: truncated to ``max_length`` tokens, right-padded to it, cached on disk.

    Returns tensors ``input_ids`` and ``attention_mask`` of shape (n, max_length) and ``labels``
    (n,), all int64. The cache (``cache_dir``, default ``$PROPULSION_NTK_CACHE/tokens``) is keyed
    on ``splits.fingerprint``, :func:`tokenizer_identity`, ``max_length`` and the padding side; a
    hit returns identical tensors; a damaged file is detected by its sha256 and rebuilt with a warning.

    Raises:
        ValueError: ``max_length < 2``; a label outside 0..num_labels-1; a text that is not a string;
            a tokenizer without a pad token.
    """
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"max_length must be an integer >= 2 (room for the special tokens), "
                         f"got {max_length!r}")
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        raise ValueError("the tokenizer has no pad token; set one (e.g. tokenizer.pad_token = "
                         "tokenizer.eos_token, as experiments.data.models.load_tokenizer does)")
    frames = splits.splits()
    for s, frame in frames.items():
        labels = frame["label"].to_numpy()
        outside = len(labels) > 0 and (labels.min() < 0 or labels.max() >= splits.num_labels)
        if labels.dtype.kind not in "iu" or outside:
            raise ValueError(f"{splits.name} {s}: labels must be integers in 0..{splits.num_labels - 1}, "
                             f"got values {sorted(set(labels.tolist()))[:10]}")
        bad = [i for i, t in enumerate(frame["text"]) if not isinstance(t, str)]
        if bad:
            raise ValueError(f"{splits.name} {s}: rows {bad[:10]} have no text (not a string)")
    meta = {"version": CACHE_VERSION, "splits": splits.fingerprint, "name": splits.name,
            "tokenizer": tokenizer_identity(tokenizer), "max_length": max_length,
            "padding_side": PADDING_SIDE}
    fingerprint = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()
    folder = Path(cache_dir) if cache_dir is not None else _cache_root("tokens")
    folder.mkdir(parents=True, exist_ok=True)
    label = "".join(c if c.isalnum() or c in "_-" else "_" for c in splits.name)[:40]
    stem = f"{label}-T{max_length}-{fingerprint[:32]}"
    path, sidecar = folder / f"{stem}.safetensors", folder / f"{stem}.json"
    sizes = {s: len(f) for s, f in frames.items()}
    cached = _load(path, sidecar, fingerprint, splits.num_labels, sizes)
    if cached is not None:
        return cached
    parts = {s: _encode_split(list(f["text"]), f["label"].to_numpy(), tokenizer, max_length, int(pad_id))
             for s, f in frames.items()}
    encoded = EncodedSplits(parts["train"], parts["validation"], parts["test"], splits.num_labels,
                            fingerprint)
    _save(path, sidecar, encoded, {**meta, "fingerprint": fingerprint, "sizes": sizes})
    return encoded
