#!/usr/bin/env python3
"""Scaling of the SPMD trainer: frames/s with 1 and 2 ranks (one BLAS thread
each) under mpiexec, and the fraction of wall time spent in the parameter
Allreduce and waiting for data, at the default averaging period and at a
10x more frequent one.

    .venv/bin/python scripts/bench_scaling.py [--out /tmp/bench_scaling] [--json out.json]

Data: generated here like tests/synthetic.py (utterances of phone-like label
runs, frames = class mean + noise, 40-dim features), one HDF5 partition per
rank (``ngsgd_mpi.data.write_partition``); each rank wraps around its own.
Network: by default 360 inputs (40 x 9 frames) -> 2 x (2000 p-norm -> 200) ->
500 classes, a smaller cousin of the paper's net so that the whole benchmark
takes a few minutes on 2 cores; ``--hidden-layers 3 --pnorm-input-dim 3000
--pnorm-output-dim 300 --classes 2000`` gives the paper's.

Figures come from each run's ``metrics.jsonl`` (one record per averaging
period): period wall time = samples of all ranks / ``frames_per_sec``;
Allreduce fraction = ``time_allreduce`` / period wall time; data-wait
fraction = ``time_data_wait`` (mean over ranks) / period wall time.  The
first period is left out when there are several (start-up, page faults).
No validation set (its evaluation would count as period time).

The machine must not be busy with anything else: on a 2-core box every other
process takes from the 2-rank run.  As a contention-free check the script
also reports the CPU seconds of all ranks per 1000 frames (getrusage of the
mpiexec child); 2 x (CPU per frame at 1 rank / at 2 ranks) is the speedup
2 idle cores would give.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import numpy as np

from ngsgd_mpi import data
from ngsgd_mpi.distributed import mpiexec
from ngsgd_mpi.metrics import read_metrics

FEAT_DIM = 40


def write_partitions(root: str, num_partitions: int, frames_per_partition: int,
                     num_classes: int, seed: int = 0) -> str:
    """root/train/train.K.h5 with synthetic speech-like frames; returns the train dir."""
    train = os.path.join(root, "train")
    os.makedirs(train, exist_ok=True)
    means = np.random.default_rng(1234).standard_normal((num_classes, FEAT_DIM)) * 1.5
    dataset_id = data.new_dataset_id()             # one preparation: every partition shares it
    for k in range(num_partitions):
        path = os.path.join(train, f"train.{k}.h5")
        rng = np.random.default_rng([seed, k])
        utterances, frames, u = [], 0, 0
        while frames < frames_per_partition:
            n = int(rng.integers(200, 601))
            labels = np.repeat(rng.integers(0, num_classes, n // 8 + 1), 8)[:n].astype(np.int32)
            feats = (means[labels] + rng.standard_normal((n, FEAT_DIM))).astype(np.float32)
            utterances.append((f"p{k}u{u:05d}", feats, labels))
            frames += n
            u += 1
        data.write_partition(path, utterances, FEAT_DIM, num_classes, partition_index=k,
                             num_partitions=num_partitions, dataset_id=dataset_id)
    return train


def run_training(ranks: int, train_dir: str, out_dir: str, args, samples_per_average: int,
                 periods: int) -> tuple[list[dict], float, float]:
    """One ngsgd-train run; returns (metrics records, wall seconds and CPU seconds
    of the whole command, all ranks together)."""
    options = dict(train_data=os.path.join(train_dir, f"train.[0-{ranks - 1}].h5"),
                   valid_data="", out_dir=out_dir, context=4,
                   num_hidden_layers=args.hidden_layers, pnorm_input_dim=args.pnorm_input_dim,
                   pnorm_output_dim=args.pnorm_output_dim, optimizer=args.optimizer,
                   minibatch_size=args.minibatch, samples_per_average=samples_per_average,
                   total_samples=samples_per_average * periods * ranks, combine_last_k=0,
                   threads_per_rank=1, seed=1, lr_initial=0.002, lr_final=0.001,
                   keep_last_k=1, checkpoint_every=10 ** 6)
    cmd = [mpiexec(), "-n", str(ranks), sys.executable, "-m", "ngsgd_mpi.cli"]
    cmd += [f"--{key}={value}" for key, value in options.items()]
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - usage.ru_utime) + (after.ru_stime - usage.ru_stime)
    if res.returncode != 0:
        raise SystemExit(f"bench_scaling: training failed ({res.returncode}):\n{res.stdout}\n{res.stderr}")
    return read_metrics(out_dir).periods, wall, cpu


def summarize(records: list[dict]) -> dict:
    # frames_per_sec counts all ranks' samples of the period (trainer.py); "samples" is cumulative.
    per_period = [r["samples"] - (records[i - 1]["samples"] if i else 0) for i, r in enumerate(records)]
    walls = [n / r["frames_per_sec"] for n, r in zip(per_period, records)]
    if len(records) > 1:
        records, walls = records[1:], walls[1:]
    steady = records
    return {
        "periods_used": len(steady),
        "frames_per_sec": statistics.median(r["frames_per_sec"] for r in steady),
        "allreduce_fraction": statistics.median(r["time_allreduce"] / w for r, w in zip(steady, walls)),
        "data_wait_fraction": statistics.median(r["time_data_wait"] / w for r, w in zip(steady, walls)),
        "period_seconds": statistics.median(walls),
        "allreduce_seconds": statistics.median(r["time_allreduce"] for r in steady),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="/tmp/ngsgd_bench_scaling", help="work directory")
    ap.add_argument("--ranks", default="1,2", help="comma list of rank counts")
    ap.add_argument("--samples-per-average", type=int, default=400_000,
                    help="default averaging period (samples per rank)")
    ap.add_argument("--frequent-factor", type=int, default=10,
                    help="also run with averaging this many times more often (0 = skip)")
    ap.add_argument("--periods", type=int, default=2, help="averaging periods at the default period")
    ap.add_argument("--frames-per-partition", type=int, default=60_000)
    ap.add_argument("--hidden-layers", type=int, default=2)
    ap.add_argument("--pnorm-input-dim", type=int, default=2000)
    ap.add_argument("--pnorm-output-dim", type=int, default=200)
    ap.add_argument("--classes", type=int, default=500)
    ap.add_argument("--minibatch", type=int, default=512)
    ap.add_argument("--optimizer", default="ng-online")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per training run")
    ap.add_argument("--json", help="write all figures to this file")
    args = ap.parse_args(argv)
    ranks_list = [int(r) for r in args.ranks.split(",")]
    os.makedirs(args.out, exist_ok=True)
    print(f"writing {max(ranks_list)} partitions of {args.frames_per_partition:,} frames to {args.out}")
    train_dir = write_partitions(args.out, max(ranks_list), args.frames_per_partition, args.classes)
    print(f"net: {FEAT_DIM * 9} -> {args.hidden_layers} x ({args.pnorm_input_dim} p-norm -> "
          f"{args.pnorm_output_dim}) -> {args.classes}; {args.optimizer}, minibatch {args.minibatch}; "
          f"1 thread per rank; mpiexec {mpiexec()}")
    settings = [("default", args.samples_per_average, args.periods)]
    if args.frequent_factor > 1:
        frequent = max(args.minibatch, args.samples_per_average // args.frequent_factor)
        settings.append((f"{args.frequent_factor}x frequent", frequent,
                         args.periods * args.frequent_factor))
    results = []
    for label, per_average, periods in settings:
        for ranks in ranks_list:
            out_dir = os.path.join(args.out, f"run_{ranks}r_{per_average}")
            if os.path.isdir(out_dir):
                import shutil  # noqa: PLC0415
                shutil.rmtree(out_dir)
            records, wall, cpu = run_training(ranks, train_dir, out_dir, args, per_average, periods)
            row = {"setting": label, "ranks": ranks, "samples_per_average": per_average,
                   "periods": periods, "command_wall_seconds": wall, "command_cpu_seconds": cpu,
                   "cpu_ms_per_1000_frames": 1e6 * cpu / records[-1]["samples"],
                   "load_average_1min": os.getloadavg()[0], **summarize(records)}
            results.append(row)
            print(f"  {label:>13}: {ranks} rank(s), average every {per_average:,} samples/rank: "
                  f"{row['frames_per_sec']:9,.0f} frames/s | Allreduce "
                  f"{100 * row['allreduce_fraction']:5.2f} % ({1e3 * row['allreduce_seconds']:.1f} ms) | "
                  f"data wait {100 * row['data_wait_fraction']:5.2f} % | period {row['period_seconds']:.1f} s | "
                  f"{row['cpu_ms_per_1000_frames']:.1f} CPU ms per 1000 frames | load {row['load_average_1min']:.1f}",
                  flush=True)
    by_key = {(r["setting"], r["ranks"]): r for r in results}
    for label, _, _ in settings:
        one, two = by_key.get((label, 1)), by_key.get((label, 2))
        if one and two:
            speedup = two["frames_per_sec"] / one["frames_per_sec"]
            # With 2 idle cores each rank would get one: 2 x (CPU cost per frame at 1 rank
            # / at 2 ranks) is the speedup the work itself allows (contention-free bound).
            cpu_bound = 2 * one["cpu_ms_per_1000_frames"] / two["cpu_ms_per_1000_frames"]
            print(f"  {label}: 2 ranks / 1 rank = {speedup:.2f}x frames/s (wall clock); "
                  f"CPU-normalised {cpu_bound:.2f}x (2 x CPU per frame at 1 rank / at 2 ranks)")
            for r in results:
                if r["setting"] == label:
                    r["speedup_vs_1_rank"] = r["frames_per_sec"] / one["frames_per_sec"]
            two["cpu_normalised_speedup"] = cpu_bound
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
