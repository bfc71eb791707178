"""Method "ntk_vp": NTK-vector products, a jvp of a vjp; no Jacobian is contracted.

For each example b of a column tile and each output c', one vjp gives the parameter-space
vector ``v_{b,c'} = J(x2_b)^T e_{c'}`` (one forward and C backward passes per example). A jvp
of the batched model on the row tile, in the direction ``v_{b,c'}``, then gives a whole column
of the kernel at once:

    K[a, b, c, c'] = (J(x1_a) v_{b,c'})_c        for every a of the row tile and every c

so the sum over parameters happens inside the forward-mode pass (in the model's dtype) and only
the n2 C vectors of one column tile are held. ``vmap`` runs the n2 C directions together.
With ``per_layer=True`` one jvp per parameter tensor is needed (L times the jvp cost).

Cost for a block of n1 x n2 examples, C outputs, F forward flops per example:
``n2 F (1 + 2C)`` for the vjps and about ``2 F C n1 n2`` for the jvps (each direction costs a
forward's worth of tangent work per row example), independent of the number of parameters P.
Memory: the ``n2 C`` directions (``n2 C P`` entries) and the tangent activations of
``n2 C`` directions over ``n1`` row examples.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.func import jvp, vjp, vmap

from ntk._inputs import Inputs
from ntk._problem import KernelProblem

__all__ = ["directions", "column_block"]


def directions(
    problem: KernelProblem, x2: Inputs, names: list[str], n_out: int
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The vectors ``v_{b,c'} = J(x2_b)^T e_{c'}`` for a column tile.

    Args:
        problem: the function and parameters.
        x2: a tile of n2 examples, as prepared by ``problem.mapper``.
        names: the parameter tensors (a group of ``problem.params``).
        n_out: C, the number of outputs of ``problem.f_single``.

    Returns:
        ``({name: (n2 * C, *shape)}, outputs (n2, C))``; direction ``b * C + c'`` is row
        ``b * C + c'``.
    """
    theta = problem.subset(names)
    some = next(iter(theta.values()))

    def one(example: Inputs) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        result = vjp(lambda t: problem.f_single(t, example), theta)
        out, pullback = result[0], result[1]
        basis = torch.eye(n_out, dtype=out.dtype, device=some.device)
        (vs,) = vmap(pullback)(basis)
        return vs, out.detach()

    vs, out = problem.mapper(one, x2)
    return {k: v.reshape(-1, *v.shape[2:]) for k, v in vs.items()}, out


def column_block(
    problem: KernelProblem,
    x1: Inputs,
    vs: dict[str, torch.Tensor],
    layout: str,
    dtype: torch.dtype,
    n_out: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Kernel block between a row tile and the directions of a column tile.

    Args:
        problem: the function and parameters.
        x1: a tile of n1 examples (original inputs: only the directions are vmapped).
        vs: directions from :func:`directions`, ``{name: (n2 * C, *shape)}``; the jvp moves
            exactly these parameter tensors.
        layout: "full" -> (n1, n2, C, C); "trace" -> (n1, n2); "diagonal" -> (n1, n2, C).
        dtype: dtype of the returned block.
        n_out: C.

    Returns:
        ``(block, outputs of the row tile (n1, C))``.
    """
    theta = problem.subset(list(vs))

    def push(v: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        result = jvp(lambda t: problem.f_batch(t, x1), (theta,), (v,))
        return result[1], result[0]

    if problem.mapper.use_vmap:
        out_dims: Any = (0, None)  # the primal output does not depend on the direction
        tangents, outs = vmap(push, out_dims=out_dims)(vs)  # (n2 * C, n1, C)
    else:  # the model cannot be vmapped: one direction at a time
        lanes = next(iter(vs.values())).shape[0]
        results = [push({k: v[i] for k, v in vs.items()}) for i in range(lanes)]
        tangents, outs = torch.stack([t for t, _ in results]), results[0][1]
    n1 = tangents.shape[1]
    k = tangents.to(dtype).view(-1, n_out, n1, n_out).permute(2, 0, 3, 1)  # (n1, n2, C, C')
    if layout == "full":
        return k, outs.detach()
    diag = torch.diagonal(k, dim1=2, dim2=3)  # (n1, n2, C)
    return (diag if layout == "diagonal" else diag.sum(-1)), outs.detach()


def flops(pairs: int, c: int, f: float, vjp_examples: int, jvp_passes: int) -> float:
    """Estimated flops: vjps for ``vjp_examples`` examples, ``jvp_passes`` jvps per pair."""
    return vjp_examples * f * (1 + 2 * c) + jvp_passes * 2.0 * f * c * pairs


def peak_bytes(
    rows: int, cols: int, c: int, p_group: int, activation: float, model_bytes: int,
    acc_bytes: int, block_entries: int,
) -> float:
    """Estimated transient peak for one tile pair (the output kernel is counted elsewhere).

    The ``cols * C`` directions (twice: vjp result and its reshaped copy), the vjp work of the
    column tile, the tangent activations of ``cols * C`` directions over ``rows`` examples, and
    the block (with its ``dtype`` copy).
    """
    dirs = 2.0 * cols * c * p_group * model_bytes
    vjp_work = cols * activation * (1 + 2 * c)
    jvp_work = (cols * c + 1) * rows * activation
    return dirs + vjp_work + jvp_work + 3.0 * block_entries * acc_bytes
