"""scripts/recipe_experiment.py --quick end to end: Kaldi data dirs -> prepare -> ablation, sweep,
seeds and no-ramp runs under mpiexec -> tables and PNGs; then a second invocation skips every
finished run and resumes an unfinished one."""

import json
import os
import shutil
import sys

import pytest

import synthetic

SCRIPT = os.path.join(synthetic.SCRIPTS, "recipe_experiment.py")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


NAMES = ["sgd-2r", "sgd-2r-no-pickbest", "sgd-2r-flat", "sgd-2r-s1"]    # trained (of the 9 planned)
ARGV = ["--quick", "--optimizers", "sgd", "--groups", "ablation,sweep,seeds,flat", "--ablation-ranks", "2",
        "--sweep-ranks", "1,2", "--seed-ranks", "2", "--flat-ranks", "2", "--num-partitions", "2",
        "--valid-frames", "300", "--only", ",".join(NAMES)]


def test_quick_experiment_writes_tables_and_plots_and_resumes(tmp_path):
    synthetic.write_tiny_corpus(tmp_path / "corpus")
    out = tmp_path / "out"
    argv = ["--corpus", str(tmp_path / "corpus"), "--out", str(out)] + ARGV
    res = synthetic.run([sys.executable, SCRIPT] + argv, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    rows = {r["name"]: r for r in json.loads((out / "results.json").read_text())}
    assert sorted(rows) == sorted(NAMES) and all(r["finished"] for r in rows.values())
    full, flat = rows["sgd-2r"], rows["sgd-2r-flat"]
    assert full["active_ranks"][0] == 1 and full["active_ranks"][-1] == 2       # the ramp
    assert set(flat["active_ranks"]) == {2} and flat["off"] == "flat"
    assert full["pick_best"][0] == 1 and not rows["sgd-2r-no-pickbest"]["pick_best"]
    for r in rows.values():
        assert abs(r["samples"] - 3_000) <= 2 * 256          # equal total samples, up to one period
        assert set(r["scores"]) >= {"final", "last"} and 0 <= r["scores"]["final"]["acc"] <= 1
    assert "best_suffix" in full["scores"] and "best_suffix" not in rows["sgd-2r-no-pickbest"]["scores"]
    table = (out / "results.md").read_text()
    assert all(f"| {n} |" in table for n in NAMES) and "nnet-combine-fast" in table
    for png in ("ablation_sgd_2r_samples.png", "flat_sgd_samples.png", "seeds_sgd_samples.png"):
        assert (out / "plots" / png).read_bytes()[:8] == PNG_MAGIC
    commands = (out / "commands.sh").read_text()
    assert "--ranks-initial=0" in commands and " -n 2 " in commands and "--seed=1" in commands
    # score.h5 and valid.h5 hold test speakers only
    assert all(u.startswith("t001-") for u in (out / "data" / "score_utts.txt").read_text().split())

    # re-running skips every finished run and resumes an unfinished one from its last checkpoint
    run = out / "runs" / "sgd-2r-flat"
    (run / "final.h5").unlink()
    (run / "scores.json").unlink()
    shutil.rmtree(max((run / "checkpoints").iterdir()))
    res = synthetic.run([sys.executable, SCRIPT] + argv, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.count("final.h5 exists, skipped") == len(NAMES) - 1
    assert "sgd-2r-flat: training (resumed)" in res.stdout and (run / "scores.json").exists()


def test_plan_names_and_bad_options():
    module = synthetic.load_script("recipe_experiment")
    runs = module.plan(module.parse_args(["--data", "d", "--out", "o", "--optimizers", "ng-online",
                                          "--groups", "ablation,plain", "--ablation-ranks", "1,4"]))
    names = [r["name"] for r in runs]
    assert names[:5] == ["ng-online-1r", "ng-online-1r-no-pickbest", "ng-online-1r-no-growth",
                         "ng-online-1r-no-prior", "ng-online-1r-no-lda"]
    both = module.plan(module.parse_args(["--data", "d", "--out", "o", "--groups", "sweep",
                                          "--sweep-ranks", "1,2"]))
    assert [r["name"] for r in both] == ["ng-online-1r", "sgd-1r", "ng-online-2r", "sgd-2r"]
    assert "ng-online-1r-no-ramp" not in names and "ng-online-4r-no-ramp" in names
    assert "ng-online-4r-plain" in names
    assert module.options_of(runs[2]) == {"add_layers_period": 0, "seed": 0}
    plain = module.options_of(next(r for r in runs if r["off"] == "plain"))
    assert plain["ranks_initial"] == 0 and plain["combine_last_k"] == 0 and not plain["lda_transform"]
    with pytest.raises(SystemExit, match="--optimizers: unknown 'adam'"):
        module.plan(module.parse_args(["--data", "d", "--out", "o", "--optimizers", "adam"]))
    with pytest.raises(SystemExit, match="--groups: unknown"):
        module.plan(module.parse_args(["--data", "d", "--out", "o", "--groups", "bogus"]))
    with pytest.raises(SystemExit, match="--set 'bogus=1': expected KEY=VALUE"):
        module.base_options(module.parse_args(["--data", "d", "--out", "o", "--set", "bogus=1"]))
    opts = module.base_options(module.parse_args(["--data", "d", "--out", "o"]))
    assert opts["combine_method"] == "lbfgs" and opts["pnorm_input_dim"] == 500   # the recipe, sized
