"""Kernels as tiles on disk: resumable, spread over the ranks of a ``torchrun`` job, assembled.

The kernel ``K`` of shape (N1, N2[, C[, C]]) is cut into square tiles of ``tile_size`` examples
over (rows, columns); tile (i, j) holds ``K[i t:(i+1) t, j t:(j+1) t]`` (the last row / column
tile may be shorter). With ``x2`` None only tiles with ``i <= j`` are computed (a diagonal tile
as the symmetric kernel of its rows, an off-diagonal one as the cross kernel) and the assembler
mirrors ``K[b, a] = K[a, b]^T`` (``(C, C)`` blocks transposed).

Files in ``out_dir``:

- ``job.json``: the job manifest (config hash, N1, N2, tile size, layout, kernel shape, dtype,
  parameter selection, model fingerprint), written once, atomically; every process verifies it.
- ``tiles/r{i}_c{j}.safetensors``: one tile (key ``"kernel"``), written atomically;
- ``tiles/r{i}_c{j}.json``: its manifest (shape, dtype, config hash, tile index, row / column
  range, sha256 of the tensor file), written after the tensor file: a tile is finished exactly
  when its manifest exists.
- ``kernel.npy``: the assembled kernel when memory-mapped (``np.lib.format.open_memmap``).

The config hash covers the model's identity (its name and a sha256 of every parameter and
buffer, so a changed model is refused), the inputs (sha256 of the tensors), the selected
parameter names, the output reduction, the dtype and the tile size. The engine ``method`` and
``memory_budget`` only change rounding and speed and are not part of it.

Work split: the tile list is deterministic. When a job starts, the missing tiles are listed
(by rank 0 and broadcast under ``torch.distributed``) and rank r takes ``missing[r::world]``,
so a restart on any number of ranks computes exactly the missing tiles. Cost with the public
engine: every tile runs its own per-example passes, ``~ N1 N2 / t`` of them in all against
``N1 + N2`` for one call, plus the same ``N1 N2`` pair contractions: larger tiles waste less.

    >>> import tempfile, torch
    >>> from torch import nn
    >>> from ntk.tiles import assemble_kernel, compute_tiles
    >>> net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    >>> x = torch.randn(5, 3, dtype=torch.float64)
    >>> with tempfile.TemporaryDirectory() as d:
    ...     report = compute_tiles(net, x, out_dir=d, params="all", output="trace", tile_size=2)
    ...     k = assemble_kernel(d)
    >>> report.total, tuple(k.shape)
    (6, (5, 5))
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from ntk._inputs import Inputs, example_counts, take, to_device
from ntk._params import ParamSelector, select_parameters
from ntk.distributed import barrier, broadcast, current_context
from ntk.empirical import empirical_ntk

__all__ = [
    "FORMAT", "MMAP_THRESHOLD_BYTES", "STOP_AFTER_ENV",
    "Tile", "TileReport", "TileError", "TilesInterrupted",
    "tile_grid", "compute_tiles", "assemble_kernel", "tiled_ntk",
    "model_fingerprint", "inputs_fingerprint", "report_dict",
    # files
    "atomic_write_bytes", "write_json_atomic",
]

FORMAT = "ntk-tiles/1"
MMAP_THRESHOLD_BYTES = 2**30  # assemble_kernel(mmap=None) maps kernels larger than this
STOP_AFTER_ENV = "NTK_TILES_STOP_AFTER"  # test hook: a process stops after that many tiles
_LAYOUTS = {"full": 2, "trace": 0, "sum_logits": 0, "diagonal": 1}  # trailing C dims
_DTYPES = {str(d).removeprefix("torch."): d for d in (torch.float64, torch.float32, torch.float16,
                                                      torch.bfloat16)}


class TileError(RuntimeError):
    """Tiles on disk are missing, corrupt or belong to another configuration."""


class TilesInterrupted(RuntimeError):
    """Raised by the ``stop_after`` test hook once a process has written that many tiles."""


@dataclass(frozen=True)
class Tile:
    """Tile (i, j): rows ``[r0, r1)`` of x1 and columns ``[c0, c1)`` of x2."""

    i: int
    j: int
    rows: tuple[int, int]
    cols: tuple[int, int]

    @property
    def name(self) -> str:
        return f"r{self.i:05d}_c{self.j:05d}"


@dataclass(frozen=True)
class TileReport:
    """What one process did: tiles it computed, tiles already finished, tiles in the job."""

    rank: int
    world_size: int
    computed: list[tuple[int, int]]
    finished_before: int
    total: int
    seconds: float
    config_hash: str


def tile_grid(n1: int, n2: int, tile_size: int, symmetric: bool) -> list[Tile]:
    """Row-major tile list; with ``symmetric`` only tiles with ``i <= j`` (requires n1 == n2)."""
    if tile_size < 1 or n1 < 1 or n2 < 1:
        raise ValueError(f"need tile_size, n1, n2 >= 1, got {tile_size}, {n1}, {n2}")
    if symmetric and n1 != n2:
        raise ValueError(f"a symmetric kernel needs n1 == n2, got {n1} and {n2}")
    edges1 = [(a, min(a + tile_size, n1)) for a in range(0, n1, tile_size)]
    edges2 = [(a, min(a + tile_size, n2)) for a in range(0, n2, tile_size)]
    return [Tile(i, j, r, c) for i, r in enumerate(edges1) for j, c in enumerate(edges2)
            if not symmetric or i <= j]


# --------------------------------------------------------------------------------------------
# fingerprints and files
# --------------------------------------------------------------------------------------------
def _hash_tensor(h: Any, name: str, t: torch.Tensor) -> None:
    t = t.detach().to("cpu").contiguous()
    h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
    h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def model_fingerprint(model: nn.Module) -> str:
    """sha256 over the names, dtypes, shapes and values of every parameter and buffer."""
    h = hashlib.sha256()
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        _hash_tensor(h, name, t)
    return h.hexdigest()


def inputs_fingerprint(x: Inputs | None) -> str | None:
    """sha256 of an input batch (tensor or mapping of tensors); None for None."""
    if x is None:
        return None
    h = hashlib.sha256()
    items = [("", x)] if isinstance(x, torch.Tensor) else sorted(x.items())
    for key, t in items:
        _hash_tensor(h, key, t)
    return h.hexdigest()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file in ``path``'s folder, fsync, then ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, data: dict) -> None:
    """``data`` as indented JSON with sorted keys, written atomically."""
    atomic_write_bytes(path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise TileError(f"cannot read {path}: {exc}; delete it and rerun the job") from exc


# --------------------------------------------------------------------------------------------
# computing
# --------------------------------------------------------------------------------------------
def _n_out(model: nn.Module, x: Inputs) -> int:
    """C: the model's number of outputs, from one example (``.logits`` when present)."""
    device = next(model.parameters()).device
    first = to_device(take(x, 0, 1), device)
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            out = model(first) if isinstance(first, torch.Tensor) else model(**first)
    finally:
        for m, mode in modes:
            m.training = mode
    out = getattr(out, "logits", out)
    if not isinstance(out, torch.Tensor) or out.ndim != 2:
        raise ValueError("the model's output (or its .logits) must be an (N, C) tensor for tiled kernels")
    return int(out.shape[1])


def _job_manifest(model: nn.Module, x1: Inputs, x2: Inputs | None, params: ParamSelector, output: str,
                  dtype: torch.dtype, tile_size: int, model_name: str) -> dict:
    if output not in _LAYOUTS:
        raise ValueError(f"unknown output {output!r}; use one of {list(_LAYOUTS)}")
    if not isinstance(tile_size, int) or isinstance(tile_size, bool) or tile_size < 1:
        raise ValueError(f"tile_size must be a positive integer, got {tile_size!r}")
    dtype_name = str(dtype).removeprefix("torch.")
    if dtype_name not in _DTYPES:
        raise ValueError(f"dtype must be one of {list(_DTYPES)}, got {dtype!r}")
    n1, n2 = example_counts(x1, x2)
    names = list(select_parameters(model, params))
    c = _n_out(model, x1)
    shape = [n1, n2] + [c] * _LAYOUTS[output]
    selection = params if isinstance(params, str) else ("predicate" if callable(params) else "names")
    identity = {
        "format": FORMAT, "model_name": model_name, "model_fingerprint": model_fingerprint(model),
        "x1": inputs_fingerprint(x1), "x2": inputs_fingerprint(x2),
        "parameter_names_sha256": hashlib.sha256("\n".join(names).encode()).hexdigest(),
        "output": output, "dtype": dtype_name, "tile_size": tile_size,
    }
    config_hash = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
    return {
        **identity, "config_hash": config_hash, "n1": n1, "n2": n2, "n_out": c,
        "symmetric": x2 is None, "kernel_shape": shape, "parameter_selection": selection,
        "n_parameter_tensors": len(names), "n_parameters": sum(
            p.numel() for n, p in model.named_parameters() if n in set(names)),
    }


def _ensure_job(out_dir: Path, job: dict, write: bool) -> None:
    """Write job.json when missing (``write``), then check that it describes this job."""
    path = out_dir / "job.json"
    if write and not path.exists():
        write_json_atomic(path, {**job, "created": datetime.datetime.now(datetime.timezone.utc).isoformat()})
    if not path.exists():
        raise TileError(f"{path} is missing (rank 0 writes it); is out_dir on a shared file system?")
    found = _read_json(path)
    if found.get("config_hash") != job["config_hash"]:
        diff = [k for k in ("model_name", "model_fingerprint", "x1", "x2", "parameter_names_sha256",
                            "output", "dtype", "tile_size", "format") if found.get(k) != job.get(k)]
        raise TileError(
            f"{out_dir} holds a kernel job of another configuration (config hash "
            f"{str(found.get('config_hash'))[:12]} != {job['config_hash'][:12]}; differs in "
            f"{diff or 'unknown fields'}); use a new out_dir or delete the old one"
        )


def _finished(out_dir: Path, tiles: list[Tile], config_hash: str) -> set[tuple[int, int]]:
    done = set()
    for t in tiles:
        meta = out_dir / "tiles" / f"{t.name}.json"
        if not meta.exists():
            continue
        manifest = _read_json(meta)
        found = manifest.get("config_hash")
        if found != config_hash:
            raise TileError(f"tile {meta} belongs to another config ({str(found)[:12]} != "
                            f"{config_hash[:12]}); delete it or use a new out_dir")
        _check_position(meta, manifest, t, f"delete {meta.name} and {meta.stem}.safetensors, rerun the job")
        if (out_dir / "tiles" / f"{t.name}.safetensors").exists():
            done.add((t.i, t.j))
    return done


def _write_tile(out_dir: Path, tile: Tile, block: torch.Tensor, job: dict) -> None:
    data = st_save({"kernel": block.detach().to("cpu").contiguous()},
                   metadata={"config_hash": job["config_hash"], "tile": tile.name})
    atomic_write_bytes(out_dir / "tiles" / f"{tile.name}.safetensors", data)
    write_json_atomic(out_dir / "tiles" / f"{tile.name}.json", {
        "config_hash": job["config_hash"], "i": tile.i, "j": tile.j, "rows": list(tile.rows),
        "cols": list(tile.cols), "shape": list(block.shape), "dtype": job["dtype"],
        "sha256": hashlib.sha256(data).hexdigest(),
    })


def compute_tiles(
    model: nn.Module, x1: Inputs, x2: Inputs | None = None, *, out_dir: str | Path,
    params: ParamSelector = "trainable", output: str = "full", method: str = "auto",
    dtype: torch.dtype = torch.float64, tile_size: int = 64, memory_budget: float | None = None,
    model_name: str = "model", progress: bool = False, stop_after: int | None = None,
    compute: Callable[..., torch.Tensor] | None = None,
) -> TileReport:
    """Compute this process's share of the missing tiles of ``K(x1, x2)`` into ``out_dir``.

    Arguments as :func:`ntk.empirical_ntk` (``x2`` None or equal to ``x1``: symmetric, upper
    tiles only), plus
    ``tile_size`` (examples per tile side), ``model_name`` (recorded in the config hash),
    ``stop_after`` (test hook: raise :class:`TilesInterrupted` after writing that many tiles;
    default from the environment variable ``NTK_TILES_STOP_AFTER``) and ``compute`` (the
    per-tile kernel function, default :func:`ntk.empirical_ntk`). Under ``torch.distributed``
    every rank must call it with the same model and inputs. Needs no process group otherwise.

    Returns:
        A :class:`TileReport` of this process.

    Raises:
        TileError: ``out_dir`` holds a job or tiles of another configuration.
        TilesInterrupted: the ``stop_after`` hook fired.
    """
    start = time.perf_counter()
    ctx = current_context()
    out = Path(out_dir)
    if x2 is not None and (x2 is x1 or inputs_fingerprint(x2) == inputs_fingerprint(x1)):
        x2 = None  # the same examples: the symmetric job (upper tiles, mirrored)
    job = _job_manifest(model, x1, x2, params, output, dtype, tile_size, model_name)
    if ctx.rank == 0:
        _ensure_job(out, job, write=True)
    barrier(ctx)
    if ctx.rank != 0:
        _ensure_job(out, job, write=False)
    tiles = tile_grid(job["n1"], job["n2"], tile_size, x2 is None)
    missing = None
    if ctx.rank == 0:
        done = _finished(out, tiles, job["config_hash"])
        missing = [(t.i, t.j) for t in tiles if (t.i, t.j) not in done]
    missing = broadcast(missing, ctx)
    assert missing is not None
    by_index = {(t.i, t.j): t for t in tiles}
    mine = [by_index[ij] for ij in missing[ctx.rank::ctx.world_size]]
    if stop_after is None and os.environ.get(STOP_AFTER_ENV):
        stop_after = int(os.environ[STOP_AFTER_ENV])
    kernel_fn = compute or empirical_ntk
    bar = None
    if progress and ctx.rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(mine), desc=f"tiles (rank 0 of {ctx.world_size})")
    computed: list[tuple[int, int]] = []
    try:
        for t in mine:
            if stop_after is not None and len(computed) >= stop_after:
                raise TilesInterrupted(f"rank {ctx.rank}: stopped after {stop_after} tiles "
                                       f"({STOP_AFTER_ENV} test hook)")
            a = take(x1, *t.rows)
            b = None if x2 is None and t.i == t.j else take(x1 if x2 is None else x2, *t.cols)
            block = kernel_fn(model, a, b, params=params, output=output, method=method, dtype=dtype,
                              memory_budget=memory_budget)
            assert isinstance(block, torch.Tensor)
            if b is None:  # a diagonal tile: exactly symmetric, as the mirrored tiles are
                block = (block + _transposed(block, block.ndim - 2)) / 2
            _write_tile(out, t, block, job)
            computed.append((t.i, t.j))
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return TileReport(ctx.rank, ctx.world_size, computed, len(tiles) - len(missing), len(tiles),
                      time.perf_counter() - start, job["config_hash"])


# --------------------------------------------------------------------------------------------
# assembling
# --------------------------------------------------------------------------------------------
def _transposed(block: torch.Tensor, trailing: int) -> torch.Tensor:
    """``K[b, a] = K[a, b]^T``: swap the example axes and, for (C, C) blocks, the output axes."""
    return block.permute(1, 0, *range(2, 2 + trailing)) if trailing < 2 else block.permute(1, 0, 3, 2)


def assemble_kernel(out_dir: str | Path, *, mmap: bool | None = None) -> torch.Tensor | np.memmap:
    """The full kernel from the tiles in ``out_dir``, checked tile by tile.

    Every tile of ``job.json``'s grid must be present with a manifest of the job's config hash
    and a tensor file whose sha256 matches it; the lower triangle of a symmetric job is
    mirrored from the upper one.

    Args:
        out_dir: the folder given to :func:`compute_tiles`.
        mmap: True -> a read-only ``numpy.memmap`` of ``out_dir/kernel.npy`` (written with
            ``np.lib.format.open_memmap``, atomically); False -> a CPU ``torch.Tensor``;
            None -> memory-mapped when the kernel exceeds ``MMAP_THRESHOLD_BYTES`` (1 GiB).

    Returns:
        The kernel of shape ``job.json["kernel_shape"]``: (N1, N2), (N1, N2, C) or (N1, N2, C, C).

    Raises:
        TileError: job.json missing, tiles missing (listed), a tile of another config, a tile
            of another position (its manifest's i, j and the file's own ``tile`` entry are
            checked against the position read for), a file that is not safetensors, or a
            corrupt tile (sha256, shape or dtype mismatch): delete the named files and rerun
            the job, which recomputes exactly those tiles.
    """
    out = Path(out_dir)
    if not (out / "job.json").exists():
        raise TileError(f"{out} has no job.json: not a tiled kernel job (run compute_tiles first)")
    job = _read_json(out / "job.json")
    dtype = _DTYPES[job["dtype"]]
    shape = tuple(job["kernel_shape"])
    trailing = len(shape) - 2
    tiles = tile_grid(job["n1"], job["n2"], job["tile_size"], job["symmetric"])
    missing = [t.name for t in tiles if not (out / "tiles" / f"{t.name}.json").exists()]
    if missing:
        raise TileError(f"{len(missing)} of {len(tiles)} tiles are missing in {out} (e.g. "
                        f"{missing[:5]}); rerun the job to compute them")
    nbytes = int(np.prod(shape)) * torch.finfo(dtype).bits // 8
    if mmap is None:
        mmap = nbytes > MMAP_THRESHOLD_BYTES
    tmp = out / ".kernel.npy.tmp"
    if mmap:
        if dtype == torch.bfloat16:
            raise TileError("numpy has no bfloat16: assemble with mmap=False")
        np_dtype = torch.empty((), dtype=dtype).numpy().dtype
        target: Any = np.lib.format.open_memmap(tmp, mode="w+", dtype=np_dtype, shape=shape)
    else:
        target = torch.empty(shape, dtype=dtype)
    for t in tiles:
        block = _read_tile(out, t, job, dtype)
        r, c = slice(*t.rows), slice(*t.cols)
        mirror = job["symmetric"] and t.i != t.j
        if mmap:
            target[r, c] = block.numpy()
            if mirror:
                target[c, r] = _transposed(block, trailing).numpy()
        else:
            target[r, c] = block
            if mirror:
                target[c, r] = _transposed(block, trailing)
    if not mmap:
        return target
    target.flush()
    del target
    os.replace(tmp, out / "kernel.npy")
    return np.load(out / "kernel.npy", mmap_mode="r")


def _check_position(meta_path: Path, meta: dict, t: Tile, redo: str) -> None:
    """A manifest must describe the tile it is read for: same i, j, rows and columns."""
    found = (meta.get("i"), meta.get("j"), meta.get("rows"), meta.get("cols"))
    if found != (t.i, t.j, list(t.rows), list(t.cols)):
        raise TileError(f"{meta_path} describes tile i={found[0]}, j={found[1]} (rows {found[2]}, cols "
                        f"{found[3]}) but is read for i={t.i}, j={t.j} (rows {list(t.rows)}, cols "
                        f"{list(t.cols)}): a tile copied over another; {redo}")


def _read_tile(out: Path, t: Tile, job: dict, dtype: torch.dtype) -> torch.Tensor:
    meta = _read_json(out / "tiles" / f"{t.name}.json")
    where = out / "tiles" / f"{t.name}.safetensors"
    redo = f"delete {where.name} and {where.with_suffix('.json').name} and rerun the job"
    if meta.get("config_hash") != job["config_hash"]:
        raise TileError(f"tile {t.name} in {out} belongs to another config "
                        f"({str(meta.get('config_hash'))[:12]} != {job['config_hash'][:12]}); {redo}")
    try:
        data = where.read_bytes()
    except OSError as exc:
        raise TileError(f"tile {where} is unreadable ({exc}); {redo}") from exc
    if hashlib.sha256(data).hexdigest() != meta.get("sha256"):
        raise TileError(f"tile {where} is corrupt (sha256 differs from its manifest); {redo}")
    _check_position(where.with_suffix(".json"), meta, t, redo)
    try:
        header_size = int.from_bytes(data[:8], "little")
        own = json.loads(data[8:8 + header_size]).get("__metadata__") or {}
        block = st_load(data)["kernel"]
    except Exception as exc:  # a pickle, a truncated or foreign file: never a raw parser error
        raise TileError(f"tile {where} is not a safetensors file holding a 'kernel' tensor "
                        f"({type(exc).__name__}); {redo}") from None
    if own.get("tile") != t.name or own.get("config_hash") != job["config_hash"]:
        raise TileError(f"tile {where} says it is tile {own.get('tile')!r} of config "
                        f"{str(own.get('config_hash'))[:12]}, but position {t.name} of config "
                        f"{job['config_hash'][:12]} is read (a tile copied over another?); {redo}")
    expected = [t.rows[1] - t.rows[0], t.cols[1] - t.cols[0], *job["kernel_shape"][2:]]
    if list(block.shape) != expected or block.dtype != dtype:
        raise TileError(f"tile {where} has shape {list(block.shape)} / {block.dtype}, expected "
                        f"{expected} / {dtype}; {redo}")
    return block


def tiled_ntk(
    model: nn.Module, x1: Inputs, x2: Inputs | None = None, *, out_dir: str | Path,
    mmap: bool | None = None, **kwargs: Any,
) -> tuple[torch.Tensor | np.memmap | None, TileReport]:
    """:func:`compute_tiles` on every rank, a barrier, then :func:`assemble_kernel` on rank 0.

    Returns ``(kernel, report)``; the kernel is None on ranks other than 0.
    """
    report = compute_tiles(model, x1, x2, out_dir=out_dir, **kwargs)
    ctx = current_context()
    barrier(ctx)
    kernel = assemble_kernel(out_dir, mmap=mmap) if ctx.rank == 0 else None
    return kernel, report


def report_dict(report: TileReport) -> dict:
    """The report as JSON-able data."""
    return {**asdict(report), "computed": [list(ij) for ij in report.computed]}
