"""Fast empirical NTKs: several parameter sets from one structured capture.

:func:`kernels` returns the kernels of several parameter sets (full fine-tuning, Propulsion,
LoRA, ...) from the same forward and backward passes, so comparing methods pays for the
backward once. :func:`structured_ntk` is the one-set form with ``empirical_ntk``'s semantics.
Both use the structured engine (:mod:`ntk._structured`, handlers in :mod:`ntk._handlers`):

    K[a, b, c, c'] = sum over parameter tensors i of  <d f_c(x1_a)/d theta_i, d f_c'(x2_b)/d theta_i>

with each per-tensor block computed from the layer's captured inputs and back-signals (the
theory page of the docs, docs/theory.md), never from a Jacobian of the whole model.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from ntk._inputs import Inputs
from ntk._params import ParamSelector
from ntk._structured import structured_kernels
from ntk.reference import check_kernel

__all__ = ["kernels", "structured_ntk"]


def kernels(
    model: nn.Module,
    x1: Inputs,
    x2: Inputs | None = None,
    *,
    params: Mapping[str, ParamSelector],
    output: str = "full",
    per_layer: bool = False,
    dtype: torch.dtype = torch.float64,
    batch_size: int | None = None,
    memory_budget: float | None = None,
    strategy: str = "auto",
    progress: bool = False,
    output_fn: Callable[[Any], torch.Tensor] | None = None,
    check: bool | int = False,
) -> dict[str, torch.Tensor | dict[str, torch.Tensor]]:
    """Empirical NTKs of several parameter sets from one capture pass per tile.

    Args:
        model: any ``nn.Module``; computed in eval mode (the caller's modes are restored).
        x1: a tensor or a mapping of tensors (keyword inputs), batched on dim 0: N1 examples.
        x2: same kind, N2 examples; None means x1 (symmetry: blocks above the diagonal only).
        params: set name -> selector (``"all"``, ``"trainable"``, ``"propulsion"``, ``"lora"``,
            ``"bias"``, a list of names or a predicate ``(name, parameter) -> bool``), e.g.
            ``{"full": "all", "propulsion": "propulsion"}``.
        output: ``"full"`` (N1, N2, C, C) with ``K[a, b, c, c'] = <d f_c(x1_a), d f_c'(x2_b)>``;
            ``"trace"`` (N1, N2) the sum over c of the diagonal; ``"diagonal"`` (N1, N2, C);
            ``"sum_logits"`` (N1, N2), the kernel of ``sum_c f_c``.
        per_layer: return, per set, a dict parameter name -> block (they sum to the kernel).
        dtype: dtype of the kernels (float64 by default). The structured engine forms the
            features and products in the parameters' precision when that is lower, at least
            float32 (float32 models: float32 products, summed per tile pair and added to the
            float64 kernel; see ``ntk._structured.product_dtype``).
        batch_size: largest tile of examples (default: as large as the memory budget allows).
        memory_budget: bytes (default: a safe share of the free memory of the model's device).
        strategy: for ``nn.Linear`` weights: ``"ghost"`` (Gram matrices over tokens),
            ``"materialise"`` (per-example gradients) or ``"auto"``, which picks per layer and
            tile pair the cheaper by :func:`ntk._handlers.linear_costs`:
            ghost ``s R1 R2 (d_in + q d_out + 40 e)`` against materialise
            ``2.7 C (n1 max(T1, 8) + n2 max(T2, 8)) d_in d_out + s' q n1 n2 d_in d_out``,
            with ``R`` the token rows of a tile that carry a back-signal, ``q = C^2`` for
            ``full`` and C otherwise, ``e`` the Gram entries per token pair, ``s = 1/2`` on the
            diagonal tiles of ``x2=None`` and ``s'`` the share of a symmetric product computed
            (constants fitted to measured times on CPU). Without ``per_layer``, Linear layers
            that read the same input (q, k, v) share one ghost product when that is cheaper
            (:mod:`ntk._handlers.shared_input`).
        progress: show a progress bar over tile pairs.
        output_fn: maps the model output to (N, C) (default ``.logits`` or the output).
        check: compare this many random entries of every set (True: 4) with the slow exact
            reference (:func:`ntk.reference_ntk` on those examples) and raise
            ``KernelOutputError`` on disagreement. False (default): only the engine's own
            self-check.

    Returns:
        set name -> kernel in the layout of ``output``, or (``per_layer``) set name ->
        {parameter name -> block}.

    Raises:
        ntk._params.ParameterSelectionError: a selector is unknown or selects nothing.
        ntk._inputs.InputError: malformed or incompatible inputs.
        ntk._problem.KernelOutputError: model outputs not (N, C) or not finite.
        ntk._handlers.StructuredError: a selected parameter cannot be attributed to examples
            through its layer (tied across layers, or a layer without a batch dimension), or
            the self-check failed: after the pass, a few entries of every result are compared
            with whole per-example gradients (``ntk._verify``) and a disagreement is refused,
            never returned (``empirical_ntk(method="auto")`` then falls back to jacobian).
        ntk._problem.KernelOutputError: also when the kernel has non-finite entries.
        ValueError: a malformed request (``dtype`` not floating, ``batch_size`` not a positive
            integer, ``memory_budget`` not a finite positive number).
        ntk._memory.KernelTooLargeError: even one example per tile exceeds the budget.

    Example:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
        >>> x = torch.randn(5, 3)
        >>> ks = kernels(net, x, params={"full": "all", "bias": "bias"}, output="trace")
        >>> ks["full"].shape, ks["bias"].shape
        (torch.Size([5, 5]), torch.Size([5, 5]))
    """
    result, _ = structured_kernels(
        model, x1, x2, params, output=output, per_layer=per_layer, dtype=dtype,
        batch_size_=batch_size, memory_budget=memory_budget, strategy=strategy,
        progress=progress, output_fn=output_fn,
    )
    if check is not False and check != 0:
        for name, kernel in result.items():
            check_kernel(kernel, model, x1, x2, params=params[name], output=output,
                         per_layer=per_layer, output_fn=output_fn,
                         entries=4 if check is True else int(check))
    return result


def structured_ntk(
    model: nn.Module,
    x1: Inputs,
    x2: Inputs | None = None,
    *,
    params: ParamSelector = "trainable",
    output: str = "full",
    per_layer: bool = False,
    dtype: torch.dtype = torch.float64,
    batch_size: int | None = None,
    memory_budget: float | None = None,
    progress: bool = False,
    output_fn: Callable[[Any], torch.Tensor] | None = None,
    strategy: str = "auto",
    check: bool | int = False,
) -> torch.Tensor | dict[str, torch.Tensor]:
    """The empirical NTK of one parameter set by the structured engine.

    Same arguments and result as ``ntk.empirical_ntk`` (without ``method``), plus ``strategy``
    (see :func:`kernels`).

    Example:
        >>> import torch
        >>> lin = torch.nn.Linear(3, 2).double()
        >>> x = torch.randn(4, 3, dtype=torch.float64)
        >>> k = structured_ntk(lin, x, params="all", output="full")
        >>> torch.allclose(k[..., 0, 0], x @ x.T + 1)
        True
    """
    return kernels(
        model, x1, x2, params={"k": params}, output=output, per_layer=per_layer, dtype=dtype,
        batch_size=batch_size, memory_budget=memory_budget, strategy=strategy,
        progress=progress, output_fn=output_fn, check=check,
    )["k"]
