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
