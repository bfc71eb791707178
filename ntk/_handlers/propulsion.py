"""Propulsion wrappers: the block of ``propulsion_z`` from the wrapper's back-signal and the
base layer's output."""

from __future__ import annotations

import torch

from ntk._handlers.base import VectorHandler, _grads, _tokens

__all__ = ["PropulsionHandler"]



class PropulsionHandler(VectorHandler):
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

