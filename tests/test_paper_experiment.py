"""scripts/paper_experiment.py --quick end to end: Kaldi data dirs -> prepare -> the sweep under
mpiexec -> table and PNGs; then a second invocation skips every finished run."""

import json
import os
import shutil
import sys

import numpy as np
import pytest

import synthetic

SCRIPT = os.path.join(synthetic.SCRIPTS, "paper_experiment.py")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def learning_record(run_dir):
    """metrics.jsonl without the timings, which differ from run to run."""
    keys = ("period", "samples", "lr", "train_obj", "train_acc", "valid_obj", "valid_acc")
    with open(run_dir / "metrics.jsonl") as f:
        return [{k: json.loads(line)[k] for k in keys} for line in f]


def test_quick_sweep_writes_table_and_plots_and_resumes(tmp_path):
    synthetic.write_tiny_corpus(tmp_path / "corpus")
    out = tmp_path / "out"
    argv = ["--corpus", str(tmp_path / "corpus"), "--out", str(out), "--quick", "--ranks", "1,2",
            "--reset-ranks", "2", "--num-partitions", "2", "--valid-frames", "300"]
    res = synthetic.run([sys.executable, SCRIPT] + argv, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr

    names = ["sgd-1r", "sgd-2r", "ng-online-1r", "ng-online-2r", "ng-simple-1r", "ng-simple-2r",
             "ng-online-2r-reset"]
    rows = json.loads((out / "results.json").read_text())
    assert [r["run"] for r in rows] == names
    assert all(r["finished"] for r in rows)
    # the same samples for every run (up to one averaging period of the 2-rank runs: 2 x 256)
    samples = [r["samples"] for r in rows]
    assert max(samples) - min(samples) <= 2 * 256
    # the n-times rule: same effective rate, each rank steps with ranks x it
    for r in rows:
        assert r["lr_per_rank"] == pytest.approx(r["ranks"] * r["lr"])
        assert r["valid_obj"] is not None and np.isfinite(r["valid_obj"]) and 0 <= r["valid_acc"] <= 1
        # better than chance on 6 well-separated classes
        assert r["valid_acc"] > 0.3
    table = (out / "results.md").read_text()
    assert all(f"| {n} |" in table for n in names)
    for png in ("curves_by_optimizer.png", "curves_by_ranks.png", "reset.png"):
        assert (out / png).read_bytes()[:8] == PNG_MAGIC
    # validation came from the test speakers only, training from the train speakers
    valid_ids = (out / "data" / "valid_utts.txt").read_text().split()
    assert valid_ids and all(u.startswith("t001-") for u in valid_ids)
    commands = (out / "commands.sh").read_text()
    assert "--ng-reset-on-average=true" in commands and " -n 2 " in commands

    # re-running skips every finished run and resumes an unfinished one from its last checkpoint
    before = learning_record(out / "runs" / "sgd-2r")
    (out / "runs" / "sgd-2r" / "final.h5").unlink()
    newest = max((out / "runs" / "sgd-2r" / "checkpoints").iterdir())
    shutil.rmtree(newest)
    stamps = {n: os.path.getmtime(out / "runs" / n / "final.h5") for n in names if n != "sgd-2r"}
    res = synthetic.run([sys.executable, SCRIPT] + argv, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.count("final.h5 exists, skipped") == len(names) - 1
    assert "sgd-2r: training (resumed)" in res.stdout
    assert stamps == {n: os.path.getmtime(out / "runs" / n / "final.h5") for n in stamps}
    # the redone period replaces its record: same periods, same numbers (exact resume)
    assert learning_record(out / "runs" / "sgd-2r") == before


def test_plan_and_bad_options():
    module = synthetic.load_script("paper_experiment")
    runs = module.plan(module.parse_args(["--data", "d", "--out", "o", "--ranks", "1,4",
                                          "--optimizers", "sgd", "--reset-ranks", "4"]))
    assert [r["name"] for r in runs] == ["sgd-1r", "sgd-4r", "ng-online-4r-reset"]
    with pytest.raises(SystemExit, match="--optimizers: unknown 'adam'"):
        module.plan(module.parse_args(["--data", "d", "--out", "o", "--optimizers", "adam"]))
    with pytest.raises(SystemExit, match="--lr 'sgd=0.1': expected OPT=INITIAL:FINAL"):
        module.learning_rates(module.parse_args(["--data", "d", "--out", "o", "--lr", "sgd=0.1"]))
    with pytest.raises(SystemExit, match="--set 'bogus=1': expected KEY=VALUE"):
        module.base_options(module.parse_args(["--data", "d", "--out", "o", "--set", "bogus=1"]))
    opts = module.base_options(module.parse_args(["--data", "d", "--out", "o", "--set", "num-epochs=2"]))
    assert opts["num_epochs"] == 2 and opts["combine_last_k"] == 0
    assert module.learning_rates(module.parse_args(
        ["--data", "d", "--out", "o", "--lr", "sgd=0.1:0.01"]))["sgd"] == (0.1, 0.01)
