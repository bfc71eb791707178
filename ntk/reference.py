"""The reference empirical NTK: a plain loop of ``torch.autograd.grad``, slow and exact.

For checking the fast methods, not for use at scale: every example is run alone (a batch of
one) and every output is differentiated by its own backward pass, so the cost is
``(N1 + N2) C`` backward passes and the Jacobians ``(N, C, P)`` are held whole. Nothing here
uses ``torch.func``, hooks or tiling, so it shares no code path with the methods it checks.

    K[a, b, c, c'] = sum_i < d f_c(x1_a) / d theta_i , d f_c'(x2_b) / d theta_i >

accumulated in float64 from the model's own gradients (use a float64 model for a reference
exact to rounding).

    >>> import torch
    >>> from ntk.reference import reference_ntk
    >>> lin = torch.nn.Linear(3, 2).double()
    >>> x = torch.randn(4, 3, dtype=torch.float64)
    >>> k = reference_ntk(lin, x, params="all")  # f(x) = W x + b: K = (x_a . x_b + 1) I_2
    >>> bool(torch.allclose(k[..., 0, 0], x @ x.T + 1))
    True
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ntk._inputs import Inputs
from ntk._params import ParamSelector, select_parameters
from ntk._problem import OUTPUTS, default_output_fn

__all__ = ["reference_jacobians", "reference_ntk"]


def _n(x: Inputs) -> int:
    return x.shape[0] if isinstance(x, torch.Tensor) else next(iter(x.values())).shape[0]


def _example(x: Inputs, a: int) -> Inputs:
    return x[a:a + 1] if isinstance(x, torch.Tensor) else {k: v[a:a + 1] for k, v in x.items()}


def reference_jacobians(
    model: nn.Module, x: Inputs, names: Sequence[str],
    output_fn: Callable[[Any], torch.Tensor] | None = None,
    examples: Sequence[int] | None = None,
) -> dict[str, torch.Tensor]:
    """Per-example Jacobians ``{name: (n, C, numel)}`` in float64, one ``autograd.grad`` per
    example and output (the model is called as it is: put it in eval mode first).

    ``examples``: indices of the examples to differentiate (default all ``N``).
    """
    fn = output_fn or default_output_fn
    named = dict(model.named_parameters())
    params = [named[k] for k in names]
    flags = [p.requires_grad for p in params]
    rows: dict[str, list[torch.Tensor]] = {k: [] for k in names}
    try:
        for p in params:
            p.requires_grad_(True)
        with torch.enable_grad():
            for a in (range(_n(x)) if examples is None else examples):
                xa = _example(x, a)
                y = fn(model(xa) if isinstance(xa, torch.Tensor) else model(**xa))
                per_output: dict[str, list[torch.Tensor]] = {k: [] for k in names}
                for c in range(y.shape[-1]):
                    grads = torch.autograd.grad(y.reshape(-1)[c], params, retain_graph=True,
                                                allow_unused=True)
                    for k, g, p in zip(names, grads, params, strict=True):
                        flat = torch.zeros(p.numel(), dtype=torch.float64, device=p.device) \
                            if g is None else g.reshape(-1).double()
                        per_output[k].append(flat)
                for k in names:
                    rows[k].append(torch.stack(per_output[k]))
    finally:
        for p, flag in zip(params, flags, strict=True):
            p.requires_grad_(flag)
    return {k: torch.stack(v) for k, v in rows.items()}


def _reduce(full: torch.Tensor, output: str) -> torch.Tensor:
    if output == "full":
        return full
    if output == "diagonal":
        return torch.diagonal(full, dim1=2, dim2=3)
    if output == "trace":
        return torch.diagonal(full, dim1=2, dim2=3).sum(-1)
    return full.sum((2, 3))  # sum_logits: the kernel of sum_c f_c


def reference_ntk(
    model: nn.Module,
    x1: Inputs,
    x2: Inputs | None = None,
    *,
    params: ParamSelector = "trainable",
    output: str = "full",
    per_layer: bool = False,
    output_fn: Callable[[Any], torch.Tensor] | None = None,
) -> torch.Tensor | dict[str, torch.Tensor]:
    """The empirical NTK by the reference loop, with ``empirical_ntk``'s arguments and layouts.

    The model runs in eval mode (each submodule's flag restored afterwards). Returns the
    kernel in the layout of ``output`` in float64, or with ``per_layer`` ``{name: block}`` in
    parameter order (blocks sum to the kernel).
    """
    if output not in OUTPUTS:
        raise ValueError(f"unknown output reduction {output!r}; use one of {list(OUTPUTS)}")
    names = list(select_parameters(model, params))
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        j1 = reference_jacobians(model, x1, names, output_fn)
        j2 = j1 if x2 is None else reference_jacobians(model, x2, names, output_fn)
    finally:
        for m, training in modes:
            m.training = training
    blocks = {k: _reduce(torch.einsum("acp,bdp->abcd", j1[k], j2[k]), output) for k in names}
    if per_layer:
        return blocks
    return torch.stack(list(blocks.values())).sum(0)


def check_kernel(
    kernel: torch.Tensor | dict[str, torch.Tensor],
    model: nn.Module,
    x1: Inputs,
    x2: Inputs | None,
    *,
    params: ParamSelector,
    output: str,
    per_layer: bool,
    output_fn: Callable[[Any], torch.Tensor] | None,
    entries: int,
    seed: int = 0,
) -> None:
    """Compare ``entries`` random example pairs of a computed kernel with the reference.

    Each entry (all output pairs of it, every block with ``per_layer``) must agree within
    ``rtol`` of its Cauchy-Schwarz bound ``|g_a| |g_b|`` (``rtol`` = 1e-8 for a float64 model,
    1e-4 for float32, see :data:`ntk._verify.RTOL`).

    Raises:
        KernelOutputError: an entry disagrees; the message gives the pair and the error.
    """
    from ntk._problem import KernelOutputError
    from ntk._verify import RTOL, _entries

    names = list(select_parameters(model, params))
    n1 = _n(x1)
    n2 = n1 if x2 is None else _n(x2)
    g = torch.Generator().manual_seed(seed)
    pairs = [(int(torch.randint(n1, (), generator=g)), int(torch.randint(n2, (), generator=g)))
             for _ in range(max(1, entries))]
    rows = sorted({a for a, _ in pairs})
    cols = sorted({b for _, b in pairs})
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        j1 = reference_jacobians(model, x1, names, output_fn, rows)
        j2 = reference_jacobians(model, x1 if x2 is None else x2, names, output_fn, cols)
    finally:
        for m, training in modes:
            m.training = training
    layout = "full" if output == "sum_logits" else output
    dtype = next(iter(dict(model.named_parameters()).values())).dtype
    rtol = RTOL.get(dtype, 1e-4)
    blocks = kernel if isinstance(kernel, dict) else {"": kernel}
    for a, b in pairs:
        i, j = rows.index(a), cols.index(b)
        for key, block in blocks.items():
            group = [key] if key else names
            p1 = [j1[k][i] for k in group]
            p2 = [j2[k][j] for k in group]
            if output == "sum_logits":
                p1 = [t.sum(0, keepdim=True) for t in p1]
                p2 = [t.sum(0, keepdim=True) for t in p2]
            want, bound = _entries(p1, p2, layout)
            got = block[a, b].double().cpu()
            if output == "sum_logits":
                got = got.reshape(1, 1)
            err = float(((got - want.cpu()).abs() / (bound.cpu() + 1e-300)).max())
            if err > rtol:
                where = f" (block of {key!r})" if key else ""
                raise KernelOutputError(
                    f"check failed: the kernel{where} at examples ({a}, {b}) differs from the "
                    f"reference (ntk.reference_ntk) by {err:.3g} of the entry's Cauchy-Schwarz "
                    f"bound (tolerance {rtol:g}); compute this model with method='jacobian' and "
                    "report the model"
                )
