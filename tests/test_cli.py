"""The propulsion-ntk command: info, count and the demo on a tiny configuration."""

from __future__ import annotations

import json

import pytest

from experiments import cli
from experiments.demo import DemoConfig, main


def test_info_lists_versions_and_offline_resources(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "minilm" in out and "MISSING" not in out


def test_count_reproduces_the_papers_roberta_numbers(capsys):
    assert cli.main(["count", "--model", "roberta-base"]) == 0
    out = capsys.readouterr().out
    assert "86,018" in out and "124,647,170" in out and "27,648" in out


def test_count_rejects_an_unknown_model(capsys):
    assert cli.main(["count", "--model", "no-such-model"]) == 2
    assert "unknown architecture" in capsys.readouterr().err


@pytest.mark.realmodel
def test_demo_trains_merges_and_reloads(tmp_path):
    summary = main(DemoConfig(steps=3, batch_size=4, eval_examples=16, out=str(tmp_path),
                              progress=False))
    assert summary["max_abs_diff_merged_vs_unmerged"] < 1e-4 * max(1.0, summary["max_abs_logit"])
    assert summary["max_abs_diff_reloaded_vs_unmerged"] < 1e-6
    assert json.loads((tmp_path / "summary.json").read_text())["config"]["steps"] == 3
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("bad", [{"steps": 0}, {"lr": 0.0}, {"degree": 0}])
def test_demo_config_rejects_bad_values(bad):
    with pytest.raises(ValueError):
        DemoConfig(**bad)


# ------------------------------------------------------------------ experiment suite -----
def test_list_shows_experiments_claims_and_presets(capsys):
    assert cli.main(["list"]) == 0
    out = capsys.readouterr().out
    assert "e7_parameter_counts" in out and "parameter_count" in out and "tiny, quick, study, full" in out


def test_run_figures_report_on_the_tiny_preset(tmp_path, capsys):
    runs, figs, out = str(tmp_path / "runs"), str(tmp_path / "figs"), str(tmp_path / "report")
    assert cli.main(["run", "e7", "--preset", "tiny", "--out", runs]) == 0
    assert "0 unit(s) reused, 1 computed" in capsys.readouterr().out
    assert cli.main(["run", "e7_parameter_counts", "--preset", "tiny", "--out", runs]) == 0
    assert "1 unit(s) reused, 0 computed" in capsys.readouterr().out
    assert cli.main(["figures", "--results", runs, "--out", figs]) == 0
    assert (tmp_path / "figs" / "e7_parameter_counts.pdf").is_file()
    assert cli.main(["report", "--results", runs, "--out", out, "--figures", figs]) == 0
    assert "supported" in (tmp_path / "report" / "claims.md").read_text()
    assert (tmp_path / "report" / "claims.html").is_file()
    # Another config into the same folder is refused, with what to do.
    assert cli.main(["run", "e7", "--preset", "tiny", "--out", runs, "--set", "lora_r=4"]) == 2
    assert "another configuration" in capsys.readouterr().err


def test_run_all_runs_every_registered_experiment(tmp_path, capsys, monkeypatch):
    import experiments.suite as suite

    only_e7 = {"e7_parameter_counts": suite.EXPERIMENTS["e7_parameter_counts"]}
    monkeypatch.setattr(suite, "EXPERIMENTS", only_e7)
    assert cli.main(["run", "all", "--preset", "tiny", "--out", str(tmp_path), "--set", "num_labels=3"]) == 0
    assert "e7_parameter_counts [tiny]" in capsys.readouterr().out
    assert (tmp_path / "e7_parameter_counts" / "provenance.json").is_file()


@pytest.mark.parametrize(("argv", "message"), [
    (["run", "e99"], "unknown experiment 'e99'; choose one of"),
    (["run", "e7", "--set", "nope=1"], "has the field(s) ['nope']"),
    (["run", "e7", "--set", "lora_r"], "--set expects key=value"),
    (["figures", "--results", "{tmp}/none"], "no experiment results in"),
    (["report", "--results", "{tmp}/none"], "no experiment results in"),
])
def test_suite_commands_fail_clearly(tmp_path, capsys, argv, message):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    argv += ["--out", str(tmp_path)] if argv[0] == "run" else []
    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err


def test_unknown_preset_lists_the_choices(capsys):
    with pytest.raises(SystemExit):
        cli.main(["run", "e7", "--preset", "huge"])
    assert "choose from 'tiny', 'quick', 'study', 'full'" in capsys.readouterr().err


def test_cuda_on_a_machine_without_it(tmp_path, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli.main(["run", "e7", "--preset", "tiny", "--device", "cuda", "--out", str(tmp_path)]) == 2
    assert "CUDA is not available" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_train_subcommand_hands_every_flag_to_the_trainer(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    assert "--eval-every" in capsys.readouterr().out
    assert cli.main(["train", "--out", "unused", "--lr", "-1"]) == 2
    assert "lr must be a positive" in capsys.readouterr().err


def test_run_sweep_gathers_one_table_and_resumes(tmp_path, capsys):
    import pandas as pd

    argv = ["run", "e7", "--preset", "tiny", "--out", str(tmp_path), "--sweep", "lora_r=4,8"]
    assert cli.main(argv) == 0
    table = pd.read_parquet(tmp_path / "sweep-e7_parameter_counts" / "results.parquet")
    assert sorted(table["lora_r"].unique()) == [4, 8] and set(table["verdict"]) <= {
        "supported", "not supported", "inconclusive"}
    units = sorted((tmp_path / "sweep-e7_parameter_counts" / "units").glob("*.parquet"))
    stamps = [p.stat().st_mtime_ns for p in units]
    assert cli.main(argv) == 0  # finished units are reused, not recomputed
    assert [p.stat().st_mtime_ns for p in units] == stamps
    assert cli.main(["run", "e7", "--preset", "tiny", "--out", str(tmp_path), "--sweep", "nope=1,2"]) == 2
    assert "has no field(s) ['nope']" in capsys.readouterr().err
