"""Experiment 3: does fine-tuning stay in the kernel regime, and how does that depend on k?

The paper argues that Propulsion trains in the "kernel regime" (kernel and Jacobian nearly
constant, so the model behaves like its linearisation). With z in [0.98, 1.02], as the paper
reports after training, z**k spans [0.33, 2.97] for k = 55, so the regime should weaken as k
grows. Each run fine-tunes with two callbacks on a fixed probe set of validation examples:

- :class:`experiments.dynamics.tracking.KernelTracker`: the trained parameters' NTK (trace over logits)
  and the Jacobian drift ``||J_t - J_0|| / ||J_0||``; from the saved kernels this experiment
  computes the *centred* kernel distance ``1 - CKA(K_t, K_0)`` (CKA centres over examples, so a
  constant block that dominates the raw kernel cannot hide a change of its shape; the uncentred
  ``1 - cos(K_t, K_0)`` is kept for reference only);
- :class:`experiments.dynamics.linearised.LinearisedTracker`: a first-order Taylor model around the
  initial parameters trained in lock-step; the relative gap of its logits to the real model's.

The head is an explicit factor (three treatments, each at the same z learning rate):

- ``probe_then_z`` isolates z: the classification head is first fitted on frozen features (a
  linear probe, ``probe_steps`` AdamW steps at ``probe_lr``), then frozen at those values, and
  only the z of the backbone train; the tracked kernel is the z kernel alone;
- ``head_trained``: z on the backbone and the head trained in full from its random start at the
  z rate (the head's block enters the tracked kernel);
- ``z_head``: the authors' choice, the head's weights frozen at their random start with a z on it.

Full fine-tuning and LoRA run the same way as calibration: a criterion that they fail as badly
says little about Propulsion. Every run's rate is chosen on validation from a small grid
(:mod:`experiments.suite._tuning`, shared with e5 and e9 when the training setup is the same;
Propulsion per k; a one-rate grid is a given rate, as in the quick preset); the tuning runs keep
the model's dropout, these runs turn it off so the tracked quantities are deterministic. Every
number is a mean over ``seeds`` with a 95% interval.

    propulsion-ntk run e3 --preset quick
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch

from experiments.dynamics.linearised import LinearisedTracker
from experiments.dynamics.tracking import KernelTracker, KernelTrackerConfig
from experiments.figures import method_color, new_figure, save_figure, style
from experiments.suite import _tuning
from experiments.suite._training import run_training, seeds_to_decide, train_config
from experiments.suite._training_setup import TINY_SETUP, DataSetTrainingConfig
from experiments.suite.base import Store, Verdict, rule_text
from experiments.suite.stats import Interval, decide_interval, mean_interval
from experiments.training.callbacks import Callback, TrainState

NAME = "e3_kernel_regime"
TITLE = "Kernel regime during training: centred kernel drift, Jacobian drift and linearisation gap against k"
CLAIMS = ("kernel_regime",)
TREATMENTS = ("probe_then_z", "head_trained", "z_head")
TREATMENT_TEXT = {
    "probe_then_z": "head fitted first as a linear probe, then frozen; z only on the backbone",
    "head_trained": "z on the backbone, head trained in full at the z rate",
    "z_head": "z on the backbone and on the head, head weights frozen at random init (the authors' choice)",
}
METRICS = (
    ("centred_distance", "centred kernel distance 1 - CKA(K_t, K_0)"),
    ("jacobian_drift", "Jacobian drift ||J_t - J_0|| / ||J_0||"),
    ("linearisation_gap", "linearisation gap ||F - F_lin|| / ||F||"),
)


@dataclass(frozen=True)
class Config(DataSetTrainingConfig):
    degrees: tuple[int, ...] = field(default=(1, 5, 15, 55), metadata={"help": "degrees k of probe_then_z"})
    treatment_degrees: tuple[int, ...] = field(
        default=(5,), metadata={"help": "degrees of the other head treatments (head_trained, z_head)"}
    )
    treatments: tuple[str, ...] = field(default=TREATMENTS, metadata={"help": "head treatments run"})
    baselines: tuple[str, ...] = field(default=("full", "lora"), metadata={
        "may_be_empty": True, "help": "calibration methods"})
    lr_grids: tuple[tuple[int, tuple[float, ...]], ...] = field(
        default=_tuning.DEGREE_GRIDS,
        metadata={"help": "AdamW rates tried for Propulsion, (from degree, rates) pairs (shared with e9)"},
    )
    baseline_grids: tuple[tuple[str, tuple[float, ...]], ...] = field(
        default=(("full", (2e-5, 5e-5, 1e-4)), ("lora", (3e-4, 1e-3, 3e-3))),
        metadata={"help": "AdamW rates tried per baseline (shared tuning with e5)"},
    )
    tuning_seeds: tuple[int, ...] = field(default=(100,), metadata={"help": "seeds of the tuning runs"})
    probe_steps: int = field(default=60, metadata={"help": "AdamW steps of the linear probe (probe_then_z)"})
    probe_lr: float = field(default=1e-2, metadata={"help": "learning rate of the linear probe"})
    snapshot_every: int = field(default=50, metadata={"help": "kernel and linearisation snapshots every n"})
    probe_size: int = field(default=32, metadata={"help": "validation examples in the kernel probe set"})
    support_max_distance: float = field(
        default=0.1,
        metadata={"help": "supported only if the upper bound of the centred kernel distance is <= this"},
    )
    refute_min_distance: float = field(
        default=0.3, metadata={"help": "not supported if its lower bound > this"}
    )
    support_max_drift: float = field(
        default=0.1, metadata={"help": "supported only if the upper bound of the Jacobian drift is <= this"}
    )
    refute_min_drift: float = field(default=0.3, metadata={"help": "not supported if its lower bound > this"})
    support_max_gap: float = field(
        default=0.1,
        metadata={"help": "supported only if the upper bound of the linearisation gap is <= this"},
    )
    refute_min_gap: float = field(default=0.3, metadata={"help": "not supported if its lower bound > this"})

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("degrees", "treatment_degrees"):
            if any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in getattr(self, name)):
                raise ValueError(f"{name} must be integers >= 1, got {getattr(self, name)}")
        unknown = [t for t in self.treatments if t not in TREATMENTS]
        if unknown or not self.treatments:
            raise ValueError(f"treatments must be a non-empty subset of {TREATMENTS}, got {self.treatments}")
        if [b for b in self.baselines if b not in ("full", "lora")]:
            raise ValueError(f"baselines must be among ('full', 'lora'), got {self.baselines}")
        if [b for b in self.baselines if b not in dict(self.baseline_grids)]:
            raise ValueError("baseline_grids need a grid for every baseline")
        for k in (*self.degrees, *self.treatment_degrees):
            _tuning.grid_for(self.lr_grids, k)  # raises if a degree has no grid
        for low, high in (
            (self.support_max_distance, self.refute_min_distance),
            (self.support_max_drift, self.refute_min_drift),
            (self.support_max_gap, self.refute_min_gap),
        ):
            if not 0 <= low <= high:
                raise ValueError("every support threshold must lie in [0, its refute threshold]")


PRESETS: dict[str, Config] = {
    # tiny: every treatment once per seed, given rates (the tuning path is tested on its own)
    "tiny": Config(
        degrees=(2,),
        treatment_degrees=(2,),
        baselines=(),
        lr_grids=((1, (1e-2,)),),
        probe_steps=3,
        probe_size=4,
        snapshot_every=2,
        **TINY_SETUP,
    ),
    # quick: given rates (one-rate grids: no tuning runs), two seeds: a smoke run of the design
    "quick": Config(
        degrees=(1, 55),
        treatments=("probe_then_z", "head_trained"),
        baselines=("full",),
        lr_grids=((1, (3e-3,)), (15, (1e-3,))),
        baseline_grids=(("full", (5e-5,)),),
        seeds=(0, 1),
        steps=60,
        probe_steps=40,
        probe_size=16,
        snapshot_every=30,
    ),
    # study: 21 tracked runs (12 probe_then_z, 3 + 3 other treatments at k = 5, 3 LoRA) + 3 probes;
    # rates from the tuning shared with e5/e9 (same setup: 100 steps); about 30 min on 2 cores
    # (estimate). The calibration is LoRA: a tracked full fine-tuning run costs about 4x a tracked
    # Propulsion run on a CPU (full keeps its place in the full preset).
    "study": Config(
        baselines=("lora",),
        steps=100,
        probe_size=16,
        snapshot_every=50,
    ),
    "full": Config(
        device="auto",
        seeds=(0, 1, 2, 3, 4),
        steps=300,
        max_length=64,
        max_examples=None,
        eval_every=25,
        snapshot_every=25,
        eval_examples=1000,
        probe_size=64,
        probe_steps=200,
    ),
}


def plan(config: Config) -> list[dict]:
    """Every run: unit, method_name (METHOD_SPECS key), degree, treatment, label, seed."""
    runs = []
    for treatment in config.treatments:
        ks = config.degrees if treatment == "probe_then_z" else config.treatment_degrees
        for k in ks:
            for s in config.seeds:
                runs.append(
                    {
                        "unit": f"runs/{treatment}/k{k}/seed{s}",
                        "treatment": treatment,
                        "degree": k,
                        "label": f"propulsion k={k} ({treatment})",
                        "seed": s,
                    }
                )
    for name in config.baselines:
        for s in config.seeds:
            runs.append(
                {"unit": f"runs/{name}/seed{s}", "treatment": name, "degree": None, "label": name, "seed": s}
            )
    return runs


def candidates(config: Config) -> list[_tuning.Candidate]:
    ks = sorted(set(config.degrees) | set(config.treatment_degrees))
    grids = dict(config.baseline_grids)
    return [_tuning.Candidate("propulsion", k, _tuning.grid_for(config.lr_grids, k)) for k in ks] + [
        _tuning.Candidate(b, None, grids[b]) for b in config.baselines
    ]


class HeadFromProbe(Callback):
    """At the start of a run, copy the linear probe's head (``best.safetensors`` of the probe
    run) into the model, before any snapshot or validation pass; the head stays frozen."""

    def __init__(self, path: str | Path):
        self.path = str(path)

    def on_start(self, state: TrainState) -> None:
        from safetensors.torch import load_file

        buffers = {n for n, _ in state.model.named_buffers()}
        saved = {n: v for n, v in load_file(self.path).items() if n not in buffers}  # buffers: unchanged
        params = dict(state.model.named_parameters())
        missing = [n for n in saved if n not in params]
        if missing:
            raise ValueError(
                f"the probe's parameters {missing} are not in this model; was the probe trained "
                "on the same model?"
            )
        with torch.no_grad():
            for name, value in saved.items():
                if params[name].requires_grad:
                    raise ValueError(f"{name} is trained in this run; the probe's head must stay frozen")
                params[name].copy_(value.to(params[name].device, params[name].dtype))


def run_config(config: Config, run: dict, rates: dict[str, float]) -> tuple[Any, float]:
    """(TrainConfig, lr) of a run; dropout off so the tracked quantities are deterministic."""
    common: dict[str, Any] = {"dropout": 0.0, "seed": run["seed"]}
    if run["degree"] is None:
        lr = rates[run["treatment"]]
        return train_config(config, method_name=run["treatment"], lr=lr, **common), lr
    k, lr = run["degree"], rates[f"propulsion_k{run['degree']}"]
    if run["treatment"] == "head_trained":
        return train_config(config, method_name="propulsion", degree=k, lr=lr, **common), lr
    if run["treatment"] == "z_head":
        return train_config(config, method_name="propulsion_frozen_head", degree=k, lr=lr, **common), lr
    cfg = train_config(config, method_name="propulsion_frozen_head", degree=k, lr=lr, **common)
    options = (*cfg.method_options, ("exclude_modules", ("classifier",)))
    return dataclasses.replace(cfg, method_options=options), lr


def probe_config(config: Config, seed: int) -> Any:
    return train_config(
        config,
        method_name="head",
        lr=config.probe_lr,
        seed=seed,
        steps=config.probe_steps,
        dropout=0.0,
        save_best=True,
        eval_every=min(config.eval_every, config.probe_steps),
        warmup_steps=0,
        schedule="constant",
    )


def callbacks(config: Config) -> list[Callback]:
    tracker = KernelTracker(
        KernelTrackerConfig(
            every=config.snapshot_every,
            probe_size=config.probe_size,
            probe_seed=0,
            output="trace",
            jacobian="auto",
        )
    )
    return [tracker, LinearisedTracker(config.snapshot_every, probe_size=config.probe_size, probe_seed=0)]


def centred_drift(train_dir: Path) -> pd.DataFrame:
    """Per saved kernel snapshot of a run: ``1 - CKA(K_t, K_0)`` and ``1 - cos(K_t, K_0)``."""
    import json

    from safetensors.torch import load_file

    from ntk import metrics

    folder = train_dir / "kernels"
    k0 = load_file(str(folder / "initial.safetensors"))["trained"]
    manifest = json.loads((folder / "manifest.json").read_text())
    rows = [{"step": 0, "centred_distance": 0.0, "uncentred_distance": 0.0}]
    for step, snap in manifest["snapshots"].items():
        kt = load_file(str(folder / snap["file"]))["trained"]
        if int(step) == 0 or not bool(torch.isfinite(kt).all()):
            continue
        rows.append(
            {
                "step": int(step),
                "centred_distance": 1.0 - metrics.cka(kt, k0, sym_tol=1e-4),
                "uncentred_distance": metrics.kernel_distance(kt, k0),
            }
        )
    return pd.DataFrame(rows).sort_values("step").reset_index(drop=True)


def main(config: Config, store: Store, *, progress: bool = False) -> None:
    setup = _tuning.setup_from(config, seeds=config.tuning_seeds)
    table = _tuning.tune(store.root, setup, candidates(config), progress=progress)
    if not store.done("tuning"):
        store.save_table("tuning", table)
    rates = _tuning.chosen(store.load_table("tuning"))
    for run in plan(config):
        cbs: list[Callback] = callbacks(config)
        if run["treatment"] == "probe_then_z":
            probe_unit = f"probe/seed{run['seed']}"
            run_training(
                store, probe_unit, probe_config(config, run["seed"]), tags={"probe": True}, progress=progress
            )
            cbs = [HeadFromProbe(store.dir / "train" / probe_unit / "best.safetensors"), *cbs]
        cfg, lr = run_config(config, run, rates)
        tags = {
            "method_name": run["label"],
            "treatment": run["treatment"],
            "k": math.nan if run["degree"] is None else run["degree"],
            "peak_lr": lr,
            "run_seed": run["seed"],
        }
        run_training(store, run["unit"], cfg, tags=tags, callbacks=cbs, progress=progress)
        drift_unit = run["unit"].replace("runs/", "drift/", 1)
        if not store.done(drift_unit):
            store.save_table(
                drift_unit, centred_drift(store.dir / "train" / run["unit"]).assign(run=run["unit"], **tags)
            )
    store.provenance()


def load(store: Store, config: Config) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(rows of every run, centred drift per snapshot of every run)."""
    units = [run["unit"] for run in plan(config)]
    store.require(*units, *[u.replace("runs/", "drift/", 1) for u in units])
    rows = pd.concat([store.load_table(u) for u in units], ignore_index=True)
    drift = pd.concat([store.load_table(u.replace("runs/", "drift/", 1)) for u in units], ignore_index=True)
    return rows, drift


def tuning_table(store: Store) -> pd.DataFrame:
    """The rates tried and chosen (saved unit ``tuning``)."""
    return store.load_table("tuning")


def final_metrics(rows: pd.DataFrame, drift: pd.DataFrame) -> pd.DataFrame:
    """Per run, at its last snapshot: centred and uncentred kernel distance, Jacobian drift,
    linearisation gap, probe accuracy real / linearised, the range of z**k, and its tags."""
    out = []
    last_drift = drift.sort_values("step").groupby("run").tail(1).set_index("run")
    for run, group in rows.groupby("run", sort=False):
        kernel = group[group["kind"] == "kernel"].sort_values("step")
        lin = group[group["kind"] == "linearised"].sort_values("step")
        z = group[group["kind"] == "z"]
        zk = z[(z["step"] == z["step"].max()) & (z["quantity"] == "z**k")] if len(z) else z
        k_last = kernel.iloc[-1] if len(kernel) else None
        l_last = lin.iloc[-1] if len(lin) else None
        d = last_drift.loc[run] if run in last_drift.index else None
        out.append(
            {
                "run": run,
                "method_name": group["method_name"].iloc[0],
                "treatment": group["treatment"].iloc[0],
                "k": group["k"].iloc[0],
                "peak_lr": group["peak_lr"].iloc[0],
                "run_seed": group["run_seed"].iloc[0],
                "status": group["status"].iloc[0],
                "centred_distance": float(d["centred_distance"]) if d is not None else math.nan,
                "uncentred_distance": float(d["uncentred_distance"]) if d is not None else math.nan,
                "jacobian_drift": float(k_last["jacobian_drift"]) if k_last is not None else math.nan,
                "linearisation_gap": float(l_last["gap_rel"]) if l_last is not None else math.nan,
                "accuracy_real": float(l_last["accuracy_real"]) if l_last is not None else math.nan,
                "accuracy_lin": float(l_last["accuracy_lin"]) if l_last is not None else math.nan,
                "zk_min": float(zk["min"].min()) if len(zk) else math.nan,
                "zk_max": float(zk["max"].max()) if len(zk) else math.nan,
            }
        )
    return pd.DataFrame(out)


def _iv(values: pd.Series) -> Interval:
    arr = values.to_numpy(dtype=float)
    arr = arr[np.isfinite(arr)]
    return mean_interval(arr) if arr.size else Interval(math.nan, math.nan, math.nan, 0)


def intervals(final: pd.DataFrame) -> pd.DataFrame:
    """Per (treatment, k): mean and 95% interval over seeds of every metric."""
    out = []
    for (treatment, k), group in final.groupby(["treatment", "k"], sort=True, dropna=False):
        row: dict[str, Any] = {
            "treatment": treatment,
            "k": k,
            "seeds": len(group),
            "peak_lr": float(group["peak_lr"].iloc[0]),
            "diverged": int((group["status"] != "finished").sum()),
        }
        for column in (
            "centred_distance",
            "uncentred_distance",
            "jacobian_drift",
            "linearisation_gap",
            "zk_min",
            "zk_max",
            "accuracy_real",
        ):
            iv = _iv(group[column])
            row.update(
                {column: iv.estimate, f"{column}_low": iv.low, f"{column}_high": iv.high, f"{column}_n": iv.n}
            )
        out.append(row)
    return pd.DataFrame(out)


_TREATMENT_STYLE = {"probe_then_z": ("o", "-"), "head_trained": ("s", "--"), "z_head": ("^", ":")}


def figures(store: Store, fig_dir: Path) -> list[Path]:
    from matplotlib import colormaps
    from matplotlib.ticker import FormatStrFormatter

    config = store.config
    assert isinstance(config, Config)
    rows, drift = load(store, config)
    table = intervals(final_metrics(rows, drift))
    paths: list[Path] = []
    with style():
        fig, axes = new_figure("full", aspect=0.36, nrows=1, ncols=3)
        for ax, (column, label) in zip(axes, METRICS, strict=True):
            for treatment in config.treatments:
                sel = table[table["treatment"] == treatment].sort_values("k")
                if sel.empty:
                    continue
                marker, ls = _TREATMENT_STYLE[treatment]
                err = np.nan_to_num(
                    np.vstack([sel[column] - sel[f"{column}_low"], sel[f"{column}_high"] - sel[column]])
                )
                ax.errorbar(
                    sel["k"],
                    sel[column],
                    yerr=err,
                    marker=marker,
                    ls=ls,
                    capsize=2,
                    color=method_color("propulsion"),
                    label=f"Propulsion, {treatment}",
                )
            for name in config.baselines:
                sel = table[table["treatment"] == name]
                if sel.empty:
                    continue
                r = sel.iloc[0]
                ax.axhline(r[column], ls="--", color=method_color(name), label=f"{name} (band: 95%)")
                if math.isfinite(r[f"{column}_low"]):
                    ax.axhspan(
                        r[f"{column}_low"], r[f"{column}_high"], color=method_color(name), alpha=0.12, lw=0
                    )
            ks = sorted(set(config.degrees) | set(config.treatment_degrees))
            ax.set_xscale("log")
            ax.set_xticks(ks, [str(k) for k in ks])
            ax.minorticks_off()
            values = table[column].to_numpy(dtype=float)
            if np.all(values[np.isfinite(values)] > 0):  # orders of magnitude apart across k
                ax.set_yscale("log")
            ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
            ax.set(xlabel="degree k", title=label)
            ax.title.set_fontsize("small")
        axes[0].legend(fontsize="xx-small")
        fig.suptitle(
            f"mean and 95% interval over {len(config.seeds)} seeds, after {config.steps} steps "
            "(learning rates: see the claims report)",
            fontsize="x-small",
        )
        paths += save_figure(fig, fig_dir, "e3_drift_vs_degree")

        fig, ax = new_figure("column", aspect=0.75)
        ks = sorted(set(config.degrees) | set(config.treatment_degrees))
        cmap = colormaps["plasma"]
        shade = {k: cmap(0.1 + 0.75 * i / max(len(ks) - 1, 1)) for i, k in enumerate(ks)}
        for (treatment, k), group in drift.groupby(["treatment", "k"], sort=True, dropna=False):
            if treatment not in ("probe_then_z", *config.baselines):
                continue
            stats = group.groupby("step")["centred_distance"].agg(["mean", "std", "count"]).sort_index()
            if treatment == "probe_then_z":
                color, label = shade[int(k)], f"Propulsion k={int(k)} (probe, then z)"
            else:
                color, label = method_color(str(treatment)), str(treatment)
            ax.plot(stats.index, stats["mean"], "o-", markersize=3, color=color, label=label)
            band = stats["std"].fillna(0.0)
            ax.fill_between(
                stats.index, stats["mean"] - band, stats["mean"] + band, color=color, alpha=0.18, lw=0
            )
        ax.set(
            xlabel="step",
            ylabel="centred kernel distance 1 - CKA(K_t, K_0)",
            title=f"mean and +-1 sd over {len(config.seeds)} seeds",
        )
        ax.set_ylim(bottom=0)
        ax.legend(fontsize="xx-small")
        paths += save_figure(fig, fig_dir, "e3_kernel_distance_vs_steps")
    return paths


def _combine(decisions: list[str]) -> Literal["supported", "not supported", "inconclusive"]:
    if "not supported" in decisions:
        return "not supported"
    return "supported" if all(d == "supported" for d in decisions) else "inconclusive"


def _seeds_text(
    final: pd.DataFrame, treatment: str, k: int, column: str, support: float, refute: float
) -> str:
    """What would decide an inconclusive criterion: the seeds an interval needs at this spread."""
    sel = final[(final["treatment"] == treatment) & (final["k"] == k)][column].to_numpy(dtype=float)
    sel = sel[np.isfinite(sel)]
    if sel.size < 2:
        return "; more seeds are needed for an interval"
    mean = float(sel.mean())
    if support < mean <= refute:
        return (
            f"; the mean {mean:.3g} lies between the thresholds, so no number of seeds decides "
            "it at this training length"
        )
    need = seeds_to_decide(sel, support if mean <= support else refute)
    return f"; at this spread about {need} seeds would decide"


def verdicts(store: Store, config: Config) -> list[Verdict]:
    """Per (treatment, k): the kernel regime needs a small centred kernel distance, a small
    Jacobian drift and a small linearisation gap, each decided on its 95% interval over seeds:
    supported only if all three are, not supported if any one is."""
    rows, drift = load(store, config)
    final = final_metrics(rows, drift)
    table = intervals(final)
    grids = _tuning.grid_text(tuning_table(store))
    rules = {
        "centred_distance": (("<=", config.support_max_distance), (">", config.refute_min_distance)),
        "jacobian_drift": (("<=", config.support_max_drift), (">", config.refute_min_drift)),
        "linearisation_gap": (("<=", config.support_max_gap), (">", config.refute_min_gap)),
    }
    calibration = (
        "; ".join(
            f"{r['treatment']} (lr {r['peak_lr']:.0e}): centred distance {r['centred_distance']:.3g}, "
            "Jacobian drift "
            f"{r['jacobian_drift']:.3g}, linearisation gap {r['linearisation_gap']:.3g}"
            for _, r in table[table["treatment"].isin(config.baselines)].iterrows()
        )
        or "none run"
    )
    out = []
    for _, r in table[~table["treatment"].isin(config.baselines)].iterrows():
        k, treatment = int(r["k"]), str(r["treatment"])
        parts, decisions = [], []
        for column, (support, refute) in rules.items():
            iv = Interval(r[column], r[f"{column}_low"], r[f"{column}_high"], int(r[f"{column}_n"]))
            decision, why = decide_interval(iv, support_if=support, refute_if=refute)
            decisions.append(decision)
            parts.append(
                f"{column.replace('_', ' ')} {decision} ({why}"
                + (
                    _seeds_text(final, treatment, k, column, support[1], refute[1])
                    if decision == "inconclusive"
                    else ""
                )
                + ")"
            )
        head_lr = (
            "the head trained at the same rate"
            if treatment == "head_trained"
            else f"the head fitted first by a linear probe ({config.probe_steps} steps at lr "
            f"{config.probe_lr:g}) "
            "and then frozen"
            if treatment == "probe_then_z"
            else "the head frozen at random init with a z"
        )
        out.append(
            Verdict(
                claim="kernel_regime",
                statement=f"Propulsion fine-tuning stays in the kernel regime (k = {k}, {treatment})",
                measurement=(
                    f"after {config.steps} steps at the z rate {r['peak_lr']:.0e} (AdamW; rates tried, "
                    f"validation accuracy, chosen in brackets: {grids}), "
                    f"{head_lr}; {TREATMENT_TEXT[treatment]}; {config.model} on {config.dataset}, "
                    f"{config.probe_size} probe examples, dropout off, {int(r['seeds'])} seeds "
                    f"({int(r['diverged'])} stopped on NaN); centred kernel distance "
                    f"{r['centred_distance']:.3g} [{r['centred_distance_low']:.3g}, "
                    f"{r['centred_distance_high']:.3g}], "
                    f"Jacobian drift {r['jacobian_drift']:.3g} [{r['jacobian_drift_low']:.3g}, "
                    f"{r['jacobian_drift_high']:.3g}], linearisation gap {r['linearisation_gap']:.3g} "
                    f"[{r['linearisation_gap_low']:.3g}, {r['linearisation_gap_high']:.3g}]; "
                    "uncentred distance "
                    f"1 - cos(K_t, K_0) {r['uncentred_distance']:.3g} (reference only); z**k in "
                    f"[{r['zk_min']:.3g}, {r['zk_max']:.3g}]; calibration: {calibration}"
                ),
                value=float(r["centred_distance"]),
                threshold="; ".join(rule_text(c.replace("_", " "), *rules[c]) for c in rules)
                + "; each on its 95% interval over seeds; supported only if all three are, not supported "
                "if any is",
                verdict="inconclusive"
                if r["diverged"] and _combine(decisions) == "supported"
                else _combine(decisions),
                figure="e3_drift_vs_degree",
                experiment=NAME,
                low=float(r["centred_distance_low"]),
                high=float(r["centred_distance_high"]),
                n=int(r["centred_distance_n"]),
                decided_by="; ".join(parts)
                + ("; a run stopped on a NaN loss, so no support is claimed" if r["diverged"] else ""),
            )
        )
    return out
