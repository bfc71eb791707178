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
  ``K_b = <sum_t g_t, sum_t' g'_t'>``. Two strategies for the weight, see :class:`LinearHandler`.
  peft LoRA layers need no handler of their own: ``lora_A[adapter]`` and ``lora_B[adapter]`` are
  ``nn.Linear`` modules *called* inside ``lora.Linear.forward``, so their hooks capture exactly
  the inputs ``dropout(x)`` and ``A x`` and the back-signals ``scaling * B^T g`` and
  ``scaling * g`` of the LoRA formulas.
- Propulsion wrappers (z): ``p_j = k z_j^(k-1) sum_t g_tj u_tj`` with ``u`` the base layer's
  output, block ``<p, p'>``; zero while merged (z is then unused).
- ``nn.Embedding`` (weight): ``sum_{t,t'} <g_t, g'_t'> [id_t == id'_t']`` over tokens that are
  not ``padding_idx``, computed sparsely from per-(example, token id) sums of ``g``.
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


def dot(v1: torch.Tensor, v2: torch.Tensor, layout: str) -> torch.Tensor:
    """Blocks from per-example vectors ``v1`` (C, n1, P), ``v2`` (C, n2, P).

    ``full``: ``K[a, b, c, c'] = <v1[c, a], v2[c', b]>`` (n1, n2, C, C); ``diagonal``: c = c'
    (n1, n2, C); ``trace``: the sum over c of the diagonal (n1, n2).
    """
    c, n1, p = v1.shape
    n2 = v2.shape[1]
    if layout == "full":
        m = v1.reshape(c * n1, p) @ v2.reshape(c * n2, p).T
        return m.view(c, n1, c, n2).permute(1, 3, 0, 2)
    if layout == "diagonal":
        return torch.bmm(v1, v2.transpose(1, 2)).permute(1, 2, 0)
    return v1.permute(1, 0, 2).reshape(n1, c * p) @ v2.permute(1, 0, 2).reshape(n2, c * p).T


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
        return {name: dot(f1[name], f2[name], layout) for name in names}


# -- nn.Linear ----------------------------------------------------------------------------------


def linear_costs(n1: int, n2: int, t1: int, t2: int, d_in: int, d_out: int, c: int,
                 layout: str) -> dict[str, float]:
    """Flop estimates of the two strategies for a Linear weight block (the cost rule).

    With ``q = C^2`` pairs of outputs for ``full`` and ``q = C`` otherwise::

        ghost       = n1 n2 T1 T2 (d_in + q d_out + q)
        materialise = C (n1 T1 + n2 T2) d_in d_out + q n1 n2 d_in d_out

    Ghost forms the (T1 x T2) Gram matrices of inputs and back-signals per pair of examples;
    materialise forms per-example gradients ``sum_t g_t x_t^T`` and dots them. Ghost wins for
    short sequences (T^2 < d_in d_out roughly), materialise for long ones.
    """
    q = _pairs(c, layout)
    return {
        "ghost": float(n1 * n2 * t1 * t2 * (d_in + q * d_out + q)),
        "materialise": float(c * (n1 * t1 + n2 * t2) * d_in * d_out + q * n1 * n2 * d_in * d_out),
    }


@dataclass
class _LinearFeatures:
    x: torch.Tensor  # (n, T, d_in)
    g: torch.Tensor  # (C, n, T, d_out)
    cache: dict[str, torch.Tensor] = field(default_factory=dict)


class LinearHandler(Handler):
    """``nn.Linear`` weight and bias (also LoRA's A and B, which are ``nn.Linear``).

    Weight block ``K_W[a, b] = sum_{t,t'} <g_at, g_bt'> <x_at, x_bt'>`` by one of

    - ``ghost``: Gram matrices ``x_a x_b^T`` (T1, T2) and ``g_a g_b^T`` per output pair,
      multiplied elementwise and summed; computed in row chunks of at most
      :data:`CHUNK_ELEMENTS` intermediate entries;
    - ``materialise``: per-example gradients ``G_a = sum_t g_at x_at^T`` (C, n, d_out d_in),
      then dot products.

    ``auto`` picks per layer and per tile pair the smaller estimate of :func:`linear_costs`.
    Bias block: ``<sum_t g_at, sum_t' g_bt'>``.
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
        return _LinearFeatures(x, g)

    def blocks(self, module, f1, f2, names, layout, strategy):
        out: dict[str, torch.Tensor] = {}
        if "bias" in names:
            out["bias"] = dot(self._bias(f1), self._bias(f2), layout)
        if "weight" in names:
            if strategy == "auto":
                costs = linear_costs(f1.x.shape[0], f2.x.shape[0], f1.x.shape[1], f2.x.shape[1],
                                     f1.x.shape[2], f1.g.shape[3], f1.g.shape[0], layout)
                strategy = min(costs, key=costs.__getitem__)
            if strategy == "ghost":
                out["weight"] = _ghost(f1.x, f1.g, f2.x, f2.g, layout)
            elif strategy == "materialise":
                w1 = self._weight(f1)
                out["weight"] = dot(w1, w1 if f2 is f1 else self._weight(f2), layout)
            else:
                raise ValueError(f"unknown strategy {strategy!r}; use one of {STRATEGIES}")
        return out

    @staticmethod
    def _bias(f: _LinearFeatures) -> torch.Tensor:
        if "bias" not in f.cache:
            f.cache["bias"] = f.g.sum(2)
        return f.cache["bias"]

    @staticmethod
    def _weight(f: _LinearFeatures) -> torch.Tensor:
        """Per-example gradients (C, n, d_out d_in); transient (not kept with the features)."""
        c, n = f.g.shape[:2]
        return torch.einsum("cntj,nti->cnji", f.g, f.x).reshape(c, n, -1)


def _ghost(x1: torch.Tensor, g1: torch.Tensor, x2: torch.Tensor, g2: torch.Tensor,
           layout: str) -> torch.Tensor:
    """``sum_{s,t} <g1[c,a,s], g2[c',b,t]> <x1[a,s], x2[b,t]>`` in ``layout``, row-chunked."""
    c, n1, t1, d_out = g1.shape
    n2, t2 = x2.shape[:2]
    q = _pairs(c, layout)
    rows = max(1, CHUNK_ELEMENTS // max(1, q * n2 * t1 * t2))
    parts = []
    for s in range(0, n1, rows):
        e = min(n1, s + rows)
        r = e - s
        if t1 == 1 and t2 == 1:  # no token axis: elementwise product of the two Gram matrices
            gx1 = x1[s:e, 0] @ x2[:, 0].T  # (r, n2)
            if layout == "full":
                m = (g1[:, s:e, 0].reshape(c * r, d_out) @ g2[:, :, 0].reshape(c * n2, d_out).T)
                parts.append(m.view(c, r, c, n2).permute(1, 3, 0, 2) * gx1[:, :, None, None])
            elif layout == "diagonal":
                m = torch.bmm(g1[:, s:e, 0], g2[:, :, 0].transpose(1, 2))  # (C, r, n2)
                parts.append(m.permute(1, 2, 0) * gx1[:, :, None])
            else:
                a = g1[:, s:e, 0].permute(1, 0, 2).reshape(r, c * d_out)
                parts.append((a @ g2[:, :, 0].permute(1, 0, 2).reshape(n2, c * d_out).T) * gx1)
            continue
        gx = torch.einsum("asi,bti->abst", x1[s:e], x2)  # (r, n2, T1, T2)
        if layout == "full":
            m = (g1[:, s:e].reshape(c * r * t1, d_out) @ g2.reshape(c * n2 * t2, d_out).T)
            m = m.view(c, r, t1, c, n2, t2)
            parts.append(torch.einsum("casdbt,abst->abcd", m, gx))
        elif layout == "diagonal":
            m = torch.bmm(g1[:, s:e].reshape(c, r * t1, d_out), g2.reshape(c, n2 * t2, d_out)
                          .transpose(1, 2)).view(c, r, t1, n2, t2)
            parts.append(torch.einsum("casbt,abst->abc", m, gx))
        else:
            a = g1[:, s:e].permute(1, 2, 0, 3).reshape(r * t1, c * d_out)
            b = g2.permute(1, 2, 0, 3).reshape(n2 * t2, c * d_out)
            m = (a @ b.T).view(r, t1, n2, t2)
            parts.append(torch.einsum("asbt,abst->ab", m, gx))
    return torch.cat(parts, dim=0)


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
    example are first summed per distinct token id (``U`` pairs), then only pairs of the two
    tiles with equal ids are multiplied (cost ``sum_v n1_v n2_v q d`` over token ids ``v``,
    chunked), never a (vocab x d) gradient per example. ``max_norm`` and
    ``scale_grad_by_freq`` change the gradient: such embeddings go to the fallback.
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
        return {"weight": _sparse_equal_ids(f1, f2, layout)}


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
        own_params = dict(module.named_parameters(recurse=False))
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

