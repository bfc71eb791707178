"""A model's whole state, to assert that a refused call left it exactly as it was.

Used by the Propulsion tests (wrapping, merging, unloading, saving and loading): every refusal
must come before any change.
"""

from __future__ import annotations

import torch
from torch import nn

from propulsion import is_propulsion_model, propulsion_layers


def run(model: nn.Module, inputs) -> torch.Tensor:
    """The model's output on the zoo's inputs (a dict of keyword tensors or one tensor)."""
    return model(**inputs) if isinstance(inputs, dict) else model(inputs)


def snapshot(model: nn.Module) -> dict:
    """Everything a refused call must leave as it was: every module path (shared ones included)
    with its type and its object, every requires_grad flag, a copy of the state, whether the model is
    wrapped and which Propulsion layers are merged."""
    return {
        "modules": [(n, type(m)) for n, m in model.named_modules(remove_duplicate=False)],
        "objects": [id(m) for _, m in model.named_modules(remove_duplicate=False)],
        "flags": {n: p.requires_grad for n, p in model.named_parameters()},
        "state": {n: t.detach().clone() for n, t in model.state_dict().items()},
        "wrapped": is_propulsion_model(model),
        "merged": {n: m.merged for n, m in propulsion_layers(model).items()},
    }


def assert_unchanged(model: nn.Module, before: dict) -> None:
    """``model`` is as :func:`snapshot` saw it: every tensor bit for bit (NaN equal to NaN)."""
    after = snapshot(model)
    for key in ("modules", "objects", "flags", "wrapped", "merged"):
        assert after[key] == before[key], key
    assert after["state"].keys() == before["state"].keys()
    for name, tensor in before["state"].items():
        now = after["state"][name]
        assert now.dtype == tensor.dtype and now.shape == tensor.shape, name
        assert torch.allclose(now, tensor, rtol=0, atol=0, equal_nan=True), name
