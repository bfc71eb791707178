"""ntk.predict: least squares, ridge, layouts, gradient flow against explicit gradient descent."""

from __future__ import annotations

import doctest
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import ntk.predict as P

DT = torch.float64


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def features(x: torch.Tensor) -> torch.Tensor:
    """Linear model with a bias: phi(x) = [x, 1], kernel x.x' + 1."""
    return torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], 1)


def linear_problem(n: int, m: int, d: int, c: int | None, seed: int):
    g = gen(seed)
    xtr, xte = torch.randn(n, d, generator=g, dtype=DT), torch.randn(m, d, generator=g, dtype=DT)
    ytr = torch.randn(n, *(() if c is None else (c,)), generator=g, dtype=DT)
    ftr, fte = features(xtr), features(xte)
    return ftr, fte, ytr, ftr @ ftr.T, fte @ ftr.T


def test_doctests():
    result = doctest.testmod(P)
    assert result.attempted > 0 and result.failed == 0


# ---------------------------------------------------------------- kernel regression


@pytest.mark.parametrize("n,d", [(10, 3), (4, 6), (5, 4)], ids=["over", "under", "square"])
@pytest.mark.parametrize("c", [None, 2], ids=["y1d", "y2d"])
def test_linear_kernel_regression_is_least_squares(n, d, c):
    ftr, fte, ytr, k, kts = linear_problem(n, 6, d, c, seed=n + d)
    w = np.linalg.lstsq(ftr.numpy(), ytr.numpy(), rcond=None)[0]
    pred = P.kernel_regression(k, kts, ytr)
    assert pred.shape == ((6,) if c is None else (6, c)) and pred.dtype == DT
    np.testing.assert_allclose(pred.numpy(), fte.numpy() @ w, rtol=1e-8, atol=1e-9)


@pytest.mark.parametrize("ridge", [1e-3, 0.5, 10.0])
def test_ridge_matches_primal_ridge(ridge):
    ftr, fte, ytr, k, kts = linear_problem(7, 9, 3, 2, seed=1)
    a = ftr.numpy()
    w = np.linalg.solve(a.T @ a + ridge * np.eye(a.shape[1]), a.T @ ytr.numpy())
    pred = P.kernel_regression(k, kts, ytr, ridge=ridge)
    np.testing.assert_allclose(pred.numpy(), fte.numpy() @ w, rtol=1e-9, atol=1e-10)
    dual = kts.numpy() @ np.linalg.solve(k.numpy() + ridge * np.eye(7), ytr.numpy())
    np.testing.assert_allclose(pred.numpy(), dual, rtol=1e-9, atol=1e-10)


def test_singular_kernel_duplicate_points():
    # Two identical training points: K is singular; the pseudo-inverse still interpolates.
    x = torch.tensor([[0.0], [1.0], [1.0], [3.0]], dtype=DT)
    y = torch.tensor([1.0, 2.0, 2.0, 0.5], dtype=DT)
    k = torch.exp(-((x - x.T) ** 2))
    pred = P.kernel_regression(k, k, y)
    torch.testing.assert_close(pred, y, rtol=1e-9, atol=1e-9)
    # Contradicting labels on the duplicates: the minimum-norm fit predicts their mean.
    y2 = torch.tensor([1.0, 2.0, 4.0, 0.5], dtype=DT)
    assert float(P.kernel_regression(k, k, y2)[1]) == pytest.approx(3.0, rel=1e-9)


def test_rcond_drops_small_eigenvalues():
    k = torch.diag(torch.tensor([1.0, 1e-9], dtype=DT))
    y = torch.tensor([1.0, 1.0], dtype=DT)
    assert P.kernel_regression(k, k, y).tolist() == pytest.approx([1.0, 1.0])
    assert P.kernel_regression(k, k, y, rcond=1e-6).tolist() == pytest.approx([1.0, 0.0])


def test_layouts_agree():
    _, _, ytr, k, kts = linear_problem(6, 4, 3, 3, seed=2)
    eye = torch.eye(3, dtype=DT)
    full = P.kernel_regression(
        torch.einsum("ab,cd->abcd", k, eye), torch.einsum("ab,cd->abcd", kts, eye), ytr
    )
    torch.testing.assert_close(full, P.kernel_regression(k, kts, ytr))
    # Diagonal layout: independent per-output kernels, equal to separate reduced regressions
    # and to the full layout with zero cross-output entries.
    g = gen(3)
    jtr = torch.randn(6, 3, 4, generator=g, dtype=DT)
    jte = torch.randn(4, 3, 4, generator=g, dtype=DT)
    dk, dkts = torch.einsum("acp,bcp->abc", jtr, jtr), torch.einsum("acp,bcp->abc", jte, jtr)
    diag = P.kernel_regression(dk, dkts, ytr, ridge=0.1)
    assert diag.shape == (4, 3)
    for c in range(3):
        sep = P.kernel_regression(dk[:, :, c], dkts[:, :, c], ytr[:, c], ridge=0.1)
        torch.testing.assert_close(diag[:, c], sep)
    embedded = P.kernel_regression(torch.diag_embed(dk), torch.diag_embed(dkts), ytr, ridge=0.1)
    torch.testing.assert_close(diag, embedded)


def test_numpy_inputs():
    _, _, ytr, k, kts = linear_problem(5, 3, 2, None, seed=4)
    a = P.kernel_regression(k.numpy(), kts.numpy().astype(np.float32), ytr.numpy())
    b = P.kernel_regression(k, kts.float().double(), ytr)
    torch.testing.assert_close(a, b)


# ---------------------------------------------------------------- classification


def blobs(n_per: int, seed: int):
    g = gen(seed)
    centres = torch.tensor([[4.0, 0.0], [0.0, 4.0], [-4.0, -4.0]], dtype=DT)
    labels = torch.arange(3).repeat_interleave(n_per)
    x = centres[labels] + 0.5 * torch.randn(len(labels), 2, generator=g, dtype=DT)
    return x, labels


def test_class_targets_values():
    y = [0, 2]
    assert P.class_targets(y, 3, "onehot").tolist() == [[1, 0, 0], [0, 0, 1]]
    assert P.class_targets(y, 3, "pm1").tolist() == [[1, -1, -1], [-1, -1, 1]]
    expected = [[2 / 3, -1 / 3, -1 / 3], [-1 / 3, -1 / 3, 2 / 3]]
    np.testing.assert_allclose(P.class_targets(torch.tensor(y), 3).numpy(), expected)
    assert P.class_targets(np.array([1, 0])).shape == (2, 2)
    with pytest.raises(ValueError, match="kind"):
        P.class_targets(y, 3, "softmax")


def test_kernel_classify_blobs():
    xtr, ltr = blobs(5, seed=0)
    xte, lte = blobs(4, seed=1)
    k = torch.exp(-(torch.cdist(xtr, xtr) ** 2) / 8)
    kts = torch.exp(-(torch.cdist(xte, xtr) ** 2) / 8)
    pred = P.kernel_classify(k, kts, ltr)
    assert pred.dtype == torch.int64 and pred.shape == (12,)
    assert torch.equal(pred, lte)
    # A shared (reduced) kernel makes the argmax independent of the target coding.
    for kind in ("pm1", "onehot"):
        assert torch.equal(P.kernel_classify(k, kts, ltr, ridge=0.3, targets=kind), pred)
    full = P.kernel_classify(
        torch.einsum("ab,cd->abcd", k, torch.eye(3)), torch.einsum("ab,cd->abcd", kts, torch.eye(3)), ltr
    )
    assert torch.equal(full, pred)


def test_kernel_classify_errors():
    k = torch.eye(4, dtype=DT)
    with pytest.raises(ValueError, match="length 3 but the kernel has N=4"):
        P.kernel_classify(k, k, [0, 1, 1])
    with pytest.raises(ValueError, match="found values in"):
        P.kernel_classify(k, k, [0, 1, 2, 3], num_classes=3)
    with pytest.raises(ValueError, match="found values in"):
        P.kernel_classify(k, k, [0, 1, -1, 0])
    with pytest.raises(TypeError, match="integer"):
        P.kernel_classify(k, k, np.array([0.0, 1.0, 1.0, 0.0]))
    full = torch.einsum("ab,cd->abcd", k, torch.eye(2, dtype=DT))
    with pytest.raises(ValueError, match="num_classes=3 but the kernel has C=2"):
        P.kernel_classify(full, full, [0, 1, 1, 0], num_classes=3)
    with pytest.raises(ValueError, match="found values in"):
        P.kernel_classify(full, full, [0, 1, 2, 0])
    with pytest.raises(ValueError, match="targets must be one of"):
        P.kernel_classify(k, k, [0, 1, 1, 0], targets="ce")


# ---------------------------------------------------------------- gradient flow


def euler_bound(k: torch.Tensor, r0: torch.Tensor, eta: float, t: float, h: float) -> float:
    """Bound on ||(I - h eta K)^S r0 - exp(-eta K t) r0|| for S = t / h steps.

    Per eigenvalue lambda_i, with x = h eta lambda_i in [0, 1] and 0 <= 1 - x <= e^{-x}:
    |(1 - x)^S - e^{-S x}| <= S |1 - x - e^{-x}| e^{-(S - 1) x} <= S x^2 / 2 e^{-(S - 1) x},
    times the residual's components u_i^T r0 (one per column of r0). This is O(h) and tight to a small factor.
    """
    lam, u = torch.linalg.eigh(k)
    lam = lam.clamp_min(0)
    x = h * eta * lam
    assert float(x.max()) <= 1.0
    steps = round(t / h)
    per = steps * x**2 / 2 * torch.exp(-(steps - 1) * x) * (u.T @ r0.reshape(k.shape[0], -1)).abs().T
    return float(per.norm())


def test_gradient_flow_matches_gd_of_linear_model():
    """A linear model f(x) = W x + b (its NTK is exact), trained by plain autograd GD."""
    n, m, d, c, lr = 8, 5, 3, 2, 0.7
    ftr, fte, y, k, kts = linear_problem(n, m, d, c, seed=5)
    xtr, xte = ftr[:, :d], fte[:, :d]
    g = gen(6)
    w0, b0 = torch.randn(c, d, generator=g, dtype=DT), torch.randn(c, generator=g, dtype=DT)
    eta = lr / n
    lam = torch.linalg.eigvalsh(k)
    t = 2.0 / (eta * float(lam[n // 2]))  # partly converged: a test of the transient

    def gd(steps: int):
        w, b = w0.clone().requires_grad_(), b0.clone().requires_grad_()
        h = t / steps
        for _ in range(steps):
            loss = 0.5 * ((xtr @ w.T + b - y) ** 2).sum() / n
            gw, gb = torch.autograd.grad(loss, (w, b))
            with torch.no_grad():
                w -= h * lr * gw
                b -= h * lr * gb
        with torch.no_grad():
            return xtr @ w.T + b, xte @ w.T + b

    f0tr, f0te = xtr @ w0.T + b0, xte @ w0.T + b0
    flow = P.gradient_flow(k, kts, y, f0tr, f0te, t, lr=lr)
    ktsk = float(torch.linalg.matrix_norm(kts @ torch.linalg.pinv(k), ord=2))
    errors = []
    for steps in (400, 800):
        ftr_gd, fte_gd = gd(steps)
        bound = euler_bound(k, f0tr - y, eta, t, t / steps)
        err_tr, err_te = float((ftr_gd - flow.train).norm()), float((fte_gd - flow.test).norm())
        assert err_tr <= bound + 1e-12, (err_tr, bound)
        assert err_te <= ktsk * bound + 1e-12, (err_te, ktsk * bound)
        errors.append(err_tr)
    # First-order convergence in the step size: halving h halves the error.
    assert 0.4 < errors[1] / errors[0] < 0.6
    # The flow is not trivially close: it moved far from both f0 and the limit.
    assert float((flow.train - f0tr).norm()) > 100 * errors[0]
    assert float((flow.train - y).norm()) > 100 * errors[0]


# torch.func.jvp imports torch._decomp.decompositions_for_jvp, which calls torch.jit.script.
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_gradient_flow_matches_gd_of_linearised_mlp_full_kernel():
    """A tanh MLP linearised at theta_0 (jvp), C = 2 outputs: the full kernel's cross terms."""
    n, m, d, hid, c, lr = 6, 4, 3, 5, 2, 1.3
    g = gen(7)
    sizes = [(hid, d), (hid,), (c, hid), (c,)]
    theta0 = torch.randn(sum(math.prod(s) for s in sizes), generator=g, dtype=DT) * 0.8
    xtr, xte = torch.randn(n, d, generator=g, dtype=DT), torch.randn(m, d, generator=g, dtype=DT)
    y = torch.randn(n, c, generator=g, dtype=DT)

    def f(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        parts, i = [], 0
        for s in sizes:
            parts.append(theta[i : i + math.prod(s)].reshape(s))
            i += math.prod(s)
        w1, b1, w2, b2 = parts
        return torch.tanh(x @ w1.T + b1) @ w2.T + b2

    jtr = torch.func.jacrev(lambda th: f(xtr, th))(theta0)  # (N, C, P)
    jte = torch.func.jacrev(lambda th: f(xte, th))(theta0)
    k = torch.einsum("acp,bdp->abcd", jtr, jtr)
    kts = torch.einsum("acp,bdp->abcd", jte, jtr)
    assert float(k[:, :, 0, 1].abs().max()) > 1e-2  # cross-output entries are present
    f0tr, f0te = f(xtr, theta0), f(xte, theta0)

    def linearised(x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        return torch.func.jvp(lambda th: f(x, th), (theta0,), (delta,))[1]

    eta = lr / n
    kmat = k.permute(0, 2, 1, 3).reshape(n * c, n * c)
    t = 1.5 / (eta * float(torch.linalg.eigvalsh(kmat)[n * c // 2]))
    steps = 600
    h = t / steps
    jflat = jtr.reshape(n * c, -1)
    delta = torch.zeros_like(theta0)
    for _ in range(steps):  # GD on L = 1/(2N) sum ||f0 + J delta - y||^2
        resid = (f0tr + (jflat @ delta).reshape(n, c) - y).reshape(-1)
        delta = delta - h * lr * (jflat.T @ resid) / n
    ftr_gd, fte_gd = f0tr + linearised(xtr, delta), f0te + linearised(xte, delta)

    flow = P.gradient_flow(k, kts, y, f0tr, f0te, t, lr=lr)
    assert flow.train.shape == (n, c) and flow.test.shape == (m, c)
    bound = euler_bound(kmat, f0tr - y, eta, t, h)
    ktsk = float(
        torch.linalg.matrix_norm(
            kts.permute(0, 2, 1, 3).reshape(m * c, n * c) @ torch.linalg.pinv(kmat), ord=2
        )
    )
    err_tr, err_te = float((ftr_gd - flow.train).norm()), float((fte_gd - flow.test).norm())
    assert err_tr <= bound
    assert err_te <= ktsk * bound
    assert float((flow.train - f0tr).norm()) > 100 * err_tr


@pytest.mark.parametrize("c", [None, 3])
def test_gradient_flow_endpoints(c):
    _, _, y, k, kts = linear_problem(5, 4, 6, c, seed=8)  # d + 1 > N: K non-singular
    g = gen(9)
    f0tr, f0te = (
        torch.randn(y.shape, generator=g, dtype=DT),
        torch.randn((4, *y.shape[1:]), generator=g, dtype=DT),
    )
    start = P.gradient_flow(k, kts, y, f0tr, f0te, 0.0, lr=2.0)
    torch.testing.assert_close(start.train, f0tr, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(start.test, f0te, rtol=0, atol=0)
    end = P.gradient_flow(k, kts, y, f0tr, f0te, math.inf, lr=2.0)
    torch.testing.assert_close(end.train, y)
    torch.testing.assert_close(end.test, f0te + P.kernel_regression(k, kts, y - f0tr))
    late = P.gradient_flow(k, kts, y, f0tr, f0te, 1e9, lr=2.0)
    torch.testing.assert_close(late.test, end.test)


def test_gradient_flow_singular_kernel_limit():
    # N = 10 > d + 1: the residual's null-space component never decays.
    _, _, y, k, kts = linear_problem(10, 3, 2, None, seed=10)
    f0tr, f0te = torch.zeros(10, dtype=DT), torch.zeros(3, dtype=DT)
    end = P.gradient_flow(k, kts, y, f0tr, f0te, float("inf"))
    torch.testing.assert_close(end.test, P.kernel_regression(k, kts, y))
    torch.testing.assert_close(end.train, P.kernel_regression(k, k, y))  # projection of y
    assert float((end.train - y).norm()) > 0.1


def test_gradient_flow_time_grid_and_monotone_loss():
    _, _, y, k, kts = linear_problem(6, 2, 2, 2, seed=11)
    f0tr, f0te = torch.zeros(6, 2, dtype=DT), torch.zeros(2, 2, dtype=DT)
    times = [0.0, 0.5, 2.0, 10.0, math.inf]
    flow = P.gradient_flow(k, kts, y, f0tr, f0te, times)
    assert flow.train.shape == (5, 6, 2) and flow.test.shape == (5, 2, 2)
    for i, ti in enumerate(times):
        one = P.gradient_flow(k, kts, y, f0tr, f0te, ti)
        torch.testing.assert_close(flow.train[i], one.train)
        torch.testing.assert_close(flow.test[i], one.test)
    losses = ((flow.train - y) ** 2).sum((1, 2))
    assert bool((losses[1:] <= losses[:-1] + 1e-12).all())
    as_tensor = P.gradient_flow(k, kts, y, f0tr, f0te, torch.tensor(times))
    torch.testing.assert_close(as_tensor.test, flow.test)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 5), st.integers(1, 3), st.sampled_from([None, 1, 2]), st.integers(0, 10**6))
def test_gradient_flow_properties(n, m, c, seed):
    """Any size, including N = 1 and C = 1: t = 0 gives f0, t = inf gives regression on residuals,
    and the flow agrees across the reduced, full (K x I) and diagonal layouts."""
    _, _, y, k, kts = linear_problem(n, m, 2, c, seed)
    g = gen(seed + 1)
    f0tr = torch.randn(y.shape, generator=g, dtype=DT)
    f0te = torch.randn((m, *y.shape[1:]), generator=g, dtype=DT)
    flows = P.gradient_flow(k, kts, y, f0tr, f0te, [0.0, 1.0, math.inf], lr=0.5)
    torch.testing.assert_close(flows.train[0], f0tr)
    torch.testing.assert_close(flows.test[0], f0te)
    torch.testing.assert_close(flows.test[2], f0te + P.kernel_regression(k, kts, y - f0tr))
    if c is not None:
        eye = torch.eye(c, dtype=DT)
        full = P.gradient_flow(
            torch.einsum("ab,cd->abcd", k, eye),
            torch.einsum("ab,cd->abcd", kts, eye),
            y,
            f0tr,
            f0te,
            [0.0, 1.0, math.inf],
            lr=0.5,
        )
        diag = P.gradient_flow(
            k[:, :, None].expand(n, n, c),
            kts[:, :, None].expand(m, n, c),
            y,
            f0tr,
            f0te,
            [0.0, 1.0, math.inf],
            lr=0.5,
        )
        for other in (full, diag):
            torch.testing.assert_close(other.train, flows.train)
            torch.testing.assert_close(other.test, flows.test)


# ---------------------------------------------------------------- bad input


def flow_args():
    _, _, y, k, kts = linear_problem(4, 3, 2, 2, seed=12)
    return k, kts, y, torch.zeros(4, 2, dtype=DT), torch.zeros(3, 2, dtype=DT)


@pytest.mark.parametrize("t", [-1.0, float("nan"), [0.0, -0.5], [[1.0]], []])
def test_bad_times(t):
    with pytest.raises(ValueError, match="t "):
        P.gradient_flow(*flow_args(), t)


@pytest.mark.parametrize("lr", [0.0, -1.0, float("inf")])
def test_bad_lr(lr):
    with pytest.raises(ValueError, match="lr must be"):
        P.gradient_flow(*flow_args(), 1.0, lr=lr)


def test_bad_loss():
    with pytest.raises(ValueError, match="only loss with a closed-form"):
        P.gradient_flow(*flow_args(), 1.0, loss="cross_entropy")


def test_shape_mismatches():
    k, kts, y, f0, f0t = flow_args()
    with pytest.raises(ValueError, match="f0_train has shape"):
        P.gradient_flow(k, kts, y, f0[:3], f0t, 1.0)
    with pytest.raises(ValueError, match=r"f0_test has shape \(3,\), expected \(3, 2\)"):
        P.gradient_flow(k, kts, y, f0, f0t[:, 0], 1.0)
    with pytest.raises(ValueError, match="K_test_train has shape"):
        P.kernel_regression(k, kts[:, :3], y)
    with pytest.raises(ValueError, match="K_test_train has shape"):
        P.kernel_regression(k, kts[:, :, None].expand(3, 4, 2), y)
    with pytest.raises(ValueError, match="targets have shape"):
        P.kernel_regression(k, kts, y[:3])
    with pytest.raises(ValueError, match="targets have shape"):
        P.kernel_regression(k, kts, y[:, :, None])
    with pytest.raises(ValueError, match="square"):
        P.kernel_regression(kts, kts, y[:3])
    full = torch.einsum("ab,cd->abcd", k, torch.eye(2, dtype=DT))
    full_ts = torch.einsum("ab,cd->abcd", kts, torch.eye(2, dtype=DT))
    with pytest.raises(ValueError, match=r"needs \(4, 2\)"):
        P.kernel_regression(full, full_ts, y[:, 0])


def test_non_finite_and_bad_kernels():
    k, kts, y, f0, f0t = flow_args()
    y_bad = y.clone()
    y_bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="y_train has 1 non-finite"):
        P.kernel_regression(k, kts, y_bad)
    kts_bad = kts.clone()
    kts_bad[0, 0] = float("inf")
    with pytest.raises(ValueError, match="K_test_train has 1 non-finite"):
        P.gradient_flow(k, kts_bad, y, f0, f0t, 1.0)
    f0_bad = f0.clone()
    f0_bad[1, 1] = float("nan")
    with pytest.raises(ValueError, match="f0_train has 1 non-finite"):
        P.gradient_flow(k, kts, y, f0_bad, f0t, 1.0)
    asym = k.clone()
    asym[0, 1] += 1.0
    with pytest.raises(ValueError, match="K_train is not symmetric"):
        P.kernel_regression(asym, kts, y)
    indefinite = torch.tensor([[1.0, 2.0], [2.0, 1.0]], dtype=DT)
    with pytest.raises(ValueError, match="not positive semi-definite"):
        P.gradient_flow(indefinite, indefinite, torch.ones(2), torch.zeros(2), torch.zeros(2), 1.0)
    with pytest.raises(ValueError, match="ridge must be"):
        P.kernel_regression(k, kts, y, ridge=-0.1)
    diag_asym = torch.rand(3, 3, 2, dtype=DT)
    with pytest.raises(ValueError, match="not symmetric"):
        P.kernel_regression(diag_asym, diag_asym, torch.zeros(3, 2))
