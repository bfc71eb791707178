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

    import experiments.data.models

    calls = []

    def load_model(name="minilm", num_labels=2, *, dtype=torch.float32, device="cpu", seed=0):
        calls.append(name)
        torch.manual_seed(seed)
        config = BertConfig(
            vocab_size=30522,
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            max_position_embeddings=64,
            num_labels=num_labels,
        )
        return BertForSequenceClassification(config).to(device=device, dtype=dtype).eval()

    monkeypatch.setattr(experiments.data.models, "load_model", load_model)
    monkeypatch.setenv("PROPULSION_NTK_CACHE", str(tmp_path / "cache"))
    return calls


@pytest.mark.parametrize("name", ["e3", "e4", "e5", "e6", "e9"])
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
        rows.append(
            {
                "run": run,
                "step": 10 * i,
                "kind": "train",
                "seconds": seconds,
                "peak_memory_mb": peak,
                "loss": 0.5,
            }
        )
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
    rows = pd.concat(
        [
            _rows("a", [0.5, 0.7, 0.9], 0.85, method_name="x"),
            _rows("b", [0.5, 0.6, 0.65], 0.6, seconds=0.3, peak=250.0, method_name="y"),
        ]
    )
    s = summarise(rows, target=0.8, skip_steps=0).set_index("run")
    assert s.loc["a", "test_accuracy"] == 0.85 and s.loc["a", "steps_to_target"] == 20
    assert math.isnan(s.loc["b", "steps_to_target"])
    assert s.loc["b", "peak_memory_delta_mb"] == 210.0 and s.loc["b", "step_seconds"] == pytest.approx(0.3)
    assert s.loc["a", "method_name"] == "x" and s.loc["a", "trainable_parameters"] == 7


@pytest.mark.parametrize(
    ("gap", "expected"), [(0.01, "supported"), (0.04, "inconclusive"), (0.2, "not supported")]
)
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


def _e5_rows(config, delta, spread, memory_ratios):
    """Per seed: full at 0.8 + noise, Propulsion at full + delta + spread * (0, 1, -1)[seed];
    Propulsion's peak memory above baseline = memory_ratios[seed] x LoRA's (160 MiB)."""
    frames = []
    for run in get_experiment("e5").plan(config):
        name, seed = run["method_name"], run["seed"]
        base = 0.8 + (0.0, 0.01, -0.01)[seed]
        test = {
            "full": base,
            "lora": base - 0.01,
            "ia3": base - 0.02,
            "propulsion": base + delta + spread * (0, 1, -1)[seed],
        }[name]
        peak = {"full": 500.0, "lora": 200.0, "ia3": 220.0, "propulsion": 40.0 + 160.0 * memory_ratios[seed]}[
            name
        ]
        frames.append(
            _rows(
                run["unit"],
                [0.5, 0.9],
                test,
                peak=peak,
                dataset=run["dataset"],
                method_name=name,
                run_seed=seed,
                peak_lr=1e-3,
            )
        )
    return pd.concat(frames, ignore_index=True)


@pytest.mark.parametrize(
    ("delta", "spread", "memory", "expected"),
    [
        (0.0, 0.004, (0.5, 0.5, 0.5), ("supported", "supported")),  # lower bound above -margin; ratio <= 0.9
        (-0.10, 0.004, (1.6, 1.6, 1.6), ("not supported", "not supported")),  # upper bound below -margin
        (-0.02, 0.03, (0.9, 1.1, 1.0), ("inconclusive", "inconclusive")),  # intervals straddle the thresholds
    ],
)
def test_e5_verdicts_are_paired_non_inferiority_on_intervals(delta, spread, memory, expected, monkeypatch):
    e5 = get_experiment("e5")
    config = e5.PRESETS["tiny"].replace(
        methods=("full", "lora", "ia3", "propulsion"),
        seeds=(0, 1, 2),
        target_accuracy=0.8,
        lr_grids=e5.DEFAULT_GRIDS,
    )
    rows = _e5_rows(config, delta, spread, memory)
    tuning = pd.DataFrame(
        {
            "key": ["full"],
            "lr": [1e-3],
            "best_val_accuracy": [0.8],
            "chosen": [True],
            "dataset": ["rotten_tomatoes"],
        }
    )
    monkeypatch.setattr(e5, "load", lambda store, cfg: (rows, summarise(rows, target=cfg.target_accuracy)))
    monkeypatch.setattr(e5, "tuning_tables", lambda store, cfg: tuning)
    by_claim = {v.claim: v for v in e5.verdicts(None, config)}
    assert (by_claim["accuracy"].verdict, by_claim["memory"].verdict) == expected
    assert by_claim["accuracy"].n == 3 and by_claim["accuracy"].decided_by
    assert by_claim["accuracy"].value == pytest.approx(delta)
    assert by_claim["convergence"].verdict == "supported"  # both reach the target at the same step
    assert "e8" in by_claim["memory"].statement and "CPU" in by_claim["memory"].measurement
    assert ("seeds would decide" in by_claim["accuracy"].measurement) == (expected[0] == "inconclusive")


@pytest.mark.parametrize(
    ("tuned", "kernel", "expected"),
    [
        (0.80, 0.79, "supported"),
        (0.80, 0.60, "not supported"),
        (0.55, 0.55, "inconclusive"),
    ],
)
def test_e6_verdict_needs_a_run_that_learned(tuned, kernel, expected, monkeypatch):
    e6 = get_experiment("e6")
    config = e6.PRESETS["quick"].replace(seeds=(0, 1, 2))
    rows = []
    for seed, wobble in zip(config.seeds, (0.0, 0.005, -0.005), strict=True):
        rows.append(
            {
                "method_name": "full",
                "run_seed": seed,
                "kernel_accuracy": 0.7,
                "finetuned_accuracy": 0.75,
                "peak_lr": 1e-2,
            }
        )
        rows.append(
            {
                "method_name": "propulsion",
                "run_seed": seed,
                "kernel_accuracy": kernel + wobble,
                "finetuned_accuracy": tuned + wobble / 2,
                "peak_lr": 1e-1,
            }
        )
    table = pd.DataFrame(rows)
    table["gap"] = (table["kernel_accuracy"] - table["finetuned_accuracy"]).abs()
    monkeypatch.setattr(e6, "comparison", lambda store, cfg: table)
    tuning = pd.DataFrame({"key": ["full", "propulsion"], "lr": [1e-2, 1e-1], "best_val_accuracy": [0.7, 0.7],
                           "status": "finished", "chosen": True})
    store = type("TuningOnly", (), {"load_table": lambda self, unit: tuning})()
    [verdict] = e6.verdicts(store, config)
    assert verdict.verdict == expected and verdict.n == 3
    assert "NTK (matches SGD)" in verdict.measurement


def _e3_final(distance, drift, gap, spread=0.01):
    rows = []
    for treatment, k in (("probe_then_z", 1), ("probe_then_z", 5), ("full", math.nan)):
        for seed, w in enumerate((0.0, spread, -spread)):
            rows.append(
                {
                    "run": f"{treatment}{k}{seed}",
                    "method_name": treatment,
                    "treatment": treatment,
                    "k": k,
                    "peak_lr": 1e-3,
                    "run_seed": seed,
                    "status": "finished",
                    "centred_distance": distance + w,
                    "uncentred_distance": distance / 10,
                    "jacobian_drift": drift + w,
                    "linearisation_gap": gap + w,
                    "accuracy_real": 0.8,
                    "accuracy_lin": 0.8,
                    "zk_min": 0.9,
                    "zk_max": 1.1,
                }
            )
    return pd.DataFrame(rows)


@pytest.mark.parametrize(
    ("distance", "drift", "gap", "expected"),
    [
        (0.02, 0.03, 0.05, "supported"),  # all three upper bounds below their support thresholds
        (0.02, 0.03, 0.50, "not supported"),  # one lower bound beyond its refute threshold suffices
        (0.02, 0.20, 0.05, "inconclusive"),  # the drift interval lies between the thresholds
    ],
)
def test_e3_verdict_needs_all_three_criteria(distance, drift, gap, expected, monkeypatch):
    e3 = get_experiment("e3")
    config = e3.PRESETS["tiny"].replace(degrees=(1, 5), baselines=("full",))
    monkeypatch.setattr(e3, "load", lambda store, cfg: (None, None))
    final = _e3_final(distance, drift, gap)
    monkeypatch.setattr(e3, "final_metrics", lambda rows, drift: final)
    tuning = pd.DataFrame(
        {
            "key": ["propulsion_k1"],
            "lr": [1e-3],
            "best_val_accuracy": [math.nan],
            "status": ["given"],
            "chosen": [True],
        }
    )
    monkeypatch.setattr(e3, "tuning_table", lambda store: tuning)
    verdicts = e3.verdicts(None, config)
    assert [v.verdict for v in verdicts] == [expected, expected]  # k = 1 and 5; full is calibration only
    assert all("z rate" in v.measurement and "calibration: full" in v.measurement for v in verdicts)
    assert all("[0.001 (given, not tuned)]" in v.measurement for v in verdicts)
    assert all(v.decided_by.count("(") >= 3 for v in verdicts)


@pytest.mark.parametrize(
    ("gain", "expected"), [(0.05, "supported"), (-0.02, "not supported"), (0.012, "inconclusive")]
)
def test_e9_verdict_is_the_paired_gain_of_the_papers_degree(gain, expected, monkeypatch):
    e9 = get_experiment("e9")
    config = e9.PRESETS["tiny"].replace(seeds=(0, 1, 2))
    rows = []
    for seed, w in zip(config.seeds, (0.0, 0.01, -0.01), strict=True):
        rows.append({"run": f"a{seed}", "k": 1, "run_seed": seed, "test_accuracy": 0.75 + w, "peak_lr": 1e-2})
        rows.append(
            {
                "run": f"b{seed}",
                "k": 3,
                "run_seed": seed,
                "test_accuracy": 0.75 + w + gain + w / 4,
                "peak_lr": 1e-3,
            }
        )
    tuning = pd.DataFrame(
        {
            "key": ["propulsion_k1", "propulsion_k1"],
            "lr": [1e-3, 1e-2],
            "best_val_accuracy": [0.7, 0.75],
            "chosen": [False, True],
        }
    )
    monkeypatch.setattr(e9, "load", lambda store, cfg: (pd.DataFrame(rows), tuning))
    [verdict] = e9.verdicts(None, config)
    assert verdict.verdict == expected and verdict.n == 3
    assert "propulsion_k1: 0.001 (0.700), [0.01 (0.750)]" in verdict.measurement


def test_tuning_chooses_on_validation_ties_to_the_smaller_rate_and_never_a_diverged_one():
    from experiments.suite._tuning import choose, chosen, grid_edge, grid_text

    summaries = pd.DataFrame(
        {
            "key": ["a"] * 6 + ["b"] * 2,
            "lr": [1e-3, 1e-3, 1e-2, 1e-2, 1e-1, 1e-1, 1e-3, 1e-2],
            "status": ["finished"] * 4 + ["finished", "stopped_nan"] + ["finished"] * 2,
            "best_val_accuracy": [0.70, 0.72, 0.80, 0.78, 0.99, 0.99, 0.6, 0.6],
        }
    )
    table = choose(summaries)
    assert chosen(table) == {"a": 1e-2, "b": 1e-3}
    # a's pick is bracketed (1e-1 diverged); b's is its smallest rate: the text says so
    assert [grid_edge(g) for _, g in table.groupby("key")] == [None, "lower"]
    assert grid_text(table).endswith("[0.001 (0.600)], 0.01 (0.600) (chosen at the lower edge of the grid: "
                                     "a better rate may lie beyond it)")
    diverged = table[(table["key"] == "a") & (table["lr"] == 1e-1)].iloc[0]
    assert diverged["best_val_accuracy"] == -math.inf and diverged["status"] == "stopped_nan"
    assert table.loc[
        (table["key"] == "a") & (table["lr"] == 1e-3), "best_val_accuracy"
    ].item() == pytest.approx(0.71)
    with pytest.raises(RuntimeError, match="every learning rate of c diverged"):
        choose(
            pd.DataFrame({"key": ["c"], "lr": [1.0], "status": ["stopped_nan"], "best_val_accuracy": [0.5]})
        )


def test_tuning_runs_a_tiny_grid_once_and_reuses_it(tiny_bert, tmp_path):
    from experiments.suite import _tuning

    setup = _tuning.TuningSetup(
        steps=2, batch_size=4, max_length=12, max_examples=60, eval_every=1, eval_examples=8
    )
    cands = [_tuning.Candidate("propulsion", 2, (1e-2, 1e-3))]
    table = _tuning.tune(tmp_path, setup, cands)
    assert list(table["lr"]) == [1e-3, 1e-2] and table["chosen"].sum() == 1
    best = table.loc[table["best_val_accuracy"].idxmax()]
    assert _tuning.chosen(table) == {"propulsion_k2": best["lr"]} or (
        table["best_val_accuracy"].nunique() == 1 and _tuning.chosen(table)["propulsion_k2"] == 1e-3
    )
    loads = len(tiny_bert)
    again = _tuning.tune(tmp_path, setup, cands)  # every unit reused
    assert len(tiny_bert) == loads and again.equals(table)
    with pytest.raises(ValueError, match="positive finite"):
        _tuning.Candidate("propulsion", 2, (0.0,))


def test_probe_then_z_freezes_the_probe_head_and_trains_only_backbone_z(tiny_bert, tmp_path):
    """The z-isolating variant: the head copied from the probe, frozen, no z on it; only z trains."""
    from types import SimpleNamespace

    from safetensors.torch import save_file

    import experiments.data.models
    from experiments.training.methods import prepare

    e3 = get_experiment("e3")
    config = e3.PRESETS["tiny"]
    run = next(r for r in e3.plan(config) if r["treatment"] == "probe_then_z")
    cfg, lr = e3.run_config(config, run, {f"propulsion_k{run['degree']}": 3e-3})
    assert lr == 3e-3 and cfg.head == "frozen" and cfg.dropout == 0.0
    model = prepare(
        experiments.data.models.load_model("minilm", 2), cfg.method, head=cfg.head, **cfg.prepare_options()
    )
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trained and all("propulsion_z" in n and not n.startswith("classifier") for n in trained)
    head = {"classifier.weight": torch.full((2, 16), 0.25), "classifier.bias": torch.tensor([1.0, -1.0])}
    save_file(head, str(tmp_path / "best.safetensors"))
    e3.HeadFromProbe(tmp_path / "best.safetensors").on_start(SimpleNamespace(model=model))
    assert torch.equal(model.classifier.weight, head["classifier.weight"])
    assert torch.equal(model.classifier.bias, head["classifier.bias"])
    probe = e3.probe_config(config, 0)
    assert probe.method == "head" and probe.save_best and probe.steps == config.probe_steps
    with pytest.raises(ValueError, match="not in this model"):
        save_file({"nope.weight": torch.zeros(1)}, str(tmp_path / "bad.safetensors"))
        e3.HeadFromProbe(tmp_path / "bad.safetensors").on_start(SimpleNamespace(model=model))


def test_train_config_reads_the_shared_fields_and_method_spec_sets_the_degree():
    from experiments.suite._training import METHOD_SPECS, method_spec, seeds_to_decide, train_config

    e5 = get_experiment("e5")
    assert e5.METHOD_SPECS is METHOD_SPECS  # one home, re-exported
    config = e5.PRESETS["tiny"]
    cfg = train_config(
        config, method_name="propulsion", degree=7, lr=1e-3, seed=4, dataset="imdb", optimizer="sgd"
    )
    assert dict(cfg.method_options)["degree"] == 7 and cfg.dataset == "imdb" and cfg.optimizer == "sgd"
    assert (cfg.steps, cfg.batch_size, cfg.max_length, cfg.seed) == (
        config.steps,
        config.batch_size,
        config.max_length,
        4,
    )
    assert cfg.warmup_steps == config.steps // 10 and not cfg.save_best
    with pytest.raises(ValueError, match="no degree"):
        method_spec("full", 3)
    with pytest.raises(ValueError, match="unknown method"):
        method_spec("adapter")
    assert seeds_to_decide([0.01, 0.03, 0.02], 0.0) == 4 and seeds_to_decide([0.0, 0.02, -0.02], 0.0) == 0
    assert seeds_to_decide([0.004, 0.03, -0.01], -0.02) > 3


@pytest.mark.realmodel
def test_isolated_run_trains_in_another_process(tmp_path, monkeypatch):
    """e5 trains each run in a fresh process on a CPU (its RSS peak is its own); the parent only
    reads the stored result, so a parent whose model loader fails still gets the rows."""
    import experiments.data.models
    from experiments.suite._training import run_training
    from experiments.suite.base import ExperimentConfig, Store
    from experiments.training.config import TrainConfig

    def no_loading_here(*args, **kwargs):
        raise AssertionError("the parent process loaded a model")

    monkeypatch.setattr(experiments.data.models, "load_model", no_loading_here)
    monkeypatch.setenv("PROPULSION_NTK_CACHE", str(tmp_path / "cache"))
    store = Store(tmp_path, "iso", ExperimentConfig())
    config = TrainConfig(
        method="propulsion",
        steps=2,
        batch_size=4,
        max_length=12,
        max_examples=60,
        eval_every=2,
        eval_examples=8,
        checkpoint_every=None,
        save_best=False,
    )
    rows = run_training(store, "runs/a", config, tags={"method_name": "propulsion"}, isolate=True)
    assert set(rows["kind"]) >= {"train", "eval", "test"} and store.done("runs/a")
    assert (rows["status"] == "finished").all()


def test_report_lists_the_toolkits_hypothesis_apart_from_the_papers_claims(tmp_path):
    from experiments.suite.base import Verdict
    from experiments.suite.report import ExperimentVerdicts, render_html, render_markdown

    def verdict(claim, statement):
        return Verdict(
            claim=claim,
            statement=statement,
            measurement="m",
            value=0.5,
            threshold="t",
            verdict="inconclusive",
            figure=None,
            experiment="eX",
        )

    exp = ExperimentVerdicts(
        "eX",
        "title",
        "tiny",
        {},
        {},
        (
            verdict("degree_is_lr", "k acts as a learning-rate factor"),
            verdict("higher_degree_helps", "higher k helps"),
        ),
        None,
    )
    text = render_markdown([exp], tmp_path, tmp_path)
    claims_part, hypotheses_part = text.split("## Summary: the toolkit's hypotheses")
    assert "| higher_degree_helps |" in claims_part and "degree_is_lr" not in claims_part
    assert "| degree_is_lr |" in hypotheses_part
    assert "# Hypotheses of this toolkit (not claims of the paper)" in hypotheses_part
    sections = hypotheses_part.split("# Hypotheses of this toolkit (not claims of the paper)")
    assert "A higher degree k gives higher accuracy" in sections[0]
    assert "learning-rate factor (the toolkit's hypothesis" in sections[1]
    html = render_html([exp], tmp_path, tmp_path)
    assert html.index("Summary: the toolkit's hypotheses") < html.index("k acts as a learning-rate factor")


def test_signgd_kernel_diagonal_is_the_l1_norm_of_the_gradients_and_it_predicts(tiny_bert):
    """Sign-GD kernel (the Adam option of e6): K(x, x) = sum_c ||J_c(x)||_1, K(x, x') = <J(x), sign J(x')>;
    too large a Jacobian is refused with the numbers."""
    import experiments.data.models
    from experiments.dynamics.tracking import jacobian, model_inputs
    from experiments.training.methods import prepare

    e6 = get_experiment("e6")
    model = prepare(experiments.data.models.load_model("minilm", 2), "propulsion", head="train", degree=3)
    torch.manual_seed(0)
    ids = torch.randint(1000, 2000, (6, 7))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor([0, 1] * 3)}
    train = {k: v[:4] for k, v in batch.items()}
    test = {k: v[4:] for k, v in batch.items()}
    k_train, k_test = e6.signgd_kernels(model, train, test, max_bytes=2**30)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    j = jacobian(model, model_inputs(batch), names).double()
    assert torch.allclose(k_train.diagonal(), j[:4].abs().sum(dim=(1, 2)))
    assert torch.allclose(k_test[1, 2], (j[5] * torch.sign(j[2])).sum())
    assert not torch.allclose(k_train, k_train.T)  # asymmetric in general
    result = e6.signgd_predict(model, train, test, ridge=1e-3, max_bytes=2**30)
    assert 0 <= result["accuracy"] <= 1 and result["n_train"] == 4 and result["n_test"] == 2
    with pytest.raises(ValueError, match="max_jacobian_bytes"):
        e6.signgd_kernels(model, train, test, max_bytes=10)


def test_e3_figures_draw_treatments_baselines_and_bands_from_saved_rows(monkeypatch, tmp_path):
    """final_metrics reads the last snapshot of each run; both figures draw every treatment, the
    calibration baseline with its band, and the centred drift per k over steps."""
    from types import SimpleNamespace

    e3 = get_experiment("e3")
    config = e3.PRESETS["tiny"].replace(degrees=(1, 5), treatment_degrees=(5,), baselines=("full",))
    rows, drift = [], []
    for run in e3.plan(config):
        k = math.nan if run["degree"] is None else run["degree"]
        tags = {
            "run": run["unit"],
            "method_name": run["label"],
            "treatment": run["treatment"],
            "k": k,
            "peak_lr": 1e-3,
            "run_seed": run["seed"],
            "status": "finished",
        }
        scale = 0.01 * (1 if math.isnan(k) else k) * (1 + 0.1 * run["seed"])
        for step in (0, 2, 4):
            rows.append({**tags, "step": step, "kind": "kernel", "jacobian_drift": scale * step})
            rows.append(
                {
                    **tags,
                    "step": step,
                    "kind": "linearised",
                    "gap_rel": 2 * scale * step,
                    "accuracy_real": 0.7,
                    "accuracy_lin": 0.6,
                }
            )
            drift.append(
                {
                    **tags,
                    "step": step,
                    "centred_distance": scale * step / 4,
                    "uncentred_distance": scale * step / 40,
                }
            )
    rows, drift = pd.DataFrame(rows), pd.DataFrame(drift)
    final = e3.final_metrics(rows, drift)
    last = final[(final["treatment"] == "probe_then_z") & (final["k"] == 5) & (final["run_seed"] == 1)].iloc[
        0
    ]
    assert last["jacobian_drift"] == pytest.approx(0.05 * 1.1 * 4) and last[
        "centred_distance"
    ] == pytest.approx(0.055)
    table = e3.intervals(final)
    assert set(table["treatment"]) == {"probe_then_z", "head_trained", "z_head", "full"}
    assert (table["seeds"] == 2).all() and (table["jacobian_drift_low"] < table["jacobian_drift"]).all()
    monkeypatch.setattr(e3, "load", lambda store, cfg: (rows, drift))
    paths = e3.figures(SimpleNamespace(config=config), tmp_path)
    assert sorted(p.name for p in paths) == [
        "e3_drift_vs_degree.pdf",
        "e3_drift_vs_degree.png",
        "e3_kernel_distance_vs_steps.pdf",
        "e3_kernel_distance_vs_steps.png",
    ]
