"""The empirical neural tangent kernel of any model, over any subset of its parameters."""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from ntk import _jacobian, _ntk_vp
from ntk._inputs import (
    InputError,
    Inputs,
    Mapper,
    choose_mapper,
    example_counts,
    probe_indices,
    select,
    take,
    to_device,
)
from ntk._memory import (
    KernelTooLargeError,
    Plan,
    Profile,
    default_budget,
    plan,
    profile,
    tile_pairs,
)
from ntk._params import ParameterSelectionError, ParamSelector, select_parameters
from ntk._problem import (
    KernelOutputError,
    KernelProblem,
    check_request,
    default_output_fn,
    layout_of,
    probe_forward,
    transpose_block,
)
from ntk.kernels import structured_ntk
from ntk.reference import check_kernel

__all__ = ["METHODS", "empirical_ntk", "UnsupportedModelError"]

METHODS = ("auto", "structured", "jacobian", "ntk_vp")
_USER_ERRORS = (KernelOutputError, KernelTooLargeError, InputError, ParameterSelectionError)
"""Errors about the request itself: every method would raise them, so auto does not fall back."""
_PROBE_EXAMPLES = 2
logger = logging.getLogger(__name__)


def empirical_ntk(
    model: nn.Module,
    x1: Inputs,
    x2: Inputs | None = None,
    *,
    params: ParamSelector = "trainable",
    output: str = "full",
    method: str = "auto",
    per_layer: bool = False,
    dtype: torch.dtype = torch.float64,
    batch_size: int | None = None,
    memory_budget: float | None = None,
    progress: bool = False,
    output_fn: Callable[[Any], torch.Tensor] | None = None,
    check: bool | int = False,
) -> torch.Tensor | dict[str, torch.Tensor]:
    r"""Empirical NTK ``K(x1, x2)`` of ``output_fn(model(x))`` over the selected parameters.

    With ``f(x) in R^C`` and the selected parameter tensors ``theta = (theta_1, ..., theta_L)``:

        K[a, b, c, c'] = < d f_c(x1_a) / d theta , d f_c'(x2_b) / d theta >
                       = sum_i < d f_c(x1_a) / d theta_i , d f_c'(x2_b) / d theta_i >

    and the i-th term is the per-layer block of ``theta_i``. The model runs in eval mode (the
    caller's train/eval flag of every submodule is restored afterwards), on the device of its
    parameters, with TF32 off (``torch.backends.cuda.matmul.allow_tf32`` and
    ``torch.backends.cudnn.allow_tf32`` are restored afterwards) and attention on the math
    backend of ``scaled_dot_product_attention`` (the fused kernels have no forward-mode
    derivative and no vmap rule). Parameters are read from the live model at every call;
    nothing is cached between calls.

    Methods (``method``), for n1 x n2 examples, C outputs, P selected parameters and F forward
    flops per example (measured on two examples with ``torch.utils.flop_counter``):

    - ``"jacobian"``: per-example Jacobians ``vmap(jacrev)``, contracted per parameter tensor in
      ``dtype``. Cost ``(n1 + n2) F (1 + 2C) + 2 n1 n2 C^2 P`` (``C`` instead of ``C^2`` for
      "trace" and "diagonal").
    - ``"ntk_vp"``: NTK-vector products, a jvp (over x1) of each vjp ``J(x2_b)^T e_c'``; no
      Jacobian is contracted, the sum over parameters happens in the forward-mode pass (in the
      model's dtype). Cost ``n2 F (1 + 2C) + 2 n1 n2 C F`` (times L with ``per_layer``).
    - ``"structured"``: per-layer blocks from captured layer inputs and back-signals
      (``ntk.kernels``; the theory page of the docs, docs/theory.md), ghost or materialise per
      linear layer by the cost rule in ``ntk._handlers.linear_costs``; module types without a
      handler (or subclasses that override ``forward``) fall back to per-module gradients.
      Every result is checked at a few entries against whole per-example gradients
      (``ntk._verify``) and refused on disagreement.
    - ``"auto"``: ``"structured"`` whenever it can attribute every selected parameter to
      examples (it was 2x to 30x faster than ``"jacobian"`` in ``benchmarks/results``);
      otherwise (any error of the structured engine other than one about the request itself,
      e.g. weights tied across modules, a failed self-check, a module it cannot hook) it plans
      the two torch.func methods within the memory budget and tries them cheapest first (the
      second when the first fails, e.g. ``ntk_vp`` without a forward-mode rule for
      ``nn.MultiheadAttention``), with one warning naming the method that ran and why. The
      estimate is the method's cost, where each tile pair also costs ``FLOPS_PER_BYTE = 10`` flops per byte of
      Jacobian or directions it reads (``2 t C P`` resp. ``t C P`` entries for tile size t)
      and a fixed ``2e8`` (see ``ntk._memory``). For large batches this compares ``C P``
      (jacobian) with ``F`` (ntk_vp): the Jacobian contraction wins when the selected
      parameters are few (Propulsion, LoRA, biases) or the forward is expensive per parameter
      (sequences, weight sharing); NTK-vector products win for dense models with all
      parameters and many outputs. ``output="sum_logits"`` counts as C = 1.

    With ``x2=None`` only blocks on or above the diagonal are computed and the rest mirrored,
    so ``K`` is exactly symmetric.

    Memory: the peak is estimated before computing (see ``ntk._memory``) and the computation
    is tiled over examples (``batch_size`` caps the tile) and over groups of parameter tensors
    to fit ``memory_budget``.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from ntk import empirical_ntk
        >>> layer = nn.Linear(3, 2).double()
        >>> x = torch.randn(4, 3, dtype=torch.float64)
        >>> k = empirical_ntk(layer, x)  # f(x) = W x + b: K = (x_a . x_b + 1) I_2
        >>> k.shape
        torch.Size([4, 4, 2, 2])
        >>> expected = (x @ x.T + 1)[:, :, None, None] * torch.eye(2, dtype=torch.float64)
        >>> bool(torch.allclose(k, expected))
        True

    Args:
        model: any ``nn.Module``; its outputs must not mix examples in eval mode.
        x1: a tensor (N1, ...) or a mapping of tensors batched on dim 0 (passed as keywords).
        x2: the same kind of input (N2, ...), with the same per-example shapes; None for x1.
        params: "trainable" (``requires_grad``), "all", "propulsion", "lora", "bias", a list of
            parameter names, or a predicate ``(name, parameter) -> bool``.
        output: "full" -> (N1, N2, C, C); "trace" -> (N1, N2), the sum over c of
            ``K[a, b, c, c]``; "diagonal" -> (N1, N2, C), ``K[a, b, c, c]``; "sum_logits" ->
            (N1, N2), the kernel of ``sum_c f_c``.
        method: "auto", "jacobian" or "ntk_vp".
        per_layer: return ``{parameter name: block}`` (blocks sum to the kernel).
        dtype: floating dtype of the kernel and of the accumulation.
        batch_size: largest number of examples per tile (None: the planner decides).
        memory_budget: bytes the computation may use (None: a safe share of the free memory
            of the model's device, see ``ntk._memory.default_budget``).
        progress: show a tqdm bar over tiles.
        output_fn: maps the model's output to an (N, C) tensor (default: ``.logits`` when the
            output has it, else the output itself).
        check: compare this many random entries (True: 4) with the slow exact reference
            (:func:`ntk.reference_ntk`, run on those examples only) and raise on disagreement;
            for a model of unusual make. False (default): no check.

    Returns:
        The kernel in the layout of ``output``, in ``dtype``, on the model's device; with
        ``per_layer`` a dict from parameter-tensor name to its block, in parameter order.

    Raises:
        ValueError: unknown ``output`` or ``method``, bad ``dtype``, ``batch_size`` or
            ``memory_budget``.
        ntk.InputError: malformed inputs (batch sizes differ inside a mapping, x1 and x2 have
            different per-example shapes, ...).
        ntk.ParameterSelectionError: the selector is unknown or selects nothing.
        ntk.KernelOutputError: the output is not (N, C), or the outputs or kernel are not
            finite.
        ntk.KernelTooLargeError: even the smallest tile exceeds the memory budget.
    """
    _check_arguments(output, method, dtype, batch_size, memory_budget)
    reason = ""
    if method in ("auto", "structured"):
        try:
            kernel = structured_ntk(
                model, x1, x2, params=params, output=output, per_layer=per_layer, dtype=dtype,
                batch_size=batch_size, memory_budget=memory_budget, progress=progress,
                output_fn=output_fn,
            )
        except _USER_ERRORS:
            raise
        except Exception as exc:  # any failure of a handler: the next method
            if method == "structured":
                raise
            reason = f"the structured engine failed ({type(exc).__name__}: {str(exc)[:300]})"
            logger.info("empirical_ntk: %s; planning jacobian / ntk_vp", reason)
        else:
            _check(kernel, model, x1, x2, params, output, per_layer, output_fn, check)
            return kernel
    n1, n2 = example_counts(x1, x2)
    symmetric = x2 is None
    theta = select_parameters(model, params)
    device = next(iter(theta.values())).device
    x1 = to_device(x1, device)
    x2 = x1 if x2 is None else to_device(x2, device)
    probe_forward(model, x1, "x1")
    if not symmetric:
        probe_forward(model, x2, "x2")
    layout = layout_of(output)

    # no_grad: torch.func transforms ignore it, but ordinary autograd must not record a graph
    # through the model's own (unselected) parameters: it would pin every Jacobian slice.
    with _eval_mode(model), _numerics(), torch.no_grad():
        problem = KernelProblem(model, theta, output_fn or default_output_fn,
                                output == "sum_logits", Mapper(use_vmap=True))
        probe = probe_indices(x1, _PROBE_EXAMPLES)
        probe_x = select(x1, probe)
        probe_out, activation, flops = profile(
            lambda t: problem.f_batch(t, probe_x), model, theta, len(probe)
        )
        _check_finite(probe_out, "x1", probe)
        mapper = choose_mapper(model, lambda x: problem.f_batch(theta, x), probe_x, probe_out)
        problem = replace(problem, mapper=mapper)
        prof = Profile(
            numels={k: v.numel() for k, v in theta.items()},
            n_out=probe_out.shape[1],
            activation=activation,
            flops=flops,
            model_bytes=probe_out.element_size(),
        )
        budget = float(memory_budget) if memory_budget is not None else default_budget(device)
        plans = _choose_plans(method, prof, n1, n2, symmetric, layout, per_layer,
                              torch.finfo(dtype).bits // 8, budget, batch_size)
        for i, chosen in enumerate(plans):
            logger.info(
                "empirical_ntk plan: method=%s tile=%d groups=%d est_peak_gib=%.4g budget_gib="
                "%.4g est_gflop=%.4g vmap=%s activation_bytes=%.4g flops_per_example=%.4g",
                chosen.method, chosen.tile, len(chosen.groups), chosen.peak_bytes / 2**30,
                chosen.budget_bytes / 2**30, chosen.flops / 1e9, mapper.use_vmap, activation,
                flops,
            )
            try:
                blocks = _compute(problem, chosen, x1, x2, n1, n2, prof.n_out, symmetric,
                                  layout, dtype, per_layer, progress)
                break
            except _USER_ERRORS:
                raise
            except (RuntimeError, NotImplementedError) as exc:  # e.g. no forward-mode rule
                if method != "auto" and _unsupported_op(exc):
                    raise UnsupportedModelError(
                        f"method={method!r} cannot differentiate this model: {str(exc).splitlines()[0]} "
                        f"({'it needs forward-mode AD, ' if chosen.method == 'ntk_vp' else ''}"
                        "an operation of the model has no such rule in torch); use method='auto', "
                        "which falls back to a method that works, or method='jacobian'") from exc
                if method != "auto" or i + 1 == len(plans):
                    raise
                reason = (f"{reason}; " if reason else "") + (
                    f"{chosen.method!r} failed ({type(exc).__name__}: {str(exc)[:200]})")
        if method == "auto" and reason:
            warnings.warn(f"empirical_ntk(method='auto') computed the kernel with "
                          f"{chosen.method!r} because {reason}", stacklevel=2)

    if symmetric:
        blocks = {k: _mirror(v, layout) for k, v in blocks.items()}
    if output == "sum_logits":
        blocks = {k: v.reshape(n1, n2) for k, v in blocks.items()}
    for name, block in blocks.items():
        if not bool(torch.isfinite(block).all()):
            where = "" if name == "" else f" (block of {name!r})"
            raise KernelOutputError(
                f"the kernel has non-finite entries{where} although the model outputs are "
                "finite: the gradients overflow; compute in a wider dtype or rescale the model"
            )
    result = {k: v for k, v in blocks.items() if k} if per_layer else blocks[""]
    _check(result, model, x1, x2, params, output, per_layer, output_fn, check)
    return result


class UnsupportedModelError(NotImplementedError):
    """The chosen method needs a derivative rule (e.g. forward mode) that torch lacks for an
    operation of the model; another method, or ``method="auto"``, computes the kernel."""


def _unsupported_op(exc: BaseException) -> bool:
    """Whether ``exc`` is torch saying an operation has no rule for the transform in use."""
    text = str(exc)
    return isinstance(exc, NotImplementedError) or "forward AD" in text or "batching rule" in text


def _check(kernel: torch.Tensor | dict[str, torch.Tensor], model: nn.Module, x1: Inputs,
           x2: Inputs | None, params: ParamSelector, output: str, per_layer: bool,
           output_fn: Callable[[Any], torch.Tensor] | None, check: bool | int) -> None:
    """``check`` entries (4 for True) compared with the reference (:mod:`ntk.reference`)."""
    if check is False or check == 0:
        return
    check_kernel(kernel, model, x1, x2, params=params, output=output, per_layer=per_layer,
                 output_fn=output_fn, entries=4 if check is True else int(check))


def _check_arguments(
    output: str, method: str, dtype: torch.dtype, tile: int | None, budget: float | None
) -> None:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; use one of {list(METHODS)}")
    check_request(output, dtype, tile, budget)


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode for the call; each submodule's own ``training`` flag restored afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


@contextlib.contextmanager
def _numerics() -> Iterator[None]:
    """TF32 off and the math backend of scaled_dot_product_attention, for the call only.

    TF32 (``torch.backends.cuda.matmul.allow_tf32``, ``torch.backends.cudnn.allow_tf32``) would
    round matmul inputs to 10 mantissa bits. The fused attention kernels (flash, memory
    efficient, cuDNN) have no forward-mode derivative and no vmap batching rule; the math
    backend is made of ordinary ops that have both. The caller's settings are restored.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        with sdpa_kernel([SDPBackend.MATH]):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _check_finite(outputs: torch.Tensor, which: str, start: int | list[int]) -> None:
    """Raise unless all outputs (n, C) are finite; ``start``: index of row 0, or all indices."""
    bad = (~torch.isfinite(outputs)).any(dim=-1).nonzero().flatten()
    if bad.numel():
        index = (lambda i: start[i]) if isinstance(start, list) else (lambda i: start + i)
        shown = sorted(index(int(i)) for i in bad[:10])
        raise KernelOutputError(
            f"the model outputs are not finite (nan or inf) for {which} examples {shown}"
            f"{' (first 10)' if bad.numel() > 10 else ''}; the kernel would be meaningless: "
            "check those inputs and the weights"
        )


def _choose_plans(
    method: str, prof: Profile, n1: int, n2: int, symmetric: bool, layout: str,
    per_layer: bool, acc_bytes: int, budget: float, max_tile: int | None,
) -> list[Plan]:
    """The plans of the candidate methods that fit the budget, cheapest first."""
    candidates = ["jacobian", "ntk_vp"] if method in ("auto", "structured") else [method]
    plans, errors = [], []
    for m in candidates:
        try:
            plans.append(plan(m, prof, n1, n2, symmetric, layout, per_layer, acc_bytes, budget,
                              max_tile))
        except KernelTooLargeError as err:
            errors.append(str(err))
    if not plans:
        raise KernelTooLargeError(" | ".join(errors))
    return sorted(plans, key=lambda p: p.flops)


def _compute(
    problem: KernelProblem, chosen: Plan, x1: Inputs, x2: Inputs, n1: int, n2: int, c: int,
    symmetric: bool, layout: str, dtype: torch.dtype, per_layer: bool, progress: bool,
) -> dict[str, torch.Tensor]:
    """All computed blocks written into kernels of the layout's shape; key "" is the total."""
    device = next(iter(problem.params.values())).device
    shape = {"full": (n1, n2, c, c), "trace": (n1, n2), "diagonal": (n1, n2, c)}[layout]
    names = [""] + (problem.names if per_layer else [])
    out = {k: torch.zeros(shape, dtype=dtype, device=device) for k in names}
    prep1 = problem.mapper.prepare(problem.model, x1)
    prep2 = problem.mapper.prepare(problem.model, x2)
    pairs = tile_pairs(n1, n2, chosen.tile, symmetric)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(chosen.groups) * sum(len(r) for _, r in pairs), desc="ntk tiles")

    def write(r: tuple[int, int], col: tuple[int, int], parts: dict[str, torch.Tensor]) -> None:
        for name, block in parts.items():
            out[""][r[0]:r[1], col[0]:col[1]] += block
            if per_layer:
                out[name][r[0]:r[1], col[0]:col[1]] = block
        if bar is not None:
            bar.update(1)

    x2_name = "x1" if symmetric else "x2"
    try:
        for group in chosen.groups:
            for col, rows in pairs:
                if chosen.method == "jacobian":
                    jc, oc = _jacobian.jacobians(problem, take(prep2, *col), group)
                    _check_finite(oc, x2_name, col[0])
                    for r in rows:
                        if symmetric and r == col:
                            jr = jc
                        else:
                            jr, orow = _jacobian.jacobians(problem, take(prep1, *r), group)
                            _check_finite(orow, "x1", r[0])
                        write(r, col, _jacobian.contract(jr, jc, layout, dtype))
                else:
                    vs, oc = _ntk_vp.directions(problem, take(prep2, *col), group, c)
                    _check_finite(oc, x2_name, col[0])
                    split = [[k] for k in group] if per_layer else [group]
                    for r in rows:
                        parts = {}
                        for sub in split:
                            block, orow = _ntk_vp.column_block(
                                problem, take(x1, *r), {k: vs[k] for k in sub}, layout, dtype, c
                            )
                            parts[sub[0] if per_layer else "group"] = block
                        _check_finite(orow, "x1", r[0])
                        write(r, col, parts)
    finally:
        if bar is not None:
            bar.close()
    if not per_layer:
        return {"": out[""]}
    return out


def _mirror(kernel: torch.Tensor, layout: str) -> torch.Tensor:
    """Make K exactly symmetric (x2 is x1): ``K[b, a] = K[a, b]^T``.

    Entries with a > b are taken from their mirror images; the (C, C) blocks with a == b are
    replaced by their symmetric part (the two triangles are computed independently and may
    differ in the last bits).
    """
    n = kernel.shape[0]
    idx = torch.arange(n, device=kernel.device)
    shape = (n, n, *([1] * (kernel.ndim - 2)))
    lower = (idx[:, None] > idx[None, :]).reshape(shape)
    diagonal = (idx[:, None] == idx[None, :]).reshape(shape)
    mirrored = transpose_block(kernel, layout)
    kernel = torch.where(diagonal, (kernel + mirrored) / 2, kernel)
    return torch.where(lower, mirrored, kernel)
