"""nnet2 priors (average posterior of the final model) and the disable rule for unseen classes."""

import os
import sys

import numpy as np
import pytest

import synthetic
from ngsgd_mpi import checkpoint, data, priors
from ngsgd_mpi.kaldi.pipeline import Cmvn, InputPipeline, write_pipeline
from ngsgd_mpi.model import Model
from ngsgd_mpi.network import Network, NetworkConfig

NET = NetworkConfig(input_dim=8 * 3, num_classes=6, num_hidden_layers=1, pnorm_input_dim=12, pnorm_output_dim=4)


def network(seed=0):
    net = Network(NET, seed=seed)
    net.params[...] = (0.5 * np.random.default_rng(seed).standard_normal(net.params.size)).astype(np.float32)
    return net


def test_average_posteriors_is_the_mean_softmax_over_all_blocks():
    net = network()
    rng = np.random.default_rng(1)
    blocks = [rng.standard_normal((n, NET.input_dim)).astype(np.float32) for n in (5, 17, 1)]
    got, frames = priors.average_posteriors(net, blocks)
    logits = np.concatenate([np.asarray(net.log_probs(b), np.float64) for b in blocks])
    expected = np.exp(logits).mean(0)
    assert frames == 23
    np.testing.assert_allclose(got, expected / expected.sum(), rtol=1e-6)
    assert got.sum() == pytest.approx(1.0, abs=1e-12)


def test_log_prior_offsets_divide_by_priors_and_disable_unseen_classes():
    p = np.array([0.5, 0.2, 0.1, 0.1, 0.05, 0.05])
    counts = np.array([10, 0, 3, 1, 0, 2])
    off = priors.log_prior_offsets(p, counts, prior_scale=0.5)
    np.testing.assert_allclose(off[[0, 2, 3, 5]], 0.5 * np.log(p[[0, 2, 3, 5]]), rtol=1e-6)
    assert off[1] == off[4] == np.float32(np.sqrt(np.finfo(np.float32).max))
    # the floor is on the relative training frequency (nnet1): 1/16 < 0.07 disables class 3 too
    assert priors.disabled(counts, 0.07).tolist() == [False, True, False, True, True, False]
    assert not priors.disabled(counts, 0.0).any()
    np.testing.assert_allclose(priors.log_prior_offsets(p, None), np.log(p), rtol=1e-6)   # nothing disabled


def test_a_disabled_class_never_wins_a_frame():
    rng = np.random.default_rng(0)
    log_post = np.log(rng.dirichlet(np.full(6, 0.3), 2000)).astype(np.float32)
    log_post[:, 1] = np.log(0.999)                          # even a confident unseen class loses
    counts = np.array([5, 0, 5, 5, 5, 5])
    for p in (np.full(6, 1 / 6), np.array([0.3, 1e-9, 0.2, 0.2, 0.2, 0.1])):
        llk = log_post - priors.log_prior_offsets(p / p.sum(), counts)
        assert np.isfinite(llk).all() and not (llk.argmax(1) == 1).any()


def write_training_dir(root, pipeline):
    train_dir, _ = synthetic.write_dataset(root, num_partitions=2, utts_per_partition=10, feat_dim=8)
    if pipeline is not None:
        write_pipeline(train_dir, pipeline)
    return train_dir


def test_first_training_frames_come_from_the_partitions_in_order(tmp_path):
    train_dir = write_training_dir(tmp_path, None)
    paths = data.find_partitions(train_dir)
    first = data.open_partition(paths[0], scan=False).num_frames
    blocks = list(priors.first_training_frames(train_dir, context=1, max_frames=first + 7, block_frames=64))
    assert sum(len(b) for b in blocks) == first + 7 and blocks[0].shape[1] == 8 * 3
    expected = np.concatenate([X for X, _ in data.iterate_utterance_blocks(data.open_partition(paths[0]), 1, 1)])
    np.testing.assert_array_equal(np.concatenate(blocks)[:first], expected)


def test_finalize_attaches_priors(tmp_path):
    train_dir = write_training_dir(tmp_path, None)
    net = network()
    model = Model(NET, np.asarray(net.params).copy(), 1, class_counts=np.array([4, 0, 3, 3, 3, 3]))
    messages = []
    final = priors.finalize(model, train_dir, messages.append)
    frames = sum(data.open_partition(p, scan=False).num_frames for p in data.find_partitions(train_dir))
    expected, n = priors.average_posteriors(net, priors.first_training_frames(train_dir, 1))
    assert n == frames < priors.PRIOR_SUBSET_FRAMES
    np.testing.assert_allclose(final.posterior_priors, expected, rtol=1e-12)
    assert f"over {frames:,} training frames" in messages[0] and "1 of 6 classes have no training" in messages[0]


def test_training_writes_priors_and_pipeline_into_final_model(tmp_path):
    train_dir = write_training_dir(tmp_path / "data", InputPipeline(Cmvn(True, True), "phone"))
    out = tmp_path / "run"
    res = synthetic.run([sys.executable, "-m", "ngsgd_mpi.cli", f"--train-data={train_dir}", f"--out-dir={out}",
                         "--context=1", "--num-hidden-layers=1", "--pnorm-input-dim=20", "--pnorm-output-dim=4",
                         "--minibatch-size=32", "--samples-per-average=256", "--num-epochs=1",
                         "--combine-last-k=0", "--threads-per-rank=1"])
    assert res.returncode == 0, res.stdout + res.stderr
    final = Model.load(os.path.join(out, "final.h5"))
    assert final.input_pipeline == InputPipeline(Cmvn(True, True), "phone")
    for ckpt in checkpoint.complete_checkpoints(str(out)):       # checkpoints know it too
        assert Model.load(ckpt.model_path).input_pipeline == final.input_pipeline
    assert final.posterior_priors.shape == (6,) and final.posterior_priors.sum() == pytest.approx(1.0)
    expected, _ = priors.average_posteriors(final.network(), priors.first_training_frames(train_dir, 1))
    np.testing.assert_allclose(final.posterior_priors, expected, rtol=1e-9)
    assert "priors: average posterior of the final model" in res.stdout + res.stderr
