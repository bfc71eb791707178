"""Memory: the budget, a cheap profile of the model, and the tile plan that fits the budget.

Before computing anything, :func:`profile` runs the model once on a probe batch of a few
examples and measures

- ``activation``: bytes autograd saves per example (``saved_tensors_hooks``, parameters and
  buffers excluded), the unit of every working-memory estimate;
- ``flops``: forward flops per example (``torch.utils.flop_counter``; matmuls, convolutions,
  attention), the unit of the cost model.

:func:`plan` then searches example tile sizes (halving from the full batch or ``batch_size``)
and parameter groups (all selected tensors together, then groups capped at halving sizes down
to one tensor per group), estimates the peak of every candidate with the method's
``peak_bytes`` plus the output kernel, and keeps the cheapest candidate (by the method's flop
estimate, plus ``FLOPS_PER_BYTE`` per byte the tile pairs read and a fixed overhead per tile
pair; small tiles turn the contractions into memory-bound skinny products) that fits. If
none fits,
:class:`KernelTooLargeError` states the smallest estimate and the budget.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ntk import _jacobian, _ntk_vp
from ntk._handlers.base import CHUNK_ELEMENTS

__all__ = [
    "CPU_FRACTION",
    "CUDA_FRACTION",
    "FALLBACK_BUDGET",
    "KernelTooLargeError",
    "Plan",
    "Profile",
    "StructuredTiles",
    "block_pairs",
    "default_budget",
    "pair_counts",
    "plan",
    "profile",
    "saved_tensor_bytes",
    "structured_tiles",
    "tile_pairs",
]

GiB = 2**30
CPU_FRACTION = 0.5  # of MemAvailable: the OS, the model and the caller's data share the rest
CUDA_FRACTION = 0.7  # of the free device memory reported by the driver
FALLBACK_BUDGET = 4 * GiB  # when free memory cannot be read
TILE_OVERHEAD_FLOPS = 2e8  # Python and dispatch cost of one tile pair, in flop equivalents
FLOPS_PER_BYTE = 10.0  # machine balance: flop equivalents of one byte of memory traffic


class KernelTooLargeError(MemoryError):
    """Even the smallest tile of the kernel computation does not fit in the memory budget."""


def _cpu_available() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def default_budget(device: torch.device) -> int:
    """A safe share of the free memory on ``device``, in bytes.

    CUDA: ``CUDA_FRACTION`` of ``torch.cuda.mem_get_info``'s free memory. CPU:
    ``CPU_FRACTION`` of ``MemAvailable`` in ``/proc/meminfo``; ``FALLBACK_BUDGET`` (4 GiB) when
    that cannot be read (not Linux).
    """
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(CUDA_FRACTION * free)
    available = _cpu_available()
    return int(CPU_FRACTION * available) if available > 0 else FALLBACK_BUDGET


@dataclass(frozen=True)
class Profile:
    """What the planner knows about the model and the request.

    Attributes:
        numels: entries per selected parameter tensor, in selection order.
        n_out: C, outputs per example (1 for ``sum_logits``).
        activation: autograd-saved bytes per example.
        flops: forward flops per example (at least 1).
        model_bytes: bytes per entry of the model's outputs and gradients.
    """

    numels: dict[str, int]
    n_out: int
    activation: float
    flops: float
    model_bytes: int

    @property
    def n_params(self) -> int:
        return sum(self.numels.values())


def profile(
    forward: Callable[[dict[str, torch.Tensor]], torch.Tensor],
    model: nn.Module,
    params: dict[str, torch.Tensor],
    n_examples: int,
) -> tuple[torch.Tensor, float, float]:
    """Run ``forward`` once on a probe batch; measure saved bytes and flops per example.

    Args:
        forward: ``theta -> (n, C)`` on the probe batch of ``n_examples`` examples.
        model: the model (its parameters and buffers are not counted as activations).
        params: the selected parameters; they are made to require grad for the probe only
            (on fresh detached views; the model's flags are untouched).
        n_examples: size of the probe batch.

    Returns:
        ``(outputs (n, C) detached, activation bytes per example, flops per example)``.
    """
    seen: dict[int, int] = {}
    theta = {k: v.detach().requires_grad_(True) for k, v in params.items()}
    counter = FlopCounterMode(display=False)
    with torch.enable_grad(), saved_tensor_bytes(model, seen):
        with counter:
            out = forward(theta)
    n = max(1, n_examples)
    return out.detach(), sum(seen.values()) / n, max(1.0, counter.get_total_flops() / n)


def saved_tensor_bytes(model: nn.Module, seen: dict[int, int]) -> contextlib.AbstractContextManager:
    """Within it, every tensor autograd saves for the backward is recorded in ``seen`` (storage
    address -> its bytes, each storage once), except the model's own parameters and buffers
    and tensor subclasses without a storage."""
    persistent = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}

    def pack(t: torch.Tensor) -> torch.Tensor:
        try:
            storage = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # tensor subclasses without storage
            return t
        ptr = storage.data_ptr()
        if ptr not in persistent:
            seen[ptr] = storage.nbytes()
        return t

    return torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)


def tile_pairs(
    n1: int, n2: int, tile: int, symmetric: bool
) -> list[tuple[tuple[int, int], list[tuple[int, int]]]]:
    """The blocks to compute: ``[(column range, [row ranges])]``.

    With ``symmetric`` (x2 is x1) a block is skipped when all its rows come after all its
    columns (``row_start >= col_end``): those entries are the mirror of computed ones. Every
    entry with ``a <= b`` is computed.
    """
    cols = [(s, min(s + tile, n2)) for s in range(0, n2, tile)]
    rows = [(s, min(s + tile, n1)) for s in range(0, n1, tile)]
    return [(c, [r for r in rows if not symmetric or r[0] < c[1]]) for c in cols]


def block_pairs(n1: int, n2: int, tile: int, symmetric: bool, rows_per_block: int
                ) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """The pairs ``(column range, row range)`` of :func:`tile_pairs`, ordered for a cache that
    holds ``rows_per_block`` row tiles and one column tile.

    The row tiles go in blocks of ``rows_per_block``; each block meets every column it needs,
    in order. A block's tiles are captured once and each column tile once per block, so a
    kernel of ``m`` tiles a side needs about ``m + m^2 / (2 b)`` captures (symmetric) with
    blocks of ``b`` tiles, where holding the last few tiles used needs about ``m^2 / 2``.
    """
    if rows_per_block < 1:
        raise ValueError(f"rows_per_block must be >= 1, got {rows_per_block}")
    m1, m2 = -(-n1 // tile), -(-n2 // tile)
    rows = [(s * tile, min((s + 1) * tile, n1)) for s in range(m1)]
    cols = [(s * tile, min((s + 1) * tile, n2)) for s in range(m2)]
    out = []
    for b in range(0, m1, rows_per_block):
        for j in range(b if symmetric else 0, m2):
            last = min(b + rows_per_block, m1, j + 1) if symmetric else min(b + rows_per_block, m1)
            out += [(cols[j], rows[i]) for i in range(b, last)]
    return out


def pair_counts(n1: int, n2: int, tile: int, symmetric: bool) -> tuple[int, int, int]:
    """``(tile pairs, kernel entries, row examples re-differentiated)`` of :func:`tile_pairs`,
    in closed form (O(1), the planner must stay cheap at large N).

    With ``m = ceil(n / t)`` tiles, the last of ``l = n - (m - 1) t`` examples, the symmetric
    triangle has ``m (m + 1) / 2`` pairs, ``(n^2 + (m - 1) t^2 + l^2) / 2`` entries and
    ``t m (m - 1) / 2`` row examples off the diagonal; otherwise ``m1 m2`` pairs, ``n1 n2``
    entries and ``m2 n1`` row examples.
    """
    if symmetric:
        m = -(-n1 // tile)
        last = n1 - (m - 1) * tile
        return m * (m + 1) // 2, (n1 * n1 + (m - 1) * tile * tile + last * last) // 2, \
            tile * m * (m - 1) // 2
    m1, m2 = -(-n1 // tile), -(-n2 // tile)
    return m1 * m2, n1 * n2, m2 * n1


def _groups(numels: dict[str, int], cap: int) -> list[list[str]]:
    """Consecutive parameter tensors packed greedily into groups of at most ``cap`` entries."""
    groups: list[list[str]] = []
    size = 0
    for name, n in numels.items():
        if groups and size + n <= cap:
            groups[-1].append(name)
            size += n
        else:
            groups.append([name])
            size = n
    return groups


@dataclass(frozen=True)
class Plan:
    """How the kernel will be computed.

    Attributes:
        method: "jacobian" or "ntk_vp".
        tile: examples per tile along both x1 and x2.
        groups: parameter tensors differentiated together (the kernel sums over groups).
        peak_bytes: the estimated peak (tile work plus the output kernel).
        budget_bytes: the budget it was checked against.
        flops: the estimated cost.
    """

    method: str
    tile: int
    groups: list[list[str]] = field(default_factory=list)
    peak_bytes: float = 0.0
    budget_bytes: float = 0.0
    flops: float = 0.0


def _estimate(
    method: str, prof: Profile, n1: int, n2: int, symmetric: bool, layout: str,
    per_layer: bool, acc_bytes: int, tile: int, groups: list[list[str]],
) -> tuple[float, float]:
    """(peak bytes, flops) of one candidate."""
    c = prof.n_out
    per_pair = {"full": c * c, "diagonal": c, "trace": 1}[layout]
    layers = len(prof.numels) if per_layer else 1
    kernel = n1 * n2 * per_pair * acc_bytes * (layers + (1 if per_layer else 0) + 1)
    rows, cols = min(tile, n1), min(tile, n2)
    block = rows * cols * per_pair * (layers + 1)
    p_group = max(sum(prof.numels[k] for k in g) for g in groups)
    n_tiles, entries, rebuilt = pair_counts(n1, n2, tile, symmetric)
    overhead = TILE_OVERHEAD_FLOPS * n_tiles * len(groups)
    # every tile pair reads the column tile's Jacobian or directions (and the row tile's
    # Jacobian for "jacobian"): cols * C * P entries per side
    sides = 2 if method == "jacobian" else 1
    overhead += FLOPS_PER_BYTE * n_tiles * sides * cols * c * prof.n_params * prof.model_bytes
    args = (rows, cols, c, p_group, prof.activation, prof.model_bytes, acc_bytes, block)
    g = len(groups)
    if method == "jacobian":
        peak = _jacobian.peak_bytes(*args)
        cost = _jacobian.flops(entries, c, prof.n_params, prof.flops, layout, g * (n2 + rebuilt))
    else:
        peak = _ntk_vp.peak_bytes(*args)
        cost = _ntk_vp.flops(entries, c, prof.flops, g * n2, g * layers)
    return peak + kernel, cost + overhead


def plan(
    method: str,
    prof: Profile,
    n1: int,
    n2: int,
    symmetric: bool,
    layout: str,
    per_layer: bool,
    acc_bytes: int,
    budget: float,
    max_tile: int | None,
) -> Plan:
    """The cheapest tiling of ``method`` whose estimated peak fits ``budget``.

    Args:
        method: "jacobian" or "ntk_vp".
        prof: the model profile.
        n1, n2: numbers of examples (``n2 == n1`` when ``symmetric``).
        symmetric: x2 is x1 (one triangle of blocks).
        layout: "full", "trace" or "diagonal".
        per_layer: one block per parameter tensor is kept.
        acc_bytes: bytes per entry of the accumulation dtype.
        budget: bytes.
        max_tile: largest tile (``batch_size``); None for the whole batch.

    Raises:
        KernelTooLargeError: the smallest candidate (tile of 1, one tensor per group) does not
            fit; the message gives its estimate and the budget in GiB and what to change.
    """
    largest = max(n1, n2) if max_tile is None else max(1, min(max_tile, max(n1, n2)))
    tiles = []
    t = largest
    while True:
        tiles.append(t)
        if t == 1:
            break
        t = math.ceil(t / 2)
    total = prof.n_params
    caps = []
    cap = total
    biggest = max(prof.numels.values())
    while True:
        caps.append(max(cap, biggest))
        if cap <= biggest:
            break
        cap = math.ceil(cap / 2)
    best: Plan | None = None
    smallest = math.inf
    for cap in dict.fromkeys(caps):
        groups = _groups(prof.numels, cap)
        for tile in tiles:
            peak, cost = _estimate(method, prof, n1, n2, symmetric, layout, per_layer,
                                   acc_bytes, tile, groups)
            smallest = min(smallest, peak)
            if peak <= budget and (best is None or cost < best.flops):
                best = Plan(method, tile, groups, peak, budget, cost)
    if best is None:
        raise KernelTooLargeError(
            f"empirical_ntk: method {method!r} needs an estimated {smallest / GiB:.3g} GiB even "
            f"with one example per tile and one parameter tensor per group, over the memory "
            f"budget of {budget / GiB:.3g} GiB ({n1} x {n2} examples, {prof.n_out} outputs, "
            f"{total:,} parameters in {len(prof.numels)} tensors). Select fewer parameters "
            "(params=...), ask for output='trace' or 'sum_logits' instead of 'full', try the "
            "other method, use fewer examples, or raise memory_budget (bytes) if the memory "
            "is there."
        )
    return best


# -- the structured engine ----------------------------------------------------------------------


@dataclass(frozen=True)
class StructuredTiles:
    """The structured engine's tiling: ``tile`` examples per tile; ``keep_all``: the features
    of every tile stay in memory (otherwise those of ``kept`` tiles: a block of ``kept - 1`` row
    tiles and the column tile passing by, see :func:`block_pairs`); ``peak_bytes``:
    the estimated peak of the engine's working memory (kernels, features, one capture's graph,
    contraction chunks; the model and its inputs not counted)."""

    tile: int
    keep_all: bool
    peak_bytes: float = 0.0
    kept: int = 2


def structured_tiles(features_pe: float, n1: int, n2: int, n_out: int, layout: str,
                     acc_bytes: int, n_blocks: int, budget: float, symmetric: bool,
                     max_tile: int | None, graph_pe: float | None = None) -> StructuredTiles:
    """Tile size of the structured engine from the measured bytes per example.

    Per example of a tile: its features ``features_pe`` and, while it is captured, the graph
    of the capture's forward ``graph_pe`` (the tensors saved for its backward, measured by the
    probe; None: as much as the features). The graph need not scale with the features: with
    few parameters selected (LoRA, IA3, Propulsion's z) the features are small but the graph
    holds every activation after the first selected layer. The kernels take
    ``n1 n2 q acc_bytes (n_blocks + 1)`` bytes (``q`` = C^2, C or 1 by layout); contraction
    intermediates are chunked to :data:`CHUNK_ELEMENTS` entries (three such chunks). Two tiles
    take half the room left; all tiles' features are kept when they fit in the other half,
    otherwise as many as fit in the room beside one capture's graph (``kept``: a block of
    ``kept - 1`` row tiles and one column tile, see :func:`block_pairs`).

    Raises:
        KernelTooLargeError: even one example per tile does not fit the budget.
    """
    graph_pe = features_pe if graph_pe is None else graph_pe
    per_example = features_pe + graph_pe
    q = {"full": n_out * n_out, "diagonal": n_out, "trace": 1}[layout]
    kernel_bytes = n1 * n2 * q * acc_bytes * (n_blocks + 1)
    work = CHUNK_ELEMENTS * acc_bytes * 3
    room = budget - kernel_bytes - work
    if room < 2 * per_example:
        raise KernelTooLargeError(
            f"structured kernels: even one example per tile needs about "
            f"{(kernel_bytes + work + 2 * per_example) / GiB:.3g} GiB (kernel "
            f"{kernel_bytes / GiB:.3g} GiB, captures {per_example / GiB:.3g} GiB per example,"
            f" contraction chunks {work / GiB:.3g} GiB), over the memory budget of "
            f"{budget / GiB:.3g} GiB. Select fewer parameters, ask for output='trace', use "
            "fewer examples, or raise memory_budget."
        )
    tile = max(1, min(max(n1, n2), int(room // (4 * per_example))))  # half the room
    if max_tile is not None:
        tile = min(tile, max_tile)
    examples = n1 + (0 if symmetric else n2)
    keep_all = features_pe * examples <= room / 2
    # Otherwise as many tiles' features as the room holds beside one capture's graph (at least
    # the pair's two): a block of kept - 1 row tiles and one column tile (:func:`block_pairs`).
    kept = max(2, int((room - tile * graph_pe) // max(1.0, tile * features_pe)))
    # At a capture: the graph of the tile captured, and the features held: every tile's (that
    # one's included) when all are kept, else the kept - 1 others and the new one.
    held = features_pe * (examples if keep_all else kept * tile)
    peak = kernel_bytes + work + held + tile * graph_pe
    return StructuredTiles(tile, keep_all, peak, kept)
