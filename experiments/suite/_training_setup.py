"""The training setup every fine-tuning experiment declares (e3-e6, e9, the learning-rate tuning).

* :class:`TrainingExperimentConfig` - model, steps, batch size, tokens per text, evaluation
  cadence and the evaluated seeds (e6, which draws few-shot sets of its own, subclasses it).
* :class:`DataSetTrainingConfig` - adds one data set and how much of its own splits a run reads
  (e3, e4, e9 and :class:`~experiments.suite._tuning.TuningSetup`).
* :data:`TINY_SETUP` - the sizes of the ``tiny`` presets: a smoke test in seconds.

A field's name and default are part of every config hash
(:meth:`~experiments.suite.base.ExperimentConfig.config_hash`): a subclass redeclares a field
only where its default differs, and renaming one orphans the stored results.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from experiments.suite.base import ExperimentConfig

__all__ = ["TrainingExperimentConfig", "DataSetTrainingConfig", "TINY_SETUP"]


@dataclass(frozen=True)
class TrainingExperimentConfig(ExperimentConfig):
    """What every fine-tuning run of an experiment shares (read by
    :func:`~experiments.suite._training.train_config`)."""

    model: str = field(default="minilm", metadata={"help": "model short name"})
    steps: int = field(default=120, metadata={"help": "optimiser steps per run"})
    batch_size: int = field(default=16, metadata={"help": "examples per step"})
    max_length: int = field(default=32, metadata={"help": "tokens per text at most"})
    eval_every: int = field(default=20, metadata={"help": "validation every n steps"})
    seeds: tuple[int, ...] = field(default=(0, 1, 2), metadata={"help": "evaluation seeds"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.seeds:
            raise ValueError("seeds must not be empty")


@dataclass(frozen=True)
class DataSetTrainingConfig(TrainingExperimentConfig):
    """Fine-tuning on one data set's own splits: its first ``max_examples`` training examples,
    ``eval_examples`` validation examples per evaluation (None: all)."""

    dataset: str = field(default="rotten_tomatoes", metadata={"help": "data set"})
    max_examples: int | None = field(default=4000, metadata={"help": "examples kept from the data set"})
    eval_examples: int | None = field(default=256, metadata={"help": "validation examples per evaluation"})


# The tiny presets' setup: two seeds, 4 steps of 4 examples of 12 tokens, 60 examples, 8 to validate.
TINY_SETUP: dict[str, Any] = {
    "seeds": (0, 1),
    "steps": 4,
    "batch_size": 4,
    "max_length": 12,
    "max_examples": 60,
    "eval_every": 2,
    "eval_examples": 8,
}
