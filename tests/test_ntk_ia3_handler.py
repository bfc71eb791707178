"""peft's IA3 layers get their blocks in closed form (output and feed-forward scaling), not from
the per-example fallback, and agree with the autograd reference; unusual states fall back."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ntk import empirical_ntk, reference_ntk
from ntk._handlers import IA3Handler, handler_for
from ntk._handlers.fallback import FallbackHandler

peft = pytest.importorskip("peft")
F64 = torch.float64


class TokenNet(nn.Module):
    """(n, T, 5) -> fc1 -> tanh -> fc2 -> mean over tokens -> head (n, 3)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(5, 7), nn.Linear(7, 6), nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.fc2(torch.tanh(self.fc1(x))).mean(1))


def _model(feedforward: list[str], scale: float = 0.3) -> nn.Module:
    torch.manual_seed(0)
    cfg = peft.IA3Config(target_modules=["fc1", "fc2"], feedforward_modules=feedforward)
    model = peft.get_peft_model(TokenNet().double(), cfg).double().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ia3_l" in name:
                p.add_(scale * torch.randn_like(p))  # away from s = 1, where u and h coincide
    return model


def _x(n: int = 6) -> torch.Tensor:
    return torch.randn(n, 4, 5, dtype=F64, generator=torch.Generator().manual_seed(1))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("feedforward", [[], ["fc2"], ["fc1", "fc2"]], ids=["output", "mixed", "input"])
@pytest.mark.parametrize("output", ["full", "trace"])
def test_ia3_blocks_match_the_reference_without_the_fallback(feedforward, output, monkeypatch):
    model = _model(feedforward)
    layers = [m for m in model.modules() if hasattr(m, "ia3_l")]
    assert len(layers) == 2 and all(isinstance(handler_for(m), IA3Handler) for m in layers)
    monkeypatch.setattr(FallbackHandler, "prepare", lambda *a: pytest.fail("the fallback ran"))
    x = _x()
    want = reference_ntk(model, x, params="trainable", output=output, per_layer=True)
    got = empirical_ntk(model, x, params="trainable", output=output, method="structured", per_layer=True)
    assert set(got) == set(want) and any("ia3_l" in k for k in want)
    for k, w in want.items():
        assert _rel(got[k], w) <= 1e-10, k


def test_ia3_beside_lora_free_parameters_and_a_trained_head():
    """IA3 vectors with the base weights and the head selected too: every block still exact."""
    model = _model(["fc2"])
    x = _x(5)
    want = reference_ntk(model, x, params="all", output="full")
    got = empirical_ntk(model, x, params="all", output="full", method="structured")
    assert _rel(got, want) <= 1e-10


def test_merged_or_disabled_adapters_go_to_the_fallback(monkeypatch):
    model = _model(["fc2"])
    calls: list[str] = []
    real = FallbackHandler.prepare
    monkeypatch.setattr(FallbackHandler, "prepare",
                        lambda self, m, *a: calls.append(type(m).__name__) or real(self, m, *a))
    with model.disable_adapter():
        x = _x(4)
        got = empirical_ntk(model, x, params=lambda n, p: "ia3_l" in n, output="trace", method="structured")
    assert float(got.abs().max()) == 0.0  # s is unused while the adapters are disabled
    assert calls  # the handler declined the disabled layers


def test_a_layer_that_does_not_reproduce_its_output_is_handed_to_the_fallback(monkeypatch):
    """A subclass that changes the computation (here: squares the scaling) must not be described
    by the closed form: the recorded output disagrees, so the fallback computes it, exactly."""
    model = _model([])
    layer = model.base_model.model.fc2
    original = type(layer).forward

    def squared(self, x, *args, **kwargs):
        return original(self, x, *args, **kwargs) * self.ia3_l["default"].flatten()

    monkeypatch.setattr(type(layer), "forward", squared)
    fell_back: list[str] = []
    real = FallbackHandler.prepare
    monkeypatch.setattr(FallbackHandler, "prepare",
                        lambda self, m, *a: fell_back.append(type(m).__name__) or real(self, m, *a))
    x = _x(4)
    want = reference_ntk(model, x, params="trainable", output="full")
    got = empirical_ntk(model, x, params="trainable", output="full", method="structured")
    assert _rel(got, want) <= 1e-10 and fell_back
