"""The zoo of awkward architectures: every method gives the reference kernel, or a clear error.

Each model of :data:`zoo.ZOO` (in-place activations and residual ``+=``, a ResNet block,
weights read outside their module, module-level tying, Embedding subclasses, a (T, T) mask with
N == T, ``nn.MultiheadAttention``, ``nn.TransformerEncoderLayer``), transformers decoders from
tiny random configs and peft adapters is computed in float64 by every method and compared,
total and per layer, with :func:`ntk.reference_ntk` to 1e-10 relative. ``structured`` may
refuse (``StructuredError``) and ``ntk_vp`` may lack a forward-mode rule
(``NotImplementedError``); ``auto`` must always give the reference.
"""

from __future__ import annotations

import functools
import itertools
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from zoo import ZOO, InPlaceMLP, _dense_inputs, _ids, _seeded

from ntk import StructuredError, empirical_ntk, kernels, reference_ntk

TOL = 1e-10
ZOO_IDS = [c.id for c in ZOO]
OUTPUTS = ("full", "trace")


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm().clamp_min(1e-300))


def _assert_blocks(got: dict, want: dict) -> None:
    assert list(got) == list(want)
    scale = float(sum(want.values()).norm())
    for k, w in want.items():
        err = float((got[k] - w).norm())
        assert err <= TOL * max(float(w.norm()), 1e-6 * scale), (k, err, float(w.norm()))


@functools.cache
def _reference(case_id: str, output: str):
    case = next(c for c in ZOO if c.id == case_id)
    model = case.build(0)
    x = case.inputs(4, 0)
    return model, x, reference_ntk(model, x, params="all", output=output, per_layer=True)


def _kernel(model, x, method, output, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return empirical_ntk(model, x, params="all", output=output, method=method,
                             per_layer=True, **kw)


@pytest.mark.parametrize("output", OUTPUTS)
@pytest.mark.parametrize("method", ["auto", "structured", "jacobian", "ntk_vp"])
@pytest.mark.parametrize("case_id", ZOO_IDS)
def test_zoo_every_method_gives_the_reference_or_a_clear_error(case_id, method, output):
    model, x, want = _reference(case_id, output)
    try:
        got = _kernel(model, x, method, output)
    except StructuredError:
        assert method == "structured", "only the structured engine may refuse"
        return
    except NotImplementedError as err:
        assert method == "ntk_vp" and "forward AD" in str(err)
        return
    _assert_blocks(got, want)


@pytest.mark.parametrize("batch_size", [1, 2, 3, 4])
def test_square_mask_is_passed_whole_at_every_tile_size(batch_size):
    """N == T == 4: a (T, T) mask has the tile size on dimension 0 when batch_size is 4."""
    model, x, want = _reference("square_mask", "full")
    got = _kernel(model, x, "structured", "full", batch_size=batch_size)
    _assert_blocks(got, want)


def test_auto_warns_which_method_ran_and_why():
    model, x, want = _reference("multihead_attention", "full")
    with pytest.warns(UserWarning, match="computed the kernel with 'jacobian' because"):
        got = empirical_ntk(model, x, params="all", per_layer=True)
    _assert_blocks(got, want)


def test_weight_read_outside_its_module_is_refused_by_verification():
    """The hand-tied head reads the embedding weight directly: the structured blocks miss that
    share; the engine's check refuses instead of returning them, and ntk.kernels raises."""
    model, x, _ = _reference("functional_tied_head", "full")
    with pytest.raises(StructuredError, match="disagrees with whole per-example gradients"):
        kernels(model, x, params={"full": "all"})
    with pytest.raises(StructuredError, match=r"emb\.weight"):
        kernels(model, x, params={"emb": ["emb.weight"]}, per_layer=True)


def test_propulsion_on_in_place_mlp():
    from propulsion import PropulsionConfig, get_propulsion_model

    torch.manual_seed(0)
    model = get_propulsion_model(InPlaceMLP().double(), PropulsionConfig(degree=3)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "propulsion_z" in name:
                p.uniform_(0.5, 1.5)
    x = _dense_inputs(5)(5, 0)
    for params in ("propulsion", "all"):
        want = reference_ntk(model, x, params=params, per_layer=True)
        got = empirical_ntk(model, x, params=params, method="structured", per_layer=True)
        _assert_blocks(got, want)


# -- transformers decoders and peft adapters ----------------------------------------------------


def _decoder(kind: str) -> nn.Module:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    common = dict(vocab_size=16, num_attention_heads=2, pad_token_id=0, num_labels=2)
    if kind == "gpt2":
        cfg = transformers.GPT2Config(n_embd=8, n_layer=1, n_positions=8, **common)
        model = transformers.GPT2ForSequenceClassification(cfg)
    elif kind == "llama":
        cfg = transformers.LlamaConfig(hidden_size=8, intermediate_size=12, num_hidden_layers=1,
                                       num_key_value_heads=2, max_position_embeddings=8,
                                       **common)
        model = transformers.LlamaForSequenceClassification(cfg)
    else:
        cfg = transformers.GemmaConfig(hidden_size=8, intermediate_size=12, num_hidden_layers=1,
                                       num_key_value_heads=2, head_dim=4,
                                       max_position_embeddings=8, **common)
        model = transformers.GemmaForSequenceClassification(cfg)
    model.config._attn_implementation = "eager"
    return model.double().eval()


@pytest.mark.parametrize("kind", ["gpt2", "llama", "gemma"])
def test_decoders_from_tiny_random_configs(kind):
    model = _decoder(kind)
    ids = _ids(16, 4)(3, 0) % 15 + 1  # no padding token: the last token is read
    x = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    want = reference_ntk(model, x, params="all", output="trace")
    assert isinstance(want, torch.Tensor)
    for method in ("auto", "jacobian"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            got = empirical_ntk(model, x, params="all", output="trace", method=method)
        assert _rel(got, want) <= TOL, (method, _rel(got, want))


@pytest.mark.parametrize("adapter", ["lora", "ia3", "dora"])
def test_peft_adapters(adapter):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = InPlaceMLP().double()
    if adapter == "ia3":
        cfg = peft.IA3Config(target_modules=["fc1", "fc2"], feedforward_modules=["fc2"])
    else:
        cfg = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["fc1", "fc2"],
                              use_dora=adapter == "dora")
    model = peft.get_peft_model(base, cfg).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn_like(p))
    x = _dense_inputs(5)(4, 0)
    want = reference_ntk(model, x, params="trainable", per_layer=True)
    for method in ("auto", "jacobian"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            got = empirical_ntk(model, x, method=method, per_layer=True)
        _assert_blocks(got, want)


# -- random architectures -------------------------------------------------------------------------


class _Random(nn.Module):
    """Linear layers with, between them, a residual ``+=`` where the widths allow, then an
    activation that is in place or not."""

    def __init__(self, widths: list[int], inplace: list[bool], residual: list[bool]):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(widths))
        self.acts = nn.ModuleList(nn.ReLU(inplace=i) for i in inplace)
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer, act, res in zip(self.layers[:-1], self.acts, self.residual, strict=True):
            h = layer(x)
            if res and h.shape == x.shape:
                h += x  # before the activation, as torchvision does: ReLU saves its output
            x = act(h)
        return self.layers[-1](x)


@settings(max_examples=6, deadline=None)
@given(widths=st.lists(st.integers(1, 4), min_size=3, max_size=4),
       flags=st.lists(st.booleans(), min_size=6, max_size=6), n=st.integers(1, 3))
def test_random_architectures(widths, flags, n):
    depth = len(widths) - 2
    model = _seeded(lambda: _Random(widths, flags[:depth], flags[3:3 + depth]))(0)
    x = torch.randn(n, widths[0], dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    want = reference_ntk(model, x, params="all", per_layer=True)
    got = empirical_ntk(model, x, params="all", method="structured", per_layer=True)
    _assert_blocks(got, want)
