"""Refusals instead of wrong numbers: bad requests, non-finite kernels, the ``check=`` option,
the structured engine's self-check and handler contract, a cheap memory planner."""

from __future__ import annotations

import time

import pytest
import torch
from torch import nn
from zoo import MHA, MLP, ScaledEmbedding, _dense_inputs

import ntk
from ntk import InputError, KernelOutputError, KernelTooLargeError, StructuredError
from ntk._handlers import EmbeddingHandler, LinearHandler, handler_for
from ntk._memory import Profile, pair_counts, plan, tile_pairs

F64 = torch.float64


def _mlp():
    torch.manual_seed(0)
    return MLP().double().eval(), _dense_inputs(5)(4, 0)


# -- requests refused with a sentence ----------------------------------------------------------


@pytest.mark.parametrize("kw, words", [
    ({"memory_budget": float("nan")}, "memory_budget must be a finite positive"),
    ({"memory_budget": -1}, "memory_budget must be a finite positive"),
    ({"memory_budget": float("inf")}, "memory_budget must be a finite positive"),
    ({"batch_size": 2.5}, "batch_size must be a positive integer"),
    ({"batch_size": 0}, "batch_size must be a positive integer"),
    ({"dtype": torch.int64}, "dtype must be a floating torch.dtype"),
])
@pytest.mark.parametrize("api", ["empirical_ntk", "structured_ntk", "kernels"])
def test_bad_arguments_get_a_sentence(api, kw, words):
    model, x = _mlp()
    fn = {"empirical_ntk": ntk.empirical_ntk, "structured_ntk": ntk.structured_ntk,
          "kernels": lambda m, x, **k: ntk.kernels(m, x, params={"all": "all"}, **k)}[api]
    with pytest.raises(ValueError, match=words):
        fn(model, x, **kw)


@pytest.mark.parametrize("method", ["auto", "structured", "jacobian", "ntk_vp"])
@pytest.mark.parametrize("x", [torch.randn(4, 6, dtype=F64), torch.randn(4, 5),
                               torch.randint(0, 3, (4, 5))], ids=["features", "float32", "long"])
def test_wrong_feature_size_or_dtype_is_an_input_error(method, x):
    model, _ = _mlp()
    with pytest.raises(InputError, match="feature size and dtype the model expects"):
        ntk.empirical_ntk(model, x, method=method)


# -- non-finite kernels --------------------------------------------------------------------------


class _SqrtAbs(nn.Module):
    """``sqrt(|W x + b|)`` at W = 0, b = 0: finite outputs, infinite gradients."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)
        nn.init.zeros_(self.lin.weight)
        nn.init.zeros_(self.lin.bias)

    def forward(self, x):
        return torch.sqrt(self.lin(x).abs())


@pytest.mark.parametrize("method", ["auto", "structured", "jacobian", "ntk_vp"])
def test_non_finite_kernels_are_refused_by_every_method(method):
    model = _SqrtAbs().double()
    x = torch.randn(3, 3, dtype=F64)
    with pytest.raises(KernelOutputError, match="non-finite"):
        ntk.empirical_ntk(model, x, method=method)
    with pytest.raises(KernelOutputError, match="non-finite"):
        ntk.kernels(model, x, params={"all": "all"}, per_layer=True)


# -- check= ----------------------------------------------------------------------------------------


def test_check_passes_on_a_right_kernel_and_raises_on_a_wrong_one(monkeypatch):
    model, x = _mlp()
    for method in ("auto", "jacobian"):
        ntk.empirical_ntk(model, x, method=method, check=True, per_layer=True)
        ntk.empirical_ntk(model, x, _dense_inputs(5)(3, 1), method=method, output="trace",
                          check=6)
    ntk.kernels(model, x, params={"all": "all", "bias": "bias"}, per_layer=True, check=3)
    import ntk.empirical as empirical

    real = empirical.structured_ntk
    monkeypatch.setattr(empirical, "structured_ntk", lambda *a, **k: 1.001 * real(*a, **k))
    with pytest.raises(KernelOutputError, match="differs from the reference"):
        ntk.empirical_ntk(model, x, check=True)


# -- the structured engine's self-check and handler contract --------------------------------------


class _ScaledLinear(nn.Linear):
    def forward(self, x):
        return 2.0 * super().forward(x)


def test_handlers_follow_exact_type_or_unchanged_forward():
    assert isinstance(handler_for(nn.Linear(2, 2)), LinearHandler)
    assert handler_for(_ScaledLinear(2, 2)) is None  # overrides forward: fallback
    assert handler_for(ScaledEmbedding(4, 2, 2.0)) is None
    assert isinstance(handler_for(nn.Embedding(4, 2)), EmbeddingHandler)


def test_a_wrong_handler_is_refused_by_the_self_check(monkeypatch):
    """A handler registered for a type it does not describe: the engine refuses (never returns
    its numbers) and auto computes the right kernel with jacobian."""
    import ntk._handlers as handlers

    monkeypatch.setitem(handlers.HANDLERS, _ScaledLinear, LinearHandler())
    torch.manual_seed(0)
    model = nn.Sequential(_ScaledLinear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double().eval()
    x = torch.randn(5, 3, dtype=F64)
    with pytest.raises(StructuredError, match="disagrees with whole per-example gradients"):
        ntk.structured_ntk(model, x, params="all", per_layer=True)
    want = ntk.reference_ntk(model, x, params="all")
    with pytest.warns(UserWarning, match="computed the kernel with"):
        got = ntk.empirical_ntk(model, x, params="all")
    assert float((got - want).norm() / want.norm()) < 1e-12


# -- the memory planner is cheap --------------------------------------------------------------------


def test_pair_counts_match_the_tile_pairs():
    for n1, n2, tile in [(7, 7, 1), (7, 7, 3), (9, 4, 2), (5, 5, 5), (1, 1, 1), (8, 3, 8)]:
        for symmetric in ((True, False) if n1 == n2 else (False,)):
            pairs = tile_pairs(n1, n2, tile, symmetric)
            want = (sum(len(rs) for _, rs in pairs),
                    sum((c1 - c0) * (r1 - r0) for (c0, c1), rs in pairs for r0, r1 in rs),
                    sum(r1 - r0 for (c0, c1), rs in pairs for r0, r1 in rs
                        if not (symmetric and (r0, r1) == (c0, c1))))
            assert pair_counts(n1, n2, tile, symmetric) == want


def test_planning_a_large_kernel_is_cheap():
    prof = Profile({"w": 10**6, "b": 10**3}, 2, 1e4, 1e6, 4)
    start = time.perf_counter()
    with pytest.raises(KernelTooLargeError):
        plan("jacobian", prof, 20000, 20000, True, "full", False, 8, 1e6, None)
    plan("ntk_vp", prof, 4000, 4000, True, "full", False, 8, 1e12, None)
    assert time.perf_counter() - start < 1.0


def test_an_operation_without_a_forward_rule_gets_a_sentence_and_auto_still_works():
    torch.manual_seed(0)
    model, x = MHA().double(), torch.randn(3, 5, 4, dtype=torch.float64)
    with pytest.raises(ntk.UnsupportedModelError, match=r"method='ntk_vp' .*forward-mode AD.*method='auto'"):
        ntk.empirical_ntk(model, x, method="ntk_vp")
    with pytest.warns(UserWarning, match="computed the kernel with"):
        kernel = ntk.empirical_ntk(model, x)
    reference = ntk.reference_ntk(model, x)
    assert float(torch.linalg.norm(kernel - reference) / torch.linalg.norm(reference)) < 1e-10

