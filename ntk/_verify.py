"""The structured engine checks its own result: a few kernel entries against whole gradients.

After the structured pass, for the first and last example of x1 (and of x2) the complete
per-example gradient over the selected parameters is taken by one ``torch.autograd.grad`` of
the model run on those examples (one forward, one backward per example and output). Every
returned block (the kernel of each parameter set, or each parameter's block with
``per_layer``) must then satisfy, at those example pairs ``(a, b)`` and output pairs ``(c,
c')``,

    |K[a, b, c, c'] - <g_c(x1_a), g_c'(x2_b)>|  <=  rtol (|g_c(x1_a)| |g_c'(x2_b)| + 1e-3 B)

with ``g`` restricted to the block's parameters (the sum over ``c`` for ``trace``), ``B`` the
same bound over all parameters of the set (a floor for blocks that are rounding noise), and
``rtol`` from :data:`RTOL` by the dtype of the model's outputs. The right-hand side is the
Cauchy-Schwarz bound of the entry, so the test is scale-free. Anything a handler does not
describe fails it: a weight also read outside its module, a subclass computing something else,
an in-place change the engine missed, an argument sliced that was not batched, a tile-size
dependence. Cost: one forward of two examples (of x1 and of x2 each), 2 C backward passes
and the dots of those gradients.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from ntk._handlers import StructuredError
from ntk._inputs import Inputs, call_model, select
from ntk._problem import KernelOutputError, check_output

__all__ = ["RTOL", "VerificationError", "check_finite", "verify"]

RTOL = {torch.float64: 1e-8, torch.float32: 1e-4, torch.float16: 3e-2, torch.bfloat16: 1e-1}
"""Tolerance of an entry relative to its Cauchy-Schwarz bound, by the model's output dtype."""
CHUNK = 2**16  # gradient entries per row in one piece of the dot products
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


def _gradients(model: nn.Module, x: Inputs, examples: list[int], names: list[str],
               fn: Callable[[Any], torch.Tensor], sum_logits: bool) -> dict[str, torch.Tensor]:
    """``{name: (m, C, numel)}``: d f_c(x_a) / d theta for the m ``examples`` and every output,
    from one forward of those examples and one backward per output of each example."""
    theta = {k: v.detach() for k, v in model.named_parameters()}
    for k in names:
        theta[k] = theta[k].requires_grad_(True)
    m = len(examples)
    with torch.enable_grad():
        f = fn(call_model(model, theta, select(x, examples)))
        check_output(f, m)
        if sum_logits:
            f = f.sum(-1, keepdim=True)
        c = f.shape[1]
        if not f.requires_grad:
            return {k: torch.zeros(m, c, theta[k].numel(), dtype=f.dtype) for k in names}
        params = [theta[k] for k in names]
        flat = f.reshape(-1)
        # one backward per (example, output): faster on CPU than one vmapped backward
        rows = [torch.autograd.grad(flat[i], params, retain_graph=i + 1 < m * c, allow_unused=True)
                for i in range(m * c)]
    return {k: torch.stack([torch.zeros_like(p) if r[j] is None else r[j] for r in rows])
            .reshape(m, c, -1).detach() for j, (k, p) in enumerate(zip(names, params, strict=True))}


def _dots(w1: torch.Tensor, w2: torch.Tensor | None
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dots (R, C, S, C) and squared norms (R, C), (S, C) of gradients (R, C, P), (S, C, P)
    (``w2`` None: the same), accumulated in float64 over pieces of :data:`CHUNK` entries (each
    piece in the gradients' dtype, at least float32)."""
    r, c, p = w1.shape
    s = r if w2 is None else w2.shape[0]
    work = torch.float64 if w1.dtype == torch.float64 else torch.float32
    d = torch.zeros(r * c, s * c, dtype=torch.float64, device=w1.device)
    q1 = torch.zeros(r, c, dtype=torch.float64, device=w1.device)
    q2 = q1 if w2 is None else torch.zeros(s, c, dtype=torch.float64, device=w1.device)
    for s0 in range(0, p, CHUNK):
        b1 = w1[..., s0:s0 + CHUNK].to(work)
        b2 = b1 if w2 is None else w2[..., s0:s0 + CHUNK].to(work)
        d += (b1.reshape(r * c, -1) @ b2.reshape(s * c, -1).T).double()
        q1 += (b1 * b1).sum(-1).double()
        if w2 is not None:
            q2 += (b2 * b2).sum(-1).double()
    return d.view(r, c, s, c).cpu(), q1.cpu(), q2.cpu()


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
    g1 = _gradients(model, x1, rows, names, fn, sum_logits)
    g2 = None if x2 is None else _gradients(model, x2, cols, names, fn, sum_logits)
    rtol = RTOL.get(g1[names[0]].dtype, 1e-4)
    dots, sq1, sq2 = {}, {}, {}
    for k in names:
        dots[k], sq1[k], sq2[k] = _dots(g1[k], None if g2 is None else g2[k])
    del g1, g2

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
