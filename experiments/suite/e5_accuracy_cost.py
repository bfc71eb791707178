"""Experiment 5: accuracy, convergence and cost of Propulsion beside full fine-tuning and PEFT.

Every method of :data:`METHOD_SPECS` fine-tunes the same pre-trained model on the same splits
with the same step budget, batch order and seeds; each has its own learning rate (the usual
ranges: small for full fine-tuning, larger for the few-parameter methods). Recorded per run:
test accuracy and macro-F1 on the checkpoint chosen by validation, steps to a target
validation accuracy, median step time and peak memory above the run's baseline (CUDA allocator
peak, or, on a CPU, the resident-set peak of a fresh process per run: in one long process the
allocator reuses memory freed by earlier runs and the peaks say nothing), and the
trainable-parameter count.
``propulsion_frozen_head`` is Propulsion with the classification head kept at its random
initial values (z on it too): the paper's setting leaves the head's treatment implicit.

    propulsion-ntk run e5 --preset quick      # MiniLM, Rotten Tomatoes, one seed, CPU
    propulsion-ntk run e5 --preset full --device cuda   # three data sets, three seeds
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from experiments.figures import curve_plot, method_color, new_figure, save_figure, style
from experiments.suite._training import run_training, summarise
from experiments.suite.base import ExperimentConfig, Store, Verdict, make_verdict
from experiments.train import TrainConfig

NAME = "e5_accuracy_cost"
TITLE = "Accuracy, convergence and cost: full fine-tuning, LoRA, IA3, BitFit and Propulsion"
CLAIMS = ("accuracy", "convergence", "memory")

# name -> (experiments.methods method, its options, head)
METHOD_SPECS: dict[str, tuple[str, tuple[tuple[str, object], ...], str]] = {
    "full": ("full", (), "train"),
    "lora": ("lora", (("r", 8),), "train"),
    "ia3": ("ia3", (), "train"),
    "bitfit": ("bitfit", (), "train"),
    "propulsion": ("propulsion", (("degree", 5),), "train"),
    "propulsion_reference": ("propulsion", (("preset", "reference"), ("degree", 5)), "train"),
    "propulsion_frozen_head": ("propulsion", (("degree", 5),), "frozen"),
}
VARIANT_COLORS = {"propulsion_reference": "#fdb863", "propulsion_frozen_head": "#7f3b08"}
DEFAULT_LR = (
    ("full", 5e-5),
    ("lora", 1e-3),
    ("ia3", 5e-3),
    ("bitfit", 1e-3),
    ("propulsion", 3e-3),
    ("propulsion_reference", 3e-3),
    ("propulsion_frozen_head", 3e-3),
)


@dataclass(frozen=True)
class Config(ExperimentConfig):
    model: str = field(default="minilm", metadata={"help": "model short name"})
    datasets: tuple[str, ...] = field(default=("rotten_tomatoes",), metadata={"help": "data sets"})
    methods: tuple[str, ...] = field(default=tuple(METHOD_SPECS), metadata={"help": "keys of METHOD_SPECS"})
    learning_rates: tuple[tuple[str, float], ...] = field(
        default=DEFAULT_LR,
        metadata={"help": "peak learning rate per method (AdamW, linear decay after 10% warm-up)"},
    )
    seeds: tuple[int, ...] = field(default=(0,), metadata={"help": "seeds (splits, head, order)"})
    steps: int = field(default=120, metadata={"help": "optimiser steps per run (equal budgets)"})
    batch_size: int = field(default=16, metadata={"help": "examples per step"})
    max_length: int = field(default=32, metadata={"help": "tokens per text at most"})
    max_examples: int | None = field(default=4000, metadata={"help": "examples kept per data set"})
    eval_every: int = field(default=20, metadata={"help": "validation every n steps"})
    eval_examples: int | None = field(default=256, metadata={"help": "validation examples per evaluation"})
    isolate_runs: bool = field(default=True, metadata={
        "help": "on a CPU, train each run in a fresh process so its peak memory (RSS) is its own"})
    target_accuracy: float = field(default=0.75, metadata={"help": "validation accuracy 'to target'"})
    accuracy_support_gap: float = field(
        default=-0.01,
        metadata={"help": "accuracy claim supported if mean test acc(propulsion) - acc(full) >= this"},
    )
    accuracy_refute_gap: float = field(default=-0.03, metadata={"help": "not supported if < this"})
    convergence_support_ratio: float = field(
        default=1.0,
        metadata={"help": "convergence claim supported if steps to target, propulsion / full, <= this"},
    )
    convergence_refute_ratio: float = field(default=1.5, metadata={"help": "not supported if > this"})
    memory_support_ratio: float = field(
        default=0.9,
        metadata={"help": "memory claim supported if peak memory, propulsion / min(LoRA, IA3), <= this"},
    )
    memory_refute_ratio: float = field(default=1.0, metadata={"help": "not supported if > this"})

    def __post_init__(self) -> None:
        super().__post_init__()
        unknown = [m for m in self.methods if m not in METHOD_SPECS]
        if not self.methods or unknown:
            raise ValueError(f"methods must be a non-empty subset of {list(METHOD_SPECS)}; unknown {unknown}")
        rates = dict(self.learning_rates)
        missing = [m for m in self.methods if m not in rates]
        if missing or any(not r > 0 for r in rates.values()):
            raise ValueError(f"learning_rates need a positive rate for every method; missing {missing}")
        if not self.seeds or not self.datasets:
            raise ValueError("seeds and datasets must not be empty")
        if not 0 < self.target_accuracy <= 1:
            raise ValueError(f"target_accuracy must be in (0, 1], got {self.target_accuracy}")


PRESETS: dict[str, Config] = {
    "tiny": Config(
        methods=("full", "propulsion"),
        steps=4,
        batch_size=4,
        max_length=12,
        max_examples=60,
        eval_every=2,
        eval_examples=8,
        target_accuracy=0.5,
        isolate_runs=False,
    ),
    "quick": Config(methods=("full", "lora", "ia3", "bitfit", "propulsion", "propulsion_frozen_head")),
    "study": Config(),  # placeholder until the study sizes are set (issue 13)
    "full": Config(
        device="auto",
        datasets=("rotten_tomatoes", "imdb", "bbc_news"),
        seeds=(0, 1, 2),
        steps=600,
        max_length=128,
        max_examples=None,
        eval_every=50,
        eval_examples=1000,
        target_accuracy=0.8,
    ),
}


def plan(config: Config) -> list[dict]:
    return [
        {"unit": f"runs/{d}/{m}/seed{s}", "dataset": d, "method_name": m, "seed": s}
        for d in config.datasets
        for m in config.methods
        for s in config.seeds
    ]


def train_config(config: Config, run: dict) -> TrainConfig:
    method, options, head = METHOD_SPECS[run["method_name"]]
    return TrainConfig(
        model=config.model,
        dataset=run["dataset"],
        method=method,
        method_options=options,
        head=head,
        optimizer="adamw",
        lr=dict(config.learning_rates)[run["method_name"]],
        weight_decay=0.0,
        schedule="linear",
        warmup_steps=config.steps // 10,
        steps=config.steps,
        batch_size=config.batch_size,
        clip_norm=1.0,
        eval_every=config.eval_every,
        eval_examples=config.eval_examples,
        max_length=config.max_length,
        max_examples=config.max_examples,
        seed=run["seed"],
        device=config.resolve_device(),
        checkpoint_every=max(config.eval_every, 10),
        target_accuracy=config.target_accuracy,
        save_best=False,
    )


def main(config: Config, store: Store, *, progress: bool = False) -> None:
    for run in plan(config):
        tags = {"dataset": run["dataset"], "method_name": run["method_name"], "run_seed": run["seed"]}
        isolate = config.isolate_runs and config.resolve_device() == "cpu"
        run_training(store, run["unit"], train_config(config, run), tags=tags, isolate=isolate,
                     progress=progress)
    store.provenance()


def load(store: Store, config: Config) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(all rows, one summary row per run) from the saved tables."""
    units = [run["unit"] for run in plan(config)]
    store.require(*units)
    rows = pd.concat([store.load_table(u) for u in units], ignore_index=True)
    return rows, summarise(rows, target=config.target_accuracy)


def table(summary: pd.DataFrame) -> pd.DataFrame:
    """Per (dataset, method): mean and std over seeds, with ratios to full fine-tuning."""
    agg = (
        summary.groupby(["dataset", "method_name"])
        .agg(
            test_accuracy=("test_accuracy", "mean"),
            test_accuracy_sd=("test_accuracy", "std"),
            test_macro_f1=("test_macro_f1", "mean"),
            steps_to_target=("steps_to_target", "median"),
            step_seconds=("step_seconds", "median"),
            peak_memory_delta_mb=("peak_memory_delta_mb", "median"),
            trainable_parameters=("trainable_parameters", "first"),
            seeds=("run_seed", "nunique"),
        )
        .reset_index()
    )
    for column in ("step_seconds", "peak_memory_delta_mb"):
        full = agg[agg["method_name"] == "full"].set_index("dataset")[column]
        agg[f"{column}_ratio_to_full"] = agg[column] / agg["dataset"].map(full)
    return agg


def figures(store: Store, fig_dir: Path) -> list[Path]:
    config = store.config
    assert isinstance(config, Config)
    rows, summary = load(store, config)
    agg = table(summary)
    paths: list[Path] = []
    evals = rows[rows["kind"] == "eval"]
    colors = {m: method_color(m) for m in config.methods}
    # Propulsion variants share the method's colour family but must stay distinguishable.
    colors.update({k: v for k, v in VARIANT_COLORS.items() if k in colors})
    with style():
        for dataset in config.datasets:
            fig, ax = new_figure("column", aspect=0.7)
            curve_plot(
                ax,
                evals[evals["dataset"] == dataset],
                x="step",
                y="accuracy",
                hue="method_name",
                unit="run_seed",
                colors=colors,
                marker="o",
            )
            ax.axhline(config.target_accuracy, color="grey", lw=0.8, ls=":")
            ax.set(xlabel="step", ylabel="validation accuracy", title=f"{dataset}: accuracy vs iterations")
            ax.legend(fontsize="x-small")
            paths += save_figure(fig, fig_dir, f"e5_accuracy_vs_steps_{dataset}")
        fig, axes = new_figure("full", aspect=0.4, nrows=1, ncols=3)
        first = agg[agg["dataset"] == config.datasets[0]].set_index("method_name")
        first = first.reindex(list(config.methods))
        x = np.arange(len(first))
        bars = (
            ("test_accuracy", "test accuracy", "test_accuracy_sd"),
            ("peak_memory_delta_mb", "peak memory above baseline (MiB)", None),
            ("step_seconds", "seconds per step", None),
        )
        for ax, (column, label, err) in zip(axes, bars, strict=True):
            ax.bar(
                x,
                first[column],
                yerr=first[err] if err else None,
                color=[colors[m] for m in first.index],
                capsize=2,
            )
            ax.set_xticks(x, first.index, rotation=45, ha="right", fontsize="x-small")
            ax.set_ylabel(label)
        axes[0].set_title(config.datasets[0])
        paths += save_figure(fig, fig_dir, "e5_cost_per_method")
    return paths


def _ratio(agg: pd.DataFrame, column: str, numerator: str, denominators: tuple[str, ...]) -> float:
    values = agg.groupby("method_name")[column].mean()
    if numerator not in values or not any(d in values for d in denominators):
        return math.nan
    return float(values[numerator] / min(values[d] for d in denominators if d in values))


def verdicts(store: Store, config: Config) -> list[Verdict]:
    _, summary = load(store, config)
    agg = table(summary)
    setup = (
        f"{config.model}; {', '.join(config.datasets)}; {len(config.seeds)} seed(s); "
        f"{config.steps} steps of batch {config.batch_size}, max {config.max_length} tokens"
    )
    acc = agg.groupby("method_name")["test_accuracy"].mean()
    gap = float(acc.get("propulsion", math.nan) - acc.get("full", math.nan))
    out = [
        make_verdict(
            claim="accuracy",
            statement="Propulsion matches full fine-tuning's accuracy",
            measurement=f"mean test accuracy of Propulsion (k=5, z only) minus full fine-tuning; {setup}",
            value=gap,
            what="accuracy difference",
            support_if=(">=", config.accuracy_support_gap),
            refute_if=("<", config.accuracy_refute_gap),
            figure="e5_cost_per_method",
            experiment=NAME,
        )
    ]
    steps = summary.groupby("method_name")["steps_to_target"].median()
    s_p, s_f = steps.get("propulsion", math.nan), steps.get("full", math.nan)
    if math.isnan(s_p) and not math.isnan(s_f):
        ratio = math.inf  # full fine-tuning reached the target and Propulsion never did
    else:
        ratio = float(s_p / s_f) if s_f and not math.isnan(s_f) else math.nan
    out.append(
        make_verdict(
            claim="convergence",
            statement="Propulsion converges quickly (SST-2: 0.9 in about 50 iterations)",
            measurement=(
                f"median steps to {config.target_accuracy:g} validation accuracy, Propulsion / full "
                f"fine-tuning ({s_p:g} / {s_f:g}; inf: only full reached it, NaN: neither); {setup}"
            ),
            value=ratio,
            what="steps ratio",
            support_if=("<=", config.convergence_support_ratio),
            refute_if=(">", config.convergence_refute_ratio),
            figure=f"e5_accuracy_vs_steps_{config.datasets[0]}",
            experiment=NAME,
        )
    )
    memory = _ratio(agg, "peak_memory_delta_mb", "propulsion", ("lora", "ia3"))
    out.append(
        make_verdict(
            claim="memory",
            statement="Propulsion needs less memory than other PEFT methods (17.2 GB vs 26 GB)",
            measurement=f"peak training memory above baseline, Propulsion / min(LoRA, IA3); {setup}",
            value=memory,
            what="memory ratio",
            support_if=("<=", config.memory_support_ratio),
            refute_if=(">", config.memory_refute_ratio),
            figure="e5_cost_per_method",
            experiment=NAME,
        )
    )
    return out
