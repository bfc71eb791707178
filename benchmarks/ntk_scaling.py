"""Scaling of the structured engine in N: MiniLM full fine-tuning trace kernel (issue 4, item 4).

For N in 64, 128, 256, 512, 1024 Rotten Tomatoes sentences (padded to 32 tokens, C = 2), the
trace kernel (N, N) of all parameters, float32, ``memory_budget`` 6 GiB; each N in a fresh
process (time of the call after a warm-up on 2 examples, peak RSS of the process, and the
engine's split of the time into captures and pairwise contractions). Resumable: results are
written atomically after each N and N already recorded are skipped (``--force`` re-runs).

    .venv/bin/python benchmarks/ntk_scaling.py                 # all N not yet recorded
    .venv/bin/python benchmarks/ntk_scaling.py --n 64 128      # some N
    .venv/bin/python benchmarks/ntk_scaling.py --plot-only     # redraw from the JSON

Expected exponent. Per tile of ``n`` examples the capture (one forward, one backward batched
over C) costs ``a n``: all captures cost ``a N`` times the number of passes over the data (1
while every tile's features fit in half the budget, about ``N / tile`` otherwise). The
pairwise contractions cost ``b N^2 / 2`` (blocks on and above the diagonal). So ``t = a' N +
b' N^2``: slope 1 while captures dominate, 2 once contractions do; the local slope between
two N is ``1 + f`` roughly, with ``f`` the contraction share of the time. The plot shows the
fitted slope and the lines of slope 1 and 2 through the first point; the markdown gives each
N's regime from the measured split.
Results: ``benchmarks/results/ntk_scaling.{json,md,png,pdf}``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

from _common import git_commit, write_atomic

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
JSON = RESULTS / "ntk_scaling.json"
SIZES = (64, 128, 256, 512, 1024)
BUDGET = 6 * 2**30
TIMEOUT = 3600
THREADS = int(os.environ.get("NTK_BENCH_THREADS", "1"))
"""Torch threads per measurement: 1 by default, because on a shared, oversubscribed machine
two OpenMP threads stall on each other's barriers (times then vary by 10x); set
NTK_BENCH_THREADS to use more on a quiet one."""


def measure(n: int) -> dict:
    """One N in this process: seconds, the engine's time split, kernel checks."""
    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from ntk_structured import _minilm

    from ntk._structured import structured_kernels
    from ntk.kernels import structured_ntk

    torch.set_num_threads(THREADS)
    model, x = _minilm(n)
    warm = {k: v[:2] for k, v in x.items()}
    structured_ntk(model, warm, params="all", output="trace", dtype=torch.float32)
    start, cpu = time.perf_counter(), time.process_time()
    result, timings = structured_kernels(model, x, None, {"k": "all"}, output="trace",
                                         dtype=torch.float32, memory_budget=BUDGET)
    k = result["k"]
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    assert isinstance(k, torch.Tensor) and k.shape == (n, n) and bool(torch.isfinite(k).all())
    asym = float((k - k.T).abs().max() / k.abs().max())
    return {"n": n, "seconds": seconds, "cpu_seconds": cpu, "stats": dataclasses.asdict(timings),
            "asymmetry": asym, "diag_mean": float(k.diagonal().mean())}


def run_one(n: int) -> dict:
    """``measure(n)`` in a fresh subprocess, with its peak resident memory."""
    cmd = [sys.executable, __file__, "--one", str(n)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, env=env,
                              cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"n": n, "error": f"timeout after {TIMEOUT} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"n": n, "error": proc.stderr[-800:]}
    return json.loads(lines[-1])


def _load() -> dict:
    if JSON.exists():
        return json.loads(JSON.read_text())
    return {"meta": {}, "runs": {}}


def _meta() -> dict:
    import torch

    commit = git_commit()
    return {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "git_commit": commit, "machine": platform.platform(), "cpus": os.cpu_count(),
            "torch": torch.__version__, "dtype": "float32", "output": "trace", "params": "all",
            "memory_budget_bytes": BUDGET, "torch_threads": THREADS,
            "load_average_at_start": round(os.getloadavg()[0], 1)}


def fit(points: list[tuple[int, float]]) -> dict:
    """Least-squares slope of log t against log N, and ``t = a N + b N^2`` (non-negative)."""
    import numpy as np

    ns = np.array([p[0] for p in points], dtype=float)
    ts = np.array([p[1] for p in points], dtype=float)
    out: dict = {}
    if len(ns) >= 2:
        out["slope"] = float(np.polyfit(np.log(ns), np.log(ts), 1)[0])
        from scipy.optimize import nnls

        coef, _ = nnls(np.stack([ns, ns**2], 1) / ts[:, None], np.ones_like(ts))
        out["a"], out["b"] = float(coef[0]), float(coef[1])
    return out


def plot(result: dict) -> None:
    """Log-log plot of time against N, fitted slope and the slopes 1 and 2 (png and pdf)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = sorted((r["n"], r["cpu_seconds"]) for r in result["runs"].values() if "seconds" in r)
    walls = sorted((r["n"], r["seconds"]) for r in result["runs"].values() if "seconds" in r)
    if not pts:
        return
    f = fit(pts)
    fig, ax = plt.subplots(figsize=(5.5, 4))
    ns, ts = zip(*pts, strict=True)
    ax.loglog(ns, ts, "o-", label=f"CPU seconds (fitted slope {f.get('slope', float('nan')):.2f})")
    ax.loglog(*zip(*walls, strict=True), "s", color="C2", alpha=.6, label="wall seconds (shared machine)")
    grid = [ns[0] * 2 ** (i / 4) for i in range(int(4 * math.log2(max(SIZES) / ns[0])) + 1)]
    for k, style in ((1, ":"), (2, "--")):
        ax.loglog(grid, [ts[0] * (g / ns[0]) ** k for g in grid], style, color="grey",
                  label=f"slope {k} through the first point")
    if "a" in f:
        ax.loglog(grid, [f["a"] * g + f["b"] * g * g for g in grid], "-", color="C1", alpha=.5,
                  label="fit a N + b N$^2$")
    ax.set_xlabel("N (examples)")
    ax.set_ylabel("seconds (1 thread)")
    ax.set_title("MiniLM full fine-tuning trace eNTK, structured engine")
    ax.legend(fontsize=8)
    fig.tight_layout()
    for ext in ("png", "pdf"):
        tmp = RESULTS / f"ntk_scaling.tmp.{ext}"
        fig.savefig(tmp)
        os.replace(tmp, RESULTS / f"ntk_scaling.{ext}")
    plt.close(fig)


def table(result: dict) -> str:
    runs = sorted((r for r in result["runs"].values()), key=lambda r: r["n"])
    pts = [(r["n"], r["cpu_seconds"]) for r in runs if "seconds" in r]
    f = fit(pts)
    rows = []
    for r in runs:
        if "seconds" not in r:
            rows.append(f"| {r['n']} | {r.get('error', '')[:60]!r} | | | | | | |")
            continue
        st = r["stats"]
        cap, con = st["capture_cpu_seconds"], st["contract_cpu_seconds"]
        share = con / max(1e-9, cap + con)
        regime = "pairwise (N^2)" if share > 0.5 else "per-example (N)"
        rows.append(f"| {r['n']} | {r['cpu_seconds']:.1f} | {r['seconds']:.1f} | "
                    f"{r['peak_rss_mb']:.0f} | {cap:.1f} ({st['captures']} captures of tiles of "
                    f"{st['tile']}) | {con:.1f} | {share:.2f} | {regime} |")
    recap = [f"N={r['n']}: {r['stats']['captures'] * r['stats']['tile'] / r['n']:.1f} passes"
             for r in runs if "seconds" in r and not r["stats"]["keep_all"]]
    recapture = ("- re-captures: where the features of all tiles do not fit in half the budget "
                 "(keep_all false) tiles are captured again when needed, so the captures grow "
                 "like N^2 / tile too (" + "; ".join(recap) + " over the data instead of 1)"
                 if recap else "- every N kept the features of all tiles (one pass over the data)")
    missing = [n for n in SIZES if str(n) not in result["runs"]
               or "seconds" not in result["runs"][str(n)]]
    meta = "\n".join(f"- {k}: {v}" for k, v in result["meta"].items())
    fitted = (f"- fitted log-log slope over N = {', '.join(str(p[0]) for p in pts)}: "
              f"{f['slope']:.2f}; fit t = a N + b N^2: a = {f['a']:.3g} s, b = {f['b']:.3g} s "
              f"(N^2 term equals the N term at N = {f['a'] / f['b']:.0f})" if "a" in f and f["b"]
              else "- fit: not enough points")
    return f"""# Structured eNTK scaling in N (issue 4, item 4)

{meta}

MiniLM (offline all-MiniLM-L6-v2), Rotten Tomatoes sentences padded to 32 tokens, C = 2,
all parameters, trace kernel (N, N), float32, memory_budget 6 GiB. Each N runs in a fresh
process after a warm-up call on 2 examples, with `torch_threads` threads; peak RSS is that
process's ru_maxrss (model, data and interpreter included). The machine is shared (2 cores,
other jobs running): wall times are noisy; CPU seconds (one thread, `time.process_time`) measure
the work, and the slope is fitted to them.

| N | CPU s | wall s | peak RSS (MB) | captures CPU s | contractions CPU s | contraction share | regime |
|---|---|---|---|---|---|---|---|
{chr(10).join(rows)}

{fitted}
{recapture}
- expected: t = a' N + b' N^2 (captures linear in N per pass over the data, contractions
  quadratic): slope 1 while captures dominate, 2 once contractions do; see the plot
  `ntk_scaling.png` (slope 1 and 2 lines through the first point).
- not measured: {', '.join(map(str, missing)) or 'none'}
"""


def main(sizes: list[int], force: bool) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    result = _load()
    result["meta"] = _meta()
    for n in sizes:
        if str(n) in result["runs"] and "seconds" in result["runs"][str(n)] and not force:
            print(f"N={n}: recorded, skipped", flush=True)
            continue
        result["runs"][str(n)] = run_one(n)
        print(json.dumps(result["runs"][str(n)]), flush=True)
        write_atomic(JSON, json.dumps(result, indent=2) + "\n")
        write_atomic(RESULTS / "ntk_scaling.md", table(result))
        plot(result)
    write_atomic(RESULTS / "ntk_scaling.md", table(result))
    plot(result)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--one", type=int, help="run one N in this process and print JSON")
    parser.add_argument("--n", type=int, nargs="*", default=list(SIZES), help="sizes to run")
    parser.add_argument("--force", action="store_true", help="re-run sizes already recorded")
    parser.add_argument("--plot-only", action="store_true", help="redraw from the JSON")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    if args.one:
        out = measure(args.one)
        out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(out))
    elif args.plot_only:
        res = _load()
        write_atomic(RESULTS / "ntk_scaling.md", table(res))
        plot(res)
    else:
        main(args.n, args.force)
