"""What the structured engine's probe found about a model, remembered for repeat calls.

The probe (:func:`ntk._structured._probe`) runs the model on a few examples several times: a
plain forward, forwards at batch sizes 2 and 3 (which arguments carry the batch), a hooked
capture (broadcast rules, in-place copies, the number of outputs C), a backward for modules
never called, and the features' bytes per example. What it finds depends on the model's
structure and on the inputs' per-example shapes, not on the parameter values or on which
examples, so a later call with the same key reuses it (:func:`recall`) instead of probing again.

The key (:func:`probe_key`):

- the model's structure: every submodule's path and type, every parameter's and buffer's
  path, shape, dtype and device (a replaced layer, a new adapter, a cast or a move all change
  it; training the weights does not);
- the inputs: names, per-example shapes and dtypes, and the number of probe examples;
- the request: the selected parameters and their handlers, ``sum_logits``, the features'
  dtype;
- the output function, by identity (held weakly: a function that is gone, or a new one at the
  same address, is a miss; a bound method, created anew on every access, always misses).

Entries live in a weak-keyed map on the model object (a model that is dropped frees them) and
name modules by their path, so nothing here keeps the model alive; at most :data:`ENTRIES`
keys per model, the least recently used dropped first. A stale decision could only make the
engine's self-check (:mod:`ntk._verify`) refuse the kernel, never return a wrong one; with the
check off (benchmarks) the key is the only guard.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ntk._inputs import Inputs

__all__ = ["ENTRIES", "Probe", "probe_key", "recall", "remember"]

ENTRIES = 8
"""Keys remembered per model."""


@dataclass(frozen=True)
class Probe:
    """What the probe found out about the model.

    Attributes:
        modes: unbatched hooked module -> how its output broadcasts to the batch.
        batched: hooked module -> per call, which arguments carry the batch.
        clone: modules whose calls are copied (their input or output is changed in place).
        n_out: C, the number of outputs.
        features_per_example: bytes of a tile's features per example (the memory plan).
        graph_per_example: bytes per example of the tensors a capture's forward saves for its
            backward (the memory plan).
    """

    modes: dict[nn.Module, str]
    batched: dict[nn.Module, list]
    clone: frozenset[nn.Module]
    n_out: int
    features_per_example: float
    graph_per_example: float


@dataclass(frozen=True)
class _ByPath:
    """A :class:`Probe` with modules named by their path in the model."""

    modes: dict[str, str]
    batched: dict[str, list]
    clone: frozenset[str]
    n_out: int
    features_per_example: float
    graph_per_example: float


_CACHE: weakref.WeakKeyDictionary[nn.Module, OrderedDict[Hashable, tuple[Any, _ByPath]]] = (
    weakref.WeakKeyDictionary())


def _tensor_key(t: torch.Tensor, batch: bool) -> tuple:
    return (tuple(t.shape[1:] if batch else t.shape), t.dtype, t.device)


def probe_key(model: nn.Module, x: Inputs, n_probe: int, fn: Callable[[Any], torch.Tensor],
              request: Hashable) -> Hashable:
    """The key of the probe's findings on the ``n_probe`` examples ``x`` (see the module
    docstring); ``request``: what else they depend on (selected parameters, handlers, ...)."""
    items = [("", x)] if isinstance(x, torch.Tensor) else sorted(x.items())
    return (
        tuple((name, type(m)) for name, m in model.named_modules()),
        tuple((name, _tensor_key(p, False)) for name, p in model.named_parameters()),
        tuple((name, _tensor_key(b, False)) for name, b in model.named_buffers()),
        tuple((name, _tensor_key(v, True)) for name, v in items),
        n_probe, id(fn), request,
    )


def recall(model: nn.Module, key: Hashable, fn: Callable[[Any], torch.Tensor]) -> Probe | None:
    """The findings remembered for ``key``, with modules resolved in ``model``; None if none."""
    entries = _CACHE.get(model)
    if entries is None or key not in entries:
        return None
    ref, found = entries[key]
    if ref() is not fn:
        del entries[key]
        return None
    entries.move_to_end(key)
    modules = dict(model.named_modules())
    return Probe({modules[p]: r for p, r in found.modes.items()},
                 {modules[p]: flags for p, flags in found.batched.items()},
                 frozenset(modules[p] for p in found.clone), found.n_out,
                 found.features_per_example, found.graph_per_example)


def remember(model: nn.Module, key: Hashable, fn: Callable[[Any], torch.Tensor],
             probe: Probe) -> None:
    """Keep ``probe`` for ``key`` (nothing when ``fn`` cannot be referenced weakly or a
    module of ``probe`` is not a submodule of ``model``)."""
    paths = {m: name for name, m in model.named_modules()}
    try:
        ref = weakref.ref(fn)
        found = _ByPath({paths[m]: r for m, r in probe.modes.items()},
                        {paths[m]: flags for m, flags in probe.batched.items()},
                        frozenset(paths[m] for m in probe.clone), probe.n_out,
                        probe.features_per_example, probe.graph_per_example)
    except (TypeError, KeyError):  # no weak reference to fn, or a module outside the model
        return
    entries = _CACHE.setdefault(model, OrderedDict())
    entries[key] = (ref, found)
    entries.move_to_end(key)
    while len(entries) > ENTRIES:
        entries.popitem(last=False)

