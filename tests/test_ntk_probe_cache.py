"""The structured engine's probe runs once per model, input shapes and request."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from torch import nn
from zoo import TinyTransformer, _token_inputs

import ntk
import ntk._structured as engine

F64 = torch.float64


@pytest.fixture
def probes(monkeypatch):
    """The number of probe runs so far (a one-element list)."""
    count = [0]
    real = engine._probe

    def counted(*args, **kwargs):
        count[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "_probe", counted)
    return count


def _transformer() -> nn.Module:
    torch.manual_seed(0)
    return TinyTransformer().double().eval()


def _close(got: torch.Tensor, want: torch.Tensor) -> bool:
    return float((got - want).abs().max() / want.abs().max()) < 1e-10


def test_repeat_calls_skip_the_probe_and_give_identical_kernels(probes):
    model = _transformer()
    x = _token_inputs(t=5)(6, 0)
    first = ntk.structured_ntk(model, x, params="all")
    second = ntk.structured_ntk(model, x, params="all")
    assert probes[0] == 1 and torch.equal(first, second)
    other = _token_inputs(t=5)(6, 1)  # other examples, same shapes: no probe
    assert _close(ntk.structured_ntk(model, other, params="all"),
                  ntk.reference_ntk(model, other, params="all"))
    assert probes[0] == 1
    longer = _token_inputs(t=7)(6, 0)  # another sequence length: probed again
    assert _close(ntk.structured_ntk(model, longer, params="all"),
                  ntk.reference_ntk(model, longer, params="all"))
    assert probes[0] == 2
    ntk.structured_ntk(model, x, params="bias")  # another parameter selection
    assert probes[0] == 3


def test_a_changed_model_is_probed_again(probes):
    model = _transformer()
    x = _token_inputs(t=5)(6, 0)
    ntk.structured_ntk(model, x, params="all")
    with torch.no_grad():  # new weights, same structure: no probe
        model.classifier.weight.mul_(2.0)
    assert _close(ntk.structured_ntk(model, x, params="all"),
                  ntk.reference_ntk(model, x, params="all"))
    assert probes[0] == 1
    model.classifier = nn.Linear(8, 3).double()  # another head: C = 3
    got = ntk.structured_ntk(model, x, params="all")
    assert probes[0] == 2 and got.shape == (6, 6, 3, 3)
    assert _close(got, ntk.reference_ntk(model, x, params="all"))


def test_output_functions_are_told_apart_by_identity(probes):
    model = _transformer()
    x = _token_inputs(t=5)(6, 0)
    first = lambda out: out[:, :1]  # noqa: E731
    ntk.structured_ntk(model, x, params="all", output_fn=first)
    ntk.structured_ntk(model, x, params="all", output_fn=first)
    assert probes[0] == 1
    got = ntk.structured_ntk(model, x, params="all", output_fn=lambda out: out)
    assert probes[0] == 2 and got.shape == (6, 6, 2, 2)


def test_the_cache_does_not_keep_a_model_alive():
    model = nn.Linear(3, 2).double()  # the model is itself a hooked module
    ntk.structured_ntk(model, torch.randn(4, 3, dtype=F64), params="all")
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None
