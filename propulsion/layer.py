"""Propulsion wrappers: a frozen base layer whose output is scaled by ``z**k`` per feature.

    PropulsionLinear     h = (W x + b) * z**k          z: (out_features,)
    PropulsionEmbedding  h = E[ids] * z**k             z: (embedding_dim,)
    PropulsionLayerNorm  h = LayerNorm(x) * z**k       z: (normalized_shape,)

The base layer is held as ``base_layer`` (never copied); ``z`` is the parameter
``propulsion_z``, kept in float32 (float64 when the base layer is float64) whatever dtype the
model is cast to, because ``1 + delta`` with ``|delta| < 2**-8`` is not representable in bf16.
Since ``(W x + b) * s = (diag(s) W) x + diag(s) b``, every wrapper folds into its base layer.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from propulsion.errors import PropulsionError

__all__ = [
    "ADAPTER_PARAMETER",
    "WRAPPERS",
    "PropulsionEmbedding",
    "PropulsionLayer",
    "PropulsionLayerNorm",
    "PropulsionLinear",
]

ADAPTER_PARAMETER = "propulsion_z"  # the one fixed name every adapter parameter carries


def _z_dtype(like: torch.dtype) -> torch.dtype:
    return torch.float64 if like == torch.float64 else torch.float32


class PropulsionLayer(nn.Module):
    """Base class of the wrappers; subclasses say how the scale folds into the base layer.

    Attributes:
        base_layer: the wrapped module (its parameters keep their names under ``base_layer.``).
        propulsion_z: trainable vector ``z`` of shape ``(features,)``.
        degree: the integer power ``k >= 1``.
        merged: True while ``z**k`` is folded into the base layer's parameters.
    """

    base_type: type[nn.Module] = nn.Module

    def __init__(self, base_layer: nn.Module, degree: int, init_value: float = 1.0):
        super().__init__()
        if not isinstance(base_layer, self.base_type):
            raise PropulsionError(
                f"{type(self).__name__} wraps {self.base_type.__name__}, "
                f"got {type(base_layer).__name__}"
            )
        if isinstance(degree, bool) or not isinstance(degree, int) or degree < 1:
            raise PropulsionError(f"degree must be an integer >= 1, got {degree!r}")
        self.base_layer = base_layer
        self.degree = degree
        self.merged = False
        self.flushed = 0  # base entries a merge rounded to exactly 0 (unmerge cannot restore them)
        ref = self._reference_tensor()
        self.propulsion_z = nn.Parameter(
            torch.full(
                (self.features,), float(init_value), dtype=_z_dtype(ref.dtype), device=ref.device
            )
        )

    # -- what subclasses define ---------------------------------------------------------------
    @property
    def features(self) -> int:
        raise NotImplementedError

    def _reference_tensor(self) -> torch.Tensor:
        """A tensor of the base layer giving the device and dtype for ``z``."""
        raise NotImplementedError

    def fold_targets(self) -> list[tuple[torch.Tensor, tuple[int, ...]]]:
        """The base parameters ``z**k`` folds into, each with the shape ``z**k`` is viewed as."""
        raise NotImplementedError

    # -- shared behaviour ---------------------------------------------------------------------
    def scale(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``z**k`` of shape ``(features,)``, computed in at least float32, cast to ``dtype``."""
        z = self.propulsion_z
        compute = torch.float64 if torch.float64 in (z.dtype, dtype) else torch.float32
        s = z.to(compute) ** self.degree
        return s if dtype is None else s.to(dtype)

    def forward(self, *args: torch.Tensor, **kwargs: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(*args, **kwargs)
        if self.merged:
            return out
        return out * self.scale(out.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold ``z**k`` into the base layer (in place); the wrapper then passes through.

        Every folded tensor is checked first (:meth:`check_mergeable`), so a refusal changes
        nothing. One layer cannot see the rest of the model: merge through
        ``merge_adapter(model)``, which also refuses weights shared with other modules.
        """
        if self.merged:
            raise PropulsionError(f"{type(self).__name__} is already merged")
        self.check_mergeable()
        self._merge_checked()

    @torch.no_grad()
    def _merge_checked(self) -> None:
        """:meth:`merge` once :meth:`check_mergeable` has passed (the model checks every layer
        first, then merges them all)."""
        self.flushed = self._fold(self.scale(torch.float64))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo :meth:`merge` by dividing by ``z**k`` (exact up to rounding of the base dtype)."""
        if not self.merged:
            raise PropulsionError(f"{type(self).__name__} is not merged; nothing to unmerge")
        lost = self.lost_at_merge()
        if lost:
            raise PropulsionError(f"cannot unmerge: {lost}; reload the base model and the adapter instead")
        self._fold(1.0 / self.scale(torch.float64))
        self.merged = False

    def lost_at_merge(self) -> str | None:
        """Why the merged base weights cannot be recovered (z**k entries equal to 0, or base
        entries the merge rounded to 0 in their dtype), or None when they can."""
        if bool((self.scale(torch.float64) == 0).any()):
            return "some z**k entries are exactly 0, so the base weights were lost at merge"
        if self.flushed:
            return (f"the merge rounded {self.flushed} non-zero base entries to exactly 0 in the weights' "
                    "dtype (z**k too small for it), so they were lost")
        return None

    @torch.no_grad()
    def check_mergeable(self) -> None:
        """Raise PropulsionError if :meth:`merge` would fail or write non-finite weights.

        ``z**k`` must be finite in float64, and every folded tensor must stay finite after the
        cast back to its own dtype (``z = 1e20, k = 3`` is finite in float64 but overflows
        float32 weights).
        """
        if isinstance(self.base_layer, PropulsionLayer) or any(
            isinstance(m, PropulsionLayer) for m in self.base_layer.modules()
        ):
            raise PropulsionError(
                "cannot merge: a Propulsion layer wraps another Propulsion layer (two z on one "
                "module); unload the inner one first"
            )
        s = self.scale(torch.float64)
        if not bool(torch.isfinite(s).all()):
            bad = int((~torch.isfinite(s)).sum())
            raise PropulsionError(f"cannot merge: {bad} entries of z**k are not finite")
        largest = float(s.abs().max()) if s.numel() else 0.0
        for param, shape in self.fold_targets():
            if _bound(param) * largest <= torch.finfo(param.dtype).max:
                continue  # no product can leave the dtype's range: skip the exact count
            folded = _folded(param, s, shape)
            new_bad = int((~torch.isfinite(folded) & torch.isfinite(param)).sum())
            if new_bad:
                raise PropulsionError(
                    f"cannot merge: folding z**k (largest |z**k| = {largest:.3g}) "
                    f"into a {str(param.dtype).removeprefix('torch.')} tensor of shape "
                    f"{tuple(param.shape)} gives {new_bad} non-finite entries; keep the model "
                    "unmerged, or bring z back to a range the weights' dtype can hold"
                )

    def _fold(self, scale: torch.Tensor) -> int:
        """Multiply the base parameters in place so the base layer computes the scaled output;
        return how many non-zero entries the product rounded to exactly 0 in their dtype."""
        flushed = 0
        for param, shape in self.fold_targets():
            folded = _folded(param, scale, shape)
            flushed += int(((folded == 0) & (param != 0)).sum())
            param.data.copy_(folded)
        return flushed

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], *args, **kwargs):
        # Keep z in float32/float64 when the model is cast to half precision.
        before = self.propulsion_z.detach().clone()
        result = super()._apply(fn, *args, **kwargs)
        z = self.propulsion_z
        if z.dtype not in (torch.float32, torch.float64):
            z.data = before.to(device=z.device, dtype=torch.float32)
        return result

    def extra_repr(self) -> str:
        return f"features={self.features}, degree={self.degree}, merged={self.merged}"


def _folded(param: torch.Tensor, scale: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """``param * scale.reshape(shape)`` computed in float64, returned in ``param``'s dtype."""
    scaled = param.detach().to(torch.float64) * scale.to(param.device).reshape(shape)
    return scaled.to(param.dtype)


def _bound(param: torch.Tensor) -> float:
    """Largest magnitude among the finite entries of ``param`` (0 when there are none)."""
    if param.numel() == 0:
        return 0.0
    top = float(torch.linalg.vector_norm(param.detach(), float("inf")))  # no temporary copy
    if top != float("inf") and top == top:
        return top
    mag = param.detach().abs()
    return float(torch.where(torch.isfinite(mag), mag, torch.zeros_like(mag)).max())


_Fold = tuple[torch.Tensor, tuple[int, ...]]  # (base tensor, shape z**k is viewed as)


def _present(*pairs: tuple[torch.Tensor | None, tuple[int, ...]]) -> list[_Fold]:
    return [(p, shape) for p, shape in pairs if p is not None]


class PropulsionLinear(PropulsionLayer):
    """``h = (W x + b) * z**k`` for an ``nn.Linear``; the bias is inside the scaling.

    Shapes: x ``(..., in_features)`` -> h ``(..., out_features)``; z ``(out_features,)``.
    """

    base_type = nn.Linear
    base_layer: nn.Linear

    @property
    def features(self) -> int:
        return self.base_layer.out_features

    def _reference_tensor(self) -> torch.Tensor:
        return self.base_layer.weight

    def fold_targets(self) -> list[tuple[torch.Tensor, tuple[int, ...]]]:
        return _present((self.base_layer.weight, (-1, 1)), (self.base_layer.bias, (-1,)))


class PropulsionEmbedding(PropulsionLayer):
    """``h = E[ids] * z**k`` for an ``nn.Embedding``; z ``(embedding_dim,)``."""

    base_type = nn.Embedding
    base_layer: nn.Embedding

    @property
    def features(self) -> int:
        return self.base_layer.embedding_dim

    def _reference_tensor(self) -> torch.Tensor:
        return self.base_layer.weight

    def fold_targets(self) -> list[tuple[torch.Tensor, tuple[int, ...]]]:
        return _present((self.base_layer.weight, (1, -1)))


class PropulsionLayerNorm(PropulsionLayer):
    """``h = LayerNorm(x) * z**k``; needs an elementwise affine LayerNorm to merge."""

    base_type = nn.LayerNorm
    base_layer: nn.LayerNorm

    def __init__(self, base_layer: nn.Module, degree: int, init_value: float = 1.0):
        if isinstance(base_layer, nn.LayerNorm) and len(base_layer.normalized_shape) != 1:
            raise PropulsionError(
                "PropulsionLayerNorm supports LayerNorm over the last dimension only, got "
                f"normalized_shape={tuple(base_layer.normalized_shape)}"
            )
        super().__init__(base_layer, degree, init_value)

    @property
    def features(self) -> int:
        return int(self.base_layer.normalized_shape[0])

    def _reference_tensor(self) -> torch.Tensor:
        if self.base_layer.weight is not None:
            return self.base_layer.weight
        return torch.empty(0)

    def check_mergeable(self) -> None:
        if self.base_layer.weight is None:
            raise PropulsionError(
                "cannot merge into a LayerNorm without elementwise affine parameters; keep "
                "the wrapper (unmerged) or wrap only affine LayerNorms"
            )
        super().check_mergeable()

    def fold_targets(self) -> list[tuple[torch.Tensor, tuple[int, ...]]]:
        return _present((self.base_layer.weight, (-1,)), (self.base_layer.bias, (-1,)))


# Module type -> wrapper; the injector looks wrappers up here (exact type or subclass).
WRAPPERS: dict[type[nn.Module], type[PropulsionLayer]] = {
    nn.Linear: PropulsionLinear,
    nn.Embedding: PropulsionEmbedding,
    nn.LayerNorm: PropulsionLayerNorm,
}
