"""Tests of the shipped demo corpus (ngsgd_mpi/corpus/demo.py, ngsgd_mpi/demo_corpus.npz)."""

import numpy as np
import pytest

from ngsgd_mpi.corpus import demo, load_demo_corpus
from ngsgd_mpi.corpus.phones import PHONES


@pytest.fixture(scope="module")
def corpus():
    return load_demo_corpus()


def test_demo_file_is_small_and_loads_without_pickle():
    assert demo.DEMO_CORPUS_PATH.stat().st_size <= 4.2e6
    with np.load(demo.DEMO_CORPUS_PATH, allow_pickle=False) as archive:
        assert archive["label_kind"].shape == () and archive["label_kind"].dtype.kind == "U"
        assert archive["train_utt_ids"].dtype.kind == "U"


def test_demo_corpus_is_consistent(corpus):
    assert corpus["label_kind"] == "phone" and corpus["sample_rate"] == 16000
    assert corpus["frame_shift_ms"] == 10
    assert corpus["class_names"].tolist() == list(PHONES)
    for split in ("train", "test"):
        feats, labels = corpus[f"{split}_feats"], corpus[f"{split}_labels"]
        offsets, ids = corpus[f"{split}_utt_offsets"], corpus[f"{split}_utt_ids"]
        assert feats.dtype == np.float16 and feats.shape[1] == 40
        assert labels.dtype == np.int32 and labels.shape == (len(feats),)
        assert offsets.dtype == np.int64 and offsets[0] == 0 and offsets[-1] == len(feats)
        assert len(ids) == len(offsets) - 1 == len(set(ids.tolist()))
        assert np.isfinite(feats.astype(np.float32)).all()
        # Every utterance starts and ends in silence (the recipe pads with it).
        assert (labels[offsets[:-1]] == 0).all() and (labels[offsets[1:] - 1] == 0).all()
    train_speakers = {u.split("-")[0] for u in corpus["train_utt_ids"]}
    test_speakers = {u.split("-")[0] for u in corpus["test_utt_ids"]}
    assert train_speakers and test_speakers and not train_speakers & test_speakers
    assert len(np.unique(corpus["train_labels"])) >= 38   # nearly every phone occurs


def test_a_tiny_network_learns_the_demo_corpus_quickly(corpus):
    x_train = corpus["train_feats"].astype(np.float32)
    y_train = corpus["train_labels"]
    x_test, y_test = corpus["test_feats"].astype(np.float32), corpus["test_labels"]
    rng = np.random.default_rng(0)
    w1 = (rng.standard_normal((40, 128)) * np.sqrt(2 / 40)).astype(np.float32)
    w2 = (rng.standard_normal((128, 40)) * np.sqrt(1 / 128)).astype(np.float32)
    b1, b2 = np.zeros(128, np.float32), np.zeros(40, np.float32)
    for _ in range(2):   # two epochs of plain SGD
        order = rng.permutation(len(x_train))
        for start in range(0, len(order), 128):
            i = order[start: start + 128]
            h = np.maximum(x_train[i] @ w1 + b1, 0)
            z = h @ w2 + b2
            p = np.exp(z - z.max(1, keepdims=True))
            p /= p.sum(1, keepdims=True)
            p[np.arange(len(i)), y_train[i]] -= 1
            p /= len(i)
            gh = (p @ w2.T) * (h > 0)
            w2 -= 0.1 * h.T @ p
            b2 -= 0.1 * p.sum(0)
            w1 -= 0.1 * x_train[i].T @ gh
            b1 -= 0.1 * gh.sum(0)
    accuracy = ((np.maximum(x_test @ w1 + b1, 0) @ w2 + b2).argmax(1) == y_test).mean()
    majority = np.bincount(y_test).max() / len(y_test)
    assert accuracy > 2 * majority and accuracy > 0.3


def test_inconsistent_file_is_rejected(tmp_path, corpus):
    arrays = {k: v for k, v in np.load(demo.DEMO_CORPUS_PATH, allow_pickle=False).items()}
    arrays["test_utt_offsets"] = arrays["test_utt_offsets"][:-1]
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(ValueError, match="test_utt_offsets"):
        load_demo_corpus(tmp_path / "bad.npz")
    with pytest.raises(FileNotFoundError, match="make_demo"):
        load_demo_corpus(tmp_path / "missing.npz")
