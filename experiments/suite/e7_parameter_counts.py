"""Experiment 7: trainable parameters of the paper's models, from their configurations alone.

Every model is built on the ``meta`` device (no weights, no memory) and counted for: full
fine-tuning; Propulsion with z on every Linear and Embedding (the paper's "All" count), on every
Linear, and on the attention projections query/key/value only; LoRA r = 8 on query and value
(through peft). Each count is checked against an analytic count from the module shapes
(Propulsion: sum of d_out over wrapped layers; LoRA: sum of r (d_in + d_out)).

    propulsion-ntk run e7 --preset quick      # all five models, a few seconds
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from torch import nn

from experiments.suite.base import ExperimentConfig, Store, Verdict, make_verdict

NAME = "e7_parameter_counts"
TITLE = "Parameter counts of the paper's models: Propulsion, LoRA and full fine-tuning"
CLAIMS = ("parameter_count",)

# Per model type: (attention projections for Propulsion "attention", LoRA targets "query/value").
_TARGETS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "roberta": (("query", "key", "value"), ("query", "value")),
    "deberta-v2": (("query_proj", "key_proj", "value_proj"), ("query_proj", "value_proj")),
    "bart": (("q_proj", "k_proj", "v_proj"), ("q_proj", "v_proj")),
    "llama": (("q_proj", "k_proj", "v_proj"), ("q_proj", "v_proj")),
}
METHOD_ORDER = ("full", "lora (q, v)", "propulsion (Linear + Embedding)", "propulsion (Linear)",
                "propulsion (q, k, v)")


@dataclass(frozen=True)
class Config(ExperimentConfig):
    models: tuple[str, ...] = field(
        default=("roberta-base", "roberta-large", "deberta-v3-base", "bart-large", "llama-7b"),
        metadata={"help": "keys of propulsion.counting.ARCHITECTURES"})
    num_labels: int = field(default=2, metadata={"help": "classes of the classification head"})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank"})
    paper_percent: float = field(default=0.1, metadata={"help": "the paper's 'about 0.1%' claim"})
    support_max_percent: float = field(
        default=0.15, metadata={"help": "supported if the largest Propulsion share <= this (%)"})
    refute_max_percent: float = field(
        default=0.3, metadata={"help": "not supported if the largest Propulsion share > this (%)"})
    paper_roberta_base: int = field(default=86_000, metadata={"help": "the paper's count, 0.086M"})
    support_rel_dev: float = field(
        default=0.01, metadata={"help": "reproduced if |ours - paper| / paper <= this"})
    refute_rel_dev: float = field(
        default=0.05, metadata={"help": "not reproduced if |ours - paper| / paper > this"})

    def __post_init__(self) -> None:
        super().__post_init__()
        from propulsion.counting import ARCHITECTURES

        unknown = [m for m in self.models if m not in ARCHITECTURES]
        if not self.models or unknown:
            raise ValueError(f"models must be a non-empty subset of {sorted(ARCHITECTURES)}; "
                             f"unknown: {unknown}")
        if self.num_labels < 1 or self.lora_r < 1:
            raise ValueError(f"num_labels and lora_r must be >= 1, got {self.num_labels}, {self.lora_r}")
        if not 0 < self.support_max_percent <= self.refute_max_percent:
            raise ValueError("need 0 < support_max_percent <= refute_max_percent")
        if not 0 <= self.support_rel_dev <= self.refute_rel_dev:
            raise ValueError("need 0 <= support_rel_dev <= refute_rel_dev")


PRESETS: dict[str, Config] = {
    "tiny": Config(models=("roberta-base",)),
    "quick": Config(),
    "study": Config(),  # deterministic counts: the study needs nothing more than quick
    "full": Config(device="auto"),
}


def _analytic(model: nn.Module, suffixes: tuple[str, ...] | None, embeddings: bool, lora_r: int = 0,
              skip: tuple[str, ...] = ()) -> int:
    """Sum of d_out (or r (d_in + d_out) when ``lora_r``) over the Linear layers named by ``suffixes``."""
    total = 0
    for name, module in model.named_modules():
        if any(name == s or name.startswith(s + ".") for s in skip):
            continue
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(module, nn.Linear) and (suffixes is None or leaf in suffixes):
            total += lora_r * (module.in_features + module.out_features) if lora_r else module.out_features
        elif embeddings and isinstance(module, nn.Embedding):
            total += module.embedding_dim
    return total


def count_model(model_name: str, config: Config) -> pd.DataFrame:
    """One row per method: trainable parameters (by wrapping), analytic count, full size, share."""
    from experiments.training.methods import find_head, prepare
    from propulsion import PropulsionConfig
    from propulsion.counting import ARCHITECTURES, build_on_meta, count_propulsion

    model_type = ARCHITECTURES[model_name][0]
    attention, lora_targets = _TARGETS[model_type]
    reference = build_on_meta(model_name, config.num_labels)
    full = sum(p.numel() for p in reference.parameters())
    rows = [("full", "every parameter", full, full)]
    for method, cfg, suffixes, emb in (
        ("propulsion (Linear + Embedding)", PropulsionConfig(include_embeddings=True), None, True),
        ("propulsion (Linear)", PropulsionConfig(), None, False),
        ("propulsion (q, k, v)", PropulsionConfig(target_modules=attention), attention, False),
    ):
        count = count_propulsion(model_name, cfg, config.num_labels)
        rows.append((method, "z only, head weights frozen" if suffixes is None else ", ".join(attention),
                     count.trainable, _analytic(reference, suffixes, emb)))
    lora = prepare(build_on_meta(model_name, config.num_labels), "lora", head="frozen",
                   r=config.lora_r, target_modules=list(lora_targets))
    heads = find_head(reference)
    rows.append(("lora (q, v)", f"{', '.join(lora_targets)}; r={config.lora_r}",
                 sum(p.numel() for p in lora.parameters() if p.requires_grad),
                 _analytic(reference, lora_targets, False, config.lora_r, skip=heads)))
    frame = pd.DataFrame(rows, columns=["method", "targets", "trainable", "analytic"])
    frame.insert(0, "model", model_name)
    frame["full_model"] = full
    frame["percent"] = 100.0 * frame["trainable"] / full
    return frame


def main(config: Config, store: Store, *, progress: bool = False) -> None:
    """Count every model in ``config.models`` not yet done (unit ``counts/<model>``)."""
    for model_name in config.models:
        unit = f"counts/{model_name}"
        if store.done(unit):
            continue
        if progress:
            print(f"  counting {model_name}")
        store.save_table(unit, count_model(model_name, config))


def _results(store: Store, config: Config) -> pd.DataFrame:
    store.require(*(f"counts/{m}" for m in config.models))
    return pd.concat([store.load_table(f"counts/{m}") for m in config.models], ignore_index=True)


def figures(store: Store, fig_dir: Path) -> list[Path]:
    """Grouped bars (log scale): trainable parameters per model and method, with shares in %."""
    from experiments.figures import method_color, new_figure, save_figure, style

    config = store.config
    assert isinstance(config, Config)
    frame = _results(store, config)
    methods = [m for m in METHOD_ORDER if m in set(frame["method"])] + sorted(
        set(frame["method"]) - set(METHOD_ORDER))
    hatches = {"propulsion (Linear)": "//", "propulsion (q, k, v)": ".."}
    with style():
        fig, ax = new_figure("full", aspect=0.4)
        x = np.arange(len(config.models))
        width = 0.8 / len(methods)
        for i, method in enumerate(methods):
            sub = frame[frame["method"] == method].set_index("model").reindex(list(config.models))
            bars = ax.bar(x + (i - (len(methods) - 1) / 2) * width, sub["trainable"], width,
                          label=method, color=method_color(method), hatch=hatches.get(method),
                          edgecolor="white", linewidth=0.3)
            if method != "full":
                for bar, pct in zip(bars, sub["percent"], strict=True):
                    ax.annotate(f"{pct:.3g}%", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                                ha="center", va="bottom", fontsize=5, rotation=90)
        ax.set_yscale("log")
        ax.set_xticks(x, list(config.models))
        ax.set_ylabel("trainable parameters")
        ax.set_title(f"Trainable parameters ({config.num_labels} labels); labels: share of the full model")
        ax.legend(ncols=3, loc="upper left", fontsize=6)
        ax.set_ylim(top=ax.get_ylim()[1] * 30)
        return save_figure(fig, fig_dir, "e7_parameter_counts")


def verdicts(store: Store, config: Config) -> list[Verdict]:
    frame = _results(store, config)
    paper = frame[frame["method"] == "propulsion (Linear + Embedding)"].set_index("model")
    lora = frame[frame["method"] == "lora (q, v)"].set_index("model")
    shares = ", ".join(f"{m} {paper.loc[m, 'percent']:.3f}%" for m in config.models)
    out = [make_verdict(
        claim="parameter_count",
        statement=f"Propulsion trains about {config.paper_percent:g}% of a model's parameters.",
        measurement=(f"largest share of trainable parameters, z on every Linear and Embedding "
                     f"(head scales included, {config.num_labels} labels), over {len(config.models)} "
                     f"model(s), counted on the meta device: {shares}"),
        value=float(paper["percent"].max()), what="largest share (%)",
        support_if=("<=", config.support_max_percent), refute_if=(">", config.refute_max_percent),
        figure="e7_parameter_counts", experiment=NAME)]
    ratio = (paper["trainable"] / lora["trainable"]).reindex(list(config.models))
    out.append(make_verdict(
        claim="parameter_count",
        statement="Propulsion trains fewer parameters than LoRA.",
        measurement=(f"largest ratio of Propulsion (every Linear + Embedding) to LoRA r={config.lora_r} "
                     f"on query/value, over the models: "
                     + ", ".join(f"{m} {r:.3f}" for m, r in ratio.items())),
        value=float(ratio.max()), what="largest ratio Propulsion / LoRA",
        support_if=("<", 1.0), refute_if=(">=", 1.0), figure="e7_parameter_counts", experiment=NAME))
    if "roberta-base" in config.models:
        ours = int(paper.loc["roberta-base", "trainable"])
        dev = abs(ours - config.paper_roberta_base) / config.paper_roberta_base
        out.append(make_verdict(
            claim="parameter_count",
            statement=(f"RoBERTa-base with Propulsion trains {config.paper_roberta_base / 1e6:.3f}M "
                       "parameters."),
            measurement=(f"relative deviation of our count {ours:,d} (z on every Linear and Embedding, "
                         f"{config.num_labels} labels) from the paper's {config.paper_roberta_base:,d}"),
            value=dev, what="|ours - paper| / paper",
            support_if=("<=", config.support_rel_dev), refute_if=(">", config.refute_rel_dev),
            figure="e7_parameter_counts", experiment=NAME))
    return out
