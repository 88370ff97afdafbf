"""The model file: a trained network and everything needed to use it on new features.

``final.h5`` and every checkpoint's ``model.h5`` are a :class:`Model` written with
``storage.write``:

    params        (P,) float32    the flat parameter buffer (layout: network.py)
    input_mean    (D,) float32    fixed input normalisation per spliced input dimension
    input_std     (D,) float32      (absent when input_normalization was off)
    input_transform_matrix (D, D) float32  LDA-like fixed input transform y = M x + m0
    input_transform_bias   (D,)   float32    (lda_transform; then there is no input_mean/std)
    output_scale  (C,) float32    fixed scale before the softmax (prior_scale_power)
    class_counts  (C,) float64    training frames per class (label frequencies)
    class_priors  (C,) float64    class_counts / their sum
    posterior_priors (C,) float64 the average posterior of the final model over training frames
                                  (priors.py, as nnet-adjust-priors; final.h5 only): what
                                  log-likelihood output divides by
    meta: network_config, train_config, context, input_pipeline (CMVN options and targets, see
          kaldi/pipeline.py; null when unknown), and what the writer adds
          (period, batch, samples, combined_models)

The input pipeline of a frame is: CMVN (input_pipeline) -> splicing (context) -> normalisation
(input_mean / input_std) or the LDA-like transform -> the network (output_scale before its softmax).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np

from . import storage
from .faults import InputError
from .kaldi.pipeline import InputPipeline, PipelineError
from .network import Network, NetworkConfig
from .options import ConfigError

MODEL_FORMAT = "ngsgd_mpi.model"


class ModelError(InputError):
    """A model file that cannot be used (the message names it)."""


@dataclass(frozen=True)
class Model:
    network_config: NetworkConfig
    params: np.ndarray                    # host float32, network_config.num_params() values
    context: int                          # frames of context on each side the network was trained with
    input_mean: np.ndarray | None = None  # per spliced input dimension
    input_std: np.ndarray | None = None
    class_counts: np.ndarray | None = None
    train_config: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)      # period, batch, samples, combined_models
    posterior_priors: np.ndarray | None = None    # (C,) average posterior over training frames
    input_pipeline: InputPipeline | None = None   # CMVN and targets (None: unknown)
    input_transform: tuple[np.ndarray, np.ndarray] | None = None   # (M, m0) of an LDA-like transform
    output_scale: np.ndarray | None = None        # per-class scale before the softmax

    @property
    def feat_dim(self) -> int:
        """Dimension of one (unspliced) feature frame."""
        return self.network_config.input_dim // (2 * self.context + 1)

    @property
    def class_priors(self) -> np.ndarray | None:
        if self.class_counts is None:
            return None
        return self.class_counts / max(float(self.class_counts.sum()), 1.0)

    def replace(self, **changes) -> "Model":
        return dataclasses.replace(self, **changes)

    def network(self):
        """A Network on the backend's device with these parameters and input normalisation."""
        network = Network(self.network_config, params=self.params)
        if self.input_mean is not None:
            network.set_input_normalization(self.input_mean, self.input_std)
        if self.input_transform is not None:
            network.set_input_transform(*self.input_transform)
        if self.output_scale is not None:
            network.set_output_scale(self.output_scale)
        return network

    def save(self, path: str) -> None:
        record = {"params": np.asarray(self.params, np.float32)}
        if self.input_mean is not None:
            record["input_mean"] = np.asarray(self.input_mean, np.float32)
            record["input_std"] = np.asarray(self.input_std, np.float32)
        if self.input_transform is not None:
            record["input_transform_matrix"] = np.asarray(self.input_transform[0], np.float32)
            record["input_transform_bias"] = np.asarray(self.input_transform[1], np.float32)
        if self.output_scale is not None:
            record["output_scale"] = np.asarray(self.output_scale, np.float32)
        if self.class_counts is not None:
            record["class_counts"] = np.asarray(self.class_counts, np.float64)
            record["class_priors"] = self.class_priors
        if self.posterior_priors is not None:
            record["posterior_priors"] = np.asarray(self.posterior_priors, np.float64)
        meta = {**self.info, "network_config": self.network_config.to_dict(),
                "train_config": self.train_config, "context": self.context,
                "input_pipeline": None if self.input_pipeline is None else self.input_pipeline.to_dict()}
        storage.write(path, MODEL_FORMAT, record, meta)

    @classmethod
    def load(cls, path: str) -> "Model":
        """The verified model file at ``path``; ModelError / StorageError naming it otherwise."""
        record, meta = storage.read(path, MODEL_FORMAT)
        try:
            net_cfg = NetworkConfig.from_dict(meta.pop("network_config"))
        except (KeyError, TypeError, ConfigError) as exc:
            raise ModelError(f"{path}: bad or missing network_config ({exc})") from None
        context = meta.pop("context", None)
        if isinstance(context, bool) or not isinstance(context, int) or context < 0 \
                or net_cfg.input_dim % (2 * context + 1):
            raise ModelError(f"{path}: context {context!r} does not divide input_dim {net_cfg.input_dim} "
                             f"into 2 * context + 1 frames")
        train_config = meta.pop("train_config", {})
        params = record.get("params")
        if not isinstance(params, np.ndarray) or params.dtype != np.float32 \
                or params.shape != (net_cfg.num_params(),):
            raise ModelError(f"{path}: 'params' must be {net_cfg.num_params()} float32 values for its "
                             f"architecture, got {getattr(params, 'dtype', None)} {getattr(params, 'shape', None)}")
        mean, std = record.get("input_mean"), record.get("input_std")
        if (mean is None) != (std is None) or (mean is not None and not (
                mean.shape == std.shape == (net_cfg.input_dim,) and np.all(np.isfinite(mean))
                and np.all(std > 0))):
            raise ModelError(f"{path}: input_mean/input_std must both be ({net_cfg.input_dim},) with "
                             f"finite means and positive deviations")
        counts = record.get("class_counts")
        if counts is not None and (counts.shape != (net_cfg.num_classes,) or np.any(counts < 0)):
            raise ModelError(f"{path}: class_counts must be ({net_cfg.num_classes},) non-negative counts")
        priors = record.get("posterior_priors")
        if priors is not None and (priors.shape != (net_cfg.num_classes,) or not np.all(np.isfinite(priors))
                                   or np.any(priors < 0) or abs(float(priors.sum()) - 1.0) > 1e-6):
            raise ModelError(f"{path}: posterior_priors must be ({net_cfg.num_classes},) non-negative "
                             f"values summing to 1")
        pipeline = meta.pop("input_pipeline", None)
        try:
            if pipeline is not None:
                pipeline = InputPipeline.from_dict(pipeline, f"{path}: input_pipeline")
        except PipelineError as exc:
            raise ModelError(str(exc)) from None
        matrix, bias = record.get("input_transform_matrix"), record.get("input_transform_bias")
        dim = net_cfg.input_dim
        if (matrix is None) != (bias is None) or (matrix is not None and not (
                matrix.shape == (dim, dim) and bias.shape == (dim,) and np.all(np.isfinite(matrix))
                and np.all(np.isfinite(bias)))):
            raise ModelError(f"{path}: input_transform_matrix/_bias must both be finite, ({dim}, {dim}) "
                             f"and ({dim},)")
        scale = record.get("output_scale")
        if scale is not None and (scale.shape != (net_cfg.num_classes,) or not np.all(np.isfinite(scale))
                                  or np.any(scale <= 0)):
            raise ModelError(f"{path}: output_scale must be ({net_cfg.num_classes},) positive values")
        return cls(net_cfg, params, context, mean, std, counts, train_config, meta, priors, pipeline,
                   None if matrix is None else (matrix, bias), scale)
