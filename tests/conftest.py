"""Shared fixtures and tolerances (written once, per dtype)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # lets tests import the zoo as `zoo`
pytest.register_assert_rewrite("model_state")  # its asserts report values like a test's
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

# Relative tolerances per dtype for "equals the reference" assertions.
RTOL = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 2e-2}


def assert_close_rel(actual: torch.Tensor, expected: torch.Tensor, rtol: float) -> None:
    """Relative error in Frobenius norm: ||a - e|| <= rtol * max(||e||, tiny)."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    a, e = actual.double(), expected.double()
    err = (a - e).norm().item()
    scale = max(e.norm().item(), 1e-30)
    assert err <= rtol * scale, f"relative error {err / scale:.3e} > {rtol:.1e}"


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
    """Split records and token caches of the whole run go to a fresh folder, not ~/.cache."""
    saved = os.environ.get("PROPULSION_NTK_CACHE")
    os.environ["PROPULSION_NTK_CACHE"] = str(tmp_path_factory.mktemp("propulsion-ntk-cache"))
    yield
    if saved is None:
        os.environ.pop("PROPULSION_NTK_CACHE", None)
    else:
        os.environ["PROPULSION_NTK_CACHE"] = saved


@pytest.fixture(scope="session")
def minilm_path() -> Path:
    """Folder of the offline MiniLM; fails (never skips) when the package is missing."""
    from experiments.data.offline import minilm_dir

    return minilm_dir()


@pytest.fixture(scope="session")
def minilm_tokenizer(minilm_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(minilm_path))


def load_minilm(path: Path, num_labels: int = 2, dtype=torch.float64, seed: int = 0):
    """A fresh MiniLM classifier (head seeded) in eval mode."""
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(str(path), num_labels=num_labels)
    return model.to(dtype).eval()


SENTENCES = [
    "a gripping, beautifully acted film .",
    "dull and far too long .",
    "the plot makes no sense , but the music is wonderful and the cast seems to enjoy it .",
    "not worth it .",
]
