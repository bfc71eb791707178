"""Experiment 1 (kernel similarity at initialisation): kernels, identities, units, resume, verdicts."""

from __future__ import annotations

import copy

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import RTOL, assert_close_rel

import ntk
from experiments import similarity as S
from experiments.suite import e1_kernel_similarity as E
from experiments.suite.base import Store
from propulsion import PropulsionConfig, get_propulsion_model

F64 = torch.float64
COLUMNS = ["family", "variant", "width", "seed", "n", "tokens", "degree", "layout", "method", "reference",
           "metric", "value"]


def _mlp_config(**changes) -> E.Config:
    base = dict(n_examples=5, minilm_variants=(), peft_methods=(), mlp_widths=(4, 8), mlp_depth=1,
                mlp_input_dim=3, transformer_widths=(), top_ks=(2,), degree=3)
    return E.Config(**{**base, **changes})


def _reference(model, x, names):
    """The torch.func Jacobian reference (an independent path from the structured engine)."""
    return ntk.empirical_ntk(model, x, params=names, output="full", method="jacobian", dtype=F64)


# ------------------------------------------------------------------------------ pure parts ----
def test_compare_is_scale_free_and_exact_on_itself():
    a = torch.randn(6, 4, dtype=F64)
    K = (a @ a.T)[:, :, None, None] * torch.eye(2, dtype=F64)
    same = S.compare(K, K, top_ks=(2,))
    assert same["cka"] == pytest.approx(1, abs=1e-12) and same["alignment"] == pytest.approx(1, abs=1e-12)
    assert same["rel_error"] == pytest.approx(0, abs=1e-7) and same["overlap_top2"] == pytest.approx(1)
    scaled = S.compare(K, 4.0 * K, top_ks=(2,))
    assert scaled["best_scale"] == pytest.approx(0.25) and scaled["rel_error"] == pytest.approx(0, abs=1e-7)
    assert scaled["cka"] == pytest.approx(1, abs=1e-12)
    assert torch.equal(S.trace(K), 2 * (a @ a.T))
    other = torch.randn(6, 6, dtype=F64)
    other = other @ other.T
    reduced = S.compare(S.trace(K), other, top_ks=())  # (N, N): example-centred CKA is CKA
    assert reduced["cka_examples"] == pytest.approx(reduced["cka"], abs=1e-12)
    offset = K + 5.0 * torch.ones(2, 2, dtype=F64)  # input-independent part: removed by centring
    assert S.compare(K, offset)["cka_examples"] == pytest.approx(1, abs=1e-12)


@pytest.mark.parametrize("degree", [2, 3])
def test_mlp_kernels_match_the_jacobian_reference_and_scale_by_k_squared(degree):
    model = S.WideMLP(3, 6, 2, 2, seed=1).double()
    x = torch.randn(5, 3, dtype=F64)
    ks = S.method_kernels(model, x, degree=degree)
    assert_close_rel(ks["propulsion"], degree**2 * ks["propulsion_k1"], 1e-13)  # exact at z = 1
    wrapped = get_propulsion_model(copy.deepcopy(model), PropulsionConfig(degree=degree))
    for name, names in S.propulsion_sets(wrapped).items():
        assert_close_rel(ks[name], _reference(wrapped, x, names), RTOL[F64])
    plain = ntk.empirical_ntk(model, x, params="all", output="full", method="jacobian")
    assert_close_rel(ks["full"], plain, RTOL[F64])  # wrapping at z = 1 leaves K_F unchanged
    rows = E.metric_rows(ks, degree, (2,))
    check = rows[rows["metric"] == "k2_identity_error"]["value"]
    assert len(check) == 2 and check.max() < 1e-13


def test_transformer_sets_lora_and_ia3_match_the_jacobian_reference():
    model = S.small_bert(32, layers=1, vocab_size=40, max_length=6, seed=2).double()
    x = {"input_ids": torch.randint(1, 40, (3, 6)), "attention_mask": torch.ones(3, 6, dtype=torch.long)}
    x["attention_mask"][0, 4:] = 0
    ks = S.method_kernels(model, x, degree=2, peft_methods=("lora", "ia3"), seed=3)
    wrapped = get_propulsion_model(copy.deepcopy(model), PropulsionConfig(degree=2, include_embeddings=True))
    sets = S.propulsion_sets(wrapped)
    assert {"propulsion_attn", "propulsion_reference"} <= set(sets)
    assert all(".attention." in n for n in sets["propulsion_attn"]) and len(sets["propulsion_attn"]) == 4
    for name in ("full", "propulsion_attn", "propulsion_reference", "bitfit"):
        assert_close_rel(ks[name], _reference(wrapped, x, sets[name]), RTOL[F64])
    lora = S.lora_model(model, rank=2, b_std=0.02, seed=3)
    lora8 = S.lora_model(model, b_std=0.02, seed=3)  # the rank method_kernels used (8)
    assert_close_rel(ks["lora"], _reference(lora8, x, "lora"), RTOL[F64])
    blocks = ntk.empirical_ntk(lora, x, params="lora", output="trace", method="jacobian", per_layer=True)
    assert all(blocks[n].abs().max() > 0 for n in blocks if "lora_A" in n)  # B != 0: A-block alive
    assert ks["ia3"].abs().max() > 0


# ------------------------------------------------------------------------------ main, resume ----
def test_main_writes_complete_units_and_resumes_without_recomputing(tmp_path, monkeypatch):
    config = _mlp_config()
    store = Store(tmp_path, E.NAME, config)
    E.main(config, store)
    assert store.units() == ["metrics/mlp-random-w4-s0", "metrics/mlp-random-w8-s0"]
    frame = E.results(store)
    assert list(frame.columns) == [*COLUMNS, "unit"] and not frame.isna().any().any()
    pairs = set(zip(frame["method"], frame["reference"], strict=True))
    assert {("propulsion", "full"), ("propulsion_k1", "full"), ("bitfit", "full")} <= pairs
    same_k = frame[(frame["method"] == "propulsion_k1")
                   & (frame["metric"] == "cka")].set_index(["unit", "layout"])
    with_k = frame[(frame["method"] == "propulsion") & (frame["reference"] == "full")
                   & (frame["metric"] == "cka")].set_index(["unit", "layout"])
    np.testing.assert_allclose(same_k["value"], with_k.loc[same_k.index, "value"], rtol=1e-10)

    calls: list[str] = []
    real = E.compute_unit
    monkeypatch.setattr(E, "compute_unit", lambda unit, cfg: calls.append(unit.name) or real(unit, cfg))
    E.main(config, Store(tmp_path, E.NAME, config))
    assert calls == []
    (tmp_path / E.NAME / "units" / "metrics" / "mlp-random-w8-s0.done").unlink()
    E.main(config, Store(tmp_path, E.NAME, config))
    assert calls == ["mlp-random-w8-s0"]

    paths = E.figures(store, tmp_path / "figs")
    assert sorted(p.name for p in paths) == ["e1_width.pdf", "e1_width.png"]
    assert all(p.stat().st_size > 1000 for p in paths)
    verdicts = {v.figure: v for v in E.verdicts(store, config) if v.figure == "e1_width"}
    assert verdicts["e1_width"].verdict in ("supported", "not supported", "inconclusive")


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="minilm_variants"):
        E.Config(minilm_variants=("trained",))
    with pytest.raises(ValueError, match="multiples of 32"):
        E.Config(transformer_widths=(48,))
    with pytest.raises(ValueError, match="n_examples"):
        E.Config(n_examples=2)


# ------------------------------------------------------------------------------ verdicts ----
def _synthetic(store: Store, config: E.Config, cka: float, error: float, gaps: tuple[float, float]) -> None:
    """Tables for every planned unit: K_P vs K_F at the given CKA and error (MiniLM); on the sweeps
    CKA = 1 - gaps[0] at the narrowest width and 1 - gaps[1] at the widest."""
    for unit in E.plan(config):
        if unit.family == "minilm":
            c = cka
        else:
            widths = config.mlp_widths if unit.family == "mlp" else config.transformer_widths
            c = 1 - (gaps[0] if unit.width == min(widths) else gaps[1])
        rows = [(layout, "propulsion", "full", metric, value) for layout in E.LAYOUTS
                for metric, value in (("cka_examples", c), ("rel_error", error), ("eff_rank_ref", 5.0))]
        frame = pd.DataFrame(rows, columns=COLUMNS[7:]).assign(
            family=unit.family, variant=unit.variant, width=unit.width, seed=unit.seed, n=4, tokens=1,
            degree=5)
        store.save_table(f"metrics/{unit.name}", frame[COLUMNS])


@pytest.mark.parametrize(("cka", "error", "gaps", "expected"), [
    (0.95, 0.1, (0.2, 0.05), ("supported", "supported")),
    (0.95, 0.3, (0.2, 0.15), ("inconclusive", "inconclusive")),
    (0.80, 0.1, (0.2, 0.19), ("inconclusive", "not supported")),
    (0.65, 0.1, (0.2, 0.3), ("not supported", "not supported")),
    (0.95, 0.6, (0.2, 0.09), ("not supported", "supported")),
])
def test_verdicts_follow_the_thresholds(tmp_path, cka, error, gaps, expected):
    config = E.Config(minilm_variants=("pretrained",), mlp_widths=(8, 16), transformer_widths=(32, 64))
    store = Store(tmp_path, E.NAME, config)
    _synthetic(store, config, cka, error, gaps)
    minilm, mlp, transformer = E.verdicts(store, config)
    assert (minilm.verdict, mlp.verdict) == expected and transformer.verdict == mlp.verdict
    assert minilm.value == pytest.approx(cka) and mlp.value == pytest.approx(gaps[1] / gaps[0])
    assert minilm.claim == mlp.claim == "ntk_approximation" and minilm.experiment == E.NAME


# ------------------------------------------------------------------------------ real model ----
@pytest.mark.realmodel
def test_minilm_units_kernels_and_figures(tmp_path):
    config = E.Config(n_examples=4, max_length=6, minilm_variants=("pretrained",), mlp_widths=(),
                      transformer_widths=(), top_ks=(2,))
    store = Store(tmp_path, E.NAME, config)
    E.main(config, store)
    assert store.units() == ["kernels/minilm-pretrained-w384-s0", "metrics/minilm-pretrained-w384-s0"]
    arrays = store.load_arrays("kernels/minilm-pretrained-w384-s0")
    expected = {"K_full", "K_full_nohead", "K_propulsion", "K_propulsion_k1", "K_propulsion_nohead",
                "K_propulsion_attn", "K_propulsion_reference", "K_bitfit", "K_lora", "K_ia3", "labels"}
    assert set(arrays) == expected
    assert all(arrays[k].shape == (4, 4, 2, 2) and np.abs(arrays[k]).max() > 0 for k in expected - {"labels"})
    assert sorted(arrays["labels"].tolist()) == [0, 0, 1, 1]
    head = arrays["K_propulsion"] - arrays["K_propulsion_nohead"]  # k^2 f_c(a) f_c(b): rank one, c == c'
    assert np.abs(head[:, :, 0, 1]).max() == 0
    assert np.linalg.matrix_rank(head[:, :, 0, 0], tol=1e-10 * np.abs(head).max()) == 1
    frame = E.results(store)
    assert not frame.isna().any().any()
    assert frame[frame["metric"] == "k2_identity_error"]["value"].max() < 1e-12
    names = sorted(p.name for p in E.figures(store, tmp_path / "figs"))
    assert names == sorted(f"e1_{s}.{x}" for s in ("heatmaps_pretrained", "spectra", "methods", "width")
                           for x in ("pdf", "png"))
    assert [v.verdict for v in E.verdicts(store, config)][1:] == ["inconclusive"] * 2  # no sweep: NaN


@pytest.mark.realmodel
@pytest.mark.slow
def test_tiny_preset_runs_every_unit_and_resumes(tmp_path, monkeypatch):
    config = E.PRESETS["tiny"]
    store = Store(tmp_path, E.NAME, config)
    E.main(config, store)
    assert store.units("metrics/") == sorted(f"metrics/{u.name}" for u in E.plan(config))
    assert store.units("kernels/") == ["kernels/minilm-pretrained-w384-s0", "kernels/minilm-random-w384-s0"]
    frame = E.results(store)
    assert list(frame.columns) == [*COLUMNS, "unit"] and not frame.isna().any().any()
    monkeypatch.setattr(E, "compute_unit", lambda *_: pytest.fail("a done unit was recomputed"))
    E.main(config, Store(tmp_path, E.NAME, config))
    assert len(E.verdicts(store, config)) == 4
