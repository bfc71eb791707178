"""Kernel snapshots along training (experiments.dynamics.tracking) and the kernel predictor.

The callbacks are driven by a small training loop of this file (:func:`drive`) with the
trainer's real :class:`experiments.training.callbacks.TrainState`; every logged number is checked against
an independent computation (torch.func Jacobians, ntk's jacobian method on a copy of the model).
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from conftest import SENTENCES, load_minilm
from safetensors.torch import load_file
from torch.func import functional_call, jacrev

import ntk
from experiments.data.encoding import EncodedSplit, EncodedSplits
from experiments.dynamics.kernel_predictor import kernel_predictor_accuracy
from experiments.dynamics.tracking import KernelTracker, KernelTrackerConfig, jacobian, jacobian_projections
from experiments.training.callbacks import Callback, TrainState
from experiments.training.methods import prepare
from ntk import metrics

# --------------------------------------------------------------------------------------------
# helpers shared with test_linearised.py
# --------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and on a busy machine two threads cost 50x."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_bert(seed: int = 0, num_labels: int = 3, method: str | None = "propulsion", **options: Any):
    """A one-layer BERT classifier (hidden 16, no dropout) in float64, prepared for ``method``
    (None: unprepared)."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=24, max_position_embeddings=16, num_labels=num_labels,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = BertForSequenceClassification(cfg).double().eval()
    return model if method is None else prepare(model, method, **options)


def tiny_data(n: int = 24, t: int = 8, num_labels: int = 3, seed: int = 0) -> EncodedSplits:
    """Random right-padded token ids; labels depend on the first token (learnable)."""
    g = torch.Generator().manual_seed(seed)

    def split(m: int) -> EncodedSplit:
        ids = torch.randint(1, 40, (m, t), generator=g)
        mask = torch.ones(m, t, dtype=torch.long)
        lengths = torch.randint(2, t + 1, (m,), generator=g)
        for i, length in enumerate(lengths.tolist()):
            mask[i, length:] = 0
            ids[i, length:] = 0
        return EncodedSplit(ids, mask, ids[:, 0] % num_labels)

    return EncodedSplits(split(n), split(n), split(n), num_labels, "tiny")


def drive(model, data: EncodedSplits, callbacks: list[Callback], steps: int, out_dir: Path, *,
          optimizer: str = "sgd", lr: float = 0.5, state: TrainState | None = None,
          clip_norm: float | None = 1.0, batch_size: int = 6) -> tuple[TrainState, list[dict]]:
    """A plain training loop calling the hooks like experiments.training.loop does (cross-entropy,
    clipping, warm-up schedule stepped after the optimiser). Pass ``state`` to continue."""
    rows: list[dict] = []
    if state is None:
        params = [p for p in model.parameters() if p.requires_grad]
        opt: torch.optim.Optimizer = (torch.optim.SGD(params, lr=lr, momentum=0.9) if optimizer == "sgd"
                                      else torch.optim.AdamW(params, lr=lr, weight_decay=0.1))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 3))
        config = SimpleNamespace(steps=steps, clip_norm=clip_norm, optimizer=optimizer, lr=lr)
        state = TrainState(config, model, opt, sched, data, torch.device("cpu"), out_dir)
    state.config.steps = steps
    state._sink = rows.append
    for cb in callbacks:
        cb.on_start(state)
    g = torch.Generator().manual_seed(123)
    order = [torch.randperm(len(data.train), generator=g)[:batch_size] for _ in range(steps)]
    while state.step < steps:
        batch = data.train.batch(order[state.step])
        model.train()
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = F.cross_entropy(logits, batch["labels"])
        loss.backward()
        if clip_norm:
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], clip_norm)
        state.optimizer.step()
        state.scheduler.step()
        state.optimizer.zero_grad(set_to_none=True)
        state.step += 1
        for cb in callbacks:
            cb.on_batch_end(state, batch, float(loss.detach()))
    for cb in callbacks:
        cb.on_end(state)
    model.eval()
    return state, rows


def of_kind(rows: list[dict], kind: str) -> list[dict]:
    return [r for r in rows if r["kind"] == kind]


def reference_jacobian(model, x: dict[str, torch.Tensor], names: list[str]) -> torch.Tensor:
    """(N, C, P) by torch.func.jacrev per example (independent of experiments.dynamics.tracking.jacobian)."""
    live = dict(model.named_parameters())
    theta = {k: live[k].detach() for k in names}
    out = []
    for a in range(next(iter(x.values())).shape[0]):
        xa = {k: v[a: a + 1] for k, v in x.items()}
        jac = jacrev(lambda t, xa=xa: functional_call(model, t, (), xa).logits[0])(theta)
        out.append(torch.cat([jac[k].reshape(jac[k].shape[0], -1) for k in names], dim=1))
    return torch.stack(out)


# --------------------------------------------------------------------------------------------
# KernelTracker
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tracked(tmp_path_factory, one_thread):
    """A Propulsion (k=3, head trained) tiny BERT trained 4 SGD steps with snapshots at 0, 2, 4."""
    model = tiny_bert(degree=3)
    initial = copy.deepcopy(model)
    data = tiny_data()
    out = tmp_path_factory.mktemp("tracked")
    tracker = KernelTracker(steps=(2,), probe_size=8, compare_full=True)
    _, rows = drive(model, data, [tracker], 4, out, lr=5.0, clip_norm=None)
    return SimpleNamespace(model=model, initial=initial, data=data, out=out, tracker=tracker, rows=rows)


def test_rows_at_chosen_steps(tracked):
    rows = of_kind(tracked.rows, "kernel")
    assert [r["step"] for r in rows] == [0, 2, 4]
    first, last = rows[0], rows[-1]
    assert first["kernel_distance"] == pytest.approx(0.0, abs=1e-12)
    assert first["jacobian_drift"] == 0.0 and first["scale_ratio"] == pytest.approx(1.0, abs=1e-12)
    assert first["jacobian_mode"] == "exact" and first["n_probe"] == 8
    assert last["kernel_distance"] > 10 * rows[1]["kernel_distance"] > 1e-6  # the kernel moves
    assert 0 < last["jacobian_drift"] < 1 and 0 < last["alignment_full"] <= 1
    z_rows = of_kind(tracked.rows, "z")
    layers = {r["layer"] for r in z_rows}
    assert len(z_rows) == 3 * 3 * len(layers) and "bert.encoder.layer.0.output.dense" in layers
    at0 = [r for r in z_rows if r["step"] == 0]
    assert all(r["min"] == r["max"] == (9.0 if r["quantity"] == "kernel_factor" else 1.0) for r in at0)
    for r in z_rows:
        assert r["min"] <= r["q05"] <= r["q25"] <= r["median"] <= r["q75"] <= r["q95"] <= r["max"]


def test_values_equal_an_independent_reference_at_live_parameters(tracked):
    """The stale-parameter trap (docs/theory/claims.md): the kernel after training is the live one."""
    model, initial, names = tracked.model, tracked.initial, tracked.tracker.names
    x, labels = tracked.tracker.probe.inputs(tracked.data, None)
    kw = dict(params=names, output="trace", method="jacobian")
    k_t, k_0 = ntk.empirical_ntk(model, x, **kw), ntk.empirical_ntk(initial, x, **kw)
    k_full = ntk.empirical_ntk(model, x, params="all", output="trace", method="jacobian")
    saved = load_file(str(tracked.out / "kernels" / "step_0000004.safetensors"))
    assert torch.allclose(saved["trained"], k_t, rtol=1e-10, atol=0)
    assert torch.allclose(saved["full"], k_full, rtol=1e-10, atol=0)
    last = of_kind(tracked.rows, "kernel")[-1]
    assert metrics.kernel_distance(k_t, k_0) > 1e-5  # a copy taken before training would give 0
    assert last["kernel_distance"] == pytest.approx(metrics.kernel_distance(k_t, k_0), rel=1e-8)
    assert last["alignment_full"] == pytest.approx(metrics.alignment(k_t, k_full), rel=1e-8)
    assert last["cka_full"] == pytest.approx(metrics.cka(k_t, k_full), rel=1e-8)
    assert last["kta"] == pytest.approx(metrics.kernel_target_alignment(k_t, labels, 3), rel=1e-8)
    j_t, j_0 = reference_jacobian(model, x, names), reference_jacobian(initial, x, names)
    assert last["jacobian_drift"] == pytest.approx(float((j_t - j_0).norm() / j_0.norm()), rel=1e-9)


def test_files_and_manifest(tracked):
    folder = tracked.out / "kernels"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert sorted(manifest["snapshots"]) == ["0", "2", "4"]
    assert manifest["probe_indices"] == tracked.tracker.probe.indices
    initial = load_file(str(folder / manifest["initial"]))
    n_params = sum(t.numel() for t in ntk.select_parameters(tracked.model, tracked.tracker.names).values())
    assert initial["jacobian"].shape == (8, 3, n_params)
    x, _ = tracked.tracker.probe.inputs(tracked.data, None)
    assert torch.allclose(initial["jacobian"], reference_jacobian(tracked.initial, x, tracked.tracker.names),
                          rtol=0, atol=1e-12)
    assert not list(folder.glob("*.tmp"))


def test_jacobian_matches_jacrev():
    model, data = tiny_bert(method="full"), tiny_data()
    x = {k: v for k, v in data.validation.batch(range(3)).items() if k != "labels"}
    names = [*[n for n, _ in model.named_parameters()][:5], "classifier.weight"]
    assert torch.allclose(jacobian(model, x, names), reference_jacobian(model, x, names), rtol=0, atol=1e-12)


def test_projection_estimate_is_unbiased():
    """Mean over many Rademacher projections of ||(J_t - J_0) v||^2 -> ||J_t - J_0||_F^2."""
    model, data = tiny_bert(degree=2), tiny_data()
    x = {k: v for k, v in data.validation.batch(range(4)).items() if k != "labels"}
    names = list(ntk.select_parameters(model, "trainable"))
    j0, p0 = jacobian(model, x, names), jacobian_projections(model, x, names, 200, seed=1, chunk=64)
    assert torch.allclose(p0[..., 0], j0 @ _signs(j0.shape[2], model, names, seed=1), rtol=1e-10, atol=1e-12)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    d = jacobian(model, x, names) - j0
    est = ((jacobian_projections(model, x, names, 200, seed=1, chunk=64) - p0) ** 2).sum((0, 1))
    exact = float((d ** 2).sum())
    assert abs(float(est.mean()) - exact) < 4 * float(est.std()) / math.sqrt(200)
    assert float(est.mean()) == pytest.approx(exact, rel=0.3)


def _signs(p: int, model, names, seed: int) -> torch.Tensor:
    from experiments.dynamics.tracking import _rademacher

    live = dict(model.named_parameters())
    v = _rademacher([(live[k].shape, live[k].dtype, live[k].device) for k in names], seed, 0)
    return torch.cat([t.reshape(-1) for t in v])


def test_estimate_mode_close_to_exact(tmp_path):
    data = tiny_data()
    rows = {}
    for mode in ("exact", "estimate"):
        model = tiny_bert(degree=3)
        _, r = drive(model, data, [KernelTracker(probe_size=6, jacobian=mode, jacobian_probes=64,
                                                 save_kernels=False)], 3, tmp_path / mode)
        rows[mode] = of_kind(r, "kernel")[-1]
    est = rows["estimate"]
    assert est["jacobian_mode"] == "estimate" and est["jacobian_drift_se"] > 0
    assert est["kernel_distance"] == pytest.approx(rows["exact"]["kernel_distance"], rel=1e-9)
    assert abs(est["jacobian_drift"] - rows["exact"]["jacobian_drift"]) < 5 * est["jacobian_drift_se"]


def test_resume_keeps_initial_kernel_and_jacobian(tmp_path):
    data = tiny_data()
    model_a = tiny_bert(degree=3)
    model_b = copy.deepcopy(model_a)
    _, rows_a = drive(model_a, data, [KernelTracker(steps=(2,), probe_size=6)], 5, tmp_path / "a")
    first = KernelTracker(steps=(2,), probe_size=6)
    state, _ = drive(model_b, data, [first], 3, tmp_path / "b")
    saved = first.state_dict()  # what the trainer checkpoints
    torch.save(saved, tmp_path / "cb.pt")
    resumed = KernelTracker(steps=(2,), probe_size=6)
    resumed.load_state_dict(torch.load(tmp_path / "cb.pt", weights_only=True))
    _, rows_c = drive(model_b, data, [resumed], 5, tmp_path / "b", state=state)
    last_a, last_c = of_kind(rows_a, "kernel")[-1], of_kind(rows_c, "kernel")[-1]
    assert last_a["step"] == last_c["step"] == 5
    for key in ("kernel_distance", "scale_ratio", "jacobian_drift", "kta"):
        assert last_c[key] == pytest.approx(last_a[key], rel=1e-9, abs=1e-15), key
    with pytest.raises(RuntimeError, match="without its saved state"):
        drive(model_b, data, [KernelTracker(probe_size=6)], 6, tmp_path / "b", state=state)


def test_exact_jacobian_refused_with_numbers(tmp_path):
    with pytest.raises(ntk.KernelTooLargeError, match=r"probe examples x 3 outputs .* MiB"):
        drive(tiny_bert(degree=2), tiny_data(), [KernelTracker(probe_size=4, jacobian="exact",
                                                               jacobian_max_bytes=100)], 1, tmp_path)


@pytest.mark.parametrize("bad", [dict(output="logits"), dict(jacobian="fast"), dict(steps=(-1,)),
                                 dict(every=-2), dict(probe_size=0), dict(jacobian_probes=0)])
def test_bad_config(bad):
    with pytest.raises(ValueError):
        KernelTrackerConfig(**bad)


class Interrupt(Callback):
    def __init__(self, after: int):
        self.after = after

    def on_batch_end(self, state, batch, loss) -> None:
        if state.step == self.after:
            raise KeyboardInterrupt


def test_with_the_trainer_and_its_resume(tmp_path):
    """Both trackers inside experiments.training.loop.train; an interrupted, resumed run records the
    same rows."""
    from experiments.dynamics.linearised import LinearisedTracker
    from experiments.records import TIMING_COLUMNS
    from experiments.training.config import TrainConfig
    from experiments.training.loop import train

    cfg = TrainConfig(method="propulsion", method_options={"degree": 3}, lr=0.05, steps=8, batch_size=6,
                      eval_every=4, checkpoint_every=4, warmup_steps=2, schedule="linear", seed=0)
    data = tiny_data()

    def callbacks(*extra: Callback) -> list[Callback]:
        return [KernelTracker(steps=(2, 6), probe_size=6), LinearisedTracker(every=2, probe_size=6), *extra]

    straight = train(cfg, tmp_path / "a", model=tiny_bert(method=None), data=data, callbacks=callbacks(),
                     progress=False).rows
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "b", model=tiny_bert(method=None), data=data, callbacks=callbacks(Interrupt(5)),
              progress=False)
    resumed = train(cfg, tmp_path / "b", model=tiny_bert(method=None), data=data,
                    callbacks=callbacks(Callback()), progress=False).rows
    kernel = straight[straight.kind == "kernel"]
    assert kernel.step.tolist() == [0, 2, 6, 8] and kernel.kernel_distance.iloc[-1] > 0
    assert straight[straight.kind == "linearised"].step.tolist() == [0, 2, 4, 6, 8]
    assert (straight.kind == "z").sum() == 4 * 3 * 7

    def comparable(rows):
        rows = rows[rows.kind.isin(["kernel", "z", "linearised"])]
        return rows.drop(columns=[c for c in TIMING_COLUMNS if c in rows]).reset_index(drop=True)

    # Not bit-exact: ntk tiles the kernel by the free memory of the moment (summation order).
    pd.testing.assert_frame_equal(comparable(resumed), comparable(straight), check_exact=False,
                                  rtol=1e-9, atol=1e-13)


# --------------------------------------------------------------------------------------------
# kernel predictor
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("output", ["trace", "full"])
def test_kernel_predictor_equals_direct_solve(output):
    model, data = tiny_bert(degree=2, head="frozen"), tiny_data(n=30)
    train, test = data.train.batch(range(20)), data.test.batch(range(15))
    names = list(ntk.select_parameters(model, "trainable"))
    x_tr = {k: v for k, v in train.items() if k != "labels"}
    x_te = {k: v for k, v in test.items() if k != "labels"}
    j_tr, j_te = reference_jacobian(model, x_tr, names), reference_jacobian(model, x_te, names)
    y = F.one_hot(train["labels"], 3).double() - 1 / 3
    if output == "trace":
        k = torch.einsum("acp,bcp->ab", j_tr, j_tr)
        ks = torch.einsum("acp,bcp->ab", j_te, j_tr)
        lam = 0.01 * k.diagonal().mean()
        scores = ks @ torch.linalg.solve(k + lam * torch.eye(20, dtype=torch.float64), y)
    else:
        k = j_tr.reshape(60, -1) @ j_tr.reshape(60, -1).T
        ks = j_te.reshape(45, -1) @ j_tr.reshape(60, -1).T
        lam = 0.01 * k.diagonal().mean()
        alpha = torch.linalg.solve(k + lam * torch.eye(60, dtype=torch.float64), y.reshape(-1))
        scores = (ks @ alpha).reshape(15, 3)
    expected = scores.argmax(-1)
    got = kernel_predictor_accuracy(model, train, test, ridge=0.01, output=output)
    assert torch.equal(got["predictions"], expected)
    assert got["accuracy"] == pytest.approx(float((expected == test["labels"]).double().mean()))
    assert got["ridge_absolute"] == pytest.approx(float(lam), rel=1e-10)
    assert 0 <= got["macro_f1"] <= 1 and got["n_train"] == 20 and got["num_classes"] == 3


def test_kernel_predictor_is_invariant_to_kernel_scale():
    """Relative ridge: degree k multiplies the Propulsion kernel by k^2 at z = 1, same predictions."""
    data = tiny_data(n=30)
    train, test = data.train.batch(range(20)), data.test.batch(range(15))
    got = [kernel_predictor_accuracy(tiny_bert(degree=k, head="frozen"), train, test, ridge=0.05)
           for k in (1, 4)]
    assert torch.equal(got[0]["predictions"], got[1]["predictions"])
    assert got[1]["mean_diagonal"] == pytest.approx(16 * got[0]["mean_diagonal"], rel=1e-9)


def test_kernel_predictor_bad_input():
    model, data = tiny_bert(degree=2), tiny_data()
    train, test = data.train.batch(range(6)), data.test.batch(range(4))
    with pytest.raises(ValueError, match="labels"):
        kernel_predictor_accuracy(model, {k: v for k, v in train.items() if k != "labels"}, test)
    with pytest.raises(ValueError, match="outputs"):
        kernel_predictor_accuracy(model, train, {**test, "labels": test["labels"] + 5})
    with pytest.raises(ValueError, match="ridge"):
        kernel_predictor_accuracy(model, train, test, ridge=-1.0)


# --------------------------------------------------------------------------------------------
# the real MiniLM
# --------------------------------------------------------------------------------------------


@pytest.mark.realmodel
def test_minilm_propulsion_snapshot(minilm_path, minilm_tokenizer, tmp_path):
    model = prepare(load_minilm(minilm_path, dtype=torch.float32), "propulsion", head="frozen", degree=5)
    enc = minilm_tokenizer(SENTENCES, padding=True, return_tensors="pt")
    split = EncodedSplit(enc["input_ids"], enc["attention_mask"], torch.tensor([1, 0, 1, 0]))
    data = EncodedSplits(split, split, split, 2, "sentences")
    rows: list[dict] = []
    state = TrainState(SimpleNamespace(steps=10, clip_norm=None), model, None, None, data,  # type: ignore[arg-type]
                       torch.device("cpu"), tmp_path, _sink=rows.append)
    tracker = KernelTracker(probe_size=4)
    tracker.on_start(state)
    (kernel_row,) = of_kind(rows, "kernel")
    assert kernel_row["jacobian_mode"] == "exact" and kernel_row["n_probe"] == 4
    assert kernel_row["kernel_distance"] == pytest.approx(0.0, abs=1e-12)
    assert kernel_row["jacobian_drift"] == 0
    assert math.isfinite(kernel_row["kta"])
    n_layers = len({r["layer"] for r in of_kind(rows, "z")})
    assert n_layers > 6 * 6 and len(of_kind(rows, "z")) == 3 * n_layers
    k0 = load_file(str(tmp_path / "kernels" / "initial.safetensors"))["trained"]
    assert k0.shape == (4, 4) and k0.dtype == torch.float64 and bool((k0.diagonal() > 0).all())
