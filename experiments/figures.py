"""The one style source of every figure: sizes, fonts, colours per method, saving, shared plots.

Figures are drawn from saved results only (never by recomputing), with the Agg backend (no
display), inside :func:`style`, and saved by :func:`save_figure` as PDF and PNG, atomically.

    with style():
        fig, ax = new_figure("column")
        ax.plot(x, y, color=method_color("propulsion"))
        save_figure(fig, "figures", "e7_parameter_counts")   # figures/e7_....pdf and .png
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt  # backend: the user's (inline in Jupyter); the CLI sets Agg
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from experiments.records import atomic_path

__all__ = [
    "METHOD_COLORS", "WIDTHS", "RC",
    "style", "method_color", "new_figure", "save_figure",
    "heatmap_triplet", "spectrum_plot", "curve_plot", "t_quantile",
]

# Okabe-Ito colours (distinguishable under colour blindness), one per method, fixed everywhere.
METHOD_COLORS: dict[str, str] = {
    "full": "#000000",
    "propulsion": "#D55E00",
    "lora": "#0072B2",
    "ia3": "#009E73",
    "bitfit": "#CC79A7",
    "head": "#999999",
    "linearised": "#56B4E9",
}
_FALLBACK = ("#E69F00", "#F0E442", "#882255", "#44AA99", "#117733", "#332288")
WIDTHS = {"column": 3.4, "full": 7.0}  # inches: one column / full width of a two-column paper
RC: dict[str, Any] = {
    "font.size": 8, "axes.titlesize": 8, "axes.labelsize": 8, "legend.fontsize": 7,
    "xtick.labelsize": 7, "ytick.labelsize": 7, "figure.dpi": 150, "savefig.dpi": 200,
    "axes.grid": True, "grid.alpha": 0.3, "grid.linewidth": 0.5,
    "axes.spines.top": False, "axes.spines.right": False, "lines.linewidth": 1.2,
    "legend.frameon": False, "savefig.bbox": "tight", "savefig.pad_inches": 0.02,
    "pdf.fonttype": 42, "image.cmap": "viridis", "svg.hashsalt": "propulsion-ntk",
}


@contextmanager
def style() -> Iterator[None]:
    """Apply :data:`RC` for the duration of the block."""
    with plt.rc_context(RC):  # type: ignore[arg-type]
        yield


def method_color(name: str) -> str:
    """The colour of a method; a name like ``"propulsion k=5"`` takes its first word's colour.

    Unknown names get a fixed colour from a fallback palette (the same name, the same colour).
    """
    key = name.lower().split()[0].split("_")[0] if name.strip() else ""
    if key in METHOD_COLORS:
        return METHOD_COLORS[key]
    return _FALLBACK[zlib.crc32(name.encode()) % len(_FALLBACK)]


def new_figure(width: str = "column", aspect: float = 0.62, nrows: int = 1, ncols: int = 1,
               **subplots: Any) -> tuple[Figure, Any]:
    """A figure ``WIDTHS[width]`` inches wide and ``aspect`` times as high, with its axes.

    Returns ``(fig, ax)`` for one panel, ``(fig, axes)`` (numpy array) for several.
    """
    if width not in WIDTHS:
        raise ValueError(f"width must be one of {list(WIDTHS)}, got {width!r}")
    if not aspect > 0:
        raise ValueError(f"aspect must be positive, got {aspect}")
    w = WIDTHS[width]
    fig, axes = plt.subplots(nrows, ncols, figsize=(w, w * aspect), layout="constrained", **subplots)
    return fig, axes


def save_figure(fig: Figure, fig_dir: str | Path, stem: str) -> list[Path]:
    """Save ``fig`` as ``fig_dir/stem.pdf`` and ``.png`` (atomically), close it, return both paths."""
    if not stem or "/" in stem or stem.startswith("."):
        raise ValueError(f"bad figure stem {stem!r}: a plain file name without suffix")
    fig_dir = Path(fig_dir)
    paths = []
    metadata = {"pdf": {"CreationDate": None, "Producer": None}, "png": {"Software": None}}
    try:
        for fmt in ("pdf", "png"):
            path = fig_dir / f"{stem}.{fmt}"
            with atomic_path(path) as tmp:
                fig.savefig(tmp, format=fmt, metadata=metadata[fmt])
            paths.append(path)
    finally:
        plt.close(fig)
    return paths


def t_quantile(count: Any) -> Any:
    """The 97.5% Student-t quantile for ``count - 1`` degrees of freedom (NaN for one unit)."""
    from scipy import stats

    dof = np.asarray(count, dtype=np.float64) - 1
    return np.where(dof > 0, stats.t.ppf(0.975, np.maximum(dof, 1)), np.nan)


# ----------------------------------------------------------------------- shared plots -----
def _scale(K: np.ndarray) -> float:
    s = float(np.mean(np.diag(K)))
    if not s > 0:
        raise ValueError("kernel has a non-positive mean diagonal; cannot normalise it")
    return s


def heatmap_triplet(K_F: Any, K_P: Any, axes: Sequence[Axes] | None = None, *,
                    names: tuple[str, str] = ("K_F", "K_P"), caption: str | None = None
                    ) -> tuple[Any, Sequence[Axes], dict[str, float]]:
    """K_F, K_P and their difference as heat maps, each kernel divided by its own mean diagonal.

    The paper's kind of figure, drawn honestly: raw kernels differ in scale by orders of
    magnitude (k^2 and the parameter count), so each is shown as ``K / mean(diag K)`` (stated in
    the titles); the third panel is the difference of the normalised kernels. Scale-free metrics
    (CKA, cosine of vec(K), relative error after the best scalar) go into the figure's caption
    line and are returned.

    Args:
        K_F, K_P: ``(N, N)`` kernels (numpy or torch), same shape.
        axes: three axes to draw in; a new full-width figure when None.
        caption: the line under the panels; default the scale-free metrics of these two (N, N)
            matrices. Give one when the numbers that matter come from another layout or estimator
            (e.g. the full (N, N, C, C) kernels a verdict was decided on), so the figure never shows
            numbers that differ from the verdict's.
    """
    from ntk import metrics

    a = np.asarray(K_F, dtype=np.float64)
    b = np.asarray(K_P, dtype=np.float64)
    if a.ndim != 2 or a.shape != b.shape or a.shape[0] != a.shape[1]:
        raise ValueError(f"K_F {a.shape} and K_P {b.shape} must be square (N, N) matrices of one shape")
    sa, sb = _scale(a), _scale(b)
    na, nb = a / sa, b / sb
    scores = {"cka": metrics.cka(a, b), "cosine": metrics.alignment(a, b),
              "rel_err_best_scale": metrics.relative_error(a, b, scale_optimal=True)}
    if axes is None:
        _, axs = new_figure("full", aspect=0.36, ncols=3)
        axes = list(axs)
    fig: Any = axes[0].figure
    vmax = max(np.abs(na).max(), np.abs(nb).max())
    for ax, m, title in ((axes[0], na, f"{names[0]} / mean diag ({sa:.3g})"),
                         (axes[1], nb, f"{names[1]} / mean diag ({sb:.3g})")):
        im = ax.imshow(m, cmap="RdBu_r", vmin=-vmax, vmax=vmax, interpolation="nearest")
        ax.set_title(title)
        ax.grid(False)
    fig.colorbar(im, ax=list(axes[:2]), shrink=0.8)
    diff = na - nb
    dmax = float(np.abs(diff).max()) or 1.0
    im = axes[2].imshow(diff, cmap="PuOr", vmin=-dmax, vmax=dmax, interpolation="nearest")
    axes[2].set_title("difference (normalised)")
    axes[2].grid(False)
    fig.colorbar(im, ax=axes[2], shrink=0.8)
    if caption is None:
        caption = (f"CKA {scores['cka']:.3f}   cosine {scores['cosine']:.3f}   "
                   f"rel. error after best scalar {scores['rel_err_best_scale']:.3f}")
    fig.supxlabel(caption, fontsize=7)
    return fig, axes, scores


def spectrum_plot(ax: Axes, spectra: Mapping[str, Any], *, normalise: str = "max",
                  colors: Mapping[str, str] | None = None, linestyles: Mapping[str, str] | None = None,
                  ylabel: str | None = None) -> Axes:
    """Sorted spectra (descending) on a log y-axis, one line per label.

    Args:
        spectra: label -> 1-D array of non-negative values (eigenvalues, singular values^2).
        normalise: ``"max"`` (divide by the largest), ``"mean"`` (by the mean) or ``"none"``.
    """
    if normalise not in ("max", "mean", "none"):
        raise ValueError(f"normalise must be max, mean or none, got {normalise!r}")
    for label, values in spectra.items():
        v = np.sort(np.asarray(values, dtype=np.float64).ravel())[::-1]
        if v.size == 0:
            raise ValueError(f"spectrum {label!r} is empty")
        if normalise != "none":
            s = v[0] if normalise == "max" else v.mean()
            v = v / s if s > 0 else v
        v = np.where(v > 0, v, np.nan)  # zeros cannot show on a log axis
        ax.plot(np.arange(1, v.size + 1), v, label=label,
                color=(colors or {}).get(label, method_color(label)),
                linestyle=(linestyles or {}).get(label, "-"))
    ax.set_yscale("log")
    ax.set_xlabel("index (descending)")
    ax.set_ylabel(ylabel or {"max": "value / largest", "mean": "value / mean", "none": "value"}[normalise])
    return ax


def curve_plot(ax: Axes, data: pd.DataFrame, *, x: str, y: str, hue: str, unit: str = "seed",
               band: str = "sd", colors: Mapping[str, str] | None = None, marker: str | None = None) -> Axes:
    """Mean of ``y`` against ``x`` per ``hue`` group, with a band over ``unit`` (e.g. seeds).

    ``band="sd"`` shades mean +- one standard deviation, ``"minmax"`` the range, ``"ci95"`` the
    95% Student-t interval of the mean (``t_{n-1} sd / sqrt(n)``); a group with a single unit per x
    draws no band. Groups are drawn in sorted order.
    """
    missing = [c for c in (x, y, hue, unit) if c not in data.columns]
    if missing:
        raise ValueError(f"curve_plot: columns {missing} are not in the table ({list(data.columns)})")
    if band not in ("sd", "minmax", "ci95"):
        raise ValueError(f"band must be 'sd', 'minmax' or 'ci95', got {band!r}")
    for name, group in sorted(data.groupby(hue), key=lambda kv: str(kv[0])):
        stats = group.groupby(x)[y].agg(["mean", "std", "min", "max", "count"]).sort_index()
        color = (colors or {}).get(str(name), method_color(str(name)))
        ax.plot(stats.index, stats["mean"], label=str(name), color=color, marker=marker)
        if (stats["count"] > 1).any():
            scale = t_quantile(stats["count"]) / np.sqrt(stats["count"]) if band == "ci95" else 1
            half = stats["std"] * scale
            lo, hi = ((stats["mean"] - half, stats["mean"] + half) if band != "minmax"
                      else (stats["min"], stats["max"]))
            ax.fill_between(stats.index, lo, hi, color=color, alpha=0.2, linewidth=0)
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    return ax
