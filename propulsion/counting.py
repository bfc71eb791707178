"""Trainable-parameter counts from architecture configurations alone (no weights needed).

Models are built on the ``meta`` device from a transformers configuration, wrapped, and
counted, so RoBERTa-large or LLaMA-7B cost nothing to count.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from propulsion.config import PropulsionConfig
from propulsion.model import adapter_state, get_propulsion_model, propulsion_layers

__all__ = ["ARCHITECTURES", "ParameterCount", "build_on_meta", "count_propulsion"]

# Configurations of the paper's models, as published with their checkpoints.
ARCHITECTURES: dict[str, tuple[str, dict[str, Any]]] = {
    "roberta-base": (
        "roberta",
        dict(vocab_size=50265, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
             intermediate_size=3072, max_position_embeddings=514, type_vocab_size=1,
             pad_token_id=1, layer_norm_eps=1e-5),
    ),
    "roberta-large": (
        "roberta",
        dict(vocab_size=50265, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
             intermediate_size=4096, max_position_embeddings=514, type_vocab_size=1,
             pad_token_id=1, layer_norm_eps=1e-5),
    ),
    "deberta-v3-base": (
        "deberta-v2",
        dict(vocab_size=128100, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
             intermediate_size=3072, max_position_embeddings=512, type_vocab_size=0,
             relative_attention=True, position_buckets=256, norm_rel_ebd="layer_norm",
             share_att_key=True, pos_att_type=["p2c", "c2p"], position_biased_input=False,
             max_relative_positions=-1, layer_norm_eps=1e-7),
    ),
    "bart-large": (
        "bart",
        dict(vocab_size=50265, d_model=1024, encoder_layers=12, decoder_layers=12,
             encoder_attention_heads=16, decoder_attention_heads=16, encoder_ffn_dim=4096,
             decoder_ffn_dim=4096, max_position_embeddings=1024),
    ),
    "llama-7b": (
        "llama",
        dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
             num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=2048,
             pad_token_id=0),
    ),
}


@dataclass(frozen=True)
class ParameterCount:
    """One row of a parameter table."""

    model: str
    method: str
    wrapped_modules: int
    z_parameters: int
    bias_parameters: int
    saved_parameters: int  # modules_to_save, trained in full
    trainable: int
    full_finetuning: int  # every parameter of the unwrapped model

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.full_finetuning if self.full_finetuning else 0.0


def build_on_meta(name_or_config: Any, num_labels: int = 2) -> nn.Module:
    """A sequence-classification model with ``num_labels`` outputs on the meta device.

    Args:
        name_or_config: a key of :data:`ARCHITECTURES`, a transformers ``PretrainedConfig``, or
            a folder holding a ``config.json``.
    """
    from transformers import AutoConfig, AutoModelForSequenceClassification, PretrainedConfig

    if isinstance(name_or_config, PretrainedConfig):
        hf_config = name_or_config
    elif isinstance(name_or_config, str) and name_or_config in ARCHITECTURES:
        model_type, kwargs = ARCHITECTURES[name_or_config]
        hf_config = AutoConfig.for_model(model_type, **kwargs)
    else:
        try:
            hf_config = AutoConfig.from_pretrained(str(name_or_config))
        except OSError as exc:
            raise ValueError(
                f"unknown architecture {name_or_config!r}: give one of {sorted(ARCHITECTURES)}, "
                "a transformers config, or a folder with a config.json"
            ) from exc
    hf_config.num_labels = num_labels
    if getattr(hf_config, "pad_token_id", None) is None:
        hf_config.pad_token_id = 0
    with torch.device("meta"):
        return AutoModelForSequenceClassification.from_config(hf_config)


def count_propulsion(
    name_or_config: Any, config: PropulsionConfig, num_labels: int = 2, method: str = "propulsion"
) -> ParameterCount:
    """Count what ``config`` trains on a model built from its configuration.

    Example (RoBERTa-base, z on every Linear and Embedding, head scales included):
        >>> cfg = PropulsionConfig(include_embeddings=True)
        >>> count_propulsion("roberta-base", cfg).trainable  # doctest: +SKIP
        86018
    """
    model = build_on_meta(name_or_config, num_labels)
    full = sum(p.numel() for p in model.parameters())
    get_propulsion_model(model, config)
    layers = propulsion_layers(model)
    z = sum(layer.propulsion_z.numel() for layer in layers.values())
    state = adapter_state(model)
    bias = sum(t.numel() for n, t in state.items() if n.endswith("base_layer.bias"))
    saved = sum(t.numel() for t in state.values()) - z - bias
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    name = name_or_config if isinstance(name_or_config, str) else type(name_or_config).__name__
    return ParameterCount(str(name), method, len(layers), z, bias, saved, trainable, full)
