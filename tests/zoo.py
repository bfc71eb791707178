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


# -- awkward architectures (the zoo of tests/test_ntk_zoo.py) ----------------------------------


class InPlaceMLP(nn.Module):
    """Linear -> ReLU(inplace) twice, then a head: the ReLU rewrites each Linear's output."""

    def __init__(self, d_in: int = 5, hidden: int = 6, n_out: int = 3):
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.act1 = nn.ReLU(inplace=True)
        self.fc2 = nn.Linear(hidden, hidden)
        self.act2 = nn.ReLU(inplace=True)
        self.head = nn.Linear(hidden, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.act2(self.fc2(self.act1(self.fc1(x)))))


class ResBlock(nn.Module):
    """torchvision-style basic block: Conv -> BN -> ReLU(inplace) -> Conv -> BN, ``out +=
    identity``, ReLU(inplace), pooled, linear head. Input (N, 2, 4, 4)."""

    def __init__(self, channels: int = 2, n_out: int = 2):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.head = nn.Linear(channels, n_out)
        with torch.no_grad():  # non-trivial running statistics and affine parameters
            for bn in (self.bn1, self.bn2):
                bn.running_mean.uniform_(-0.5, 0.5)
                bn.running_var.uniform_(0.5, 1.5)
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.uniform_(-0.5, 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        out = self.relu(out)
        return self.head(out.mean((2, 3)))


class FunctionalTiedHead(nn.Module):
    """A tied LM head written by hand: ``F.linear(h, self.emb.weight)`` reads the embedding
    weight outside its module. Input ids (N, T); outputs (N, vocab)."""

    def __init__(self, vocab: int = 6, d: int = 4):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.mix = nn.Linear(d, d)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.mix(self.emb(input_ids))).mean(1)
        return nn.functional.linear(h, self.emb.weight)


class ModuleTiedHead(FunctionalTiedHead):
    """Tying at module level: ``head.weight is emb.weight`` (two modules own one tensor)."""

    def __init__(self, vocab: int = 6, d: int = 4):
        super().__init__(vocab, d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.mix(self.emb(input_ids))).mean(1))


class ScaledEmbedding(nn.Embedding):
    """transformers' scaled word embedding (Gemma and others): ``embed_scale * E[ids]``."""

    def __init__(self, vocab: int, d: int, embed_scale: float):
        super().__init__(vocab, d)
        self.embed_scale = embed_scale

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return super().forward(input_ids) * self.embed_scale


class OffsetPositions(nn.Embedding):
    """BART's learned positional embedding: called with the token ids, it looks up the
    positions ``arange(T) + offset`` (not the ids), in float arithmetic before the lookup."""

    offset = 2

    def __init__(self, max_len: int, d: int):
        super().__init__(max_len + self.offset, d)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        t = input_ids.shape[1]
        positions = torch.arange(t, dtype=torch.float64, device=input_ids.device) + self.offset
        return super().forward(positions.long()).expand(input_ids.shape[0], t, -1)


class EmbeddingSubclasses(nn.Module):
    """Token ids through a scaled embedding plus BART-style positions, then a linear head."""

    def __init__(self, vocab: int = 7, d: int = 4, n_out: int = 2):
        super().__init__()
        self.tokens = ScaledEmbedding(vocab, d, embed_scale=d ** 0.5)
        self.positions = OffsetPositions(8, d)
        self.head = nn.Linear(d, n_out)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.tokens(input_ids) + self.positions(input_ids))
        return self.head(h.mean(1))


class MaskedMixer(nn.Module):
    """A module of no known type that takes a (T, T) causal mask besides the batch (N, T, d):
    with N == T the mask looks batched by its shape alone."""

    def __init__(self, d: int):
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(-1.0, 1.0, d * d).reshape(d, d) / d)

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        scores = (h @ self.weight @ h.transpose(1, 2)).masked_fill(~mask, -1e9)
        return torch.softmax(scores, -1) @ h


class WithSquareMask(nn.Module):
    """Linear -> MaskedMixer with a (T, T) mask -> pooled head. Input (N, T, d) with T = 4."""

    def __init__(self, d: int = 3, t: int = 4, n_out: int = 2):
        super().__init__()
        self.fc = nn.Linear(d, d)
        self.mixer = MaskedMixer(d)
        self.head = nn.Linear(d, n_out)
        self.register_buffer("mask", torch.tril(torch.ones(t, t, dtype=torch.bool)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.mixer(torch.tanh(self.fc(x)), self.mask).mean(1))


class MHA(nn.Module):
    """``nn.MultiheadAttention`` (batch_first) reads its in-projection directly."""

    def __init__(self, d: int = 4, n_out: int = 2):
        super().__init__()
        self.attn = nn.MultiheadAttention(d, 2, batch_first=True)
        self.head = nn.Linear(d, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.attn(x, x, x, need_weights=False)[0].mean(1))


class EncoderLayer(nn.Module):
    """``nn.TransformerEncoderLayer(batch_first=True)`` and a linear head."""

    def __init__(self, d: int = 4, n_out: int = 2):
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(d, 2, dim_feedforward=6, dropout=0.0,
                                                batch_first=True)
        self.head = nn.Linear(d, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layer(x).mean(1))


def _sequence_inputs(t: int, d: int) -> Callable[[int, int], torch.Tensor]:
    def make(n: int, seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(3000 + seed)
        return torch.randn(n, t, d, generator=g, dtype=torch.float64)

    return make


def _image_inputs(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(4000 + seed)
    return torch.randn(n, 2, 4, 4, generator=g, dtype=torch.float64)


def _ids(vocab: int, t: int) -> Callable[[int, int], torch.Tensor]:
    def make(n: int, seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(5000 + seed)
        return torch.randint(0, vocab, (n, t), generator=g)

    return make


ZOO: list[Case] = [
    Case("inplace_relu", _seeded(InPlaceMLP), _dense_inputs(5)),
    Case("resnet_block", _seeded(ResBlock), _image_inputs),
    Case("functional_tied_head", _seeded(FunctionalTiedHead), _ids(6, 3)),
    Case("module_tied_head", _seeded(ModuleTiedHead), _ids(6, 3)),
    Case("embedding_subclasses", _seeded(EmbeddingSubclasses), _ids(7, 3)),
    Case("square_mask", _seeded(WithSquareMask), _sequence_inputs(4, 3)),
    Case("multihead_attention", _seeded(MHA), _sequence_inputs(3, 4)),
    Case("encoder_layer", _seeded(EncoderLayer), _sequence_inputs(3, 4)),
]
"""Architectures on which a per-layer engine can go silently wrong (each must give the
reference kernel or a clear error)."""
