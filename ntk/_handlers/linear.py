"""``nn.Linear`` (also peft LoRA's A and B, which are ``nn.Linear`` modules called inside
``lora.Linear.forward``): ghost or materialised weight blocks by a cost rule, bias blocks."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ntk._handlers import base
from ntk._handlers.base import (
    CHUNK_ELEMENTS,
    STRATEGIES,
    Handler,
    _arg,
    _dot_examples,
    _grads,
    _pairs,
    _tokens,
    _unfold_full,
)
from ntk._problem import transpose_block

__all__ = ["GHOST", "GHOST_ENTRY", "PER_EXAMPLE", "WRITE", "LinearHandler", "linear_costs",
           "live_tokens"]

# Cost rule constants, fitted to measured times (1 CPU thread, float32, MKL, under load; MiniLM's
# layer shapes, T = 8..32, a pre-LN encoder, d = 128, T = 16, re-checked with a tiny BERT, d = 128,
# ragged T <= 24: benchmarks/results/ntk_vs_neural_tangents.md, notes). Units are multiply-adds of a
# large matrix product (about 70 GFlop/s here). Ghost: its two Gram matrices at that rate, plus
# GHOST_ENTRY units per entry of the multiplied Gram (elementwise product and token sums, limited
# by memory traffic). Materialise: the per-example gradients by a batched product with inner
# dimension T run PER_EXAMPLE times slower (and cost at least WRITE units per entry however short
# the sequence); their Gram matrix runs at the full rate, on the share of a symmetric product
# that is computed (:func:`ntk._handlers.base.gram_fraction`).
GHOST = 1.0
GHOST_ENTRY = 40.0
PER_EXAMPLE = 2.7
WRITE = 8


def linear_costs(n1: int, n2: int, t1: int, t2: int, d_in: int, d_out: int, c: int,
                 layout: str, same: bool = False,
                 rows: tuple[int, int] | None = None) -> dict[str, float]:
    """Cost estimates of the two strategies for a Linear weight block (the cost rule).

    With ``q = C^2`` pairs of outputs for ``full`` and ``q = C`` otherwise, ``e`` the entries
    per token pair of the multiplied Gram (``q`` for ``full``, ``C`` for ``diagonal``, 1 for
    ``trace``), ``s = 1/2`` when the two tiles are the same (``same``: only blocks on and above
    the diagonal are computed, the rest mirrored) and ``s = 1`` otherwise, ``s'`` the share of
    the per-example Gram computed (:func:`ntk._handlers.base.gram_fraction` of ``n C`` rows
    when ``same``, else 1), ``P = d_in d_out``, ``R`` the token rows of a tile (``rows``;
    default ``n T``) and ``m = max(T, WRITE)``::

        ghost       = s R1 R2 (GHOST (d_in + q d_out) + GHOST_ENTRY e)
        materialise = PER_EXAMPLE C (n1 m1 + [not same] n2 m2) P  +  s' q n1 n2 P

    Ghost wins for short sequences (T^2 below about 2 d_in d_out / (d_in + q d_out)),
    materialise for long ones.
    """
    q = _pairs(c, layout)
    e = {"full": q, "diagonal": c}.get(layout, 1)
    s = 0.5 if same else 1.0
    share = base.gram_fraction(n1 * (c if layout == "full" else 1)) if same else 1.0
    p = d_in * d_out
    r1, r2 = rows if rows is not None else (n1 * t1, n2 * t2)
    per_example = c * (n1 * max(t1, WRITE) + (0 if same else n2 * max(t2, WRITE))) * p
    return {
        "ghost": s * r1 * r2 * (GHOST * (d_in + q * d_out) + GHOST_ENTRY * e),
        "materialise": PER_EXAMPLE * per_example + share * q * n1 * n2 * p,
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


def _pack(x: torch.Tensor, g: torch.Tensor, live: torch.Tensor | None = None
          ) -> _LinearFeatures:
    """Keep the token positions whose back-signal is non-zero for some output (exact).

    ``x`` (n, T, d_in), ``g`` (C, n, T, d_out). A token with ``g = 0`` for every output adds
    nothing to ``sum_t g_t x_t^T``: padding tokens (masked out of attention) and, in the last
    block of an encoder read at one token, all other tokens. Ghost then costs ``R1 R2`` token
    pairs instead of ``n1 n2 T1 T2`` (``R`` = kept tokens of a tile).
    """
    c, n, t, d_out = g.shape
    gt = g.permute(1, 2, 0, 3)  # (n, T, C, d_out)
    if live is None:  # (n, T); given when known
        live = live_tokens(g)
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


def live_tokens(g: torch.Tensor) -> torch.Tensor:
    """(n, T) tokens whose back-signal ``g`` (C, n, T, d_out) is non-zero for some output (a
    NaN counts as non-zero): ``max |g|`` over outputs and features, one pass, no boolean copy.
    With one token per example (an MLP) every token is kept without looking: nothing to drop."""
    n, t = g.shape[1:3]
    if t == 1:
        return torch.ones(n, 1, dtype=torch.bool, device=g.device)
    return g.abs().amax(-1).amax(0) != 0


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
            f.cache["bias"] = (f.g.view(f.n, f.t, *f.g.shape[1:]).sum(1) if f.dense else
                               f.g.new_zeros(f.n, *f.g.shape[1:]).index_add_(0, f.seg, f.g))
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
        step = min(step, max(base.SYM_BLOCK, -(-n1 // 8)))
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
                dest[e:, s:e] = transpose_block(blk[:, e - s:], layout)
    return weight, bias




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
        step = min(step, max(base.SYM_BLOCK, -(-r1 // 8)))
    one1, one2 = f1.dense and f1.t == 1, f2.dense and f2.t == 1  # row = example
    if f1.dense and f2.dense and not (one1 and one2):
        return _ghost_grid(f1, f2, layout, same, step)
    for s in range(0, r1, step):
        e = min(r1, s + step)
        lo = s if same else 0
        part = _ghost_rows(f1.x[s:e], f1.g[s:e], f2.x[lo:], f2.g[lo:], layout)
        if one1 and one2:  # no sums over tokens: the rows are the example pairs
            blk = _segment_sum(part, None, None, e - s, r2 - lo, layout)
            out[s:e, lo:] = blk
            if same and e < r1:
                out[e:, s:e] = transpose_block(blk[:, e - s:], layout)
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
            out += transpose_block(off, layout)
    return out


def _ghost_grid(f1: _LinearFeatures, f2: _LinearFeatures, layout: str, same: bool,
                step: int) -> torch.Tensor:
    """:func:`_ghost` for tiles whose rows are a (n, t) grid (every example keeps ``t``
    tokens): chunks of whole examples, and the sums over each example pair's t1 x t2 token
    pairs by a reshape and ``sum`` instead of index additions (one token axis at a time: a
    strided axis first, about 3x faster than both at once)."""
    n1, n2, t1, t2 = f1.n, f2.n, f1.t, f2.t
    c = f1.g.shape[1]
    shape = {"full": (c, c), "diagonal": (c,), "trace": ()}[layout]
    out = f1.x.new_empty(n1, n2, *shape)
    step = max(1, step // t1)  # examples per chunk
    for a in range(0, n1, step):
        b = min(n1, a + step)
        lo = a if same else 0
        rows = (f1.x[a * t1:b * t1], f1.g[a * t1:b * t1], f2.x[lo * t2:], f2.g[lo * t2:])
        m, k = b - a, n2 - lo
        if layout == "full":
            blk = _grid_full(*rows, m, t1, k, t2)
        elif layout == "diagonal":  # (C, m t1, k t2)
            blk = _ghost_rows(*rows, layout).view(c, m, t1, k, t2).sum(2).sum(3).permute(1, 2, 0)
        else:
            blk = _ghost_rows(*rows, layout).view(m, t1, k, t2).sum(1).sum(2)
        out[a:b, lo:] = blk
        if same and b < n1:
            out[b:, a:b] = transpose_block(blk[:, b - a:], layout)
    return out


def _grid_full(x1: torch.Tensor, g1: torch.Tensor, x2: torch.Tensor, g2: torch.Tensor, m: int,
               t1: int, k: int, t2: int) -> torch.Tensor:
    """The ``full`` blocks (m, k, C, C) of m x k examples on token grids: rows ``x`` (m t1,
    d_in) and (k t2, d_in), ``g`` (m t1, C, d_out) and (k t2, C, d_out). The products of the
    two Gram matrices are laid out (C', C, m t1, k t2), so that the input Gram multiplies
    contiguous rows and the token sums reduce whole rows (faster than (m t1, C, k t2, C))."""
    c = g1.shape[1]
    rows = g1.transpose(0, 1).reshape(c * m * t1, -1)  # (C m t1, d_out): a small copy
    gg = g1.new_empty(c, c * m * t1, k * t2)
    for j in range(c):
        torch.mm(rows, g2[:, j].T, out=gg[j])
    gg.view(c, c, m * t1, k * t2).mul_(x1 @ x2.T)
    return gg.view(c, c, m, t1, k, t2).sum(3).sum(4).permute(2, 3, 1, 0)


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

