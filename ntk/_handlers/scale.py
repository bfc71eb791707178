"""Modules affine in one vector parameter along the last dimension (RMSNorm and its kin)."""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call

from ntk._handlers.base import VectorHandler, _grads, _tokens, close_to
from ntk._handlers.fallback import FallbackHandler

__all__ = ["ScaleHandler", "is_scale_candidate"]

_PROBE_SEED = 1234
_FALLBACK = FallbackHandler()


def is_scale_candidate(module: nn.Module) -> bool:
    """A module whose only own parameter is a vector ``weight`` (RMSNorm, T5's LayerNorm, Gemma's
    ``(1 + weight)`` norm, ...): :class:`ScaleHandler` tries it before the generic fallback."""
    own = dict(module.named_parameters(recurse=False))
    return list(own) == ["weight"] and own["weight"].ndim == 1


class ScaleHandler(VectorHandler):
    """``h = a(x) + weight * u(x)`` over the last dimension, ``weight`` of shape (d,).

    RMSNorm has ``a = 0`` and ``u = x / rms(x)``; Gemma's norm ``(1 + weight) * xhat`` has
    ``a = u = xhat``. Per-example vectors ``sum_t g_t * u_t`` (``g`` the back-signals of the
    output). ``a`` and ``u`` come from the module's own forward on the whole tile with the weight
    set to 0 and to 1 (no loop over examples, and whatever the module computes, e.g. Llama's
    normalisation in float32). The module must be affine in its weight: the recorded output must
    equal ``a + weight * u`` and a call at a random weight ``r`` must equal ``a + r * u``; a module
    that fails either (or carries no batch dimension) is handed to the generic fallback, and the
    engine's self-check compares the blocks with whole gradients in any case.
    """

    def covers(self, module):
        return ("weight",) if is_scale_candidate(module) else ()

    def prepare(self, module, calls, n, names, dtype):
        own = calls.get(module, [])
        if not own:
            return None
        weight = module.weight.detach()
        d = weight.numel()
        gen = torch.Generator().manual_seed(_PROBE_SEED)
        probe = (torch.rand(d, generator=gen, dtype=torch.float64) + 0.5).to(weight)
        us = []
        with torch.no_grad():
            for call in own:
                if call.mode or call.output.shape[-1:] != (d,):
                    return _FALLBACK.prepare(module, calls, n, names, dtype)
                a, one, at_probe = (functional_call(module, {"weight": w}, call.args, call.kwargs)
                                    for w in (torch.zeros_like(weight), torch.ones_like(weight), probe))
                u = one - a
                if not (close_to(call.output.detach(), a + weight * u) and close_to(at_probe, a + probe * u)):
                    return _FALLBACK.prepare(module, calls, n, names, dtype)
                us.append(_tokens(u, n, d, "output", module).to(dtype))
        u = us[0] if len(us) == 1 else torch.cat(us, dim=1)
        g = _grads(own, n, d, dtype, module)
        return {"weight": (g * u).sum(2)}
