"""Online NG preconditioner vs Kaldi golden vectors, vs a dense reference, and
its properties.

Golden files hold Kaldi's float32 results (nnet2 ``OnlinePreconditioner`` and
nnet3 ``OnlineNaturalGradient``).  Errors are relative Frobenius errors of the
final preconditioned output gamma * X_hat.  Tolerances are ~2-10x the errors
measured with this implementation (noted beside each); the free-running drift on
tiny-N / all-zero / alpha = 0 cases is Kaldi's float32 eigensolver, see the
golden README.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import golden_names, load_golden

from ngsgd_mpi.ng_online import (DeferredUpdates, LowRankResidual, OnlineNaturalGradient,
                                 OnlineNGState)

ONLINE_CASES = golden_names("online_")
DTYPES = (np.float64, np.float32)

# Free-running whole sequences: max over calls of the output error.
# Measured (float64 / float32): alpha0 8.6e-3 / 8.2e-3, d100_n2 4.2e-2 / 4.1e-2,
# d40_n1 4.5e-2 / 4.1e-2, zeros 4.3e-2 / 3.4e-2, d10_n1 3.9e-3 / 5.0e-3,
# d300_n16_r80 7.1e-4 / 6.2e-4; every other case <= 1.2e-4.
FREE_RUN_TOLERANCE = {
    "online_d100_n128_r20_p1_alpha0": 5e-2,
    "online_d100_n2_r20_p4_gauss": 1e-1,
    "online_d40_n1_r20_p1_lowrank": 1e-1,
    "online_d40_n16_r20_p1_zeros": 1e-1,
    "online_d10_n1_r2_p1_gauss": 2e-2,
    "online_d300_n16_r80_p1_lowrank": 3e-3,
}
FREE_RUN_DEFAULT_TOLERANCE = 1e-3
# Teacher-forced single calls.  Measured maxima: output 2.5e-5 (alpha0, float64;
# others <= 3e-6), d 6.9e-5, rho 1.4e-3, W'W 1.6e-2 for alpha0 (near-degenerate
# trailing eigenvalues: the subspace is ill-defined) and 6.8e-4 elsewhere,
# row_prod 6.6e-6.
TF_OUT_TOL, TF_D_TOL, TF_RHO_TOL, TF_ROW_PROD_TOL = 1e-4, 5e-4, 1e-2, 5e-5
TF_WTW_TOL = {"online_d100_n128_r20_p1_alpha0": 5e-2}
TF_WTW_DEFAULT_TOL = 3e-3
# First call from scratch (init + 1 update).  Measured maxima: output 4.1e-4
# (d300_n16_r80, float64), row_prod 1.3e-3, d 2.8e-5, rho 4.7e-3.
CALL0_OUT_TOL, CALL0_ROW_PROD_TOL, CALL0_D_TOL, CALL0_RHO_TOL = 1e-3, 5e-3, 2e-4, 1e-2


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    norm = np.linalg.norm(b)
    return float(np.linalg.norm(a - b) / norm) if norm > 0 else float(np.linalg.norm(a))


def make(cfg, method) -> OnlineNaturalGradient:
    return OnlineNaturalGradient(cfg["rank_requested"], cfg["update_period"],
                                 cfg["num_samples_history"], cfg["alpha"], method,
                                 cfg["num_minibatches_history"])


def kaldi_output(z, method, i):
    return np.float64(z[f"{method}_scale"][i]) * z[f"{method}_out_{i:03d}"].astype(np.float64)


def run_call(p, X, method):
    if method == "nnet2":
        return p.precondition(X, row_norms=True)
    X_hat, gamma = p.precondition(X)
    return X_hat, gamma, None


def online_runs():
    for name in ONLINE_CASES:
        cfg, _ = load_golden(name)
        for method in cfg["methods"]:
            yield name, method


ONLINE_RUNS = list(online_runs())


# ------------------------------------------------------------------ goldens
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("name,method", ONLINE_RUNS)
def test_free_running_matches_kaldi(name, method, dtype):
    cfg, z = load_golden(name)
    p = make(cfg, method)
    tolerance = FREE_RUN_TOLERANCE.get(name, FREE_RUN_DEFAULT_TOLERANCE)
    worst, ts, changed = 0.0, [], []
    previous = (None, None)
    for i in range(cfg["num_batches"]):
        X = z[f"in_{i:03d}"].astype(np.float32).astype(dtype)
        X_in = X.copy()
        X_hat, gamma, row_sq = run_call(p, X, method)
        assert X_hat.dtype == dtype and isinstance(gamma, float)
        np.testing.assert_array_equal(X, X_in)          # input untouched
        if row_sq is not None:                          # our own row norms are exact
            np.testing.assert_allclose(row_sq, np.einsum("ij,ij->i", X_hat, X_hat), rtol=1e-5)
        worst = max(worst, rel_err(gamma * X_hat, kaldi_output(z, method, i)))
        ts.append(p.state.t)
        current = (p.state.rho, None if p.state.d is None else p.state.d.copy())
        changed.append(i == 0 or current[0] != previous[0]
                       or not np.array_equal(current[1], previous[1]))
        previous = current
    assert worst <= tolerance, f"max rel error {worst:.2e} > {tolerance:.0e}"
    if cfg["dim"] == 1:
        assert p.state.W is None and p.state.rank == 0
        return
    # Exact update schedule: Kaldi's counter, and the calls on which the Fisher
    # estimate changed (on a non-updating call Kaldi's d and rho stay bit-identical).
    assert ts == [int(t) for t in z[f"{method}_t"]]
    kaldi_rho, kaldi_d = z[f"{method}_rho"], z[f"{method}_d"]
    kaldi_changed = [i == 0 or kaldi_rho[i] != kaldi_rho[i - 1]
                     or not np.array_equal(kaldi_d[i], kaldi_d[i - 1])
                     for i in range(cfg["num_batches"])]
    assert changed == kaldi_changed
    assert p.state.rank == cfg["rank_effective"][method]


def nnet2_skipped(t, j) -> int:
    """Calls since nnet2's update counter last increased, after call j."""
    skipped = 0
    while j - skipped > 0 and t[j - skipped - 1] == t[j]:
        skipped += 1
    return skipped


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("name,method", [r for r in ONLINE_RUNS if "_d1_" not in r[0]])
def test_teacher_forced_matches_kaldi(name, method, dtype):
    """Load Kaldi's state after call j, run call j + 1, compare."""
    cfg, z = load_golden(name)
    t = z[f"{method}_t"]
    stored = cfg["W_stored_after_calls"][method]
    checked = 0
    for j in stored:
        if j + 1 >= cfg["num_batches"]:
            continue
        p = make(cfg, method)
        W = z[f"{method}_W_{j:03d}"].astype(dtype)
        state = p.state_dict()
        state.update(W=W, d=z[f"{method}_d"][j].astype(np.float64),
                     rho=float(z[f"{method}_rho"][j]), t=int(t[j]),
                     skipped=nnet2_skipped(t, j) if method == "nnet2" else 0,
                     rank=W.shape[0], dim=W.shape[1])
        p.load_state_dict(state)
        X = z[f"in_{j + 1:03d}"].astype(np.float32).astype(dtype)
        X_hat, gamma, row_sq = run_call(p, X, method)
        where = f"call {j + 1}"
        assert rel_err(gamma * X_hat, kaldi_output(z, method, j + 1)) <= TF_OUT_TOL, where
        if row_sq is not None:
            assert rel_err(row_sq, z[f"nnet2_row_prod_{j + 1:03d}"]) <= TF_ROW_PROD_TOL, where
        assert p.state.t == t[j + 1], where
        assert rel_err(p.state.d, z[f"{method}_d"][j + 1]) <= TF_D_TOL, where
        assert abs(p.state.rho / z[f"{method}_rho"][j + 1] - 1.0) <= TF_RHO_TOL, where
        if j + 1 in stored:   # W up to row signs: compare WᵀW
            W_ours = p.state.W.astype(np.float64)
            W_kaldi = z[f"{method}_W_{j + 1:03d}"].astype(np.float64)
            tolerance = TF_WTW_TOL.get(name, TF_WTW_DEFAULT_TOL)
            assert rel_err(W_ours.T @ W_ours, W_kaldi.T @ W_kaldi) <= tolerance, where
        checked += 1
    assert checked >= 1


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("name,method", ONLINE_RUNS)
def test_first_call_from_scratch_matches_kaldi(name, method, dtype):
    cfg, z = load_golden(name)
    p = make(cfg, method)
    X = z["in_000"].astype(np.float32).astype(dtype)
    X_hat, gamma, row_sq = run_call(p, X, method)
    assert rel_err(gamma * X_hat, kaldi_output(z, method, 0)) <= CALL0_OUT_TOL
    if row_sq is not None:
        assert rel_err(row_sq, z["nnet2_row_prod_000"]) <= CALL0_ROW_PROD_TOL
    if cfg["dim"] > 1:
        assert p.state.rank == cfg["rank_effective"][method]
        assert rel_err(p.state.d, z[f"{method}_d"][0]) <= CALL0_D_TOL
        assert abs(p.state.rho / z[f"{method}_rho"][0] - 1.0) <= CALL0_RHO_TOL


# ----------------------------------------------------- dense reference
class DenseReference:
    """Kaldi's algorithm written from its definitions in float64 (like
    ``OnlineNaturalGradientSimple`` in Kaldi's natural-gradient-online-test.cc):
    explicit F, explicit inverse, explicit T = eta S + (1 - eta) F, no W/e
    bookkeeping and no Woodbury."""

    def __init__(self, rank, update_period, num_samples_history, alpha, schedule):
        self.rank, self.P, self.S, self.alpha, self.schedule = (
            rank, update_period, num_samples_history, alpha, schedule)
        self.Rmat = None
        self.t = self.skipped = 0

    def fisher(self):
        D = self.Rmat.shape[1]
        return self.Rmat.T @ np.diag(self.d) @ self.Rmat + self.rho * np.eye(D)

    def step(self, X, updating):
        N, D = X.shape
        F = self.fisher()
        smoothed = F + self.alpha / D * np.trace(F) * np.eye(D)
        beta = self.rho * (1 + self.alpha) + self.alpha * self.d.sum() / D
        X_hat = beta * X @ np.linalg.inv(smoothed)
        gamma = math.sqrt(np.sum(X * X) / np.sum(X_hat * X_hat)) if np.any(X) else 1.0
        if updating:
            R = self.rank
            eta = min(0.9, 1 - math.exp(-N / self.S))
            T = eta * X.T @ X / N + (1 - eta) * F
            Y = self.Rmat @ T
            c, U = np.linalg.eigh(Y @ Y.T)
            c, U = c[::-1], U[:, ::-1]
            c_floor = (self.rho * (1 - eta)) ** 2
            ill_conditioned = c[0] > 1e6 * c[-1] or np.any(c < c_floor)
            c = np.maximum(c, c_floor)
            self.Rmat = np.diag(c ** -0.5) @ U.T @ Y
            drift = np.abs(self.Rmat @ self.Rmat.T - np.eye(R)).max()
            if ill_conditioned and drift > 1e-3:   # re-orthonormalise, keeping leading spans
                Q, upper = np.linalg.qr(self.Rmat.T)
                self.Rmat = (Q * np.sign(np.diag(upper))).T
            rho = (np.trace(T) - np.sqrt(c).sum()) / (D - R)
            floor = max(1e-10, 5e-4 * np.sqrt(c).max())
            self.d = np.maximum(np.sqrt(c) - rho, floor)
            self.rho = max(rho, floor)
        return X_hat, gamma

    def __call__(self, X):
        N, D = X.shape
        if self.Rmat is None:
            R = self.rank = min(self.rank, D - 1)
            self.Rmat = np.zeros((R, D))
            for r in range(R):
                self.Rmat[r, r::R] = 1.0
                self.Rmat[r, r] = 1.1
            self.Rmat /= np.linalg.norm(self.Rmat, axis=1, keepdims=True)
            self.d, self.rho = np.full(R, 1e-10), 1e-10
            for _ in range(1 if (self.schedule == "nnet3" and N <= R) else 3):
                self.step(X, True)
        if self.schedule == "nnet3":
            updating = self.t <= 10 or (self.t - 10) % self.P == 0
            self.t += 1
        else:
            updating = not (self.t >= 10 and self.skipped < self.P - 1)
            self.t, self.skipped = (self.t + 1, 0) if updating else (self.t, self.skipped + 1)
        return self.step(X, updating)


# (D, N per call, rank, update_period, alpha, schedule, tolerance); gaussian
# inputs with unequal column scales.  Measured: <= 3e-15, except 5e-9 where the
# tiny first minibatch triggers re-orthonormalisation (Cholesky vs the
# reference's QR, on an ill-conditioned R'R'ᵀ).
DENSE_CASES = [
    (30, [50] * 14, 5, 1, 4.0, "nnet2", 1e-12),
    (30, [50] * 14, 5, 1, 4.0, "nnet3", 1e-12),
    (64, [200, 17, 64, 300, 5, 128] * 3, 16, 3, 4.0, "nnet2", 1e-12),
    (64, [200, 17, 64, 300, 5, 128] * 3, 16, 3, 4.0, "nnet3", 1e-12),
    (20, [8] * 16, 12, 2, 1.0, "nnet3", 1e-7),   # N <= rank: one init pass, re-orthonormalised
    (45, [90] * 13, 10, 4, 0.0, "nnet2", 1e-12),  # alpha = 0
    (7, [40] * 12, 20, 1, 4.0, "nnet2", 1e-12),   # rank clamped to D - 1
]


@pytest.mark.parametrize("D,sizes,rank,P,alpha,schedule,tolerance", DENSE_CASES)
def test_matches_dense_reference(D, sizes, rank, P, alpha, schedule, tolerance):
    rng = np.random.default_rng(D * 1000 + rank)
    column_scale = np.exp(rng.uniform(-1.5, 1.5, size=D))
    fast = OnlineNaturalGradient(rank, P, 2000.0, alpha, schedule)
    dense = DenseReference(rank, P, 2000.0, alpha, schedule)
    for N in sizes:
        X = rng.standard_normal((N, D)) * column_scale
        X_hat, gamma = fast.precondition(X)
        X_hat_ref, gamma_ref = dense(X)
        assert rel_err(X_hat, X_hat_ref) <= tolerance
        assert abs(gamma / gamma_ref - 1) <= tolerance
    assert rel_err(fast.state.d, dense.d) <= tolerance
    assert abs(fast.state.rho / dense.rho - 1) <= tolerance
    beta = dense.rho * (1 + alpha) + alpha * dense.d.sum() / D
    e = 1 / (beta / dense.d + 1)
    W = fast.state.W
    assert rel_err(W.T @ W, dense.Rmat.T @ np.diag(e) @ dense.Rmat) <= tolerance


# --------------------------------------------------------------- properties
def lowrank_batches(rng, count, N, D, dtype=np.float64):
    basis = rng.standard_normal((6, D))
    return [(rng.standard_normal((N, 6)) @ basis + 0.1 * rng.standard_normal((N, D))).astype(dtype)
            for _ in range(count)]


@pytest.mark.parametrize("schedule", ["nnet2", "nnet3"])
def test_dim_one_is_a_noop(schedule):
    p = OnlineNaturalGradient(5, schedule=schedule)
    X = np.random.default_rng(0).standard_normal((9, 1)).astype(np.float32)
    for _ in range(3):
        X_hat, gamma, row_sq = p.precondition(X, row_norms=True)
        np.testing.assert_array_equal(X_hat, X)
        assert X_hat is not X and gamma == 1.0
        np.testing.assert_array_equal(row_sq, X[:, 0] ** 2)
    assert p.state == OnlineNGState()


@pytest.mark.parametrize("schedule", ["nnet2", "nnet3"])
def test_all_zero_input_gives_gamma_one(schedule):
    p = OnlineNaturalGradient(4, 1, schedule=schedule)
    zeros = np.zeros((16, 10))
    X_hat, gamma = p.precondition(zeros)            # initialisation on zeros
    assert gamma == 1.0 and not np.any(X_hat)
    assert p.state.rho == 1e-10 and np.all(p.state.d == 1e-10)
    for X in lowrank_batches(np.random.default_rng(1), 3, 16, 10):
        p.precondition(X)
    X_hat, gamma = p.precondition(zeros)            # zeros after real data
    assert gamma == 1.0 and not np.any(X_hat)


def test_rank_is_clamped_to_dim_minus_one():
    p = OnlineNaturalGradient(20, 1)
    p.precondition(np.random.default_rng(2).standard_normal((16, 6)))
    assert p.state.rank == 5 and p.state.W.shape == (5, 6) and p.state.d.shape == (5,)
    assert p.rank_requested == 20


@pytest.mark.parametrize("schedule", ["nnet2", "nnet3"])
@pytest.mark.parametrize("scale", [1e3, 0.1])
def test_output_scales_with_input(schedule, scale):
    """gamma X_hat is equivariant to the input scale, up to the absolute floor
    epsilon = 1e-10 of the initial state (relative effect ~1e-10 / scale²)."""
    a = OnlineNaturalGradient(5, 2, schedule=schedule)
    b = OnlineNaturalGradient(5, 2, schedule=schedule)
    for X in lowrank_batches(np.random.default_rng(3), 15, 32, 20):
        X_hat_a, gamma_a = a.precondition(X)
        X_hat_b, gamma_b = b.precondition(scale * X)
        assert rel_err(gamma_b * X_hat_b, scale * gamma_a * X_hat_a) <= 1e-7


@pytest.mark.parametrize("schedule", ["nnet2", "nnet3"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_state_dict_round_trip_is_bit_exact(schedule, dtype):
    batches = lowrank_batches(np.random.default_rng(4), 24, 24, 15, dtype)
    a = OnlineNaturalGradient(4, 4, schedule=schedule)
    for X in batches[:13]:                           # mid skip cycle for nnet2
        a.precondition(X)
    saved = a.state_dict()
    assert all(isinstance(v, (np.ndarray, float, int, str)) for v in saved.values())
    b = OnlineNaturalGradient(4, 4, schedule=schedule)
    b.load_state_dict({k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in saved.items()})
    assert b.state.skipped == a.state.skipped and b.state.t == a.state.t
    for X in batches[13:]:
        X_hat_a, gamma_a, rows_a = a.precondition(X, row_norms=True)
        X_hat_b, gamma_b, rows_b = b.precondition(X, row_norms=True)
        np.testing.assert_array_equal(X_hat_a, X_hat_b)
        np.testing.assert_array_equal(rows_a, rows_b)
        assert gamma_a == gamma_b
    # An uninitialised object round-trips too.
    c = OnlineNaturalGradient(4, 4, schedule=schedule)
    c.load_state_dict(OnlineNaturalGradient(4, 4, schedule=schedule).state_dict())
    assert c.state.W is None


def test_reset_reinitialises():
    batches = lowrank_batches(np.random.default_rng(5), 6, 32, 12)
    a, b = OnlineNaturalGradient(3, 2), OnlineNaturalGradient(3, 2)
    for X in batches[:4]:
        a.precondition(X)
    a.reset()
    assert a.state.W is None and a.state.t == 0 and a.state.rank == 0
    for X in batches[3:]:
        np.testing.assert_array_equal(a.precondition(X)[0], b.precondition(X)[0])


def test_out_argument_and_in_place():
    batches = lowrank_batches(np.random.default_rng(6), 5, 20, 9, np.float32)
    a, b = OnlineNaturalGradient(3, 1), OnlineNaturalGradient(3, 1)
    for X in batches:
        expected, gamma_a = a.precondition(X)
        X_copy = X.copy()
        result, gamma_b = b.precondition(X_copy, out=X_copy)
        assert result is X_copy and gamma_a == gamma_b
        np.testing.assert_array_equal(result, expected)


def test_factored_call_returns_the_residual_with_old_W():
    p = OnlineNaturalGradient(3, 1)
    batches = lowrank_batches(np.random.default_rng(7), 3, 20, 9)
    p.precondition(batches[0])
    W_old = p.state.W.copy()
    X_hat, _ = p.precondition(batches[1], factored=True)
    assert isinstance(X_hat, LowRankResidual) and X_hat.X is batches[1]
    np.testing.assert_array_equal(X_hat.W, W_old)
    np.testing.assert_allclose(X_hat.H, batches[1] @ W_old.T, rtol=1e-12, atol=0)
    assert not np.array_equal(p.state.W, W_old)      # call 1 updated W (replaced, not modified)


def test_reorthonormalisation_branches(monkeypatch):
    """Cholesky and Gram-Schmidt give the same rows (both are the LQ
    orthonormalisation); a duplicated row forces the Gram-Schmidt fallback."""
    from ngsgd_mpi import ng_online
    from ngsgd_mpi.ng_online import _orthonormalize_rows
    gram_schmidt_calls = []
    monkeypatch.setattr(ng_online, "_orthonormalize_rows",
                        lambda M, rng: gram_schmidt_calls.append(1) or _orthonormalize_rows(M, rng))
    rng = np.random.default_rng(8)
    R, D = 5, 12
    p = OnlineNaturalGradient(R, 1)
    p.state = OnlineNGState(t=3)
    e = rng.uniform(0.2, 0.9, R)
    Q, _ = np.linalg.qr(rng.standard_normal((D, R)))
    drifted = Q.T + 0.05 * rng.standard_normal((R, D))          # rows no longer orthonormal
    W = np.sqrt(e)[:, None] * drifted
    cholesky = p._reorthonormalize(W.copy(), e, 3, W @ W.T) / np.sqrt(e)[:, None]
    gram_schmidt = _orthonormalize_rows(drifted.copy(), np.random.default_rng(0))
    np.testing.assert_allclose(cholesky @ cholesky.T, np.eye(R), atol=1e-12)
    np.testing.assert_allclose(cholesky, gram_schmidt, atol=1e-12)
    assert not gram_schmidt_calls                                  # Cholesky branch
    nearly = np.sqrt(e)[:, None] * (Q.T + 1e-5 * rng.standard_normal((R, D)))
    assert p._reorthonormalize(nearly, e, 3, nearly @ nearly.T) is nearly   # within 1e-3: untouched
    singular = W.copy()
    singular[3] = singular[1] * np.sqrt(e[3] / e[1])             # R'R'ᵀ singular
    results = [p._reorthonormalize(singular.copy(), e, 3, singular @ singular.T) / np.sqrt(e)[:, None]
               for _ in range(2)]
    np.testing.assert_allclose(results[0] @ results[0].T, np.eye(R), atol=1e-12)
    np.testing.assert_array_equal(results[0], results[1])        # deterministic
    assert len(gram_schmidt_calls) == 2                            # fallback branch
    # Gram-Schmidt itself: an exactly zero row gets a (seeded) random direction,
    # a repeated row is re-projected.
    M = rng.standard_normal((4, 9))
    M[2], M[3] = 0.0, M[0]
    outputs = [_orthonormalize_rows(M.copy(), np.random.default_rng(1)) for _ in range(2)]
    np.testing.assert_allclose(outputs[0] @ outputs[0].T, np.eye(4), atol=1e-12)
    np.testing.assert_array_equal(outputs[0], outputs[1])


@pytest.mark.parametrize("kwargs", [
    {"rank": 0}, {"rank": 2.5}, {"rank": True}, {"rank": 3, "update_period": 0},
    {"rank": 3, "num_samples_history": 0.0}, {"rank": 3, "num_samples_history": 1e6},
    {"rank": 3, "alpha": -0.1}, {"rank": 3, "alpha": math.inf}, {"rank": 3, "schedule": "nnet1"},
    {"rank": 3, "schedule": "nnet3", "num_minibatches_history": 1.0},
    {"rank": 3, "schedule": "nnet2", "num_minibatches_history": 10.0},
])
def test_bad_arguments_raise(kwargs):
    with pytest.raises(ValueError):
        OnlineNaturalGradient(**kwargs)


def test_bad_inputs_raise():
    p = OnlineNaturalGradient(3, 1)
    with pytest.raises(ValueError, match="X must"):
        p.precondition(np.zeros(5))
    with pytest.raises(ValueError, match="X must"):
        p.precondition(np.zeros((4, 5), dtype=np.int64))
    with pytest.raises(ValueError, match="at least one row"):
        p.precondition(np.zeros((0, 5)))
    with pytest.raises(ValueError, match="out must"):
        p.precondition(np.ones((4, 5)), out=np.empty((4, 6)))
    p.precondition(np.random.default_rng(9).standard_normal((8, 5)))
    with pytest.raises(ValueError, match="columns"):
        p.precondition(np.ones((4, 6)))
    with pytest.raises(ValueError, match="float64"):
        p.precondition(np.ones((4, 5), dtype=np.float32))
    state = p.state_dict()
    with pytest.raises(ValueError, match="update_period"):
        OnlineNaturalGradient(3, 2).load_state_dict(state)
    del state["rho"]
    with pytest.raises(ValueError, match="rho"):
        OnlineNaturalGradient(3, 1).load_state_dict(state)


# ------------------------------------------- factored form and deferred updates
def factored_call(p, X):
    """One call in factored form: (X̂ formed for comparison, gamma, row norms, X_hat as returned)."""
    X_hat, gamma, rows = p.precondition(X, row_norms=True, factored=True)
    formed = X_hat.X - X_hat.H @ X_hat.W if isinstance(X_hat, LowRankResidual) else X_hat
    return formed, gamma, rows, X_hat


@pytest.mark.parametrize("schedule", ["nnet2", "nnet3"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_factored_form_matches_materialised(schedule, dtype):
    """Same outputs, norms and state as the materialised form (row norms and
    tr(X̂X̂ᵀ) from H in float64 differ at roundoff level)."""
    tolerance = 1e-10 if dtype == np.float64 else 2e-5
    batches = lowrank_batches(np.random.default_rng(10), 20, 48, 30, dtype)
    a = OnlineNaturalGradient(6, 3, schedule=schedule)
    b = OnlineNaturalGradient(6, 3, schedule=schedule)
    for X in batches:
        X_in = X.copy()
        X_hat_a, gamma_a, rows_a = a.precondition(X.copy(), row_norms=True)
        X_hat_b, gamma_b, rows_b, returned = factored_call(b, X)
        np.testing.assert_array_equal(X, X_in)            # factored: input untouched
        assert isinstance(returned, LowRankResidual) and rows_b.dtype == np.float64
        assert rel_err(X_hat_b, X_hat_a) <= tolerance
        assert abs(gamma_b / gamma_a - 1) <= tolerance
        assert rel_err(rows_b, rows_a) <= 10 * tolerance
        assert (a.state.t, a.state.skipped) == (b.state.t, b.state.skipped)
    assert rel_err(b.state.d, a.state.d) <= 10 * tolerance
    assert abs(b.state.rho / a.state.rho - 1) <= 10 * tolerance


def test_factored_row_norms_fall_back_when_they_would_cancel():
    """alpha = 0 golden case: X lies almost inside the preconditioned subspace
    (tr XXᵀ / tr X̂X̂ᵀ ~ 1e4), so the H-based norms would lose ~1e-3; with the
    last measured kappa above the limit X̂ is formed, and the norms stay within
    float32 roundoff of the materialised ones."""
    cfg, z = load_golden("online_d100_n128_r20_p1_alpha0")
    a, b = make(cfg, "nnet2"), make(cfg, "nnet2")
    formed, worst = 0, 0.0
    for i in range(cfg["num_batches"]):
        X = z[f"in_{i:03d}"].astype(np.float32)
        _, gamma_a, rows_a = a.precondition(X.copy(), row_norms=True)
        _, gamma_b, rows_b, returned = factored_call(b, X)
        formed += not isinstance(returned, LowRankResidual)
        worst = max(worst, rel_err(rows_b, rows_a), abs(gamma_b / gamma_a - 1))
    assert b.state.kappa > 100
    assert formed >= cfg["num_batches"] // 2
    assert worst <= 1e-4


@pytest.mark.parametrize("schedule", ["nnet2", "nnet3"])
def test_deferred_updates_finish_together_and_match(schedule):
    """Two preconditioners deferring their Fisher updates into one
    DeferredUpdates give bit-identical results to calls that finish alone; the
    state changes only when the batch is finished."""
    rng = np.random.default_rng(11)
    inputs = lowrank_batches(rng, 16, 40, 12, np.float32)
    derivs = lowrank_batches(rng, 16, 40, 7, np.float32)
    alone = [OnlineNaturalGradient(4, 3, schedule=schedule) for _ in range(2)]
    together = [OnlineNaturalGradient(4, 3, schedule=schedule) for _ in range(2)]
    for X, G in zip(inputs, derivs):
        expected = [alone[0].precondition(X.copy(), row_norms=True),
                    alone[1].precondition(G.copy(), row_norms=True)]
        updates = DeferredUpdates()
        rho_before = [p.state.rho for p in together]
        got = [together[0].precondition(X.copy(), row_norms=True, updates=updates),
               together[1].precondition(G.copy(), row_norms=True, updates=updates)]
        updating = together[0]._pending is not None
        assert updating == (together[1]._pending is not None)
        if updating and rho_before[0] > 0:            # (the first call initialises)
            assert [p.state.rho for p in together] == rho_before
        updates.finish()
        assert together[0]._pending is None and together[1]._pending is None
        for e, g in zip(expected, got):
            np.testing.assert_array_equal(e[0], g[0])
            np.testing.assert_array_equal(e[2], g[2])
            assert e[1] == g[1]
    for a, b in zip(alone, together):
        np.testing.assert_array_equal(a.state.W, b.state.W)
        assert (a.state.t, a.state.skipped, a.state.rho) == (b.state.t, b.state.skipped, b.state.rho)
    assert alone[0].state.t == (10 + 2 if schedule == "nnet2" else 16)


def test_an_unfinished_deferred_update_is_finished_by_the_next_call():
    batches = lowrank_batches(np.random.default_rng(12), 4, 20, 9)
    a, b = OnlineNaturalGradient(3, 1), OnlineNaturalGradient(3, 1)
    for X in batches:
        expected, _ = a.precondition(X)
        got, _ = b.precondition(X, updates=DeferredUpdates())    # never finished by the caller
        np.testing.assert_array_equal(got, expected)
    state = b.state_dict()                                        # finishes the last one
    np.testing.assert_array_equal(state["W"], a.state.W)


@pytest.mark.parametrize("schedule,period,expected", [
    ("nnet2", 4, [True] * 10 + [False, False, False, True] * 3),
    ("nnet3", 4, [True] * 11 + [False, False, False, True] * 3),
    ("nnet2", 1, [True] * 22),
])
def test_schedule_decides_which_calls_update(schedule, period, expected):
    p = OnlineNaturalGradient(3, period, schedule=schedule)
    seen = []
    for X in lowrank_batches(np.random.default_rng(13), len(expected), 20, 9):
        updates = DeferredUpdates()
        p.precondition(X, updates=updates)
        seen.append(p._pending is not None)
        updates.finish()
    assert seen == expected[:len(seen)]
