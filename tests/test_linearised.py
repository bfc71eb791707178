"""The linearised model f(theta_0) + J(theta_0)(theta - theta_0) and its lock-step tracker."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F
from test_dynamics import drive, of_kind, one_thread, tiny_bert, tiny_data  # noqa: F401 (fixture)
from torch import nn

from experiments.dynamics.linearised import LinearisedModel, LinearisedTracker


class FeatureHead(nn.Module):
    """tanh features of (masked mean) token embeddings, then a linear head: (N, T) ids -> (N, C)."""

    def __init__(self, vocab: int = 40, d: int = 6, num_labels: int = 3):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.hidden = nn.Linear(d, d)
        self.classifier = nn.Linear(d, num_labels)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        m = attention_mask[..., None].to(self.embed.weight.dtype)
        pooled = (self.embed(input_ids) * m).sum(1) / m.sum(1)
        return self.classifier(torch.tanh(self.hidden(pooled)))


class _Logits:
    def __init__(self, logits: torch.Tensor):
        self.logits = logits


class AsClassifier(nn.Module):
    """Gives a plain module the ``.logits`` output of a transformers classifier (what drive reads)."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> _Logits:
        return _Logits(self.inner(input_ids, attention_mask))


def feature_head(seed: int = 0, trainable: str = "head") -> nn.Module:
    torch.manual_seed(seed)
    model = AsClassifier(FeatureHead()).double()
    for name, p in model.named_parameters():
        p.requires_grad_(trainable == "all" or name.startswith("inner.classifier."))
    return model


def inputs(data, n: int = 5) -> dict[str, torch.Tensor]:
    return {k: v for k, v in data.validation.batch(range(n)).items() if k != "labels"}


CASES = {
    "bert-propulsion-k3": lambda: tiny_bert(degree=3),
    "bert-lora": lambda: tiny_bert(method="lora", r=2, target_modules=["query", "value"]),
    "bert-full": lambda: tiny_bert(method="full"),
    "feature-head-all": lambda: feature_head(trainable="all"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_equals_the_model_at_theta0(case):
    model, data = CASES[case](), tiny_data()
    with torch.no_grad():  # move the LoRA B away from 0 and z away from 1: a generic point
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    lin, x = LinearisedModel(model), inputs(data)
    expected = model(**x).logits
    assert (lin(**x) - expected).abs().max() <= 1e-12 * expected.abs().max()
    assert lin(**x, labels=torch.zeros(5, dtype=torch.long)).shape == expected.shape


@pytest.mark.parametrize("case", list(CASES))
def test_gradient_at_theta0_is_the_real_gradient(case):
    """d f_lin / d theta = J(theta_0): the loss gradients agree at theta_0."""
    model, data = CASES[case](), tiny_data()
    lin, x = LinearisedModel(model), inputs(data)
    y = torch.tensor([0, 1, 2, 1, 0])
    F.cross_entropy(lin(**x), y).backward()
    F.cross_entropy(model(**x).logits, y).backward()
    real = dict(model.named_parameters())
    got = torch.cat([p.grad.reshape(-1) for p in lin.theta])  # type: ignore[union-attr]
    ref = torch.cat([real[n].grad.reshape(-1) for n in lin.names])  # type: ignore[union-attr]
    assert ref.norm() > 0 and (got - ref).norm() <= 1e-10 * ref.norm()


def test_first_order_away_from_theta0():
    """f(theta_0 + e d) - f_lin(theta_0 + e d) = O(e^2) for a nonlinear model."""
    model, data = tiny_bert(degree=3), tiny_data()
    lin, x = LinearisedModel(model), inputs(data)
    direction = [torch.randn_like(p) for p in lin.theta]
    real = dict(model.named_parameters())
    gaps = []
    for eps in (1e-2, 1e-3):
        with torch.no_grad():
            for name, p0, p, d in zip(lin.names, lin.theta0(), lin.theta, direction, strict=True):
                p.copy_(p0 + eps * d)
                real[name].copy_(p0 + eps * d)
            gaps.append(float((model(**x).logits - lin(**x)).abs().max()))
    assert 50 < gaps[0] / gaps[1] < 200  # quadratic: 100x smaller for 10x smaller steps


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_linear_in_its_parameters_trains_identically(optimizer, tmp_path):
    """Only the linear head trains: f is linear in theta, so f_lin = f along the whole run."""
    model, data = feature_head(), tiny_data()
    tracker = LinearisedTracker(every=1, probe_size=10)
    _, rows = drive(model, data, [tracker], 6, tmp_path, optimizer=optimizer, lr=0.3)
    lin_rows = of_kind(rows, "linearised")
    assert [r["step"] for r in lin_rows] == list(range(7))
    assert lin_rows[-1]["delta_real"] > 0.1  # it trained
    for r in lin_rows:
        assert r["gap_rel"] <= 1e-10 and r["loss_lin"] == pytest.approx(r["loss_real"], rel=1e-10)
        assert r["step"] == 0 or r["param_gap"] <= 1e-10


def test_nonlinear_gap_grows_from_zero(tmp_path):
    model, data = tiny_bert(degree=3), tiny_data()
    tracker = LinearisedTracker(every=2, probe_size=10)
    _, rows = drive(model, data, [tracker], 6, tmp_path, lr=2.0, clip_norm=None)
    gaps = [r["gap_rel"] for r in of_kind(rows, "linearised")]
    assert len(gaps) == 4 and gaps[0] <= 1e-12
    assert all(b > a for a, b in itertools.pairwise(gaps)) and gaps[-1] > 1e-4


def test_resume_continues_the_same_trajectory(tmp_path):
    data = tiny_data()
    model_a = tiny_bert(degree=3)
    model_b = copy.deepcopy(model_a)
    _, rows_a = drive(model_a, data, [LinearisedTracker(every=1, probe_size=8)], 5, tmp_path / "a",
                      optimizer="adamw", lr=0.05)
    first = LinearisedTracker(every=1, probe_size=8)
    state, _ = drive(model_b, data, [first], 2, tmp_path / "b", optimizer="adamw", lr=0.05)
    torch.save(first.state_dict(), tmp_path / "cb.pt")
    resumed = LinearisedTracker(every=1, probe_size=8)
    resumed.load_state_dict(torch.load(tmp_path / "cb.pt", weights_only=True))
    _, rows_c = drive(model_b, data, [resumed], 5, tmp_path / "b", state=state)
    last_a, last_c = of_kind(rows_a, "linearised")[-1], of_kind(rows_c, "linearised")[-1]
    assert last_a["step"] == last_c["step"] == 5 and last_a["gap_rel"] > 1e-8
    for key in ("gap_rel", "gap_max", "loss_lin", "delta_lin", "param_gap"):
        assert last_c[key] == pytest.approx(last_a[key], rel=1e-9), key


def test_bad_input(tmp_path):
    with pytest.raises(ValueError, match="every"):
        LinearisedTracker(every=0)
    model, data = tiny_bert(degree=2), tiny_data()
    with pytest.raises(ValueError, match="does not train it"):  # 'all' includes frozen weights
        drive(model, data, [LinearisedTracker(params="all")], 1, tmp_path)
    state, _ = drive(model, data, [], 1, tmp_path)
    with pytest.raises(RuntimeError, match="without its saved state"):
        drive(model, data, [LinearisedTracker()], 2, tmp_path, state=state)
    with pytest.raises(ValueError, match="lacks"):
        LinearisedTracker().load_state_dict({"names": []})
