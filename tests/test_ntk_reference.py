"""Both kernel methods against an independent reference written without torch.func.

The reference (:func:`ntk.reference_ntk`) loops over examples and outputs with
``torch.autograd.grad`` on the model run as a batch of one (original inputs, 2-D attention
masks included), flattens the gradients and dots them. Every case must agree to
``RTOL[float64]`` relative (Frobenius norm).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from conftest import RTOL, SENTENCES, assert_close_rel, load_minilm
from torch import nn
from zoo import CASES, MLP, CalledTwice, TinyTransformer, _dense_inputs, _token_inputs

from ntk import empirical_ntk, select_parameters
from ntk.reference import reference_ntk as _reference_ntk

TOL = RTOL[torch.float64]
METHODS = ["jacobian", "ntk_vp"]


# -- the reference (ntk.reference, shared by every test) ------------------------------------


def reference_ntk(model: nn.Module, x1: Any, x2: Any = None, names: list[str] | None = None,
                  output: str = "full") -> torch.Tensor:
    """K in the layout of ``output`` by :func:`ntk.reference_ntk` over ``names``."""
    k = _reference_ntk(model, x1, x2, params="trainable" if names is None else names,
                       output=output)
    assert isinstance(k, torch.Tensor)
    return k


# -- wrapped models ----------------------------------------------------------------------------


def _randomise(model: nn.Module, key: str, low: float, high: float, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if key in name:
                p.copy_(low + (high - low) * torch.rand(p.shape, generator=g, dtype=p.dtype))


def propulsion_wrapped(build: Callable[[int], nn.Module], degree: int, embeddings: bool = False,
                       z_at_one: bool = False) -> Callable[[int], nn.Module]:
    def make(seed: int) -> nn.Module:
        from propulsion import PropulsionConfig, get_propulsion_model

        model = get_propulsion_model(
            build(seed), PropulsionConfig(degree=degree, include_embeddings=embeddings)
        )
        if not z_at_one:
            _randomise(model, "propulsion_z", 0.9, 1.1, seed)
        return model.eval()

    return make


def lora_wrapped(build: Callable[[int], nn.Module], targets: list[str],
                 b_random: bool = True) -> Callable[[int], nn.Module]:
    def make(seed: int) -> nn.Module:
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(seed)
        model = get_peft_model(build(seed), LoraConfig(r=2, lora_alpha=4, target_modules=targets))
        if b_random:
            _randomise(model, "lora_B", -0.5, 0.5, seed)
        return model.double().eval()

    return make


def _plain(factory: Callable[[], nn.Module]) -> Callable[[int], nn.Module]:
    def build(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return factory().double().eval()

    return build


@dataclass(frozen=True)
class Row:
    id: str
    build: Callable[[int], nn.Module]
    inputs: Callable[[int, int], Any]
    params: Any = "trainable"


WRAPPED: list[Row] = [
    *[Row(f"propulsion_mlp_k{k}", propulsion_wrapped(_plain(MLP), k), _dense_inputs(5))
      for k in (1, 2, 3)],
    *[Row(f"propulsion_transformer_k{k}", propulsion_wrapped(_plain(TinyTransformer), k, True),
          _token_inputs()) for k in (1, 2, 3)],
    Row("propulsion_called_twice_k2", propulsion_wrapped(_plain(CalledTwice), 2),
        _dense_inputs(4)),
    Row("lora_transformer_qv", lora_wrapped(_plain(TinyTransformer), ["query", "value"]),
        _token_inputs(), "lora"),
    Row("lora_mlp", lora_wrapped(_plain(MLP), ["layers.0", "classifier"]), _dense_inputs(5),
        "lora"),
    Row("lora_transformer_all", lora_wrapped(_plain(TinyTransformer), ["query", "value"]),
        _token_inputs(), "all"),
]


# -- tests -------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
@pytest.mark.parametrize("seed", [0, 1])
def test_zoo_matches_reference(case, method, seed):
    model = case.build(seed)
    x1, x2 = case.inputs(3, seed), case.inputs(2, seed + 10)
    names = list(select_parameters(model, "all"))
    assert_close_rel(empirical_ntk(model, x1, params="all", method=method),
                     reference_ntk(model, x1, None, names), TOL)
    assert_close_rel(empirical_ntk(model, x1, x2, params="all", method=method),
                     reference_ntk(model, x1, x2, names), TOL)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("row", WRAPPED, ids=[r.id for r in WRAPPED])
def test_wrapped_matches_reference(row, method):
    model = row.build(0)
    x1, x2 = row.inputs(3, 0), row.inputs(2, 5)
    names = list(select_parameters(model, row.params))
    assert_close_rel(empirical_ntk(model, x1, params=row.params, method=method),
                     reference_ntk(model, x1, None, names), TOL)
    assert_close_rel(empirical_ntk(model, x1, x2, params=row.params, method=method),
                     reference_ntk(model, x1, x2, names), TOL)


@pytest.mark.parametrize("output", ["full", "trace", "diagonal", "sum_logits"])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("symmetric", [True, False], ids=["x2_none", "x2_given"])
@pytest.mark.parametrize("case", CASES[:2], ids=[c.id for c in CASES[:2]])
def test_every_output_reduction(case, method, output, symmetric):
    model = case.build(3)
    x1 = case.inputs(3, 3)
    x2 = None if symmetric else case.inputs(4, 4)
    got = empirical_ntk(model, x1, x2, params="all", method=method, output=output)
    assert_close_rel(got, reference_ntk(model, x1, x2, list(select_parameters(model, "all")),
                                        output), TOL)


@pytest.mark.parametrize("method", ["jacobian", "ntk_vp"])
def test_x2_equal_to_x1_matches_x2_none(method):
    case = CASES[1]
    model, x = case.build(0), case.inputs(4, 0)
    sym = empirical_ntk(model, x, params="all", method=method, batch_size=3)
    full = empirical_ntk(model, x, x, params="all", method=method, batch_size=3)
    assert_close_rel(sym, full, TOL)
    assert torch.equal(sym, sym.permute(1, 0, 3, 2))  # mirrored: exactly symmetric


# -- the offline MiniLM (float64, padded real sentences) ---------------------------------------


@pytest.fixture(scope="module")
def minilm_batch(minilm_tokenizer):
    enc = minilm_tokenizer(SENTENCES[:3], padding=True, truncation=True, max_length=16,
                           return_tensors="pt")
    assert (enc["attention_mask"] == 0).any(), "the batch must contain padding"
    return dict(enc)


def _minilm_last_layer(name: str, _: Any) -> bool:
    return "layer.5.output" in name or name.startswith("classifier")


@pytest.mark.realmodel
@pytest.mark.parametrize("method", METHODS)
def test_minilm_matches_reference(minilm_path, minilm_batch, method):
    model = load_minilm(minilm_path)
    names = list(select_parameters(model, _minilm_last_layer))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = empirical_ntk(model, minilm_batch, params=_minilm_last_layer, method=method)
    assert not [w for w in caught if "Python loop" in str(w.message)], "vmap path not taken"
    assert_close_rel(got, reference_ntk(model, minilm_batch, None, names), TOL)


@pytest.mark.realmodel
@pytest.mark.parametrize("method", METHODS)
def test_minilm_propulsion_matches_reference(minilm_path, minilm_batch, method):
    from propulsion import PropulsionConfig, get_propulsion_model

    model = get_propulsion_model(load_minilm(minilm_path),
                                 PropulsionConfig(degree=3, target_modules=["query", "value"]))
    _randomise(model, "propulsion_z", 0.9, 1.1, 0)
    names = list(select_parameters(model, "propulsion"))
    x1 = {k: v[:2] for k, v in minilm_batch.items()}
    x2 = {k: v[2:] for k, v in minilm_batch.items()}
    got = empirical_ntk(model, x1, x2, params="propulsion", method=method)
    assert_close_rel(got, reference_ntk(model, x1, x2, names), TOL)


@pytest.mark.realmodel
@pytest.mark.parametrize("method", METHODS)
def test_minilm_lora_matches_reference(minilm_path, minilm_batch, method):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(load_minilm(minilm_path),
                           LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"]))
    model = model.double().eval()
    _randomise(model, "lora_B", -0.1, 0.1, 0)
    layer5 = [n for n in select_parameters(model, "lora") if "layer.5." in n]
    got = empirical_ntk(model, minilm_batch, params=layer5, method=method)
    assert_close_rel(got, reference_ntk(model, minilm_batch, None, layer5), TOL)
