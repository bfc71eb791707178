"""The structured engine's tile cache when not every tile's features fit: rows in snake order
and the kept tiles save re-captures, without changing a single entry of the kernel."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import ntk._structured as structured
from ntk._memory import StructuredTiles, structured_tiles
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


def test_kept_tiles_and_peak_estimate_follow_the_room():
    """Tiles whose features do not all fit keep as many as half the room holds (at least 2),
    and the peak estimate counts those, one capture's graph, the kernels and the chunks."""
    mib = 2**20
    t = structured_tiles(10 * mib, 4000, 4000, 2, "trace", 4, 1, 6 * 2**30, True, None)
    assert not t.keep_all and t.kept >= 2
    assert t.peak_bytes <= 6 * 2**30
    assert t.peak_bytes >= (t.kept + 1) * t.tile * 10 * mib
    small = structured_tiles(10 * mib, 64, 64, 2, "trace", 4, 1, 6 * 2**30, True, None)
    assert small.keep_all and small.peak_bytes >= (64 + small.tile) * 10 * mib
