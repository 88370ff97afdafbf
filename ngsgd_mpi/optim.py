"""Updaters: apply one minibatch's (preconditioned) gradient to ``network.params``.

Each affine layer ``Y = X Aᵀ + b`` hands the updater its input X (N x D_in)
and output derivative G (N x D_out), left there by ``Network.backward``
(pre-update parameters).  The bias is the weight of a constant input 1, so
with ``Xe = [X, 1]`` the summed gradient of ``[A, b]`` is ``Gᵀ Xe``.
nnet2 maximises the objective, so every update is ``param += lr * direction``.

* ``sgd`` (Kaldi AffineComponent)::

      b += lr Σ_n g_n ;   A += lr Gᵀ X                                      (U1)

* ``ng-online`` (AffineComponentPreconditionedOnline, the paper's method):
  the Fisher matrix of ``[A, b]`` is approximated by a Kronecker product of
  an input-side factor (over rows of Xe) and an output-side factor (over rows
  of G), each tracked by an :class:`~ngsgd_mpi.ng_online.OnlineNaturalGradient`
  (its equations (O1)-(O12))::

      X̂, γ_in,  r_in  = P_in(Xe)        Ĝ, γ_out, r_out = P_out(G)          (U2)
      s      = γ_in γ_out                        (restores the Frobenius norms)
      total  = s lr Σ_n sqrt(r_in,n r_out,n)     (a bound on the change norm)
      mscale = min(1, max_change_per_sample N / total)
      [A, b] += (s mscale lr) Ĝᵀ X̂                                          (U3)

  r_in, r_out are the squared row norms of the unscaled X̂, Ĝ (O3), so
  s sqrt(r_in,n r_out,n) is the norm of sample n's rank-one change.

* ``ng-simple`` (AffineComponentPreconditioned): each row of Xe and of G is
  multiplied by the inverse of a Fisher factor estimated from the *other*
  rows of the minibatch (ng_simple.py, (S1)-(S7), Frobenius norm
  preserved), and the whole minibatch's change is limited::

      total  = lr Σ_n ||xp_n|| ||gp_n||
      mscale = min(1, max_change / total)
      [A, b] += (mscale lr) Gpᵀ Xp                                          (U4)

  When N < D_out and D_in + 1 < D_out, Gp is left unformed (S4)-(S6):
  Gpᵀ Xp = Gᵀ (S⁻¹ diag(β) Xp) costs N²(D_in + 1) instead of N² D_out.

* every updater (nnet3's max-param-change): the step's change of all
  parameters is scaled to norm ``max_param_change`` if it is larger.     (U5)

Host synchronisation: none.  γ, the max-change factors and (U5) are device
scalars applied on the device; the only device-to-host transfer in a step is
ng-online's, on minibatches whose preconditioners update their Fisher
factors: ONE for the whole network, every side of every layer together
(``DeferredUpdates``), plus one when an (O10) orthonormality check is due.
Non-finite values are not checked here (that would read the device): they
propagate into the parameters, where the trainer's per-minibatch objective
check and end-of-period ``params_finite`` catch a divergence; a non-finite
Fisher update raises FloatingPointError on the host.

``step`` consumes the gradients cached by ``network.backward``: G is
preconditioned in place and the cache is released, so a second ``step``
without a new backward pass raises an error instead of repeating an update.

State (``state_dict``): nested, ``{"name": ..., "layers": [...]}``; only the
online preconditioners have any (per layer ``{"input": ..., "output": ...}``,
each ``OnlineNaturalGradient.state_dict()``).  Kaldi does not save it with the
model and re-initialises it whenever a job starts from a freshly averaged
model; :meth:`Updater.reset` does the same.  Work arrays live in workspaces
(``workspace.py``), never next to the state.
"""

from __future__ import annotations

import abc

import numpy as np

from ngsgd_mpi import backend, costs
from ngsgd_mpi.layers import matmul_add
from ngsgd_mpi.ng_online import DeferredUpdates, LowRankResidual, OnlineNaturalGradient
from ngsgd_mpi.ng_simple import leave_one_out
from ngsgd_mpi.options import in_groups, record_class
from ngsgd_mpi.workspace import Workspace

OptimizerConfig = record_class("OptimizerConfig", in_groups("optimizer"),
                               doc="The updater: the 'optimizer' options of options.py.")


def make_updater(network, config: OptimizerConfig) -> "Updater":
    """The updater named by ``config.optimizer`` for ``network.affine_layers``."""
    config.validate()
    kind = {"sgd": SgdUpdater, "ng-online": OnlineNgUpdater, "ng-simple": SimpleNgUpdater}
    return kind[config.optimizer](network, config)


class Updater(abc.ABC):
    """Common interface.  ``step(lr)`` updates every affine layer from its
    cached (X, G) and releases them."""

    def __init__(self, network, config: OptimizerConfig):
        self.network = network
        self.config = config
        self.work = Workspace()         # the updater's reused arrays (never state)

    def step(self, lr: float) -> None:
        limit = self.config.max_param_change
        params = self.network.params
        xp = backend.array_module(params)
        if limit > 0:
            before = self.work.array("params_before", params.shape, params.dtype, xp)
            before[...] = params
        for index, layer in enumerate(self.network.affine_layers):
            if layer.input is None or layer.out_deriv is None:
                raise ValueError(f"step: affine layer {index} has no cached gradient "
                                 "(run network.train_gradients before each step)")
            self._update_layer(index, layer, float(lr))
            layer.input = layer.out_deriv = None
        self._finish_step()
        if limit > 0:
            _limit_total_change(params, before, limit)

    @abc.abstractmethod
    def _update_layer(self, index: int, layer, lr: float) -> None:
        """Apply this minibatch's update to one affine layer (its X, G are cached on it)."""

    def _finish_step(self) -> None:
        """Work left after every layer's update is queued (nothing by default)."""

    def _product_buffer(self, layer, xp):
        """A D_out x D_in buffer for a product where BLAS cannot accumulate (a
        function: allocated only when used)."""
        return lambda: self.work.array("product", layer.linear.shape, layer.linear.dtype, xp)

    def _extended(self, X, spare_rows: int = 0):
        """``[X, 1]`` in the first N rows of a reused (N + spare_rows) x (D_in + 1) buffer."""
        xp = backend.array_module(X)
        rows, dim = X.shape
        buffer = self.work.array("extended", (rows + spare_rows, dim + 1), X.dtype, xp)
        buffer[:rows, :dim] = X
        buffer[:rows, dim] = 1.0
        return buffer

    def state_dict(self) -> dict:
        """Nested state: ``{"name": ..., "layers": [per-layer state, ...]}`` (no layers when stateless)."""
        return {"name": self.config.optimizer, "layers": []}

    def load_state_dict(self, state: dict) -> None:
        if state.get("name") != self.config.optimizer:
            raise ValueError(f"optimizer state: written by {state.get('name')!r}, "
                             f"this updater is {self.config.optimizer!r}")
        if set(state) != {"name", "layers"}:
            raise ValueError(f"optimizer state: expected the keys name and layers, got {sorted(state)}")
        if len(_layer_list(state["layers"])) != 0:
            raise ValueError(f"optimizer state: {self.config.optimizer} has no per-layer state")

    def reset(self) -> None:
        """Forget optimiser state (nothing for the stateless updaters)."""


def _limit_total_change(params, before, limit: float) -> None:
    """(U5) on the device: new <- old + min(1, limit / ||new − old||) (new − old);
    three passes over the parameters."""
    xp = backend.array_module(params)
    minus_change = before
    minus_change -= params                                   # old − new
    norm = xp.sqrt(xp.vdot(minus_change, minus_change).astype(np.float64))
    over = norm > limit
    minus_change *= xp.where(over, 1.0 - limit / xp.where(over, norm, 1.0), 0.0).astype(params.dtype)
    params += minus_change


def _scale_down_to(total, limit: float, xp):
    """min(1, limit / total) as a device scalar (1 when total is not above the limit)."""
    over = total > limit
    return xp.where(over, limit / xp.where(over, total, 1.0), 1.0)


def _layer_list(layers):
    """Per-layer records as a list (a storage round trip may give a dict keyed "0", "1", ...)."""
    if isinstance(layers, dict) and all(str(k).isdigit() for k in layers):
        return [layers[k] for k in sorted(layers, key=int)]
    return layers


def _add_outer(layer, direction_out, direction_in_ext, work) -> None:
    """``[A, b] += direction_outᵀ direction_in_ext`` (its last column is the bias's)."""
    dim = layer.input_dim
    xp = backend.array_module(direction_out)
    matmul_add(layer.linear, direction_out.T, direction_in_ext[:, :dim], work=work)
    # the bias column made contiguous first: the GEMV then takes 0.31 ms instead of 0.44 (592 x 3000)
    layer.bias += xp.matmul(xp.ascontiguousarray(direction_in_ext[:, dim]), direction_out)


class SgdUpdater(Updater):
    """Plain SGD on the summed gradient (U1).  lr scales X (N x D_in), not
    the D_out x D_in product."""

    def _update_layer(self, index, layer, lr):
        X, G = layer.input, layer.out_deriv
        xp = backend.array_module(X)
        layer.bias += lr * G.sum(axis=0)
        scaled = xp.multiply(X, lr, out=self.work.array("scaled", X.shape, X.dtype, xp))
        matmul_add(layer.linear, G.T, scaled, work=self._product_buffer(layer, xp))


class OnlineNgUpdater(Updater):
    """Online natural gradient (U2)-(U3), the paper's method.

    State per affine layer i: ``input_side[i]`` (Fisher factor of [X, 1],
    dim D_in + 1) and ``output_side[i]`` (Fisher factor of G, dim D_out).

    Per layer and minibatch, arranged for speed:

    * [X, 1] is written into a reused N x (D_in + 1) buffer and
      preconditioned in place; X̂'s first D_in columns are a strided view of
      it, which BLAS takes as is.
    * The output side is left unformed where that costs fewer multiply-adds
      (``costs.use_factored_output``, the paper's 3000- and 2000-dim
      outputs): Ĝᵀ X̂ = Gᵀ X̂ − W_gᵀ (H_gᵀ X̂) (O11), computed as ONE GEMM
      over the stacked rows, [G; W_g]ᵀ [X̂; −H_gᵀ X̂]: W_g goes into r spare
      rows after G and H_gᵀ X̂ into r spare rows after X̂, so C = [A, b] is
      read and written once (a separate rank-r GEMM costs a pass over C:
      measured 0.2-2 ms per paper-size layer).  G lives in a layer's buffer:
      the first factored update reserves the rows (``network.reserve_rows``)
      and copies G once; so does a G that is no layer's buffer.  Every step
      is then the same GEMM, and a resumed run stays bit-identical.
    * The step's scale s·mscale·lr, a device scalar, multiplies X̂
      (N x (D_in + 1)), not the D_out x D_in products, which go through one
      reused buffer.
    * Every side's Fisher update is finished together at the end of the step,
      after all parameter updates are queued (``DeferredUpdates``): on
      updating minibatches one host transfer for the whole network (two when
      an (O10) check is due), none on the others.

    ``output_form``: "auto" (the cost model), or "factored" / "formed" to
    force one form (tests, benchmarks).
    """

    def __init__(self, network, config):
        super().__init__(network, config)

        def preconditioner(rank):
            return OnlineNaturalGradient(rank, update_period=config.update_period,
                                         num_samples_history=config.num_samples_history,
                                         alpha=config.alpha, schedule=config.ng_schedule)

        layers = network.affine_layers
        self.input_side = [preconditioner(config.rank_in) for _ in layers]
        self.output_side = [preconditioner(config.rank_out) for _ in layers]
        self.output_form = "auto"
        self._updates = DeferredUpdates()

    def _update_layer(self, index, layer, lr):
        X, G = layer.input, layer.out_deriv
        xp = backend.array_module(X)
        N, D_in, D_out = X.shape[0], layer.input_dim, layer.output_dim
        p_in, p_out = self.input_side[index], self.output_side[index]
        clip = self.config.max_change_per_sample > 0
        factored = (self.output_form == "factored" or self.output_form == "auto"
                    and costs.use_factored_output(N, D_in, D_out, self.config.rank_out))
        extended = self._extended(X, spare_rows=self.config.rank_out if factored else 0)
        xe = extended[:N]
        x_hat, gamma_in, *rows_in = p_in.precondition(xe, out=xe, row_norms=clip,
                                                      updates=self._updates)
        g_hat, gamma_out, *rows_out = p_out.precondition(G, out=G, row_norms=clip,
                                                         factored=factored, updates=self._updates)
        scale = gamma_in * gamma_out * lr                      # (U3), on the device
        if clip:
            products = xp.multiply(rows_in[0], rows_out[0], dtype=np.float64)
            total = xp.sqrt(products, out=products).sum() * scale
            scale = scale * _scale_down_to(total, self.config.max_change_per_sample * N, xp)
        xe *= scale.astype(xe.dtype)       # X̂ times the step's scale (a float64 factor: a 6x slower loop)

        # [A, b] += Ĝᵀ X̂ (X̂ = xe: its first D_in columns, then the bias column)
        work = self._product_buffer(layer, xp)
        if not isinstance(g_hat, LowRankResidual):             # Ĝ formed in place
            _add_outer(layer, g_hat, xe, work)
            return
        r = g_hat.W.shape[0]                                   # Ĝ = G − H_g W_g, unformed
        stacked_g = self.network.with_rows_after(G, r)
        if stacked_g is None:    # no spare rows after G: reserve them for later steps, copy G now
            self.network.reserve_rows(self.config.rank_out)
            stacked_g = xp.empty((N + r, D_out), dtype=G.dtype)
            stacked_g[:N] = G
        stacked_g[N:] = g_hat.W                                # [G; W_g]ᵀ [X̂; −H_gᵀ X̂]
        minus_HtX = xp.matmul(g_hat.H.T, xe, out=extended[N:N + r])
        minus_HtX *= -1.0
        _add_outer(layer, stacked_g, extended[:N + r], work)

    def _finish_step(self):
        self._updates.finish()          # every side's Fisher update: one transfer, if any

    def state_dict(self):
        return {"name": self.config.optimizer,
                "layers": [{"input": p_in.state_dict(), "output": p_out.state_dict()}
                           for p_in, p_out in zip(self.input_side, self.output_side)]}

    def load_state_dict(self, state):
        layers = _layer_list(state.get("layers"))
        if state.get("name") != self.config.optimizer:
            raise ValueError(f"optimizer state: written by {state.get('name')!r}, "
                             f"this updater is {self.config.optimizer!r}")
        if set(state) != {"name", "layers"}:
            raise ValueError(f"optimizer state: expected the keys name and layers, got {sorted(state)}")
        if not isinstance(layers, list) or len(layers) != len(self.input_side):
            raise ValueError(f"optimizer state: expected {len(self.input_side)} layers (this network's "
                             f"affine layers), got {len(layers) if isinstance(layers, list) else layers!r}")
        for index, layer in enumerate(layers):
            if not isinstance(layer, dict) or set(layer) != {"input", "output"}:
                raise ValueError(f"optimizer state: layer {index} must hold 'input' and 'output'")
            self.input_side[index].load_state_dict(layer["input"])
            self.output_side[index].load_state_dict(layer["output"])

    def reset(self):
        for ng in self.input_side + self.output_side:
            ng.reset()


class SimpleNgUpdater(Updater):
    """Simple (per-minibatch, leave-one-out) natural gradient (U4); stateless."""

    def _update_layer(self, index, layer, lr):
        X, G = layer.input, layer.out_deriv
        xp = backend.array_module(X)
        N, D_in, D_out = X.shape[0], layer.input_dim, layer.output_dim
        alpha = self.config.simple_alpha
        x = leave_one_out(self._extended(X), alpha)
        g = leave_one_out(G, alpha, form=costs.simple_output_formed(N, D_in, D_out))
        coefficient = lr
        if self.config.max_change > 0:
            total = (x.row_norms * g.row_norms).sum() * lr
            coefficient = _scale_down_to(total, self.config.max_change, xp) * lr
        xp_scaled = x.Q                                      # Xp times the step's scale
        xp_scaled *= (x.row_scale * coefficient).astype(xp_scaled.dtype)[:, None]
        work = self._product_buffer(layer, xp)
        if g.Q is not None:                                  # Gp formed: Gpᵀ (scaled Xp)
            g_scaled = g.Q
            g_scaled *= g.row_scale.astype(g_scaled.dtype)[:, None]
            _add_outer(layer, g_scaled, xp_scaled, work)
        else:                                                # Gᵀ (S⁻¹ diag(β_g) scaled Xp), (S4)
            xp_scaled *= g.row_scale.astype(xp_scaled.dtype)[:, None]
            _add_outer(layer, G, xp.matmul(g.S_inv, xp_scaled), work)
