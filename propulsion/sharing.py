"""Which modules and tensors of a model are shared: what merging must know before it folds.

A module can be registered at several paths (``self.b = self.a``), and a tensor can be held by
several modules (a tied embedding and LM head hold one ``(V, d)`` weight). Folding ``z**k`` in
place into a shared tensor changes every module that holds it.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["all_paths", "holders", "shares_memory", "tensor_index"]


def all_paths(model: nn.Module) -> dict[str, nn.Module]:
    """Every path of every submodule except the root; a module registered twice is listed
    under both paths, in ``named_modules`` order (its first path first)."""
    modules = dict(model.named_modules(remove_duplicate=False))
    modules.pop("", None)
    return modules


def shares_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True when writing into ``a`` in place can change ``b`` (same object or overlapping
    storage); tensors on the meta device hold no memory and never share."""
    if a is b:
        return True
    if a.device != b.device or a.device.type == "meta" or a.numel() == 0 or b.numel() == 0:
        return False
    if a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return False

    def byte_range(t: torch.Tensor) -> tuple[int, int]:
        size = t.element_size()
        last = sum((int(n) - 1) * int(s) for n, s in zip(t.shape, t.stride(), strict=True))
        start = int(t.storage_offset())
        return start * size, (start + last + 1) * size

    (a0, a1), (b0, b1) = byte_range(a), byte_range(b)
    return a0 < b1 and b0 < a1


Holding = tuple[str, nn.Module, torch.Tensor]  # (path.name, module, tensor)


def _key(t: torch.Tensor) -> tuple:
    if t.device.type == "meta" or t.numel() == 0:
        return ("object", id(t))
    return (str(t.device), t.untyped_storage().data_ptr())


def tensor_index(model: nn.Module) -> dict[tuple, list[Holding]]:
    """Every parameter and buffer of every module (at every path), grouped by storage."""
    index: dict[tuple, list[Holding]] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        own = list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False))
        for name, tensor in own:
            if tensor is not None:
                index.setdefault(_key(tensor), []).append(
                    (f"{path}.{name}" if path else name, module, tensor)
                )
    return index


def holders(index: dict[tuple, list[Holding]], tensor: torch.Tensor, owner: nn.Module) -> list[str]:
    """Names of tensors held by modules other than ``owner`` that share memory with
    ``tensor``: who else sees an in-place change of it. ``index`` is :func:`tensor_index`."""
    return [
        name for name, module, other in index.get(_key(tensor), [])
        if module is not owner and shares_memory(tensor, other)
    ]
