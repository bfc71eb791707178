"""Tiny models for the case tables: small enough for exact float64 references.

Each builder takes a seed and returns a float64 model in eval mode plus a function making inputs.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


class MLP(nn.Module):
    """x (N, d_in) -> tanh MLP -> (N, C)."""

    def __init__(self, d_in: int = 5, hidden: int = 7, n_out: int = 3, depth: int = 2):
        super().__init__()
        dims = [d_in] + [hidden] * depth
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(dims))
        self.classifier = nn.Linear(dims[-1], n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return self.classifier(x)


class TinyTransformer(nn.Module):
    """One pre-LN transformer block over token ids, masked mean pooling, linear head.

    Inputs: ``input_ids`` (N, T) long, optional ``attention_mask`` (N, T) of 0/1. Output (N, C).
    """

    def __init__(self, vocab: int = 11, d: int = 8, ffn: int = 12, n_out: int = 2, max_len: int = 16):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(max_len, d)
        self.ln1 = nn.LayerNorm(d)
        self.query = nn.Linear(d, d)
        self.key = nn.Linear(d, d)
        self.value = nn.Linear(d, d)
        self.out = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.up = nn.Linear(d, ffn)
        self.down = nn.Linear(ffn, d)
        self.classifier = nn.Linear(d, n_out)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        t = input_ids.shape[1]
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        h = self.embed(input_ids) + self.pos(torch.arange(t, device=input_ids.device))
        a = self.ln1(h)
        q, k, v = self.query(a), self.key(a), self.value(a)
        scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
        keep = attention_mask[:, None, :].to(torch.bool)
        scores = scores.masked_fill(~keep, torch.finfo(scores.dtype).min)
        h = h + self.out(torch.softmax(scores, dim=-1) @ v)
        h = h + self.down(torch.nn.functional.gelu(self.up(self.ln2(h))))
        m = attention_mask.to(h.dtype)[..., None]
        pooled = (h * m).sum(1) / m.sum(1).clamp_min(1.0)
        return self.classifier(pooled)


class CalledTwice(nn.Module):
    """One square Linear applied twice in a forward (weight sharing): all calls must count."""

    def __init__(self, d: int = 4, n_out: int = 3):
        super().__init__()
        self.shared = nn.Linear(d, d)
        self.classifier = nn.Linear(d, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.tanh(self.shared(torch.tanh(self.shared(x)))))


class Swish(nn.Module):
    """A module type no handler knows: a learnable per-feature swish ``x * sigmoid(beta * x)``."""

    def __init__(self, d: int):
        super().__init__()
        self.beta = nn.Parameter(torch.linspace(0.5, 1.5, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.beta * x)


class WithUnknownModule(nn.Module):
    """Linear -> Swish (unknown type with its own parameter) -> Linear."""

    def __init__(self, d_in: int = 5, hidden: int = 6, n_out: int = 2):
        super().__init__()
        self.fc = nn.Linear(d_in, hidden)
        self.act = Swish(hidden)
        self.classifier = nn.Linear(hidden, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.act(self.fc(x)))


@dataclass(frozen=True)
class Case:
    """A row of a case table: a model builder and an input builder, with a readable id."""

    id: str
    build: Callable[[int], nn.Module]
    inputs: Callable[[int, int], Any]  # (n, seed) -> tensor or dict of tensors


def _dense_inputs(d_in: int) -> Callable[[int, int], torch.Tensor]:
    def make(n: int, seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(1000 + seed)
        return torch.randn(n, d_in, generator=g, dtype=torch.float64)

    return make


def _token_inputs(vocab: int = 11, t: int = 5, padded: bool = True) -> Callable[[int, int], dict]:
    def make(n: int, seed: int) -> dict:
        g = torch.Generator().manual_seed(2000 + seed)
        ids = torch.randint(0, vocab, (n, t), generator=g)
        mask = torch.ones(n, t, dtype=torch.long)
        if padded:
            for i in range(n):  # right padding of varying length, never a fully empty row
                keep = 1 + (i * 2) % t
                mask[i, keep:] = 0
                ids[i, keep:] = 0
        return {"input_ids": ids, "attention_mask": mask}

    return make


def _seeded(factory: Callable[[], nn.Module]) -> Callable[[int], nn.Module]:
    def build(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return factory().double().eval()

    return build


CASES: list[Case] = [
    Case("mlp", _seeded(MLP), _dense_inputs(5)),
    Case("transformer", _seeded(TinyTransformer), _token_inputs()),
    Case("called_twice", _seeded(CalledTwice), _dense_inputs(4)),
    Case("unknown_module", _seeded(WithUnknownModule), _dense_inputs(5)),
]
CASE_IDS = [c.id for c in CASES]
