"""Experiments 3-6 (the ones that fine-tune) on their tiny presets, with a tiny random BERT in
place of MiniLM (same tokenizer), and their verdict rules on both sides of each threshold."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

from experiments.suite import get_experiment, run_experiment
from experiments.suite._training import summarise


@pytest.fixture
def tiny_bert(monkeypatch, tmp_path):
    """``load_model`` returns a 1-layer BERT of hidden size 16 (MiniLM's vocabulary), seeded."""
    from transformers import BertConfig, BertForSequenceClassification

    import experiments.models

    calls = []

    def load_model(name="minilm", num_labels=2, *, dtype=torch.float32, device="cpu", seed=0):
        calls.append(name)
        torch.manual_seed(seed)
        config = BertConfig(vocab_size=30522, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                            intermediate_size=32, max_position_embeddings=64, num_labels=num_labels)
        return BertForSequenceClassification(config).to(device=device, dtype=dtype).eval()

    monkeypatch.setattr(experiments.models, "load_model", load_model)
    monkeypatch.setenv("PROPULSION_NTK_CACHE", str(tmp_path / "cache"))
    return calls


@pytest.mark.parametrize("name", ["e3", "e4", "e5", "e6"])
def test_tiny_preset_runs_draws_and_decides(name, tiny_bert, tmp_path):
    module = get_experiment(name)
    store = run_experiment(name, "tiny", out=tmp_path / "results")
    assert store.computed and not store.reused
    loads = len(tiny_bert)
    paths = module.figures(store, tmp_path / "figures")
    assert paths and all(p.exists() and p.stat().st_size > 0 for p in paths)
    assert {p.suffix for p in paths} == {".pdf", ".png"}
    verdicts = module.verdicts(store, store.config)
    assert verdicts and all(v.experiment == module.NAME and v.claim in module.CLAIMS for v in verdicts)
    again = run_experiment(name, "tiny", out=tmp_path / "results")  # everything reused
    assert again.computed == [] and set(again.reused) == set(store.units())
    assert len(tiny_bert) == loads  # no model was loaded the second time


def _rows(run, accuracies, test, seconds=0.1, peak=100.0, **tags):
    rows = [{"run": run, "step": 0, "kind": "eval", "accuracy": accuracies[0], "macro_f1": 0.5}]
    for i, acc in enumerate(accuracies[1:], start=1):
        rows.append({"run": run, "step": 10 * i, "kind": "train", "seconds": seconds, "peak_memory_mb": peak,
                     "loss": 0.5})
        rows.append({"run": run, "step": 10 * i, "kind": "eval", "accuracy": acc, "macro_f1": 0.5})
    rows.append({"run": run, "step": 10, "kind": "test", "accuracy": test, "macro_f1": 0.4})
    frame = pd.DataFrame(rows)
    frame["baseline_memory_mb"] = 40.0
    frame["status"] = "finished"
    frame["trainable_parameters"] = 7
    for key, value in tags.items():
        frame[key] = value
    return frame


def test_summarise_reads_test_target_time_and_memory():
    rows = pd.concat([_rows("a", [0.5, 0.7, 0.9], 0.85, method_name="x"),
                      _rows("b", [0.5, 0.6, 0.65], 0.6, seconds=0.3, peak=250.0, method_name="y")])
    s = summarise(rows, target=0.8, skip_steps=0).set_index("run")
    assert s.loc["a", "test_accuracy"] == 0.85 and s.loc["a", "steps_to_target"] == 20
    assert math.isnan(s.loc["b", "steps_to_target"])
    assert s.loc["b", "peak_memory_delta_mb"] == 210.0 and s.loc["b", "step_seconds"] == pytest.approx(0.3)
    assert s.loc["a", "method_name"] == "x" and s.loc["a", "trainable_parameters"] == 7


@pytest.mark.parametrize(("gap", "expected"), [(0.01, "supported"), (0.04, "inconclusive"),
                                               (0.2, "not supported")])
def test_e4_verdict_follows_the_accuracy_gap(gap, expected, monkeypatch):
    e4 = get_experiment("e4")
    config = e4.PRESETS["tiny"]
    frames = []
    for run in e4.plan(config):
        acc = 0.8 - (gap if run["role"] == "rescaled" else 0.0)
        tags = {k: v for k, v in run.items() if k != "unit"}
        frames.append(_rows(run["unit"], [0.5, acc], acc, **tags))
    rows = pd.concat(frames, ignore_index=True)
    monkeypatch.setattr(e4, "_rows", lambda store, cfg: rows)
    verdicts = e4.verdicts(None, config)
    assert [v.verdict for v in verdicts] == [expected, expected]
    assert all(v.value == pytest.approx(gap) for v in verdicts)


@pytest.mark.parametrize(("prop_test", "prop_peak", "expected"), [
    (0.80, 100.0, ("supported", "supported")),
    (0.70, 300.0, ("not supported", "not supported")),
])
def test_e5_verdicts_follow_accuracy_and_memory(prop_test, prop_peak, expected, monkeypatch):
    e5 = get_experiment("e5")
    config = e5.PRESETS["tiny"].replace(methods=("full", "lora", "ia3", "propulsion"), target_accuracy=0.8)
    frames = []
    for run in e5.plan(config):
        name = run["method_name"]
        test = {"full": 0.8, "lora": 0.79, "ia3": 0.78, "propulsion": prop_test}[name]
        peak = {"full": 500.0, "lora": 200.0, "ia3": 220.0, "propulsion": prop_peak}[name]
        frames.append(_rows(run["unit"], [0.5, 0.9], test, peak=peak, dataset=run["dataset"],
                            method_name=name, run_seed=run["seed"]))
    rows = pd.concat(frames, ignore_index=True)
    monkeypatch.setattr(e5, "load", lambda store, cfg: (rows, summarise(rows, target=cfg.target_accuracy)))
    by_claim = {v.claim: v for v in e5.verdicts(None, config)}
    assert (by_claim["accuracy"].verdict, by_claim["memory"].verdict) == expected
    assert by_claim["convergence"].verdict == "supported"  # both reach the target at the same step


@pytest.mark.parametrize(("tuned", "kernel", "expected"), [
    (0.80, 0.79, "supported"), (0.80, 0.60, "not supported"), (0.55, 0.55, "inconclusive"),
])
def test_e6_verdict_needs_a_run_that_learned(tuned, kernel, expected, monkeypatch):
    e6 = get_experiment("e6")
    table = pd.DataFrame({"method_name": ["full", "propulsion"], "kernel_accuracy": [0.7, kernel],
                          "finetuned_accuracy": [0.75, tuned]})
    table["gap"] = (table["kernel_accuracy"] - table["finetuned_accuracy"]).abs()
    monkeypatch.setattr(e6, "comparison", lambda store, cfg: table)
    [verdict] = e6.verdicts(None, e6.PRESETS["quick"])
    assert verdict.verdict == expected


@pytest.mark.realmodel
def test_isolated_run_trains_in_another_process(tmp_path, monkeypatch):
    """e5 trains each run in a fresh process on a CPU (its RSS peak is its own); the parent only
    reads the stored result, so a parent whose model loader fails still gets the rows."""
    import experiments.models
    from experiments.suite._training import run_training
    from experiments.suite.base import ExperimentConfig, Store
    from experiments.train import TrainConfig

    def no_loading_here(*args, **kwargs):
        raise AssertionError("the parent process loaded a model")

    monkeypatch.setattr(experiments.models, "load_model", no_loading_here)
    monkeypatch.setenv("PROPULSION_NTK_CACHE", str(tmp_path / "cache"))
    store = Store(tmp_path, "iso", ExperimentConfig())
    config = TrainConfig(method="propulsion", steps=2, batch_size=4, max_length=12, max_examples=60,
                         eval_every=2, eval_examples=8, checkpoint_every=None, save_best=False)
    rows = run_training(store, "runs/a", config, tags={"method_name": "propulsion"}, isolate=True)
    assert set(rows["kind"]) >= {"train", "eval", "test"} and store.done("runs/a")
    assert (rows["status"] == "finished").all()
