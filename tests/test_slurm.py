"""The jobs/ scripts under a real single-node Slurm (tests/slurm_cluster.py).

* A training job (srun and mpiexec variants) is sent a stop signal the way Slurm sends one
  (to the batch shell, as ``--signal=B:USR1@300`` does at the time-limit warning, or to the
  job steps) once its first checkpoint exists; it checkpoints, exits 75, requeues itself,
  resumes and finishes with a final.h5 bit-identical to an uninterrupted mpiexec run.
* A cancelled job checkpoints but stays cancelled; a job whose ranks were SIGKILLed (MPICH's
  shared memory left behind) and is requeued by hand resumes from its last checkpoint.
* prepare -> train -> forward/eval run as one chain of dependent jobs.
* A failing training job passes ngsgd-train's exit code through; the sweep submits one job
  per N.

Every wait is bounded; the fixture stops the daemons it started, by PID, even on failure.
Without slurm-wlm/munge (or root) the Slurm tests skip, unless CI is set: then they fail.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import kaldiio
import numpy as np
import pytest

import synthetic
from ngsgd_mpi import checkpoint, data, inference
from ngsgd_mpi.model import Model
from slurm_cluster import SlurmCluster, missing_requirements

REPO = Path(__file__).resolve().parents[1]
JOBS = REPO / "jobs"
ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
         "DEADLINE", "PREEMPTED")

# Long enough (about 5 s on 2 cores) that a stop signal lands well before the end: ~47 periods
# of 128 minibatches, a checkpoint after every period, final model combined from the last 20.
LONG_RUN = dict(context=2, num_hidden_layers=2, pnorm_input_dim=400, pnorm_output_dim=40, rank_in=4,
                rank_out=8, minibatch_size=32, samples_per_average=4096, num_epochs=150, seed=3,
                signal_check_every=1)
SHORT_RUN = dict(context=2, num_hidden_layers=2, pnorm_input_dim=40, pnorm_output_dim=8, rank_in=4,
                 rank_out=4, minibatch_size=32, samples_per_average=256, num_epochs=2, seed=3)


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    reason = missing_requirements()
    if reason:
        if os.environ.get("CI"):
            pytest.fail(f"CI is set but no Slurm test cluster can run here: {reason}")
        pytest.skip(reason)
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start(timeout=60)
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(autouse=True)
def no_job_outlives_its_test(request):
    """A test that fails while its job still runs would leave the node's two CPUs to it, and
    every later test's job would wait behind it: cancel whatever is left."""
    yield
    if "slurm" in request.fixturenames:
        request.getfixturevalue("slurm").run(["scancel", "--user", str(os.getuid())], check=False)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return synthetic.write_dataset(tmp_path_factory.mktemp("data"), num_partitions=2)


def write_config(path: Path, train_data, valid_data, options) -> str:
    lines = [f"train_data: {train_data}", f"valid_data: {valid_data}"]
    lines += [f"{k}: {v}" for k, v in options.items()]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def long_run(dataset, tmp_path_factory):
    """(config path, final params of an uninterrupted 2-rank mpiexec run)."""
    root = tmp_path_factory.mktemp("reference")
    config = write_config(root / "long.yaml", *dataset, LONG_RUN)
    res = synthetic.run([synthetic.mpiexec(), "-n", "2", sys.executable, "-m", "ngsgd_mpi.cli",
                         "--config", config, "--out-dir", str(root / "run")], timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    return config, final_params(root / "run")


def final_params(out) -> np.ndarray:
    return Model.load(os.path.join(out, "final.h5")).params


def job_env(**variables) -> dict:
    """What the job scripts read (sbatch --export=ALL passes the submitting environment):
    this Python's environment as VENV, one thread per process, and the job's variables."""
    in_venv = sys.prefix != sys.base_prefix
    env = {"VENV": sys.prefix if in_venv else "", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    if not in_venv:
        env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
    env.update({k: str(v) for k, v in variables.items()})
    return env


def submit(slurm, script, workdir: Path, name: str, sbatch_args=(), **variables) -> int:
    return slurm.sbatch([f"--chdir={workdir}", f"--output={workdir / name}.log", f"--job-name={name}",
                         "--export=ALL", *sbatch_args, str(JOBS / script)], env=job_env(**variables))


def log_of(workdir: Path, name: str) -> str:
    path = workdir / f"{name}.log"
    return path.read_text(errors="replace") if path.exists() else "(no log)"


def wait_ended(slurm, job, workdir, name, timeout) -> dict:
    try:
        return slurm.wait_job(job, lambda j: j["JobState"] in ENDED, timeout)
    except TimeoutError as exc:
        raise AssertionError(f"{exc}\n--- job log\n{log_of(workdir, name)}") from None


def assert_completed(info, workdir, name) -> None:
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), \
        f"{name}: {info['JobState']} exit {info['ExitCode']}\n--- job log\n{log_of(workdir, name)}"


# ----------------------------------------------------------------------------- preemption

def wait_for_checkpoint(slurm, job, out, workdir) -> None:
    deadline = time.monotonic() + 90
    while not checkpoint.complete_checkpoints(str(out)):
        state = slurm.job(job).get("JobState")
        assert state not in ENDED, f"ended ({state}) before a checkpoint:\n{log_of(workdir, 'train')}"
        assert time.monotonic() < deadline, f"no checkpoint in 90 s:\n{log_of(workdir, 'train')}"
        time.sleep(0.05)


def start_now_and_finish(slurm, job, workdir) -> dict:
    """Wait until the job is pending again after a requeue, start it at once (skipping the
    requeue delay of about 2 minutes) and wait for it to complete."""
    try:
        info = slurm.wait_job(job, lambda j: j["JobState"] in ENDED
                              or (int(j.get("Restarts", 0)) >= 1 and j["JobState"] == "PENDING"), 60)
    except TimeoutError as exc:
        raise AssertionError(f"{exc}\n--- job log\n{log_of(workdir, 'train')}") from None
    assert info["JobState"] == "PENDING", log_of(workdir, "train")
    # not "now": slurmd refuses a credential issued in the same second as the revocation of
    # the previous run's ("Killing non-startable batch job: Job credential revoked", seen under
    # load); Slurm's own requeue delay exists for this
    slurm.run(["scontrol", "update", f"JobId={job}", "StartTime=now+2"])
    info = wait_ended(slurm, job, workdir, "train", 300)
    assert_completed(info, workdir, "train")
    assert info["Restarts"] == "1"
    return info


def assert_same_result(out, reference) -> None:
    assert np.array_equal(final_params(out), reference)
    with open(out / "metrics.jsonl") as f:
        periods = [json.loads(line)["period"] for line in f]
    assert periods == list(range(1, len(periods) + 1))


@pytest.mark.parametrize("script,scancel_args,batch_got", [
    ("train_srun.sbatch", ["--batch", "--signal=USR1"], "SIGUSR1"),    # the --signal=B:USR1@300 path
    ("train_mpiexec.sbatch", ["--batch", "--signal=TERM"], "SIGTERM"),  # TERM to the shell -> USR1
    ("train_srun.sbatch", ["--signal=USR1"], None),                     # straight to the ranks (steps)
])
def test_stopped_job_requeues_resumes_and_ends_bit_identical(slurm, long_run, tmp_path, script,
                                                             scancel_args, batch_got):
    config, reference = long_run
    out = tmp_path / "run"
    job = submit(slurm, script, tmp_path, "train", ["--ntasks=2", "--cpus-per-task=1"],
                 CONFIG=config, OUT_DIR=out)
    wait_for_checkpoint(slurm, job, out, tmp_path)
    slurm.run(["scancel", *scancel_args, str(job)])
    start_now_and_finish(slurm, job, tmp_path)        # exit 75 -> scontrol requeue -> pending

    log = log_of(tmp_path, "train")
    if batch_got:
        assert f"batch shell got {batch_got}" in log, log
    assert "stopped on signal" in log and "checkpoint written, exit 75" in log, log
    assert f"requeueing job {job}" in log and "restart 1" in log, log
    assert "resumed from checkpoint after period" in log and "training finished" in log, log
    assert_same_result(out, reference)


def test_cancelled_job_is_not_requeued(slurm, long_run, tmp_path):
    """scancel sends SIGTERM everywhere: the ranks still checkpoint and exit 75, but the job
    is COMPLETING, so the script leaves it cancelled."""
    config, _ = long_run
    out = tmp_path / "run"
    job = submit(slurm, "train_srun.sbatch", tmp_path, "train", ["--ntasks=2", "--cpus-per-task=1"],
                 CONFIG=config, OUT_DIR=out)
    wait_for_checkpoint(slurm, job, out, tmp_path)
    slurm.run(["scancel", str(job)])
    info = wait_ended(slurm, job, tmp_path, "train", 120)
    log = log_of(tmp_path, "train")
    assert (info["JobState"], info["Restarts"]) == ("CANCELLED", "0"), log
    assert "stopped on signal" in log and "while the job is COMPLETING" in log, log
    assert "not requeueing it" in log and f"requeueing job {job}" not in log, log


def test_killed_ranks_requeued_by_hand_resume_from_the_last_checkpoint(slurm, long_run, tmp_path):
    """SIGKILL to the ranks: no checkpoint on the way out, the job fails (no requeue), and
    MPICH's shared memory named after the step JOBID.1 stays behind.  After `scontrol
    requeue` the new step 1 would open that stale segment and hang in MPI_Init; the script
    removes it first, and the job resumes from its last checkpoint."""
    config, reference = long_run
    out = tmp_path / "run"
    job = submit(slurm, "train_srun.sbatch", tmp_path, "train", ["--ntasks=2", "--cpus-per-task=1"],
                 CONFIG=config, OUT_DIR=out)
    wait_for_checkpoint(slurm, job, out, tmp_path)
    rows = [line.split() for line in slurm.run(["scontrol", "listpids", str(job)]).stdout.splitlines()[1:]]
    ranks = [int(r[0]) for r in rows if r[2].isdigit() and r[3] != "-"]
    assert len(ranks) == 2, rows
    for pid in ranks:
        os.kill(pid, signal.SIGKILL)
    info = wait_ended(slurm, job, tmp_path, "train", 120)
    assert info["JobState"] == "FAILED", log_of(tmp_path, "train")
    slurm.run(["scontrol", "requeue", str(job)])
    start_now_and_finish(slurm, job, tmp_path)

    log = log_of(tmp_path, "train")
    assert "training failed with exit code" in log and "restart 1" in log, log
    assert "resumed from checkpoint after period" in log and "training finished" in log, log
    assert "clean_stale_shm: removed /dev/shm/mpich_shm_" in log.split("restart 1")[1], log
    assert_same_result(out, reference)


# ----------------------------------------------------------------------------- the other jobs

def test_prepare_train_forward_chain(slurm, tmp_path):
    """ngsgd-prepare kaldi -> 2-rank training -> 2-rank forward + eval, as dependent jobs."""
    utts = synthetic.utterances(seed=7, num_utts=60)
    kaldi = tmp_path / "kaldi"
    kaldi.mkdir()
    kaldiio.save_ark(str(kaldi / "feats.ark"), {u: f for u, f, _ in utts}, scp=str(kaldi / "feats.scp"))
    kaldiio.save_ark(str(kaldi / "ali.ark"), {u: labels for u, _, labels in utts})
    h5, out = tmp_path / "h5", tmp_path / "run"

    prep = submit(slurm, "prepare.sbatch", tmp_path, "prepare", FEATS=kaldi / "feats.scp",
                  ALI=kaldi / "ali.ark", DATA_DIR=h5, NUM_PARTITIONS=2, VALID_FRACTION=0.2,
                  EXTRA_ARGS="--num-classes 6 --dtype float32")
    config = write_config(tmp_path / "short.yaml", h5 / "train", h5 / "valid.h5", SHORT_RUN)
    train = submit(slurm, "train_srun.sbatch", tmp_path, "train",
                   ["--ntasks=2", "--cpus-per-task=1", f"--dependency=afterok:{prep}"],
                   CONFIG=config, OUT_DIR=out)
    fwd = submit(slurm, "forward.sbatch", tmp_path, "forward",
                 ["--ntasks=2", "--cpus-per-task=1", f"--dependency=afterok:{train}"],
                 MODEL=out / "final.h5", FEATS=kaldi / "feats.scp", EVAL_DATA=h5 / "valid.h5")

    info = wait_ended(slurm, fwd, tmp_path, "forward", 300)
    for job, name in ((prep, "prepare"), (train, "train")):
        assert_completed(slurm.job(job), tmp_path, name)
    assert_completed(info, tmp_path, "forward")

    parts = sorted((h5 / "train").glob("*.h5"))
    infos = [data.open_partition(p) for p in parts] + [data.open_partition(h5 / "valid.h5")]
    assert len(parts) == 2
    assert sum(i.num_frames for i in infos) == sum(len(labels) for _, _, labels in utts)

    outputs = kaldiio.load_scp(str(out / "forward" / "output.scp"))
    assert list(outputs) == [u for u, _, _ in utts]                # every utterance, input order
    for u, feats, _ in utts[:5]:
        assert outputs[u].shape == (len(feats), 6) and np.all(np.isfinite(outputs[u]))
    with open(out / "forward" / "eval.json") as f:
        result = json.load(f)
    expected = inference.evaluate(str(out / "final.h5"), str(h5 / "valid.h5"))
    assert result["frame_accuracy"] == pytest.approx(expected["frame_accuracy"])
    assert result["objective"] == pytest.approx(expected["objective"])


def test_failed_training_passes_its_exit_code_through(slurm, dataset, tmp_path):
    config = write_config(tmp_path / "bad.yaml", tmp_path / "nowhere", dataset[1], SHORT_RUN)
    job = submit(slurm, "train_mpiexec.sbatch", tmp_path, "bad", ["--ntasks=2", "--cpus-per-task=1"],
                 CONFIG=config, OUT_DIR=tmp_path / "run")
    info = wait_ended(slurm, job, tmp_path, "bad", 120)
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("FAILED", "2:0", "0"), \
        log_of(tmp_path, "bad")
    assert "no partition files match" in log_of(tmp_path, "bad")


def test_sweep_submits_one_chained_job_per_rank_count(slurm, dataset, tmp_path):
    config = write_config(tmp_path / "short.yaml", *dataset, SHORT_RUN)
    env = dict(slurm.env, **job_env(CONFIG=config, OUT_ROOT=tmp_path / "sweep", CHAIN="1",
                                    SBATCH_ARGS="--cpus-per-task=1"))
    res = subprocess.run([str(JOBS / "sweep.sh"), "1", "2"], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.split("\n")
    jobs = [int(line.split()[2]) for line in lines if line.startswith("N=")]
    assert len(jobs) == 2 and lines[1].endswith(f"out {tmp_path}/sweep/n2")
    assert slurm.job(jobs[1])["Dependency"].startswith(f"afterany:{jobs[0]}")
    for n, job in zip((1, 2), jobs):
        info = wait_ended(slurm, job, tmp_path / "sweep", f"n{n}", 180)
        assert_completed(info, tmp_path / "sweep", f"n{n}")
        assert info["NumTasks"] == str(n)
        with open(tmp_path / "sweep" / f"n{n}" / "metrics.jsonl") as f:
            rec = json.loads(f.readline())
        assert rec["lr_per_rank"] == pytest.approx(n * rec["lr"])


# ----------------------------------------------------------------------------- no cluster needed

def test_sweep_dry_run_prints_the_layout():
    env = dict(os.environ, DRY_RUN="1", CHAIN="1", RANKS_PER_NODE="4", SBATCH_ARGS="--gpus-per-task=1")
    res = subprocess.run([str(JOBS / "sweep.sh"), "2", "8"], env=env, capture_output=True, text=True,
                         timeout=30)
    assert res.returncode == 0, res.stderr
    first, second = res.stdout.splitlines()
    assert "--ntasks=2 --nodes=1 --ntasks-per-node=2 --gpus-per-task=1" in first
    assert "--ntasks=8 --nodes=2 --ntasks-per-node=4 --dependency=afterany:" in second
    assert "OUT_DIR=runs/sweep/n8" in second and "--job-name=ngsgd-n8" in second
    res = subprocess.run([str(JOBS / "sweep.sh"), "0"], env=env, capture_output=True, text=True, timeout=30)
    assert res.returncode == 2 and "N must be a positive integer, got '0'" in res.stderr


def test_one_gpu_per_rank_picks_the_node_local_rank_gpu():
    show = [str(JOBS / "one_gpu_per_rank.sh"), "sh", "-c", 'echo "$PMI_RANK:$CUDA_VISIBLE_DEVICES"']
    res = synthetic.run([synthetic.mpiexec(), "-n", "3"] + show, timeout=60, env={"CUDA_VISIBLE_DEVICES": "4,6"})
    assert res.returncode == 0, res.stderr
    assert sorted(res.stdout.split()) == ["0:4", "1:6", "2:4"]
    res = synthetic.run([synthetic.mpiexec(), "-n", "2"] + show, timeout=60, env={"CUDA_VISIBLE_DEVICES": "7"})
    assert sorted(res.stdout.split()) == ["0:7", "1:7"]              # already one per task: unchanged
