#!/usr/bin/env python3
"""Time one training minibatch (forward + backward + update) for sgd, ng-online
and ng-simple, per layer and per part, and against PyTorch.

    OPENBLAS_NUM_THREADS=2 OMP_NUM_THREADS=2 .venv/bin/python scripts/bench_step.py \
        [--sizes paper,small] [--threads 1,all] [--reps 9] [--json out.json]

What is measured (docs/benchmarks.md has the figures):

* Totals: every optimiser steps on the same minibatches from the same
  initial network; repetitions are interleaved (rep k times ``--batches``
  minibatches of each optimiser in turn, the order rotating, a short sleep
  before each block), and each figure is the median over repetitions of the
  wall time per minibatch.  The
  NG/SGD ratios are medians of the per-repetition ratios, so slow phases of
  a shared machine hit both sides of a ratio alike.
* Breakdown: a second, instrumented pass wraps each layer's forward and
  backward, the updater's per-layer update and the preconditioner calls
  inside it ("precondition"; "update" is the rest of the layer update).
* FLOPs: multiply-adds of one minibatch counted from the shapes, for SGD
  and for the NG-online extra work (steady state: one Fisher update every
  ``update_period`` calls), so the measured ratio can be set beside the
  arithmetic floor.
* PyTorch (if installed, ``pip install 'ngsgd_mpi[bench]'``): the same
  network and plain SGD step, same threads (torch.set_num_threads) and
  minibatch; it joins the interleaved repetitions as "torch-sgd".

Threads: "1" and "all" (the cores this process may use) via threadpoolctl,
which limits NumPy's and SciPy's OpenBLAS alike.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
from threadpoolctl import threadpool_info, threadpool_limits

from ngsgd_mpi import optim
from ngsgd_mpi.network import Network, NetworkConfig
from ngsgd_mpi.optim import OptimizerConfig, make_updater

OPTIMIZERS = ("sgd", "ng-online", "ng-simple")
LEARNING_RATE = 1e-3


@dataclass
class Size:
    name: str
    net: NetworkConfig
    minibatch: int


SIZES = {
    # The paper's nnet2 p-norm recipe: 360 -> 3 x (3000 p-norm -> 300) -> 2000, minibatch 512.
    "paper": Size("paper", NetworkConfig(input_dim=360, num_classes=2000, num_hidden_layers=3,
                                         pnorm_input_dim=3000, pnorm_output_dim=300), 512),
    "small": Size("small", NetworkConfig(input_dim=200, num_classes=300, num_hidden_layers=2,
                                         pnorm_input_dim=1000, pnorm_output_dim=100), 128),
    # For the smoke test only.
    "tiny": Size("tiny", NetworkConfig(input_dim=12, num_classes=7, num_hidden_layers=1,
                                       pnorm_input_dim=20, pnorm_output_dim=4), 16),
}


# ----------------------------------------------------------------------------- FLOPs

def sgd_macs(net: NetworkConfig, N: int) -> int:
    """Multiply-adds of one SGD minibatch: forward, input derivative (not for
    the first layer), weight gradient (bias and elementwise work ignored)."""
    shapes = net.affine_shapes()
    return sum(N * o * i * (2 if k == 0 else 3) for k, (o, i) in enumerate(shapes))


def online_side_macs(N: int, D: int, R: int, P: int, materialize: bool) -> float:
    """One OnlineNaturalGradient call on N x D at rank R, averaged over the update
    period: H = X Wᵀ always; X − H W if materialised; on updating calls J = Hᵀ X,
    K = J Jᵀ, L = Hᵀ H, W' = A B (R x R by R x D)."""
    R = min(R, D - 1)
    if R < 1:
        return 0.0
    update = N * D * R + R * R * D + N * R * R + R * R * D
    return N * D * R * (2 if materialize else 1) + update / P


def online_extra_macs(net: NetworkConfig, N: int, cfg: OptimizerConfig, factored: bool) -> float:
    """NG-online work beyond SGD per minibatch.  Straightforward: both sides
    materialised.  Factored (what optim.OnlineNgUpdater does): the output side
    is never materialised; Ĝᵀ X̂ = Gᵀ X̂ − W_gᵀ (H_gᵀ X̂) adds R·N·(D_in+1) +
    D_out·R·(D_in+1); the row norms come from H."""
    total = 0.0
    for o, i in net.affine_shapes():
        P = cfg.update_period
        total += online_side_macs(N, i + 1, cfg.rank_in, P, materialize=True)
        total += online_side_macs(N, o, cfg.rank_out, P, materialize=not factored)
        if factored:
            R = min(cfg.rank_out, o - 1)
            total += R * N * (i + 1) + o * R * (i + 1) + N * R * R
    return total


# ----------------------------------------------------------------------------- runners

class NumpyRunner:
    """One network + updater of this package."""

    def __init__(self, size: Size, optimizer: str, batches):
        self.net = Network(size.net, seed=0)
        self.updater = make_updater(self.net, OptimizerConfig(optimizer=optimizer))
        self.batches = batches
        self.k = 0

    def step(self):
        X, labels = self.batches[self.k % len(self.batches)]
        self.k += 1
        self.net.train_gradients(X, labels)
        self.updater.step(LEARNING_RATE)


class TorchRunner:
    """The same network and plain SGD step in PyTorch (CPU, float32)."""

    def __init__(self, size: Size, batches, torch):
        self.torch = torch
        net = Network(size.net, seed=0)          # same initial weights
        cfg = size.net
        self.linears = []
        for layer in net.affine_layers:
            linear = torch.nn.Linear(layer.input_dim, layer.output_dim)
            with torch.no_grad():
                linear.weight.copy_(torch.from_numpy(layer.linear.copy()))
                linear.bias.copy_(torch.from_numpy(layer.bias.copy()))
            self.linears.append(linear)
        self.params = [p for lin in self.linears for p in lin.parameters()]
        self.group = cfg.pnorm_input_dim // cfg.pnorm_output_dim
        self.batches = [(torch.from_numpy(X), torch.from_numpy(labels.astype(np.int64)))
                        for X, labels in batches]
        self.optimizer = torch.optim.SGD(self.params, lr=LEARNING_RATE)
        self.k = 0

    def forward(self, X):
        torch = self.torch
        h = X
        for linear in self.linears[:-1]:
            h = linear(h)
            h = torch.linalg.vector_norm(h.view(h.shape[0], -1, self.group), dim=2)   # p-norm, p=2
            h = h * torch.rsqrt(torch.clamp(h.pow(2).mean(dim=1, keepdim=True), min=2.0 ** -66))
        return torch.log_softmax(self.linears[-1](h), dim=1)

    def step(self):
        X, labels = self.batches[self.k % len(self.batches)]
        self.k += 1
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.torch.nn.functional.nll_loss(self.forward(X), labels, reduction="sum")
        loss.backward()
        self.optimizer.step()


def make_batches(size: Size, count: int = 8, seed: int = 1):
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal((size.minibatch, size.net.input_dim)).astype(np.float32),
             rng.integers(0, size.net.num_classes, size.minibatch))
            for _ in range(count)]


def time_interleaved(runners: dict, reps: int, batches: int, settle: float) -> dict[str, list[float]]:
    """Per-minibatch seconds of each runner, one list entry per repetition.
    ``settle`` seconds of sleep before each block let the previous runner's
    BLAS/OpenMP worker threads stop busy-waiting (OpenBLAS spins ~0.1 s)."""
    names = list(runners)
    times = defaultdict(list)
    for rep in range(reps):
        order = names[rep % len(names):] + names[:rep % len(names)]
        for name in order:
            step = runners[name].step
            time.sleep(settle)
            t0 = time.perf_counter()
            for _ in range(batches):
                step()
            times[name].append((time.perf_counter() - t0) / batches)
    return times


# ----------------------------------------------------------------------------- breakdown

def _wrap(obj, method: str, sink: dict, key_fn):
    """Make ``obj.method`` add its wall time to ``sink[key_fn(args)]``; a call
    made from inside another timed call with the same key is not counted twice."""
    original = getattr(obj, method)
    active = set()

    def timed(*args, **kwargs):
        key = key_fn(args)
        if key in active:
            return original(*args, **kwargs)
        active.add(key)
        t0 = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            sink[key] += time.perf_counter() - t0
            active.discard(key)

    setattr(obj, method, timed)


def instrument(runner: NumpyRunner) -> dict:
    """Wrap the runner's layers, updater and preconditioners; returns the dict
    ``(layer label, part) -> seconds`` they accumulate into."""
    sink = defaultdict(float)
    counts = defaultdict(int)
    labels = []
    for layer in runner.net.layers:
        kind = type(layer).__name__
        labels.append(f"{kind}{counts[kind]}")
        counts[kind] += 1
    for label, layer in zip(labels, runner.net.layers):
        _wrap(layer, "forward", sink, lambda a, label=label: (label, "forward"))
        _wrap(layer, "backward", sink, lambda a, label=label: (label, "backward"))
    updater = runner.updater
    _wrap(updater, "_update_layer", sink, lambda a: (f"Affine{a[0]}", "update"))
    sides = getattr(updater, "input_side", []) + getattr(updater, "output_side", [])
    for index, ng in enumerate(sides):
        affine = index % len(runner.net.affine_layers)
        for method in [m for m in dir(ng) if m.startswith("precondition")]:
            _wrap(ng, method, sink, lambda a, affine=affine: (f"Affine{affine}", "precondition"))
    if isinstance(updater, optim.SimpleNgUpdater):
        # precondition_simple is looked up in optim's globals at call time
        current = {"layer": None}
        original_update = updater._update_layer

        def update(index, layer, lr):
            current["layer"] = f"Affine{index}"
            return original_update(index, layer, lr)

        updater._update_layer = update
        _wrap(optim, "precondition_simple", sink, lambda a: (current["layer"], "precondition"))
    return sink


def breakdown(size: Size, optimizers, batches, reps: int, steps: int, settle: float) -> dict:
    """Median seconds per minibatch of each (layer, part), per optimiser; the
    instrumented runners take turns like the totals."""
    saved = optim.precondition_simple
    try:
        runners, sinks = {}, {}
        for name in optimizers:
            runners[name] = NumpyRunner(size, name, batches)
            for _ in range(12):
                runners[name].step()
            sinks[name] = instrument(runners[name])
        samples = {name: defaultdict(list) for name in optimizers}
        for rep in range(reps):
            for name in optimizers[rep % len(optimizers):] + optimizers[:rep % len(optimizers)]:
                sink = sinks[name]
                time.sleep(settle)
                sink.clear()
                t0 = time.perf_counter()
                for _ in range(steps):
                    runners[name].step()
                total = time.perf_counter() - t0
                # Whatever no wrapper saw: the network's glue (checks, objective statistics).
                # (Preconditioner time is inside "update", so it is not added again.)
                seen = sum(v for (_, part), v in sink.items() if part != "precondition")
                sink[("other", "forward")] = total - seen
                for key, seconds in sink.items():
                    samples[name][key].append(seconds / steps)
    finally:
        optim.precondition_simple = saved
    result = {}
    for name in optimizers:
        table = {key: statistics.median(v) for key, v in samples[name].items()}
        # "update" includes the preconditioner calls made inside it: report the rest.
        for (label, part), seconds in list(table.items()):
            if part == "precondition":
                table[(label, "update")] = table.get((label, "update"), 0.0) - seconds
        result[name] = table
    return result


def print_breakdown(tables: dict) -> None:
    parts = ("forward", "backward", "precondition", "update")
    for name, table in tables.items():
        print(f"  breakdown, {name} (ms per minibatch):")
        print("    " + f"{'layer':<22}" + "".join(f"{p:>13}" for p in parts) + f"{'sum':>10}")
        labels = list(dict.fromkeys(label for label, _ in table))
        totals = dict.fromkeys(parts, 0.0)
        for label in labels:
            row = [table.get((label, p), 0.0) for p in parts]
            for p, v in zip(parts, row):
                totals[p] += v
            print("    " + f"{label:<22}" + "".join(f"{1e3 * v:13.2f}" for v in row)
                  + f"{1e3 * sum(row):10.2f}")
        print("    " + f"{'total':<22}" + "".join(f"{1e3 * totals[p]:13.2f}" for p in parts)
              + f"{1e3 * sum(totals.values()):10.2f}")


# ----------------------------------------------------------------------------- main

def machine_description() -> dict:
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        pass
    blas = [{k: lib.get(k) for k in ("internal_api", "version", "architecture", "filepath")}
            for lib in threadpool_info()]
    return {"cpu": model, "cores_usable": len(os.sched_getaffinity(0)), "python": platform.python_version(),
            "numpy": np.__version__, "blas": blas,
            "OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE"),
            "load_average_1min": os.getloadavg()[0], "date": time.strftime("%Y-%m-%d %H:%M")}


def parse_threads(text: str) -> list[int]:
    cores = len(os.sched_getaffinity(0))
    out = []
    for item in text.split(","):
        n = cores if item.strip() == "all" else int(item)
        if n < 1:
            raise ValueError(f"--threads: expected positive integers or 'all', got {item!r}")
        if n not in out:
            out.append(n)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="paper,small", help=f"comma list of {sorted(SIZES)}")
    ap.add_argument("--threads", default="1,all", help="comma list of thread counts or 'all'")
    ap.add_argument("--optimizers", default=",".join(OPTIMIZERS))
    ap.add_argument("--reps", type=int, default=9, help="interleaved repetitions")
    ap.add_argument("--batches", type=int, default=4, help="minibatches per repetition")
    ap.add_argument("--warmup", type=int, default=12, help="minibatches before timing")
    ap.add_argument("--breakdown-reps", type=int, default=5)
    ap.add_argument("--settle", type=float, default=0.2,
                    help="seconds of sleep before each timed block (idle BLAS threads)")
    ap.add_argument("--no-breakdown", action="store_true")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--json", help="write all figures to this file")
    args = ap.parse_args(argv)
    optimizers = [o for o in args.optimizers.split(",") if o]
    for o in optimizers:
        if o not in OPTIMIZERS:
            ap.error(f"--optimizers: unknown {o!r} (known: {OPTIMIZERS})")
    sizes = [s for s in args.sizes.split(",") if s]
    for s in sizes:
        if s not in SIZES:
            ap.error(f"--sizes: unknown {s!r} (known: {sorted(SIZES)})")

    torch = None
    if not args.no_torch:
        try:
            import torch  # noqa: PLC0415 - optional benchmark dependency
        except ImportError:
            print("PyTorch not installed: skipping the PyTorch baseline "
                  "(pip install 'ngsgd_mpi[bench]')")

    info = machine_description()
    print(f"machine: {info['cpu']}, {info['cores_usable']} usable cores; numpy {info['numpy']}; "
          f"OPENBLAS_CORETYPE={info['OPENBLAS_CORETYPE']}; load average {info['load_average_1min']:.2f} "
          f"(other processes share these cores); {info['date']}")
    for lib in info["blas"]:
        print(f"  BLAS: {lib['internal_api']} {lib['version']} ({lib['architecture']}) {lib['filepath']}")
    if torch is not None:
        print(f"  torch {torch.__version__}")
    report = {"machine": info, "args": vars(args), "runs": []}
    ng_config = OptimizerConfig()
    for size_name in sizes:
        size = SIZES[size_name]
        N = size.minibatch
        sgd = sgd_macs(size.net, N)
        straight = online_extra_macs(size.net, N, ng_config, factored=False)
        factored = online_extra_macs(size.net, N, ng_config, factored=True)
        print(f"\n=== size {size_name}: {size.net.input_dim} -> {size.net.num_hidden_layers} x "
              f"({size.net.pnorm_input_dim} p-norm -> {size.net.pnorm_output_dim}) -> "
              f"{size.net.num_classes}, minibatch {N}")
        print(f"  multiply-adds per minibatch: SGD {sgd / 1e6:,.1f} M; NG-online extra "
              f"{straight / 1e6:,.1f} M straightforward (floor ratio {1 + straight / sgd:.3f}), "
              f"{factored / 1e6:,.1f} M factored as implemented (floor ratio {1 + factored / sgd:.3f})")
        batches = make_batches(size)
        for threads in parse_threads(args.threads):
            with threadpool_limits(threads):
                if torch is not None:
                    torch.set_num_threads(threads)
                runners = {name: NumpyRunner(size, name, batches) for name in optimizers}
                if torch is not None:
                    runners["torch-sgd"] = TorchRunner(size, batches, torch)
                for runner in runners.values():
                    for _ in range(args.warmup):
                        runner.step()
                times = time_interleaved(runners, args.reps, args.batches, args.settle)
                medians = {name: statistics.median(v) for name, v in times.items()}
                print(f"\n  threads {threads}: median ms per minibatch over {args.reps} interleaved "
                      f"repetitions of {args.batches} (load average now {os.getloadavg()[0]:.2f})")
                for name, t in medians.items():
                    print(f"    {name:<10} {1e3 * t:9.2f} ms   ({N / t:,.0f} frames/s)")
                ratios = {}
                base = "sgd" if "sgd" in times else None
                if base:
                    for name in times:
                        if name != base:
                            ratios[f"{name}/{base}"] = statistics.median(
                                a / b for a, b in zip(times[name], times[base]))
                    if "torch-sgd" in times:    # ours relative to the peer, the other way round
                        ratios = {k: v for k, v in ratios.items() if k != "torch-sgd/sgd"}
                        ratios["sgd/torch-sgd"] = statistics.median(
                            a / b for a, b in zip(times["sgd"], times["torch-sgd"]))
                for name, value in ratios.items():
                    print(f"    ratio {name:<18} {value:.3f}  (median of paired ratios)")
                run = {"size": size_name, "threads": threads, "minibatch": N,
                       "load_average_1min": os.getloadavg()[0],
                       "sgd_macs": sgd, "ng_online_extra_macs_straightforward": straight,
                       "ng_online_extra_macs_factored": factored,
                       "ms": {k: 1e3 * v for k, v in medians.items()},
                       "ms_all": {k: [1e3 * x for x in v] for k, v in times.items()},
                       "ratios": ratios}
                if not args.no_breakdown:
                    tables = breakdown(size, optimizers, batches, args.breakdown_reps, args.batches,
                                       args.settle)
                    print_breakdown(tables)
                    run["breakdown_ms"] = {name: {f"{label}/{part}": 1e3 * v
                                                  for (label, part), v in table.items()}
                                           for name, table in tables.items()}
                report["runs"].append(run)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
