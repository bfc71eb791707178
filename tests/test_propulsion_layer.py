"""The Propulsion wrappers on their own: formula, merge, dtype of z, gradient, bad input.

Each wrapper computes ``h = base(x) * z**k``; these tests recompute that product independently
(``x @ W.T + b``, ``E[ids]``, ``layer_norm``) in float64, including N = 1, T = 1 and one feature.
"""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close_rel
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from propulsion import (
    ADAPTER_PARAMETER,
    PropulsionEmbedding,
    PropulsionError,
    PropulsionLayerNorm,
    PropulsionLinear,
)

F64 = torch.float64
EXACT = 1e-12  # float64: one product and one power per entry


def _randn(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, dtype=F64)


def _random_z(gen: torch.Generator, n: int) -> torch.Tensor:
    return 0.5 + torch.rand(n, generator=gen, dtype=F64)  # uniform in [0.5, 1.5)


# -- hypothesis over shapes --------------------------------------------------------------------

SHAPES = dict(
    n=st.integers(1, 3),
    t=st.integers(1, 3),
    d_in=st.integers(1, 6),
    d_out=st.integers(1, 6),
    degree=st.integers(1, 4),
    seed=st.integers(0, 2**16),
)


@settings(deadline=None, max_examples=25)
@given(bias=st.booleans(), **SHAPES)
def test_linear_forward_and_merge_equal_formula(n, t, d_in, d_out, degree, seed, bias):
    gen = torch.Generator().manual_seed(seed)
    base = nn.Linear(d_in, d_out, bias=bias).double()
    with torch.no_grad():
        base.weight.copy_(_randn(gen, d_out, d_in))
        if bias:
            base.bias.copy_(_randn(gen, d_out))
    w = base.weight.detach().clone()
    b = base.bias.detach().clone() if bias else torch.zeros(d_out, dtype=F64)
    z = _random_z(gen, d_out)
    x = _randn(gen, n, t, d_in)
    expected = (x @ w.T + b) * z**degree

    layer = PropulsionLinear(base, degree)
    with torch.no_grad():
        layer.propulsion_z.copy_(z)
    assert_close_rel(layer(x), expected, EXACT)

    layer.merge()
    assert layer.merged
    assert_close_rel(layer(x), expected, EXACT)
    assert_close_rel(layer.base_layer.weight, w * (z**degree)[:, None], EXACT)
    layer.unmerge()
    assert not layer.merged
    assert_close_rel(layer.base_layer.weight, w, EXACT)
    assert_close_rel(layer(x), expected, EXACT)


@settings(deadline=None, max_examples=25)
@given(**SHAPES)
def test_embedding_forward_and_merge_equal_formula(n, t, d_in, d_out, degree, seed):
    vocab, dim = d_in, d_out
    gen = torch.Generator().manual_seed(seed)
    base = nn.Embedding(vocab, dim).double()
    with torch.no_grad():
        base.weight.copy_(_randn(gen, vocab, dim))
    table = base.weight.detach().clone()
    z = _random_z(gen, dim)
    ids = torch.randint(0, vocab, (n, t), generator=gen)
    expected = table[ids] * z**degree

    layer = PropulsionEmbedding(base, degree)
    with torch.no_grad():
        layer.propulsion_z.copy_(z)
    assert_close_rel(layer(ids), expected, EXACT)
    layer.merge()
    assert_close_rel(layer(ids), expected, EXACT)
    layer.unmerge()
    assert_close_rel(layer.base_layer.weight, table, EXACT)


@settings(deadline=None, max_examples=15)
@given(n=st.integers(1, 3), t=st.integers(1, 3), d=st.integers(1, 6), degree=st.integers(1, 4),
       seed=st.integers(0, 2**16))
def test_layernorm_forward_and_merge_equal_formula(n, t, d, degree, seed):
    gen = torch.Generator().manual_seed(seed)
    base = nn.LayerNorm(d).double()
    with torch.no_grad():
        base.weight.copy_(_randn(gen, d))
        base.bias.copy_(_randn(gen, d))
    gamma, beta = base.weight.detach().clone(), base.bias.detach().clone()
    z = _random_z(gen, d)
    x = _randn(gen, n, t, d)
    mean = x.mean(-1, keepdim=True)
    var = x.var(-1, unbiased=False, keepdim=True)
    expected = ((x - mean) / torch.sqrt(var + base.eps) * gamma + beta) * z**degree

    layer = PropulsionLayerNorm(base, degree)
    with torch.no_grad():
        layer.propulsion_z.copy_(z)
    assert_close_rel(layer(x), expected, 1e-10)
    layer.merge()
    assert_close_rel(layer(x), expected, 1e-10)


# -- the gradient of z (docs/theory/kernels.md, Propulsion block) ------------------------------

@pytest.mark.parametrize("degree", [1, 2, 5], ids=lambda k: f"k{k}")
def test_z_gradient_is_k_z_to_k_minus_1_times_sum_g_u(degree):
    """d<g, h>/dz_j = k z_j**(k-1) sum_t g_tj u_tj with u = W x + b the pre-scale output."""
    gen = torch.Generator().manual_seed(degree)
    layer = PropulsionLinear(nn.Linear(4, 3).double(), degree)
    z = _random_z(gen, 3)
    with torch.no_grad():
        layer.propulsion_z.copy_(z)
    x, g = _randn(gen, 5, 4), _randn(gen, 5, 3)
    (grad,) = torch.autograd.grad((layer(x) * g).sum(), layer.propulsion_z)
    u = layer.base_layer(x).detach()
    assert_close_rel(grad, degree * z ** (degree - 1) * (g * u).sum(0), EXACT)


# -- construction: shapes, names, dtypes -------------------------------------------------------

WRAPPER_CASES = [
    pytest.param(PropulsionLinear, lambda: nn.Linear(4, 3), 3, id="linear"),
    pytest.param(PropulsionEmbedding, lambda: nn.Embedding(7, 5), 5, id="embedding"),
    pytest.param(PropulsionLayerNorm, lambda: nn.LayerNorm(6), 6, id="layernorm"),
]


@pytest.mark.parametrize(("wrapper", "make", "features"), WRAPPER_CASES)
def test_wrapper_keeps_base_layer_and_adds_one_vector(wrapper, make, features):
    base = make()
    weight = base.weight
    layer = wrapper(base, 3, init_value=0.5)
    assert layer.base_layer is base and layer.base_layer.weight is weight  # never copied
    assert layer.features == features
    assert ADAPTER_PARAMETER == "propulsion_z"
    z = getattr(layer, ADAPTER_PARAMETER)
    assert z.shape == (features,)
    assert torch.equal(z, torch.full((features,), 0.5))
    names = {n for n, _ in layer.named_parameters()}
    assert "propulsion_z" in names and "base_layer.weight" in names


@pytest.mark.parametrize(
    ("base_dtype", "z_dtype"),
    [
        pytest.param(torch.float64, torch.float64, id="float64"),
        pytest.param(torch.float32, torch.float32, id="float32"),
        pytest.param(torch.bfloat16, torch.float32, id="bfloat16"),
        pytest.param(torch.float16, torch.float32, id="float16"),
    ],
)
def test_z_dtype_follows_base_but_never_below_float32(base_dtype, z_dtype):
    layer = PropulsionLinear(nn.Linear(4, 3).to(base_dtype), 2)
    assert layer.propulsion_z.dtype == z_dtype
    layer.to(torch.bfloat16)
    assert layer.base_layer.weight.dtype == torch.bfloat16
    assert layer.propulsion_z.dtype in (torch.float32, torch.float64)


def test_cast_to_bf16_keeps_z_values_exactly():
    layer = PropulsionLinear(nn.Linear(4, 3), 1)
    with torch.no_grad():
        layer.propulsion_z.copy_(torch.tensor([1.0 + 1e-3, 1.0 - 1e-4, 1.0 + 2e-5]))
    before = layer.propulsion_z.detach().clone()
    layer.to(torch.bfloat16)
    assert layer.propulsion_z.dtype == torch.float32
    assert torch.equal(layer.propulsion_z.detach(), before)  # bf16 would round all three to 1


def test_init_value_scales_output_by_its_power():
    base = nn.Linear(4, 3).double()
    x = torch.randn(2, 4, dtype=F64)
    layer = PropulsionLinear(base, 3, init_value=2.0)
    assert_close_rel(layer(x), base(x) * 8.0, EXACT)


# -- bad input ---------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("wrapper", "base", "match"),
    [
        pytest.param(PropulsionLinear, nn.Embedding(3, 2), "PropulsionLinear wraps Linear, got "
                     "Embedding", id="linear-of-embedding"),
        pytest.param(PropulsionEmbedding, nn.Linear(3, 2), "PropulsionEmbedding wraps Embedding, "
                     "got Linear", id="embedding-of-linear"),
        pytest.param(PropulsionLayerNorm, nn.Linear(3, 2), "wraps LayerNorm, got Linear",
                     id="layernorm-of-linear"),
        pytest.param(PropulsionLayerNorm, nn.LayerNorm((2, 3)), "last dimension only",
                     id="layernorm-2d"),
    ],
)
def test_wrapper_rejects_wrong_module(wrapper, base, match):
    with pytest.raises(PropulsionError, match=match):
        wrapper(base, 1)


@pytest.mark.parametrize("degree", [0, -1, 2.0, True, "3"], ids=repr)
def test_wrapper_rejects_bad_degree(degree):
    with pytest.raises(PropulsionError, match="degree must be an integer >= 1"):
        PropulsionLinear(nn.Linear(3, 2), degree)


def test_double_merge_and_unmerge_without_merge_raise():
    layer = PropulsionLinear(nn.Linear(3, 2), 2)
    with pytest.raises(PropulsionError, match="not merged; nothing to unmerge"):
        layer.unmerge()
    layer.merge()
    with pytest.raises(PropulsionError, match="already merged"):
        layer.merge()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_merge_refuses_non_finite_z_and_keeps_weights(bad):
    layer = PropulsionLinear(nn.Linear(3, 2).double(), 2)
    weight = layer.base_layer.weight.detach().clone()
    with torch.no_grad():
        layer.propulsion_z[1] = bad
    with pytest.raises(PropulsionError, match="cannot merge: 1 entries of z\\*\\*k are not finite"):
        layer.merge()
    assert not layer.merged
    assert torch.equal(layer.base_layer.weight, weight)


def test_unmerge_refuses_zero_scale():
    layer = PropulsionLinear(nn.Linear(3, 2).double(), 1)
    with torch.no_grad():
        layer.propulsion_z[0] = 0.0
    layer.merge()
    with pytest.raises(PropulsionError, match="exactly 0"):
        layer.unmerge()


def test_unmerge_refuses_weights_a_low_precision_merge_rounded_to_zero():
    base = nn.Linear(3, 2).half()
    weight = base.weight.detach().clone()
    layer = PropulsionLinear(base, 3)
    with torch.no_grad():
        layer.propulsion_z[1] = 1e-3  # z**3 = 1e-9: finite, but below float16's smallest subnormal
    layer.merge()
    assert layer.flushed == 3 + 1  # row 1 of the weight and its bias
    assert torch.equal(layer.base_layer.weight[0], weight[0]) and not layer.base_layer.weight[1].any()
    with pytest.raises(PropulsionError, match="rounded 4 non-zero base entries to exactly 0"):
        layer.unmerge()


def test_layernorm_without_affine_cannot_merge():
    layer = PropulsionLayerNorm(nn.LayerNorm(4, elementwise_affine=False), 1)
    x = torch.randn(2, 4)
    assert_close_rel(layer(x), nn.functional.layer_norm(x, (4,)), 1e-6)
    with pytest.raises(PropulsionError, match="without elementwise affine"):
        layer.merge()
    assert not layer.merged
