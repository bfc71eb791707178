"""What a kernel predicts: kernel ridge regression, kernel classification, NTK gradient flow.

All solves run in ``float64`` on the kernel's device through one symmetric eigendecomposition
``K = U diag(lambda) U^T`` of the training kernel's matrix form (:func:`ntk.metrics.as_matrix`).
Eigenvalues ``lambda_i <= rcond * lambda_max`` (default ``rcond = n * eps``, as in
``numpy.linalg.lstsq``) count as zero, so singular kernels get the pseudo-inverse (minimum-norm)
solution. Pass a larger ``rcond`` for kernels computed in float32, whose null space is noise at
about ``1e-7 * lambda_max``.

Layouts (shapes of ``K_train``, ``K_test_train``, targets)
---------------------------------------------------------
* reduced ``(N, N)``, ``(M, N)``, targets ``(N,)`` or ``(N, C)``: the same kernel serves every
  output (the full kernel is ``K (x) I_C``); predictions ``(M,)`` or ``(M, C)``.
* full ``(N, N, C, C)``, ``(M, N, C, C)``, targets ``(N, C)``: one system of size ``N * C`` on the
  flattened targets ``vec(Y)[a * C + c] = Y[a, c]`` (the matrix-form index); predictions
  ``(M, C)``.
* diagonal ``(N, N, C)``, ``(M, N, C)``, targets ``(N, C)``: ``C`` independent systems, output
  ``c`` with kernel ``K[:, :, c]`` (the same as the full layout with zero cross-output entries).

``K_train`` must be symmetric (relative asymmetry at most ``sym_tol``) and positive
semi-definite up to round-off (smallest eigenvalue ``>= -sym_tol * lambda_max``): a
significantly negative eigenvalue signals a mis-assembled kernel, and makes gradient flow diverge.

Example:
    >>> import torch
    >>> from ntk.predict import gradient_flow, kernel_regression
    >>> X = torch.tensor([[0.0], [1.0], [2.0]])
    >>> K = X @ X.T + 1                       # linear kernel with a bias
    >>> y = 2 * X[:, 0] + 1
    >>> round(float(kernel_regression(K, torch.tensor([[3.0]]) @ X.T + 1, y)[0]), 10)
    7.0
    >>> flow = gradient_flow(K, K, y, torch.zeros(3), torch.zeros(3), t=float("inf"))
    >>> torch.allclose(flow.train, y.double()), torch.allclose(flow.test, y.double())
    (True, True)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from ntk.metrics import (
    DEFAULT_SYM_TOL,
    ArrayLike,
    _kernel,
    _labels,
    _symmetric_matrix,
    _to_float64,
    kernel_layout,
)

__all__ = [
    "GradientFlowPrediction",
    "class_targets",
    "gradient_flow",
    "kernel_classify",
    "kernel_regression",
]

_TARGET_KINDS = ("centered", "pm1", "onehot")


class GradientFlowPrediction(NamedTuple):
    """Outputs of the linearised model at time ``t``.

    Attributes:
        train: ``f_t`` on the training inputs, the shape of ``y_train`` (with a leading ``(T,)``
            when several times are given).
        test: ``f_t`` on the test inputs, ``(M,) + y_train.shape[1:]`` (same leading ``(T,)``).
    """

    train: torch.Tensor
    test: torch.Tensor


# --------------------------------------------------------------------------------------------
# Assembling the linear systems of each layout
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Systems:
    """Batched systems ``k_train (B, n, n)``, ``k_test (B, m, n)``; targets map to ``(B, n, r)``.

    ``B = 1`` (reduced, full) or ``C`` (diagonal); ``n = N`` or ``N * C``; ``r`` target columns.
    """

    layout: str
    k_train: torch.Tensor
    k_test: torch.Tensor
    n_examples: int
    n_test: int
    target_shape: tuple[int, ...]  # accepted training-target shape, () suffix included

    def pack(self, y: torch.Tensor) -> torch.Tensor:
        """``(N,) + suffix`` targets -> ``(B, n, r)``."""
        if self.layout == "reduced":
            return (y if y.dim() == 2 else y[:, None])[None]
        if self.layout == "full":
            return y.reshape(1, -1, 1)
        return y.T[:, :, None]  # diagonal: (C, N, 1)

    def unpack(self, f: torch.Tensor, rows: int) -> torch.Tensor:
        """``(..., B, rows_flat, r)`` -> ``(..., rows) + suffix``."""
        lead = f.shape[:-3]
        suffix = self.target_shape[1:]
        if self.layout == "reduced":
            return f[..., 0, :, :].reshape(*lead, rows, *suffix)
        if self.layout == "full":
            return f.reshape(*lead, rows, *suffix)
        return f[..., 0].transpose(-1, -2)  # diagonal: (..., C, rows) -> (..., rows, C)


def _systems(
    K_train: ArrayLike, K_test_train: ArrayLike, y_shape: tuple[int, ...], sym_tol: float
) -> _Systems:
    kt = _kernel(K_train, "K_train")
    ks = _kernel(K_test_train, "K_test_train")
    layout = kernel_layout(kt)
    n = kt.shape[0]
    if kt.shape[1] != n:
        raise ValueError(f"K_train must be square (N, N, ...), got shape {tuple(kt.shape)}")
    if kernel_layout(ks) != layout or ks.shape[1:] != kt.shape[1:]:
        expected = ("M", *tuple(kt.shape[1:]))
        raise ValueError(
            f"K_test_train has shape {tuple(ks.shape)} but K_train {tuple(kt.shape)} needs "
            f"{expected} (same layout, N={n} training columns)"
        )
    if ks.device != kt.device:
        raise ValueError(f"K_train is on {kt.device} but K_test_train is on {ks.device}")
    m = ks.shape[0]
    if layout == "reduced":
        if len(y_shape) not in (1, 2) or y_shape[0] != n:
            raise ValueError(
                f"targets have shape {y_shape}; a reduced (N, N) kernel with N={n} needs (N,) or (N, C)"
            )
    else:
        c = kt.shape[2]
        if y_shape != (n, c):
            raise ValueError(
                f"targets have shape {y_shape}; a {layout} kernel with N={n}, C={c} needs ({n}, {c})"
            )
    if layout == "reduced":
        k_train, k_test = _symmetric_matrix(kt, "K_train", sym_tol)[None], ks[None]
    elif layout == "full":
        c = kt.shape[2]
        k_train = _symmetric_matrix(kt, "K_train", sym_tol)[None]
        k_test = ks.permute(0, 2, 1, 3).reshape(1, m * c, n * c)
    else:
        # Same check as the matrix form, without building the (N*C, N*C) block-diagonal matrix.
        per_output = kt.permute(2, 0, 1)  # (C, N, N)
        norm = torch.linalg.norm(per_output)
        asym = float(torch.linalg.norm(per_output - per_output.transpose(1, 2)) / norm) if norm else 0.0
        if asym > sym_tol:
            raise ValueError(
                "K_train is not symmetric: relative asymmetry ||M - M^T||_F / ||M||_F = "
                f"{asym:.3e} exceeds sym_tol={sym_tol:.1e}"
            )
        k_train = 0.5 * (per_output + per_output.transpose(1, 2))
        k_test = ks.permute(2, 0, 1)
    return _Systems(layout, k_train, k_test, n, m, y_shape)


def _spectrum(
    k_train: torch.Tensor, rcond: float | None, sym_tol: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eigenvalues (clamped at 0), eigenvectors and the mask of the kept eigenvalues."""
    n = k_train.shape[-1]
    cut = n * float(np.finfo(np.float64).eps) if rcond is None else float(rcond)
    if not (math.isfinite(cut) and cut >= 0):
        raise ValueError(f"rcond must be a finite number >= 0, got {rcond!r}")
    lam, u = torch.linalg.eigh(k_train)
    lam_max = lam.abs().amax(-1, keepdim=True)
    lam_min = lam[..., :1]
    if bool((lam_min < -sym_tol * lam_max).any()):
        worst = float((lam_min / lam_max.clamp_min(1e-300)).min())
        raise ValueError(
            "K_train is not positive semi-definite: smallest/largest eigenvalue ratio "
            f"{worst:.3e} is below -sym_tol={-sym_tol:.1e}"
        )
    keep = lam > cut * lam_max
    return lam.clamp_min(0.0), u, keep


def _targets(y: ArrayLike, name: str) -> torch.Tensor:
    return _to_float64(y, name)


def _check_ridge(ridge: float) -> float:
    r = float(ridge)
    if not (math.isfinite(r) and r >= 0):
        raise ValueError(f"ridge must be a finite number >= 0, got {ridge!r}")
    return r


def _apply(sys: _Systems, u: torch.Tensor, g: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``K_test U diag(g) U^T Y`` per system; ``g`` ``(..., B, n)`` -> ``(..., B, m, r)``."""
    coeff = u.transpose(-1, -2) @ y  # (B, n, r)
    return sys.k_test @ (u @ (g[..., None] * coeff))


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def kernel_regression(
    K_train: ArrayLike,
    K_test_train: ArrayLike,
    y_train: ArrayLike,
    ridge: float = 0.0,
    *,
    rcond: float | None = None,
    sym_tol: float = DEFAULT_SYM_TOL,
) -> torch.Tensor:
    """Kernel ridge regression: ``f(X_test) = K_test,train (K_train + ridge I)^+ Y``.

    With ``ridge = 0`` the pseudo-inverse gives the minimum-norm interpolant (the ``t -> inf``
    limit of :func:`gradient_flow` from zero initial outputs); for a linear kernel
    ``K = Phi Phi^T`` this is least squares on the features ``Phi`` (``numpy.linalg.lstsq``).
    The ridge is added to the matrix form unscaled (``+ ridge * I_n``), eigenvalues clamped at 0.

    Args:
        K_train: ``(N, N)``, ``(N, N, C)`` or ``(N, N, C, C)`` symmetric PSD training kernel.
        K_test_train: ``(M, N)``, ``(M, N, C)`` or ``(M, N, C, C)``, rows test, columns train.
        y_train: ``(N,)`` or ``(N, C)`` (reduced), ``(N, C)`` (full, diagonal).
        ridge: ``>= 0``.
        rcond: relative eigenvalue cut-off when ``ridge = 0`` (see the module docstring).
        sym_tol: tolerance on the asymmetry and negativity of ``K_train``.

    Returns:
        Float64 predictions ``(M,)`` or ``(M, C)``, following ``y_train``.

    Raises:
        ValueError: shapes that do not fit one layout, non-finite entries, a non-symmetric or
            indefinite ``K_train``, negative ``ridge``.
    """
    r = _check_ridge(ridge)
    y = _targets(y_train, "y_train")
    sys = _systems(K_train, K_test_train, tuple(y.shape), sym_tol)
    y = y.to(sys.k_train.device)
    lam, u, keep = _spectrum(sys.k_train, rcond, sym_tol)
    if r > 0:
        g = 1.0 / (lam + r)
    else:
        g = torch.where(keep, 1.0 / torch.where(keep, lam, 1.0), 0.0)
    return sys.unpack(_apply(sys, u, g, sys.pack(y)), sys.n_test)


def class_targets(labels: ArrayLike, num_classes: int | None = None, kind: str = "centered") -> torch.Tensor:
    """Regression targets for class labels, ``(N, num_classes)`` float64.

    ``kind``: ``"centered"`` one-hot minus ``1 / num_classes`` (each row sums to 0; Arora et al.
    2019), ``"pm1"`` ``+1`` for the class and ``-1`` elsewhere, ``"onehot"`` plain 0/1.

    Args:
        labels: ``(N,)`` integer class indices in ``[0, num_classes)``.
        num_classes: default ``max(labels) + 1``.
        kind: one of ``"centered"``, ``"pm1"``, ``"onehot"``.

    Returns:
        ``(N, num_classes)`` float64 targets.

    Raises:
        ValueError: labels not 1-D or out of range, unknown ``kind``.
        TypeError: labels that are not integers.
    """
    y = labels.detach() if isinstance(labels, torch.Tensor) else torch.as_tensor(labels)
    n = y.shape[0] if y.dim() >= 1 else -1
    y, c = _labels(y, n, num_classes)
    return _class_targets(y, c, kind)


def _class_targets(y: torch.Tensor, c: int, kind: str) -> torch.Tensor:
    onehot = torch.nn.functional.one_hot(y, c).to(torch.float64)
    if kind == "centered":
        return onehot - 1.0 / c
    if kind == "pm1":
        return 2.0 * onehot - 1.0
    if kind == "onehot":
        return onehot
    raise ValueError(f"kind must be one of {_TARGET_KINDS}, got {kind!r}")


def kernel_classify(
    K_train: ArrayLike,
    K_test_train: ArrayLike,
    labels: ArrayLike,
    num_classes: int | None = None,
    ridge: float = 0.0,
    *,
    targets: str = "centered",
    rcond: float | None = None,
    sym_tol: float = DEFAULT_SYM_TOL,
) -> torch.Tensor:
    """Kernel classification: argmax over classes of :func:`kernel_regression` on class targets.

    The targets are :func:`class_targets` of kind ``targets``. With a reduced kernel (shared by
    every class) the three kinds give the same argmax, since they differ by a per-class affine
    map whose offset is the same for all classes; with full kernels they can differ.

    Args:
        K_train: ``(N, N)``, ``(N, N, C)`` or ``(N, N, C, C)`` symmetric PSD training kernel.
        K_test_train: ``(M, N)``, ``(M, N, C)`` or ``(M, N, C, C)``.
        labels: ``(N,)`` integer training labels in ``[0, num_classes)``.
        num_classes: default ``C`` for full and diagonal layouts (which require
            ``num_classes == C``), ``max(labels) + 1`` for reduced.
        ridge: ``>= 0``, as in :func:`kernel_regression`.
        targets: ``"centered"``, ``"pm1"`` or ``"onehot"``.
        rcond: as in :func:`kernel_regression`.
        sym_tol: as in :func:`kernel_regression`.

    Returns:
        ``(M,)`` int64 predicted labels (ties go to the lowest class index).

    Raises:
        ValueError: as :func:`kernel_regression`; labels of the wrong length or out of range;
            ``num_classes != C`` for full or diagonal layouts; unknown ``targets``.
        TypeError: labels that are not integers.
    """
    if targets not in _TARGET_KINDS:
        raise ValueError(f"targets must be one of {_TARGET_KINDS}, got {targets!r}")
    shape = tuple(K_train.shape)
    n = shape[0] if shape else 0
    if len(shape) in (3, 4):
        if num_classes is not None and num_classes != shape[2]:
            raise ValueError(
                f"num_classes={num_classes} but the kernel has C={shape[2]} outputs: full and "
                "diagonal kernels need one output per class"
            )
        num_classes = shape[2]
    y, c = _labels(labels, n, num_classes)
    scores = kernel_regression(
        K_train,
        K_test_train,
        _class_targets(y, c, targets),
        ridge,
        rcond=rcond,
        sym_tol=sym_tol,
    )
    return scores.argmax(-1)


def _times(t: float | Sequence[float] | ArrayLike) -> tuple[torch.Tensor, bool]:
    """Times as a float64 ``(T,)`` tensor and whether a scalar was given."""
    arr = t.detach().cpu() if isinstance(t, torch.Tensor) else torch.as_tensor(np.asarray(t))
    if arr.dtype == torch.bool or arr.is_complex() or arr.dim() > 1:
        raise ValueError(f"t must be a number >= 0 or a 1-D sequence of them, got {t!r}")
    arr = arr.to(torch.float64)
    if arr.numel() == 0:
        raise ValueError("t is empty")
    if bool(torch.isnan(arr).any()) or bool((arr < 0).any()):
        raise ValueError(f"t must be >= 0 (inf allowed), got {arr.tolist()}")
    return arr.reshape(-1), arr.dim() == 0


def gradient_flow(
    K_train: ArrayLike,
    K_test_train: ArrayLike,
    y_train: ArrayLike,
    f0_train: ArrayLike,
    f0_test: ArrayLike,
    t: float | Sequence[float] | ArrayLike,
    lr: float = 1.0,
    loss: str = "mse",
    *,
    rcond: float | None = None,
    sym_tol: float = DEFAULT_SYM_TOL,
) -> GradientFlowPrediction:
    """Closed-form gradient flow of the linearised model under MSE, at time(s) ``t``.

    Convention: the loss is the mean over the ``N`` training examples,
    ``L(theta) = 1/(2N) sum_a ||f(x_a) - y_a||^2`` (summed over outputs), and the parameters
    follow ``d theta / dt = -lr grad L``; gradient descent with step ``h`` for ``S`` steps is
    this flow at ``t = S * h`` up to ``O(h)``. For the model linearised at ``theta_0``,
    ``f(x) = f0(x) + J(x) (theta - theta_0)``, the NTK ``K = J J^T`` is constant and with
    ``eta = lr / N`` and residual ``r_0 = f0_train - y``:

    * ``d f_train / dt = -eta K (f_train - y)``, so ``f_train(t) = y + exp(-eta K t) r_0``;
    * ``d f_test / dt = -eta K_test,train (f_train - y)``, so
      ``f_test(t) = f0_test - K_test,train K^+ (I - exp(-eta K t)) r_0``.

    Both are evaluated in the eigenbasis of ``K``: ``(1 - exp(-eta lambda t)) / lambda`` (via
    ``expm1``) for kept eigenvalues and 0 for eigenvalues below the cut-off, which are treated
    as exactly zero (their residual component never decays). At ``t = inf``, ``f_test`` equals
    ``f0_test + kernel_regression(K_train, K_test_train, y - f0_train)`` (ridge 0, same
    ``rcond``), and ``f_train = y`` wherever ``K`` is non-singular.

    Args:
        K_train: ``(N, N)``, ``(N, N, C)`` or ``(N, N, C, C)`` symmetric PSD training NTK.
        K_test_train: ``(M, N)``, ``(M, N, C)`` or ``(M, N, C, C)``.
        y_train: targets, ``(N,)`` or ``(N, C)`` (reduced), ``(N, C)`` (full, diagonal).
        f0_train: initial outputs on the training inputs, the shape of ``y_train``.
        f0_test: initial outputs on the test inputs, ``(M,) + y_train.shape[1:]``.
        t: a time ``>= 0`` (``float("inf")`` allowed) or a 1-D sequence of times.
        lr: learning rate ``> 0`` of the flow.
        loss: only ``"mse"`` has a closed form.
        rcond: relative eigenvalue cut-off, as in :func:`kernel_regression`.
        sym_tol: tolerance on the asymmetry and negativity of ``K_train``.

    Returns:
        :class:`GradientFlowPrediction` ``(train, test)`` in float64; with a sequence of ``T``
        times both carry a leading ``(T,)`` dimension.

    Raises:
        ValueError: shapes that do not fit one layout, non-finite entries, a non-symmetric or
            indefinite ``K_train``, negative or NaN ``t``, ``lr <= 0``, a loss other than MSE.
    """
    if loss != "mse":
        raise ValueError(f"loss must be 'mse' (the only loss with a closed-form flow), got {loss!r}")
    eta_lr = float(lr)
    if not (math.isfinite(eta_lr) and eta_lr > 0):
        raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
    times, scalar = _times(t)
    y = _targets(y_train, "y_train")
    f0 = _targets(f0_train, "f0_train")
    f0t = _targets(f0_test, "f0_test")
    if f0.shape != y.shape:
        raise ValueError(
            f"f0_train has shape {tuple(f0.shape)} but y_train has {tuple(y.shape)}: they must match"
        )
    sys = _systems(K_train, K_test_train, tuple(y.shape), sym_tol)
    expected_test = (sys.n_test, *y.shape[1:])
    if tuple(f0t.shape) != expected_test:
        raise ValueError(f"f0_test has shape {tuple(f0t.shape)}, expected {expected_test}")
    dev = sys.k_train.device
    y, f0, f0t, times = y.to(dev), f0.to(dev), f0t.to(dev), times.to(dev)

    lam, u, keep = _spectrum(sys.k_train, rcond, sym_tol)
    eta = eta_lr / sys.n_examples
    lam_k = torch.where(keep, lam, 0.0)  # (B, n): dropped eigenvalues are exactly zero
    tt = times.reshape(-1, 1, 1)  # (T, 1, 1)
    finite = torch.isfinite(tt)
    tt0 = torch.where(finite, tt, 0.0)
    decay = torch.where(finite, torch.exp(-eta * lam_k * tt0), (~keep).to(lam.dtype))
    safe = torch.where(keep, lam, 1.0)
    phi_finite = torch.where(keep, -torch.expm1(-eta * lam_k * tt0) / safe, 0.0)
    phi = torch.where(finite, phi_finite, torch.where(keep, 1.0 / safe, 0.0))  # (T, B, n)

    r0 = sys.pack(f0 - y)  # (B, n, r)
    coeff = u.transpose(-1, -2) @ r0  # (B, n, r)
    res_t = u @ (decay[..., None] * coeff)  # (T, B, n, r)
    train = sys.pack(y) + res_t
    test = sys.pack(f0t) - _apply(sys, u, phi, r0)
    train_out = sys.unpack(train, sys.n_examples)
    test_out = sys.unpack(test, sys.n_test)
    if scalar:
        train_out, test_out = train_out[0], test_out[0]
    return GradientFlowPrediction(train_out, test_out)
