"""apply-cmvn and add-deltas (ngsgd_mpi/kaldi/feats.py) against their definitions."""

import numpy as np
import pytest

from ngsgd_mpi.kaldi.feats import CmvnError, add_deltas, apply_cmvn, delta_windows, parse_cmvn_opts


def stats_of(x):
    x = np.asarray(x, np.float64)
    return np.vstack([np.r_[x.sum(0), len(x)], np.r_[(x * x).sum(0), 0.0]])


def test_means_only_subtracts_the_speaker_mean():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((50, 13)) * 3 + 7).astype(np.float32)
    other = (rng.standard_normal((80, 13)) + 2).astype(np.float32)   # the speaker's other utterances
    stats = stats_of(np.vstack([x, other]))
    out = apply_cmvn(x, stats)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, x - stats[0, :13] / stats[0, 13], atol=2e-6)
    np.testing.assert_array_equal(apply_cmvn(x, stats, norm_means=False), x)


def test_means_and_variances():
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((200, 5)) * [1, 2, 3, 4, 5] - 3).astype(np.float32)
    out = apply_cmvn(x, stats_of(x), norm_vars=True)
    np.testing.assert_allclose(out.mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(out.std(0), 1, atol=1e-5)


def test_variance_floor_and_refusals():
    x = np.ones((4, 2), np.float32)                      # zero variance: floored at 1e-20, no inf/nan
    out = apply_cmvn(x, stats_of(x), norm_vars=True)
    assert np.all(np.isfinite(out))
    with pytest.raises(CmvnError, match="count"):
        apply_cmvn(x, np.zeros((2, 3)))
    with pytest.raises(CmvnError, match="2 x 3"):
        apply_cmvn(x, np.zeros((2, 4)))
    with pytest.raises(CmvnError, match="mean normalisation"):
        apply_cmvn(x, stats_of(x), norm_means=False, norm_vars=True)
    with pytest.raises(CmvnError, match="variance row"):
        apply_cmvn(x, stats_of(x)[:1], norm_vars=True)


def test_cmvn_opts():
    assert parse_cmvn_opts("") == (True, False)
    assert parse_cmvn_opts("--norm-vars=true") == (True, True)
    assert parse_cmvn_opts("--norm-means=false") == (False, False)
    for bad in ("--norm-vars=yes", "--center=true", "--norm-means=false --norm-vars=true"):
        with pytest.raises(CmvnError):
            parse_cmvn_opts(bad)


def test_delta_windows_are_kaldis():
    w0, w1, w2 = delta_windows(2, 2)
    np.testing.assert_array_equal(w0, [1])
    np.testing.assert_allclose(w1, np.arange(-2, 3) / 10, rtol=1e-7)
    np.testing.assert_allclose(w2, np.convolve(w1, w1), rtol=1e-6)   # the window applied twice
    assert abs(w2.sum()) < 1e-7 and abs(w1.sum()) < 1e-7


def test_add_deltas_matches_a_padded_convolution():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((30, 4)).astype(np.float32)
    out = add_deltas(x)
    assert out.shape == (30, 12) and out.dtype == np.float32
    np.testing.assert_array_equal(out[:, :4], x)
    for k, w in enumerate(delta_windows(2, 2)[1:], 1):
        half = len(w) // 2
        padded = np.concatenate([np.repeat(x[:1], half, 0), x, np.repeat(x[-1:], half, 0)]).astype(np.float64)
        expect = np.stack([np.convolve(padded[:, d], w[::-1], "valid") for d in range(4)], 1)
        np.testing.assert_allclose(out[:, 4 * k:4 * (k + 1)], expect, atol=1e-5)
    # a linear ramp has delta = slope and delta-delta = 0 away from the edges
    ramp = np.arange(20, dtype=np.float32)[:, None] * 0.5
    out = add_deltas(ramp)
    np.testing.assert_allclose(out[4:-4, 1], 0.5, atol=1e-6)
    np.testing.assert_allclose(out[4:-4, 2], 0.0, atol=1e-6)
    np.testing.assert_array_equal(add_deltas(x, order=0), x)
