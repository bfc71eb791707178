"""Learning rates chosen on validation: a small grid per method and per Propulsion degree.

Every candidate ``(method, degree)`` is fine-tuned once per learning rate of its grid and per
tuning seed, with the training setup of the experiment that asks (model, data set, steps,
batch, lengths, schedule); the chosen rate is the one with the highest mean best validation
accuracy over the tuning seeds (ties: the smaller rate). Test data are never looked at. The
tuning seeds are kept apart from the seeds the experiments evaluate on (same splits, other
head initialisation and batch order), so a choice is not fitted to the evaluated runs.

The runs live in one shared store per training setup, ``<results>/lr_tuning/<setup hash>``,
one unit per (candidate, rate, seed): e3, e5 and e9 asking for the same setup reuse the same
runs, and a grid grown later only adds runs.

    rates = tune(store.root, setup, [Candidate("propulsion", 5, (1e-3, 3e-3, 1e-2))])
    choice = chosen(rates)   # {"propulsion_k5": 3e-3}
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from experiments.suite._training import METHOD_SPECS, SHARED_FIELDS, run_training, summarise, train_config
from experiments.suite._training_setup import DataSetTrainingConfig
from experiments.suite.base import ExperimentConfig, Store

__all__ = [
    "Candidate",
    "TuningSetup",
    "setup_from",
    "tune",
    "choose",
    "chosen",
    "grid_text",
    "grid_edge",
    "grid_for",
    "DEGREE_GRIDS",
    "TUNING_DIR",
]

TUNING_DIR = "lr_tuning"
# AdamW rates tried for Propulsion, per degree from the listed one up: under Adam z moves about lr
# per step whatever k is, so z**k moves about k lr and high degrees need smaller rates. Four or
# five rates: with three, the first study chose k = 1's largest and k = 55's smallest rate, and
# with 3e-2 added k = 1 still chose its largest, so k = 1 goes on to 1e-1.
DEGREE_GRIDS: tuple[tuple[int, tuple[float, ...]], ...] = (
    (1, (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)),
    (2, (1e-3, 3e-3, 1e-2, 3e-2)),
    (15, (1e-4, 3e-4, 1e-3, 3e-3)),
)


def grid_for(grids: tuple[tuple[int, tuple[float, ...]], ...], degree: int) -> tuple[float, ...]:
    """The grid of the largest listed degree ``<= degree`` in ``grids`` ((degree, rates) pairs).

    Raises:
        ValueError: no listed degree is ``<= degree``.
    """
    below = [(d, g) for d, g in grids if d <= degree]
    if not below:
        raise ValueError(
            f"no learning-rate grid for degree {degree}: the grids start at degree "
            f"{min(d for d, _ in grids)}; list a grid for degree 1"
        )
    return tuple(max(below)[1])


@dataclass(frozen=True)
class Candidate:
    """One method (``METHOD_SPECS`` key; a Propulsion degree, or None) and its rate grid."""

    method_name: str
    degree: int | None
    grid: tuple[float, ...]

    def __post_init__(self) -> None:
        if self.method_name not in METHOD_SPECS:
            raise ValueError(f"unknown method {self.method_name!r}; choose one of {', '.join(METHOD_SPECS)}")
        if not self.grid or any(
            not (isinstance(r, int | float) and r > 0 and math.isfinite(r)) for r in self.grid
        ):
            raise ValueError(
                f"the grid of {self.key} must be positive finite learning rates, got {self.grid}"
            )
        object.__setattr__(self, "grid", tuple(sorted(float(r) for r in set(self.grid))))

    @property
    def key(self) -> str:
        return self.method_name if self.degree is None else f"{self.method_name}_k{self.degree}"


@dataclass(frozen=True)
class TuningSetup(DataSetTrainingConfig):
    """The training setup the rates are tuned for (what makes two tunings the same)."""

    seeds: tuple[int, ...] = field(default=(100,), metadata={"help": "tuning seeds (apart from evaluation)"})


def setup_from(
    config: ExperimentConfig, *, dataset: str | None = None, seeds: tuple[int, ...] | None = None
) -> TuningSetup:
    """The tuning setup of an experiment config (its shared training fields and device)."""
    values = {n: getattr(config, n) for n in SHARED_FIELDS if hasattr(config, n)}
    values["dataset"] = dataset if dataset is not None else config.dataset  # type: ignore[attr-defined]
    if seeds is None:
        seeds = tuple(getattr(config, "tuning_seeds", (100,)))
    return TuningSetup(device=config.device, seeds=tuple(seeds), **values)


def _store(root: str | Path, setup: TuningSetup) -> Store:
    return Store(root, f"{TUNING_DIR}/{setup.config_hash(TUNING_DIR)[:12]}", setup)


def tune(
    root: str | Path, setup: TuningSetup, candidates: Sequence[Candidate], *, progress: bool = False
) -> pd.DataFrame:
    """Run (or reuse) every candidate's grid; one row per (candidate, rate) with the mean best
    validation accuracy over the tuning seeds and ``chosen`` (True for each candidate's pick).

    Columns: ``key``, ``method_name``, ``degree``, ``lr``, ``seeds``, ``best_val_accuracy``
    (mean), ``best_val_accuracy_min``, ``status`` (``finished`` or the first other status),
    ``chosen``. A rate whose run stopped on a NaN loss scores -inf (never chosen). A candidate
    with a one-rate grid is not run: its rate is given (status ``given``, accuracy NaN).

    Raises:
        RuntimeError: every rate of some candidate diverged (widen the grid downwards).
    """
    store = _store(root, setup)
    rows = []
    for cand in candidates:
        if len(cand.grid) == 1:
            continue  # a one-rate grid is a given rate: nothing to choose, nothing to run
        for lr in cand.grid:
            for seed in setup.seeds:
                unit = f"{cand.key}/lr={lr:g}/seed{seed}"
                config = train_config(
                    setup, method_name=cand.method_name, degree=cand.degree, lr=lr, seed=seed
                )
                run_training(store, unit, config, tags={"key": cand.key}, progress=progress)
                rows.append((cand, lr, seed, unit))
    store.provenance()
    tables = []
    if rows:
        summaries = summarise(pd.concat([store.load_table(u) for *_, u in rows], ignore_index=True))
        summaries["lr"] = summaries["run"].map({u: lr for _, lr, _, u in rows})
        summaries["key"] = summaries["run"].map({u: c.key for c, _, _, u in rows})
        tables.append(choose(summaries))
    given = [c for c in candidates if len(c.grid) == 1]
    if given:
        tables.append(
            pd.DataFrame(
                [
                    {
                        "key": c.key,
                        "lr": c.grid[0],
                        "seeds": 0,
                        "best_val_accuracy": math.nan,
                        "best_val_accuracy_min": math.nan,
                        "status": "given",
                        "chosen": True,
                    }
                    for c in given
                ]
            )
        )
    table = pd.concat(tables, ignore_index=True)
    meta = {c.key: (c.method_name, math.nan if c.degree is None else c.degree) for c in candidates}
    table.insert(1, "method_name", table["key"].map(lambda k: meta[k][0]))
    table.insert(2, "degree", table["key"].map(lambda k: meta[k][1]))
    return table


def choose(summaries: pd.DataFrame) -> pd.DataFrame:
    """The choice from one summary row per tuning run (columns ``key``, ``lr``, ``status``,
    ``best_val_accuracy``): per (key, lr) the mean best validation accuracy over seeds (``-inf``
    if any seed's run did not finish, e.g. a NaN loss), and per key the rate with the highest
    mean, the smaller rate on a tie.

    Raises:
        RuntimeError: every rate of some key diverged (widen the grid downwards).
    """
    out = []
    for (key, lr), group in summaries.groupby(["key", "lr"], sort=False):
        finished = bool((group["status"] == "finished").all())
        acc = group["best_val_accuracy"]
        out.append(
            {
                "key": key,
                "lr": float(lr),
                "seeds": len(group),
                "best_val_accuracy": float(acc.mean()) if finished else -math.inf,
                "best_val_accuracy_min": float(acc.min()) if finished else -math.inf,
                "status": "finished"
                if finished
                else str(group.loc[group["status"] != "finished", "status"].iloc[0]),
            }
        )
    table = pd.DataFrame(out)
    table["chosen"] = False
    for key, group in table.groupby("key", sort=False):
        best = group["best_val_accuracy"].max()
        if not math.isfinite(best):
            raise RuntimeError(
                f"every learning rate of {key} diverged ({group['lr'].tolist()}); "
                "add smaller rates to its grid"
            )
        pick = group[group["best_val_accuracy"] == best]["lr"].min()
        table.loc[(table["key"] == key) & (table["lr"] == pick), "chosen"] = True
    return table


def chosen(table: pd.DataFrame) -> dict[str, float]:
    """``{candidate key: chosen rate}`` from a :func:`tune` table."""
    picks = table[table["chosen"]]
    if picks["key"].duplicated().any():
        raise ValueError("a tuning table chose more than one rate for a candidate")
    return {str(k): float(v) for k, v in zip(picks["key"], picks["lr"], strict=True)}


def grid_text(table: pd.DataFrame) -> str:
    """``"propulsion_k5: 1e-3 (0.71), [3e-3 (0.76)], 1e-2 (0.74); ..."`` (chosen in brackets)."""
    parts = []
    for key, group in table.groupby("key", sort=False):
        items = []
        for _, r in group.sort_values("lr").iterrows():
            acc = (
                "given, not tuned"
                if r.get("status") == "given"
                else "diverged"
                if not math.isfinite(r["best_val_accuracy"])
                else f"{r['best_val_accuracy']:.3f}"
            )
            item = f"{r['lr']:g} ({acc})"
            items.append(f"[{item}]" if r["chosen"] else item)
        edge = grid_edge(group)
        note = f" (chosen at the {edge} edge of the grid: a better rate may lie beyond it)" if edge else ""
        parts.append(f"{key}: {', '.join(items)}{note}")
    return "; ".join(parts)


def grid_edge(group: pd.DataFrame) -> str | None:
    """``"upper"`` or ``"lower"`` when the chosen rate of one candidate's tuning rows is the
    largest or smallest of a grid of two or more tuned rates (the optimum may lie outside the
    grid), else None."""
    tuned = group[group["status"] != "given"] if "status" in group else group
    picks = tuned[tuned["chosen"]]["lr"]
    if len(tuned) < 2 or picks.empty:
        return None
    pick = float(picks.iloc[0])
    return "upper" if pick == tuned["lr"].max() else "lower" if pick == tuned["lr"].min() else None
