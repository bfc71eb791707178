"""Experiment 9: does a higher degree k give higher accuracy, at learning rates tuned per k?

The paper reports its best SST-2 accuracy at k = 25 and argues that a higher degree helps. With
one learning rate for every k that comparison mixes the degree with the step size (at z = 1 the
factor z**k moves k times faster than z), so here every degree gets its own rate, chosen on
validation from a small grid (:mod:`experiments.suite._tuning`, tuning seeds kept apart), and
then trains on ``seeds`` evaluation seeds with the same splits and batch order per seed.
Propulsion trains z on the backbone's linear layers and the classification head in full.

The verdict is a paired comparison over seeds: the test accuracy of the paper's best degree
(``paper_degree``, 25) minus that of k = 1, with a 95% Student-t interval; a gain is claimed only
if the whole interval clears ``min_gain``.

    propulsion-ntk run e9 --preset quick
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from experiments.figures import method_color, new_figure, save_figure, style
from experiments.suite import _tuning
from experiments.suite._training import run_training, seeds_to_decide, summarise, train_config
from experiments.suite._training_setup import TINY_SETUP, DataSetTrainingConfig
from experiments.suite.base import Store, Verdict, make_interval_verdict
from experiments.suite.stats import mean_interval, paired_difference

NAME = "e9_degree_accuracy"
TITLE = "Accuracy against the degree k at learning rates tuned per k"
CLAIMS = ("higher_degree_helps",)


@dataclass(frozen=True)
class Config(DataSetTrainingConfig):
    degrees: tuple[int, ...] = field(default=(1, 5, 15, 25, 55), metadata={"help": "degrees k"})
    paper_degree: int = field(
        default=25, metadata={"help": "the degree the paper finds best (compared with k=1)"}
    )
    lr_grids: tuple[tuple[int, tuple[float, ...]], ...] = field(
        default=_tuning.DEGREE_GRIDS,
        metadata={"help": "AdamW rates tried per degree, (from degree, rates) pairs; chosen on validation"},
    )
    tuning_seeds: tuple[int, ...] = field(default=(100,), metadata={"help": "seeds of the tuning runs"})
    min_gain: float = field(
        default=0.01,
        metadata={
            "help": "supported if the paired gain acc(paper_degree) - acc(1) has lower bound > this; "
            "not supported if its upper bound < this"
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        bad = [k for k in self.degrees if isinstance(k, bool) or not isinstance(k, int) or k < 1]
        if bad or 1 not in self.degrees or self.paper_degree not in self.degrees:
            raise ValueError(
                f"degrees must be integers >= 1 including 1 and paper_degree={self.paper_degree}, "
                f"got {self.degrees}"
            )
        for k in self.degrees:
            _tuning.grid_for(self.lr_grids, k)  # raises if a degree has no grid


PRESETS: dict[str, Config] = {
    "tiny": Config(
        degrees=(1, 3),
        paper_degree=3,
        lr_grids=((1, (1e-3, 1e-2)),),
        **TINY_SETUP,
    ),
    # quick: given rates (one-rate grids, no tuning runs), two seeds: a smoke run of the design
    "quick": Config(
        degrees=(1, 5, 25), lr_grids=((1, (1e-2,)), (5, (3e-3,)), (15, (1e-3,))), seeds=(0, 1), steps=80
    ),
    # study: 15 runs (5 degrees x 3 seeds) at rates from the tuning shared with e3/e5; about 10 min
    "study": Config(steps=100),
    "full": Config(
        device="auto",
        seeds=(0, 1, 2, 3, 4),
        steps=400,
        max_length=64,
        max_examples=None,
        eval_every=50,
        eval_examples=1000,
    ),
}


def candidates(config: Config) -> list[_tuning.Candidate]:
    return [_tuning.Candidate("propulsion", k, _tuning.grid_for(config.lr_grids, k)) for k in config.degrees]


def main(config: Config, store: Store, *, progress: bool = False) -> None:
    table = _tuning.tune(store.root, _tuning.setup_from(config), candidates(config), progress=progress)
    if not store.done("tuning"):
        store.save_table("tuning", table)
    rates = _tuning.chosen(store.load_table("tuning"))
    for k in config.degrees:
        lr = rates[f"propulsion_k{k}"]
        for seed in config.seeds:
            run_training(
                store,
                f"runs/k{k}/seed{seed}",
                train_config(config, method_name="propulsion", degree=k, lr=lr, seed=seed),
                tags={"k": k, "peak_lr": lr, "run_seed": seed},
                progress=progress,
            )
    store.provenance()


def load(store: Store, config: Config) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(one summary row per run, the tuning table)."""
    units = [f"runs/k{k}/seed{s}" for k in config.degrees for s in config.seeds]
    store.require("tuning", *units)
    rows = pd.concat([store.load_table(u) for u in units], ignore_index=True)
    return summarise(rows), store.load_table("tuning")


def per_degree(summary: pd.DataFrame) -> pd.DataFrame:
    """Per k: tuned lr, mean test accuracy and its 95% interval over seeds."""
    out = []
    for k, group in summary.groupby("k", sort=True):
        iv = mean_interval(group["test_accuracy"].to_numpy())
        out.append(
            {
                "k": int(k),
                "lr": float(group["peak_lr"].iloc[0]),
                "test_accuracy": iv.estimate,
                "low": iv.low,
                "high": iv.high,
                "seeds": iv.n,
            }
        )
    return pd.DataFrame(out)


def gain(summary: pd.DataFrame, k: int) -> tuple[object, np.ndarray]:
    """Paired interval of acc(k) - acc(1) over the seeds both have, and the differences."""
    a = summary[summary["k"] == k].set_index("run_seed")["test_accuracy"]
    b = summary[summary["k"] == 1].set_index("run_seed")["test_accuracy"]
    seeds = sorted(set(a.index) & set(b.index))
    return paired_difference(a.loc[seeds].to_numpy(), b.loc[seeds].to_numpy()), (
        a.loc[seeds] - b.loc[seeds]
    ).to_numpy()


def figures(store: Store, fig_dir: Path) -> list[Path]:
    config = store.config
    assert isinstance(config, Config)
    summary, _ = load(store, config)
    table = per_degree(summary)
    with style():
        fig, ax = new_figure("column", aspect=0.7)
        color = method_color("propulsion")
        for _, r in summary.iterrows():
            ax.plot(r["k"], r["test_accuracy"], ".", color=color, alpha=0.35)
        err = np.vstack([table["test_accuracy"] - table["low"], table["high"] - table["test_accuracy"]])
        ax.errorbar(
            table["k"],
            table["test_accuracy"],
            yerr=np.nan_to_num(err),
            fmt="o-",
            color=color,
            capsize=3,
            label=f"mean, 95% interval ({len(config.seeds)} seeds)",
        )
        for _, r in table.iterrows():
            ax.annotate(
                f"lr {r['lr']:.0e}",
                (r["k"], r["test_accuracy"]),
                textcoords="offset points",
                xytext=(0, 6),
                ha="center",
                fontsize="x-small",
            )
        ax.set_xscale("log")
        ax.minorticks_off()
        ax.set_xticks(list(config.degrees), [str(k) for k in config.degrees])
        ax.set(
            xlabel="degree k", ylabel="test accuracy", title=f"{config.dataset}: accuracy at lr tuned per k"
        )
        ax.legend(fontsize="x-small")
        return save_figure(fig, fig_dir, "e9_accuracy_vs_degree")


def verdicts(store: Store, config: Config) -> list[Verdict]:
    summary, tuning = load(store, config)
    k = config.paper_degree
    interval, diffs = gain(summary, k)
    others = []
    for other in config.degrees:
        if other not in (1, k):
            iv, _ = gain(summary, other)
            others.append(f"k={other}: {iv}")
    decided = not math.isnan(interval.low) and not interval.low <= config.min_gain <= interval.high
    need = (
        ""
        if decided
        else (
            f"; at this spread about {seeds_to_decide(diffs, config.min_gain)} seeds would "
            "decide (0: no estimate)"
        )
    )
    return [
        make_interval_verdict(
            claim="higher_degree_helps",
            statement=f"A higher degree gives higher accuracy (the paper's best SST-2 result is at k = {k})",
            measurement=(
                f"paired test-accuracy gain of k = {k} over k = 1 over {interval.n} seeds, each k at its "
                f"own AdamW rate chosen on validation ({_tuning.grid_text(tuning)}); {config.model} on "
                f"{config.dataset}, {config.steps} steps of batch {config.batch_size}, z on the backbone and "
                f"the head trained in full at the same rate; gains of the other degrees over k = 1: "
                f"{'; '.join(others) or 'none'}{need}"
            ),
            interval=interval,
            what="gain",
            support_if=(">", config.min_gain),
            refute_if=("<", config.min_gain),
            figure="e9_accuracy_vs_degree",
            experiment=NAME,
        )
    ]
