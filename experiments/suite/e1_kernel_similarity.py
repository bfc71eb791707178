"""Experiment 1: is Propulsion's NTK close to full fine-tuning's at initialisation?

The paper's central claim (Theorem 1): the kernel of the z vectors, K_P, approximates the kernel
of all weights, K_F. Per layer the two differ in the metric on layer inputs (identity for K_F,
``k^2 w_j w_j^T`` per output unit for K_P), so they can only agree up to a scalar; everything
here is scale-free (CKA, cosine of vec K, relative error after the best scalar c*, top-k
eigenspace overlap, effective ranks) or reports c* itself. All kernels (N, N, C, C) come from
``experiments.similarity.method_kernels`` (one structured capture pass per model for full,
Propulsion subsets and BitFit; further passes for k = 1, LoRA and IA3), on:

* MiniLM, pre-trained versus the same architecture with random weights (transformers' init),
  on N Rotten Tomatoes sentences (balanced, padded to ``max_length``), C = 2 outputs;
* MLPs of growing width (Gaussian inputs, standard parameterisation) and small BERTs of growing
  hidden size (fan-in init, the same sentences): does the gap shrink with width?

At z = 1 the degree-k Propulsion kernel is exactly k^2 times the degree-1 kernel (every layer's
block scales by k^2), so every scale-free number is the same for every k; the run checks this
(``k2_identity_error``) instead of sweeping k.

Which similarity decides. Randomly initialised transformers map all inputs to nearly the same
representation, so their kernels are close to ``J x M`` (one C x C block repeated for every pair
of examples; effective rank about C): any two such kernels have CKA and cosine near 1 over the
N C x N C matrix, whatever their input dependence. The verdicts therefore use ``cka_examples``:
both kernels double-centred over the example axes for every output pair, then cosine; this keeps
only the part of K that depends on the inputs (for the trace layout it equals the usual CKA).
All other metrics are in the tables and figures.

Verdict thresholds (fields of :class:`Config`). "Approximates" is read as: a kernel method with
K_P would behave nearly like one with K_F. Supported if cka_examples >= 0.9 *and* the
scale-optimal relative error <= 0.2 (cosine >= 0.98): kernels that close are near-interchangeable
in a kernel method (our reading of "approximates"; the paper gives no number). Not supported if
cka_examples < 0.7 or error > 0.5 (cosine < 0.87): the centred kernels then share under half
their structure (0.7^2 < 0.5). In between: inconclusive. Width: the gap g = 1 - cka_examples at
the widest model over the narrowest; shrinking is supported if g_wide / g_narrow <= 0.5, not
supported if >= 0.9.

    propulsion-ntk run e1_kernel_similarity --preset quick   # 2 CPU cores: ~8 min measured under load
    propulsion-ntk run e1_kernel_similarity --preset full --device cuda
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import torch
from torch import nn

from experiments import similarity
from experiments.suite.base import ExperimentConfig, Store, Verdict, decide, rule_text

NAME = "e1_kernel_similarity"
TITLE = "Kernel similarity at initialisation: Propulsion versus full fine-tuning (and LoRA, IA3, BitFit)"
CLAIMS = ("ntk_approximation",)
STATEMENT = "Propulsion's NTK approximates the NTK of full fine-tuning (Theorem 1)."

#: (method, reference) pairs the tables hold; peft adapters leave the head out, so ``*_nohead``.
PAIRS = (
    ("propulsion", "full"), ("propulsion_k1", "full"), ("propulsion_nohead", "full_nohead"),
    ("propulsion_nohead", "full"), ("propulsion", "full_nohead"),
    ("propulsion_attn", "full"), ("propulsion_attn", "full_nohead"),
    ("propulsion_reference", "full"), ("bitfit", "full"), ("full_nohead", "full"),
    ("lora", "full_nohead"), ("ia3", "full_nohead"),
)
LAYOUTS = ("full", "trace")
FAMILIES = ("minilm", "mlp", "transformer")


@dataclass(frozen=True)
class Config(ExperimentConfig):
    n_examples: int = field(default=32, metadata={"help": "N inputs per kernel (sentences or points)"})
    max_length: int = field(default=32, metadata={"help": "tokens per sentence (padded to this length)"})
    degree: int = field(default=5, metadata={"help": "Propulsion degree k (k = 1 is always added)"})
    n_seeds: int = field(default=1, metadata={"help": "seeds seed .. seed + n_seeds - 1 per variant"})
    minilm_variants: tuple[str, ...] = field(
        default=("pretrained", "random"), metadata={"help": "MiniLM weights: pretrained and/or random"})
    peft_methods: tuple[str, ...] = field(
        default=("lora", "ia3"), metadata={"help": "peft kernels on MiniLM: lora, ia3"})
    lora_rank: int = field(default=8, metadata={"help": "LoRA rank r (query, value)"})
    lora_b_std: float = field(
        default=0.02, metadata={"help": "std of LoRA's B (> 0: at B = 0 the A-block is 0)"})
    mlp_widths: tuple[int, ...] = field(default=(32, 64, 128, 256, 512), metadata={"help": "MLP widths"})
    mlp_depth: int = field(default=3, metadata={"help": "hidden layers of the MLPs"})
    mlp_input_dim: int = field(default=16, metadata={"help": "dimension of the Gaussian MLP inputs"})
    transformer_widths: tuple[int, ...] = field(
        default=(32, 64, 128, 256), metadata={"help": "hidden sizes of the small BERTs (multiples of 32)"})
    transformer_layers: int = field(default=2, metadata={"help": "layers of the small BERTs"})
    model_dtype: str = field(default="float64", metadata={"help": "dtype of the models (float64 or float32)"})
    top_ks: tuple[int, ...] = field(default=(2, 10), metadata={"help": "k of the top-k eigenspace overlaps"})
    save_sweep_kernels: bool = field(default=False, metadata={"help": "also save the width sweep's kernels"})
    verdict_layout: str = field(
        default="full", metadata={"help": "kernel layout of the verdicts: full or trace"})
    verdict_metric: str = field(
        default="cka_examples",
        metadata={"help": "similarity of the verdicts: cka_examples, cka or alignment"})
    support_cka: float = field(default=0.9, metadata={"help": "supported needs CKA >= this"})
    support_error: float = field(
        default=0.2, metadata={"help": "supported needs scale-optimal error <= this"})
    refute_cka: float = field(default=0.7, metadata={"help": "not supported if CKA < this"})
    refute_error: float = field(default=0.5, metadata={"help": "not supported if scale-optimal error > this"})
    support_gap_ratio: float = field(
        default=0.5, metadata={"help": "gap shrinks if (1 - CKA) widest / narrowest <= this"})
    refute_gap_ratio: float = field(
        default=0.9, metadata={"help": "gap does not shrink if that ratio >= this"})

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("n_examples", "max_length", "degree", "n_seeds", "lora_rank", "mlp_depth",
                     "mlp_input_dim", "transformer_layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.n_examples < 3:
            raise ValueError(f"n_examples must be >= 3 (CKA needs centred kernels), got {self.n_examples}")
        if bad := set(self.minilm_variants) - {"pretrained", "random"}:
            raise ValueError(f"minilm_variants may hold 'pretrained' and 'random', not {sorted(bad)}")
        if bad := set(self.peft_methods) - {"lora", "ia3"}:
            raise ValueError(f"peft_methods may hold 'lora' and 'ia3', not {sorted(bad)}")
        if any(w < 1 for w in self.mlp_widths):
            raise ValueError(f"mlp_widths must be >= 1, got {self.mlp_widths}")
        if any(w < 32 or w % 32 for w in self.transformer_widths):
            raise ValueError(f"transformer_widths must be multiples of 32, got {self.transformer_widths}")
        if self.model_dtype not in ("float64", "float32"):
            raise ValueError(f"model_dtype must be float64 or float32, got {self.model_dtype!r}")
        if self.verdict_metric not in ("cka_examples", "cka", "alignment"):
            raise ValueError("verdict_metric must be cka_examples, cka or alignment, "
                             f"got {self.verdict_metric!r}")
        if self.verdict_layout not in LAYOUTS:
            raise ValueError(f"verdict_layout must be one of {LAYOUTS}, got {self.verdict_layout!r}")
        if not self.lora_b_std > 0:
            raise ValueError(f"lora_b_std must be > 0, got {self.lora_b_std}")
        if any(k < 1 for k in self.top_ks):
            raise ValueError(f"top_ks must be >= 1, got {self.top_ks}")
        if not (0 < self.refute_cka < self.support_cka <= 1 and 0 <= self.support_error < self.refute_error):
            raise ValueError("need 0 < refute_cka < support_cka <= 1 and 0 <= support_error < refute_error")
        if not 0 < self.support_gap_ratio < self.refute_gap_ratio:
            raise ValueError("need 0 < support_gap_ratio < refute_gap_ratio")

    @property
    def seeds(self) -> tuple[int, ...]:
        return tuple(range(self.seed, self.seed + self.n_seeds))


PRESETS: dict[str, Config] = {
    "tiny": Config(n_examples=6, max_length=10, mlp_widths=(8, 32), mlp_depth=2, mlp_input_dim=4,
                   transformer_widths=(32, 64), transformer_layers=1, top_ks=(2,)),
    "quick": Config(),
    "study": Config(),  # placeholder until the study sizes are set (issue 13)
    "full": Config(device="auto", n_examples=256, max_length=64, n_seeds=3,
                   mlp_widths=(32, 64, 128, 256, 512, 1024, 2048),
                   transformer_widths=(32, 64, 128, 256, 512)),
}


# ---------------------------------------------------------------------------------- units ------
@dataclass(frozen=True)
class Unit:
    """One kernel set: a model variant on one input set."""

    family: str  # minilm, mlp, transformer
    variant: str  # pretrained or random
    width: int
    seed: int

    @property
    def name(self) -> str:
        return f"{self.family}-{self.variant}-w{self.width}-s{self.seed}"


def plan(config: Config) -> list[Unit]:
    """Every unit of a run, MiniLM first."""
    units = [Unit("minilm", v, 384, s) for s in config.seeds for v in config.minilm_variants]
    units += [Unit("mlp", "random", w, s) for s in config.seeds for w in config.mlp_widths]
    units += [Unit("transformer", "random", w, s) for s in config.seeds for w in config.transformer_widths]
    return units


def sentences(config: Config, seed: int) -> tuple[dict[str, torch.Tensor], np.ndarray]:
    """N Rotten Tomatoes training sentences, balanced over the labels and sorted by label, as
    ``input_ids`` / ``attention_mask`` (N, max_length), and their labels (N,)."""
    from experiments.data import load_rotten_tomatoes
    from experiments.models import load_tokenizer

    train = load_rotten_tomatoes(seed=seed).train
    labels = sorted(train["label"].unique())
    counts = [config.n_examples // len(labels) + (i < config.n_examples % len(labels))
              for i in range(len(labels))]
    parts = [train[train["label"] == y].sample(n=n, random_state=seed)
             for y, n in zip(labels, counts, strict=True)]
    frame = pd.concat(parts, ignore_index=True)
    enc = load_tokenizer("minilm")(frame["text"].tolist(), padding="max_length", truncation=True,
                                   max_length=config.max_length, return_tensors="pt")
    return ({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]},
            frame["label"].to_numpy(np.int64))


def build(unit: Unit, config: Config) -> tuple[nn.Module, object, np.ndarray]:
    """The model (eval, ``model_dtype``, on the device), its inputs and the input labels
    (Gaussian MLP inputs get label -1)."""
    device = config.resolve_device()
    dtype = getattr(torch, config.model_dtype)
    model: nn.Module
    if unit.family == "mlp":
        model = similarity.WideMLP(config.mlp_input_dim, unit.width, config.mlp_depth, 2, seed=unit.seed)
        gen = torch.Generator().manual_seed(unit.seed + 104729)
        x: object = torch.randn(config.n_examples, config.mlp_input_dim, generator=gen).to(device, dtype)
        labels = np.full(config.n_examples, -1, np.int64)
    else:
        tokens, labels = sentences(config, unit.seed)
        if unit.family == "minilm":
            model = similarity.minilm(unit.variant == "pretrained", seed=unit.seed)
        else:
            model = similarity.small_bert(unit.width, layers=config.transformer_layers,
                                          max_length=config.max_length, seed=unit.seed)
        x = {k: v.to(device) for k, v in tokens.items()}
    return model.to(device=device, dtype=dtype).eval(), x, labels


def metric_rows(kernels: dict[str, torch.Tensor], degree: int, top_ks: tuple[int, ...]) -> pd.DataFrame:
    """Tidy rows (layout, method, reference, metric, value) for every pair of :data:`PAIRS` whose
    kernels are present, in both layouts, plus the exact check ``k2_identity_error`` =
    ``||K_P(k) - k^2 K_P(1)||_F / ||K_P(k)||_F`` (method propulsion, reference propulsion_k1)."""
    rows = []
    for method, reference in PAIRS:
        if method not in kernels or reference not in kernels:
            continue
        for layout in LAYOUTS:
            ref, ker = kernels[reference], kernels[method]
            if layout == "trace":
                ref, ker = similarity.trace(ref), similarity.trace(ker)
            for metric, value in similarity.compare(ref, ker, top_ks).items():
                rows.append((layout, method, reference, metric, value))
    kp, kp1 = kernels["propulsion"], kernels["propulsion_k1"]
    error = float(torch.linalg.norm(kp - degree**2 * kp1) / torch.linalg.norm(kp))
    rows += [(layout, "propulsion", "propulsion_k1", "k2_identity_error", error) for layout in LAYOUTS]
    return pd.DataFrame(rows, columns=["layout", "method", "reference", "metric", "value"])


def compute_unit(unit: Unit, config: Config) -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
    """Kernels and metric rows of one unit (table columns: family, variant, width, seed, n,
    tokens, degree, layout, method, reference, metric, value)."""
    torch.manual_seed(unit.seed)
    model, x, labels = build(unit, config)
    peft = config.peft_methods if unit.family == "minilm" else ()
    kernels = similarity.method_kernels(model, x, degree=config.degree, peft_methods=peft,
                                        lora_rank=config.lora_rank, lora_b_std=config.lora_b_std,
                                        seed=unit.seed, dtype=config.torch_kernel_dtype)
    kernels = {k: v.to(torch.float64) for k, v in kernels.items()}
    frame = metric_rows(kernels, config.degree, config.top_ks)
    tokens = 1 if unit.family == "mlp" else config.max_length
    frame = frame.assign(family=unit.family, variant=unit.variant, width=unit.width, seed=unit.seed,
                         n=config.n_examples, tokens=tokens, degree=config.degree)
    arrays = {f"K_{k}": v.numpy() for k, v in kernels.items()}
    arrays["labels"] = labels
    return frame[["family", "variant", "width", "seed", "n", "tokens", "degree", *frame.columns[:5]]], arrays


def main(config: Config, store: Store, *, progress: bool = False) -> None:
    """Compute every unit of :func:`plan` not yet done: table ``metrics/<unit>`` and, for MiniLM
    (or with ``save_sweep_kernels``), the kernels ``kernels/<unit>`` (saved first)."""
    for unit in plan(config):
        if store.done(f"metrics/{unit.name}"):
            continue
        if progress:
            print(f"  kernels of {unit.name}", flush=True)
        frame, arrays = compute_unit(unit, config)
        if unit.family == "minilm" or config.save_sweep_kernels:
            store.save_arrays(f"kernels/{unit.name}", **arrays)
        store.save_table(f"metrics/{unit.name}", frame)


# ------------------------------------------------------------------------------- results -------
def results(store: Store) -> pd.DataFrame:
    """Every metric row of the store (with its ``unit``); raises when a planned unit is missing."""
    config = store.config
    assert isinstance(config, Config)
    store.require(*(f"metrics/{u.name}" for u in plan(config)))
    return store.table("metrics/")


def _select(frame: pd.DataFrame, *, family: str, method: str = "propulsion", reference: str = "full",
            layout: str = "full", metric: str = "cka", variant: str | None = None) -> pd.DataFrame:
    keep = ((frame["family"] == family) & (frame["method"] == method) & (frame["reference"] == reference)
            & (frame["layout"] == layout) & (frame["metric"] == metric))
    if variant is not None:
        keep &= frame["variant"] == variant
    return frame[keep]


def gap_ratio(frame: pd.DataFrame, family: str, layout: str = "full", metric: str = "cka_examples",
              method: str = "propulsion", reference: str = "full") -> float:
    """``(1 - metric)`` of ``method`` versus ``reference`` at the widest model over the narrowest
    (means over seeds); NaN if undefined."""
    sub = _select(frame, family=family, method=method, reference=reference, layout=layout, metric=metric)
    if sub.empty or sub["width"].nunique() < 2:
        return float("nan")
    gap = 1.0 - sub.groupby("width")["value"].mean().sort_index()
    return float(gap.iloc[-1] / gap.iloc[0]) if gap.iloc[0] > 0 else float("nan")


def verdicts(store: Store, config: Config) -> list[Verdict]:
    """Propulsion versus full fine-tuning on pre-trained and random MiniLM (CKA and scale-optimal
    error both decide), and the width trend of the gap for MLPs and small BERTs."""
    from experiments.suite.base import make_verdict

    frame = results(store)
    layout, metric = config.verdict_layout, config.verdict_metric
    out = []
    for variant in config.minilm_variants:
        cka = float(_select(frame, family="minilm", variant=variant, layout=layout,
                            metric=metric)["value"].mean())
        rank = float(_select(frame, family="minilm", variant=variant, layout=layout,
                             metric="eff_rank_ref")["value"].mean())
        nohead = float(_select(frame, family="minilm", variant=variant, method="propulsion_nohead",
                               reference="full_nohead", layout=layout, metric=metric)["value"].mean())
        err = float(_select(frame, family="minilm", variant=variant, layout=layout,
                            metric="rel_error")["value"].mean())
        by_cka = decide(cka, support_if=(">=", config.support_cka), refute_if=("<", config.refute_cka))
        by_err = decide(err, support_if=("<=", config.support_error), refute_if=(">", config.refute_error))
        verdict: Literal["supported", "not supported", "inconclusive"] = (
            "not supported" if "not supported" in (by_cka, by_err)
            else "supported" if by_cka == by_err == "supported" else "inconclusive")
        out.append(Verdict(
            claim="ntk_approximation",
            statement=STATEMENT + ("" if variant == "pretrained" else
                                   " (at random weights, the setting of the theorem's JL argument)"),
            measurement=(f"{metric} of K_P (z on every Linear, k = {config.degree}) with K_F "
                         f"(all parameters) on {variant} MiniLM, {config.n_examples} Rotten Tomatoes "
                         f"sentences, {layout} layout, mean over {config.n_seeds} seed(s); "
                         f"scale-optimal relative error {err:.3f} (criterion: {by_err}); "
                         f"effective rank of K_F {rank:.1f}; k-independent at z = 1; without the "
                         f"head (z and weights) {metric} {nohead:.3f}"),
            value=cka,
            threshold=(f"{rule_text(metric, ('>=', config.support_cka), ('<', config.refute_cka))}; and "
                       f"{rule_text('error', ('<=', config.support_error), ('>', config.refute_error))}; "
                       "supported only if both are, not supported if either is"),
            verdict=verdict, figure="e1_methods", experiment=NAME))
    for family, label, widths in (("mlp", "MLPs", config.mlp_widths),
                                  ("transformer", "small BERTs", config.transformer_widths)):
        nohead = gap_ratio(frame, family, layout, metric, "propulsion_nohead", "full_nohead")
        out.append(make_verdict(
            claim="ntk_approximation",
            statement="The gap between K_P and K_F shrinks with width, as an NTK argument would predict.",
            measurement=(f"(1 - {metric}) of K_P versus K_F at width {max(widths, default=0)} over width "
                         f"{min(widths, default=0)}, random {label} ({layout} layout, mean over seeds); "
                         "the same ratio with the head excluded (z and weights): "
                         f"{nohead:.2f}"),
            value=gap_ratio(frame, family, layout, metric), what="gap ratio",
            support_if=("<=", config.support_gap_ratio), refute_if=(">=", config.refute_gap_ratio),
            figure="e1_width", experiment=NAME))
    return out


# ------------------------------------------------------------------------------- figures -------
#: (method, reference) per bar of the method chart: peft adapters and the head-free z against
#: the head-free K_F, the rest against K_F.
BARS = (("propulsion", "full"), ("propulsion_nohead", "full_nohead"), ("propulsion_attn", "full_nohead"),
        ("propulsion_reference", "full"), ("lora", "full_nohead"), ("ia3", "full_nohead"),
        ("bitfit", "full"))
_VARIANT_COLORS = {"pretrained": "#D55E00", "random": "#0072B2"}


def figures(store: Store, fig_dir: Path) -> list[Path]:
    """Heat maps and spectra of K_F and K_P (MiniLM), similarity against width, CKA per method;
    drawn from saved results only."""
    from experiments.figures import new_figure, save_figure, style

    frame = results(store)
    config = store.config
    assert isinstance(config, Config)
    minilm = [u for u in plan(config) if u.family == "minilm" and u.seed == config.seed]
    store.require(*(f"kernels/{u.name}" for u in minilm))
    paths: list[Path] = []
    with style():
        for unit in minilm:
            paths += _heatmap(store, unit, config, Path(fig_dir))
        if minilm:
            fig, axes = new_figure("full", aspect=0.36, ncols=len(minilm), sharey=True)
            for ax, unit in zip(np.atleast_1d(axes), minilm, strict=True):
                _spectra(ax, store.load_arrays(f"kernels/{unit.name}"), unit.variant)
            paths += save_figure(fig, fig_dir, "e1_spectra")
            paths += _methods(frame, config, fig_dir)
        paths += _width(frame, config, fig_dir)
    return paths


def _heatmap(store: Store, unit: Unit, config: Config, fig_dir: Path) -> list[Path]:
    from experiments.figures import heatmap_triplet, save_figure

    arrays = store.load_arrays(f"kernels/{unit.name}")
    kf, kp = (similarity.trace(torch.from_numpy(arrays[k])).numpy() for k in ("K_full", "K_propulsion"))
    fig, _, _ = heatmap_triplet(kf, kp, names=("K_F", f"K_P (k={config.degree})"))
    fig.suptitle(f"{unit.variant} MiniLM, {kf.shape[0]} sentences sorted by label, trace over outputs; "
                 f"at z = 1, K_P(k) = k^2 K_P(1), so this picture is the same for every k", fontsize=7)
    return save_figure(fig, fig_dir, f"e1_heatmaps_{unit.variant}")


def _spectra(ax, arrays: dict[str, np.ndarray], variant: str) -> None:
    from experiments.figures import spectrum_plot
    from ntk import metrics

    names = [k for k in ("full", "propulsion", "propulsion_nohead", "propulsion_attn", "lora", "ia3",
                         "bitfit") if f"K_{k}" in arrays]
    spectrum_plot(ax, {k: metrics.eigenspectrum(arrays[f"K_{k}"]).numpy() for k in names}, normalise="max",
                  linestyles={"propulsion_nohead": "--", "propulsion_attn": ":"})
    ax.set_title(f"{variant} MiniLM: eigenvalues of the (N C x N C) kernels")
    ax.legend(fontsize=6)


def _methods(frame: pd.DataFrame, config: Config, fig_dir: Path) -> list[Path]:
    from experiments.figures import new_figure, save_figure

    layout = config.verdict_layout
    fig, axes = new_figure("full", aspect=0.36, ncols=2)
    bars = [(m, r) for m, r in BARS if not _select(frame, family="minilm", method=m, reference=r).empty]
    x = np.arange(len(bars))
    width = 0.8 / max(1, len(config.minilm_variants))
    for ax, metric, label in ((axes[0], config.verdict_metric, f"{config.verdict_metric} with K_F"),
                              (axes[1], "rel_error", "rel. error after best scalar")):
        for i, variant in enumerate(config.minilm_variants):
            values = [_select(frame, family="minilm", method=m, reference=r, layout=layout, metric=metric,
                              variant=variant)["value"].mean() for m, r in bars]
            ax.bar(x + (i - (len(config.minilm_variants) - 1) / 2) * width, values, width,
                   color=_VARIANT_COLORS[variant], label=f"{variant} MiniLM")
        ax.set_xticks(x, [f"{m}\nvs {r}" for m, r in bars], rotation=60, fontsize=5)
        ax.set_ylabel(label)
    axes[0].axhline(config.support_cka, color="k", lw=0.6, ls="--")
    axes[0].axhline(config.refute_cka, color="k", lw=0.6, ls=":")
    axes[1].axhline(config.support_error, color="k", lw=0.6, ls="--")
    axes[1].axhline(config.refute_error, color="k", lw=0.6, ls=":")
    axes[0].set_ylim(0, 1.2)
    axes[0].legend(loc="upper center", ncols=2)
    fig.suptitle(f"Each method's kernel against full fine-tuning at initialisation ({layout} layout; "
                 "dashed: support threshold, dotted: refute threshold)", fontsize=7)
    return save_figure(fig, fig_dir, "e1_methods")


def _width(frame: pd.DataFrame, config: Config, fig_dir: Path) -> list[Path]:
    from experiments.figures import curve_plot, new_figure, save_figure

    layout, metric = config.verdict_layout, config.verdict_metric
    fig, axes = new_figure("full", aspect=0.36, ncols=2, sharey=True)
    pairs = {"z (head included) vs all": ("propulsion", "full"),
             "z (no head) vs all but head": ("propulsion_nohead", "full_nohead"),
             "bitfit vs all": ("bitfit", "full")}
    colors = dict(zip(pairs, ("#D55E00", "#E69F00", "#CC79A7"), strict=True))
    for ax, family, title in ((axes[0], "mlp", f"tanh MLPs, depth {config.mlp_depth}, Gaussian inputs"),
                              (axes[1], "transformer", f"random BERTs, {config.transformer_layers} layers")):
        parts = [_select(frame, family=family, method=m, reference=r, layout=layout,
                         metric=metric).assign(pair=p) for p, (m, r) in pairs.items()]
        data = pd.concat(parts, ignore_index=True)
        if data.empty:
            ax.set_visible(False)
            continue
        curve_plot(ax, data, x="width", y="value", hue="pair", unit="seed", marker="o", colors=colors)
        ax.set_xscale("log", base=2)
        ax.set_title(title)
        ax.set_ylabel(f"{metric} with K_F")
        if family == "transformer":
            for variant in config.minilm_variants:
                v = _select(frame, family="minilm", variant=variant, layout=layout,
                            metric=metric)["value"].mean()
                if np.isfinite(v):
                    ax.axhline(v, color=_VARIANT_COLORS[variant], lw=0.8, ls="--",
                               label=f"z vs all, {variant} MiniLM (384)")
        ax.legend(fontsize=6)
    fig.suptitle(f"Similarity of K_P and K_F against width ({layout} layout, {metric}; "
                 "band: spread over seeds)", fontsize=7)
    return save_figure(fig, fig_dir, "e1_width")
