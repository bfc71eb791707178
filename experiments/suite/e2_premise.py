"""Experiment 2: the premise of the paper's Theorem 1, layer by layer.

Theorem 1 argues through the Johnson-Lindenstrauss (JL) lemma that a layer's weight W (d_out, d_in)
preserves inner products of its inputs, so that Propulsion's per-layer metric k^2 W^T W agrees
with full fine-tuning's identity metric up to scale. For every Linear layer of the pre-trained
MiniLM, and of the same architecture with random weights (seeded ``from_config``):

* singular values sigma of W, condition number cond(W) = sigma_max / sigma_min (over the
  min(d_in, d_out) singular values; W^T W itself is singular when d_out < d_in);
* distance from a multiple of the identity, scale-free:
  ``dist = ||W^T W / c - I||_F / sqrt(d_in)`` with ``c = tr(W^T W) / d_in``; 0 for a scaled
  isometry. For iid Gaussian entries its expectation is about ``sqrt((d_in + 1) / d_out)``
  (Marchenko-Pastur), recorded as ``dist_gaussian``;
* the JL distortion the paper invokes at that width: for n points and m = d_out dimensions,
  m >= 8 ln(n) / eps^2, i.e. ``eps_jl = sqrt(8 ln n / d_out)``;
* observed distortion on real inputs: the layer's inputs x_a (token vectors captured by forward
  hooks of the pre-trained model on Rotten Tomatoes sentences, max_length 32; the same inputs
  feed both weights), ``D_ab = |c (W x_a)^T (W x_b) - x_a^T x_b| / (|x_a| |x_b|)`` over pairs
  a <= b, raw (c = 1) and after the best scalar c* = argmin_c sum_ab D_ab^2 (scale-free).

    propulsion-ntk run e2 --preset quick      # CPU, seconds
    propulsion-ntk run e2 --preset full --device cuda
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from experiments.suite.base import ExperimentConfig, Store, Verdict, make_verdict

NAME = "e2_premise"
TITLE = "The theorem's premise: is W^T W of pre-trained layers close to a scaled identity (JL)?"
CLAIMS = ("theorem_premise",)
WEIGHTS = ("pretrained", "random")


@dataclass(frozen=True)
class Config(ExperimentConfig):
    model: str = field(default="minilm", metadata={"help": "offline model (experiments.models)"})
    n_sentences: int = field(default=16, metadata={"help": "Rotten Tomatoes sentences fed to the model"})
    max_length: int = field(default=32, metadata={"help": "tokens per sentence at most"})
    n_points: int = field(default=256, metadata={"help": "layer inputs (tokens) sampled per layer"})
    layer_filter: str = field(
        default="", metadata={"help": "regex: only layers whose name it finds (all if empty)"})
    support_fraction_within_jl: float = field(
        default=0.9, metadata={"help": "premise supported if this share of layers is within eps_jl"})
    refute_fraction_within_jl: float = field(
        default=0.5, metadata={"help": "premise not supported if fewer than this share is"})
    support_dist_ratio: float = field(
        default=1.5, metadata={"help": "supported if median dist / dist_gaussian <= this"})
    refute_dist_ratio: float = field(
        default=3.0, metadata={"help": "not supported if median dist / dist_gaussian >= this"})

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("n_sentences", "max_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.n_points < 2:
            raise ValueError(f"n_points must be >= 2 (JL needs pairs), got {self.n_points}")
        try:
            re.compile(self.layer_filter)
        except re.error as exc:
            raise ValueError(f"layer_filter {self.layer_filter!r} is not a regex: {exc}") from None
        if not 0 <= self.refute_fraction_within_jl <= self.support_fraction_within_jl <= 1:
            raise ValueError("need 0 <= refute_fraction_within_jl <= support_fraction_within_jl <= 1")
        if not 0 < self.support_dist_ratio < self.refute_dist_ratio:
            raise ValueError("need 0 < support_dist_ratio < refute_dist_ratio")


PRESETS: dict[str, Config] = {
    "tiny": Config(n_sentences=4, n_points=24, max_length=16, layer_filter=r"layer\.0\.|pooler"),
    "quick": Config(),
    "study": Config(),  # placeholder until the study sizes are set (issue 13)
    "full": Config(device="auto", n_sentences=128, n_points=2048),
}


# ------------------------------------------------------------------------------ measures -----
def identity_distance(sigma: torch.Tensor, d_in: int) -> float:
    """``||W^T W / c - I||_F / sqrt(d_in)``, c = tr(W^T W) / d_in, from W's singular values.

    The eigenvalues of W^T W are sigma^2 and d_in - len(sigma) zeros.
    """
    lam = torch.zeros(d_in, dtype=torch.float64, device=sigma.device)
    lam[: sigma.numel()] = sigma.double() ** 2
    c = lam.mean()
    if not c > 0:
        return math.nan
    return float(torch.linalg.vector_norm(lam / c - 1) / math.sqrt(d_in))


def jl_epsilon(n_points: int, d_out: int) -> float:
    """The JL distortion for n points in m = d_out dimensions: ``sqrt(8 ln n / m)``."""
    return math.sqrt(8 * math.log(n_points) / d_out)


def distortion(W: torch.Tensor, X: torch.Tensor) -> dict[str, float]:
    """Inner-product distortion of ``x -> W x`` on the rows of X (n, d_in), pairs a <= b.

    Returns median, 95th percentile and max of ``|c (Wx_a).(Wx_b) - x_a.x_b| / (|x_a| |x_b|)``
    for c = 1 (``raw_*``) and for the least-squares c* (``best_*``), and c* itself.
    """
    X = X.double()
    norms = torch.linalg.vector_norm(X, dim=1).clamp_min(1e-300)
    Y = X @ W.double().T
    outer = norms[:, None] * norms[None, :]
    iu = torch.triu_indices(X.shape[0], X.shape[0], device=X.device)
    A = ((Y @ Y.T) / outer)[iu[0], iu[1]]
    B = ((X @ X.T) / outer)[iu[0], iu[1]]
    c = float((A @ B) / (A @ A)) if float(A @ A) > 0 else math.nan
    out = {"scale_best": c}
    for tag, d in (("raw", (A - B).abs()), ("best", (c * A - B).abs())):
        q = torch.quantile(d.cpu(), torch.tensor([0.5, 0.95], dtype=torch.float64))
        out |= {f"{tag}_median": float(q[0]), f"{tag}_p95": float(q[1]), f"{tag}_max": float(d.max())}
    return out


# ------------------------------------------------------------------------------- compute -----
def _linear_layers(model: nn.Module, layer_filter: str = "") -> dict[str, nn.Linear]:
    """Every nn.Linear outside the classification head (whose name ``layer_filter`` finds)."""
    from experiments.methods import find_head

    heads = find_head(model)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)
              and not any(n == h or n.startswith(h + ".") for h in heads) and re.search(layer_filter, n)}
    if not layers:
        raise ValueError(f"no Linear layer of {type(model).__name__} matches layer_filter {layer_filter!r}")
    return layers


def singular_values(W: torch.Tensor) -> torch.Tensor:
    """Singular values of W (d_out, d_in), descending, from the smaller Gram matrix in float64.

    sigma^2 are the eigenvalues of W W^T (d_out <= d_in) or W^T W; faster than an SVD and, in
    float64, accurate to about 1e-8 relative to sigma_max, which the condition numbers here
    (< 1e6) allow.
    """
    W = W.detach().double()
    G = W @ W.T if W.shape[0] <= W.shape[1] else W.T @ W
    return torch.linalg.eigvalsh(G).clamp_min(0).sqrt().flip(0)


@torch.no_grad()
def capture_inputs(model: nn.Module, batch: dict[str, torch.Tensor], n_points: int, seed: int,
                   layer_filter: str = "") -> dict[str, torch.Tensor]:
    """Inputs of every (non-head) Linear layer on real tokens only, ``n_points`` rows sampled each."""
    mask = batch["attention_mask"].bool()
    captured: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def fn(_module, inputs, _output):
            x = inputs[0]
            captured[name] = x[mask] if x.ndim == 3 else x  # (tokens, d_in); the pooler sees (B, d)
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in _linear_layers(model, layer_filter).items()]
    try:
        model(**batch)
    finally:
        for h in handles:
            h.remove()
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, x in captured.items():
        index = torch.randperm(x.shape[0], generator=gen)[:n_points]
        out[name] = x[index.to(x.device)].double()
    return out


def _random_model(like: nn.Module, seed: int, device: str) -> nn.Module:
    """The architecture of ``like`` with fresh weights (transformers' init, from ``seed``)."""
    import copy

    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_config(copy.deepcopy(like.config))
    return model.to(device=device, dtype=torch.float32).eval()


def layer_table(model: nn.Module, inputs: dict[str, torch.Tensor]
                ) -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
    """One row per Linear layer named in ``inputs`` (measures above) and its singular values."""
    rows, spectra = [], {}
    modules = dict(model.named_modules())
    threads = torch.get_num_threads()
    # Small dense LAPACK calls gain nothing from threads, and on a busy CPU OpenMP threads spin:
    # one 384 x 384 eigvalsh took 1.2 s with 2 threads on the shared 2-core machine, 0.04 s with 1.
    torch.set_num_threads(1)
    try:
        for name, X in inputs.items():
            row, spectra[name] = _layer_row(name, modules[name].weight, X)
            rows.append(row)
    finally:
        torch.set_num_threads(threads)
    frame = pd.DataFrame(rows)
    frame["within_jl"] = frame["best_max"] <= frame["eps_jl"]
    return frame, spectra


def _layer_row(name: str, weight: torch.Tensor, X: torch.Tensor) -> tuple[dict, np.ndarray]:
    W = weight.detach().double()
    d_out, d_in = W.shape
    sigma = singular_values(W)
    parts = name.split(".")
    block = next((int(p) for p in parts if p.isdigit()), -1)
    row = {
        "layer": name, "block": block,
        "kind": ".".join(p for p in parts[parts.index(str(block)) + 1:]) if block >= 0 else parts[-2],
        "d_in": d_in, "d_out": d_out, "sigma_max": float(sigma[0]), "sigma_min": float(sigma[-1]),
        "cond_W": float(sigma[0] / sigma[-1]) if sigma[-1] > 0 else math.inf,
        "cond_WtW": float((sigma[0] / sigma[-1]) ** 2) if d_out >= d_in and sigma[-1] > 0 else math.inf,
        "dist_identity": identity_distance(sigma, d_in),
        "dist_gaussian": math.sqrt((d_in + 1) / d_out),
        "n_points": X.shape[0], "eps_jl": jl_epsilon(X.shape[0], d_out),
        **distortion(W, X),
    }
    return row, sigma.cpu().numpy()


def main(config: Config, store: Store, *, progress: bool = False) -> None:
    """Tables ``layers/<weights>`` and spectra ``spectra/<weights>`` for pre-trained and random W."""
    todo = [w for w in WEIGHTS if not (store.done(f"layers/{w}") and store.done(f"spectra/{w}"))]
    if not todo:
        return
    from experiments.data import load_rotten_tomatoes
    from experiments.models import load_model, load_tokenizer

    device = config.resolve_device()
    pretrained = load_model(config.model, device=device, seed=config.seed)
    texts = load_rotten_tomatoes(seed=config.seed).train["text"].tolist()[: config.n_sentences]
    batch = load_tokenizer(config.model)(texts, padding=True, truncation=True, max_length=config.max_length,
                                         return_tensors="pt")
    inputs = capture_inputs(pretrained, {k: v.to(device) for k, v in batch.items()}, config.n_points,
                            config.seed, config.layer_filter)
    for weights in todo:
        if progress:
            print(f"  {weights} weights: {len(inputs)} layers")
        model = pretrained if weights == "pretrained" else _random_model(pretrained, config.seed, device)
        frame, spectra = layer_table(model, inputs)
        store.save_arrays(f"spectra/{weights}", **spectra)
        store.save_table(f"layers/{weights}", frame.assign(weights=weights))


# ------------------------------------------------------------------------------- figures -----
def _layers(store: Store) -> pd.DataFrame:
    store.require(*(f"layers/{w}" for w in WEIGHTS))
    return pd.concat([store.load_table(f"layers/{w}") for w in WEIGHTS], ignore_index=True)


def figures(store: Store, fig_dir: Path) -> list[Path]:
    """Condition numbers and distance from identity per layer; distortion against eps_jl; spectra."""
    from experiments.figures import new_figure, save_figure, spectrum_plot, style

    frame = _layers(store)
    store.require(*(f"spectra/{w}" for w in WEIGHTS))
    spectra = {w: store.load_arrays(f"spectra/{w}") for w in WEIGHTS}
    colors = {"pretrained": "#D55E00", "random": "#0072B2"}
    layers = frame[frame["weights"] == "pretrained"]["layer"].tolist()
    x = np.arange(len(layers))
    short = [f"{b}.{k}" if b >= 0 else k for b, k in
             frame[frame["weights"] == "pretrained"][["block", "kind"]].itertuples(index=False)]
    paths: list[Path] = []
    with style():
        fig, (ax1, ax2) = new_figure("full", aspect=0.55, nrows=2, sharex=True)
        for w in WEIGHTS:
            sub = frame[frame["weights"] == w].set_index("layer").loc[layers]
            ax1.plot(x, sub["cond_W"], "o-", ms=2.5, color=colors[w], label=f"{w} W")
            ax2.plot(x, sub["dist_identity"], "o-", ms=2.5, color=colors[w], label=f"{w} W")
        ax2.plot(x, sub["dist_gaussian"], "k--", lw=0.8, label="iid Gaussian, expected")
        ax1.set_yscale("log")
        ax1.set_ylabel("cond(W)")
        ax1.set_title("Condition number of W (sigma_max / sigma_min)")
        ax2.set_ylabel("||W^T W / c - I||_F / sqrt(d_in)")
        ax2.set_title("Distance of W^T W from a multiple of the identity (c = tr / d_in)")
        ax2.set_xticks(x, short, rotation=90, fontsize=5)
        ax1.legend()
        ax2.legend()
        paths += save_figure(fig, fig_dir, "e2_condition_numbers")

        fig, ax = new_figure("full", aspect=0.38)
        for w in WEIGHTS:
            sub = frame[frame["weights"] == w].set_index("layer").loc[layers]
            ax.plot(x, sub["best_max"], "o-", ms=2.5, color=colors[w], label=f"{w}: max over pairs")
            ax.plot(x, sub["best_median"], "s:", ms=2, color=colors[w], label=f"{w}: median")
        ax.plot(x, sub["eps_jl"], "k--", lw=0.8, label="JL eps = sqrt(8 ln n / d_out)")
        ax.set_yscale("log")
        ax.set_ylabel("|c (Wx).(Wx') - x.x'| / (|x||x'|)")
        ax.set_title(f"Inner-product distortion on real layer inputs (n = {int(sub['n_points'].iloc[0])} "
                     "tokens), after the best scalar c")
        ax.set_xticks(x, short, rotation=90, fontsize=5)
        ax.set_ylim(top=ax.get_ylim()[1] * 10)
        ax.legend(ncols=3, fontsize=6, loc="upper center")
        paths += save_figure(fig, fig_dir, "e2_distortion")

        picks = [next((n for n in layers if pred(n)), None) for pred in (
            lambda n: n.endswith("query"), lambda n: "intermediate" in n,
            lambda n: n.endswith("output.dense") and "attention" not in n)]
        picks = list(dict.fromkeys(p for p in picks if p is not None)) or layers[:3]
        fig, ax = new_figure("column", aspect=0.8)
        styles = ("-", "--", ":")
        for name, ls in zip(picks, styles, strict=False):
            for w in WEIGHTS:
                spectrum_plot(ax, {f"{w} {short[layers.index(name)]}": spectra[w][name] ** 2},
                              normalise="mean", colors={f"{w} {short[layers.index(name)]}": colors[w]},
                              linestyles={f"{w} {short[layers.index(name)]}": ls})
        ax.set_ylabel("sigma^2 / mean(sigma^2)")
        ax.set_title("Squared singular values of W (non-zero spectrum of W^T W)")
        ax.legend(fontsize=5)
        paths += save_figure(fig, fig_dir, "e2_spectra")
    return paths


def verdicts(store: Store, config: Config) -> list[Verdict]:
    frame = _layers(store)
    pre, rnd = (frame[frame["weights"] == w] for w in WEIGHTS)
    n = int(pre["n_points"].iloc[0])
    ratio_pre = float((pre["dist_identity"] / pre["dist_gaussian"]).median())
    ratio_rnd = float((rnd["dist_identity"] / rnd["dist_gaussian"]).median())
    return [
        make_verdict(
            claim="theorem_premise",
            statement=("Pre-trained layers preserve inner products of their inputs up to the JL distortion "
                       "at their width (the premise of Theorem 1)."),
            measurement=(f"share of the {len(pre)} pre-trained Linear layers of {config.model} whose largest "
                         f"distortion over {n} real token inputs (after the best scalar) is within "
                         f"eps_jl = sqrt(8 ln n / d_out); random weights on the same inputs: "
                         f"{rnd['within_jl'].mean():.2f}; median largest distortion pre-trained "
                         f"{pre['best_max'].median():.3f}, random {rnd['best_max'].median():.3f}"),
            value=float(pre["within_jl"].mean()), what="share within eps_jl",
            support_if=(">=", config.support_fraction_within_jl),
            refute_if=("<", config.refute_fraction_within_jl),
            figure="e2_distortion", experiment=NAME),
        make_verdict(
            claim="theorem_premise",
            statement=("Pre-trained W^T W is as close to a multiple of the identity as that of random "
                       "Gaussian weights of the same shape, which the JL argument assumes."),
            measurement=(f"median over the {len(pre)} pre-trained layers of ||W^T W / c - I||_F / sqrt(d_in) "
                         f"divided by its iid-Gaussian expectation sqrt((d_in + 1) / d_out); random "
                         f"initialisation gives {ratio_rnd:.2f}; median cond(W) pre-trained "
                         f"{pre['cond_W'].median():.3g}, random {rnd['cond_W'].median():.3g}"),
            value=ratio_pre, what="median dist / dist_gaussian",
            support_if=("<=", config.support_dist_ratio), refute_if=(">=", config.refute_dist_ratio),
            figure="e2_condition_numbers", experiment=NAME),
    ]
