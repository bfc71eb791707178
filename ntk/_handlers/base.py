"""What every handler shares: the recorded calls, the handler interface, token reshaping and
the dot products of per-example vectors.

Notation (the theory page of the docs, docs/theory.md): a tile holds ``n`` examples; token axes
of a call (everything between the batch and the feature dimension) are flattened to ``T``; the
calls of a module in one forward are concatenated along ``T`` (weight sharing counts every use).
Back-signals have shape ``(C, n, T, d_out)``. Blocks have the layout of the request: ``full``
(n1, n2, C, C), ``diagonal`` (n1, n2, C) or ``trace`` (n1, n2).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = [
    "CHUNK_ELEMENTS",
    "STRATEGIES",
    "SYM_BLOCK",
    "Call",
    "Calls",
    "Handler",
    "StructuredError",
    "VectorHandler",
    "batched_vjp",
    "close_to",
    "dot",
]

STRATEGIES = ("auto", "ghost", "materialise")
CHUNK_ELEMENTS = 2**24  # largest intermediate of a contraction, in entries (128 MiB in float64)
SYM_BLOCK = 128  # rows per block below which a symmetric Gram matrix is formed whole


class StructuredError(ValueError):
    """The structured engine cannot attribute a parameter's gradient to examples."""


@dataclass
class Call:
    """One call of a hooked module in the capture forward.

    Attributes:
        args, kwargs: the inputs as the module received them.
        output: the output tensor (expanded to the batch when the module ran on a batch of 1
            that broadcast against the batch).
        grad: back-signals ``d f_c / d output`` stacked over outputs, shape ``(C, *output.shape)``;
            None for modules hooked only for their output.
        mode: ``""`` for a batched call, else how its unbatched output was broadcast to the
            batch (``"expand"`` or ``"prepend"``, see :func:`_tokens`).
        batched: which arguments carry the batch on dimension 0, as seen in the probe runs
            with two batch sizes (positional flags, keyword flags); None when unknown.
    """

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    output: torch.Tensor
    grad: torch.Tensor | None = None
    mode: str = ""
    batched: tuple[tuple[bool, ...], dict[str, bool]] | None = None


Calls = Mapping[nn.Module, list[Call]]


def dot(v1: torch.Tensor, v2: torch.Tensor, layout: str, same: bool = False) -> torch.Tensor:
    """Blocks from per-example vectors ``v1`` (C, n1, P), ``v2`` (C, n2, P).

    ``full``: ``K[a, b, c, c'] = <v1[c, a], v2[c', b]>`` (n1, n2, C, C); ``diagonal``: c = c'
    (n1, n2, C); ``trace``: the sum over c of the diagonal (n1, n2). ``same``: v1 is v2.
    """
    w1, w2 = v1.transpose(0, 1), v2.transpose(0, 1)
    k = _dot_examples(w1, w2, layout, same)
    if layout == "full":
        return k.view(w1.shape[0], w1.shape[1], w2.shape[0], w1.shape[1]).permute(0, 2, 1, 3)
    return k


def _pairs(c: int, layout: str) -> int:
    return c * c if layout == "full" else c


def _tokens(t: torch.Tensor, n: int, features: int, what: str, module: nn.Module,
            mode: str = "") -> torch.Tensor:
    """``t`` as (n, T, features) (or (n, T) when ``features`` is 0).

    ``mode`` says how a call without a batch dimension broadcasts against the batch: ``""``
    (batched: dimension 0 is the batch), ``"expand"`` (a leading 1 is the batch; otherwise as
    ``"prepend"``) or ``"prepend"`` (a new batch dimension in front), see
    :func:`ntk._structured.capture`.
    """
    if mode == "prepend" or (mode == "expand" and (t.ndim == 0 or t.shape[0] != 1)):
        t = t.expand(n, *t.shape)
    elif mode == "expand":
        t = t.expand(n, *t.shape[1:])
    if t.ndim < 1 or t.shape[0] != n or (features and t.shape[-1] != features):
        raise StructuredError(
            f"{type(module).__name__}: the {what} has shape {tuple(t.shape)}, expected (n={n}, "
            f"..., {features or 'd'}); the structured engine needs the batch on dimension 0 of "
            "every layer input (use method='jacobian' for this model)"
        )
    return t.reshape(n, -1, features) if features else t.reshape(n, -1)


def _grads(calls: list[Call], n: int, features: int, dtype: torch.dtype, module: nn.Module):
    """Back-signals of all calls as (C, n, T_total, features) in ``dtype``."""
    parts = []
    for call in calls:
        assert call.grad is not None
        g = call.grad
        c = g.shape[0]
        parts.append(_tokens(g.flatten(0, 1), c * n, features, "back-signal", module)
                     .view(c, n, -1, features).to(dtype))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)


def close_to(got: torch.Tensor, want: torch.Tensor) -> bool:
    """Equal within a few units of rounding of ``got``'s dtype, relative to the largest entry of
    ``want`` (how handlers check that a module computes the formula they assume)."""
    eps = torch.finfo(got.dtype).eps if got.is_floating_point() else 0.0
    scale = float(want.abs().max()) if want.numel() else 0.0
    return bool(((got - want).abs() <= 64 * eps * (scale + 1e-300)).all())


def _arg(call: Call, name: str) -> Any:
    return call.args[0] if call.args else call.kwargs[name]


class Handler:
    """Base class: how to compute the kernel blocks of some parameters of one module type."""

    def covers(self, module: nn.Module) -> tuple[str, ...]:
        """Local names of the module's own parameters this handler computes."""
        raise NotImplementedError

    def hooks(self, module: nn.Module) -> list[tuple[nn.Module, bool]]:
        """Modules to hook and whether each needs back-signals (default: the module, True)."""
        return [(module, True)]

    def prepare(self, module: nn.Module, calls: Calls, n: int, names: Sequence[str],
                dtype: torch.dtype) -> Any:
        """Features of one tile of ``n`` examples for the parameters ``names`` (or None: no call)."""
        raise NotImplementedError

    def blocks(self, module: nn.Module, f1: Any, f2: Any, names: Sequence[str], layout: str,
               strategy: str) -> dict[str, torch.Tensor]:
        """Kernel blocks between two tiles: local parameter name -> block in ``layout``."""
        raise NotImplementedError


class VectorHandler(Handler):
    """Handlers whose features are per-example gradient vectors (C, n, P) per parameter."""

    def blocks(self, module, f1, f2, names, layout, strategy):
        return {name: dot(f1[name], f2[name], layout, f1 is f2) for name in names}



def _unfold_full(m: torch.Tensor) -> torch.Tensor:
    """(n1, C, n2, C) -> the ``full`` layout (n1, n2, C, C)."""
    return m.permute(0, 2, 1, 3)



def _dot_examples(w1: torch.Tensor, w2: torch.Tensor, layout: str, same: bool) -> torch.Tensor:
    """Dots of per-example vectors (n1, C, P), (n2, C, P): ``full`` as (n1, C, n2, C),
    ``diagonal`` (n1, n2, C), ``trace`` (n1, n2). ``same``: w1 and w2 are equal."""
    n1, c, p = w1.shape
    n2 = w2.shape[0]
    if layout == "trace":
        a = w1.reshape(n1, c * p)
        return _gram(a) if same else a @ w2.reshape(n2, c * p).T
    if layout == "full":
        a = w1.reshape(n1 * c, p)
        return (_gram(a) if same else a @ w2.reshape(n2 * c, p).T).view(n1, c, n2, c)
    return torch.stack([_gram(w1[:, k]) if same else w1[:, k] @ w2[:, k].T for k in range(c)], -1)


GRAM_BLOCK = 64
"""Rows per block of :func:`_gram` (at most :data:`SYM_BLOCK`): the long, narrow Gram matrices
of per-example gradients (R = n C rows of length d_in d_out) keep the matrix product's peak
rate down to 64-row blocks (measured: 128 rows in two blocks, 3/4 of the work, 1.13x faster)."""


def _gram_steps(r: int) -> int:
    """Row blocks of :func:`_gram` for ``r`` rows (1: the full product)."""
    block = min(SYM_BLOCK, GRAM_BLOCK)
    return 1 if r < 2 * block else -(-r // max(block, -(-r // 8)))


def gram_fraction(r: int) -> float:
    """Share of the full product's multiply-adds that :func:`_gram` spends on ``r`` rows."""
    k = _gram_steps(r)
    return (k + 1) / (2 * k)


def _gram(a: torch.Tensor) -> torch.Tensor:
    """``a @ a.T`` (R, R) from row blocks on and above the diagonal, mirrored: about half the
    multiply-adds of the full product once R is a few hundred rows."""
    r = a.shape[0]
    if _gram_steps(r) == 1:
        return a @ a.T
    step = max(min(SYM_BLOCK, GRAM_BLOCK), -(-r // 8))
    out = a.new_empty(r, r)
    for s in range(0, r, step):
        e = min(r, s + step)
        blk = a[s:e] @ a[s:].T  # (e - s, r - s)
        out[s:e, s:] = blk
        out[e:, s:e] = blk[:, e - s:].T
    return out



def batched_vjp(out: torch.Tensor, inputs: list[torch.Tensor],
                 grads: torch.Tensor) -> list[torch.Tensor]:
    """``[sum_o grads[c, o] d out_o / d input for c]`` stacked over c, for every input.

    Tries one backward batched over the C cotangents (``is_grads_batched=True``, a vmap over
    the backward); if an operation has no batching rule, falls back to C backward passes.
    """
    res: tuple[torch.Tensor | None, ...]
    try:
        if not out.requires_grad:  # no input reaches the output (e.g. a disabled adapter): zeros
            res = (None,) * len(inputs)
        else:
            res = torch.autograd.grad(out, inputs, grad_outputs=grads, is_grads_batched=True,
                                      retain_graph=True, allow_unused=True)
    except (RuntimeError, NotImplementedError):
        res = tuple(
            torch.stack(parts) if parts[0] is not None else None
            for parts in zip(*[torch.autograd.grad(out, inputs, grad_outputs=g, retain_graph=True,
                                                   allow_unused=True) for g in grads], strict=True)
        )
    return [torch.zeros((grads.shape[0], *t.shape), dtype=t.dtype, device=t.device)
            if r is None else r for r, t in zip(res, inputs, strict=True)]

