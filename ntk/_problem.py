"""The function whose kernel is taken, and the layouts the kernel comes in.

``KernelProblem`` binds a model, the selected parameters, an ``output_fn`` and the example
mapper into the two functions both methods differentiate:

    f_batch(theta, x)   -> (n, C)     the model on a batch, theta substituted
    f_single(theta, ex) -> (C,)       the model on one example (run as a batch of one)

For ``output="sum_logits"`` both return ``f.sum(-1, keepdim=True)``, so C = 1 and the kernel of
``sum_c f_c`` is the "full" kernel of that one-output function (Mohamadi et al. 2023).

Layouts of a kernel block between ``n1`` and ``n2`` examples (C outputs):

    "full"      (n1, n2, C, C)   K[a, b, c, c'] = <d f_c(x1_a), d f_c'(x2_b)>
    "trace"     (n1, n2)         sum_c K[a, b, c, c]
    "diagonal"  (n1, n2, C)      K[a, b, c, c]
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ntk._inputs import InputError, Inputs, Mapper, call_model, take

__all__ = [
    "check_request",
    "probe_forward",
    "LAYOUTS",
    "OUTPUTS",
    "KernelOutputError",
    "KernelProblem",
    "check_output",
    "default_output_fn",
    "layout_of",
    "transpose_block",
]

OUTPUTS = ("full", "trace", "diagonal", "sum_logits")
LAYOUTS = ("full", "trace", "diagonal")


class KernelOutputError(ValueError):
    """The model's output cannot give the requested kernel: not (N, C), or not finite."""


def default_output_fn(out: Any) -> torch.Tensor:
    """``out.logits`` when the output has it (transformers), else the output itself."""
    logits = getattr(out, "logits", None)
    return logits if isinstance(logits, torch.Tensor) else out


def layout_of(output: str) -> str:
    """The block layout computed for an output reduction (``sum_logits`` is ``full`` with C=1)."""
    return "full" if output == "sum_logits" else output


def check_request(output: str, dtype: Any, batch_size: Any, memory_budget: Any) -> None:
    """Refuse a malformed request with a sentence saying what was wrong.

    Raises:
        ValueError: unknown ``output``; ``dtype`` not a floating torch dtype; ``batch_size``
            not a positive integer or None; ``memory_budget`` not a finite positive number of
            bytes or None.
    """
    if output not in OUTPUTS:
        raise ValueError(f"unknown output reduction {output!r}; use one of {list(OUTPUTS)}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating torch.dtype such as torch.float64, got "
                         f"{dtype!r}")
    if batch_size is not None and (isinstance(batch_size, bool)
                                   or not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be a positive integer (examples per tile) or None, "
                         f"got {batch_size!r}")
    if memory_budget is not None and (
            isinstance(memory_budget, bool) or not isinstance(memory_budget, (int, float))
            or not math.isfinite(memory_budget) or memory_budget <= 0):
        raise ValueError(f"memory_budget must be a finite positive number of bytes (e.g. 8e9) "
                         f"or None for a share of the free memory, got {memory_budget!r}")


def probe_forward(model: nn.Module, x: Inputs, which: str) -> None:
    """Run the model (eval mode, no grad) on the first example of ``x``; turn a failure into
    an :class:`~ntk._inputs.InputError` that says what to check."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            call_model(model, {}, take(x, 0, 1))
    except (RuntimeError, TypeError, ValueError, IndexError) as exc:
        first = next(model.parameters(), None)
        expects = "" if first is None else f" (its parameters are {first.dtype})"
        shapes = (tuple(x.shape) if isinstance(x, torch.Tensor)
                  else {k: (tuple(v.shape), v.dtype) for k, v in x.items()})
        raise InputError(
            f"the model cannot run on the first example of {which} ({type(exc).__name__}: "
            f"{str(exc)[:300]}); {which} is {shapes}"
            f"{', ' + str(x.dtype) if isinstance(x, torch.Tensor) else ''}: check that the "
            f"inputs have the feature size and dtype the model expects{expects} and carry "
            "the batch on dimension 0"
        ) from exc
    finally:
        for m, training in modes:
            m.training = training


def transpose_block(block: torch.Tensor, layout: str) -> torch.Tensor:
    """K(x2, x1) from K(x1, x2): swap the example axes (and the output axes of ``full``)."""
    if layout == "full":
        return block.permute(1, 0, 3, 2)
    if layout == "diagonal":
        return block.permute(1, 0, 2)
    return block.transpose(0, 1)


@dataclass(frozen=True)
class KernelProblem:
    """What to differentiate: ``output_fn(model(x))`` with respect to ``params``.

    Attributes:
        model: the module (its other parameters and buffers are read live by functional_call).
        params: selected parameters ``{name: tensor}`` (detached views of the live ones).
        output_fn: maps the model's output to a (n, C) tensor.
        sum_logits: reduce the C outputs to their sum (C becomes 1).
        mapper: how per-example functions are mapped over a batch.
    """

    model: nn.Module
    params: Mapping[str, torch.Tensor]
    output_fn: Callable[[Any], torch.Tensor]
    sum_logits: bool
    mapper: Mapper

    @property
    def names(self) -> list[str]:
        return list(self.params)

    def subset(self, names: list[str]) -> dict[str, torch.Tensor]:
        return {k: self.params[k] for k in names}

    def f_batch(self, theta: Mapping[str, torch.Tensor], x: Inputs) -> torch.Tensor:
        """``output_fn(model(x))`` with ``theta`` substituted; shape (n, C)."""
        out = self.output_fn(call_model(self.model, theta, x))
        n = x.shape[0] if isinstance(x, torch.Tensor) else next(iter(x.values())).shape[0]
        check_output(out, n)
        return out.sum(-1, keepdim=True) if self.sum_logits else out

    def f_single(self, theta: Mapping[str, torch.Tensor], example: Inputs) -> torch.Tensor:
        """The model on one example (given without its batch dimension); shape (C,)."""
        if isinstance(example, torch.Tensor):
            batch: Inputs = example.unsqueeze(0)
        else:
            batch = {k: v.unsqueeze(0) for k, v in example.items()}
        return self.f_batch(theta, batch)[0]


def check_output(out: Any, n: int) -> None:
    """Raise :class:`KernelOutputError` unless ``out`` is a floating tensor of shape (n, C)."""
    if not isinstance(out, torch.Tensor):
        raise KernelOutputError(
            f"the model output (after output_fn) is a {type(out).__name__}, not a tensor; pass "
            "output_fn mapping the model's output to an (N, C) tensor, e.g. "
            "output_fn=lambda out: out[0]"
        )
    if out.ndim != 2 or out.shape[0] != n:
        raise KernelOutputError(
            f"the model output (after output_fn) must have shape (n, C) for a batch of n "
            f"examples; for a batch of {n} it has shape {tuple(out.shape)}. Pass output_fn to "
            "select or reshape it, e.g. "
            "output_fn=lambda y: y[:, None] for one output per example, or "
            "output_fn=lambda y: y[:, -1, :] for the last token of a sequence"
        )
    if not out.is_floating_point():
        raise KernelOutputError(f"the model output has dtype {out.dtype}; it must be floating")
