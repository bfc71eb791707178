"""Fine-tuning runs as units of a suite experiment: resumable, tagged, summarised.

A unit is one :func:`experiments.training.loop.train` run. Its training folder is
``<store>/train/<unit>`` (checkpoints there make an interrupted run resume); once it finishes,
its rows, tagged with the run's identity, are saved as the unit's table, so figures and
verdicts read only saved tables. :func:`summarise` turns the rows of many runs into one row
per run. :data:`METHOD_SPECS` names the methods the experiments compare and
:func:`train_config` builds the :class:`TrainConfig` of one run from an experiment's config, so
e3-e6 and e9 share one definition of a run.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from experiments.data.encoding import EncodedSplits
from experiments.processes import die_with_parent
from experiments.records import read_json
from experiments.suite.base import Store
from experiments.training.callbacks import Callback
from experiments.training.config import TrainConfig
from experiments.training.loop import train

__all__ = ["run_training", "summarise", "steps_to", "SUMMARY_COLUMNS", "METHOD_SPECS", "method_spec",
           "train_config", "seeds_to_decide"]

SUMMARY_COLUMNS = (
    "run",
    "status",
    "test_accuracy",
    "test_macro_f1",
    "best_val_accuracy",
    "best_step",
    "final_val_accuracy",
    "step_seconds",
    "peak_memory_delta_mb",
    "trainable_parameters",
)


def run_training(
    store: Store,
    unit: str,
    config: TrainConfig,
    *,
    tags: dict[str, Any] | None = None,
    callbacks: Sequence[Callback] = (),
    data: EncodedSplits | None = None,
    isolate: bool = False,
    progress: bool = False,
) -> pd.DataFrame:
    """Run (or resume, or reuse) the training run of ``unit``; return its tagged rows.

    Every row gets the columns ``run`` (= ``unit``), ``status``, ``trainable_parameters``,
    ``baseline_memory_mb`` and the ``tags`` (method, degree, lr, seed, ...: what figures group by).
    ``data`` replaces the config's data set (e.g. a few-shot subset); it is part of the run's
    identity through its fingerprint. ``isolate`` trains in a fresh (spawned) process, so that
    its CPU peak memory (resident set) is its own and not the high-water mark of earlier runs
    in this process; the parent then reads the stored result.
    A run stopped by a NaN loss is kept (status ``stopped_nan``): a diverging setting is a result.
    """
    if store.done(unit):
        return store.load_table(unit)
    out = store.dir / "train" / unit
    if isolate:
        _train_in_fresh_process(config, out, callbacks, data, progress)
    result = train(config, out, callbacks=callbacks, data=data, progress=progress)  # stored if isolated
    info = read_json(out / "run.json", remedy=f"delete {out} to train that run afresh")
    rows = result.rows.copy()
    rows.insert(0, "run", unit)
    rows["status"] = result.status
    rows["trainable_parameters"] = int(info.get("trainable_parameters", result.trainable_parameters))
    rows["baseline_memory_mb"] = float(info.get("baseline_memory_mb") or math.nan)
    for key, value in (tags or {}).items():
        if key in rows.columns:
            raise ValueError(f"tag {key!r} collides with a recorded column")
        rows[key] = value
    store.save_table(unit, rows)
    return rows


def _child(parent: int, config: TrainConfig, out: str, callbacks: Sequence[Callback],
           data: EncodedSplits | None, progress: bool) -> None:
    die_with_parent(parent)  # a killed suite leaves no training behind
    train(config, out, callbacks=callbacks, data=data, progress=progress)


def _train_in_fresh_process(config: TrainConfig, out: Path, callbacks: Sequence[Callback],
                            data: EncodedSplits | None, progress: bool) -> None:
    """Train in a spawned child that dies with this process (and is killed if this one stops)."""
    import multiprocessing
    import os

    process = multiprocessing.get_context("spawn").Process(
        target=_child, args=(os.getpid(), config, str(out), list(callbacks), data, progress), daemon=False)
    process.start()
    try:
        process.join()
    finally:  # Ctrl-C or an error here: the child must not train on alone
        if process.is_alive():
            process.kill()
            process.join()
    if process.exitcode != 0:
        raise RuntimeError(f"the training run in {out} failed in its own process (exit code "
                           f"{process.exitcode}); its error is printed above; run again to resume it")


def steps_to(evals: pd.DataFrame, target: float) -> float:
    """First evaluated step whose validation accuracy reaches ``target``; NaN if none does."""
    hit = evals[evals["accuracy"] >= target]
    return float(hit["step"].min()) if len(hit) else math.nan


def summarise(rows: pd.DataFrame, *, target: float | None = None, skip_steps: int = 3) -> pd.DataFrame:
    """One row per run: test metrics (checkpoint chosen by validation), best / final validation
    accuracy, median step seconds (the first ``skip_steps`` steps, warm-up, left out), peak memory
    above the run's baseline, trainable parameters, steps to ``target`` validation accuracy, and
    every tag column (constant within a run)."""
    if rows.empty:
        raise ValueError("no rows to summarise")
    per_run = rows.groupby("run")
    tag_columns = [
        c for c in rows.columns if c not in _RECORDED and per_run[c].nunique(dropna=False).max() <= 1
    ]
    out = []
    for run, group in rows.groupby("run", sort=True):
        train_rows = group[group["kind"] == "train"]
        evals = group[group["kind"] == "eval"].sort_values("step")
        test = group[group["kind"] == "test"]
        steady = train_rows[train_rows["step"] > skip_steps]
        steady = steady if len(steady) else train_rows
        baseline = group["baseline_memory_mb"].iloc[0]
        row: dict[str, Any] = {c: group[c].iloc[0] for c in tag_columns}
        row.update(
            {
                "run": run,
                "test_accuracy": float(test["accuracy"].iloc[0]) if len(test) else math.nan,
                "test_macro_f1": float(test["macro_f1"].iloc[0]) if len(test) else math.nan,
                "best_val_accuracy": float(evals["accuracy"].max()) if len(evals) else math.nan,
                "best_step": float(test["step"].iloc[0]) if len(test) else math.nan,
                "final_val_accuracy": float(evals["accuracy"].iloc[-1]) if len(evals) else math.nan,
                "step_seconds": float(np.median(steady["seconds"])) if len(steady) else math.nan,
                "peak_memory_delta_mb": (
                    float(train_rows["peak_memory_mb"].max() - baseline) if len(train_rows) else math.nan
                ),
            }
        )
        if target is not None:
            row["steps_to_target"] = steps_to(evals, target) if len(evals) else math.nan
        out.append(row)
    return pd.DataFrame(out)


# Columns the trainer records (vary within a run), as opposed to the tags added per run.
_RECORDED = frozenset(
    {
        "step",
        "kind",
        "loss",
        "lr",
        "grad_norm",
        "seconds",
        "train_seconds",
        "tokens_per_s",
        "peak_memory_mb",
        "accuracy",
        "macro_f1",
        "examples",
        "message",
        "selected_by",
    }
)

# ------------------------------------------------------------------------ methods and configs ---
# name -> (experiments.training.methods method, its options, head). Every experiment that fine-tunes
# names its runs by these keys; a degree given to :func:`method_spec` replaces Propulsion's.
METHOD_SPECS: dict[str, tuple[str, tuple[tuple[str, object], ...], str]] = {
    "full": ("full", (), "train"),
    "lora": ("lora", (("r", 8),), "train"),
    "ia3": ("ia3", (), "train"),
    "bitfit": ("bitfit", (), "train"),
    "head": ("head", (), "train"),  # linear probe: the classification head only
    "propulsion": ("propulsion", (("degree", 5),), "train"),
    "propulsion_reference": ("propulsion", (("preset", "reference"), ("degree", 5)), "train"),
    "propulsion_frozen_head": ("propulsion", (("degree", 5),), "frozen"),
}


def method_spec(name: str, degree: int | None = None) -> tuple[str, tuple[tuple[str, object], ...], str]:
    """``(method, options, head)`` of :data:`METHOD_SPECS` ``[name]``, Propulsion's degree set to
    ``degree`` when given.

    Raises:
        ValueError: unknown name, or a degree for a method without one.
    """
    if name not in METHOD_SPECS:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(METHOD_SPECS)}")
    method, options, head = METHOD_SPECS[name]
    if degree is not None:
        if method != "propulsion":
            raise ValueError(f"method {name!r} has no degree (only Propulsion's do)")
        if isinstance(degree, bool) or not isinstance(degree, int) or degree < 1:
            raise ValueError(f"degree must be an integer >= 1, got {degree!r}")
        options = tuple((k, degree if k == "degree" else v) for k, v in options)
    return method, options, head


# Fields every fine-tuning experiment's config names the same way; train_config reads them.
SHARED_FIELDS = ("model", "steps", "batch_size", "max_length", "max_examples", "eval_every", "eval_examples")


def train_config(config: Any, *, method_name: str, lr: float, seed: int, dataset: str | None = None,
                 degree: int | None = None, **overrides: Any) -> TrainConfig:
    """The :class:`TrainConfig` of one run of a suite experiment.

    Reads :data:`SHARED_FIELDS` (those the config has), ``dataset`` (unless given) and the
    device from the experiment ``config``; the method from :func:`method_spec`; the suite's
    defaults: AdamW without weight decay, linear decay after 10% warm-up, clipping at 1.0,
    checkpoints every ``max(eval_every, 10)`` steps, no best-parameter file. ``overrides`` replace
    any field (``optimizer="sgd"``, ``schedule="constant"``, ``head="frozen"``, ...).
    """
    method, options, head = method_spec(method_name, degree)
    values: dict[str, Any] = {f: getattr(config, f) for f in SHARED_FIELDS if hasattr(config, f)}
    eval_every = int(values.get("eval_every", 50))
    values.update(
        dataset=dataset if dataset is not None else config.dataset,
        method=method, method_options=options, head=head, optimizer="adamw", lr=float(lr),
        weight_decay=0.0, schedule="linear", warmup_steps=int(values.get("steps", 200)) // 10,
        clip_norm=1.0, seed=int(seed), device=config.resolve_device(),
        checkpoint_every=max(eval_every, 10), target_accuracy=None, save_best=False,
    )
    values.update(overrides)
    return TrainConfig(**values)


def seeds_to_decide(values: Sequence[float] | np.ndarray, threshold: float, *, level: float = 0.95) -> int:
    """Seeds a Student-t interval of the mean of ``values`` would need to clear ``threshold`` at
    this mean and spread: the smallest ``n`` with ``t_{n-1} s / sqrt(n) < |mean - threshold|``
    (``s`` the sample standard deviation). Returns 0 with fewer than two values or zero spread
    beside a mean on the threshold (no estimate), and caps the search at 10,000."""
    from scipy import stats

    arr = np.asarray(values, dtype=np.float64)
    arr = arr[np.isfinite(arr)]
    if arr.size < 2:
        return 0
    gap, s = abs(float(arr.mean()) - threshold), float(arr.std(ddof=1))
    if gap == 0:
        return 0
    if s == 0:
        return 2
    for n in range(2, 10_001):
        if stats.t.ppf(0.5 + level / 2, n - 1) * s / math.sqrt(n) < gap:
            return n
    return 10_000
