"""The structured engine: per-layer kernel blocks from captured inputs and back-signals.

For a tile of ``n`` examples the engine runs

1. one forward pass of the model with forward hooks on every module that owns a selected
   parameter (and on the extra modules its handler asks for, e.g. a Propulsion wrapper's base
   layer). Each hook records every call (inputs, output): a module used several times in one
   forward contributes all its calls. Parameters are substituted by detached copies
   (``functional_call``), so autograd never builds parameter gradients; a hooked output that
   does not require grad is made a leaf that does, so the back-signal reaches it;
2. one backward pass batched over the C outputs: ``torch.autograd.grad`` of ``f`` (n, C) with
   respect to every recorded output, with cotangents ``e_c`` for all ``c`` at once
   (``is_grads_batched=True``, a vmap over the backward). Examples do not interact (eval
   mode), so row ``a`` of the back-signal is ``d f_c(x_a) / d output_a``. If the backward has
   an operation without a batching rule, C separate backward passes are used instead;
3. per handler (:mod:`ntk._handlers`), features of the tile: Gram-ready inputs and back-
   signals, or per-example gradient vectors.

Kernel blocks between two tiles are then contracted per parameter tensor. Every parameter set
of :func:`structured_kernels` shares the captures: one forward and backward per tile serve
all sets. With ``x2=None`` only tile pairs on and above the diagonal are contracted, and a
diagonal tile pair (the same features twice) contracts only row chunks against the columns
from their own start, mirrored (about half the work).

A module whose output has batch size 1 while the tile has ``n > 1`` examples (e.g. position
embeddings applied to ``arange(T)[None]`` and broadcast in an addition) is treated as applied
to every example: its output is expanded to ``n`` inside the hook, which leaves the model's
result unchanged when the output is broadcast against the batch, and makes the back-signal
per-example. Modules whose inputs carry no batch dimension at all raise
:class:`ntk._handlers.StructuredError`.

The probe (:func:`_probe`: broadcast rules, batched arguments, in-place copies, C, uncalled
modules, bytes of features) runs once per model, input shapes and request; repeat calls reuse
its findings (:mod:`ntk._probe_cache`).

Memory: a probe tile measures the bytes of features per example; tiles are sized by
:func:`ntk._memory.structured_tiles` so that two tiles' features and the contraction chunks
fit the budget; features of all tiles are kept when they fit in half the budget, otherwise
the row tiles go in blocks that stay in memory while the column tiles they meet pass by, each
column tile captured again once per block (:func:`ntk._memory.block_pairs`).
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn

from ntk._handlers import (
    FALLBACK,
    STRATEGIES,
    Call,
    Handler,
    LinearHandler,
    SharedInputHandler,
    StructuredError,
    batched_vjp,
    handler_for,
)
from ntk._inputs import Inputs, call_model, example_counts, select, take, to_device
from ntk._memory import block_pairs, default_budget, saved_tensor_bytes, structured_tiles
from ntk._params import ParamSelector, select_parameters
from ntk._probe_cache import Probe, probe_key, recall, remember
from ntk._problem import (
    KernelOutputError,
    check_output,
    check_request,
    default_output_fn,
    layout_of,
    probe_forward,
    transpose_block,
)
from ntk._verify import PROJECTIONS, check_bytes, check_finite
from ntk._verify import verify as check_kernels

__all__ = ["Assignment", "Timings", "assign", "capture", "fuse_linears", "structured_kernels"]

PROBE_EXAMPLES = 4


@dataclass(frozen=True)
class Timings:
    """How a :func:`structured_kernels` call went (for benchmarks).

    Attributes:
        tile: examples per tile; tile_pairs: pairs contracted; captures: forward and backward
            passes over a tile; keep_all: every tile's features were kept in memory.
        setup_seconds: the probe (modes, memory plan); capture_seconds: captures and features;
        contract_seconds: pairwise contractions; capture_cpu_seconds, contract_cpu_seconds:
            the process CPU seconds of the last two; verify_seconds, verify_cpu_seconds: the
            check of a few entries against whole gradients (:mod:`ntk._verify`);
            estimated_peak_bytes: the memory plan's estimate of the working memory at its
            peak (kernels, features, a capture's graph; the model not counted);
            verify_bytes: the check's whole gradients at their peak, held after the tiles are
            freed (:func:`ntk._verify.check_bytes`; 0 without the check).
    """

    tile: int
    tile_pairs: int
    captures: int
    keep_all: bool
    setup_seconds: float
    capture_seconds: float
    contract_seconds: float
    capture_cpu_seconds: float
    contract_cpu_seconds: float
    verify_seconds: float = 0.0
    verify_cpu_seconds: float = 0.0
    estimated_peak_bytes: float = 0.0
    verify_bytes: float = 0.0


@dataclass(frozen=True)
class Assignment:
    """Some selected parameters of one module and the handler that computes their blocks.

    Attributes:
        module: the owning module.
        handler: its handler (the fallback for parameters no handler covers).
        names: local parameter names (``module.named_parameters(recurse=False)``).
        full: local name -> the selected parameter's name in the model.
    """

    module: nn.Module
    handler: Handler
    names: tuple[str, ...]
    full: Mapping[str, str]


_CONTAINERS = (nn.ParameterDict, nn.ParameterList, nn.ModuleDict, nn.ModuleList)


def _caller_of(modules: Mapping[str, nn.Module], mname: str, local: str) -> tuple[nn.Module, str, str]:
    """The module that uses a parameter: its owner, or, when the owner is a container that is
    never called (peft keeps IA3's vectors in an ``nn.ParameterDict``), the nearest ancestor that
    is not one, with the local name extended by the path (``ia3_l.default``)."""
    while mname and isinstance(modules[mname], _CONTAINERS):
        parent, _, child = mname.rpartition(".")
        mname, local = parent, f"{child}.{local}"
    return modules[mname], mname, local


def _check_uncalled(model: nn.Module, assignments: list[Assignment], calls: Mapping[nn.Module, list[Any]],
                    x: Inputs, fn: Callable[[Any], torch.Tensor]) -> None:
    """Refuse parameters whose module was never called yet which move the outputs.

    A module that is not called contributes zero blocks, which is right only if its selected
    parameters do not influence the outputs at all; a parameter read directly by another module
    (``nn.MultiheadAttention`` reads its projections' weights) would silently get zero. One
    forward and backward on the probe examples tells the two apart.

    Raises:
        StructuredError: such a parameter has a nonzero gradient (``auto`` then falls back).
    """
    idle = [a for a in assignments if not any(calls.get(m) for m, _ in a.handler.hooks(a.module))]
    if not idle:
        return
    named = dict(model.named_parameters())
    theta = {full: named[full].detach().requires_grad_(True) for a in idle for full in a.full.values()}
    with torch.enable_grad():
        f = fn(call_model(model, theta, x))
        weights = torch.randn(f.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        grads = torch.autograd.grad((f * weights.to(f)).sum(), list(theta.values()), allow_unused=True)
    moved = [name for name, g in zip(theta, grads, strict=True) if g is not None and bool(g.abs().max() > 0)]
    if moved:
        raise StructuredError(
            f"parameters {moved[:5]}{' ...' if len(moved) > 5 else ''} change the outputs but their "
            "modules are never called in the forward (another module reads them directly), so the "
            "structured engine cannot attribute their gradients; use method='jacobian' or 'ntk_vp'"
        )


def assign(model: nn.Module, selected: list[str]) -> list[Assignment]:
    """Attribute every selected parameter to exactly one (module, handler).

    Raises:
        StructuredError: a selected parameter is owned by several modules (tied weights used
            by different layers, whose cross terms no per-layer handler sees) or by none.
    """
    named = dict(model.named_parameters())
    wanted = {id(named[n]): n for n in selected}
    owners: dict[str, list[tuple[nn.Module, str, str]]] = {n: [] for n in selected}
    modules = dict(model.named_modules())
    for mname, module in modules.items():
        for local, p in module.named_parameters(recurse=False):
            if id(p) in wanted:
                owners[wanted[id(p)]].append(_caller_of(modules, mname, local))
    bad = {n: [f"{m}.{loc}" if m else loc for _, m, loc in o] for n, o in owners.items()
           if len(o) != 1}
    if bad:
        raise StructuredError(
            "the structured engine needs every selected parameter owned by exactly one module; "
            + "; ".join(f"{n!r} is owned by {o or 'no module'}" for n, o in bad.items())
            + " (tied weights: use method='jacobian' or deselect them)"
        )
    per_module: dict[nn.Module, dict[str, str]] = {}
    for name, [(module, _, local)] in owners.items():
        per_module.setdefault(module, {})[local] = name
    out = []
    for module, locals_ in per_module.items():
        handler = handler_for(module)
        covered = set(handler.covers(module)) if handler is not None else set()
        mine = tuple(n for n in locals_ if n in covered)
        rest = tuple(n for n in locals_ if n not in covered)
        if mine and handler is not None:
            out.append(Assignment(module, handler, mine, {n: locals_[n] for n in mine}))
        if rest:
            out.append(Assignment(module, FALLBACK, rest, {n: locals_[n] for n in rest}))
    counts: dict[str, int] = {}
    for a in out:
        for n in a.full.values():
            counts[n] = counts.get(n, 0) + 1
    if set(counts) != set(selected) or any(v != 1 for v in counts.values()):
        raise StructuredError(f"internal: parameters not covered exactly once: {counts}")
    return out


def fuse_linears(assignments: list[Assignment], membership: Mapping[str, list[str]]
                 ) -> list[Assignment]:
    """Linear layers whose selected parameters (the weight, perhaps the bias, the same in each)
    all belong to the same parameter sets, as one assignment of a
    :class:`~ntk._handlers.SharedInputHandler`, which forms one block for those that read the
    same input (q, k, v). For the summed kernels only (not ``per_layer``)."""
    groups: dict[tuple, list[Assignment]] = {}
    out = []
    for a in assignments:
        sets = {tuple(membership[n]) for n in a.full.values()}
        if (type(a.handler) is LinearHandler and isinstance(a.module, nn.Linear)
                and "weight" in a.names and len(sets) == 1):
            groups.setdefault((a.names, *sets), []).append(a)
        else:
            out.append(a)
    for (names, _), members in groups.items():
        if len(members) == 1:
            out += members
            continue
        handler = SharedInputHandler([cast(nn.Linear, a.module) for a in members], names)
        full = {f"{i}.{n}": a.full[n] for i, a in enumerate(members) for n in names}
        out.append(Assignment(members[0].module, handler, tuple(full), full))
    return out


class InPlaceError(StructuredError):
    """A hooked module's input or output was changed in place later in the forward."""

    def __init__(self, modules: list[nn.Module]):
        self.modules = modules
        names = sorted({type(m).__name__ for m in modules})
        super().__init__(
            f"the output or input of {names} is changed in place later in the forward (e.g. "
            "ReLU(inplace=True), out += identity); the structured engine clones these calls"
        )


Batched = Mapping[nn.Module, list[tuple[tuple[bool, ...], dict[str, bool]]]]


def capture(
    model: nn.Module,
    assignments: list[Assignment],
    x: Inputs,
    n: int,
    output_fn: Callable[[Any], torch.Tensor],
    sum_logits: bool,
    modes: Mapping[nn.Module, str] | None = None,
    batched: Batched | None = None,
    clone: AbstractSet[nn.Module] | None = None,
    saved: dict[int, int] | None = None,
) -> tuple[dict[nn.Module, list[Call]], torch.Tensor]:
    """One forward with hooks and one backward batched over outputs; see the module docstring.

    Returns:
        ``(calls, f)``: hooked module -> its calls in forward order, each with ``grad``
        (C, *output.shape) when its handler needs back-signals; ``f`` the detached outputs
        (n, C) (C = 1 for ``sum_logits``).

    ``modes`` gives, for modules whose calls carry no batch dimension (found by
    :func:`unbatched_modules`), how their output is broadcast to the ``n`` examples:
    ``"expand"`` (a leading dimension of 1 becomes n, else as prepend) or ``"prepend"`` (a new
    leading dimension n). ``batched`` gives, per module and call, which arguments carry the
    batch (from :func:`unbatched_modules`). For the modules in ``clone`` the recorded inputs
    are copies and the forward continues with a copy of the output, so in-place changes later
    in the forward reach neither the recorded values nor the back-signal (which is taken at
    the output before the change).

    ``saved``: when given, filled with storage -> bytes of the tensors the forward saves for its
    backward (the model's parameters and buffers left out), for the memory plan.

    Raises:
        InPlaceError: a recorded input or output of a module not in ``clone`` was changed in
            place (its version counter moved) before the backward.
    """
    modes = modes or {}
    batched = batched or {}
    clone = clone or set()
    need: dict[nn.Module, bool] = {}
    for a in assignments:
        for m, wants_grad in a.handler.hooks(a.module):
            need[m] = need.get(m, False) or wants_grad
    calls: dict[nn.Module, list[Call]] = {m: [] for m in need}
    versions: list[tuple[nn.Module, torch.Tensor, int]] = []

    def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        if not isinstance(output, torch.Tensor):
            if need[module]:
                raise StructuredError(
                    f"{type(module).__name__} returns {type(output).__name__}; the structured "
                    "engine needs a tensor output of every layer it differentiates"
                )
            return None
        out = output
        leaf = need[module] and out.is_floating_point() and not out.requires_grad
        if leaf:  # a leaf of our own: the forward goes on with a copy (in-place safe)
            out = out.detach().requires_grad_(True)
        mode = modes.get(module, "")
        out = _broadcast(out, n, mode)
        flags = batched.get(module, [])
        index = len(calls[module])
        if module in clone:
            args = tuple(_copy(v) for v in args)
            kwargs = {k: _copy(v) for k, v in kwargs.items()}
        call = Call(args, kwargs, out, mode=mode,
                    batched=flags[index] if index < len(flags) else None)
        calls[module].append(call)
        if module in clone or leaf:
            return out.clone()
        for t in (out, *args, *kwargs.values()):
            if isinstance(t, torch.Tensor):
                versions.append((module, t, t._version))
        return out if out is not output else None

    handles = [m.register_forward_hook(hook, with_kwargs=True) for m in need]
    try:
        theta = {k: v.detach() for k, v in model.named_parameters()}
        measure = contextlib.nullcontext() if saved is None else saved_tensor_bytes(model, saved)
        with torch.enable_grad(), measure:
            f = output_fn(call_model(model, theta, x))
        with torch.enable_grad():
            changed = list(dict.fromkeys(m for m, t, v in versions if t._version != v))
            if changed:
                raise InPlaceError(changed)
            check_output(f, n)
            if not bool(torch.isfinite(f).all()):
                raise KernelOutputError("the model outputs are not finite (NaN or inf)")
            if sum_logits:
                f = f.sum(-1, keepdim=True)
            targets = [c for m, cs in calls.items() if need[m] for c in cs]
            n_out = f.shape[1]
            cot = torch.eye(n_out, dtype=f.dtype, device=f.device)[:, None, :].expand(
                n_out, n, n_out)
            if f.requires_grad and targets:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    grads = batched_vjp(f, [c.output for c in targets], cot)
            else:
                grads = [torch.zeros(n_out, *c.output.shape, dtype=c.output.dtype,
                                     device=c.output.device) for c in targets]
        for call, grad in zip(targets, grads, strict=True):
            call.grad = grad.detach()
        for cs in calls.values():
            for c in cs:
                c.args = tuple(_detach(v) for v in c.args)
                c.kwargs = {k: _detach(v) for k, v in c.kwargs.items()}
                c.output = c.output.detach()
    finally:
        for h in handles:
            h.remove()
    return calls, f.detach()


def _copy(v: Any) -> Any:
    return v.detach().clone() if isinstance(v, torch.Tensor) else v


def _detach(v: Any) -> Any:
    return v.detach() if isinstance(v, torch.Tensor) else v


def _broadcast(out: torch.Tensor, n: int, mode: str) -> torch.Tensor:
    """An unbatched output broadcast to n examples: ``"expand"`` turns a leading 1 into n
    (otherwise as ``"prepend"``), ``"prepend"`` adds a leading n; ``""`` leaves it."""
    if mode == "prepend" or (mode == "expand" and (out.ndim == 0 or out.shape[0] != 1)):
        return out.expand(n, *out.shape)
    if mode == "expand":
        return out.expand(n, *out.shape[1:])
    return out


def _hooked(assignments: list[Assignment]) -> list[nn.Module]:
    return list(dict.fromkeys(m for a in assignments for m, _ in a.handler.hooks(a.module)))


def _repeat_first(x: Inputs, n: int) -> Inputs:
    idx = [0] * n
    if isinstance(x, torch.Tensor):
        return x[idx]
    return {k: v[idx] for k, v in x.items()}


def unbatched_modules(model: nn.Module, modules: list[nn.Module], x: Inputs,
                      rule: str) -> tuple[list[nn.Module], dict[nn.Module, list]]:
    """Hooked modules whose output's dimension 0 does not follow the batch size, and which
    arguments of every call do.

    Runs the model (no grad) on the first example repeated 2 and 3 times; a module is
    unbatched when some call's output has dimension 0 different from the batch size. Such an
    output is broadcast by ``rule`` (:func:`_broadcast`) before the forward continues, as in
    :func:`capture`, so a wrapper around an unbatched layer is seen batched. An argument is
    batched when its dimension 0 is the batch size in both runs (a (T, T) mask is not, even
    when T equals a tile size); returned per module and call as (positional flags, keyword
    flags).
    """
    bad: set[nn.Module] = set()
    size = [0]
    seen: dict[int, dict[nn.Module, list]] = {2: {}, 3: {}}

    def flag(v: Any) -> bool:
        return isinstance(v, torch.Tensor) and v.ndim > 0 and v.shape[0] == size[0]

    def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        seen[size[0]].setdefault(module, []).append(
            (tuple(flag(v) for v in args), {k: flag(v) for k, v in kwargs.items()}))
        if isinstance(output, torch.Tensor) and (output.ndim == 0 or output.shape[0] != size[0]
                                                 or module in bad):
            bad.add(module)
            return _broadcast(output, size[0], rule)
        return None

    handles = [m.register_forward_hook(hook, with_kwargs=True) for m in modules]
    try:
        with torch.no_grad():
            for n in (2, 3):
                size[0] = n
                call_model(model, {}, _repeat_first(x, n))
    finally:
        for h in handles:
            h.remove()
    batched: dict[nn.Module, list] = {}
    for m, two in seen[2].items():
        three = seen[3].get(m, [])
        if len(three) != len(two):
            continue  # calls differ with the batch size: judged by shape (and verified)
        batched[m] = [
            (tuple(p and q for p, q in zip(a2, a3, strict=False)),
             {k: v and k3.get(k, False) for k, v in k2.items()})
            for (a2, k2), (a3, k3) in zip(two, three, strict=True)
        ]
    return [m for m in modules if m in bad], batched


@contextlib.contextmanager
def _kernel_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode and TF32 off while computing; the caller's settings restored after."""
    modes = [(m, m.training) for m in model.modules()]
    tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    model.eval()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        for m, t in modes:
            m.training = t
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32


def _probe(
    model: nn.Module, assignments: list[Assignment], x: Inputs, n: int,
    fn: Callable[[Any], torch.Tensor], sum_logits: bool,
    prepare: Callable[[dict[nn.Module, list[Call]], int], Any],
) -> Probe:
    """How unbatched hooked modules broadcast: the first rule whose hooked forward on the probe
    examples reproduces the plain forward ("expand", then "prepend"); which arguments are
    batched; which modules' calls must be copied because the forward changes them in place;
    C; the bytes of ``prepare``'d features per example and of the capture's saved graph per
    example.

    Raises:
        StructuredError: neither rule reproduces the model's outputs, or a selected parameter
            moves the outputs from a module that is never called (:func:`_check_uncalled`).
    """
    with torch.no_grad():
        plain = fn(call_model(model, {}, x))
        if sum_logits:
            plain = plain.sum(-1, keepdim=True)
    errors = []
    names: list[str] = []
    hooked = _hooked(assignments)
    for rule in ("expand", "prepend"):
        clone: set[nn.Module] = set()
        try:
            unbatched, batched = unbatched_modules(model, hooked, x, rule)
            names = [type(m).__name__ for m in unbatched]
            modes = {m: rule for m in unbatched}
            for _ in range(len(hooked) + 1):
                saved: dict[int, int] = {}
                try:
                    calls, f = capture(model, assignments, x, n, fn, sum_logits, modes,
                                       batched, clone, saved)
                    break
                except InPlaceError as err:
                    clone.update(err.modules)
            else:
                raise StructuredError("internal: in-place changes not resolved by copies")
        except (RuntimeError, StructuredError) as err:
            errors.append(f"{rule or 'batched'}: {type(err).__name__}: {str(err)[:200]}")
            continue
        scale = max(float(plain.abs().max()), 1e-30)
        if f.shape == plain.shape and float((f - plain).abs().max()) <= 1e-6 * scale:
            _check_uncalled(model, assignments, calls, x, fn)
            features = max(1, _nbytes(prepare(calls, n))) / n
            graph = sum(saved.values()) / n
            return Probe(modes, batched, frozenset(clone), int(f.shape[1]), features, graph)
        errors.append(f"{rule or 'batched'}: outputs differ from the plain forward")
    raise StructuredError(
        "the structured engine could not reproduce the model's outputs with its hooks "
        f"(modules without a batch dimension: {names}; {'; '.join(errors)}); use "
        "method='jacobian' for this model"
    )


@torch.no_grad()
def _contract(a: Assignment, fr: Any, fc: Any, layout: str, strategy: str,
              results: dict[str, dict[str, torch.Tensor]], membership: dict[str, list[str]],
              per_layer: bool, symmetric: bool, rows: tuple[int, int],
              cols: tuple[int, int]) -> None:
    """Add one assignment's blocks between a row tile and a column tile to every set."""
    if fr is None or fc is None:  # the module was not called: zero blocks
        return
    (r0, r1), (c0, c1) = rows, cols
    blocks = a.handler.blocks(a.module, fr, fc, a.names, layout, strategy)
    names = [a.full[local] for local in blocks]
    if not per_layer and len(blocks) > 1 and all(membership[n] == membership[names[0]]
                                                 for n in names):
        # One layer's blocks (weight and bias) summed in their own precision, then one addition
        # into each kernel: the per-layer accumulation, half the passes over a large kernel.
        parts = list(blocks.values())
        acc = parts[0] + parts[1]  # a new tensor: the handler's blocks are left as they are
        for part in parts[2:]:
            acc += part
        blocks = {next(iter(blocks)): acc}
    for local, block in blocks.items():
        name = a.full[local]
        for s in membership[name]:
            dest = results[s][name if per_layer else "total"]
            dest[r0:r1, c0:c1] += block
            if symmetric and rows != cols:
                dest[c0:c1, r0:r1] += transpose_block(block, layout)


def product_dtype(dtype: torch.dtype, params: list[torch.dtype]) -> torch.dtype:
    """The dtype of the features and of the products that form each layer's block.

    Kernels are returned in ``dtype``; the products are taken in the precision of the selected
    parameters when that is lower (a float32 model asked for float64 kernels: float32
    products), but never below float32. The layers' blocks of one tile pair are summed in that
    precision and added to the ``dtype`` kernel (with ``per_layer``, each layer's block). The
    captured features of a float32 model are float32 numbers with float32 rounding already,
    so float64 products would buy little accuracy (the kernel's error stays at the float32
    level, about 1e-6 relative) at up to twice the time; a float64 model gets float64 products
    (agreement to 1e-10).
    """
    if dtype != torch.float64 or any(d == torch.float64 for d in params):
        return dtype
    return torch.float32


def _nbytes(obj: Any) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, Mapping):
        return sum(_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(v) for v in obj)
    if hasattr(obj, "__dict__"):
        return sum(_nbytes(v) for v in vars(obj).values())
    return 0


def structured_kernels(
    model: nn.Module,
    x1: Inputs,
    x2: Inputs | None,
    params: Mapping[str, ParamSelector],
    *,
    output: str = "full",
    per_layer: bool = False,
    dtype: torch.dtype = torch.float64,
    batch_size_: int | None = None,
    memory_budget: float | None = None,
    strategy: str = "auto",
    progress: bool = False,
    output_fn: Callable[[Any], torch.Tensor] | None = None,
    verify: bool = True,
) -> tuple[dict[str, torch.Tensor | dict[str, torch.Tensor]], Timings]:
    """Kernels of several parameter sets from one capture per tile (see :func:`ntk.kernels`),
    and the :class:`Timings` of the call. ``verify``: check a few entries of every result
    against whole per-example gradients (:func:`ntk._verify.verify`; only benchmarks turn
    it off)."""
    check_request(output, dtype, batch_size_, memory_budget)
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; use one of {STRATEGIES}")
    if not params:
        raise ValueError("params must name at least one parameter set, e.g. {'full': 'all'}")
    n1, n2 = example_counts(x1, x2)
    symmetric = x2 is None
    first = next(model.parameters(), None)
    device = first.device if first is not None else torch.device("cpu")
    sets = {k: list(select_parameters(model, sel)) for k, sel in params.items()}
    union_set = {n for names in sets.values() for n in names}
    selected = [n for n, _ in model.named_parameters() if n in union_set]
    assignments = assign(model, selected)
    named = dict(model.named_parameters())
    layout = layout_of(output)
    sum_logits = output == "sum_logits"
    fn = output_fn or default_output_fn
    budget = float(memory_budget) if memory_budget is not None else float(default_budget(device))
    inputs = {1: to_device(x1, device)}
    if x2 is not None:
        inputs[2] = to_device(x2, device)
    for which, x in inputs.items():
        probe_forward(model, x, f"x{which}")

    work = product_dtype(dtype, [named[n].dtype for n in selected])

    def prepare(calls: dict[nn.Module, list[Call]], n: int) -> list[Any]:
        with torch.no_grad():
            return [a.handler.prepare(a.module, calls, n, a.names, work) for a in assignments]

    captures = [0]

    def features(which: int, start: int, stop: int) -> list[Any]:
        captures[0] += 1
        calls, _ = capture(model, assignments, take(inputs[which], start, stop), stop - start,
                           fn, sum_logits, probe.modes, probe.batched, probe.clone)
        return prepare(calls, stop - start)

    started = time.perf_counter()
    with _kernel_mode(model):
        probe_n = min(PROBE_EXAMPLES, n1)
        probe_x = take(inputs[1], 0, probe_n)
        key = probe_key(model, probe_x, probe_n, fn, (tuple(selected), sum_logits, work, tuple(
            (type(a.handler), a.names) for a in assignments)))
        found = recall(model, key, fn)
        if found is None:
            found = _probe(model, assignments, probe_x, probe_n, fn, sum_logits, prepare)
            remember(model, key, fn, found)
        probe: Probe = found
        # Per example of a tile: its features, and while it is captured its forward's graph.
        features_pe, n_out = probe.features_per_example, probe.n_out
        membership = {n: [s for s, names in sets.items() if n in names] for n in selected}
        if not per_layer:
            assignments = fuse_linears(assignments, membership)
        n_blocks = sum(len(v) for v in sets.values()) if per_layer else len(sets)
        tiles = structured_tiles(features_pe, n1, n2, n_out, layout,
                                 torch.empty((), dtype=dtype).element_size(), n_blocks, budget,
                                 symmetric, batch_size_, graph_pe=probe.graph_per_example)
        tile, keep_all = tiles.tile, tiles.keep_all
        total_tiles = -(-n1 // tile) + (0 if symmetric else -(-n2 // tile))
        cache: OrderedDict[tuple[int, int], list[Any]] = OrderedDict()
        capacity = total_tiles if keep_all else tiles.kept
        # Row tiles in blocks that stay in memory while the columns they meet pass by once.
        per_block = -(-n1 // tile) if keep_all else capacity - 1
        pinned: set[tuple[int, int]] = set()

        def get(which: int, rng: tuple[int, int]) -> list[Any]:
            key = (which, rng[0])
            if key in cache:
                cache.move_to_end(key)
                return cache[key]
            while len(cache) >= capacity:  # the least recently used tile outside the block
                victim = next((k for k in cache if k not in pinned), None)
                if victim is None:  # pragma: no cover - capacity exceeds the block by one
                    break
                del cache[victim]
            cache[key] = features(which, *rng)
            return cache[key]


        def full_blocks(rows: list[int], cols: list[int]) -> dict[str, dict[str, torch.Tensor]]:
            """Blocks (P, P, C, C) in the ``full`` layout at the P examples ``rows`` of x1 and
            ``cols`` of x2 (none when x2 is None), from one capture of each (for the check)."""
            parts = [(1, rows)] if symmetric else [(1, rows), (2, cols)]
            tiles, start = [], 0
            for which, idx in parts:
                calls, _ = capture(model, assignments, select(inputs[which], idx), len(idx), fn,
                                   sum_logits, probe.modes, probe.batched, probe.clone)
                tiles.append((prepare(calls, len(idx)), (start, start + len(idx))))
                start += len(idx)
            full = {s: {n: torch.zeros(start, start, n_out, n_out, dtype=dtype, device=device)
                        for n in (names if per_layer else ["total"])} for s, names in sets.items()}
            for i, (fr, rr) in enumerate(tiles):
                for fc, cc in tiles[i:]:
                    for a, r, c in zip(assignments, fr, fc, strict=True):
                        _contract(a, r, c, "full", strategy, full, membership, per_layer, True,
                                  rr, cc)
            return full

        shape = {"full": (n_out, n_out), "diagonal": (n_out,), "trace": ()}[layout]
        results: dict[str, dict[str, torch.Tensor]] = {
            s: {n: torch.zeros(n1, n2, *shape, dtype=dtype, device=device)
                for n in (names if per_layer else ["total"])}
            for s, names in sets.items()
        }
        t_capture_start = time.perf_counter() - started
        pairs = block_pairs(n1, n2, tile, symmetric, per_block)
        block_rows, b0 = tile * per_block, -1 - tile * per_block
        bar = _progress(len(pairs), progress)
        clock, cpu = time.perf_counter, time.process_time
        t_capture = t_contract = cpu_capture = cpu_contract = 0.0
        captures_before = captures[0]
        for (c0, c1), (r0, r1) in pairs:
            t0, u0 = clock(), cpu()
            if not b0 <= r0 < b0 + block_rows:  # a new block of rows
                b0 = r0 // block_rows * block_rows
                pinned = {(1, s) for s in range(b0, min(b0 + block_rows, n1), tile)}
            frow = get(1, (r0, r1))
            fcol = get(1 if symmetric else 2, (c0, c1))
            t1, u1 = clock(), cpu()
            if per_layer:
                for a, fr, fc in zip(assignments, frow, fcol, strict=True):
                    _contract(a, fr, fc, layout, strategy, results, membership, True,
                              symmetric, (r0, r1), (c0, c1))
            else:  # the tile pair's blocks summed in the product precision, added once
                acc = {k: {"total": torch.zeros(r1 - r0, c1 - c0, *shape, dtype=work,
                                                device=device)} for k in sets}
                for a, fr, fc in zip(assignments, frow, fcol, strict=True):
                    _contract(a, fr, fc, layout, strategy, acc, membership, False, False,
                              (0, r1 - r0), (0, c1 - c0))
                for k, part in acc.items():
                    results[k]["total"][r0:r1, c0:c1] += part["total"]
                    if symmetric and (r0, r1) != (c0, c1):
                        results[k]["total"][c0:c1, r0:r1] += transpose_block(part["total"],
                                                                             layout)
            t_capture, cpu_capture = t_capture + t1 - t0, cpu_capture + u1 - u0
            t_contract, cpu_contract = t_contract + clock() - t1, cpu_contract + cpu() - u1
            bar.update(1)
        bar.close()
        check_finite(results)
        cache.clear()  # the check's whole gradients take the budget's room, not the tiles
        t_verify, u_verify = clock(), cpu()
        verify_bytes = 0
        if verify:
            rows = sorted({0, n1 - 1})
            cols = rows if symmetric else sorted({0, n2 - 1})
            points = len(rows) + (0 if symmetric else len(cols))
            verify_bytes = check_bytes(points * min(n_out, PROJECTIONS),
                                       sum(named[n].numel() * named[n].element_size()
                                           for n in selected), budget)
            check_kernels(model, inputs[1], inputs.get(2), rows, cols, sets, results,
                          lambda: full_blocks(rows, cols), n_out, layout, sum_logits, fn,
                          room=budget)
        t_verify, u_verify = clock() - t_verify, cpu() - u_verify
        timings = Timings(tile=tile, tile_pairs=len(pairs),
                          captures=captures[0] - captures_before, keep_all=keep_all,
                          setup_seconds=t_capture_start, capture_seconds=t_capture,
                          contract_seconds=t_contract, capture_cpu_seconds=cpu_capture,
                          contract_cpu_seconds=cpu_contract, verify_seconds=t_verify,
                          verify_cpu_seconds=u_verify, estimated_peak_bytes=tiles.peak_bytes,
                          verify_bytes=verify_bytes)
    out: dict[str, torch.Tensor | dict[str, torch.Tensor]] = {}
    for s, blocks in results.items():
        if sum_logits:
            blocks = {k: v[..., 0, 0] for k, v in blocks.items()}
        out[s] = blocks if per_layer else blocks["total"]
    return out, timings


class _NoBar:
    def update(self, _: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, enabled: bool) -> Any:
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="structured kernels", unit="tile pair")
