"""The ``propulsion-ntk`` command.

    propulsion-ntk info                         versions, devices, offline resources
    propulsion-ntk count [--model roberta-base] parameter table for Propulsion configs
    propulsion-ntk demo  [--steps 120]           wrap, train, save, reload, merge MiniLM
    propulsion-ntk train --out DIR [--method lora ...]  one fine-tuning run (train --help: every flag)
    propulsion-ntk kernel --model minilm --n 512  a kernel as resumable tiles (torchrun: several ranks)
    propulsion-ntk list                         experiments of the suite, their claims and presets
    propulsion-ntk run NAME|all --preset quick  run (or resume) experiments into --out (runs/suite)
    propulsion-ntk figures                      redraw every figure from saved results (figures/)
    propulsion-ntk report                       claims report (Markdown + HTML) from saved results
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from experiments.data.offline import OFFLINE_PACKAGES, OfflineResourceMissing, find_resource
from experiments.processes import writable_folder
from ntk import KernelTooLargeError

__all__ = ["main"]


def cmd_info(_: argparse.Namespace) -> int:
    from experiments.records import PACKAGES, package_version

    print(f"python        {platform.python_version()} ({sys.executable})")
    for dist in PACKAGES:
        print(f"{dist:<13} {package_version(dist) or 'not installed'}")
    print(f"cpu threads   {torch.get_num_threads()}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            print(f"cuda:{i}        {props.name}, {props.total_memory / 2**30:.1f} GiB")
    else:
        print("cuda          not available")
    status = 0
    for key in OFFLINE_PACKAGES:
        try:
            print(f"{key:<13} {find_resource(key)}")
        except OfflineResourceMissing as exc:
            optional = OFFLINE_PACKAGES[key].optional
            print(f"{key:<13} {'optional, not installed' if optional else 'MISSING'}: {exc}")
            if not optional:
                status = 1
    return status


def cmd_count(args: argparse.Namespace) -> int:
    from propulsion import PropulsionConfig, TargetError, build_on_meta, count_propulsion

    model = args.model
    if model == "minilm":
        model = str(find_resource("minilm"))
    build_on_meta(model, args.num_labels)  # an unknown architecture fails here, once
    presets = {
        "z on all Linear + Embedding": PropulsionConfig(degree=args.degree, include_embeddings=True),
        "z on all Linear": PropulsionConfig(degree=args.degree),
        "z on query/key/value": PropulsionConfig(degree=args.degree,
                                                 target_modules=("query", "key", "value")),
        "authors' preset (z + biases)": PropulsionConfig.reference(degree=args.degree),
    }
    if args.targets or args.include_embeddings or args.train_bias:
        presets["yours"] = PropulsionConfig(
            degree=args.degree, target_modules=tuple(args.targets) if args.targets else None,
            include_embeddings=args.include_embeddings, train_bias=args.train_bias,
        )
    print(f"{args.model}, {args.num_labels} labels")
    print(f"{'method':<30} {'modules':>8} {'z':>10} {'biases':>10} {'trainable':>12} "
          f"{'full FT':>14} {'%':>8}")
    for name, cfg in presets.items():
        try:
            row = count_propulsion(model, cfg, args.num_labels)
        except TargetError as exc:
            print(f"{name:<30} not applicable: {exc}")
            continue
        print(f"{name:<30} {row.wrapped_modules:>8,d} {row.z_parameters:>10,d} "
              f"{row.bias_parameters:>10,d} {row.trainable:>12,d} {row.full_finetuning:>14,d} "
              f"{row.percent:>8.4f}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from experiments.demo import DemoConfig, main

    main(DemoConfig(steps=args.steps, degree=args.degree, lr=args.lr, device=args.device,
                    seed=args.seed, out=args.out))
    return 0


def cmd_list(_: argparse.Namespace) -> int:
    from experiments.suite import EXPERIMENTS

    for name, module in EXPERIMENTS.items():
        print(f"{name}  {module.TITLE}")
        print(f"    claims:  {', '.join(module.CLAIMS)}")
        print(f"    presets: {', '.join(module.PRESETS)}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from experiments.suite import EXPERIMENTS, get_experiment, run_experiment
    from experiments.suite.base import parse_assignments

    names = list(EXPERIMENTS) if args.name == "all" else [get_experiment(args.name).NAME]
    overrides = parse_assignments(args.set)
    writable_folder(args.out)
    if args.device == "cuda":
        from experiments.suite.base import resolve_device

        resolve_device("cuda")  # fail before any experiment starts
    known = {k for n in names for k in EXPERIMENTS[n].Config.field_help()}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"--set: no experiment in {names} has the field(s) {unknown}")
    if args.sweep:
        return _run_sweep(args, names, overrides)
    for name in names:
        module = EXPERIMENTS[name]
        mine = {k: v for k, v in overrides.items() if args.name != "all" or k in module.Config.field_help()}
        print(f"{name} [{args.preset}]: {module.TITLE}")
        store = run_experiment(name, args.preset, out=args.out, seed=args.seed, device=args.device,
                               overrides=mine, progress=True)
        print(f"  {len(store.reused)} unit(s) reused, {len(store.computed)} computed -> {store.dir}")
        for v in module.verdicts(store, store.config):
            print(f"  {v.claim}: {v.verdict} (value {v.value:.4g}; {v.threshold})")
    return 0


def _run_sweep(args: argparse.Namespace, names: list[str], overrides: dict[str, str]) -> int:
    """Independent runs of one experiment over the cartesian product of ``--sweep`` values, spread
    over torchrun ranks or ``--workers`` local processes, each resumable, gathered in one table."""
    from experiments.distributed.sweep import parse_sweep, run_sweep
    from experiments.suite import EXPERIMENTS, sweep_unit

    if args.name == "all" or len(names) != 1:
        raise ValueError("--sweep runs one experiment; name it instead of 'all'")
    fields = EXPERIMENTS[names[0]].Config.field_help()
    grid = parse_sweep(args.sweep)
    unknown = sorted({k for unit in grid for k in unit} - set(fields))
    if unknown:
        raise ValueError(f"--sweep: {names[0]} has no field(s) {unknown}; known: {sorted(fields)}")
    units = [{"experiment": names[0], "preset": args.preset, "device": args.device, **overrides, **unit}
             for unit in grid]
    out = Path(args.out) / f"sweep-{names[0]}"
    table = run_sweep(units, sweep_unit, out, local_workers=args.workers)
    print(f"{len(units)} run(s) of {names[0]} -> {out / 'results.parquet'}")
    swept = [k for k in grid[0]]
    print(table[[*swept, "claim", "verdict", "value"]].to_string(index=False))
    return 0


def cmd_adopt(args: argparse.Namespace) -> int:
    from experiments.suite import adopt_results
    from experiments.suite.base import parse_assignments

    writable_folder(args.out)
    store, adopted, refused = adopt_results(args.name, args.preset, source=args.source, out=args.out,
                                            seed=args.seed, overrides=parse_assignments(args.set))
    print(f"{len(adopted)} unit(s) adopted from {args.source} -> {store.dir}")
    if refused:
        print(f"{len(refused)} unit(s) not adopted (their results depend on fields that differ):")
        for unit, fields in refused.items():
            print(f"  {unit}: {', '.join(fields)}")
    extra = (f" --seed {args.seed}" if args.seed is not None else "") + (
        " --set " + " ".join(args.set) if args.set else "")
    print(f"compute the rest with `propulsion-ntk run {store.name} --preset {args.preset}{extra} "
          f"--out {args.out}`")
    return 0


def cmd_figures(args: argparse.Namespace) -> int:
    from experiments.suite import draw_figures

    writable_folder(args.out)
    incomplete: list[str] = []
    paths = draw_figures(args.results, args.out, incomplete=incomplete)
    for path in paths:
        print(path)
    print(f"{len(paths)} file(s) written to {args.out}")
    if incomplete:  # drawn what has finished; say what has not, and fail
        print("not drawn, results incomplete:\n" + "\n".join(f"  {m}" for m in incomplete), file=sys.stderr)
        return 1
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from experiments.suite import write_report

    writable_folder(args.out)
    path = write_report(args.results, Path(args.out) / "claims.md", fig_dir=args.figures)
    print(f"{path}\n{path.with_suffix('.html')}")
    if args.readme:
        from experiments.suite.report import sync_readme

        if sync_readme(args.readme, path):
            print(f"{args.readme}: claims summary updated")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from experiments.training.loop import main as train_main

    return train_main(args.rest)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="propulsion-ntk", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, devices, offline resources").set_defaults(func=cmd_info)

    from propulsion.counting import ARCHITECTURES

    count = sub.add_parser("count", help="trainable-parameter table from a configuration")
    count.add_argument("--model", default="roberta-base",
                       help=f"one of {', '.join([*ARCHITECTURES, 'minilm'])} or a config folder")
    count.add_argument("--num-labels", type=int, default=2)
    count.add_argument("--degree", type=int, default=5)
    count.add_argument("--targets", nargs="*", default=None, help="module-name suffixes to wrap")
    count.add_argument("--include-embeddings", action="store_true")
    count.add_argument("--train-bias", action="store_true")
    count.set_defaults(func=cmd_count)

    demo = sub.add_parser("demo", help="Propulsion on the offline MiniLM, end to end")
    demo.add_argument("--steps", type=int, default=120)
    demo.add_argument("--degree", type=int, default=5)
    demo.add_argument("--lr", type=float, default=3e-3)
    demo.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--out", default="runs/demo")
    demo.set_defaults(func=cmd_demo)

    from experiments.distributed.kernel_job import add_kernel_parser

    add_kernel_parser(sub)

    fine_tune = sub.add_parser("train", add_help=False,
                               help="one fine-tuning run, any method (`train --help` lists every flag)")
    fine_tune.add_argument("rest", nargs=argparse.REMAINDER)
    fine_tune.set_defaults(func=cmd_train)

    listing = sub.add_parser("list", help="experiments of the suite, their claims and presets")
    listing.set_defaults(func=cmd_list)
    run = sub.add_parser("run", help="run or resume experiments (finished units are reused)")
    run.add_argument("name", help="an experiment (see `list`; e1, e2, ... work too) or 'all'")
    run.add_argument("--preset", default="quick", choices=("tiny", "quick", "study", "full"),
                     help="tiny: seconds (tests); quick: CPU, minutes; full: one GPU")
    run.add_argument("--device", default=None, choices=("cpu", "cuda", "auto"),
                     help="where to compute (default: the preset's)")
    run.add_argument("--out", default="runs/suite", help="results folder (one subfolder per experiment)")
    run.add_argument("--seed", type=int, default=None)
    run.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                     help="override config fields, e.g. --set n_points=512 models=roberta-base,llama-7b "
                          "(repeatable; every flag counts, a key given twice is refused)")
    run.add_argument("--sweep", nargs="+", action="extend", default=[], metavar="KEY=V1,V2",
                     help="independent runs over the product of these values (one experiment), "
                          "spread over torchrun ranks or --workers processes; e.g. --sweep seed=0,1,2 "
                          "(repeatable; every flag counts)")
    run.add_argument("--workers", type=int, default=1, help="local processes for --sweep without torchrun")
    run.set_defaults(func=cmd_run)
    adopt = sub.add_parser("adopt", help="carry finished units over from results under another configuration "
                                         "(only units whose results do not depend on what differs)")
    adopt.add_argument("name", help="an experiment (e1, e2, ... work too)")
    adopt.add_argument("--from", dest="source", required=True,
                       help="the results folder holding the units (one subfolder per experiment)")
    adopt.add_argument("--preset", default="quick", choices=("tiny", "quick", "study", "full"))
    adopt.add_argument("--out", default="runs/suite", help="results folder to adopt into")
    adopt.add_argument("--seed", type=int, default=None)
    adopt.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                       help="config overrides, as for run")
    adopt.set_defaults(func=cmd_adopt)
    figures = sub.add_parser("figures", help="redraw every figure from saved results (never recomputes)")
    figures.add_argument("--results", default="runs/suite")
    figures.add_argument("--out", default="figures")
    figures.set_defaults(func=cmd_figures)
    report = sub.add_parser("report", help="claims report (claims.md and claims.html) from saved results")
    report.add_argument("--results", default="runs/suite")
    report.add_argument("--out", default="runs/suite", help="folder for claims.md and claims.html")
    report.add_argument("--figures", default="figures", help="folder of the figures the report links")
    report.add_argument("--readme", default=None,
                        help="also copy the summary table into this README's claims-summary block")
    report.set_defaults(func=cmd_report)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("MPLBACKEND", "Agg")  # figures are files; no window, no display needed
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["train"]:  # every flag belongs to the trainer's own parser, --help included
        return cmd_train(argparse.Namespace(rest=argv[1:]))
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except KNOWN_ERRORS as exc:  # bad input, missing or damaged results, a busy folder: a sentence
        print(f"propulsion-ntk {args.command}: error: {error_sentence(exc)}", file=sys.stderr)
        return 2


# ValueError: bad input, damaged files, other results in a folder; FileNotFoundError: missing
# offline data or results; RuntimeError: a locked folder, tiles, a failed run; OSError: a file
# that cannot be read or written; ntk's KernelTooLargeError (a MemoryError): over the budget.
KNOWN_ERRORS = (ValueError, RuntimeError, OSError, KernelTooLargeError)


def error_sentence(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        return f"{exc.filename}: {exc.strerror}; check the path and its permissions"
    if isinstance(exc, KernelTooLargeError):
        return f"{exc} (on the command line: --memory-budget-gb, --examples, --params, --output)"
    return str(exc)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
