"""Online natural-gradient preconditioner: Kaldi nnet2's ``OnlinePreconditioner``
and nnet3's ``OnlineNaturalGradient`` (Povey, Zhang & Khudanpur 2014, the
paper's NG-SGD), on NumPy or a device array module.

Model
-----
X (N x D) holds one sample per row: an affine layer's inputs [X, 1] or its
output derivatives G.  Their uncentred covariance, the Fisher factor, is
tracked as low rank plus identity and smoothed towards the identity::

    F  = Rᵀ diag(d) R + ρ I,          R: r x D with orthonormal rows        (O1)
    Gs = F + (α/D) tr(F) I = Rᵀ diag(d) R + β I,   β = ρ(1 + α) + α Σd / D

By Woodbury, β Gs⁻¹ = I − Rᵀ diag(e) R with e_i = 1/(β/d_i + 1) ∈ (0, 1).
Only W = diag(√e) R is stored (so W Wᵀ = diag(e)); each call returns::

    H = X Wᵀ,   X̂ = β X Gs⁻¹ = X − H W,   γ = ||X||_F / ||X̂||_F           (O2)

unscaled, as Kaldi does: the caller multiplies by γ so that the
preconditioned gradient keeps the raw one's Frobenius norm.  γ = 1 in the
degenerate cases of the schedule (O12).  Optionally also the squared row
norms ||x̂_n||² (nnet2's ``row_prod``, which max-change needs)          (O3)

Fisher update (on *updating* calls; (O2) always uses the state before it)::

    η = min(0.9, 1 − exp(−N/S))        (nnet3 option: η = 1/H)            (O4)
    T = η XᵀX/N + (1 − η) F            (the target)
    Y = R T,  Z = Y Yᵀ = U diag(c) Uᵀ  (c descending),  R' = diag(c)^-½ Uᵀ Y (O5)

one step of subspace iteration: R' has orthonormal rows spanning T's leading
subspace, on which T has eigenvalues ≈ √c.  c is first floored at
(ρ(1 − η))².  The new coefficients keep tr(F') = tr(T)::

    ρ' = (η/N tr(XXᵀ) + (1 − η)(Dρ + Σd) − Σ√c) / (D − r),   d' = √c − ρ'  (O6)

then both are floored at max(ε, δ max √c) (ε = 1e-10, δ = 5e-4; d' uses ρ'
before its floor, as Kaldi).  Only r x r matrices are needed: with
E = diag(e), Q = diag(d + ρ), J = Hᵀ X, L = Hᵀ H = W Jᵀ, K = J Jᵀ::

    Y  = (η/N) E^-½ B,   B = J + (1 − η) N/η · Q W                          (O7)
    Z  = (η/N)² E^-½ K E^-½ + η(1 − η)/N (E^-½ L E^-½ Q + Q E^-½ L E^-½)
         + (1 − η)² Q²                                                      (O8)
    W' = diag(√e') R' = A B,   A = (η/N) diag(√e'/√c) Uᵀ E^-½               (O9)

K, L and the traces go to the host in float64; Z and its eigenproblem are
float64 there (Kaldi casts Z / max(1, tr Z) to float for its eigensolver:
that, not an algorithmic difference, is why long free-running runs drift
from Kaldi by up to ~1e-3..5e-2 on ill-conditioned cases).  tr(XXᵀ) in (O6)
is summed directly in both schedules (nnet2 reconstructs it from X̂ and L;
equal up to roundoff).

Re-orthonormalisation (O10): roundoff makes R drift from orthonormal.  When
Z is ill-conditioned (c_1 > 1e6 c_r) or c was floored, O = R'R'ᵀ is checked;
if some |O_ij − δ_ij| > 1e-3, R' is replaced by C⁻¹R' with O = C Cᵀ
(Cholesky), or, if that fails or max(C⁻¹) >= 100, by Gram-Schmidt on its
rows (an exactly zero row gets a random direction from a generator seeded
with the update counter, so runs stay reproducible).

Factored form (O11), for the affine update: a caller that only needs
products with X̂ can leave it unformed, X̂ = X − H W (a :class:`LowRankResidual`),
e.g. X̂ᵀ Y = Xᵀ Y − Wᵀ (Hᵀ Y).  Its row norms then come from H, as
W Wᵀ = O (= diag(e) up to float32 drift)::

    ||x̂_n||² = ||x_n||² + h_nᵀ (O − 2I) h_n

with the actual O (recomputed when W changes): its diagonal part
Σ_i (O_ii − 2) h_ni² in float64, the off-diagonal part (O's float32 drift
from diag(e), |O_ij| << 1, so its rounding error is negligible) in the
working dtype, which halves the cost of the N·r² product.  This cancels
when X lies mostly in the preconditioned subspace: the error is about
κ · 1e-7 relative, κ = tr(XXᵀ)/tr(X̂X̂ᵀ) (κ <= 6 in the training runs
measured; 1.4e4 on the alpha = 0 golden case).  κ is known on the host only
after an updating call's transfer, so the decision uses the last measured κ
(:attr:`OnlineNGState.kappa`): above KAPPA_LIMIT, X̂ is formed instead.

Initialisation (first call): r = min(rank, D − 1); W from a fixed
orthonormal matrix with d = ρ = ε, then k updating passes over the first
minibatch X0 (O12), discarding outputs; the real first call then updates
again.  D == 1 is a no-op (γ = 1, no state).

Schedules (O12), which calls update F (:class:`Nnet2Schedule`, :class:`Nnet3Schedule`):
* nnet2 (the paper's code): t counts updates, ``skipped`` the calls since
  the last one; skip iff t >= 10 and skipped < P − 1; k = 3 initial passes;
  γ = 1 when tr(X̂X̂ᵀ) = 0.
* nnet3: t counts calls; update iff t <= 10 or (t − 10) % P == 0; k = 1 if
  N0 <= r else 3; γ = 1 when tr(XXᵀ) <= 0; η = 1/H allowed.

Host transfers (GPU).  γ, the row norms and everything applied to X stay on
the device: a call that does not update F reads nothing on the host.  An
updating call needs [tr XXᵀ, tr X̂X̂ᵀ, K, L] (2 + 2r² floats) on the host for
(O5)-(O9) and uploads A (r x r) and the r-vector of (O7); when (O10) is due
it also reads W'W'ᵀ (r x r), as Kaldi does (the check is due on most
updates of the hidden layers' input sides: their [X, 1] has a dominant mean
direction).  By default the call does that itself; a caller with many
preconditioners (the updater: every side of every layer) passes one
:class:`DeferredUpdates` and finishes them together: one transfer for all
(O5)-(O9) values, one for all due (O10) checks.  Rare extras: the (O10)
Gram-Schmidt fallback (r x D) and the first call's initialisation passes.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np

from ngsgd_mpi import backend
from ngsgd_mpi.workspace import Workspace

EPSILON = 1e-10             # absolute floor on rho and d                          (O6)
DELTA = 5e-4                # relative floor: rho, d >= DELTA * max sqrt(c)         (O6)
NUM_INITIAL_UPDATES = 10    # updates (nnet2) / calls (nnet3) before update_period (O12)
CONDITION_THRESHOLD = 1e6   # c_1 > this * c_r triggers the orthonormality check   (O10)
ORTHONORMAL_TOLERANCE = 1e-3
CHOLESKY_INVERSE_LIMIT = 100.0
MAX_ETA = 0.9               # keeps (1 - eta) away from 0                           (O4)
KAPPA_LIMIT = 100.0         # factored row norms only while kappa <= this           (O11)


class OnlineNGState(NamedTuple):
    """Everything that evolves across calls (the configuration lives on the
    preconditioner).  Replaced, never modified, by each call."""

    W: Any = None
    """(rank, dim) = diag(sqrt(e)) R in the working dtype, on X's device; None
    before initialisation."""
    d: np.ndarray | None = None
    """(rank,) float64 host array: coefficients of the low-rank part of F (O1)."""
    rho: float = 0.0
    """Coefficient of the identity part of F (O1)."""
    t: int = 0
    """Update counter (nnet2) or call counter (nnet3), (O12)."""
    skipped: int = 0
    """nnet2: calls since the last update (O12)."""
    dim: int = 0
    rank: int = 0
    """Rank after clamping to dim - 1 (0 before initialisation)."""
    kappa: float = 0.0
    """tr(XXᵀ)/tr(X̂X̂ᵀ) of the last updating call (O11); 0 before the first."""


class LowRankResidual(NamedTuple):
    """X̂ = X − H W left unformed (O11); X must stay unchanged while it is used."""

    X: Any
    H: Any
    W: Any


# ----------------------------------------------------------------------------- schedules

class Nnet2Schedule:
    """nnet2 ``OnlinePreconditioner`` (the paper's code), (O12)."""

    name = "nnet2"
    allows_minibatch_history = False

    @staticmethod
    def initial_passes(N: int, rank: int) -> int:
        return 3

    @staticmethod
    def is_updating(state: OnlineNGState, period: int) -> bool:
        return not (state.t >= NUM_INITIAL_UPDATES and state.skipped < period - 1)

    @staticmethod
    def advance(state: OnlineNGState, updated: bool) -> OnlineNGState:
        if updated:
            return state._replace(t=state.t + 1, skipped=0)
        return state._replace(skipped=state.skipped + 1)

    @staticmethod
    def gamma_is_one(tr_X, tr_X_hat):
        return tr_X_hat == 0


class Nnet3Schedule:
    """nnet3 ``OnlineNaturalGradient``, (O12)."""

    name = "nnet3"
    allows_minibatch_history = True

    @staticmethod
    def initial_passes(N: int, rank: int) -> int:
        return 1 if N <= rank else 3

    @staticmethod
    def is_updating(state: OnlineNGState, period: int) -> bool:
        return state.t <= NUM_INITIAL_UPDATES or (state.t - NUM_INITIAL_UPDATES) % period == 0

    @staticmethod
    def advance(state: OnlineNGState, updated: bool) -> OnlineNGState:
        return state._replace(t=state.t + 1)

    @staticmethod
    def gamma_is_one(tr_X, tr_X_hat):
        return tr_X <= 0


SCHEDULES = {"nnet2": Nnet2Schedule(), "nnet3": Nnet3Schedule()}


# ----------------------------------------------------------------------------- deferred updates

class _Pending(NamedTuple):
    """The host half of an updating call, not yet done."""

    values: tuple   # device arrays for the host: tr XXᵀ, tr X̂X̂ᵀ (0-d), K, L (r x r)
    J: Any          # Hᵀ X (r x D), a workspace array (kept until the update is finished)
    W: Any          # the W of the call
    N: int
    seed: int       # Gram-Schmidt seed (O10): the update counter at the call


class _Check(NamedTuple):
    """An (O10) orthonormality check waiting for W'W'ᵀ on the host."""

    W: Any          # W' as computed
    e: np.ndarray   # e' (host)
    seed: int
    gram: Any       # W'W'ᵀ, float64 on W's device


class DeferredUpdates:
    """Fisher updates of several preconditioners (a whole network's) finished
    together: ONE host transfer for all their (O5)-(O9) values, and one more
    for all (O10) checks if any is due.  Pass it as ``updates=`` to their
    calls, then :meth:`finish` it (a preconditioner called again first
    finishes its own update alone)."""

    def __init__(self):
        self._members: list[OnlineNaturalGradient] = []

    def _add(self, preconditioner: "OnlineNaturalGradient") -> None:
        self._members.append(preconditioner)

    def finish(self) -> None:
        """The transfers, the host eigenproblems, the new W uploaded."""
        members = [p for p in self._members if p._pending is not None]
        self._members = []
        host = _to_host_together([v for p in members for v in p._pending.values])
        checks = []
        for i, p in enumerate(members):
            check = p._finish(host[4 * i:4 * i + 4])
            if check is not None:
                checks.append((p, check))
        for (p, check), gram in zip(checks, _to_host_together([c.gram for _, c in checks])):
            p._check_orthonormal(check, gram)


def _to_host_together(arrays) -> list[np.ndarray]:
    """Host copies of device arrays with one transfer (views of one buffer);
    host arrays as they are (nothing to move, nothing to pack)."""
    if not arrays:
        return []
    xp = backend.array_module(arrays[0])
    if xp is np:
        return arrays
    flat = [a.ravel() for a in arrays]
    host = backend.to_host(flat[0] if len(flat) == 1 else xp.concatenate(flat))
    parts, start = [], 0
    for a in arrays:
        parts.append(host[start:start + a.size].reshape(a.shape))
        start += a.size
    return parts


# ----------------------------------------------------------------------------- the preconditioner

class OnlineNaturalGradient:
    """Kaldi's online natural-gradient preconditioner for one N x D stream.

    Args:
        rank: rank r of the low-rank part (clamped to D - 1 at initialisation).
        update_period: after the first 10 updates, update F every this many calls.
        num_samples_history: S, the forgetting time constant in rows (O4).
        alpha: smoothing of F towards the identity (0 = none), (O1).
        schedule: "nnet2" (the paper's code, default) or "nnet3" (O12).
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
            raise ValueError(f"schedule must be one of {tuple(SCHEDULES)}, got {schedule!r}")
        num_minibatches_history = float(num_minibatches_history)
        if num_minibatches_history != 0.0:
            if not SCHEDULES[schedule].allows_minibatch_history:
                raise ValueError("num_minibatches_history is an nnet3 option; "
                                 f"got {num_minibatches_history!r} with schedule {schedule!r}")
            if not (1.0 < num_minibatches_history < 1e6):
                raise ValueError("num_minibatches_history must be 0 (off) or in (1, 1e6), "
                                 f"got {num_minibatches_history!r}")
        self.rank_requested = int(rank)
        self.update_period = int(update_period)
        self.num_samples_history = float(num_samples_history)
        self.alpha = float(alpha)
        self.schedule = SCHEDULES[schedule]
        self.num_minibatches_history = num_minibatches_history
        self.state = OnlineNGState()
        self.work = Workspace()                # H, J, K, L, ... of the current call
        self._pending: _Pending | None = None  # an updating call's host half, when deferred
        self._derived: tuple = (None, {})      # (W, arrays computed from that W)
        self._e_cache: tuple = (None, 0.0, None)   # (d, rho, (1/e, 1/√e, Σd)) of the last d (O1)

    # ------------------------------------------------------------------ public
    def precondition(self, X, out=None, row_norms: bool = False, factored: bool = False,
                     updates: DeferredUpdates | None = None):
        """Precondition the rows of X with the current estimate (O2) and update
        it per the schedule.  Returns ``(X_hat, gamma)``, or ``(X_hat, gamma,
        row_sq_norms)`` with ``row_norms`` (O3).

        * ``X_hat``: β X Gs⁻¹, unscaled (use γ X̂).  Written into ``out`` (new
          if None; X is changed only if ``out is X``).  With ``factored`` it
          may instead be a :class:`LowRankResidual` (O11), and X must stay
          unchanged until the caller is done with it; a formed X_hat then
          lives in this object's workspace unless ``out`` is given.
        * ``gamma``: ||X|| / ||X̂||, a 0-d array on X's device (a NumPy float64
          scalar on the CPU: it is a Python float).
        * ``row_sq_norms``: (N,) squared row norms of the unscaled X̂ (float64
          in factored form).
        * ``updates``: finish an updating call's host half later, together
          with other preconditioners' (:class:`DeferredUpdates`); X may then be
          overwritten but the state is updated only when it is finished.
        """
        xp = backend.array_module(X)
        self._check_input(X, out, xp)
        self._finish_pending()
        if X.shape[1] == 1:                          # Gs is a scalar: X̂ = X, γ = 1
            return self._identity(X, out, row_norms, factored, xp)
        if self.state.W is None:
            self._initialize(X)
        st = self.state
        if X.shape[1] != st.dim or X.dtype != st.W.dtype:
            raise ValueError(f"X must be {st.W.dtype} with {st.dim} columns (as at "
                             f"initialisation), got {X.dtype} with {X.shape[1]}")
        if backend.array_module(st.W) is not xp:     # e.g. after load_state_dict
            st = self.state = st._replace(W=backend.to_device(backend.to_host(st.W), like=X))
        updating = self.schedule.is_updating(st, self.update_period)
        X_hat, gamma, rows, pending = self._apply(X, out, row_norms, factored, updating)
        self.state = self.schedule.advance(st, updating)
        if pending is not None:
            self._pending = pending
            if updates is None:
                self._finish_pending()
            else:
                updates._add(self)
        return (X_hat, gamma, rows) if row_norms else (X_hat, gamma)

    def reset(self) -> None:
        """Forget the Fisher estimate; the next call re-initialises (what a new
        Kaldi job does after model averaging)."""
        self.state = OnlineNGState()
        self._pending = None
        self._derived = (None, {})
        self._e_cache = (None, 0.0, None)
        self.work.clear()

    def state_dict(self) -> dict:
        """Configuration and state as host NumPy arrays, Python scalars and
        str (no None: before initialisation W is (0, 0) and d is (0,))."""
        self._finish_pending()
        st = self.state
        W = backend.to_host(st.W).copy() if st.W is not None else np.zeros((0, 0), np.float32)
        d = st.d.copy() if st.d is not None else np.zeros(0)
        return {"rank_requested": self.rank_requested, "update_period": self.update_period,
                "num_samples_history": self.num_samples_history, "alpha": self.alpha,
                "schedule": self.schedule.name,
                "num_minibatches_history": self.num_minibatches_history,
                "W": W, "d": d, "rho": float(st.rho), "t": int(st.t), "skipped": int(st.skipped),
                "dim": int(st.dim), "rank": int(st.rank), "kappa": float(st.kappa)}

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned (HDF5 round trips are fine:
        bytes for str, 0-d arrays for scalars).  The configuration must equal
        this object's (ValueError naming the field otherwise).  W moves to the
        device of the next call's input."""
        config = {"rank_requested": self.rank_requested, "update_period": self.update_period,
                  "num_samples_history": self.num_samples_history, "alpha": self.alpha,
                  "schedule": self.schedule.name,
                  "num_minibatches_history": self.num_minibatches_history}
        for key in (*config, "W", "d", "rho", "t", "skipped", "dim", "rank", "kappa"):
            if key not in state:
                raise ValueError(f"state dict lacks the field {key!r}")
        for key, expected in config.items():
            value = state[key]
            value = value.decode() if isinstance(value, bytes) else value
            value = value.item() if isinstance(value, np.ndarray) and value.ndim == 0 else value
            if value != expected:
                raise ValueError(f"state dict field {key!r} is {value!r}, but this "
                                 f"preconditioner has {expected!r}")
        rank, dim = int(state["rank"]), int(state["dim"])
        W, d = np.asarray(state["W"]), np.asarray(state["d"], dtype=np.float64)
        counters = dict(t=int(state["t"]), skipped=int(state["skipped"]))
        self.reset()
        if rank == 0:
            self.state = OnlineNGState(**counters)
            return
        if not (1 <= rank < dim):
            raise ValueError(f"state dict field 'rank' must be in [1, dim - 1], got {rank} (dim {dim})")
        if W.shape != (rank, dim) or W.dtype not in (np.float32, np.float64):
            raise ValueError(f"state dict field 'W' must be a float32/float64 array of shape "
                             f"({rank}, {dim}), got {W.dtype} {W.shape}")
        if d.shape != (rank,):
            raise ValueError(f"state dict field 'd' must have shape ({rank},), got {d.shape}")
        self.state = OnlineNGState(W=W.copy(), d=d.copy(), rho=float(state["rho"]), dim=dim,
                                   rank=rank, kappa=float(state["kappa"]), **counters)

    # ---------------------------------------------------------------- one call
    def _apply(self, X, out, row_norms, factored, updating):
        """(O2), (O3) with the current state, all on X's device; on updating
        calls also J, K, L and the values the host needs (the pending update)."""
        xp = backend.array_module(X)
        st, work = self.state, self.work
        N, D = X.shape
        R, W = st.rank, st.W
        f64 = np.float64
        H = xp.matmul(X, self._derived_array("transposed", W), out=work.array("H", (N, R), X.dtype, xp))
        # J and tr(XXᵀ) before X̂ is written (out may be X)
        J = xp.matmul(H.T, X, out=work.array("J", (R, D), X.dtype, xp)) if updating else None
        if factored and st.kappa <= KAPPA_LIMIT:      # (O11): X̂ not formed
            x_sq = backend.row_dots(X, X).astype(f64)
            tr_X = x_sq.sum()
            # hᵀ(O − 2I)h: the diagonal part, which cancels against ||x||², in
            # float64; the off-diagonal part (O's roundoff drift from diag(e), |O_ij| << 1)
            # in X's dtype: an N·r² GEMM in float32 instead of float64.
            rows = xp.matmul(xp.square(H.astype(f64)), self._derived_array("gram_diagonal", W))
            rows += backend.row_dots(xp.matmul(H, self._derived_array("gram_off_diagonal", W)), H)
            rows += x_sq
            xp.maximum(rows, 0.0, out=rows)           # roundoff must not make a norm negative
            tr_X_hat = rows.sum()
            X_hat = LowRankResidual(X, H, W)
        else:
            tr_X = _squared_norm(X)
            if out is None:     # a factored request formed after all: X̂ in the workspace
                out = work.array("X_hat", X.shape, X.dtype, xp) if factored else xp.empty_like(X)
            # X̂ = X − H W: in place one GEMM accumulating into X (backend.gemm); else
            # H W straight into out, unless out overlaps X.
            if out is X:
                X_hat = backend.gemm(-1.0, H, W, 1.0, X,
                                     work=lambda: work.array("HW", X.shape, X.dtype, xp))
            else:
                HW = work.array("HW", X.shape, X.dtype, xp) if xp.may_share_memory(X, out) else out
                xp.matmul(H, W, out=HW)
                X_hat = xp.subtract(X, HW, out=out)
            if row_norms:
                rows = backend.row_dots(X_hat, X_hat)
                tr_X_hat = rows.sum()
            else:
                rows, tr_X_hat = None, _squared_norm(X_hat)
        gamma = _gamma(self.schedule, tr_X, tr_X_hat, xp)
        pending = None
        if updating:        # K and L stay in the workspace until the update is finished
            if N <= D:
                L = xp.matmul(H.T, H, out=work.array("L", (R, R), X.dtype, xp))
            else:
                L = xp.matmul(W, J.T, out=work.array("L", (R, R), X.dtype, xp))
            K = xp.matmul(J, J.T, out=work.array("K", (R, R), X.dtype, xp))
            pending = _Pending(values=(tr_X, tr_X_hat, K, L), J=J, W=W, N=N, seed=st.t)
        return X_hat, gamma, (rows if row_norms else None), pending

    def _identity(self, X, out, row_norms, factored, xp):
        """D == 1: the rescaled output equals the input."""
        if factored:
            X_hat = X
        else:
            X_hat = xp.empty_like(X) if out is None else out
            if X_hat is not X:
                X_hat[...] = X
        gamma = np.float64(1.0)
        return (X_hat, gamma, X[:, 0] * X[:, 0]) if row_norms else (X_hat, gamma)

    # ---------------------------------------------------------------- Fisher update
    def _finish_pending(self) -> None:
        """Finish a pending update alone (its own transfers)."""
        if self._pending is not None:
            check = self._finish(_to_host_together(list(self._pending.values)))
            if check is not None:
                self._check_orthonormal(check, backend.to_host(check.gram))

    def _finish(self, host_values) -> "_Check | None":
        """Host half of an updating call, (O5)-(O9): the new W, d, ρ, κ.  Returns
        the (O10) check still to do (its W'W'ᵀ is queued on the device), or None."""
        pending, self._pending = self._pending, None
        st = self.state
        tr_X, tr_X_hat, K, L = host_values
        tr_X, tr_X_hat = float(tr_X), float(tr_X_hat)
        if not (math.isfinite(tr_X) and math.isfinite(tr_X_hat)):
            raise FloatingPointError("online NG: non-finite input (training diverged?)")
        A, w, d_new, rho_new, check_orthonormal = self._fisher_update(
            K.astype(np.float64), L.astype(np.float64), tr_X, pending.N, st.dim)
        # W' = A B with B = J + diag(w) W (O7), (O9); B formed in J's buffer.
        W, J = pending.W, pending.J
        xp = backend.array_module(W)
        wW = xp.multiply(W, backend.to_device(w, dtype=W.dtype, like=W),
                         out=self.work.array("wW", W.shape, W.dtype, xp))
        B = xp.add(J, wW, out=J)
        W_new = xp.matmul(backend.to_device(A, dtype=W.dtype, like=W), B)
        kappa = tr_X / tr_X_hat if tr_X_hat > 0 else math.inf
        self.state = st._replace(W=W_new, d=d_new, rho=rho_new, kappa=kappa)
        if not check_orthonormal:
            return None
        # The (O10) check needs the actual W'W'ᵀ (float32 roundoff in J and in
        # A B, amplified by an ill-conditioned A, is what it detects); it is
        # also the gram (O11) of W', kept for later calls if W' stays.
        gram = self._derived_array("gram", W_new)
        return _Check(W=W_new, e=1.0 / self._e_terms(d_new, rho_new, st.dim)[0],
                      seed=pending.seed, gram=gram)

    def _check_orthonormal(self, check: "_Check", host_gram) -> None:
        """Second host half (O10), given the host copy of W'W'ᵀ."""
        W = self._reorthonormalize(check.W, check.e, check.seed, np.asarray(host_gram, np.float64))
        if W is not check.W:
            self.state = self.state._replace(W=W)

    def _initialize(self, X0) -> None:
        """InitDefault + k updating passes over the first minibatch (O12)."""
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
        self.state = OnlineNGState(W=backend.to_device(sqrt_e0 * Rmat0, dtype=X0.dtype, like=X0),
                                   d=np.full(R, EPSILON), rho=EPSILON, dim=D, rank=R)
        scratch = xp.empty_like(X0)              # once per reset: not kept in the workspace
        for _ in range(self.schedule.initial_passes(N, R)):
            self._pending = self._apply(X0, scratch, False, False, updating=True)[3]
            self._finish_pending()

    def _derived_array(self, name: str, W):
        """An array computed once per W (W is replaced, never modified):
        "transposed" = Wᵀ contiguous (X Wᵀ then runs as a GEMM without operand
        transposition, up to 1.5x faster for small N·D·r on OpenBLAS);
        "gram" = O = W Wᵀ in float64; for (O11) "gram_diagonal" = diag(O) − 2
        (float64) and "gram_off_diagonal" = O − diag(O) in W's dtype."""
        if self._derived[0] is not W:
            self._derived = (W, {})
        arrays = self._derived[1]
        value = arrays.get(name)
        if value is None:
            xp = backend.array_module(W)
            if name == "transposed":
                value = xp.ascontiguousarray(W.T)
            elif name == "gram":
                value = xp.matmul(W, W.T).astype(np.float64)
            elif name == "gram_diagonal":
                value = self._derived_array("gram", W).diagonal() - 2.0
            else:
                value = self._derived_array("gram", W).astype(W.dtype)
                value.ravel()[::value.shape[0] + 1] = 0.0    # the diagonal (a view)
            arrays[name] = value
        return value

    def _eta(self, N: int) -> float:
        """(O4)."""
        if self.num_minibatches_history > 0.0:
            return 1.0 / self.num_minibatches_history
        return min(MAX_ETA, 1.0 - math.exp(-N / self.num_samples_history))

    def _e_terms(self, d, rho, D):
        """(1/e, 1/√e, Σd) for the coefficients (d, ρ), 1/e_i = β/d_i + 1 (O1);
        cached for the last d (d is replaced, never modified)."""
        cached_d, cached_rho, terms = self._e_cache
        if cached_d is d and cached_rho == rho:
            return terms
        sum_d = float(d.sum())
        beta = rho * (1.0 + self.alpha) + self.alpha * sum_d / D
        inv_e = beta / d
        inv_e += 1.0
        terms = (inv_e, np.sqrt(inv_e), sum_d)
        self._e_cache = (d, rho, terms)
        return terms

    def _fisher_update(self, K, L, tr_X, N, D):
        """Host float64 part of the update, (O5)-(O9), given K and L (float64).
        Returns the r x r matrix A and the r x 1 column w of
        W' = A (J + diag(w) W), the new d and rho, and whether orthonormality
        must be checked (O10)."""
        st = self.state
        d, rho = st.d, st.rho
        inv_e, inv_sqrt_e, sum_d = self._e_terms(d, rho, D)
        eta = self._eta(N)
        a, b = eta / N, 1.0 - eta
        q = d + rho
        # (O8), with S = E^-½, Q = diag(q) (diagonal matrices commute); symmetrised,
        # as K and L are up to roundoff: with M = (a²/2) K + ab L Q,
        # M + Mᵀ = a² (K + Kᵀ)/2 + ab (L Q + Q Lᵀ).
        M = L * ((a * b) * q)
        M += (0.5 * a * a) * K
        Z = M + M.T
        Z *= inv_sqrt_e[:, None] * inv_sqrt_e
        q_b = b * q
        Z.ravel()[::len(q) + 1] += q_b * q_b         # the diagonal (a view)
        c, U = np.linalg.eigh(Z)                     # (O5)
        c, U = c[::-1], U[:, ::-1]                   # descending, as Kaldi's SortSvd
        c_max, c_min = float(c[0]), float(c[-1])
        check_orthonormal = c_max > CONDITION_THRESHOLD * c_min
        c_floor = (rho * b) ** 2
        if c_min < c_floor:
            check_orthonormal = True
            c = np.maximum(c, c_floor)
        sqrt_c = np.sqrt(c)
        rho_new = (a * tr_X + b * (D * rho + sum_d) - float(sqrt_c.sum())) / (D - len(q))  # (O6)
        d_new = sqrt_c - rho_new                     # uses rho' before flooring, as Kaldi
        floor = max(EPSILON, DELTA * math.sqrt(max(c_max, c_floor)))
        rho_new = max(rho_new, floor)
        d_new = np.maximum(d_new, floor, out=d_new)
        w = q[:, None]                               # (O7): w = (b/a) q, a column
        w *= b / a
        A = U.T * inv_sqrt_e                         # (O9): A = a diag(√e'/√c) Uᵀ E^-½
        A *= (a / (sqrt_c * self._e_terms(d_new, float(rho_new), D)[1]))[:, None]
        return A, w, d_new, float(rho_new), check_orthonormal

    def _reorthonormalize(self, W_new, e_new, seed: int, gram_new):
        """(O10): make the rows of R' = E'^-½ W' orthonormal again if they
        drifted by more than 1e-3: Cholesky, else Gram-Schmidt (which reads
        W' on the host).  ``gram_new`` = W' W'ᵀ (host float64)."""
        xp = backend.array_module(W_new)
        R = W_new.shape[0]
        sqrt_e, inv_sqrt_e = np.sqrt(e_new), 1.0 / np.sqrt(e_new)
        O = inv_sqrt_e[:, None] * gram_new * inv_sqrt_e[None, :]    # = R' R'ᵀ
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
            return xp.matmul(backend.to_device(M, dtype=W_new.dtype, like=W_new), W_new)
        Rmat = _orthonormalize_rows(backend.to_host(W_new).astype(np.float64),
                                    np.random.default_rng(seed))
        return backend.to_device(sqrt_e[:, None] * Rmat, dtype=W_new.dtype, like=W_new)

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


def _gamma(schedule, tr_X, tr_X_hat, xp):
    """γ = sqrt(tr XXᵀ / tr X̂X̂ᵀ) (O2), 1 where the schedule says: device
    arithmetic on a device, Python's on host scalars (the same IEEE operations,
    a tenth of the call overhead)."""
    if xp is np:
        tr_X, tr_X_hat = float(tr_X), float(tr_X_hat)
        if schedule.gamma_is_one(tr_X, tr_X_hat):
            return np.float64(1.0)
        return np.float64(math.sqrt(tr_X / (tr_X_hat if tr_X_hat > 0 else 1.0)))
    tr_X = tr_X.astype(np.float64)
    tr_X_hat = tr_X_hat.astype(np.float64)
    ratio = tr_X / xp.where(tr_X_hat > 0, tr_X_hat, 1.0)
    return xp.where(schedule.gamma_is_one(tr_X, tr_X_hat), 1.0, xp.sqrt(ratio))[()]


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
