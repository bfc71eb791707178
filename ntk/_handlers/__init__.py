"""Per-layer handlers of the structured engine: module type -> kernel blocks of its parameters.

The engine (:mod:`ntk._structured`) runs one forward pass with hooks and one batched backward
pass, and records for every hooked module every call of the forward (a :class:`Call`: the
inputs, the output and the back-signals ``g = d f_c / d output`` for all C outputs). A handler
turns the calls of one tile of examples into *features* (:meth:`Handler.prepare`) and two
tiles' features into kernel blocks (:meth:`Handler.blocks`), one per parameter tensor.

One handler per file (notation in :mod:`ntk._handlers.base`):

- :mod:`~ntk._handlers.linear`: ``nn.Linear`` (weight, bias):
  ``K_W = sum_{t,t'} <g_t, g'_t'> <x_t, x'_t'>``, ``K_b = <sum_t g_t, sum_t' g'_t'>``, ghost or
  materialised by a cost rule; tokens whose back-signal is zero for every output (padding) are
  dropped first. peft LoRA layers need no handler of their own: ``lora_A[adapter]`` and
  ``lora_B[adapter]`` are ``nn.Linear`` modules *called* inside ``lora.Linear.forward``, so
  their hooks capture exactly the inputs ``dropout(x)`` and ``A x`` and the back-signals
  ``scaling * B^T g`` and ``scaling * g`` of the LoRA formulas.
- :mod:`~ntk._handlers.shared_input`: several ``nn.Linear`` layers (summed kernels only), one
  block for those that read the same input (q, k, v): their back-signals concatenated.
- :mod:`~ntk._handlers.propulsion`: Propulsion wrappers (z):
  ``p_j = k z_j^(k-1) sum_t g_tj u_tj`` with ``u`` the base layer's output, block ``<p, p'>``;
  zero while merged (z is then unused).
- :mod:`~ntk._handlers.embedding`: ``nn.Embedding`` (weight):
  ``sum_{t,t'} <g_t, g'_t'> [id_t == id'_t']`` over tokens that are not ``padding_idx``.
- :mod:`~ntk._handlers.layernorm`: ``nn.LayerNorm`` (weight, bias): per-example gradients
  ``sum_t g_t * xhat_t`` and ``sum_t g_t``, then dot products.
- :mod:`~ntk._handlers.scale`: any other module whose only own parameter is a vector ``weight``
  (RMSNorm and kin) and which is affine in it, ``h = a(x) + weight * u(x)``: per-example
  gradients ``sum_t g_t * u_t``, with ``a`` and ``u`` from the module's own forward at weights
  0 and 1 (checked at a third, random weight; otherwise the fallback).
- :mod:`~ntk._handlers.ia3`: peft's IA3 layers on ``nn.Linear`` (the vector ``s`` in
  ``ia3_l``): per-example gradients ``sum_t g_t * (W x_t + b)`` (output scaling) or
  ``sum_t (W^T g_t) * x_t`` (feed-forward, input scaling) from the captured input.
- :mod:`~ntk._handlers.fallback`: any other module owning selected parameters: per-example
  vector-Jacobian products of that module alone, then dot products.

The registry (:data:`HANDLERS`, by exact type, or by a base type whose ``forward`` the
module keeps) is extended with :func:`register_handler`. Handlers are checked after every
structured pass (:mod:`ntk._verify`): a handler that does not describe a module is refused,
never silently wrong.
"""

from __future__ import annotations

from torch import nn

from ntk._handlers.base import (
    CHUNK_ELEMENTS,
    STRATEGIES,
    Call,
    Calls,
    Handler,
    StructuredError,
    VectorHandler,
    batched_vjp,
    dot,
)
from ntk._handlers.embedding import EmbeddingHandler
from ntk._handlers.fallback import FallbackHandler
from ntk._handlers.ia3 import IA3Handler, is_ia3_linear
from ntk._handlers.layernorm import LayerNormHandler
from ntk._handlers.linear import LinearHandler, linear_costs
from ntk._handlers.propulsion import PropulsionHandler
from ntk._handlers.scale import ScaleHandler, is_scale_candidate
from ntk._handlers.shared_input import SharedInputHandler
from propulsion.layer import PropulsionLayer

__all__ = [
    "CHUNK_ELEMENTS",
    "FALLBACK",
    "HANDLERS",
    "STRATEGIES",
    "Call",
    "Calls",
    "EmbeddingHandler",
    "FallbackHandler",
    "Handler",
    "IA3Handler",
    "LayerNormHandler",
    "LinearHandler",
    "PropulsionHandler",
    "ScaleHandler",
    "SharedInputHandler",
    "StructuredError",
    "VectorHandler",
    "batched_vjp",
    "dot",
    "handler_for",
    "linear_costs",
    "register_handler",
]

HANDLERS: dict[type[nn.Module], Handler] = {
    nn.Linear: LinearHandler(),
    nn.Embedding: EmbeddingHandler(),
    nn.LayerNorm: LayerNormHandler(),
    PropulsionLayer: PropulsionHandler(),
}
"""Module type -> handler; a module takes the handler of the first type in its MRO."""

FALLBACK = FallbackHandler()
SCALE = ScaleHandler()
IA3 = IA3Handler()


def register_handler(module_type: type[nn.Module], handler: Handler) -> None:
    """Use ``handler`` for ``module_type`` and for its subclasses that keep its ``forward``."""
    HANDLERS[module_type] = handler


def handler_for(module: nn.Module) -> Handler | None:
    """The handler registered for the module's exact type, or for the first type in its MRO
    whose ``forward`` the module still runs unchanged, else :class:`IA3Handler` for peft's IA3
    layers on ``nn.Linear`` and :class:`ScaleHandler` for a module whose only own parameter is a
    vector ``weight`` (None: the generic fallback).

    A subclass that overrides ``forward`` (transformers' scaled embeddings multiply by
    ``embed_scale``; BART's positional embedding takes positions, not token ids) computes
    something the base handler's formula does not describe, so it goes to the fallback.
    """
    cls = type(module)
    if cls in HANDLERS:
        return HANDLERS[cls]
    for base in cls.__mro__[1:]:
        if base in HANDLERS:
            if cls.forward is base.forward:
                return HANDLERS[base]
            break
    if is_ia3_linear(module):
        return IA3
    return SCALE if is_scale_candidate(module) else None
