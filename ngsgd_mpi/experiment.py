"""What the experiment drivers in ``scripts/`` (``paper_experiment.py``, ``recipe_experiment.py``)
share: commands run and logged, training runs that skip or resume, the corpus prepared into
partitions, option overrides from their command lines, and the period records of a run.

Every command run is appended to ``OUT/commands.sh``, so an experiment's exact commands are
on disk next to its results.  A run directory with a ``final.h5`` is finished (skipped); one
with a complete checkpoint is resumed; anything else is started afresh.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import time

import yaml

from .checkpoint import complete_checkpoints
from .distributed import mpiexec
from .metrics import Metrics, metrics_path, read_metrics
from .options import OPTIONS

ONE_THREAD = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def log(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


def run_logged(cmd: list[str], out: str, prog: str, log_path: str | None = None) -> float:
    """Run ``cmd`` (one BLAS thread per process; output appended to ``log_path`` if given) and
    append it to OUT/commands.sh; wall seconds.  A failure ends the experiment (``prog``)."""
    with open(os.path.join(out, "commands.sh"), "a") as f:
        f.write(shlex.join(cmd) + "\n")
    env = dict(os.environ, **ONE_THREAD)
    t0 = time.perf_counter()
    if log_path:
        with open(log_path, "a") as f:
            res = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, check=False)
    else:
        res = subprocess.run(cmd, env=env, check=False)
    if res.returncode != 0:
        raise SystemExit(f"{prog}: command failed (exit {res.returncode}): {shlex.join(cmd)}"
                         + (f"\n  see {log_path}" if log_path else ""))
    return time.perf_counter() - t0


def train_run(name: str, ranks: int, options: list[str], out: str, prog: str) -> None:
    """``mpiexec -n RANKS ngsgd-train OPTIONS --out-dir OUT/runs/NAME``: skipped when finished,
    resumed from a complete checkpoint, else started clean."""
    run_dir = os.path.join(out, "runs", name)
    if os.path.exists(os.path.join(run_dir, "final.h5")):
        log(f"{name}: final.h5 exists, skipped")
        return
    resume = bool(complete_checkpoints(run_dir))
    if not resume and os.path.isdir(run_dir):
        shutil.rmtree(run_dir)          # died before its first checkpoint: start clean
    os.makedirs(run_dir, exist_ok=True)
    cmd = [mpiexec(), "-n", str(ranks), sys.executable, "-m", "ngsgd_mpi.cli", *options,
           "--out-dir", run_dir] + (["--resume"] if resume else [])
    log(f"{name}: training ({'resumed' if resume else 'new'})")
    wall = run_logged(cmd, out, prog, os.path.join(run_dir, "train.log"))
    log(f"{name}: done in {wall:.0f} s")


def run_metrics(run_dir: str) -> Metrics:
    """The run's period records and events (none before its first average)."""
    if not os.path.exists(metrics_path(run_dir)):
        return Metrics(metrics_path(run_dir), [], [])
    return read_metrics(run_dir, allow_empty=True)


# ----------------------------------------------------------------------------- data

def prepare_training_set(corpus: str, data_dir: str, num_partitions: int, out: str, prog: str,
                         log_path: str | None = None) -> list[str]:
    """DATA_DIR/train/*.h5 from CORPUS/train (skipped when prepared); the base of every
    ``ngsgd-prepare kaldi`` command for this corpus."""
    with open(os.path.join(corpus, "train", "classes.txt")) as f:
        num_classes = sum(1 for line in f if line.strip())
    prepare = [sys.executable, "-m", "ngsgd_mpi.prepare", "kaldi", "--num-classes", str(num_classes)]
    if not os.path.exists(os.path.join(data_dir, "stats.json")):
        log(f"preparing {corpus}/train -> {data_dir}/train")
        run_logged(prepare + ["--feats", os.path.join(corpus, "train", "feats.scp"),
                              "--ali", os.path.join(corpus, "train", "ali.ark"),
                              "--num-partitions", str(num_partitions), "--out", data_dir,
                              "--overwrite"], out, prog, log_path)
    return prepare


def every_kth_test_utterance(corpus: str, frames: int) -> tuple[list[str], int]:
    """(every k-th utterance of CORPUS/test, about ``frames`` frames in all: every test speaker
    represented; the number of test utterances)."""
    with open(os.path.join(corpus, "test", "utt2num_frames")) as f:
        lengths = [(line.split()[0], int(line.split()[1])) for line in f if line.strip()]
    step = max(1, sum(n for _, n in lengths) // max(frames, 1))
    return [u for i, (u, _) in enumerate(lengths) if i % step == 0], len(lengths)


def prepare_test_subset(prepare: list[str], corpus: str, utterances: list[str], path: str, out: str,
                        prog: str, log_path: str | None = None) -> None:
    """PATH (one partition file) from ``utterances`` of CORPUS/test (skipped when it exists)."""
    if os.path.exists(path):
        return
    data_dir = os.path.dirname(path)
    name = os.path.splitext(os.path.basename(path))[0]
    list_path = os.path.join(data_dir, f"{name}_utts.txt")
    with open(list_path, "w") as f:
        f.write("".join(u + "\n" for u in utterances))
    test_dir = os.path.join(data_dir, "test")
    log(f"preparing {len(utterances)} test utterances -> {path}")
    run_logged(prepare + ["--feats", os.path.join(corpus, "test", "feats.scp"),
                          "--ali", os.path.join(corpus, "test", "ali.ark"),
                          "--valid-utts", list_path, "--out", test_dir, "--overwrite"], out, prog, log_path)
    os.replace(os.path.join(test_dir, "valid.h5"), path)
    shutil.rmtree(test_dir)       # the rest of the test set is not used


# ----------------------------------------------------------------------------- command lines

def option_overrides(items: list[str], prog: str) -> dict:
    """``--set KEY=VALUE`` items (KEY an ngsgd-train option, VALUE YAML) as a dict."""
    opts = {}
    for item in items:
        key, _, value = item.partition("=")
        key = key.replace("-", "_")
        if key not in OPTIONS or not value:
            raise SystemExit(f"{prog}: --set {item!r}: expected KEY=VALUE with KEY an "
                             f"ngsgd-train option (ngsgd-train --help)")
        opts[key] = yaml.safe_load(value)
    return opts


def learning_rates(items: list[str], defaults: dict, prog: str) -> dict:
    """``--lr OPT=INITIAL:FINAL`` items over ``defaults`` ({optimizer: (initial, final)})."""
    lrs = dict(defaults)
    for item in items:
        opt, _, sched = item.partition("=")
        initial, _, final = sched.partition(":")
        if opt not in defaults or not initial or not final:
            raise SystemExit(f"{prog}: --lr {item!r}: expected OPT=INITIAL:FINAL with OPT "
                             f"one of {', '.join(defaults)}")
        lrs[opt] = (float(initial), float(final))
    return lrs
