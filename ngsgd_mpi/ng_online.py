"""Online natural-gradient preconditioner (Kaldi nnet2 ``OnlinePreconditioner``,
nnet3 ``OnlineNaturalGradient``), Povey, Zhang & Khudanpur (2014), spec §2.

Math
----
X (N x D) holds one sample per row (a layer's inputs, or its output
derivatives).  Their uncentred covariance, the Fisher factor, is tracked as
low rank plus identity::

    F = Rᵀ diag(d) R + ρ I          R: (r x D), orthonormal rows, r = rank.

Preconditioning uses F smoothed towards the identity::

    Gs = F + (α/D) tr(F) I = Rᵀ diag(d) R + β I,     β = ρ(1 + α) + α Σd / D,

and by Woodbury  β Gs⁻¹ = I − Rᵀ diag(e) R  with  e_i = 1 / (β/d_i + 1) ∈ (0, 1).
Only W = diag(√e) R is stored (so W Wᵀ = diag(e)); then::

    H = X Wᵀ,    X̂ = X − H W  (= β X Gs⁻¹),    γ = ||X||_F / ||X̂||_F.

X̂ is returned unscaled, as Kaldi does; the caller multiplies by γ so the
preconditioned gradient keeps the raw gradient's norm.

Fisher update (on "updating" calls; X̂ above always uses the old state).  The
forgetting factor is η = min(0.9, 1 − exp(−N/S)) (nnet3 option: η = 1/H) and
the target is T = η XᵀX/N + (1−η) F.  One step of subspace iteration::

    Y = R T,   Z = Y Yᵀ = U diag(c) Uᵀ (c descending),   R' = diag(c)^-½ Uᵀ Y,

so R' has orthonormal rows spanning T's leading subspace, on which T has
eigenvalues ≈ √c.  ρ' keeps tr(F') = tr(T) and d' = √c − ρ'::

    ρ' = (η/N tr(XXᵀ) + (1−η)(Dρ + Σd) − Σ√c) / (D − r),

then both are floored at max(ε, δ max √c) (ε = 1e-10, δ = 5e-4); c is first
floored at (ρ(1−η))².  Written with W (R = E^-½ W, E = diag(e), Q = diag(d+ρ),
J = Hᵀ X, L = Hᵀ H = W Jᵀ, K = J Jᵀ), only r x r matrices are needed::

    Y  = (η/N) E^-½ B,           B = J + (1−η) N/η · Q W
    Z  = (η/N)² E^-½ K E^-½ + η(1−η)/N (E^-½ L E^-½ Q + Q E^-½ L E^-½) + (1−η)² Q²
    W' = diag(√e') R' = A B,     A = (η/N) diag(√e'/√c) Uᵀ E^-½.

Cost: an updating call does three N·D·r GEMMs (H, J, HW) and r²·D work; other
calls two GEMMs.  K, L go to the host (float64) for Z and its eigenproblem.
Kaldi forms Z in double but casts Z / max(1, tr Z) to float for the
eigensolver; we keep float64 throughout (more accurate; this, not an
algorithmic difference, is why long free-running runs drift from Kaldi by up to
~1e-3..5e-2 on ill-conditioned cases, see the golden README).

Re-orthonormalisation: roundoff makes R drift from orthonormal.  When Z is
ill-conditioned (c_1 > 1e6 c_r) or c was floored, O = R'R'ᵀ is checked; if some
|O_ij − δ_ij| > 1e-3, R' is replaced by C⁻¹R' with O = C Cᵀ (Cholesky), or, if
that fails or max(C⁻¹) >= 100, by Gram-Schmidt on its rows (an exactly zero row
gets a random direction from a generator seeded with the update counter, so
runs stay reproducible).

Initialisation (first call): r = min(rank, D − 1); W from a fixed orthonormal
matrix with d = ρ = ε, then k full updating passes over the first minibatch X0
(nnet2: k = 3; nnet3: k = 1 if N0 <= r else 3), discarding outputs; the real
first call then updates again.  D == 1 is a no-op (γ = 1, no state).

Schedule (which calls update F):
* nnet2 (the paper's code): ``t`` counts updates, ``skipped`` counts calls
  since the last one; skip iff t >= 10 and skipped < P − 1.  nnet2 also
  reconstructs tr(XXᵀ) = tr(X̂X̂ᵀ) + Σ_i L_ii (2 − e_i) on updating calls and
  returns γ = 1 when tr(X̂X̂ᵀ) == 0.
* nnet3: ``t`` counts calls; update iff t <= 10 or (t − 10) % P == 0;
  γ = 1 when tr(XXᵀ) <= 0.

Factored form (for the affine update, spec §4.1).  A caller that needs only
products with X̂ can skip forming it: X̂ = X − H W, so e.g. X̂ᵀ Y = Xᵀ Y − Wᵀ (Hᵀ Y)
costs r·N·D_Y + D·r·D_Y instead of N·D·r for X − H W.  The squared row norms
of X̂ then come from H, as W Wᵀ = O (= diag(e) up to float32 drift)::

    ||x̂_n||² = ||x_n||² − 2 ||h_n||² + h_nᵀ O h_n,

evaluated in float64 with the actual O (r x r, recomputed when W changes).  It
cancels when X lies mostly in the preconditioned subspace with e_i -> 1: the
error is ~ κ · 1e-7 relative, κ = tr(XXᵀ)/tr(X̂X̂ᵀ) (κ <= 6 in training runs
measured; 1.4e4 on the alpha = 0 golden case).  When κ > KAPPA_LIMIT the norms
are recomputed from an explicitly formed X̂ instead.  tr(XXᵀ) is then summed
directly, not reconstructed (nnet2) — equal up to roundoff.

Calls in two halves (:meth:`OnlineNaturalGradient.precondition_begin` /
``precondition_end``): ``begin`` queues all device work and returns the small
float64 vector the host needs (traces; on updating calls also K and L);
``end`` takes that vector on the host, returns γ and does the Fisher update
(eigenproblem on the host, W' back on the device).  An affine layer's updater
thus moves both sides' vectors and its max-change sum in ONE device-to-host
transfer per minibatch; :meth:`precondition` does begin + transfer + end.

GPU: arrays follow X (``backend.array_module``).  Device-to-host transfers
(host syncs): one small vector per call, or per affine layer via
begin/end; the rare re-orthonormalisation check adds one r x r transfer (the
Gram-Schmidt fallback one r x D), as in Kaldi; the κ fallback adds one
transfer of the recomputed norms.  The host uploads A (r x r) on updating
calls.  Nothing else reads device values (no ``float(...)``, no branches
on device data).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ngsgd_mpi import backend

EPSILON = 1e-10             # absolute floor on rho and d
DELTA = 5e-4                # relative floor: rho, d >= DELTA * max sqrt(c)
NUM_INITIAL_UPDATES = 10    # updates (nnet2) / calls (nnet3) before update_period applies
CONDITION_THRESHOLD = 1e6   # c_1 > this * c_r triggers the orthonormality check
ORTHONORMAL_TOLERANCE = 1e-3
CHOLESKY_INVERSE_LIMIT = 100.0
MAX_ETA = 0.9               # keeps (1 - eta) away from 0
KAPPA_LIMIT = 100.0         # factored row norms: recompute directly above this cancellation
SCHEDULES = ("nnet2", "nnet3")


@dataclass
class OnlineNGState:
    """Everything that evolves across calls (the configuration lives on the
    preconditioner).  Arrays are NumPy or CuPy (``W``) / host NumPy (``d``)."""

    W: Any = None
    """(rank, dim) = diag(sqrt(e)) R, in the working dtype (that of X at
    initialisation), on X's device; None before initialisation."""
    d: np.ndarray | None = None
    """(rank,) float64 host array: coefficients of the low-rank part of F."""
    rho: float = 0.0
    """Coefficient of the identity part of F."""
    t: int = 0
    """nnet2: number of Fisher updates done; nnet3: number of calls made."""
    skipped: int = 0
    """nnet2 only: calls since the last Fisher update."""
    dim: int = 0
    """D, the row dimension (0 before initialisation)."""
    rank: int = 0
    """Rank after clamping to dim - 1 (0 before initialisation)."""


@dataclass
class Preconditioned:
    """One call in flight, from :meth:`OnlineNaturalGradient.precondition_begin`
    to ``precondition_end``.  Arrays live on X's device; H and J are work
    buffers of the preconditioner, valid until its next call."""

    X_hat: Any
    """N x D unscaled X̂ (in ``out``), or None in factored form."""
    H: Any
    """X Wᵀ (N x rank) with the W below; None when D == 1 (X̂ = X, γ = 1)."""
    W: Any
    """W before this call's update: X̂ = X − H W.  None when D == 1."""
    row_sq_norms: Any
    """(N,) squared row norms of X̂ (float64 in factored form), or None."""
    host_values: Any
    """Float64 device vector ``precondition_end`` needs on the host:
    [tr XXᵀ, tr X̂X̂ᵀ], then on updating calls K and L (rank² each)."""
    updating: bool = False
    """Whether ``precondition_end`` updates the Fisher estimate."""
    J: Any = None
    """Updating calls: Hᵀ X (rank x D)."""
    X: Any = None
    """Factored form: the input, for the κ fallback (must stay unchanged until ``end``)."""
    row_norms_recomputed: bool = False
    """Set by ``end`` when the κ fallback replaced ``row_sq_norms``."""
    gamma: float | None = None
    """||X||_F / ||X̂||_F, set by ``precondition_end``."""


class OnlineNaturalGradient:
    """Kaldi's online natural-gradient preconditioner for one N x D stream.

    Args:
        rank: rank of the low-rank part (clamped to D - 1 at initialisation).
        update_period: after the first 10 updates, update F every this many calls.
        num_samples_history: S, time constant in rows of the forgetting factor.
        alpha: smoothing of F towards the identity (0 = none).
        schedule: "nnet2" (the paper's code, default) or "nnet3".
        num_minibatches_history: nnet3 only; if > 0 (must be > 1), eta = 1 / it.
    """

    def __init__(self, rank: int, update_period: int = 4, num_samples_history: float = 2000.0,
                 alpha: float = 4.0, schedule: str = "nnet2", num_minibatches_history: float = 0.0):
        if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank < 1:
            raise ValueError(f"rank must be an integer >= 1, got {rank!r}")
        if (isinstance(update_period, bool) or not isinstance(update_period, (int, np.integer))
                or update_period < 1):
            raise ValueError(f"update_period must be an integer >= 1, got {update_period!r}")
        if not (0.0 < float(num_samples_history) < 1e6):
            raise ValueError(f"num_samples_history must be in (0, 1e6), got {num_samples_history!r}")
        if not (0.0 <= float(alpha) < math.inf):
            raise ValueError(f"alpha must be a finite number >= 0, got {alpha!r}")
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
        num_minibatches_history = float(num_minibatches_history)
        if num_minibatches_history != 0.0:
            if schedule != "nnet3":
                raise ValueError("num_minibatches_history is an nnet3 option; "
                                 f"got {num_minibatches_history!r} with schedule 'nnet2'")
            if not (1.0 < num_minibatches_history < 1e6):
                raise ValueError("num_minibatches_history must be 0 (off) or in (1, 1e6), "
                                 f"got {num_minibatches_history!r}")
        self.rank_requested = int(rank)
        self.update_period = int(update_period)
        self.num_samples_history = float(num_samples_history)
        self.alpha = float(alpha)
        self.schedule = schedule
        self.num_minibatches_history = num_minibatches_history
        self.state = OnlineNGState()
        self._buffers: dict[str, Any] = {}   # reusable work arrays, keyed by role
        self._derived: dict[str, Any] = {}  # arrays derived from the current W (see _of_W)

    # ------------------------------------------------------------------ public
    def precondition(self, X, out=None):
        """Return ``(X_hat, gamma)``: X_hat = beta X Gs^-1 (unscaled, as Kaldi
        returns it) and the python float gamma = ||X|| / ||X_hat||.  X is left
        unchanged unless ``out is X``.  Updates the state per the schedule."""
        X_hat, gamma, _, _ = self._precondition(X, out, want_row_norms=False)
        return X_hat, gamma

    def precondition_with_row_norms(self, X, out=None):
        """As :meth:`precondition`, plus the (N,) squared row norms of the
        unscaled X_hat (nnet2's ``row_prod``, used for max-change)."""
        X_hat, gamma, row_sq_norms, _ = self._precondition(X, out, want_row_norms=True)
        return X_hat, gamma, row_sq_norms

    def precondition_begin(self, X, out=None, row_norms=False, factored=False) -> Preconditioned:
        """First half of a call: queue the device work with the current state
        and return the call record.  ``factored``: X̂ is not formed (use
        ``H``, ``W``; X must stay unchanged until ``end``); else X̂ goes into
        ``out`` (new if None; X is changed only if ``out is X``).  Hand a host
        copy of ``record.host_values`` to :meth:`precondition_end` before the
        next call."""
        xp = backend.array_module(X)
        self._check_input(X, out, xp)
        D = X.shape[1]
        if D == 1:   # Gs is a scalar: the rescaled output equals the input
            X_hat = None
            if not factored:
                X_hat = xp.empty_like(X) if out is None else out
                if X_hat is not X:
                    X_hat[...] = X
            return Preconditioned(X_hat=X_hat, H=None, W=None,
                                  row_sq_norms=X[:, 0] * X[:, 0] if row_norms else None,
                                  host_values=xp.zeros(0), X=X if factored else None)
        if self.state.W is None:
            self._initialize(X)
        st = self.state
        if D != st.dim or X.dtype != st.W.dtype:
            raise ValueError(f"X must be {st.W.dtype} with {st.dim} columns (as at "
                             f"initialisation), got {X.dtype} with {D}")
        if backend.array_module(st.W) is not xp:   # e.g. after load_state_dict
            st.W = xp.asarray(backend.to_host(st.W))
        if not factored and out is None:
            out = xp.empty_like(X)
        return self._begin_step(X, out, self._is_updating(), row_norms, factored)

    def precondition_end(self, call: Preconditioned, host_values) -> float:
        """Second half: γ from ``host_values`` (the host copy of
        ``call.host_values``), the Fisher update on updating calls, the
        counters.  Returns γ (also stored in ``call.gamma``)."""
        if call.H is None:
            call.gamma = 1.0
            return 1.0
        gamma = self._end_step(call, np.asarray(host_values, dtype=np.float64))
        st = self.state
        if self.schedule == "nnet3":
            st.t += 1
        elif call.updating:
            st.t, st.skipped = st.t + 1, 0
        else:
            st.skipped += 1
        return gamma

    def reset(self) -> None:
        """Forget the Fisher estimate; the next call re-initialises (what a new
        Kaldi job does after model averaging)."""
        self.state = OnlineNGState()
        self._buffers.clear()
        self._derived.clear()

    def state_dict(self) -> dict:
        """Configuration and state as host NumPy arrays and scalars (no None:
        before initialisation W is (0, 0) and d is (0,))."""
        st = self.state
        W = backend.to_host(st.W).copy() if st.W is not None else np.zeros((0, 0), np.float32)
        d = st.d.copy() if st.d is not None else np.zeros(0)
        return {"rank_requested": self.rank_requested, "update_period": self.update_period,
                "num_samples_history": self.num_samples_history, "alpha": self.alpha,
                "schedule": self.schedule, "num_minibatches_history": self.num_minibatches_history,
                "W": W, "d": d, "rho": float(st.rho), "t": int(st.t), "skipped": int(st.skipped),
                "dim": int(st.dim), "rank": int(st.rank)}

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned.  The configuration must
        equal this object's (ValueError naming the field otherwise).  W is
        moved to the device of the next call's input."""
        for key in ("rank_requested", "update_period", "num_samples_history", "alpha",
                    "schedule", "num_minibatches_history", "W", "d", "rho", "t", "skipped",
                    "dim", "rank"):
            if key not in state:
                raise ValueError(f"state dict lacks the field {key!r}")
        for key in ("rank_requested", "update_period", "num_samples_history", "alpha",
                    "schedule", "num_minibatches_history"):
            value = state[key].decode() if isinstance(state[key], bytes) else state[key]
            if value != getattr(self, key):
                raise ValueError(f"state dict field {key!r} is {state[key]!r}, but this "
                                 f"preconditioner has {getattr(self, key)!r}")
        rank, dim = int(state["rank"]), int(state["dim"])
        W, d = np.asarray(state["W"]), np.asarray(state["d"], dtype=np.float64)
        if rank == 0:
            self.reset()
            self.state.t, self.state.skipped = int(state["t"]), int(state["skipped"])
            return
        if not (1 <= rank < dim):
            raise ValueError(f"state dict field 'rank' must be in [1, dim - 1], got {rank} (dim {dim})")
        if W.shape != (rank, dim) or W.dtype not in (np.float32, np.float64):
            raise ValueError(f"state dict field 'W' must be a float32/float64 array of shape "
                             f"({rank}, {dim}), got {W.dtype} {W.shape}")
        if d.shape != (rank,):
            raise ValueError(f"state dict field 'd' must have shape ({rank},), got {d.shape}")
        self._buffers.clear()
        self._derived.clear()
        self.state = OnlineNGState(W=W.copy(), d=d.copy(), rho=float(state["rho"]),
                                   t=int(state["t"]), skipped=int(state["skipped"]),
                                   dim=dim, rank=rank)

    # ---------------------------------------------------------------- internal
    def _precondition(self, X, out, want_row_norms):
        """Internal: one whole call.  Returns ``(X_hat, gamma, row_sq_norms, H)``;
        row_sq_norms is None unless asked for; H = X W_oldᵀ (N x rank) is a
        work buffer (valid until the next call; None when D == 1)."""
        call = self.precondition_begin(X, out, row_norms=want_row_norms)
        gamma = self.precondition_end(call, backend.to_host(call.host_values))
        return call.X_hat, gamma, call.row_sq_norms, call.H

    @staticmethod
    def _check_input(X, out, xp):
        if getattr(X, "ndim", None) != 2 or X.dtype not in (np.float32, np.float64):
            raise ValueError("X must be a 2-D float32 or float64 array, got "
                             f"{getattr(X, 'dtype', type(X))} with shape {getattr(X, 'shape', None)}")
        if X.shape[0] < 1 or X.shape[1] < 1:
            raise ValueError(f"X must have at least one row and one column, got shape {X.shape}")
        if out is not None and (backend.array_module(out) is not xp or out.shape != X.shape
                                or out.dtype != X.dtype):
            raise ValueError(f"out must be an array like X ({X.dtype} {X.shape}), got "
                             f"{getattr(out, 'dtype', type(out))} {getattr(out, 'shape', None)}")

    def _buffer(self, name, shape, dtype, xp):
        buf = self._buffers.get(name)
        if (buf is None or buf.shape != shape or buf.dtype != dtype
                or backend.array_module(buf) is not xp):
            buf = self._buffers[name] = xp.empty(shape, dtype=dtype)
        return buf

    def _eta(self, N: int) -> float:
        if self.num_minibatches_history > 0.0:
            return 1.0 / self.num_minibatches_history
        return min(MAX_ETA, 1.0 - math.exp(-N / self.num_samples_history))

    def _is_updating(self) -> bool:
        st, P = self.state, self.update_period
        if self.schedule == "nnet3":
            return st.t <= NUM_INITIAL_UPDATES or (st.t - NUM_INITIAL_UPDATES) % P == 0
        return not (st.t >= NUM_INITIAL_UPDATES and st.skipped < P - 1)

    def _initialize(self, X0) -> None:
        """InitDefault + k updating passes over the first minibatch (spec §2.7)."""
        xp = backend.array_module(X0)
        N, D = X0.shape
        R = min(self.rank_requested, D - 1)
        # Rmat0: row r is nonzero in columns r, r+R, r+2R, ... (1.1 at column r,
        # 1 elsewhere), normalised; disjoint supports make the rows orthonormal.
        columns = np.arange(D)
        Rmat0 = np.zeros((R, D))
        Rmat0[columns % R, columns] = 1.0
        Rmat0[np.arange(R), np.arange(R)] = 1.1
        Rmat0 /= np.linalg.norm(Rmat0, axis=1, keepdims=True)
        sqrt_e0 = math.sqrt(1.0 / (2.0 + (D + R) * self.alpha / D))   # e_i when d = rho = eps
        self.state = OnlineNGState(W=xp.asarray(sqrt_e0 * Rmat0, dtype=X0.dtype),
                                   d=np.full(R, EPSILON), rho=EPSILON, t=0, skipped=0,
                                   dim=D, rank=R)
        num_iters = 1 if (self.schedule == "nnet3" and N <= R) else 3
        scratch = self._buffer("init_out", X0.shape, X0.dtype, xp)
        for _ in range(num_iters):
            call = self._begin_step(X0, scratch, updating=True, row_norms=False, factored=False)
            self._end_step(call, backend.to_host(call.host_values).astype(np.float64))

    def _begin_step(self, X, out, updating, row_norms, factored) -> Preconditioned:
        """Device half of a call with the current state: H, X̂ (into ``out``)
        or the factored row norms, traces; on updating calls J, K, L."""
        st = self.state
        xp = backend.array_module(X)
        N, D = X.shape
        R, W = st.rank, st.W
        # Wᵀ as a contiguous copy: X Wᵀ then runs as a GEMM without operand
        # transposition, up to 1.5x faster for small N·D·r on OpenBLAS.
        H = xp.matmul(X, self._of_W("transposed", W), out=self._buffer("H", (N, R), X.dtype, xp))
        J = xp.matmul(H.T, X, out=self._buffer("J", (R, D), X.dtype, xp)) if updating else None
        call = Preconditioned(X_hat=None, H=H, W=W, row_sq_norms=None, host_values=None,
                              updating=updating, J=J)
        if factored:
            # ||x̂_n||² = ||x_n||² + h_nᵀ (O − 2I) h_n in float64; X̂ is never formed.
            call.X = X
            H64 = H.astype(np.float64)
            rows = xp.einsum("ij,ij->i", xp.matmul(H64, self._of_W("gram_minus_two", W)), H64)
            x_sq = xp.einsum("ij,ij->i", X, X).astype(np.float64)
            tr_X = x_sq.sum()
            rows += x_sq
            xp.maximum(rows, 0.0, out=rows)        # roundoff must not make a norm negative
            tr_X_hat = rows.sum()
            call.row_sq_norms = rows if row_norms else None
        else:
            # tr(XXᵀ) before X̂ is written (out may be X); nnet2 reconstructs it
            # on updating calls instead (in _end_step).
            tr_X = _squared_norm(X) if (self.schedule == "nnet3" or not updating) else None
            # X̂ = X − H W; H W goes straight into out unless out overlaps X.
            HW = self._buffer("HW", (N, D), X.dtype, xp) if xp.may_share_memory(X, out) else out
            xp.matmul(H, W, out=HW)
            X_hat = call.X_hat = xp.subtract(X, HW, out=out)
            if row_norms:
                call.row_sq_norms = xp.einsum("ij,ij->i", X_hat, X_hat)
                tr_X_hat = call.row_sq_norms.sum()
            else:
                tr_X_hat = _squared_norm(X_hat)
            if tr_X is None:
                tr_X = tr_X_hat      # placeholder, replaced by the reconstruction
        # What the host needs, gathered in one float64 buffer (no per-call allocations).
        size = 2 + 2 * R * R if updating else 2
        values = call.host_values = self._buffer(f"values{size}", (size,), np.float64, xp)
        values[0] = tr_X
        values[1] = tr_X_hat
        if updating:
            if N <= D:
                L = xp.matmul(H.T, H, out=self._buffer("L", (R, R), X.dtype, xp))
            else:
                L = xp.matmul(W, J.T, out=self._buffer("L", (R, R), X.dtype, xp))
            K = xp.matmul(J, J.T, out=self._buffer("K", (R, R), X.dtype, xp))
            values[2:2 + R * R].reshape(R, R)[...] = K
            values[2 + R * R:].reshape(R, R)[...] = L
        return call

    def _end_step(self, call: Preconditioned, values: np.ndarray) -> float:
        """Host half of a call: γ and, on updating calls, W, d, rho replaced.
        Counters are the caller's business."""
        st = self.state
        N, D, R = call.H.shape[0], st.dim, st.rank
        tr_X, tr_X_hat = float(values[0]), float(values[1])
        if call.X is not None and tr_X > KAPPA_LIMIT * tr_X_hat:
            tr_X_hat = self._direct_row_norms(call)
        if call.updating:
            K = values[2:2 + R * R].reshape(R, R)
            L = values[2 + R * R:2 + 2 * R * R].reshape(R, R)
            inv_e = self._inverse_e(st.d, st.rho, D)
            if call.X is None and self.schedule == "nnet2":
                # nnet2: ||X||² = ||X̂||² + Σ_i L_ii (2 − e_i), as W Wᵀ = diag(e)
                tr_X = tr_X_hat + float(L.diagonal() @ (2.0 - 1.0 / inv_e))
            A, w, d_new, rho_new, inv_e_new, check_orthonormal = self._fisher_update(
                K, L, inv_e, tr_X, N, D)
            # W' = A B with B = J + diag(w) W (formed in J's buffer).
            W, J = call.W, call.J
            xp = backend.array_module(W)
            wW = xp.multiply(W, xp.asarray(w, dtype=W.dtype)[:, None],
                             out=self._buffer("wW", (R, D), W.dtype, xp))
            B = xp.add(J, wW, out=J)
            W_new = xp.matmul(xp.asarray(A, dtype=W.dtype), B)
            if check_orthonormal:
                W_new = self._reorthonormalize(W_new, 1.0 / inv_e_new)
            st.W, st.d, st.rho = W_new, d_new, rho_new
        call.gamma = self._gamma(tr_X, tr_X_hat)
        return call.gamma

    def _of_W(self, name: str, W):
        """An array derived from W, computed once per W (W is replaced, never
        modified, by an update): "transposed" = Wᵀ contiguous; "gram_minus_two"
        = W Wᵀ − 2I in float64, as ||x − Wᵀh||² = ||x||² + hᵀ(WWᵀ − 2I)h."""
        if self._derived.get("W") is not W:
            self._derived = {"W": W}
        value = self._derived.get(name)
        if value is None:
            xp = backend.array_module(W)
            if name == "transposed":
                value = xp.ascontiguousarray(W.T)
            else:
                value = xp.matmul(W, W.T).astype(np.float64)
                value.ravel()[::value.shape[0] + 1] -= 2.0   # the diagonal (a view)
            self._derived[name] = value
        return value

    def _direct_row_norms(self, call: Preconditioned) -> float:
        """κ fallback of the factored form: form X̂ = X − H W in a scratch
        buffer, take its row norms directly; returns tr(X̂X̂ᵀ) (one transfer)."""
        X = call.X
        xp = backend.array_module(X)
        X_hat = xp.matmul(call.H, call.W, out=self._buffer("X_hat", X.shape, X.dtype, xp))
        xp.subtract(X, X_hat, out=X_hat)
        rows = xp.einsum("ij,ij->i", X_hat, X_hat).astype(np.float64)
        if call.row_sq_norms is not None:
            call.row_sq_norms = rows
            call.row_norms_recomputed = True
        return float(backend.to_host(rows.sum()))

    def _gamma(self, tr_X: float, tr_X_hat: float) -> float:
        if self.schedule == "nnet3":
            return 1.0 if tr_X <= 0.0 else math.sqrt(tr_X / tr_X_hat)
        return 1.0 if tr_X_hat == 0.0 else math.sqrt(tr_X / tr_X_hat)

    def _inverse_e(self, d, rho, D):
        """1 / e_i = beta / d_i + 1."""
        beta = rho * (1.0 + self.alpha) + self.alpha * float(d.sum()) / D
        inv_e = beta / d
        inv_e += 1.0
        return inv_e

    def _fisher_update(self, K, L, inv_e, tr_X, N, D):
        """Host float64 part of the update (spec §2.5 steps 2-9), given 1/e.
        Returns the r x r matrix A and the vector w of W' = A (J + diag(w) W),
        the new d and rho, the new 1/e, and whether orthonormality must be checked."""
        st = self.state
        d, rho = st.d, st.rho
        eta = self._eta(N)
        a, b = eta / N, 1.0 - eta
        sum_d = float(d.sum())
        inv_sqrt_e = np.sqrt(inv_e)
        q = d + rho
        # Z = S (a² K + ab (L Q + Q L)) S + b² Q², with S = E^-½, Q = diag(q)
        # (diagonal matrices commute); symmetrised, as K and L are up to roundoff:
        # with M = (a²/2) K + ab L Q,  M + Mᵀ = a² (K + Kᵀ)/2 + ab (L Q + Q Lᵀ).
        M = L * ((a * b) * q)
        M += (0.5 * a * a) * K
        Z = M + M.T
        Z *= inv_sqrt_e[:, None] * inv_sqrt_e
        q_b = b * q
        Z.ravel()[::len(q) + 1] += q_b * q_b         # the diagonal (a view)
        # (Kaldi scales Z by 1 / max(1, tr Z) for its float32 eigensolver; not needed in float64.)
        c, U = np.linalg.eigh(Z)
        c, U = c[::-1], U[:, ::-1]                 # descending, as Kaldi's SortSvd
        c_max, c_min = float(c[0]), float(c[-1])
        check_orthonormal = c_max > CONDITION_THRESHOLD * c_min
        c_floor = (rho * b) ** 2
        if c_min < c_floor:
            check_orthonormal = True
            c = np.maximum(c, c_floor)
        sqrt_c = np.sqrt(c)
        rho_new = (a * tr_X + b * (D * rho + sum_d) - float(sqrt_c.sum())) / (D - len(q))
        d_new = sqrt_c - rho_new                     # uses rho' before flooring, as Kaldi
        floor = max(EPSILON, DELTA * math.sqrt(max(c_max, c_floor)))
        rho_new = max(rho_new, floor)
        d_new = np.maximum(d_new, floor, out=d_new)
        inv_e_new = self._inverse_e(d_new, rho_new, D)
        w = (b / a) * q
        # A = a diag(√e' / √c) Uᵀ E^-½
        A = U.T * inv_sqrt_e
        A *= (a / (sqrt_c * np.sqrt(inv_e_new)))[:, None]
        return A, w, d_new, float(rho_new), inv_e_new, check_orthonormal

    def _reorthonormalize(self, W_new, e_new):
        """Make the rows of R' = E'^-½ W' orthonormal again if they drifted by
        more than 1e-3 (spec §2.6): Cholesky, else Gram-Schmidt."""
        xp = backend.array_module(W_new)
        R = W_new.shape[0]
        sqrt_e, inv_sqrt_e = np.sqrt(e_new), 1.0 / np.sqrt(e_new)
        O = backend.to_host(xp.matmul(W_new, W_new.T)).astype(np.float64)
        O = inv_sqrt_e[:, None] * O * inv_sqrt_e[None, :]       # = R' R'ᵀ
        if np.abs(np.tril(O - np.eye(R))).max() <= ORTHONORMAL_TOLERANCE:
            return W_new
        try:
            C_inv = np.tril(np.linalg.inv(np.linalg.cholesky(O)))   # O = C Cᵀ
            cholesky_ok = bool(C_inv.max() < CHOLESKY_INVERSE_LIMIT)
        except np.linalg.LinAlgError:
            cholesky_ok = False
        if cholesky_ok:
            # R'' = C⁻¹ R'  <=>  W'' = (E'^½ C⁻¹ E'^-½) W'
            M = sqrt_e[:, None] * C_inv * inv_sqrt_e[None, :]
            return xp.matmul(xp.asarray(M, dtype=W_new.dtype), W_new)
        Rmat = _orthonormalize_rows(backend.to_host(W_new).astype(np.float64),
                                    np.random.default_rng(self.state.t))
        return xp.asarray(sqrt_e[:, None] * Rmat, dtype=W_new.dtype)


def _squared_norm(X):
    """||X||_F² (tr XXᵀ) without copying a Fortran-ordered X (vdot reads in C order)."""
    flat = X.T if X.flags.f_contiguous and not X.flags.c_contiguous else X
    return backend.array_module(X).vdot(flat, flat)


def _orthonormalize_rows(M: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Gram-Schmidt on the rows of M in order, in place (Kaldi
    ``MatrixBase::OrthogonalizeRows``): a row that loses >= 99% of its squared
    norm to the projection is projected again; a zero row is randomised."""
    for i in range(M.shape[0]):
        row, previous = M[i], M[:i]
        for _ in range(101):
            start = float(row @ row)
            if not math.isfinite(start) or start == 0.0:
                row[:] = rng.standard_normal(row.shape[0])
                continue
            row -= previous.T @ (previous @ row)
            end = float(row @ row)
            if end > 0.01 * start:
                row /= math.sqrt(end)
                break
            if end == 0.0:
                row[:] = rng.standard_normal(row.shape[0])
        else:
            raise FloatingPointError(f"Gram-Schmidt did not converge on row {i}")
    return M
