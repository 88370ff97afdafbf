"""Kaldi's yesno run in ../shared/kaldi/yesno_decode: paths and its GMM log-likelihoods.

The log-likelihoods are what gmm-latgen-faster scored (decode.1.log): features =
apply-cmvn (global speaker, means only: cmvn_opts is empty) + add-deltas, then the
diagonal GMMs of final.mdl.
"""

import functools
import os

import numpy as np
import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "kaldi", "yesno_decode")
EXP = os.path.join(ROOT, "exp", "mono0a")
GRAPH = os.path.join(EXP, "graph_tgpr")
DECODE = os.path.join(EXP, "decode_test_yesno")
TEXT = os.path.join(ROOT, "data", "test_yesno", "text")
ACWT = 0.083333                       # gmm-latgen-faster --acoustic-scale


def require():
    if not os.path.isdir(ROOT):
        pytest.skip("../shared/kaldi/yesno_decode not available")
    return ROOT


@functools.lru_cache(maxsize=1)
def loglikes() -> dict:
    """utterance -> (frames, 11) float32 GMM log-likelihoods, in feats.scp order."""
    kaldiio = pytest.importorskip("kaldiio")
    from ngsgd_mpi.kaldi.feats import add_deltas, apply_cmvn, parse_cmvn_opts
    from ngsgd_mpi.kaldi.model import read_gmm_model

    require()
    _, am = read_gmm_model(os.path.join(EXP, "final.mdl"))
    with open(os.path.join(EXP, "cmvn_opts")) as f:
        norm_means, norm_vars = parse_cmvn_opts(f.read())
    with open(os.path.join(ROOT, "data", "test_yesno", "cmvn.scp")) as f:
        speaker, location = f.read().split()
    stats = kaldiio.load_mat(os.path.join(ROOT, location))
    out = {}
    with open(os.path.join(ROOT, "data", "test_yesno", "feats.scp")) as f:
        for line in f:
            utt, location = line.split()
            feats = kaldiio.load_mat(os.path.join(ROOT, location))
            feats = add_deltas(apply_cmvn(feats, stats, norm_means, norm_vars))
            out[utt] = am.log_likelihoods(feats).astype(np.float32)
    return out


def kaldi_decode_log() -> dict:
    """utterance -> (words, log-like per frame, frames) from Kaldi's decode.1.log."""
    out, words = {}, {}
    with open(os.path.join(DECODE, "log", "decode.1.log")) as f:
        for line in f:
            fields = line.split()
            if "Log-like per frame for utterance" in line:
                utt = fields[fields.index("utterance") + 1]
                out[utt] = (words[utt], float(fields[fields.index("is") + 1]), int(fields[fields.index("over") + 1]))
            elif fields and fields[0].startswith(("0_", "1_")):
                words[fields[0]] = fields[1:]
    return out
