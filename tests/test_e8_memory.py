"""Experiment 8 (memory accounting): the tiny preset end to end, and its verdicts on both sides."""

from __future__ import annotations

import pytest

from experiments.suite import EXPERIMENTS
from experiments.suite import e8_memory as e8
from experiments.suite.base import MissingResultError, Store


@pytest.fixture(scope="module")
def e8_store(tmp_path_factory):
    store = Store(tmp_path_factory.mktemp("e8"), e8.NAME, e8.PRESETS["tiny"])
    e8.main(e8.PRESETS["tiny"], store)
    return store


def test_e8_is_registered_with_every_preset():
    assert EXPERIMENTS[e8.NAME] is e8
    assert set(e8.PRESETS) == {"tiny", "quick", "study", "full"}


def test_e8_tiny_runs_into_a_store_and_resumes(e8_store, tmp_path):
    config = e8_store.config
    frame = e8.accounts(e8_store, config)
    assert len(frame) == len(config.models) * len(config.methods) * len(config.precisions) * \
        len(config.batch_sizes) * len(config.seq_lens)
    assert (frame["peak"] >= frame["parameters"]).all() and (frame["activations"] > 0).all()
    check = e8.measured(e8_store, config)
    assert set(check["method"]) == set(config.methods)
    assert (check["measured_over_accounted"].between(0.8, 1.25)).all(), check
    again = Store(e8_store.root, e8.NAME, config)
    e8.main(config, again)
    assert again.computed == [] and len(again.reused) == len(config.methods) * 2
    paths = e8.figures(e8_store, tmp_path)
    assert {p.suffix for p in paths} == {".pdf", ".png"} and all(p.is_file() for p in paths)
    claim, check_verdict = e8.verdicts(e8_store, config)
    # Propulsion saves every wrapped Linear's output for z's gradient: never 1.5x below LoRA here
    assert claim.verdict == "not supported" and claim.value > 1.0
    assert "none of the" in claim.measurement
    assert check_verdict.verdict == "supported"


@pytest.mark.parametrize(("scale", "expected"), [(0.5, "supported"), (0.8, "inconclusive"),
                                                 (1.0, "not supported")])
def test_e8_verdicts_follow_the_ratio(e8_store, tmp_path, scale, expected):
    """Propulsion's accounted peak set to ``scale`` x LoRA's at one setting decides the verdict."""
    config = e8_store.config
    store = Store(tmp_path, e8.NAME, config)
    for unit in e8_store.units():
        frame = e8_store.load_table(unit)
        if unit.startswith("accounts/") and frame["method"].iloc[0] == "propulsion":
            lora = e8_store.load_table(unit.replace("/propulsion/", "/lora/"))
            frame["peak"] = lora["peak"] * (scale if scale != 1.0 else 1.02)
            frame.loc[frame.index[1:], "peak"] = lora["peak"].iloc[1:] * 1.05  # only one setting reaches it
        store.save_table(unit, frame)
    claim = e8.verdicts(store, config)[0]
    assert claim.verdict == expected
    assert ("none of the" in claim.measurement) == (expected != "supported")


def test_e8_names_a_missing_unit(tmp_path):
    store = Store(tmp_path, e8.NAME, e8.PRESETS["tiny"])
    with pytest.raises(MissingResultError, match="accounts/roberta-base"):
        e8.verdicts(store, store.config)


@pytest.mark.parametrize("change", [{"methods": ("full", "ia3")}, {"models": ("gpt-5",)},
                                    {"precisions": ("fp8",)}, {"batch_sizes": (0,)},
                                    {"figure_batch_size": 3}, {"measure_model": "bert-huge"},
                                    {"support_max_ratio": 1.2}])
def test_e8_config_refuses_bad_values(change):
    with pytest.raises(ValueError):
        e8.PRESETS["tiny"].replace(**change)
