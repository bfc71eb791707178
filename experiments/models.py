"""Pre-trained classifiers by short name, loaded from offline packages only."""

from __future__ import annotations

import torch
from torch import nn

from experiments.offline import minilm_dir, set_offline_env

__all__ = ["MODELS", "load_model", "load_tokenizer"]

MODELS = ("minilm",)  # more (smollm2, mpnet) arrive with the experiment suite


def _quiet_transformers() -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _model_dir(name: str):
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(MODELS)}")
    return minilm_dir()


def load_model(name: str = "minilm", num_labels: int = 2, *, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu", seed: int = 0) -> nn.Module:
    """A pre-trained encoder with a fresh classification head of ``num_labels`` outputs.

    The head is initialised from ``seed``; the model is returned in eval mode.

    Raises:
        ValueError: unknown name or ``num_labels < 1``.
        OfflineResourceMissing: the model package is not installed (says how to install it).
    """
    if num_labels < 1:
        raise ValueError(f"num_labels must be >= 1, got {num_labels}")
    path = _model_dir(name)
    set_offline_env()
    _quiet_transformers()
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(str(path), num_labels=num_labels)
    return model.to(device=device, dtype=dtype).eval()


def load_tokenizer(name: str = "minilm"):
    """The tokenizer that goes with :func:`load_model` (a transformers fast tokenizer)."""
    path = _model_dir(name)
    set_offline_env()
    _quiet_transformers()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))
