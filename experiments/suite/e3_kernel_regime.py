"""Experiment 3: does fine-tuning stay in the kernel regime, and how does that depend on k?

The paper argues that Propulsion trains in the "kernel regime" (kernel and Jacobian nearly
constant, so the model behaves like its linearisation). With z in [0.98, 1.02], as the paper
reports after training, z**k spans [0.33, 2.97] for k = 55 and the kernel factor
(k z**(k-1))**2 moves by up to ~8x, so the regime should weaken as k grows. Each run fine-tunes
with two callbacks on a fixed probe set of validation examples:

- :class:`experiments.dynamics.KernelTracker`: kernel distance ``1 - cos(K_t, K_0)`` of the
  trained parameters' NTK (trace over logits), its scale ratio, Jacobian drift
  ``||J_t - J_0|| / ||J_0||`` and, for Propulsion, the distribution of z and z**k per layer;
- :class:`experiments.linearised.LinearisedTracker`: a first-order Taylor model around the
  initial parameters trained in lock-step (same optimiser, batches and schedule); the relative
  gap of its logits to the real model's and both accuracies (Malladi et al. 2023's test).

Runs: Propulsion (z only, head trained) with k in ``degrees``, full fine-tuning and LoRA.

    propulsion-ntk run e3 --preset quick
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from experiments.dynamics import KernelTracker, KernelTrackerConfig
from experiments.figures import method_color, new_figure, save_figure, style
from experiments.linearised import LinearisedTracker
from experiments.suite._training import run_training
from experiments.suite.base import ExperimentConfig, Store, Verdict, decide, rule_text
from experiments.train import TrainConfig

NAME = "e3_kernel_regime"
TITLE = "Kernel regime during training: kernel drift, Jacobian drift and linearisation gap against k"
CLAIMS = ("kernel_regime",)


@dataclass(frozen=True)
class Config(ExperimentConfig):
    model: str = field(default="minilm", metadata={"help": "model short name"})
    dataset: str = field(default="rotten_tomatoes", metadata={"help": "data set"})
    degrees: tuple[int, ...] = field(default=(1, 5, 15, 55), metadata={"help": "Propulsion degrees k"})
    baselines: tuple[str, ...] = field(default=("full", "lora"), metadata={"help": "other methods tracked"})
    propulsion_lr: float = field(default=3e-3, metadata={"help": "AdamW lr of every Propulsion run"})
    full_lr: float = field(default=5e-5, metadata={"help": "AdamW lr of full fine-tuning"})
    lora_lr: float = field(default=1e-3, metadata={"help": "AdamW lr of LoRA (r = 8, query and value)"})
    steps: int = field(default=60, metadata={"help": "optimiser steps per run"})
    batch_size: int = field(default=16, metadata={"help": "examples per step"})
    max_length: int = field(default=32, metadata={"help": "tokens per sentence at most"})
    max_examples: int | None = field(default=4000, metadata={"help": "examples kept from the data set"})
    snapshot_every: int = field(default=20, metadata={"help": "kernel and linearisation snapshots every n"})
    probe_size: int = field(default=16, metadata={"help": "validation examples in the probe set"})
    eval_examples: int | None = field(default=256, metadata={"help": "validation examples per evaluation"})
    support_max_distance: float = field(
        default=0.1, metadata={"help": "kernel regime supported if the final kernel distance <= this"}
    )
    refute_min_distance: float = field(default=0.3, metadata={"help": "not supported if > this"})
    support_max_gap: float = field(
        default=0.1,
        metadata={"help": "and supported only if the final linearisation gap ||F - F_lin|| / ||F|| <= this"},
    )
    refute_min_gap: float = field(default=0.3, metadata={"help": "not supported if that gap > this"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in self.degrees):
            raise ValueError(f"degrees must be integers >= 1, got {self.degrees}")
        unknown = [b for b in self.baselines if b not in ("full", "lora")]
        if unknown:
            raise ValueError(f"baselines must be among ('full', 'lora'), got {unknown}")
        if not 0 <= self.support_max_distance <= self.refute_min_distance:
            raise ValueError("need 0 <= support_max_distance <= refute_min_distance")
        if not 0 <= self.support_max_gap <= self.refute_min_gap:
            raise ValueError("need 0 <= support_max_gap <= refute_min_gap")


PRESETS: dict[str, Config] = {
    "tiny": Config(
        degrees=(1, 3),
        baselines=("full",),
        steps=4,
        batch_size=4,
        max_length=12,
        max_examples=60,
        snapshot_every=2,
        probe_size=4,
        eval_examples=8,
    ),
    "quick": Config(),
    "study": Config(),  # placeholder until the study sizes are set (issue 13)
    "full": Config(
        device="auto",
        steps=300,
        max_length=64,
        max_examples=None,
        snapshot_every=25,
        probe_size=64,
        eval_examples=1000,
    ),
}


def plan(config: Config) -> list[dict]:
    runs = [
        {
            "unit": f"runs/propulsion_k{k}",
            "method_name": f"propulsion k={k}",
            "method": "propulsion",
            "degree": k,
            "options": (("degree", k),),
            "peak_lr": config.propulsion_lr,
        }
        for k in config.degrees
    ]
    for name in config.baselines:
        options = (("r", 8),) if name == "lora" else ()
        rate = config.lora_lr if name == "lora" else config.full_lr
        runs.append(
            {
                "unit": f"runs/{name}",
                "method_name": name,
                "method": name,
                "degree": math.nan,
                "options": options,
                "peak_lr": rate,
            }
        )
    return runs


def train_config(config: Config, run: dict) -> TrainConfig:
    return TrainConfig(
        model=config.model,
        dataset=config.dataset,
        method=run["method"],
        method_options=run["options"],
        head="train",
        optimizer="adamw",
        lr=run["peak_lr"],
        weight_decay=0.0,
        schedule="constant",
        steps=config.steps,
        batch_size=config.batch_size,
        clip_norm=1.0,
        eval_every=config.snapshot_every,
        eval_examples=config.eval_examples,
        max_length=config.max_length,
        max_examples=config.max_examples,
        seed=config.seed,
        device=config.resolve_device(),
        checkpoint_every=config.snapshot_every,
        target_accuracy=None,
        save_best=False,
        dropout=0.0,
    )


def callbacks(config: Config) -> tuple[KernelTracker, LinearisedTracker]:
    tracker = KernelTracker(
        KernelTrackerConfig(
            every=config.snapshot_every,
            probe_size=config.probe_size,
            probe_seed=config.seed,
            output="trace",
            jacobian="auto",
        )
    )
    linear = LinearisedTracker(config.snapshot_every, probe_size=config.probe_size, probe_seed=config.seed)
    return tracker, linear


def main(config: Config, store: Store, *, progress: bool = False) -> None:
    for run in plan(config):
        tags = {"method_name": run["method_name"], "k": run["degree"], "peak_lr": run["peak_lr"]}
        run_training(
            store,
            run["unit"],
            train_config(config, run),
            tags=tags,
            callbacks=callbacks(config),
            progress=progress,
        )
    store.provenance()


def load(store: Store, config: Config) -> pd.DataFrame:
    units = [run["unit"] for run in plan(config)]
    store.require(*units)
    return pd.concat([store.load_table(u) for u in units], ignore_index=True)


def final_metrics(rows: pd.DataFrame) -> pd.DataFrame:
    """Per run, at its last snapshot: kernel distance, scale ratio, Jacobian drift, linearisation
    gap, real and linearised probe accuracy, and the range of z**k over all Propulsion layers."""
    out = []
    for run, group in rows.groupby("run", sort=False):
        kernel = group[group["kind"] == "kernel"].sort_values("step")
        lin = group[group["kind"] == "linearised"].sort_values("step")
        z = group[(group["kind"] == "z")]
        last_z = z[z["step"] == z["step"].max()] if len(z) else z
        zk = last_z[last_z["quantity"] == "z**k"] if len(last_z) else last_z
        k_last = kernel.iloc[-1] if len(kernel) else None
        l_last = lin.iloc[-1] if len(lin) else None
        out.append(
            {
                "run": run,
                "method_name": group["method_name"].iloc[0],
                "k": group["k"].iloc[0],
                "status": group["status"].iloc[0],
                "kernel_distance": float(k_last["kernel_distance"]) if k_last is not None else math.nan,
                "scale_ratio": float(k_last["scale_ratio"]) if k_last is not None else math.nan,
                "jacobian_drift": float(k_last["jacobian_drift"])
                if k_last is not None and "jacobian_drift" in k_last
                else math.nan,
                "linearisation_gap": float(l_last["gap_rel"]) if l_last is not None else math.nan,
                "accuracy_real": float(l_last["accuracy_real"]) if l_last is not None else math.nan,
                "accuracy_lin": float(l_last["accuracy_lin"]) if l_last is not None else math.nan,
                "zk_min": float(zk["min"].min()) if len(zk) else math.nan,
                "zk_max": float(zk["max"].max()) if len(zk) else math.nan,
            }
        )
    return pd.DataFrame(out)


def figures(store: Store, fig_dir: Path) -> list[Path]:
    config = store.config
    assert isinstance(config, Config)
    rows = load(store, config)
    final = final_metrics(rows)
    prop = final[final["method_name"].str.startswith("propulsion")].sort_values("k")
    others = final[~final["method_name"].str.startswith("propulsion")]
    paths: list[Path] = []
    with style():
        fig, axes = new_figure("full", aspect=0.35, nrows=1, ncols=3)
        panels = (
            ("kernel_distance", "kernel distance 1 - cos(K_t, K_0)"),
            ("jacobian_drift", "Jacobian drift ||J_t - J_0|| / ||J_0||"),
            ("linearisation_gap", "linearisation gap ||F - F_lin|| / ||F||"),
        )
        for ax, (column, label) in zip(axes, panels, strict=True):
            ax.plot(prop["k"], prop[column], "o-", color=method_color("propulsion"), label="Propulsion")
            for _, row in others.iterrows():
                ax.axhline(
                    row[column], ls="--", color=method_color(row["method_name"]), label=row["method_name"]
                )
            ax.set_xscale("log")
            ax.set_yscale("log")  # k = 55 can diverge by orders of magnitude
            ax.set(xlabel="degree k", title=label)
            ax.title.set_fontsize("small")
        axes[0].legend(fontsize="x-small")
        paths += save_figure(fig, fig_dir, "e3_drift_vs_degree")

        kernel = rows[rows["kind"] == "kernel"]
        fig, ax = new_figure("column", aspect=0.7)
        for name, group in kernel.groupby("method_name", sort=True):
            group = group.sort_values("step")
            ax.plot(
                group["step"],
                group["kernel_distance"],
                "o-",
                markersize=3,
                label=name,
                color=method_color(str(name)),
                alpha=0.4 + 0.6 * (1 - 1 / (1 + np.log1p(group["k"].fillna(1).iloc[0]))),
            )
        ax.set(xlabel="step", ylabel="kernel distance to step 0", yscale="symlog")
        ax.legend(fontsize="x-small")
        paths += save_figure(fig, fig_dir, "e3_kernel_distance_vs_steps")
    return paths


def verdicts(store: Store, config: Config) -> list[Verdict]:
    """Per Propulsion degree: the kernel regime needs BOTH a small kernel distance and a small
    linearisation gap (a run whose kernel collapses early onto one direction can show a small
    distance while its outputs leave the linear model far behind): supported only if both
    criteria are, not supported if either is."""
    final = final_metrics(load(store, config))
    out = []
    propulsion = final[final["method_name"].str.startswith("propulsion")].sort_values("k")
    distance_rule = (("<=", config.support_max_distance), (">", config.refute_min_distance))
    gap_rule = (("<=", config.support_max_gap), (">", config.refute_min_gap))
    for _, row in propulsion.iterrows():
        k = int(row["k"])
        by_distance = decide(row["kernel_distance"], support_if=distance_rule[0], refute_if=distance_rule[1])
        by_gap = decide(row["linearisation_gap"], support_if=gap_rule[0], refute_if=gap_rule[1])
        verdict: Literal["supported", "not supported", "inconclusive"] = (
            "not supported"
            if "not supported" in (by_distance, by_gap)
            else "supported"
            if by_distance == by_gap == "supported"
            else "inconclusive"
        )
        out.append(
            Verdict(
                claim="kernel_regime",
                statement=f"Propulsion fine-tuning stays in the kernel regime (k = {k})",
                measurement=(
                    f"kernel distance 1 - cos(K_t, K_0) of the trained parameters' NTK after {config.steps} "
                    f"steps ({config.model}, {config.dataset}, {config.probe_size} probe examples, "
                    "dropout off; "
                    f"criterion: {by_distance}); linearisation gap ||F - F_lin|| / ||F|| "
                    f"{row['linearisation_gap']:.3g} (criterion: {by_gap}); Jacobian drift "
                    f"{row['jacobian_drift']:.3g}; kernel scale ratio {row['scale_ratio']:.3g}; "
                    "probe accuracy "
                    f"real {row['accuracy_real']:.3f} vs linearised {row['accuracy_lin']:.3f}; z**k in "
                    f"[{row['zk_min']:.3g}, {row['zk_max']:.3g}]"
                ),
                value=float(row["kernel_distance"]),
                threshold=(
                    f"{rule_text('kernel distance', *distance_rule)}; and "
                    f"{rule_text('linearisation gap', *gap_rule)}; supported only if both are, "
                    "not supported if either is"
                ),
                verdict=verdict,
                figure="e3_drift_vs_degree",
                experiment=NAME,
            )
        )
    return out
