"""Kernel jobs and sweeps under torchrun (2 gloo ranks on the CPU): same kernel, resumable.

The factories below are what the launched ranks import (``--model test_distributed:tiny_model``,
with ``tests/`` on ``PYTHONPATH``); ``python tests/test_distributed.py OUT`` is the sweep entry.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-12
N, TILE = 10, 3  # a 4 x 4 grid: 10 upper tiles
ARGS = ["--model", "test_distributed:tiny_model", "--dataset", "test_distributed:tiny_data",
        "--examples", str(N), "--tile", str(TILE), "--output", "full", "--params", "all",
        "--model-dtype", "float64", "--dtype", "float64", "--no-progress", "--threads", "1"]


# ------------------------------------------------------------------ factories the ranks import
def tiny_model(*, num_labels: int, dtype: torch.dtype, device: torch.device, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, num_labels))
    return net.to(device=device, dtype=dtype).eval()


def tiny_data(*, split: str, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 * seed + ("train", "validation", "test").index(split))
    return torch.randn(16, 4, generator=g, dtype=torch.float64)


def sweep_unit(unit: dict, workdir: Path) -> pd.DataFrame:
    rank = int(os.environ.get("RANK", "0"))
    with (workdir / "calls").open("a") as f:  # one character per call of this unit
        f.write("x")
    if unit.get("fail") and not (workdir / "heal").exists():
        raise RuntimeError("unit failed on purpose")
    return pd.DataFrame({"value": [unit["a"] * 10 + unit["b"]], "rank": [rank], "pid": [os.getpid()]})


# ------------------------------------------------------------------ helpers
def _env() -> dict:
    skip = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "NTK_TILES_STOP_AFTER")
    env = {k: v for k, v in os.environ.items() if k not in skip}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "tests"), str(ROOT), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    return env


def _torchrun(nproc: int, *args: str, stop_after: int | None = None) -> subprocess.CompletedProcess:
    env = _env()
    if stop_after is not None:
        env["NTK_TILES_STOP_AFTER"] = str(stop_after)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def _kernel_job(nproc: int, out: Path, stop_after: int | None = None) -> subprocess.CompletedProcess:
    return _torchrun(nproc, "-m", "experiments.distributed.kernel_job", *ARGS, "--out", str(out),
                     stop_after=stop_after)


def _in_process(out: Path, monkeypatch, stop_after: int | None = None) -> int:
    """The same job in this process (one rank, no torchrun); returns the exit code."""
    from experiments.distributed.kernel_job import main

    monkeypatch.syspath_prepend(str(ROOT / "tests"))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    if stop_after is None:
        monkeypatch.delenv("NTK_TILES_STOP_AFTER", raising=False)
    else:
        monkeypatch.setenv("NTK_TILES_STOP_AFTER", str(stop_after))
    threads = torch.get_num_threads()
    try:
        return main([*ARGS, "--out", str(out)])
    finally:
        torch.set_num_threads(threads)


def _reference() -> torch.Tensor:
    import ntk

    x = tiny_data(split="train", seed=0)[:N]
    model = tiny_model(num_labels=2, dtype=torch.float64, device=torch.device("cpu"), seed=0)
    return ntk.empirical_ntk(model, x, params="all", output="full")


def _finished_tiles(out: Path) -> dict[str, int]:
    return {p.stem: p.with_suffix(".safetensors").stat().st_mtime_ns for p in (out / "tiles").glob("*.json")}


def _last_run(out: Path) -> dict:
    return json.loads(sorted((out / "runs").glob("*.json"))[-1].read_text())


def _check(out: Path) -> None:
    kernel = torch.from_numpy(np.load(out / "kernel.npy"))
    expected = _reference()
    assert kernel.shape == expected.shape == (N, N, 2, 2)
    assert (kernel - expected).norm() <= TOL * expected.norm()


# ------------------------------------------------------------------ tests
def test_parse_sweep_is_the_cartesian_product():
    from experiments.distributed.sweep import parse_sweep

    units = parse_sweep(["degree=1,5,15", "seed=0,1", "lr=1e-3", "task=rotten_tomatoes,imdb"])
    assert len(units) == 12 and units[0] == {"degree": 1, "seed": 0, "lr": 0.001, "task": "rotten_tomatoes"}
    assert units[-1] == {"degree": 15, "seed": 1, "lr": 0.001, "task": "imdb"}
    assert parse_sweep(["flag=true,null"]) == [{"flag": True}, {"flag": None}]
    for bad, match in [(["degree"], "key=v1"), (["a=1", "a=2"], "twice"), (["a=1,"], "empty")]:
        with pytest.raises(ValueError, match=match):
            parse_sweep(bad)


def test_sweep_resumes_and_redoes_only_unfinished_units(tmp_path):
    from experiments.distributed.sweep import SweepError, parse_sweep, run_sweep, unit_id

    units = [*parse_sweep(["a=0,1", "b=0,1"]), {"a": 9, "b": 9, "fail": True}]
    with pytest.raises(SweepError, match="1 of 5 units failed"):
        run_sweep(units, sweep_unit, tmp_path, progress=False)
    assert len(list((tmp_path / "units").glob("*.parquet"))) == 4
    (tmp_path / "units" / unit_id(units[-1]) / "heal").touch()
    table = run_sweep(units, sweep_unit, tmp_path, progress=False)
    assert sorted(table["value"]) == [0, 1, 10, 11, 99] and table["unit_id"].is_unique
    calls = {unit_id(u): (tmp_path / "units" / unit_id(u) / "calls").read_text() for u in units}
    assert sorted(calls.values()) == ["x", "x", "x", "x", "xx"]  # only the failed unit ran twice
    assert pd.read_parquet(tmp_path / "results.parquet").equals(table)
    with pytest.raises(ValueError, match="twice"):
        run_sweep([units[0], units[0]], sweep_unit, tmp_path)


def test_sweep_with_explicit_ranks_and_a_corrupt_unit(tmp_path):
    from experiments.distributed.sweep import SweepError, gather_sweep, parse_sweep, run_sweep, unit_id

    units = parse_sweep(["a=0,1,2", "b=0"])
    with pytest.warns(UserWarning, match="unfinished"):
        part = run_sweep(units, sweep_unit, tmp_path, rank=1, world_size=2)
    assert list(part["value"]) == [10]
    table = run_sweep(units, sweep_unit, tmp_path, rank=0, world_size=2)
    assert sorted(table["value"]) == [0, 10, 20]
    (tmp_path / "units" / f"{unit_id(units[0])}.parquet").write_bytes(b"garbage")
    with pytest.raises(SweepError, match="corrupt"):
        gather_sweep(tmp_path, units)


def test_kernel_config_validation_and_parser():
    import argparse

    from experiments.distributed.kernel_job import KernelJobConfig, _config, add_kernel_parser

    for bad, match in [({"n": 0}, "n must"), ({"output": "mean"}, "output must"),
                       ({"dtype": "bfloat16"}, "dtype must"), ({"split2": "dev"}, "split2 must"),
                       ({"device": "tpu"}, "device must"), ({"memory_budget": -1.0}, "memory_budget")]:
        with pytest.raises(ValueError, match=match):
            KernelJobConfig(**bad)
    parser = argparse.ArgumentParser()
    add_kernel_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["kernel", "--n", "12", "--tile", "5", "--split2", "test",
                              "--memory-budget-gb", "2"])
    cfg = _config(args)
    assert (cfg.n, cfg.tile_size, cfg.split2, cfg.memory_budget) == (12, 5, "test", 2 * 2**30)
    assert args.func.__name__ == "run_kernel_command"


@pytest.mark.realmodel
@pytest.mark.slow
def test_named_model_and_data_set(tmp_path, minilm_path):
    from conftest import RTOL, assert_close_rel

    import ntk
    from experiments.distributed.kernel_job import (
        KernelJobConfig,
        load_job_inputs,
        load_job_model,
        run_kernel_job,
    )

    cfg = KernelJobConfig(n=5, offset=3, split2="validation", n2=3, tile_size=2, params="bias", max_length=16,
                          progress=False, threads=torch.get_num_threads())
    path = run_kernel_job(cfg, tmp_path)
    x1, x2, labels = load_job_inputs(cfg)
    assert labels == 2 and x1["input_ids"].shape[1] == x2["input_ids"].shape[1] <= 16
    model = load_job_model(cfg, labels, torch.device("cpu"))
    expected = ntk.empirical_ntk(model, x1, x2, params="bias", output="trace")
    assert_close_rel(torch.from_numpy(np.load(path)), expected, RTOL[torch.float32])


@pytest.mark.distributed
def test_sweep_over_local_processes(tmp_path):
    from experiments.distributed.sweep import parse_sweep, run_sweep

    units = parse_sweep(["a=0,1,2", "b=0,1"])
    table = run_sweep(units, sweep_unit, tmp_path, local_workers=2, progress=False)
    assert sorted(table["value"]) == [0, 1, 10, 11, 20, 21]
    assert os.getpid() not in set(table["pid"])  # ran in the spawned workers


@pytest.mark.distributed
def test_two_ranks_equal_single_process(tmp_path, monkeypatch):
    result = _kernel_job(2, tmp_path / "two")
    assert result.returncode == 0, result.stderr[-3000:]
    run = _last_run(tmp_path / "two")
    assert run["world_size"] == 2 and run["backend"] == "gloo"
    assert sorted(len(r["computed"]) for r in run["reports"]) == [5, 5]
    assert _in_process(tmp_path / "one", monkeypatch) == 0
    two = np.load(tmp_path / "two" / "kernel.npy")
    one = np.load(tmp_path / "one" / "kernel.npy")
    np.testing.assert_allclose(two, one, rtol=0, atol=TOL * np.abs(two).max())
    _check(tmp_path / "two")


@pytest.mark.distributed
def test_killed_two_ranks_restarted_on_one(tmp_path, monkeypatch):
    out = tmp_path / "job"
    result = _kernel_job(2, out, stop_after=1)
    assert result.returncode != 0 and not (out / "kernel.npy").exists()
    before = _finished_tiles(out)
    assert 1 <= len(before) <= 2
    assert _in_process(out, monkeypatch) == 0
    (report,) = _last_run(out)["reports"]
    assert len(report["computed"]) == 10 - len(before) and report["finished_before"] == len(before)
    assert {f"r{i:05d}_c{j:05d}" for i, j in report["computed"]}.isdisjoint(before)
    after = _finished_tiles(out)
    assert all(after[name] == mtime for name, mtime in before.items())  # not rewritten
    _check(out)


@pytest.mark.distributed
def test_killed_one_rank_restarted_on_two(tmp_path, monkeypatch):
    out = tmp_path / "job"
    assert _in_process(out, monkeypatch, stop_after=3) == 3
    before = _finished_tiles(out)
    assert len(before) == 3
    result = _kernel_job(2, out)
    assert result.returncode == 0, result.stderr[-3000:]
    reports = _last_run(out)["reports"]
    computed = [tuple(ij) for r in reports for ij in r["computed"]]
    assert sorted(len(r["computed"]) for r in reports) == [3, 4]  # the 7 missing, round-robin
    assert len(set(computed)) == 7 and {f"r{i:05d}_c{j:05d}" for i, j in computed}.isdisjoint(before)
    _check(out)


@pytest.mark.distributed
def test_sweep_over_two_ranks_gathers_every_unit_once(tmp_path):
    out = tmp_path / "sweep"
    result = _torchrun(2, str(Path(__file__).resolve()), str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    table = pd.read_parquet(out / "results.parquet")
    assert sorted(table["value"]) == [0, 1, 10, 11, 20, 21]
    assert table["unit_id"].is_unique and set(table["rank"]) == {0, 1}
    manifests = [json.loads(p.read_text()) for p in (out / "units").glob("*.json")]
    assert len(manifests) == 6 and len({m["pid"] for m in manifests}) == 2


if __name__ == "__main__":  # the sweep entry launched by torchrun above
    from experiments.distributed.sweep import parse_sweep, run_sweep

    run_sweep(parse_sweep(["a=0,1,2", "b=0,1"]), sweep_unit, Path(sys.argv[1]), progress=False)
