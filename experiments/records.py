"""What a training run records: tidy rows, metrics, memory probes and provenance.

Rows are one dict per (step, kind): ``kind="train"`` after every optimiser step, ``"eval"`` per
evaluation on validation, ``"test"`` once on the checkpoint chosen by validation, ``"nan"`` when
a non-finite loss stopped the run, and whatever callbacks log. They go to ``rows.parquet``;
``run.json`` holds the provenance. Both files are written atomically.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd
import torch

__all__ = [
    # metrics
    "accuracy", "macro_f1",
    # memory
    "MemoryProbe",
    # files
    "atomic_write", "write_rows", "read_rows", "write_json", "read_json", "provenance",
    # row schema
    "TRAIN_COLUMNS", "EVAL_COLUMNS", "TEST_COLUMNS", "TIMING_COLUMNS", "RESERVED_KINDS",
]

TRAIN_COLUMNS = ("loss", "lr", "grad_norm", "seconds", "train_seconds", "tokens_per_s", "peak_memory_mb")
EVAL_COLUMNS = ("loss", "accuracy", "macro_f1", "examples", "train_seconds")
TEST_COLUMNS = ("loss", "accuracy", "macro_f1", "examples")
TIMING_COLUMNS = ("seconds", "train_seconds", "tokens_per_s", "peak_memory_mb")  # differ run to run
RESERVED_KINDS = ("train", "eval", "test", "nan")
PACKAGES = ("torch", "transformers", "peft", "numpy", "pandas", "pyarrow", "safetensors")


# --------------------------------------------------------------------------------------------
# metrics
# --------------------------------------------------------------------------------------------
def accuracy(predictions: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of ``predictions == labels`` (both (n,) integer tensors)."""
    if predictions.shape != labels.shape or predictions.ndim != 1 or len(labels) == 0:
        raise ValueError(f"need two equal, non-empty (n,) tensors, got {tuple(predictions.shape)} "
                         f"and {tuple(labels.shape)}")
    return float((predictions == labels).double().mean())


def macro_f1(predictions: torch.Tensor, labels: torch.Tensor, num_labels: int) -> float:
    """Unweighted mean over classes c of F1_c = 2 TP_c / (2 TP_c + FP_c + FN_c).

    A class with no true and no predicted example (0 / 0) scores 0 and still counts in the mean,
    as ``sklearn.metrics.f1_score(..., average="macro", labels=range(C), zero_division=0)`` does.
    """
    if predictions.shape != labels.shape or predictions.ndim != 1:
        raise ValueError(f"need two equal (n,) tensors, got {tuple(predictions.shape)} and "
                         f"{tuple(labels.shape)}")
    index = labels.long() * num_labels + predictions.long()
    confusion = torch.bincount(index, minlength=num_labels ** 2).reshape(num_labels, num_labels).double()
    tp = confusion.diagonal()
    denominator = confusion.sum(0) + confusion.sum(1)  # (TP + FP) + (TP + FN)
    f1 = torch.where(denominator > 0, 2 * tp / denominator.clamp_min(1), torch.zeros_like(tp))
    return float(f1.mean())


# --------------------------------------------------------------------------------------------
# memory
# --------------------------------------------------------------------------------------------
def _proc_status_mb(key: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


class MemoryProbe:
    """Peak memory since :meth:`reset`, in MiB.

    CUDA: ``torch.cuda.max_memory_allocated``. CPU: the process's peak resident set (``VmHWM``
    after resetting it through ``/proc/self/clear_refs`` on Linux; ``ru_maxrss``, the peak over
    the whole process life, where that reset is refused).
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.baseline_mb: float | None = None

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline_mb = torch.cuda.memory_allocated(self.device) / 2**20
            return
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass
        self.baseline_mb = _proc_status_mb("VmRSS")

    def peak_mb(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        hwm = _proc_status_mb("VmHWM")
        if hwm is not None:
            return hwm
        scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, kB on Linux
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


# --------------------------------------------------------------------------------------------
# files
# --------------------------------------------------------------------------------------------
def atomic_write(path: Path, write) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then move it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_rows(rows: list[dict[str, Any]], path: Path) -> None:
    """Rows (dicts with at least ``step`` and ``kind``) to a Parquet file, atomically."""
    frame = pd.DataFrame(rows, columns=None if rows else ["step", "kind"])
    atomic_write(Path(path), lambda tmp: frame.to_parquet(tmp, index=False))


def read_rows(path: Path) -> pd.DataFrame:
    return pd.read_parquet(path)


def write_json(data: dict[str, Any], path: Path) -> None:
    text = json.dumps(data, indent=2, sort_keys=True, allow_nan=True)
    atomic_write(Path(path), lambda tmp: Path(tmp).write_text(text + "\n"))


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=Path(__file__).resolve().parent, capture_output=True,
                             text=True, timeout=20, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def provenance(device: torch.device) -> dict[str, Any]:
    """Git commit (and whether the tree had uncommitted changes), versions, machine, device name."""
    status = _git("status", "--porcelain", "--untracked-files=no")
    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = platform.processor() or platform.machine()
    return {
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": None if status is None else bool(status),
        "versions": {"python": platform.python_version(), **{p: _version(p) for p in PACKAGES}},
        "device": str(device),
        "device_name": device_name,
        "cpu_threads": torch.get_num_threads(),
        "hostname": platform.node(),
    }
