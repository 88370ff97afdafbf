"""Faults under the real mpiexec: signals, kill -9, torn checkpoint writes, divergence,
hangs, Kaldi's safeguards, final combination, and restarting on another rank count."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import synthetic
from ngsgd_mpi import checkpoint, combine, data
from ngsgd_mpi.faults import EXIT_DIVERGED, EXIT_RANK_LOST, EXIT_STOPPED
from ngsgd_mpi.model import Model
from test_trainer import args_for, final_params, metrics

DRIVER = [sys.executable, os.path.join(os.path.dirname(__file__), "fault_driver.py")]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return synthetic.write_dataset(tmp_path_factory.mktemp("data"), num_partitions=4)


def mpi(n, fault, argv, timeout=120):
    return synthetic.run([synthetic.mpiexec(), "-n", str(n)] + DRIVER + [fault] + argv, timeout=timeout)


def ok(res):
    assert res.returncode == 0, res.stdout + res.stderr
    return res


@pytest.fixture(scope="module")
def reference(dataset, tmp_path_factory):
    """An uninterrupted 2-rank run: the result every recovery must reproduce bit for bit."""
    out = str(tmp_path_factory.mktemp("ref") / "run")
    ok(mpi(2, "none", args_for(*dataset, out, num_epochs=3)))
    return out


def wait_for(predicate, timeout=60):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.05)


def start(n, fault, argv):
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    return subprocess.Popen([synthetic.mpiexec(), "-n", str(n)] + DRIVER + [fault] + argv,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_signal_on_one_rank_checkpoints_all_and_resume_is_bit_identical(dataset, reference, tmp_path, sig):
    out = str(tmp_path / "run")
    argv = args_for(*dataset, out, num_epochs=3, signal_check_every=1)
    proc = start(2, f"wait_at:1:3:{tmp_path}", argv)
    try:
        wait_for(lambda: (tmp_path / "rank1.waiting").exists())
        os.kill(int((tmp_path / "rank1.pid").read_text()), sig)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == EXIT_STOPPED, stdout + stderr
    assert "stopped on signal in period 3 after minibatch 2" in stdout
    assert not os.path.exists(os.path.join(out, "final.h5"))
    res = ok(mpi(2, "none", argv + ["--resume"]))
    assert "resumed from checkpoint" in res.stdout
    assert np.array_equal(final_params(out), final_params(reference))


def test_kill_9_of_one_rank_ends_the_job_and_resume_is_bit_identical(dataset, reference, tmp_path):
    out = str(tmp_path / "run")
    argv = args_for(*dataset, out, num_epochs=3)
    proc = start(2, f"wait_at:1:3:{tmp_path}", argv)
    try:
        wait_for(lambda: (tmp_path / "rank1.waiting").exists())
        t0 = time.monotonic()
        os.kill(int((tmp_path / "rank1.pid").read_text()), signal.SIGKILL)
        proc.communicate(timeout=30)
        assert time.monotonic() - t0 < 30                     # no hang
    finally:
        proc.kill()
    assert proc.returncode != 0
    assert [c.period for c in checkpoint.complete_checkpoints(out)] == [1, 2]
    ok(mpi(2, "none", argv + ["--resume"]))
    assert np.array_equal(final_params(out), final_params(reference))


def test_kill_during_checkpoint_write_keeps_previous_checkpoint(dataset, reference, tmp_path):
    out = str(tmp_path / "run")
    argv = args_for(*dataset, out, num_epochs=3)
    res = mpi(2, "kill_in_write:3", argv, timeout=60)
    assert res.returncode != 0
    done = checkpoint.complete_checkpoints(out)
    assert [c.period for c in done] == [1, 2]                    # the torn one does not count
    Model.load(done[-1].model_path)
    res = ok(mpi(2, "none", argv + ["--resume"]))
    assert "resumed from checkpoint after period 2" in res.stdout
    assert np.array_equal(final_params(out), final_params(reference))


def test_corrupt_latest_checkpoint_falls_back_to_previous(dataset, reference, tmp_path):
    out = str(tmp_path / "run")
    done = synthetic.crashed_copy(reference, out, keep=4)
    with open(os.path.join(done[3].path, "state-r0001.h5"), "r+b") as f:   # bit rot in rank 1's state
        f.seek(-100, os.SEEK_END)
        f.write(b"\0" * 50)
    res = ok(mpi(2, "none", args_for(*dataset, out, num_epochs=3) + ["--resume"]))
    assert "ckpt-000004 is unusable" in res.stdout and "resumed from checkpoint after period 3" in res.stdout
    assert np.array_equal(final_params(out), final_params(reference))


def test_nan_on_one_rank_rolls_back_and_halves_lr(dataset, tmp_path):
    out = str(tmp_path / "run")
    res = ok(mpi(2, "nan:1:2", args_for(*dataset, out, num_epochs=3)))
    events = [r for r in metrics(out) if r.get("event") == "divergence"]
    assert len(events) == 1 and events[0]["period"] == 2 and events[0]["lr_factor"] == 0.5
    assert "divergence" in res.stdout
    periods = [r for r in metrics(out) if not r.get("event")]
    assert [r["period"] for r in periods] == list(range(1, len(periods) + 1))
    assert os.path.exists(os.path.join(out, "final.h5"))


def test_repeated_divergence_aborts_cleanly(dataset, tmp_path):
    out = str(tmp_path / "run")
    res = mpi(2, "nan:0:2:100", args_for(*dataset, out, num_epochs=3, max_divergence_retries=2))
    assert res.returncode == EXIT_DIVERGED, res.stdout + res.stderr
    assert res.stderr.count("error:") == 1 and "diverged 3 times in a row in period 2" in res.stderr


def test_hang_watchdog_names_the_missing_rank(dataset, tmp_path):
    out = str(tmp_path / "run")
    t0 = time.monotonic()
    res = mpi(2, "hang:1:2", args_for(*dataset, out, num_epochs=3, collective_timeout=3), timeout=60)
    assert res.returncode == EXIT_RANK_LOST and time.monotonic() - t0 < 50, res.stderr
    assert ("rank(s) [1] did not arrive at the gather of the training objectives of period 2 within "
            "collective_timeout 3 s (rank 1: busy outside MPI") in res.stderr


def test_first_period_pick_best_and_outlier_exclusion(dataset, tmp_path):
    out = str(tmp_path / "run")
    sys.path.insert(0, os.path.dirname(__file__))
    ok(synthetic.run([synthetic.mpiexec(), "-n", "2", sys.executable,
                      os.path.join(os.path.dirname(__file__), "record_averages.py"), str(tmp_path)]
                     + args_for(*dataset, out, first_period_pick_best="true", outlier_threshold=1e-9)))
    recs = [r for r in metrics(out) if not r.get("event")]
    z = [np.load(tmp_path / f"rank{r}.npz") for r in range(2)]
    # period 1: a broadcast of the best rank, not an average
    best = int(np.argmax(recs[0]["rank_train_obj"]))
    assert recs[0]["note"].startswith(f"picked rank {best}")
    for r in range(2):
        np.testing.assert_array_equal(z[r]["after"][0], z[best]["before"][0])
    # later periods: with a tiny threshold the worse rank is left out, so the "average" is the best rank
    for i, rec in enumerate(recs[1:], start=1):
        objs = rec["rank_train_obj"]
        kept = int(np.argmax(objs))
        assert rec["note"].startswith(f"excluded rank(s) [{1 - kept}]")
        np.testing.assert_array_equal(z[0]["after"][i], z[kept]["before"][i])


def test_combination_picks_best_suffix_average(dataset, reference, tmp_path):
    valid = data.open_partition(dataset[1])
    lines = []
    params, n = combine.combine_checkpoints(reference, valid, 20, log=lines.append)
    averaged = checkpoint.averaged_checkpoints(reference)
    assert len(lines) == min(20, len(averaged)) and 1 <= n <= len(lines)
    objs = [float(line.split("valid ")[1].split()[0]) for line in lines]
    assert objs[n - 1] == max(objs)
    expected = np.mean([Model.load(c.model_path).params.astype(np.float64)
                        for c in averaged[-n:]], axis=0).astype(np.float32)
    np.testing.assert_array_equal(params, expected)
    out = str(tmp_path / "combined.h5")
    res = synthetic.run([sys.executable, "-m", "ngsgd_mpi.combine", "--out-dir", reference,
                         "--valid-data", dataset[1], "--output", out])
    assert res.returncode == 0, res.stderr
    np.testing.assert_array_equal(Model.load(out).params, params)


def test_training_combines_by_default(dataset, tmp_path):
    out = str(tmp_path / "run")
    res = ok(mpi(2, "none", args_for(*dataset, out, combine_last_k=5)))
    assert "combine: average of the last  5" in res.stdout
    assert Model.load(out + "/final.h5").info["combined_models"] >= 1


def test_restart_on_a_different_number_of_ranks(dataset, reference, tmp_path):
    out = str(tmp_path / "run")
    synthetic.crashed_copy(reference, out, keep=3)
    samples_before = metrics(reference)[2]["samples"]
    res = ok(mpi(4, "none", args_for(*dataset, out, num_epochs=3) + ["--resume"]))
    assert "written by 2 ranks with 4 ranks" in res.stdout
    recs = [r for r in metrics(out) if not r.get("event")]
    assert recs[3]["samples"] == samples_before + 4 * 256  # 4 ranks x 8 minibatches x 32
    assert recs[3]["lr_per_rank"] == pytest.approx(4 * recs[3]["lr"])
    assert recs[-1]["lr"] == pytest.approx(0.005)
    total = metrics(reference)[-1]["samples"]
    assert total <= recs[-1]["samples"] < total + 4 * 256


def test_stop_at_a_period_boundary_between_scheduled_checkpoints(dataset, tmp_path):
    """One minibatch per period: the stop lands on a period end that is not a scheduled
    checkpoint; the extra checkpoint must not change combination or pruning."""
    opts = dict(num_epochs=1, samples_per_average=32, checkpoint_every=4, keep_last_k=3,
                combine_last_k=5, signal_check_every=1)
    ref, out = str(tmp_path / "ref"), str(tmp_path / "run")
    ok(mpi(2, "none", args_for(*dataset, ref, **opts)))
    argv = args_for(*dataset, out, **opts)
    res = mpi(2, "stop_at:0:6:1", argv)          # period 6: not a multiple of checkpoint_every
    assert res.returncode == EXIT_STOPPED, res.stdout + res.stderr
    assert "stopped on signal after period 6" in res.stdout
    assert not checkpoint.complete_checkpoints(out)[-1].scheduled
    ok(mpi(2, "none", argv + ["--resume"]))
    assert np.array_equal(final_params(out), final_params(ref))
    assert ([c.period for c in checkpoint.averaged_checkpoints(out)]
            == [c.period for c in checkpoint.averaged_checkpoints(ref)])
