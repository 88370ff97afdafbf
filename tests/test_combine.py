"""The final combination, in process: checkpoints with known parameters, a validation file."""

import os

import numpy as np

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
