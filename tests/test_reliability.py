"""The reliability contract of issue 16, black-box: every case runs the real ngsgd-train in fresh
processes under the PyPI MPICH ``mpiexec`` with a timeout, and checks the exit code, the one
line it prints, and what it leaves on disk (docs/reliability.md has the table)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest

import synthetic
from ngsgd_mpi import checkpoint, data
from ngsgd_mpi.faults import EXIT_BAD_INPUT, EXIT_DIVERGED, EXIT_RANK_LOST, EXIT_STOPPED
from test_trainer import args_for, metrics

HERE = os.path.dirname(__file__)
TRAIN = [sys.executable, "-m", "ngsgd_mpi.cli"]
DRIVER = [sys.executable, os.path.join(HERE, "fault_driver.py")]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return synthetic.write_dataset(tmp_path_factory.mktemp("data"), num_partitions=2)


def launch(n, argv, timeout=90):
    return synthetic.run([synthetic.mpiexec(), "-n", str(n)] + argv, timeout=timeout)


def start(n, argv):
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    return subprocess.Popen([synthetic.mpiexec(), "-n", str(n)] + argv, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def wait_for(path, proc, timeout=60):
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"timed out waiting for {path}"
        time.sleep(0.05)


def ok(res):
    assert res.returncode == 0, res.stdout + res.stderr
    return res


def bad_input(n, argv, *expected, out=None):
    """Exit 2, exactly one stderr line ``ngsgd-train: error: ...`` containing ``expected``, no
    traceback, and (for a fresh out_dir) nothing created."""
    res = launch(n, TRAIN + argv)
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert res.returncode == EXIT_BAD_INPUT and len(lines) == 1, res.stdout + res.stderr
    assert lines[0].startswith("ngsgd-train: error: ") and "Traceback" not in res.stdout, lines
    for text in expected:
        assert text in lines[0], lines[0]
    if out is not None:
        assert not os.path.exists(out), os.listdir(out)
    return lines[0]


# ----------------------------------------------------------------------------- 1. hangs

@pytest.mark.timeout(120)
def test_sigstopped_rank_ends_the_job_within_the_timeout_naming_it(dataset, tmp_path):
    out = str(tmp_path / "run")
    proc = start(2, DRIVER + [f"wait_at:1:2:{tmp_path}"]
                 + args_for(*dataset, out, num_epochs=3, collective_timeout=4))
    try:
        wait_for(tmp_path / "rank1.waiting", proc)
        os.kill(int((tmp_path / "rank1.pid").read_text()), signal.SIGSTOP)
        t0 = time.monotonic()
        _, stderr = proc.communicate(timeout=60)
        took = time.monotonic() - t0
    finally:
        proc.kill()
    assert proc.returncode == EXIT_RANK_LOST, stderr
    assert took < 4 + 10, took                 # collective_timeout + asking the others + teardown
    assert ("rank(s) [1] did not arrive at the stop/divergence agreement in period 2 within "
            "collective_timeout 4 s (rank 1: no answer (stopped") in stderr
    assert [c.period for c in checkpoint.complete_checkpoints(out)] == [1]    # kept for --resume


@pytest.mark.timeout(120)
def test_sigterm_ends_a_job_whose_rank_is_stopped(dataset, tmp_path):
    """The watchdog would wait 60 s; a stop signal shortens every wait to stop_timeout."""
    out = str(tmp_path / "run")
    proc = start(2, DRIVER + [f"wait_at:1:2:{tmp_path}"] + args_for(
        *dataset, out, num_epochs=3, collective_timeout=60, stop_timeout=2))
    try:
        wait_for(tmp_path / "rank1.waiting", proc)
        os.kill(int((tmp_path / "rank1.pid").read_text()), signal.SIGSTOP)
        time.sleep(1)                                   # rank 0 is now waiting for rank 1
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)                # to mpiexec, which passes it on to every rank
        _, stderr = proc.communicate(timeout=40)
        took = time.monotonic() - t0
    finally:
        proc.kill()
    assert proc.returncode == EXIT_RANK_LOST and took < 2 + 10, (took, stderr)
    assert "rank(s) [1] did not arrive" in stderr and "within stop_timeout 2 s of the stop signal" in stderr


@pytest.mark.timeout(120)
def test_rank_stuck_in_blas_is_named_by_the_others(dataset, tmp_path):
    out = str(tmp_path / "run")
    t0 = time.monotonic()
    res = launch(2, DRIVER + [f"spin:1:2:{tmp_path}"] + args_for(*dataset, out, num_epochs=3,
                                                                   collective_timeout=3))
    assert res.returncode == EXIT_RANK_LOST and time.monotonic() - t0 < 40, res.stderr
    assert "rank(s) [1] did not arrive" in res.stderr and "rank 1: busy outside MPI" in res.stderr


@pytest.mark.timeout(120)
def test_sigterm_to_a_rank_stuck_in_blas_ends_the_job(dataset, tmp_path):
    """Only the stuck rank gets the signal; its own watchdog sees it reach no collective."""
    out = str(tmp_path / "run")
    proc = start(2, DRIVER + [f"spin:1:2:{tmp_path}"] + args_for(
        *dataset, out, num_epochs=3, collective_timeout=60, stop_timeout=2))
    try:
        wait_for(tmp_path / "rank1.spinning", proc)
        t0 = time.monotonic()
        os.kill(int((tmp_path / "rank1.pid").read_text()), signal.SIGTERM)
        _, stderr = proc.communicate(timeout=40)
        took = time.monotonic() - t0
    finally:
        proc.kill()
    assert proc.returncode == EXIT_RANK_LOST and took < 2 + 10, (took, stderr)
    assert "rank 1 received a stop signal but has been busy outside MPI" in stderr


# ----------------------------------------------------------------------------- 2. out_dir

def test_out_dir_belongs_to_one_run(dataset, tmp_path):
    out = str(tmp_path / "run")
    argv = args_for(*dataset, out, num_epochs=1)
    ok(launch(2, TRAIN + argv))
    run_id = checkpoint.read_run_id(out)
    before = sorted(os.listdir(out))
    bad_input(2, argv, f"option out_dir: {out} holds an earlier run (RUN, checkpoints, metrics.jsonl, "
              "final.h5;", "--resume", "--overwrite")
    assert sorted(os.listdir(out)) == before                                  # nothing touched
    ok(launch(2, TRAIN + argv + ["--overwrite"]))
    assert checkpoint.read_run_id(out) != run_id
    assert [r["period"] for r in metrics(out)] == list(range(1, len(metrics(out)) + 1))   # not appended
    # a checkpoint of another run copied in is ignored by resume and combination
    foreign = checkpoint.checkpoint_dir(out, 99)
    shutil.copytree(checkpoint.complete_checkpoints(out)[-1].path, foreign)
    with open(os.path.join(foreign, "COMPLETE"), "w") as f:
        json.dump({"period": 99, "num_ranks": 2, "run_id": run_id}, f)
    assert 99 not in [c.period for c in checkpoint.complete_checkpoints(out)]


def test_overwrite_deletes_only_what_a_run_wrote(dataset, tmp_path):
    """A log file in out_dir (Slurm's --output, tee) is no earlier run and is never deleted."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "train.log").write_text("the log of this very run")
    argv = args_for(*dataset, str(out), num_epochs=0.5)
    ok(launch(1, TRAIN + argv))
    ok(launch(1, TRAIN + argv + ["--overwrite"]))
    assert (out / "train.log").read_text() == "the log of this very run"


def test_a_second_job_on_the_same_out_dir_is_refused(dataset, tmp_path):
    out = str(tmp_path / "run")
    proc = start(2, DRIVER + [f"wait_at:0:2:{tmp_path}"] + args_for(*dataset, out, num_epochs=3))
    try:
        wait_for(tmp_path / "rank0.waiting", proc)
        bad_input(1, args_for(*dataset, out, num_epochs=3) + ["--resume"], "is in use by another ngsgd-train")
        os.kill(int((tmp_path / "rank0.pid").read_text()), signal.SIGTERM)      # the first one goes on
        proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == EXIT_STOPPED


def test_resume_collects_leftovers_and_restarts_cleanly_without_a_checkpoint(dataset, tmp_path):
    out = tmp_path / "run"
    argv = args_for(*dataset, str(out), num_epochs=1)
    ok(launch(2, TRAIN + argv))
    # a run killed at the worst moments: torn temp files, a half-pruned checkpoint, no COMPLETE left
    for ckpt in checkpoint.complete_checkpoints(str(out)):
        os.remove(os.path.join(ckpt.path, "COMPLETE"))
    (out / "final.h5").rename(out / f"final.h5.tmp{os.getpid()}")
    torn = checkpoint.checkpoint_dir(str(out), 1)
    open(os.path.join(torn, f"state-r0000.h5.tmp{os.getpid() + 1}"), "wb").close()
    (out / "plots").mkdir()
    (out / "plots" / "draft.tmp7").write_text("the user's, not a run's")
    res = ok(launch(2, TRAIN + argv + ["--resume"]))
    assert "collected" in res.stdout and "no usable checkpoint" in res.stdout
    leftovers = [os.path.join(r, f) for r, _, fs in os.walk(out) for f in fs if ".tmp" in f]
    assert leftovers == [str(out / "plots" / "draft.tmp7")]
    recs = metrics(str(out))
    assert [r["period"] for r in recs] == list(range(1, len(recs) + 1))        # period 1 once


def test_resume_sets_unusable_checkpoints_aside_and_starts_over(dataset, tmp_path):
    out = str(tmp_path / "run")
    argv = args_for(*dataset, out, num_epochs=1)
    ok(launch(1, TRAIN + argv))
    done = checkpoint.complete_checkpoints(out)
    for ckpt in done:                                    # every model file rotted
        with h5py.File(ckpt.model_path) as f:
            offset = f["params"].id.get_offset()
        with open(ckpt.model_path, "r+b") as f:
            f.seek(offset)
            f.write(b"\xff" * 64)
    os.remove(os.path.join(out, "final.h5"))
    res = ok(launch(1, TRAIN + argv + ["--resume"]))
    assert "no usable checkpoint" in res.stdout and "set aside" in res.stdout
    assert os.path.isdir(done[-1].path + ".unusable")
    assert [c.period for c in checkpoint.complete_checkpoints(out)] == [c.period for c in done]


# ----------------------------------------------------------------------------- 3. partitions

def partition_copy(dataset, tmp_path, edit=None, name="train.0.h5"):
    """A training directory with copies of the dataset's partitions, ``edit(h5file)`` applied
    to ``name``."""
    train = tmp_path / "train"
    shutil.copytree(dataset[0], train)
    if edit is not None:
        with h5py.File(train / name, "r+") as f:
            edit(f)
    return str(train)


def replace(f, name, **create):
    del f[name]
    f.create_dataset(name, **create)


def craft_huge(path, frames=2 ** 40, utts=1):
    """A few KB of header declaring ``frames`` frames and ``utts`` utterances, none stored."""
    with h5py.File(path, "w") as f:
        f.attrs.update(format=data.FORMAT_NAME, format_version=2, feat_dim=8, num_classes=6,
                       num_frames=frames, num_utts=utts, partition_index=0, num_partitions=1,
                       role="train", dataset_id="crafted")
        f.create_dataset("feats", (frames, 8), np.float16, chunks=(4096, 8))
        f.create_dataset("labels", (frames,), np.int32, chunks=(4096,))
        f.create_dataset("utt_offsets", (utts + 1,), np.int64, chunks=True)
        f.create_dataset("utt_ids", (utts,), h5py.string_dtype("utf-8"))
        f.create_dataset("class_counts", data=np.zeros(6, np.int64))
        f.create_dataset("feat_sum", data=np.zeros(8))
        f.create_dataset("feat_sumsq", data=np.zeros(8))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("frames,utts", [(2 ** 40, 1), (2 ** 31, 2 ** 31 - 1)])
def test_a_crafted_header_is_refused_at_once(dataset, tmp_path, frames, utts):
    """A few KB declaring 2^40 frames (the old scan ran forever) or 2^31 utterance offsets
    (the old reader allocated 16 GB): refused from the header, in bounded time and memory."""
    train = tmp_path / "train"
    train.mkdir()
    craft_huge(train / "train.0.h5", frames, utts)
    assert os.path.getsize(train / "train.0.h5") < 64_000
    bad_input(1, args_for(str(train), dataset[1], str(tmp_path / "out")), "train.0.h5",
              "/feats declares", "bytes but the file stores 0 of them", out=str(tmp_path / "out"))


def test_external_storage_external_links_and_virtual_datasets_are_refused(dataset, tmp_path):
    out = str(tmp_path / "out")
    with h5py.File(os.path.join(dataset[0], "train.0.h5")) as f:
        frames = f.attrs["num_frames"]

    def external_raw(f):
        replace(f, "labels", shape=(frames,), dtype=np.uint8, external=[("/etc/passwd", 0, frames)])
    bad_input(1, args_for(partition_copy(dataset, tmp_path / "a", external_raw), dataset[1], out),
              "/labels keeps its data in an external file (/etc/passwd)", out=out)

    def external_link(f):
        del f["labels"]
        f["labels"] = h5py.ExternalLink(os.path.join(dataset[0], "train.1.h5"), "/labels")
    bad_input(1, args_for(partition_copy(dataset, tmp_path / "b", external_link), dataset[1], out),
              "/labels is an external link", out=out)

    def virtual(f):
        layout = h5py.VirtualLayout(shape=(frames,), dtype=np.int32)
        layout[:] = h5py.VirtualSource(os.path.join(dataset[0], "train.1.h5"), "labels", shape=(frames,))
        del f["labels"]
        f.create_virtual_dataset("labels", layout)
    bad_input(1, args_for(partition_copy(dataset, tmp_path / "c", virtual), dataset[1], out),
              "/labels is a virtual dataset", out=out)


@pytest.mark.parametrize("edit,expected", [
    (lambda f: replace(f, "labels", data=f["labels"][()].astype(np.float32)),
     "dataset 'labels' must hold integer class ids, got dtype float32"),
    (lambda f: replace(f, "feats", data=np.full(f["feats"].shape, "x", dtype="S1")),
     "dataset 'feats' must hold float16/float32 frames, got dtype |S1"),
    (lambda f: f.attrs.__delitem__("num_classes"), "attribute 'num_classes' is missing"),
    (lambda f: f.attrs.__setitem__("feat_dim", "eight"), "attribute 'feat_dim' must be an integer"),
    (lambda f: f.attrs.__setitem__("num_frames", 2 ** 40), "dataset 'feats' must have shape"),
])
def test_damaged_partitions_are_one_line(dataset, tmp_path, edit, expected):
    out = str(tmp_path / "out")
    bad_input(2, args_for(partition_copy(dataset, tmp_path, edit), dataset[1], out), expected, out=out)


def test_a_partition_twice_or_two_preparations_mixed_are_refused(dataset, tmp_path):
    out = str(tmp_path / "out")
    twice = partition_copy(dataset, tmp_path / "a")
    shutil.copy(os.path.join(twice, "train.0.h5"), os.path.join(twice, "train.2.h5"))
    bad_input(2, args_for(twice, dataset[1], out), "are the same partition (index 0)", out=out)
    other, _ = synthetic.write_dataset(tmp_path / "other", num_partitions=2)
    mixed = partition_copy(dataset, tmp_path / "b")
    shutil.copy(os.path.join(other, "train.1.h5"), os.path.join(mixed, "train.1.h5"))
    bad_input(2, args_for(mixed, dataset[1], out), "mixes partitions of different preparations", out=out)
    bad_input(1, args_for(dataset[0], os.path.join(dataset[0], "train.1.h5"), out),
              "is training partition 1 itself", out=out)


def test_valid_h5_is_never_training_data(dataset, tmp_path):
    only_valid = tmp_path / "prepared"
    only_valid.mkdir()
    shutil.copy(dataset[1], only_valid / "valid.h5")
    bad_input(1, args_for(str(only_valid), dataset[1], str(tmp_path / "out")),
              "role is 'valid', not training data", out=str(tmp_path / "out"))


# ----------------------------------------------------------------------------- 4. bad input

def test_bad_out_dirs_are_one_line(dataset, tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    bad_input(2, args_for(*dataset, str(a_file)), "exists and is not a directory")
    bad_input(2, args_for(*dataset, str(a_file / "run")), f"cannot be created: {a_file} is a file")
    bad_input(1, args_for(*dataset, "/proc/1/ngsgd-run"), "option out_dir: /proc/1/ngsgd-run")
    if os.path.isdir("/sys/kernel"):                # writable to access(2) as root, but not really
        bad_input(1, args_for(*dataset, "/sys/kernel/ngsgd-run"), "option out_dir: /sys/kernel/ngsgd-run")


@pytest.mark.parametrize("extra,expected", [
    (["--num-epochs", "inf"], "num_epochs: must be a finite number"),
    (["--device", "gpu"], "option device: gpu is not usable on this machine"),
    (["--resume", "--overwrite"], "option overwrite: must be false with resume"),
    (["--divergence-action", "explode"], None),
])
def test_bad_options_are_one_line(dataset, tmp_path, extra, expected):
    if expected is None:               # argparse's own usage error: exit 2 with its usage lines
        res = launch(1, TRAIN + args_for(*dataset, str(tmp_path / "out")) + extra)
        assert res.returncode == EXIT_BAD_INPUT and "invalid choice: 'explode'" in res.stderr
        return
    bad_input(2, args_for(*dataset, str(tmp_path / "out")) + extra, expected, out=str(tmp_path / "out"))


@pytest.mark.parametrize("text,expected", [
    ("lr_initial: null\n", "option lr_initial needs a value"),
    ("lr_initial: 0.1\nlr_initial: 0.2\n", "key 'lr_initial' appears twice"),
])
def test_bad_yaml_is_one_line(dataset, tmp_path, text, expected):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    bad_input(1, args_for(*dataset, str(tmp_path / "out")) + ["--config", str(path)], "c.yaml", expected)


def test_several_configs_merge_in_order(dataset, tmp_path):
    first, second = tmp_path / "a.yaml", tmp_path / "b.yaml"
    first.write_text("lr_initial: 0.05\nrank_in: 3\n")
    second.write_text("lr_initial: 0.03\n")
    argv = [a for a in args_for(*dataset, str(tmp_path / "out"), num_epochs=0.3)
            if not a.startswith(("--lr_initial", "--rank_in"))]
    res = ok(launch(1, TRAIN + ["--config", str(first), "--config", str(second)] + argv))
    assert "lr_initial: 0.03" in res.stdout and "rank_in: 3" in res.stdout


@pytest.fixture(scope="module")
def finished(dataset, tmp_path_factory):
    """A finished 2-rank run (ng-online) to resume from in the checkpoint tests."""
    out = str(tmp_path_factory.mktemp("finished") / "run")
    ok(launch(2, TRAIN + args_for(*dataset, out, num_epochs=1)))
    return out


@pytest.mark.parametrize("extra,expected", [
    ({"optimizer": "sgd"}, "optimizer: 'ng-online' there, 'sgd' here"),
    ({"rank_in": 7}, "rank_in: 4 there, 7 here"),
])
def test_resume_with_other_optimizer_options_is_one_line(dataset, finished, tmp_path, extra, expected):
    out = str(tmp_path / "run")
    synthetic.crashed_copy(finished, out, keep=2)
    bad_input(2, args_for(*dataset, out, num_epochs=1, **extra) + ["--resume"], expected)


def test_damaged_checkpoint_metadata_is_skipped_or_one_line(dataset, finished, tmp_path):
    from ngsgd_mpi import storage
    from ngsgd_mpi.model import MODEL_FORMAT

    out = str(tmp_path / "run")
    done = synthetic.crashed_copy(finished, out, keep=3)
    open(os.path.join(done[2].path, "COMPLETE"), "w").close()            # an empty COMPLETE marker
    record, meta = storage.read(done[1].model_path, MODEL_FORMAT)         # a broken network_config,
    meta["network_config"]["input_dim"] = "many"                          # checksum made to match
    storage.write(done[1].model_path, MODEL_FORMAT, record, meta)
    res = launch(1, [sys.executable, "-m", "ngsgd_mpi.inference", "eval", "--model", done[1].model_path,
                     "--data", dataset[1]])
    assert res.returncode == EXIT_BAD_INPUT and res.stderr.count("\n") == 1, res.stderr
    assert "bad or missing network_config" in res.stderr
    res = ok(launch(2, TRAIN + args_for(*dataset, out, num_epochs=1) + ["--resume"]))
    assert "ckpt-000002 is unusable" in res.stdout and "bad or missing network_config" in res.stdout
    assert "resumed from checkpoint after period 1" in res.stdout


def test_editing_a_checkpoint_attribute_is_detected(dataset, finished, tmp_path):
    out = str(tmp_path / "run")
    done = synthetic.crashed_copy(finished, out, keep=2)
    with h5py.File(done[1].model_path, "r+") as f:
        f.attrs["meta"] = f.attrs["meta"].replace('"samples": ', '"samples": 1')
    res = ok(launch(2, TRAIN + args_for(*dataset, out, num_epochs=1) + ["--resume"]))
    assert "ckpt-000002 is unusable" in res.stdout and "checksum mismatch" in res.stdout
    assert "resumed from checkpoint after period 1" in res.stdout


# ----------------------------------------------------------------------------- 5. divergence

@pytest.mark.parametrize("action", ["warn", "rollback", "abort"])
def test_finite_divergence_is_reported_and_acted_on(dataset, tmp_path, action):
    out = str(tmp_path / "run")
    argv = args_for(*dataset, out, optimizer="sgd", lr_initial=300, lr_final=300, num_epochs=1.5,
                    divergence_action=action, max_divergence_retries=1)
    res = launch(2, TRAIN + argv)
    events = [r for r in metrics(out) if r.get("event") == "divergence"]
    assert events and "worse than a uniform guess (-ln 6 = -1.7918)" in events[0]["message"], res.stdout
    assert events[0]["period"] >= 2 and "period 2: divergence:" in res.stdout     # the progress line
    if action == "warn":
        ok(res)
        assert all(e["action"] == "warn" for e in events)
    elif action == "rollback":
        assert res.returncode == EXIT_DIVERGED and "lr_factor" in events[0]
        assert "diverged 2 times in a row" in res.stderr
    else:
        assert res.returncode == EXIT_DIVERGED and "divergence_action is abort" in res.stderr
        assert res.stderr.count("error:") == 1


def test_default_training_reports_no_divergence(dataset, tmp_path):
    out = str(tmp_path / "run")
    ok(launch(2, TRAIN + args_for(*dataset, out, num_epochs=1)))
    assert not [r for r in metrics(out) if r.get("event")]


def test_non_finite_data_mid_run_names_file_and_frame(dataset, tmp_path):
    """Rank 1's file turns bad after the start-up scan (its 5th window read, in period 2)."""
    out = str(tmp_path / "run")
    res = launch(2, DRIVER + ["nan_data:1:5"] + args_for(*dataset, out, num_epochs=3, window_frames=64))
    assert res.returncode == EXIT_BAD_INPUT, res.stdout + res.stderr
    lines = [line for line in res.stderr.splitlines() if "error:" in line]
    assert len(lines) == 1 and "train.1.h5: feats contain NaN/Inf at frame" in lines[0], res.stderr
    assert "found by rank 1/2 alone" in lines[0] and "Traceback" not in res.stderr
    assert "lower lr" not in res.stdout + res.stderr and checkpoint.complete_checkpoints(out)


# ----------------------------------------------------------------------------- 6. resume

def test_resume_on_fewer_ranks_keeps_the_samples_and_stops_at_total_samples(dataset, finished, tmp_path):
    out = str(tmp_path / "run")
    synthetic.crashed_copy(finished, out, keep=2)
    samples_before = metrics(finished)[1]["samples"]
    res = ok(launch(1, TRAIN + args_for(*dataset, out, num_epochs=1) + ["--resume"]))
    assert "written by 2 ranks with 1 ranks" in res.stdout and f"{samples_before:,} samples" in res.stdout
    recs = metrics(out)
    period = recs[3]["samples"] - recs[2]["samples"]
    assert recs[2]["samples"] == samples_before + period and period == 256            # 1 rank x 256
    total = sum(data.open_partition(os.path.join(dataset[0], p), scan=False).num_frames
                for p in os.listdir(dataset[0]))                                 # num_epochs 1
    assert total <= recs[-1]["samples"] < total + period


def test_a_mid_period_checkpoint_of_other_ranks_alone_is_one_line(tmp_path):
    out = str(tmp_path / "run")
    argv = args_for(*synthetic.write_dataset(tmp_path / "data", num_partitions=3), out, num_epochs=1,
                    signal_check_every=1)
    res = launch(2, DRIVER + ["stop_at:1:1:3"] + argv)                 # before the first average
    assert res.returncode == EXIT_STOPPED, res.stdout + res.stderr
    bad_input(3, argv + ["--resume"], "no checkpoint fits 3 ranks", "resume with 2 ranks")
    assert [c.batch for c in checkpoint.complete_checkpoints(out)] == [3]        # still there


def test_frames_per_sec_counts_only_the_minibatches_run_in_this_process(monkeypatch):
    """A period resumed after minibatch 30 of 32 ran 2 minibatches here: the rate is theirs."""
    from ngsgd_mpi import schedule, trainer

    plan = schedule.Plan(minibatch_size=32, batches_per_period=32, num_ranks=2, ranks_initial=2,
                         total_samples=10_000, lr_initial=0.1, lr_final=0.01, lr_scale_by_ranks=True,
                         num_hidden_layers=2, add_layers_period=0, first_period_pick_best=False,
                         pick_best_after_growth=False)
    monkeypatch.setattr(trainer.time, "perf_counter", lambda: 101.0)
    prog = trainer.Progress(period=2, samples=4096)
    rec = trainer.period_record({}, prog, plan, plan.period(2, 4096), 0.1, 0.2, 5, start_time=0.0,
                                t_period=100.0, first_batch=30)
    assert rec["frames_per_sec"] == 2 * 32 * 2                   # not 32 minibatches' worth
