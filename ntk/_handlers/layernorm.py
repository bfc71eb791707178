"""``nn.LayerNorm``: per-example gradients of the affine parameters from the captured input."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ntk._handlers.base import VectorHandler, _arg, _grads, _tokens

__all__ = ["LayerNormHandler"]


class LayerNormHandler(VectorHandler):
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
        x = xs[0] if len(xs) == 1 else torch.cat(xs, dim=1)
        xhat = F.layer_norm(x, (d,), eps=module.eps)  # no affine parameters: (x - mean) / std
        g = _grads(own, n, d, dtype, module)
        feats = {}
        if "weight" in names:
            feats["weight"] = (g * xhat).sum(2)
        if "bias" in names:
            feats["bias"] = g.sum(2)
        return feats

