"""The suite's base (configs, Store, verdicts), the figures module, and experiment 7 (experiment 2:
test_e2_premise.py)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pytest
import torch

from experiments import figures as F
from experiments.suite import e7_parameter_counts as e7
from experiments.suite.base import (
    ExperimentConfig,
    MissingResultError,
    ResultsMismatchError,
    Store,
    atomic_path,
    decide,
    make_verdict,
    resolve_device,
)


@dataclass(frozen=True)
class Cfg(ExperimentConfig):
    n: int = field(default=3, metadata={"help": "a size"})
    widths: tuple[int, ...] = (8, 16)
    flag: bool = False
    ratio: float | None = None
    support_min: float = 0.9  # verdict thresholds: out of the hash
    refute_max: float = 0.5


# ---------------------------------------------------------------------------- configs -----
def test_config_replace_parses_strings_and_rejects_unknown_fields():
    cfg = Cfg().replace(n="5", widths="4,32", flag="true", ratio="0.5", seed="3")
    assert (cfg.n, cfg.widths, cfg.flag, cfg.ratio, cfg.seed) == (5, (4, 32), True, 0.5, 3)
    assert Cfg().replace(ratio="none").ratio is None
    assert Cfg.from_dict(cfg.to_dict()) == cfg  # JSON lists come back as tuples
    with pytest.raises(ValueError, match=r"no field.*'nope'.*fields: seed"):
        Cfg().replace(nope=1)
    with pytest.raises(ValueError, match="field n: cannot read 'x' as int"):
        Cfg().replace(n="x")
    with pytest.raises(ValueError, match="device must be one of"):
        Cfg(device="tpu")
    assert Cfg.field_help()["n"] == "a size"


def test_nested_fields_are_given_as_json_on_the_command_line():
    from experiments.suite import e9_degree_accuracy as e9

    config = e9.PRESETS["tiny"]
    grids = config.replace(lr_grids="[[1, [1e-3, 3e-3]], [15, [3e-4]]]").lr_grids
    assert grids == ((1, (1e-3, 3e-3)), (15, (3e-4,)))
    same = config.replace(lr_grids="[[1, [1]], [15, [3e-4]]]")  # JSON's 1 is the rate 1.0
    assert same.config_hash() == config.replace(lr_grids=((1, (1.0,)), (15, (3e-4,)))).config_hash()
    for text, words in [("1:1e-3", "give it as JSON"), ("[[1]]", "expected 2 items"),
                        ('[["a", [1e-3]]]', "cannot read 'a' as int")]:
        with pytest.raises(ValueError, match=words):
            config.replace(lr_grids=text)


def test_thresholds_judge_saved_results_without_recomputing(tmp_path):
    store = Store(tmp_path, "exp", Cfg())
    store.save_table("u", pd.DataFrame({"x": [1]}))
    assert Cfg().config_hash("x") == Cfg(support_min=0.5, refute_max=0.1).config_hash("x")
    stricter = Store(tmp_path, "exp", Cfg(support_min=0.99))
    assert stricter.reused == ["u"] and stricter.computed == []
    reopened = Store.open_existing(tmp_path, "exp", Cfg)  # the latest thresholds are recorded
    assert reopened.config.support_min == 0.99


def test_config_hash_is_stable_and_ignores_the_device():
    a = Cfg()
    assert a.config_hash("x") == Cfg().config_hash("x") != a.config_hash("y")
    assert a.config_hash("x") == a.replace(device="auto").config_hash("x")
    assert a.config_hash("x") != a.replace(n=4).config_hash("x")


def test_cuda_on_a_machine_without_it_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"CUDA is not available.*--device cpu"):
        resolve_device("cuda")
    assert resolve_device("auto") == "cpu"


# ------------------------------------------------------------------------------ Store -----
def test_store_round_trips_tables_and_arrays(tmp_path):
    store = Store(tmp_path, "exp", Cfg())
    frame = pd.DataFrame({"a": [1, 2], "b": [0.5, 1.5]})
    store.save_table("k/pre", frame)
    store.save_table("k/rand", frame.assign(a=[3, 4]))
    store.save_arrays("spectra/pre", s=np.arange(3.0), m=np.eye(2, dtype=np.float32))
    assert store.done("k/pre") and not store.done("k/other")
    pd.testing.assert_frame_equal(store.load_table("k/pre"), frame)
    arrays = store.load_arrays("spectra/pre")
    np.testing.assert_array_equal(arrays["s"], np.arange(3.0))
    assert arrays["m"].dtype == np.float32
    assert store.units("k/") == ["k/pre", "k/rand"]
    assert store.table("k/")[["a", "unit"]].values.tolist() == [[1, "k/pre"], [2, "k/pre"], [3, "k/rand"],
                                                                 [4, "k/rand"]]
    assert store.computed == ["k/pre", "k/rand", "spectra/pre"] and store.reused == []
    assert json.loads((tmp_path / "exp" / "config.json").read_text())["config"]["widths"] == [8, 16]
    with pytest.raises(ValueError, match="holds arrays, not table"):
        store.load_table("spectra/pre")
    with pytest.raises(ValueError, match="bad unit name"):
        store.save_table("../escape", frame)


def test_store_reuses_done_units_and_ignores_half_written_ones(tmp_path):
    store = Store(tmp_path, "exp", Cfg())
    store.save_table("a", pd.DataFrame({"x": [1]}))
    units = tmp_path / "exp" / "units"
    # An interrupted unit: a temporary file, and a data file whose marker never got written.
    (units / ".b.parquet.abc123.tmp").write_bytes(b"half")
    pd.DataFrame({"x": [9]}).to_parquet(units / "c.parquet")
    again = Store(tmp_path, "exp", Cfg())
    assert again.reused == ["a"] and again.units() == ["a"]
    assert not again.done("b") and not again.done("c")
    with pytest.raises(MissingResultError, match=r"unit 'c' of exp is not in .*propulsion-ntk run exp"):
        again.load_table("c")
    again.save_table("c", pd.DataFrame({"x": [2]}))  # redone, overwriting the orphan
    assert again.load_table("c")["x"].tolist() == [2] and again.computed == ["c"]


def test_store_refuses_a_folder_of_another_config(tmp_path):
    Store(tmp_path, "exp", Cfg())
    with pytest.raises(ResultsMismatchError, match=r"exp holds results of another configuration.*--out"):
        Store(tmp_path, "exp", Cfg(n=4))
    Store(tmp_path, "exp", Cfg(device="auto"))  # the device does not change the results' identity


def test_atomic_path_leaves_nothing_behind_on_failure(tmp_path):
    target = tmp_path / "f.txt"
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("partial")
        raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []


def test_provenance_records_commit_versions_and_units(tmp_path):
    store = Store(tmp_path, "exp", Cfg())
    store.save_table("a", pd.DataFrame({"x": [1]}))
    prov = json.loads(store.provenance(preset="tiny").read_text())
    assert {"git_commit", "git_dirty", "versions", "device", "date", "wall_time_s"} <= set(prov)
    assert prov["units_computed"] == ["a"] and prov["preset"] == "tiny" and "torch" in prov["versions"]
    key = prov["git_commit"] + ("+dirty" if prov["git_dirty"] else "")
    assert prov["unit_commits"] == {key: 1}


def test_unit_commits_count_each_code_version_and_the_report_lists_them(tmp_path, monkeypatch):
    from experiments.suite import base, report

    monkeypatch.setattr(base, "code_commit", lambda: ("a" * 40, False))
    store = Store(tmp_path, "exp", Cfg())
    monkeypatch.setattr(base, "code_commit", lambda: ("c" * 40, False))  # checkout moved mid-run
    store.save_table("u1", pd.DataFrame({"x": [1]}))
    store.save_table("u2", pd.DataFrame({"x": [2]}))
    assert json.loads(store.provenance().read_text())["git_commit"] == "a" * 40  # the code that ran
    monkeypatch.setattr(base, "code_commit", lambda: ("b" * 40, True))
    resumed = Store(tmp_path, "exp", Cfg())  # a later session at another commit, code edited
    resumed.save_table("u3", pd.DataFrame({"x": [3]}))
    assert resumed.unit_commits() == {"a" * 40: 2, "b" * 40 + "+dirty": 1}
    prov = json.loads(resumed.provenance().read_text())
    exp = report.ExperimentVerdicts("exp", "t", "tiny", {}, prov, (), None)
    assert f"units computed at {'a' * 12} (2), {'b' * 12} (uncommitted changes) (1)" in report._origin(exp)
    only_old = report.ExperimentVerdicts("exp", "t", "tiny", {}, {**prov, "unit_commits": {"a" * 40: 3}},
                                         (), None)
    assert f"units computed at {'a' * 12} (3)" in report._origin(only_old)  # all by an earlier commit


# --------------------------------------------------------------------------- verdicts -----
@pytest.mark.parametrize(("value", "expected"), [
    (0.95, "supported"), (0.9, "supported"), (0.8, "inconclusive"), (0.69, "not supported"),
    (math.nan, "inconclusive"),
])
def test_decide_follows_the_rules(value, expected):
    assert decide(value, support_if=(">=", 0.9), refute_if=("<", 0.7)) == expected


def test_decide_rejects_bad_or_overlapping_rules():
    with pytest.raises(ValueError, match="overlap"):
        decide(0.5, support_if=(">=", 0.1), refute_if=("<", 0.9))
    with pytest.raises(ValueError, match="support_if must be"):
        decide(0.5, support_if=("=>", 0.1), refute_if=("<", 0.9))  # type: ignore[arg-type]
    v = make_verdict(claim="c", statement="s", measurement="m", value=0.2, what="x", support_if=("<=", 0.1),
                     refute_if=(">", 0.3), figure=None, experiment="e")
    assert v.verdict == "inconclusive" and v.threshold == (
        "supported if x <= 0.1; not supported if x > 0.3; else inconclusive")


# ---------------------------------------------------------------------------- figures -----
def test_save_figure_writes_pdf_and_png_atomically(tmp_path):
    with F.style():
        fig, ax = F.new_figure("column")
        ax.plot([0, 1], [0, 1], color=F.method_color("propulsion k=5"))
        paths = F.save_figure(fig, tmp_path / "figs", "demo")
    assert [p.name for p in paths] == ["demo.pdf", "demo.png"]
    assert sorted(p.name for p in (tmp_path / "figs").iterdir()) == ["demo.pdf", "demo.png"]
    assert paths[1].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and paths[0].read_bytes()[:4] == b"%PDF"
    assert F.method_color("lora") == F.METHOD_COLORS["lora"]
    assert F.method_color("something") == F.method_color("something")
    with pytest.raises(ValueError, match="width must be"):
        F.new_figure("half")


def test_heatmap_triplet_metrics_are_scale_free(tmp_path):
    from ntk import metrics

    rng = np.random.default_rng(0)
    A = rng.normal(size=(6, 4))
    K_F, K_P = A @ A.T, (A + 0.3 * rng.normal(size=A.shape)) @ (A + 0.3 * rng.normal(size=A.shape)).T
    K_P = (K_P + K_P.T) / 2
    with F.style():
        fig, _, scores = F.heatmap_triplet(K_F, K_P)
        F.save_figure(fig, tmp_path, "h")
        _, _, scaled = F.heatmap_triplet(K_F, 1e4 * K_P)
    assert scores["cka"] == pytest.approx(metrics.cka(K_F, K_P), rel=1e-12)
    assert scaled == pytest.approx(scores, rel=1e-9)


def test_curve_plot_draws_bands_and_names_missing_columns():
    data = pd.DataFrame({"step": [0, 1, 0, 1], "acc": [0.5, 0.7, 0.5, 0.9], "method": ["lora"] * 4,
                         "seed": [0, 0, 1, 1]})
    with F.style():
        fig, ax = F.new_figure()
        F.curve_plot(ax, data, x="step", y="acc", hue="method")
        assert ax.lines[0].get_ydata().tolist() == [0.5, 0.8] and len(ax.collections) == 1
        with pytest.raises(ValueError, match=r"columns \['loss'\]"):
            F.curve_plot(ax, data, x="step", y="loss", hue="method")
        F.plt.close(fig)


# --------------------------------------------------------------------- experiment 7 -------
@pytest.fixture(scope="module")
def e7_store(tmp_path_factory):
    store = Store(tmp_path_factory.mktemp("e7"), e7.NAME, e7.PRESETS["tiny"])
    e7.main(e7.PRESETS["tiny"], store)
    return store


def test_e7_counts_match_the_paper_and_the_analytic_counts(e7_store, tmp_path):
    frame = e7_store.load_table("counts/roberta-base").set_index("method")
    assert (frame["trainable"] == frame["analytic"]).all()
    assert frame.loc["propulsion (Linear + Embedding)", "trainable"] == 86_018  # 86,016 + C
    assert frame.loc["propulsion (q, k, v)", "trainable"] == 27_648  # 3 * 12 * 768
    assert frame.loc["lora (q, v)", "trainable"] == 12 * 2 * 8 * (768 + 768)
    assert frame.loc["full", "trainable"] == 124_647_170
    again = Store(e7_store.root, e7.NAME, e7.PRESETS["tiny"])
    e7.main(e7.PRESETS["tiny"], again)
    assert again.computed == [] and again.reused == ["counts/roberta-base"]
    assert all(p.is_file() for p in e7.figures(e7_store, tmp_path))
    assert [v.verdict for v in e7.verdicts(e7_store, e7_store.config)] == ["supported"] * 3


@pytest.mark.parametrize(("scale", "expected"), [(1.0, "supported"), (3.0, "inconclusive"),
                                                  (6.0, "not supported")])
def test_e7_verdicts_follow_the_numbers(e7_store, tmp_path, scale, expected):
    frame = e7_store.load_table("counts/roberta-base")
    rows = frame["method"].str.startswith("propulsion")
    frame.loc[rows, "trainable"] = (frame.loc[rows, "trainable"] * scale).astype(int)
    frame["percent"] = 100 * frame["trainable"] / frame["full_model"]
    store = Store(tmp_path, e7.NAME, e7.PRESETS["tiny"])
    store.save_table("counts/roberta-base", frame)
    share, vs_lora, paper = e7.verdicts(store, store.config)
    assert share.verdict == expected  # 0.069% x scale against 0.15% / 0.3%
    assert vs_lora.verdict == ("supported" if scale < 3.4 else "not supported")
    assert paper.verdict == ("supported" if scale == 1.0 else "not supported")


def test_e7_figures_name_a_missing_unit(tmp_path):
    store = Store(tmp_path, e7.NAME, e7.PRESETS["tiny"])
    with pytest.raises(MissingResultError, match=r"counts/roberta-base.*propulsion-ntk run"):
        e7.figures(store, tmp_path / "f")
    assert not (tmp_path / "f").exists()


def test_figures_of_a_study_in_progress_draw_what_finished_and_name_the_rest(tmp_path, capsys):
    """`figures` on a results folder where one experiment is complete and another has not
    finished: the complete one's figures are written, the other is named with its missing
    units and the command that computes them, and the exit status says not everything was
    drawn."""
    from experiments import cli
    from experiments.suite import e8_memory as e8

    results = tmp_path / "results"
    assert cli.main(["run", "e7", "--preset", "tiny", "--out", str(results)]) == 0
    Store(results, e8.NAME, e8.PRESETS["tiny"])  # started, no unit finished
    capsys.readouterr()
    assert cli.main(["figures", "--results", str(results), "--out", str(tmp_path / "f")]) == 1
    err = capsys.readouterr().err
    assert (tmp_path / "f" / "e7_parameter_counts.png").exists()
    assert "results incomplete" in err and e8.NAME in err and "propulsion-ntk run" in err
