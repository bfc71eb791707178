"""Parameter counts: the paper's numbers from configurations alone, the printed table, and the
real offline MiniLM counted by hand from its config."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import SENTENCES, load_minilm
from torch import nn

from propulsion import (
    PropulsionConfig,
    build_on_meta,
    count_propulsion,
    get_propulsion_model,
    print_trainable_parameters,
    propulsion_layers,
    trainable_parameters,
)

# -- RoBERTa from configurations (meta device) -------------------------------------------------

ROBERTA = {  # hidden, layers, intermediate, vocab, positions, full fine-tuning count (2 labels)
    "roberta-base": (768, 12, 3072, 50265, 514, 124_647_170),
    "roberta-large": (1024, 24, 4096, 50265, 514, 355_361_794),
}


def roberta_by_hand(name: str, labels: int = 2) -> dict[str, int]:
    """z and bias counts of every Linear / Embedding of RobertaForSequenceClassification."""
    h, layers, inter, vocab, positions, _ = ROBERTA[name]
    per_layer = 4 * h + inter + h  # q, k, v, attention output; intermediate; output
    head = h + labels  # classifier.dense, classifier.out_proj
    linear_z = layers * per_layer + head
    linear_weights = layers * (4 * h * h + 2 * h * inter) + h * h + h * labels
    full = (vocab + positions + 1) * h + 2 * h + linear_weights + linear_z + layers * 4 * h
    return {
        "embedding_z": 3 * h,  # word, position, token type
        "linear_z": linear_z,
        "linear_bias": linear_z,  # one bias entry per output feature
        "qkv_z": 3 * layers * h,
        "head_params": h * h + h + h * labels + labels,
        "full": full,
        "wrapped_linear": 6 * layers + 2,
    }


COUNT_ROWS = [
    # the paper's numbers: z on every Linear and Embedding, head scales included, biases frozen
    pytest.param("roberta-base", {"include_embeddings": True}, 2, 86_018, id="base-all"),
    pytest.param("roberta-large", {"include_embeddings": True}, 2, 225_282, id="large-all"),
    pytest.param("roberta-base", {"include_embeddings": True}, 3, 86_019, id="base-all-3-labels"),
    # query / key / value only: 3 * layers * hidden, nothing for the head (not targeted)
    pytest.param("roberta-base", {"target_modules": ["query", "key", "value"]}, 2, 27_648,
                 id="base-qkv"),
    pytest.param("roberta-large", {"target_modules": ["query", "key", "value"]}, 2, 73_728,
                 id="large-qkv"),
    # the authors' preset also trains every wrapped bias
    pytest.param("roberta-base", "reference", 2, 86_018 + 83_714, id="base-reference"),
    pytest.param("roberta-large", "reference", 2, 225_282 + 222_210, id="large-reference"),
]


@pytest.mark.parametrize(("name", "options", "labels", "trainable"), COUNT_ROWS)
def test_roberta_counts(name, options, labels, trainable):
    config = PropulsionConfig.reference() if options == "reference" else PropulsionConfig(**options)
    count = count_propulsion(name, config, labels)
    hand = roberta_by_hand(name, labels)
    assert count.trainable == trainable
    assert count.full_finetuning == hand["full"]
    if labels == 2:
        assert count.full_finetuning == ROBERTA[name][5]
    assert count.percent == pytest.approx(100 * trainable / count.full_finetuning)
    if options == "reference":
        assert count.z_parameters == hand["embedding_z"] + hand["linear_z"]
        assert count.bias_parameters == hand["linear_bias"]
        assert count.wrapped_modules == 3 + hand["wrapped_linear"]
    elif "target_modules" in options:
        assert count.z_parameters == count.trainable == hand["qkv_z"]
        assert count.wrapped_modules == 3 * ROBERTA[name][1]
    else:
        assert count.z_parameters == hand["embedding_z"] + hand["linear_z"] == trainable
        assert count.bias_parameters == count.saved_parameters == 0
    assert count.trainable == count.z_parameters + count.bias_parameters + count.saved_parameters


def test_roberta_head_trained_in_full():
    config = PropulsionConfig(include_embeddings=True, modules_to_save=("classifier",))
    count = count_propulsion("roberta-base", config)
    hand = roberta_by_hand("roberta-base")
    assert count.saved_parameters == hand["head_params"] == 592_130
    assert count.z_parameters == 86_018 - (768 + 2)  # the head is no longer scaled
    assert count.trainable == count.z_parameters + count.saved_parameters


def test_counting_allocates_nothing():
    model = build_on_meta("roberta-large")
    assert {p.device.type for p in model.parameters()} == {"meta"}
    assert model.config.num_labels == 2


def test_unknown_architecture_raises():
    with pytest.raises(ValueError, match="unknown architecture 'not-a-model'"):
        build_on_meta("not-a-model")


# -- the printed table on a hand-countable model -----------------------------------------------

TABLE_ROWS = [
    # Linear(4, 3) + Linear(3, 2): 15 + 8 = 23 weights; z adds 3 + 2
    pytest.param(lambda: nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)),
                 PropulsionConfig(degree=3), 5, 28,
                 "trainable params: 5 || all params: 28 || trainable%: 17.8571", id="z-only"),
    pytest.param(lambda: nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)),
                 PropulsionConfig(train_bias=True), 10, 28,
                 "trainable params: 10 || all params: 28 || trainable%: 35.7143", id="bias"),
    pytest.param(lambda: nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)),
                 PropulsionConfig(modules_to_save=("2",)), 3 + 8, 26,
                 "trainable params: 11 || all params: 26 || trainable%: 42.3077", id="head"),
    pytest.param(lambda: nn.Sequential(nn.Linear(1000, 10)), PropulsionConfig(train_bias=True),
                 20, 10_020, "trainable params: 20 || all params: 10,020 || trainable%: 0.1996",
                 id="thousands"),
    pytest.param(lambda: nn.Sequential(nn.Embedding(1000, 4), nn.Linear(4, 2)),
                 PropulsionConfig(include_embeddings=True), 6, 4_016,
                 "trainable params: 6 || all params: 4,016 || trainable%: 0.1494", id="embedding"),
]


@pytest.mark.parametrize(("make", "config", "trainable", "total", "line"), TABLE_ROWS)
def test_trainable_parameters_and_printed_table(make, config, trainable, total, line, capsys):
    model = get_propulsion_model(make(), config)
    assert trainable_parameters(model) == (trainable, total)
    print_trainable_parameters(model)
    assert capsys.readouterr().out == line + "\n"


def test_table_of_plain_and_empty_models(capsys):
    print_trainable_parameters(nn.Linear(4, 3))
    print_trainable_parameters(nn.Tanh())
    assert capsys.readouterr().out.splitlines() == [
        "trainable params: 15 || all params: 15 || trainable%: 100.0000",
        "trainable params: 0 || all params: 0 || trainable%: 0.0000",
    ]


# -- the real offline MiniLM -------------------------------------------------------------------

@pytest.fixture(scope="module")
def minilm(minilm_path):
    return load_minilm(minilm_path, dtype=torch.float64)


def minilm_by_hand(cfg, labels: int = 2) -> dict[str, int]:
    """Counts of BertForSequenceClassification from its config (pooler and head included)."""
    h, layers, inter = cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size
    embeddings = (cfg.vocab_size + cfg.max_position_embeddings + cfg.type_vocab_size) * h + 2 * h
    per_layer = 4 * (h * h + h) + (h * inter + inter) + (inter * h + h) + 2 * 2 * h
    full = embeddings + layers * per_layer + (h * h + h) + (h * labels + labels)
    linear_out = layers * (4 * h + inter + h) + h + labels  # every Linear's out_features
    return {
        "full": full,
        "z": 3 * h + linear_out,
        "bias": linear_out,
        "wrapped": 3 + 6 * layers + 2,
    }


def test_minilm_config_is_the_one_counted(minilm):
    cfg = minilm.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size) == (384, 6, 1536)
    assert (cfg.vocab_size, cfg.max_position_embeddings, cfg.type_vocab_size) == (30522, 512, 2)
    hand = minilm_by_hand(cfg)
    assert sum(p.numel() for p in minilm.parameters()) == hand["full"] == 22_713_216 + 770
    assert hand["z"] == 3 * 384 + 6 * (5 * 384 + 1536) + 384 + 2 == 22_274


def test_minilm_reference_counts_and_outputs_at_z1(minilm, minilm_tokenizer):
    batch = dict(minilm_tokenizer(SENTENCES, padding=True, return_tensors="pt"))
    expected = minilm(**batch).logits
    hand = minilm_by_hand(minilm.config)

    model = get_propulsion_model(copy.deepcopy(minilm), PropulsionConfig.reference())
    assert len(propulsion_layers(model)) == hand["wrapped"]
    assert trainable_parameters(model) == (hand["z"] + hand["bias"], hand["full"] + hand["z"])
    assert not model.classifier.base_layer.weight.requires_grad
    assert model.classifier.base_layer.bias.requires_grad
    assert torch.equal(model(**batch).logits, expected)


def test_minilm_counted_from_its_config_folder(minilm_path, minilm):
    hand = minilm_by_hand(minilm.config)
    count = count_propulsion(str(minilm_path), PropulsionConfig.reference())
    assert (count.z_parameters, count.bias_parameters, count.full_finetuning) == (
        hand["z"], hand["bias"], hand["full"])
    assert count.trainable == hand["z"] + hand["bias"]
    assert count.wrapped_modules == hand["wrapped"]
