"""The structured engine's tile cache when not every tile's features fit: blocks of row tiles
stay while the column tiles pass by, saving re-captures without changing a single entry."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import ntk._structured as structured
from ntk._memory import StructuredTiles, block_pairs, structured_tiles, tile_pairs
from ntk.reference import reference_ntk


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()


@pytest.mark.parametrize("symmetric", [True, False])
def test_kept_tiles_give_the_same_kernel_with_fewer_captures(monkeypatch, symmetric):
    model, x1, x2 = _model(), torch.randn(11, 5, dtype=torch.float64), torch.randn(9, 5, dtype=torch.float64)
    second = None if symmetric else x2
    captures, kernels = {}, {}
    for kept in (2, 4):
        monkeypatch.setattr(structured, "structured_tiles",
                            lambda *a, kept=kept, **k: StructuredTiles(2, False, 0.0, kept))
        out, timings = structured.structured_kernels(model, x1, second, {"k": "all"}, output="full")
        captures[kept], kernels[kept] = timings.captures, out["k"]
    want = reference_ntk(model, x1, second, output="full")
    for kept in (2, 4):
        torch.testing.assert_close(kernels[kept], want, rtol=1e-10, atol=1e-12)
    assert torch.equal(kernels[2], kernels[4])  # every block computed once, whatever the order
    assert captures[4] < captures[2]
    # 6 row tiles of 11 examples in blocks of kept - 1: each row tile captured once, and each
    # column tile at most once per block that meets it (at most, as the last one may stay)
    if symmetric:  # blocks of 1 meet 5 + 4 + ... + 0 later tiles; blocks {0, 1, 2}, {3, 4, 5}: 3, 0
        assert 6 + 3 - 1 <= captures[4] <= 6 + 3 and captures[2] <= 6 + 15
    else:  # x2 has 5 tiles, met by each block
        assert captures[4] <= 6 + 2 * 5 and captures[2] <= 6 + 6 * 5


@pytest.mark.parametrize("n1,n2,tile,symmetric,per_block",
                         [(11, 11, 2, True, 1), (11, 11, 2, True, 3), (11, 9, 2, False, 4),
                          (64, 64, 5, True, 7), (7, 7, 7, True, 1), (30, 30, 1, True, 30)])
def test_block_pairs_cover_every_pair_once(n1, n2, tile, symmetric, per_block):
    want = sorted((c, r) for c, rows in tile_pairs(n1, n2, tile, symmetric) for r in rows)
    got = block_pairs(n1, n2, tile, symmetric, per_block)
    assert sorted(got) == want and len(set(got)) == len(got)
    blocks = [r[0] // (tile * per_block) for _, r in got]
    assert blocks == sorted(blocks)  # block after block: a block's rows stay while it runs
    with pytest.raises(ValueError, match="rows_per_block"):
        block_pairs(n1, n2, tile, symmetric, 0)


def test_kept_tiles_and_peak_estimate_follow_the_room():
    """Tiles whose features do not all fit keep as many as the room holds beside one capture's
    graph (at least 2), and the peak estimate counts those, that graph, the kernels and the
    chunks."""
    mib = 2**20
    t = structured_tiles(10 * mib, 4000, 4000, 2, "trace", 4, 1, 6 * 2**30, True, None)
    assert not t.keep_all and t.kept >= 2
    assert t.peak_bytes <= 6 * 2**30
    assert t.peak_bytes >= (t.kept + 1) * t.tile * 10 * mib
    small = structured_tiles(10 * mib, 64, 64, 2, "trace", 4, 1, 6 * 2**30, True, None)
    assert small.keep_all and small.peak_bytes >= (64 + small.tile) * 10 * mib


class _LateSelection(nn.Module):
    """A wide network whose only selected parameter is the first layer's bias: its features are
    tiny, but the capture's graph holds every activation after the first layer's output."""

    def __init__(self, width: int = 512, depth: int = 16) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.first = nn.Linear(6, width)
        self.body = nn.Sequential(*(nn.Sequential(nn.Linear(width, width), nn.Tanh())
                                    for _ in range(depth)))
        self.last = nn.Linear(width, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last(self.body(self.first(x)))


def test_probe_measures_the_graph_and_the_plan_tiles_by_it():
    """The probe counts the tensors a capture saves for its backward (the 16 Tanh outputs,
    16 x 512 x 8 bytes per example, against the first bias's features, its C = 2 back-signals of
    512 entries), and a budget with room for a few examples' graphs gets tiles of a few
    examples, where the features alone would have asked for 32, with the same kernel as the
    reference."""
    from ntk._memory import CHUNK_ELEMENTS
    from ntk._probe_cache import _CACHE

    model, x = _LateSelection().double(), torch.randn(40, 6, dtype=torch.float64)
    params = {"k": lambda name, _: name == "first.bias"}
    budget = CHUNK_ELEMENTS * 8 * 3 + 40 * 40 * 8 * 2 + 2**21  # room: 2 MiB
    out, timings = structured.structured_kernels(model, x, None, params, output="trace",
                                                 memory_budget=budget)
    probe = list(_CACHE[model].values())[-1][1]
    assert probe.graph_per_example >= 16 * 512 * 8 >= 4 * probe.features_per_example
    plan = [structured_tiles(probe.features_per_example, 40, 40, 2, "trace", 8, 1, budget, True,
                             None, graph_pe=graph) for graph in (probe.graph_per_example, None)]
    assert timings.tile == plan[0].tile <= 8 and plan[1].tile >= 32
    want = reference_ntk(model, x, None, params=params["k"], output="trace")
    torch.testing.assert_close(out["k"], want, rtol=1e-10, atol=1e-12)
