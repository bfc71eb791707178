"""Checkpoints of a training run: what a resume needs, nothing more, written atomically.

A checkpoint is one ``torch.save`` file whose contents load with ``weights_only=True`` (tensors,
numbers, strings, lists, dicts): the trainable parameters (those with ``requires_grad``; the
frozen rest is rebuilt from the config) and floating buffers, the optimiser, scheduler and
gradient-scaler states, the RNG states (torch CPU, CUDA, the batch-order generator), the step,
the rows recorded so far, the best-validation snapshot and the callbacks' state dicts.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["CHECKPOINT_NAME", "load_checkpoint", "load_trainable_state", "save_checkpoint",
           "trainable_state"]

CHECKPOINT_NAME = "checkpoint.pt"
FORMAT_VERSION = 1


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """CPU copies of the parameters that require grad and of the floating-point buffers, by name."""
    state = {name: p.detach().to("cpu", copy=True) for name, p in model.named_parameters() if p.requires_grad}
    for name, buffer in model.named_buffers():
        if buffer.is_floating_point():
            state[name] = buffer.detach().to("cpu", copy=True)
    return state


def load_trainable_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy ``state`` (from :func:`trainable_state`) into ``model`` in place.

    Raises:
        ValueError: the names do not match the model's trainable parameters (a model prepared
            with another method or options than the one the state came from).
    """
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    expected = {n for n, p in params.items() if p.requires_grad}
    expected |= {n for n, b in buffers.items() if b.is_floating_point()}
    if set(state) != expected:
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        raise ValueError(
            f"the saved state does not fit this model (missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}); was the model prepared with the same method and options?"
        )
    with torch.no_grad():
        for name, value in state.items():
            target = params[name] if name in params else buffers[name]
            if target.shape != value.shape:
                raise ValueError(f"{name}: saved shape {tuple(value.shape)} != model's {tuple(target.shape)}")
            target.copy_(value)


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` to ``path`` atomically (temporary file in the same folder, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save({"format_version": FORMAT_VERSION, **payload}, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` (``weights_only=True``: no pickled code).

    Raises:
        ValueError: the file is unreadable, holds more than tensors and plain values, or comes
            from another format version.
    """
    try:
        payload = torch.load(Path(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"cannot read checkpoint {path}: {exc}; delete it to start the run afresh") from exc
    if not isinstance(payload, dict) or payload.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path} is not a checkpoint of format {FORMAT_VERSION}; delete it to start afresh")
    return payload
