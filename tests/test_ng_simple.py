"""Simple (leave-one-out) NG preconditioner vs Kaldi golden vectors and vs an
explicit per-row reference."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import golden_names, load_golden

from ngsgd_mpi.ng_simple import leave_one_out, precondition_simple, precondition_simple_unscaled

SIMPLE_CASES = golden_names("simple_")
DTYPES = (np.float64, np.float32)
# Relative Frobenius error vs Kaldi (float32).  Measured maxima: alpha = 4 cases
# 3.7e-6; alpha = 0.1 cases (ill-conditioned: low-rank data, little smoothing)
# 1.4e-4 with float64 inputs, 5.1e-5 with float32 inputs (same roundoff as Kaldi).
TOLERANCE = {4.0: 2e-5, 0.1: 5e-4}


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("name", SIMPLE_CASES)
def test_matches_kaldi(name, dtype):
    cfg, z = load_golden(name)
    tolerance = TOLERANCE[cfg["alpha"]]
    for i in range(cfg["num_batches"]):
        X = z[f"in_{i:03d}"].astype(np.float32).astype(dtype)
        X_in = X.copy()
        unscaled = precondition_simple_unscaled(X, cfg["alpha"])
        rescaled = precondition_simple(X, cfg["alpha"])
        np.testing.assert_array_equal(X, X_in)
        assert unscaled.dtype == dtype and rescaled.dtype == dtype
        assert rel_err(unscaled, z[f"simple_out_{i:03d}"]) <= tolerance
        assert rel_err(rescaled, z[f"simple_rescaled_out_{i:03d}"]) <= tolerance
        if X.shape[0] == 1:                          # nothing to leave out: unchanged
            np.testing.assert_array_equal(unscaled, X)
            np.testing.assert_array_equal(rescaled, X)


def leave_one_out_reference(R, alpha, rescale):
    """p_n = (lambda I + sum_{m != n} r_m r_mᵀ / (N - 1))⁻¹ r_n by explicit inverses."""
    N, D = R.shape
    lam = alpha * np.sum(R * R) / (N * D)
    P = np.empty_like(R)
    for n in range(N):
        others = np.delete(R, n, axis=0)
        P[n] = np.linalg.inv(lam * np.eye(D) + others.T @ others / (N - 1)) @ R[n]
    if rescale:
        P *= np.linalg.norm(R) / np.linalg.norm(P)
    return P


@pytest.mark.parametrize("N,D,alpha", [(2, 6, 4.0), (9, 30, 4.0), (30, 30, 0.1), (50, 12, 4.0),
                                       (200, 20, 0.1), (5, 40, 1.0)])
def test_matches_leave_one_out_reference(N, D, alpha):
    rng = np.random.default_rng(N * 100 + D)
    R = rng.standard_normal((N, D)) * np.exp(rng.uniform(-1, 1, size=D))
    assert rel_err(precondition_simple_unscaled(R, alpha),
                   leave_one_out_reference(R, alpha, rescale=False)) <= 1e-10
    P = precondition_simple(R, alpha)
    assert rel_err(P, leave_one_out_reference(R, alpha, rescale=True)) <= 1e-10
    assert np.linalg.norm(P) == pytest.approx(np.linalg.norm(R), rel=1e-12)


def test_zero_input():
    R = np.zeros((8, 5), np.float32)
    P = precondition_simple(R)
    np.testing.assert_array_equal(P, R)
    assert P is not R
    assert not np.any(precondition_simple_unscaled(R))   # trace floored, output zero


def test_single_row_unchanged():
    R = np.random.default_rng(0).standard_normal((1, 7))
    for f in (precondition_simple, precondition_simple_unscaled):
        P = f(R)
        np.testing.assert_array_equal(P, R)
        assert P is not R


@pytest.mark.parametrize("alpha", [0.0, -1.0, float("nan")])
def test_bad_alpha_raises(alpha):
    with pytest.raises(ValueError, match="alpha"):
        precondition_simple(np.ones((3, 4)), alpha)


def test_bad_input_raises():
    with pytest.raises(ValueError, match="R must"):
        precondition_simple(np.ones(4))
    with pytest.raises(ValueError, match="R must"):
        precondition_simple_unscaled(np.ones((3, 4), dtype=np.int32))
    with pytest.raises(ValueError, match="at least one row"):
        precondition_simple(np.ones((0, 4)))


@pytest.mark.parametrize("N,D,alpha,dtype,tolerance", [
    (9, 30, 4.0, np.float64, 1e-10), (5, 40, 1.0, np.float64, 1e-10), (2, 6, 4.0, np.float64, 1e-10),
    (64, 300, 4.0, np.float32, 2e-5), (64, 300, 0.1, np.float32, 2e-4)])
def test_unformed_parts_give_the_same_rows_norms_and_products(N, D, alpha, dtype, tolerance):
    """N < D: beta from diag(S⁻¹) (S5), the row norms from S⁻¹ alone (S6), and
    Pᵀ Y = Rᵀ S⁻¹ diag(scale) Y, against P formed."""
    rng = np.random.default_rng(N * 7 + D)
    R = (rng.standard_normal((N, 6)) @ rng.standard_normal((6, D))
         + 0.3 * rng.standard_normal((N, D))).astype(dtype)
    P = precondition_simple(R, alpha)
    parts = leave_one_out(R, alpha, form=False)
    assert parts.Q is None and parts.S_inv.shape == (N, N)
    assert rel_err(parts.row_norms, np.linalg.norm(P.astype(np.float64), axis=1)) <= tolerance
    Y = rng.standard_normal((N, 11))
    unformed_product = R.T.astype(np.float64) @ (parts.S_inv @ (parts.row_scale[:, None] * Y))
    assert rel_err(unformed_product, P.T.astype(np.float64) @ Y) <= tolerance
    formed = leave_one_out(R, alpha, form=True)
    assert formed.S_inv is None and rel_err(formed.row_scale[:, None] * formed.Q, P) <= 1e-7
    assert rel_err(formed.row_norms, parts.row_norms) <= tolerance


def test_failures_come_out_as_nan_rows_without_a_host_check():
    """Where Kaldi aborts (gamma_n >= N - 1), the rows are NaN (the trainer's
    divergence check catches it); an all-zero R stays zero."""
    R = np.zeros((6, 4))
    parts = leave_one_out(R, 4.0)
    assert np.all(parts.row_scale == 1.0) and not np.any(parts.Q)
