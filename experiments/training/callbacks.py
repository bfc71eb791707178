"""Hooks into :func:`experiments.training.loop.train`: the live training state and a no-op base class.

A callback sees the model, optimiser and data through :class:`TrainState` and records with
``state.log(kind, **values)`` (one tidy row, stored with the run's rows and checkpointed with
them). Its own state goes through :meth:`Callback.state_dict` / :meth:`Callback.load_state_dict`
so that a resumed run continues where the interrupted one stopped; the dict must hold only
tensors, numbers, strings, bools, None and lists / tuples / dicts of them (it is saved with
``torch.save`` and loaded with ``weights_only=True``).

Order of calls: ``on_start`` (once per process, after a resume has restored everything, so
``state.step`` is the step resumed from), then per step ``on_batch_end`` after the optimiser
step, ``on_evaluate`` after every validation pass (step 0 included on a fresh run), ``on_end``
after the last step (or the NaN stop) while the model still holds that step's parameters; the
test pass on the best-validation parameters comes after it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from experiments.data.encoding import EncodedSplits
from experiments.records import RESERVED_KINDS
from experiments.training.config import TrainConfig

__all__ = ["Callback", "TrainState"]


@dataclass
class TrainState:
    """What callbacks see. ``step`` is the number of optimiser steps done so far."""

    config: TrainConfig
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    data: EncodedSplits
    device: torch.device
    out_dir: Path
    step: int = 0
    start_step: int = 0  # the step this process started from (> 0 after a resume)
    _sink: Callable[[dict[str, Any]], None] | None = field(default=None, repr=False)

    def log(self, kind: str, **values: Any) -> None:
        """Record one row ``{"step": self.step, "kind": kind, **values}``.

        Values must be scalars (numbers, strings, bools, None or 0-d tensors).

        Raises:
            ValueError: ``kind`` is one the trainer writes itself, or a value is not a scalar.
        """
        if not isinstance(kind, str) or not kind or kind in RESERVED_KINDS:
            raise ValueError(f"kind must be a non-empty string other than {RESERVED_KINDS}, got {kind!r}")
        row: dict[str, Any] = {"step": self.step, "kind": kind}
        for key, value in values.items():
            if key in row:
                raise ValueError(f"{key!r} is set by the trainer; use another column name")
            if isinstance(value, torch.Tensor):
                if value.numel() != 1:
                    raise ValueError(f"{key}: a tensor of shape {tuple(value.shape)} is not a scalar")
                value = value.item()
            if not (value is None or isinstance(value, bool | int | float | str)):
                raise ValueError(f"{key}: {type(value).__name__} is not a scalar (number, str, bool, None)")
            row[key] = value
        if self._sink is None:
            raise RuntimeError("this TrainState is not attached to a running train()")
        self._sink(row)


class Callback:
    """Base class: every hook does nothing. Override the ones you need."""

    def on_start(self, state: TrainState) -> None:
        """Once per process, before the first step this process runs."""

    def on_batch_end(self, state: TrainState, batch: dict[str, torch.Tensor], loss: float) -> None:
        """After the optimiser step ``state.step``; ``batch`` (on the device) is what it trained on."""

    def on_evaluate(self, state: TrainState, metrics: dict[str, float]) -> None:
        """After a validation pass: ``metrics`` has loss, accuracy, macro_f1, examples."""

    def on_end(self, state: TrainState) -> None:
        """Once, after the last step or a NaN stop, before the test pass (final parameters)."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} keeps no state but was given keys {sorted(state)}")
