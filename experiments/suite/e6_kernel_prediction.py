"""Experiment 6: what each method's initial kernel predicts, beside what fine-tuning reaches.

If fine-tuning behaves like kernel regression with the initial NTK (the "kernel behaviour" of
Malladi et al. 2023 that the paper leans on), a method's fine-tuned accuracy should be close to
the accuracy of kernel regression with its own initial kernel on the same few examples. Per
method, on one seeded few-shot training set (``shots`` per class from the training split):

- kernel: ``scores = K(test, train) (K(train, train) + ridge I)^{-1} Y`` with the NTK of the
  method's trained parameters at initialisation (trace over logits; centred one-hot targets;
  ridge relative to the mean diagonal), see :func:`experiments.kernel_predictor.kernel_predictor_accuracy`;
- fine-tuning: the same model prepared the same way, trained on exactly those examples
  (AdamW, ``steps`` steps), validated on ``n_validation`` validation examples, tested on the same
  ``n_test`` test examples as the kernel.

    propulsion-ntk run e6 --preset quick
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from experiments.encoding import EncodedSplit, EncodedSplits
from experiments.figures import method_color, new_figure, save_figure, style
from experiments.suite._training import run_training, summarise
from experiments.suite.base import ExperimentConfig, Store, Verdict, make_verdict
from experiments.suite.e5_accuracy_cost import METHOD_SPECS
from experiments.train import TrainConfig

NAME = "e6_kernel_prediction"
TITLE = "Kernel prediction versus fine-tuning: kernel regression with each method's initial NTK"
CLAIMS = ("kernel_regime",)
DEFAULT_LR = (("full", 5e-5), ("lora", 1e-3), ("ia3", 5e-3), ("bitfit", 1e-3), ("propulsion", 3e-3))


@dataclass(frozen=True)
class Config(ExperimentConfig):
    model: str = field(default="minilm", metadata={"help": "model short name"})
    dataset: str = field(default="rotten_tomatoes", metadata={"help": "data set"})
    methods: tuple[str, ...] = field(
        default=("full", "lora", "ia3", "bitfit", "propulsion"),
        metadata={"help": "keys of e5's METHOD_SPECS"},
    )
    learning_rates: tuple[tuple[str, float], ...] = field(
        default=DEFAULT_LR, metadata={"help": "AdamW learning rate per method"}
    )
    shots: int = field(default=32, metadata={"help": "training examples per class"})
    n_test: int = field(default=128, metadata={"help": "test examples (kernel and fine-tuning alike)"})
    n_validation: int = field(default=64, metadata={"help": "validation examples (checkpoint choice)"})
    max_length: int = field(default=32, metadata={"help": "tokens per text at most"})
    ridge: float = field(default=1e-3, metadata={"help": "kernel ridge, relative to the mean diagonal"})
    steps: int = field(default=60, metadata={"help": "fine-tuning steps on the few-shot set"})
    batch_size: int = field(default=8, metadata={"help": "fine-tuning batch size"})
    eval_every: int = field(default=10, metadata={"help": "validation every n steps"})
    support_max_gap: float = field(
        default=0.03, metadata={"help": "supported if |kernel acc - fine-tuned acc| of Propulsion <= this"}
    )
    refute_min_gap: float = field(default=0.10, metadata={"help": "not supported if > this"})
    support_min_accuracy: float = field(default=0.6, metadata={
        "help": "the gap counts only if Propulsion's fine-tuned accuracy reaches this (else inconclusive)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        unknown = [m for m in self.methods if m not in METHOD_SPECS]
        if not self.methods or unknown:
            raise ValueError(f"methods must be a non-empty subset of {list(METHOD_SPECS)}; unknown {unknown}")
        missing = [m for m in self.methods if m not in dict(self.learning_rates)]
        if missing:
            raise ValueError(f"learning_rates lack {missing}")
        if min(self.shots, self.n_test, self.n_validation) < 1 or self.ridge < 0:
            raise ValueError("shots, n_test and n_validation must be >= 1 and ridge >= 0")


PRESETS: dict[str, Config] = {
    "tiny": Config(
        methods=("full", "propulsion"),
        shots=3,
        n_test=6,
        n_validation=4,
        max_length=12,
        steps=3,
        batch_size=2,
        eval_every=3,
    ),
    "quick": Config(),
    "study": Config(),  # placeholder until the study sizes are set (issue 13)
    "full": Config(
        device="auto",
        shots=128,
        n_test=1000,
        n_validation=500,
        max_length=64,
        steps=300,
        batch_size=16,
        eval_every=25,
    ),
}


def _take(split: EncodedSplit, index: torch.Tensor) -> EncodedSplit:
    return EncodedSplit(split.input_ids[index], split.attention_mask[index], split.labels[index])


def few_shot_data(config: Config) -> EncodedSplits:
    """``shots`` training examples per class, and the first ``n_validation`` / ``n_test`` examples
    of a seeded permutation of the validation / test splits (same seed: same examples)."""
    from experiments.data import load_dataset
    from experiments.encoding import encode_splits
    from experiments.models import load_tokenizer

    full = encode_splits(
        load_dataset(config.dataset, seed=config.seed),
        load_tokenizer(config.model),
        max_length=config.max_length,
    )
    g = torch.Generator().manual_seed(config.seed + 7)
    train_index = []
    for label in range(full.num_labels):
        members = torch.nonzero(full.train.labels == label).flatten()
        if len(members) < config.shots:
            raise ValueError(
                f"class {label} has {len(members)} training examples, fewer than shots={config.shots}"
            )
        train_index.append(members[torch.randperm(len(members), generator=g)[: config.shots]])
    train = torch.cat(train_index).sort().values
    val = torch.randperm(len(full.validation), generator=g)[: config.n_validation].sort().values
    test = torch.randperm(len(full.test), generator=g)[: config.n_test].sort().values
    tag = f"{full.fingerprint}:{config.shots}:{config.n_validation}:{config.n_test}:{config.seed}"

    return EncodedSplits(
        _take(full.train, train),
        _take(full.validation, val),
        _take(full.test, test),
        full.num_labels,
        hashlib.sha256(tag.encode()).hexdigest()[:16],
    )


def train_config(config: Config, method_name: str) -> TrainConfig:
    method, options, head = METHOD_SPECS[method_name]
    return TrainConfig(
        model=config.model,
        dataset=config.dataset,
        method=method,
        method_options=options,
        head=head,
        optimizer="adamw",
        lr=dict(config.learning_rates)[method_name],
        weight_decay=0.0,
        schedule="constant",
        steps=config.steps,
        batch_size=config.batch_size,
        clip_norm=1.0,
        eval_every=config.eval_every,
        max_length=config.max_length,
        seed=config.seed,
        device=config.resolve_device(),
        checkpoint_every=config.eval_every,
        target_accuracy=None,
        save_best=False,
    )


def _kernel_unit(config: Config, data: EncodedSplits, method_name: str) -> pd.DataFrame:
    from experiments.kernel_predictor import kernel_predictor_accuracy
    from experiments.methods import prepare
    from experiments.models import load_model

    device = config.resolve_device()
    method, _, head = METHOD_SPECS[method_name]
    cfg = train_config(config, method_name)
    model = load_model(config.model, data.num_labels, device=device, seed=config.seed)
    torch.manual_seed(config.seed)
    model = prepare(model, method, head=head, **cfg.prepare_options()).to(device).eval()
    result = kernel_predictor_accuracy(
        model,
        data.train.batch(range(len(data.train)), device),
        data.test.batch(range(len(data.test)), device),
        params="trainable",
        ridge=config.ridge,
        output="trace",
    )
    keep = {k: v for k, v in result.items() if k != "predictions"}
    return pd.DataFrame([{"method_name": method_name, **keep}])


def main(config: Config, store: Store, *, progress: bool = False) -> None:
    data = few_shot_data(config)
    for name in config.methods:
        if not store.done(f"kernel/{name}"):
            store.save_table(f"kernel/{name}", _kernel_unit(config, data, name))
        run_training(
            store,
            f"finetune/{name}",
            train_config(config, name),
            data=data,
            tags={"method_name": name},
            progress=progress,
        )
    store.provenance()


def comparison(store: Store, config: Config) -> pd.DataFrame:
    """Per method: kernel-regression test accuracy, fine-tuned test accuracy, and their gap."""
    store.require(*[f"{kind}/{m}" for kind in ("kernel", "finetune") for m in config.methods])
    kernel = pd.concat([store.load_table(f"kernel/{m}") for m in config.methods], ignore_index=True)
    tuned = summarise(
        pd.concat([store.load_table(f"finetune/{m}") for m in config.methods], ignore_index=True)
    )
    table = kernel[["method_name", "accuracy", "macro_f1", "train_accuracy"]].rename(
        columns={
            "accuracy": "kernel_accuracy",
            "macro_f1": "kernel_macro_f1",
            "train_accuracy": "kernel_train_accuracy",
        }
    )
    table = table.merge(
        tuned[["method_name", "test_accuracy", "test_macro_f1", "trainable_parameters"]], on="method_name"
    ).rename(columns={"test_accuracy": "finetuned_accuracy", "test_macro_f1": "finetuned_macro_f1"})
    table["gap"] = (table["kernel_accuracy"] - table["finetuned_accuracy"]).abs()
    return table


def figures(store: Store, fig_dir: Path) -> list[Path]:
    config = store.config
    assert isinstance(config, Config)
    table = comparison(store, config).set_index("method_name").reindex(list(config.methods))
    with style():
        fig, ax = new_figure("column", aspect=0.75)
        x = np.arange(len(table))
        colors = [method_color(m) for m in table.index]
        ax.bar(
            x - 0.2,
            table["kernel_accuracy"],
            0.4,
            color=colors,
            alpha=0.45,
            label="kernel regression (init NTK)",
        )
        ax.bar(x + 0.2, table["finetuned_accuracy"], 0.4, color=colors, label="fine-tuned")
        ax.set_xticks(x, table.index, rotation=30, ha="right")
        ax.set(
            ylabel="test accuracy",
            ylim=(0, 1),
            title=f"{config.shots} shots per class, {config.n_test} test examples",
        )
        ax.axhline(1 / 2, color="grey", lw=0.7, ls=":")
        ax.legend(fontsize="x-small")
        return save_figure(fig, fig_dir, "e6_kernel_vs_finetuned")


def verdicts(store: Store, config: Config) -> list[Verdict]:
    table = comparison(store, config).set_index("method_name")
    gap = float(table.loc["propulsion", "gap"]) if "propulsion" in table.index else math.nan
    tuned = float(table.loc["propulsion", "finetuned_accuracy"]) if "propulsion" in table.index else math.nan
    learned = tuned >= config.support_min_accuracy
    if not learned:
        gap = math.nan  # two near-chance predictors agreeing says nothing about kernel behaviour
    others = ", ".join(f"{m} {table.loc[m, 'gap']:.3f}" for m in table.index if m != "propulsion")
    return [
        make_verdict(
            claim="kernel_regime",
            statement="Propulsion fine-tuning behaves like kernel regression with its initial NTK",
            measurement=(
                f"|kernel-regression accuracy - fine-tuned accuracy| of Propulsion (k=5), {config.shots} "
                f"shots per class, {config.n_test} test examples, {config.model} on {config.dataset}; "
                f"other methods: {others}; Propulsion's fine-tuned accuracy {tuned:.3f} (the gap counts "
                f"only if >= {config.support_min_accuracy:g}, else NaN: inconclusive)"
            ),
            value=gap,
            what="accuracy gap",
            support_if=("<=", config.support_max_gap),
            refute_if=(">", config.refute_min_gap),
            figure="e6_kernel_vs_finetuned",
            experiment=NAME,
        )
    ]
