"""Which parameters the kernel differentiates: selectors resolved against the live model.

A kernel is always taken with respect to a *set* of parameter tensors ``theta``; which set is
the whole question (all weights for full fine-tuning, the ``z`` vectors for Propulsion, ``A`` and
``B`` for LoRA, biases for BitFit). :func:`select_parameters` turns a selector into an ordered
``{name: tensor}`` dict.

The tensors are the model's own storage (``detach()`` shares memory, copies nothing) and they are
read from ``model.named_parameters()`` at every call. No dict is ever cached between calls: a
copy taken before training and reused after it would silently give the kernel of the initial
weights (the stale-parameter trap; see the theory page of the docs, docs/theory.md).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Sequence

import torch
from torch import nn

__all__ = [
    "SELECTORS",
    "ParameterSelectionError",
    "ParamSelector",
    "select_parameters",
]

ParamSelector = str | Sequence[str] | Callable[[str, nn.Parameter], bool]


class ParameterSelectionError(ValueError):
    """A parameter selector is unknown, names parameters the model lacks, or selects nothing."""


def _is_lora(name: str, _: nn.Parameter) -> bool:
    # peft: lora_A / lora_B for Linear and Conv layers, lora_embedding_A / _B for embeddings.
    return any(key in name for key in ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B"))


def _is_bias(name: str, _: nn.Parameter) -> bool:
    return name == "bias" or name.endswith(".bias")


SELECTORS: dict[str, Callable[[str, nn.Parameter], bool]] = {
    "all": lambda name, p: True,
    "trainable": lambda name, p: p.requires_grad,
    "propulsion": lambda name, p: "propulsion_z" in name,
    "lora": _is_lora,
    "bias": _is_bias,
}
"""Named selectors: name -> predicate on ``(parameter name, parameter)``."""


def _describe(params: ParamSelector) -> str:
    if isinstance(params, str):
        return repr(params)
    if callable(params):
        return f"predicate {getattr(params, '__name__', repr(params))}"
    return f"list of {len(params)} names"


def _by_names(named: dict[str, nn.Parameter], names: Sequence[str]) -> list[str]:
    unknown = [n for n in names if n not in named]
    if unknown:
        lines = []
        for n in unknown:
            close = difflib.get_close_matches(n, list(named), n=3, cutoff=0.5)
            hint = f" (did you mean {', '.join(map(repr, close))}?)" if close else ""
            lines.append(f"{n!r}{hint}")
        raise ParameterSelectionError(
            f"the model has no parameter named {'; '.join(lines)}; "
            f"it has {len(named)} parameters, e.g. {list(named)[:3]}"
        )
    duplicates = sorted({n for n in names if list(names).count(n) > 1})
    if duplicates:
        raise ParameterSelectionError(f"parameter names listed more than once: {duplicates}")
    wanted = set(names)
    return [n for n in named if n in wanted]  # the model's order, not the list's


def select_parameters(model: nn.Module, params: ParamSelector = "trainable") -> dict[str, torch.Tensor]:
    """Resolve a selector against the model as it is now.

    Args:
        model: any module. Tied parameters appear once, under their first name
            (``named_parameters()`` order), as ``torch.func.functional_call`` expects.
        params: one of

            - ``"all"``: every parameter;
            - ``"trainable"``: those with ``requires_grad``;
            - ``"propulsion"``: names containing ``propulsion_z``;
            - ``"lora"``: names containing ``lora_A``, ``lora_B`` (and peft's embedding variants
              ``lora_embedding_A`` / ``lora_embedding_B``);
            - ``"bias"``: names equal to ``bias`` or ending in ``.bias``;
            - a list of exact parameter names;
            - a predicate ``(name, parameter) -> bool``.

    Returns:
        ``{name: tensor}`` in the model's parameter order; each tensor is ``parameter.detach()``,
        sharing storage with the live parameter.

    Raises:
        ParameterSelectionError: unknown selector string, unknown names (with close matches),
            a name listed twice, or a selection that is empty.
    """
    named = dict(model.named_parameters())
    if isinstance(params, str):
        if params not in SELECTORS:
            raise ParameterSelectionError(
                f"unknown parameter selector {params!r}; use one of {sorted(SELECTORS)}, "
                "a list of parameter names, or a predicate (name, parameter) -> bool"
            )
        predicate = SELECTORS[params]
        chosen = [n for n, p in named.items() if predicate(n, p)]
    elif callable(params):
        chosen = [n for n, p in named.items() if params(n, p)]
    elif isinstance(params, Sequence) and all(isinstance(n, str) for n in params):
        chosen = _by_names(named, params)
    else:
        raise ParameterSelectionError(
            f"params must be a selector string, a list of names or a predicate, got {params!r}"
        )
    if not chosen:
        raise ParameterSelectionError(
            f"parameter selector {_describe(params)} selects nothing in {type(model).__name__} "
            f"({len(named)} parameters, {sum(p.requires_grad for p in named.values())} with "
            "requires_grad); pick another selector, e.g. params='all'"
        )
    return {n: named[n].detach() for n in chosen}
