"""The claims report: built from saved results only, verdicts from the numbers, deterministic."""

from __future__ import annotations

import pytest

from experiments.suite import draw_figures, run_experiment, write_report
from experiments.suite import e7_parameter_counts as e7
from experiments.suite.base import MissingResultError, Store


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("suite")
    run_experiment("e7", "tiny", out=root / "runs")
    return root


def test_report_lists_each_verdict_with_rule_setup_and_figure(results):
    figs = results / "figs"
    draw_figures(results / "runs", figs)
    md = write_report(results / "runs", results / "out" / "claims.md", fig_dir=figs)
    text = md.read_text()
    assert md.with_suffix(".html").is_file()
    row = "| parameter_count | Propulsion trains about 0.1% of a model's parameters. | 0.06901 | **supported"
    assert row in text
    assert "supported if largest share (%) <= 0.15; not supported if largest share (%) > 0.3" in text
    assert "e7_parameter_counts (preset tiny): seed=0" in text and "models=['roberta-base']" in text
    assert "![e7_parameter_counts](../figs/e7_parameter_counts.png)" in text
    html = md.with_suffix(".html").read_text()
    assert '<img src="../figs/e7_parameter_counts.png"' in html and 'class="supported"' in html
    first = (md.read_bytes(), md.with_suffix(".html").read_bytes())
    write_report(results / "runs", results / "out" / "claims.md", fig_dir=figs)
    assert (md.read_bytes(), md.with_suffix(".html").read_bytes()) == first  # deterministic


def test_report_verdicts_change_with_the_saved_numbers(results, tmp_path):
    frame = Store.open_existing(results / "runs", e7.NAME, e7.Config).load_table("counts/roberta-base")
    rows = frame["method"].str.startswith("propulsion")
    frame.loc[rows, "trainable"] *= 10  # 0.69%: above the 0.3% rule
    frame["percent"] = 100 * frame["trainable"] / frame["full_model"]
    Store(tmp_path, e7.NAME, e7.PRESETS["tiny"]).save_table("counts/roberta-base", frame)
    text = write_report(tmp_path, tmp_path / "claims.md", fig_dir=tmp_path / "no-figures").read_text()
    assert "| 0.6901 | **not supported** |" in text
    assert "Figure `e7_parameter_counts` not drawn yet" in text


def test_report_names_incomplete_and_missing_results(tmp_path):
    with pytest.raises(MissingResultError, match="no experiment results in"):
        write_report(tmp_path, tmp_path / "claims.md")
    Store(tmp_path, e7.NAME, e7.PRESETS["tiny"])  # opened, nothing computed
    text = write_report(tmp_path, tmp_path / "claims").read_text()
    assert "## Missing or partial experiments" in text and "counts/roberta-base" in text
    assert f"`propulsion-ntk run e7 --out {tmp_path} --preset tiny`" in text  # resumes that very config
    # a run still going (no provenance.json yet) names its preset for the experiments not started
    assert f"`propulsion-ntk run e1 --out {tmp_path} --preset tiny`" in text
    with pytest.raises(MissingResultError, match="counts/roberta-base"):
        draw_figures(tmp_path, tmp_path / "figs")


def test_report_lists_every_experiment_that_never_ran_with_its_command(results):
    """A folder holding only e7: every other experiment is named, with the line that fills them."""
    from experiments.suite import EXPERIMENTS

    md = write_report(results / "runs", results / "only-e7" / "claims.md")
    text, html = md.read_text(), md.with_suffix(".html").read_text()
    others = [name for name in EXPERIMENTS if name != e7.NAME]
    assert len(others) == len(EXPERIMENTS) - 1 >= 6
    for name in others:
        short = name.split("_", 1)[0]
        line = f"propulsion-ntk run {short} --out {results / 'runs'} --preset tiny"
        assert f"- {name} (" in text and "never ran" in text and f"`{line}`" in text
        assert f"<code>{line}</code>" in html
    assert f"- {e7.NAME} (" not in text  # complete: not listed


def test_report_refuses_the_folder_of_one_experiment(results):
    with pytest.raises(ValueError, match="results folder of one experiment; give its parent"):
        write_report(results / "runs" / e7.NAME, results / "x" / "claims.md")


def test_readme_states_the_committed_report_summary():
    """The README's claims table is the summary of figures/claims.md, byte for byte."""
    from pathlib import Path

    from experiments.suite.report import README_END, README_START, summary_table

    root = Path(__file__).resolve().parent.parent
    readme = (root / "README.md").read_text(encoding="utf-8")
    block = readme.split(README_START, 1)[1].split(README_END, 1)[0].strip()
    assert block == summary_table((root / "figures" / "claims.md").read_text(encoding="utf-8"))


def test_sync_readme_fills_the_block_and_refuses_a_readme_without_one(tmp_path):
    from experiments.suite.report import README_END, README_START, sync_readme

    claims = tmp_path / "claims.md"
    table = "| a | b |\n|---|---|\n| x | **supported** |"
    claims.write_text(f"# Claims report\n\n## Summary\n\n{table}\n\n## More\n")
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{README_START}\nold\n{README_END}\nrest\n")
    assert sync_readme(readme, claims) is True
    assert readme.read_text() == f"intro\n{README_START}\n{table}\n{README_END}\nrest\n"
    assert sync_readme(readme, claims) is False
    (tmp_path / "bare.md").write_text("no block\n")
    with pytest.raises(ValueError, match="claims-summary"):
        sync_readme(tmp_path / "bare.md", claims)


def test_fill_command_resumes_a_nested_field_as_json(tmp_path):
    from experiments.suite import e9_degree_accuracy as e9
    from experiments.suite import fill_command, preset_of

    config = e9.PRESETS["tiny"].replace(lr_grids="[[1, [0.002]], [15, [0.0005]]]")
    assert preset_of(e9.NAME, e9.PRESETS["tiny"]) == "tiny" and preset_of(e9.NAME, config) is None
    line = fill_command(e9.NAME, tmp_path, config)
    assert line.endswith("--preset tiny --set lr_grids='[[1, [0.002]], [15, [0.0005]]]'")

