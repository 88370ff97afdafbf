"""Final model combination of the last averaged models (``ngsgd-combine``; also run at the end
of training).

Late in training the per-period models wander around a maximum; a combination of the last
few usually beats the last one.  Two methods (``combine_method``):

``lbfgs`` -- Kaldi's ``nnet-combine-fast`` as the nnet2 recipes call it.  One weight
w[n, c] per candidate model n and affine layer c; layer c of the combined network is
``sum_n w[n, c] theta_c^n``.  The weights maximise the mean log-probability per frame F(w)
of ``combine_frames`` *training* frames (Kaldi's combine.egs; choosing on the validation
set would leak it into the model), by L-BFGS from the uniform average
(``--initial-model=100000``), preconditioned as Kaldi does:

    (C1)  dF/dw[n, c] = < grad_{theta_c} F(w), theta_c^n >         (frames' mean gradient)
    (C2)  Fi = sum_b g_b g_b^T,  g_b = (C1) on minibatch b of 64 frames, at the start point
    (C3)  Fi <- Fi * dim / tr(Fi);  Fi_ii <- max(Fi_ii, 1e-20) (1 + 0.01);  Fi = C C^T
    (C4)  optimise p = C^T w, gradient C^-1 dF/dw                  (Fi^-1 as the metric)

L-BFGS here: memory min(dim, 10), a first step whose predicted gain is 0.01 nats/frame
(Kaldi's ``first_step_impr``), then steps of length 1 halved until the Armijo condition
holds, ``combine_lbfgs_evals`` (40) evaluations in all, the best point seen is kept.
Kaldi's own line search (OptimizeLbfgs: Wolfe conditions, step doubling) is not copied.
Then, with ``normalize_stddev``, ``nnet-normalize-stddev``: every hidden affine layer
(followed by p-norm and normalize, which make the network invariant to its scale) is
scaled so that the standard deviation of its parameters [A, b] is 1.

``best-suffix`` -- the simpler choice nnet3's combination falls back to: candidates are the
averages of the last n = 1..K models; the best validation log-probability wins (ties go to
fewer models).

Candidates are the last ``combine_last_k`` averaged checkpoints with the final architecture
(layer-wise growth makes earlier ones a different network).
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

from . import backend, checkpoint, data, evaluation, priors
from .faults import EXIT_OK, InputError, report_bad_input
from .model import Model

FISHER_MINIBATCH = 64         # nnet-combine-fast --fisher-minibatch-size
FISHER_FLOOR = 1e-20          # --fisher-floor
FISHER_ALPHA = 0.01           # --alpha: diagonal smoothing
INITIAL_IMPROVEMENT = 0.01    # --initial-impr (LbfgsOptions::first_step_impr), nats/frame
LBFGS_MEMORY = 10             # --max-lbfgs-dim
ARMIJO_C1 = 1e-4              # LbfgsOptions::c1
BLOCK_FRAMES = 1024           # frames per forward-backward pass (speed only)


def candidates(out_dir: str, max_models: int) -> list[tuple[checkpoint.Checkpoint, Model]]:
    """(checkpoint, model) of the last ``max_models`` averaged checkpoints with the newest
    one's architecture, oldest first."""
    found = []
    for ckpt in reversed(checkpoint.averaged_checkpoints(out_dir)):
        model = Model.load(ckpt.model_path)
        if len(found) == max_models or (found and model.network_config != found[0][1].network_config):
            break
        found.append((ckpt, model))
    return found[::-1]


# ----------------------------------------------------------------------------- best suffix

def combine_checkpoints(out_dir: str, valid: data.PartitionInfo, max_models: int, log=print):
    """Best suffix average: (params, n) of the best candidate, or None when there is no
    averaged checkpoint."""
    averaged = candidates(out_dir, max_models)
    if not averaged:
        return None
    newest = averaged[-1][1]
    network = newest.replace(params=newest.params.copy()).network()    # not a view of newest.params
    total = np.zeros(network.params.size, np.float64)
    best = None
    for n, (ckpt, model) in enumerate(reversed(averaged), start=1):   # newest first: suffix averages
        total += model.params
        candidate = (total / n).astype(np.float32)
        network.params[...] = backend.to_device(candidate)
        result = evaluation.evaluate_partition(network, valid, newest.context)
        log(f"combine: average of the last {n:2d} model(s) (from period {ckpt.period}): "
            f"valid {result.objective:.4f} ({100 * result.accuracy:.2f}%)")
        if best is None or result.objective > best[0]:
            best = (result.objective, candidate, n)
    return best[1], best[2]


# ----------------------------------------------------------------------------- nnet-combine-fast

def combination_frames(partition: str, context: int, frames: int, seed: int, utterances: int = 300):
    """(spliced feats, labels) of ``frames`` random frames of ``utterances`` random training
    utterances of one partition (Kaldi: combine.egs, 10000 frames of the 300 utterances of
    train_subset_uttlist): many utterances, so that the weights fit no single speaker."""
    info = data.open_partition(partition, scan=False)
    rng = np.random.default_rng([seed, 0xC0B])
    lengths = np.diff(info.utt_offsets)
    chosen = np.sort(rng.permutation(len(lengths))[:utterances])
    pool = np.concatenate([np.full(lengths[u], u) for u in chosen])       # utterance of each frame
    picked = np.sort(rng.permutation(len(pool))[:frames])
    xs, ys = [], []
    for u in chosen:
        rows = picked[pool[picked] == u] - np.searchsorted(pool, u)          # frames within u
        if len(rows):
            X, labels = data.read_spliced(info, [u], context, context)
            xs.append(X[rows])
            ys.append(labels[rows])
    return np.concatenate(xs), np.concatenate(ys)


class _Objective:
    """F(w) and dF/dw (C1) for the combination weights w (models x layers) of ``stack``."""

    def __init__(self, network, stack: np.ndarray, X, labels):
        self.network, self.stack, self.X, self.labels = network, stack, X, labels
        slices = network.layer_param_slices()
        # layer c of the flat buffer: [A_c, b_c] is one contiguous range
        self.layers = [(a[1], b[1] + b[2][0]) for a, b in zip(slices[0::2], slices[1::2])]

    def params(self, weights: np.ndarray) -> np.ndarray:
        out = np.empty(self.stack.shape[1], np.float64)
        for c, (lo, hi) in enumerate(self.layers):
            out[lo:hi] = weights[:, c] @ self.stack[:, lo:hi]
        return out

    def gradient_of_params(self, rows) -> tuple[float, np.ndarray]:
        """(summed log-probability, its gradient w.r.t. the flat parameters) on ``rows``."""
        network = self.network
        logprob, _ = network.train_gradients(backend.to_device(self.X[rows]),
                                             backend.to_device(self.labels[rows]))
        grad = np.empty(network.params.size, np.float64)
        for layer, (lo, hi) in zip(network.affine_layers, self.layers):
            G, X = layer.out_deriv, layer.input
            grad[lo:hi] = np.concatenate([backend.to_host(G.T @ X).ravel(), backend.to_host(G.sum(axis=0))])
            layer.input = layer.out_deriv = None
        return logprob, grad

    def weight_gradient(self, grad: np.ndarray) -> np.ndarray:
        """(C1) from the parameter gradient: one entry per (model, layer)."""
        return np.stack([self.stack[:, lo:hi] @ grad[lo:hi] for lo, hi in self.layers], axis=1)

    def set(self, weights: np.ndarray) -> None:
        self.network.params[...] = backend.to_device(self.params(weights).astype(np.float32))

    def value_and_gradient(self, weights: np.ndarray) -> tuple[float, np.ndarray]:
        self.set(weights)
        total, grad = 0.0, np.zeros(self.stack.shape[1])
        for start in range(0, len(self.labels), BLOCK_FRAMES):
            lp, g = self.gradient_of_params(slice(start, start + BLOCK_FRAMES))
            total, grad = total + lp, grad + g
        n = len(self.labels)
        return total / n, self.weight_gradient(grad / n)

    def fisher(self, weights: np.ndarray) -> np.ndarray:
        """(C2) at ``weights``."""
        self.set(weights)
        dim = weights.size
        scatter = np.zeros((dim, dim))
        for start in range(0, len(self.labels), FISHER_MINIBATCH):
            _, grad = self.gradient_of_params(slice(start, start + FISHER_MINIBATCH))
            g = self.weight_gradient(grad).ravel()
            scatter += np.outer(g, g)
        return scatter


def lbfgs_maximize(value_and_gradient, x0: np.ndarray, num_evals: int):
    """(best value, best x, value at x0) of at most ``num_evals`` evaluations of L-BFGS
    ascent from x0."""
    x = x0.copy()
    f, g = value_and_gradient(x)
    evals, best, f0 = 1, (f, x.copy()), f
    s_list, y_list = [], []
    while evals < num_evals:
        if not s_list:                         # first step: predicted gain INITIAL_IMPROVEMENT
            direction = g * (INITIAL_IMPROVEMENT / max(float(g @ g), 1e-300))
        else:                                  # two-loop recursion on -F: direction = H g
            q, alphas = g.copy(), []
            for s, y in zip(reversed(s_list), reversed(y_list)):
                alpha = (s @ q) / (y @ s)
                alphas.append(alpha)
                q -= alpha * y
            q *= (s_list[-1] @ y_list[-1]) / (y_list[-1] @ y_list[-1])
            for (s, y), alpha in zip(zip(s_list, y_list), reversed(alphas)):
                q += (alpha - (y @ q) / (y @ s)) * s
            direction = q
        slope, step = float(g @ direction), 1.0
        if slope <= 0:                          # not an ascent direction: restart from the gradient
            if not s_list:                      # the gradient is zero: a stationary point
                break
            s_list, y_list = [], []
            continue
        while evals < num_evals:
            x_new = x + step * direction
            f_new, g_new = value_and_gradient(x_new)
            evals += 1
            if f_new > best[0]:
                best = (f_new, x_new.copy())
            if f_new >= f + ARMIJO_C1 * step * slope:
                break
            step *= 0.5
        else:
            break
        s, y = x_new - x, g - g_new            # y of -F: -(g_new - g)
        if s @ y > 1e-12 * (s @ s):
            s_list, y_list = (s_list + [s])[-LBFGS_MEMORY:], (y_list + [y])[-LBFGS_MEMORY:]
        x, f, g = x_new, f_new, g_new
    return best[0], best[1], f0


def combine_lbfgs(models: list[Model], X, labels, num_evals: int, log=print) -> tuple[np.ndarray, np.ndarray]:
    """nnet-combine-fast: (combined float32 params, weights models x layers)."""
    network = models[-1].replace(params=models[-1].params.copy()).network()   # written to below
    stack = np.stack([m.params.astype(np.float64) for m in models])
    objective = _Objective(network, stack, X, labels)
    num_models, num_layers = len(models), len(objective.layers)
    uniform = np.full((num_models, num_layers), 1.0 / num_models)
    fisher = objective.fisher(uniform)
    dim = uniform.size
    if not np.trace(fisher) > 0:
        raise ValueError("combine: the Fisher matrix of the combination weights is zero")
    fisher *= dim / np.trace(fisher)                                          # (C3)
    fisher[np.diag_indices(dim)] = np.maximum(np.diag(fisher), FISHER_FLOOR) * (1.0 + FISHER_ALPHA)
    chol = np.linalg.cholesky(fisher)
    chol_inv = np.linalg.inv(chol)

    def preconditioned(p):                                                    # (C4)
        w = (chol_inv.T @ p).reshape(num_models, num_layers)
        value, grad = objective.value_and_gradient(w)
        return value, chol_inv @ grad.ravel()

    value, p, initial = lbfgs_maximize(preconditioned, chol.T @ uniform.ravel(), num_evals)
    weights = (chol_inv.T @ p).reshape(num_models, num_layers)
    log(f"combine: {num_models} model(s) x {num_layers} layer(s) on {len(labels)} training frames: "
        f"objective {initial:.4f} (uniform average) -> {value:.4f}")
    log("combine: weights (model rows, layer columns): "
        + "; ".join(" ".join(f"{v:.3f}" for v in row) for row in weights))
    return objective.params(weights).astype(np.float32), weights


def normalize_stddev(network_config, params: np.ndarray) -> np.ndarray:
    """nnet-normalize-stddev: every hidden affine layer of a p-norm network scaled to
    parameter standard deviation 1 (function-preserving: p-norm then normalize)."""
    out = np.array(params, np.float32)
    if network_config.nonlinearity != "pnorm":
        return out
    offset = 0
    for out_dim, in_dim in network_config.affine_shapes()[:-1]:
        block = out[offset:offset + out_dim * in_dim + out_dim]
        stddev = float(np.std(block.astype(np.float64)))
        if stddev > 0:
            block *= np.float32(1.0 / stddev)
        offset += block.size
    return out


def final_combination(out_dir: str, method: str, max_models: int, *, valid=None, train_partition=None,
                      context: int = 0, frames: int = 10_000, num_evals: int = 40, seed: int = 0,
                      normalize: bool = False, log=print):
    """(params, what) of the final model from the run's checkpoints, or None when there is
    no averaged checkpoint (or nothing to combine with: best-suffix without validation data)."""
    if method == "best-suffix":
        if valid is None:
            return None
        result = combine_checkpoints(out_dir, valid, max_models, log=log)
        if result is None:
            return None
        params, what = result[0], {"combined_models": result[1], "combine_method": method}
    else:
        chosen = candidates(out_dir, max_models)
        if not chosen:
            return None
        X, labels = combination_frames(train_partition, context, frames, seed)
        params, weights = combine_lbfgs([m for _, m in chosen], X, labels, num_evals, log=log)
        what = {"combined_models": len(chosen), "combine_method": method,
                "combine_weights": weights.tolist(), "combined_periods": [c.period for c, _ in chosen]}
    if normalize:
        params = normalize_stddev(Model.load(checkpoint.averaged_checkpoints(out_dir)[-1].model_path)
                                  .network_config, params)
        what["normalized_stddev"] = True
    return params, what


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="ngsgd-combine", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", required=True, help="training output directory (with checkpoints/)")
    parser.add_argument("--method", choices=("lbfgs", "best-suffix"), default="best-suffix",
                        help="lbfgs (nnet-combine-fast, on training frames) or best-suffix (validation)")
    parser.add_argument("--valid-data", help="best-suffix: validation partition file")
    parser.add_argument("--train-data", help="training partitions (directory or glob; default: the run's): "
                        "lbfgs draws its frames from the first; the priors are computed on them")
    parser.add_argument("--frames", type=int, default=10_000, help="lbfgs: training frames")
    parser.add_argument("--max-models", type=int, default=20, help="consider the last this many models")
    parser.add_argument("--normalize-stddev", action="store_true", help="then nnet-normalize-stddev")
    parser.add_argument("--output", help="combined model file (default OUT_DIR/combined.h5)")
    args = parser.parse_args(argv)
    try:
        if args.method == "best-suffix" and not args.valid_data:
            raise InputError("--method best-suffix needs --valid-data")
        newest = checkpoint.averaged_checkpoints(args.out_dir)
        if not newest:
            raise checkpoint.CheckpointError(f"{args.out_dir}: no complete averaged checkpoint found")
        model = Model.load(newest[-1].model_path)
        train_data = args.train_data or model.train_config.get("train_data")
        if args.method == "lbfgs" and not train_data:
            raise InputError("--method lbfgs needs --train-data")
        result = final_combination(
            args.out_dir, args.method, args.max_models,
            valid=data.open_partition(args.valid_data) if args.valid_data else None,
            train_partition=data.find_partitions(train_data)[0] if args.method == "lbfgs" else None,
            context=model.context, frames=args.frames, seed=int(model.train_config.get("seed", 0)),
            normalize=args.normalize_stddev)
        params, what = result
        output = args.output or os.path.join(args.out_dir, "combined.h5")
        combined = model.replace(params=params, info={**what, "period": newest[-1].period})
        try:
            combined = priors.finalize(combined, train_data)
        except InputError as exc:
            sys.stderr.write(f"ngsgd-combine: note: no nnet2 priors ({exc}); log-likelihood output "
                             f"will use the label frequencies\n")
        combined.save(output)
    except InputError as exc:
        return report_bad_input("ngsgd-combine", exc)
    print(f"ngsgd-combine: wrote {output} ({args.method}, {what['combined_models']} model(s))")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
