"""Helpers shared by the benchmark scripts: resident memory, timing, provenance, atomic writes.

Memory probes read Linux ``/proc`` (None elsewhere). Timings give wall and process CPU seconds
(CPU seconds count every thread of the process, so on a busy machine they measure the work
better than wall seconds).
"""

from __future__ import annotations

import datetime
import os
import platform
import resource
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def proc_status_kb(key: str) -> int | None:
    """A ``kB`` field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``), or None if unreadable."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak_rss() -> bool:
    """Reset ``VmHWM`` to the current RSS (Linux >= 4.0); False when that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return proc_status_kb("VmHWM") is not None


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (``ru_maxrss``), in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(fn: Callable[[], Any], sync: Callable[[], Any] | None = None) -> tuple[Any, float, float]:
    """``(result, wall seconds, CPU seconds)`` of one call; ``sync`` (e.g. a device
    synchronisation) runs before the clocks stop."""
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    if sync is not None:
        sync()
    return out, time.perf_counter() - t0, time.process_time() - c0


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def git_commit() -> str:
    """``HEAD`` of the repository (``+dirty`` when code has uncommitted changes: the packages,
    benchmark scripts, scripts and pyproject.toml, not result files), or ``unknown``."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              cwd=ROOT, check=True).stdout.strip()
        from experiments.records import CODE_PATHS  # lazy: the JAX worker never calls this

        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--",
                                *CODE_PATHS, ":(exclude)benchmarks/results"],
                               capture_output=True, text=True, cwd=ROOT, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError, ImportError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def load_average() -> list[float]:
    """The 1, 5 and 15 minute load averages (``uptime``); empty where unavailable."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return []


def provenance(**extra: Any) -> dict[str, Any]:
    """Date, commit, machine, CPU, Python and load of this run, plus ``extra``."""
    return {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "git_commit": git_commit(), "machine": platform.platform(), "cpu": cpu_model(),
            "cpus": os.cpu_count(), "python": platform.python_version(),
            "load_average_at_start": load_average(), **extra}


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write ``path`` through a temporary file and a rename (never a half-written result)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    os.replace(tmp, path)
