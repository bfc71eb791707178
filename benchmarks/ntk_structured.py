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
4. scaling of the full fine-tuning trace kernel in N (as far as ``--max-n``).
Results: ``benchmarks/results/ntk_structured.{json,md}`` (written atomically).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
N_MLP, N_MINILM, N_PROP, T = 256, 32, 256, 32
SCALING = (64, 128, 256, 512, 1024)
TIMEOUT = 900


def _mlp():
    import torch
    from torch import nn

    torch.manual_seed(0)
    layers = [nn.Linear(64, 512), nn.Tanh(), nn.Linear(512, 512), nn.Tanh(),
              nn.Linear(512, 512), nn.Tanh(), nn.Linear(512, 10)]
    return nn.Sequential(*layers).eval(), torch.randn(N_MLP, 64)


def _minilm(n: int, propulsion: bool = False):
    from experiments.data import load_rotten_tomatoes
    from experiments.models import load_model, load_tokenizer

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

    from ntk.empirical import empirical_ntk
    from ntk.kernels import kernels, structured_ntk

    torch.set_num_threads(os.cpu_count() or 1)
    f32 = torch.float32
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
    start = time.perf_counter()
    if kind == "mlp_structured":
        k = structured_ntk(model, x, params="all", output="full", dtype=f32)
    elif kind == "mlp_jacobian":
        k = empirical_ntk(model, x, params="all", output="full", dtype=f32, method="jacobian")
    elif kind == "minilm_structured":
        k = structured_ntk(model, x, params="all", output="full", dtype=f32)
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
        k = structured_ntk(model, x, params="propulsion", output="full", dtype=f32)
    elif kind == "prop_full":
        k = structured_ntk(model, x, params="all", output="full", dtype=f32)
    elif kind == "both_structured":
        k = kernels(model, x, params={"full": "all", "propulsion": "propulsion"},
                    output="full", dtype=f32)["full"]
    elif kind == "scale_structured":
        k = structured_ntk(model, x, params="all", output="trace", dtype=f32,
                           memory_budget=6 * 2**30)
    else:
        raise ValueError(name)
    seconds = time.perf_counter() - start
    assert isinstance(k, torch.Tensor) and bool(torch.isfinite(k).all())
    return {"name": name, "seconds": seconds, "shape": list(k.shape)}


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


def _git() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              cwd=ROOT).stdout.strip()
    except OSError:
        return "unknown"


def _write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def main(max_n: int, names: list[str] | None = None) -> dict:
    import torch
    import transformers

    names = names or (["mlp_structured", "mlp_jacobian", "minilm_structured", "minilm_jacobian",
                       "floor", "prop_structured", "prop_full", "both_structured"]
                      + [f"scale_structured:{n}" for n in SCALING if n <= max_n])
    runs = {}
    for name in names:
        runs[name] = run_one(name)
        print(json.dumps(runs[name]), flush=True)
    meta = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "git_commit": _git(), "machine": platform.platform(), "cpus": os.cpu_count(),
        "processor": platform.processor(), "python": platform.python_version(),
        "torch": torch.__version__, "transformers": transformers.__version__,
        "device": "cpu", "dtype": "float32",
    }
    result = {"meta": meta, "runs": runs}
    RESULTS.mkdir(parents=True, exist_ok=True)
    _write(RESULTS / "ntk_structured.json", json.dumps(result, indent=2) + "\n")
    _write(RESULTS / "ntk_structured.md", _table(result))
    return result


def _table(result: dict) -> str:
    runs = result["runs"]

    def cell(name: str) -> str:
        r = runs.get(name, {})
        if "seconds" not in r:
            return f"| {name} | {r.get('error', 'not run')[:60]!r} | | |"
        return f"| {name} | {r['seconds']:.3f} | {r['peak_rss_mb']:.0f} | {r['shape']} |"

    def ratio(a: str, b: str) -> str:
        ra, rb = runs.get(a, {}), runs.get(b, {})
        if "seconds" in ra and "seconds" in rb:
            return (f"{rb['seconds'] / ra['seconds']:.1f}x time, "
                    f"{ra['peak_rss_mb'] / rb['peak_rss_mb']:.2f} of peak memory")
        return "n/a"

    meta = "\n".join(f"- {k}: {v}" for k, v in result["meta"].items())
    rows = "\n".join(cell(n) for n in runs)
    return f"""# Structured eNTK engine benchmark (issue 4)

{meta}

Peak memory is ru_maxrss of a fresh process per measurement (model, data and interpreter
included).

| measurement | seconds | peak RSS (MB) | kernel shape |
|---|---|---|---|
{rows}

- 1. MLP, structured vs jacobian: {ratio("mlp_structured", "mlp_jacobian")} (target >= 100x,
  peak < 1 GB)
- 2. MiniLM N=32, structured vs jacobian: {ratio("minilm_structured", "minilm_jacobian")}
  (target >= 10x, <= 0.25 of memory)
- 3a. Propulsion kernel / forward+backward floor: {ratio("floor", "prop_structured")}
  (target: structured at most 2x the floor, i.e. this ratio >= 0.5x)
- 3b. full + Propulsion in one pass / full alone: {ratio("prop_full", "both_structured")}
  (target: at most 1.3x, i.e. this ratio >= 0.77x)
"""


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--one", help="run one measurement and print JSON")
    parser.add_argument("--max-n", type=int, default=1024, help="largest N of the scaling item")
    parser.add_argument("--only", nargs="*", help="names of the measurements to run")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    if args.one:
        out = measure(args.one)
        out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(out))
    else:
        main(args.max_n, args.only)
