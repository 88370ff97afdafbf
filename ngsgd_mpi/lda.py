"""The LDA-like input transform of Kaldi's nnet2 recipes (``get_lda.sh`` ->
``acc-lda`` + ``nnet-get-feature-transform``), a fixed layer ``y = M x + m0`` on the spliced
input frames, estimated once before training and saved with the model.

It removes the mean, makes the within-class covariance unit, and then shrinks the
directions with little between-class variance, so that "nuisance" directions cannot
dominate the first layer's input; a cap on the singular values keeps it from blowing any
direction up.  From the statistics of labelled frames x_t (class c_t), accumulated in
float64 and summed over ranks (``n_c`` frames, ``s_c`` sum of class c, ``S`` = sum x x^T):

    (L1)  n = sum_c n_c,  mu = sum_c s_c / n,  T = S / n - mu mu^T        total covariance
    (L2)  B = sum_c (n_c / n) m_c m_c^T - mu mu^T,  m_c = s_c / n_c      between-class covariance
    (L3)  W = T - B = L L^T                                              within-class, Cholesky
          (if W is not positive definite: W += 1e-3 tr(W)/D I, as Kaldi)
    (L4)  L^-1 B L^-T = U diag(lambda) U^T,   lambda sorted descending   (an SVD in Kaldi)
    (L5)  M = U^T L^-1;   row i *= sqrt((f + lambda_i) / (1 + lambda_i))  f = within_class_factor
    (L6)  M = P diag(sigma) Q^T;   sigma_i <- min(sigma_i, max_singular_value)
    (L7)  m0 = -M mu                                                     (remove_offset)

After (L5) the within-class variance of direction i is (f + lambda_i) / (1 + lambda_i) and
the total variance f + lambda_i: ~lambda_i for discriminative directions, ~f for the others.
The defaults are those of get_lda.sh (``within_class_factor = 0.0001``; the C++ default is
0.001), ``max_singular_value = 5`` and no dimension reduction (``--dim`` unset: the output
dimension is the spliced input dimension).  Kaldi's ``acc-lda --rand-prune`` only prunes
small posteriors (ours are one-hot), and ``weight-silence-post 0.0`` leaves silence frames
out of the statistics; here every frame of the chosen utterances counts (the partitions do
not say which classes are silence).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

WITHIN_CLASS_FACTOR = 1e-4      # get_lda.sh --within-class-factor
MAX_SINGULAR_VALUE = 5.0        # nnet-get-feature-transform --max-singular-value
CHOLESKY_SMOOTHING = 1e-3       # FeatureTransformEstimate: added (x tr(W)/D) when W is singular


@dataclass
class LdaStats:
    """Sufficient statistics (acc-lda): per-class frame counts and sums, total scatter."""
    counts: np.ndarray      # (C,) float64
    sums: np.ndarray        # (C, D) float64
    scatter: np.ndarray     # (D, D) float64, sum of x x^T

    @classmethod
    def zeros(cls, dim: int, num_classes: int) -> "LdaStats":
        return cls(np.zeros(num_classes), np.zeros((num_classes, dim)), np.zeros((dim, dim)))

    def accumulate(self, X, labels) -> None:
        """Add frames X (N x D, any float dtype) with integer class labels (N,)."""
        X = np.asarray(X, np.float64)
        labels = np.asarray(labels, np.int64)
        order = np.argsort(labels, kind="stable")
        classes, starts = np.unique(labels[order], return_index=True)
        self.sums[classes] += np.add.reduceat(X[order], starts, axis=0)
        self.counts += np.bincount(labels, minlength=len(self.counts))
        self.scatter += X.T @ X

    def as_dict(self) -> dict:
        return {"counts": self.counts, "sums": self.sums, "scatter": self.scatter}


def estimate(stats: LdaStats, within_class_factor: float = WITHIN_CLASS_FACTOR,
             max_singular_value: float = MAX_SINGULAR_VALUE) -> tuple[np.ndarray, np.ndarray]:
    """(M, m0): the transform ``y = M x + m0`` (D x D, D), equations (L1)-(L7)."""
    n = stats.counts.sum()
    if n <= 0:
        raise ValueError("LDA statistics: no frames")
    dim = stats.scatter.shape[0]
    mean = stats.sums.sum(axis=0) / n                                     # (L1)
    total = stats.scatter / n - np.outer(mean, mean)
    seen = stats.counts > 0
    class_means = stats.sums[seen] / stats.counts[seen, None]
    between = (class_means.T * (stats.counts[seen] / n)) @ class_means - np.outer(mean, mean)  # (L2)
    within = total - between                                              # (L3)
    try:
        chol = np.linalg.cholesky(within)
    except np.linalg.LinAlgError:
        within = within + CHOLESKY_SMOOTHING * np.trace(within) / dim * np.eye(dim)
        chol = np.linalg.cholesky(within)
    chol_inv = np.linalg.inv(chol)
    normalized_between = chol_inv @ between @ chol_inv.T                  # (L4)
    normalized_between = 0.5 * (normalized_between + normalized_between.T)
    lam, vectors = np.linalg.eigh(normalized_between)
    order = np.argsort(lam)[::-1]
    lam, vectors = np.maximum(lam[order], 0.0), vectors[:, order]     # PSD: rounding only below 0
    matrix = vectors.T @ chol_inv                                         # (L5)
    if within_class_factor != 1.0:
        matrix *= np.sqrt((within_class_factor + lam) / (1.0 + lam))[:, None]
    if max_singular_value > 0:                                            # (L6)
        left, sigma, right_t = np.linalg.svd(matrix)
        if sigma.max() > max_singular_value:
            matrix = (left * np.minimum(sigma, max_singular_value)) @ right_t
    return matrix, -matrix @ mean                                         # (L7)
