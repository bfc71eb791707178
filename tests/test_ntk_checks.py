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


def _c_outputs(c: int) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(c)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, c)).double().eval()
    return model, torch.randn(5, 3, dtype=F64), torch.randn(4, 3, dtype=F64)


def _patch_blocks(monkeypatch, change):
    """Every Linear block passed through ``change(block, layout)``."""
    real = LinearHandler.blocks

    def blocks(self, module, f1, f2, names, layout, strategy):
        return {k: change(v, layout) for k, v in
                real(self, module, f1, f2, names, layout, strategy).items()}

    monkeypatch.setattr(LinearHandler, "blocks", blocks)


@pytest.mark.parametrize("c", [1, 2, 10])
@pytest.mark.parametrize("output", ["full", "diagonal", "trace"])
@pytest.mark.parametrize("two", [False, True], ids=["x2=None", "x2"])
def test_self_check_passes_right_kernels_and_refuses_scaled_blocks(monkeypatch, c, output, two):
    """A block scaled by 1.001 everywhere (check (A): projections against autograd) or only in
    tiles of more than two examples, as a tile-size dependence would (check (B): the returned
    entries against the full blocks of the checked examples) is refused at every C; at C <= 2
    both by (B) against the exact blocks of whole gradients."""
    model, x, x2 = _c_outputs(c)
    x2 = x2 if two else None
    got = ntk.structured_ntk(model, x, x2, params="all", output=output)
    want = ntk.reference_ntk(model, x, x2, params="all", output=output)
    assert float((got - want).abs().max() / want.abs().max()) < 1e-10
    exact = "against whole gradients"
    for when, words in ((lambda b: True, exact if c <= 2 else "projected on the outputs"),
                        (lambda b: b.shape[0] > 2, exact if c <= 2 else "against its full blocks")):
        with monkeypatch.context() as m:
            _patch_blocks(m, lambda b, layout, when=when: 1.001 * b if when(b) else b)
            with pytest.raises(StructuredError, match=f"disagrees with whole per-example.*{words}"):
                ntk.structured_ntk(model, x, x2, params="all", output=output)


def test_self_check_refuses_an_antisymmetric_error_of_the_output_blocks(monkeypatch):
    """``E(c, c') = -E(c', c)`` added to every full block escapes ``u^T E u = 0``; the pairs of
    different projections ``u_r^T E u_s`` find it."""
    model, x, _ = _c_outputs(10)
    skew = torch.randn(10, 10, dtype=F64, generator=torch.Generator().manual_seed(1))
    skew = 1e-3 * (skew - skew.T)
    ntk.structured_ntk(model, x, params="all")
    _patch_blocks(monkeypatch, lambda b, layout: b + skew if layout == "full" else b)
    with pytest.raises(StructuredError, match="projected on the outputs"):
        ntk.structured_ntk(model, x, params="all")


def test_self_check_captures_the_checked_examples_only_when_it_projects(monkeypatch):
    """At C <= 2 the whole gradients give the exact full blocks: no capture of the checked
    examples on top of the kernel's; at C > 2 one (x2 None)."""
    import ntk._structured as structured

    count = [0]
    real = structured.capture

    def capture(*args, **kw):
        count[0] += 1
        return real(*args, **kw)

    monkeypatch.setattr(structured, "capture", capture)
    for c, extra in ((1, 0), (2, 0), (10, 1)):
        model, x, _ = _c_outputs(c)
        seen = []
        for verify in (False, True, False):
            count[0] = 0
            structured.structured_kernels(model, x, None, {"k": "all"}, output="trace",
                                          verify=verify)
            seen.append(count[0])
        assert seen[1:] == [seen[2] + extra, seen[2]], (c, seen)


def test_self_check_takes_two_projections_whatever_c(monkeypatch):
    """The check's backward passes: min(C, 2) per checked example."""
    import ntk._verify as verify

    seen = []
    real = verify._Gradients

    class Gradients(real):
        def __init__(self, *args):
            super().__init__(*args)
            seen.append((self.points, self.r))

    monkeypatch.setattr(verify, "_Gradients", Gradients)
    for c in (1, 2, 10):
        model, x, _ = _c_outputs(c)
        ntk.structured_ntk(model, x, params="all", output="trace")
    assert seen == [(2, 1), (2, 2), (2, 2)]


@pytest.mark.parametrize("two", [False, True], ids=["x2=None", "x2"])
def test_self_check_holds_its_gradients_in_blocks_that_fit_and_computes_the_rest_again(two):
    """With room for b gradients beside one more, the dots are those of all gradients held at
    once (to rounding), from n + (backward passes again for each gradient after a block)."""
    import ntk._verify as verify

    model, x, x2 = _c_outputs(3)
    parts = [(x, [0, 4])] + ([(x2, [0, 3])] if two else [])
    names = [n for n, _ in model.named_parameters()]
    whole = verify._Gradients(model, parts, names, lambda f: f, False, verify.projections(3))
    n, size = len(whole), whole.bytes_each
    want = verify._dots(whole, names, None)
    assert whole.passes == n == (4 if two else 2) * 2
    for b in range(1, n + 1):
        room = (b + 1) * size if b < n else None
        assert verify.held(n, size, room) == b
        grads = verify._Gradients(model, parts, names, lambda f: f, False, verify.projections(3))
        got = verify._dots(grads, names, room)
        blocks = -(-n // b)
        again = sum(n - min(n, (i + 1) * b) for i in range(blocks))
        assert grads.passes == n + again, b
        assert verify.check_bytes(n, size, room) == min(n, b + 1) * size
        for k in names:
            torch.testing.assert_close(got[k], want[k], rtol=1e-13, atol=1e-15)


def test_self_check_with_one_gradient_held_still_refuses_a_wrong_block(monkeypatch):
    """Room for one gradient only: the right kernel passes, a block scaled by 1.001 fails."""
    import ntk._verify as verify

    monkeypatch.setattr(verify, "held", lambda n, size, room: 1)
    model, x, _ = _c_outputs(2)
    ntk.structured_ntk(model, x, params="all")
    _patch_blocks(monkeypatch, lambda b, layout: 1.001 * b)
    with pytest.raises(StructuredError, match="disagrees with whole per-example"):
        ntk.structured_ntk(model, x, params="all")


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

