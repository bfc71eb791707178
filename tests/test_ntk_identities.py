"""Exact identities of the empirical NTK (the theory page of the docs, docs/theory.md), and the engine's
promises: per-layer blocks add up, K is symmetric PSD, tiling changes nothing, the live model is
read at every call, the caller's modes and TF32 flags survive, any shape works.
"""

from __future__ import annotations

import pytest
import torch
from conftest import RTOL, assert_close_rel
from hypothesis import given, settings
from hypothesis import strategies as st
from test_ntk_reference import WRAPPED, lora_wrapped, propulsion_wrapped, reference_ntk
from torch import nn
from zoo import CASES, MLP, TinyTransformer, _dense_inputs, _token_inputs

from ntk import empirical_ntk, select_parameters

TOL = RTOL[torch.float64]
METHODS = ["jacobian", "ntk_vp"]
F64 = torch.float64


def _linear(d_in: int = 4, c: int = 3, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(d_in, c).double().eval()


def _x(n: int, d: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=F64)


# -- a single linear layer: K = (x . x' + 1) I --------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_linear_layer_full_kernel_is_gram_plus_one_times_identity(method):
    layer, x1, x2 = _linear(), _x(5, 4, 1), _x(3, 4, 2)
    k = empirical_ntk(layer, x1, x2, params="all", method=method)
    expected = (x1 @ x2.T + 1)[:, :, None, None] * torch.eye(3, dtype=F64)
    assert_close_rel(k, expected, TOL)


@pytest.mark.parametrize("degree", [1, 2, 3])
@pytest.mark.parametrize("method", METHODS)
def test_linear_layer_propulsion_at_z_one_is_k2_u_u(method, degree):
    from propulsion import PropulsionConfig, get_propulsion_model

    layer, x1, x2 = _linear(), _x(5, 4, 1), _x(3, 4, 2)
    u1, u2 = layer(x1).detach(), layer(x2).detach()  # pre-scale outputs W x + b
    model = get_propulsion_model(nn.Sequential(layer), PropulsionConfig(degree=degree))
    k = empirical_ntk(model, x1, x2, params="propulsion", method=method)
    expected = degree**2 * torch.diag_embed(u1[:, None, :] * u2[None, :, :])  # (5, 3, 3, 3)
    assert_close_rel(k, expected, TOL)


# -- degree k at z = 1 is k^2 times degree 1 ---------------------------------------------


@pytest.mark.parametrize("degree", [2, 3])
@pytest.mark.parametrize("build,inputs,emb", [
    (MLP, _dense_inputs(5), False), (TinyTransformer, _token_inputs(), True),
], ids=["mlp", "transformer"])
def test_propulsion_degree_k_is_k2_times_degree_1_at_z_one(build, inputs, emb, degree):
    def plain(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return build().double().eval()

    x = inputs(3, 0)
    one = empirical_ntk(propulsion_wrapped(plain, 1, emb, z_at_one=True)(0), x)
    k = empirical_ntk(propulsion_wrapped(plain, degree, emb, z_at_one=True)(0), x)
    assert_close_rel(k, degree**2 * one, TOL)


# -- LoRA with B = 0: only B moves the outputs ------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_lora_with_b_zero_has_exactly_zero_a_block(method):
    def plain(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return TinyTransformer().double().eval()

    model = lora_wrapped(plain, ["query", "value"], b_random=False)(0)
    blocks = empirical_ntk(model, _token_inputs()(3, 0), params="lora", per_layer=True,
                           method=method)
    a_blocks = {k: v for k, v in blocks.items() if "lora_A" in k}
    assert len(a_blocks) == 2
    for name, block in a_blocks.items():
        assert torch.count_nonzero(block) == 0, name
    assert any(torch.count_nonzero(v) > 0 for k, v in blocks.items() if "lora_B" in k)


# -- per-layer blocks, symmetry, PSD ------------------------------------------------------------

ROWS = [(c.id, c.build, c.inputs, "all") for c in CASES] + [
    (r.id, r.build, r.inputs, r.params) for r in (WRAPPED[1], WRAPPED[4], WRAPPED[6], WRAPPED[7])
]


@pytest.mark.parametrize("output", ["full", "trace", "diagonal", "sum_logits"])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("row", ROWS, ids=[r[0] for r in ROWS])
def test_per_layer_blocks_sum_to_total(row, method, output):
    _, build, inputs, params = row
    model, x = build(0), inputs(3, 0)
    total = empirical_ntk(model, x, params=params, method=method, output=output)
    blocks = empirical_ntk(model, x, params=params, method=method, output=output,
                           per_layer=True)
    assert list(blocks) == list(select_parameters(model, params))
    assert_close_rel(sum(blocks.values()), total, TOL)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("row", ROWS, ids=[r[0] for r in ROWS])
def test_kernel_is_symmetric_psd(row, method):
    _, build, inputs, params = row
    model, x = build(1), inputs(4, 1)
    k = empirical_ntk(model, x, params=params, method=method)
    n, c = k.shape[0], k.shape[2]
    mat = k.permute(0, 2, 1, 3).reshape(n * c, n * c)
    assert torch.equal(mat, mat.T)
    eig = torch.linalg.eigvalsh(mat)
    assert eig.min() >= -1e-10 * eig.abs().max()


# -- the stale-parameter trap: parameters read live -------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("how", ["in_place", "new_parameter", "optimizer_step"])
def test_kernel_follows_the_live_weights(method, how):
    case = CASES[0]
    model, x = case.build(0), case.inputs(3, 0)
    before = empirical_ntk(model, x, method=method)
    if how == "in_place":
        with torch.no_grad():
            model.layers[0].weight.mul_(1.5)
    elif how == "new_parameter":
        model.layers[0].weight = nn.Parameter(2.0 * model.layers[0].weight.detach())
    else:
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        model(x).pow(2).sum().backward()
        opt.step()
    after = empirical_ntk(model, x, method=method)
    assert (after - before).norm() > 1e-3 * before.norm()
    assert_close_rel(after, reference_ntk(model, x, None, list(select_parameters(model))), TOL)


def test_propulsion_kernel_follows_z_after_training_step():
    model = WRAPPED[1].build(0)  # Propulsion MLP, k = 2
    x = WRAPPED[1].inputs(3, 0)
    before = empirical_ntk(model, x, params="propulsion")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "propulsion_z" in name:
                p.add_(0.05)
    after = empirical_ntk(model, x, params="propulsion")
    assert (after - before).norm() > 1e-3 * before.norm()


# -- tiling -------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("symmetric", [True, False], ids=["x2_none", "x2_given"])
@pytest.mark.parametrize("tiling", [{"batch_size": 1}, {"batch_size": 2},
                                    {"memory_budget": 2e8}], ids=["bs1", "bs2", "budget"])
@pytest.mark.parametrize("case", CASES[:2], ids=[c.id for c in CASES[:2]])
def test_tiling_gives_the_same_kernel(case, method, symmetric, tiling):
    model = case.build(0)
    x1 = case.inputs(5, 0)
    x2 = None if symmetric else case.inputs(3, 1)
    whole = empirical_ntk(model, x1, x2, params="all", method=method, memory_budget=1e12)
    tiled = empirical_ntk(model, x1, x2, params="all", method=method, **tiling)
    assert_close_rel(tiled, whole, TOL)


def test_small_budget_splits_examples_and_parameters():
    from ntk._memory import Profile, plan

    prof = Profile(numels={"a": 1000, "b": 1000, "c": 10}, n_out=2, activation=1e3, flops=1e4,
                   model_bytes=8)
    roomy = plan("jacobian", prof, 64, 64, True, "full", False, 8, 1e12, None)
    assert roomy.tile == 64 and len(roomy.groups) == 1
    for method in ("jacobian", "ntk_vp"):
        roomy = plan(method, prof, 64, 64, True, "full", False, 8, 1e12, None)
        tight = plan(method, prof, 64, 64, True, "full", False, 8, roomy.peak_bytes / 4, None)
        assert tight.tile < roomy.tile or len(tight.groups) > len(roomy.groups)
        assert tight.peak_bytes <= tight.budget_bytes


@pytest.mark.parametrize("method", METHODS)
def test_parameter_groups_give_the_same_kernel(method, monkeypatch):
    import ntk._memory as memory

    case = CASES[0]
    model, x = case.build(0), case.inputs(4, 0)
    whole = empirical_ntk(model, x, params="all", method=method, per_layer=True)
    real_plan = memory.plan

    def one_tensor_per_group(*args, **kwargs):
        p = real_plan(*args, **kwargs)
        names = [n for g in p.groups for n in g]
        return memory.Plan(p.method, 2, [[n] for n in names], p.peak_bytes, p.budget_bytes,
                           p.flops)

    monkeypatch.setattr("ntk.empirical.plan", one_tensor_per_group)
    grouped = empirical_ntk(model, x, params="all", method=method, per_layer=True)
    for name in whole:
        assert_close_rel(grouped[name], whole[name], TOL)


# -- modes and flags ----------------------------------------------------------------------------


class DropoutMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 6)
        self.drop = nn.Dropout(0.5)
        self.head = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(torch.tanh(self.fc(x))))


@pytest.mark.parametrize("method", METHODS)
def test_eval_mode_during_call_and_caller_modes_restored(method):
    torch.manual_seed(0)
    model = DropoutMLP().double()
    x = _x(4, 4)
    model.eval()
    k_eval = empirical_ntk(model, x, method=method)
    model.train()
    model.fc.eval()  # a mixed state, restored per submodule
    modes = {name: m.training for name, m in model.named_modules()}
    k_train = empirical_ntk(model, x, method=method)
    assert torch.equal(k_train, k_eval)  # dropout was off
    assert {name: m.training for name, m in model.named_modules()} == modes


@pytest.mark.parametrize("flag", [True, False])
def test_tf32_flags_restored(flag):
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        torch.backends.cuda.matmul.allow_tf32 = flag
        torch.backends.cudnn.allow_tf32 = flag
        empirical_ntk(_linear(), _x(2, 4))
        assert torch.backends.cuda.matmul.allow_tf32 is flag
        assert torch.backends.cudnn.allow_tf32 is flag
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_requires_grad_flags_untouched():
    model = WRAPPED[0].build(0)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    empirical_ntk(model, WRAPPED[0].inputs(2, 0), params="all")
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


@pytest.mark.parametrize("method", METHODS)
def test_no_autograd_graph_through_the_model(method):
    # params selects one tensor; the others require grad. Without no_grad, ordinary autograd
    # would record the Jacobians' graph through them and pin every slice (found on MiniLM: 4x
    # the memory, 5x the time).
    case = CASES[0]
    model, x = case.build(0), case.inputs(3, 0)
    k = empirical_ntk(model, x, params=["classifier.weight"], method=method)
    assert not k.requires_grad and k.grad_fn is None


def test_float32_model_accumulates_in_float64():
    case = CASES[0]
    model = case.build(0)
    x = case.inputs(3, 0)
    k64 = empirical_ntk(model, x, params="all")
    k32 = empirical_ntk(model.float(), x.float(), params="all")
    assert k32.dtype == torch.float64
    assert_close_rel(k32, k64, RTOL[torch.float32])
    assert empirical_ntk(model, x.float(), dtype=torch.float32).dtype == torch.float32


# -- hypothesis: any shape, N = 1 and C = 1 included ---------------------------------------------


@settings(max_examples=12, deadline=None)
@given(
    n1=st.integers(1, 4), n2=st.integers(1, 3), d_in=st.integers(1, 4), c=st.integers(1, 3),
    hidden=st.integers(1, 5), symmetric=st.booleans(), method=st.sampled_from(METHODS),
    output=st.sampled_from(["full", "trace", "diagonal", "sum_logits"]),
    tile=st.sampled_from([None, 1, 2]),
)
def test_any_shape_matches_reference(n1, n2, d_in, c, hidden, symmetric, method, output, tile):
    torch.manual_seed(n1 + 10 * d_in + 100 * c)
    model = MLP(d_in=d_in, hidden=hidden, n_out=c, depth=1).double().eval()
    x1 = _x(n1, d_in, 1)
    x2 = None if symmetric else _x(n2, d_in, 2)
    got = empirical_ntk(model, x1, x2, params="all", method=method, output=output,
                        batch_size=tile)
    expected = reference_ntk(model, x1, x2, list(select_parameters(model, "all")), output)
    assert got.shape == expected.shape
    assert_close_rel(got, expected, TOL)
