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
from ngsgd_mpi.ng_online import OnlineNaturalGradient
from ngsgd_mpi.ng_simple import precondition_simple

OPTIMIZER_NAMES = ("sgd", "ng-online", "ng-simple")


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

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "OptimizerConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        for key in d:
            if key not in names:
                raise ValueError(f"OptimizerConfig: unknown key {key!r} (known: {sorted(names)})")
        config = cls(**d)
        config.validate()
        return config

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
        for name in ("alpha", "max_change_per_sample", "simple_alpha", "max_change"):
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

    def step(self, lr: float) -> None:
        for index, layer in enumerate(self.network.affine_layers):
            if layer.input is None or layer.out_deriv is None:
                raise ValueError(f"step: affine layer {index} has no cached gradient "
                                 "(run network.train_gradients before each step)")
            self._update_layer(index, layer, float(lr))
            layer.input = layer.out_deriv = None

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


class SgdUpdater(Updater):
    """Plain SGD on the summed gradient (Kaldi AffineComponent::Update)."""

    def _update_layer(self, index, layer, lr):
        X, G = layer.input, layer.out_deriv
        G *= lr                           # consumed anyway; saves scaling the D_out x D_in product
        layer.bias += G.sum(axis=0)
        layer.linear += G.T @ X


class OnlineNgUpdater(Updater):
    """Online natural gradient (the paper's method); see the module docstring.

    State per affine layer i: ``input_side[i]`` (Fisher factor of [X, 1],
    dim D_in + 1) and ``output_side[i]`` (Fisher factor of G, dim D_out).
    ``_extended[i]`` is a reusable [X, 1] buffer, not state.
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

    def _update_layer(self, index, layer, lr):
        X, G = layer.input, layer.out_deriv
        xe = self._extended[index] = _with_ones_column(X, self._extended[index])
        x_hat, gamma_in, in_norms = self.input_side[index].precondition_with_row_norms(xe, out=xe)
        g_hat, gamma_out, out_norms = self.output_side[index].precondition_with_row_norms(G, out=G)
        scale = gamma_in * gamma_out
        minibatch_scale = 1.0
        if self.config.max_change_per_sample > 0:
            xp = backend.array_module(X)
            in_norms *= out_norms
            change_norm = scale * lr * float(xp.sqrt(in_norms).sum())
            limit = self.config.max_change_per_sample * X.shape[0]
            if not math.isfinite(change_norm):
                raise FloatingPointError(f"ng-online: non-finite change norm in affine layer "
                                         f"{index} (training diverged?)")
            if change_norm > limit:
                minibatch_scale = limit / change_norm
        g_hat *= scale * minibatch_scale * lr
        _add_outer(layer, g_hat, x_hat)

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
