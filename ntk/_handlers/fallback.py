"""The generic fallback: per-example vector-Jacobian products of one module re-run alone."""

from __future__ import annotations

from typing import Any

import torch
from torch.func import functional_call

from ntk._handlers.base import StructuredError, VectorHandler, batched_vjp

__all__ = ["FallbackHandler"]


def _slice_example(value: Any, a: int, n: int, batched: bool | None) -> Any:
    """Example ``a`` of an argument that carries the batch on dimension 0 (``batched``, as
    seen in the probe; None: judged by its shape), else the argument whole."""
    if not isinstance(value, torch.Tensor) or value.ndim == 0 or value.shape[0] != n:
        return value
    return value[a:a + 1] if batched is None or batched else value


class FallbackHandler(VectorHandler):
    """Any module owning selected parameters that no handler covers.

    For every call and example ``a``, the module is re-run on the captured inputs of ``a``
    (arguments that carry the batch on dimension 0 in the probe runs with two batch sizes are
    sliced, others, e.g. a (T, T) mask, passed whole) with its own
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
                    pos, kw = call.batched if call.batched is not None else (None, None)
                    args = tuple(_slice_example(v, a, n, None if pos is None else pos[i])
                                 for i, v in enumerate(args))
                    kwargs = {k: _slice_example(v, a, n, None if kw is None else kw.get(k, False))
                              for k, v in kwargs.items()}
                with torch.enable_grad():
                    out = functional_call(module, theta, args, kwargs)
                    if not isinstance(out, torch.Tensor):
                        raise StructuredError(
                            f"{type(module).__name__} returns {type(out).__name__}; the "
                            "fallback handler needs a tensor output (use method='jacobian')"
                        )
                    g = call.grad[:, a] if call.mode == "prepend" else call.grad[:, a:a + 1]
                    grads = batched_vjp(out, list(theta.values()), g.to(out.dtype))
                for k, gr in zip(theta, grads, strict=True):
                    feats[k][:, a] += gr.reshape(c, -1).to(dtype)
        return feats

