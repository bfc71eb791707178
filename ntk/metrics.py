"""Similarity and spectral metrics for empirical NTKs.

Every function takes torch tensors or numpy arrays, converts them to ``float64`` (on the
tensor's device) and accumulates there. Scalar metrics return Python floats; spectra return
``float64`` tensors.

Kernel layouts
--------------
Three layouts are accepted everywhere, told apart by the number of dimensions:

* **full** ``(N1, N2, C, C)``: ``K[a, b, c, c2] = <d f_c(x1_a), d f_c2(x2_b)>``.
* **diagonal** ``(N1, N2, C)``: ``K[a, b, c]``, the ``c == c2`` entries of the full kernel only.
* **reduced** ``(N1, N2)``: one kernel over examples (trace over outputs, one logit, sum of
  logits, ...).

The *matrix form* (:func:`as_matrix`) is defined once here and used by every metric that needs a
matrix (centring, eigenvalues, eigenvectors):

* full: ``M[a * C + c, b * C + c2] = K[a, b, c, c2]``, shape ``(N1 * C, N2 * C)``;
* diagonal: the full kernel whose cross-output entries (``c != c2``) are zero, flattened as above.
  Up to a permutation of rows and columns this is the block-diagonal matrix of the ``C`` separate
  ``(N1, N2)`` kernels ``K[:, :, c]``, so its eigenvalues are those of the ``C`` per-output
  kernels pooled together, and every metric gives the same value as on
  ``torch.diag_embed(K)`` (the full layout);
* reduced: ``M = K``.

Metrics on ``vec(K)`` (alignment, relative error, best scale, kernel distance) work on any layout
directly; they need both kernels in the same layout and shape. Metrics on the spectrum or on the
centred matrix need a square symmetric matrix form: ``N1 == N2`` and
``||M - M^T||_F <= sym_tol * ||M||_F`` (default ``sym_tol = 1e-6``, loose enough for kernels
computed in float32). The matrix is then symmetrised, ``(M + M^T) / 2``, before use.

Centred or not
--------------
Empirical NTKs of pre-trained and randomly initialised networks are dominated by a part that does
not depend on the inputs (one C x C block repeated for every pair of examples; 99% of
``||K||_F^2`` for MiniLM). Metrics on ``vec(K)`` are **uncentred** (:func:`alignment`,
:func:`relative_error`, :func:`best_scale`, :func:`kernel_distance`): two kernels that share that
block score high whatever their dependence on the inputs. **Centred** metrics remove it first:
:func:`hsic` and :func:`cka` centre over the rows of the matrix form, :func:`cka_examples` over the
examples only (per output pair), which keeps exactly the input-dependent part. Their biased
estimators are inflated at small N; ``unbiased=True`` gives Song et al. (2012)'s unbiased HSIC.
:func:`kernel_target_alignment` centres the targets only.

Example:
    >>> import torch
    >>> from ntk import metrics
    >>> K = torch.tensor([[2.0, 1.0], [1.0, 2.0]])
    >>> metrics.eigenspectrum(K).tolist()
    [3.0, 1.0]
    >>> round(metrics.alignment(K, 3.0 * K), 12), round(metrics.relative_error(K, 2 * K), 12)
    (1.0, 1.0)
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = [
    "alignment",
    "as_matrix",
    "best_scale",
    "cka",
    "cka_examples",
    "condition_number",
    "effective_rank",
    "eigenspectrum",
    "hsic",
    "kernel_distance",
    "kernel_layout",
    "kernel_target_alignment",
    "relative_error",
    "top_k_overlap",
]

ArrayLike = torch.Tensor | np.ndarray

#: Default relative tolerance on asymmetry, ``||M - M^T||_F / ||M||_F``.
DEFAULT_SYM_TOL = 1e-6

_LAYOUTS = {2: "reduced", 3: "diagonal", 4: "full"}


# --------------------------------------------------------------------------------------------
# Input handling (shared with ntk.predict)
# --------------------------------------------------------------------------------------------


def _to_float64(x: object, name: str) -> torch.Tensor:
    """A float64 tensor (same device as a tensor input); rejects complex, empty and non-finite."""
    if isinstance(x, torch.Tensor):
        t = x.detach()
    else:
        try:
            t = torch.as_tensor(np.asarray(x))
        except (TypeError, ValueError, RuntimeError) as err:
            raise TypeError(f"{name} must be a tensor or an array, got {type(x).__name__}") from err
    if t.is_complex():
        raise TypeError(f"{name} must be real, got dtype {t.dtype}")
    if t.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(t.shape)})")
    t = t.to(torch.float64)
    bad = int((~torch.isfinite(t)).sum())
    if bad:
        raise ValueError(f"{name} has {bad} non-finite entries (nan or inf) out of {t.numel()}")
    return t


def kernel_layout(K: ArrayLike) -> str:
    """Name the layout of a kernel from its shape.

    Args:
        K: kernel of shape ``(N1, N2)``, ``(N1, N2, C)`` or ``(N1, N2, C, C)``.

    Returns:
        ``"reduced"``, ``"diagonal"`` or ``"full"``.

    Raises:
        ValueError: for any other number of dimensions, or a full kernel whose last two
            dimensions differ.
    """
    shape = tuple(K.shape)
    layout = _LAYOUTS.get(len(shape))
    if layout is None:
        raise ValueError(f"a kernel must have shape (N1, N2), (N1, N2, C) or (N1, N2, C, C); got {shape}")
    if layout == "full" and shape[2] != shape[3]:
        raise ValueError(f"a full kernel (N1, N2, C, C) needs equal output dims; got {shape}")
    return layout


def _kernel(K: ArrayLike, name: str) -> torch.Tensor:
    """Validated float64 kernel in one of the three layouts."""
    t = _to_float64(K, name)
    try:
        kernel_layout(t)
    except ValueError as err:
        raise ValueError(f"{name}: {err}") from None
    return t


def as_matrix(K: ArrayLike) -> torch.Tensor:
    """The matrix form of a kernel (see the module docstring), in float64.

    Args:
        K: kernel, full ``(N1, N2, C, C)``, diagonal ``(N1, N2, C)`` or reduced ``(N1, N2)``.

    Returns:
        ``(N1 * C, N2 * C)`` for full and diagonal layouts with ``M[a*C + c, b*C + c2] =
        K[a, b, c, c2]`` (zero for ``c != c2`` in the diagonal layout); ``(N1, N2)`` for reduced.

    Raises:
        ValueError: unknown layout, empty or non-finite kernel.
    """
    return _matrix(_kernel(K, "K"))


def _matrix(t: torch.Tensor) -> torch.Tensor:
    layout = kernel_layout(t)
    if layout == "reduced":
        return t
    if layout == "diagonal":
        t = torch.diag_embed(t)  # (N1, N2, C) -> (N1, N2, C, C), zero off the diagonal
    n1, n2, c, _ = t.shape
    return t.permute(0, 2, 1, 3).reshape(n1 * c, n2 * c)


def _symmetric_matrix(K: ArrayLike, name: str, sym_tol: float) -> torch.Tensor:
    """Matrix form, checked square and symmetric to ``sym_tol``, then symmetrised."""
    t = _kernel(K, name)
    if t.shape[0] != t.shape[1]:
        raise ValueError(
            f"{name} must be square (a kernel of a set with itself), got N1={t.shape[0]} != "
            f"N2={t.shape[1]} in shape {tuple(t.shape)}"
        )
    m = _matrix(t)
    norm = torch.linalg.norm(m)
    if norm > 0:
        asym = float(torch.linalg.norm(m - m.T) / norm)
        if asym > sym_tol:
            raise ValueError(
                f"{name} is not symmetric: relative asymmetry ||M - M^T||_F / ||M||_F = "
                f"{asym:.3e} exceeds sym_tol={sym_tol:.1e} (M is the matrix form, "
                "M[a*C+c, b*C+c2] = K[a, b, c, c2])"
            )
    return 0.5 * (m + m.T)


def _same_shape(t1: torch.Tensor, t2: torch.Tensor, n1: str = "K1", n2: str = "K2") -> None:
    if t1.shape != t2.shape:
        raise ValueError(
            f"{n1} has shape {tuple(t1.shape)} but {n2} has shape {tuple(t2.shape)}: "
            "both kernels must have the same layout and sizes"
        )
    if t1.device != t2.device:
        raise ValueError(f"{n1} is on {t1.device} but {n2} is on {t2.device}")


def _nonzero_norm(t: torch.Tensor, name: str) -> torch.Tensor:
    norm = torch.linalg.norm(t.reshape(-1))
    if norm == 0:
        raise ValueError(f"{name} is zero (Frobenius norm 0): the metric divides by its norm")
    return norm


def _cosine(a: torch.Tensor, b: torch.Tensor, na: str, nb: str) -> float:
    a, b = a.reshape(-1), b.reshape(-1)
    a = a / _nonzero_norm(a, na)
    b = b / _nonzero_norm(b, nb)
    return min(1.0, max(-1.0, float(a @ b)))


# --------------------------------------------------------------------------------------------
# Similarity between two kernels
# --------------------------------------------------------------------------------------------


def alignment(K1: ArrayLike, K2: ArrayLike) -> float:
    """Cosine similarity of ``vec(K1)`` and ``vec(K2)``.

    ``A(K1, K2) = <K1, K2>_F / (||K1||_F ||K2||_F)``, in ``[-1, 1]`` (``[0, 1]`` for PSD kernels);
    invariant to positive scaling of either kernel. Any layout, the same for both.

    Args:
        K1: kernel in any layout.
        K2: kernel of the same shape.

    Returns:
        The alignment as a float.

    Raises:
        ValueError: shape mismatch, non-finite entries, or a zero kernel.
    """
    t1, t2 = _kernel(K1, "K1"), _kernel(K2, "K2")
    _same_shape(t1, t2)
    return _cosine(t1, t2, "K1", "K2")


def kernel_distance(K_t: ArrayLike, K_0: ArrayLike) -> float:
    """Kernel distance ``1 - alignment(K_t, K_0)``, in ``[0, 2]``.

    Used for kernel velocity along training (Fort et al. 2020): the distance between the kernels
    of two checkpoints, invariant to their scale.

    Args:
        K_t: kernel at a later checkpoint, any layout.
        K_0: kernel at the reference checkpoint, same shape.

    Returns:
        The distance as a float.

    Raises:
        ValueError: as :func:`alignment`.
    """
    t1, t0 = _kernel(K_t, "K_t"), _kernel(K_0, "K_0")
    _same_shape(t1, t0, "K_t", "K_0")
    return 1.0 - _cosine(t1, t0, "K_t", "K_0")


def _centre(m: torch.Tensor) -> torch.Tensor:
    """``H M H`` with ``H = I - 1 1^T / n``, over the last two axes."""
    return m - m.mean(-2, keepdim=True) - m.mean(-1, keepdim=True) + m.mean((-2, -1), keepdim=True)


def _hsic_unbiased(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Unbiased HSIC of square blocks ``a, b`` (``(..., n, n)``, not necessarily symmetric), n >= 4.

    With the diagonals set to zero it estimates, without bias over iid examples,
    ``E[a_ij b_ij] - E[a_ij b_ik] - E[a_ij b_kj] + E[a_ij] E[b_kl]`` (i, j, k, l distinct) by
    ``T1 - T2r - T2c + T3``, each a sum over distinct index tuples divided by their number:
    ``T1 = S / (n)_2`` with ``S = sum a_ij b_ij``; ``T2r = (r_a . r_b - S) / (n)_3`` and
    ``T2c = (c_a . c_b - S) / (n)_3`` (row sums r, column sums c); ``T3 = (sum a sum b - r_a.r_b
    - c_a.r_b - r_a.c_b - c_a.c_b + S + tr(a b)) / (n)_4`` (inclusion-exclusion over the
    coincidences of {k, l} with {i, j}). For symmetric blocks this is Song et al. (2012):
    ``[tr(K~L~) + 1'K~1 1'L~1 / ((n-1)(n-2)) - 2/(n-2) 1'K~L~1] / (n (n-3))``.
    """
    n = a.shape[-1]
    eye = torch.eye(n, dtype=torch.bool, device=a.device)
    a, b = a.masked_fill(eye, 0.0), b.masked_fill(eye, 0.0)
    s = (a * b).sum((-2, -1))
    s_t = (a * b.transpose(-2, -1)).sum((-2, -1))
    ra, rb, ca, cb = a.sum(-1), b.sum(-1), a.sum(-2), b.sum(-2)
    rr, cc, cr, rc = ((u * v).sum(-1) for u, v in ((ra, rb), (ca, cb), (ca, rb), (ra, cb)))
    n2, n3, n4 = n * (n - 1), n * (n - 1) * (n - 2), n * (n - 1) * (n - 2) * (n - 3)
    t3 = a.sum((-2, -1)) * b.sum((-2, -1)) - rr - cr - rc - cc + s + s_t
    return s / n2 - (rr - s) / n3 - (cc - s) / n3 + t3 / n4


def _hsic(a: torch.Tensor, b: torch.Tensor, unbiased: bool) -> float:
    """HSIC summed over the leading (block) axes of ``a, b`` (``(..., n, n)``)."""
    n = a.shape[-1]
    if n < (4 if unbiased else 2):
        raise ValueError(f"HSIC needs n >= {4 if unbiased else 2} examples"
                         f"{' (the unbiased estimator divides by n(n-1)(n-2)(n-3))' if unbiased else ''}"
                         f", got n = {n}")
    if unbiased:
        return float(_hsic_unbiased(a, b).sum())
    return float((_centre(a) * _centre(b)).sum() / (n - 1) ** 2)


def _pair(K1: ArrayLike, K2: ArrayLike, sym_tol: float, over: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The two kernels as stacks of square blocks ``(..., n, n)``: the symmetric matrix form
    (``over="matrix"``) or the ``(N, N)`` blocks per output pair (``over="examples"``)."""
    t1, t2 = _kernel(K1, "K1"), _kernel(K2, "K2")
    _same_shape(t1, t2)
    m1, m2 = _symmetric_matrix(t1, "K1", sym_tol), _symmetric_matrix(t2, "K2", sym_tol)
    if over == "matrix":
        return m1, m2
    n = t1.shape[0]
    blocks = []
    for m in (m1, m2):  # back from the symmetrised matrix form to (C, C, N, N) blocks
        c = m.shape[0] // n
        blocks.append(m.reshape(n, c, n, c).permute(1, 3, 0, 2) if kernel_layout(t1) != "reduced"
                      else m)
    return blocks[0], blocks[1]


def hsic(K1: ArrayLike, K2: ArrayLike, *, unbiased: bool = False, over: str = "matrix",
         sym_tol: float = DEFAULT_SYM_TOL) -> float:
    """Hilbert-Schmidt independence criterion of two kernels on the same inputs.

    Biased (Gretton et al. 2005): ``HSIC_b = <H M1 H, H M2 H>_F / (n - 1)^2``; centring removes
    the part of each kernel that is constant over the rows (its mean), which is what makes HSIC
    measure shared structure rather than shared offsets. It is biased upwards by ``O(1/n)``: the
    diagonal (each example with itself) enters, so two independent kernels score above zero.
    Unbiased (Song et al. 2012): zero the diagonals, then ``HSIC_u = [tr(M1~ M2~) + 1'M1~1 1'M2~1
    / ((n-1)(n-2)) - 2/(n-2) 1'M1~M2~1] / (n (n-3))``, whose expectation over iid examples is the
    population HSIC (zero for independent kernels); it can be negative.

    Args:
        K1, K2: square symmetric kernels of one shape, any layout.
        unbiased: use the unbiased estimator (needs n >= 4).
        over: ``"matrix"``: the rows of the matrix form (``n = N C``; the outputs of one example
            are then rows too, which are not independent draws, so "unbiased" is over rows);
            ``"examples"``: the ``(N, N)`` block of every output pair ``(c, c2)`` separately,
            centred over examples, summed over the pairs (``n = N``; unbiased over examples).
        sym_tol: largest accepted relative asymmetry.

    Returns:
        HSIC as a float.

    Raises:
        ValueError: shape mismatch, non-square or non-symmetric kernels, non-finite entries, too
            few examples, or an unknown ``over``.
    """
    if over not in ("matrix", "examples"):
        raise ValueError(f"over must be 'matrix' or 'examples', got {over!r}")
    m1, m2 = _pair(K1, K2, sym_tol, over)
    return _hsic(m1, m2, unbiased)


def _cka(K1: ArrayLike, K2: ArrayLike, unbiased: bool, over: str, sym_tol: float) -> float:
    m1, m2 = _pair(K1, K2, sym_tol, over)
    if not unbiased:
        return _cosine(_centre(m1), _centre(m2), "K1 after centring", "K2 after centring")
    h11, h22 = _hsic(m1, m1, True), _hsic(m2, m2, True)
    for name, value in (("K1", h11), ("K2", h22)):
        if not value > 0:
            raise ValueError(
                f"the unbiased HSIC of {name} with itself is {value:.3e} <= 0: {name} has (almost) no "
                "structure beyond its mean at this n, so the unbiased CKA is undefined; use more examples "
                "or the biased estimator")
    return _hsic(m1, m2, True) / (h11 * h22) ** 0.5


def cka(K1: ArrayLike, K2: ArrayLike, *, unbiased: bool = False, sym_tol: float = DEFAULT_SYM_TOL) -> float:
    """Centred kernel alignment (Cortes et al. 2012; Kornblith et al. 2019) over the matrix form.

    ``CKA = HSIC(M1, M2) / sqrt(HSIC(M1, M1) HSIC(M2, M2))`` with the ``(n, n)`` matrix forms
    (``n = N C`` for full and diagonal layouts, ``n = N`` for reduced). Centred: invariant to
    positive scaling of either kernel and to adding a constant to every entry, so a constant
    block shared by both kernels does not inflate it. The biased estimator equals
    ``<H M1 H, H M2 H>_F / (||H M1 H||_F ||H M2 H||_F)`` and is inflated at small n (two
    independent kernels score above zero); the unbiased one (:func:`hsic` with ``unbiased``) is
    not, can fall outside ``[-1, 1]`` by sampling noise, and is not clipped.

    Args:
        K1: square symmetric kernel, any layout.
        K2: kernel of the same shape.
        unbiased: ratio of unbiased HSIC estimates (Song et al. 2012; needs n >= 4).
        sym_tol: largest accepted relative asymmetry.

    Returns:
        CKA as a float (biased: in ``[-1, 1]``, ``[0, 1]`` for PSD kernels).

    Raises:
        ValueError: shape mismatch, non-square or non-symmetric kernels, non-finite entries, a
            kernel that is zero after centring (e.g. constant, or ``n = 1``), or (unbiased) a
            non-positive self-HSIC.
    """
    return _cka(K1, K2, unbiased, "matrix", sym_tol)


def cka_examples(K1: ArrayLike, K2: ArrayLike, *, unbiased: bool = False,
                 sym_tol: float = DEFAULT_SYM_TOL) -> float:
    """CKA centred over examples only: the input-dependent part of two kernels.

    Each ``(N, N)`` block ``K[:, :, c, c2]`` is double-centred over the two example axes,
    ``(H_N x I_C) K (H_N x I_C)``, and the HSICs are summed over the output pairs before the ratio
    (:func:`hsic` with ``over="examples"``). Unlike :func:`cka`, which also centres over outputs,
    this removes exactly the part of K that does not depend on the inputs (a C x C block shared by
    every pair of examples), which dominates the kernels of pre-trained and randomly initialised
    transformers. Equal to :func:`cka` for a reduced ``(N, N)`` kernel. ``unbiased`` uses the
    unbiased HSIC over examples (Song et al. 2012, extended to the non-symmetric cross-output
    blocks), which is not inflated at small N.

    Args, Returns, Raises: as :func:`cka` (n = N).

    Example:
        >>> import torch
        >>> K = torch.eye(4).reshape(4, 4, 1, 1) * torch.eye(2) + 5.0  # plus a constant block
        >>> round(cka_examples(K, torch.eye(4).reshape(4, 4, 1, 1) * torch.eye(2)), 12)
        1.0
    """
    return _cka(K1, K2, unbiased, "examples", sym_tol)


def best_scale(K1: ArrayLike, K2: ArrayLike) -> float:
    """The scalar ``c* = <K1, K2>_F / <K2, K2>_F`` that minimises ``||K1 - c K2||_F``.

    Args:
        K1: kernel in any layout.
        K2: kernel of the same shape (the one being scaled).

    Returns:
        ``c*`` as a float.

    Raises:
        ValueError: shape mismatch, non-finite entries, or ``K2`` zero.
    """
    t1, t2 = _kernel(K1, "K1"), _kernel(K2, "K2")
    _same_shape(t1, t2)
    return _best_scale(t1, t2)


def _best_scale(t1: torch.Tensor, t2: torch.Tensor) -> float:
    n2 = _nonzero_norm(t2, "K2")
    u = t2.reshape(-1) / n2
    return float((t1.reshape(-1) @ u) / n2)


def relative_error(K1: ArrayLike, K2: ArrayLike, scale_optimal: bool = False) -> float:
    """Relative Frobenius error of ``K2`` as an approximation of ``K1``.

    ``||K1 - c K2||_F / ||K1||_F`` with ``c = 1``, or ``c = c*`` (:func:`best_scale`) when
    ``scale_optimal``. The scale-optimal error equals ``sqrt(1 - alignment(K1, K2)^2)`` and is
    invariant to positive scaling of either kernel.

    Args:
        K1: reference kernel, any layout.
        K2: approximating kernel of the same shape.
        scale_optimal: use the best scalar ``c*`` instead of 1.

    Returns:
        The error as a float (``>= 0``).

    Raises:
        ValueError: shape mismatch, non-finite entries, ``K1`` zero, or (when ``scale_optimal``)
            ``K2`` zero.
    """
    t1, t2 = _kernel(K1, "K1"), _kernel(K2, "K2")
    _same_shape(t1, t2)
    n1 = _nonzero_norm(t1, "K1")
    c = _best_scale(t1, t2) if scale_optimal else 1.0
    # Divide first so that huge or tiny kernels do not overflow or underflow.
    return float(torch.linalg.norm((t1 / n1 - c * (t2 / n1)).reshape(-1)))


def top_k_overlap(K1: ArrayLike, K2: ArrayLike, k: int, *, sym_tol: float = DEFAULT_SYM_TOL) -> float:
    """Overlap of the top-k eigenspaces, ``||U1^T U2||_F^2 / k``, in ``[0, 1]``.

    ``U1, U2`` are ``(n, k)`` orthonormal eigenvectors of the ``k`` largest eigenvalues of the
    matrix forms. The value is the mean squared cosine of the principal angles between the two
    subspaces: 1 when they coincide, 0 when orthogonal. It is ill-defined when the ``k``-th and
    ``(k+1)``-th eigenvalues of a kernel are (nearly) equal; the eigensolver then picks one basis.

    Args:
        K1: square symmetric kernel, any layout.
        K2: kernel of the same shape.
        k: subspace dimension, ``1 <= k <= n`` (``n = N * C`` or ``N``).
        sym_tol: largest accepted relative asymmetry.

    Returns:
        The overlap as a float.

    Raises:
        ValueError: shape mismatch, non-square or non-symmetric kernels, non-finite entries, or
            ``k`` out of range.
    """
    t1, t2 = _kernel(K1, "K1"), _kernel(K2, "K2")
    _same_shape(t1, t2)
    m1 = _symmetric_matrix(t1, "K1", sym_tol)
    m2 = _symmetric_matrix(t2, "K2", sym_tol)
    n = m1.shape[0]
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= n:
        raise ValueError(f"k must be an integer in [1, {n}] (the matrix size), got {k!r}")
    k = int(k)
    u1 = torch.linalg.eigh(m1).eigenvectors[:, n - k :]
    u2 = torch.linalg.eigh(m2).eigenvectors[:, n - k :]
    value = float(torch.linalg.norm(u1.T @ u2) ** 2 / k)
    return min(1.0, max(0.0, value))


# --------------------------------------------------------------------------------------------
# Spectrum of one kernel
# --------------------------------------------------------------------------------------------


def eigenspectrum(K: ArrayLike, *, sym_tol: float = DEFAULT_SYM_TOL) -> torch.Tensor:
    """Eigenvalues of the symmetric matrix form, in descending order.

    Args:
        K: square symmetric kernel, any layout.
        sym_tol: largest accepted relative asymmetry.

    Returns:
        ``float64`` tensor of shape ``(n,)``, ``n = N * C`` (full, diagonal) or ``N`` (reduced).
        A diagonal kernel gives the eigenvalues of its ``C`` per-output kernels pooled.

    Raises:
        ValueError: non-square or non-symmetric kernel, non-finite entries.
    """
    m = _symmetric_matrix(K, "K", sym_tol)
    return torch.linalg.eigvalsh(m).flip(0)


def effective_rank(K: ArrayLike, *, sym_tol: float = DEFAULT_SYM_TOL) -> float:
    """Effective rank of Roy & Vetterli (2007), ``exp(H(p))``, in ``[1, n]``.

    With ``sigma_i = |lambda_i|`` the singular values of the symmetric matrix form (the
    eigenvalues, for a PSD kernel), ``p_i = sigma_i / sum_j sigma_j`` and the Shannon entropy
    ``H(p) = -sum_i p_i log p_i`` (``0 log 0 = 0``). It equals ``r`` for a kernel with ``r``
    equal non-zero eigenvalues and varies continuously in between.

    Args:
        K: square symmetric kernel, any layout.
        sym_tol: largest accepted relative asymmetry.

    Returns:
        The effective rank as a float.

    Raises:
        ValueError: non-square, non-symmetric or zero kernel, non-finite entries.
    """
    m = _symmetric_matrix(K, "K", sym_tol)
    _nonzero_norm(m, "K")
    sigma = torch.linalg.eigvalsh(m).abs()
    p = sigma / sigma.sum()
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def condition_number(
    K: ArrayLike, *, rel_floor: float | None = None, sym_tol: float = DEFAULT_SYM_TOL
) -> float:
    """Condition number ``lambda_max / max(lambda_min, rel_floor * lambda_max)``.

    The floor keeps the value finite for singular kernels and treats eigenvalues that are zero
    up to round-off (including slightly negative ones) as the floor: a singular kernel gives
    ``1 / rel_floor``. The default floor ``n * eps`` (float64 ``eps``) is the usual numerical
    rank threshold, so any value near ``1 / (n * eps)`` means "singular".

    Args:
        K: square symmetric kernel, any layout, with a positive largest eigenvalue.
        rel_floor: relative floor in ``(0, 1]``; default ``n * 2.2e-16``.
        sym_tol: largest accepted relative asymmetry.

    Returns:
        The condition number as a float in ``[1, 1 / rel_floor]``.

    Raises:
        ValueError: non-square or non-symmetric kernel, non-finite entries, no positive
            eigenvalue, or ``rel_floor`` outside ``(0, 1]``.
    """
    lam = eigenspectrum(K, sym_tol=sym_tol)
    n = lam.shape[0]
    floor_rel = n * float(np.finfo(np.float64).eps) if rel_floor is None else float(rel_floor)
    if not 0 < floor_rel <= 1:
        raise ValueError(f"rel_floor must be in (0, 1], got {rel_floor!r}")
    lam_max, lam_min = float(lam[0]), float(lam[-1])
    if lam_max <= 0:
        raise ValueError(f"K has no positive eigenvalue (largest {lam_max:.3e}): condition number undefined")
    return lam_max / max(lam_min, floor_rel * lam_max)


# --------------------------------------------------------------------------------------------
# Kernel and labels
# --------------------------------------------------------------------------------------------


def _labels(
    labels: object, n: int, num_classes: int | None, name: str = "labels"
) -> tuple[torch.Tensor, int]:
    """Validated ``(N,)`` int64 labels and the number of classes."""
    if isinstance(labels, torch.Tensor):
        y = labels.detach()
    else:
        y = torch.as_tensor(np.asarray(labels))
    if y.dtype == torch.bool or y.is_floating_point() or y.is_complex():
        raise TypeError(f"{name} must be integer class indices, got dtype {y.dtype}")
    if y.dim() != 1:
        raise ValueError(f"{name} must have shape (N,), got {tuple(y.shape)}")
    if y.shape[0] != n:
        raise ValueError(f"{name} has length {y.shape[0]} but the kernel has N={n} examples")
    y = y.to(torch.int64)
    lo, hi = int(y.min()), int(y.max())
    if num_classes is None:
        num_classes = hi + 1
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)):
        raise TypeError(f"num_classes must be an int, got {num_classes!r}")
    num_classes = int(num_classes)
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if lo < 0 or hi >= num_classes:
        raise ValueError(
            f"{name} must lie in [0, {num_classes - 1}] (num_classes={num_classes}); "
            f"found values in [{lo}, {hi}]"
        )
    return y, num_classes


def kernel_target_alignment(K: ArrayLike, y: ArrayLike, num_classes: int | None = None) -> float:
    """Alignment of a kernel with the centred one-hot target kernel (Cristianini et al. 2002).

    Targets: one-hot ``Y`` of shape ``(N, num_classes)``, centred over examples
    (``Y - mean_a Y[a]``). Then ``KTA = alignment(M, T)`` with

    * reduced layout: ``T = Y Y^T`` (``(N, N)``);
    * full and diagonal layouts: the target vector ``vec(Y)[a * C + c] = Y[a, c]`` (the layout of
      the matrix form, which requires ``num_classes == C``) and ``T = vec(Y) vec(Y)^T``
      (``(N * C, N * C)``), i.e. ``KTA = vec(Y)^T M vec(Y) / (||M||_F ||vec(Y)||^2)``.

    For two balanced classes the centred targets are ``+-1/2``, so the reduced value is the
    classic ``y^T K y / (N ||K||_F)`` with ``y = +-1``. Only the targets are centred, not ``K``.

    Args:
        K: square kernel of the training set with itself, any layout.
        y: ``(N,)`` integer class labels in ``[0, num_classes)``.
        num_classes: number of classes; default ``C`` for full and diagonal layouts and
            ``max(y) + 1`` for reduced.

    Returns:
        The alignment as a float in ``[-1, 1]``.

    Raises:
        ValueError: non-square kernel, non-finite entries, zero kernel, labels of the wrong
            length or out of range, ``num_classes != C`` for full or diagonal layouts, or all
            labels equal (zero centred targets).
        TypeError: labels that are not integers.
    """
    t = _kernel(K, "K")
    if t.shape[0] != t.shape[1]:
        raise ValueError(f"K must be square (N, N, ...), got shape {tuple(t.shape)}")
    layout = kernel_layout(t)
    n = t.shape[0]
    if layout != "reduced":
        c = t.shape[2]
        if num_classes is not None and num_classes != c:
            raise ValueError(
                f"num_classes={num_classes} but the {layout} kernel has C={c} outputs: the "
                "target vector vec(Y)[a*C + c] needs one output per class"
            )
        num_classes = c
    labels, num_classes = _labels(y, n, num_classes)
    onehot = torch.nn.functional.one_hot(labels, num_classes).to(torch.float64).to(t.device)
    targets = onehot - onehot.mean(0, keepdim=True)
    if torch.linalg.norm(targets) == 0:
        raise ValueError("the centred targets are zero: every label is the same class")
    m = _matrix(t)
    if layout == "reduced":
        target_kernel = targets @ targets.T
        return _cosine(m, target_kernel, "K", "target kernel")
    v = targets.reshape(-1)
    v = v / torch.linalg.norm(v)
    mn = m / _nonzero_norm(m, "K")
    return min(1.0, max(-1.0, float(v @ mn @ v)))
