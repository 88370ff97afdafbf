"""Tests of fbank extraction and CMVN (ngsgd_mpi/corpus/features.py)."""

import os

import numpy as np
import pytest

from ngsgd_mpi.corpus import features

try:
    import kaldi_native_fbank  # noqa: F401
except ImportError:
    if os.environ.get("CI"):
        raise
    pytest.skip("kaldi-native-fbank not installed", allow_module_level=True)


def test_frame_count_matches_kaldi_snip_edges():
    for n in (399, 400, 559, 560, 16000):
        audio = np.random.default_rng(n).standard_normal(n) * 100
        assert features.compute_fbank(audio).shape == (features.num_frames(n), 40)
    assert features.num_frames(16000) == 98


def test_fbank_puts_a_tone_in_the_right_mel_bin():
    t = np.arange(16000) / 16000.0
    low = features.compute_fbank(np.sin(2 * np.pi * 300 * t) * 3000)
    high = features.compute_fbank(np.sin(2 * np.pi * 5000 * t) * 3000)
    assert np.argmax(low.mean(0)) < 10
    assert np.argmax(high.mean(0)) > 30


def test_speaker_cmvn_gives_zero_mean_unit_variance_over_the_speaker():
    rng = np.random.default_rng(0)
    feats = [rng.standard_normal((n, 40)) * 3 + 7 for n in (50, 80, 30)]
    normed = features.apply_speaker_cmvn(feats)
    stacked = np.concatenate(normed)
    assert [len(f) for f in normed] == [50, 80, 30] and stacked.dtype == np.float32
    np.testing.assert_allclose(stacked.mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(stacked.std(0), 1, atol=1e-4)
