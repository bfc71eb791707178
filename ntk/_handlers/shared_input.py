"""``nn.Linear`` layers that read one input (q, k, v of attention): one block for all of them.

When only their summed block is needed (no ``per_layer``, the same parameter sets), layers
``l`` that read the same input ``x`` contribute

    sum_l K_l[a, b] = sum_{t,t'} <x_at, x_bt'> sum_l <g^l_at, g^l_bt'>
                    = sum_{t,t'} <x_at, x_bt'> <[g^1 ... g^L]_at, [g^1 ... g^L]_bt'>,

the block of one Linear layer whose back-signal is the concatenation of theirs along the output
features (the weights stacked as ``[W_1; ...; W_L]``), and likewise for the biases. Ghost then
forms the Gram of inputs and the elementwise product with the token sums once instead of L
times; materialise does the same work on the stacked weight as on its members apart, in one
batched product and one Gram matrix instead of one per member (and on the group's back-signals
as they are, not on column slices of them). With ``auto`` a group takes ghost when its cost
(:func:`~ntk._handlers.linear.linear_costs`, ``d_out = sum_l d_out_l``) is at most that of its
members apart by their cheaper strategies, materialise when every member would take it, and
otherwise each member is computed apart. :class:`LinearHandler` computes every block.

Which layers share an input is found per tile (:meth:`SharedInputHandler.prepare`): the same
input tensors in every call (the same entries in memory), the same broadcast mode, and about
the same tokens with a back-signal (:data:`ROWS`); the group keeps the union of its members'
tokens (a member's zero rows add nothing). The last block of an encoder read at one token has
q live at that token only, k and v everywhere: q stays apart, since its rows would add more
than the shared Gram saves.
When the two tiles of a pair are grouped differently, each layer's block is formed from its
columns of the concatenated back-signal (exact, on the group's rows).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ntk._handlers.base import Calls, Handler, _arg, _grads, _tokens
from ntk._handlers.linear import (
    LinearHandler,
    _LinearFeatures,
    _pack,
    linear_costs,
    live_tokens,
)

__all__ = ["SharedInputHandler"]

_LINEAR = LinearHandler()
ROWS = 1.1
"""A layer joins a group when the group's tokens with a back-signal (the union over its
members) are at most this many times those of the member with the fewest."""


@dataclass
class _Groups:
    """A tile's features: per group of members that share an input, the packed features of
    their concatenated back-signals, and each member's columns in it."""

    groups: list[tuple[tuple[int, ...], _LinearFeatures]]
    columns: dict[int, tuple[int, slice]]  # member -> (its group, its output features)


class SharedInputHandler(Handler):
    """The summed weight (and bias) blocks of several ``nn.Linear`` layers, fused where they
    read the same input (see the module docstring).

    Args:
        members: the layers, in order.
        names: the local parameter names selected in every member (``("weight",)`` or
            ``("weight", "bias")``); the assignment's local names are ``"i.name"``.
    """

    def __init__(self, members: Sequence[nn.Linear], names: tuple[str, ...]):
        self.members = tuple(members)
        self.names = names

    def covers(self, module):
        return tuple(f"{i}.{n}" for i in range(len(self.members)) for n in self.names)

    def hooks(self, module):
        return [(m, True) for m in self.members]

    def prepare(self, module, calls: Calls, n, names, dtype):
        found = []
        for i, m in enumerate(self.members):
            own = calls.get(m, [])
            if own:
                g = _grads(own, n, m.out_features, dtype, m)
                found.append(_Member(
                    i, tuple((_where(_arg(c, "input")), c.mode) for c in own),
                    [_tokens(_arg(c, "input"), n, m.in_features, "input", m, c.mode).to(dtype)
                     for c in own], g, live_tokens(g)))
        if not found:
            return None
        groups, columns = [], {}
        for k, group in enumerate(_group(found)):
            x = group[0].xs[0] if len(group[0].xs) == 1 else torch.cat(group[0].xs, dim=1)
            start = 0
            for member in group:
                columns[member.index] = (k, slice(start, start + member.g.shape[-1]))
                start += member.g.shape[-1]
            g = group[0].g if len(group) == 1 else torch.cat(  # (C, n, T, sum d_out) as a
                [u.g.permute(1, 2, 0, 3) for u in group], -1).permute(2, 0, 1, 3)  # view: one copy
            live = group[0].live
            for u in group[1:]:
                live = live | u.live
            groups.append((tuple(u.index for u in group), _pack(x, g, live)))
        return _Groups(groups, columns)

    def blocks(self, module, f1, f2, names, layout, strategy):
        same = f1 is f2
        pairs: list[tuple[_LinearFeatures, _LinearFeatures, str]] = []
        if [m for m, _ in f1.groups] == [m for m, _ in f2.groups]:
            for (members, p1), (_, p2) in zip(f1.groups, f2.groups, strict=True):
                widths = [f1.columns[i][1].stop - f1.columns[i][1].start for i in members]
                how = strategy if strategy != "auto" or len(members) == 1 else _group_strategy(
                    p1, p2, widths, layout, same)
                if how is None:
                    pairs += _apart(f1, f2, members, strategy)
                else:
                    pairs.append((p1, p2, how))
        else:  # grouped differently: each member from its columns of its group
            pairs = _apart(f1, f2, sorted(set(f1.columns) & set(f2.columns)), strategy)
        parts = [blk for p1, p2, how in pairs
                 for blk in _LINEAR.blocks(module, p1, p2, self.names, layout, how).values()]
        if not parts:
            return {}
        total = parts[0].clone()
        for part in parts[1:]:
            total += part
        return {names[0]: total}


def _apart(f1: _Groups, f2: _Groups, members: Sequence[int], strategy: str
           ) -> list[tuple[_LinearFeatures, _LinearFeatures, str]]:
    """Each member's features in both tiles (one object when the tiles are the same)."""
    out = []
    for i in members:
        p1 = _columns(f1, i)
        out.append((p1, p1 if f1 is f2 else _columns(f2, i), strategy))
    return out


def _group_strategy(f1: _LinearFeatures, f2: _LinearFeatures, widths: list[int], layout: str,
                    same: bool) -> str | None:
    """``auto`` for a group (:func:`~ntk._handlers.linear.linear_costs`, on the group's rows):
    ``"ghost"`` when ghost on the group costs at most the members apart, each by its cheaper
    strategy; ``"materialise"`` when every member apart would take it (materialise on the
    stacked weight is their sum, one product in place of one per member); None: apart."""
    c, d_in = f1.g.shape[1], f1.x.shape[1]

    def costs(d_out: int) -> dict[str, float]:
        return linear_costs(f1.n, f2.n, f1.t, f2.t, d_in, d_out, c, layout, same,
                            rows=(f1.x.shape[0], f2.x.shape[0]))

    apart = [costs(w) for w in widths]
    if costs(sum(widths))["ghost"] <= sum(min(k.values()) for k in apart):
        return "ghost"
    if all(k["materialise"] < k["ghost"] for k in apart):
        return "materialise"
    return None


@dataclass
class _Member:
    """One member's capture in a tile: where its inputs are, its tokens (n, T, d_in) per call,
    back-signals (C, n, T, d_out) and which tokens have one (n, T)."""

    index: int
    key: tuple
    xs: list[torch.Tensor]
    g: torch.Tensor
    live: torch.Tensor


def _group(found: list[_Member]) -> list[list[_Member]]:
    """Members with the same inputs whose union of live tokens stays within :data:`ROWS`
    times the fewest of any of them, greedily in order."""
    groups: list[tuple[list[_Member], torch.Tensor, int]] = []  # members, union, fewest
    for member in found:
        count = int(member.live.sum())
        for k, (members, union, fewest) in enumerate(groups):
            if members[0].key != member.key:
                continue
            joined, least = union | member.live, min(fewest, count)
            if int(joined.sum()) <= ROWS * least:
                groups[k] = ([*members, member], joined, least)
                break
        else:
            groups.append(([member], member.live, count))
    return [members for members, _, _ in groups]


def _where(t: torch.Tensor) -> tuple:
    """Where a tensor's entries are: the same for views of one tensor with the same layout
    (the engine's captures hold detached views, so the objects differ), and the entries of
    a recorded input are not changed later (the engine checks or copies them)."""
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(),
            t.dtype, t.device)


def _columns(f: _Groups, member: int) -> _LinearFeatures:
    """One member's features: its group's rows and inputs, its own back-signal columns."""
    k, cols = f.columns[member]
    p = f.groups[k][1]
    return _LinearFeatures(p.x, p.g[..., cols], p.seg, p.pos, p.n, p.t)
