"""Method "jacobian": per-example Jacobians, then contraction over parameters.

For a tile of examples, ``vmap(jacrev(f_single))`` gives ``J[a, c, p] = d f_c(x_a) / d theta_p``
(one forward and C backward passes per example), stored per parameter tensor as (n, C, p_i)
in the model's dtype. A block of the kernel is then

    K[a, b, c, c'] = sum_i sum_p J1_i[a, c, p] J2_i[b, c', p]

contracted per parameter tensor ``i`` (these terms are the per-layer blocks) in ``dtype``, in
slices of the parameter axis so that the cast to ``dtype`` never doubles the Jacobian's memory.

Cost for a block of n1 x n2 examples, C outputs, P parameters, F forward flops per example:
``(n1 + n2) F (1 + 2C)`` to build the Jacobians and ``2 n1 n2 C^2 P`` to contract ("trace" and
"diagonal" contract only matching outputs: ``2 n1 n2 C P``). Memory: the two Jacobians,
``(n1 + n2) C P`` entries.
"""

from __future__ import annotations

import torch
from torch.func import jacrev

from ntk._inputs import Inputs
from ntk._problem import KernelProblem

__all__ = ["SLICE_BYTES", "jacobians", "contract"]

SLICE_BYTES = 64 * 2**20  # largest slice of one Jacobian cast to ``dtype`` at a time


def jacobians(
    problem: KernelProblem, x: Inputs, names: list[str]
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Per-example Jacobians of the selected outputs with respect to ``names``.

    Args:
        problem: the function and parameters.
        x: a tile of n examples, as prepared by ``problem.mapper``.
        names: the parameter tensors to differentiate (a group of ``problem.params``).

    Returns:
        ``({name: (n, C, numel)}, outputs (n, C))`` in the model's dtype.
    """
    theta = problem.subset(names)

    def one(example: Inputs) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        def f(t: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
            out = problem.f_single(t, example)
            return out, out.detach()

        jac, out = jacrev(f, has_aux=True)(theta)
        return {k: v.reshape(v.shape[0], -1) for k, v in jac.items()}, out

    return problem.mapper(one, x)


def _contract_slice(a: torch.Tensor, b: torch.Tensor, layout: str) -> torch.Tensor:
    """One slice: a (n1, C, s), b (n2, C, s) -> block in ``layout``."""
    n1, c, _ = a.shape
    n2 = b.shape[0]
    if layout == "full":
        k = a.reshape(n1 * c, -1) @ b.reshape(n2 * c, -1).T
        return k.view(n1, c, n2, c).permute(0, 2, 1, 3)
    if layout == "trace":
        return a.reshape(n1, -1) @ b.reshape(n2, -1).T
    # diagonal: (C, n1, s) @ (C, s, n2) -> (C, n1, n2)
    return torch.bmm(a.transpose(0, 1), b.permute(1, 2, 0)).permute(1, 2, 0)


def contract(
    j1: dict[str, torch.Tensor],
    j2: dict[str, torch.Tensor],
    layout: str,
    dtype: torch.dtype,
) -> dict[str, torch.Tensor]:
    """Kernel blocks per parameter tensor from two sets of per-example Jacobians.

    Args:
        j1: ``{name: (n1, C, numel)}``.
        j2: ``{name: (n2, C, numel)}`` with the same names (may be ``j1`` itself).
        layout: "full" -> (n1, n2, C, C); "trace" -> (n1, n2); "diagonal" -> (n1, n2, C).
        dtype: accumulation dtype; slices are cast to it before multiplying.

    Returns:
        ``{name: block}``; the kernel of the group is the sum of the blocks.
    """
    blocks = {}
    for name, a in j1.items():
        b = j2[name]
        n1, c, p = a.shape
        step = max(1, SLICE_BYTES // max(1, (n1 + b.shape[0]) * c * torch.finfo(dtype).bits // 8))
        block = None
        for s in range(0, p, step):
            part = _contract_slice(a[..., s : s + step].to(dtype), b[..., s : s + step].to(dtype),
                                   layout)
            block = part if block is None else block + part
        assert block is not None
        blocks[name] = block
    return blocks


def flops(pairs: int, c: int, p: int, f: float, layout: str, jacobian_examples: int) -> float:
    """Estimated flops: build ``jacobian_examples`` Jacobians, contract ``pairs`` example pairs."""
    per_pair = c * c if layout == "full" else c
    return jacobian_examples * f * (1 + 2 * c) + 2.0 * pairs * per_pair * p


def peak_bytes(
    rows: int, cols: int, c: int, p_group: int, activation: float, model_bytes: int,
    acc_bytes: int, block_entries: int,
) -> float:
    """Estimated transient peak for one tile pair (the output kernel is counted elsewhere).

    Two Jacobians (rows + cols examples, C outputs, ``p_group`` entries each, counted twice for
    the copies vmap/jacrev make), the autograd work of the larger tile (its activations once
    for the forward and twice per output for the C backward passes), the cast slices and the
    block itself.
    """
    jac = 2.0 * (rows + cols) * c * p_group * model_bytes
    work = max(rows, cols) * activation * (1 + 2 * c)
    slices = min(2.0 * SLICE_BYTES, (rows + cols) * c * p_group * acc_bytes)
    return jac + work + slices + 2.0 * block_entries * acc_bytes
