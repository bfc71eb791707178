"""Model inputs: validation, tiling, device moves and running a function once per example.

An input is a tensor or a mapping of tensors (what a transformers model takes: ``input_ids``,
``attention_mask``, ...), batched along dimension 0. A mapping is passed as keyword arguments.

Per-example functions (one Jacobian or one vector-Jacobian product per example) are mapped over
a batch in one of two ways, chosen once per call by :func:`choose_mapper`:

- ``vmap``: ``torch.func.vmap`` over dimension 0 (fast, batched kernels);
- ``loop``: a Python loop over examples, each run as a batch of one (always correct, slower).

transformers 5.x builds its attention mask with data-dependent branches (``mask.all()``), which
``vmap`` over examples cannot trace. For a transformers model, :func:`vmap_safe` therefore
replaces a 2-D ``attention_mask`` (N, T) of 0/1 by the ready 4-D additive mask (N, 1, T, T) that
transformers returns unchanged (0 where attended, the dtype's minimum where padded). The
choice is then *checked*: the mapped forward on the first examples must reproduce the plain
batched forward with the original inputs; if it raises or differs, the loop is used, with a
warning saying why. The loop always uses the original inputs.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, vmap

__all__ = [
    "InputError",
    "Inputs",
    "Mapper",
    "batch_size",
    "call_model",
    "check_compatible",
    "choose_mapper",
    "is_transformers_model",
    "probe_indices",
    "select",
    "take",
    "to_device",
    "vmap_safe",
]

Inputs = torch.Tensor | Mapping[str, torch.Tensor]


class InputError(ValueError):
    """Inputs are malformed: not tensors, no batch dimension, or inconsistent shapes."""


def _items(x: Inputs) -> list[tuple[str, torch.Tensor]]:
    return [("", x)] if isinstance(x, torch.Tensor) else list(x.items())


def batch_size(x: Inputs, name: str = "x") -> int:
    """Number of examples N of an input, after checking it is a valid batch.

    Raises:
        InputError: not a tensor or mapping of tensors, an empty mapping, a tensor without a
            batch dimension, an empty batch, or tensors of one mapping with different sizes
            along dimension 0.
    """
    if not isinstance(x, (torch.Tensor, Mapping)):
        raise InputError(f"{name} must be a tensor or a mapping of tensors, got {type(x).__name__}")
    if isinstance(x, Mapping) and not x:
        raise InputError(f"{name} is an empty mapping")
    sizes = {}
    for key, t in _items(x):
        label = f"{name}[{key!r}]" if key else name
        if not isinstance(t, torch.Tensor):
            raise InputError(
                f"{label} is a {type(t).__name__}; every input must be a tensor batched on dim 0"
            )
        if t.ndim == 0:
            raise InputError(f"{label} is a 0-d tensor; inputs need a batch dimension (dim 0)")
        sizes[key] = t.shape[0]
    if len(set(sizes.values())) > 1:
        listing = ", ".join(f"{k} has {n}" for k, n in sizes.items())
        raise InputError(f"batch sizes differ inside the mapping {name}: {listing}")
    n = next(iter(sizes.values()))
    if n == 0:
        raise InputError(f"{name} holds no examples (batch size 0)")
    return n


def example_counts(x1: Inputs, x2: Inputs | None) -> tuple[int, int]:
    """``(n1, n2)`` after validating both inputs; ``x2=None`` means "same as x1" (n2 = n1).

    Raises:
        InputError: as :func:`batch_size` and :func:`check_compatible`.
    """
    n1 = batch_size(x1, "x1")
    if x2 is None:
        return n1, n1
    n2 = batch_size(x2, "x2")
    check_compatible(x1, x2)
    return n1, n2


def check_compatible(x1: Inputs, x2: Inputs) -> None:
    """Check that x1 and x2 are the same kind of input with the same per-example shapes.

    Raises:
        InputError: one is a tensor and the other a mapping, the mappings have different keys,
            or a tensor's shape beyond dimension 0 differs (pad both to one sequence length).
    """
    if isinstance(x1, torch.Tensor) != isinstance(x2, torch.Tensor):
        raise InputError("x1 and x2 must both be tensors or both be mappings of tensors")
    if isinstance(x1, Mapping) and isinstance(x2, Mapping) and set(x1) != set(x2):
        raise InputError(f"x1 and x2 have different keys: {sorted(x1)} vs {sorted(x2)}")
    d2 = dict(_items(x2))
    for key, t1 in _items(x1):
        t2 = d2[key]
        if t1.shape[1:] != t2.shape[1:]:
            label = f"[{key!r}]" if key else ""
            raise InputError(
                f"x1{label} and x2{label} have different per-example shapes: "
                f"{tuple(t1.shape[1:])} vs {tuple(t2.shape[1:])} (shape beyond the batch "
                "dimension); pad token inputs of both to one sequence length"
            )


def take(x: Inputs, start: int, stop: int) -> Inputs:
    """Examples ``start:stop`` of a batch (views, no copies)."""
    if isinstance(x, torch.Tensor):
        return x[start:stop]
    return {k: v[start:stop] for k, v in x.items()}


def select(x: Inputs, indices: list[int]) -> Inputs:
    """The examples at ``indices`` (a copy)."""
    if isinstance(x, torch.Tensor):
        return x[indices]
    return {k: v[indices] for k, v in x.items()}


def probe_indices(x: Inputs, k: int) -> list[int]:
    """Up to ``k`` distinct examples to probe the model with: the most padded one first.

    With a 2-D ``attention_mask`` the example with the fewest attended positions is included,
    so that a mask the vmap path mishandles changes the probe's outputs; then 0, 1, ...
    """
    n = batch_size(x)
    first: list[int] = []
    if isinstance(x, Mapping):
        mask = x.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.ndim == 2:
            first = [int(mask.to(torch.float64).sum(1).argmin())]
    order = first + [i for i in range(n) if i not in first]
    return order[: min(k, n)]


def to_device(x: Inputs, device: torch.device) -> Inputs:
    """The input on ``device`` (tensors already there are not copied)."""
    if isinstance(x, torch.Tensor):
        return x.to(device)
    return {k: v.to(device) for k, v in x.items()}


def call_model(model: nn.Module, params: Mapping[str, torch.Tensor], x: Inputs) -> Any:
    """``model(x)`` or ``model(**x)`` with ``params`` substituted (others read from the model).

    The model's own tensors are put back afterwards: ``torch.func.functional_call`` leaves the
    substitute in place for a module registered at two paths (it saves the second path's
    "original" after swapping the first, which is the same attribute), so a kernel computed
    under ``vmap`` would leave a functorch wrapper as the model's parameter."""
    own: list[tuple[nn.Module, dict[str, Any], dict[str, Any]]] = [
        (m, dict(m._parameters), dict(m._buffers)) for m in model.modules()]
    try:
        if isinstance(x, torch.Tensor):
            return functional_call(model, dict(params), (x,))
        return functional_call(model, dict(params), (), dict(x))
    finally:
        for module, parameters, buffers in own:
            for name, tensor in parameters.items():
                if module._parameters.get(name) is not tensor:
                    module._parameters[name] = tensor
            for name, tensor in buffers.items():
                if module._buffers.get(name) is not tensor:
                    module._buffers[name] = tensor


def _unsqueeze(x: Inputs) -> Inputs:
    if isinstance(x, torch.Tensor):
        return x.unsqueeze(0)
    return {k: v.unsqueeze(0) for k, v in x.items()}


def is_transformers_model(model: nn.Module) -> bool:
    """Whether ``model`` is, or wraps (peft), a ``transformers.PreTrainedModel``."""
    import sys

    transformers = sys.modules.get("transformers")
    if transformers is None:  # never imported: cannot be a transformers model
        return False
    base = getattr(transformers, "PreTrainedModel", None)
    return base is not None and any(isinstance(m, base) for m in model.modules())


def _floating_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.get_default_dtype()


def vmap_safe(model: nn.Module, x: Inputs) -> Inputs:
    """Inputs that ``vmap`` over examples can trace through ``model``.

    For a transformers model given a 2-D ``attention_mask`` (N, T) of 0/1, returns the inputs
    with the mask replaced by the additive 4-D mask (N, 1, T, T) in the model's dtype:
    ``0`` where a key is attended, ``finfo(dtype).min`` where it is padding (what transformers'
    eager mask builder produces). Every other input is returned unchanged.
    """
    if not isinstance(x, Mapping) or not is_transformers_model(model):
        return x
    mask = x.get("attention_mask")
    if mask is None or mask.ndim != 2:
        return x
    dtype = _floating_dtype(model)
    t = mask.shape[1]
    keep = mask.to(torch.bool)[:, None, None, :]
    zero = torch.zeros((), dtype=dtype, device=mask.device)
    low = torch.full((), torch.finfo(dtype).min, dtype=dtype, device=mask.device)
    additive = torch.where(keep, zero, low).expand(-1, 1, t, t)
    return {**x, "attention_mask": additive}


def _stack(trees: list[Any]) -> Any:
    first = trees[0]
    if isinstance(first, torch.Tensor):
        return torch.stack(trees)
    if isinstance(first, Mapping):
        return {k: _stack([t[k] for t in trees]) for k in first}
    if isinstance(first, (tuple, list)):
        return type(first)(_stack(list(parts)) for parts in zip(*trees, strict=True))
    raise TypeError(f"cannot stack per-example results of type {type(first).__name__}")


@dataclass(frozen=True)
class Mapper:
    """Runs ``fn(example)`` for every example of a batch and stacks the results on dim 0.

    ``fn`` receives one example *without* its batch dimension (a tensor or a dict of tensors)
    and returns a tensor or a (nested) tuple/dict of tensors.
    """

    use_vmap: bool
    reason: str = ""

    def prepare(self, model: nn.Module, x: Inputs) -> Inputs:
        """The inputs this mapper should be given (vmap-safe ones for ``vmap``)."""
        return vmap_safe(model, x) if self.use_vmap else x

    def __call__(self, fn: Callable[[Any], Any], x: Inputs) -> Any:
        if self.use_vmap:
            return vmap(fn)(x)
        n = batch_size(x)
        return _stack([fn(_first(take(x, i, i + 1))) for i in range(n)])


def _first(x: Inputs) -> Inputs:
    if isinstance(x, torch.Tensor):
        return x[0]
    return {k: v[0] for k, v in x.items()}


def _agree(a: torch.Tensor, b: torch.Tensor) -> bool:
    tol = 1e-6 if a.dtype == torch.float64 else 1e-3 if a.dtype == torch.float32 else 5e-2
    if a.shape != b.shape:
        return False
    scale = max(b.abs().max().item(), 1e-30)
    return bool(((a - b).abs().max() <= tol * scale).item())


def choose_mapper(
    model: nn.Module,
    forward: Callable[[Inputs], torch.Tensor],
    x: Inputs,
    expected: torch.Tensor,
) -> Mapper:
    """Pick ``vmap`` or ``loop`` for per-example maps over ``model``, checked on a small batch.

    Args:
        model: the model (decides whether :func:`vmap_safe` rewrites the inputs).
        forward: batched forward ``x -> (n, C)`` with the selected parameters substituted.
        x: a few examples (the probe batch), original inputs.
        expected: ``forward(x)``, the plain batched outputs of shape (n, C).

    Returns:
        ``Mapper(use_vmap=True)`` when the vmapped per-example forward on the vmap-safe inputs
        reproduces ``expected``; otherwise ``Mapper(use_vmap=False)`` and a warning with the
        reason (the loop is slower but makes no assumption about the model).
    """
    xs = vmap_safe(model, x)
    try:
        got = vmap(lambda ex: forward(_unsqueeze(ex))[0])(xs)
    except Exception as err:  # any failure to trace: the loop needs nothing of the model
        reason = f"vmap over examples failed ({type(err).__name__}: {str(err)[:200]})"
    else:
        if _agree(got, expected):
            return Mapper(use_vmap=True)
        reason = "vmap over examples gave outputs that differ from the batched forward"
    warnings.warn(
        f"empirical_ntk: {reason}; computing per example in a Python loop instead (slower)",
        RuntimeWarning,
        stacklevel=3,
    )
    return Mapper(use_vmap=False, reason=reason)
