"""Sweeps: independent, resumable units of work spread over ranks or local processes, one table.

A unit is a JSON-able dict of overrides (``{"degree": 5, "seed": 1}``); ``fn(unit, workdir)``
runs it and returns a ``pandas.DataFrame``. Files in ``out_dir``:

- ``sweep.json``: the units of the latest call and their ids;
- ``units/<id>.parquet`` then ``units/<id>.json`` (manifest: unit, rows, seconds, rank, pid,
  sha256 of the parquet), both written atomically: a unit is finished exactly when its
  manifest exists, is never recomputed, and an unfinished one is redone from the start
  (``fn`` may keep its own checkpoints in ``units/<id>/``, its ``workdir``);
- ``results.parquet``: every unit's rows, with the column ``unit_id`` and the unit's keys.

Where units run: under ``torchrun`` (or an initialised ``torch.distributed``) rank 0 lists the
unfinished units and rank r runs ``pending[r::world_size]``; without it, ``local_workers``
processes (multiprocessing spawn, each with cores / workers torch threads) take the pending
units as they free up. Under torchrun each rank gets cores / ranks-per-node torch threads
(``ntk.distributed.default_threads``). Explicit ``rank`` / ``world_size`` without a process group
(a job array) run ``units[i]`` for ``i % world_size == rank``; the table is written once all are finished.

    torchrun --standalone --nproc_per_node=4 my_sweep.py     # calls run_sweep(...) on every rank

``parse_sweep(["degree=1,5,15", "seed=0,1"])`` gives the cartesian product (6 units).
"""

from __future__ import annotations

import concurrent.futures
import datetime
import hashlib
import itertools
import json
import multiprocessing
import os
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from experiments.processes import die_with_parent
from experiments.records import read_json, write_bytes, write_json
from ntk.distributed import broadcast, default_threads, init_distributed

__all__ = ["SweepError", "parse_sweep", "unit_id", "run_sweep", "gather_sweep"]

UnitFn = Callable[[dict, Path], pd.DataFrame]


class SweepError(RuntimeError):
    """Units failed, are missing, or their files are corrupt."""


def _value(text: str) -> Any:
    try:
        return json.loads(text)  # 5 -> int, 0.5 -> float, true -> bool, null -> None, "x" -> str
    except json.JSONDecodeError:
        return text


def parse_sweep(items: Sequence[str]) -> list[dict]:
    """``["key=v1,v2", ...]`` -> the cartesian product as a list of dicts (first key slowest).

    Values are read as JSON where they parse (``1`` int, ``1e-3`` float, ``true``), else as
    strings. Raises ValueError for an item without ``=``, an empty value or a repeated key.
    """
    keys: list[str] = []
    values: list[list[Any]] = []
    for item in items:
        key, sep, rest = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"sweep item {item!r} must look like key=v1,v2,...")
        if key in keys:
            raise ValueError(f"sweep key {key!r} is given twice; list all its values in one item")
        parts = [p.strip() for p in rest.split(",")]
        if not rest.strip() or any(p == "" for p in parts):
            raise ValueError(f"sweep item {item!r} has an empty value")
        keys.append(key)
        values.append([_value(p) for p in parts])
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*values)] if keys else []


def unit_id(unit: dict) -> str:
    """16 hex digits of sha256 over the unit's canonical JSON (sorted keys)."""
    return hashlib.sha256(json.dumps(unit, sort_keys=True).encode()).hexdigest()[:16]


def _check_units(units: list[dict]) -> list[str]:
    ids = []
    for u in units:
        if not isinstance(u, dict) or not all(isinstance(k, str) for k in u):
            raise ValueError(f"a unit must be a dict with string keys, got {u!r}")
        try:
            same = json.loads(json.dumps(u, sort_keys=True)) == u
        except (TypeError, ValueError) as exc:
            raise ValueError(f"unit {u!r} is not JSON-able ({exc})") from exc
        if not same:
            raise ValueError(f"unit {u!r} does not survive a JSON round trip (tuples? non-str keys?)")
        ids.append(unit_id(u))
    if len(set(ids)) != len(ids):
        raise ValueError("the same unit is listed twice")
    return ids


def _finished(out: Path, uid: str) -> bool:
    return (out / "units" / f"{uid}.json").exists() and (out / "units" / f"{uid}.parquet").exists()


def _run_unit(fn: UnitFn, unit: dict, out: Path, rank: int) -> str:
    """Run one unit and write its parquet, then its manifest. Returns its id."""
    uid = unit_id(unit)
    workdir = out / "units" / uid
    workdir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    frame = fn(dict(unit), workdir)
    if not isinstance(frame, pd.DataFrame):
        raise SweepError(f"unit {unit} returned {type(frame).__name__}; fn must return a pandas.DataFrame")
    digest = write_bytes(out / "units" / f"{uid}.parquet", frame.to_parquet(index=False))
    write_json({
        "unit": unit, "unit_id": uid, "rows": len(frame), "seconds": time.perf_counter() - start,
        "rank": rank, "pid": os.getpid(), "sha256": digest,
        "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(),
    }, out / "units" / f"{uid}.json")
    return uid


def _worker_init(threads: int, parent: int) -> None:
    die_with_parent(parent)  # a killed sweep leaves no worker behind
    torch.set_num_threads(threads)


def _local(fn: UnitFn, units: list[dict], out: Path, workers: int, progress: bool) -> None:
    """Pending units over ``workers`` spawned processes (or in this process for 1 worker)."""
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(units), desc="sweep units")
    failures: list[tuple[dict, BaseException]] = []
    try:
        if workers == 1:
            for u in units:
                try:
                    _run_unit(fn, u, out, int(os.environ.get("RANK", "0")))
                except Exception as err:  # the others still run; reported together below
                    failures.append((u, err))
                if bar is not None:
                    bar.update(1)
        else:
            _pool(fn, units, out, workers, failures, bar)
    finally:
        if bar is not None:
            bar.close()
    if failures:
        unit, first = failures[0]
        raise SweepError(f"{len(failures)} of {len(units)} units failed (finished ones are kept; "
                         f"rerun to redo the rest); first: {unit}: {type(first).__name__}: {first}"
                         ) from first


def _pool(fn: UnitFn, units: list[dict], out: Path, workers: int, failures: list, bar: Any) -> None:
    """Units over ``workers`` spawned processes, each with cores / workers torch threads."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    with concurrent.futures.ProcessPoolExecutor(
        max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
        initializer=_worker_init, initargs=(max(1, cores // workers), os.getpid()),
    ) as pool:
        futures = {pool.submit(_run_unit, fn, u, out, 0): u for u in units}
        for fut in concurrent.futures.as_completed(futures):
            if fut.exception() is not None:
                failures.append((futures[fut], fut.exception()))
            if bar is not None:
                bar.update(1)


def gather_sweep(out_dir: str | Path, units: list[dict], *, write: bool = True) -> pd.DataFrame:
    """One table of the units' rows (checked against their manifests) + ``unit_id`` and unit keys.

    Raises:
        SweepError: a unit is unfinished or its parquet does not match its manifest's sha256.
    """
    out = Path(out_dir)
    ids = _check_units(units)
    missing = [u for u, i in zip(units, ids, strict=True) if not _finished(out, i)]
    if missing:
        raise SweepError(f"{len(missing)} of {len(units)} units are unfinished (e.g. {missing[:3]}); "
                         "rerun the sweep to compute them")
    frames = []
    for unit, uid in zip(units, ids, strict=True):
        redo = f"delete units/{uid}.json and units/{uid}.parquet in {out} and rerun"
        meta = read_json(out / "units" / f"{uid}.json", remedy=redo)
        data = (out / "units" / f"{uid}.parquet").read_bytes()
        if hashlib.sha256(data).hexdigest() != meta.get("sha256") or meta.get("unit") != unit:
            raise SweepError(f"unit {unit} ({uid}) in {out} is corrupt or of another unit; delete "
                             f"units/{uid}.json and units/{uid}.parquet and rerun")
        frame = pd.read_parquet(out / "units" / f"{uid}.parquet")
        extra = {"unit_id": uid, **{k: v for k, v in unit.items() if k not in frame.columns}}
        for k, v in extra.items():
            frame[k] = [v] * len(frame)
        frames.append(frame)
    table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    if write:
        write_bytes(out / "results.parquet", table.to_parquet(index=False))
    return table


def run_sweep(units: list[dict], fn: UnitFn, out_dir: str | Path, *, rank: int | None = None,
              world_size: int | None = None, local_workers: int = 1, progress: bool = True
              ) -> pd.DataFrame:
    """Run every unfinished unit once, spread as the module docstring says; gather one table.

    Args:
        units: JSON-able dicts of overrides, all different.
        fn: ``fn(unit, workdir) -> DataFrame``; a module-level function when
            ``local_workers > 1`` (spawned processes import it by name).
        out_dir: the sweep folder (shared by all ranks).
        rank, world_size: explicit placement without a process group (both or neither).
        local_workers: processes without torchrun.
        progress: a tqdm bar on rank 0.

    Returns:
        The gathered table (``out_dir/results.parquet``); on every rank under torchrun; with
        explicit rank / world_size only once every unit has finished (else the finished ones,
        with a warning, and nothing written).
    """
    ids = _check_units(units)
    out = Path(out_dir)
    if (rank is None) != (world_size is None):
        raise ValueError("give both rank and world_size, or neither")
    if local_workers < 1:
        raise ValueError(f"local_workers must be >= 1, got {local_workers}")
    if rank is not None and world_size is not None:
        if not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got {rank}, {world_size}")
        mine = [u for k, (u, i) in enumerate(zip(units, ids, strict=True))
                if k % world_size == rank and not _finished(out, i)]
        for u in mine:
            _run_unit(fn, u, out, rank)
        done = [u for u, i in zip(units, ids, strict=True) if _finished(out, i)]
        if len(done) < len(units):
            warnings.warn(f"{len(units) - len(done)} units of other ranks are unfinished; the table "
                          "holds the finished ones; call gather_sweep(out_dir, units) later", stacklevel=2)
            return gather_sweep(out, done, write=False)
        return gather_sweep(out, units, write=rank == 0)
    ctx = init_distributed(device="cpu", backend="gloo")
    if ctx.initialized_here:
        torch.set_num_threads(default_threads())
    try:
        pending = None
        if ctx.rank == 0:
            write_json({"units": units, "unit_ids": ids}, out / "sweep.json")
            pending = [u for u, i in zip(units, ids, strict=True) if not _finished(out, i)]
        pending = broadcast(pending, ctx)
        assert pending is not None
        if ctx.world_size == 1:
            _local(fn, pending, out, local_workers, progress)
        else:
            _local(fn, pending[ctx.rank::ctx.world_size], out, 1, progress and ctx.rank == 0)
        if ctx.distributed:
            torch.distributed.barrier()
        table = gather_sweep(out, units, write=True) if ctx.rank == 0 else None
        if ctx.distributed:
            torch.distributed.barrier()
        return table if table is not None else pd.read_parquet(out / "results.parquet")
    finally:
        if ctx.initialized_here:
            torch.distributed.destroy_process_group()
