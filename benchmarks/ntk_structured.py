"""Benchmark of the structured engine (issue 4) against the jacobian method, in one run.

Every measurement runs in a fresh subprocess (peak memory = ``ru_maxrss`` of that process,
which includes the model and the interpreter). Ratios are taken within one run.

    .venv/bin/python benchmarks/ntk_structured.py               # all items, this machine
    .venv/bin/python benchmarks/ntk_structured.py --quick       # smaller N, for a smoke run
    .venv/bin/python benchmarks/ntk_structured.py --one mlp_structured   # one measurement

Items (issue 4): 1. MLP 64-512x3-10, N=256, full kernel, float32; 2. MiniLM, N=32 Rotten
Tomatoes sentences padded to 32 tokens, C=2, all parameters, full kernel, float32;
3. Propulsion kernel on MiniLM (every Linear wrapped, k=5), N=256, against the forward and
C-output backward it needs, and full+Propulsion in one pass against full alone;
4. scaling of the full fine-tuning trace kernel in N (as far as ``--max-n``; the whole item,
   N up to 1024 with a fitted slope and a plot, is ``benchmarks/ntk_scaling.py``).
Results: ``benchmarks/results/ntk_structured.{json,md}`` (written atomically).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
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
N_MLP, N_MINILM, N_PROP, T = 256, 32, 256, 32
SCALING = (64, 128, 256, 512, 1024)
TIMEOUT = 1800
THREADS = int(os.environ.get("NTK_BENCH_THREADS", "1"))
NOTES = """## Profile notes (engine after the issue-4 speed work)

Profiles: cProfile with `time.process_time` and torch.profiler, 1 thread, warm calls.

- Before (commit 6e1d11e, 2 threads, quiet machine): MLP 0.80 s vs jacobian 34.7 s (43x);
  MiniLM N=32 3.38 s vs 11.8 s (3.5x). Where the time went: MLP: the probe's memory estimate
  charged every example the per-example gradient of a 512x512 weight (materialise) although
  ghost was chosen, so N=256 was split into 2 tiles (3 captures, 3 tile pairs); the bias block
  re-formed the (N C) x (N C) Gram of back-signals that the weight's ghost block had formed
  already; a cold first call paid 0.5 s importing sympy (first `autograd.grad` with explicit
  cotangents). MiniLM: the cost rule picked materialise for 30 of 38 Linear layers; its
  per-example gradients came out of `einsum` permuted and were copied again by `reshape`
  (1.0 s of `copy_` and 0.75 s of `bmm` of 3.4 s); the token-type and position embeddings
  (every example uses the same few ids) went through the equal-id pair gather: (N T)^2 pairs.
- Changes: per-example gradients by one `bmm` in (example, output) row order, no copies;
  cost rule refitted to measured times (materialise units 2.2x dearer than ghost units; `same`
  halves both); one tile used twice (x2=None) contracts only chunks on and above the
  diagonal and mirrors them (Gram matrices by upper-triangle blocks); token rows whose
  back-signal is exactly zero for every output are dropped before contracting (padding:
  33% of MiniLM's tokens here, and all but [CLS] in the last block's attention output and
  FFN), so ghost costs R1 R2 instead of (N T)^2; weight and bias of one-token layers share
  one Gram matrix; frequent embedding ids (positions, token type, [CLS]) by one dense product
  over the used rows only; memory estimate without the materialise transient (now chunked).
- Old against new engine, same machine and load, 1 thread, CPU seconds of a warm call: MLP
  0.87 -> 0.39-0.52 s; MiniLM N=32 full 6.3 -> 2.5 s; MiniLM N=64 trace (scaling item)
  10.4 -> 4.7 s.
- MiniLM N=32 after (CPU seconds, 1 thread): capture (forward + C-batched backward, features)
  1.28 s, contractions 0.90 s, probe ~0.3 s: 2.49 s against the jacobian's 15.45 s = 6.2x.
  The target (10x) is missed: the capture alone is 1/12 of the jacobian's time, so 10x would
  need the contractions and probe together under 0.27 s. The contractions are at about 55%
  of the GEMM peak (40 GFlop of Gram matrices for the `full` layout, C^2 = 4 output pairs; the
  materialise alternative needs 43 G multiply-adds); one batched backward, C separate
  backward passes and C scalar backward passes measured the same (0.63-0.69 s).
- Noise: a run ten minutes earlier (1 thread, wall only, before the embedding change)
  measured MiniLM 6.86 s against 84.6 s = 12.3x and MLP 2.44 s against 328.5 s = 135x: wall
  ratios swing by 2x between runs on this machine; the CPU ratios are the figures to trust.
- Item 3 (same run): the Propulsion kernel costs 1.25x CPU of the forward + C-batched backward
  floor (its contraction is 0.16 s of 10.6 s: the capture is the cost); full + Propulsion in
  one pass cost 0.96x the full kernel alone (within noise: the Propulsion blocks are cheap
  and the full kernel dominates).
- Earlier rows (other dates) come from earlier runs and must not be compared with these.
- Float64: on this CPU MKL's float64 GEMM runs at 0.9x the float32 rate (80 vs 89 GFlop/s for
  2560x512x2560), so computing float64 requests in float32 would buy little; the engine keeps
  computing in the requested `dtype` (the benchmark asks float32).
- 2026-12-01, evening rerun of MiniLM N=32 (commit 7d8e45e, load 4-5 on 2 cores, the study
  running beside it): structured 2.73 CPU s at 1.7 GB peak RSS (self-check included) against the
  jacobian method's 15.0 CPU s at 6.7 GB: 5.5x, 0.25 of the memory. The morning's 8.4x came
  from a jacobian run of 28.2 s at 3.7 GB; this one used more memory, probably in fewer tiles
  (its default budget follows the memory it finds free; not checked). So the engine stands at
  5.5-6.2x the jacobian method on this model; the structured time itself went from 2.49
  (without self-check) and 3.34 s (with) to 2.73 s.
"""
"""Torch threads per measurement: 1 by default, because on a shared, oversubscribed machine
two OpenMP threads stall on each other's barriers (times then vary by 10x); set
NTK_BENCH_THREADS=2 on a quiet machine."""


def _mlp():
    import torch
    from torch import nn

    torch.manual_seed(0)
    layers = [nn.Linear(64, 512), nn.Tanh(), nn.Linear(512, 512), nn.Tanh(),
              nn.Linear(512, 512), nn.Tanh(), nn.Linear(512, 10)]
    return nn.Sequential(*layers).eval(), torch.randn(N_MLP, 64)


def _minilm(n: int, propulsion: bool = False):
    from experiments.data.datasets import load_rotten_tomatoes
    from experiments.data.models import load_model, load_tokenizer

    model = load_model("minilm", 2)
    if propulsion:
        from propulsion.config import PropulsionConfig
        from propulsion.model import get_propulsion_model

        model = get_propulsion_model(model, PropulsionConfig(degree=5)).eval()
    texts = list(load_rotten_tomatoes(seed=0).train["text"][:n])
    while len(texts) < n:
        texts = texts + texts
    batch = load_tokenizer("minilm")(texts[:n], padding="max_length", truncation=True,
                                     max_length=T, return_tensors="pt")
    return model, {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def measure(name: str) -> dict:
    """Run one measurement in this process; returns seconds and what was computed."""
    import torch

    from ntk._structured import structured_kernels
    from ntk.empirical import empirical_ntk

    torch.set_num_threads(THREADS)
    f32 = torch.float32
    timings = []

    def engine(params: dict, output: str, **kw) -> dict:
        result, t = structured_kernels(model, x, None, params, output=output, dtype=f32, **kw)
        timings.append(t)
        return result

    kind, _, arg = name.partition(":")
    if kind.startswith("mlp"):
        model, x = _mlp()
    elif kind == "floor":
        model, x = _minilm(N_PROP, propulsion=True)
    elif kind.startswith("prop") or kind.startswith("both"):
        model, x = _minilm(N_PROP, propulsion=True)
    elif kind.startswith("scale"):
        model, x = _minilm(int(arg))
    else:
        model, x = _minilm(N_MINILM)
    warmup = _warm_up(kind, model, x)
    start, cpu = time.perf_counter(), time.process_time()
    if kind == "mlp_structured":
        k = engine({"k": "all"}, "full")["k"]
    elif kind == "mlp_jacobian":
        k = empirical_ntk(model, x, params="all", output="full", dtype=f32, method="jacobian")
    elif kind == "minilm_structured":
        k = engine({"k": "all"}, "full")["k"]
    elif kind == "minilm_jacobian":
        k = empirical_ntk(model, x, params="all", output="full", dtype=f32, method="jacobian")
    elif kind == "floor":  # one forward and the C-output backward to every layer output
        with torch.enable_grad():
            emb = model.get_input_embeddings()
            h = {}
            hook = emb.register_forward_hook(
                lambda m, a, o: h.setdefault("e", o.detach().requires_grad_(True)))
            out = model(**x).logits
            hook.remove()
            cot = torch.eye(2)[:, None, :].expand(2, out.shape[0], 2)
            torch.autograd.grad(out, h["e"], cot, is_grads_batched=True)
        k = out
    elif kind == "prop_structured":
        k = engine({"k": "propulsion"}, "full")["k"]
    elif kind == "prop_full":
        k = engine({"k": "all"}, "full")["k"]
    elif kind == "both_structured":
        k = engine({"full": "all", "propulsion": "propulsion"}, "full")["full"]
    elif kind == "scale_structured":
        k = engine({"k": "all"}, "trace", memory_budget=6 * 2**30)["k"]
    else:
        raise ValueError(name)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    assert isinstance(k, torch.Tensor) and bool(torch.isfinite(k).all())
    stats = dataclasses.asdict(timings[-1]) if timings else {}
    return {"name": name, "seconds": seconds, "cpu_seconds": cpu, "warmup_seconds": warmup,
            "shape": list(k.shape),
            "stats": stats,
            "threads": THREADS, "date": datetime.datetime.now(datetime.UTC).isoformat(
                timespec="seconds")}


def _warm_up(kind: str, model, x) -> float:
    """The same computation on 2 examples, so one-time costs (lazy imports such as sympy on
    the first ``autograd.grad`` with explicit cotangents, kernel and thread-pool start-up)
    stay out of the timing, for every method alike. Returns its seconds (the cold overhead)."""
    import torch

    from ntk.empirical import empirical_ntk
    from ntk.kernels import structured_ntk

    small = x[:2] if isinstance(x, torch.Tensor) else {k: v[:2] for k, v in x.items()}
    start = time.perf_counter()
    if kind.endswith("jacobian"):
        empirical_ntk(model, small, params="all", output="full", dtype=torch.float32,
                      method="jacobian")
    else:
        with torch.enable_grad():
            out = model(small) if isinstance(small, torch.Tensor) else model(**small)
            out = getattr(out, "logits", out)
            torch.autograd.grad(out, [p for p in model.parameters() if p.requires_grad][:1],
                                torch.ones_like(out), allow_unused=True)
        if kind != "floor":
            structured_ntk(model, small, params="all", output="trace", dtype=torch.float32)
    return time.perf_counter() - start


def run_one(name: str) -> dict:
    """``measure(name)`` in a fresh subprocess, with its peak resident memory."""
    cmd = [sys.executable, __file__, "--one", name]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, env=env,
                              cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"name": name, "error": f"timeout after {TIMEOUT} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"name": name, "error": proc.stderr[-800:]}
    return json.loads(lines[-1])


def main(max_n: int, names: list[str] | None = None) -> dict:
    import torch
    import transformers

    names = names or (["mlp_structured", "mlp_jacobian", "minilm_structured", "minilm_jacobian",
                       "floor", "prop_structured", "prop_full", "both_structured"]
                      + [f"scale_structured:{n}" for n in SCALING if n <= max_n])
    # Item 4 in full (N up to 1024, fitted slope, plot): benchmarks/ntk_scaling.py.
    old = json.loads((RESULTS / "ntk_structured.json").read_text()) \
        if (RESULTS / "ntk_structured.json").exists() else {"runs": {}}
    runs = {k: v for k, v in old.get("runs", {}).items() if k not in names}  # earlier runs kept
    for name in names:
        runs[name] = run_one(name)
        print(json.dumps(runs[name]), flush=True)
    meta = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "git_commit": git_commit(), "machine": platform.platform(), "cpus": os.cpu_count(),
        "processor": platform.processor(), "python": platform.python_version(),
        "torch": torch.__version__, "transformers": transformers.__version__,
        "device": "cpu", "dtype": "float32", "torch_threads": THREADS,
        "load_average_at_start": round(os.getloadavg()[0], 1),
    }
    result = {"meta": meta, "runs": runs}
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_atomic(RESULTS / "ntk_structured.json", json.dumps(result, indent=2) + "\n")
    write_atomic(RESULTS / "ntk_structured.md", _table(result))
    return result


def _table(result: dict) -> str:
    runs = result["runs"]

    def cell(name: str) -> str:
        r = runs.get(name, {})
        if "seconds" not in r:
            return f"| {name} | {r.get('error', 'not run')[:60]!r} | | |"
        return (f"| {name} | {r['seconds']:.3f} | {r.get('cpu_seconds', float('nan')):.3f} | "
                f"{r['peak_rss_mb']:.0f} | {r['shape']} | "
                f"{r.get('warmup_seconds', float('nan')):.2f} | {r.get('threads', '?')} | "
                f"{r.get('date', 'earlier run')} |")

    def ratio(a: str, b: str) -> str:
        ra, rb = runs.get(a, {}), runs.get(b, {})
        if "seconds" in ra and "seconds" in rb:
            cpu = (f" ({rb['cpu_seconds'] / ra['cpu_seconds']:.1f}x CPU time)"
                   if "cpu_seconds" in ra and "cpu_seconds" in rb else "")
            return (f"{rb['seconds'] / ra['seconds']:.1f}x time{cpu}, "
                    f"{ra['peak_rss_mb'] / rb['peak_rss_mb']:.2f} of peak memory")
        return "n/a"

    meta = "\n".join(f"- {k}: {v}" for k, v in result["meta"].items())
    rows = "\n".join(cell(n) for n in runs)
    return f"""# Structured eNTK engine benchmark (issue 4)

{meta}

Peak memory is ru_maxrss of a fresh process per measurement (model, data and interpreter
included). Each measurement is timed after a warm-up of the same method on 2 examples
(`warm-up s`: lazy imports, e.g. sympy on the first `autograd.grad`, and start-up costs, paid
once per process by every method). The machine is shared and noisy (other jobs on its 2
cores): only ratios between measurements of the same run (same date) mean something. With
one thread, CPU seconds (`time.process_time`) measure the work and are far less sensitive to
the other jobs than wall seconds.

| measurement | seconds | CPU s | peak RSS (MB) | kernel shape | warm-up s | threads | date |
|---|---|---|---|---|---|---|---|
{rows}

- 1. MLP, structured vs jacobian: {ratio("mlp_structured", "mlp_jacobian")} (target >= 100x,
  peak < 1 GB)
- 2. MiniLM N=32, structured vs jacobian: {ratio("minilm_structured", "minilm_jacobian")}
  (target >= 10x, <= 0.25 of memory)
- 3a. Propulsion kernel against the forward+backward floor: prop_structured takes
  {ratio("floor", "prop_structured")} (read: "Nx time" = prop_structured / floor; target at
  most 2x)
- 3b. full + Propulsion in one pass against full alone: {ratio("prop_full", "both_structured")}
  (read: "Nx time" = both / full; target at most 1.3x)

{NOTES}"""


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--one", help="run one measurement and print JSON")
    parser.add_argument("--max-n", type=int, default=128,
                        help="largest N of the quick scaling item (all of item 4: ntk_scaling.py)")
    parser.add_argument("--only", nargs="*", help="names of the measurements to run")
    parser.add_argument("--md-only", action="store_true", help="rewrite the markdown from the JSON")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    if args.md_only:
        write_atomic(RESULTS / "ntk_structured.md", _table(json.loads((RESULTS / "ntk_structured.json")
                                                                .read_text())))
    elif args.one:
        out = measure(args.one)
        out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(out))
    else:
        main(args.max_n, args.only)
