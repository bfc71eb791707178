"""Experiment 4: is the degree k only a learning-rate knob?

At z = 1 the Propulsion factor z**k has derivative k, so the kernel is k^2 times the k = 1
kernel and, to first order, training with degree k is training with degree 1 at a larger
learning rate: under SGD the update of z**k is k^2 lr times the k = 1 gradient, under Adam
(whose step size ignores the gradient's scale) the update of z is about lr whatever k is, so
z**k moves about k lr. Away from z = 1 the higher terms of (1 + delta)**k differ, so the
equivalence can break as training moves z. Runs, per degree k in ``degrees``:

    adam  (k, lr)   (1, k lr)     (1, lr)          the last is the "no rescaling" control
    sgd   (k, lr)   (1, k^2 lr)   (1, lr)

on the same data, seed and batch order, repeated over ``seeds`` (paired: the three runs of a
seed share head initialisation and batch order); z-only Propulsion with the classification head
frozen (random) and z on it too, so every trained number is a z and one learning rate governs
all of them; no gradient clipping (clipping would act differently on the k-scaled gradients).

This is the toolkit's own hypothesis about what k does, not a claim of the paper (the paper
claims that a higher k gives higher accuracy; experiment e9 tests that); the report lists it in
its own section.

    propulsion-ntk run e4 --preset quick      # MiniLM, Rotten Tomatoes, a few minutes on a CPU
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from experiments.figures import method_color, new_figure, save_figure, style
from experiments.suite._training import run_training, summarise, train_config
from experiments.suite._training_setup import TINY_SETUP, DataSetTrainingConfig
from experiments.suite.base import Store, Verdict, make_interval_verdict
from experiments.suite.stats import Interval, mean_interval
from experiments.training.config import TrainConfig

NAME = "e4_degree_lr"
TITLE = "Degree versus learning rate: (k, lr) against (1, k lr) under Adam and (1, k^2 lr) under SGD"
CLAIMS = ("degree_is_lr",)
ROLES = ("degree", "rescaled", "control")  # (k, lr), (1, k^p lr), (1, lr)


@dataclass(frozen=True)
class Config(DataSetTrainingConfig):
    degrees: tuple[int, ...] = field(default=(5, 15), metadata={"help": "degrees k compared with k = 1"})
    adam_lr: float = field(default=2e-3, metadata={"help": "AdamW learning rate of the degree-k run"})
    sgd_lr: float = field(default=0.4, metadata={"help": "SGD learning rate of the degree-k run"})
    seeds: tuple[int, ...] = field(default=(0,), metadata={"help": "seeds (paired runs per seed)"})
    steps: int = field(default=100, metadata={"help": "optimiser steps per run"})
    support_max_gap: float = field(
        default=0.02,
        metadata={
            "help": "supported if the upper bound of the mean over seeds of the largest "
            "|acc(k, lr) - acc(1, rescaled lr)| is <= this"
        },
    )
    support_min_learning: float = field(
        default=0.05,
        metadata={
            "help": "the comparison counts only if both runs gain this much validation accuracy over step 0"
        },
    )
    refute_min_gap: float = field(
        default=0.05, metadata={"help": "not supported if that interval's lower bound > this"}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        bad = [k for k in self.degrees if isinstance(k, bool) or not isinstance(k, int) or k < 2]
        if not self.degrees or bad:
            raise ValueError(f"degrees must be integers >= 2 (each compared with k = 1), got {self.degrees}")
        if not (self.adam_lr > 0 and self.sgd_lr > 0):
            raise ValueError(f"learning rates must be positive, got {self.adam_lr}, {self.sgd_lr}")
        if not 0 <= self.support_max_gap <= self.refute_min_gap:
            raise ValueError("need 0 <= support_max_gap <= refute_min_gap")


PRESETS: dict[str, Config] = {
    "tiny": Config(degrees=(3,), **TINY_SETUP),
    "quick": Config(degrees=(5,), steps=80),
    # study: 18 runs (2 optimisers x 3 roles x 3 seeds) of 80 steps; about 9 min on 2 cores (estimate)
    "study": Config(degrees=(5,), seeds=(0, 1, 2), steps=80),
    "full": Config(
        device="auto",
        degrees=(5, 15, 55),
        seeds=(0, 1, 2),
        steps=300,
        max_length=64,
        max_examples=None,
        eval_every=25,
        eval_examples=None,
    ),
}


def plan(config: Config) -> list[dict]:
    """Every run: unit, optimizer, degree (the run's), peak_lr, role, k (the degree compared), power."""
    runs = []
    for k in config.degrees:
        for optimizer, lr, power in (("adamw", config.adam_lr, 1), ("sgd", config.sgd_lr, 2)):
            roles = (("degree", k, lr), ("rescaled", 1, lr * k**power), ("control", 1, lr))
            for role, degree, rate in roles:
                for seed in config.seeds:
                    runs.append(
                        {
                            "unit": f"runs/{optimizer}/k{k}/{role}/seed{seed}",
                            "optimizer": optimizer,
                            "degree": degree,
                            "peak_lr": rate,
                            "role": role,
                            "k": k,
                            "power": power,
                            "run_seed": seed,
                        }
                    )
    return runs


def run_config(config: Config, run: dict) -> TrainConfig:
    return train_config(
        config,
        method_name="propulsion_frozen_head",
        degree=run["degree"],
        lr=run["peak_lr"],
        seed=run["run_seed"],
        optimizer=run["optimizer"],
        momentum=0.0,
        schedule="constant",
        warmup_steps=0,
        clip_norm=None,
    )


def main(config: Config, store: Store, *, progress: bool = False) -> None:
    for run in plan(config):
        tags = {k: v for k, v in run.items() if k != "unit"}
        run_training(store, run["unit"], run_config(config, run), tags=tags, progress=progress)
    store.provenance()


def _rows(store: Store, config: Config) -> pd.DataFrame:
    units = [run["unit"] for run in plan(config)]
    store.require(*units)
    return pd.concat([store.load_table(u) for u in units], ignore_index=True)


def pair_gaps(summary: pd.DataFrame) -> pd.DataFrame:
    """Per (optimizer, k, seed): final validation accuracy of the three roles and the gaps
    |degree - rescaled| (the hypothesis) and |degree - control| (what no rescaling gives)."""
    out = []
    for (optimizer, k, seed), group in summary.groupby(["optimizer", "k", "run_seed"], sort=True):
        acc = {r["role"]: r["final_val_accuracy"] for _, r in group.iterrows()}
        gain = {r["role"]: r["best_val_accuracy"] - r["initial_val_accuracy"] for _, r in group.iterrows()}
        status = set(group["status"])
        out.append(
            {
                "optimizer": optimizer,
                "k": int(k),
                "run_seed": int(seed),
                **{f"acc_{r}": acc.get(r, math.nan) for r in ROLES},
                "gap_rescaled": abs(acc.get("degree", math.nan) - acc.get("rescaled", math.nan)),
                "gap_control": abs(acc.get("degree", math.nan) - acc.get("control", math.nan)),
                "learned": min(gain.get("degree", math.nan), gain.get("rescaled", math.nan)),
                "all_finished": status == {"finished"},
            }
        )
    return pd.DataFrame(out)


def loss_gap(rows: pd.DataFrame, optimizer: str, k: int, other: str) -> float:
    """Mean over steps of |loss_degree - loss_other| / mean loss_degree (training loss)."""
    train = rows[(rows["kind"] == "train") & (rows["optimizer"] == optimizer) & (rows["k"] == k)]
    a = train[train["role"] == "degree"].set_index("step")["loss"]
    b = train[train["role"] == other].set_index("step")["loss"]
    joined = pd.concat([a, b], axis=1, join="inner").dropna()
    if joined.empty:
        return math.nan
    return float((joined.iloc[:, 0] - joined.iloc[:, 1]).abs().mean() / joined.iloc[:, 0].abs().mean())


def figures(store: Store, fig_dir: Path) -> list[Path]:
    config = store.config
    assert isinstance(config, Config)
    rows = _rows(store, config)
    paths: list[Path] = []
    styles = {"degree": "-", "rescaled": "--", "control": ":"}
    with style():
        for k in config.degrees:
            fig, axes = new_figure("full", aspect=0.55, nrows=1, ncols=2, sharey=True)
            for ax, optimizer in zip(axes, ("adamw", "sgd"), strict=True):
                power = 1 if optimizer == "adamw" else 2
                for role in ROLES:
                    sel = rows[(rows["optimizer"] == optimizer) & (rows["k"] == k) & (rows["role"] == role)]
                    ev = sel[sel["kind"] == "eval"]
                    if ev.empty:
                        continue
                    stats = ev.groupby("step")["accuracy"].agg(["mean", "std"]).sort_index()
                    label = {
                        "degree": f"k={k}, lr",
                        "rescaled": f"k=1, {k}{'^2' if power == 2 else ''} lr",
                        "control": "k=1, lr",
                    }[role]
                    color = method_color("propulsion") if role != "rescaled" else method_color("linearised")
                    ax.plot(
                        stats.index,
                        stats["mean"],
                        styles[role],
                        color=color,
                        alpha=1.0 if role != "control" else 0.6,
                        label=label,
                        marker="o",
                        markersize=2.5,
                    )
                    band = stats["std"].fillna(0.0)
                    ax.fill_between(
                        stats.index, stats["mean"] - band, stats["mean"] + band, color=color, alpha=0.15, lw=0
                    )
                ax.set_title(
                    f"{'AdamW' if optimizer == 'adamw' else 'SGD'}: lr = "
                    f"{config.adam_lr if optimizer == 'adamw' else config.sgd_lr:g}"
                )
                ax.set_xlabel("step")
                ax.legend(fontsize="small")
            axes[0].set_ylabel(f"validation accuracy (mean, band +-1 sd, {len(config.seeds)} seeds)")
            paths += save_figure(fig, fig_dir, f"e4_degree_vs_lr_k{k}")
    return paths


def verdicts(store: Store, config: Config) -> list[Verdict]:
    """Per optimiser: the largest gap over k of each seed, its mean over seeds with a 95% interval;
    the interval is void (inconclusive) when some compared run learned less than
    ``support_min_learning`` (equal accuracies of runs that learned nothing say nothing)."""
    rows = _rows(store, config)
    summary = summarise(rows)
    initial = rows[(rows["kind"] == "eval") & (rows["step"] == 0)].set_index("run")["accuracy"]
    summary["initial_val_accuracy"] = summary["run"].map(initial)
    gaps = pair_gaps(summary)
    out = []
    for optimizer, power in (("adamw", "k"), ("sgd", "k^2")):
        sel = gaps[gaps["optimizer"] == optimizer]
        worst = sel.groupby("run_seed")["gap_rescaled"].max().to_numpy(dtype=float)
        control = float(np.nanmean(sel.groupby("run_seed")["gap_control"].max())) if len(sel) else math.nan
        learned = float(sel["learned"].min()) if len(sel) else math.nan
        finite = worst[np.isfinite(worst)]
        gate = None
        if learned >= config.support_min_learning and finite.size:
            interval = mean_interval(finite)
        else:
            if finite.size:  # no number of seeds helps while a compared run does not learn
                gate = (
                    f"a compared run gained only {learned:.3f} validation accuracy over step 0 "
                    f"(< {config.support_min_learning:g}): it did not learn, so the gap is not judged"
                )
            interval = Interval(
                float(np.nanmean(worst)) if finite.size else math.nan, math.nan, math.nan, int(finite.size)
            )
        ks = ", ".join(str(k) for k in sorted(set(sel["k"])))
        out.append(
            make_interval_verdict(
                claim="degree_is_lr",
                statement=f"degree k acts as a learning-rate factor ({power} under "
                f"{'Adam' if optimizer == 'adamw' else 'SGD'}; the toolkit's hypothesis)",
                measurement=(
                    f"per seed, the largest |final validation accuracy of (k, lr) - of (1, {power} lr)| "
                    "over k in "
                    f"{{{ks}}}; mean over {len(config.seeds)} seeds; {config.model} on {config.dataset}, "
                    f"{config.steps} steps, z only, head frozen; without rescaling (1, lr) the gap is "
                    f"{control:.3f}; the compared runs gain at least {learned:.3f} validation accuracy over "
                    "step 0 "
                    f"(the interval counts only if >= {config.support_min_learning:g}, else: inconclusive)"
                ),
                interval=interval,
                what="gap",
                support_if=("<=", config.support_max_gap),
                refute_if=(">", config.refute_min_gap),
                figure=f"e4_degree_vs_lr_k{config.degrees[0]}",
                experiment=NAME,
                gate=gate,
            )
        )
    return out
