"""peft's IA3 layers on ``nn.Linear``: per-example gradients of the scaling vector in closed form."""

from __future__ import annotations

import torch
from torch import nn

from ntk._handlers.base import VectorHandler, _arg, _grads, _tokens, close_to
from ntk._handlers.fallback import FallbackHandler

__all__ = ["IA3Handler", "is_ia3_linear"]

_FALLBACK = FallbackHandler()


def is_ia3_linear(module: nn.Module) -> bool:
    """peft's ``ia3.Linear`` (told by its attributes, so that peft need not be imported): a
    ``ParameterDict`` ``ia3_l`` of scaling vectors around an ``nn.Linear`` ``base_layer``."""
    return (type(module).__module__.startswith("peft.")
            and isinstance(getattr(module, "ia3_l", None), nn.ParameterDict)
            and type(getattr(module, "base_layer", None)) is nn.Linear
            and isinstance(getattr(module, "is_feedforward", None), bool))


class IA3Handler(VectorHandler):
    """``h = W x * s + b * s`` (IA3 on attention outputs) or ``h = W (x * s) + b`` (feed-forward).

    The vector ``s = ia3_l[adapter]`` (shape (d_out, 1) or (1, d_in)) scales the output or the
    input of the base layer. Per-example vectors ``sum_t g_t * (W x_t + b)`` (output scaling) or
    ``sum_t (W^T g_t) * x_t`` (input scaling), ``x`` the captured input and ``g`` the captured
    back-signals of the output: one batched product per call instead of the fallback's loop
    over examples. Used only where the layer runs exactly that formula (one active adapter, not
    merged, the recorded output reproduced); anything else goes to the fallback.
    """

    def covers(self, module):
        return tuple(f"ia3_l.{key}" for key in module.ia3_l.keys()) if is_ia3_linear(module) else ()

    def prepare(self, module, calls, n, names, dtype):
        own = calls.get(module, [])
        if not own:
            return None
        active = [a for a in module.active_adapters if a in module.ia3_l]
        if (module.merged or module.disable_adapters or len(active) != 1
                or list(names) != [f"ia3_l.{active[0]}"] or any(call.mode for call in own)):
            return _FALLBACK.prepare(module, calls, n, names, dtype)
        base: nn.Linear = module.base_layer
        s = module.ia3_l[active[0]].detach().flatten()
        d = s.numel()
        parts = []
        with torch.no_grad():
            for call in own:
                x = _arg(call, "x")
                if not isinstance(x, torch.Tensor) or call.args[1:] or call.kwargs:
                    return _FALLBACK.prepare(module, calls, n, names, dtype)
                x = x.to(s.dtype)
                if module.is_feedforward:
                    want = base(x * s)
                    u = _tokens(x, n, d, "input", module).to(dtype)  # (n, T, d_in)
                else:
                    u_full = base(x)
                    want = u_full * s
                    u = _tokens(u_full, n, d, "output", module).to(dtype)  # (n, T, d_out)
                if not close_to(call.output.detach(), want.to(call.output.dtype)):
                    return _FALLBACK.prepare(module, calls, n, names, dtype)
                parts.append(u)
        u = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        if module.is_feedforward:
            g = _grads(own, n, base.out_features, dtype, module) @ base.weight.detach().to(dtype)
        else:
            g = _grads(own, n, d, dtype, module)
        return {names[0]: (g * u).sum(2)}
