#!/usr/bin/env python3
"""Time one ``OnlineNaturalGradient.precondition`` call at the sizes of the Kaldi
timing table (shared/reference/golden/README.md) and print Kaldi's figures beside:
the table's (another machine) and, with ``--kaldi``, Kaldi's own code run here.

    .venv/bin/python scripts/bench_precondition.py [--threads 1] [--blocks 7] [--json out.json] \
        [--kaldi path/to/kaldi_timing] [--rounds 3]

Protocol, as the Kaldi figures were taken: steady state (12 warm-up calls
first), inputs N x D float32 (low rank plus noise, cycling through 8
minibatches), one BLAS thread by default, and per configuration the MINIMUM
over ``--blocks`` blocks of the mean process CPU time per call (the machine
is shared; CPU time is what Kaldi reported).  Wall-clock medians are printed
too.  With update period 4 the mean includes one Fisher update per 4 calls.
Both schedules are timed: nnet2 (the paper's, default) and nnet3.  Each call
works in place like Kaldi's ``PreconditionDirections(&X)``: the minibatch is
copied into a fixed buffer (the copy is timed too) and ``precondition(buf,
out=buf)`` overwrites it.

Kaldi's table was measured on another machine (AMD EPYC, OpenBLAS
"Cooperlake" kernels, 1 thread): a ratio against it compares implementations
across machines, ± the ~15 % the README states for its own figures.  With
``--kaldi BINARY`` (scripts/kaldi_precondition_timing.cc, built against
Kaldi's sources, see its header) Kaldi's nnet2 and nnet3 classes are timed
on this machine with the same protocol, alternating with ours ``--rounds``
times (the minimum of each side is kept), so a shared machine's load hits
both alike.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np
from threadpoolctl import threadpool_limits

from ngsgd_mpi.ng_online import OnlineNaturalGradient

# (N, D, rank, update period): (nnet3 ms, nnet2 ms) per call, Kaldi C++, 1 thread.
KALDI_MS = {
    (512, 2000, 80, 1): (6.1, 6.7),
    (512, 2000, 80, 4): (4.1, 4.3),
    (512, 400, 20, 1): (0.38, 0.39),
    (512, 400, 20, 4): (0.27, 0.28),
    (128, 361, 20, 1): (0.10, 0.10),
    (128, 361, 20, 4): (0.064, 0.079),
    (128, 3000, 80, 1): (3.3, 3.4),
    (128, 3000, 80, 4): (1.8, 2.0),
    (512, 3000, 80, 4): (6.5, 6.3),
}
WARMUP_CALLS = 12


def minibatches(N, D, count=8, seed=0):
    rng = np.random.default_rng(seed)
    basis = rng.standard_normal((30, D)).astype(np.float32)
    return [rng.standard_normal((N, 30)).astype(np.float32) @ basis
            + 0.3 * rng.standard_normal((N, D)).astype(np.float32) for _ in range(count)]


def time_calls(N, D, rank, period, schedule, blocks, min_seconds):
    """(min CPU ms per call, median wall ms per call) over ``blocks`` blocks."""
    batches = minibatches(N, D)
    ng = OnlineNaturalGradient(rank, update_period=period, schedule=schedule)
    for i in range(WARMUP_CALLS):
        ng.precondition(batches[i % len(batches)])
    # calls per block: a multiple of the update period, >= min_seconds of work
    t0 = time.perf_counter()
    for i in range(4 * period):
        ng.precondition(batches[i % len(batches)])
    per_call = (time.perf_counter() - t0) / (4 * period)
    calls = period * max(1, int(min_seconds / per_call / period))
    buffer = np.empty_like(batches[0])
    cpu, wall = [], []
    for _ in range(blocks):
        c0, w0 = time.process_time(), time.perf_counter()
        for i in range(calls):
            buffer[...] = batches[i % len(batches)]
            ng.precondition(buffer, out=buffer)
        cpu.append((time.process_time() - c0) / calls)
        wall.append((time.perf_counter() - w0) / calls)
    return 1e3 * min(cpu), 1e3 * statistics.median(wall)


def kaldi_here(binary, N, D, rank, period, threads, blocks, min_seconds) -> dict:
    """{schedule: min CPU ms per call} of Kaldi's classes, run by the timing binary."""
    env = {**os.environ, "OPENBLAS_NUM_THREADS": str(threads), "OMP_NUM_THREADS": str(threads)}
    out = subprocess.run([binary, str(N), str(D), str(rank), str(period), str(blocks), str(min_seconds)],
                         capture_output=True, text=True, check=True, env=env).stdout
    return {line.split()[0]: float(line.split()[-1]) for line in out.splitlines() if line.strip()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1, help="BLAS threads (Kaldi's table: 1)")
    ap.add_argument("--blocks", type=int, default=7)
    ap.add_argument("--min-seconds", type=float, default=0.15, help="work per block")
    ap.add_argument("--sizes", help="comma list of NxD:rank:period (default: the Kaldi table)")
    ap.add_argument("--json", help="write the figures to this file")
    ap.add_argument("--kaldi", help="Kaldi timing binary (scripts/kaldi_precondition_timing.cc)")
    ap.add_argument("--rounds", type=int, default=3, help="with --kaldi: alternations of ours and Kaldi's")
    args = ap.parse_args(argv)
    if args.kaldi and not os.access(args.kaldi, os.X_OK):
        ap.error(f"--kaldi: {args.kaldi} is not an executable file")
    configs = list(KALDI_MS)
    if args.sizes:
        configs = []
        for item in args.sizes.split(","):
            try:
                nd, rank, period = item.split(":")
                n, d = nd.lower().split("x")
                configs.append((int(n), int(d), int(rank), int(period)))
            except ValueError:
                ap.error(f"--sizes: expected NxD:rank:period items, got {item!r}")
    rows = []
    with threadpool_limits(args.threads):
        print(f"OnlineNaturalGradient.precondition, float32, {args.threads} BLAS thread(s); "
              f"min CPU ms/call over {args.blocks} blocks (median wall ms in brackets); "
              f"load average {os.getloadavg()[0]:.2f}; {time.strftime('%Y-%m-%d %H:%M')}")
        here = " | Kaldi here  ratio" if args.kaldi else ""
        print(f"{'N x D':>12} {'rank':>5} {'P':>3} | {'schedule':>8} {'ours':>15} | {'Kaldi table':>11} "
              f"{'ratio':>6}{here}")
        for N, D, rank, period in configs:
            table = dict(zip(("nnet3", "nnet2"), KALDI_MS.get((N, D, rank, period), (None, None))))
            row = {"N": N, "D": D, "rank": rank, "period": period}
            ours = {s: [] for s in ("nnet2", "nnet3")}
            kaldi = {s: [] for s in ("nnet2", "nnet3")}
            for _ in range(args.rounds if args.kaldi else 1):
                for schedule in ("nnet2", "nnet3"):
                    ours[schedule].append(time_calls(N, D, rank, period, schedule, args.blocks,
                                                     args.min_seconds))
                if args.kaldi:
                    for schedule, ms in kaldi_here(args.kaldi, N, D, rank, period, args.threads,
                                                   args.blocks, args.min_seconds).items():
                        kaldi[schedule].append(ms)
            for schedule in ("nnet2", "nnet3"):
                cpu = min(c for c, _ in ours[schedule])
                wall = min(w for _, w in ours[schedule])
                ratio = cpu / table[schedule] if table[schedule] else None
                cell = {"cpu_ms": cpu, "wall_ms": wall, "kaldi_ms": table[schedule], "ratio": ratio}
                line = (f"{N:>5} x {D:<5} {rank:>5} {period:>3} | {schedule:>8} {cpu:6.3f} ({wall:6.3f}) | "
                        f"{table[schedule] if table[schedule] else '-':>11} "
                        f"{ratio if ratio else float('nan'):6.2f}")
                if args.kaldi:
                    cell["kaldi_here_ms"] = min(kaldi[schedule])
                    cell["ratio_here"] = cpu / cell["kaldi_here_ms"]
                    line += f" | {cell['kaldi_here_ms']:10.3f} {cell['ratio_here']:6.2f}"
                row[schedule] = cell
                print(line)
            rows.append(row)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"threads": args.threads, "load_average_1min": os.getloadavg()[0],
                       "date": time.strftime("%Y-%m-%d %H:%M"), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
