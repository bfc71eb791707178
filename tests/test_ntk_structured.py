"""The structured engine (ntk.kernels) against an independent float64 reference.

The reference (:func:`ntk.reference_ntk`) is written without torch.func and without the
engine's code: a loop of ``torch.autograd.grad`` per example and output, flattened per
parameter tensor, dotted.
"""

from __future__ import annotations

import functools

import pytest
import torch
from conftest import RTOL, SENTENCES, assert_close_rel, load_minilm
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from zoo import CASE_IDS, CASES, MLP, TinyTransformer

from ntk import empirical_ntk
from ntk._handlers import StructuredError, linear_costs
from ntk._params import select_parameters
from ntk.kernels import kernels, structured_ntk
from ntk.reference import reference_ntk
from propulsion.config import PropulsionConfig
from propulsion.model import get_propulsion_model

TOL = RTOL[torch.float64]
OUTPUTS = ("full", "trace", "diagonal", "sum_logits")


# -- the independent reference ------------------------------------------------------------------


def reference(model, x1, x2=None, params="all", output="full", output_fn=None):
    """(total, {name: block}) of the empirical NTK by :func:`ntk.reference_ntk`."""
    blocks = reference_ntk(model, x1, x2, params=params, output=output, per_layer=True,
                           output_fn=output_fn)
    assert isinstance(blocks, dict)
    return sum(blocks.values()), blocks


@functools.cache
def _case(case_id: str):
    case = next(c for c in CASES if c.id == case_id)
    model = case.build(0)
    x1, x2 = case.inputs(5, 0), case.inputs(3, 1)
    refs = {(o, sym): reference(model, x1, None if sym else x2, output=o)
            for o in OUTPUTS for sym in (True, False)}
    return model, x1, x2, refs


def assert_blocks(got: dict, blocks: dict, total: torch.Tensor) -> None:
    """Per-layer blocks equal; a block that is zero in exact arithmetic (e.g. a key bias, which
    softmax ignores) is rounding noise in both, so it is compared at 1e-6 of the total's scale."""
    assert list(got) == list(blocks)
    floor = 1e-6 * float(total.norm())
    for k, want in blocks.items():
        err = float((got[k] - want).norm())
        assert err <= TOL * max(float(want.norm()), floor), (k, err, float(want.norm()))
    assert_close_rel(sum(got.values()), total, TOL)


# -- the case table -----------------------------------------------------------------------------


@pytest.mark.parametrize("output", OUTPUTS)
@pytest.mark.parametrize("strategy", ["auto", "ghost", "materialise"])
@pytest.mark.parametrize("case_id", CASE_IDS)
def test_case_table_total_and_per_layer(case_id, strategy, output):
    model, x1, x2, refs = _case(case_id)
    for sym in (True, False):
        total, blocks = refs[(output, sym)]
        x2_ = None if sym else x2
        got = structured_ntk(model, x1, x2_, params="all", output=output, strategy=strategy)
        assert_close_rel(got, total, TOL)
        per = structured_ntk(model, x1, x2_, params="all", output=output, strategy=strategy,
                             per_layer=True)
        assert_blocks(per, blocks, total)


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_tiling_and_explicit_x2_agree(case_id):
    model, x1, _, refs = _case(case_id)
    total = refs[("full", True)][0]
    for bs in (1, 2):
        assert_close_rel(structured_ntk(model, x1, params="all", batch_size=bs), total, TOL)
    assert_close_rel(structured_ntk(model, x1, x1, params="all", batch_size=2), total, TOL)


def test_forced_strategies_agree_per_layer():
    model = TinyTransformer().double().eval()
    x = CASES[1].inputs(6, 3)
    ghost = structured_ntk(model, x, params="all", strategy="ghost", per_layer=True)
    mat = structured_ntk(model, x, params="all", strategy="materialise", per_layer=True)
    assert_blocks(ghost, mat, sum(mat.values()))


def test_cost_rule_prefers_ghost_short_and_materialise_long():
    short = linear_costs(64, 64, 1, 1, 512, 512, 10, "full")
    long = linear_costs(64, 64, 512, 512, 64, 64, 2, "full")
    assert short["ghost"] < short["materialise"]
    assert long["materialise"] < long["ghost"]


def test_cost_rule_symmetry_and_kept_rows():
    base = linear_costs(8, 8, 16, 16, 32, 32, 2, "trace")
    same = linear_costs(8, 8, 16, 16, 32, 32, 2, "trace", same=True)
    packed = linear_costs(8, 8, 16, 16, 32, 32, 2, "trace", rows=(64, 64))
    assert same["ghost"] == pytest.approx(base["ghost"] / 2)
    assert same["materialise"] < base["materialise"]
    assert packed["ghost"] == pytest.approx(base["ghost"] / 4)
    assert packed["materialise"] == base["materialise"]


# -- fast paths: one tile used twice, dropped tokens, shared bias Gram --------------------------


def _explicit_copy(x):
    return {k: v.clone() for k, v in x.items()} if isinstance(x, dict) else x.clone()


@pytest.mark.parametrize("output", OUTPUTS)
@pytest.mark.parametrize("strategy", ["auto", "ghost", "materialise"])
@pytest.mark.parametrize("case_id", ["mlp", "transformer"])
def test_symmetric_tile_path_equals_explicit_x2_and_reference(monkeypatch, case_id, strategy,
                                                              output):
    """x2=None takes the one-tile path (row chunks against the columns from their own start,
    mirrored); with SYM_BLOCK = 1 every chunk is one row, so the mirroring is exercised. It must
    equal x2 = a copy of x1 (the two-tile path, no symmetry used) and the reference."""
    import ntk._handlers.base as base

    monkeypatch.setattr(base, "SYM_BLOCK", 1)
    case = next(c for c in CASES if c.id == case_id)
    model = case.build(0)
    x = case.inputs(6, 4)
    total, blocks = reference(model, x, output=output)
    sym = structured_ntk(model, x, params="all", output=output, strategy=strategy,
                         per_layer=True)
    two = structured_ntk(model, x, _explicit_copy(x), params="all", output=output,
                         strategy=strategy, per_layer=True)
    assert_blocks(sym, blocks, total)
    assert_blocks(two, blocks, total)


def test_pack_drops_tokens_without_back_signal_exactly():
    from ntk._handlers.linear import _pack, _padded, _per_example

    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 6, 4, dtype=torch.float64, generator=g)
    grad = torch.randn(2, 3, 6, 5, dtype=torch.float64, generator=g)
    live = torch.tensor([[1, 0, 1, 0, 0, 0], [0, 0, 0, 0, 0, 1], [1, 1, 1, 0, 1, 0]]).bool()
    grad = grad * live[None, :, :, None]
    grad[1, 0, 1, 2] = 1.5  # non-zero for one output only: kept
    f = _pack(x, grad)
    assert f.x.shape[0] == int(live.sum()) + 1 and f.t == 4 and not f.dense
    xp, gp = _padded(f)
    want = torch.einsum("cntj,nti->ncji", grad, x).reshape(3, 2, -1)
    assert_close_rel(_per_example(xp, gp), want, TOL)


def test_padding_tokens_are_dropped_in_a_masked_transformer():
    import ntk._structured as engine
    from ntk._handlers import LinearHandler

    model = TinyTransformer().double().eval()
    x = CASES[1].inputs(4, 0)
    assignments = engine.assign(model, [n for n, _ in model.named_parameters()])
    fn = lambda out: out  # noqa: E731
    calls, _ = engine.capture(model, assignments, x, 4, fn, False)
    up = next(a for a in assignments if a.module is model.up)
    f = LinearHandler().prepare(model.up, calls, 4, ("weight", "bias"), torch.float64)
    assert f.x.shape[0] == int(x["attention_mask"].sum()) < 4 * x["input_ids"].shape[1]
    assert up.handler is not None


@pytest.mark.parametrize("sparse_cost", [0.0, 1.0, 1e9])
@pytest.mark.parametrize("output", ["full", "trace"])
def test_embedding_dense_and_sparse_ids_agree_with_reference(monkeypatch, sparse_cost, output):
    """SPARSE_COST 0: every id by equal-id pairs; 1e9: every id dense; 1: a mix."""
    import ntk._handlers.embedding as embedding

    monkeypatch.setattr(embedding, "SPARSE_COST", sparse_cost)
    model = TinyTransformer().double().eval()
    x1, x2 = CASES[1].inputs(6, 0), CASES[1].inputs(4, 1)
    names = ["embed.weight", "pos.weight"]
    for other in (None, x2):
        total, blocks = reference(model, x1, other, params=names, output=output)
        got = structured_ntk(model, x1, other, params=names, output=output, per_layer=True)
        assert_blocks(got, blocks, total)


# -- Propulsion, LoRA ---------------------------------------------------------------------------


def _propulsion_transformer(k: int, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = TinyTransformer().double().eval()
    cfg = PropulsionConfig(degree=k, include_embeddings=True, include_layernorm=True)
    model = get_propulsion_model(model, cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "propulsion_z" in name:
                p.copy_(torch.empty_like(p).uniform_(0.5, 1.5))
    return model.eval()


@pytest.mark.parametrize("k", [1, 2, 3])
def test_propulsion_random_z(k):
    model = _propulsion_transformer(k)
    x1, x2 = CASES[1].inputs(4, 0), CASES[1].inputs(3, 2)
    for params in ("propulsion", "all"):
        total, blocks = reference(model, x1, x2, params=params)
        got = structured_ntk(model, x1, x2, params=params, per_layer=True)
        assert_blocks(got, blocks, total)


def test_propulsion_at_one_is_k_squared_times_degree_one():
    x = CASES[1].inputs(4, 0)
    kernels_k = {}
    for k in (1, 3):
        torch.manual_seed(0)
        model = get_propulsion_model(TinyTransformer().double().eval(), PropulsionConfig(degree=k))
        kernels_k[k] = structured_ntk(model.eval(), x, params="propulsion")
    assert_close_rel(kernels_k[3], 9 * kernels_k[1], TOL)


def _lora_mlp():
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = TinyTransformer().double()
    cfg = LoraConfig(r=3, lora_alpha=6, target_modules=["query", "value", "up"], lora_dropout=0.1)
    model = get_peft_model(base, cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    return model.eval()


def test_lora_random_b():
    model = _lora_mlp()
    x1, x2 = CASES[1].inputs(4, 0), CASES[1].inputs(3, 2)
    for params in ("lora", "all"):
        for output in ("full", "trace"):
            total, blocks = reference(model, x1, x2, params=params, output=output)
            got = structured_ntk(model, x1, x2, params=params, output=output, per_layer=True)
            assert_blocks(got, blocks, total)


def test_lora_zero_b_gives_zero_a_block():
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(TinyTransformer().double(), LoraConfig(r=2, target_modules=["query"]))
    got = structured_ntk(model.eval(), CASES[1].inputs(3, 0), params="lora", per_layer=True)
    a = [v for k, v in got.items() if "lora_A" in k]
    assert a and all(float(v.abs().max()) == 0.0 for v in a)


# -- one pass, many kernels ---------------------------------------------------------------------


def test_kernels_many_sets_equal_separate_calls():
    model = _propulsion_transformer(2)
    x = CASES[1].inputs(5, 0)
    sets = {"full": "all", "propulsion": "propulsion", "bias": "bias"}
    together = kernels(model, x, params=sets, output="diagonal")
    assert set(together) == set(sets)
    for name, sel in sets.items():
        alone = structured_ntk(model, x, params=sel, output="diagonal")
        assert_close_rel(together[name], alone, TOL)
    per = kernels(model, x, params=sets, per_layer=True)
    for name, sel in sets.items():
        assert list(per[name]) == list(select_parameters(model, sel))


def test_agrees_with_reference_engine_jacobian():
    empirical = pytest.importorskip("ntk.empirical")
    model, x1, x2, _ = _case("transformer")
    for output in OUTPUTS:
        want = empirical.empirical_ntk(model, x1, x2, params="all", output=output,
                                       method="jacobian")
        assert_close_rel(structured_ntk(model, x1, x2, params="all", output=output), want, TOL)


# -- shapes, identities, modes, errors ----------------------------------------------------------


@settings(max_examples=8, deadline=None)
@given(n=st.integers(1, 3), t=st.integers(1, 3), c=st.integers(1, 2))
def test_shapes_small(n, t, c):
    torch.manual_seed(0)
    model = TinyTransformer(n_out=c).double().eval()
    g = torch.Generator().manual_seed(n * 10 + t)
    x = {"input_ids": torch.randint(0, 11, (n, t), generator=g),
         "attention_mask": torch.ones(n, t, dtype=torch.long)}
    got = structured_ntk(model, x, params="all")
    assert got.shape == (n, n, c, c)
    assert_close_rel(got, reference(model, x)[0], TOL)


def test_single_linear_layer_full_kernel():
    lin = nn.Linear(4, 3).double()
    x1 = torch.randn(5, 4, dtype=torch.float64)
    x2 = torch.randn(2, 4, dtype=torch.float64)
    got = structured_ntk(lin, x1, x2, params="all")
    want = (x1 @ x2.T + 1)[..., None, None] * torch.eye(3, dtype=torch.float64)
    assert_close_rel(got, want, TOL)


def test_mode_restored_and_symmetric_psd():
    model = MLP().double().train()
    x = torch.randn(6, 5, dtype=torch.float64)
    k = structured_ntk(model, x, params="all", output="trace")
    assert model.training
    assert_close_rel(k, k.T, TOL)
    assert float(torch.linalg.eigvalsh(k).min()) > -1e-10 * float(k.norm())


def test_tied_weights_across_layers_raise():
    model = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 3)).double()
    model[2].weight = model[0].weight
    with pytest.raises(StructuredError, match="owned by"):
        structured_ntk(model, torch.randn(2, 3, dtype=torch.float64), params="all")


def test_bad_strategy_and_output():
    model = MLP().double()
    x = torch.randn(2, 5, dtype=torch.float64)
    with pytest.raises(ValueError, match="strategy"):
        structured_ntk(model, x, strategy="fast")
    with pytest.raises(ValueError, match="output"):
        structured_ntk(model, x, output="logits")


# -- MiniLM -------------------------------------------------------------------------------------


def test_minilm_few_sentences_float64(minilm_path, minilm_tokenizer):
    model = load_minilm(minilm_path)
    batch = minilm_tokenizer(SENTENCES[:3], padding=True, return_tensors="pt")
    x = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    total, blocks = reference(model, x, params="all", output="full")
    got = structured_ntk(model, x, params="all", per_layer=True)
    assert_blocks(got, blocks, total)


class _ReadsWeightDirectly(nn.Module):
    """``lin`` is never called: its weight is read by the parent (like nn.MultiheadAttention)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.out = nn.Linear(2, 2)

    def forward(self, x):
        return self.out(torch.tanh(x @ self.lin.weight.T + self.lin.bias))


def test_parameters_of_an_uncalled_module_are_refused_not_zeroed():
    torch.manual_seed(0)
    net = _ReadsWeightDirectly().double()
    x = torch.randn(4, 3, dtype=torch.float64)
    with pytest.raises(StructuredError, match="never called"):
        empirical_ntk(net, x, params="all", method="structured")
    reference = empirical_ntk(net, x, params="all", method="jacobian")
    assert_close_rel(empirical_ntk(net, x, params="all", method="auto"), reference, RTOL[torch.float64])


def test_peft_ia3_vectors_in_a_parameter_dict_get_their_kernel():
    """peft keeps IA3's vectors in an nn.ParameterDict that is never called: the engine must
    attribute them to the IA3 layer (it once returned an all-zero kernel here)."""
    from transformers import BertConfig, BertForSequenceClassification

    from experiments.training.methods import prepare

    torch.manual_seed(0)
    config = BertConfig(vocab_size=40, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=16, max_position_embeddings=16, num_labels=2)
    model = prepare(BertForSequenceClassification(config).double().eval(), "ia3", head="frozen")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ia3_l" in name:
                p.add_(0.3 * torch.randn_like(p))
    x = {"input_ids": torch.randint(0, 40, (3, 5)), "attention_mask": torch.ones(3, 5, dtype=torch.long)}
    for output in ("full", "trace"):
        reference = empirical_ntk(model, x, params="trainable", output=output, method="jacobian")
        structured = empirical_ntk(model, x, params="trainable", output=output, method="structured")
        assert reference.abs().max() > 0
        assert_close_rel(structured, reference, RTOL[torch.float64])
