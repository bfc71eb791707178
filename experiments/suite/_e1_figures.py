"""Figures of experiment 1 (kernel similarity), drawn from its saved tables and kernels only.

Every figure with several seeds shows 95% intervals: hierarchical (seeds x half-samples) for the
bars, Student-t over seeds for the curves; with one seed the curves carry no band and the bars
the example-level interval of that seed, and the titles say so.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from experiments.dynamics import similarity
from experiments.suite.base import Store

_VARIANT_COLORS = {"pretrained": "#D55E00", "random": "#0072B2"}
_TREATMENT_COLORS = {"a": "#D55E00", "b": "#E69F00", "c": "#56B4E9"}
_BAR_METHODS = ("propulsion", "propulsion_attn", "propulsion_reference", "lora", "ia3", "bitfit", "head")


def _models(config: Any) -> list[tuple[str, str]]:
    from experiments.suite.e1_kernel_similarity import LANGUAGE_MODELS

    return [(f, v) for f in LANGUAGE_MODELS for v in config.variants(f)]


def draw(store: Store, config: Any, frame: pd.DataFrame, fig_dir: Path) -> list[Path]:
    from experiments.figures import new_figure, save_figure, style
    from experiments.suite.e1_kernel_similarity import _WIDTHS, Unit

    models = _models(config)
    first = [Unit(f, v, _WIDTHS[f], config.seed) for f, v in models]
    store.require(*(f"kernels/{u.name}" for u in first))
    paths: list[Path] = []
    with style():
        for unit in first:
            paths += _heatmap(store, unit, config, frame, fig_dir)
        if first:
            fig, axes = new_figure(
                "full",
                aspect=0.36 * max(1, (len(first) + 1) // 2),
                ncols=min(2, len(first)),
                nrows=(len(first) + 1) // 2,
                squeeze=False,
            )
            for ax, unit in zip(axes.ravel(), first, strict=False):
                _spectra(ax, store.load_arrays(f"kernels/{unit.name}"), unit)
            for ax in axes.ravel()[len(first) :]:
                ax.set_visible(False)
            paths += save_figure(fig, fig_dir, "e1_spectra")
            paths += _methods(frame, config, models, fig_dir)
            paths += _convergence(frame, config, models, fig_dir)
            paths += _degrees(frame, config, models, fig_dir)
        paths += _width(frame, config, fig_dir)
    return paths


def _label(family: str, variant: str) -> str:
    return (
        f"{variant} {'MiniLM' if family == 'minilm' else 'SmolLM2-135M' if family == 'smollm2' else family}"
    )


def _heatmap(store: Store, unit: Any, config: Any, frame: pd.DataFrame, fig_dir: Path) -> list[Path]:
    from experiments.figures import heatmap_triplet, save_figure
    from experiments.suite.e1_kernel_similarity import select

    arrays = store.load_arrays(f"kernels/{unit.name}")
    kf, kp = (
        similarity.trace(torch.from_numpy(arrays[k]).double()).numpy() for k in ("K_full", "K_propulsion")
    )
    metric, layout = config.verdict_metric, config.verdict_layout

    def value(name: str) -> float:
        sub = select(
            frame,
            family=unit.family,
            variant=unit.variant,
            treatment="a",
            method="propulsion",
            layout=layout,
            metric=name,
        )
        sub = sub[sub["seed"] == unit.seed]
        return float(sub["value"].iloc[0]) if not sub.empty else float("nan")

    caption = (
        f"seed {unit.seed}, {layout} layout (as the verdicts): {metric} {value(metric):.3f}, biased "
        f"{metric.removesuffix('_u')} {value(metric.removesuffix('_u')):.3f}; uncentred cosine "
        f"{value('alignment'):.3f} (dominated by the input-independent block)"
    )
    fig, _, _ = heatmap_triplet(kf, kp, names=("K_F", f"K_P (k={config.degree})"), caption=caption)
    fig.suptitle(
        f"{_label(unit.family, unit.variant)}, {kf.shape[0]} sentences sorted by label, panels: trace "
        "over outputs, each divided by its mean diagonal; z on every Linear incl. the head: at z = 1 "
        "K_P(k) = k^2 K_P(1), the same picture for every k",
        fontsize=6,
    )
    stem = (
        f"e1_heatmaps_{unit.variant}"
        if unit.family == "minilm"
        else f"e1_heatmaps_{unit.family}_{unit.variant}"
    )
    return save_figure(fig, fig_dir, stem)


def _spectra(ax, arrays: dict[str, np.ndarray], unit: Any) -> None:
    from experiments.figures import spectrum_plot
    from ntk import metrics

    names = [
        k
        for k in ("full", "propulsion", "propulsion_nohead", "propulsion_attn", "lora", "ia3", "bitfit")
        if f"K_{k}" in arrays
    ]
    spectrum_plot(
        ax,
        {k: metrics.eigenspectrum(arrays[f"K_{k}"].astype(np.float64)).numpy() for k in names},
        normalise="max",
        linestyles={"propulsion_nohead": "--", "propulsion_attn": ":"},
    )
    ax.set_title(
        f"{_label(unit.family, unit.variant)} (seed {unit.seed}): eigenvalues of the N C x N C kernels"
    )
    ax.legend(fontsize=5)


def _methods(frame: pd.DataFrame, config: Any, models: list[tuple[str, str]], fig_dir: Path) -> list[Path]:
    from experiments.figures import new_figure, save_figure
    from experiments.suite.e1_kernel_similarity import TREATMENTS, pair_interval, select

    metric, layout = config.verdict_metric, config.verdict_layout
    fig, axes = new_figure("full", aspect=0.3 * len(models), nrows=len(models), squeeze=False, sharex=True)
    width = 0.8 / len(TREATMENTS)
    for ax, (family, variant) in zip(axes[:, 0], models, strict=True):
        x = np.arange(len(_BAR_METHODS))
        for i, treatment in enumerate(TREATMENTS):
            est, lo, hi = [], [], []
            for method in _BAR_METHODS:
                where = dict(family=family, variant=variant, treatment=treatment, method=method,
                             layout=layout, metric=metric)
                if select(frame, **where).empty:
                    est.append(np.nan)
                    lo.append(np.nan)
                    hi.append(np.nan)
                    continue
                iv = pair_interval(frame, **where, seed=config.seed)
                est.append(iv.estimate)
                lo.append(iv.estimate - iv.low)
                hi.append(iv.high - iv.estimate)
            pos = x + (i - 1) * width
            ax.bar(
                pos,
                est,
                width,
                color=_TREATMENT_COLORS[treatment],
                label=f"({treatment}) {TREATMENTS[treatment]}",
            )
            ax.errorbar(
                pos,
                est,
                yerr=np.nan_to_num(np.array([lo, hi]), nan=0.0),
                fmt="none",
                ecolor="k",
                elinewidth=0.6,
                capsize=1.5,
            )
        ax.axhline(config.support_cka, color="k", lw=0.6, ls="--")
        ax.axhline(config.refute_cka, color="k", lw=0.6, ls=":")
        seeds = len(config.family_seeds(family))
        ax.set_title(f"{_label(family, variant)}, N = {config.examples(family)}, {seeds} seed(s)", fontsize=7)
        ax.set_ylabel(f"{metric} with K_F")
        ax.set_ylim(min(0.0, float(np.nanmin(ax.get_ylim()))), 1.2)  # headroom for the legend
        ax.set_yticks([t for t in ax.get_yticks() if t <= 1.0])
        ax.set_xticks(x, list(_BAR_METHODS), fontsize=6)
    axes[0, 0].legend(fontsize=5, ncols=3, loc="upper center", frameon=False)
    fig.suptitle(
        f"Each method's kernel against full fine-tuning's at initialisation ({layout} layout, unbiased "
        "HSIC; error bars: 95% interval over seeds and half-samples; dashed: support, dotted: refute "
        "threshold)",
        fontsize=6,
    )
    return save_figure(fig, fig_dir, "e1_methods")


def _seed_curve(frame: pd.DataFrame, **keys) -> pd.DataFrame:
    """Per seed and n: mean over the random subsets (the full-N value at n = N)."""
    from experiments.suite.e1_kernel_similarity import select

    sub = select(frame, draw=None, **keys).dropna(subset=["value"])
    return sub.groupby(["seed", "n"], as_index=False)["value"].mean()


def _convergence(
    frame: pd.DataFrame, config: Any, models: list[tuple[str, str]], fig_dir: Path
) -> list[Path]:
    from experiments.figures import curve_plot, new_figure, save_figure

    fig, axes = new_figure("full", aspect=0.36, ncols=len(models), squeeze=False, sharey=False)
    lines = {f"({t}) cka_examples_u": ("full", t, "cka_examples_u") for t in "abc"}
    lines |= {f"({t}) cka_examples (biased)": ("full", t, "cka_examples") for t in "abc"}
    lines["(a) cka, trace (biased)"] = ("trace", "a", "cka")
    lines["(a) cka_u, trace"] = ("trace", "a", "cka_u")
    colors = {
        k: _TREATMENT_COLORS[t] if layout == "full" else "#555555" for k, (layout, t, _) in lines.items()
    }
    for ax, (family, variant) in zip(axes[0], models, strict=True):
        parts = [
            _seed_curve(
                frame,
                family=family,
                variant=variant,
                treatment=t,
                method="propulsion",
                layout=layout,
                metric=m,
            ).assign(line=name)
            for name, (layout, t, m) in lines.items()
        ]
        data = pd.concat(parts, ignore_index=True)
        curve_plot(
            ax, data, x="n", y="value", hue="line", unit="seed", band="ci95", colors=colors, marker="."
        )
        for line in ax.get_lines():
            if "biased" in str(line.get_label()):
                line.set_linestyle("--")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("N (random subsets of the same kernels)")
        ax.set_ylabel(f"similarity of K_P (z, k = {config.degree}) with K_F")
        seeds = len(config.family_seeds(family))
        ax.set_title(
            f"{_label(family, variant)}, {seeds} seed(s)" + (", band: 95% over seeds" if seeds > 1 else ""),
            fontsize=7,
        )
        ax.tick_params(labelleft=True)
    axes[0, 0].legend(fontsize=5)
    fig.suptitle(
        "Similarity against N (means over random subsets per seed): dashed biased estimators (inflated at "
        "small N), solid unbiased ones; (a) z on the head, (b) head excluded, (c) head trained in full",
        fontsize=6,
    )
    return save_figure(fig, fig_dir, "e1_convergence")


def _degrees(frame: pd.DataFrame, config: Any, models: list[tuple[str, str]], fig_dir: Path) -> list[Path]:
    from experiments.figures import curve_plot, new_figure, save_figure
    from experiments.suite.e1_kernel_similarity import select

    metric, layout = config.verdict_metric, config.verdict_layout
    fig, axes = new_figure("full", aspect=0.32, ncols=len(models), squeeze=False)
    for ax, (family, variant) in zip(axes[0], models, strict=True):
        parts = []
        for k in config.reference_degrees:
            ref = select(
                frame,
                family=family,
                variant=variant,
                method=f"propulsion_reference_k{k}",
                layout=layout,
                metric=metric,
            )
            z = select(
                frame,
                family=family,
                variant=variant,
                treatment="a",
                method="propulsion",
                layout=layout,
                metric=metric,
            )
            parts += [
                ref.assign(k=k, set="authors' preset (z + wrapped biases)"),
                z.assign(k=k, set="z only (k-independent at z = 1)"),
            ]
        data = pd.concat(parts, ignore_index=True)
        if data.empty:
            ax.set_visible(False)
            continue
        curve_plot(
            ax,
            data,
            x="k",
            y="value",
            hue="set",
            unit="seed",
            band="ci95",
            marker="o",
            colors={
                "authors' preset (z + wrapped biases)": "#882255",
                "z only (k-independent at z = 1)": "#D55E00",
            },
        )
        ax.set_xscale("log")
        ax.set_ylabel(f"{metric} with K_F")
        ax.set_xlabel("degree k")
        ax.set_title(_label(family, variant), fontsize=7)
        ax.tick_params(labelleft=True)
        ax.legend(fontsize=5)
    fig.suptitle(
        f"Similarity to K_F against the degree ({layout} layout; band: 95% over seeds where there are "
        "several)",
        fontsize=6,
    )
    return save_figure(fig, fig_dir, "e1_reference_degree")


def _width(frame: pd.DataFrame, config: Any, fig_dir: Path) -> list[Path]:
    from experiments.figures import curve_plot, new_figure, save_figure
    from experiments.suite.e1_kernel_similarity import select

    layout, metric = config.verdict_layout, config.verdict_metric
    fig, axes = new_figure("full", aspect=0.36, ncols=2)
    pairs = {
        "(a) z incl. head vs all": ("a", "propulsion"),
        "(b) z vs all, no head": ("b", "propulsion"),
        "(a) bitfit vs all": ("a", "bitfit"),
    }
    colors = dict(zip(pairs, ("#D55E00", "#E69F00", "#CC79A7"), strict=True))
    seeds = config.sweep_seeds
    for ax, family, title in (
        (axes[0], "mlp", f"tanh MLPs, depth {config.mlp_depth}, Gaussian inputs"),
        (axes[1], "transformer", f"random BERTs, {config.transformer_layers} layers"),
    ):
        parts = [
            select(frame, family=family, treatment=t, method=m, layout=layout, metric=metric).assign(pair=p)
            for p, (t, m) in pairs.items()
        ]
        data = pd.concat(parts, ignore_index=True)
        if data.empty:
            ax.set_visible(False)
            continue
        curve_plot(
            ax, data, x="width", y="value", hue="pair", unit="seed", band="ci95", marker="o", colors=colors
        )
        ax.set_xscale("log", base=2)
        ax.set_title(title)
        ax.set_ylabel(f"{metric} with K_F")
        ax.tick_params(labelleft=True)
        ax.legend(fontsize=6)
    band = "band: 95% interval over seeds" if seeds > 1 else "one seed, no band"
    fig.suptitle(
        f"Similarity of K_P and K_F against width ({layout} layout, {metric}, N = {config.sweep_examples}, "
        f"{seeds} seed(s); {band})",
        fontsize=7,
    )
    return save_figure(fig, fig_dir, "e1_width")
