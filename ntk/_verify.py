"""The structured engine checks its own result: a few kernel entries against whole gradients.

After the structured pass, for the first and last example of x1 (and of x2) the complete
per-example gradient over the selected parameters is taken by one ``torch.autograd.grad`` of
the model run on that example alone (batched over the C outputs). Every returned block (the
kernel of each parameter set, or each parameter's block with ``per_layer``) must then satisfy,
at those example pairs ``(a, b)`` and output pairs ``(c, c')``,

    |K[a, b, c, c'] - <g_c(x1_a), g_c'(x2_b)>|  <=  rtol (|g_c(x1_a)| |g_c'(x2_b)| + 1e-3 B)

with ``g`` restricted to the block's parameters (the sum over ``c`` for ``trace``), ``B`` the
same bound over all parameters of the set (a floor for blocks that are rounding noise), and
``rtol`` from :data:`RTOL` by the dtype of the model's outputs. The right-hand side is the
Cauchy-Schwarz bound of the entry, so the test is scale-free. Anything a handler does not
describe fails it: a weight also read outside its module, a subclass computing something else,
an in-place change the engine missed, an argument sliced that was not batched, a tile-size
dependence. Cost: at most four forward and backward passes of one example.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from ntk._handlers import StructuredError, batched_vjp
from ntk._inputs import Inputs, call_model, take
from ntk._problem import KernelOutputError, check_output

__all__ = ["RTOL", "VerificationError", "check_finite", "verify"]

RTOL = {torch.float64: 1e-8, torch.float32: 1e-4, torch.float16: 3e-2, torch.bfloat16: 1e-1}
"""Tolerance of an entry relative to its Cauchy-Schwarz bound, by the model's output dtype."""
FLOOR = 1e-3
"""Part of the bound of the whole set added to a block's bound (rounding noise floor)."""


class VerificationError(StructuredError):
    """Kernel blocks of the structured engine disagree with whole per-example gradients."""


def check_finite(results: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
    """Raise :class:`KernelOutputError` when a kernel block has a NaN or inf entry."""
    for s, blocks in results.items():
        for name, block in blocks.items():
            if not bool(torch.isfinite(block).all()):
                where = "" if s == "k" else f" {s!r}"
                where += "" if name == "total" else f", block of {name!r}"
                raise KernelOutputError(
                    f"the kernel{where} has non-finite entries although the model outputs are "
                    "finite: the gradients overflow or are undefined (e.g. sqrt at 0); "
                    "compute in a wider dtype, change the inputs or rescale the model"
                )


def _gradients(model: nn.Module, x: Inputs, a: int, names: list[str],
               fn: Callable[[Any], torch.Tensor], sum_logits: bool) -> dict[str, torch.Tensor]:
    """``{name: (C, numel)}``: d f_c(x_a) / d theta for every output, model run on x_a alone."""
    theta = {k: v.detach() for k, v in model.named_parameters()}
    for k in names:
        theta[k] = theta[k].requires_grad_(True)
    with torch.enable_grad():
        f = fn(call_model(model, theta, take(x, a, a + 1)))
        check_output(f, 1)
        if sum_logits:
            f = f.sum(-1, keepdim=True)
        c = f.shape[1]
        cot = torch.eye(c, dtype=f.dtype, device=f.device)[:, None, :]
        if not f.requires_grad:
            return {k: torch.zeros(c, theta[k].numel(), dtype=f.dtype) for k in names}
        grads = batched_vjp(f, [theta[k] for k in names], cot)
    return {k: g.reshape(c, -1).detach() for k, g in zip(names, grads, strict=True)}


def _entries(g1: list[torch.Tensor], g2: list[torch.Tensor], layout: str
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """(expected entry, Cauchy-Schwarz bound) in ``layout`` from per-tensor (C, numel) parts."""
    full = torch.stack([a.double() @ b.double().T for a, b in zip(g1, g2, strict=True)]).sum(0)
    n1 = torch.stack([(a.double() ** 2).sum(1) for a in g1]).sum(0).sqrt()
    n2 = torch.stack([(b.double() ** 2).sum(1) for b in g2]).sum(0).sqrt()
    return _reduce(full, n1[:, None] * n2[None, :], layout)


def _reduce(full: torch.Tensor, bound: torch.Tensor, layout: str
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """(C, C) entries and bounds reduced to ``layout``."""
    if layout == "full":
        return full, bound
    diag, bdiag = torch.diagonal(full), torch.diagonal(bound)
    return (diag, bdiag) if layout == "diagonal" else (diag.sum(), bdiag.sum())


def verify(model: nn.Module, x1: Inputs, x2: Inputs | None, n1: int, n2: int,
           sets: Mapping[str, list[str]], results: Mapping[str, Mapping[str, torch.Tensor]],
           layout: str, sum_logits: bool, fn: Callable[[Any], torch.Tensor],
           per_layer: bool) -> None:
    """Check ``results`` (set -> {"total" or parameter name -> block}) at a few entries.

    Raises:
        VerificationError: an entry is off by more than :data:`RTOL` of its bound; the message
            names the parameter set (and the parameter with ``per_layer``) and the error.
    """
    names = list(dict.fromkeys(n for ns in sets.values() for n in ns))
    rows = sorted({0, n1 - 1})
    cols = rows if x2 is None else sorted({0, n2 - 1})
    g1 = {a: _gradients(model, x1, a, names, fn, sum_logits) for a in rows}
    g2 = g1 if x2 is None else {b: _gradients(model, x2, b, names, fn, sum_logits) for b in cols}
    some = next(iter(g1.values()))[names[0]]
    rtol = RTOL.get(some.dtype, 1e-4)
    # per parameter tensor, once: dots (R, C, S, C) and squared norms (R, C), (S, C) in float64
    dots, sq1, sq2 = {}, {}, {}
    for k in names:
        a1 = torch.stack([g1[a][k] for a in rows]).double()  # (R, C, P)
        a2 = a1 if g2 is g1 else torch.stack([g2[b][k] for b in cols]).double()
        r, c, p = a1.shape
        dots[k] = (a1.reshape(r * c, p) @ a2.reshape(-1, p).T).view(r, c, len(cols), c).cpu()
        sq1[k] = (a1 ** 2).sum(-1).cpu()
        sq2[k] = sq1[k] if a2 is a1 else (a2 ** 2).sum(-1).cpu()
        del a1, a2

    def entries(group: list[str], i: int, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        full = torch.stack([dots[k][i, :, j] for k in group]).sum(0)
        n1 = torch.stack([sq1[k][i] for k in group]).sum(0).sqrt()
        n2 = torch.stack([sq2[k][j] for k in group]).sum(0).sqrt()
        return _reduce(full, n1[:, None] * n2[None, :], layout)

    worst: tuple[float, str] = (0.0, "")
    for s, blocks in results.items():
        for i, a in enumerate(rows):
            for j, b in enumerate(cols):
                _, scale = entries(sets[s], i, j)
                for key, block in blocks.items():
                    want, bound = entries(sets[s] if key == "total" else [key], i, j)
                    # rounding noise of a gradient is relative to the whole gradient: a block
                    # that is zero in exact arithmetic (a key bias under softmax) is noise
                    err = (block[a, b].double().cpu() - want).abs()
                    e = float((err / (bound + FLOOR * scale + 1e-300)).max())
                    if e > worst[0]:
                        label = "the kernel" if s == "k" else f"set {s!r}"
                        label += "" if key == "total" else f", block of {key!r}"
                        worst = (e, f"{label} at examples ({a}, {b})")
    if worst[0] > rtol:
        raise VerificationError(
            f"the structured engine's kernel disagrees with whole per-example gradients "
            f"({worst[1]}: error {worst[0]:.3g} of the entry's Cauchy-Schwarz bound, tolerance "
            f"{rtol:g}): a layer computes something its handler does not describe (a weight read "
            "outside its module, a subclass with its own forward, ...); use method='jacobian'"
        )
