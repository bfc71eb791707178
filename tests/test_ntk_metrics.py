"""ntk.metrics: hand-computed values, layout conventions, invariances, bad input."""

from __future__ import annotations

import doctest
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import ntk.metrics as M

EPS = 1e-12
PROPERTY = settings(max_examples=30, deadline=None)


def t(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def random_psd(n: int, d: int, seed: int, c: int | None = None) -> torch.Tensor:
    """A Gram matrix of random features: reduced (n, n) or full (n, n, c, c)."""
    g = torch.Generator().manual_seed(seed)
    if c is None:
        x = torch.randn(n, d, generator=g, dtype=torch.float64)
        return x @ x.T
    j = torch.randn(n, c, d, generator=g, dtype=torch.float64)  # per-example Jacobians
    return torch.einsum("acp,bdp->abcd", j, j)


def test_doctests():
    result = doctest.testmod(M)
    assert result.attempted > 0 and result.failed == 0


# ---------------------------------------------------------------- hand-computed values


def test_alignment_hand():
    assert M.alignment(t([[1, 0], [0, 1]]), t([[1, 1], [1, 1]])) == pytest.approx(1 / math.sqrt(2))
    assert M.alignment(t([[1, 0], [0, 0]]), t([[0, 0], [0, 1]])) == pytest.approx(0.0)
    assert M.kernel_distance(t([[1, 0], [0, 0]]), t([[0, 0], [0, 1]])) == pytest.approx(1.0)
    assert M.kernel_distance(t([[1, 2], [2, 5]]), -t([[1, 2], [2, 5]])) == pytest.approx(2.0)


def test_cka_hand_2x2():
    # For 2x2 kernels H K H = (a + d - 2b)/4 [[1, -1], [-1, 1]]: CKA is the sign product.
    assert M.cka(t([[1, 0], [0, 1]]), t([[2, 1], [1, 3]])) == pytest.approx(1.0)
    assert M.cka(t([[1, 0], [0, 1]]), t([[1, 2], [2, 1]])) == pytest.approx(-1.0)


def test_cka_matches_hsic_formula():
    k1, k2 = random_psd(5, 3, 0).numpy(), random_psd(5, 2, 1).numpy()
    h = np.eye(5) - np.ones((5, 5)) / 5

    def hsic(a, b):
        return np.trace(a @ h @ b @ h)

    expected = hsic(k1, k2) / math.sqrt(hsic(k1, k1) * hsic(k2, k2))
    assert M.cka(k1, k2) == pytest.approx(expected, rel=1e-12)


def test_cka_ignores_constant_offset():
    k1, k2 = random_psd(4, 3, 2), random_psd(4, 3, 3)
    assert M.cka(k1 + 7.0, k2) == pytest.approx(M.cka(k1, k2), rel=1e-10)


def test_relative_error_and_best_scale_hand():
    eye = t([[1, 0], [0, 1]])
    assert M.relative_error(eye, 2 * eye) == pytest.approx(1.0)
    assert M.best_scale(eye, 2 * eye) == pytest.approx(0.5)
    assert M.relative_error(eye, 2 * eye, scale_optimal=True) == pytest.approx(0.0, abs=EPS)
    k1, k2 = t([[1, 0], [0, 0]]), eye
    assert M.best_scale(k1, k2) == pytest.approx(0.5)
    assert M.relative_error(k1, k2, scale_optimal=True) == pytest.approx(math.sqrt(0.5))
    assert M.relative_error(k1, k2) == pytest.approx(1.0)


def test_spectrum_hand():
    assert M.eigenspectrum(t([[2, 1], [1, 2]])).tolist() == pytest.approx([3.0, 1.0])
    assert M.eigenspectrum(t([[2, 1], [1, 2]])).dtype == torch.float64
    assert M.effective_rank(torch.eye(4)) == pytest.approx(4.0)
    assert M.effective_rank(t([[1, 1], [1, 1]])) == pytest.approx(1.0)
    assert M.effective_rank(torch.diag(t([1, 1, 0, 0]))) == pytest.approx(2.0)
    p = np.array([0.75, 0.25])
    assert M.effective_rank(torch.diag(t([3, 1]))) == pytest.approx(np.exp(-(p * np.log(p)).sum()))
    assert M.condition_number(torch.diag(t([4, 1]))) == pytest.approx(4.0)
    assert M.condition_number(torch.diag(t([1, 0])), rel_floor=1e-3) == pytest.approx(1e3)
    eps = np.finfo(np.float64).eps
    assert M.condition_number(torch.diag(t([1, 0]))) == pytest.approx(1 / (2 * eps))


def test_top_k_overlap_hand():
    k1, k2 = torch.diag(t([3, 2, 1])), torch.diag(t([1, 2, 3]))
    assert M.top_k_overlap(k1, k2, 1) == pytest.approx(0.0, abs=EPS)
    assert M.top_k_overlap(k1, k2, 2) == pytest.approx(0.5)
    assert M.top_k_overlap(k1, k2, 3) == pytest.approx(1.0)


def test_kernel_target_alignment_hand():
    labels = [0, 0, 1, 1]
    # Centred one-hot targets are +-1/2: T = [[.5, .5, -.5, -.5], ...], <I, T> = 2, norms 2, 2.
    assert M.kernel_target_alignment(torch.eye(4), labels) == pytest.approx(0.5)
    y = t([1, 1, -1, -1])
    assert M.kernel_target_alignment(torch.outer(y, y), labels) == pytest.approx(1.0)
    assert M.kernel_target_alignment(np.outer(y, y), np.array(labels)) == pytest.approx(1.0)


def test_kernel_target_alignment_full_uses_matrix_layout():
    labels = torch.tensor([0, 2, 1, 2])
    y = torch.nn.functional.one_hot(labels, 3).double()
    v = (y - y.mean(0)).reshape(-1)  # vec(Y)[a*C + c]
    ideal = torch.outer(v, v).reshape(4, 3, 4, 3).permute(0, 2, 1, 3)  # back to (N, N, C, C)
    assert M.kernel_target_alignment(ideal, labels) == pytest.approx(1.0)
    k = random_psd(4, 5, 0, c=3)
    m = M.as_matrix(k)
    expected = float(v @ m @ v) / (float(m.norm()) * float(v @ v))
    assert M.kernel_target_alignment(k, labels) == pytest.approx(expected, rel=1e-12)


# ---------------------------------------------------------------- layouts


def test_as_matrix_index_convention():
    k = torch.arange(2 * 3 * 2 * 2, dtype=torch.float64).reshape(2, 3, 2, 2)
    m = M.as_matrix(k)
    assert m.shape == (4, 6)
    for a in range(2):
        for b in range(3):
            for c in range(2):
                for c2 in range(2):
                    assert m[a * 2 + c, b * 2 + c2] == k[a, b, c, c2]


def test_full_kronecker_spectrum_repeats():
    kr = random_psd(3, 4, 5)
    kfull = torch.einsum("ab,cd->abcd", kr, torch.eye(2, dtype=torch.float64))
    expected = torch.sort(torch.cat([torch.linalg.eigvalsh(kr)] * 2), descending=True).values
    torch.testing.assert_close(M.eigenspectrum(kfull), expected)


def test_diagonal_layout_equals_diag_embed():
    g = torch.Generator().manual_seed(0)
    j1 = torch.randn(4, 3, 6, generator=g, dtype=torch.float64)
    j2 = torch.randn(4, 3, 6, generator=g, dtype=torch.float64)
    d1, d2 = (torch.einsum("acp,bcp->abc", j, j) for j in (j1, j2))
    f1, f2 = torch.diag_embed(d1), torch.diag_embed(d2)
    for fn in (M.alignment, M.cka, M.relative_error, M.best_scale, M.kernel_distance):
        assert fn(d1, d2) == pytest.approx(fn(f1, f2), rel=1e-12)
    assert M.top_k_overlap(d1, d2, 5) == pytest.approx(M.top_k_overlap(f1, f2, 5), rel=1e-10)
    for fn1 in (M.effective_rank, M.condition_number):
        assert fn1(d1) == pytest.approx(fn1(f1), rel=1e-8)
    torch.testing.assert_close(M.eigenspectrum(d1), M.eigenspectrum(f1))
    labels = [0, 1, 2, 1]
    assert M.kernel_target_alignment(d1, labels) == pytest.approx(
        M.kernel_target_alignment(f1, labels), rel=1e-12
    )
    # The pooled spectrum of the per-output kernels.
    pooled = torch.cat([torch.linalg.eigvalsh(d1[:, :, c]) for c in range(3)])
    torch.testing.assert_close(M.eigenspectrum(d1), torch.sort(pooled, descending=True).values)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int64])
def test_numpy_and_integer_inputs(dtype):
    k = np.array([[2, 1], [1, 2]], dtype=dtype)
    assert M.alignment(k, k) == pytest.approx(1.0)
    assert M.eigenspectrum(k).tolist() == pytest.approx([3.0, 1.0])


# ---------------------------------------------------------------- properties


kernels = st.tuples(
    st.integers(1, 6),  # N
    st.sampled_from([None, 1, 2, 3]),  # C (None: reduced layout)
    st.integers(1, 5),  # feature dimension
    st.integers(0, 2**31 - 1),  # seed
)
scales = st.floats(1e-3, 1e3)


@PROPERTY
@given(kernels, scales, scales)
def test_similarity_properties(spec, c1, c2):
    n, c, d, seed = spec
    k1, k2 = random_psd(n, d, seed, c), random_psd(n, d, seed + 1, c)
    assert M.alignment(k1, k1) == pytest.approx(1.0, abs=1e-12)
    assert M.kernel_distance(k1, c1 * k1) == pytest.approx(0.0, abs=1e-12)
    assert M.alignment(k1, k2) == pytest.approx(M.alignment(k2, k1), abs=1e-12)
    assert M.alignment(c1 * k1, c2 * k2) == pytest.approx(M.alignment(k1, k2), abs=1e-10)
    assert 0.0 <= M.alignment(k1, k2) <= 1.0  # PSD kernels
    err = M.relative_error(k1, k2, scale_optimal=True)
    assert M.relative_error(c1 * k1, c2 * k2, scale_optimal=True) == pytest.approx(err, abs=1e-9)
    assert err == pytest.approx(math.sqrt(max(0.0, 1 - M.alignment(k1, k2) ** 2)), abs=1e-6)
    assert err <= M.relative_error(k1, k2) + 1e-12
    assert M.relative_error(k1, k1) == 0.0
    c_star = M.best_scale(c1 * k1, c2 * k2)
    assert c_star == pytest.approx(M.best_scale(k1, k2) * c1 / c2, rel=1e-9)


@PROPERTY
@given(kernels, scales, scales)
def test_cka_properties(spec, c1, c2):
    n, c, d, seed = spec
    size = n * (c or 1)
    k1, k2 = random_psd(n, d, seed, c), random_psd(n, d, seed + 1, c)
    if size == 1:
        with pytest.raises(ValueError, match="after centring"):
            M.cka(k1, k2)
        return
    assert M.cka(k1, k1) == pytest.approx(1.0, abs=1e-10)
    assert M.cka(c1 * k1, c2 * k2) == pytest.approx(M.cka(k1, k2), abs=1e-9)
    assert M.cka(k1, k2) == pytest.approx(M.cka(k2, k1), abs=1e-12)
    assert -1.0 <= M.cka(k1, k2) <= 1.0


@PROPERTY
@given(kernels, st.data())
def test_spectral_properties(spec, data):
    n, c, d, seed = spec
    k1, k2 = random_psd(n, d, seed, c), random_psd(n, d, seed + 1, c)
    size = n * (c or 1)
    lam = M.eigenspectrum(k1)
    assert lam.shape == (size,)
    assert bool((lam[:-1] >= lam[1:]).all())
    assert float(lam.sum()) == pytest.approx(float(torch.trace(M.as_matrix(k1))), rel=1e-10)
    assert 1.0 - 1e-9 <= M.effective_rank(k1) <= size + 1e-9
    assert M.effective_rank(k1) <= min(size, d) + 1e-6  # rank of a Gram matrix of d features
    assert M.condition_number(k1) >= 1.0
    k = data.draw(st.integers(1, size))
    assert M.top_k_overlap(k1, k1, k) == pytest.approx(1.0, abs=1e-10)
    assert 0.0 <= M.top_k_overlap(k1, k2, k) <= 1.0
    assert M.top_k_overlap(k1, k2, size) == pytest.approx(1.0, abs=1e-10)


# ---------------------------------------------------------------- bad input


def test_non_square_and_non_symmetric():
    rect = torch.ones(3, 2, dtype=torch.float64)
    for fn in (M.eigenspectrum, M.effective_rank, M.condition_number):
        with pytest.raises(ValueError, match="square"):
            fn(rect)
    with pytest.raises(ValueError, match="square"):
        M.cka(rect, rect)
    with pytest.raises(ValueError, match="square"):
        M.kernel_target_alignment(rect, [0, 1, 1])
    asym = t([[1, 0.5], [0, 1]])
    measured = r"not symmetric.*asymmetry .*= 4\.714e-01 exceeds sym_tol=1\.0e-06"
    with pytest.raises(ValueError, match=measured):
        M.eigenspectrum(asym)
    with pytest.raises(ValueError, match="not symmetric"):
        M.top_k_overlap(asym, asym, 1)
    M.eigenspectrum(asym, sym_tol=1.0)  # a looser tolerance accepts it
    # Full kernel: symmetry means K[a, b, c, c2] == K[b, a, c2, c].
    k = random_psd(3, 4, 0, c=2)
    M.eigenspectrum(k)
    with pytest.raises(ValueError, match="not symmetric"):
        M.eigenspectrum(k.transpose(2, 3) + torch.randn(3, 3, 2, 2, dtype=torch.float64))


def test_rectangular_vec_metrics_are_fine():
    a, b = torch.rand(3, 2, dtype=torch.float64) + 0.1, torch.rand(3, 2, dtype=torch.float64)
    assert -1 <= M.alignment(a, b) <= 1
    M.relative_error(a, b, scale_optimal=True)


def test_shape_mismatch():
    with pytest.raises(ValueError, match=r"K1 has shape \(2, 2\) but K2 has shape \(3, 3\)"):
        M.alignment(torch.eye(2), torch.eye(3))
    with pytest.raises(ValueError, match="same layout"):
        M.cka(torch.eye(2), torch.eye(2)[:, :, None])
    with pytest.raises(ValueError, match="same layout"):
        M.top_k_overlap(torch.eye(2), torch.eye(3), 1)
    with pytest.raises(ValueError, match="K_t has shape"):
        M.kernel_distance(torch.eye(2), torch.eye(3))


@pytest.mark.parametrize("shape", [(3,), (2, 2, 2, 2, 2), (2, 2, 2, 3)])
def test_bad_layout(shape):
    with pytest.raises(ValueError, match="kernel"):
        M.alignment(torch.ones(shape), torch.ones(shape))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite(bad):
    k = torch.eye(3, dtype=torch.float64)
    k[1, 1] = bad
    for fn in (lambda x: M.alignment(x, torch.eye(3)), M.eigenspectrum, M.effective_rank):
        with pytest.raises(ValueError, match="1 non-finite"):
            fn(k)
    with pytest.raises(ValueError, match="K2 has 1 non-finite"):
        M.cka(torch.eye(3), k)


def test_zero_kernels():
    z, e = torch.zeros(2, 2), torch.eye(2)
    with pytest.raises(ValueError, match="K1 is zero"):
        M.alignment(z, e)
    with pytest.raises(ValueError, match="K2 is zero"):
        M.best_scale(e, z)
    with pytest.raises(ValueError, match="K1 is zero"):
        M.relative_error(z, e)
    with pytest.raises(ValueError, match="K2 is zero"):
        M.relative_error(e, z, scale_optimal=True)
    assert M.relative_error(e, z) == pytest.approx(1.0)  # c = 1 never divides by ||K2||
    with pytest.raises(ValueError, match="after centring"):
        M.cka(torch.ones(3, 3), torch.eye(3))
    with pytest.raises(ValueError, match="zero"):
        M.effective_rank(z)
    with pytest.raises(ValueError, match="no positive eigenvalue"):
        M.condition_number(z)
    with pytest.raises(ValueError, match="K is zero"):
        M.kernel_target_alignment(z, [0, 1])
    with pytest.raises(ValueError, match="empty"):
        M.alignment(torch.zeros(0, 0), torch.zeros(0, 0))


def test_condition_number_floor_range():
    with pytest.raises(ValueError, match="rel_floor"):
        M.condition_number(torch.eye(2), rel_floor=0.0)
    with pytest.raises(ValueError, match="rel_floor"):
        M.condition_number(torch.eye(2), rel_floor=2.0)


@pytest.mark.parametrize("k", [0, 4, -1, 1.5, True])
def test_top_k_out_of_range(k):
    with pytest.raises(ValueError, match=r"k must be an integer in \[1, 3\]"):
        M.top_k_overlap(torch.eye(3), torch.eye(3), k)


def test_label_errors():
    k = torch.eye(4)
    with pytest.raises(ValueError, match="length 3 but the kernel has N=4"):
        M.kernel_target_alignment(k, [0, 1, 1])
    with pytest.raises(ValueError, match=r"\[0, 1\].*found values in \[0, 2\]"):
        M.kernel_target_alignment(k, [0, 1, 2, 1], num_classes=2)
    with pytest.raises(ValueError, match="found values in"):
        M.kernel_target_alignment(k, [0, -1, 1, 1])
    with pytest.raises(TypeError, match="integer"):
        M.kernel_target_alignment(k, [0.0, 1.0, 1.0, 0.0])
    with pytest.raises(ValueError, match="same class"):
        M.kernel_target_alignment(k, [1, 1, 1, 1])
    with pytest.raises(ValueError, match="num_classes=3 but the full kernel has C=2"):
        M.kernel_target_alignment(random_psd(4, 3, 0, c=2), [0, 1, 1, 0], num_classes=3)
    with pytest.raises(ValueError, match=r"shape \(N,\)"):
        M.kernel_target_alignment(k, [[0, 1, 1, 0]])


# ---------------------------------------------------------------- HSIC: biased and unbiased
def _distinct(n: int, k: int):
    import itertools

    return list(itertools.permutations(range(n), k))


def _hsic_by_tuples(a: torch.Tensor, b: torch.Tensor) -> float:
    """The unbiased HSIC written as its definition: averages over distinct index tuples of
    a_ij b_ij, a_ij b_ik, a_ij b_kj and a_ij b_kl (the population HSIC of the centred kernels)."""
    n = a.shape[0]
    p2, p3, p4 = _distinct(n, 2), _distinct(n, 3), _distinct(n, 4)
    t1 = sum(float(a[i, j] * b[i, j]) for i, j in p2) / len(p2)
    rows = sum(float(a[i, j] * b[i, k]) for i, j, k in p3) / len(p3)
    cols = sum(float(a[i, j] * b[k, j]) for i, j, k in p3) / len(p3)
    t3 = sum(float(a[i, j] * b[k, l]) for i, j, k, l in p4) / len(p4)
    return t1 - rows - cols + t3


@pytest.mark.parametrize("n", [6, 7, 8])
def test_unbiased_hsic_matches_sums_over_distinct_tuples(n):
    k1, k2 = random_psd(n, 3, seed=n), random_psd(n, 2, seed=n + 50)
    assert M.hsic(k1, k2, unbiased=True) == pytest.approx(_hsic_by_tuples(k1, k2), rel=1e-10)
    # Song et al. (2012) in its own closed form
    a, b = k1.clone().fill_diagonal_(0), k2.clone().fill_diagonal_(0)
    one = torch.ones(n, dtype=torch.float64)
    song = (torch.trace(a @ b) + (one @ a @ one) * (one @ b @ one) / ((n - 1) * (n - 2))
            - 2 / (n - 2) * (one @ a @ b @ one)) / (n * (n - 3))
    assert M.hsic(k1, k2, unbiased=True) == pytest.approx(float(song), rel=1e-10)
    h = torch.eye(n, dtype=torch.float64) - 1 / n
    assert M.hsic(k1, k2) == pytest.approx(float(torch.trace(k1 @ h @ k2 @ h)) / (n - 1) ** 2, rel=1e-12)


def test_unbiased_hsic_over_examples_sums_the_output_pairs():
    n, c = 7, 2
    k1, k2 = random_psd(n, 4, seed=3, c=c), random_psd(n, 3, seed=4, c=c)
    expected = sum(_hsic_by_tuples(k1[:, :, i, j], k2[:, :, i, j]) for i in range(c) for j in range(c))
    assert M.hsic(k1, k2, unbiased=True, over="examples") == pytest.approx(expected, rel=1e-10)
    h11 = sum(_hsic_by_tuples(k1[:, :, i, j], k1[:, :, i, j]) for i in range(c) for j in range(c))
    h22 = sum(_hsic_by_tuples(k2[:, :, i, j], k2[:, :, i, j]) for i in range(c) for j in range(c))
    assert M.cka_examples(k1, k2, unbiased=True) == pytest.approx(expected / math.sqrt(h11 * h22), rel=1e-10)


def test_cka_examples_biased_is_the_cosine_of_example_centred_kernels():
    k1, k2 = random_psd(6, 4, seed=5, c=3), random_psd(6, 4, seed=6, c=3)

    def centre(k):
        return k - k.mean(0, keepdim=True) - k.mean(1, keepdim=True) + k.mean((0, 1), keepdim=True)

    assert M.cka_examples(k1, k2) == pytest.approx(M.alignment(centre(k1), centre(k2)), rel=1e-12)
    offset = k1 + 5.0 * torch.ones(3, 3, dtype=torch.float64)  # input-independent block: removed
    for unbiased in (False, True):
        assert M.cka_examples(k1, offset, unbiased=unbiased) == pytest.approx(1.0, abs=1e-10)
    reduced1, reduced2 = random_psd(6, 2, seed=7), random_psd(6, 2, seed=8)  # (N, N): equals cka
    for unbiased in (False, True):
        assert M.cka_examples(reduced1, reduced2, unbiased=unbiased) == pytest.approx(
            M.cka(reduced1, reduced2, unbiased=unbiased), rel=1e-12)


def test_unbiased_hsic_is_centred_on_zero_for_independent_kernels_and_the_biased_one_is_not():
    gen = torch.Generator().manual_seed(0)
    n, draws = 12, 200
    biased, unbiased = [], []
    for _ in range(draws):
        x, y = (torch.randn(n, 3, generator=gen, dtype=torch.float64) for _ in range(2))
        k1, k2 = torch.exp(-torch.cdist(x, x) ** 2 / 2), torch.exp(-torch.cdist(y, y) ** 2 / 2)
        biased.append(M.hsic(k1, k2))
        unbiased.append(M.hsic(k1, k2, unbiased=True))
    b, u = np.array(biased), np.array(unbiased)
    assert b.mean() > 10 * b.std() / math.sqrt(draws)  # biased: clearly above zero
    assert abs(u.mean()) < 3 * u.std() / math.sqrt(draws)  # unbiased: zero within its noise
    assert b.mean() > 5 * abs(u.mean())


def test_unbiased_cka_errors_and_range():
    with pytest.raises(ValueError, match="n >= 4"):
        M.cka(torch.eye(3), torch.eye(3), unbiased=True)
    with pytest.raises(ValueError, match="over must be"):
        M.hsic(torch.eye(5), torch.eye(5), over="rows")
    k = random_psd(10, 3, seed=9)
    assert M.cka(k, k, unbiased=True) == pytest.approx(1.0, abs=1e-12)
    assert M.cka(k, 3.0 * k + 2.0, unbiased=True) == pytest.approx(1.0, abs=1e-12)
    flat = torch.ones(6, 6, dtype=torch.float64) + 1e-3 * torch.eye(6, dtype=torch.float64)
    with pytest.raises(ValueError, match="unbiased HSIC of K2 with itself"):  # structure only on the diagonal
        M.cka(k[:6, :6], flat, unbiased=True)
