"""Propulsion on shared modules and tied weights, unload after training, nested wrapping,
and merges that would overflow the weights' dtype.

Every refusal must come before any change (the model is left exactly as it was); every accepted
merge must keep the outputs (float64, 1e-12).
"""

from __future__ import annotations

import re

import pytest
import torch
from conftest import assert_close_rel
from model_state import assert_unchanged, run, snapshot
from torch import nn
from zoo import CASES

from propulsion import (
    PropulsionConfig,
    PropulsionConfigError,
    PropulsionError,
    PropulsionLinear,
    TargetError,
    adapter_state,
    get_propulsion_model,
    load_adapter,
    merge_adapter,
    merge_and_unload,
    propulsion_layers,
    save_adapter,
    unload,
    unmerge_adapter,
)

MERGE_RTOL = 1e-12
CASE = {c.id: c for c in CASES}


def perturb(model: nn.Module, seed: int) -> None:
    """z uniform in [0.8, 1.2); every other trainable tensor moved by noise."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad:
                noise = torch.rand(param.shape, generator=gen, dtype=torch.float64).to(param.dtype)
                if name.endswith("propulsion_z"):
                    param.copy_(0.8 + 0.4 * noise)
                else:
                    param.add_(0.5 * (noise - 0.5))


# -- models ------------------------------------------------------------------------------------

class TiedLM(nn.Module):
    """Embedding and LM head holding one (V, d) weight: ids (N, T) -> logits (N, T, V)."""

    def __init__(self, vocab: int = 13, d: int = 6):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.mix = nn.Linear(d, d)
        self.head = nn.Linear(d, vocab)
        self.head.weight = self.embed.weight  # tied, as transformers does it

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.mix(self.embed(ids))))


class SharedLinear(nn.Module):
    """One nn.Linear registered at two paths and applied twice: x (N, 5) -> (N, 5)."""

    def __init__(self, d: int = 5):
        super().__init__()
        self.first = nn.Linear(d, d)
        self.second = self.first

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(torch.tanh(self.first(x)))


class SharedBlock(nn.Module):
    """One block (with a Linear inside) registered twice in a ModuleList, plus a head."""

    def __init__(self, d: int = 5):
        super().__init__()
        block = nn.Sequential(nn.Linear(d, d), nn.Tanh())
        self.blocks = nn.ModuleList([block, block])
        self.classifier = nn.Linear(d, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.classifier(x)


def _build(factory, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return factory().double().eval()


def _ids(n: int = 3, t: int = 4, vocab: int = 13, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (n, t), generator=torch.Generator().manual_seed(seed))


def _x(n: int = 4, d: int = 5, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# -- a module registered at two paths: one wrapper at both, merges exact -----------------------

@pytest.mark.parametrize("factory", [SharedLinear, SharedBlock], ids=["linear", "block"])
@pytest.mark.parametrize("config", [PropulsionConfig(degree=3), PropulsionConfig.reference(3)],
                         ids=["z-only", "reference"])
def test_module_at_two_paths_is_wrapped_once_and_merges_exactly(factory, config):
    model = _build(factory)
    x = _x()
    get_propulsion_model(model, config)
    wrappers = [m for _, m in model.named_modules(remove_duplicate=False)
                if isinstance(m, PropulsionLinear)]
    distinct = {id(m) for m in wrappers}
    assert len(wrappers) == len(distinct) + 1  # the shared Linear: one wrapper, at two paths
    assert not any(isinstance(m.base_layer, PropulsionLinear) for m in wrappers)
    perturb(model, 1)
    expected = model(x)

    if factory is SharedLinear:  # the formula, written out: both calls are scaled
        layer = model.first
        assert model.second is layer and list(propulsion_layers(model)) == ["first"]
        lin, s = layer.base_layer, layer.scale(torch.float64)
        assert_close_rel(expected, lin(torch.tanh(lin(x) * s)) * s, MERGE_RTOL)

    merge_adapter(model)
    assert_close_rel(model(x), expected, MERGE_RTOL)
    unmerge_adapter(model)
    plain = merge_and_unload(model)
    assert not any(isinstance(m, PropulsionLinear) for m in plain.modules())
    assert_close_rel(plain(x), expected, MERGE_RTOL)
    if factory is SharedLinear:
        assert type(plain.first) is nn.Linear and plain.second is plain.first


@pytest.mark.parametrize("method", ["structured", "auto"])
def test_kernel_of_z_on_a_module_at_two_paths_equals_the_jacobian_kernel(method):
    """Both calls of the shared module are scaled by the one z, and the kernel sees both."""
    import ntk

    model = get_propulsion_model(_build(SharedLinear), PropulsionConfig(degree=3))
    perturb(model, 11)
    x = _x(5)
    reference = ntk.empirical_ntk(model, x, params="propulsion", method="jacobian")
    kernel = ntk.empirical_ntk(model, x, params="propulsion", method=method)
    assert_close_rel(kernel, reference, 1e-10)


@pytest.mark.parametrize("method", ["jacobian", "ntk_vp", "structured"])
def test_a_kernel_leaves_the_parameters_of_a_module_at_two_paths_in_place(method):
    """torch.func.functional_call swaps a module at two paths twice and restores it once; the
    engines put the model's own tensors back (a functorch wrapper was left as z)."""
    import ntk

    model = get_propulsion_model(_build(SharedLinear), PropulsionConfig(degree=3))
    before = dict(model.named_parameters())
    ntk.empirical_ntk(model, _x(5), params="propulsion", method=method)
    after = dict(model.named_parameters())
    assert after.keys() == before.keys()
    assert all(after[k] is v and isinstance(v, nn.Parameter) for k, v in before.items())


def test_module_at_two_paths_unloads_to_the_base_at_both_paths():
    model = _build(SharedLinear)
    x = _x()
    expected = model(x)
    base = model.first
    get_propulsion_model(model, PropulsionConfig(degree=2))
    perturb(model, 2)
    unload(model)
    assert model.first is base and model.second is base
    assert torch.equal(model(x), expected)


def test_module_at_two_paths_round_trips_through_an_adapter_file(tmp_path):
    model = get_propulsion_model(_build(SharedLinear), PropulsionConfig.reference(2))
    perturb(model, 3)
    assert list(adapter_state(model)) == ["first.propulsion_z", "first.base_layer.bias"]
    save_adapter(model, tmp_path)
    loaded = load_adapter(_build(SharedLinear), tmp_path)
    assert loaded.second is loaded.first
    assert torch.equal(loaded(_x()), model(_x()))


@pytest.mark.parametrize("option", ["exclude_modules", "modules_to_save"])
def test_leaving_out_one_path_of_a_shared_module_is_refused(option):
    model = _build(SharedLinear)
    before = snapshot(model)
    with pytest.raises(TargetError, match=r"module 'first' is also registered at 'second'.*"
                                          r"Select or leave out all of its paths"):
        get_propulsion_model(model, PropulsionConfig(degree=2, **{option: ("second",)}))
    assert_unchanged(model, before)


# -- a weight held by two modules (tied embedding and head): merge refused, nothing changed ----

TIED_CONFIGS = [
    pytest.param(PropulsionConfig.reference(), id="reference-both-wrapped"),
    pytest.param(PropulsionConfig(degree=3, target_modules=["mix"], include_embeddings=True),
                 id="only-the-embedding-wrapped"),
    pytest.param(PropulsionConfig(degree=3, target_modules=["head"]), id="only-the-head-wrapped"),
]


@pytest.mark.parametrize("call", [merge_adapter, merge_and_unload], ids=["merge", "merge_and_unload"])
@pytest.mark.parametrize("config", TIED_CONFIGS)
def test_merging_a_tied_weight_is_refused_before_any_change(config, call):
    model = get_propulsion_model(_build(TiedLM), config)
    perturb(model, 4)
    ids = _ids()
    expected = model(ids)
    before = snapshot(model)
    with pytest.raises(PropulsionError, match=r"is also held by .*tied or shared weights.*nothing "
                                              r"was merged"):
        call(model)
    assert_unchanged(model, before)
    assert torch.equal(model(ids), expected)


def test_tied_weight_untied_before_wrapping_merges_exactly():
    model = _build(TiedLM)
    model.head.weight = nn.Parameter(model.embed.weight.detach().clone())
    get_propulsion_model(model, PropulsionConfig.reference())
    perturb(model, 5)
    expected = model(_ids())
    assert_close_rel(merge_and_unload(model)(_ids()), expected, MERGE_RTOL)


def test_tied_weight_gets_one_z_per_module_and_exact_unmerged_outputs():
    model = _build(TiedLM)
    ids = _ids()
    get_propulsion_model(model, PropulsionConfig.reference(2))
    perturb(model, 6)
    emb, mix, head = model.embed, model.mix, model.head
    assert emb.base_layer.weight is head.base_layer.weight
    h = emb.base_layer(ids) * emb.scale()
    h = torch.tanh(mix.base_layer(h) * mix.scale())
    assert_close_rel(model(ids), head.base_layer(h) * head.scale(), MERGE_RTOL)


def test_weight_sharing_memory_under_another_parameter_is_refused():
    """Two Parameter objects viewing one storage are tied as well."""
    model = _build(TiedLM)
    model.head.weight = nn.Parameter(model.embed.weight.data)  # new object, same memory
    get_propulsion_model(model, PropulsionConfig.reference())
    before = snapshot(model)
    with pytest.raises(PropulsionError, match="tied or shared weights"):
        merge_and_unload(model)
    assert_unchanged(model, before)


def _tiny_causal_lm(kind: str, tie: bool) -> nn.Module:
    transformers = pytest.importorskip("transformers")
    if kind == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=29, n_positions=16, n_embd=8, n_layer=1,
                                      n_head=2, tie_word_embeddings=tie)
    else:
        cfg = transformers.LlamaConfig(vocab_size=29, hidden_size=8, intermediate_size=12,
                                       num_hidden_layers=1, num_attention_heads=2,
                                       num_key_value_heads=2, max_position_embeddings=16,
                                       tie_word_embeddings=tie)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).double().eval()
    assert (model.lm_head.weight is model.get_input_embeddings().weight) == tie
    return model


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_transformers_tied_lm_head_merge_is_refused_and_unload_restores(kind):
    model = _tiny_causal_lm(kind, tie=True)
    ids = _ids(2, 5, 29)
    base = model(ids).logits
    plain = snapshot(model)
    get_propulsion_model(model, PropulsionConfig.reference())
    assert torch.equal(model(ids).logits, base)  # z = 1: the wrapped model is the base model
    perturb(model, 7)
    wrapped = model(ids).logits
    before = snapshot(model)
    for call in (merge_adapter, merge_and_unload):
        with pytest.raises(PropulsionError, match=r"also held by \['lm_head\.base_layer\.weight'\] \(tied"):
            call(model)
        assert_unchanged(model, before)
    assert torch.equal(model(ids).logits, wrapped)
    unload(model)
    assert_unchanged(model, plain)  # biases trained by the reference preset are put back
    assert torch.equal(model(ids).logits, base)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_transformers_untied_lm_head_merges_exactly(kind):
    model = _tiny_causal_lm(kind, tie=False)
    ids = _ids(2, 5, 29)
    get_propulsion_model(model, PropulsionConfig.reference())
    perturb(model, 8)
    expected = model(ids).logits
    assert_close_rel(merge_and_unload(model)(ids).logits, expected, MERGE_RTOL)


# -- unload after training with train_bias=True gives back the base model ----------------------

@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
@pytest.mark.parametrize("merged", [False, True], ids=["unmerged", "merged"])
def test_unload_after_an_optimizer_step_with_trained_biases_restores_the_base(case, merged):
    model = case.build(0)
    x = case.inputs(4, 0)

    expected = run(model, x)
    plain = snapshot(model)
    get_propulsion_model(model, PropulsionConfig.reference(3))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    run(model, x).square().sum().backward()
    optimizer.step()
    biases = [p for n, p in model.named_parameters() if n.endswith("bias") and p.requires_grad]
    assert biases and not torch.equal(run(model, x), expected)
    if merged:
        merge_adapter(model)
    unload(model)
    if merged:  # unmerged by division: equal up to rounding, biases restored exactly
        for name, tensor in model.state_dict().items():
            assert_close_rel(tensor, plain["state"][name], 1e-14)
        assert_close_rel(run(model, x), expected, MERGE_RTOL)
    else:
        assert_unchanged(model, plain)
        assert torch.equal(run(model, x), expected)


def test_merge_and_unload_keeps_the_trained_biases():
    case = CASE["mlp"]
    model = get_propulsion_model(case.build(0), PropulsionConfig.reference(2))
    perturb(model, 9)
    expected = model(case.inputs(3, 0))
    assert_close_rel(merge_and_unload(model)(case.inputs(3, 0)), expected, MERGE_RTOL)


# -- wrapping inside a wrapped model: refused --------------------------------------------------

def test_wrapping_a_propulsion_layer_of_a_wrapped_model_is_refused():
    model = get_propulsion_model(CASE["mlp"].build(0), PropulsionConfig(degree=2))
    layer = model.layers[0]
    before = snapshot(model)
    with pytest.raises(TargetError, match=r"is itself a Propulsion layer.*two z on one layer"):
        get_propulsion_model(layer, PropulsionConfig(degree=3))
    assert_unchanged(model, before)
    merge_and_unload(model)


def test_wrapping_a_base_layer_reached_from_another_root_is_refused():
    model = get_propulsion_model(CASE["mlp"].build(0), PropulsionConfig(degree=2))
    other = nn.Sequential(model.layers[0].base_layer, nn.Tanh(), nn.Linear(7, 2).double())
    before = snapshot(other)
    with pytest.raises(TargetError, match=r"module '0' is already the base layer of a Propulsion "
                                          "wrapper in another model"):
        get_propulsion_model(other, PropulsionConfig(degree=3))
    assert_unchanged(other, before)
    unload(model)
    get_propulsion_model(other, PropulsionConfig(degree=3))  # once unloaded, it is free again


@pytest.mark.parametrize("call", [merge_adapter, merge_and_unload], ids=["merge", "merge_and_unload"])
def test_merge_of_a_hand_nested_wrapper_is_refused_before_any_change(call):
    model = get_propulsion_model(CASE["mlp"].build(0), PropulsionConfig(degree=2))
    perturb(model, 10)
    outer = model.layers[1]
    outer.base_layer = PropulsionLinear(outer.base_layer, 3)  # bypasses get_propulsion_model
    before = snapshot(model)
    with pytest.raises(PropulsionError, match="wraps another Propulsion layer"):
        call(model)
    assert_unchanged(model, before)
    unload(model)
    assert [type(m) for m in model.modules()] == [type(m) for m in CASE["mlp"].build(0).modules()]


# -- merges that overflow the weights' dtype ---------------------------------------------------

@pytest.mark.parametrize("call", [merge_adapter, merge_and_unload], ids=["merge", "merge_and_unload"])
def test_merge_that_overflows_float32_weights_is_refused_before_any_change(call):
    model = get_propulsion_model(CASE["mlp"].build(0).float(), PropulsionConfig(degree=3))
    with torch.no_grad():
        model.classifier.propulsion_z[1] = 1e20  # z**k = 1e60: finite in float64, not float32
    assert torch.isfinite(model.classifier.scale(torch.float64)).all()
    before = snapshot(model)
    with pytest.raises(PropulsionError, match=r"into a float32 tensor of shape \(3, 7\) gives \d+ "
                                              r"non-finite entries.*layer 'classifier'"):
        call(model)
    assert_unchanged(model, before)


# -- configuration values of the wrong type ----------------------------------------------------

BAD_TYPES = [
    ({"target_modules": 5}, "target_modules must be None, a regex string or a list of non-empty "
                            "names, got 5"),
    ({"target_modules": {"query": 1}}, "target_modules must be None"),
    ({"exclude_modules": 5}, "exclude_modules must be a list of non-empty names, got 5"),
    ({"modules_to_save": 3.0}, "modules_to_save must be a list of non-empty names, got 3.0"),
    ({"train_bias": "no"}, "train_bias must be True or False, got 'no'"),
    ({"include_embeddings": 1}, "include_embeddings must be True or False, got 1"),
    ({"include_layernorm": None}, "include_layernorm must be True or False, got None"),
]


@pytest.mark.parametrize(("options", "match"), BAD_TYPES, ids=lambda v: str(v)[:30])
def test_config_values_of_the_wrong_type_give_a_sentence(options, match):
    with pytest.raises(PropulsionConfigError, match=re.escape(match)) as info:
        PropulsionConfig(**options)
    assert isinstance(info.value, ValueError)
