"""Carrying finished units over to another configuration (``Store.adopt``, ``propulsion-ntk adopt``):
only units whose results do not depend on what changed, checked, with their origin recorded."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import pytest

from experiments.cli import main as cli_main
from experiments.records import DamagedFileError, read_json
from experiments.suite import e1_kernel_similarity as E
from experiments.suite import e6_kernel_prediction as E6
from experiments.suite.base import ExperimentConfig, Store


@dataclass(frozen=True)
class Two(ExperimentConfig):
    """Units ``a/...`` read only ``size_a``, units ``b/...`` only ``size_b``."""

    size_a: int = field(default=2, metadata={"help": "read by a-units"})
    size_b: int = field(default=3, metadata={"help": "read by b-units"})

    def unit_identity(self, unit: str) -> dict[str, Any]:
        other = "size_b" if unit.startswith("a/") else "size_a"
        return {k: v for k, v in self.identity().items() if k != other}


def _filled(root, config: Two) -> Store:
    store = Store(root, "exp", config)
    store.save_table("a/0", pd.DataFrame({"x": [config.size_a]}))
    store.save_table("b/0", pd.DataFrame({"x": [config.size_b]}))
    store.save_arrays("a/arrays", v=[1.0, 2.0])
    return store


def test_adopt_copies_only_units_independent_of_the_change(tmp_path):
    old = _filled(tmp_path / "old", Two())
    new = Store(tmp_path / "new", "exp", Two(size_b=5))
    adopted, refused = new.adopt(old)
    assert adopted == ["a/0", "a/arrays"] and refused == {"b/0": ["size_b"]}
    assert new.load_table("a/0")["x"].tolist() == [2]
    assert new.load_arrays("a/arrays")["v"].tolist() == [1.0, 2.0]
    marker = read_json(new.units_dir / "a/0.done")
    assert marker["adopted_from"]["config_hash"] == old.hash
    assert marker["git_commit"] == read_json(old.units_dir / "a/0.done")["git_commit"]
    assert new.adopted_units() == ["a/0", "a/arrays"] and not new.done("b/0")
    assert new.read_provenance() == {}
    assert read_json(new.provenance())["units_adopted"] == ["a/0", "a/arrays"]
    # again: nothing left to adopt, the refused unit still refused; a computed unit is kept
    new.save_table("b/0", pd.DataFrame({"x": [5]}))
    assert new.adopt(old) == ([], {})
    assert new.load_table("b/0")["x"].tolist() == [5]


def test_adopt_refuses_damaged_data_and_another_experiment(tmp_path):
    old = _filled(tmp_path / "old", Two())
    (old.units_dir / "a/0.parquet").write_bytes(b"not a parquet file")
    new = Store(tmp_path / "new", "exp", Two(size_b=5))
    with pytest.raises(DamagedFileError, match="a/0"):
        new.adopt(old)
    assert not new.done("a/0") and not (new.units_dir / "a/0.parquet").exists()
    with pytest.raises(ValueError, match="cannot adopt units of other"):
        new.adopt(Store(tmp_path / "old", "other", Two()))
    with pytest.raises(ValueError, match="own folder"):
        new.adopt(Store(tmp_path / "new", "exp", Two(size_b=5)))


def test_e1_units_depend_only_on_their_family_fields():
    base = E.PRESETS["study"]
    bigger = base.replace(smollm2_examples=128, minilm_variants=())
    for unit in ("metrics/minilm-pretrained-w384-s0", "counts/mlp-random-w128-s3",
                 "kernels/transformer-random-w64-s0"):
        assert base.unit_identity(unit) == bigger.unit_identity(unit), unit
    smol = "metrics/smollm2-pretrained-w576-s1"
    assert base.unit_identity(smol) != bigger.unit_identity(smol)
    assert base.unit_identity(smol) == base.replace(n_examples=64, smollm2_seeds=2).unit_identity(smol)
    # seeds 3 and 4 computed apart (--seed 3 --set smollm2_seeds=2) adopt into the run of seeds 0-4
    apart = base.replace(seed=3, smollm2_seeds=2, minilm_variants=(), memory_gib=8.0)
    assert base.unit_identity(smol) == apart.unit_identity(smol)  # the budget sets tiles only
    for unit in ("metrics/minilm-random-w384-s0", smol, "metrics/mlp-random-w32-s0"):
        assert base.unit_identity(unit) != base.replace(degree=3).unit_identity(unit)
    assert base.unit_identity("metrics/other") == base.identity()


def test_cli_adopts_then_run_computes_only_the_rest(tmp_path, capsys, monkeypatch):
    sets = ["minilm_variants=", "transformer_widths=", "mlp_depth=1", "mlp_input_dim=3",
            "sweep_examples=8", "subsample_sizes=6", "n_draws=3", "top_ks=2", "degree=3"]
    assert cli_main(["run", "e1", "--preset", "tiny", "--out", str(tmp_path / "old"),
                     "--set", *sets, "mlp_widths=4,8"]) == 0
    assert cli_main(["adopt", "e1", "--preset", "tiny", "--from", str(tmp_path / "old"),
                     "--out", str(tmp_path / "new"), "--set", *sets, "mlp_widths=4,8,16"]) == 0
    out = capsys.readouterr().out
    assert "8 unit(s) adopted" in out  # metrics and counts of w4 and w8, two seeds
    assert "--set minilm_variants= " in out and "mlp_widths=4,8,16 --out" in out  # the hint repeats --set
    calls: list[str] = []
    real = E.compute_unit
    monkeypatch.setattr(E, "compute_unit", lambda unit, cfg: calls.append(unit.name) or real(unit, cfg))
    assert cli_main(["run", "e1", "--preset", "tiny", "--out", str(tmp_path / "new"),
                     "--set", *sets, "mlp_widths=4,8,16"]) == 0
    assert sorted(calls) == ["mlp-random-w16-s0", "mlp-random-w16-s1"]
    store = Store.open_existing(tmp_path / "new", E.NAME, E.Config)
    assert len(store.adopted_units()) == 8 and len(store.units("metrics/")) == 6


def test_e6_units_depend_on_the_rate_grids_only_where_a_rate_is_chosen():
    """Widening Propulsion's grid keeps the tuning runs already made, every kernel unit and full
    fine-tuning's runs; Propulsion's fine-tuning runs and the choice are computed again."""
    base = E6.PRESETS["study"]
    grids = dict(base.lr_grids)
    wider = base.replace(lr_grids=tuple((m, (*g, 1e-1) if m.startswith("propulsion") else g)
                                        for m, g in grids.items()))
    same = ["tuning/full/lr=0.01", "tuning/propulsion/lr=0.03", "kernel/propulsion/seed1",
            "finetune/full/seed2"]
    changed = ["finetune/propulsion/seed0", "finetune/propulsion_frozen_head/seed2", "tuning/choice"]
    for unit in same:
        assert base.unit_identity(unit) == wider.unit_identity(unit), unit
    for unit in changed:
        assert base.unit_identity(unit) != wider.unit_identity(unit), unit
    # draws are the plan; the choice also holds one rate per method, so it depends on methods
    more = base.replace(seeds=(0, 1, 2, 3), methods=("full", "propulsion"))
    assert base.unit_identity("finetune/full/seed0") == more.unit_identity("finetune/full/seed0")
    assert base.unit_identity("tuning/choice") != more.unit_identity("tuning/choice")
    for unit in [*same, *changed]:
        assert base.unit_identity(unit) != base.replace(steps=301).unit_identity(unit), unit
