"""Kaldi's nnet2 recipe, small: (a) the ablation -- the full recipe against each piece off, on 1
and 4 ranks, ng-online and sgd; (b) the paper's jobs sweep -- 1, 2, 4, 8, 16 ranks with the
job ramp, ng-online and sgd, at equal total samples.  Results: docs/results.md.

Every run is ``configs/kaldi_nnet2_pnorm.yaml`` made smaller (SIZE below) with the changes
its name says:

    {optimizer}-{N}r[-no-{piece}][-s{seed}]      pieces: ramp, pickbest, growth, prior, lda
    {optimizer}-{N}r-plain                       every piece off, last model (the old trainer)
    {optimizer}-{N}r-flat                        no ramp (all N ranks from the start), rest on

The final combination is not trained separately: for every full run the script also scores
the last model and the best-suffix average of its checkpoints (``ngsgd-combine
--method best-suffix``) against ``final.h5`` (nnet-combine-fast + normalize-stddev).

Usage::

    python scripts/recipe_experiment.py --corpus runs/recipe/corpus --out runs/recipe
    python scripts/recipe_experiment.py --data runs/recipe/data --out runs/recipe --groups sweep
    python scripts/recipe_experiment.py --data DIR --out OUT --quick      # tiny smoke version

``--corpus``: a ``ngsgd-make-corpus`` output; its training set becomes
``OUT/data/train/*.h5`` (``--num-partitions``, >= the largest rank count), about
``--valid-frames`` frames of whole test utterances ``OUT/data/score.h5`` (the final scores)
and a sixth of those ``OUT/data/valid.h5`` (validation after every average).

Re-runnable: a run with a ``final.h5`` is skipped, one with a complete checkpoint resumed,
anything else started afresh; ``--report-only`` redraws the tables and plots from the runs'
metrics.  Every command run is appended to ``OUT/commands.sh``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import yaml

from ngsgd_mpi import experiment

HERE = os.path.dirname(os.path.abspath(__file__))
RECIPE = os.path.join(HERE, os.pardir, "configs", "kaldi_nnet2_pnorm.yaml")
PROG = "recipe_experiment"
OPTIMIZERS = ("ng-online", "sgd")

# The recipe made to fit a shared 2-core machine (docs/results.md, "Setup"): 3 x p-norm 500 -> 50,
# 8192 samples per rank between averages, the same 960k samples for every rank count.
SIZE = {"pnorm_input_dim": 500, "pnorm_output_dim": 50, "samples_per_average": 8192,
        "total_samples": 960_000, "threads_per_rank": 1, "keep_last_k": 20, "combine_last_k": 20,
        "lda_max_frames": 100_000, "combine_frames": 3_000, "combine_lbfgs_evals": 20}
# Effective learning rates (initial, final): the best of 0.01/0.02/0.04/0.08 (ng-online) and
# 0.001 ... 0.064 (sgd) on one rank, full recipe, 480k samples (docs/results.md).
LR = {"ng-online": (0.04, 0.004), "sgd": (0.032, 0.0032)}
PIECES = {"ramp": {"ranks_initial": 0},
          "pickbest": {"first_period_pick_best": False, "pick_best_after_growth": False},
          "growth": {"add_layers_period": 0},
          "prior": {"prior_scale_power": 0.0},
          "lda": {"lda_transform": False, "input_normalization": True}}
PLAIN = {**{k: v for piece in PIECES.values() for k, v in piece.items()},
         "combine_last_k": 0, "normalize_stddev": False}

# --quick: seconds on a tiny corpus; checks the plumbing, not the science.
QUICK = {"context": 1, "pnorm_input_dim": 40, "pnorm_output_dim": 8, "rank_in": 4, "rank_out": 4,
         "minibatch_size": 32, "samples_per_average": 256, "total_samples": 3_000,
         "combine_last_k": 4, "keep_last_k": 4, "combine_frames": 400, "combine_lbfgs_evals": 8}
QUICK_LR = {name: (0.02, 0.002) for name in OPTIMIZERS}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--corpus", help="ngsgd-make-corpus output directory (train/, test/)")
    src.add_argument("--data", help="prepared data: DIR/train/*.h5, DIR/valid.h5, DIR/score.h5")
    p.add_argument("--out", required=True, help="output directory (runs, plots, tables)")
    p.add_argument("--quick", action="store_true", help="tiny network and run lengths (smoke test)")
    p.add_argument("--groups", default="ablation,sweep,flat,seeds",
                   help="comma-separated: ablation, sweep, seeds, plain, flat")
    p.add_argument("--optimizers", default=",".join(OPTIMIZERS), help="optimizers (comma-separated)")
    p.add_argument("--ablation-ranks", default="1,4", help="rank counts of the ablation")
    p.add_argument("--sweep-ranks", default="1,2,4,8,16", help="rank counts of the jobs sweep")
    p.add_argument("--seed-ranks", default="1,16", help="rank counts run with a second seed")
    p.add_argument("--flat-ranks", default="16", help="rank counts run without the ramp (group flat)")
    p.add_argument("--only", default="", help="comma-separated run names: train only these")
    p.add_argument("--lr", action="append", default=[], metavar="OPT=INITIAL:FINAL",
                   help="effective learning-rate schedule of one optimizer (repeatable)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a training option of every run (repeatable)")
    p.add_argument("--num-partitions", type=int, default=16, help="training partitions (>= max ranks)")
    p.add_argument("--valid-frames", type=int, default=30_000,
                   help="--corpus: about this many frames of test utterances for validation")
    p.add_argument("--report-only", action="store_true", help="only redraw tables and plots")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- data

def prepare_corpus(corpus: str, out: str, num_partitions: int, valid_frames: int) -> str:
    """OUT/data/train/*.h5 from corpus/train; from whole utterances of corpus/test (unseen
    speakers and sentences), OUT/data/score.h5 (about ``valid_frames`` frames: the final
    scores) and OUT/data/valid.h5 (every 6th of those: the per-period curves)."""
    data_dir = os.path.join(out, "data")
    prep_log = os.path.join(out, "prepare.log")
    prepare = experiment.prepare_training_set(corpus, data_dir, num_partitions, out, PROG, prep_log)
    score, _ = experiment.every_kth_test_utterance(corpus, valid_frames)     # all test speakers
    for name, chosen in (("score", score), ("valid", score[::6])):
        experiment.prepare_test_subset(prepare, corpus, chosen, os.path.join(data_dir, f"{name}.h5"), out,
                                       PROG, prep_log)
    return data_dir


# ----------------------------------------------------------------------------- runs

def ints(text: str) -> list[int]:
    return [int(t) for t in text.split(",") if t]


def plan(args) -> list[dict]:
    """The runs, each once, with the groups they belong to, in the order they are trained."""
    optimizers = [o for o in args.optimizers.split(",") if o]
    for o in optimizers:
        if o not in OPTIMIZERS:
            raise SystemExit(f"recipe_experiment: --optimizers: unknown {o!r}, expected some of "
                             f"{', '.join(OPTIMIZERS)}")
    groups = {g for g in args.groups.split(",") if g}
    unknown = groups - {"ablation", "sweep", "seeds", "plain", "flat"}
    if unknown:
        raise SystemExit(f"recipe_experiment: --groups: unknown {sorted(unknown)}")
    runs: dict[str, dict] = {}

    def add(group, optimizer, ranks, off=None, seed=0):
        name = f"{optimizer}-{ranks}r" + (f"-{'no-' if off in PIECES else ''}{off}" if off else "") \
            + (f"-s{seed}" if seed else "")
        run = runs.setdefault(name, {"name": name, "optimizer": optimizer, "ranks": ranks, "off": off,
                                     "seed": seed, "groups": []})
        run["groups"].append(group)

    # the optimizers alternate, so that a sweep cut short still compares them
    if "ablation" in groups:
        for n in ints(args.ablation_ranks):
            for piece in [None] + [p for p in PIECES if p != "ramp" or n > 1]:
                for o in optimizers:
                    add("ablation", o, n, piece)
    for group, ranks, off in (("plain", args.ablation_ranks, "plain"), ("sweep", args.sweep_ranks, None),
                              ("flat", args.flat_ranks, "flat")):
        if group in groups:
            for n in ints(ranks):
                for o in optimizers:
                    add(group, o, n, off)
    if "seeds" in groups:
        for n in ints(args.seed_ranks):
            for o in optimizers:
                add("seeds", o, n)
                add("seeds", o, n, seed=1)
    return list(runs.values())


def options_of(run: dict) -> dict:
    """The options a run changes on top of OUT/base.yaml."""
    if run["off"] == "plain":
        opts = dict(PLAIN)
    elif run["off"] == "flat":
        opts = dict(PIECES["ramp"])
    else:
        opts = dict(PIECES.get(run["off"], {}))
    return {**opts, "seed": run["seed"]}


def base_options(args) -> dict:
    with open(RECIPE) as f:
        opts = {k: v for k, v in yaml.safe_load(f).items() if k not in ("train_data", "valid_data", "out_dir")}
    return {**opts, **SIZE, **(QUICK if args.quick else {}), **experiment.option_overrides(args.set, PROG)}


def flag_value(value) -> str:
    return str(value).lower() if isinstance(value, bool) else f"{value:g}" if isinstance(value, float) \
        else str(value)


def learning_rates(args) -> dict:
    return experiment.learning_rates(args.lr, QUICK_LR if args.quick else LR, PROG)


def train(run: dict, config_path: str, train_data: str, valid: str, lrs: dict, out: str) -> None:
    initial, final = lrs[run["optimizer"]]
    changes = [f"--{k.replace('_', '-')}={flag_value(v)}" for k, v in options_of(run).items()]
    experiment.train_run(run["name"], run["ranks"], [
        "--config", config_path, "--train-data", train_data, "--valid-data", valid,
        "--optimizer", run["optimizer"], f"--lr-initial={initial:g}", f"--lr-final={final:g}", *changes],
        out, PROG)


def score_run(run: dict, score_path: str, valid: str, out: str) -> None:
    """RUN/scores.json: objective and accuracy on OUT/data/score.h5 of final.h5, of the last
    averaged model, and (full-recipe runs) of the best-suffix average of the checkpoints
    (the suffix chosen on the validation file, as ``combine_method: best-suffix`` would)."""
    run_dir = os.path.join(out, "runs", run["name"])
    path = os.path.join(run_dir, "scores.json")
    if os.path.exists(path) or not os.path.exists(os.path.join(run_dir, "final.h5")):
        return
    from ngsgd_mpi import checkpoint, combine, data, evaluation  # noqa: PLC0415
    from ngsgd_mpi.model import Model  # noqa: PLC0415

    info = data.open_partition(score_path)

    def score(model):
        result = evaluation.evaluate_partition(model.network(), info, model.context)
        return {"obj": result.objective, "acc": result.accuracy}

    newest = Model.load(checkpoint.averaged_checkpoints(run_dir)[-1].model_path)
    scores = {"final": score(Model.load(os.path.join(run_dir, "final.h5"))), "last": score(newest)}
    if not run["off"]:
        params, n = combine.combine_checkpoints(run_dir, data.open_partition(valid), SIZE["combine_last_k"],
                                                log=lambda _: None)
        scores["best_suffix"] = {**score(newest.replace(params=params)), "models": n}
    with open(path, "w") as f:
        json.dump(scores, f, indent=1)


# ----------------------------------------------------------------------------- report

def summarise(runs: list[dict], out: str) -> list[dict]:
    from ngsgd_mpi.model import Model  # noqa: PLC0415

    rows = []
    for run in runs:
        run_dir = os.path.join(out, "runs", run["name"])
        metrics = experiment.run_metrics(run_dir)
        recs = metrics.periods
        if not recs:
            continue
        final_path = os.path.join(run_dir, "final.h5")
        final = Model.load(final_path).info if os.path.exists(final_path) else {}
        scores = {}
        if os.path.exists(os.path.join(run_dir, "scores.json")):
            with open(os.path.join(run_dir, "scores.json")) as f:
                scores = json.load(f)
        last = recs[-1]
        rows.append({
            **{k: run[k] for k in ("name", "optimizer", "ranks", "off", "seed", "groups")},
            "finished": bool(final), "periods": last["period"], "samples": last["samples"],
            "lr": recs[0]["lr"], "lr_final": last["lr"],
            "active_ranks": [r.get("active_ranks") for r in recs],
            "pick_best": [e["period"] for e in metrics.events if e.get("event") == "pick_best"],
            "scores": scores, "combined_models": final.get("combined_models"),
            "train_obj": last["train_obj"], "train_acc": last["train_acc"], "seconds": last["elapsed"],
            "curve": [(r["samples"], r["valid_obj"], r["valid_acc"], r["train_obj"]) for r in recs]})
    return rows


def fmt(value, spec: str, scale: float = 1.0) -> str:
    return "-" if value is None else format(value * scale, spec)


def table(rows: list[dict]) -> str:
    lines = ["| run | optimizer | ranks | change | periods | samples | final obj | final acc | "
             "last model obj | last model acc | train obj | wall |",
             "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        final, last = r["scores"].get("final", {}), r["scores"].get("last", {})
        change = ("all pieces off" if r["off"] == "plain" else "no ramp" if r["off"] == "flat"
                  else f"{r['off']} off" if r["off"] else "full recipe") + (f", seed {r['seed']}" if r["seed"] else "")
        lines.append(
            f"| {r['name']}{'' if r['finished'] else ' (unfinished)'} | {r['optimizer']} | {r['ranks']} | "
            f"{change} | {r['periods']} | {r['samples']:,} | {fmt(final.get('obj'), '.4f')} | "
            f"{fmt(final.get('acc'), '.2f', 100)}% | {fmt(last.get('obj'), '.4f')} | "
            f"{fmt(last.get('acc'), '.2f', 100)}% | {r['train_obj']:.4f} | {r['seconds']:.0f} s |")
    return "\n".join(lines) + "\n"


def combination_table(rows: list[dict]) -> str:
    lines = ["| run | last model | best-suffix average (n) | nnet-combine-fast + normalize-stddev |",
             "|---|---:|---:|---:|"]
    for r in rows:
        c = r["scores"]
        if "best_suffix" not in c:
            continue
        cell = (lambda s: f"{s['obj']:.4f} / {100 * s['acc']:.2f}%")  # noqa: E731
        lines.append(f"| {r['name']} | {cell(c['last'])} | {cell(c['best_suffix'])} "
                     f"({c['best_suffix']['models']}) | {cell(c['final'])} |")
    return "\n".join(lines) + "\n"


def plot_sets(rows: list[dict]):
    """(PNG prefix, runs) of each figure: an ablation per optimizer and rank count, the sweep,
    ramp against no ramp, the two seeds."""
    for o in OPTIMIZERS:
        mine = [r for r in rows if r["optimizer"] == o]
        for n in sorted({r["ranks"] for r in mine if "ablation" in r["groups"]}):
            yield f"ablation_{o}_{n}r", [r for r in mine if "ablation" in r["groups"] and r["ranks"] == n]
        yield f"sweep_{o}", [r for r in mine if "sweep" in r["groups"]]
        flat = {r["ranks"] for r in mine if r["off"] == "flat"}
        yield f"flat_{o}", [r for r in mine if r["ranks"] in flat and (r["off"] == "flat" or "sweep" in r["groups"])]
        yield f"seeds_{o}", [r for r in mine if "seeds" in r["groups"]]


def plots(rows: list[dict], out: str) -> list[str]:
    """Validation curves with ngsgd-plot, one figure per plot set with at least two runs."""
    paths = []
    for prefix, chosen in plot_sets(rows):
        if len(chosen) < 2:
            continue
        cmd = [sys.executable, "-m", "ngsgd_mpi.plot", "--out-dir", os.path.join(out, "plots"),
               "--prefix", prefix, "--series", "valid", "--labels", ",".join(r["name"] for r in chosen)]
        cmd += [os.path.join(out, "runs", r["name"]) for r in chosen]
        res = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if res.returncode != 0:
            raise SystemExit(f"recipe_experiment: ngsgd-plot failed: {res.stderr.strip()}")
        paths += res.stdout.split()
    return paths


def report(runs: list[dict], out: str) -> None:
    rows = summarise(runs, out)
    if not rows:
        raise SystemExit(f"recipe_experiment: no metrics under {out}/runs to report")
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(rows, f, indent=1)
    text = table(rows) + "\n" + combination_table(rows)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(text)
    paths = plots(rows, out)
    experiment.log("wrote " + ", ".join([os.path.join(out, "results.md"), os.path.join(out, "results.json")] + paths))
    print(text, end="")


def main(argv=None) -> int:
    args = parse_args(argv)
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    runs = plan(args)
    data_dir = args.data or os.path.join(out, "data")
    train_data, valid = os.path.join(data_dir, "train"), os.path.join(data_dir, "valid.h5")
    score_path = os.path.join(data_dir, "score.h5")
    if not args.report_only:
        if args.corpus:
            prepare_corpus(args.corpus, out, args.num_partitions, args.valid_frames)
        config_path = os.path.join(out, "base.yaml")
        with open(config_path, "w") as f:
            yaml.safe_dump(base_options(args), f, sort_keys=False)
        lrs = learning_rates(args)
        only = {n for n in args.only.split(",") if n}
        t0 = time.perf_counter()
        for run in runs:
            if not only or run["name"] in only:
                train(run, config_path, train_data, valid, lrs, out)
                score_run(run, score_path, valid, out)
        experiment.log(f"sweep: {time.perf_counter() - t0:.0f} s")
    report(runs, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
