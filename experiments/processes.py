"""One writer per results folder, and child processes that die with their parent.

* :func:`folder_lock` - an exclusive ``fcntl`` lock on ``folder/.lock`` held while a run writes
  the folder; a second writer is refused at once with the folder and the holder's pid. The
  kernel drops the lock when its holder exits, even on SIGKILL, so a stale lock file never
  blocks a rerun.
* :func:`die_with_parent` - called first thing in a child process: on Linux the kernel sends
  it SIGKILL when its parent dies (``prctl(PR_SET_PDEATHSIG)``), so killing a command never
  leaves a training run behind that keeps writing (and timing itself against) a folder.
* :func:`release_memory` - between the units of a long run: collect reference cycles (a model
  in a cycle keeps its weights until the collector runs) and hand the C heap's free pages back
  to the system (glibc ``malloc_trim``).
"""

from __future__ import annotations

import ctypes
import errno
import os
import signal
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["FolderLockedError", "folder_lock", "writable_folder", "die_with_parent", "release_memory",
           "LOCK_NAME"]

LOCK_NAME = ".lock"
_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


class FolderLockedError(RuntimeError):
    """Another live process is writing the folder."""


def writable_folder(folder: str | Path, flag: str = "--out") -> Path:
    """``folder``, created if missing, once a file could be created in it.

    Raises:
        ValueError: it is a file, or cannot be created or written (the message names it).
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{flag} {folder} is a file, not a folder; give a folder (it is created if missing)")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as exc:
        raise ValueError(f"{flag} {folder} cannot be written ({exc.strerror or exc}); give a folder you may "
                         "write to") from exc
    return folder


@contextmanager
def folder_lock(folder: str | Path) -> Iterator[Path]:
    """Hold the exclusive write lock of ``folder`` (created) for the block; yields the folder.

    Raises:
        FolderLockedError: another process holds it (the message has the folder and its pid).
        ValueError: ``folder`` cannot be created or written (a file, no permission).
    """
    folder = writable_folder(folder)
    try:
        handle = open(folder / LOCK_NAME, "a+")  # closed in finally
    except OSError as exc:
        raise ValueError(f"cannot write to {folder} ({exc.strerror or exc}); give a writable folder") from exc
    try:
        try:
            import fcntl

            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # pragma: no cover - not POSIX: no lock
            pass
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            raise FolderLockedError(
                f"{folder} is being written by another run (pid {holder}); wait for it to finish or stop "
                f"it (kill {holder}), or give another output folder") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        yield folder
    finally:
        handle.close()  # releases the lock


def die_with_parent(parent_pid: int | None = None) -> None:
    """Ask the kernel to SIGKILL this process when its parent dies (Linux; a no-op elsewhere).

    ``parent_pid``: the pid the parent had; if the parent is already gone (it died before the
    request took effect), exit at once.
    """
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):  # pragma: no cover - no libc prctl
            return
    if parent_pid is not None and os.getppid() != parent_pid:
        os._exit(1)


def release_memory() -> None:
    """Free what the last unit left: run the cyclic garbage collector, then (Linux, glibc) return
    the heap's free pages to the system with ``malloc_trim(0)``; elsewhere only the collection."""
    import gc

    gc.collect()
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # pragma: no cover - a libc without malloc_trim (musl)
            pass
