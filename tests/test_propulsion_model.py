"""Wrapping, merging, unloading and every bad input, over the zoo's tiny float64 models.

Identities 1 and 2 of docs/theory/kernels.md ("Identities the tests assert"): a wrapped model
at z = 1 gives the unwrapped outputs; merging with random z keeps the outputs.
"""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch
from conftest import RTOL, assert_close_rel
from model_state import assert_unchanged, run, snapshot
from torch import nn
from zoo import CASES

from propulsion import (
    PropulsionConfig,
    PropulsionConfigError,
    PropulsionError,
    PropulsionLayer,
    PropulsionLinear,
    TargetError,
    adapter_state,
    get_propulsion_model,
    is_propulsion_model,
    merge_adapter,
    merge_and_unload,
    propulsion_config,
    propulsion_layers,
    unload,
    unmerge_adapter,
)

MERGE_RTOL = 1e-12  # float64: one extra rounding per folded entry
CASE = {c.id: c for c in CASES}


def mixed_flags(model: nn.Module) -> None:
    """A non-trivial requires_grad pattern, so that "restored" means something."""
    for i, param in enumerate(model.parameters()):
        param.requires_grad_(i % 3 != 1)


def perturb_trainable(model: nn.Module, seed: int) -> None:
    """z uniform in [0.9, 1.1); every other trainable tensor (biases, head) moved by noise."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            noise = torch.rand(param.shape, generator=gen, dtype=torch.float64)
            if name.endswith("propulsion_z"):
                param.copy_(0.9 + 0.2 * noise)
            else:
                param.add_(0.1 * (noise - 0.5))


def paths_of(model: nn.Module, *kinds: type[nn.Module]) -> set[str]:
    return {n for n, m in model.named_modules() if type(m) in kinds}


# -- case table: zoo model x degree x what is wrapped ------------------------------------------

VARIANTS = {
    "linear": {},
    "embeddings": {"include_embeddings": True},
    "layernorm": {"include_layernorm": True},
    "embeddings+layernorm": {"include_embeddings": True, "include_layernorm": True},
}


def _rows(variants_for_transformer: list[str], base_variants: list[str]):
    rows = []
    for case in CASES:
        names = variants_for_transformer if case.id == "transformer" else base_variants
        for degree in (1, 2, 3):
            for name in names:
                rows.append(pytest.param(case, degree, name, id=f"{case.id}-k{degree}-{name}"))
    return rows


IDENTITY_ROWS = _rows(list(VARIANTS), ["linear"])


@pytest.mark.parametrize(("case", "degree", "variant"), IDENTITY_ROWS)
def test_wrapped_at_z1_equals_unwrapped(case, degree, variant):
    model = case.build(0)
    x = case.inputs(4, 0)
    expected = run(model, x)
    kinds = [nn.Linear]
    kinds += [nn.Embedding] if VARIANTS[variant].get("include_embeddings") else []
    kinds += [nn.LayerNorm] if VARIANTS[variant].get("include_layernorm") else []
    targets = paths_of(model, *kinds)

    out = get_propulsion_model(model, PropulsionConfig(degree=degree, **VARIANTS[variant]))
    assert out is model
    assert set(propulsion_layers(model)) == targets
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{t}.propulsion_z" for t in targets}
    assert torch.equal(run(model, x), expected)


MERGE_VARIANTS = {
    **VARIANTS,
    "train_bias": {"train_bias": True},
    "head": {"modules_to_save": ("classifier",)},
    "reference": dataclasses.asdict(PropulsionConfig.reference()),
}
MERGE_ROWS = [
    pytest.param(case, degree, variant, seed, id=f"{case.id}-k{degree}-{variant}-s{seed}")
    for case in CASES
    for degree in (1, 3)
    for variant in (list(MERGE_VARIANTS) if case.id == "transformer"
                    else ["linear", "train_bias", "head"])
    for seed in (0, 1)
]


def _config(degree: int, variant: str) -> PropulsionConfig:
    return PropulsionConfig(**{**MERGE_VARIANTS[variant], "degree": degree})


@pytest.mark.parametrize(("case", "degree", "variant", "seed"), MERGE_ROWS)
def test_merge_and_unload_keeps_outputs_and_returns_plain_modules(case, degree, variant, seed):
    model = case.build(seed)
    x = case.inputs(4, seed)
    mixed_flags(model)
    before = snapshot(model)
    get_propulsion_model(model, _config(degree, variant))
    perturb_trainable(model, seed)
    expected = run(model, x)
    assert not torch.allclose(expected, run(case.build(seed), x))  # the adapter changes them

    plain = merge_and_unload(model)
    assert plain is model
    assert not is_propulsion_model(model)
    assert not any(isinstance(m, PropulsionLayer) for m in model.modules())
    assert [(n, type(m)) for n, m in model.named_modules(remove_duplicate=False)] == before["modules"]
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before["flags"]
    assert model.state_dict().keys() == before["state"].keys()
    assert_close_rel(run(model, x), expected, MERGE_RTOL)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_merge_adapter_then_unmerge_round_trips(case):
    model = case.build(3)
    x = case.inputs(4, 3)
    base_state = {n: t.clone() for n, t in model.state_dict().items()}
    config = PropulsionConfig(degree=3, include_embeddings=True, include_layernorm=True)
    get_propulsion_model(model, config)
    perturb_trainable(model, 3)
    expected = run(model, x)

    merge_adapter(model)
    assert all(layer.merged for layer in propulsion_layers(model).values())
    assert_close_rel(run(model, x), expected, MERGE_RTOL)
    for path, layer in propulsion_layers(model).items():  # z**k really is in the weights
        folded = layer.base_layer.weight
        original = base_state[f"{path}.weight"]
        scale = layer.scale(torch.float64)
        shape = (1, -1) if isinstance(layer.base_layer, nn.Embedding) else (-1,) + (1,) * (
            original.dim() - 1)
        assert_close_rel(folded, original * scale.reshape(shape), MERGE_RTOL)

    unmerge_adapter(model)
    assert not any(layer.merged for layer in propulsion_layers(model).values())
    assert_close_rel(run(model, x), expected, MERGE_RTOL)
    unload(model)
    for name, tensor in model.state_dict().items():  # divided back: equal up to rounding
        assert_close_rel(tensor, base_state[name], 1e-14)


def test_unmerge_and_unload_refuse_weights_lost_in_a_half_precision_merge_before_any_change():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).half()
    get_propulsion_model(model, PropulsionConfig(degree=3, target_modules=["0", "2"]))
    with torch.no_grad():
        propulsion_layers(model)["2"].propulsion_z[0] = 1e-3  # z**3 = 1e-9: row 0 (4 + 1 entries) is lost
    merge_adapter(model)
    merged = {k: v.clone() for k, v in model.state_dict().items()}
    for action in (unmerge_adapter, unload):
        with pytest.raises(PropulsionError, match=r"merged layer '2'.*rounded 5 non-zero base entries"):
            action(model)
        assert all(layer.merged for layer in propulsion_layers(model).values())  # layer "0" too
        assert all(torch.equal(v, merged[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_unload_returns_untouched_base(case):
    model = case.build(4)
    x = case.inputs(3, 4)
    expected = run(model, x)
    mixed_flags(model)
    before = snapshot(model)
    get_propulsion_model(model, PropulsionConfig(degree=2, train_bias=False))
    perturb_trainable(model, 4)
    assert not torch.equal(run(model, x), expected)
    assert unload(model) is model
    assert_unchanged(model, before)  # bitwise: weights never touched
    assert torch.equal(run(model, x), expected)


def test_unload_keeps_trained_head():
    case = CASE["mlp"]
    model = case.build(0)
    get_propulsion_model(model, PropulsionConfig(modules_to_save=("classifier",)))
    with torch.no_grad():
        model.classifier.weight.add_(1.0)
    trained = model.classifier.weight.detach().clone()
    unload(model)
    assert torch.equal(model.classifier.weight, trained)


def test_unload_of_merged_model_unmerges_first():
    case = CASE["transformer"]
    model = case.build(5)
    x = case.inputs(3, 5)
    expected = run(model, x)
    get_propulsion_model(model, PropulsionConfig(degree=2, include_embeddings=True))
    perturb_trainable(model, 5)
    merge_adapter(model)
    unload(model)
    assert_close_rel(run(model, x), expected, MERGE_RTOL)


# -- bf16: z stays float32, merge agrees to bf16 tolerance -------------------------------------

@pytest.mark.parametrize("source", [torch.float64, torch.float32], ids=["from-f64", "from-f32"])
def test_bf16_model_keeps_float32_z_and_merges(source):
    case = CASE["transformer"]
    model = case.build(6).to(source)
    x = case.inputs(4, 6)
    get_propulsion_model(model, PropulsionConfig(degree=3, include_embeddings=True))
    model.to(torch.bfloat16)
    layers = propulsion_layers(model)
    assert {layer.propulsion_z.dtype for layer in layers.values()} == {torch.float32}
    assert {layer.base_layer.weight.dtype for layer in layers.values()} == {torch.bfloat16}

    z = model.query.propulsion_z
    with torch.no_grad():
        z.fill_(1.0).mul_(1 + 1e-3)
    assert torch.tensor(1 + 1e-3, dtype=torch.bfloat16).item() == 1.0  # why z is not bf16
    assert bool((z != 1.0).all())

    perturb_trainable(model, 6)
    out = run(model, x)
    assert out.dtype == torch.bfloat16
    out.float().square().sum().backward()
    assert z.grad is not None and z.grad.dtype == torch.float32 and bool(z.grad.abs().sum() > 0)

    with torch.no_grad():
        merge_adapter(model)
        merged = run(model, x)
        assert_close_rel(merged, out, RTOL[torch.bfloat16])
        unmerge_adapter(model)
        assert_close_rel(run(model, x), out, RTOL[torch.bfloat16])
        plain = merge_and_unload(model)
        assert {p.dtype for p in plain.parameters()} == {torch.bfloat16}
        assert_close_rel(run(plain, x), out, RTOL[torch.bfloat16])


# -- which modules are wrapped and trained -----------------------------------------------------

def _trainable(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


SELECTION_ROWS = [
    pytest.param("mlp", {}, {"layers.0", "layers.1", "classifier"}, set(), id="default-all-linear"),
    pytest.param("mlp", {"target_modules": ["0"]}, {"layers.0"}, set(), id="suffix-on-dot-boundary"),
    pytest.param("mlp", {"target_modules": r"layers\.\d+"}, {"layers.0", "layers.1"}, set(),
                 id="regex-fullmatch"),
    pytest.param("mlp", {"exclude_modules": ("classifier",)}, {"layers.0", "layers.1"}, set(),
                 id="exclude"),
    pytest.param("mlp", {"train_bias": True}, {"layers.0", "layers.1", "classifier"},
                 {"layers.0.base_layer.bias", "layers.1.base_layer.bias",
                  "classifier.base_layer.bias"}, id="train-bias"),
    pytest.param("mlp", {"modules_to_save": ("classifier",)}, {"layers.0", "layers.1"},
                 {"classifier.weight", "classifier.bias"}, id="head-in-full"),
    pytest.param("mlp", {"target_modules": [], "modules_to_save": ("classifier",)}, set(),
                 {"classifier.weight", "classifier.bias"}, id="head-only"),
    pytest.param("transformer", {"target_modules": ["query", "value"]}, {"query", "value"}, set(),
                 id="query-value"),
    pytest.param("transformer", {"target_modules": ["embed"], "include_embeddings": False},
                 {"embed"}, set(), id="explicit-embedding"),
    pytest.param("transformer", {"target_modules": ["ln1"]}, {"ln1"}, set(), id="explicit-ln"),
    pytest.param("transformer", {"include_embeddings": True, "target_modules": ["query"]},
                 {"query", "embed", "pos"}, set(), id="embeddings-plus-list"),
    pytest.param("unknown_module", {}, {"fc", "classifier"}, set(), id="unknown-type-untouched"),
]


@pytest.mark.parametrize(("case_id", "options", "wrapped", "extra"), SELECTION_ROWS)
def test_selection_of_wrapped_and_trainable(case_id, options, wrapped, extra):
    model = CASE[case_id].build(0)
    get_propulsion_model(model, PropulsionConfig(**options))
    assert set(propulsion_layers(model)) == wrapped
    assert _trainable(model) == {f"{w}.propulsion_z" for w in wrapped} | extra
    assert set(adapter_state(model)) == _trainable(model)


def test_reference_preset_matches_authors_defaults():
    cfg = PropulsionConfig.reference()
    assert (cfg.degree, cfg.target_modules, cfg.include_embeddings, cfg.train_bias) == (
        5, None, True, True)
    assert not cfg.include_layernorm and cfg.modules_to_save == ()
    model = CASE["transformer"].build(0)
    get_propulsion_model(model, cfg)
    assert propulsion_config(model) == cfg
    layers = propulsion_layers(model)
    assert set(layers) == paths_of(CASE["transformer"].build(0), nn.Linear, nn.Embedding)
    assert "ln1" not in layers and "ln2" not in layers  # LayerNorms untouched
    assert not model.classifier.base_layer.weight.requires_grad  # head weight frozen
    assert model.classifier.base_layer.bias.requires_grad  # wrapped biases trainable
    assert model.classifier.propulsion_z.requires_grad


def test_default_config_is_z_only_on_every_linear():
    cfg = PropulsionConfig()
    assert (cfg.degree, cfg.target_modules, cfg.include_embeddings, cfg.train_bias,
            cfg.init_value) == (5, None, False, False, 1.0)
    model = CASE["mlp"].build(0)
    get_propulsion_model(model)  # config None means the default
    assert propulsion_config(model) == cfg


def test_config_normalises_and_round_trips_through_dict():
    cfg = PropulsionConfig(degree=2, target_modules=["query", "value"], modules_to_save="classifier",
                           init_value=1)
    assert cfg.target_modules == ("query", "value")
    assert cfg.modules_to_save == ("classifier",)
    assert isinstance(cfg.init_value, float)
    assert PropulsionConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.replace(degree=4).degree == 4
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.degree = 3  # type: ignore[misc]


# -- bad input: configurations -----------------------------------------------------------------

CONFIG_ERRORS = [
    pytest.param({"degree": 0}, "degree must be an integer >= 1, got 0", id="degree-0"),
    pytest.param({"degree": -2}, "degree must be an integer >= 1, got -2", id="degree-negative"),
    pytest.param({"degree": 2.0}, "degree must be an integer >= 1, got 2.0", id="degree-float"),
    pytest.param({"degree": True}, "degree must be an integer >= 1, got True", id="degree-bool"),
    pytest.param({"degree": "3"}, "degree must be an integer >= 1, got '3'", id="degree-str"),
    pytest.param({"target_modules": "query("}, "not a valid regular expression", id="bad-regex"),
    pytest.param({"target_modules": ["query", ""]}, "list of non-empty names", id="empty-name"),
    pytest.param({"target_modules": [3]}, "list of non-empty names", id="non-str-target"),
    pytest.param({"modules_to_save": [""]}, "modules_to_save must be a list of non-empty",
                 id="empty-save"),
    pytest.param({"exclude_modules": [None]}, "exclude_modules must be a list of non-empty",
                 id="none-exclude"),
    pytest.param({"init_value": float("nan")}, "init_value must be a finite number", id="init-nan"),
    pytest.param({"init_value": float("inf")}, "init_value must be a finite number", id="init-inf"),
    pytest.param({"init_value": "1"}, "init_value must be a finite number", id="init-str"),
    pytest.param({"init_value": 0.0}, "init_value 0 makes every wrapped output zero", id="init-0"),
]


@pytest.mark.parametrize(("options", "match"), CONFIG_ERRORS)
def test_bad_config_raises(options, match):
    with pytest.raises(PropulsionConfigError, match=re.escape(match)):
        PropulsionConfig(**options)


def test_config_from_dict_rejects_unknown_fields():
    with pytest.raises(PropulsionConfigError, match=r"unknown PropulsionConfig fields \['rank'\]"):
        PropulsionConfig.from_dict({"degree": 2, "rank": 8})


def test_config_of_wrong_type_raises():
    model = CASE["mlp"].build(0)
    before = snapshot(model)
    with pytest.raises(TypeError, match="config must be a PropulsionConfig, got dict"):
        get_propulsion_model(model, {"degree": 2})  # type: ignore[arg-type]
    assert_unchanged(model, before)


# -- bad input: wrapping, and atomicity --------------------------------------------------------

class WithAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True)

    def forward(self, x):
        h = self.fc(x)
        return self.attn(h, h, h, need_weights=False)[0]


class WithWideNorm(nn.Module):
    """A Linear before a LayerNorm over two dimensions: the norm's wrapper refuses late."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.norm = nn.LayerNorm((2, 3))

    def forward(self, x):
        return self.norm(self.fc(x).reshape(-1, 2, 3))


def _build(model_id: str) -> nn.Module:
    local = {
        "attention": WithAttention,
        "wide_norm": WithWideNorm,
        "embedding_only": lambda: nn.Sequential(nn.Embedding(5, 3)),
    }
    if model_id in local:
        torch.manual_seed(0)
        return local[model_id]().double()
    return CASE[model_id].build(0)


WRAP_ERRORS = [
    pytest.param("mlp", {"target_modules": ["nope"]}, TargetError,
                 "target_modules entry 'nope' matches no module of the model", id="list-no-match"),
    pytest.param("mlp", {"target_modules": ["layers.0", "nope"]}, TargetError,
                 "target_modules entry 'nope' matches no module", id="second-entry-no-match"),
    pytest.param("mlp", {"target_modules": ["ers.0"]}, TargetError,
                 "target_modules entry 'ers.0' matches no module", id="suffix-not-on-boundary"),
    pytest.param("mlp", {"target_modules": r"encoder\..*"}, TargetError,
                 r"target_modules regex 'encoder\\..*' matches no module path", id="regex-no-match"),
    pytest.param("unknown_module", {"target_modules": ["act"]}, TargetError,
                 "target 'act' is a Swish; Propulsion wraps Linear, Embedding, LayerNorm only",
                 id="unsupported-type"),
    pytest.param("mlp", {"target_modules": ["layers"]}, TargetError,
                 "target 'layers' is a ModuleList", id="container-target"),
    pytest.param("mlp", {"target_modules": ".*"}, TargetError, "target 'layers' is a ModuleList",
                 id="regex-matching-container"),
    pytest.param("mlp", {"modules_to_save": ("head",)}, TargetError,
                 "modules_to_save entry 'head' matches no module", id="save-no-match"),
    pytest.param("mlp", {"exclude_modules": ("nope",)}, TargetError,
                 "exclude_modules entry 'nope' matches no module", id="exclude-no-match"),
    pytest.param("mlp", {"target_modules": []}, TargetError,
                 "the configuration would train nothing", id="empty-target-list"),
    pytest.param("mlp", {"target_modules": ["classifier"], "exclude_modules": ("classifier",)},
                 TargetError, "would train nothing", id="all-excluded"),
    pytest.param("mlp", {"target_modules": ["layers.0"], "exclude_modules": ("layers",)},
                 TargetError, "would train nothing", id="excluded-by-parent"),
    pytest.param("embedding_only", {}, TargetError, "would train nothing", id="no-linear-at-all"),
    pytest.param("attention", {"target_modules": ["attn.out_proj"]}, TargetError,
                 "belongs to an nn.MultiheadAttention", id="inside-multihead-attention"),
    pytest.param("wide_norm", {"include_layernorm": True}, PropulsionError,
                 "LayerNorm over the last dimension only", id="late-wrapper-failure"),
]


@pytest.mark.parametrize(("model_id", "options", "error", "match"), WRAP_ERRORS)
def test_bad_wrap_raises_and_leaves_model_unchanged(model_id, options, error, match):
    model = _build(model_id)
    mixed_flags(model)
    before = snapshot(model)
    with pytest.raises(error, match=match):
        get_propulsion_model(model, PropulsionConfig(**options))
    assert_unchanged(model, before)


def test_multihead_attention_projections_are_skipped_with_a_warning():
    model = _build("attention").eval()
    x = torch.randn(2, 3, 4, dtype=torch.float64)
    expected = model(x)
    with pytest.warns(UserWarning, match="skipping the projections inside nn.MultiheadAttention"):
        get_propulsion_model(model, PropulsionConfig(degree=2))
    assert set(propulsion_layers(model)) == {"fc"}
    assert_close_rel(model(x), expected, MERGE_RTOL)  # MHA may take another kernel path


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_wrapping_twice_raises(case):
    model = case.build(0)
    get_propulsion_model(model, PropulsionConfig(degree=2))
    before = snapshot(model)
    with pytest.raises(TargetError, match="already holds Propulsion layers; call unload"):
        get_propulsion_model(model, PropulsionConfig(degree=3))
    assert_unchanged(model, before)
    assert propulsion_config(model).degree == 2


def test_model_holding_a_hand_made_wrapper_is_refused():
    model = CASE["mlp"].build(0)
    model.classifier = PropulsionLinear(model.classifier, 2)
    with pytest.raises(TargetError, match="already holds Propulsion layers"):
        get_propulsion_model(model, PropulsionConfig())


UNWRAPPED_CALLS = [
    pytest.param(merge_adapter, "cannot merge: the model has no Propulsion layers", id="merge"),
    pytest.param(unmerge_adapter, "cannot unmerge: the model has no Propulsion layers",
                 id="unmerge"),
    pytest.param(merge_and_unload, "cannot merge and unload: the model has no Propulsion",
                 id="merge_and_unload"),
    pytest.param(unload, "cannot unload: the model has no Propulsion layers", id="unload"),
    pytest.param(propulsion_config, "cannot read the config", id="propulsion_config"),
    pytest.param(adapter_state, "cannot collect the adapter", id="adapter_state"),
]


@pytest.mark.parametrize(("call", "match"), UNWRAPPED_CALLS)
@pytest.mark.parametrize("history", ["never-wrapped", "after-unload"])
def test_calls_on_unwrapped_model_raise(call, match, history):
    model = CASE["mlp"].build(0)
    if history == "after-unload":
        get_propulsion_model(model, PropulsionConfig())
        unload(model)
    before = snapshot(model)
    with pytest.raises(PropulsionError, match=match):
        call(model)
    assert_unchanged(model, before)


def test_double_merge_and_unmerge_when_not_merged_raise():
    model = CASE["mlp"].build(0)
    get_propulsion_model(model, PropulsionConfig())
    with pytest.raises(PropulsionError, match="no Propulsion layer is merged; nothing to unmerge"):
        unmerge_adapter(model)
    merge_adapter(model)
    before = snapshot(model)
    with pytest.raises(PropulsionError, match="every Propulsion layer is already merged"):
        merge_adapter(model)
    assert_unchanged(model, before)


NON_FINITE = [
    pytest.param(float("nan"), 1, id="nan"),
    pytest.param(float("inf"), 1, id="inf"),
    pytest.param(1e70, 5, id="overflow-of-z-to-the-k"),
]


@pytest.mark.parametrize("call", [merge_adapter, merge_and_unload], ids=["merge", "merge_and_unload"])
@pytest.mark.parametrize(("value", "degree"), NON_FINITE)
def test_non_finite_z_at_merge_raises_before_touching_anything(call, value, degree):
    model = CASE["mlp"].build(0)
    get_propulsion_model(model, PropulsionConfig(degree=degree))
    with torch.no_grad():
        model.classifier.propulsion_z[0] = value  # the last layer: earlier ones must not merge
    before = snapshot(model)
    with pytest.raises(PropulsionError, match=r"cannot merge: 1 entries of z\*\*k are not finite"):
        call(model)
    assert_unchanged(model, before)


def test_failed_merge_on_non_affine_layernorm_leaves_model_as_it_was():
    """A LayerNorm without weights cannot absorb z**k; the failure must not half-merge."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(3, 4), nn.LayerNorm(4, elementwise_affine=False), nn.Linear(4, 2)
    ).double()
    plain = snapshot(model)
    try:
        get_propulsion_model(model, PropulsionConfig(degree=2, include_layernorm=True))
    except PropulsionError:  # refusing the LayerNorm at wrap time is a correct answer too
        assert_unchanged(model, plain)
        return
    perturb_trainable(model, 0)
    before = snapshot(model)
    for call in (merge_adapter, merge_and_unload):
        with pytest.raises(PropulsionError, match="elementwise affine"):
            call(model)
        assert_unchanged(model, before)
