"""Benchmark of tiled kernels on torch.distributed (issue 7): 1 rank versus 2 ranks, this machine.

A MiniLM trace kernel over all parameters (full fine-tuning), N Rotten Tomatoes training
sentences padded / truncated to 32 tokens, float32 model, float64 kernel, tiles of 64 examples,
launched twice with ``torchrun --standalone``: 1 rank with 2 torch threads, then 2 ranks with 1
thread each (gloo on the CPU), each into a fresh folder. Times are read from the jobs' run
records (``tiles``: the slowest rank's tile phase; ``total``: the job inside the ranks, loading
included) and from the launcher (``launch``: torchrun start to exit, interpreter start-up
included). ``--serial-baseline`` adds 1 rank with 1 thread. Efficiency ``e = t1 / (2 t2)``
(1 = perfect). Both kernels must agree to 1e-4 (the float32 model sums in another order with 1
and 2 threads).

    .venv/bin/python benchmarks/ntk_distributed.py               # N = 512, the recorded run
    .venv/bin/python benchmarks/ntk_distributed.py --n 64 --tile 16 --serial-baseline  # smoke run

Results: ``benchmarks/results/ntk_distributed.{json,md}`` (written atomically).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import git_commit, write_atomic

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
N, TILE, MAX_LENGTH, CORES = 512, 64, 32, 2
TIMEOUT = 4 * 3600


def _job_args(n: int, tile: int) -> list[str]:
    return ["-m", "experiments.distributed.kernel_job", "--model", "minilm", "--dataset", "rotten_tomatoes",
            "--examples", str(n), "--max-length", str(MAX_LENGTH), "--params", "all", "--output", "trace",
            "--tile", str(tile), "--model-dtype", "float32", "--dtype", "float64", "--device", "cpu",
            "--no-progress"]


def _launch(ranks: int, threads: int, n: int, tile: int, out: Path) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
           *_job_args(n, tile), "--threads", str(threads), "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    load = os.getloadavg()[0]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    launch = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{ranks}-rank job failed:\n{proc.stderr[-4000:]}")
    (record,) = [json.loads(p.read_text()) for p in (out / "runs").glob("*.json")]
    return {"ranks": ranks, "threads_per_rank": threads, "launch_s": launch, **{
        f"{k}_s": v for k, v in record["seconds"].items()}, "tiles_per_rank": [
        len(r["computed"]) for r in record["reports"]], "load_avg_1min_before": load,
        "command": " ".join(["torchrun", *cmd[3:]]).replace(str(out), "OUT")}


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _markdown(res: dict) -> str:
    lines = ["# Tiled kernels on torch.distributed: 1 versus 2 ranks (issue 7)", ""]
    lines += [f"- {k}: {res[k]}" for k in ("date", "git_commit", "machine", "cpus", "python", "torch",
                                           "transformers", "numpy")]
    lines += [f"- setup: {res['setup']}", "",
              "| ranks | threads/rank | tiles per rank | tiles (s) | job total (s) | launch (s) | "
              "load avg before |", "|---|---|---|---|---|---|---|"]
    for r in res["runs"]:
        lines.append(f"| {r['ranks']} | {r['threads_per_rank']} | {r['tiles_per_rank']} | "
                     f"{r['tiles_s']:.2f} | {r['total_s']:.2f} | {r['launch_s']:.2f} | "
                     f"{r['load_avg_1min_before']:.2f} |")
    e = res["efficiency"]
    lines += ["", f"- efficiency t1 / (2 t2): tile phase {e['tiles']:.3f}, job total {e['total']:.3f}, "
              f"launch {e['launch']:.3f}",
              f"- kernels of 1 and 2 ranks: max |K1 - K2| / max |K1| = {res['max_rel_diff']:.3e}",
              "", "Commands (OUT a fresh folder):", ""]
    lines += [f"    {r['command']}" for r in res["runs"]]
    if res.get("note"):
        lines += ["", res["note"]]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=N, help="examples (the recorded run uses 512)")
    parser.add_argument("--tile", type=int, default=TILE)
    parser.add_argument("--note", default="", help="a line added to the results (e.g. machine load)")
    parser.add_argument("--serial-baseline", action="store_true",
                        help="also run 1 rank with 1 thread (tells thread from rank scaling apart)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ntk_distributed_"))
    try:
        runs = [_launch(1, CORES, args.n, args.tile, work / "w1"),
                _launch(2, CORES // 2, args.n, args.tile, work / "w2")]
        if args.serial_baseline:
            runs.append(_launch(1, 1, args.n, args.tile, work / "w1t1"))
        k1, k2 = np.load(work / "w1" / "kernel.npy"), np.load(work / "w2" / "kernel.npy")
        diff = float(np.abs(k1 - k2).max() / np.abs(k1).max())
    finally:
        shutil.rmtree(work, ignore_errors=True)
    one, two = runs[:2]
    res = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git_commit(), "machine": platform.platform(), "cpus": os.cpu_count(),
        "processor": platform.processor(), "python": platform.python_version(),
        "torch": _version("torch"), "transformers": _version("transformers"), "numpy": _version("numpy"),
        "setup": (f"MiniLM (all-MiniLM-L6-v2, 2 labels), all parameters, trace kernel, N={args.n} Rotten "
                  f"Tomatoes train sentences, max_length {MAX_LENGTH}, tile {args.tile}, float32 model, "
                  "float64 kernel, CPU, gloo"),
        "n": args.n, "tile": args.tile, "runs": runs, "max_rel_diff": diff,
        "efficiency": {k: one[f"{k}_s"] / (2 * two[f"{k}_s"]) for k in ("tiles", "total", "launch")},
        "note": args.note,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_atomic(RESULTS / "ntk_distributed.json", json.dumps(res, indent=2) + "\n")
    write_atomic(RESULTS / "ntk_distributed.md", _markdown(res))
    print(_markdown(res))
    return 0 if diff < 1e-4 else 1  # float32 model: 1 vs 2 threads reorder its sums


if __name__ == "__main__":
    raise SystemExit(main())
