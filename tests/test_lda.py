"""The LDA-like input transform (lda.py): the properties equations (L1)-(L7) promise."""

import numpy as np
import pytest

from ngsgd_mpi import lda


def labelled(seed=0, num_classes=12, dim=5, frames=4000):
    """Gaussian classes with a shared, correlated within-class covariance."""
    rng = np.random.default_rng(seed)
    means = 2.0 * rng.standard_normal((num_classes, dim))
    mix = rng.standard_normal((dim, dim))
    labels = rng.integers(0, num_classes, frames)
    X = means[labels] + rng.standard_normal((frames, dim)) @ mix.T + 3.0
    return X, labels


def stats_of(X, labels, num_classes=12):
    stats = lda.LdaStats.zeros(X.shape[1], num_classes)
    stats.accumulate(X, labels)
    return stats


def covariances(Y, labels):
    """(within-class, between-class) covariance of Y by its labels."""
    mean = Y.mean(axis=0)
    within = np.zeros((Y.shape[1],) * 2)
    between = np.zeros_like(within)
    for c in np.unique(labels):
        rows = Y[labels == c]
        d = rows - rows.mean(axis=0)
        within += d.T @ d
        m = rows.mean(axis=0) - mean
        between += len(rows) * np.outer(m, m)
    return within / len(Y), between / len(Y)


def test_accumulating_in_blocks_or_on_several_ranks_is_the_same():
    X, labels = labelled()
    whole = stats_of(X, labels)
    parts = [stats_of(X[i::3], labels[i::3]) for i in range(3)]         # three "ranks"
    for key, value in whole.as_dict().items():
        np.testing.assert_allclose(sum(p.as_dict()[key] for p in parts), value, rtol=1e-12)
    assert whole.counts.sum() == len(X)
    np.testing.assert_allclose(whole.sums[4], X[labels == 4].sum(axis=0))


def test_plain_lda_whitens_within_and_diagonalises_between():
    X, labels = labelled()
    M, m0 = lda.estimate(stats_of(X, labels), within_class_factor=1.0, max_singular_value=0)
    Y = X @ M.T + m0
    np.testing.assert_allclose(Y.mean(axis=0), 0, atol=1e-10)                # (L7)
    within, between = covariances(Y, labels)
    np.testing.assert_allclose(within, np.eye(5), atol=1e-9)                  # (L3)
    lam = np.diag(between)
    np.testing.assert_allclose(between, np.diag(lam), atol=1e-9)              # (L4)
    assert np.all(np.diff(lam) <= 0)


def test_within_class_factor_shrinks_the_non_discriminative_directions():
    X, labels = labelled()
    stats = stats_of(X, labels)
    plain, _ = lda.estimate(stats, within_class_factor=1.0, max_singular_value=0)
    lam = np.diag(covariances(X @ plain.T, labels)[1])
    M, m0 = lda.estimate(stats, within_class_factor=0.01, max_singular_value=0)
    within, between = covariances(X @ M.T + m0, labels)
    np.testing.assert_allclose(np.diag(within), (0.01 + lam) / (1 + lam), rtol=1e-8)   # (L5)
    np.testing.assert_allclose(np.diag(within + between), 0.01 + lam, rtol=1e-8)


def test_singular_values_are_capped():
    X, labels = labelled()
    X = X * 0.01                                   # tiny features: a large transform
    M, _ = lda.estimate(stats_of(X, labels), max_singular_value=5.0)
    assert np.linalg.svd(M, compute_uv=False).max() == pytest.approx(5.0, rel=1e-9)   # (L6)
    uncapped, _ = lda.estimate(stats_of(X, labels), max_singular_value=0)
    assert np.linalg.svd(uncapped, compute_uv=False).max() > 5.0


def test_transform_undoes_a_linear_change_of_the_input():
    """Kaldi's aim: training invariant to any invertible linear map of the features."""
    X, labels = labelled()
    A = np.random.default_rng(5).standard_normal((5, 5)) + 3 * np.eye(5)
    M, m0 = lda.estimate(stats_of(X, labels), max_singular_value=0)
    M2, m02 = lda.estimate(stats_of(X @ A.T + 1.0, labels), max_singular_value=0)
    Y, Y2 = X @ M.T + m0, (X @ A.T + 1.0) @ M2.T + m02
    signs = np.sign(np.sum(Y * Y2, axis=0))                                   # eigenvector signs
    np.testing.assert_allclose(Y2 * signs, Y, atol=1e-7)


def test_singular_within_class_covariance_is_smoothed():
    X, labels = labelled()
    X = np.concatenate([X, X[:, :1]], axis=1)       # a duplicated dimension: W is singular
    M, m0 = lda.estimate(stats_of(X, labels))
    assert np.all(np.isfinite(M)) and np.all(np.isfinite(m0)) and M.shape == (6, 6)


def test_no_frames_is_an_error():
    with pytest.raises(ValueError, match="no frames"):
        lda.estimate(lda.LdaStats.zeros(3, 4))
