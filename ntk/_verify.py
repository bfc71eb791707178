"""The structured engine checks its own result against whole gradients, at a few examples.

The checked points are the first and last example of x1 (and of x2). The check has two parts.

(A) Projected full blocks against autograd. The engine computes the full (C, C) blocks ``K(p,
q)`` of every returned block (the kernel of each parameter set, or each parameter's block with
``per_layer``) at every pair of checked points ``(p, q)``, from one capture of those examples
(:func:`ntk._structured.structured_kernels` passes them in). For the columns ``u_r`` of a
(C, R) matrix ``U`` (:func:`projections`), ``h_r(p) = J_p^T u_r`` is one backward pass of
``u_r . f(x_p)``, so ``u_r^T K(p, q) u_s = h_r(p) . h_s(q)`` must hold for every (r, s):

    |u_r^T K(p,q) u_s - h_r(p) . h_s(q)|  <=  rtol (rho(p) rho(q) + 1e-3 P(p) P(q))

with ``rho(p)^2 = mean_r |h_r(p)|^2`` over the block's parameters and ``P`` the same over all
parameters of the set (a floor for blocks that are rounding noise). ``rho`` is the root mean
square over projections, not ``|h_r|`` of the pair itself, so that an unlucky ``u_r`` that
nearly cancels in ``J_p^T u_r`` cannot make the tolerance smaller than the rounding of ``K``
(which is relative to ``|J_p| |J_q|``, whatever ``u``); it is computed from autograd alone, so
a wrong engine cannot widen it.

Why random projections find every error: let ``E = K_engine(p, q) - K(p, q) != 0``. With
``C <= R`` (:data:`PROJECTIONS`), ``U`` is the identity: the dots ``h_r(p) . h_s(q)`` are the
exact full blocks ``K(p, q)`` (C backward passes per example, as many as R), so the engine's
own full blocks are not formed (no capture of the checked examples) and (B) compares the
returned entries with the exact blocks directly, bounds from autograd's norms: the entrywise
test, which (A) then adds nothing to. Otherwise ``U`` has independent standard Gaussian
entries, and ``u^T E u'`` with ``u, u'`` two of its columns is a polynomial in them that is
not identically zero, so it vanishes with probability 0 (its zero set has Lebesgue measure
0); the pair ``(u_r, u_r)`` alone would miss an antisymmetric E, which is why all pairs ``(r,
s)`` are compared. With the tolerance ``tau`` instead of 0: conditioned on ``u``, ``u^T E u'``
is N(0, |E^T u|^2) and ``|E^T u| >= sigma |v . u|`` (``sigma, v``: E's top singular value and
left vector), so for ``t = tau / sigma < 1``

    P(|u^T E u'| <= tau)  <=  P(|z z'| <= t)  <=  t (1.6 + 0.64 ln(1/t)),   z, z' ~ N(0, 1)

for the pair ``(u_1, u_2)`` alone (split ``E_z min(1, sqrt(2/pi) t / |z|)`` at ``|z| = t``
and at 1): about 0.05 for an error 100 times the tolerance, 1e-4 for one 1e5 times (a 0.1 %
error of a float64 kernel), and the other pairs can only catch more. U is drawn from a fixed
seed, so the check is deterministic; the probability is over that draw, on which no handler's
error depends.

(B) The returned blocks against those full blocks. For every checked pair ``(a, b)`` of x1 and
x2 (x1 and x1), the returned entry must equal ``K_engine(a, b)`` reduced to the layout (its
diagonal for ``diagonal``, trace for ``trace``) within ``rtol`` of the entry's Cauchy-Schwarz
bound, formed from the diagonals of ``K_engine(a, a)`` and ``K_engine(b, b)`` (themselves
checked by (A)). That is an exact test of the trace and diagonal layouts, and of anything
that depends on the tile (the returned blocks come from tiles of many examples, the full
blocks from one of the checked examples).

So the trace of the kernel, ``sum_c J_ac . J_bc``, is never estimated from projections (which
would be Hutchinson's estimate, right only on average): it is compared exactly with the full
blocks, and the full blocks are compared with autograd through projections.

Anything a handler does not describe fails: a weight also read outside its module, a subclass
computing something else, an in-place change the engine missed, an argument sliced that was
not batched, a tile-size dependence. Cost: one forward of the checked examples, R backward
passes per checked example (R = min(C, 2), independent of C) and the dots of their gradients,
plus, when C > R, one capture of the checked examples and their full blocks.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from ntk._handlers import StructuredError
from ntk._inputs import Inputs, call_model, select
from ntk._problem import KernelOutputError, check_output

__all__ = ["PROJECTIONS", "RTOL", "VerificationError", "check_finite", "projections", "verify"]

RTOL = {torch.float64: 1e-8, torch.float32: 1e-4, torch.float16: 3e-2, torch.bfloat16: 1e-1}
"""Tolerance of an entry relative to its Cauchy-Schwarz bound, by the model's output dtype."""
CHUNK = 2**16  # gradient entries per row in one piece of the dot products
FLOOR = 1e-3
"""Part of the bound of the whole set added to a block's bound (rounding noise floor)."""
PROJECTIONS = 2
"""R: output projections per checked example (backward passes), when C is larger."""

Blocks = Mapping[str, Mapping[str, torch.Tensor]]


class VerificationError(StructuredError):
    """Kernel blocks of the structured engine disagree with whole per-example gradients."""


def check_finite(results: Blocks) -> None:
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


def projections(c: int) -> torch.Tensor:
    """``U`` (C, R), float64: the identity for C <= :data:`PROJECTIONS`, else R columns of
    independent standard Gaussian entries from a fixed seed."""
    if c <= PROJECTIONS:
        return torch.eye(c, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    return torch.randn(c, PROJECTIONS, generator=g, dtype=torch.float64)


def _gradients(model: nn.Module, x: Inputs, examples: list[int], names: list[str],
               fn: Callable[[Any], torch.Tensor], sum_logits: bool, u: torch.Tensor
               ) -> dict[str, torch.Tensor]:
    """``{name: (m, R, numel)}``: d (f(x_a) . u_r) / d theta for the m ``examples`` and the
    columns of ``u`` (C, R), from one forward of those examples and one backward per (example,
    projection)."""
    theta = {k: v.detach() for k, v in model.named_parameters()}
    for k in names:
        theta[k] = theta[k].requires_grad_(True)
    m, r = len(examples), u.shape[1]
    with torch.enable_grad():
        f = fn(call_model(model, theta, select(x, examples)))
        check_output(f, m)
        if sum_logits:
            f = f.sum(-1, keepdim=True)
        if not f.requires_grad:
            return {k: torch.zeros(m, r, theta[k].numel(), dtype=f.dtype) for k in names}
        params = [theta[k] for k in names]
        flat = (f @ u.to(f)).reshape(-1)
        # one backward per (example, projection): faster on CPU than one vmapped backward; each
        # gradient is written into its row at once, so that no more than one is held twice
        # (stacking them at the end held them all twice: 8.6 GB for SmolLM2's 135M parameters)
        out = {k: torch.zeros(m * r, p.numel(), dtype=p.dtype, device=p.device)
               for k, p in zip(names, params, strict=True)}
        for i in range(m * r):
            grads = torch.autograd.grad(flat[i], params, retain_graph=i + 1 < m * r, allow_unused=True)
            for k, g in zip(names, grads, strict=True):
                if g is not None:
                    out[k][i] = g.reshape(-1)
            del grads
    return {k: v.view(m, r, -1) for k, v in out.items()}


def _dots(w: torch.Tensor) -> torch.Tensor:
    """Dots (P, R, P, R) of gradients (P, R, numel), accumulated in float64 over pieces of
    :data:`CHUNK` entries (each piece in the gradients' dtype, at least float32)."""
    p, r, n = w.shape
    work = torch.float64 if w.dtype == torch.float64 else torch.float32
    d = torch.zeros(p * r, p * r, dtype=torch.float64, device=w.device)
    for s0 in range(0, n, CHUNK):
        b = w[..., s0:s0 + CHUNK].to(work).reshape(p * r, -1)
        d += (b @ b.T).double()
    return d.view(p, r, p, r).cpu()


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


def _label(s: str, key: str) -> str:
    label = "the kernel" if s == "k" else f"set {s!r}"
    return label + ("" if key == "total" else f", block of {key!r}")


def _rms(dots: Mapping[str, torch.Tensor], group: list[str]) -> torch.Tensor:
    """(P,): root mean square over projections of ``|h_r(p)|`` over the parameters ``group``."""
    p, r = next(iter(dots.values())).shape[:2]
    sq = torch.stack([dots[k].reshape(p * r, p * r).diagonal() for k in group]).sum(0)
    return sq.view(p, r).mean(-1).clamp_min(0).sqrt()


def _sum(dots: Mapping[str, torch.Tensor], group: list[str]) -> torch.Tensor:
    """(P, R, P, R): the dots of the gradients over the parameters ``group``."""
    return torch.stack([dots[n] for n in group]).sum(0)


def _norms(k: torch.Tensor) -> torch.Tensor:
    """(P, C): ``|J_pc|`` from the diagonal of full blocks (P, P, C, C)."""
    return k.diagonal(0, 0, 1).diagonal(0, 0, 1).clamp_min(0).sqrt()


def verify(model: nn.Module, x1: Inputs, x2: Inputs | None, rows: list[int], cols: list[int],
           sets: Mapping[str, list[str]], results: Blocks, full: Callable[[], Blocks], c: int,
           layout: str, sum_logits: bool, fn: Callable[[Any], torch.Tensor]) -> None:
    """Check ``results`` (set -> {"total" or parameter name -> block (n1, n2, ...)}) at the
    examples ``rows`` of x1 and ``cols`` of x2 (with x2 None, ``cols`` are ``rows`` of x1) of a
    model with ``c`` outputs. ``full()`` gives the engine's full blocks (P, P, C, C), same keys,
    at the P checked points (``rows`` of x1, then ``cols`` of x2 when x2 is given); it is
    called only when ``U`` is not the identity (C > :data:`PROJECTIONS`): otherwise the
    gradients are those of every output, their dots are the exact full blocks, and (B) compares
    the returned entries with them directly ((A) would compare them with themselves).

    Raises:
        VerificationError: an entry is off by more than :data:`RTOL` of its bound; the message
            names the parameter set (and the parameter with ``per_layer``) and the error.
    """
    names = list(dict.fromkeys(n for ns in sets.values() for n in ns))
    u = projections(c)
    exact = c <= PROJECTIONS
    g = _gradients(model, x1, rows, names, fn, sum_logits, u)
    points = [f"x1[{a}]" for a in rows]
    if x2 is not None:
        g2 = _gradients(model, x2, cols, names, fn, sum_logits, u)
        g = {k: torch.cat([g[k], g2[k]]) for k in names}
        points += [f"x2[{b}]" for b in cols]
    rtol = RTOL.get(g[names[0]].dtype, 1e-4)
    dots = {k: _dots(g[k]) for k in names}  # (P, R, P, R)
    del g
    second = [points.index(f"x{1 if x2 is None else 2}[{b}]") for b in cols]
    engine = None if exact else full()
    against = "whole gradients" if exact else "its full blocks"
    worst: tuple[float, str] = (0.0, "")
    for s, blocks in results.items():
        if engine is None:  # the exact full blocks from autograd, (P, R, P, R) -> (P, P, C, C)
            fulls = {key: _sum(dots, sets[s] if key == "total" else [key]).permute(0, 2, 1, 3)
                     for key in blocks}
        else:
            fulls = {key: engine[s][key].double().cpu() for key in blocks}
        rho_set = _rms(dots, sets[s])
        k_set = torch.stack(list(fulls.values())).sum(0)
        n_set = _norms(k_set)
        for key, block in blocks.items():
            group = sets[s] if key == "total" else [key]
            label = _label(s, key)
            k = fulls[key]
            if engine is not None:  # (A) projected full blocks against autograd's projections
                got = torch.einsum("pqcd,cr,ds->prqs", k, u, u)
                rho = _rms(dots, group)
                bound = rho[:, None] * rho[None, :] + FLOOR * rho_set[:, None] * rho_set[None, :]
                ratio = (got - _sum(dots, group)).abs() / (bound[:, None, :, None] + 1e-300)
                p, _, q, _ = torch.unravel_index(ratio.argmax(), ratio.shape)
                if float(ratio.max()) > worst[0]:
                    worst = (float(ratio.max()), f"{label} at ({points[p]}, {points[q]}), "
                             "projected on the outputs")
            # (B) the returned entries against the full blocks reduced to the layout
            norms = _norms(k)
            for i, a in enumerate(rows):
                for j, b in zip(second, cols, strict=True):
                    want_ab, bound_ab = _reduce(k[i, j], norms[i][:, None] * norms[j][None, :],
                                                layout)
                    _, scale = _reduce(k_set[i, j], n_set[i][:, None] * n_set[j][None, :],
                                       layout)
                    err = (block[a, b].double().cpu() - want_ab).abs()
                    e = float((err / (bound_ab + FLOOR * scale + 1e-300)).max())
                    if e > worst[0]:
                        worst = (e, f"{label} at examples ({a}, {b}), against {against}")
    if worst[0] > rtol:
        raise VerificationError(
            f"the structured engine's kernel disagrees with whole per-example gradients "
            f"({worst[1]}: error {worst[0]:.3g} of the entry's Cauchy-Schwarz bound, tolerance "
            f"{rtol:g}): a layer computes something its handler does not describe (a weight read "
            "outside its module, a subclass with its own forward, ...); use method='jacobian'"
        )
