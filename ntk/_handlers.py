"""Per-layer handlers of the structured engine: module type -> kernel blocks of its parameters.

The engine (:mod:`ntk._structured`) runs one forward pass with hooks and one batched backward
pass, and records for every hooked module every call of the forward (a :class:`Call`: the
inputs, the output and the back-signals ``g = d f_c / d output`` for all C outputs). A handler
turns the calls of one tile of examples into *features* (:meth:`Handler.prepare`) and two
tiles' features into kernel blocks (:meth:`Handler.blocks`), one per parameter tensor.

Notation (``shared/science.md`` section 3): a tile holds ``n`` examples; token axes of a call
(everything between the batch and the feature dimension) are flattened to ``T``; the calls of
a module in one forward are concatenated along ``T`` (weight sharing counts every use). Back-
signals have shape ``(C, n, T, d_out)``. Blocks have the layout of the request:
``full`` (n1, n2, C, C), ``diagonal`` (n1, n2, C) or ``trace`` (n1, n2).

Handlers (registry :data:`HANDLERS`, looked up along the module's MRO, overridable with
:func:`register_handler`):

- ``nn.Linear`` (weight, bias): ``K_W = sum_{t,t'} <g_t, g'_t'> <x_t, x'_t'>``,
  ``K_b = <sum_t g_t, sum_t' g'_t'>``. Two strategies for the weight, see :class:`LinearHandler`;
  tokens whose back-signal is zero for every output (padding) are dropped first.
  peft LoRA layers need no handler of their own: ``lora_A[adapter]`` and ``lora_B[adapter]`` are
  ``nn.Linear`` modules *called* inside ``lora.Linear.forward``, so their hooks capture exactly
  the inputs ``dropout(x)`` and ``A x`` and the back-signals ``scaling * B^T g`` and
  ``scaling * g`` of the LoRA formulas.
- Propulsion wrappers (z): ``p_j = k z_j^(k-1) sum_t g_tj u_tj`` with ``u`` the base layer's
  output, block ``<p, p'>``; zero while merged (z is then unused).
- ``nn.Embedding`` (weight): ``sum_{t,t'} <g_t, g'_t'> [id_t == id'_t']`` over tokens that are
  not ``padding_idx``, from per-(example, token id) sums of ``g``: dense over the frequent
  ids, sparse pairs of equal ids for the rest.
- ``nn.LayerNorm`` (weight, bias): per-example gradients ``sum_t g_t * xhat_t`` and
  ``sum_t g_t``, then dot products.
- :class:`FallbackHandler` for any other module owning selected parameters: per-example
  vector-Jacobian products of that module alone (``torch.autograd.grad`` of the re-run module
  with the captured inputs and back-signals, all C outputs batched), then dot products.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from propulsion.layer import PropulsionLayer

__all__ = [
    "CHUNK_ELEMENTS",
    "HANDLERS",
    "STRATEGIES",
    "Call",
    "EmbeddingHandler",
    "FallbackHandler",
    "Handler",
    "LayerNormHandler",
    "LinearHandler",
    "PropulsionHandler",
    "StructuredError",
    "dot",
    "handler_for",
    "linear_costs",
    "register_handler",
]

STRATEGIES = ("auto", "ghost", "materialise")
CHUNK_ELEMENTS = 2**24  # largest intermediate of a contraction, in entries (128 MiB in float64)
SYM_BLOCK = 128  # rows per block below which a symmetric Gram matrix is formed whole


class StructuredError(ValueError):
    """The structured engine cannot attribute a parameter's gradient to examples."""


@dataclass
class Call:
    """One call of a hooked module in the capture forward.

    Attributes:
        args, kwargs: the inputs as the module received them.
        output: the output tensor (expanded to the batch when the module ran on a batch of 1
            that broadcast against the batch).
        grad: back-signals ``d f_c / d output`` stacked over outputs, shape ``(C, *output.shape)``;
            None for modules hooked only for their output.
        mode: ``""`` for a batched call, else how its unbatched output was broadcast to the
            batch (``"expand"`` or ``"prepend"``, see :func:`_tokens`).
    """

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    output: torch.Tensor
    grad: torch.Tensor | None = None
    mode: str = ""


Calls = Mapping[nn.Module, list[Call]]


def dot(v1: torch.Tensor, v2: torch.Tensor, layout: str, same: bool = False) -> torch.Tensor:
    """Blocks from per-example vectors ``v1`` (C, n1, P), ``v2`` (C, n2, P).

    ``full``: ``K[a, b, c, c'] = <v1[c, a], v2[c', b]>`` (n1, n2, C, C); ``diagonal``: c = c'
    (n1, n2, C); ``trace``: the sum over c of the diagonal (n1, n2). ``same``: v1 is v2.
    """
    w1, w2 = v1.transpose(0, 1), v2.transpose(0, 1)
    k = _dot_examples(w1, w2, layout, same)
    if layout == "full":
        return k.view(w1.shape[0], w1.shape[1], w2.shape[0], w1.shape[1]).permute(0, 2, 1, 3)
    return k


def _pairs(c: int, layout: str) -> int:
    return c * c if layout == "full" else c


def _tokens(t: torch.Tensor, n: int, features: int, what: str, module: nn.Module,
            mode: str = "") -> torch.Tensor:
    """``t`` as (n, T, features) (or (n, T) when ``features`` is 0).

    ``mode`` says how a call without a batch dimension broadcasts against the batch: ``""``
    (batched: dimension 0 is the batch), ``"expand"`` (a leading 1 is the batch; otherwise as
    ``"prepend"``) or ``"prepend"`` (a new batch dimension in front), see
    :func:`ntk._structured.capture`.
    """
    if mode == "prepend" or (mode == "expand" and (t.ndim == 0 or t.shape[0] != 1)):
        t = t.expand(n, *t.shape)
    elif mode == "expand":
        t = t.expand(n, *t.shape[1:])
    if t.ndim < 1 or t.shape[0] != n or (features and t.shape[-1] != features):
        raise StructuredError(
            f"{type(module).__name__}: the {what} has shape {tuple(t.shape)}, expected (n={n}, "
            f"..., {features or 'd'}); the structured engine needs the batch on dimension 0 of "
            "every layer input (use method='jacobian' for this model)"
        )
    return t.reshape(n, -1, features) if features else t.reshape(n, -1)


def _grads(calls: list[Call], n: int, features: int, dtype: torch.dtype, module: nn.Module):
    """Back-signals of all calls as (C, n, T_total, features) in ``dtype``."""
    parts = []
    for call in calls:
        assert call.grad is not None
        g = call.grad
        c = g.shape[0]
        parts.append(_tokens(g.flatten(0, 1), c * n, features, "back-signal", module)
                     .view(c, n, -1, features).to(dtype))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)


def _arg(call: Call, name: str) -> Any:
    return call.args[0] if call.args else call.kwargs[name]


class Handler:
    """Base class: how to compute the kernel blocks of some parameters of one module type."""

    def covers(self, module: nn.Module) -> tuple[str, ...]:
        """Local names of the module's own parameters this handler computes."""
        raise NotImplementedError

    def hooks(self, module: nn.Module) -> list[tuple[nn.Module, bool]]:
        """Modules to hook and whether each needs back-signals (default: the module, True)."""
        return [(module, True)]

    def prepare(self, module: nn.Module, calls: Calls, n: int, names: Sequence[str],
                dtype: torch.dtype) -> Any:
        """Features of one tile of ``n`` examples for the parameters ``names`` (or None: no call)."""
        raise NotImplementedError

    def blocks(self, module: nn.Module, f1: Any, f2: Any, names: Sequence[str], layout: str,
               strategy: str) -> dict[str, torch.Tensor]:
        """Kernel blocks between two tiles: local parameter name -> block in ``layout``."""
        raise NotImplementedError


class _VectorHandler(Handler):
    """Handlers whose features are per-example gradient vectors (C, n, P) per parameter."""

    def blocks(self, module, f1, f2, names, layout, strategy):
        return {name: dot(f1[name], f2[name], layout, f1 is f2) for name in names}


# -- nn.Linear ----------------------------------------------------------------------------------

# Cost rule constants, fitted to measured times (1 CPU thread, float32, MKL; the ratio of seconds
# per unit of the two strategies was 0.40-0.56 across MiniLM's layer shapes, T = 8..32, N = 32..128,
# full and trace). Ghost's units are multiply-adds of large, cache-friendly products;
# materialise's are multiply-adds of a batched product with inner dimension T and of a Gram
# matrix of few (n C) long (d_in d_out) rows, both limited by memory traffic: MATERIALISE
# seconds per unit relative to ghost, and at least WRITE units per entry of the per-example
# gradients however short the sequence.
GHOST = 1.0
MATERIALISE = 2.2
WRITE = 8


def linear_costs(n1: int, n2: int, t1: int, t2: int, d_in: int, d_out: int, c: int,
                 layout: str, same: bool = False,
                 rows: tuple[int, int] | None = None) -> dict[str, float]:
    """Cost estimates of the two strategies for a Linear weight block (the cost rule).

    With ``q = C^2`` pairs of outputs for ``full`` and ``q = C`` otherwise, ``s = 1/2`` when the
    two tiles are the same (``same``: only blocks on and above the diagonal are computed, the
    rest mirrored) and ``s = 1`` otherwise, ``P = d_in d_out``, ``R`` the token rows of a tile
    (``rows``; default ``n T``) and ``m = max(T, WRITE)``::

        ghost       = GHOST s R1 R2 (d_in + q d_out + q)
        materialise = MATERIALISE (C (n1 m1 + [not same] n2 m2) P  +  s q n1 n2 P)

    Ghost forms the Gram matrices of inputs and back-signals over token rows; materialise
    forms per-example gradients ``sum_t g_t x_t^T`` and dots them; both are limited by memory
    traffic (constants :data:`MATERIALISE`, :data:`WRITE`). Ghost wins for short sequences
    (T^2 below about 2 d_in d_out / (d_in + q d_out)), materialise for long ones.
    """
    q = _pairs(c, layout)
    s = 0.5 if same else 1.0
    p = d_in * d_out
    r1, r2 = rows if rows is not None else (n1 * t1, n2 * t2)
    per_example = c * (n1 * max(t1, WRITE) + (0 if same else n2 * max(t2, WRITE))) * p
    return {
        "ghost": GHOST * s * r1 * r2 * (d_in + q * d_out + q),
        "materialise": MATERIALISE * (per_example + s * q * n1 * n2 * p),
    }


@dataclass
class _LinearFeatures:
    """A tile's Linear captures, packed: only tokens with a back-signal, example-major rows."""

    x: torch.Tensor  # (R, d_in) inputs of the kept tokens
    g: torch.Tensor  # (R, C, d_out) their back-signals
    seg: torch.Tensor  # (R,) example of each row (non-decreasing)
    pos: torch.Tensor  # (R,) rank of each row among its example's kept tokens
    n: int  # examples in the tile
    t: int  # most kept tokens of one example (>= 1)
    cache: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def dense(self) -> bool:
        """Every example keeps exactly ``t`` tokens: rows are a (n, t) grid."""
        return self.x.shape[0] == self.n * self.t


def _pack(x: torch.Tensor, g: torch.Tensor) -> _LinearFeatures:
    """Keep the token positions whose back-signal is non-zero for some output (exact).

    ``x`` (n, T, d_in), ``g`` (C, n, T, d_out). A token with ``g = 0`` for every output adds
    nothing to ``sum_t g_t x_t^T``: padding tokens (masked out of attention) and, in the last
    block of an encoder read at one token, all other tokens. Ghost then costs ``R1 R2`` token
    pairs instead of ``n1 n2 T1 T2`` (``R`` = kept tokens of a tile).
    """
    c, n, t, d_out = g.shape
    gt = g.permute(1, 2, 0, 3)  # (n, T, C, d_out)
    live = (g != 0).any(-1).any(0)  # (n, T)
    if t == 1 or bool(live.all()):
        rows = torch.arange(n * t, device=x.device)
        return _LinearFeatures(x.reshape(n * t, -1), gt.reshape(n * t, c, d_out), rows // t,
                               rows % t, n, t)
    a_idx, t_idx = live.nonzero(as_tuple=True)  # row-major: sorted by example, then token
    counts = live.sum(1)
    starts = torch.cumsum(counts, 0) - counts
    pos = torch.arange(a_idx.shape[0], device=x.device) - starts[a_idx]
    return _LinearFeatures(x[a_idx, t_idx], gt[a_idx, t_idx], a_idx, pos, n,
                           max(1, int(counts.max())))


def _padded(f: _LinearFeatures) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows back on a (n, t) grid, zeros where an example has fewer: x (n, t, d_in),
    g (n, t, C, d_out)."""
    c, d_out = f.g.shape[1:]
    if f.dense:
        return f.x.view(f.n, f.t, -1), f.g.view(f.n, f.t, c, d_out)
    x = f.x.new_zeros(f.n, f.t, f.x.shape[1])
    g = f.g.new_zeros(f.n, f.t, c, d_out)
    x[f.seg, f.pos] = f.x
    g[f.seg, f.pos] = f.g
    return x, g


class LinearHandler(Handler):
    """``nn.Linear`` weight and bias (also LoRA's A and B, which are ``nn.Linear``).

    Weight block ``K_W[a, b] = sum_{t,t'} <g_at, g_bt'> <x_at, x_bt'>`` by one of

    - ``ghost``: Gram matrices of the kept tokens' inputs and back-signals (R1 x R2, per
      output pair), multiplied elementwise and summed per pair of examples; row-chunked to at
      most :data:`CHUNK_ELEMENTS` intermediate entries;
    - ``materialise``: per-example gradients ``G_a = sum_t g_at x_at^T`` (n, C, d_out d_in),
      in chunks of output features, then dot products.

    ``auto`` picks per layer and per tile pair the smaller estimate of :func:`linear_costs`.
    Bias block: ``<sum_t g_at, sum_t' g_bt'>``. Tokens without a back-signal are dropped first
    (:func:`_pack`). When both tiles are the same (``f1 is f2``: the diagonal tile pairs of a
    symmetric kernel) only the blocks on and above the diagonal are computed, then mirrored.
    """

    def covers(self, module):
        return tuple(n for n, p in module.named_parameters(recurse=False) if n in ("weight", "bias"))

    def prepare(self, module, calls, n, names, dtype):
        own = calls.get(module, [])
        if not own:
            return None
        d_in, d_out = module.in_features, module.out_features
        xs = [_tokens(_arg(c, "input"), n, d_in, "input", module, c.mode).to(dtype) for c in own]
        x = xs[0] if len(xs) == 1 else torch.cat(xs, dim=1)
        g = _grads(own, n, d_out, dtype, module)
        if "weight" not in names:  # the bias needs only the summed back-signals
            return {"bias": g.sum(2).transpose(0, 1)}
        return _pack(x, g)

    def blocks(self, module, f1, f2, names, layout, strategy):
        out: dict[str, torch.Tensor] = {}
        same = f1 is f2
        if ("weight" in names and "bias" in names and strategy in ("auto", "ghost")
                and _one_token(f1) and _one_token(f2)):  # one Gram of back-signals for both
            out["weight"], out["bias"] = _ghost_one_token(f1, f2, layout, same)
            return out
        if "bias" in names:
            out["bias"] = _dot_examples(self._bias(f1), self._bias(f2), layout, same)
            if layout == "full":
                out["bias"] = _unfold_full(out["bias"])
        if "weight" in names:
            if strategy == "auto":
                c, d_out = f1.g.shape[1:]
                costs = linear_costs(f1.n, f2.n, f1.t, f2.t, f1.x.shape[1], d_out, c, layout, same,
                                     rows=(f1.x.shape[0], f2.x.shape[0]))
                strategy = min(costs, key=costs.__getitem__)
            if strategy == "ghost":
                out["weight"] = _ghost(f1, f2, layout, same)
            elif strategy == "materialise":
                out["weight"] = _materialise(f1, f2, layout, same)
            else:
                raise ValueError(f"unknown strategy {strategy!r}; use one of {STRATEGIES}")
        return out

    @staticmethod
    def _bias(f: Any) -> torch.Tensor:
        """Summed back-signals (n, C, d_out)."""
        if isinstance(f, dict):
            return f["bias"]
        if "bias" not in f.cache:
            f.cache["bias"] = f.g.new_zeros(f.n, *f.g.shape[1:]).index_add_(0, f.seg, f.g)
        return f.cache["bias"]


def _one_token(f: Any) -> bool:
    """Features of a tile whose rows are its examples (one token each, all kept)."""
    return isinstance(f, _LinearFeatures) and f.dense and f.t == 1


def _ghost_one_token(f1: _LinearFeatures, f2: _LinearFeatures, layout: str,
                     same: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias blocks of one-token tiles: ``K_b = <g_a, g_b>`` is the Gram matrix of
    back-signals that ghost forms anyway, and ``K_W = K_b * <x_a, x_b>``. Always cheaper than
    materialise (``d_in + q d_out`` against ``q d_in d_out`` per example pair)."""
    n1, n2 = f1.n, f2.n
    c = f1.g.shape[1]
    q = _pairs(c, layout)
    shape = {"full": (c, c), "diagonal": (c,), "trace": ()}[layout]
    weight = f1.x.new_empty(n1, n2, *shape)
    bias = f1.x.new_empty(n1, n2, *shape)
    step = max(1, CHUNK_ELEMENTS // max(1, q * n2))
    if same:
        step = min(step, max(SYM_BLOCK, -(-n1 // 8)))
    for s in range(0, n1, step):
        e = min(n1, s + step)
        lo = s if same else 0
        gg = _segment_sum(_ghost_rows(None, f1.g[s:e], None, f2.g[lo:], layout), None, None,
                          e - s, n2 - lo, layout)
        gx = f1.x[s:e] @ f2.x[lo:].T
        blocks = ((bias, gg), (weight, gg * gx.view(*gx.shape, *[1] * len(shape))))
        for dest, blk in blocks:
            dest[s:e, lo:] = blk
            if same and e < n1:
                dest[e:, s:e] = _transpose(blk[:, e - s:], layout)
    return weight, bias


def _unfold_full(m: torch.Tensor) -> torch.Tensor:
    """(n1, C, n2, C) -> the ``full`` layout (n1, n2, C, C)."""
    return m.permute(0, 2, 1, 3)


def _per_example(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Per-example weight gradients ``G[a, c] = sum_t g[a, t, c] x[a, t]^T`` as (n, C, d_out d_in)
    from x (n, t, d_in), g (n, t, C, d_out)."""
    n, t, c, d_out = g.shape
    a = g.permute(0, 2, 3, 1).reshape(n, c * d_out, t)
    return torch.bmm(a, x).view(n, c, d_out * x.shape[2])


def _materialise(f1: _LinearFeatures, f2: _LinearFeatures, layout: str, same: bool) -> torch.Tensor:
    """The weight block via per-example gradients, formed for chunks of output features (at
    most :data:`CHUNK_ELEMENTS` entries per tile) and dotted, summed over chunks."""
    x1, g1 = _padded(f1)
    x2, g2 = (x1, g1) if same else _padded(f2)
    c, d_out = g1.shape[2:]
    d_in = x1.shape[2]
    rows = max(1, CHUNK_ELEMENTS // max(1, c * max(f1.n, f2.n) * d_in))
    total = None
    for j in range(0, d_out, rows):
        k = min(d_out, j + rows)
        w1 = _per_example(x1, g1[..., j:k])
        w2 = w1 if same else _per_example(x2, g2[..., j:k])
        part = _dot_examples(w1, w2, layout, same)
        total = part if total is None else total.add_(part)
    assert total is not None
    return _unfold_full(total) if layout == "full" else total


def _dot_examples(w1: torch.Tensor, w2: torch.Tensor, layout: str, same: bool) -> torch.Tensor:
    """Dots of per-example vectors (n1, C, P), (n2, C, P): ``full`` as (n1, C, n2, C),
    ``diagonal`` (n1, n2, C), ``trace`` (n1, n2). ``same``: w1 and w2 are equal."""
    n1, c, p = w1.shape
    n2 = w2.shape[0]
    if layout == "trace":
        a = w1.reshape(n1, c * p)
        return _gram(a) if same else a @ w2.reshape(n2, c * p).T
    if layout == "full":
        a = w1.reshape(n1 * c, p)
        return (_gram(a) if same else a @ w2.reshape(n2 * c, p).T).view(n1, c, n2, c)
    return torch.stack([_gram(w1[:, k]) if same else w1[:, k] @ w2[:, k].T for k in range(c)], -1)


def _gram(a: torch.Tensor) -> torch.Tensor:
    """``a @ a.T`` (R, R) from row blocks on and above the diagonal, mirrored: about half the
    multiply-adds of the full product once R is a few hundred rows."""
    r = a.shape[0]
    if r < 2 * SYM_BLOCK:
        return a @ a.T
    step = max(SYM_BLOCK, -(-r // 8))
    out = a.new_empty(r, r)
    for s in range(0, r, step):
        e = min(r, s + step)
        blk = a[s:e] @ a[s:].T  # (e - s, r - s)
        out[s:e, s:] = blk
        out[e:, s:e] = blk[:, e - s:].T
    return out


def _transpose(block: torch.Tensor, layout: str) -> torch.Tensor:
    """K(x2, x1) from K(x1, x2): swap the example axes (and the output axes of ``full``)."""
    if layout == "full":
        return block.permute(1, 0, 3, 2)
    if layout == "diagonal":
        return block.permute(1, 0, 2)
    return block.transpose(0, 1)


def _ghost(f1: _LinearFeatures, f2: _LinearFeatures, layout: str, same: bool) -> torch.Tensor:
    """``sum_{s,t} <g1[s,c], g2[t,c']> <x1[s], x2[t]>`` summed per pair of examples, in ``layout``.

    Rows are contracted in chunks; with ``same`` (one tile) each chunk meets only the rows from
    its own start on: the chunk's square part counts as is, the part to its right counts
    twice (as is and mirrored).
    """
    r1, c, _ = f1.g.shape
    r2 = f2.g.shape[0]
    q = _pairs(c, layout)
    shape = {"full": (c, c), "diagonal": (c,), "trace": ()}[layout]
    out = f1.x.new_zeros(f1.n, f2.n, *shape)
    if r1 == 0 or r2 == 0:
        return out
    step = max(1, CHUNK_ELEMENTS // max(1, q * r2))
    if same:
        step = min(step, max(SYM_BLOCK, -(-r1 // 8)))
    one1, one2 = f1.dense and f1.t == 1, f2.dense and f2.t == 1  # row = example
    for s in range(0, r1, step):
        e = min(r1, s + step)
        lo = s if same else 0
        part = _ghost_rows(f1.x[s:e], f1.g[s:e], f2.x[lo:], f2.g[lo:], layout)
        if one1 and one2:  # no sums over tokens: the rows are the example pairs
            blk = _segment_sum(part, None, None, e - s, r2 - lo, layout)
            out[s:e, lo:] = blk
            if same and e < r1:
                out[e:, s:e] = _transpose(blk[:, e - s:], layout)
            continue
        if not same:
            out += _segment_sum(part, f1.seg[s:e], f2.seg, f1.n, f2.n, layout)
            continue
        w = e - s
        out += _segment_sum(_cols(part, 0, w, layout), f1.seg[s:e], f1.seg[s:e], f1.n, f1.n,
                            layout)
        if e < r1:
            off = _segment_sum(_cols(part, w, r1 - s, layout), f1.seg[s:e], f1.seg[e:], f1.n,
                               f1.n, layout)
            out += off
            out += _transpose(off, layout)
    return out


def _ghost_rows(x1: torch.Tensor | None, g1: torch.Tensor, x2: torch.Tensor | None,
                g2: torch.Tensor, layout: str) -> torch.Tensor:
    """Products of the row Gram matrices of inputs and back-signals, per output pair.

    ``x`` (r, d_in), ``g`` (r, C, d_out) -> ``full`` (r1, C, r2, C), ``diagonal`` (C, r1, r2),
    ``trace`` (r1, r2). With ``x`` None: the Gram matrix of back-signals alone.
    """
    r1, c, d_out = g1.shape
    r2 = g2.shape[0]
    if layout == "full":
        m = (g1.reshape(r1 * c, d_out) @ g2.reshape(r2 * c, d_out).T).view(r1, c, r2, c)
    elif layout == "diagonal":
        m = torch.bmm(g1.transpose(0, 1), g2.permute(1, 2, 0))
    else:
        m = g1.reshape(r1, c * d_out) @ g2.reshape(r2, c * d_out).T
    if x1 is None or x2 is None:
        return m
    gx = x1 @ x2.T  # (r1, r2)
    return m.mul_(gx[:, None, :, None] if layout == "full" else gx)


def _cols(part: torch.Tensor, a: int, b: int, layout: str) -> torch.Tensor:
    """Columns ``a:b`` (second row axis) of a :func:`_ghost_rows` result."""
    return part[:, :, a:b] if layout in ("full", "diagonal") else part[:, a:b]


def _segment_sum(part: torch.Tensor, seg1: torch.Tensor | None, seg2: torch.Tensor | None,
                 n1: int, n2: int, layout: str) -> torch.Tensor:
    """Sum a :func:`_ghost_rows` result over the rows of each example pair: (n1, n2, ...).

    ``seg`` gives each row's example; None when rows are the examples (nothing to sum).
    """
    if seg1 is None or seg2 is None:
        if layout == "full":
            return part.permute(0, 2, 1, 3)
        return part.permute(1, 2, 0) if layout == "diagonal" else part
    if layout == "full":  # (r1, C, r2, C)
        rows = part.new_zeros(n1, *part.shape[1:]).index_add_(0, seg1, part)
        both = part.new_zeros(n1, part.shape[1], n2, part.shape[3]).index_add_(2, seg2, rows)
        return both.permute(0, 2, 1, 3)
    if layout == "diagonal":  # (C, r1, r2)
        rows = part.new_zeros(part.shape[0], n1, part.shape[2]).index_add_(1, seg1, part)
        both = part.new_zeros(part.shape[0], n1, n2).index_add_(2, seg2, rows)
        return both.permute(1, 2, 0)
    rows = part.new_zeros(n1, part.shape[1]).index_add_(0, seg1, part)
    return part.new_zeros(n1, n2).index_add_(1, seg2, rows)


# -- Propulsion wrappers ------------------------------------------------------------------------


class PropulsionHandler(_VectorHandler):
    """``propulsion_z`` of a Propulsion wrapper: ``h = u * z**k`` with ``u`` the base output.

    Per-example vector ``p[c, a, j] = k z_j^(k-1) sum_t g[c, a, t, j] u[a, t, j]`` (C, n, F),
    where ``g`` is the back-signal at the wrapper output ``h``; block ``<p, p'>``. The base
    layer's own parameters are left to the base layer's handler (its back-signal is
    ``g * z**k``, captured at the base layer's output). While merged, z is unused: zero.
    """

    def covers(self, module):
        return ("propulsion_z",)

    def hooks(self, module):
        return [(module, True), (module.base_layer, False)]

    def prepare(self, module, calls, n, names, dtype):
        own = calls.get(module, [])
        base = calls.get(module.base_layer, [])
        features = module.propulsion_z.shape[0]
        z = module.propulsion_z.detach().to(dtype)
        k = module.degree
        if not own or module.merged:
            return None
        g = _grads(own, n, features, dtype, module)  # (C, n, T, F)
        u = torch.cat([_tokens(b.output, n, features, "base output", module).to(dtype)
                       for b in base], dim=1)
        p = (g * u).sum(2) * (k * z ** (k - 1))
        return {"propulsion_z": p}


# -- nn.Embedding -------------------------------------------------------------------------------


@dataclass
class _EmbeddingFeatures:
    example: torch.Tensor  # (U,) example index of each (example, token id) pair
    token: torch.Tensor  # (U,) token id
    rows: torch.Tensor  # (U, C, d): sum of g over the tokens of that id in that example
    n: int  # examples in the tile


class EmbeddingHandler(Handler):
    """``nn.Embedding`` weight: ``K[a, b] = sum_{t,t'} <g_at, g_bt'> [id_at == id_bt']``.

    Tokens equal to ``padding_idx`` get no gradient and are dropped. The back-signals of each
    example are first summed per distinct token id (``U`` pairs). Then, per token id ``v`` used
    by ``n1_v`` examples of one tile and ``n2_v`` of the other: frequent ids
    (``SPARSE_COST n1_v n2_v >= n1 n2``: positions, token types, [CLS], punctuation) get dense
    per-example gradient rows over those ids only and one matrix product; the other ids only
    their pairs of equal ids (cost ``sum_v n1_v n2_v q d``, gathered, chunked). Never a
    (vocab x d) gradient per example. ``max_norm`` and ``scale_grad_by_freq`` change the
    gradient: such embeddings go to the fallback.
    """

    def covers(self, module):
        if module.max_norm is not None or module.scale_grad_by_freq:
            return ()
        return ("weight",)

    def prepare(self, module, calls, n, names, dtype):
        own = calls.get(module, [])
        if not own:
            return None
        ids = torch.cat([_tokens(_arg(c, "input"), n, 0, "input", module, c.mode) for c in own],
                        dim=1)
        g = _grads(own, n, module.embedding_dim, dtype, module)  # (C, n, T, d)
        c = g.shape[0]
        example = torch.arange(n, device=ids.device)[:, None].expand_as(ids).reshape(-1)
        token = ids.reshape(-1).long()
        vectors = g.permute(1, 2, 0, 3).reshape(-1, c, g.shape[-1])
        if module.padding_idx is not None:
            keep = token != module.padding_idx
            example, token, vectors = example[keep], token[keep], vectors[keep]
        key = example * module.num_embeddings + token
        unique, inverse = torch.unique(key, return_inverse=True)
        rows = vectors.new_zeros(unique.shape[0], c, vectors.shape[-1]).index_add_(0, inverse, vectors)
        return _EmbeddingFeatures(unique // module.num_embeddings,
                                  unique % module.num_embeddings, rows, n)

    def blocks(self, module, f1, f2, names, layout, strategy):
        return {"weight": _embedding_block(f1, f2, layout, f1 is f2)}


SPARSE_COST = 8.0
"""Seconds per multiply-add of the gathered equal-id pairs relative to a dense matrix product."""


def _subset(f: _EmbeddingFeatures, keep: torch.Tensor) -> _EmbeddingFeatures:
    return _EmbeddingFeatures(f.example[keep], f.token[keep], f.rows[keep], f.n)


def _embedding_block(f1: _EmbeddingFeatures, f2: _EmbeddingFeatures, layout: str,
                     same: bool) -> torch.Tensor:
    """Frequent ids by a dense product over the used rows, the rest by equal-id pairs."""
    n1, n2 = f1.n, f2.n
    c, d = f1.rows.shape[1:]
    used, inv = torch.unique(torch.cat([f1.token, f2.token]), return_inverse=True)
    i1, i2 = inv[:f1.token.shape[0]], inv[f1.token.shape[0]:]
    k1 = torch.bincount(i1, minlength=used.shape[0]).double()
    k2 = torch.bincount(i2, minlength=used.shape[0]).double()
    dense = SPARSE_COST * k1 * k2 >= n1 * n2
    if not bool(dense.any()):
        return _sparse_equal_ids(f1, f2, layout)
    column = torch.cumsum(dense, 0) - 1  # index among the dense ids
    v = int(dense.sum())

    def rows(f: _EmbeddingFeatures, idx: torch.Tensor) -> torch.Tensor:
        on = dense[idx]
        out = f.rows.new_zeros(f.n, v, c, d)
        out[f.example[on], column[idx[on]]] = f.rows[on]
        return out.permute(0, 2, 1, 3).reshape(f.n, c, v * d)

    w1 = rows(f1, i1)
    w2 = w1 if same else rows(f2, i2)
    block = _dot_examples(w1, w2, layout, same)
    if layout == "full":
        block = _unfold_full(block)
    sparse1, sparse2 = ~dense[i1], ~dense[i2]
    if bool(sparse1.any()) and bool(sparse2.any()):
        block = block + _sparse_equal_ids(_subset(f1, sparse1), _subset(f2, sparse2), layout)
    return block


def _sparse_equal_ids(f1: _EmbeddingFeatures, f2: _EmbeddingFeatures, layout: str) -> torch.Tensor:
    """Sum over pairs (row of f1, row of f2) with equal token ids of ``<rows1, rows2>``."""
    n1, n2 = f1.n, f2.n
    c, d = f1.rows.shape[1:]
    shape = {"full": (c, c), "diagonal": (c,), "trace": ()}[layout]
    out = f1.rows.new_zeros(n1 * n2, *shape)
    order = torch.argsort(f2.token)
    sorted_tok = f2.token[order]
    lo = torch.searchsorted(sorted_tok, f1.token, right=False)
    hi = torch.searchsorted(sorted_tok, f1.token, right=True)
    counts = hi - lo
    total = int(counts.sum())
    if total == 0:
        return out.view(n1, n2, *shape)
    i = torch.repeat_interleave(torch.arange(f1.token.shape[0], device=counts.device), counts)
    start = torch.repeat_interleave(lo - (torch.cumsum(counts, 0) - counts), counts)
    j = order[start + torch.arange(total, device=counts.device)]
    step = max(1, CHUNK_ELEMENTS // max(1, c * d))
    for s in range(0, total, step):
        ii, jj = i[s:s + step], j[s:s + step]
        r1, r2 = f1.rows[ii], f2.rows[jj]
        if layout == "full":
            vals = torch.einsum("kcd,ked->kce", r1, r2)
        elif layout == "diagonal":
            vals = (r1 * r2).sum(-1)
        else:
            vals = (r1 * r2).sum((-1, -2))
        out.index_add_(0, f1.example[ii] * n2 + f2.example[jj], vals)
    return out.view(n1, n2, *shape)


# -- nn.LayerNorm -------------------------------------------------------------------------------


class LayerNormHandler(_VectorHandler):
    """``nn.LayerNorm`` affine parameters: ``h = xhat * weight + bias`` over the last dims.

    Per-example vectors ``sum_t g_t * xhat_t`` (weight) and ``sum_t g_t`` (bias), ``xhat``
    recomputed from the captured input in ``dtype`` (biased variance, ``eps`` of the module).
    """

    def covers(self, module):
        return tuple(n for n, _ in module.named_parameters(recurse=False) if n in ("weight", "bias"))

    def prepare(self, module, calls, n, names, dtype):
        own = calls.get(module, [])
        if not own:
            return None
        d = math.prod(module.normalized_shape)
        dims = len(module.normalized_shape)
        xs = []
        for c in own:
            x = _arg(c, "input").flatten(-dims) if dims > 1 else _arg(c, "input")
            xs.append(_tokens(x, n, d, "input", module, c.mode).to(dtype))
        x = torch.cat(xs, dim=1)
        mean = x.mean(-1, keepdim=True)
        var = x.var(-1, unbiased=False, keepdim=True)
        xhat = (x - mean) / torch.sqrt(var + module.eps)
        g = _grads(own, n, d, dtype, module)
        feats = {}
        if "weight" in names:
            feats["weight"] = (g * xhat).sum(2)
        if "bias" in names:
            feats["bias"] = g.sum(2)
        return feats


# -- fallback -----------------------------------------------------------------------------------


def _batched_vjp(out: torch.Tensor, inputs: list[torch.Tensor],
                 grads: torch.Tensor) -> list[torch.Tensor]:
    """``[sum_o grads[c, o] d out_o / d input for c]`` stacked over c, for every input.

    Tries one backward batched over the C cotangents (``is_grads_batched=True``, a vmap over
    the backward); if an operation has no batching rule, falls back to C backward passes.
    """
    try:
        res = torch.autograd.grad(out, inputs, grad_outputs=grads, is_grads_batched=True,
                                  retain_graph=True, allow_unused=True)
    except (RuntimeError, NotImplementedError):
        res = tuple(
            torch.stack(parts) if parts[0] is not None else None  # type: ignore[misc]
            for parts in zip(*[torch.autograd.grad(out, inputs, grad_outputs=g, retain_graph=True,
                                                   allow_unused=True) for g in grads], strict=True)
        )
    return [torch.zeros((grads.shape[0], *t.shape), dtype=t.dtype, device=t.device)
            if r is None else r for r, t in zip(res, inputs, strict=True)]


def _slice_example(value: Any, a: int, n: int) -> Any:
    if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == n:
        return value[a:a + 1]
    return value


class FallbackHandler(_VectorHandler):
    """Any module owning selected parameters that no handler covers.

    For every call and example ``a``, the module is re-run on the captured inputs of ``a``
    (tensors whose dimension 0 is the batch are sliced, others passed whole) with its own
    parameters substituted (``torch.func.functional_call``), and the vector-Jacobian product
    with the captured back-signals ``g[:, a]`` gives the per-example gradients (C, n, P),
    summed over calls; blocks are their dot products. Exact for any module whose computation
    for one example depends only on that example's inputs, but it loops over examples in
    Python: slower than a dedicated handler.
    """

    def covers(self, module):
        return tuple(n for n, _ in module.named_parameters(recurse=False))

    def prepare(self, module, calls, n, names, dtype):
        own = calls.get(module, [])
        if not own:
            return None
        own_params = dict(module.named_parameters())  # names may be nested (``ia3_l.default``)
        theta = {k: own_params[k].detach().requires_grad_(True) for k in names}
        assert own[0].grad is not None
        c = own[0].grad.shape[0]
        feats = {k: torch.zeros(c, n, v.numel(), dtype=dtype, device=v.device)
                 for k, v in theta.items()}
        for call in own:
            assert call.grad is not None
            for a in range(n):
                args, kwargs = call.args, call.kwargs
                if not call.mode:
                    args = tuple(_slice_example(v, a, n) for v in args)
                    kwargs = {k: _slice_example(v, a, n) for k, v in kwargs.items()}
                with torch.enable_grad():
                    out = functional_call(module, theta, args, kwargs)
                    if not isinstance(out, torch.Tensor):
                        raise StructuredError(
                            f"{type(module).__name__} returns {type(out).__name__}; the "
                            "fallback handler needs a tensor output (use method='jacobian')"
                        )
                    g = call.grad[:, a] if call.mode == "prepend" else call.grad[:, a:a + 1]
                    grads = _batched_vjp(out, list(theta.values()), g.to(out.dtype))
                for k, gr in zip(theta, grads, strict=True):
                    feats[k][:, a] += gr.reshape(c, -1).to(dtype)
        return feats


# -- registry -----------------------------------------------------------------------------------

HANDLERS: dict[type[nn.Module], Handler] = {
    nn.Linear: LinearHandler(),
    nn.Embedding: EmbeddingHandler(),
    nn.LayerNorm: LayerNormHandler(),
    PropulsionLayer: PropulsionHandler(),
}
"""Module type -> handler; a module takes the handler of the first type in its MRO."""

FALLBACK = FallbackHandler()


def register_handler(module_type: type[nn.Module], handler: Handler) -> None:
    """Use ``handler`` for ``module_type`` and its subclasses (unless they have their own)."""
    HANDLERS[module_type] = handler


def handler_for(module: nn.Module) -> Handler | None:
    """The registered handler of the first type in ``type(module).__mro__`` (None: fallback)."""
    for cls in type(module).__mro__:
        if cls in HANDLERS:
            return HANDLERS[cls]
    return None

