"""What a training run records: tidy rows, metrics, memory probes and provenance.

Rows are one dict per (step, kind): ``kind="train"`` after every optimiser step, ``"eval"`` per
evaluation on validation, ``"test"`` once on the checkpoint chosen by validation, ``"nan"`` when
a non-finite loss stopped the run, and whatever callbacks log. They go to ``rows.parquet``;
``run.json`` holds the provenance and the sha256 of ``rows.parquet``. Every file is written
through :func:`atomic_path` (the package's one atomic writer) and read back only after its
checksum is verified (:func:`read_json`, :func:`read_rows`, :func:`verify_file`).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
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
    "atomic_path", "atomic_write", "write_bytes", "file_sha256", "verify_file", "DamagedFileError",
    "write_rows", "read_rows", "write_json", "read_json", "JSON_CHECKSUM",
    # provenance
    "provenance", "code_commit", "package_version",
    # row schema
    "TRAIN_COLUMNS", "EVAL_COLUMNS", "TEST_COLUMNS", "TIMING_COLUMNS", "RESERVED_KINDS",
]

TRAIN_COLUMNS = ("loss", "lr", "grad_norm", "seconds", "train_seconds", "tokens_per_s", "peak_memory_mb")
EVAL_COLUMNS = ("loss", "accuracy", "macro_f1", "examples", "train_seconds")
TEST_COLUMNS = ("loss", "accuracy", "macro_f1", "examples")
TIMING_COLUMNS = ("seconds", "train_seconds", "tokens_per_s", "peak_memory_mb")  # differ run to run
RESERVED_KINDS = ("train", "eval", "test", "nan")
PACKAGES = ("propulsion-ntk", "torch", "transformers", "peft", "numpy", "pandas", "pyarrow", "safetensors")


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
# files: one atomic writer, checksums
# --------------------------------------------------------------------------------------------
class DamagedFileError(ValueError):
    """A stored file does not match its recorded sha256, lacks one, or does not parse.

    The message names the file and what to do (usually: delete it, or the unit or run it belongs
    to, so that it is computed again).
    """


@contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """A temporary path beside ``target``; flushed to disk and moved onto ``target`` only if the
    block succeeds, removed otherwise. The one atomic writer of the ``experiments`` package.

    Example:
        >>> import tempfile
        >>> folder = Path(tempfile.mkdtemp())
        >>> with atomic_path(folder / "a.txt") as tmp:
        ...     _ = tmp.write_text("done")
        >>> (folder / "a.txt").read_text()
        'done'
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:  # the bytes reach the disk before the name points at them
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write(path: str | Path, write: Callable[[Path], Any]) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then move it into place."""
    with atomic_path(path) as tmp:
        write(tmp)


def write_bytes(path: str | Path, data: bytes) -> str:
    """Write ``data`` to ``path`` atomically; returns its sha256 (hex)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def file_sha256(path: str | Path) -> str:
    """sha256 (hex) of a file's bytes, read in 4 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def verify_file(path: str | Path, sha256: Any, remedy: str) -> Path:
    """Check ``path`` against the sha256 recorded for it; returns ``path``.

    Raises:
        DamagedFileError: the file is missing, unreadable, has no recorded checksum or another one;
            the message names it and ends with ``remedy`` (what to do).
    """
    path = Path(path)
    if not isinstance(sha256, str) or len(sha256) != 64:
        raise DamagedFileError(f"{path} has no recorded sha256 (written by an older version, or the "
                               f"record was edited); {remedy}")
    try:
        found = file_sha256(path)
    except OSError as exc:
        raise DamagedFileError(f"{path} is unreadable ({exc}); {remedy}") from exc
    if found != sha256:
        raise DamagedFileError(f"{path} is damaged: its sha256 {found[:12]}... differs from the recorded "
                               f"{sha256[:12]}...; {remedy}")
    return path


JSON_CHECKSUM = "json_sha256"  # the key under which write_json records the checksum of the rest


def _json_digest(data: dict[str, Any]) -> str:
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), allow_nan=True)
    return hashlib.sha256(text.encode()).hexdigest()


def write_json(data: dict[str, Any], path: str | Path) -> None:
    """``data`` as indented JSON, atomically, with ``json_sha256``: the sha256 of its canonical
    JSON (sorted keys, no spaces), which :func:`read_json` checks."""
    if JSON_CHECKSUM in data:
        raise ValueError(f"{JSON_CHECKSUM!r} is reserved for the checksum")
    payload = {**data, JSON_CHECKSUM: _json_digest(data)}
    text = json.dumps(payload, indent=2, sort_keys=True, allow_nan=True) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def read_json(path: str | Path, *, remedy: str | None = None,
              require_checksum: bool = True) -> dict[str, Any]:
    """A JSON object written by :func:`write_json`, its checksum verified (``json_sha256`` removed).

    ``require_checksum=False`` accepts a file without one (caches written by older versions); a
    file that has one is always checked.

    Raises:
        DamagedFileError: unreadable, truncated or not an object, or its content does not match
            its checksum (a flipped bit, an edit by hand); the message names the file.
    """
    path = Path(path)
    remedy = remedy or f"delete {path} (or the folder it belongs to) to compute it again"
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DamagedFileError(f"cannot read {path} ({exc}); it is truncated or damaged; {remedy}") from exc
    if not isinstance(data, dict):
        raise DamagedFileError(f"{path} holds a JSON {type(data).__name__}, not an object; {remedy}")
    recorded = data.pop(JSON_CHECKSUM, None)
    if recorded is None and not require_checksum:
        return data
    if recorded != _json_digest(data):
        what = "has no checksum" if recorded is None else "does not match its checksum"
        raise DamagedFileError(f"{path} {what} (damaged, edited by hand, or written by an older version); "
                               f"{remedy}")
    return data


def write_rows(rows: list[dict[str, Any]], path: str | Path) -> str:
    """Rows (dicts with at least ``step`` and ``kind``) to a Parquet file, atomically; returns
    the file's sha256, to be recorded where the file is vouched for (``run.json``)."""
    frame = pd.DataFrame(rows, columns=None if rows else ["step", "kind"])
    return write_bytes(path, frame.to_parquet(index=False))


def read_rows(path: str | Path, sha256: str | None = None, remedy: str = "") -> pd.DataFrame:
    """The rows of :func:`write_rows`, after checking the file against ``sha256`` (default: the
    ``rows_sha256`` that the ``run.json`` beside it records).

    Raises:
        DamagedFileError: the file or ``run.json`` is missing or damaged, or nothing vouches for
            the rows; the message names the file and ends with ``remedy``.
    """
    path = Path(path)
    remedy = remedy or f"delete the folder {path.parent} to run it afresh"
    if sha256 is None:
        sha256 = read_json(path.parent / "run.json", remedy=remedy).get("rows_sha256")
    return pd.read_parquet(verify_file(path, sha256, remedy))


# --------------------------------------------------------------------------------------------
# provenance
# --------------------------------------------------------------------------------------------
def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=Path(__file__).resolve().parent, capture_output=True,
                             text=True, timeout=20, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def package_version(dist: str) -> str | None:
    """The installed version of distribution ``dist``; None when it is not installed."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


# What computes results: a change here makes a tree "dirty"; results, figures, reports and docs
# that runs write (into a committed results folder, say) do not.
CODE_PATHS = ("propulsion", "ntk", "experiments", "benchmarks", "scripts", "pyproject.toml")


def code_commit() -> tuple[str | None, bool | None]:
    """``(commit, dirty)`` of the code that runs: ``git rev-parse HEAD`` and whether a tracked
    file under :data:`CODE_PATHS` has uncommitted changes (None, None outside a git checkout)."""
    status = _git("status", "--porcelain", "--untracked-files=no", "--", *(f":/{p}" for p in CODE_PATHS))
    return _git("rev-parse", "HEAD"), None if status is None else bool(status)


def provenance(device: torch.device | str) -> dict[str, Any]:
    """Where a result comes from: git commit (and whether the code had uncommitted changes, see
    :func:`code_commit`), Python and package versions, device, device name, torch threads, host.
    The one provenance helper of the ``experiments`` package (training runs, suite stores, kernel
    jobs)."""
    device = torch.device(device)
    commit, dirty = code_commit()
    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = platform.processor() or platform.machine()
    return {
        "git_commit": commit,
        "git_dirty": dirty,
        "versions": {"python": platform.python_version(), **{p: package_version(p) for p in PACKAGES}},
        "device": str(device),
        "device_name": device_name,
        "cpu_threads": torch.get_num_threads(),
        "hostname": platform.node(),
    }
