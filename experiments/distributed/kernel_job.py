"""A kernel job: a model, a slice of a data set and a parameter selection -> kernel tiles on disk.

The kernel is cut into square tiles (``ntk.tiles``), each written atomically with a manifest, so
a killed job restarted on any number of ranks computes only the missing tiles; rank 0 assembles
``OUT/kernel.npy`` (a ``.npy`` file; ``numpy.load(path, mmap_mode="r")`` maps it).

One process (CPU or one GPU)::

    propulsion-ntk kernel --model minilm --dataset rotten_tomatoes --n 512 --params all \\
        --output trace --tile 64 --out runs/kernel
    python -m experiments.distributed.kernel_job --n 512 --params all --output trace --out runs/kernel

Several CPU processes on one machine (gloo; each rank takes cores / ranks threads)::

    torchrun --standalone --nproc_per_node=2 -m experiments.distributed.kernel_job --examples 512 \\
        --out runs/kernel

Several GPUs on one node (NCCL, rank r on cuda:LOCAL_RANK)::

    torchrun --standalone --nproc_per_node=8 -m experiments.distributed.kernel_job --examples 8192 \\
        --tile 512 --device cuda --out /shared/runs/kernel

Several nodes (run the same line on every node; OUT must be on a shared file system)::

    torchrun --nnodes=4 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29400 \\
        --rdzv_id=kernel1 -m experiments.distributed.kernel_job --examples 65536 --tile 1024 --device cuda \\
        --out /shared/runs/kernel

Under torchrun the number of examples is ``--examples`` (torchrun's argument parser reads ``--n``
as an ambiguous abbreviation of its own options and stops). Restart a killed job with the same
line (any ``--nproc_per_node``/``--nnodes``): finished tiles are kept. Threads: ``--threads``
or, by default, the cores this process may use divided by ``LOCAL_WORLD_SIZE`` (torchrun's own
default of one OpenMP thread per rank is overridden).
Tests use ``--model module:function`` (called with ``num_labels, dtype, device, seed``) and
``--dataset module:function`` (called with ``split, seed``, returning a tensor or a dict of
tensors batched on dim 0).
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from experiments.processes import writable_folder
from experiments.records import atomic_path, provenance, write_json
from ntk.distributed import default_threads, gather, init_distributed
from ntk.tiles import TilesInterrupted, report_dict, tiled_ntk

__all__ = ["KernelJobConfig", "run_kernel_job", "add_kernel_parser", "run_kernel_command", "main"]

OUTPUTS = ("full", "trace", "diagonal", "sum_logits")
DTYPES = {"float64": torch.float64, "float32": torch.float32}
MODEL_DTYPES = {**DTYPES, "bfloat16": torch.bfloat16, "float16": torch.float16}
SPLITS = ("train", "validation", "test")


@dataclass(frozen=True)
class KernelJobConfig:
    """What to compute. x1 = rows ``offset:offset+n`` of ``split``; x2 likewise or None (= x1)."""

    model: str = "minilm"  # a name of experiments.data.models.MODELS or "module:function"
    dataset: str = "rotten_tomatoes"  # a name of experiments.data.datasets.DATASETS or "module:function"
    split: str = "train"
    n: int = 512
    offset: int = 0
    split2: str | None = None  # None: the symmetric kernel K(x1, x1)
    n2: int | None = None
    offset2: int = 0
    max_length: int = 128  # tokens; batches are trimmed to their longest real sequence
    num_labels: int | None = None  # None: from the data set (2 for a factory data set)
    prepare: str | None = None  # methods.prepare(model, prepare) first, e.g. "propulsion"
    degree: int = 5  # Propulsion degree when prepare == "propulsion"
    params: str = "all"  # ntk selector: all, trainable, propulsion, lora, bias
    output: str = "trace"  # full (N1, N2, C, C), trace, diagonal (N1, N2, C), sum_logits
    tile_size: int = 64
    dtype: str = "float64"  # kernel and accumulation
    model_dtype: str = "float32"
    engine: str = "auto"  # ntk.empirical_ntk method
    device: str = "auto"  # auto (cuda:LOCAL_RANK when available), cpu, cuda
    memory_budget: float | None = None  # bytes per rank; None: the engine's default
    seed: int = 0  # classification head and data split
    threads: int | None = None  # None: usable cores // LOCAL_WORLD_SIZE
    mmap: bool = True  # assemble through a memory map of kernel.npy (False: in memory, then saved)
    progress: bool = True
    timeout_s: float = 12 * 3600  # collective timeout (the final barrier waits for slow ranks)

    def __post_init__(self) -> None:
        for name in ("n", "tile_size", "max_length", "degree"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.n2 is not None and self.n2 < 1:
            raise ValueError(f"n2 must be a positive integer or None, got {self.n2!r}")
        if self.offset < 0 or self.offset2 < 0:
            raise ValueError(f"offsets must be >= 0, got {self.offset}, {self.offset2}")
        for name, value in (("split", self.split), ("split2", self.split2)):
            if value is not None and value not in SPLITS:
                raise ValueError(f"{name} must be one of {SPLITS}, got {value!r}")
        if self.output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}, got {self.output!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {list(DTYPES)} (kernels are stored as .npy), "
                             f"got {self.dtype!r}")
        if self.model_dtype not in MODEL_DTYPES:
            raise ValueError(f"model_dtype must be one of {list(MODEL_DTYPES)}, got {self.model_dtype!r}")
        if self.device not in ("auto", "cpu") and not self.device.startswith("cuda"):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:k, got {self.device!r}")
        if self.memory_budget is not None and not self.memory_budget > 0:
            raise ValueError(f"memory_budget must be positive bytes or None, got {self.memory_budget!r}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1 or None, got {self.threads!r}")
        if self.num_labels is not None and self.num_labels < 1:
            raise ValueError(f"num_labels must be >= 1 or None, got {self.num_labels!r}")


def _factory(spec: str, what: str) -> Callable[..., Any]:
    module, _, name = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"cannot import the {what} factory {spec!r} ({exc}); give module:function "
                         "with the module importable (PYTHONPATH)") from exc
    if not callable(fn):
        raise ValueError(f"the {what} factory {spec!r} is not callable")
    return fn


def _slice(x: Any, start: int, n: int, what: str) -> Any:
    from ntk._inputs import batch_size, take

    total = batch_size(x, what)
    if start + n > total:
        raise ValueError(f"{what}: rows {start}:{start + n} requested but the split has {total} rows; "
                         "lower n or the offset")
    return take(x, start, start + n)


def _token_inputs(cfg: KernelJobConfig) -> tuple[dict[str, torch.Tensor], dict | None, int]:
    """x1, x2 (or None) as input_ids / attention_mask, trimmed to one common length, and C."""
    from experiments.data.datasets import load_dataset
    from experiments.data.encoding import encode_splits
    from experiments.data.models import MODELS, load_tokenizer

    if cfg.model not in MODELS:
        raise ValueError(f"data set {cfg.dataset!r} needs a named model for its tokenizer "
                         f"({', '.join(MODELS)}), got {cfg.model!r}")
    encoded = encode_splits(load_dataset(cfg.dataset, seed=cfg.seed), load_tokenizer(cfg.model),
                            max_length=cfg.max_length)
    parts = [(cfg.split, cfg.offset, cfg.n, "x1")]
    if cfg.split2 is not None:
        parts.append((cfg.split2, cfg.offset2, cfg.n2 or cfg.n, "x2"))
    rows = [_slice({"input_ids": getattr(encoded, s).input_ids,
                    "attention_mask": getattr(encoded, s).attention_mask}, o, n, f"{what} ({s})")
            for s, o, n, what in parts]
    length = max(int(r["attention_mask"].sum(1).max()) for r in rows)
    trimmed = [{k: v[:, :length].contiguous() for k, v in r.items()} for r in rows]
    return trimmed[0], (trimmed[1] if len(trimmed) > 1 else None), encoded.num_labels


def load_job_inputs(cfg: KernelJobConfig) -> tuple[Any, Any, int]:
    """``(x1, x2 or None, num_labels)`` for the config (a named data set or a factory)."""
    if ":" not in cfg.dataset:
        x1, x2, labels = _token_inputs(cfg)
        return x1, x2, cfg.num_labels or labels
    factory = _factory(cfg.dataset, "data set")

    def make(split: str) -> Any:
        try:
            return factory(split=split, seed=cfg.seed)
        except TypeError as exc:
            raise ValueError(f"the data set factory {cfg.dataset!r} cannot be called as f(split=, seed=) "
                             f"({exc}); give a function that takes these and returns a tensor or a dict "
                             "of tensors") from exc

    x1 = _slice(make(cfg.split), cfg.offset, cfg.n, "x1")
    x2 = None
    if cfg.split2 is not None:
        x2 = _slice(make(cfg.split2), cfg.offset2, cfg.n2 or cfg.n, "x2")
    return x1, x2, cfg.num_labels or 2


def load_job_model(cfg: KernelJobConfig, num_labels: int, device: torch.device) -> nn.Module:
    """The model of the config on ``device``, prepared (``experiments.training.methods.prepare``) if asked."""
    dtype = MODEL_DTYPES[cfg.model_dtype]
    if ":" in cfg.model:
        make = _factory(cfg.model, "model")
        try:
            model = make(num_labels=num_labels, dtype=dtype, device=device, seed=cfg.seed)
        except TypeError as exc:
            raise ValueError(f"the model factory {cfg.model!r} cannot be called as f(num_labels=, dtype=, "
                             f"device=, seed=) ({exc}); give a function that takes these and returns an "
                             "nn.Module") from exc
        if not isinstance(model, nn.Module):
            raise ValueError(f"the model factory {cfg.model!r} returned a {type(model).__name__}, not an "
                             "nn.Module; give a function that returns the model")
    else:
        from experiments.data.models import load_model

        model = load_model(cfg.model, num_labels, dtype=dtype, device=device, seed=cfg.seed)
    if cfg.prepare is not None:
        from experiments.training.methods import prepare

        options: dict[str, Any] = {"degree": cfg.degree} if cfg.prepare == "propulsion" else {}
        model = prepare(model, cfg.prepare, **options)
    return model.to(device).eval()


def run_kernel_job(config: KernelJobConfig, out_dir: str | Path) -> Path:
    """Compute the missing tiles of this rank, then (rank 0) assemble ``out_dir/kernel.npy``.

    Under ``torchrun`` every rank calls this with the same config; without it, one process does
    all the work. Rank 0 also writes ``out_dir/kernel_config.json`` and a run record
    ``out_dir/runs/<utc time>-w<world size>.json`` (config, per-rank tile reports, seconds for
    loading, tiles and assembly, threads, versions). Returns the path of ``kernel.npy``.

    Raises:
        ntk.tiles.TileError: out_dir holds another job, or tiles are missing or corrupt.
        ntk.tiles.TilesInterrupted: the ``NTK_TILES_STOP_AFTER`` test hook fired.
    """
    start = time.perf_counter()
    out = Path(out_dir)
    threads = config.threads or default_threads()
    torch.set_num_threads(threads)
    ctx = init_distributed(None if config.device == "auto" else config.device, config.timeout_s)
    try:
        x1, x2, num_labels = load_job_inputs(config)
        model = load_job_model(config, num_labels, ctx.device)
        loaded = time.perf_counter()
        kernel, report = tiled_ntk(
            model, x1, x2, out_dir=out, mmap=config.mmap,
            params=config.params, output=config.output, method=config.engine,
            dtype=DTYPES[config.dtype], tile_size=config.tile_size, memory_budget=config.memory_budget,
            model_name=config.model, progress=config.progress,
        )
        done = time.perf_counter()
        reports = gather(report_dict(report), ctx)
        path = out / "kernel.npy"
        if ctx.rank == 0:
            if kernel is not None and not hasattr(kernel, "filename"):  # assembled in memory
                import numpy as np

                with atomic_path(path) as tmp, open(tmp, "wb") as fh:
                    np.save(fh, kernel.numpy())
            write_json(asdict(config), out / "kernel_config.json")
            stamp = datetime.datetime.now(datetime.timezone.utc)
            write_json({
                "config": asdict(config), "world_size": ctx.world_size, "threads_per_rank": threads,
                "device": str(ctx.device), "backend": str(torch.distributed.get_backend())
                if ctx.distributed else None,
                "seconds": {"load": loaded - start, "tiles": max(r["seconds"] for r in reports),
                            "assemble": time.perf_counter() - done, "total": time.perf_counter() - start},
                "reports": reports, "finished": stamp.isoformat(), "provenance": provenance(ctx.device),
            }, out / "runs" / f"{stamp:%Y%m%dT%H%M%S%fZ}-w{ctx.world_size}.json")
        return path
    finally:
        if ctx.initialized_here:
            torch.distributed.destroy_process_group()


# --------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------
def _add_arguments(p: argparse.ArgumentParser) -> None:
    d = KernelJobConfig()
    p.add_argument("--model", default=d.model, help="minilm or module:function")
    p.add_argument("--dataset", default=d.dataset, help="rotten_tomatoes, imdb, ... or module:function")
    p.add_argument("--split", default=d.split, choices=SPLITS)
    p.add_argument("--examples", "--n", dest="n", type=int, default=d.n,
                   help="examples of x1 (spell it --examples after torchrun, whose parser takes --n "
                        "for an abbreviation of its own --nnodes / --nproc-per-node)")
    p.add_argument("--offset", type=int, default=d.offset, help="first row of x1 in its split")
    p.add_argument("--split2", default=None, choices=SPLITS, help="x2's split (default: x2 = x1)")
    p.add_argument("--n2", type=int, default=None)
    p.add_argument("--offset2", type=int, default=0)
    p.add_argument("--max-length", type=int, default=d.max_length)
    p.add_argument("--num-labels", type=int, default=None)
    p.add_argument("--prepare", default=None,
                   help="experiments.training.methods.prepare method first (propulsion, lora, ...)")
    p.add_argument("--degree", type=int, default=d.degree)
    p.add_argument("--params", default=d.params, help="all, trainable, propulsion, lora, bias")
    p.add_argument("--output", default=d.output, choices=OUTPUTS)
    p.add_argument("--tile", type=int, default=d.tile_size, help="examples per tile side")
    p.add_argument("--dtype", default=d.dtype, choices=list(DTYPES))
    p.add_argument("--model-dtype", default=d.model_dtype, choices=list(MODEL_DTYPES))
    p.add_argument("--engine", default=d.engine, help="auto, structured, jacobian, ntk_vp")
    p.add_argument("--device", default=d.device)
    p.add_argument("--memory-budget-gb", type=float, default=None, help="GiB per rank")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--threads", type=int, default=None, help="torch threads per rank")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--out", default="runs/kernel")


def _config(args: argparse.Namespace) -> KernelJobConfig:
    budget = None if args.memory_budget_gb is None else args.memory_budget_gb * 2**30
    return KernelJobConfig(
        model=args.model, dataset=args.dataset, split=args.split, n=args.n, offset=args.offset,
        split2=args.split2, n2=args.n2, offset2=args.offset2, max_length=args.max_length,
        num_labels=args.num_labels, prepare=args.prepare, degree=args.degree, params=args.params,
        output=args.output, tile_size=args.tile, dtype=args.dtype, model_dtype=args.model_dtype,
        engine=args.engine, device=args.device, memory_budget=budget, seed=args.seed,
        threads=args.threads, progress=not args.no_progress,
    )


def add_kernel_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``kernel`` command to ``propulsion-ntk``'s sub-parsers."""
    p = subparsers.add_parser("kernel", help="kernel tiles on disk (resumable, torchrun-ready)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_arguments(p)
    p.set_defaults(func=run_kernel_command)
    return p


def run_kernel_command(args: argparse.Namespace) -> int:
    """Run the job of parsed arguments; 0 on success, 3 when the test hook stopped it."""
    writable_folder(args.out)
    try:
        path = run_kernel_job(_config(args), args.out)
    except TilesInterrupted as exc:
        print(f"interrupted: {exc}", file=sys.stderr)
        return 3
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"kernel: {path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.distributed.kernel_job", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_arguments(parser)
    from experiments.cli import KNOWN_ERRORS, error_sentence

    try:
        return run_kernel_command(parser.parse_args(argv))
    except KNOWN_ERRORS as exc:  # a sentence per rank, not a traceback
        rank = os.environ.get('RANK', '0')
        print(f"kernel_job (rank {rank}): error: {error_sentence(exc)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
