"""The final combination, in process: checkpoints with known parameters, a validation file."""

import os
import sys

import numpy as np
import pytest

import synthetic
from ngsgd_mpi import checkpoint, combine, data, evaluation
from ngsgd_mpi.model import Model
from ngsgd_mpi.network import Network, NetworkConfig

NET = NetworkConfig(input_dim=8 * 3, num_classes=6, num_hidden_layers=1, pnorm_input_dim=20,
                    pnorm_output_dim=4)


def write_run(out, params_by_period):
    for period, params in enumerate(params_by_period, start=1):
        path = checkpoint.checkpoint_dir(out, period)
        os.makedirs(path)
        Model(NET, params, 1).save(os.path.join(path, checkpoint.MODEL_FILE))
        checkpoint.mark_complete(path, {"period": period, "num_ranks": 1, "scheduled": True})


def test_best_suffix_average_on_validation(tmp_path):
    valid_path = tmp_path / "valid.h5"
    data.write_partition(valid_path, synthetic.utterances(3, 10), 8, 6, role="valid")
    valid = data.open_partition(valid_path)
    rng = np.random.default_rng(0)
    base = Network(NET, seed=1).params
    params = [(base + 0.3 * rng.standard_normal(base.size)).astype(np.float32) for _ in range(4)]
    out = str(tmp_path / "run")
    write_run(out, params)
    lines = []
    best, n = combine.combine_checkpoints(out, valid, max_models=3, log=lines.append)
    assert len(lines) == 3                                   # the last 3 of 4 periods
    objectives = []
    for k in (1, 2, 3):                                      # brute force: every suffix average
        candidate = np.mean([p.astype(np.float64) for p in params[-k:]], axis=0).astype(np.float32)
        objectives.append((evaluation.evaluate_partition(Model(NET, candidate, 1).network(), valid, 1)
                           .objective, k, candidate))
    expected = max(objectives, key=lambda o: o[0])
    assert n == expected[1]
    np.testing.assert_array_equal(best, expected[2])


def test_no_averaged_checkpoint_is_none(tmp_path):
    valid_path = tmp_path / "valid.h5"
    data.write_partition(valid_path, synthetic.utterances(3, 2), 8, 6, role="valid")
    assert combine.combine_checkpoints(str(tmp_path), data.open_partition(valid_path), 5) is None


# ----------------------------------------------------------------------------- nnet-combine-fast

def noisy_models(k=4, seed=0, scale=0.3):
    rng = np.random.default_rng(seed)
    base = Network(NET, seed=1).params
    return [(base + scale * rng.standard_normal(base.size)).astype(np.float32) for _ in range(k)]


def subset(seed=3, utts=12):
    feats, labels = [], []
    for _, f, y in synthetic.utterances(seed, utts):
        feats.append(data.splice(f, np.arange(len(y)), np.zeros(len(y), int), np.full(len(y), len(y)),
                                 data.splice_offsets(1, 1)))
        labels.append(y.astype(np.int64))
    return np.concatenate(feats), np.concatenate(labels)


def test_weight_gradient_matches_finite_differences():
    X, labels = subset()
    models = noisy_models()
    net64 = Network(NET, params=np.zeros(NET.num_params()), dtype=np.float64)
    stack = np.stack([p.astype(np.float64) for p in models])
    objective = combine._Objective(net64, stack, X.astype(np.float64), labels)
    objective.set = lambda w: net64.params.__setitem__(Ellipsis, objective.params(w))   # float64 throughout
    w = np.random.default_rng(2).uniform(0.1, 0.4, (4, 2))
    value, grad = objective.value_and_gradient(w)
    eps = 1e-6
    for n, c in [(0, 0), (3, 1), (1, 1)]:
        d = np.zeros_like(w)
        d[n, c] = eps
        numeric = (objective.value_and_gradient(w + d)[0] - objective.value_and_gradient(w - d)[0]) / (2 * eps)
        assert grad[n, c] == pytest.approx(numeric, rel=1e-5, abs=1e-8)          # (C1)


def test_lbfgs_maximizes_a_concave_quadratic():
    A = np.array([[3.0, 0.5, 0.0], [0.5, 1.0, 0.2], [0.0, 0.2, 0.3]])
    peak = np.array([1.0, -2.0, 0.5])
    f = lambda x: (-0.5 * (x - peak) @ A @ (x - peak), -A @ (x - peak))   # noqa: E731
    value, x, start = combine.lbfgs_maximize(f, np.zeros(3), num_evals=40)
    np.testing.assert_allclose(x, peak, atol=1e-4)
    assert value == pytest.approx(0.0, abs=1e-8) and start < value


def test_lbfgs_combination_beats_the_uniform_average_on_its_frames():
    X, labels = subset()
    models = [Model(NET, p, 1) for p in noisy_models(scale=0.5)]
    lines = []
    params, weights = combine.combine_lbfgs(models, X, labels, num_evals=20, log=lines.append)
    assert weights.shape == (4, 2) and params.dtype == np.float32
    def objective(p):
        net = Model(NET, p, 1).network()
        return net.evaluate(X, labels)[0] / len(labels)
    uniform = np.mean([m.params.astype(np.float64) for m in models], axis=0).astype(np.float32)
    assert objective(params) > objective(uniform) + 1e-3
    start, end = (float(v) for v in lines[0].split("objective ")[1].replace(" (uniform average) ->", "").split())
    assert start == pytest.approx(objective(uniform), abs=1e-4) and end == pytest.approx(objective(params), abs=1e-4)


def test_normalize_stddev_keeps_the_function_and_makes_hidden_stddev_one():
    cfg = NET.replace(num_hidden_layers=2)
    params = (3.0 * Network(cfg, seed=4).params + 0.1).astype(np.float32)
    params[-cfg.num_classes * 5:] = np.random.default_rng(1).standard_normal(cfg.num_classes * 5)
    X, _ = subset()
    normalized = combine.normalize_stddev(cfg, params)
    before = Network(cfg, params=params).log_probs(X)
    after = Network(cfg, params=normalized).log_probs(X)
    np.testing.assert_allclose(after, before, atol=2e-5)
    slices = Network(cfg, params=normalized).layer_param_slices()
    for index in range(2):
        lo = slices[2 * index][1]
        hi = slices[2 * index + 1][1] + slices[2 * index + 1][2][0]
        assert np.std(normalized[lo:hi].astype(np.float64)) == pytest.approx(1.0, rel=1e-5)
    lo = slices[4][1]
    np.testing.assert_array_equal(normalized[lo:], params[lo:])               # the final layer is left


def test_candidates_are_the_last_models_of_the_final_architecture(tmp_path):
    out = str(tmp_path / "run")
    small, big = NET, NET.replace(num_hidden_layers=2)
    for period, cfg in enumerate([small, small, big, big, big], start=1):
        path = checkpoint.checkpoint_dir(out, period)
        os.makedirs(path)
        Model(cfg, Network(cfg, seed=period).params, 1).save(os.path.join(path, checkpoint.MODEL_FILE))
        checkpoint.mark_complete(path, {"period": period, "num_ranks": 1, "scheduled": True})
    assert [c.period for c, _ in combine.candidates(out, 10)] == [3, 4, 5]
    assert [c.period for c, _ in combine.candidates(out, 2)] == [4, 5]


def test_cli_lbfgs_combination_on_training_frames(tmp_path):
    train = tmp_path / "train"
    train.mkdir()
    data.write_partition(train / "train.0.h5", synthetic.utterances(5, 20), 8, 6)
    out = str(tmp_path / "run")
    write_run(out, noisy_models())
    res = synthetic.run([sys.executable, "-m", "ngsgd_mpi.combine", "--out-dir", out, "--method", "lbfgs",
                         "--train-data", str(train), "--frames", "300", "--normalize-stddev"])
    assert res.returncode == 0, res.stderr
    model = Model.load(os.path.join(out, "combined.h5"))
    assert model.info["combine_method"] == "lbfgs" and model.info["combined_models"] == 4
    assert np.array(model.info["combine_weights"]).shape == (4, 2) and model.info["normalized_stddev"]
    res = synthetic.run([sys.executable, "-m", "ngsgd_mpi.combine", "--out-dir", out, "--method", "lbfgs"])
    assert res.returncode == 2 and "needs --train-data" in res.stderr


def test_combination_frames_are_whole_utterances_frames_drawn_from_them(tmp_path):
    path = tmp_path / "train.0.h5"
    data.write_partition(path, synthetic.utterances(5, 20), 8, 6)
    X, labels = combine.combination_frames(str(path), 1, 250, seed=0)
    assert X.shape == (250, 24) and labels.shape == (250,)
    again = combine.combination_frames(str(path), 1, 250, seed=0)
    np.testing.assert_array_equal(again[0], X)
