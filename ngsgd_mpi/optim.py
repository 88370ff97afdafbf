"""Updaters: apply one minibatch's (preconditioned) gradient to ``network.params``.

Each affine layer ``Y = X A^T + b`` hands the updater its input X (N x D_in)
and output derivative G (N x D_out), left there by ``Network.backward``
(pre-update parameters).  The bias is the weight of a constant input 1, so
with ``Xe = [X, 1]`` the summed gradient of ``[A, b]`` is ``G^T Xe``.
nnet2 maximises the objective, so every update is ``param += lr * direction``.

* ``sgd`` (Kaldi AffineComponent, spec §4.3)::

      b += lr * sum_n G_n ;   A += lr * G^T X

* ``ng-online`` (AffineComponentPreconditionedOnline, spec §4.1): the Fisher
  matrix of ``[A, b]`` is approximated by a Kronecker product of an input-side
  factor (over rows of Xe) and an output-side factor (over rows of G), each
  tracked by an :class:`OnlineNaturalGradient`.  Per minibatch::

      Xhat, gamma_in,  rin  = P_in.precondition(Xe)     # rank rank_in, dim D_in + 1
      Ghat, gamma_out, rout = P_out.precondition(G)     # rank rank_out, dim D_out
      s      = gamma_in * gamma_out                     # restores the Frobenius norms
      total  = s * lr * sum_n sqrt(rin_n * rout_n)      # bound on the change norm
      mscale = min(1, max_change_per_sample * N / total)
      [A, b] += (s * mscale * lr) * Ghat^T Xhat

  ``rin``, ``rout`` are the squared row norms of the unscaled Xhat, Ghat, so
  ``s * sqrt(rin_n rout_n)`` is the norm of sample n's rank-one change.

* ``ng-simple`` (AffineComponentPreconditioned, spec §4.2): each row of Xe
  and of G is multiplied by the inverse of a Fisher factor estimated from
  the *other* rows of the same minibatch (:func:`precondition_simple`,
  Frobenius norm preserved), and the whole minibatch's change is limited::

      total  = lr * sum_n ||Xp_n|| ||Gp_n||
      mscale = min(1, max_change / total)
      [A, b] += (mscale * lr) * Gp^T Xp

``step`` consumes the gradients cached by ``network.backward``: G is
preconditioned in place and the cache is released, so a second ``step``
without a new backward pass raises an error instead of repeating an update.

State (``state_dict``): only the online preconditioners have any (their
``W``, ``d``, ``rho`` and counters, per layer and side, under keys
``layer{i}/in/...`` and ``layer{i}/out/...``).  Kaldi does not save it with
the model and re-initialises it whenever a job starts from a freshly
averaged model; :meth:`Updater.reset` does the same.
"""

from __future__ import annotations

import abc
import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from ngsgd_mpi import backend
from ngsgd_mpi.layers import matmul_add
from ngsgd_mpi.ng_online import OnlineNaturalGradient
from ngsgd_mpi.ng_simple import precondition_simple
from ngsgd_mpi.records import record_from_dict

OPTIMIZER_NAMES = ("sgd", "ng-online", "ng-simple")
# ng-online: factor the output side only below this fraction of the materialised
# form's multiply-adds (its extra D_out x D_in pass; measured: 512 x 3000 layers
# gain, 128 x (101 -> 1000) at 0.89 loses 2 %).
FACTORED_MARGIN = 0.85


@dataclass
class OptimizerConfig:
    name: str = "ng-online"             # "sgd" | "ng-online" | "ng-simple"
    # online NG (spec §2, §4.1; recipe defaults)
    rank_in: int = 20                   # rank of the input-side Fisher factor (clamped to dim - 1)
    rank_out: int = 80                  # rank of the output-side Fisher factor
    update_period: int = 4              # re-estimate the factors every this many minibatches
    num_samples_history: float = 2000.0  # forgetting time constant, in samples
    alpha: float = 4.0                  # smoothing of the factors towards the identity
    max_change_per_sample: float = 0.075  # change-norm limit per sample; 0 = off
    schedule: str = "nnet2"             # Fisher-update schedule: "nnet2" (paper) or "nnet3"
    # simple NG (spec §3, §4.2; train_pnorm.sh defaults)
    simple_alpha: float = 4.0           # smoothing towards the identity
    max_change: float = 10.0            # change-norm limit per minibatch; 0 = off
    # every updater (nnet3's max-param-change): limit on ||change of all parameters|| per minibatch
    max_param_change: float = 0.0       # 0 = off

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "OptimizerConfig":
        return record_from_dict(cls, d)

    def validate(self) -> None:
        def need(cond, name, what):
            if not cond:
                raise ValueError(f"OptimizerConfig.{name}: must be {what}, "
                                 f"got {getattr(self, name)!r}")

        need(self.name in OPTIMIZER_NAMES, "name", f"one of {OPTIMIZER_NAMES}")
        for name in ("rank_in", "rank_out", "update_period"):
            need(isinstance(getattr(self, name), (int, np.integer)) and getattr(self, name) >= 1,
                 name, "an integer >= 1")
        need(0 < self.num_samples_history < 1e6, "num_samples_history", "in (0, 1e6)")
        for name in ("alpha", "max_change_per_sample", "simple_alpha", "max_change", "max_param_change"):
            value = getattr(self, name)
            need(isinstance(value, (int, float)) and math.isfinite(value) and value >= 0,
                 name, "a finite number >= 0")
        need(self.simple_alpha > 0, "simple_alpha", "> 0 (it sets the smoothing lambda)")
        need(self.schedule in ("nnet2", "nnet3"), "schedule", "'nnet2' or 'nnet3'")


def make_updater(network, config: OptimizerConfig) -> "Updater":
    """The updater named by ``config.name`` for ``network.affine_layers``."""
    config.validate()
    kind = {"sgd": SgdUpdater, "ng-online": OnlineNgUpdater, "ng-simple": SimpleNgUpdater}
    return kind[config.name](network, config)


class Updater(abc.ABC):
    """Common interface.  ``step(lr)`` updates every affine layer from its
    cached (X, G) and releases them."""

    def __init__(self, network, config: OptimizerConfig):
        self.network = network
        self.config = config
        self._params_before = None     # reused buffer for max_param_change (not state)

    def step(self, lr: float) -> None:
        limit = self.config.max_param_change
        if limit > 0:
            params = self.network.params
            if self._params_before is None:
                self._params_before = params.copy()
            else:
                self._params_before[...] = params
        for index, layer in enumerate(self.network.affine_layers):
            if layer.input is None or layer.out_deriv is None:
                raise ValueError(f"step: affine layer {index} has no cached gradient "
                                 "(run network.train_gradients before each step)")
            self._update_layer(index, layer, float(lr))
            layer.input = layer.out_deriv = None
        if limit > 0:
            self._limit_total_change(limit)

    def _limit_total_change(self, limit: float) -> None:
        """Scale this step's change of all parameters down to norm ``limit`` if it is larger
        (a safeguard on top of the per-layer limits; costs three passes over the parameters)."""
        params, minus_change = self.network.params, self._params_before
        minus_change -= params                         # old - new
        xp = backend.array_module(params)
        norm = float(xp.sqrt(xp.vdot(minus_change, minus_change)))
        if not math.isfinite(norm):
            raise FloatingPointError("non-finite parameter change (training diverged?)")
        if norm > limit:                               # new <- old + (limit / norm) * (new - old)
            minus_change *= minus_change.dtype.type(1.0 - limit / norm)
            params += minus_change

    @abc.abstractmethod
    def _update_layer(self, index: int, layer, lr: float) -> None:
        """Apply this minibatch's update to one affine layer (its X, G are cached on it)."""

    def state_dict(self) -> dict:
        return {"optimizer": self.config.name}

    def load_state_dict(self, state: dict) -> None:
        if state.get("optimizer") != self.config.name:
            raise ValueError(f"optimizer state: written by {state.get('optimizer')!r}, "
                             f"this updater is {self.config.name!r}")
        if len(state) != 1:
            raise ValueError(f"optimizer state: unexpected keys "
                             f"{sorted(k for k in state if k != 'optimizer')}")

    def reset(self) -> None:
        """Forget optimiser state (nothing for the stateless updaters)."""


def _with_ones_column(X, out=None):
    """``[X, 1]`` written into ``out`` (reused if it has the right shape)."""
    xp = backend.array_module(X)
    rows, dim = X.shape
    if out is None or out.shape != (rows, dim + 1) or out.dtype != X.dtype:
        out = xp.empty((rows, dim + 1), dtype=X.dtype)
    out[:, :dim] = X
    out[:, dim] = 1.0
    return out


def _add_outer(layer, direction_out, direction_in_ext) -> None:
    """``[A, b] += direction_out^T direction_in_ext`` (the last input column is the bias's)."""
    dim = layer.input_dim
    layer.linear += direction_out.T @ direction_in_ext[:, :dim]
    layer.bias += direction_out.T @ direction_in_ext[:, dim]


def _work(updater, name, shape, dtype, xp):
    """A reusable array of an updater (no fresh large allocation per step):
    views of one flat buffer per name, grown to the largest request."""
    size = math.prod(shape)
    flat = updater._buffers.get(name)
    if (flat is None or flat.size < size or flat.dtype != dtype
            or backend.array_module(flat) is not xp):
        flat = updater._buffers[name] = xp.empty(size, dtype=dtype)
    return flat[:size].reshape(shape)


class SgdUpdater(Updater):
    """Plain SGD on the summed gradient (Kaldi AffineComponent::Update).
    lr scales X (N x D_in), not the D_out x D_in product."""

    def __init__(self, network, config):
        super().__init__(network, config)
        self._buffers = {}

    def _update_layer(self, index, layer, lr):
        X, G = layer.input, layer.out_deriv
        xp = backend.array_module(X)
        layer.bias += lr * G.sum(axis=0)
        scaled = xp.multiply(X, lr, out=_work(self, "scaled", X.shape, X.dtype, xp))
        matmul_add(layer.linear, G.T, scaled,
                   work=_work(self, "product", layer.linear.shape, layer.linear.dtype, xp))


class OnlineNgUpdater(Updater):
    """Online natural gradient (the paper's method); see the module docstring.

    State per affine layer i: ``input_side[i]`` (Fisher factor of [X, 1],
    dim D_in + 1) and ``output_side[i]`` (Fisher factor of G, dim D_out).
    ``_extended[i]`` is a reusable buffer for [X, 1], not state.

    Per layer and minibatch (the module docstring's formulas, arranged for speed):

    * [X, 1] is written into a reused N x (D_in + 1) buffer; X̂'s first D_in
      columns are a strided view of it, which BLAS takes as is.
    * The output side is not materialised when that is clearly cheaper:
      Ĝᵀ X̂ = Gᵀ X̂ − W_gᵀ (H_gᵀ X̂) with H_g = G W_gᵀ costs r (D_in + 1)(D_out + N)
      multiply-adds against r N D_out for Ĝ = G − H_g W_g, plus a D_out x D_in
      pass; it is used when the former is below FACTORED_MARGIN times the
      latter (the paper's 3000- and 2000-dim outputs).  The row norms then
      come from H_g (``OnlineNaturalGradient.precondition_begin``, factored form).
    * Both preconditioner calls are split into begin/end so that their
      traces, their updating calls' K and L, and the max-change sum reach the
      host in one transfer (one host sync per layer on a GPU).
    * The step's scale multiplies X̂ (N x (D_in + 1)), not the D_out x D_in
      products, which go through one reused buffer.
    """

    def __init__(self, network, config):
        super().__init__(network, config)

        def preconditioner(rank):
            return OnlineNaturalGradient(rank, update_period=config.update_period,
                                         num_samples_history=config.num_samples_history,
                                         alpha=config.alpha, schedule=config.schedule)

        layers = network.affine_layers
        self.input_side = [preconditioner(config.rank_in) for _ in layers]
        self.output_side = [preconditioner(config.rank_out) for _ in layers]
        self._extended = [None] * len(layers)
        self._buffers = {}
        # "auto": factored output side where it costs fewer multiply-adds;
        # "factored" / "materialized" force one form (tests, benchmarks).
        self.output_form = "auto"

    def _update_layer(self, index, layer, lr):
        X, G = layer.input, layer.out_deriv
        xp = backend.array_module(X)
        N, D_in, D_out = X.shape[0], layer.input_dim, layer.output_dim
        p_in, p_out = self.input_side[index], self.output_side[index]
        clip = self.config.max_change_per_sample > 0
        xe = self._extended[index] = _with_ones_column(X, self._extended[index])
        x = p_in.precondition_begin(xe, out=xe, row_norms=clip)
        factored = (self.output_form == "factored" or self.output_form == "auto"
                    and (D_in + 1) * (D_out + N) < FACTORED_MARGIN * N * D_out)
        g = p_out.precondition_begin(G, out=G, row_norms=clip, factored=factored)

        parts = [x.host_values, g.host_values]
        if clip:
            parts.append(self._change_sum(x, g).reshape(1))
        host = backend.to_host(xp.concatenate(parts))          # the layer's one host sync
        n_x, n_g = x.host_values.size, g.host_values.size
        gamma_in = p_in.precondition_end(x, host[:n_x])
        gamma_out = p_out.precondition_end(g, host[n_x:n_x + n_g])
        scale = gamma_in * gamma_out
        minibatch_scale = 1.0
        if clip:
            change_sum = float(host[-1])
            if g.row_norms_recomputed:                # κ fallback changed the norms
                change_sum = float(backend.to_host(self._change_sum(x, g)))
            change_norm = scale * lr * change_sum
            limit = self.config.max_change_per_sample * N
            if not math.isfinite(change_norm):
                raise FloatingPointError(f"ng-online: non-finite change norm in affine layer "
                                         f"{index} (training diverged?)")
            if change_norm > limit:
                minibatch_scale = limit / change_norm
        xe *= scale * minibatch_scale * lr                    # X̂ times the step's scale

        # [A, b] += Ĝᵀ X̂ (X̂ = xe: its first D_in columns, then the bias column)
        x_main, x_bias = xe[:, :D_in], xe[:, D_in]
        direction = G if g.X_hat is None else g.X_hat         # G, or Ĝ formed in place
        work = _work(self, "product", layer.linear.shape, layer.linear.dtype, xp)
        matmul_add(layer.linear, direction.T, x_main, work=work)
        bias_change = direction.T @ x_bias
        if g.X_hat is None and g.H is not None:    # factored: subtract W_gᵀ (H_gᵀ X̂)
            HtX = xp.matmul(g.H.T, xe)                         # r x (D_in + 1)
            matmul_add(layer.linear, g.W.T, HtX[:, :D_in], alpha=-1.0, work=work)
            bias_change -= g.W.T @ HtX[:, D_in]
        layer.bias += bias_change

    @staticmethod
    def _change_sum(x, g):
        """Σ_n sqrt(rin_n rout_n) on the device, in float64."""
        xp = backend.array_module(x.row_sq_norms)
        products = xp.multiply(x.row_sq_norms, g.row_sq_norms, dtype=np.float64)
        return xp.sqrt(products, out=products).sum()

    def state_dict(self):
        state = super().state_dict()
        for index, (p_in, p_out) in enumerate(zip(self.input_side, self.output_side)):
            for side, ng in (("in", p_in), ("out", p_out)):
                for key, value in ng.state_dict().items():
                    state[f"layer{index}/{side}/{key}"] = value
        return state

    def load_state_dict(self, state):
        parts = {(i, side): {} for i in range(len(self.input_side)) for side in ("in", "out")}
        rest = {}
        for key, value in state.items():
            fields = key.split("/", 2)
            if len(fields) == 3 and fields[0].startswith("layer") and fields[0][5:].isdigit():
                part = parts.get((int(fields[0][5:]), fields[1]))
                if part is None:
                    raise ValueError(f"optimizer state: key {key!r} does not match this network "
                                     f"({len(self.input_side)} affine layers)")
                part[fields[2]] = value
            else:
                rest[key] = value
        super().load_state_dict(rest)
        for (index, side), part in parts.items():
            if not part:
                raise ValueError(f"optimizer state: no entries for layer{index}/{side}")
            sides = self.input_side if side == "in" else self.output_side
            sides[index].load_state_dict(part)

    def reset(self):
        for ng in self.input_side + self.output_side:
            ng.reset()


class SimpleNgUpdater(Updater):
    """Simple (per-minibatch, leave-one-out) natural gradient; stateless."""

    def _update_layer(self, index, layer, lr):
        X, G = layer.input, layer.out_deriv
        alpha = self.config.simple_alpha
        x_hat = precondition_simple(_with_ones_column(X), alpha)
        g_hat = precondition_simple(G, alpha)
        minibatch_scale = 1.0
        if self.config.max_change > 0:
            xp = backend.array_module(X)
            row_norms = xp.sqrt(xp.einsum("nd,nd->n", x_hat, x_hat))
            row_norms *= xp.sqrt(xp.einsum("nd,nd->n", g_hat, g_hat))
            change_norm = lr * float(row_norms.sum())
            if not math.isfinite(change_norm):
                raise FloatingPointError(f"ng-simple: non-finite change norm in affine layer "
                                         f"{index} (training diverged?)")
            if change_norm > self.config.max_change:
                minibatch_scale = self.config.max_change / change_norm
        g_hat *= minibatch_scale * lr
        _add_outer(layer, g_hat, x_hat)
