"""Simple natural-gradient preconditioner (Kaldi nnet2 ``nnet-precondition.cc``,
spec §3): stateless, one minibatch at a time.

Math
----
R (N x D) holds one sample (gradient direction) per row.  Each row is
preconditioned with a Fisher estimate built from the *other* rows of the
minibatch, so the preconditioner does not depend on the sample it multiplies::

    p_n = (λ I + G_n / (N−1))⁻¹ r_n,     G_n = Σ_{m≠n} r_m r_mᵀ,
    λ   = α tr(R Rᵀ) / (N D)             (α times the mean eigenvalue of RᵀR / N).

With the full-batch matrix G = λ I + RᵀR / (N−1) = (λ I + G_n/(N−1)) + r_n r_nᵀ/(N−1),
Sherman–Morrison gives, for q_n = G⁻¹ r_n and γ_n = r_nᵀ q_n,

    p_n = q_n (1 + γ_n / (N − 1 − γ_n)),

so one D x D solve serves all rows.  When N < D the same Q = R G⁻¹ is cheaper
as Q = (λ I + R Rᵀ / (N−1))⁻¹ R (push-through identity, an N x N solve);
Kaldi switches at N >= D, and so do we.

``precondition_simple_unscaled`` is ``PreconditionDirectionsAlpha``;
``precondition_simple`` is ``PreconditionDirectionsAlphaRescaled`` (the one
``AffineComponentPreconditioned`` uses): P is rescaled so ||P||_F = ||R||_F,
and an all-zero R is returned unchanged.  N == 1 has no other rows: R is
returned unchanged (Kaldi warns).

Everything is computed in R's dtype, like Kaldi (float32 matches Kaldi's
golden outputs to 4.5e-5 relative, float64 to 1.4e-4: the residual is Kaldi's
own float32 roundoff on ill-conditioned, alpha = 0.1 cases).
"""

from __future__ import annotations

import math

import numpy as np

from ngsgd_mpi import backend

TRACE_FLOOR = 1e-20     # tr(R Rᵀ) is floored here, so lambda > 0 (alpha > 0)


def precondition_simple(R, alpha: float = 4.0):
    """Kaldi ``PreconditionDirectionsAlphaRescaled``: leave-one-out NG
    preconditioning of the rows of R, rescaled to R's Frobenius norm.
    Returns a new array P like R."""
    xp = _check(R, alpha)
    trace = float(xp.vdot(R, R))
    if trace == 0.0:
        return R.copy()
    trace = max(trace, TRACE_FLOOR)
    P = _precondition_directions(R, alpha * trace / (R.shape[0] * R.shape[1]))
    P_trace = float(xp.vdot(P, P))
    if P_trace == 0.0:
        raise FloatingPointError("simple NG produced an all-zero output from a nonzero input")
    P *= math.sqrt(trace / P_trace)
    return P


def precondition_simple_unscaled(R, alpha: float = 4.0):
    """Kaldi ``PreconditionDirectionsAlpha``: as :func:`precondition_simple`
    without the final rescaling.  Returns a new array P like R."""
    xp = _check(R, alpha)
    trace = max(float(xp.vdot(R, R)), TRACE_FLOOR)
    return _precondition_directions(R, alpha * trace / (R.shape[0] * R.shape[1]))


def _check(R, alpha):
    if getattr(R, "ndim", None) != 2 or R.dtype not in (np.float32, np.float64):
        raise ValueError("R must be a 2-D float32 or float64 array, got "
                         f"{getattr(R, 'dtype', type(R))} with shape {getattr(R, 'shape', None)}")
    if R.shape[0] < 1 or R.shape[1] < 1:
        raise ValueError(f"R must have at least one row and one column, got shape {R.shape}")
    if not (0.0 < float(alpha) < math.inf):
        raise ValueError(f"alpha must be a finite number > 0, got {alpha!r}")
    return backend.array_module(R)


def _precondition_directions(R, lam: float):
    """Leave-one-out preconditioning with a given lambda (Kaldi
    ``PreconditionDirections``)."""
    xp = backend.array_module(R)
    N, D = R.shape
    if N == 1:
        return R.copy()
    if N >= D:
        G = R.T @ R
        G /= N - 1
        _add_to_diagonal(G, lam)
        Q = xp.ascontiguousarray(xp.linalg.solve(G, R.T).T)   # R G⁻¹ (G is symmetric)
    else:
        S = R @ R.T
        S /= N - 1
        _add_to_diagonal(S, lam)
        Q = xp.linalg.solve(S, R)                # (λI + RRᵀ/(N−1))⁻¹ R = R G⁻¹
    gamma = xp.einsum("ij,ij->i", R, Q)          # γ_n = r_nᵀ G⁻¹ r_n
    divisor = (N - 1) - gamma
    if bool(xp.any(divisor <= 0.0)):
        raise FloatingPointError("simple NG: r_n' G^-1 r_n >= N - 1 (lambda too small for this "
                                 "minibatch); Kaldi aborts here too")
    Q *= ((N - 1) / divisor)[:, None]            # 1 + γ/(N−1−γ) = (N−1)/(N−1−γ)
    return Q


def _add_to_diagonal(M, value: float) -> None:
    M.ravel()[:: M.shape[0] + 1] += value
