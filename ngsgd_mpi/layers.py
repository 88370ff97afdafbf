"""Network components with forward and backward passes (Kaldi nnet2 conventions).

Conventions (Kaldi nnet2's, as its components use them):

* A minibatch has one sample per row: ``X`` is ``N x D``.
* Training *maximises* the log-likelihood, so backward passes carry
  ``d objective / d output`` ("out_deriv") down to ``d objective / d input``
  ("in_deriv"), and gradients are summed (not averaged) over the minibatch.
* Arrays may be NumPy or CuPy; each function asks ``backend.array_module`` for
  the module owning its input.  The dtype follows the input (float32 in
  training, float64 in gradient-check tests).

Caching and in-place work (this is the hot path).  ``forward(X, train=True)``
keeps only what ``backward`` needs, usually as references to arrays that
exist anyway.  ``train=False`` leaves the cache alone, so an evaluation pass
between ``backward`` and the parameter update does not disturb it.  A
backward pass *consumes* its cache and may overwrite its ``out_deriv`` (or
the cached forward input) to build ``in_deriv`` without a new allocation;
each class says which.  In a network every such array is a private
intermediate, so this is safe; tests pass copies.

Buffers (also for speed): in training mode (``train=True``) a layer writes
its output, and Affine its input derivative, into arrays of its
:class:`~ngsgd_mpi.workspace.Workspace` (``layer.work``) and reuses them on its
next training pass, so a training step allocates no large arrays (fresh large
allocations cost page faults: ~6 % of a paper-size step).  A training-mode
result is therefore valid until the layer's next training forward;
``train=False`` always returns new arrays.

Device arrays: nothing here reads device data on the host, and only CuPy's
subset of the NumPy API is used (e.g. no ``einsum(out=...)``); the
stand-in tests (tests/test_backend.py) run every layer on a device stand-in.

:func:`matmul_add` (``C += alpha A B``) serves the updaters: on the host one
GEMM with beta = 1 in NumPy's own OpenBLAS (``backend.gemm``), no product
buffer.  (SciPy's BLAS could do the same but is a second OpenBLAS with its
own thread pool, and two pools busy-waiting against each other made 2-thread
GEMMs ~4x slower.)

Components:

* :class:`Affine`         ``Y = X A^T + b``; ``A``, ``b`` are views into the
  network's flat parameter buffer.  Backward caches ``(X, G)`` for the
  updater (optim.py, (U1)-(U4)) and returns ``G A`` with the pre-update parameters.
* :class:`FixedAffine`    ``Y = X M^T + m0``: non-trained input transform
  (feature mean/variance normalisation, LDA-like transforms).
* :class:`FixedScale`     ``Y = X diag(s)``: non-trained per-output scale (the
  recipes' pre-softmax prior scaling).
* :class:`Pnorm`          groups of ``G`` contiguous inputs,
  ``y_j = (sum_{k in j} |x_k|^p)^{1/p}`` (p = 1, 2, inf, or any p >= 1).
  ``dx_k = dy_j sign(x_k) |x_k|^{p-1} y_j^{1-p}``, and 0 when ``y_j == 0``;
  p = 1 gives ``dy_j sign(x_k)``; p = inf gives ``dy_j sign(x_k)`` where
  ``|x_k| == y_j`` (every tied maximum, as Kaldi).
* :class:`Normalize`      per row ``f = max(2^-66, x.x / D)^{-1/2}``,
  ``y = f x`` (target rms 1).  ``dx = f dy - (f^3 / D)(dy.x) x``; Kaldi drops
  the second term on rows where the floor is active (``dx = 2^33 dy``).
* :class:`Relu`           ``y = max(x, 0)``, ``dx = dy [y > 0]``.
* :class:`Softmax`        row softmax floored at 1e-20 (Kaldi's
  SoftmaxComponent); general backward ``dx = p dy - p (p.dy)``.
* :class:`SoftmaxCrossEntropy`  the network's output: log-softmax (computed
  stably, floored at log 1e-20 like Kaldi's floored probabilities) and the
  frame cross-entropy derivative.  Kaldi's objective derivative at the
  softmax output is ``1 / p(label)`` at the label, which the softmax backward
  above turns into ``onehot - p``; that is what :meth:`backward` returns.
"""

from __future__ import annotations

import math

from ngsgd_mpi import backend
from ngsgd_mpi.workspace import Workspace

# Kaldi's floor on the mean square of a row in NormalizePerRow (2^-66), so the
# largest scale Normalize applies is 2^33.
NORMALIZE_SQUARED_NORM_FLOOR = 2.0 ** -66
# Kaldi floors softmax outputs at 1e-20 (SoftmaxComponent::Propagate).
SOFTMAX_FLOOR = 1e-20
LOG_SOFTMAX_FLOOR = math.log(SOFTMAX_FLOOR)


def matmul_add(C, A, B, alpha: float = 1.0, work=None):
    """``C += alpha * (A @ B)`` in place for 2-D arrays; returns C.  One BLAS
    call accumulating into C on the host (``backend.gemm``); elsewhere the
    product goes into ``work`` (an array of C's shape and dtype the caller
    reuses, so no large temporary is allocated, or a function returning one)
    or a new array."""
    return backend.gemm(alpha, A, B, 1.0, C, work=work)


def _check_matrix(X, dim: int, what: str) -> None:
    if X.ndim != 2 or X.shape[1] != dim:
        raise ValueError(f"{what}: expected an N x {dim} matrix, got shape {tuple(X.shape)}")


def _consumed(cache, layer: str):
    if cache is None:
        raise ValueError(f"{layer}.backward: no cached forward pass "
                         "(call forward(X, train=True) first; backward consumes the cache)")
    return cache


class Affine:
    """Trainable affine layer ``Y = X A^T + b``.

    ``linear`` (D_out x D_in) and ``bias`` (D_out,) are views into the flat
    parameter buffer owned by the network; updaters modify them in place.

    State for the updater after ``backward``: ``input`` (X of the last
    training forward) and ``out_deriv`` (G = d objective / d Y).
    Buffers: the training output Y and the input derivative G A.
    """

    def __init__(self, linear, bias):
        if linear.ndim != 2 or bias.shape != (linear.shape[0],):
            raise ValueError(f"Affine: linear must be D_out x D_in and bias (D_out,), got "
                             f"{tuple(linear.shape)} and {tuple(bias.shape)}")
        self.linear = linear
        self.bias = bias
        self.input = None
        self.out_deriv = None
        self.work = Workspace()

    @property
    def input_dim(self) -> int:
        return self.linear.shape[1]

    @property
    def output_dim(self) -> int:
        return self.linear.shape[0]

    def forward(self, X, train: bool = True):
        _check_matrix(X, self.input_dim, "Affine.forward input")
        xp = backend.array_module(X)
        shape, dtype = (X.shape[0], self.output_dim), xp.result_type(X.dtype, self.linear.dtype)
        Y = self.work.array("output", shape, dtype, xp) if train else xp.empty(shape, dtype)
        Y = xp.matmul(X, self.linear.T, out=Y)
        Y += self.bias
        if train:
            self.input = X                # a reference: it is not modified afterwards
        return Y

    def backward(self, out_deriv, need_input_deriv: bool = True):
        """Keep ``out_deriv`` for the updater; return ``G A`` (or None, for the
        first layer, whose input derivative nobody needs)."""
        _consumed(self.input, "Affine")
        self.out_deriv = out_deriv
        if not need_input_deriv:
            return None
        xp = backend.array_module(out_deriv)
        shape = (out_deriv.shape[0], self.input_dim)
        dtype = xp.result_type(out_deriv.dtype, self.linear.dtype)
        return xp.matmul(out_deriv, self.linear, out=self.work.array("in_deriv", shape, dtype, xp))


class FixedAffine:
    """Non-trained input transform ``Y = X M^T + m0`` (``M``: D_out x D_in)."""

    def __init__(self, matrix, bias):
        if matrix.ndim != 2 or bias.shape != (matrix.shape[0],):
            raise ValueError(f"FixedAffine: matrix must be D_out x D_in and bias (D_out,), got "
                             f"{tuple(matrix.shape)} and {tuple(bias.shape)}")
        self.matrix = matrix
        self.bias = bias

    @classmethod
    def from_mean_std(cls, mean, std):
        """Per-dimension normalisation ``y = (x - mean) / std``."""
        xp = backend.array_module(mean)
        if mean.ndim != 1 or std.shape != mean.shape:
            raise ValueError(f"FixedAffine.from_mean_std: mean and std must be vectors of one "
                             f"length, got {tuple(mean.shape)} and {tuple(std.shape)}")
        if not backend.to_host(xp.all(std > 0)):           # set-up: one explicit transfer
            raise ValueError("FixedAffine.from_mean_std: std must be > 0 in every dimension")
        inv_std = 1.0 / std
        return cls(xp.diag(inv_std), -mean * inv_std)

    @property
    def input_dim(self) -> int:
        return self.matrix.shape[1]

    @property
    def output_dim(self) -> int:
        return self.matrix.shape[0]

    def forward(self, X, train: bool = True):
        _check_matrix(X, self.input_dim, "FixedAffine.forward input")
        Y = X @ self.matrix.T
        Y += self.bias
        return Y


class FixedScale:
    """Non-trained per-dimension scale ``Y = X diag(s)`` (Kaldi FixedScaleComponent; the
    recipes put one before the softmax with ``s ~ prior^-0.25``).  No cache: backward
    scales ``out_deriv`` in place and returns it."""

    def __init__(self, scales):
        if scales.ndim != 1:
            raise ValueError(f"FixedScale: scales must be a vector, got shape {tuple(scales.shape)}")
        self.scales = scales

    @property
    def dim(self) -> int:
        return self.scales.shape[0]

    def forward(self, X, train: bool = True):
        _check_matrix(X, self.dim, "FixedScale.forward input")
        xp = backend.array_module(X)
        return xp.multiply(X, self.scales, out=X if train else None)   # X: the affine output, private

    def backward(self, out_deriv):
        out_deriv *= self.scales
        return out_deriv


class Pnorm:
    """Group p-norm: input ``output_dim * group_size`` -> output ``output_dim``.

    Cache: the input X (the preceding affine layer's output, which nothing
    else uses) and the output Y.  Backward builds ``in_deriv`` in X's memory.
    Buffer: the training output Y.
    """

    def __init__(self, input_dim: int, output_dim: int, p: float = 2.0):
        if output_dim < 1 or input_dim % output_dim != 0:
            raise ValueError(f"Pnorm: input_dim ({input_dim}) must be a positive multiple of "
                             f"output_dim ({output_dim})")
        if not p >= 1:
            raise ValueError(f"Pnorm: p must be >= 1 (or inf), got {p}")
        self.input_dim, self.output_dim = input_dim, output_dim
        self.group_size = input_dim // output_dim
        self.p = float(p)
        self._x = self._y = None
        self.work = Workspace()

    def _groups(self, X):
        return X.reshape(X.shape[0], self.output_dim, self.group_size)

    def forward(self, X, train: bool = True):
        _check_matrix(X, self.input_dim, "Pnorm.forward input")
        xp = backend.array_module(X)
        X = xp.ascontiguousarray(X)       # so that the grouped reshape is a view (no-op here)
        x = self._groups(X)
        if self.p == 2.0:
            shape, dtype = (X.shape[0], self.output_dim), X.dtype
            Y = self.work.array("output", shape, dtype, xp) if train else None
            Y = xp.sqrt(xp.einsum("nmg,nmg->nm", x, x), out=Y)
        elif self.p == 1.0:
            Y = xp.abs(x).sum(axis=2)
        elif self.p == math.inf:
            Y = xp.abs(x).max(axis=2)
        else:
            Y = (xp.abs(x) ** self.p).sum(axis=2) ** (1.0 / self.p)
        if train:
            self._x, self._y = X, Y
        return Y

    def backward(self, out_deriv):
        """Return ``in_deriv``, written over the cached input X."""
        X = _consumed(self._x, "Pnorm")
        Y = self._y
        self._x = self._y = None
        xp = backend.array_module(X)
        x = self._groups(X)
        if self.p == 1.0:
            xp.sign(x, out=x)                 # sign(0) = 0, as Kaldi
            x *= out_deriv[:, :, None]
            return X
        if self.p == math.inf:
            # dy * sign(x) where |x| is the group maximum; y == 0 implies x == 0, sign 0.
            at_max = xp.abs(x) == Y[:, :, None]
            xp.sign(x, out=x)
            x *= at_max
            x *= out_deriv[:, :, None]
            return X
        # y == 0 only when the whole group is zero; any finite factor then gives 0,
        # so dividing by 1 there implements Kaldi's "0 if y == 0".
        safe_y = Y + (Y == 0)
        if self.p == 2.0:
            x *= (out_deriv / safe_y)[:, :, None]          # dx = dy x / y
            return X
        sign = xp.sign(x)
        xp.abs(x, out=x)
        x **= self.p - 1.0
        x *= (out_deriv * safe_y ** (1.0 - self.p))[:, :, None]
        x *= sign
        return X


class Normalize:
    """Per-row rescale to rms 1 (Kaldi NormalizeComponent, target rms 1).

    Cache: the input X (a reference; the p-norm output, kept by Pnorm anyway)
    and the per-row scale f.  Backward overwrites ``out_deriv``.  Buffer: the
    training output.
    """

    def __init__(self, dim: int):
        self.dim = dim
        self._x = self._scale = None
        self.work = Workspace()

    def forward(self, X, train: bool = True):
        _check_matrix(X, self.dim, "Normalize.forward input")
        xp = backend.array_module(X)
        mean_square = xp.einsum("nd,nd->n", X, X)
        mean_square *= 1.0 / self.dim
        xp.maximum(mean_square, NORMALIZE_SQUARED_NORM_FLOOR, out=mean_square)
        scale = mean_square ** -0.5
        out = self.work.array("output", X.shape, X.dtype, xp) if train else None
        Y = xp.multiply(X, scale[:, None], out=out)
        if train:
            self._x, self._scale = X, scale
        return Y

    def backward(self, out_deriv):
        """Return ``in_deriv``, written over ``out_deriv``."""
        X = _consumed(self._x, "Normalize")
        f = self._scale
        self._x = self._scale = None
        xp = backend.array_module(X)
        # Coefficient of x in dx: (f^3 / D)(dy.x), zero on rows where the floor
        # made f = 2^33 (Kaldi replaces those f by 0 before cubing).
        coef = xp.einsum("nd,nd->n", out_deriv, X)
        f_cubed = f ** 3
        f_cubed *= f != NORMALIZE_SQUARED_NORM_FLOOR ** -0.5
        coef *= f_cubed
        coef *= 1.0 / self.dim
        out_deriv *= f[:, None]
        out_deriv -= X * coef[:, None]
        return out_deriv


class Relu:
    """Rectifier.  Forward works in place on its input (the preceding affine
    output, which nothing else needs); the output is the cache.  Backward
    overwrites ``out_deriv``."""

    def __init__(self, dim: int):
        self.dim = dim
        self._y = None

    def forward(self, X, train: bool = True):
        _check_matrix(X, self.dim, "Relu.forward input")
        xp = backend.array_module(X)
        Y = xp.maximum(X, 0, out=X)
        if train:
            self._y = Y
        return Y

    def backward(self, out_deriv):
        Y = _consumed(self._y, "Relu")
        self._y = None
        out_deriv *= Y > 0
        return out_deriv


def _shifted_exp(X, shifted=None, exps=None):
    """``(X - rowmax, exp(X - rowmax), row sums of the exp)``: the stable softmax
    parts, written into ``shifted`` and ``exps`` when given (else new arrays)."""
    xp = backend.array_module(X)
    shifted = xp.subtract(X, X.max(axis=1, keepdims=True), out=shifted)
    exps = xp.exp(shifted, out=exps)
    return shifted, exps, exps.sum(axis=1, keepdims=True)


class Softmax:
    """Row softmax with Kaldi's 1e-20 floor; general backward.

    Cache: the output P.  Backward overwrites ``out_deriv``.
    """

    def __init__(self, dim: int):
        self.dim = dim
        self._p = None

    def forward(self, X, train: bool = True):
        _check_matrix(X, self.dim, "Softmax.forward input")
        xp = backend.array_module(X)
        _, P, sums = _shifted_exp(X)
        P *= 1.0 / sums
        xp.maximum(P, SOFTMAX_FLOOR, out=P)
        if train:
            self._p = P
        return P

    def backward(self, out_deriv):
        """``dx = p * dy - (p.dy) p`` per row (Kaldi's order of operations)."""
        P = _consumed(self._p, "Softmax")
        self._p = None
        xp = backend.array_module(P)
        p_dot_dy = xp.einsum("nc,nc->n", P, out_deriv)
        out_deriv *= P
        out_deriv -= p_dot_dy[:, None] * P
        return out_deriv


class SoftmaxCrossEntropy:
    """Output layer: floored log-softmax and the frame cross-entropy derivative.

    Objective per frame: ``log p(label)`` with ``p`` floored at 1e-20 (Kaldi).
    Cache: the (floored) posteriors P.  Backward returns ``onehot - P``,
    written over P.  Buffers: the training output log p and P.
    """

    def __init__(self, dim: int):
        self.dim = dim
        self._p = None
        self.work = Workspace()

    def forward(self, X, train: bool = True):
        """Return ``log p`` (N x C), computed as ``x - max - log(sum exp)``."""
        _check_matrix(X, self.dim, "SoftmaxCrossEntropy.forward input")
        xp = backend.array_module(X)
        if train:
            log_probs, exps, sums = _shifted_exp(X, self.work.array("log_probs", X.shape, X.dtype, xp),
                                                 self.work.array("probs", X.shape, X.dtype, xp))
        else:
            log_probs, exps, sums = _shifted_exp(X)
        log_probs -= xp.log(sums)
        xp.maximum(log_probs, LOG_SOFTMAX_FLOOR, out=log_probs)
        if train:
            exps *= 1.0 / sums
            self._p = xp.maximum(exps, SOFTMAX_FLOOR, out=exps)
        return log_probs

    def backward(self, labels):
        """``d sum_n log p_n(label_n) / d logits = onehot(labels) - p``."""
        P = _consumed(self._p, "SoftmaxCrossEntropy")
        self._p = None
        xp = backend.array_module(P)
        if labels.shape != (P.shape[0],):
            raise ValueError(f"labels: expected shape ({P.shape[0]},), got {tuple(labels.shape)}")
        P *= -1.0
        P[xp.arange(P.shape[0]), labels] += 1.0
        return P
