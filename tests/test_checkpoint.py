import os

import h5py
import numpy as np
import pytest

from ngsgd_mpi import checkpoint


def test_model_round_trip(tmp_path):
    path = str(tmp_path / "m.h5")
    params = np.arange(10, dtype=np.float32)
    checkpoint.save_model(path, params, {"input_dim": 3}, {"lr_initial": 0.1}, input_mean=np.ones(3),
                          input_std=np.full(3, 2.0), class_counts=[1, 3], extra_attrs={"period": 4})
    arrays, attrs = checkpoint.load_model_file(path)
    np.testing.assert_array_equal(arrays["params"], params)
    np.testing.assert_allclose(arrays["class_priors"], [0.25, 0.75])
    assert attrs["network_config"] == {"input_dim": 3} and attrs["period"] == 4
    assert [p.name for p in tmp_path.iterdir()] == ["m.h5"]      # no temp files left


def test_state_round_trip_is_exact(tmp_path):
    path = str(tmp_path / "s.h5")
    rng = np.random.default_rng(0)
    record = {"layer0/in/W": rng.standard_normal((3, 4)).astype(np.float32), "layer0/in/rho": 1e-10 / 3,
              "layer0/in/t": 12, "schedule": "nnet2", "count": np.int64(5)}
    checkpoint.save_state(path, record)
    back, _ = checkpoint.load_state(path)
    assert back.keys() == record.keys()
    np.testing.assert_array_equal(back["layer0/in/W"], record["layer0/in/W"])
    assert back["layer0/in/rho"] == record["layer0/in/rho"] and isinstance(back["layer0/in/t"], int)
    assert back["schedule"] == "nnet2"


def test_corruption_and_truncation_are_detected(tmp_path):
    path = str(tmp_path / "m.h5")
    checkpoint.save_model(path, np.ones(1000, np.float32), {}, {})
    with h5py.File(path, "r+") as f:
        f["params"][7] = 2.0
    with pytest.raises(checkpoint.CheckpointError, match="checksum mismatch"):
        checkpoint.load_model_file(path)
    checkpoint.save_model(path, np.ones(1000, np.float32), {}, {})
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size // 2)
    with pytest.raises(checkpoint.CheckpointError, match="unreadable or truncated"):
        checkpoint.load_model_file(path)
    with pytest.raises(checkpoint.CheckpointError, match="does not exist"):
        checkpoint.load_model_file(str(tmp_path / "none.h5"))


def test_failed_write_leaves_previous_file(tmp_path):
    path = str(tmp_path / "m.h5")
    checkpoint.save_model(path, np.ones(4, np.float32), {}, {})
    with pytest.raises(TypeError):
        checkpoint.save_model(path, np.ones(4, np.float32), {}, {}, extra_attrs={"bad": object()})
    arrays, _ = checkpoint.load_model_file(path)
    np.testing.assert_array_equal(arrays["params"], np.ones(4))
    assert [p.name for p in tmp_path.iterdir()] == ["m.h5"]


def test_complete_marker_and_pruning(tmp_path):
    out = str(tmp_path)
    for period, batch, scheduled in ((1, 0, True), (2, 0, True), (2, 7, False), (3, 0, False), (4, 0, True)):
        d = checkpoint.checkpoint_dir(out, period, batch)
        os.makedirs(d)
        if period != 4:                          # period 4 never completed (crash mid-write)
            checkpoint.mark_complete(d, {"period": period, "num_ranks": 1, "scheduled": scheduled})
    found = checkpoint.complete_checkpoints(out)
    assert [(c.period, c.batch, c.scheduled) for c in found] == [
        (1, 0, True), (2, 0, True), (2, 7, False), (3, 0, False)]
    assert [c.period for c in checkpoint.averaged_checkpoints(out)] == [1, 2]
    checkpoint.prune(out, 1)
    # newest scheduled and newest overall survive; the superseded unscheduled one goes
    assert [(c.period, c.batch) for c in checkpoint.complete_checkpoints(out)] == [(2, 0), (3, 0)]
    assert not os.path.exists(checkpoint.checkpoint_dir(out, 1))
    assert not os.path.exists(checkpoint.checkpoint_dir(out, 2, 7))
