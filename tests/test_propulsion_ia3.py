"""Science item 5: Propulsion with k = 1 is peft's IA3 in output-scaling mode on the same modules.

peft's IA3 scales the output of a non-feedforward Linear by a vector ``ia3_l`` of shape
``(out_features, 1)``: ``h = (W x + b) * l``. With ``feedforward_modules=[]`` every target is in
that mode, so with ``l = z**k`` the two models agree in outputs, and for k = 1 also in the
gradients (hence the kernels) with respect to the vectors. For k > 1 the chain rule gives
``dL/dz = k z**(k-1) dL/dl``.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import SENTENCES, assert_close_rel, load_minilm
from peft import IA3Config, get_peft_model
from peft.tuners.ia3 import IA3Layer
from torch import nn
from zoo import CASES

from propulsion import (
    PropulsionConfig,
    get_propulsion_model,
    merge_and_unload,
    propulsion_layers,
    trainable_parameters,
)

F64 = torch.float64
EXACT = 1e-12
TRANSFORMER = next(c for c in CASES if c.id == "transformer")
ZOO_TARGETS = ["query", "key", "value", "out", "up", "down", "classifier"]
MINILM_TARGETS = ["query", "key", "value", "dense", "classifier"]


@pytest.fixture(scope="module")
def minilm(minilm_path, minilm_tokenizer):
    """The offline MiniLM classifier in float64 and two padded sentences."""
    model = load_minilm(minilm_path, dtype=F64)
    batch = minilm_tokenizer(SENTENCES[:2], padding=True, return_tensors="pt")
    assert bool((batch["attention_mask"] == 0).any())  # padding really is exercised
    return model, dict(batch)


def _logits(out) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out.logits


def make_pair(build, targets: list[str], degree: int, seed: int):
    """The same base model wrapped by Propulsion and by peft IA3, with matching vectors.

    Returns (propulsion model, peft model, [(z, ia3_l)] in module order).
    """
    prop = get_propulsion_model(build(), PropulsionConfig(degree=degree, target_modules=targets))
    ia3 = get_peft_model(build(), IA3Config(target_modules=targets, feedforward_modules=[]))
    prop.eval()
    ia3.eval()
    inner = ia3.base_model.model
    ia3_paths = {n for n, m in inner.named_modules() if isinstance(m, IA3Layer)}
    assert ia3_paths == set(propulsion_layers(prop))  # the same modules
    assert trainable_parameters(prop)[0] == ia3.get_nb_trainable_parameters()[0]

    gen = torch.Generator().manual_seed(seed)
    pairs = []
    with torch.no_grad():
        for path, layer in propulsion_layers(prop).items():
            peft_layer = inner.get_submodule(path)
            assert not peft_layer.is_feedforward
            vector = peft_layer.ia3_l["default"]
            assert vector.shape == (layer.features, 1)  # peft's layout: one column
            z = 0.9 + 0.2 * torch.rand(layer.features, generator=gen, dtype=F64)
            layer.propulsion_z.copy_(z)
            vector.copy_((z**degree)[:, None])
            pairs.append((layer.propulsion_z, vector))
    return prop, ia3, pairs


def jacobian(outputs: torch.Tensor, params: list[torch.Tensor]) -> torch.Tensor:
    """Rows: every output entry; columns: every entry of ``params`` (flattened, in order)."""
    rows = []
    for entry in outputs.reshape(-1):
        grads = torch.autograd.grad(entry, params, retain_graph=True)
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(rows)


def check_pair(prop: nn.Module, ia3: nn.Module, pairs, inputs: dict, degree: int) -> None:
    out_prop = _logits(prop(**inputs))
    out_ia3 = _logits(ia3(**inputs))
    assert_close_rel(out_prop, out_ia3, EXACT)

    zs = [z for z, _ in pairs]
    ls = [v for _, v in pairs]
    jac_z = jacobian(out_prop, zs)
    jac_l = jacobian(out_ia3, ls)
    chain = torch.cat([degree * z.detach() ** (degree - 1) for z in zs])  # dl/dz per entry
    assert_close_rel(jac_z, jac_l * chain, EXACT)
    if degree == 1:  # identical Jacobians, so identical kernels J J^T
        assert_close_rel(jac_z @ jac_z.T, jac_l @ jac_l.T, EXACT)


@pytest.mark.parametrize("degree", [1, 3], ids=lambda k: f"k{k}")
@pytest.mark.parametrize("seed", [0, 1], ids=lambda s: f"s{s}")
def test_zoo_transformer_equals_ia3_output_scaling(degree, seed):
    prop, ia3, pairs = make_pair(lambda: TRANSFORMER.build(seed), ZOO_TARGETS, degree, seed)
    check_pair(prop, ia3, pairs, TRANSFORMER.inputs(4, seed), degree)


def test_zoo_transformer_merges_to_the_same_weights_as_ia3():
    prop, ia3, _ = make_pair(lambda: TRANSFORMER.build(2), ZOO_TARGETS, 1, 2)
    merged_prop = merge_and_unload(prop).state_dict()
    merged_ia3 = ia3.merge_and_unload().state_dict()
    assert merged_prop.keys() == merged_ia3.keys()
    for name, tensor in merged_prop.items():
        assert_close_rel(tensor, merged_ia3[name], 1e-14)


def test_minilm_equals_ia3_output_scaling(minilm):
    base, inputs = minilm
    prop, ia3, pairs = make_pair(lambda: copy.deepcopy(base), MINILM_TARGETS, 1, 7)
    assert len(pairs) == 6 * 6 + 2  # q, k, v, attention/intermediate/output dense; pooler; head
    check_pair(prop, ia3, pairs, inputs, 1)
