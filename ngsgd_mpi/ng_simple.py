"""Simple natural-gradient preconditioner (Kaldi nnet2 ``nnet-precondition.cc``):
stateless, one minibatch at a time.

Math
----
R (N x D) holds one sample (gradient direction) per row.  Each row is
preconditioned with a Fisher estimate built from the *other* rows of the
minibatch, so the preconditioner does not depend on the sample it multiplies::

    p_n = (λ I + G_n / (N−1))⁻¹ r_n,   G_n = Σ_{m≠n} r_m r_mᵀ,
    λ   = α tr(R Rᵀ) / (N D)          (α times the mean eigenvalue of RᵀR / N)  (S1)

With the full-batch matrix G = λ I + RᵀR / (N−1) = (λ I + G_n/(N−1)) + r_n r_nᵀ/(N−1),
Sherman–Morrison gives, for q_n = G⁻¹ r_n and γ_n = r_nᵀ q_n::

    p_n = β_n q_n,   β_n = 1 + γ_n / (N − 1 − γ_n) = (N − 1) / (N − 1 − γ_n)   (S2)

so one inverse serves all rows.  Like Kaldi, the Gram matrix is a SYRK and
the inverse Cholesky-based (``backend.spd_inverse``: potrf + potri); the
smaller side is inverted (Kaldi switches at N >= D, and so do we)::

    N >= D:   Q = R G⁻¹                                                        (S3)
    N <  D:   Q = S⁻¹ R,   S = λ I + R Rᵀ / (N−1)    (push-through: R G⁻¹ = S⁻¹ R)  (S4)

In the N < D form every per-row quantity comes from the N x N matrix S⁻¹
alone, because R Rᵀ = (N−1)(S − λ I)::

    γ_n = (N−1)(1 − λ S⁻¹_nn)   so   β_n = 1 / (λ S⁻¹_nn)                      (S5)
    ||q_n||² = (Q Qᵀ)_nn = (N−1) (S⁻¹ − λ S⁻²)_nn                             (S6)

so a caller that only needs products with P can leave it unformed: the
affine update Gpᵀ Y = Gᵀ S⁻¹ diag(β) Y costs N²·D_Y instead of the N²·D of
forming Q (:class:`LeaveOneOut`, ``form=False``).  (S5)-(S6) are evaluated
in float64.

``precondition_simple_unscaled`` is Kaldi's ``PreconditionDirectionsAlpha``;
``precondition_simple`` is ``PreconditionDirectionsAlphaRescaled`` (what
``AffineComponentPreconditioned`` uses)::

    P ← P · sqrt(tr(R Rᵀ) / tr(P Pᵀ)),   tr(P Pᵀ) = Σ_n β_n² ||q_n||²          (S7)

so ||P||_F = ||R||_F, and an all-zero R gives P = R.  N == 1 has no other
rows: P = R (Kaldi warns).  tr(R Rᵀ) is floored at 1e-20 for λ.

Nothing here reads device data on the host: where Kaldi aborts (γ_n >= N−1
or γ_n < 0, impossible in exact arithmetic since G > λ I) the rows come out
NaN, which the trainer's divergence check catches.  The Gram matrices and Q
are computed in R's dtype, like Kaldi (float32 matches Kaldi's golden outputs
to 4.5e-5 relative, float64 to 1.4e-4: the residual is Kaldi's own float32
roundoff on ill-conditioned, alpha = 0.1 cases).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np

from ngsgd_mpi import backend

TRACE_FLOOR = 1e-20     # tr(R Rᵀ) is floored here, so lambda > 0 (alpha > 0)      (S1)


class LeaveOneOut(NamedTuple):
    """The preconditioned rows P = diag(row_scale) Q of R, (S2)-(S7)."""

    Q: Any
    """N x D: R G⁻¹ or S⁻¹ R, in R's dtype; None when left unformed."""
    S_inv: Any
    """N x N S⁻¹ (S4) when Q is left unformed (then Q = S⁻¹ R), else None."""
    row_scale: Any
    """(N,) float64: β_n (S2), times the rescaling factor (S7) if asked for."""
    row_norms: Any
    """(N,) float64: ||p_n||."""


def precondition_simple(R, alpha: float = 4.0):
    """Kaldi ``PreconditionDirectionsAlphaRescaled``: leave-one-out NG
    preconditioning of the rows of R, rescaled to R's Frobenius norm (S7).
    Returns a new array P like R."""
    return _formed(leave_one_out(R, alpha, rescale=True))


def precondition_simple_unscaled(R, alpha: float = 4.0):
    """Kaldi ``PreconditionDirectionsAlpha``: as :func:`precondition_simple`
    without the final rescaling.  Returns a new array P like R."""
    return _formed(leave_one_out(R, alpha, rescale=False))


def leave_one_out(R, alpha: float, rescale: bool = True, form: bool = True) -> LeaveOneOut:
    """The parts of P (see :class:`LeaveOneOut`); ``form=False`` leaves Q
    unformed when N < D (S4)-(S6).  No host synchronisation."""
    xp = _check(R, alpha)
    N, D = R.shape
    f64 = np.float64
    if N == 1:                                   # nothing to leave out: P = R
        norm = xp.sqrt(xp.einsum("ij,ij->i", R, R).astype(f64))
        return LeaveOneOut(Q=R.copy(), S_inv=None, row_scale=xp.ones(1, dtype=f64), row_norms=norm)
    trace = xp.vdot(R, R).astype(f64)
    floored = xp.maximum(trace, TRACE_FLOOR)
    lam = float(alpha) / (N * D) * floored       # (S1), a device scalar
    if N >= D:                                   # (S3)
        G = xp.matmul(R.T, R)                    # SYRK (NumPy detects Rᵀ R)
        G *= 1.0 / (N - 1)
        _add_to_diagonal(G, lam)
        Q = xp.matmul(R, backend.spd_inverse(G))
        gamma = xp.einsum("ij,ij->i", R, Q).astype(f64)
        divisor = (N - 1) - gamma
        ok = (gamma >= 0) & (divisor > 0)
        beta = xp.where(ok, (N - 1) / xp.where(ok, divisor, 1.0), np.nan)   # (S2)
        S_inv, q_sq = None, xp.einsum("ij,ij->i", Q, Q).astype(f64)
    else:                                        # (S4)
        S = xp.matmul(R, R.T)
        S *= 1.0 / (N - 1)
        _add_to_diagonal(S, lam)
        S_inv = backend.spd_inverse(S)
        S_inv64 = S_inv.astype(f64)
        s_diag = S_inv64.diagonal()
        ok = s_diag > 0
        beta = xp.where(ok, 1.0 / (lam * xp.where(ok, s_diag, 1.0)), np.nan)   # (S5)
        if form:
            Q, S_inv = xp.matmul(S_inv, R), None
            q_sq = xp.einsum("ij,ij->i", Q, Q).astype(f64)
        else:
            Q = None
            q_sq = s_diag - lam * xp.einsum("ij,ij->i", S_inv64, S_inv64)     # (S6) / (N−1)
            q_sq *= N - 1
            xp.maximum(q_sq, 0.0, out=q_sq)       # roundoff must not make a norm negative
    row_sq = beta * beta * q_sq
    if rescale:                                  # (S7); an all-zero R keeps P = R = 0
        P_trace = row_sq.sum()
        ratio = floored / xp.where(P_trace > 0, P_trace, 1.0)
        scale = xp.where(trace > 0, xp.sqrt(ratio), 1.0)
        beta = beta * scale
        row_sq = row_sq * (scale * scale)
    return LeaveOneOut(Q=Q, S_inv=S_inv, row_scale=beta, row_norms=xp.sqrt(row_sq))


def _formed(parts: LeaveOneOut):
    """P itself (a new array)."""
    P = parts.Q
    P *= parts.row_scale[:, None]
    return P


def _check(R, alpha):
    if getattr(R, "ndim", None) != 2 or R.dtype not in (np.float32, np.float64):
        raise ValueError("R must be a 2-D float32 or float64 array, got "
                         f"{getattr(R, 'dtype', type(R))} with shape {getattr(R, 'shape', None)}")
    if R.shape[0] < 1 or R.shape[1] < 1:
        raise ValueError(f"R must have at least one row and one column, got shape {R.shape}")
    if not (0.0 < float(alpha) < math.inf):
        raise ValueError(f"alpha must be a finite number > 0, got {alpha!r}")
    return backend.array_module(R)


def _add_to_diagonal(M, value) -> None:
    M.ravel()[:: M.shape[0] + 1] += value
