"""Checkpoints of a training run: what a resume needs, nothing more, written atomically.

A checkpoint is one ``torch.save`` file whose contents load with ``weights_only=True`` (tensors,
numbers, strings, lists, dicts): the trainable parameters (those with ``requires_grad``; the
frozen rest is rebuilt from the config) and floating buffers, the optimiser, scheduler and
gradient-scaler states, the RNG states (torch CPU, CUDA, the batch-order generator), the step,
the rows recorded so far, the best-validation snapshot and the callbacks' state dicts. The file
ends with the sha256 of the bytes before it, checked on load: a flipped bit is refused.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Any

import torch
from torch import nn

from experiments.records import DamagedFileError, write_bytes

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


_TRAILER = b"\nsha256:"  # the file is torch.save's bytes, this marker, then their sha256 (64 hex)


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` to ``path`` atomically, followed by the sha256 of its bytes."""
    buffer = io.BytesIO()
    torch.save({"format_version": FORMAT_VERSION, **payload}, buffer)
    data = buffer.getvalue()
    write_bytes(Path(path), data + _TRAILER + hashlib.sha256(data).hexdigest().encode())


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` (``weights_only=True``: no pickled code),
    after checking its bytes against the sha256 at its end.

    Raises:
        DamagedFileError: the file is unreadable, damaged (sha256), holds more than tensors and
            plain values, or comes from another format version; the message names it.
    """
    path = Path(path)
    afresh = "delete it to start the run afresh (or from an earlier copy)"
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DamagedFileError(f"cannot read checkpoint {path} ({exc}); {afresh}") from exc
    data, marker, digest = raw[: -len(_TRAILER) - 64], raw[-len(_TRAILER) - 64: -64], raw[-64:]
    if marker != _TRAILER or hashlib.sha256(data).hexdigest().encode() != digest:
        raise DamagedFileError(f"checkpoint {path} is damaged or has no sha256 (its bytes do not match "
                               f"the checksum at its end); {afresh}")
    try:
        payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise DamagedFileError(f"cannot read checkpoint {path}: {exc}; {afresh}") from exc
    if not isinstance(payload, dict) or payload.get("format_version") != FORMAT_VERSION:
        raise DamagedFileError(f"{path} is not a checkpoint of format {FORMAT_VERSION}; {afresh}")
    return payload
