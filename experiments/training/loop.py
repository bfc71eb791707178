"""Fine-tune a classifier with any method of :func:`experiments.training.methods.prepare`: one plain loop.

    python -m experiments.training.loop --out runs/prop-k5 --method propulsion --option degree=5 --lr 3e-3
    python -m experiments.training.loop --out runs/full --method full --lr 5e-5 --steps 300
    python -m experiments.training.loop --out runs/lora --method lora --lr 5e-4 --device cuda \\
        --mixed-precision bf16
    python -m experiments.training.loop --out runs/ref --method propulsion --option preset=reference

Each run owns a folder: ``rows.parquet`` (tidy rows, see :mod:`experiments.records`), ``run.json``
(config, hash, provenance, status, summary, the sha256 of ``rows.parquet`` and of
``best.safetensors``, and of its own content), ``checkpoint.pt`` while it runs (removed when it
finishes; it carries its own sha256) and ``best.safetensors`` (the trainable parameters chosen by
validation). Every file is checked against its sha256 when read: a damaged one is refused by
name. Running the same config on the same folder resumes from the last checkpoint, or returns the
stored result of a finished run; another config on that folder is refused, and so is a second
process while one is training there (a lock held until it exits). ``run.json`` status: running,
interrupted (Ctrl-C) or failed (an exception; both resume), finished, stopped_nan (a non-finite
loss or gradient norm stopped it; rows so far kept; returned as is, like a finished run).

The loop: batches in seeded epoch order, forward (autocast on CUDA when asked), cross-entropy,
backward, gradient clipping, optimiser and schedule step; a validation pass at step 0, every
``eval_every`` steps and at the end; the test split once, on the parameters of the best
validation pass (never chosen by test).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import math
import sys
import time
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from experiments.data.encoding import EncodedSplit, EncodedSplits
from experiments.processes import folder_lock
from experiments.records import (
    MemoryProbe,
    accuracy,
    macro_f1,
    provenance,
    read_json,
    read_rows,
    write_bytes,
    write_json,
    write_rows,
)
from experiments.training.callbacks import Callback, TrainState
from experiments.training.checkpoint import (
    CHECKPOINT_NAME,
    load_checkpoint,
    load_trainable_state,
    save_checkpoint,
    trainable_state,
)
from experiments.training.config import TrainConfig

__all__ = ["RunResult", "main", "train"]

TERMINAL = ("finished", "stopped_nan")


@dataclass
class RunResult:
    """What :func:`train` returns (also rebuilt from the folder of a finished run)."""

    status: str  # finished | stopped_nan
    message: str
    out_dir: Path
    config: TrainConfig
    rows: pd.DataFrame = field(repr=False)
    best_step: int | None = None
    best: dict[str, float] | None = None  # the validation metrics of the selected step
    test: dict[str, float] | None = None  # test metrics on the selected parameters
    steps_to_target: int | None = None  # first evaluated step with validation accuracy >= target
    seconds_to_target: float | None = None  # training seconds (evaluations excluded) to that step
    trainable_parameters: int = 0
    model: nn.Module | None = field(default=None, repr=False)  # best parameters loaded; None if stored


# ------------------------------------------------------------------------------------------------
# pieces of the loop
# ------------------------------------------------------------------------------------------------
class EpochSampler:
    """Batches of ``batch_size`` indices in seeded random epoch order; the last partial batch of an
    epoch is dropped. Its state (generator, permutation, position) is checkpointed."""

    def __init__(self, n: int, batch_size: int, seed: int):
        if batch_size > n:
            raise ValueError(f"batch_size {batch_size} is larger than the training split ({n} examples)")
        self.n, self.batch_size = n, batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.order = torch.randperm(n, generator=self.generator)
        self.position = 0

    def next(self) -> torch.Tensor:
        if self.position + self.batch_size > self.n:
            self.order, self.position = torch.randperm(self.n, generator=self.generator), 0
        out = self.order[self.position:self.position + self.batch_size]
        self.position += self.batch_size
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state(), "order": self.order.clone(),
                "position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        self.order, self.position = state["order"].clone(), int(state["position"])


def lr_factor(config: TrainConfig, step: int) -> float:
    """Multiplier of ``lr`` for update ``step`` (0-based): (s+1)/(W+1) during warm-up, then
    constant 1, linear (T-s)/(T-W) or cosine (1 + cos(pi (s-W)/(T-W)))/2."""
    w, t = config.warmup_steps, config.steps
    if step < w:
        return (step + 1) / (w + 1)
    progress = (step - w) / max(t - w, 1)
    if config.schedule == "linear":
        return 1.0 - progress
    if config.schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0


def _logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    logits = out.logits if hasattr(out, "logits") else out
    if not isinstance(logits, torch.Tensor) or logits.ndim != 2:
        raise ValueError("the model must return (n, C) logits (a tensor or an output with .logits)")
    return logits.float()


@torch.no_grad()
def evaluate(model: nn.Module, split: EncodedSplit, indices: torch.Tensor, *, batch_size: int,
             device: torch.device, autocast: Any, num_labels: int) -> dict[str, float]:
    """Mean cross-entropy, accuracy and macro-F1 of ``model`` on ``split[indices]`` (eval mode)."""
    was_training = model.training
    model.eval()
    lengths = split.attention_mask[indices].sum(dim=1)
    indices = indices[torch.argsort(lengths, stable=True)]  # similar lengths share a batch
    loss_sum, predictions, labels = 0.0, [], []
    for chunk in indices.split(batch_size):
        batch = split.batch(chunk, device)
        with autocast():
            logits = _logits(model, batch)
        loss_sum += float(F.cross_entropy(logits, batch["labels"], reduction="sum"))
        predictions.append(logits.argmax(-1).cpu())
        labels.append(batch["labels"].cpu())
    model.train(was_training)
    pred, true = torch.cat(predictions), torch.cat(labels)
    return {"loss": loss_sum / len(true), "accuracy": accuracy(pred, true),
            "macro_f1": macro_f1(pred, true, num_labels), "examples": len(true)}


def _resolve_device(config: TrainConfig) -> torch.device:
    if config.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(config.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {config.device!r} asked for but CUDA is not available; use --device cpu")
    if device.type != "cuda" and config.mixed_precision != "no":
        raise ValueError(f"mixed_precision={config.mixed_precision!r} needs CUDA, but the device is {device}")
    return device


def _load_data(config: TrainConfig) -> EncodedSplits:
    from experiments.data.models import load_tokenizer

    try:
        from experiments.data.datasets import load_dataset
        from experiments.data.encoding import encode_splits
    except ImportError as exc:
        raise ImportError("loading data by name needs experiments.data.datasets.load_dataset and "
                          "experiments.data.encoding.encode_splits; pass data=EncodedSplits(...)") from exc
    splits = load_dataset(config.dataset, seed=config.split_seed, max_examples=config.max_examples)
    return encode_splits(splits, load_tokenizer(config.model), max_length=config.max_length)


def _num_outputs(model: nn.Module, data: EncodedSplits, device: torch.device) -> int:
    """C of the head (one probe forward, eval mode); labels outside [0, C) are refused."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        c = _logits(model, data.train.batch([0], device)).shape[-1]
    model.train(was_training)
    for name in ("train", "validation", "test"):
        labels: torch.Tensor = getattr(data, name).labels
        if len(labels) == 0:
            raise ValueError(f"the {name} split is empty")
        low, high = int(labels.min()), int(labels.max())
        if low < 0 or high >= c:
            raise ValueError(f"{name} labels span [{low}, {high}] but the model's head has {c} outputs "
                             f"(labels must lie in [0, {c - 1}]); build the model with num_labels={high + 1}")
    return int(c)


def _optimizer(config: TrainConfig, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum,
                               weight_decay=config.weight_decay)
    return torch.optim.AdamW(params, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay)


def _better(config: TrainConfig, metrics: dict[str, float], best: dict[str, Any] | None) -> bool:
    if best is None:
        return True
    key = config.select_by
    return metrics[key] < best["metrics"][key] if key == "loss" else metrics[key] > best["metrics"][key]


def _to_target(config: TrainConfig, rows: list[dict[str, Any]]) -> tuple[int | None, float | None]:
    if config.target_accuracy is None:
        return None, None
    for row in rows:
        if row["kind"] == "eval" and row["accuracy"] >= config.target_accuracy:
            return int(row["step"]), float(row["train_seconds"])
    return None, None


def _afresh(out: Path) -> str:
    return f"delete {out} to train that run afresh"


def _stored_result(out: Path, config: TrainConfig, info: dict[str, Any]) -> RunResult:
    summary = info.get("summary", {})
    rows = read_rows(out / "rows.parquet", info.get("rows_sha256"), _afresh(out))
    return RunResult(status=info["status"], message=info.get("message", ""), out_dir=out, config=config,
                     rows=rows, best_step=summary.get("best_step"),
                     best=summary.get("best"), test=summary.get("test"),
                     steps_to_target=summary.get("steps_to_target"),
                     seconds_to_target=summary.get("seconds_to_target"),
                     trainable_parameters=int(info.get("trainable_parameters", 0)))


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


# ------------------------------------------------------------------------------------------------
# the loop
# ------------------------------------------------------------------------------------------------
def train(config: TrainConfig, out_dir: str | Path, *, model: nn.Module | None = None,
          data: EncodedSplits | None = None, callbacks: Sequence[Callback] = (),
          progress: bool = True) -> RunResult:
    """Train as ``config`` says, recording into ``out_dir``; resume or return a stored result.

    Args:
        config: the run.
        out_dir: the run's folder (created). Holding a checkpoint of the same config: resume from
            it; holding a finished (or NaN-stopped) run of the same config: return its result.
        model: an unprepared classifier to use instead of ``load_model(config.model)`` (tests:
            tiny generated models). It gets ``prepare(model, config.method, config.head,
            **options)`` like a loaded one; pass a fresh one when resuming.
        data: encoded splits to use instead of loading ``config.dataset`` (tests: hand-made).
        callbacks: hooks, see :mod:`experiments.training.callbacks`; their state is checkpointed.
        progress: a tqdm bar.

    Returns:
        :class:`RunResult`; ``status`` is "finished" or "stopped_nan" (a non-finite loss or
        gradient norm: the run stopped there, rows so far kept, ``message`` says what happened).

    Raises:
        ValueError: ``out_dir`` holds a run of another config or data; labels outside the head's
            range; a batch larger than the training split; CUDA or mixed precision unavailable;
            ``out_dir`` cannot be written.
        experiments.records.DamagedFileError: ``run.json``, ``rows.parquet`` or the checkpoint
            does not match its sha256 (the message names the file).
        experiments.processes.FolderLockedError: another process is training into ``out_dir``.
    """
    out = Path(out_dir)
    with folder_lock(out):
        return _train(config, out, model=model, data=data, callbacks=callbacks, progress=progress)


def _train(config: TrainConfig, out: Path, *, model: nn.Module | None, data: EncodedSplits | None,
           callbacks: Sequence[Callback], progress: bool) -> RunResult:
    """:func:`train` once ``out`` is locked for this process: the stored result of a finished run,
    or set up, resume from the checkpoint if there is one, train the remaining steps, finish."""
    stored = _stored_run(config, out)
    if stored is not None and stored.get("status") in TERMINAL:
        return _stored_result(out, config, stored)
    run = _Run.set_up(config, out, stored, model=model, data=data, callbacks=callbacks)
    checkpoint = run.resume(stored)
    run.open_record(stored, resumed=checkpoint is not None)
    run.start(checkpoint)
    run.train_steps(progress)
    return run.finish()


def _stored_run(config: TrainConfig, out: Path) -> dict[str, Any] | None:
    """``out/run.json`` (its checksum verified), None if absent; a run of another config is refused."""
    run_path, chash = out / "run.json", config.config_hash()
    stored = read_json(run_path, remedy=_afresh(out)) if run_path.exists() else None
    if stored is not None and stored.get("config_hash") != chash:
        raise ValueError(f"{out} holds a run of another config (hash {stored.get('config_hash')}, this one "
                         f"{chash}); choose another --out folder or delete {out} to start afresh")
    return stored


def _prepared_model(config: TrainConfig, model: nn.Module | None, num_labels: int,
                    device: torch.device) -> nn.Module:
    """``model`` (default: ``load_model(config.model)``) prepared for ``config.method`` on ``device``
    (seeded from ``config.seed``), every dropout set to ``config.dropout`` when given."""
    if model is None:
        from experiments.data.models import load_model

        model = load_model(config.model, num_labels, device=device, seed=config.seed)
    torch.manual_seed(config.seed)
    from experiments.training.methods import prepare

    model = prepare(model, config.method, head=config.head, **config.prepare_options()).to(device)
    if config.dropout is not None:
        for module in model.modules():
            if isinstance(module, nn.Dropout):
                module.p = config.dropout
    return model


def _eval_index(config: TrainConfig, n_val: int) -> torch.Tensor:
    """The validation examples of every evaluation: all ``n_val``, or ``eval_examples`` of them
    drawn once with seed ``config.seed + 1``, sorted."""
    if config.eval_examples is None or config.eval_examples >= n_val:
        return torch.arange(n_val)
    chooser = torch.Generator().manual_seed(config.seed + 1)
    return torch.randperm(n_val, generator=chooser)[:config.eval_examples].sort().values


def _stopped_by(exc: BaseException, step: int) -> tuple[str, str]:
    """The status and message of ``run.json`` when ``exc`` (Ctrl-C or another) ends a run after ``step``."""
    interrupted = isinstance(exc, KeyboardInterrupt)
    return ("interrupted" if interrupted else "failed",
            f"{'interrupted' if interrupted else f'failed ({type(exc).__name__}: {exc})'} after "
            f"step {step}; run again to resume from the last checkpoint")


@dataclass
class _Run:
    """One training run in its locked folder ``out``; each method is one step of :func:`_train`.

    Fixed by :meth:`set_up`: config, data, device, the prepared model, its trainable ``params``,
    optimiser, schedule, gradient scaler (fp16 only), batch sampler and validation subset. Changed
    as the run goes: ``rows`` (the tidy rows, also the callbacks' sink), ``best``, ``start_step``
    (0, or the checkpoint's step), ``train_seconds``, ``status`` / ``message`` (finished, or
    stopped_nan and why), ``info`` (what ``run.json`` holds) and ``state`` (what callbacks see).
    """

    config: TrainConfig
    out: Path
    data: EncodedSplits
    device: torch.device
    model: nn.Module
    callbacks: Sequence[Callback]
    num_labels: int
    params: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler | None
    sampler: EpochSampler
    eval_index: torch.Tensor
    rows: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] | None = None  # {"step", "metrics", "state"} of the best validation pass
    start_step: int = 0
    train_seconds: float = 0.0  # optimisation steps only, evaluations excluded
    status: str = "finished"
    message: str = ""
    info: dict[str, Any] = field(default_factory=dict)
    state: TrainState = field(init=False)  # set by open_record
    memory: MemoryProbe = field(init=False)  # set by open_record

    @classmethod
    def set_up(cls, config: TrainConfig, out: Path, stored: dict[str, Any] | None, *,
               model: nn.Module | None, data: EncodedSplits | None, callbacks: Sequence[Callback]) -> _Run:
        """Device, data (refused if not the stored run's), prepared model, optimiser, schedule,
        scaler, sampler and validation subset, all seeded from ``config.seed``."""
        device = _resolve_device(config)
        data = data if data is not None else _load_data(config)
        if stored is not None and stored.get("data_fingerprint") not in (None, data.fingerprint):
            raise ValueError(f"{out} holds a run on other data (fingerprint {stored['data_fingerprint']}, "
                             f"this {data.fingerprint}); choose another --out folder or delete {out}")
        model = _prepared_model(config, model, data.num_labels, device)
        num_labels = _num_outputs(model, data, device)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = _optimizer(config, params)
        return cls(config=config, out=out, data=data, device=device, model=model, callbacks=callbacks,
                   num_labels=num_labels, params=params, optimizer=optimizer,
                   scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(config, s)),
                   scaler=torch.amp.GradScaler("cuda") if config.mixed_precision == "fp16" else None,
                   sampler=EpochSampler(len(data.train), config.batch_size, config.seed),
                   eval_index=_eval_index(config, len(data.validation)))

    @property
    def run_path(self) -> Path:
        return self.out / "run.json"

    @property
    def ckpt_path(self) -> Path:
        return self.out / CHECKPOINT_NAME

    def autocast(self) -> AbstractContextManager[Any]:
        """Autocast to ``config.mixed_precision`` on CUDA, else a context that does nothing."""
        amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.config.mixed_precision)
        return torch.autocast("cuda", dtype=amp_dtype) if amp_dtype is not None else nullcontext()

    # ---- set up: resume, record, start
    def resume(self, stored: dict[str, Any] | None) -> dict[str, Any] | None:
        """Load the checkpoint a stored run left (None if none: a fresh start) into the model,
        optimiser, schedule, scaler, sampler and callbacks, and restore rows, best, start_step and
        train_seconds; returns it. Refuses one of other config or data or callbacks."""
        if stored is None or not self.ckpt_path.exists():
            return None
        checkpoint = load_checkpoint(self.ckpt_path)
        self._check_fits(checkpoint)
        load_trainable_state(self.model, checkpoint["model"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.scheduler.load_state_dict(checkpoint["scheduler"])
        if self.scaler is not None:
            self.scaler.load_state_dict(checkpoint["scaler"])
        self.sampler.load_state_dict(checkpoint["sampler"])
        for callback, cb_state in zip(self.callbacks, checkpoint["callbacks"], strict=True):
            callback.load_state_dict(cb_state)
        self.rows, self.best = list(checkpoint["rows"]), checkpoint["best"]
        self.start_step, self.train_seconds = int(checkpoint["step"]), float(checkpoint["train_seconds"])
        return checkpoint

    def _check_fits(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint of another config hash, data fingerprint or number of callbacks."""
        if (checkpoint["config_hash"] != self.config.config_hash()
                or checkpoint["data_fingerprint"] != self.data.fingerprint):
            raise ValueError(f"{self.ckpt_path} was written for another config or data (hash "
                             f"{checkpoint['config_hash']}, data {checkpoint['data_fingerprint']}); "
                             f"delete it or choose another --out")
        if len(checkpoint["callbacks"]) != len(self.callbacks):
            raise ValueError(f"the checkpoint holds {len(checkpoint['callbacks'])} callback states but "
                             f"{len(self.callbacks)} callbacks were given; resume with the same callbacks")

    def open_record(self, stored: dict[str, Any] | None, *, resumed: bool) -> None:
        """Write ``run.json`` (config, hash, sizes, start and resume steps, provenance, status
        running), then attach the callbacks' ``state`` and the memory probe (its baseline in ``info``)."""
        config = self.config
        self.info = {
            "config": config.to_dict(), "config_hash": config.config_hash(), "seed": config.seed,
            "data_fingerprint": self.data.fingerprint, "num_labels": self.num_labels,
            "trainable_parameters": self.trainable_parameters,
            "total_parameters": sum(p.numel() for p in self.model.parameters()),
            "started": stored["started"] if stored else _now(),
            "resumed_at_steps": [*(stored or {}).get("resumed_at_steps", []),
                                 *([self.start_step] if resumed else [])],
            "status": "running", **provenance(self.device),
        }
        write_json(self.info, self.run_path)
        self.state = TrainState(config=config, model=self.model, optimizer=self.optimizer,
                                scheduler=self.scheduler, data=self.data, device=self.device,
                                out_dir=self.out, step=self.start_step, start_step=self.start_step,
                                _sink=self.rows.append)
        self.memory = MemoryProbe(self.device)
        self.memory.reset()
        self.info["baseline_memory_mb"] = self.memory.baseline_mb

    @property
    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.params)

    def start(self, checkpoint: dict[str, Any] | None) -> None:
        """``on_start`` of every callback; on a fresh start the step-0 validation pass and the RNG
        seeded from ``config.seed``, on a resume the RNG as it was right after the checkpointed
        step; then train mode."""
        for callback in self.callbacks:
            callback.on_start(self.state)
        if checkpoint is None:
            self.validate(0)
            torch.manual_seed(self.config.seed)
        else:
            torch.set_rng_state(checkpoint["torch_rng"])
            if self.device.type == "cuda" and checkpoint["cuda_rng"] is not None:
                torch.cuda.set_rng_state(checkpoint["cuda_rng"], self.device)
        self.model.train()

    # ---- the steps
    def train_steps(self, progress: bool) -> None:
        """Steps ``start_step + 1 .. config.steps`` (fewer after a NaN stop) under a tqdm bar. Any
        exception, Ctrl-C included, first records the rows so far and status interrupted or failed
        in ``run.json`` (the next call resumes from the checkpoint), then propagates."""
        bar = tqdm(total=self.config.steps, initial=self.start_step, disable=not progress,
                   desc=self.config.method, leave=False)
        try:
            for step in range(self.start_step + 1, self.config.steps + 1):
                done = self.optimise(step)
                if done is None:
                    break
                self.after_step(step, *done, bar)
        except BaseException as exc:
            self.save_progress(*_stopped_by(exc, self.state.step))
            raise
        finally:
            bar.close()

    def optimise(self, step: int) -> tuple[dict[str, torch.Tensor], float] | None:
        """Update ``step``: next batch, forward, cross-entropy, backward, clipping, optimiser and
        schedule step; appends its train row, sets ``state.step``; returns (batch, loss). A
        non-finite loss or gradient norm instead stops the run (:meth:`_stop_nan`): None."""
        t0 = time.perf_counter()
        batch = self.data.train.batch(self.sampler.next(), self.device)
        with self.autocast():
            loss = F.cross_entropy(_logits(self.model, batch), batch["labels"])
        loss_value = loss.item()
        if not math.isfinite(loss_value):
            self._stop_nan(step, loss_value, f"loss became {loss_value} at step {step}; try a lower lr")
            return None
        grad_norm = self._backward(loss)
        if self.scaler is None and not math.isfinite(grad_norm):
            self._stop_nan(step, loss_value,
                           f"gradient norm became {grad_norm} at step {step}; try a lower lr")
            return None
        lr = self.optimizer.param_groups[0]["lr"]
        self._update()
        seconds = time.perf_counter() - t0
        self.train_seconds += seconds
        self.state.step = step
        self.rows.append({"step": step, "kind": "train", "loss": loss_value, "lr": lr, "grad_norm": grad_norm,
                          "seconds": seconds, "train_seconds": self.train_seconds,
                          "tokens_per_s": float(batch["attention_mask"].sum()) / seconds,
                          "peak_memory_mb": self.memory.peak_mb()})
        return batch, loss_value

    def _backward(self, loss: torch.Tensor) -> float:
        """Gradients of ``loss`` (scaled then unscaled under fp16), clipped to ``clip_norm``; their norm."""
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            loss.backward()
        return float(torch.nn.utils.clip_grad_norm_(self.params, self.config.clip_norm or math.inf))

    def _update(self) -> None:
        """Optimiser step (through the scaler under fp16), schedule step, CUDA synchronised."""
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _stop_nan(self, step: int, loss_value: float, message: str) -> None:
        """Status stopped_nan with ``message``, recorded as a nan row of ``step``."""
        self.status, self.message = "stopped_nan", message
        self.rows.append({"step": step, "kind": "nan", "loss": loss_value, "message": message})

    def after_step(self, step: int, batch: dict[str, torch.Tensor], loss_value: float, bar: Any) -> None:
        """``on_batch_end`` of every callback; the validation pass every ``eval_every`` steps and at
        the last; the checkpoint and ``run.json`` every ``checkpoint_every`` steps before the last."""
        for callback in self.callbacks:
            callback.on_batch_end(self.state, batch, loss_value)
        bar.update(1)
        if step % self.config.eval_every == 0 or step == self.config.steps:
            metrics = self.validate(step)
            bar.set_postfix(loss=f"{loss_value:.3f}", val_acc=f"{metrics['accuracy']:.3f}")
        every = self.config.checkpoint_every
        if every and step % every == 0 and step < self.config.steps:
            self.save_checkpoint(step)
            self.save_progress("running")

    def validate(self, step: int) -> dict[str, float]:
        """Validation pass on ``eval_index`` at ``step``: appends its eval row, keeps the parameters
        in ``best`` if better by ``config.select_by``, calls ``on_evaluate``; returns the metrics."""
        metrics = evaluate(self.model, self.data.validation, self.eval_index,
                           batch_size=self.config.eval_batch_size, device=self.device,
                           autocast=self.autocast, num_labels=self.num_labels)
        self.rows.append({"step": step, "kind": "eval", **metrics, "train_seconds": self.train_seconds})
        if _better(self.config, metrics, self.best):
            self.best = {"step": step, "metrics": metrics, "state": trainable_state(self.model)}
        for callback in self.callbacks:
            callback.on_evaluate(self.state, dict(metrics))
        return metrics

    # ---- records
    def save_checkpoint(self, step: int) -> None:
        """``checkpoint.pt`` after ``step``: everything :meth:`resume` and :meth:`start` read back."""
        save_checkpoint(self.ckpt_path, {
            "config_hash": self.config.config_hash(), "data_fingerprint": self.data.fingerprint, "step": step,
            "train_seconds": self.train_seconds, "model": trainable_state(self.model),
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "sampler": self.sampler.state_dict(), "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
            "rows": self.rows, "best": self.best, "callbacks": [c.state_dict() for c in self.callbacks],
        })

    def save_progress(self, status: str, message: str = "", summary: dict[str, Any] | None = None) -> None:
        """``rows.parquet``, then ``run.json`` vouching for it (its sha256) with ``status``,
        ``message`` and, when given, ``summary``."""
        self.info["rows_sha256"] = write_rows(self.rows, self.out / "rows.parquet")
        self.info.update(status=status, message=message, updated=_now())
        if summary is not None:
            self.info["summary"] = summary
        write_json(self.info, self.run_path)

    # ---- finish
    def finish(self) -> RunResult:
        """``on_end`` of every callback (the last step's parameters still in the model); a finished
        run's test pass (:meth:`test`); ``run.json`` with the summary and ``rows.parquet`` written
        a last time; the checkpoint removed. Returns the result, rows read back from the file."""
        for callback in self.callbacks:
            callback.on_end(self.state)
        test = self.test() if self.status == "finished" else None
        steps_to_target, seconds_to_target = _to_target(self.config, self.rows)
        best_step = int(self.best["step"]) if self.best else None
        best_metrics = {k: float(v) for k, v in self.best["metrics"].items()} if self.best else None
        summary = {"best_step": best_step, "best": best_metrics, "test": test,
                   "steps_to_target": steps_to_target, "seconds_to_target": seconds_to_target,
                   "train_seconds": self.train_seconds}
        self.info["ended"] = _now()
        self.save_progress(self.status, self.message, summary)
        self.ckpt_path.unlink(missing_ok=True)
        rows = read_rows(self.out / "rows.parquet", self.info["rows_sha256"], _afresh(self.out))
        return RunResult(status=self.status, message=self.message, out_dir=self.out, config=self.config,
                         rows=rows, best_step=best_step, best=best_metrics, test=test,
                         steps_to_target=steps_to_target, seconds_to_target=seconds_to_target,
                         trainable_parameters=self.trainable_parameters, model=self.model)

    def test(self) -> dict[str, float]:
        """The test split on the ``best`` parameters (loaded into the model): appends the test row,
        writes ``best.safetensors`` (its sha256 in ``info``) if ``save_best``, sets the finished
        message; returns the test metrics."""
        assert self.best is not None
        best, config = self.best, self.config
        load_trainable_state(self.model, best["state"])
        metrics = evaluate(self.model, self.data.test, torch.arange(len(self.data.test)),
                           batch_size=config.eval_batch_size, device=self.device, autocast=self.autocast,
                           num_labels=self.num_labels)
        test = {k: float(v) for k, v in metrics.items()}
        self.rows.append({"step": best["step"], "kind": "test", **metrics, "selected_by": config.select_by})
        if config.save_best:
            from safetensors.torch import save

            weights = save({k: v.contiguous() for k, v in best["state"].items()})
            self.info["best_sha256"] = write_bytes(self.out / "best.safetensors", weights)
        self.message = (f"finished {config.steps} steps; validation {config.select_by} "
                        f"{best['metrics'][config.select_by]:.4f} at step {best['step']}; test accuracy "
                        f"{test['accuracy']:.4f}")
        return test


# ------------------------------------------------------------------------------------------------
# command line
# ------------------------------------------------------------------------------------------------
def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _optional(convert):
    def parse(text: str):
        return None if text.lower() == "none" else convert(text)

    parse.__name__ = convert.__name__  # argparse names the type in its error messages
    return parse


_ARG_TYPES = {"int": int, "float": float, "str": str, "int | None": _optional(int),
              "float | None": _optional(float)}


def build_parser() -> argparse.ArgumentParser:
    """One flag per :class:`TrainConfig` field (``--eval-every``), plus ``--out`` and ``--option``."""
    parser = argparse.ArgumentParser(prog="python -m experiments.training.loop", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="the run's folder (resumed when it holds this config)")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                        help="a method option (value parsed as JSON when it parses), repeatable")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    for f in dataclasses.fields(TrainConfig):
        flag, help_text = "--" + f.name.replace("_", "-"), f"{f.metadata['help']} (default {f.default})"
        if f.name == "method_options":
            continue
        if f.name == "betas":
            parser.add_argument(flag, type=float, nargs=2, default=f.default, help=help_text)
        elif f.type == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default,
                                help=help_text)
        else:
            parser.add_argument(flag, type=_ARG_TYPES[str(f.type)], default=f.default, help=help_text)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
              if f.name != "method_options"}
    try:
        options = []
        for item in args.option:
            key, sep, value = item.partition("=")
            if not sep:
                raise ValueError(f"--option takes KEY=VALUE, got {item!r}")
            options.append((key, _parse_value(value)))
        config = TrainConfig(**values, method_options=tuple(options))
        result = train(config, args.out, progress=not args.no_progress)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:  # incl. damaged files, a locked folder
        print(f"train: error: {exc}", file=sys.stderr)
        return 2
    print(f"{result.status}: {result.message}")
    print(f"rows: {result.out_dir / 'rows.parquet'}; provenance: {result.out_dir / 'run.json'}")
    if result.steps_to_target is not None:
        print(f"validation accuracy >= {config.target_accuracy} first at step {result.steps_to_target} "
              f"({result.seconds_to_target:.1f} s of training)")
    return 0 if result.status == "finished" else 1


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
