import os

import h5py
import numpy as np
import pytest

from ngsgd_mpi import storage


def test_nested_record_round_trip_is_exact(tmp_path):
    path = str(tmp_path / "s.h5")
    rng = np.random.default_rng(0)
    record = {"optimizer": {"name": "ng-online",
                            "layers": [{"input": {"W": rng.standard_normal((3, 4)).astype(np.float32),
                                                  "rho": 1e-10 / 3, "t": 12, "schedule": "nnet2"}},
                                       {"input": {"W": np.zeros((0, 0), np.float32)}}]},
              "progress": {"period": 3, "lr_factor": 0.5}, "empty": [], "count": np.int64(5)}
    storage.write(path, "test.format", record, {"period": 3})
    back, meta = storage.read(path, "test.format")
    assert meta == {"period": 3}
    layer = back["optimizer"]["layers"][0]["input"]
    np.testing.assert_array_equal(layer["W"], record["optimizer"]["layers"][0]["input"]["W"])
    assert layer["rho"] == 1e-10 / 3 and isinstance(layer["t"], int) and layer["schedule"] == "nnet2"
    assert back["optimizer"]["layers"][1]["input"]["W"].shape == (0, 0)
    assert back["progress"] == {"period": 3, "lr_factor": 0.5} and back["empty"] == []
    assert back["count"] == 5 and [p.name for p in tmp_path.iterdir()] == ["s.h5"]


def test_corruption_edits_and_truncation_are_detected(tmp_path):
    path = str(tmp_path / "m.h5")
    storage.write(path, "fmt", {"params": np.ones(1000, np.float32)}, {"samples": 10})
    with h5py.File(path, "r+") as f:
        f["params"][7] = 2.0
    with pytest.raises(storage.StorageError, match="checksum mismatch"):
        storage.read(path, "fmt")
    storage.write(path, "fmt", {"params": np.ones(1000, np.float32)}, {"samples": 10})
    with h5py.File(path, "r+") as f:                  # metadata is covered too
        f.attrs["meta"] = '{"samples": 11}'
    with pytest.raises(storage.StorageError, match="checksum mismatch"):
        storage.read(path, "fmt")
    storage.write(path, "fmt", {"params": np.ones(1000, np.float32)})
    with pytest.raises(storage.StorageError, match="attribute 'format' must be 'other'"):
        storage.read(path, "other")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    with pytest.raises(storage.StorageError, match="unreadable or truncated"):
        storage.read(path, "fmt")
    with pytest.raises(storage.StorageError, match="does not exist"):
        storage.read(str(tmp_path / "none.h5"), "fmt")


def test_failed_write_leaves_previous_file(tmp_path):
    path = str(tmp_path / "m.h5")
    storage.write(path, "fmt", {"params": np.ones(4, np.float32)})
    with pytest.raises(TypeError):
        storage.write(path, "fmt", {"params": np.ones(4, np.float32)}, {"bad": object()})
    with pytest.raises(ValueError, match="contain no '/'"):
        storage.write(path, "fmt", {"a/b": 1})
    np.testing.assert_array_equal(storage.read(path, "fmt")[0]["params"], np.ones(4))
    assert [p.name for p in tmp_path.iterdir()] == ["m.h5"]
