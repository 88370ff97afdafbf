"""Kaldi-compatible 40-dim log-mel filterbanks and per-speaker CMVN.

Features are computed with kaldi-native-fbank (a C++ reimplementation of
Kaldi's ``compute-fbank-feats``) at 16 kHz with Kaldi's defaults -- 25 ms povey
window, 10 ms shift, pre-emphasis 0.97, DC removal, snip_edges=true (frame t
covers samples [160 t, 160 t + 400)), 40 mel bins from 20 Hz to 8 kHz, log of
power -- except dither, which is 0 here because the augmenter already adds a
seeded dither floor (keeps the corpus reproducible).

CMVN: each speaker's frames are shifted and scaled to zero mean and unit
variance per dimension, with statistics over all of that speaker's
utterances (Kaldi's ``apply-cmvn --norm-vars=true`` with ``spk2utt``).
"""

from __future__ import annotations

import numpy as np

NUM_MEL_BINS = 40
FRAME_SHIFT = 160      # samples at 16 kHz (10 ms)
FRAME_LENGTH = 400     # samples at 16 kHz (25 ms)


def _import_knf():
    try:
        import kaldi_native_fbank
    except ImportError as exc:
        raise ImportError("the corpus recipe needs kaldi-native-fbank: "
                          "pip install 'ngsgd_mpi[corpus]'") from exc
    return kaldi_native_fbank


def fbank_options(sample_rate: int = 16000, num_mel_bins: int = NUM_MEL_BINS):
    knf = _import_knf()
    opts = knf.FbankOptions()
    opts.frame_opts.samp_freq = sample_rate
    opts.frame_opts.frame_shift_ms = 10.0
    opts.frame_opts.frame_length_ms = 25.0
    opts.frame_opts.dither = 0.0
    opts.frame_opts.snip_edges = True
    opts.mel_opts.num_bins = num_mel_bins
    return opts


def num_frames(num_samples: int) -> int:
    """Kaldi frame count with snip_edges=true."""
    return 0 if num_samples < FRAME_LENGTH else 1 + (num_samples - FRAME_LENGTH) // FRAME_SHIFT


def compute_fbank(audio: np.ndarray, sample_rate: int = 16000, opts=None) -> np.ndarray:
    """(frames, 40) float32 log-mel filterbank of int16-scaled ``audio``."""
    knf = _import_knf()
    computer = knf.OnlineFbank(opts if opts is not None else fbank_options(sample_rate))
    computer.accept_waveform(sample_rate, np.asarray(audio, dtype=np.float32))
    computer.input_finished()
    n = computer.num_frames_ready
    if n == 0:
        return np.zeros((0, NUM_MEL_BINS), dtype=np.float32)
    return np.stack([computer.get_frame(i) for i in range(n)]).astype(np.float32)


def apply_speaker_cmvn(feats_list) -> list[np.ndarray]:
    """Mean- and variance-normalise a speaker's utterances with statistics over all of them."""
    stacked = np.concatenate([np.asarray(f, dtype=np.float64) for f in feats_list], axis=0)
    mean = stacked.mean(axis=0)
    std = np.sqrt(np.maximum(stacked.var(axis=0), 1e-10))
    return [((f - mean) / std).astype(np.float32) for f in feats_list]
