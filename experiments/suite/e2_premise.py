"""Experiment 2: the premise of the paper's Theorem 1, layer by layer.

Theorem 1 argues through the Johnson-Lindenstrauss (JL) lemma that a layer's weight W (d_out, d_in)
preserves inner products of its inputs, so that Propulsion's per-layer metric k^2 W^T W agrees
with full fine-tuning's identity metric up to scale. For every Linear layer (the head excepted)
of the pre-trained MiniLM (BERT encoder) and SmolLM2-135M (LLaMA decoder; its offline package
stores the weights 4-bit quantised, Q4_1, which is what is measured), and of the same
architectures with random weights (seeded ``from_config``):

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

Seeds: each seed draws other sentences and other token inputs per layer (and, for random weights,
other weights); the pre-trained W and so its distance from the identity do not change. Verdicts
are decided on the 95% Student-t interval over seeds of the per-seed share of layers within
eps_jl and of the per-seed median ratio dist / dist_gaussian.

    propulsion-ntk run e2 --preset quick      # CPU, seconds
    propulsion-ntk run e2 --preset study      # 2 CPU cores, ~10 min (MiniLM and SmolLM2, 5 seeds)
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

from experiments.suite.base import ExperimentConfig, Store, Verdict, make_interval_verdict, model_label
from experiments.suite.stats import mean_interval

NAME = "e2_premise"
TITLE = "The theorem's premise: is W^T W of pre-trained layers close to a scaled identity (JL)?"
CLAIMS = ("theorem_premise",)
WEIGHTS = ("pretrained", "random")


@dataclass(frozen=True)
class Config(ExperimentConfig):
    models: tuple[str, ...] = field(
        default=("minilm",), metadata={"help": "offline models (experiments.data.models): minilm, smollm2"})
    n_seeds: int = field(default=1, metadata={"help": "seeds seed .. seed + n_seeds - 1 (sentences, inputs)"})
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
        if not self.models or set(self.models) - {"minilm", "smollm2", "mpnet"}:
            raise ValueError(f"models must name minilm, smollm2 or mpnet, got {self.models}")
        for name in ("n_sentences", "max_length", "n_seeds"):
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
    "tiny": Config(n_sentences=4, n_points=24, max_length=16, layer_filter=r"layer\.0\.|pooler", n_seeds=2),
    "quick": Config(),
    # measured on the shared 2-core machine (one thread): per seed (pre-trained and random W)
    # MiniLM 22 CPU s, SmolLM2 150 CPU s (210 layers; its GGUF load included)
    "study": Config(models=("minilm", "smollm2"), n_seeds=5, n_sentences=64, n_points=1024),
    "full": Config(device="auto", models=("minilm", "smollm2"), n_seeds=5, n_sentences=128, n_points=2048),
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
    from experiments.training.methods import find_head

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


def units(config: Config) -> list[tuple[str, str, int]]:
    """(model, weights, seed) of every unit; table ``layers/<model>-<weights>-s<seed>``."""
    return [(m, w, s) for m in config.models for s in range(config.seed, config.seed + config.n_seeds)
            for w in WEIGHTS]


def unit_name(model: str, weights: str, seed: int) -> str:
    return f"{model}-{weights}-s{seed}"


def main(config: Config, store: Store, *, progress: bool = False) -> None:
    """Tables ``layers/<unit>`` for pre-trained and random W of every model and seed, and the
    singular values ``spectra/<unit>`` of the first seed."""
    from experiments.data.datasets import load_rotten_tomatoes
    from experiments.data.models import load_model, load_tokenizer

    device = config.resolve_device()
    for model_name in config.models:
        todo = [(w, s) for m, w, s in units(config) if m == model_name
                and not store.done(f"layers/{unit_name(m, w, s)}")]
        if not todo:
            continue
        pretrained = load_model(model_name, device=device, seed=config.seed)
        tokenizer = load_tokenizer(model_name)
        for seed in sorted({s for _, s in todo}):
            texts = load_rotten_tomatoes(seed=seed).train["text"].tolist()[: config.n_sentences]
            batch = tokenizer(texts, padding=True, truncation=True, max_length=config.max_length,
                              return_tensors="pt")
            inputs = capture_inputs(pretrained, {k: v.to(device) for k, v in batch.items()}, config.n_points,
                                    seed, config.layer_filter)
            for weights in [w for w, s in todo if s == seed]:
                name = unit_name(model_name, weights, seed)
                if progress:
                    print(f"  {name}: {len(inputs)} layers", flush=True)
                model = pretrained if weights == "pretrained" else _random_model(pretrained, seed, device)
                frame, spectra = layer_table(model, inputs)
                if seed == config.seed:
                    store.save_arrays(f"spectra/{name}", **spectra)
                store.save_table(f"layers/{name}", frame.assign(weights=weights, model=model_name, seed=seed))
        del pretrained


# ------------------------------------------------------------------------------- figures -----
def _layers(store: Store, config: Config) -> pd.DataFrame:
    names = [f"layers/{unit_name(*u)}" for u in units(config)]
    store.require(*names)
    return pd.concat([store.load_table(n) for n in names], ignore_index=True)


def _suffix(model: str) -> str:
    return "" if model == "minilm" else f"_{model}"


def _per_layer(frame: pd.DataFrame, column: str, layers: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Mean over seeds per layer (in ``layers`` order) and the half-width of its 95% t interval
    (0 with one seed)."""
    from experiments.figures import t_quantile

    stats = frame.groupby("layer")[column].agg(["mean", "std", "count"]).loc[layers]
    half = np.nan_to_num(stats["std"].to_numpy() * t_quantile(stats["count"]) / np.sqrt(stats["count"]))
    return stats["mean"].to_numpy(), half


def figures(store: Store, fig_dir: Path) -> list[Path]:
    """Per model: condition numbers and distance from identity per layer; distortion against
    eps_jl (mean over seeds, 95% interval bars); spectra of the first seed."""
    from experiments.figures import style

    config = store.config
    assert isinstance(config, Config)
    frame = _layers(store, config)
    paths: list[Path] = []
    with style():
        for model in config.models:
            names = {w: f"spectra/{unit_name(model, w, config.seed)}" for w in WEIGHTS}
            store.require(*names.values())
            spectra = {w: store.load_arrays(n) for w, n in names.items()}
            paths += _model_figures(frame[frame["model"] == model], spectra, model, config, Path(fig_dir))
    return paths


def _model_figures(frame: pd.DataFrame, spectra: dict, model: str, config: Config, fig_dir: Path
                   ) -> list[Path]:
    from experiments.figures import new_figure, save_figure, spectrum_plot

    colors = {"pretrained": "#D55E00", "random": "#0072B2"}
    first = frame[(frame["weights"] == "pretrained") & (frame["seed"] == config.seed)]
    layers = first["layer"].tolist()
    x = np.arange(len(layers))
    short = [f"{b}.{k}" if b >= 0 else k for b, k in first[["block", "kind"]].itertuples(index=False)]
    step = max(1, len(layers) // 60)  # at most ~60 tick labels
    seeds = config.n_seeds
    note = f"{seeds} seeds, bars: 95% interval" if seeds > 1 else "one seed"
    paths: list[Path] = []
    fig, (ax1, ax2) = new_figure("full", aspect=0.55, nrows=2, sharex=True)
    for w in WEIGHTS:
        sub = frame[frame["weights"] == w]
        for ax, column in ((ax1, "cond_W"), (ax2, "dist_identity")):
            mean, half = _per_layer(sub, column, layers)
            ax.errorbar(x, mean, yerr=half, fmt="o-", ms=2.5, lw=0.8, elinewidth=0.6, color=colors[w],
                        label=f"{w} W")
    ax2.plot(x, first["dist_gaussian"], "k--", lw=0.8, label="iid Gaussian, expected")
    ax1.set_yscale("log")
    ax1.set_ylabel("cond(W)")
    ax1.set_title(f"{model}: condition number of W (sigma_max / sigma_min; {note})")
    ax2.set_ylabel("||W^T W / c - I||_F / sqrt(d_in)")
    ax2.set_title("Distance of W^T W from a multiple of the identity (c = tr / d_in)")
    ax2.set_xticks(x[::step], short[::step], rotation=90, fontsize=5)
    ax1.legend()
    ax2.legend()
    paths += save_figure(fig, fig_dir, f"e2_condition_numbers{_suffix(model)}")

    fig, ax = new_figure("full", aspect=0.38)
    for w in WEIGHTS:
        sub = frame[frame["weights"] == w]
        for column, fmt, what in (("best_max", "o-", "max over pairs"), ("best_median", "s:", "median")):
            mean, half = _per_layer(sub, column, layers)
            ax.errorbar(x, mean, yerr=half, fmt=fmt, ms=2, lw=0.8, elinewidth=0.6, color=colors[w],
                        label=f"{w}: {what}")
    ax.plot(x, first["eps_jl"], "k--", lw=0.8, label="JL eps = sqrt(8 ln n / d_out)")
    ax.set_yscale("log")
    ax.set_ylabel("|c (Wx).(Wx') - x.x'| / (|x||x'|)")
    points = int(first["n_points"].iloc[0])
    ax.set_title(f"{model}: inner-product distortion on real layer inputs (n = {points} "
                 f"tokens), after the best scalar c; {note}")
    ax.set_xticks(x[::step], short[::step], rotation=90, fontsize=5)
    ax.set_ylim(top=ax.get_ylim()[1] * 10)
    ax.legend(ncols=3, fontsize=6, loc="upper center")
    paths += save_figure(fig, fig_dir, f"e2_distortion{_suffix(model)}")

    picks = [next((n for n in layers if pred(n)), None) for pred in (
        lambda n: n.endswith(("query", "q_proj")), lambda n: "intermediate" in n or n.endswith("up_proj"),
        lambda n: (n.endswith("output.dense") and "attention" not in n) or n.endswith("down_proj"))]
    picks = list(dict.fromkeys(p for p in picks if p is not None)) or layers[:3]
    fig, ax = new_figure("column", aspect=0.8)
    for name, ls in zip(picks, ("-", "--", ":"), strict=False):
        for w in WEIGHTS:
            label = f"{w} {short[layers.index(name)]}"
            spectrum_plot(ax, {label: spectra[w][name] ** 2}, normalise="mean", colors={label: colors[w]},
                          linestyles={label: ls})
    ax.set_ylabel("sigma^2 / mean(sigma^2)")
    ax.set_title(f"{model}: squared singular values of W (seed {config.seed})")
    ax.legend(fontsize=5)
    paths += save_figure(fig, fig_dir, f"e2_spectra{_suffix(model)}")
    return paths


def verdicts(store: Store, config: Config) -> list[Verdict]:
    """Per model: the share of pre-trained layers within the JL distortion, and the distance of
    pre-trained W^T W from a scaled identity relative to Gaussian weights (intervals over seeds)."""
    frame = _layers(store, config)
    out = []
    for model in config.models:
        sub = frame[frame["model"] == model]
        per_seed = sub.groupby(["weights", "seed"]).apply(
            lambda g: pd.Series({"within": g["within_jl"].mean(),
                                 "ratio": (g["dist_identity"] / g["dist_gaussian"]).median(),
                                 "best_max": g["best_max"].median(), "cond": g["cond_W"].median()}),
            include_groups=False)
        pre, rnd = per_seed.loc["pretrained"], per_seed.loc["random"]
        layers = int((sub["weights"] == "pretrained").sum() / len(pre))
        n = int(sub["n_points"].max())
        seeds = f"{len(pre)} seed(s) (sentences and sampled tokens; random weights redrawn per seed)"
        out += [
            make_interval_verdict(
                claim="theorem_premise",
                statement=(f"{model_label(model)}: pre-trained layers preserve inner products of "
                           "their inputs up to the JL distortion at their width (the premise of "
                           "Theorem 1)."),
                measurement=(f"share of the {layers} pre-trained Linear layers of {model} whose largest "
                             f"distortion over {n} real token inputs (after the best scalar) is within "
                             f"eps_jl = sqrt(8 ln n / d_out), {seeds}; random weights on the same inputs: "
                             f"{rnd['within'].mean():.2f}; median largest distortion pre-trained "
                             f"{pre['best_max'].mean():.3f}, random {rnd['best_max'].mean():.3f}"),
                interval=mean_interval(pre["within"]), what="share within eps_jl",
                support_if=(">=", config.support_fraction_within_jl),
                refute_if=("<", config.refute_fraction_within_jl),
                figure=f"e2_distortion{_suffix(model)}", experiment=NAME),
            make_interval_verdict(
                claim="theorem_premise",
                statement=(f"{model_label(model)}: pre-trained W^T W is as close to a multiple of the "
                           "identity as that of random Gaussian weights of the same shape, which the "
                           "JL argument assumes."),
                measurement=(f"median over the {layers} pre-trained layers of {model} of "
                             "||W^T W / c - I||_F / "
                             f"sqrt(d_in) divided by its iid-Gaussian expectation sqrt((d_in + 1) / d_out), "
                             f"{seeds} (the pre-trained W do not change with the seed); random "
                             "initialisation "
                             f"gives {rnd['ratio'].mean():.2f}; median cond(W) pre-trained "
                             f"{pre['cond'].mean():.3g}, random {rnd['cond'].mean():.3g}"),
                interval=mean_interval(pre["ratio"]), what="median dist / dist_gaussian",
                support_if=("<=", config.support_dist_ratio), refute_if=(">=", config.refute_dist_ratio),
                figure=f"e2_condition_numbers{_suffix(model)}", experiment=NAME),
        ]
    return out
