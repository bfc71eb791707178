"""torch.distributed for kernels and sweeps: join the ``torchrun`` group, and the few collectives
the tiled kernel job, its assembly and the experiment sweeps share.

Without ``torchrun`` (``WORLD_SIZE`` unset or 1) everything degrades to one process: rank 0 of 1,
:func:`broadcast` returns its argument, :func:`gather` a one-item list, :func:`barrier` nothing.

    >>> ctx = init_distributed(device="cpu")
    >>> (ctx.rank, ctx.world_size, broadcast({"a": 1}, ctx), gather(3, ctx))
    (0, 1, {'a': 1}, [3])
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["DistContext", "init_distributed", "current_context", "default_threads",
           "broadcast", "gather", "barrier"]


@dataclass(frozen=True)
class DistContext:
    """Rank, world size and device of this process (rank 0 of 1 without ``torchrun``)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    initialized_here: bool = False

    @property
    def distributed(self) -> bool:
        return torch.distributed.is_available() and torch.distributed.is_initialized()




def broadcast(obj: Any, ctx: DistContext) -> Any:
    """``obj`` of rank 0 on every rank (itself without a process group)."""
    if not ctx.distributed:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def barrier(ctx: DistContext) -> None:
    """Wait for every rank (nothing without a process group; NCCL on this rank's device)."""
    if ctx.distributed:
        if torch.distributed.get_backend() == "nccl":
            torch.distributed.barrier(device_ids=[ctx.local_rank])
        else:
            torch.distributed.barrier()


def current_context() -> DistContext:
    """The context of an already initialised process group (rank 0 of 1 without one)."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        return DistContext(dist.get_rank(), dist.get_world_size(), local)
    return DistContext()




def init_distributed(device: str | None = None, timeout_s: float = 12 * 3600,
                     backend: str | None = None) -> DistContext:
    """Join the ``torchrun`` process group when there is one; a 1-process context otherwise.

    A group is started when ``WORLD_SIZE > 1`` in the environment (``torchrun`` sets it, with
    ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) and none is initialised yet:
    backend ``nccl`` with device ``cuda:LOCAL_RANK`` when CUDA is available and ``device`` is
    not "cpu", else ``gloo`` on the CPU. ``timeout_s`` bounds every collective, the final
    barrier included, where fast ranks wait for slow ones: keep it above a rank's share of work.

    Args:
        device: "cpu", "cuda" (-> ``cuda:LOCAL_RANK``), "cuda:k", or None (cuda when available).
        timeout_s: collective timeout in seconds.
        backend: force "gloo" or "nccl" (None: as above).
    """
    dist = torch.distributed
    local = int(os.environ.get("LOCAL_RANK", "0"))
    want_cuda = torch.cuda.is_available() and (device is None or device.startswith("cuda"))
    if device is not None and device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} requested but CUDA is not available")
    if want_cuda:
        dev = torch.device(device if device and ":" in device else f"cuda:{local}")
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    here = False
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        chosen = backend or ("nccl" if dev.type == "cuda" else "gloo")
        kwargs: dict[str, Any] = {"timeout": datetime.timedelta(seconds=timeout_s)}
        if chosen == "nccl":
            kwargs["device_id"] = dev
        dist.init_process_group(backend=chosen, **kwargs)
        here = True
    if dist.is_initialized():
        return DistContext(dist.get_rank(), dist.get_world_size(), local, dev, here)
    return DistContext(0, 1, 0, dev, False)


def default_threads() -> int:
    """Torch threads for one rank: the cores this process may use // ``LOCAL_WORLD_SIZE``.

    ``torchrun`` sets ``OMP_NUM_THREADS=1`` for every rank when it starts several per node, which
    leaves cores idle when the ranks are fewer than the cores; this splits them evenly instead.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


def gather(obj: Any, ctx: DistContext) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank (``[obj]`` without a process group)."""
    if not ctx.distributed:
        return [obj]
    out: list[Any] = [None] * ctx.world_size
    torch.distributed.all_gather_object(out, obj)
    return out
