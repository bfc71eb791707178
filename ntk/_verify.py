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
not batched, a tile-size dependence. Cost: one forward per checked example, R backward
passes per checked example (R = min(C, 2), independent of C) and the dots of their gradients,
plus, when C > R, one capture of the checked examples and their full blocks. Memory: the n = P R
whole gradients (n x the selected parameters' bytes: 4.3 GB for SmolLM2-135M in float64) when
they fit the memory budget, else a block of them at a time, the rest computed again beside it
(up to n (n + 1) / 2 backward passes, two gradients in memory; :func:`check_bytes`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from ntk._handlers import StructuredError
from ntk._inputs import Inputs, call_model, select
from ntk._problem import KernelOutputError, check_output

__all__ = ["PROJECTIONS", "RTOL", "VerificationError", "check_bytes", "check_finite", "held", "projections",
           "verify"]

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


class _Gradients:
    """Whole gradients ``h_r(p) = d (f(x_p) . u_r) / d theta`` of the parameters ``names`` at
    the checked points, point-major (index ``p R + r``), one backward pass each, on demand. The
    forward of each point (``parts``: (inputs, examples) of x1, then of x2) runs alone, so that
    its backward passes walk one example's graph, and is kept, so that a gradient dropped to
    save memory can be computed again."""

    def __init__(self, model: nn.Module, parts: list[tuple[Inputs, list[int]]], names: list[str],
                 fn: Callable[[Any], torch.Tensor], sum_logits: bool, u: torch.Tensor) -> None:
        theta = {k: v.detach() for k, v in model.named_parameters()}
        for k in names:
            theta[k] = theta[k].requires_grad_(True)
        self.params = [theta[k] for k in names]
        self.r = u.shape[1]
        self.points = sum(len(examples) for _, examples in parts)
        self.bytes_each = sum(p.numel() * p.element_size() for p in self.params)
        self.passes = 0
        flats = []
        with torch.enable_grad():  # one forward per point: a backward pass walks one example
            for x, examples in parts:
                for a in examples:
                    f = fn(call_model(model, theta, select(x, [a])))
                    check_output(f, 1)
                    if sum_logits:
                        f = f.sum(-1, keepdim=True)
                    flat = (f @ u.to(f)).reshape(-1)
                    flats += [flat[i] if flat.requires_grad else None for i in range(flat.numel())]
        self._outputs = flats
        self.dtype = self.params[0].dtype if self.params else torch.float64

    def __len__(self) -> int:
        return len(self._outputs)

    def __call__(self, i: int) -> list[torch.Tensor | None]:
        """One flat gradient (or None: zero) per parameter of ``names``."""
        out = self._outputs[i]
        if out is None:
            return [None] * len(self.params)
        self.passes += 1
        grads = torch.autograd.grad(out, self.params, retain_graph=True, allow_unused=True)
        return [None if g is None else g.reshape(-1) for g in grads]


def _dot(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor:
    """``a . b`` in float64; below float64, pieces of :data:`CHUNK` entries in float32, summed
    in float64."""
    if a is None or b is None:
        return torch.zeros((), dtype=torch.float64)
    if a.dtype == torch.float64:
        return (a @ b).cpu()
    total = torch.zeros((), dtype=torch.float64, device=a.device)
    for s0 in range(0, a.numel(), CHUNK):
        total += (a[s0:s0 + CHUNK].float() @ b[s0:s0 + CHUNK].float()).double()
    return total.cpu()


def _dots(grads: _Gradients, names: list[str], room: float | None) -> dict[str, torch.Tensor]:
    """``{name: (P, R, P, R)}``: the dots of the gradients, per parameter, in float64.

    The gradients are held in blocks of ``b`` that fit in ``room`` bytes beside the one being
    computed (:func:`held`); every gradient after a block is computed again while the block is
    held, so that with ``n`` gradients there are ``n`` backward passes when all fit and at most
    ``n (n + 1) / 2`` with ``b = 1``."""
    n = len(grads)
    d = torch.zeros(len(names), n, n, dtype=torch.float64)

    def put(i: int, gi: list[torch.Tensor | None], j: int, gj: list[torch.Tensor | None]) -> None:
        for t, (x, y) in enumerate(zip(gi, gj, strict=True)):
            d[t, i, j] = d[t, j, i] = _dot(x, y)

    b = held(n, grads.bytes_each, room)
    for start in range(0, n, b):
        block = {i: grads(i) for i in range(start, min(start + b, n))}
        for i, gi in block.items():
            for j in range(start, i + 1):
                put(i, gi, j, block[j])
        for j in range(start + b, n):
            gj = grads(j)
            for i, gi in block.items():
                put(i, gi, j, gj)
            del gj
        del block
    p, r = grads.points, grads.r
    return {k: d[t].view(p, r, p, r) for t, k in enumerate(names)}


def held(n: int, bytes_each: int, room: float | None) -> int:
    """Gradients held at once by :func:`_dots`: all ``n`` when ``room`` is None or they fit
    beside one more, else as many as fit beside one more, at least one."""
    if room is None or (n + 1) * bytes_each <= room:
        return n
    return max(1, min(n, int(room // max(bytes_each, 1)) - 1))


def check_bytes(n: int, bytes_each: int, room: float | None) -> int:
    """Peak bytes of the check's gradients: the block held and the one being computed."""
    return min(n, held(n, bytes_each, room) + 1) * bytes_each


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
           layout: str, sum_logits: bool, fn: Callable[[Any], torch.Tensor],
           room: float | None = None) -> None:
    """Check ``results`` (set -> {"total" or parameter name -> block (n1, n2, ...)}) at the
    examples ``rows`` of x1 and ``cols`` of x2 (with x2 None, ``cols`` are ``rows`` of x1) of a
    model with ``c`` outputs. ``full()`` gives the engine's full blocks (P, P, C, C), same keys,
    at the P checked points (``rows`` of x1, then ``cols`` of x2 when x2 is given); it is
    called only when ``U`` is not the identity (C > :data:`PROJECTIONS`): otherwise the
    gradients are those of every output, their dots are the exact full blocks, and (B) compares
    the returned entries with them directly ((A) would compare them with themselves). ``room``:
    bytes the whole gradients may take (None: no limit); when they do not all fit, they are held
    in blocks and the others computed again (:func:`_dots`).

    Raises:
        VerificationError: an entry is off by more than :data:`RTOL` of its bound; the message
            names the parameter set (and the parameter with ``per_layer``) and the error.
    """
    names = list(dict.fromkeys(n for ns in sets.values() for n in ns))
    u = projections(c)
    exact = c <= PROJECTIONS
    parts = [(x1, rows)] if x2 is None else [(x1, rows), (x2, cols)]
    points = [f"x1[{a}]" for a in rows] + ([] if x2 is None else [f"x2[{b}]" for b in cols])
    grads = _Gradients(model, parts, names, fn, sum_logits, u)
    rtol = RTOL.get(grads.dtype, 1e-4)
    dots = _dots(grads, names, room)  # (P, R, P, R)
    del grads
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
