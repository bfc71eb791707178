"""The config of one fine-tuning run (:class:`TrainConfig`): every field that changes its numbers,
checked when built, with a stable hash (the first 16 hex digits of the SHA-256 of its sorted JSON).

The loop (:mod:`experiments.training.loop`) and the callbacks (:mod:`experiments.training.callbacks`)
both read it; it imports neither.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["TrainConfig"]

OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("constant", "linear", "cosine")
PRECISIONS = ("no", "bf16", "fp16")
SELECT_BY = ("accuracy", "macro_f1", "loss")
HEADS = ("train", "frozen")


def _freeze(value: Any, key: str) -> Any:
    """JSON-like value -> hashable (lists become tuples); anything else is refused."""
    if isinstance(value, list | tuple):
        return tuple(_freeze(v, key) for v in value)
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise ValueError(f"method option {key!r}: {value!r} is not JSON-serialisable (use numbers, strings, "
                     f"bools, None or lists of them)")


def _thaw(value: Any) -> Any:
    return [_thaw(v) for v in value] if isinstance(value, tuple) else value


def _choices(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; choose one of: {', '.join(choices)}")


@dataclass(frozen=True)
class TrainConfig:
    """One fine-tuning run. Everything that changes its numbers is here (and in its hash)."""

    model: str = field(default="minilm", metadata={
        "help": "model short name (experiments.data.models.MODELS)"})
    dataset: str = field(default="rotten_tomatoes", metadata={
        "help": "data set (experiments.data.datasets.DATASETS)"})
    method: str = field(default="propulsion", metadata={
        "help": "fine-tuning method (experiments.training.methods)"})
    method_options: tuple[tuple[str, Any], ...] = field(default=(), metadata={
        "help": "options of the method as (key, value) pairs or a mapping, e.g. degree=15; "
                "propulsion also takes preset='reference' (the authors' released defaults)"})
    head: str = field(default="train", metadata={"help": "classification head: 'train' or 'frozen'"})
    optimizer: str = field(default="adamw", metadata={"help": "'adamw' or 'sgd'"})
    lr: float = field(default=3e-3, metadata={"help": "peak learning rate (> 0)"})
    weight_decay: float = field(default=0.0, metadata={"help": "decoupled (AdamW) or L2 (SGD) decay"})
    momentum: float = field(default=0.9, metadata={"help": "SGD momentum"})
    betas: tuple[float, float] = field(default=(0.9, 0.999), metadata={"help": "AdamW betas"})
    schedule: str = field(default="linear", metadata={
        "help": "after warm-up: constant, linear or cosine decay"})
    warmup_steps: int = field(default=0, metadata={"help": "linear warm-up from lr/(W+1) to lr over W steps"})
    steps: int = field(default=200, metadata={"help": "optimiser steps (> 0)"})
    batch_size: int = field(default=16, metadata={"help": "training examples per step"})
    eval_batch_size: int = field(default=64, metadata={"help": "examples per forward in evaluation"})
    clip_norm: float | None = field(default=1.0, metadata={"help": "max gradient 2-norm; None: no clipping"})
    eval_every: int = field(default=50, metadata={"help": "validation pass every n steps (and at 0, end)"})
    eval_examples: int | None = field(default=None, metadata={
        "help": "validation examples per pass (a fixed seeded subset); None: the whole split"})
    max_length: int = field(default=64, metadata={"help": "tokens per sequence at most"})
    max_examples: int | None = field(default=None, metadata={"help": "keep this many examples (quick runs)"})
    seed: int = field(default=0, metadata={"help": "seeds head init, adapters, dropout, batch order"})
    split_seed: int = field(default=0, metadata={
        "help": "seeds the train/validation/test split (kept fixed while seed varies)"})
    device: str = field(default="cpu", metadata={"help": "'cpu', 'cuda', 'cuda:N' or 'auto'"})
    mixed_precision: str = field(default="no", metadata={"help": "'no', 'bf16' or 'fp16' (CUDA only)"})
    checkpoint_every: int | None = field(default=50, metadata={
        "help": "checkpoint every n steps for resuming; None: no intermediate checkpoints"})
    target_accuracy: float | None = field(default=0.8, metadata={
        "help": "validation accuracy for the steps/seconds-to-target summary"})
    select_by: str = field(default="accuracy", metadata={
        "help": "validation metric choosing the tested parameters: accuracy, macro_f1 or loss"})
    save_best: bool = field(default=True, metadata={"help": "write best.safetensors at the end"})
    dropout: float | None = field(default=None, metadata={
        "help": "set every nn.Dropout's p to this (0: off, e.g. for linearisation studies); None: model's"})

    def __post_init__(self) -> None:
        from experiments.data.datasets import DATASETS
        from experiments.data.models import MODELS
        from experiments.training.methods import METHODS

        _choices("model", self.model, MODELS)
        _choices("dataset", self.dataset, DATASETS)
        _choices("method", self.method, METHODS)
        _choices("head", self.head, HEADS)
        _choices("optimizer", self.optimizer, OPTIMIZERS)
        _choices("schedule", self.schedule, SCHEDULES)
        _choices("mixed_precision", self.mixed_precision, PRECISIONS)
        _choices("select_by", self.select_by, SELECT_BY)
        options = self.method_options
        pairs = list(options.items()) if isinstance(options, Mapping) else [tuple(p) for p in options]
        if any(len(p) != 2 or not isinstance(p[0], str) for p in pairs):
            raise ValueError(f"method_options must be (key, value) pairs with string keys, got {options!r}")
        keys = [k for k, _ in pairs]
        if len(set(keys)) != len(keys):
            raise ValueError(f"method_options repeat a key: {keys}")
        object.__setattr__(self, "method_options", tuple(sorted((k, _freeze(v, k)) for k, v in pairs)))
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        if not (isinstance(self.lr, int | float) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a positive, finite number, got {self.lr!r}")
        for name in ("steps", "batch_size", "eval_batch_size", "eval_every", "max_length"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("eval_examples", "max_examples", "checkpoint_every"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be None or a positive integer, got {value!r}")
        for name in ("seed", "split_seed", "warmup_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
        if self.warmup_steps >= self.steps:
            raise ValueError(f"warmup_steps must be in [0, steps={self.steps}), got {self.warmup_steps}")
        if self.weight_decay < 0 or not 0 <= self.momentum < 1:
            raise ValueError(f"weight_decay must be >= 0 and momentum in [0, 1), got {self.weight_decay}, "
                             f"{self.momentum}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas}")
        if self.dropout is not None and not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be None or in [0, 1), got {self.dropout}")
        if self.clip_norm is not None and not self.clip_norm > 0:
            raise ValueError(f"clip_norm must be None or > 0, got {self.clip_norm}")
        if self.target_accuracy is not None and not 0 < self.target_accuracy <= 1:
            raise ValueError(f"target_accuracy must be in (0, 1], got {self.target_accuracy}")
        if not (self.device in ("cpu", "cuda", "auto") or self.device.startswith("cuda:")):
            raise ValueError(f"device must be 'cpu', 'cuda', 'cuda:N' or 'auto', got {self.device!r}")
        if self.mixed_precision != "no" and self.device == "cpu":
            raise ValueError(f"mixed_precision={self.mixed_precision!r} needs CUDA; use 'no' on the CPU")
        if self.method != "propulsion" and "preset" in dict(self.method_options):
            raise ValueError("the option 'preset' is for method 'propulsion' only")
        if dict(self.method_options).get("preset", "reference") != "reference":
            raise ValueError(f"unknown propulsion preset {dict(self.method_options)['preset']!r}; "
                             f"known: 'reference'")
        from experiments.training.methods import check_options

        check_options(self.method, tuple(k for k, _ in self.method_options if k != "preset"))

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["method_options"] = {k: _thaw(v) for k, v in self.method_options}
        out["betas"] = list(self.betas)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown TrainConfig fields {sorted(unknown)}; known: {sorted(known)}")
        return cls(**data)

    def config_hash(self) -> str:
        """First 16 hex digits of the SHA-256 of the sorted JSON of :meth:`to_dict`."""
        text = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def prepare_options(self) -> dict[str, Any]:
        """Keyword options for :func:`experiments.training.methods.prepare` (the Propulsion preset
        resolved)."""
        options = {k: _thaw(v) for k, v in self.method_options}
        preset = options.pop("preset", None)
        if preset is not None:
            if preset != "reference":
                raise ValueError(f"unknown propulsion preset {preset!r}; known: 'reference'")
            from propulsion import PropulsionConfig

            options = {"config": PropulsionConfig.reference(options.pop("degree", 5)).replace(**options)}
        return options
