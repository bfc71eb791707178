"""Benchmark: fine-tuning MiniLM on Rotten Tomatoes, full vs LoRA vs IA3 vs Propulsion (z only, k = 1, 5, 15).

Issue 5 ("Benchmark"): equal step budgets, 3 seeds, sequences of at most 64 tokens, on the CPU;
accuracy, steps and seconds to 0.8 validation accuracy, step time and peak memory as ratios to
full fine-tuning. Every run goes through :func:`experiments.training.loop.train` in a fresh process (so
its peak resident memory is its own) and lives in ``--runs-dir/<method>-seed<s>``; a finished run
is reused, an interrupted one resumes from its checkpoint, so the script can be stopped and run
again.

Settings (every method alike unless said): AdamW, weight decay 0, linear decay after 10% warm-up,
batch 16, gradient clipping at 1.0, classification head trained in full, validation (853
sentences) every ``--eval-every`` steps, test (853) once on the best-validation parameters.
Learning rates, one per method, set from the usual ranges (not tuned on these data):

    full         1e-4   (BERT-style fine-tuning of a 6-layer model: 5e-5..1e-4; the short budget
                         favours the upper end)
    lora         5e-4   (r=8, alpha=16, query/value; LoRA papers use 2e-4..5e-4 on RoBERTa)
    ia3          3e-3   (peft defaults for BERT; the IA3 paper uses 3e-3)
    propulsion   3e-3   (z only on every Linear; Adam moves z by about lr per step, so the
                         multiplier z**k by about k*lr: 0.003, 0.015, 0.045 for k = 1, 5, 15)

Timing: runs are sequential, so machine noise differs between them; each run's step time is
the median of its steps, averaged over seeds. Every method sees the same batches for a given
seed (same sampler seed), so the token counts per step match. Seconds-to-target count training
steps only (evaluations excluded). Peak memory: the process's peak RSS during training (VmHWM
reset after loading) minus the RSS with model and data loaded (the baseline), as in
``benchmarks/train_step.py``.

Invocations (from the repository root):
    .venv/bin/python benchmarks/finetune.py                        # the real run (about 25-30 min
                                                                   # on 2 quiet cores); writes
                                                                   # benchmarks/results/finetune.{md,json}
    .venv/bin/python benchmarks/finetune.py --steps 20 --seeds 0 --methods full propulsion-k5 \\
        --eval-every 10 --runs-dir /tmp/ft-runs --out-dir /tmp/ft-results      # a quick check
    .venv/bin/python benchmarks/finetune.py --device cuda          # one GPU
    .venv/bin/python benchmarks/finetune.py --one full --seed 0    # one run in this process
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from _common import cpu_model

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from experiments.records import provenance, read_json, read_rows, write_json  # noqa: E402
from experiments.training.config import TrainConfig  # noqa: E402
from experiments.training.loop import train  # noqa: E402

# name -> (method, options, lr, label)
METHODS: dict[str, tuple[str, dict[str, Any], float, str]] = {
    "full": ("full", {}, 1e-4, "full fine-tuning"),
    "lora": ("lora", {"r": 8, "lora_alpha": 16}, 5e-4, "LoRA r=8 (query, value)"),
    "ia3": ("ia3", {}, 3e-3, "IA3 (peft defaults)"),
    "propulsion-k1": ("propulsion", {"degree": 1}, 3e-3, "Propulsion z only, k=1"),
    "propulsion-k5": ("propulsion", {"degree": 5}, 3e-3, "Propulsion z only, k=5"),
    "propulsion-k15": ("propulsion", {"degree": 15}, 3e-3, "Propulsion z only, k=15"),
}
TARGET = 0.8


def run_config(args: argparse.Namespace, name: str, seed: int) -> TrainConfig:
    method, options, lr, _ = METHODS[name]
    return TrainConfig(
        model="minilm", dataset="rotten_tomatoes", method=method, method_options=options, lr=lr,
        optimizer="adamw", weight_decay=0.0, schedule="linear", warmup_steps=max(args.steps // 10, 0),
        steps=args.steps, batch_size=args.batch_size, clip_norm=1.0, eval_every=args.eval_every,
        eval_examples=args.eval_examples, max_examples=args.max_examples, max_length=64, seed=seed,
        device=args.device, target_accuracy=TARGET, checkpoint_every=args.checkpoint_every, save_best=False,
    )


def run_dir(args: argparse.Namespace, name: str, seed: int) -> Path:
    return Path(args.runs_dir) / f"{name}-seed{seed}"


def is_finished(args: argparse.Namespace, name: str, seed: int) -> bool:
    path = run_dir(args, name, seed) / "run.json"
    if not path.exists():
        return False
    info = read_json(path)
    if info.get("config_hash") != run_config(args, name, seed).config_hash():
        raise ValueError(f"{path.parent} holds a run of other settings; pass another --runs-dir or delete it")
    return info.get("status") == "finished"


def run_one(args: argparse.Namespace) -> int:
    """One (method, seed) run in this process (what the parent launches)."""
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    result = train(run_config(args, args.one, args.seed), run_dir(args, args.one, args.seed),
                   progress=not args.no_progress)
    print(f"{args.one} seed {args.seed}: {result.status}: {result.message}")
    return 0 if result.status == "finished" else 1


def summarise_run(folder: Path) -> dict[str, Any]:
    info, rows = read_json(folder / "run.json"), read_rows(folder / "rows.parquet")
    steps, evals = rows[rows.kind == "train"], rows[rows.kind == "eval"]
    summary = info.get("summary", {})
    peak = float(steps.peak_memory_mb.max())
    return {
        "status": info["status"], "trainable_parameters": info["trainable_parameters"],
        "test_accuracy": (summary.get("test") or {}).get("accuracy"),
        "test_macro_f1": (summary.get("test") or {}).get("macro_f1"),
        "best_val_accuracy": (summary.get("best") or {}).get("accuracy"),
        "best_step": summary.get("best_step"),
        "final_val_accuracy": float(evals.accuracy.iloc[-1]),
        "initial_val_accuracy": float(evals.accuracy.iloc[0]),
        "steps_to_target": summary.get("steps_to_target"),
        "seconds_to_target": summary.get("seconds_to_target"),
        "median_step_s": float(steps.seconds.median()), "train_seconds": summary.get("train_seconds"),
        "peak_rss_mb": peak, "baseline_rss_mb": info.get("baseline_memory_mb"),
        "peak_delta_mb": peak - info["baseline_memory_mb"] if info.get("baseline_memory_mb") else None,
        "val_curve": [[int(s), float(a)] for s, a in zip(evals.step, evals.accuracy, strict=True)],
        "git_commit": info.get("git_commit"), "device_name": info.get("device_name"),
        "data_fingerprint": info.get("data_fingerprint"), "cpu_threads": info.get("cpu_threads"),
    }


def _mean(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return statistics.fmean(kept) if kept else None


def _std(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return statistics.stdev(kept) if len(kept) > 1 else None


def aggregate(runs: dict[str, dict[int, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for name, per_seed in runs.items():
        r = list(per_seed.values())

        def col(key: str, r=r) -> list:
            return [x[key] for x in r]

        out[name] = {
            "label": METHODS[name][3], "lr": METHODS[name][2], "seeds": sorted(per_seed),
            "trainable_parameters": r[0]["trainable_parameters"],
            "test_accuracy": _mean(col("test_accuracy")), "test_accuracy_std": _std(col("test_accuracy")),
            "test_macro_f1": _mean(col("test_macro_f1")),
            "best_val_accuracy": _mean(col("best_val_accuracy")),
            "final_val_accuracy": _mean(col("final_val_accuracy")),
            "reached_target": sum(x["steps_to_target"] is not None for x in r),
            "steps_to_target": _mean(col("steps_to_target")),
            "seconds_to_target": _mean(col("seconds_to_target")),
            "median_step_s": _mean(col("median_step_s")), "peak_delta_mb": _mean(col("peak_delta_mb")),
            "peak_rss_mb": _mean(col("peak_rss_mb")),
        }
    full = out.get("full")
    for row in out.values():
        for key in ("median_step_s", "peak_delta_mb", "peak_rss_mb"):
            ok = full is not None and full[key] and row[key] is not None
            row[f"{key}_ratio"] = row[key] / full[key] if ok else None  # type: ignore[index]
    return out


def comparisons(methods: dict[str, dict[str, Any]]) -> list[str]:
    """One factual line per method: accuracy gap to full (in units of the larger seed sd), target, ratios."""
    full = methods.get("full")
    if full is None or full["test_accuracy"] is None:
        return ["- full fine-tuning was not run: no comparison."]
    out = []
    for name, row in methods.items():
        if name == "full" or row["test_accuracy"] is None:
            continue
        gap = row["test_accuracy"] - full["test_accuracy"]
        sds = [s for s in (row["test_accuracy_std"], full["test_accuracy_std"]) if s]
        within = f" ({abs(gap) / max(sds):.1f} seed sd)" if sds else ""
        target = (f"reached {TARGET} in {row['reached_target']}/{len(row['seeds'])} seeds "
                  f"(full: {full['reached_target']}/{len(full['seeds'])})")
        if row["seconds_to_target"] is not None and full["seconds_to_target"] is not None:
            target += f", {row['seconds_to_target'] / full['seconds_to_target']:.2f}x full's training seconds"
        share = row["trainable_parameters"] / full["trainable_parameters"]
        out.append(f"- {row['label']}: test accuracy {gap:+.3f} vs full{within}; {target}; step time "
                   f"{_f(row['median_step_s_ratio'], '.2f')}x, peak memory "
                   f"{_f(row['peak_delta_mb_ratio'], '.2f')}x with {share:.2%} of the trainable parameters")
    return out


def _f(value: float | None, fmt: str = ".3f") -> str:
    return "n/a" if value is None else format(value, fmt)


def write_markdown(result: dict[str, Any], path: Path) -> None:
    prov, s = result["provenance"], result["settings"]
    lines = [
        "# Fine-tuning benchmark: MiniLM on Rotten Tomatoes", "",
        f"Written by `benchmarks/finetune.py` on {result['date']}; do not edit by hand.", "",
        f"- machine: {prov['cpu_model']}, {prov['cpu_cores']} cores; device `{prov['device']}` "
        f"({prov['device_name']}), torch threads per run: "
        f"{sorted({r['cpu_threads'] for per in result['runs'].values() for r in per.values()})}",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in prov["versions"].items()),
        f"- git commit `{prov['git_commit']}`" + (" (uncommitted changes)" if prov["git_dirty"] else ""),
        f"- {s['steps']} steps of batch {s['batch_size']} (10% warm-up, linear decay), AdamW, clip 1.0, "
        f"max 64 tokens, validation every {s['eval_every']} steps on "
        + ("the whole validation split" if s["eval_examples"] is None else f"{s['eval_examples']} examples")
        + ("" if s["max_examples"] is None else f" (a {s['max_examples']}-sentence subset: a quick check)")
        + ", "
        f"seeds {s['seeds']}; test on the best-validation parameters",
        f"- load average at start {result['load_average_start']}, at end {result['load_average_end']}; "
        f"wall time {result['wall_seconds']:.0f} s",
        "", f"## Results (mean over seeds; target: validation accuracy >= {TARGET})", "",
        "| method | lr | trainable | test acc (± sd) | test macro-F1 | best val acc | final val acc | "
        "seeds reaching target | steps to target | s to target | step (ms) | step ratio | "
        "peak RSS delta (MiB) | memory ratio |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["methods"].values():
        step_ms = row["median_step_s"] * 1e3 if row["median_step_s"] is not None else None
        lines.append(
            f"| {row['label']} | {row['lr']:g} | {row['trainable_parameters']:,d} | "
            f"{_f(row['test_accuracy'])} ± {_f(row['test_accuracy_std'])} | {_f(row['test_macro_f1'])} | "
            f"{_f(row['best_val_accuracy'])} | {_f(row['final_val_accuracy'])} | "
            f"{row['reached_target']}/{len(row['seeds'])} | {_f(row['steps_to_target'], '.0f')} | "
            f"{_f(row['seconds_to_target'], '.1f')} | {_f(step_ms, '.0f')} | "
            f"{_f(row['median_step_s_ratio'])} | {_f(row['peak_delta_mb'], '.0f')} | "
            f"{_f(row['peak_delta_mb_ratio'])} |"
        )
    lines += ["", "Steps and seconds to target: mean over the seeds that reached it (training time only). "
              "Step time: median per run, mean over seeds; ratios divide by full fine-tuning's.", "",
              "## Against full fine-tuning (computed from the table)", "",
              *comparisons(result["methods"]), "",
              "## Validation accuracy curves (seed, step: accuracy)", ""]
    for name, per_seed in result["runs"].items():
        for seed, run in per_seed.items():
            curve = ", ".join(f"{st}: {a:.3f}" for st, a in run["val_curve"])
            lines.append(f"- {name} seed {seed}: {curve}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, path)


def main(args: argparse.Namespace) -> dict[str, Any]:
    unknown = set(args.methods) - set(METHODS)
    if unknown:
        raise SystemExit(f"unknown methods {sorted(unknown)}; choose from {', '.join(METHODS)}")
    start, load_start = time.time(), os.getloadavg()
    for seed in args.seeds:  # seeds outermost: a partial benchmark still compares every method
        for name in args.methods:
            if is_finished(args, name, seed):
                print(f"{name} seed {seed}: finished earlier, reused")
                continue
            command = [sys.executable, __file__, "--one", name, "--seed", str(seed),
                       "--steps", str(args.steps), "--batch-size", str(args.batch_size),
                       "--eval-every", str(args.eval_every),
                       *(["--eval-examples", str(args.eval_examples)] if args.eval_examples else []),
                       *(["--max-examples", str(args.max_examples)] if args.max_examples else []),
                       "--runs-dir", args.runs_dir, "--device", args.device,
                       "--checkpoint-every", str(args.checkpoint_every), "--threads", str(args.threads or 0)]
            if args.no_progress:
                command.append("--no-progress")
            print(f"{name} seed {seed}: running", flush=True)
            subprocess.run(command, check=True, cwd=REPO)
    runs = {name: {seed: summarise_run(run_dir(args, name, seed)) for seed in args.seeds}
            for name in args.methods}
    fingerprints = {(n, s): r["data_fingerprint"] for n, per in runs.items() for s, r in per.items()}
    if len(set(fingerprints.values())) > 1:
        raise SystemExit(f"the runs saw different data (split or tokenisation changed between them): "
                         f"{fingerprints}; delete the odd runs' folders and run again")
    import torch

    result = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "settings": {"steps": args.steps, "batch_size": args.batch_size, "eval_every": args.eval_every,
                     "eval_examples": args.eval_examples, "max_examples": args.max_examples,
                     "seeds": args.seeds, "methods": args.methods, "device": args.device,
                     "configs": {n: run_config(args, n, args.seeds[0]).to_dict() for n in args.methods}},
        "provenance": {**provenance(torch.device(args.device)), "cpu_model": cpu_model(),
                       "cpu_cores": os.cpu_count(), "command": " ".join(sys.argv)},
        "load_average_start": [round(x, 2) for x in load_start],
        "load_average_end": [round(x, 2) for x in os.getloadavg()],
        "wall_seconds": time.time() - start,
        "methods": aggregate(runs), "runs": runs,
    }
    out = Path(args.out_dir)
    write_json(result, out / "finetune.json")
    write_markdown(result, out / "finetune.md")
    print((out / "finetune.md").read_text())
    return result


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=150, help="optimiser steps per run (equal for all)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), help=", ".join(METHODS))
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--eval-examples", type=int, default=None,
                        help="validation examples per pass (default: the whole split)")
    parser.add_argument("--max-examples", type=int, default=None,
                        help="use a stratified subset of this many sentences (quick checks only)")
    parser.add_argument("--checkpoint-every", type=int, default=50, help="per-run checkpoints (resume)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per run (0: torch's default)")
    parser.add_argument("--runs-dir", default=str(REPO / "runs" / "finetune"))
    parser.add_argument("--out-dir", default=str(REPO / "benchmarks" / "results"))
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--one", choices=list(METHODS), help="run one method in this process (internal)")
    parser.add_argument("--seed", type=int, default=0, help="with --one")
    return parser


if __name__ == "__main__":
    arguments = build_parser().parse_args()
    if arguments.one:
        raise SystemExit(run_one(arguments))
    main(arguments)
