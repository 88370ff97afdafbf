"""The SPMD trainer end to end, under the real mpiexec of the PyPI MPI (each run has a timeout)."""

import json
import os
import shutil
import sys

import h5py
import numpy as np
import pytest

import synthetic
from ngsgd_mpi import checkpoint, config, faults, trainer
from ngsgd_mpi.model import Model

TRAIN = [sys.executable, "-m", "ngsgd_mpi.cli"]
HERE = os.path.dirname(__file__)


def args_for(train_dir, valid, out, **extra):
    opts = dict(train_data=train_dir, valid_data=valid, out_dir=out, context=2, num_hidden_layers=2,
                pnorm_input_dim=40, pnorm_output_dim=8, rank_in=4, rank_out=4, minibatch_size=32,
                samples_per_average=256, total_samples=0, num_epochs=2, lr_initial=0.02,
                lr_final=0.005, seed=3, combine_last_k=0, threads_per_rank=1)
    opts.update(extra)
    return [f"--{k}={v}" for k, v in opts.items()]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return synthetic.write_dataset(tmp_path_factory.mktemp("data"), num_partitions=3)


def final_params(out):
    return Model.load(os.path.join(out, "final.h5")).params


def metrics(out):
    """Every record of metrics.jsonl, in order (periods and events)."""
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def periods(out):
    return [r for r in metrics(out) if "event" not in r]


def events(out):
    return [r for r in metrics(out) if "event" in r]


def mpirun(n, argv, timeout=180):
    res = synthetic.run([synthetic.mpiexec(), "-n", str(n)] + argv, timeout=timeout)
    assert res.returncode == 0, res.stdout + res.stderr
    return res


@pytest.mark.parametrize("n,optimizer", [(2, "ng-online"), (3, "sgd")])
def test_averages_are_identical_across_ranks_and_equal_the_mean(dataset, tmp_path, n, optimizer):
    train_dir, valid = dataset
    out = str(tmp_path / "run")
    mpirun(n, [sys.executable, os.path.join(HERE, "record_averages.py"), str(tmp_path)]
           + args_for(train_dir, valid, out, optimizer=optimizer))
    ranks = [np.load(tmp_path / f"rank{r}.npz") for r in range(n)]
    num_averages = len(periods(out))
    assert num_averages >= 2 and all(len(z["after"]) == num_averages for z in ranks)
    for i in range(num_averages):
        for z in ranks[1:]:
            assert np.array_equal(z["after"][i], ranks[0]["after"][i])      # bit-identical
        mean = np.mean([z["before"][i].astype(np.float64) for z in ranks], axis=0)
        np.testing.assert_allclose(ranks[0]["after"][i], mean, rtol=1e-6, atol=1e-7)
        assert not np.array_equal(ranks[0]["before"][i], ranks[1]["before"][i])  # ranks did differ
    recs = periods(out)
    assert all(r["lr_per_rank"] == pytest.approx(n * r["lr"]) for r in recs)
    assert recs[0]["lr"] == pytest.approx(0.02) and recs[-1]["lr"] == pytest.approx(0.005)
    np.testing.assert_array_equal(final_params(out), ranks[0]["after"][-1])


def test_lr_scaling_can_be_switched_off(dataset, tmp_path):
    train_dir, valid = dataset
    out = str(tmp_path / "run")
    mpirun(2, TRAIN + args_for(train_dir, valid, out, lr_scale_by_ranks="false", num_epochs=0.5))
    assert all(r["lr_per_rank"] == pytest.approx(r["lr"]) for r in metrics(out))


def test_one_rank_under_mpiexec_equals_plain_python_and_runs_are_reproducible(dataset, tmp_path):
    train_dir, valid = dataset
    a, b, c = (str(tmp_path / x) for x in "abc")
    mpirun(1, TRAIN + args_for(train_dir, valid, a))
    res = synthetic.run(TRAIN + args_for(train_dir, valid, b))
    assert res.returncode == 0, res.stderr
    res = synthetic.run(TRAIN + args_for(train_dir, valid, c))
    assert res.returncode == 0, res.stderr
    assert np.array_equal(final_params(a), final_params(b))
    assert np.array_equal(final_params(b), final_params(c))


def test_progress_lines_and_metrics(dataset, tmp_path):
    train_dir, valid = dataset
    out = str(tmp_path / "run")
    res = mpirun(2, TRAIN + args_for(train_dir, valid, out))
    lines = [line for line in res.stdout.splitlines() if line.startswith("period ")]
    recs = metrics(out)
    assert len(lines) == len(recs) and "valid" in lines[0] and "ETA" in lines[0]
    assert "resolved config:" in res.stdout and "lr_initial: 0.02" in res.stdout
    for key in ("samples", "frames_per_sec", "train_obj", "valid_obj", "valid_acc", "time_compute",
                "time_data_wait", "time_allreduce", "elapsed", "eta"):
        assert key in recs[-1]
    assert recs[-1]["valid_acc"] > 1 / 6 + 0.1              # learned something (6 classes)
    assert recs[-1]["valid_obj"] > recs[0]["valid_obj"]
    final = Model.load(os.path.join(out, "final.h5"))
    assert final.train_config["lr_initial"] == 0.02
    np.testing.assert_allclose(final.class_priors.sum(), 1.0)


@pytest.mark.parametrize("optimizer", ["ng-online", "ng-simple"])
def test_resume_is_bit_identical(dataset, tmp_path, optimizer):
    train_dir, valid = dataset
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    argv = args_for(train_dir, valid, full, optimizer=optimizer)
    mpirun(2, TRAIN + argv)
    done = checkpoint.complete_checkpoints(full)
    assert len(done) >= 3
    synthetic.crashed_copy(full, part, keep=2)
    res = mpirun(2, TRAIN + args_for(train_dir, valid, part, optimizer=optimizer) + ["--resume"])
    assert "resumed from checkpoint after period 2" in res.stdout
    assert np.array_equal(final_params(full), final_params(part))
    assert [r["period"] for r in metrics(part)] == [r["period"] for r in metrics(full)]


def test_resume_without_checkpoint_starts_fresh(dataset, tmp_path):
    train_dir, valid = dataset
    out = str(tmp_path / "run")
    res = synthetic.run(TRAIN + args_for(train_dir, valid, out, num_epochs=0.5) + ["--resume"])
    assert res.returncode == 0, res.stderr
    assert os.path.exists(os.path.join(out, "final.h5"))


# ----------------------------------------------------------------------------- bad input

def bad_run(n, argv, tmp_path):
    res = synthetic.run([synthetic.mpiexec(), "-n", str(n)] + TRAIN + argv, timeout=120)
    assert res.returncode == faults.EXIT_BAD_INPUT, res.stdout + res.stderr
    assert res.stderr.count("error:") == 1, res.stderr          # one message, not one per rank
    return res.stderr


def test_missing_partition_files(dataset, tmp_path):
    _, valid = dataset
    out = tmp_path / "out"
    err = bad_run(2, args_for(str(tmp_path / "nope/*.h5"), valid, str(out)), tmp_path)
    assert "no partition files match" in err and not out.exists()
    err = bad_run(1, args_for(dataset[0], str(tmp_path / "missing.h5"), str(out)), tmp_path)
    assert "missing.h5: partition file does not exist" in err and not out.exists()


def test_fewer_partitions_than_ranks(tmp_path):
    train_dir, valid = synthetic.write_dataset(tmp_path / "d", num_partitions=1)
    out = tmp_path / "out"
    err = bad_run(2, args_for(train_dir, valid, str(out)), tmp_path)
    assert "1 training partition(s) for 2 ranks" in err and not out.exists()


def test_inconsistent_feat_dim_between_partitions(tmp_path):
    train_dir, valid = synthetic.write_dataset(tmp_path / "d", num_partitions=2)
    other, _ = synthetic.write_dataset(tmp_path / "e", num_partitions=2, feat_dim=5)
    shutil.copy(os.path.join(other, "train.1.h5"), os.path.join(train_dir, "train.1.h5"))
    err = bad_run(2, args_for(train_dir, valid, str(tmp_path / "out")), tmp_path)
    assert "feat_dim/num_classes" in err and "rank 1: 5/6" in err
    err = bad_run(1, args_for(train_dir, valid, str(tmp_path / "out")), tmp_path)
    assert "train.1.h5: feat_dim/num_classes 5/6 differ" in err
    assert not (tmp_path / "out").exists()


def test_label_out_of_range_and_nan_features(tmp_path):
    train_dir, valid = synthetic.write_dataset(tmp_path / "d", num_partitions=2)
    with h5py.File(os.path.join(train_dir, "train.1.h5"), "r+") as f:
        f["labels"][10] = 6
    err = bad_run(2, args_for(train_dir, valid, str(tmp_path / "out")), tmp_path)
    assert "train.1.h5: label 6 at frame 10" in err
    with h5py.File(os.path.join(train_dir, "train.1.h5"), "r+") as f:
        f["labels"][10] = 0
        f["feats"][3, 2] = np.nan
    err = bad_run(2, args_for(train_dir, valid, str(tmp_path / "out")), tmp_path)
    assert "train.1.h5: feats contain NaN/Inf at frame 3" in err
    assert not (tmp_path / "out").exists()


def test_validation_file_with_other_num_classes(tmp_path):
    train_dir, _ = synthetic.write_dataset(tmp_path / "d", num_partitions=1)
    _, valid7 = synthetic.write_dataset(tmp_path / "e", num_partitions=1, num_classes=7)
    err = bad_run(1, args_for(train_dir, valid7, str(tmp_path / "out")), tmp_path)
    assert "valid.h5: num_classes is 7, expected 6" in err


def test_resume_with_other_architecture_is_refused(dataset, tmp_path):
    train_dir, valid = dataset
    out = str(tmp_path / "out")
    res = synthetic.run(TRAIN + args_for(train_dir, valid, out, num_epochs=0.5))
    assert res.returncode == 0, res.stderr
    err = bad_run(1, args_for(train_dir, valid, out, num_epochs=0.5, pnorm_input_dim=80) + ["--resume"],
                  tmp_path)
    assert "architecture" in err and "differs" in err


@pytest.mark.parametrize("extra,match", [
    (["--lr-initial=-1"], "lr_initial: must be a positive number"),
    (["--rank-in=0"], "rank_in: must be >= 1"),
    (["--context=-2"], "context: must be >= 0"),
])
def test_invalid_values_exit_2_with_one_message(dataset, tmp_path, extra, match):
    err = bad_run(2, args_for(*dataset, str(tmp_path / "out")) + extra, tmp_path)
    assert match in err and not (tmp_path / "out").exists()


def test_unknown_config_key(dataset, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("optimizer: sgd\nlearnin_rate: 0.1\n")
    err = bad_run(2, args_for(*dataset, str(tmp_path / "out")) + ["--config", str(cfg)], tmp_path)
    assert "c.yaml: unknown key 'learnin_rate'" in err


def test_crash_on_one_rank_aborts_the_job_promptly(dataset, tmp_path):
    """A failure after setup (here: the validation file vanishes) must not hang rank 1."""
    train_dir, valid = dataset
    gone = tmp_path / "valid.h5"
    shutil.copy(valid, gone)
    script = ("import os, sys; from ngsgd_mpi import cli, evaluation\n"
              "def boom(*a, **k):\n    raise RuntimeError('injected failure on rank 0')\n"
              "evaluation.evaluate_partition = boom\nsys.exit(cli.train_main(sys.argv[1:]))\n")
    res = synthetic.run([synthetic.mpiexec(), "-n", "2", sys.executable, "-c", script]
                        + args_for(train_dir, str(gone), str(tmp_path / "out")), timeout=60)
    assert res.returncode != 0
    assert "[rank 0/2] fatal error" in res.stderr and "injected failure" in res.stderr


def test_config_round_trip_in_checkpoint(dataset, tmp_path):
    out = str(tmp_path / "out")
    res = synthetic.run(TRAIN + args_for(*dataset, out, num_epochs=0.5))
    assert res.returncode == 0, res.stderr
    saved = Model.load(checkpoint.complete_checkpoints(out)[-1].model_path)
    assert saved.train_config == config.to_dict(config.parse(args_for(*dataset, out, num_epochs=0.5)))


# ----------------------------------------------------------------------------- in process

class NoStop:
    requested = False

    def restore(self):
        pass


def test_roll_back_restores_the_period_start_and_halves_the_rate(tmp_path):
    from ngsgd_mpi.metrics import MetricsLog
    from ngsgd_mpi.network import Network, NetworkConfig
    from ngsgd_mpi.optim import OptimizerConfig, make_updater

    net = Network(NetworkConfig(input_dim=6, num_classes=3, num_hidden_layers=1, pnorm_input_dim=8,
                                pnorm_output_dim=4), seed=0)
    updater = make_updater(net, OptimizerConfig(rank_in=2, rank_out=2))
    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((16, 6)).astype(np.float32), rng.integers(0, 3, 16)
    net.train_gradients(X, y)
    updater.step(0.01)
    snapshot = (net.params.copy(), updater.state_dict())
    for _ in range(3):
        net.train_gradients(X, y)
        updater.step(0.01)
    cfg = config.parse(["--train-data", "x", "--max-divergence-retries", "1"])
    prog = trainer.Progress(period=1, batch=3, obj=-5.0, correct=7.0)
    log = MetricsLog(str(tmp_path), speak=True)
    trainer.roll_back(cfg, net, updater, snapshot, prog, log)
    np.testing.assert_array_equal(net.params, snapshot[0])
    restored = updater.state_dict()["layers"][0]["input"]
    np.testing.assert_array_equal(restored["W"], snapshot[1]["layers"][0]["input"]["W"])
    assert (prog.lr_factor, prog.retries, prog.batch, prog.obj, prog.correct) == (0.5, 1, 0, 0.0, 0.0)
    assert events(str(tmp_path))[-1]["event"] == "divergence"
    with pytest.raises(faults.DivergedError, match="diverged 2 times in a row in period 2"):
        trainer.roll_back(cfg, net, updater, snapshot, prog, log)


def test_divergence_on_one_rank_rolls_back_every_rank(dataset, tmp_path, monkeypatch):
    """Two ranks in one process (thread_world): rank 1 diverges once in period 2; both redo it."""
    import threading

    from thread_world import run_ranks

    out = str(tmp_path / "run")
    cfg = config.parse(args_for(*dataset, out, collective_timeout=0, num_epochs=1))
    original, injected = trainer.train_step, []

    def train_step(network, updater, batch, lr, prog):
        flags = original(network, updater, batch, lr, prog)
        if threading.current_thread().name == "rank1" and prog.period == 1 and not injected:
            injected.append(prog.batch)
            return trainer.DIVERGED
        return flags
    monkeypatch.setattr(trainer, "train_step", train_step)
    assert run_ranks(2, lambda dist: trainer.train(cfg, dist, NoStop())) == [0, 0]
    assert [(e["period"], e["lr_factor"]) for e in events(out)] == [(2, 0.5)]
    recs = periods(out)
    assert [r["period"] for r in recs] == list(range(1, len(recs) + 1))
    plan_lr = recs[1]["lr"] / 0.5             # the redone period ran at half its rate
    assert recs[2]["lr"] < plan_lr and os.path.exists(os.path.join(out, "final.h5"))


# ----------------------------------------------------------------------------- Kaldi's recipe

RECIPE_CONFIG = os.path.join(HERE, os.pardir, "configs", "kaldi_nnet2_pnorm.yaml")


def recipe_args(train_dir, valid, out, **extra):
    """The full Kaldi recipe (configs/kaldi_nnet2_pnorm.yaml) at test size."""
    opts = dict(num_hidden_layers=3, add_layers_period=2, combine_last_k=4, keep_last_k=4,
                combine_frames=300, combine_lbfgs_evals=6, lda_max_frames=0, num_epochs=3)
    opts.update(extra)
    return ["--config", RECIPE_CONFIG] + args_for(train_dir, valid, out, **opts)


def test_job_ramp_idle_ranks_take_weight_zero_and_the_rate_follows_the_jobs(dataset, tmp_path):
    train_dir, valid = dataset
    out = str(tmp_path / "run")
    mpirun(3, [sys.executable, os.path.join(HERE, "record_averages.py"), str(tmp_path)]
           + args_for(train_dir, valid, out, ranks_initial=1, num_epochs=3))
    recs = periods(out)
    active = [r["active_ranks"] for r in recs]
    assert active[0] == 1 and active[-1] == 3 and active == sorted(active)
    ranks = [np.load(tmp_path / f"rank{r}.npz") for r in range(3)]
    for i, rec in enumerate(recs):
        assert rec["lr_per_rank"] == pytest.approx(rec["active_ranks"] * rec["lr"])
        trained = [r for r, o in enumerate(rec["rank_train_obj"]) if o is not None]
        assert len(trained) == rec["active_ranks"]
        mean = np.mean([ranks[r]["before"][i].astype(np.float64) for r in trained], axis=0)
        np.testing.assert_allclose(ranks[0]["after"][i], mean, rtol=1e-6, atol=1e-7)
        idle = sorted(set(range(3)) - set(trained))
        for r in idle:                               # an idle rank did not move in the period
            start = ranks[r]["after"][i - 1] if i else ranks[idle[0]]["before"][0]
            np.testing.assert_array_equal(ranks[r]["before"][i], start)
    assert recs[-1]["samples"] == sum(active) * 256             # only the active ranks' samples
    used = [sum(r in [k for k, o in enumerate(rec["rank_train_obj"]) if o is not None] for rec in recs)
            for r in range(3)]
    assert max(used) - min(used) <= 1                           # the active ranks rotate


def test_growth_pick_best_lda_prior_scale_and_lbfgs_combination(dataset, tmp_path):
    train_dir, valid = dataset
    out = str(tmp_path / "run")
    res = mpirun(2, TRAIN + recipe_args(train_dir, valid, out))
    recs = periods(out)
    picks = [e for e in events(out) if e["event"] == "pick_best"]
    assert [r["num_hidden_layers"] for r in recs[:6]] == [1, 1, 2, 2, 3, 3]
    assert [e["period"] for e in picks] == [1, 3, 5]
    assert [e["reason"] for e in picks] == ["first period", "a layer was added", "a layer was added"]
    assert "inserted hidden layer 3" in res.stdout and "combine: 4 model(s) x 4 layer(s)" in res.stdout
    final = Model.load(os.path.join(out, "final.h5"))
    assert final.network_config.num_hidden_layers == 3 and final.input_mean is None
    assert final.input_transform[0].shape == (40, 40) and final.output_scale.shape == (6,)
    assert final.info["combine_method"] == "lbfgs" and final.info["normalized_stddev"]
    assert final.info["valid_acc"] > 1 / 6 + 0.1
    # the LDA statistics do not depend on the number of ranks
    one = str(tmp_path / "one")
    mpirun(1, TRAIN + recipe_args(train_dir, valid, one, num_epochs=0.2, combine_last_k=0))
    np.testing.assert_allclose(Model.load(os.path.join(one, "final.h5")).input_transform[0],
                               final.input_transform[0], rtol=1e-5, atol=1e-6)


def test_resume_across_a_growth_step_is_bit_identical(dataset, tmp_path):
    train_dir, valid = dataset
    full = str(tmp_path / "full")
    short = dict(combine_last_k=0, keep_last_k=0, num_epochs=1)
    mpirun(2, TRAIN + recipe_args(train_dir, valid, full, **short))
    # from the averaged checkpoint right before the layer is added (period 2 done) ...
    before = str(tmp_path / "before")
    synthetic.crashed_copy(full, before, keep=2)
    res = mpirun(2, TRAIN + recipe_args(train_dir, valid, before, **short) + ["--resume"])
    assert "resumed from checkpoint after period 2" in res.stdout and "inserted hidden layer 2" in res.stdout
    assert np.array_equal(final_params(full), final_params(before))
    # ... and from a stop in the middle of the period that starts with the new layer
    middle = str(tmp_path / "middle")
    driver = [sys.executable, os.path.join(HERE, "fault_driver.py"), "stop_at:0:3:2"]
    res = synthetic.run([synthetic.mpiexec(), "-n", "2"] + driver
                        + recipe_args(train_dir, valid, middle, signal_check_every=1, **short))
    assert res.returncode == faults.EXIT_STOPPED, res.stdout + res.stderr
    res = mpirun(2, TRAIN + recipe_args(train_dir, valid, middle, **short) + ["--resume"])
    assert "resumed from checkpoint after period 2, minibatch" in res.stdout
    assert "inserted hidden layer 2" not in res.stdout           # restored grown, not grown again
    assert np.array_equal(final_params(full), final_params(middle))
    assert [r["period"] for r in metrics(middle)] == [r["period"] for r in metrics(full)]
