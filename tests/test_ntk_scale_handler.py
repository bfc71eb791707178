"""Modules affine in one vector weight (RMSNorm and kin) get their blocks from two batched calls
of their own forward, not the per-example fallback, and stay exact; others still fall back."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ntk import empirical_ntk, reference_ntk
from ntk._handlers import FALLBACK, ScaleHandler, handler_for
from ntk._handlers import fallback as fallback_module

F64 = torch.float64


class GemmaStyleNorm(nn.Module):
    """``(1 + weight) * x / rms(x)``: affine in the weight with a non-zero offset."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (1 + self.weight) * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


class SquaredScale(nn.Module):
    """``weight**2 * x``: not affine in the weight (must go to the fallback)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight**2 * x


class MeanScale(nn.Module):
    """``mean(weight) * x``: equal to ``weight * x`` at weight = 1, mixing coordinates elsewhere."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight.mean() * x


class MeanTokens(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(1)


def _net(norm: nn.Module, d: int = 6) -> nn.Module:
    """(n, T, 5) -> Linear, tanh, the norm (per token), mean over tokens, Linear -> (n, 3)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, d), nn.Tanh(), norm, MeanTokens(), nn.Linear(d, 3)).double()


@pytest.mark.parametrize("norm", [nn.RMSNorm(6), GemmaStyleNorm(6), SquaredScale(6), MeanScale(6)],
                         ids=lambda m: type(m).__name__)
@pytest.mark.parametrize("random_weight", [False, True])
def test_blocks_match_the_reference_affine_or_not(norm, random_weight, monkeypatch):
    model = _net(norm)
    if random_weight:
        with torch.no_grad():
            model[2].weight.uniform_(-1.5, 1.5)
    x = torch.randn(7, 4, 5, dtype=F64, generator=torch.Generator().manual_seed(1))  # tokens too
    fell_back: list[str] = []
    real = fallback_module.FallbackHandler.prepare
    monkeypatch.setattr(fallback_module.FallbackHandler, "prepare",
                        lambda self, m, *a: fell_back.append(type(m).__name__) or real(self, m, *a))
    assert isinstance(handler_for(model[2]), ScaleHandler)
    for output in ("full", "trace"):
        want = reference_ntk(model, x, params="all", output=output, per_layer=True)
        got = empirical_ntk(model, x, params="all", output=output, method="structured", per_layer=True)
        for k, w in want.items():
            assert float((got[k] - w).norm()) <= 1e-10 * float(w.norm()) + 1e-300, k
    affine = isinstance(norm, (nn.RMSNorm, GemmaStyleNorm))
    # MeanScale at weight = 1 looks affine at the recorded weight but not at the random probe
    assert (not fell_back) == affine, fell_back


def test_llama_rmsnorm_with_trained_weights_uses_the_scale_handler(monkeypatch):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=12, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=8,
                                   pad_token_id=0, num_labels=2)
    model = transformers.LlamaForSequenceClassification(cfg).double().eval()
    model.config._attn_implementation = "eager"
    norms = [m for m in model.modules() if type(m).__name__ == "LlamaRMSNorm"]
    assert len(norms) == 5 and all(isinstance(handler_for(m), ScaleHandler) for m in norms)
    with torch.no_grad():
        for m in norms:
            m.weight.uniform_(0.5, 1.5)
    monkeypatch.setattr(FALLBACK, "prepare", lambda *a: pytest.fail("the fallback ran"))
    ids = torch.randint(1, 16, (5, 6), generator=torch.Generator().manual_seed(2))
    x = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    want = reference_ntk(model, x, params="all", output="full")
    got = empirical_ntk(model, x, params="all", output="full", method="structured")
    assert float((got - want).norm()) <= 1e-10 * float(want.norm())
