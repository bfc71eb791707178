"""Scaling of the structured engine in N: MiniLM full fine-tuning trace and full kernels.

For N in 64 ... 1024 Rotten Tomatoes sentences (padded to 32 tokens, C = 2), the trace kernel
(N, N) and the full kernel (N, N, 2, 2) of all parameters, float32, ``memory_budget`` 6 GiB;
each (output, N) in a fresh process (time of the call after a warm-up on 2 examples, the
engine's split of the time into captures and pairwise contractions, CPU seconds per kernel
entry, and memory). Memory: the call's working memory is the largest resident set sampled
every 2 ms during the call less the resident set just before it (model, data and interpreter
excluded); the engine's own estimate (``Timings.estimated_peak_bytes``, the memory plan) is
set beside it, and should be within 25 %. Resumable: results are written atomically after each
run and runs already recorded are skipped (``--force`` re-runs).

    .venv/bin/python benchmarks/ntk_scaling.py                        # all runs not recorded
    .venv/bin/python benchmarks/ntk_scaling.py --n 256 512 --output full
    .venv/bin/python benchmarks/ntk_scaling.py --plot-only            # redraw from the JSON

Expected exponent. Per tile of ``n`` examples the capture (one forward, one backward batched
over C) costs ``a n``: all captures cost ``a N`` times the number of passes over the data (1
while every tile's features fit in half the budget, about ``N / tile`` otherwise). The
pairwise contractions cost ``b N^2 / 2`` (blocks on and above the diagonal). So ``t = a' N +
b' N^2``: slope 1 while captures dominate, 2 once contractions do. The plot shows the fitted
slope of each output and the lines of slope 1 and 2; the markdown gives each run's regime
from the measured split.
Results: ``benchmarks/results/ntk_scaling.{json,md,png,pdf}``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

from _common import git_commit, peak_rss_mb, proc_status_kb, provenance, write_atomic

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
JSON = RESULTS / "ntk_scaling.json"
SIZES = (64, 128, 256, 512, 1024)
OUTPUTS = ("trace", "full")
SAMPLE_SECONDS = 0.002
BUDGET = 6 * 2**30
TIMEOUT = 3600
THREADS = int(os.environ.get("NTK_BENCH_THREADS", "1"))
"""Torch threads per measurement: 1 by default, because on a shared, oversubscribed machine
two OpenMP threads stall on each other's barriers (times then vary by 10x); set
NTK_BENCH_THREADS to use more on a quiet one."""


def _rss_bytes() -> int:
    """Resident set of this process now (``VmRSS``)."""
    return (proc_status_kb("VmRSS") or 0) * 1024


class _PeakSampler:
    """The largest resident set seen every :data:`SAMPLE_SECONDS` while in the block (a
    thread; torch's kernels release the GIL, so it runs during the work)."""

    def __enter__(self) -> _PeakSampler:
        import threading

        self.peak, self._stop = _rss_bytes(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_SECONDS):
            self.peak = max(self.peak, _rss_bytes())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())


def measure(n: int, output: str) -> dict:
    """One (output, N) in this process: seconds, the engine's time split, memory, checks."""
    import gc

    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from ntk_structured import _minilm

    from ntk._structured import structured_kernels
    from ntk.kernels import structured_ntk

    torch.set_num_threads(THREADS)
    model, x = _minilm(n)
    warm = {k: v[:2] for k, v in x.items()}
    structured_ntk(model, warm, params="all", output=output, dtype=torch.float32)
    gc.collect()
    before = _rss_bytes()
    with _PeakSampler() as sampler:
        start, cpu = time.perf_counter(), time.process_time()
        result, timings = structured_kernels(model, x, None, {"k": "all"}, output=output,
                                             dtype=torch.float32, memory_budget=BUDGET)
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    k = result["k"]
    shape = (n, n) if output == "trace" else (n, n, 2, 2)
    assert isinstance(k, torch.Tensor) and k.shape == shape and bool(torch.isfinite(k).all())
    kt = k if output == "trace" else k.permute(1, 0, 3, 2)
    asym = float((k - kt).abs().max() / k.abs().max())
    return {"n": n, "output": output, "git_commit": git_commit(), "seconds": seconds, "cpu_seconds": cpu,
            "entries": k.numel(), "stats": dataclasses.asdict(timings), "asymmetry": asym,
            "rss_before_mb": before / 2**20, "working_peak_mb": (sampler.peak - before) / 2**20,
            "estimated_peak_mb": timings.estimated_peak_bytes / 2**20}


def run_one(n: int, output: str) -> dict:
    """``measure(n, output)`` in a fresh subprocess, with its peak resident memory."""
    cmd = [sys.executable, __file__, "--one", str(n), "--output", output]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, env=env,
                              cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"n": n, "output": output, "error": f"timeout after {TIMEOUT} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"n": n, "output": output, "error": proc.stderr[-800:]}
    return json.loads(lines[-1])


def _load() -> dict:
    if JSON.exists():
        data = json.loads(JSON.read_text())
        # Runs before the full kernel was added are keyed by N alone: trace kernels.
        data["runs"] = {(k if "/" in k else f"trace/{k}"): {"output": "trace", **v}
                        for k, v in data.get("runs", {}).items()}
        return data
    return {"meta": {}, "runs": {}}


def _meta() -> dict:
    import torch

    return provenance(torch=torch.__version__, dtype="float32", params="all",
                      memory_budget_bytes=BUDGET, torch_threads=THREADS)


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


def _points(result: dict, output: str, key: str = "cpu_seconds") -> list[tuple[int, float]]:
    return sorted((r["n"], r[key]) for r in result["runs"].values()
                  if r.get("output") == output and "seconds" in r)


def plot(result: dict) -> None:
    """Log-log plot of CPU time against N per output, fitted slopes, slopes 1 and 2."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    drawn = False
    for i, output in enumerate(OUTPUTS):
        pts = _points(result, output)
        if not pts:
            continue
        drawn = True
        f = fit(pts)
        ns, ts = zip(*pts, strict=True)
        ax.loglog(ns, ts, "o-", color=f"C{i}",
                  label=f"{output} kernel, CPU s (fitted slope {f.get('slope', float('nan')):.2f})")
        if i == 0:
            grid = [ns[0] * 2 ** (j / 4) for j in range(int(4 * math.log2(max(SIZES) / ns[0])) + 1)]
            for k, style in ((1, ":"), (2, "--")):
                ax.loglog(grid, [ts[0] * (g / ns[0]) ** k for g in grid], style, color="grey",
                          label=f"slope {k} through the first trace point")
    if not drawn:
        plt.close(fig)
        return
    ax.set_xlabel("N (examples)")
    ax.set_ylabel("CPU seconds (1 thread)")
    ax.set_title("MiniLM full fine-tuning eNTK, structured engine")
    ax.legend(fontsize=8)
    fig.tight_layout()
    for ext in ("png", "pdf"):
        tmp = RESULTS / f"ntk_scaling.tmp.{ext}"
        fig.savefig(tmp)
        os.replace(tmp, RESULTS / f"ntk_scaling.{ext}")
    plt.close(fig)


def _row(r: dict) -> str:
    if "seconds" not in r:
        return f"| {r['output']} | {r['n']} | {r.get('error', '')[:60]!r} |" + " |" * 9
    st = r["stats"]
    cap, con = st["capture_cpu_seconds"], st["contract_cpu_seconds"]
    share = con / max(1e-9, cap + con)
    regime = "pairwise (N^2)" if share > 0.5 else "per-example (N)"
    entries = r.get("entries", r["n"] ** 2)
    if "working_peak_mb" in r:
        est, got = r["estimated_peak_mb"], r["working_peak_mb"]
        memory = f"{got:.0f} | {est:.0f} | {est / got:.2f}"
    else:
        memory = " | | "
    return (f"| {r['output']} | {r['n']} | {r['cpu_seconds']:.1f} | {r['seconds']:.1f} | "
            f"{1e6 * r['cpu_seconds'] / entries:.0f} | {cap:.1f} ({st['captures']} x "
            f"{st['tile']}) | {con:.1f} | {regime} | {r['peak_rss_mb']:.0f} | {memory} |")


HEADER = ("| output | N | CPU s | wall s | us/entry | captures CPU s (count x tile) | contractions "
          "CPU s | regime | peak RSS MB | working MB | estimate MB | estimate / working |\n"
          + "|---" * 12 + "|")


def table(result: dict) -> str:
    runs = sorted(result["runs"].values(), key=lambda r: (OUTPUTS.index(r["output"]), r["n"]))
    fits = []
    for output in OUTPUTS:
        pts = _points(result, output)
        f = fit(pts)
        if "a" in f and f["b"]:
            fits.append(f"- {output}: fitted log-log slope over N = "
                        f"{', '.join(str(p[0]) for p in pts)}: {f['slope']:.2f}; t = a N + b N^2 "
                        f"with a = {f['a']:.3g} s, b = {f['b']:.3g} s (the N^2 term equals the N "
                        f"term at N = {f['a'] / f['b']:.0f})")
    ratios = [r["estimated_peak_mb"] / r["working_peak_mb"] for r in runs
              if "working_peak_mb" in r and r["working_peak_mb"] > 0]
    within = sum(abs(q - 1) <= 0.25 for q in ratios)
    recap = [f"{r['output']} N={r['n']}: {r['stats']['captures'] * r['stats']['tile'] / r['n']:.1f}"
             for r in runs if "seconds" in r and not r["stats"]["keep_all"]]
    recapture = ("- re-captures: where the features of all tiles do not fit in half the budget "
                 "(keep_all false) tiles are captured again when needed (" + "; ".join(recap)
                 + " passes over the data instead of 1)"
                 if recap else "- every run kept the features of all tiles (one pass over the data)")
    missing = [f"{o} {n}" for o in OUTPUTS for n in SIZES
               if "seconds" not in result["runs"].get(f"{o}/{n}", {})]
    meta = "\n".join(f"- {k}: {v}" for k, v in result["meta"].items())
    by_commit: dict[str, list[str]] = {}
    for r in runs:
        by_commit.setdefault(str(r.get("git_commit", "?"))[:12], []).append(f"{r['output']} {r['n']}")
    commits = "; ".join(f"{c} ({', '.join(v)})" for c, v in by_commit.items())
    return f"""# Structured eNTK scaling in N: MiniLM, trace and full kernels

{meta}

MiniLM (offline all-MiniLM-L6-v2), Rotten Tomatoes sentences padded to 32 tokens, C = 2, all
parameters, float32, memory_budget 6 GiB; the trace kernel (N, N) and the full kernel (N, N, 2,
2). Each run is a fresh process, after a warm-up call on 2 examples, with `torch_threads`
threads. CPU seconds (`time.process_time`) measure the work; wall seconds depend on the load of
the shared machine. `us/entry`: CPU microseconds per kernel entry. Memory: `working` is the
largest resident set sampled every 2 ms during the call less the resident set just before it
(the model, data and interpreter excluded), `estimate` the engine's memory plan
(`Timings.estimated_peak_bytes`), `peak RSS` the process's whole peak.

{HEADER}
{chr(10).join(_row(r) for r in runs)}

{chr(10).join(fits) or "- fit: not enough points"}
{recapture}
- memory estimate within 25 % of the working peak: {within} of {len(ratios)} runs
- measured at commits: {commits}
- expected: t = a' N + b' N^2 (captures linear in N per pass over the data, contractions
  quadratic): slope 1 while captures dominate, 2 once contractions do (`ntk_scaling.png`).
- not measured: {', '.join(missing) or 'none'}
"""


def main(sizes: list[int], outputs: list[str], force: bool) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    result = _load()
    result["meta"] = _meta()
    for output in outputs:
        for n in sizes:
            key = f"{output}/{n}"
            if "seconds" in result["runs"].get(key, {}) and not force:
                print(f"{key}: recorded, skipped", flush=True)
                continue
            result["runs"][key] = run_one(n, output)
            print(json.dumps(result["runs"][key]), flush=True)
            write_atomic(JSON, json.dumps(result, indent=2) + "\n")
            write_atomic(RESULTS / "ntk_scaling.md", table(result))
            plot(result)
    write_atomic(RESULTS / "ntk_scaling.md", table(result))
    plot(result)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--one", type=int, help="run one N in this process and print JSON")
    parser.add_argument("--n", type=int, nargs="*", default=list(SIZES), help="sizes to run")
    parser.add_argument("--output", nargs="*", default=list(OUTPUTS), choices=OUTPUTS,
                        help="kernel layouts to run")
    parser.add_argument("--force", action="store_true", help="re-run sizes already recorded")
    parser.add_argument("--plot-only", action="store_true", help="redraw from the JSON")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    if args.one:
        out = measure(args.one, args.output[0])
        out["peak_rss_mb"] = peak_rss_mb()
        print(json.dumps(out))
    elif args.plot_only:
        res = _load()
        write_atomic(RESULTS / "ntk_scaling.md", table(res))
        plot(res)
    else:
        main(args.n, args.output, args.force)
