"""Experiment 8: memory of one training step, by kind, per method - exact and device-independent.

The paper reports 17.2 GB for Propulsion against more than 26 GB for other PEFT methods (a
ratio of 0.66). Peak memory on a CPU says little about that, so every method is *accounted*
(:mod:`experiments.training.memory_accounting`): parameters, gradients, AdamW state and the tensors
autograd saves for backward, counted exactly in one forward on the paper's models (RoBERTa-base,
RoBERTa-large, LLaMA-7B; meta or fake tensors, no memory needed) over batch size, sequence
length and precision (fp32; bf16 autocast over fp32 weights; pure bf16 in the study and full
presets), with the AdamW step's temporaries as torch runs them on a GPU. The accounting is
checked against measured allocator peaks of real training steps of MiniLM (its own attention
implementation; CPU: torch's profiler allocation records; CUDA: ``torch.cuda.max_memory_allocated``).

Where the bytes go: the frozen weights are the same for every PEFT method, and gradients and
optimizer state of 0.1-1% of the parameters are small, so the methods differ in what they save
for backward. A method saves, for each trained tensor, what its gradient needs, and for every
layer between the first trained tensor and the loss, what the gradient of its input needs.
On top of what every method saves there, Propulsion's z on every Linear needs each Linear's
output ``W x + b`` (one more activation per Linear); LoRA on query and value needs the inputs
of those two projections and their rank-r products.

Under autocast every Linear whose input needs a gradient saves a half-precision copy of its
weight for backward, frozen or not; so with fp32 weights a PEFT method whose trainable
parameters sit early in the network (LoRA, Propulsion) saves about half the model again.
Autocast is run with CPU fake tensors, so CPU autocast's op lists apply (they differ from
CUDA's in a few ops, e.g. which reductions stay in float32).

Not covered: transient buffers inside ops and of backward, allocator rounding and
fragmentation, the CUDA context and library workspaces, fused or memory-efficient attention
kernels (attention here is transformers' eager implementation, which saves the (B, H, T, T)
probabilities), activation checkpointing and 8-bit optimizers.

    propulsion-ntk run e8 --preset quick      # three paper models, MiniLM measured on the CPU
    propulsion-ntk run e8 --preset full --device cuda   # the same, MiniLM measured on the GPU
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from experiments.suite.base import ExperimentConfig, Store, Verdict, make_verdict
from experiments.training.memory_accounting import KINDS, METHOD_SPECS, OPTIMIZERS, PRECISIONS

NAME = "e8_memory"
TITLE = "Memory of a training step by kind: Propulsion against full fine-tuning, LoRA, IA3 and BitFit"
CLAIMS = ("memory",)
_PROPULSION = ("propulsion", "propulsion_reference")
_GIB = 2.0**30
VARIANT_COLORS = {"propulsion_reference": "#fdb863"}  # as in e5: the preset beside plain Propulsion


def _color(method: str) -> str:
    from experiments.figures import method_color

    return VARIANT_COLORS.get(method, method_color(method))


@dataclass(frozen=True)
class Config(ExperimentConfig):
    models: tuple[str, ...] = field(default=("roberta-base", "roberta-large", "llama-7b"), metadata={
        "help": "paper models to account (keys of propulsion.counting.ARCHITECTURES)"})
    methods: tuple[str, ...] = field(default=tuple(METHOD_SPECS), metadata={
        "help": "methods (experiments.training.memory_accounting.METHOD_SPECS); must include lora and "
                "propulsion"})
    batch_sizes: tuple[int, ...] = field(default=(1, 8, 32), metadata={"help": "batch sizes accounted"})
    seq_lens: tuple[int, ...] = field(default=(128, 512), metadata={"help": "sequence lengths accounted"})
    precisions: tuple[str, ...] = field(default=("fp32", "bf16-autocast"), metadata={
        "help": "fp32, bf16-autocast, fp16-autocast (fp32 weights), bf16, fp16 (pure half)"})
    optimizer: str = field(default="adamw", metadata={"help": "adamw, sgd or sgd-momentum"})
    attention: str = field(default="eager", metadata={"help": "transformers attention implementation"})
    measure_model: str | None = field(default="minilm", metadata={
        "help": "offline model measured for real to check the accounting (None: no check)"})
    measure_batch_sizes: tuple[int, ...] = field(default=(8, 32), metadata={
        "help": "batch sizes of the measured check"})
    measure_seq_len: int = field(default=64, metadata={"help": "sequence length of the measured check"})
    measure_steps: int = field(default=2, metadata={"help": "training steps per measurement"})
    figure_batch_size: int = field(default=8, metadata={"help": "batch size of the bytes-by-kind figure"})
    figure_seq_len: int = field(default=128, metadata={"help": "sequence length of that figure"})
    paper_ratio: float = field(default=17.2 / 26.0, metadata={
        "help": "the paper's Propulsion / other-PEFT memory ratio (17.2 GB / 26 GB)"})
    support_max_ratio: float = field(default=1 / 1.5, metadata={
        "help": "supported if the smallest Propulsion / LoRA ratio over the grid <= this (1.5x below)"})
    refute_min_ratio: float = field(default=1.0, metadata={
        "help": "not supported if even the smallest Propulsion / LoRA ratio >= this (never below LoRA)"})
    check_support_max_error: float = field(default=0.10, metadata={
        "help": "accounting trusted if every |measured / accounted - 1| <= this"})
    check_refute_max_error: float = field(default=0.25, metadata={
        "help": "accounting not trusted if some |measured / accounted - 1| > this"})

    def __post_init__(self) -> None:
        super().__post_init__()
        from propulsion.counting import ARCHITECTURES

        def positive(name: str, values: tuple[int, ...]) -> None:
            if not values or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
                raise ValueError(f"{name} must be a non-empty list of integers >= 1, got {values!r}")

        unknown = [m for m in self.models if m not in ARCHITECTURES]
        if not self.models or unknown:
            raise ValueError(f"models must be a non-empty subset of {sorted(ARCHITECTURES)}; "
                             f"unknown: {unknown}")
        bad = [m for m in self.methods if m not in METHOD_SPECS]
        if bad or "lora" not in self.methods or not set(_PROPULSION) & set(self.methods):
            raise ValueError(f"methods must come from {list(METHOD_SPECS)} and include lora and a "
                             f"propulsion variant; got {self.methods}")
        if not self.precisions or any(p not in PRECISIONS for p in self.precisions):
            raise ValueError(f"precisions must be a non-empty subset of {PRECISIONS}, got {self.precisions}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        positive("batch_sizes", self.batch_sizes)
        positive("seq_lens", self.seq_lens)
        positive("measure_batch_sizes", self.measure_batch_sizes)
        positive("measure_seq_len / measure_steps / figure_batch_size / figure_seq_len",
                 (self.measure_seq_len, self.measure_steps, self.figure_batch_size, self.figure_seq_len))
        if self.figure_batch_size not in self.batch_sizes or self.figure_seq_len not in self.seq_lens:
            raise ValueError(f"figure_batch_size {self.figure_batch_size} and figure_seq_len "
                             f"{self.figure_seq_len} must be in batch_sizes and seq_lens")
        if self.measure_model is not None:
            from experiments.data.models import MODELS

            if self.measure_model not in MODELS:
                raise ValueError(f"measure_model must be None or one of {MODELS}, got {self.measure_model!r}")
        if not 0 < self.support_max_ratio < self.refute_min_ratio:
            raise ValueError("need 0 < support_max_ratio < refute_min_ratio")
        if not 0 <= self.check_support_max_error < self.check_refute_max_error:
            raise ValueError("need 0 <= check_support_max_error < check_refute_max_error")


PRESETS: dict[str, Config] = {
    "tiny": Config(models=("roberta-base",), methods=("propulsion", "lora"), batch_sizes=(1, 8),
                   seq_lens=(32,), precisions=("fp32",), measure_batch_sizes=(2,), measure_seq_len=16,
                   measure_steps=1, figure_seq_len=32),
    "quick": Config(measure_batch_sizes=(8,)),
    "study": Config(precisions=("fp32", "bf16-autocast", "bf16")),
    "full": Config(device="auto", batch_sizes=(1, 4, 8, 16, 32), seq_lens=(64, 128, 256, 512),
                   precisions=("fp32", "bf16-autocast", "bf16"), measure_batch_sizes=(4, 16, 32)),
}


def main(config: Config, store: Store, *, progress: bool = False) -> None:
    """Account every (model, method, precision) not yet done (unit ``accounts/<model>/<method>/
    <precision>``), then measure the check model (unit ``measured/<model>/<method>``)."""
    from experiments.training.memory_accounting import account_grid, check_against_measured

    for model in config.models:
        for method in config.methods:
            for precision in config.precisions:
                unit = f"accounts/{model}/{method}/{precision}"
                if store.done(unit):
                    continue
                if progress:
                    print(f"  accounting {model} {method} {precision}")
                rows = account_grid(model, method, precision=precision, batch_sizes=config.batch_sizes,
                                    seq_lens=config.seq_lens, optimizer=config.optimizer,
                                    attention=config.attention)
                store.save_table(unit, pd.DataFrame(rows))
    if config.measure_model is None:
        return
    device = config.resolve_device()
    for method in config.methods:
        unit = f"measured/{config.measure_model}/{method}"
        if store.done(unit):
            continue
        if progress:
            print(f"  measuring {config.measure_model} {method} on {device}")
        rows = [check_against_measured(config.measure_model, method, batch_size=b,
                                       seq_len=config.measure_seq_len, optimizer=config.optimizer,
                                       device=device, steps=config.measure_steps, seed=config.seed)
                for b in config.measure_batch_sizes]
        store.save_table(unit, pd.DataFrame(rows))


def accounts(store: Store, config: Config) -> pd.DataFrame:
    """Every accounted row (one per model, method, precision, batch size, sequence length)."""
    units = [f"accounts/{m}/{k}/{p}"
             for m in config.models for k in config.methods for p in config.precisions]
    store.require(*units)
    return pd.concat([store.load_table(u) for u in units], ignore_index=True)


def measured(store: Store, config: Config) -> pd.DataFrame:
    """Every measured check row (empty when ``measure_model`` is None)."""
    if config.measure_model is None:
        return pd.DataFrame()
    units = [f"measured/{config.measure_model}/{k}" for k in config.methods]
    store.require(*units)
    return pd.concat([store.load_table(u) for u in units], ignore_index=True)


def ratios(frame: pd.DataFrame) -> pd.DataFrame:
    """Per setting (model, precision, batch size, sequence length): accounted peak bytes of
    Propulsion (the lighter of its variants, named) over LoRA's and IA3's."""
    keys = ["model", "precision", "batch_size", "seq_len"]
    wide = frame.pivot_table(index=keys, columns="method", values="peak", aggfunc="first")
    variants = [v for v in _PROPULSION if v in wide.columns]
    out = wide[variants].min(axis=1).rename("propulsion_peak").to_frame()
    out["propulsion_variant"] = wide[variants].idxmin(axis=1)
    out["lora_peak"] = wide["lora"]
    out["propulsion_over_lora"] = out["propulsion_peak"] / out["lora_peak"]
    if "ia3" in wide.columns:
        out["propulsion_over_ia3"] = out["propulsion_peak"] / wide["ia3"]
    return out.reset_index()


def figures(store: Store, fig_dir: Path) -> list[Path]:
    """Stacked bars of bytes by kind per method (one panel per model, at the figure setting, per
    precision); Propulsion / LoRA against batch size; measured against accounted peaks."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    from experiments.figures import new_figure, save_figure, style

    config = store.config
    assert isinstance(config, Config)
    frame = accounts(store, config)
    paths: list[Path] = []
    shades = {"parameters": 1.0, "gradients": 0.75, "optimizer": 0.5, "activations": 0.25}
    hatches = {"parameters": "", "gradients": "..", "optimizer": "//", "activations": "xx"}
    with style():
        for precision in config.precisions:
            at = frame[(frame["precision"] == precision) & (frame["batch_size"] == config.figure_batch_size)
                       & (frame["seq_len"] == config.figure_seq_len)]
            fig, axes = new_figure("full", aspect=0.36, ncols=len(config.models), squeeze=False)
            for ax, model in zip(axes[0], config.models, strict=True):
                sub = at[at["model"] == model].set_index("method").reindex(list(config.methods))
                x = np.arange(len(sub))
                bottom = np.zeros(len(sub))
                for kind in KINDS:
                    values = sub[kind].to_numpy(dtype=float) / _GIB
                    ax.bar(x, values, bottom=bottom, color=[_color(m) for m in sub.index],
                           alpha=shades[kind], hatch=hatches[kind], edgecolor="white", linewidth=0.3,
                           label=kind if model == config.models[0] else None)
                    bottom += values
                ax.scatter(x, sub["peak"].to_numpy(dtype=float) / _GIB, marker="_", s=120, color="black",
                           linewidths=1.2, zorder=3)
                ax.set_xticks(x, [m.replace("propulsion_reference", "prop. ref.") for m in sub.index],
                              rotation=45, ha="right", fontsize="x-small")
                ax.set_title(model)
            axes[0][0].set_ylabel("GiB per training step")
            handles: list = [Patch(facecolor="grey", alpha=shades[k], hatch=hatches[k], label=k)
                             for k in KINDS]
            handles.append(Line2D([], [], color="black", marker="_", ls="", ms=10,
                                  label="peak (activations or optimizer temporaries)"))
            fig.legend(handles=handles, fontsize="x-small", loc="outside lower center", ncols=5)
            fig.suptitle(f"Accounted bytes by kind ({precision}, {config.optimizer}, batch "
                         f"{config.figure_batch_size}, {config.figure_seq_len} tokens)", fontsize=8)
            paths += save_figure(fig, fig_dir, f"e8_memory_by_kind_{precision}")
        rat = ratios(frame)
        fig, axes = new_figure("full", aspect=0.36, ncols=len(config.models), squeeze=False, sharey=True)
        styles = ["-", "--", ":", "-."]
        for ax, model in zip(axes[0], config.models, strict=True):
            for i, precision in enumerate(config.precisions):
                for j, t in enumerate(config.seq_lens):
                    sub = rat[(rat["model"] == model) & (rat["precision"] == precision)
                              & (rat["seq_len"] == t)].sort_values("batch_size")
                    ax.plot(sub["batch_size"], sub["propulsion_over_lora"], marker="o", ms=2.5,
                            ls=styles[i % len(styles)], color=f"C{j}", label=f"{precision}, T={t}")
            ax.axhline(config.paper_ratio, color="grey", lw=0.8, ls=":")
            ax.axhline(1.0, color="black", lw=0.5)
            ax.set_xscale("log", base=2)
            ax.set_xticks(list(config.batch_sizes), [str(b) for b in config.batch_sizes])
            ax.minorticks_off()
            ax.set_xlabel("batch size")
            ax.set_title(model)
        axes[0][0].set_ylabel("Propulsion / LoRA (accounted peak)")
        fig.suptitle("Accounted peak of Propulsion (lighter variant) over LoRA r=8 (q, v); below 1: "
                     "Propulsion needs less", fontsize=8)
        axes[0][0].annotate("paper: 17.2 / 26", (config.batch_sizes[0], config.paper_ratio),
                            fontsize=6, va="bottom", color="grey")
        axes[0][-1].legend(fontsize="xx-small")
        paths += save_figure(fig, fig_dir, "e8_memory_ratio")
        check = measured(store, config)
        if len(check):
            fig, ax = new_figure("column", aspect=0.8)
            for method, sub in check.groupby("method", sort=False):
                ax.scatter(sub["peak"] / 2**20, sub["measured_peak"] / 2**20, color=_color(str(method)),
                           label=method, s=12)
            top = max(check["peak"].max(), check["measured_peak"].max()) / 2**20 * 1.05
            ax.plot([0, top], [0, top], color="grey", lw=0.8, ls=":")
            ax.set(xlabel="accounted peak (MiB)", ylabel="measured allocator peak (MiB)",
                   title=f"{config.measure_model} on {check['device'].iloc[0]}: measured vs accounted")
            ax.legend(fontsize="xx-small")
            paths += save_figure(fig, fig_dir, "e8_measured_vs_accounted")
    return paths


def _setting(row: pd.Series) -> str:
    return f"{row['model']}, batch {row['batch_size']}, {row['seq_len']} tokens, {row['precision']}"


def verdicts(store: Store, config: Config) -> list[Verdict]:
    frame = accounts(store, config)
    rat = ratios(frame)
    best = rat.loc[rat["propulsion_over_lora"].idxmin()]
    reached = rat[rat["propulsion_over_lora"] <= config.support_max_ratio]
    where = (f"settings where Propulsion is at least {1 / config.support_max_ratio:.3g}x below LoRA: "
             + ("; ".join(_setting(r) for _, r in reached.iterrows()) if len(reached)
                else f"none of the {len(rat)} settings"))
    grid = (f"grid: {', '.join(config.models)}; batch {list(config.batch_sizes)}; tokens "
            f"{list(config.seq_lens)}; {', '.join(config.precisions)}; {config.optimizer}; "
            f"{config.attention} attention")
    ia3 = (f"; Propulsion / IA3 there {best['propulsion_over_ia3']:.3f}"
           if "propulsion_over_ia3" in rat.columns else "")
    out = [make_verdict(
        claim="memory",
        statement="Propulsion needs 17.2 GB where other PEFT methods need more than 26 GB (1.5x less)",
        measurement=(f"smallest ratio of the accounted peak of a training step (parameters + gradients + "
                     f"optimizer state + the larger of saved activations and the optimizer step's "
                     f"temporaries; exact, but without transients inside ops, allocator fragmentation "
                     f"or CUDA workspaces), "
                     f"Propulsion (lighter of z only / authors' preset) over LoRA r=8 on query/value, over "
                     f"the grid; it is at {_setting(best)} ({best['propulsion_peak'] / _GIB:.2f} GiB, "
                     f"{best['propulsion_variant']}, vs {best['lora_peak'] / _GIB:.2f} GiB{ia3}); {where}; "
                     f"{grid}"),
        value=float(best["propulsion_over_lora"]), what="smallest Propulsion / LoRA ratio",
        support_if=("<=", config.support_max_ratio), refute_if=(">=", config.refute_min_ratio),
        figure="e8_memory_ratio", experiment=NAME)]
    check = measured(store, config)
    if len(check):
        error = (check["measured_over_accounted"] - 1.0).abs()
        worst = check.loc[error.idxmax()]
        out.append(make_verdict(
            claim="memory",
            statement="(method check) The accounting predicts the measured peak of real training steps",
            measurement=(f"largest |measured / accounted - 1| of the peak over {len(check)} runs of "
                         f"{config.measure_model} on {worst['device']} (methods "
                         f"{', '.join(config.methods)}; batch "
                         f"{list(config.measure_batch_sizes)}, {config.measure_seq_len} tokens, fp32, "
                         f"{config.measure_steps} step(s)); worst: {worst['method']} batch "
                         f"{worst['batch_size']}, measured / accounted "
                         f"{worst['measured_over_accounted']:.3f}"),
            value=float(error.max()) if len(error) else math.nan, what="largest relative deviation",
            support_if=("<=", config.check_support_max_error), refute_if=(">", config.check_refute_max_error),
            figure="e8_measured_vs_accounted", experiment=NAME))
    return out
