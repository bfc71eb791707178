"""Bytes of one training step, by kind, counted exactly - on real, meta or fake tensors.

One step of a method (as :func:`experiments.training.methods.prepare` builds it) holds, at its peak:

=============  ==============================================================================
kind           bytes
=============  ==============================================================================
parameters     every parameter and buffer of the model, frozen or trainable, in its dtype
gradients      one ``p.grad`` per trainable parameter (same size and dtype as ``p``)
optimizer      AdamW: ``exp_avg`` and ``exp_avg_sq`` per trainable parameter (dtype of ``p``)
               plus a float32 ``step`` scalar per tensor; SGD with momentum: one buffer per
               trainable parameter; SGD without momentum: nothing
activations    tensors autograd saves for backward in one forward and the loss, seen through
               :func:`torch.autograd.graph.saved_tensors_hooks`: each storage counted once
               (however many ops save it, whatever view of it they save), storages of the
               model's parameters and buffers left out (they are counted above)
=============  ==============================================================================

``total = parameters + gradients + optimizer + activations``: everything live when backward
starts plus the gradients it will write. The optimizer step adds temporaries of its own (AdamW:
``sqrt(v) / c`` is built out of place - one copy of every trainable parameter at once with
``foreach``, torch's default on CUDA; two copies of the largest trainable tensor, one tensor at
a time, on a CPU), so the accounted peak is
``peak = parameters + gradients + optimizer + max(activations, optimizer_temporary)``.
It is exact for what it counts and leaves out what depends on the allocator and kernels:
transient tensors inside an op or of backward (e.g. the gradient of the attention scores),
allocator rounding and fragmentation, and the CUDA context and library workspaces.
:func:`measure_step` measures the allocator's peak of real steps to check it (CPU: torch's
profiler allocation records; CUDA: ``torch.cuda.max_memory_allocated``).

Paper-sized models are accounted without memory: :func:`build_model` builds them on the
``meta`` device (fp32 or half parameters) or, for mixed precision (fp32 parameters, activations
under ``torch.autocast``), from fake tensors (:class:`torch._subclasses.FakeTensorMode`).

    acc = account_method("roberta-base", "lora", batch_size=16, seq_len=128)
    acc.total / 2**30      # GiB
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "KINDS", "PRECISIONS", "OPTIMIZERS", "METHOD_SPECS",
    "MemoryAccount", "SavedTensors",
    "optimizer_state_bytes", "optimizer_temporary_bytes", "account_step", "build_model",
    "account_method", "account_grid", "measure_step", "check_against_measured", "method_options",
]

KINDS = ("parameters", "gradients", "optimizer", "activations")
PRECISIONS = ("fp32", "bf16-autocast", "fp16-autocast", "bf16", "fp16")  # *-autocast: fp32 weights
OPTIMIZERS = ("adamw", "sgd", "sgd-momentum")
_HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}
# Methods as the fine-tuning experiments build them: (experiments.training.methods name, options).
METHOD_SPECS: dict[str, tuple[str, dict[str, Any]]] = {
    "full": ("full", {}),
    "propulsion": ("propulsion", {"degree": 5}),
    "propulsion_reference": ("propulsion", {"preset": "reference", "degree": 5}),
    "lora": ("lora", {"r": 8}),
    "ia3": ("ia3", {}),
    "bitfit": ("bitfit", {}),
}
_LORA_TARGETS = {"llama": ["q_proj", "v_proj"], "bart": ["q_proj", "v_proj"],
                 "deberta-v2": ["query_proj", "value_proj"]}  # others: query, value


@dataclass(frozen=True)
class MemoryAccount:
    """Bytes of one training step by kind (see the module docstring), and what was counted."""

    parameters: int
    gradients: int
    optimizer: int
    activations: int
    optimizer_temporary: int  # bytes the optimizer step allocates and frees again
    trainable: int  # trainable parameters (elements)
    saved_tensors: int  # tensors handed to the pack hook (before deduplication)
    saved_storages: int  # distinct non-parameter storages behind them

    @property
    def total(self) -> int:
        """Sum of the four kinds."""
        return self.parameters + self.gradients + self.optimizer + self.activations

    @property
    def peak(self) -> int:
        """The larger of the backward phase (all four kinds) and the optimizer step."""
        return self.parameters + self.gradients + self.optimizer + max(self.activations,
                                                                       self.optimizer_temporary)

    def as_dict(self) -> dict[str, int]:
        return {**dataclasses.asdict(self), "total": self.total, "peak": self.peak}


def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata  # the StorageImpl's address: unique while it is alive


def _storage_bytes(t: torch.Tensor) -> int:
    return int(t.untyped_storage().nbytes())


class SavedTensors:
    """Context manager: records every tensor autograd saves for backward inside it.

    Storages are deduplicated (the graph holds them, so an address is never reused while
    recording); storages of ``exclude`` (a model's parameters and buffers) are skipped.

    Example:
        >>> lin = nn.Linear(3, 4)
        >>> x = torch.randn(2, 3, requires_grad=True)
        >>> with SavedTensors(exclude=lin) as saved:
        ...     y = torch.relu(lin(x))
        >>> saved.bytes == (2 * 3 + 2 * 4) * 4   # x (for the weight's gradient) and relu's output
        True
    """

    def __init__(self, exclude: nn.Module | None = None):
        self._skip: set[int] = set()
        if exclude is not None:
            self._skip = {_storage_key(t) for t in (*exclude.parameters(), *exclude.buffers())}
        self._seen: dict[int, int] = {}
        self.tensors = 0
        self._hooks: Any = None

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        self.tensors += 1
        key = _storage_key(t)
        if key not in self._skip and key not in self._seen:
            self._seen[key] = _storage_bytes(t)
        return t

    @property
    def bytes(self) -> int:
        return sum(self._seen.values())

    @property
    def storages(self) -> int:
        return len(self._seen)

    def __enter__(self) -> SavedTensors:
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._hooks.__exit__(*exc)


def optimizer_state_bytes(params: Sequence[torch.Tensor], optimizer: str = "adamw") -> int:
    """Bytes of the optimizer state of ``params`` after its first step (torch's layout).

    AdamW: 2 moments of each parameter's size and dtype + a 4-byte float32 ``step`` per tensor;
    SGD with momentum: one buffer per parameter; SGD: 0.
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
    size = sum(p.numel() * p.element_size() for p in params)
    if optimizer == "adamw":
        return 2 * size + 4 * len(params)
    return size if optimizer == "sgd-momentum" else 0


def optimizer_temporary_bytes(params: Sequence[torch.Tensor], optimizer: str = "adamw",
                              foreach: bool = False) -> int:
    """Bytes the optimizer step builds out of place and frees again (torch's implementations).

    AdamW: ``sqrt(exp_avg_sq) / c`` - with ``foreach`` one tensor per parameter at once (the
    trainable bytes), else per parameter (2 x its largest tensor: the root and the quotient
    live together). SGD updates in place: 0.
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
    if optimizer != "adamw" or not params:
        return 0
    sizes = [p.numel() * p.element_size() for p in params]
    return sum(sizes) if foreach else 2 * max(sizes)


def _parameter_bytes(model: nn.Module) -> int:
    seen: dict[int, int] = {}
    for t in (*model.parameters(), *model.buffers()):
        seen.setdefault(_storage_key(t), _storage_bytes(t))
    return sum(seen.values())


def _forward_loss(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    out = model(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"))
    logits = out.logits if hasattr(out, "logits") else out
    return F.cross_entropy(logits.float(), inputs["labels"])  # as experiments.training.loop does


def _autocast(precision: str, device_type: str) -> contextlib.AbstractContextManager:
    if precision.endswith("-autocast"):
        return torch.autocast(device_type, dtype=_HALF[precision.split("-")[0]])
    return contextlib.nullcontext()


def account_step(model: nn.Module, inputs: dict[str, torch.Tensor], *, optimizer: str = "adamw",
                 precision: str = "fp32", foreach: bool | None = None,
                 loss: Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor] = _forward_loss,
                 ) -> MemoryAccount:
    """Account one training step of ``model`` (prepared, in train mode) on ``inputs``.

    Runs one forward and the loss (no backward, so meta and fake tensors do) under
    :class:`SavedTensors`; gradients and optimizer state are counted from the trainable
    parameters. ``inputs``: ``input_ids`` and (optional) ``attention_mask`` ``(B, T)``,
    ``labels`` ``(B,)``.
    ``precision``: see :data:`PRECISIONS` (``*-autocast`` runs the forward under autocast).
    ``foreach``: whether the optimizer steps all tensors at once (None: as torch chooses for
    the parameters' device, i.e. on CUDA).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model trains no parameter; prepare it with "
                         "experiments.training.methods.prepare")
    device_type = params[0].device.type
    if foreach is None:
        foreach = device_type == "cuda"
    with SavedTensors(exclude=model) as saved, _autocast(precision, device_type):
        value = loss(model, inputs)
    del value  # frees the graph and with it the saved tensors
    return MemoryAccount(
        parameters=_parameter_bytes(model),
        gradients=sum(p.numel() * p.element_size() for p in params),
        optimizer=optimizer_state_bytes(params, optimizer),
        optimizer_temporary=optimizer_temporary_bytes(params, optimizer, foreach),
        activations=saved.bytes, trainable=sum(p.numel() for p in params),
        saved_tensors=saved.tensors, saved_storages=saved.storages)


def method_options(method: str, model_type: str | None) -> tuple[str, dict[str, Any]]:
    """``(experiments.training.methods name, options)`` of a :data:`METHOD_SPECS` key for a model type
    (LoRA's query/value targets are named per architecture; the Propulsion preset resolved)."""
    if method not in METHOD_SPECS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHOD_SPECS)}")
    name, options = METHOD_SPECS[method]
    options = dict(options)
    if options.pop("preset", None) == "reference":
        from propulsion import PropulsionConfig

        options = {"config": PropulsionConfig.reference(options.pop("degree"))}
    if name == "lora":
        options["target_modules"] = _LORA_TARGETS.get(model_type or "", ["query", "value"])
    return name, options


def _hf_config(name: str, num_labels: int, attention: str) -> Any:
    from transformers import AutoConfig

    from propulsion.counting import ARCHITECTURES

    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r}; choose one of {sorted(ARCHITECTURES)}")
    model_type, kwargs = ARCHITECTURES[name]
    config = AutoConfig.for_model(model_type, **kwargs)
    config.num_labels = num_labels
    config._attn_implementation = attention
    if getattr(config, "pad_token_id", None) is None:
        config.pad_token_id = 0
    return config


def build_model(name: str, method: str, *, precision: str = "fp32", num_labels: int = 2,
                attention: str = "eager") -> tuple[nn.Module, Any]:
    """A paper-sized classifier (key of :data:`propulsion.counting.ARCHITECTURES`), prepared as
    ``method`` (a :data:`METHOD_SPECS` key) with its head trained, in train mode, holding no memory.

    Built on the meta device (pure half precisions cast there); for ``*-autocast`` every
    parameter and buffer is then replaced by a fake CPU tensor of a ``FakeTensorMode``, so that
    CPU autocast applies to the forward. Returns ``(model, mode)``
    where ``mode`` is the fake mode to make inputs in (None for meta).
    """
    from transformers import AutoModelForSequenceClassification

    from experiments.training.methods import prepare

    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    config = _hf_config(name, num_labels, attention)
    kind, options = method_options(method, config.model_type)
    with torch.device("meta"):
        model = AutoModelForSequenceClassification.from_config(config)
        model = prepare(model, kind, **options)
    mode: Any = None
    if precision in _HALF:
        model = model.to(_HALF[precision])
    elif precision.endswith("-autocast"):
        from torch._subclasses.fake_tensor import FakeTensorMode

        mode = FakeTensorMode(allow_non_fake_inputs=True)
        _meta_to_fake(model, mode)
    return model.train(), mode


def _meta_to_fake(model: nn.Module, mode: Any) -> None:
    """Replace every meta parameter and buffer by a fake CPU tensor of its shape (ties kept)."""
    made: dict[int, torch.Tensor] = {}

    def fake(t: torch.Tensor) -> torch.Tensor:
        if id(t) not in made:
            with mode:
                new = torch.empty(t.shape, dtype=t.dtype, device="cpu")
            made[id(t)] = nn.Parameter(new, t.requires_grad) if isinstance(t, nn.Parameter) else new
        return made[id(t)]

    for module in model.modules():
        for name, p in module._parameters.items():
            if p is not None:
                module._parameters[name] = fake(p)  # type: ignore[assignment]
        for name, b in module._buffers.items():
            if b is not None:
                module._buffers[name] = fake(b)


def _inputs(batch_size: int, seq_len: int, device: str | torch.device = "cpu",
            vocab: int = 1000, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch_size, seq_len), generator=g)
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
            "labels": torch.zeros(batch_size, dtype=torch.long).to(device)}


def account_method(name: str, method: str, *, batch_size: int, seq_len: int, precision: str = "fp32",
                   optimizer: str = "adamw", attention: str = "eager") -> MemoryAccount:
    """:func:`account_step` of a paper-sized model (see :func:`build_model`) on a full
    ``(batch_size, seq_len)`` batch (no padding), without allocating its memory."""
    row = account_grid(name, method, precision=precision, batch_sizes=(batch_size,), seq_lens=(seq_len,),
                       optimizer=optimizer, attention=attention)[0]
    return MemoryAccount(**{f.name: row[f.name] for f in dataclasses.fields(MemoryAccount)})


def _make_optimizer(params: list[nn.Parameter], optimizer: str) -> torch.optim.Optimizer:
    if optimizer == "adamw":
        return torch.optim.AdamW(params, lr=1e-6)
    return torch.optim.SGD(params, lr=1e-6, momentum=0.9 if optimizer == "sgd-momentum" else 0.0)


@contextlib.contextmanager
def _cpu_peak() -> Iterator[dict[str, int]]:
    """Peak of the bytes allocated (and not yet freed) by torch's CPU allocator inside the block,
    from the profiler's allocation records (0 = the start of the block)."""
    from torch.profiler import ProfilerActivity, profile

    out = {"peak": 0}
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        yield out
    from torch._C._profiler import _EventType  # the allocation records torch's memory profiler reads

    allocations, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        stack.extend(event.children)
        if event.tag == _EventType.Allocation and event.extra_fields.device.type == "cpu":
            allocations.append((event.start_time_ns, event.extra_fields.alloc_size))
    live = peak = 0
    for _, size in sorted(allocations):
        live += size
        peak = max(peak, live)
    out["peak"] = peak


def measure_step(model: nn.Module, inputs: dict[str, torch.Tensor], *, optimizer: str = "adamw",
                 steps: int = 2) -> dict[str, int]:
    """Measured peak bytes of ``steps`` real training steps (forward, backward, optimizer step).

    The model (prepared, on its device) starts with no gradients and no optimizer state.
    Returns ``baseline`` (parameters and buffers, counted from the tensors), ``peak_above``
    (the allocator's peak above the start) and ``peak = baseline + peak_above``. On CUDA the
    peak is ``torch.cuda.max_memory_allocated``; on a CPU, the profiler's memory events.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    device = params[0].device
    opt = _make_optimizer(params, optimizer)
    baseline = _parameter_bytes(model)
    model.train()

    def run() -> None:
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            _forward_loss(model, inputs).backward()
            opt.step()
        opt.zero_grad(set_to_none=True)

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        run()
        torch.cuda.synchronize(device)
        peak_above = torch.cuda.max_memory_allocated(device) - start
    else:
        with _cpu_peak() as result:
            run()
        peak_above = result["peak"]
    return {"baseline": baseline, "peak_above": int(peak_above), "peak": baseline + int(peak_above)}


def account_grid(name: str, method: str, *, precision: str, batch_sizes: tuple[int, ...],
                 seq_lens: tuple[int, ...], optimizer: str = "adamw", attention: str = "eager",
                 ) -> list[dict[str, Any]]:
    """One row per (batch size, sequence length): :meth:`MemoryAccount.as_dict` and the setting.
    The model is built once (see :func:`build_model`) and run on each batch shape; the optimizer
    is accounted as torch runs it on a GPU (``foreach``)."""
    if not batch_sizes or not seq_lens or min(*batch_sizes, *seq_lens) < 1:
        raise ValueError(f"batch_sizes and seq_lens must be non-empty and >= 1, got {batch_sizes}, "
                         f"{seq_lens}")
    model, mode = build_model(name, method, precision=precision, attention=attention)
    rows = []
    for b in batch_sizes:
        for t in seq_lens:
            inputs = _inputs(b, t)
            del inputs["attention_mask"]  # all ones: transformers drops it (and cannot inspect it on meta)
            if mode is None:
                acc = account_step(model, {k: v.to("meta") for k, v in inputs.items()},
                                   optimizer=optimizer, precision=precision, foreach=True)
            else:
                with mode:
                    acc = account_step(model, {k: mode.from_tensor(v) for k, v in inputs.items()},
                                       optimizer=optimizer, precision=precision, foreach=True)
            rows.append({"model": name, "method": method, "precision": precision, "optimizer": optimizer,
                         "attention": attention, "batch_size": b, "seq_len": t, **acc.as_dict()})
    return rows


def check_against_measured(model_name: str, method: str, *, batch_size: int, seq_len: int,
                           optimizer: str = "adamw", device: str = "cpu", steps: int = 2,
                           seed: int = 0) -> dict[str, Any]:
    """Account and measure (:func:`measure_step`) real training steps of an offline model
    (:func:`experiments.data.models.load_model`) prepared as ``method``; one row with both."""
    from experiments.data.models import load_model
    from experiments.training.methods import prepare

    base = load_model(model_name, 2, device=device, seed=seed)
    kind, options = method_options(method, getattr(getattr(base, "config", None), "model_type", None))
    torch.manual_seed(seed)
    model = prepare(base, kind, **options).to(device).train()
    vocab = int(getattr(getattr(base, "config", None), "vocab_size", 1000))
    inputs = _inputs(batch_size, seq_len, device, vocab=min(1000, vocab), seed=seed)
    acc = account_step(model, inputs, optimizer=optimizer)
    measured = measure_step(model, inputs, optimizer=optimizer, steps=steps)
    return {"model": model_name, "method": method, "precision": "fp32", "optimizer": optimizer,
            "device": device, "batch_size": batch_size, "seq_len": seq_len, **acc.as_dict(),
            "measured_peak": measured["peak"], "measured_peak_above": measured["peak_above"],
            "measured_baseline": measured["baseline"],
            "measured_over_accounted": measured["peak"] / acc.peak}
