"""One entry point that makes a model trainable under a fine-tuning method, by name.

    full        every parameter
    propulsion  z per wrapped layer (any PropulsionConfig; z only by default)
    lora        peft LoRA (A, B on the targets; default query and value)
    ia3         peft IA3 (peft's defaults for the architecture, or given targets)
    bitfit      every bias
    head        the classification head only (linear probe)

The classification head is handled the same way for every method: ``head="train"`` (default)
trains it in full, ``head="frozen"`` keeps it at its (random) initial values; Propulsion may
still put a z on a frozen head when its targets include it, as the authors' code does.
Every method modifies the model in place and returns it; :func:`parameter_table` reports what
is trained, grouped as head / adapter / bias / other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from propulsion import PropulsionConfig, get_propulsion_model

__all__ = ["HEAD_NAMES", "METHODS", "ParameterGroupCount", "check_options", "find_head", "method_options",
           "parameter_table", "prepare"]

METHODS = ("full", "propulsion", "lora", "ia3", "bitfit", "head")
HEAD_NAMES = ("classifier", "score", "classification_head")  # BERT/RoBERTa, LLaMA, BART
_ADAPTER_MARKERS = ("propulsion_z", "lora_A", "lora_B", "lora_embedding", "ia3_l")


def find_head(model: nn.Module, head_modules: tuple[str, ...] | None = None) -> tuple[str, ...]:
    """Top-level module names of the classification head (given, or found by known names)."""
    children = dict(model.named_children())
    if head_modules is not None:
        missing = [h for h in head_modules if h not in dict(model.named_modules())]
        if missing:
            raise ValueError(f"head_modules {missing} are not modules of {type(model).__name__}")
        return tuple(head_modules)
    found = tuple(name for name in HEAD_NAMES if name in children)
    if not found:
        raise ValueError(
            f"no classification head found among the top-level modules {sorted(children)}; "
            f"pass head_modules=(...) naming it (known names: {HEAD_NAMES})"
        )
    return found


_PEFT_OPTIONS = {"lora": ("r", "lora_alpha", "lora_dropout", "target_modules"),
                 "ia3": ("target_modules", "feedforward_modules")}


def method_options(method: str) -> tuple[str, ...]:
    """The option names ``prepare(model, method, **options)`` accepts (sorted)."""
    if method == "propulsion":
        import dataclasses

        return tuple(sorted(["config", *(f.name for f in dataclasses.fields(PropulsionConfig))]))
    return tuple(sorted(_PEFT_OPTIONS.get(method, ())))


def check_options(method: str, options: dict[str, Any] | tuple[str, ...]) -> None:
    """Raise ValueError naming the options ``method`` does not take, and the ones it does."""
    known = method_options(method)
    unknown = sorted(set(options) - set(known))
    if unknown:
        takes = f"it takes {', '.join(known)}" if known else "it takes none"
        raise ValueError(f"method {method!r} does not take options {unknown}; {takes}")


def _set_trainable(model: nn.Module, prefixes: tuple[str, ...], flag: bool) -> None:
    for name, param in model.named_parameters():
        if any(name == p or name.startswith(p + ".") for p in prefixes):
            param.requires_grad_(flag)


def _propulsion(model: nn.Module, heads: tuple[str, ...], train_head: bool, opts: dict) -> nn.Module:
    config = opts.pop("config", None)
    if config is None:
        config = PropulsionConfig(**opts)
        opts.clear()
    elif not isinstance(config, PropulsionConfig):
        raise TypeError(f"config must be a PropulsionConfig, got {type(config).__name__}")
    if train_head:
        config = config.replace(modules_to_save=tuple(dict.fromkeys((*config.modules_to_save, *heads))))
    return get_propulsion_model(model, config)


def _peft(model: nn.Module, kind: str, heads: tuple[str, ...], opts: dict) -> nn.Module:
    try:
        from peft import IA3Config, LoraConfig, inject_adapter_in_model
    except ImportError as exc:  # pragma: no cover - the hf extra is part of the set-up
        raise ImportError("lora and ia3 need peft: pip install 'propulsion-ntk[hf]'") from exc
    if kind == "lora":
        config = LoraConfig(
            r=opts.pop("r", 8),
            lora_alpha=opts.pop("lora_alpha", 16),
            lora_dropout=opts.pop("lora_dropout", 0.0),
            target_modules=opts.pop("target_modules", ["query", "value"]),
            bias="none",
        )
    else:
        targets = opts.pop("target_modules", None)
        feedforward = opts.pop("feedforward_modules", None)
        if targets is None and getattr(getattr(model, "config", None), "model_type", None) is None:
            raise ValueError("ia3 on a model without a transformers config needs target_modules")
        config = IA3Config(target_modules=targets, feedforward_modules=feedforward)
        if targets is None:
            from peft.utils import (
                TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING as FF,
            )
            from peft.utils import (
                TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING as TARGETS,
            )

            model_type = model.config.model_type  # type: ignore[union-attr]
            if model_type not in TARGETS:
                raise ValueError(f"peft has no IA3 defaults for {model_type!r}; pass target_modules")
            config = IA3Config(target_modules=TARGETS[model_type], feedforward_modules=FF[model_type])
    # Never adapt the head itself: it is trained in full or frozen like for every method.
    config.exclude_modules = list(heads)
    return inject_adapter_in_model(config, model)


def prepare(model: nn.Module, method: str, *, head: str = "train",
            head_modules: tuple[str, ...] | None = None, **options: Any) -> nn.Module:
    """Make ``model`` trainable as ``method`` (in place) and return it.

    Args:
        model: a classifier (a transformers ``...ForSequenceClassification`` or any module with
            a head named in :data:`HEAD_NAMES`, or given by ``head_modules``).
        method: one of :data:`METHODS`.
        head: ``"train"`` (the head is trained in full) or ``"frozen"``.
        head_modules: names of the head's modules when they cannot be found by name.
        **options: per method: propulsion takes ``config=PropulsionConfig(...)`` or its fields
            (``degree=15``, ``target_modules=[...]``, ...); lora takes ``r``, ``lora_alpha``,
            ``lora_dropout``, ``target_modules``; ia3 takes ``target_modules``,
            ``feedforward_modules``. Others take none.

    Raises:
        ValueError: unknown method or head mode, unknown options, no head found.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if head not in ("train", "frozen"):
        raise ValueError(f"head must be 'train' or 'frozen', got {head!r}")
    if method == "head" and head == "frozen":
        raise ValueError("method 'head' with head='frozen' would train nothing")
    check_options(method, options)
    heads = find_head(model, head_modules)
    train_head = head == "train"
    opts = dict(options)
    if method == "propulsion":
        model = _propulsion(model, heads, train_head, opts)
    elif method in ("lora", "ia3"):
        model = _peft(model, method, heads, opts)
    if opts:
        raise ValueError(f"method {method!r} does not take options {sorted(opts)}")
    if method == "full":
        for param in model.parameters():
            param.requires_grad_(True)
    elif method in ("bitfit", "head"):
        for name, param in model.named_parameters():
            param.requires_grad_(method == "bitfit" and name.rsplit(".", 1)[-1] == "bias")
    if method != "propulsion":  # propulsion already put the head in modules_to_save
        _set_trainable(model, heads, train_head)
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(f"method {method!r} with head={head!r} trains no parameter of this model")
    return model


@dataclass(frozen=True)
class ParameterGroupCount:
    group: str  # head, adapter, bias, other
    trainable: int
    total: int


def parameter_table(
    model: nn.Module, head_modules: tuple[str, ...] | None = None
) -> list[ParameterGroupCount]:
    """Trainable and total parameters per group, plus an ``all`` row.

    Groups: ``head`` (the classification head), ``adapter`` (z, LoRA A/B, IA3 vectors),
    ``bias`` (other biases), ``other`` (every other weight).
    """
    try:
        heads = find_head(model, head_modules)
    except ValueError:
        heads = ()
    counts: dict[str, list[int]] = {g: [0, 0] for g in ("head", "adapter", "bias", "other")}
    for name, param in model.named_parameters():
        if any(name.startswith(h + ".") for h in heads):
            group = "head"
        elif any(m in name for m in _ADAPTER_MARKERS):
            group = "adapter"
        elif name.rsplit(".", 1)[-1] == "bias":
            group = "bias"
        else:
            group = "other"
        counts[group][1] += param.numel()
        if param.requires_grad:
            counts[group][0] += param.numel()
    rows = [ParameterGroupCount(g, t, n) for g, (t, n) in counts.items() if n]
    rows.append(ParameterGroupCount("all", sum(r.trainable for r in rows), sum(r.total for r in rows)))
    return rows
