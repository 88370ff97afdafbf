"""The paper's comparison, small: {sgd, ng-online, ng-simple} x {1, 2, 4} MPI ranks.

Povey, Zhang & Khudanpur (2015) train with N ranks, each stepping with N times
the effective learning rate, and average the ranks' parameters periodically.
Their finding: natural-gradient SGD learns faster per sample than plain SGD,
and its curves barely move as N grows, while plain SGD's spread apart.  This
driver repeats that comparison on a corpus made by ``ngsgd-make-corpus``:

* every run sees the same total number of samples (summed over ranks) and the
  same *effective* learning-rate schedule (``lr_scale_by_ranks``: each rank
  uses N times it);
* ng-online is also run with ``ng_reset_on_average`` on (Kaldi nnet2 re-inits
  the Fisher factors after each average, because each job is a new process);
* ``combine_last_k: 0``: the final model is the last average, so the last
  validation point of a curve is the final model.

Usage (results and commands in docs/results.md)::

    python scripts/paper_experiment.py --corpus runs/paper/corpus --out runs/paper
    python scripts/paper_experiment.py --data DIR --out OUT --quick      # tiny smoke version

``--corpus``: a ``ngsgd-make-corpus`` output (``train/``, ``test/``); its
training set is prepared into ``OUT/data/train/*.h5`` (4 partitions) and about
``--valid-frames`` frames of whole test utterances (unseen speakers and
sentences) into ``OUT/data/valid.h5``.  ``--data DIR``: already prepared data
in that layout (``DIR/train/*.h5``, ``DIR/valid.h5``), e.g. ``OUT/data``.

Re-runnable: a run whose ``final.h5`` exists is skipped, one with a complete
checkpoint is resumed, anything else starts afresh.  The report step
(``OUT/curves_by_optimizer.png``, ``OUT/curves_by_ranks.png``,
``OUT/reset.png``, ``OUT/results.md``, ``OUT/results.json``) reads only the
runs' ``metrics.jsonl``, so ``--report-only`` redraws from a finished sweep.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import yaml

from ngsgd_mpi import experiment

PROG = "paper_experiment"
OPTIMIZERS = ("sgd", "ng-online", "ng-simple")

# The paper's network made smaller so the sweep fits on a 2-core machine: context +-4 of
# 40-dim fbank (360 inputs), 2 p-norm layers 1000 -> 100 instead of 3 x 3000 -> 300.
BASE = {"context": 4, "num_hidden_layers": 2, "nonlinearity": "pnorm", "pnorm_input_dim": 1000,
        "pnorm_output_dim": 100, "rank_in": 20, "rank_out": 80, "update_period": 4,
        "minibatch_size": 512, "samples_per_average": 30_000, "num_epochs": 3.0,
        "combine_last_k": 0, "threads_per_rank": 1, "checkpoint_every": 1, "keep_last_k": 2,
        "lr_scale_by_ranks": True, "seed": 0}
# Effective learning rate (initial, final) per optimizer, the same for every rank count: the
# best of 0.008/0.004/0.002/0.001/0.0005 (sgd) and 0.04/0.02/0.01 (ng-online) after one epoch
# on one rank (docs/results.md); ng-simple takes ng-online's.
LR = {"sgd": (0.001, 0.0001), "ng-online": (0.02, 0.002), "ng-simple": (0.02, 0.002)}

# --quick: seconds on synthetic partitions; checks the plumbing, not the science.
QUICK = {"context": 1, "pnorm_input_dim": 40, "pnorm_output_dim": 8, "rank_in": 4, "rank_out": 4,
         "minibatch_size": 32, "samples_per_average": 256, "num_epochs": 1.0}
QUICK_LR = {name: (0.02, 0.002) for name in OPTIMIZERS}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--corpus", help="ngsgd-make-corpus output directory (train/, test/)")
    src.add_argument("--data", help="prepared data: DIR/train/*.h5 and DIR/valid.h5")
    p.add_argument("--out", required=True, help="output directory (runs, plots, table)")
    p.add_argument("--quick", action="store_true", help="tiny network and run lengths (smoke test)")
    p.add_argument("--ranks", default="1,2,4", help="rank counts (comma-separated)")
    p.add_argument("--optimizers", default=",".join(OPTIMIZERS), help="optimizers (comma-separated)")
    p.add_argument("--reset-ranks", default="1,2,4",
                   help="rank counts of the extra ng-online runs with ng_reset_on_average on ('' = none)")
    p.add_argument("--lr", action="append", default=[], metavar="OPT=INITIAL:FINAL",
                   help="effective learning-rate schedule of one optimizer (repeatable)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a training option of every run, e.g. --set num_epochs=2 (repeatable)")
    p.add_argument("--num-partitions", type=int, default=4, help="training partitions (>= max ranks)")
    p.add_argument("--valid-frames", type=int, default=30_000,
                   help="--corpus: about this many frames of test utterances for validation")
    p.add_argument("--report-only", action="store_true", help="only redraw plots and table")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- data

def data_paths(args, out: str) -> tuple[str, str]:
    """(training partitions directory, validation file): OUT/data/train/*.h5 from corpus/train
    and OUT/data/valid.h5 from every k-th utterance of corpus/test, unless --data is given."""
    if args.data:
        data_dir = args.data
    else:
        data_dir = os.path.join(out, "data")
        prepare = experiment.prepare_training_set(args.corpus, data_dir, args.num_partitions, out, PROG)
        chosen, _ = experiment.every_kth_test_utterance(args.corpus, args.valid_frames)
        experiment.prepare_test_subset(prepare, args.corpus, chosen, os.path.join(data_dir, "valid.h5"),
                                       out, PROG)
    return os.path.join(data_dir, "train"), os.path.join(data_dir, "valid.h5")


# ----------------------------------------------------------------------------- runs

def plan(args) -> list[dict]:
    """The runs: every optimizer x rank count, plus ng-online with the reset on."""
    ranks = [int(r) for r in args.ranks.split(",") if r]
    runs = [{"optimizer": o, "ranks": n, "reset": False}
            for o in args.optimizers.split(",") if o for n in ranks]
    runs += [{"optimizer": "ng-online", "ranks": int(n), "reset": True}
             for n in args.reset_ranks.split(",") if n]
    for r in runs:
        if r["optimizer"] not in OPTIMIZERS:
            raise SystemExit(f"paper_experiment: --optimizers: unknown {r['optimizer']!r}, "
                             f"expected some of {', '.join(OPTIMIZERS)}")
        r["name"] = f"{r['optimizer']}-{r['ranks']}r" + ("-reset" if r["reset"] else "")
    return runs


def base_options(args) -> dict:
    return {**BASE, **(QUICK if args.quick else {}), **experiment.option_overrides(args.set, PROG)}


def learning_rates(args) -> dict:
    return experiment.learning_rates(args.lr, QUICK_LR if args.quick else LR, PROG)


def train(run: dict, config_path: str, train_data: str, valid: str, lrs: dict, out: str) -> None:
    initial, final = lrs[run["optimizer"]]
    experiment.train_run(run["name"], run["ranks"], [
        "--config", config_path, "--train-data", train_data, "--valid-data", valid,
        "--optimizer", run["optimizer"], f"--ng-reset-on-average={str(run['reset']).lower()}",
        f"--lr-initial={initial:g}", f"--lr-final={final:g}"], out, PROG)


# ----------------------------------------------------------------------------- report

def summarise(runs: list[dict], out: str) -> list[dict]:
    rows = []
    for run in runs:
        run_dir = os.path.join(out, "runs", run["name"])
        recs = experiment.run_metrics(run_dir).periods
        if not recs:
            continue
        last = recs[-1]
        rows.append({
            "run": run["name"], "optimizer": run["optimizer"], "ranks": run["ranks"],
            "reset": run["reset"], "finished": os.path.exists(os.path.join(run_dir, "final.h5")),
            "averages": last["period"], "samples": last["samples"],
            "lr": recs[0]["lr"], "lr_final": last["lr"], "lr_per_rank": recs[0]["lr_per_rank"],
            "valid_obj": last["valid_obj"], "valid_acc": last["valid_acc"],
            "train_obj": last["train_obj"], "train_acc": last["train_acc"], "seconds": last["elapsed"],
            # (samples, valid objective, valid accuracy, train objective) after each average
            "curve": [(r["samples"], r["valid_obj"], r["valid_acc"], r["train_obj"]) for r in recs]})
    return rows


def table(rows: list[dict]) -> str:
    lines = [("| run | optimizer | ranks | NG reset | averages | samples | lr (eff.) | valid obj | "
              "valid acc | train obj | train acc | wall |"),
             "|---|---|---:|---|---:|---:|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        fmt = (lambda v, spec: "-" if v is None else format(v, spec))
        lines.append(
            f"| {r['run']}{'' if r['finished'] else ' (unfinished)'} | {r['optimizer']} | {r['ranks']} | "
            f"{'on' if r['reset'] else 'off'} | {r['averages']} | {r['samples']:,} | "
            f"{r['lr']:g} → {r['lr_final']:.2g} | {fmt(r['valid_obj'], '.4f')} | "
            f"{fmt(r['valid_acc'] and 100 * r['valid_acc'], '.2f')}% | {r['train_obj']:.4f} | "
            f"{100 * r['train_acc']:.2f}% | {r['seconds']:.0f} s |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], out: str) -> list[str]:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415
    from PIL import Image  # noqa: PLC0415  (Pillow: a matplotlib dependency)

    main = [r for r in rows if not r["reset"]]
    ranks = sorted({r["ranks"] for r in rows})
    opts = [o for o in OPTIMIZERS if any(r["optimizer"] == o for r in main)]
    colors = {"sgd": "tab:red", "ng-online": "tab:blue", "ng-simple": "tab:green"}
    styles = {n: s for n, s in zip(ranks, ["-", "--", ":", "-."] * 4)}
    shades = {n: s for n, s in zip(ranks, ["black", "tab:orange", "tab:purple", "tab:cyan"] * 4)}
    metrics = [(1, "validation objective (log-prob/frame)"), (2, "validation frame accuracy")]

    def curve(ax, r, k, **kw):
        xs = [c[0] / 1e6 for c in r["curve"] if c[k] is not None]
        ys = [c[k] for c in r["curve"] if c[k] is not None]
        ax.plot(xs, ys, **kw)

    def limits(ax, subset, k):
        # leave out the first averages, whose values would squash the interesting part
        tail = [c[k] for r in subset for c in r["curve"][len(r["curve"]) // 4:] if c[k] is not None]
        if tail:
            lo, hi = min(tail), max(tail)
            pad = 0.08 * (hi - lo or abs(hi) or 1.0)
            ax.set_ylim(lo - pad, hi + pad)

    def grid(panels, select, label, style, title, name):
        fig, axes = plt.subplots(2, len(panels), figsize=(3.6 * len(panels) + 0.6, 6.2),
                                 squeeze=False, sharey="row")
        for j, panel in enumerate(panels):
            for i, (k, ylabel) in enumerate(metrics):
                ax = axes[i][j]
                for r in select(panel):
                    curve(ax, r, k, label=label(r), lw=1.4, **style(r))
                limits(ax, [r for p in panels for r in select(p)], k)
                ax.grid(alpha=0.3)
                if i == 0:
                    ax.set_title(title(panel), fontsize=10)
                else:
                    ax.set_xlabel("samples processed, all ranks (millions)")
                if j == 0:
                    ax.set_ylabel(ylabel, fontsize=9)
                ax.legend(fontsize=8)
        fig.tight_layout()
        path = os.path.join(out, name)
        fig.savefig(path, dpi=80)
        plt.close(fig)
        # a 64-colour palette: a third of the bytes, same look (the PNGs are committed to docs/)
        Image.open(path).convert("RGB").quantize(64, method=Image.Quantize.MEDIANCUT).save(
            path, optimize=True)
        return path

    paths = []
    if main:
        paths.append(grid(opts, lambda o: [r for r in main if r["optimizer"] == o],
                          lambda r: f"{r['ranks']} rank(s)",
                          lambda r: {"color": shades[r["ranks"]], "ls": styles[r["ranks"]]},
                          lambda o: o, "curves_by_optimizer.png"))
        paths.append(grid(ranks, lambda n: [r for r in main if r["ranks"] == n],
                          lambda r: r["optimizer"], lambda r: {"color": colors[r["optimizer"]]},
                          lambda n: f"{n} rank(s)", "curves_by_ranks.png"))
    online = [r for r in rows if r["optimizer"] == "ng-online"]
    reset_ranks = sorted({r["ranks"] for r in online if r["reset"]})
    if reset_ranks:
        paths.append(grid(reset_ranks, lambda n: [r for r in online if r["ranks"] == n],
                          lambda r: f"reset {'on' if r['reset'] else 'off'}",
                          lambda r: {"color": "tab:blue" if r["reset"] else "black",
                                     "ls": "--" if r["reset"] else "-"},
                          lambda n: f"ng-online, {n} rank(s)", "reset.png"))
    return paths


def report(runs: list[dict], out: str) -> None:
    rows = summarise(runs, out)
    if not rows:
        raise SystemExit(f"paper_experiment: no metrics under {out}/runs to report")
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(rows, f, indent=1)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(table(rows))
    paths = plot(rows, out)
    experiment.log("wrote " + ", ".join([os.path.join(out, "results.md"), os.path.join(out, "results.json")] + paths))
    print(table(rows), end="")


def main(argv=None) -> int:
    args = parse_args(argv)
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    runs = plan(args)
    if not args.report_only:
        train_data, valid = data_paths(args, out)
        config_path = os.path.join(out, "base.yaml")
        with open(config_path, "w") as f:
            yaml.safe_dump(base_options(args), f, sort_keys=False)
        lrs = learning_rates(args)
        t0 = time.perf_counter()
        for run in runs:
            train(run, config_path, train_data, valid, lrs, out)
        experiment.log(f"sweep: {time.perf_counter() - t0:.0f} s")
    report(runs, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
