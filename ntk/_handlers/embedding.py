"""``nn.Embedding``: blocks from per-(example, token id) sums of back-signals, dense over the
frequent ids and sparse pairs of equal ids for the rest."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ntk._handlers.base import (
    CHUNK_ELEMENTS,
    Handler,
    _arg,
    _dot_examples,
    _grads,
    _tokens,
    _unfold_full,
)

__all__ = ["SPARSE_COST", "EmbeddingHandler"]


@dataclass
class _EmbeddingFeatures:
    example: torch.Tensor  # (U,) example index of each (example, token id) pair
    token: torch.Tensor  # (U,) token id
    rows: torch.Tensor  # (U, C, d): sum of g over the tokens of that id in that example
    n: int  # examples in the tile


class EmbeddingHandler(Handler):
    """``nn.Embedding`` weight: ``K[a, b] = sum_{t,t'} <g_at, g_bt'> [id_at == id_bt']``.

    Tokens equal to ``padding_idx`` get no gradient and are dropped. The back-signals of each
    example are first summed per distinct token id (``U`` pairs). Then, per token id ``v`` used
    by ``n1_v`` examples of one tile and ``n2_v`` of the other: frequent ids
    (``SPARSE_COST n1_v n2_v >= n1 n2``: positions, token types, [CLS], punctuation) get dense
    per-example gradient rows over those ids only and one matrix product; the other ids only
    their pairs of equal ids (cost ``sum_v n1_v n2_v q d``, gathered, chunked). Never a
    (vocab x d) gradient per example. ``max_norm`` and ``scale_grad_by_freq`` change the
    gradient: such embeddings go to the fallback.
    """

    def covers(self, module):
        if module.max_norm is not None or module.scale_grad_by_freq:
            return ()
        return ("weight",)

    def prepare(self, module, calls, n, names, dtype):
        own = calls.get(module, [])
        if not own:
            return None
        ids = torch.cat([_tokens(_arg(c, "input"), n, 0, "input", module, c.mode) for c in own],
                        dim=1)
        g = _grads(own, n, module.embedding_dim, dtype, module)  # (C, n, T, d)
        c = g.shape[0]
        example = torch.arange(n, device=ids.device)[:, None].expand_as(ids).reshape(-1)
        token = ids.reshape(-1).long()
        vectors = g.permute(1, 2, 0, 3).reshape(-1, c, g.shape[-1])
        if module.padding_idx is not None:
            keep = token != module.padding_idx
            example, token, vectors = example[keep], token[keep], vectors[keep]
        key = example * module.num_embeddings + token
        unique, inverse = torch.unique(key, return_inverse=True)
        rows = vectors.new_zeros(unique.shape[0], c, vectors.shape[-1]).index_add_(0, inverse, vectors)
        return _EmbeddingFeatures(unique // module.num_embeddings,
                                  unique % module.num_embeddings, rows, n)

    def blocks(self, module, f1, f2, names, layout, strategy):
        return {"weight": _embedding_block(f1, f2, layout, f1 is f2)}


SPARSE_COST = 8.0
"""Seconds per multiply-add of the gathered equal-id pairs relative to a dense matrix product."""


def _subset(f: _EmbeddingFeatures, keep: torch.Tensor) -> _EmbeddingFeatures:
    return _EmbeddingFeatures(f.example[keep], f.token[keep], f.rows[keep], f.n)


def _embedding_block(f1: _EmbeddingFeatures, f2: _EmbeddingFeatures, layout: str,
                     same: bool) -> torch.Tensor:
    """Frequent ids by a dense product over the used rows, the rest by equal-id pairs."""
    n1, n2 = f1.n, f2.n
    c, d = f1.rows.shape[1:]
    used, inv = torch.unique(torch.cat([f1.token, f2.token]), return_inverse=True)
    i1, i2 = inv[:f1.token.shape[0]], inv[f1.token.shape[0]:]
    k1 = torch.bincount(i1, minlength=used.shape[0]).double()
    k2 = torch.bincount(i2, minlength=used.shape[0]).double()
    dense = SPARSE_COST * k1 * k2 >= n1 * n2
    if not bool(dense.any()):
        return _sparse_equal_ids(f1, f2, layout)
    column = torch.cumsum(dense, 0) - 1  # index among the dense ids
    v = int(dense.sum())

    def rows(f: _EmbeddingFeatures, idx: torch.Tensor) -> torch.Tensor:
        on = dense[idx]
        out = f.rows.new_zeros(f.n, v, c, d)
        out[f.example[on], column[idx[on]]] = f.rows[on]
        return out.permute(0, 2, 1, 3).reshape(f.n, c, v * d)

    w1 = rows(f1, i1)
    w2 = w1 if same else rows(f2, i2)
    block = _dot_examples(w1, w2, layout, same)
    if layout == "full":
        block = _unfold_full(block)
    sparse1, sparse2 = ~dense[i1], ~dense[i2]
    if bool(sparse1.any()) and bool(sparse2.any()):
        block = block + _sparse_equal_ids(_subset(f1, sparse1), _subset(f2, sparse2), layout)
    return block


def _sparse_equal_ids(f1: _EmbeddingFeatures, f2: _EmbeddingFeatures, layout: str) -> torch.Tensor:
    """Sum over pairs (row of f1, row of f2) with equal token ids of ``<rows1, rows2>``."""
    n1, n2 = f1.n, f2.n
    c, d = f1.rows.shape[1:]
    shape = {"full": (c, c), "diagonal": (c,), "trace": ()}[layout]
    out = f1.rows.new_zeros(n1 * n2, *shape)
    order = torch.argsort(f2.token)
    sorted_tok = f2.token[order]
    lo = torch.searchsorted(sorted_tok, f1.token, right=False)
    hi = torch.searchsorted(sorted_tok, f1.token, right=True)
    counts = hi - lo
    total = int(counts.sum())
    if total == 0:
        return out.view(n1, n2, *shape)
    i = torch.repeat_interleave(torch.arange(f1.token.shape[0], device=counts.device), counts)
    start = torch.repeat_interleave(lo - (torch.cumsum(counts, 0) - counts), counts)
    j = order[start + torch.arange(total, device=counts.device)]
    step = max(1, CHUNK_ELEMENTS // max(1, c * d))
    for s in range(0, total, step):
        ii, jj = i[s:s + step], j[s:s + step]
        r1, r2 = f1.rows[ii], f2.rows[jj]
        if layout == "full":
            vals = torch.einsum("kcd,ked->kce", r1, r2)
        elif layout == "diagonal":
            vals = (r1 * r2).sum(-1)
        else:
            vals = (r1 * r2).sum((-1, -2))
        out.index_add_(0, f1.example[ii] * n2 + f2.example[jj], vals)
    return out.view(n1, n2, *shape)

