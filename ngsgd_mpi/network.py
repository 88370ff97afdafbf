"""The feed-forward acoustic model: p-norm (or ReLU) layers and a softmax output.

Architecture (spec §7)::

    [FixedAffine]  ->  (Affine -> Pnorm -> Normalize) x H  ->  Affine  ->  [FixedScale]  ->  SoftmaxCrossEntropy
                   or  (Affine -> Relu  -> Normalize) x H

* The optional FixedAffine input transform (mean/variance normalisation or
  an LDA-like matrix) is not trained and not part of ``params``.
* Every trainable weight lives in ONE contiguous 1-D array ``params``
  (layout: ``A_0, b_0, A_1, b_1, ...``, each ``A_l`` row-major
  D_out x D_in); each Affine layer's ``linear`` and ``bias`` are views into
  it.  Parameter averaging is then one Allreduce on one buffer, and
  checkpoints store one vector.  ``params`` is never rebound: write into it
  (``network.params[...] = x``) or use :meth:`Network.set_params`.

Initialisation (Kaldi recipes): hidden affine layers ``A ~ N(0, s^2)`` with
``s = 1/sqrt(pnorm_input_dim)`` for p-norm (``train_pnorm_*.sh``:
``param-stddev = 1/sqrt(pnorm_input_dim)``) and ``s = 1/sqrt(fan_in)`` for
ReLU; biases ``~ N(0, 0.5^2)`` (``bias-stddev = 0.5``); the final affine
layer starts at zero, so the initial model predicts the uniform distribution.
Draws come from ``numpy.random.default_rng(seed)`` on the host, layer by
layer (A then b), and are copied to the device once.

Layer-wise growth (Kaldi's ``nnet-insert``): :func:`insert_hidden_layer` returns a *new*
Network with one more hidden block before the final affine layer.  Its flat buffer has a
new layout (every offset after the insertion point moves), so anything tied to the old
buffer (the updater, its state, a snapshot) must be made again for the new network.

Training pass: ``forward(X, train=True)`` caches what ``backward`` needs;
``backward(labels)`` leaves each affine layer's input X and output
derivative G (``layer.input``, ``layer.out_deriv``) for the updater
(optim.py), computed with the pre-update parameters.  The objective is the
summed frame log-likelihood ``sum_n log p_n(label_n)`` (maximised).
:meth:`Network.reserve_rows` gives the layers' training buffers spare rows,
which :meth:`Network.with_rows_after` hands out (the online updater's stacked
GEMM, optim.py).
"""

from __future__ import annotations

import math

import numpy as np

from ngsgd_mpi import backend
from ngsgd_mpi.layers import Affine, FixedAffine, FixedScale, Normalize, Pnorm, Relu, SoftmaxCrossEntropy
from ngsgd_mpi.options import DATA_SIZES, in_groups, record_class

HIDDEN_BIAS_STDDEV = 0.5     # Kaldi recipes' bias-stddev for hidden affine layers
INSERT_STDDEV_FACTOR = 0.1   # nnet-insert --stddev-factor: the final layer's re-initialisation
PRIOR_SMOOTHING = 0.01       # the recipes add 1% of the average class count to every count


class NetworkConfig(record_class("NetworkConfig", in_groups("network"), leading=DATA_SIZES)):
    """The architecture: ``input_dim`` (spliced input frames), ``num_classes`` and the
    "network" options of ``options.py`` (hidden layers, p-norm or ReLU sizes)."""

    @property
    def hidden_output_dim(self) -> int:
        """Dimension of each hidden block's output (input of the next affine layer)."""
        return self.pnorm_output_dim if self.nonlinearity == "pnorm" else self.relu_dim

    def affine_shapes(self) -> list[tuple[int, int]]:
        """(D_out, D_in) of every affine layer, in order."""
        shapes, fan_in = [], self.input_dim
        affine_out = self.pnorm_input_dim if self.nonlinearity == "pnorm" else self.relu_dim
        for _ in range(self.num_hidden_layers):
            shapes.append((affine_out, fan_in))
            fan_in = self.hidden_output_dim
        shapes.append((self.num_classes, fan_in))
        return shapes

    def num_params(self) -> int:
        return sum(o * i + o for o, i in self.affine_shapes())


class Network:
    """The model; see the module docstring.

    Attributes:
        config: the NetworkConfig.
        dtype: of params and activations; float32 for training, float64 in
            gradient-check tests.
        params: the flat parameter buffer (read-only attribute; write into it).
        affine_layers: the trainable layers, in order (the updater's view).
        layers: every component after the input transform, in order, ending
            with the SoftmaxCrossEntropy output.
        input_transform: FixedAffine applied to X first, or None.
    """

    def __init__(self, config: NetworkConfig, seed: int = 0, params=None, dtype=np.float32):
        config.validate()
        self.config = config
        self.dtype = np.dtype(dtype)
        xp = backend.xp()
        if params is None:
            self._params = xp.asarray(self._initial_params(seed))
        else:
            self._params = self._adopt(params)
        def view(offset, shape):
            return self._params[offset:offset + math.prod(shape)].reshape(shape)

        slices = self.layer_param_slices()          # linear, bias, linear, bias, ...
        self.affine_layers: list[Affine] = [
            Affine(view(a_offset, a_shape), view(b_offset, b_shape))
            for (_, a_offset, a_shape), (_, b_offset, b_shape) in zip(slices[0::2], slices[1::2])]
        self.layers = []
        for affine in self.affine_layers[:-1]:
            self.layers.append(affine)
            if config.nonlinearity == "pnorm":
                self.layers.append(Pnorm(config.pnorm_input_dim, config.pnorm_output_dim,
                                         config.pnorm_p))
            else:
                self.layers.append(Relu(config.relu_dim))
            self.layers.append(Normalize(config.hidden_output_dim))
        self.layers += [self.affine_layers[-1], SoftmaxCrossEntropy(config.num_classes)]
        self.input_transform: FixedAffine | None = None
        self.output_scale: FixedScale | None = None

    # ------------------------------------------------------------------ parameters

    def _initial_params(self, seed: int) -> np.ndarray:
        rng = np.random.default_rng(seed)
        cfg = self.config
        flat = np.zeros(cfg.num_params(), dtype=self.dtype)
        offset = 0
        shapes = cfg.affine_shapes()
        for index, (out_dim, in_dim) in enumerate(shapes):
            size = out_dim * in_dim
            if index < len(shapes) - 1:        # hidden layer; the final one stays zero
                flat[offset:offset + size + out_dim] = _hidden_init(cfg, in_dim, out_dim, rng)
            offset += size + out_dim
        return flat

    def _adopt(self, params):
        xp = backend.xp()
        params = xp.asarray(params)
        expected = self.config.num_params()
        if params.shape != (expected,) or params.dtype != self.dtype:
            raise ValueError(f"params: expected a 1-D {self.dtype} array of {expected} elements, "
                             f"got {params.dtype} array of shape {tuple(params.shape)}")
        if not params.flags.c_contiguous:
            raise ValueError("params: the array must be contiguous (layers are views into it)")
        return params

    @property
    def params(self):
        """The flat parameter buffer (every affine A and b is a view into it)."""
        return self._params

    def set_params(self, values) -> None:
        """Copy ``values`` (host or device, same size) into the buffer."""
        if tuple(values.shape) != self._params.shape:
            raise ValueError(f"set_params: expected shape {self._params.shape}, "
                             f"got {tuple(values.shape)}")
        self._params[...] = backend.array_module(self._params).asarray(values)

    def layer_param_slices(self) -> list[tuple[str, int, tuple[int, ...]]]:
        """``(name, offset, shape)`` of every parameter block of ``params``."""
        slices, offset = [], 0
        for index, (out_dim, in_dim) in enumerate(self.config.affine_shapes()):
            slices.append((f"affine{index}/linear", offset, (out_dim, in_dim)))
            offset += out_dim * in_dim
            slices.append((f"affine{index}/bias", offset, (out_dim,)))
            offset += out_dim
        return slices

    # ------------------------------------------------------------------ input transform

    def set_input_transform(self, matrix, bias) -> None:
        """Install ``y = M x + m0`` before the first affine layer (M is
        input_dim x input_dim; an LDA-like transform keeps the dimension)."""
        xp = backend.xp()
        matrix = xp.asarray(matrix, dtype=self.dtype)
        bias = xp.asarray(bias, dtype=self.dtype)
        dim = self.config.input_dim
        if matrix.shape != (dim, dim) or bias.shape != (dim,):
            raise ValueError(f"input transform: expected a {dim} x {dim} matrix and a ({dim},) "
                             f"bias, got {tuple(matrix.shape)} and {tuple(bias.shape)}")
        self.input_transform = FixedAffine(matrix, bias)

    def set_input_normalization(self, mean, std) -> None:
        """Install per-dimension ``(x - mean) / std`` as the input transform."""
        xp = backend.xp()
        mean = xp.asarray(mean, dtype=self.dtype)
        std = xp.asarray(std, dtype=self.dtype)
        if mean.shape != (self.config.input_dim,) or std.shape != mean.shape:
            raise ValueError(f"input normalization: mean and std must have shape "
                             f"({self.config.input_dim},), got {tuple(mean.shape)} and "
                             f"{tuple(std.shape)}")
        self.input_transform = FixedAffine.from_mean_std(mean, std)

    def set_output_scale(self, scales) -> None:
        """Install (or replace) a fixed per-class scale of the final affine layer's output,
        before the softmax (Kaldi FixedScaleComponent)."""
        xp = backend.xp()
        scales = xp.asarray(scales, dtype=self.dtype)
        if scales.shape != (self.config.num_classes,):
            raise ValueError(f"output scale: expected shape ({self.config.num_classes},), "
                             f"got {tuple(scales.shape)}")
        if self.output_scale is not None:
            self.layers.remove(self.output_scale)
        self.output_scale = FixedScale(scales)
        self.layers.insert(len(self.layers) - 1, self.output_scale)

    # ------------------------------------------------------------------ buffers

    def reserve_rows(self, rows: int) -> None:
        """Room for ``rows`` more rows after every 2-D training buffer of the
        layers (``Workspace.reserve_rows``)."""
        for layer in self.layers:
            if hasattr(layer, "work"):
                layer.work.reserve_rows(rows)

    def with_rows_after(self, array, rows: int):
        """``array`` (a layer's training buffer, e.g. an affine layer's
        ``out_deriv``) extended by ``rows`` spare rows of its memory, or None
        (``Workspace.with_rows_after``)."""
        for layer in self.layers:
            if hasattr(layer, "work"):
                extended = layer.work.with_rows_after(array, rows)
                if extended is not None:
                    return extended
        return None

    # ------------------------------------------------------------------ passes

    def _check_input(self, X) -> None:
        if X.ndim != 2 or X.shape[1] != self.config.input_dim or X.dtype != self.dtype:
            raise ValueError(f"X: expected an N x {self.config.input_dim} {self.dtype} matrix, "
                             f"got {X.dtype} array of shape {tuple(X.shape)}")

    def forward(self, X, train: bool = True):
        """Log posteriors (N x C).  With ``train`` the layers cache for backward."""
        self._check_input(X)
        h = X if self.input_transform is None else self.input_transform.forward(X)
        for layer in self.layers:
            h = layer.forward(h, train)
        return h

    def backward(self, labels) -> None:
        """After ``forward(X, train=True)``: leave (X, G) in every affine layer."""
        deriv = self.layers[-1].backward(labels)
        first = self.layers[0]
        for layer in reversed(self.layers[1:-1]):
            deriv = layer.backward(deriv)
        first.backward(deriv, need_input_deriv=False)

    def _stats(self, log_probs, labels) -> tuple[float, int]:
        """(sum_n log p_n(label_n), #frames whose argmax is the label), with one
        host transfer that also carries the count of out-of-range labels."""
        xp = backend.array_module(log_probs)
        num_classes = self.config.num_classes
        num_bad = ((labels < 0) | (labels >= num_classes)).sum(dtype=np.float64)
        labels = xp.clip(labels, 0, num_classes - 1)      # indexable; rejected below if bad
        sum_logprob = log_probs[xp.arange(log_probs.shape[0]), labels].sum(dtype=np.float64)
        num_correct = (log_probs.argmax(axis=1) == labels).sum(dtype=np.float64)
        stats = backend.to_host(xp.stack([sum_logprob, num_correct, num_bad]))
        if stats[2] > 0:
            raise ValueError(f"labels: {int(stats[2])} value(s) outside [0, {num_classes})")
        return float(stats[0]), int(stats[1])

    def _check_labels(self, labels, num_rows: int) -> None:
        if labels.shape != (num_rows,) or labels.dtype.kind not in "iu":
            raise ValueError(f"labels: expected an integer vector of length {num_rows}, "
                             f"got {labels.dtype} array of shape {tuple(labels.shape)}")

    def train_gradients(self, X, labels) -> tuple[float, int]:
        """Forward + backward on one minibatch; returns (sum_logprob, num_correct).
        ``labels``: integer class ids in [0, num_classes), on the same device as X."""
        self._check_labels(labels, X.shape[0])
        log_probs = self.forward(X, train=True)
        stats = self._stats(log_probs, labels)
        self.backward(labels)
        return stats

    def evaluate(self, X, labels) -> tuple[float, int]:
        """(sum_logprob, num_correct) without touching the training caches."""
        self._check_labels(labels, X.shape[0])
        return self._stats(self.forward(X, train=False), labels)

    def log_probs(self, X):
        return self.forward(X, train=False)


# ----------------------------------------------------------------------------- recipe helpers

def _hidden_init(cfg: NetworkConfig, in_dim: int, out_dim: int, rng) -> np.ndarray:
    """[A, b] of a fresh hidden affine layer (row-major A, then b): the recipes' param-stddev
    and bias-stddev (module docstring)."""
    stddev = 1.0 / math.sqrt(cfg.pnorm_input_dim if cfg.nonlinearity == "pnorm" else in_dim)
    return np.concatenate([stddev * rng.standard_normal(out_dim * in_dim),
                           HIDDEN_BIAS_STDDEV * rng.standard_normal(out_dim)])


def insert_hidden_layer(network: Network, seed) -> Network:
    """A new network with one more hidden block inserted before the final affine layer
    (Kaldi: ``nnet-init hidden.config | nnet-insert``).

    The existing hidden layers keep their parameters; the new one is initialised like the
    initial hidden layers; the final affine layer is re-initialised as ``nnet-insert`` does
    by default (set to zero, then ``N(0, (0.1 / sqrt(fan_in))^2)`` added to A and b).  The
    input transform and output scale carry over.  ``seed`` (an int or a sequence of ints)
    seeds the new draws.  The result is a new buffer layout (module docstring)."""
    cfg = network.config
    if cfg.num_hidden_layers < 1:
        raise ValueError("insert_hidden_layer: the network needs at least one hidden layer")
    grown = cfg.replace(num_hidden_layers=cfg.num_hidden_layers + 1)
    old = backend.to_host(network.params)
    kept = sum(o * i + o for o, i in cfg.affine_shapes()[:-1])       # hidden layers, unchanged
    rng = np.random.default_rng(seed)
    new_out, new_in = grown.affine_shapes()[-2]
    final_out, final_in = grown.affine_shapes()[-1]
    final_stddev = INSERT_STDDEV_FACTOR / math.sqrt(final_in)
    params = np.concatenate([old[:kept], _hidden_init(grown, new_in, new_out, rng),
                             final_stddev * rng.standard_normal(final_out * final_in + final_out)])
    result = Network(grown, params=params.astype(network.dtype), dtype=network.dtype)
    result.input_transform = network.input_transform
    if network.output_scale is not None:
        result.set_output_scale(network.output_scale.scales)
    return result


def presoftmax_prior_scale(class_counts, power: float) -> np.ndarray:
    """The recipes' FixedScaleComponent before the softmax (train_pnorm_simple2.sh's awk on
    ``post-to-tacc --per-pdf`` counts): smoothed priors to the power ``power`` (-0.25),
    normalised to mean 1.

        a = int(total / C);  p_i = (n_i + 0.01 a) / (total + 0.01 a C);  s_i = p_i^power / mean_j p_j^power
    """
    counts = np.asarray(class_counts, np.float64)
    # awk's int() truncates; at least 1 so that an unseen class (count 0) still gets a finite
    # scale when there are fewer frames than classes (Kaldi would divide by zero there)
    average = max(1.0, float(int(counts.sum() / counts.size)))
    smoothed = counts + PRIOR_SMOOTHING * average
    scales = (smoothed / smoothed.sum()) ** power
    return scales / scales.mean()
