"""experiments.training.methods.prepare: every method on tiny models and on the offline MiniLM."""

from __future__ import annotations

import pytest
import torch
from zoo import MLP, TinyTransformer

from experiments.training.methods import METHODS, parameter_table, prepare
from propulsion import PropulsionConfig, is_propulsion_model


def _trainable(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def _transformer():
    torch.manual_seed(0)
    return TinyTransformer().double()


LORA_IA3 = {"lora": {"target_modules": ["query", "value"], "r": 2},
            "ia3": {"target_modules": ["key", "value", "down"], "feedforward_modules": ["down"]}}


@pytest.mark.parametrize("head", ["train", "frozen"])
@pytest.mark.parametrize("method", [m for m in METHODS if m != "head"])
def test_head_is_handled_the_same_for_every_method(method, head):
    model = prepare(_transformer(), method, head=head, **LORA_IA3.get(method, {}))
    head_params = {n for n in _trainable(model) if n.startswith("classifier.")}
    if head == "train":
        assert head_params == {"classifier.weight", "classifier.bias"}
    else:  # a frozen head keeps its weights; Propulsion may still scale it with a z
        assert head_params <= {"classifier.propulsion_z"}


@pytest.mark.parametrize(
    ("method", "expected"),
    [
        ("full", lambda n: True),
        ("bitfit", lambda n: n.endswith(".bias") or n.startswith("classifier.")),
        ("head", lambda n: n.startswith("classifier.")),
        ("propulsion", lambda n: n.endswith("propulsion_z") or n.startswith("classifier.")),
        ("lora", lambda n: "lora_" in n or n.startswith("classifier.")),
        ("ia3", lambda n: "ia3_l" in n or n.startswith("classifier.")),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_exactly_the_methods_parameters_are_trainable(method, expected):
    model = prepare(_transformer(), method, **LORA_IA3.get(method, {}))
    names = {n for n, _ in model.named_parameters()}
    assert _trainable(model) == {n for n in names if expected(n)}
    rows = {r.group: r for r in parameter_table(model)}
    assert rows["all"].trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert rows["all"].total == sum(p.numel() for p in model.parameters())


def test_propulsion_head_goes_to_modules_to_save_and_is_not_wrapped():
    model = prepare(_transformer(), "propulsion", degree=3, target_modules=["query", "classifier"])
    assert is_propulsion_model(model)
    assert isinstance(model.classifier, torch.nn.Linear)  # not wrapped: trained in full
    with pytest.raises(ValueError, match="does not take options"):
        prepare(_transformer(), "bitfit", degree=3)


def test_propulsion_accepts_a_config_and_a_frozen_head_keeps_a_z():
    model = prepare(MLP().double(), "propulsion", head="frozen", config=PropulsionConfig(degree=2))
    assert "classifier.propulsion_z" in _trainable(model)
    assert "classifier.base_layer.weight" not in _trainable(model)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"method": "adapterx"}, "unknown method"),
        ({"method": "full", "head": "maybe"}, "head must be"),
        ({"method": "head", "head": "frozen"}, "train nothing"),
        ({"method": "full", "head_modules": ("nope",)}, "not modules"),
    ],
)
def test_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        prepare(_transformer(), **kwargs)


def test_model_without_a_known_head_needs_head_modules():
    net = torch.nn.Sequential(torch.nn.Linear(3, 2))
    with pytest.raises(ValueError, match="head_modules"):
        prepare(net, "full")
    assert _trainable(prepare(net, "head", head_modules=("0",))) == {"0.weight", "0.bias"}


@pytest.mark.realmodel
@pytest.mark.parametrize("method", METHODS)
def test_every_method_on_minilm_runs_a_step(method, minilm_path):
    from conftest import load_minilm

    model = prepare(load_minilm(minilm_path, dtype=torch.float32), method)
    ids = torch.tensor([[101, 2023, 3185, 102], [101, 2919, 102, 0]])
    mask = (ids != 0).long()
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    loss = model(input_ids=ids, attention_mask=mask).logits.logsumexp(-1).mean()
    loss.backward()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1).step()
    moved = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert moved, f"{method}: no trainable parameter changed"
    frozen_grads = [n for n, p in model.named_parameters() if not p.requires_grad and p.grad is not None]
    assert not frozen_grads
