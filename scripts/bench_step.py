#!/usr/bin/env python3
"""Time one training minibatch (forward + backward + update) for sgd, ng-online
and ng-simple, per layer and per part, and against PyTorch; report memory.

    OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 .venv/bin/python scripts/bench_step.py \
        [--sizes paper,small] [--threads 1,all] [--reps 9] [--json out.json] [--memory]

What is measured (docs/benchmarks.md has the figures):

* Totals: every optimiser steps on the same minibatches from the same
  initial network; repetitions are interleaved (rep k times ``--batches``
  minibatches of each optimiser in turn, the order rotating, a short sleep
  before each block), and each figure is the median over repetitions of the
  wall time per minibatch, and of the process CPU time (with one BLAS thread
  CPU time is not inflated by other jobs taking the core; both are reported).
  The NG/SGD ratios are medians of the per-repetition ratios, so slow phases
  of a shared machine hit both sides of a ratio alike.
* Breakdown: a second, instrumented pass attributes wall time to each
  layer's forward and backward, the updater's per-layer update, the
  preconditioner calls inside it ("precondition"; "update" is the rest) and
  the deferred Fisher updates at the end of the step.  It uses the
  interpreter's profiling hook (``sys.setprofile``, what cProfile uses) on
  those functions' code objects: no object is patched.
* FLOPs: multiply-adds of one minibatch from the shared cost model
  (``ngsgd_mpi.costs``, also what the updaters' form choices use), so the
  measured ratio can be set beside the arithmetic floor.
* PyTorch (if installed, ``pip install 'ngsgd_mpi[bench]'``): the same
  network and plain SGD step, same threads (torch.set_num_threads) and
  minibatch; it joins the interleaved repetitions as "torch-sgd".
* ``--memory``: each optimiser in a fresh process: peak resident memory
  (VmHWM) and what of it is parameters, optimiser state, work buffers
  (layers' activations, updater and preconditioner workspaces) and the
  interpreter with NumPy/BLAS loaded.

Threads: "1" and "all" (the cores this process may use) via threadpoolctl,
which limits NumPy's OpenBLAS.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
from threadpoolctl import threadpool_info, threadpool_limits

from ngsgd_mpi import costs, layers, ng_online, ng_simple, optim
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
    # A GPU-sized net (issue 14): 4 x (5000 p-norm -> 500).
    "gpu": Size("gpu", NetworkConfig(input_dim=360, num_classes=2000, num_hidden_layers=4,
                                     pnorm_input_dim=5000, pnorm_output_dim=500), 512),
    # For the smoke test only.
    "tiny": Size("tiny", NetworkConfig(input_dim=12, num_classes=7, num_hidden_layers=1,
                                       pnorm_input_dim=20, pnorm_output_dim=4), 16),
}


def multiply_adds(size: Size, config: OptimizerConfig) -> dict:
    """The cost model's counts for one minibatch of this size."""
    shapes, N = size.net.affine_shapes(), size.minibatch
    online = dict(rank_in=config.rank_in, rank_out=config.rank_out, period=config.update_period)
    return {"sgd_macs": costs.sgd_macs(shapes, N),
            "ng_online_extra_macs_straightforward": costs.online_extra_macs(shapes, N, **online,
                                                                             output_form="formed"),
            "ng_online_extra_macs_factored": costs.online_extra_macs(shapes, N, **online),
            "ng_simple_extra_macs": costs.simple_extra_macs(shapes, N)}


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
    """The same network and plain SGD step in PyTorch (float32; ``device``
    "cpu" or "cuda", the GPU self-test's peer)."""

    def __init__(self, size: Size, batches, torch, device: str = "cpu"):
        self.torch = torch
        net = Network(size.net, seed=0)          # same initial weights
        cfg = size.net
        self.linears = []
        for layer in net.affine_layers:
            linear = torch.nn.Linear(layer.input_dim, layer.output_dim)
            with torch.no_grad():
                linear.weight.copy_(torch.from_numpy(layer.linear.copy()))
                linear.bias.copy_(torch.from_numpy(layer.bias.copy()))
            self.linears.append(linear.to(device))
        self.params = [p for lin in self.linears for p in lin.parameters()]
        self.group = cfg.pnorm_input_dim // cfg.pnorm_output_dim
        self.batches = [(torch.from_numpy(X).to(device), torch.from_numpy(labels.astype(np.int64)).to(device))
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


def time_interleaved(runners: dict, reps: int, batches: int, settle: float):
    """(wall, cpu): per-minibatch seconds of each runner, one list entry per
    repetition.  ``settle`` seconds of sleep before each block let the previous
    runner's BLAS/OpenMP worker threads stop busy-waiting (OpenBLAS spins ~0.1 s)."""
    names = list(runners)
    wall, cpu = defaultdict(list), defaultdict(list)
    for rep in range(reps):
        order = names[rep % len(names):] + names[:rep % len(names)]
        for name in order:
            step = runners[name].step
            time.sleep(settle)
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(batches):
                step()
            wall[name].append((time.perf_counter() - t0) / batches)
            cpu[name].append((time.process_time() - c0) / batches)
    return wall, cpu


def paired_ratios(times: dict) -> dict:
    """Medians of per-repetition ratios against sgd (and sgd against PyTorch)."""
    ratios = {}
    if "sgd" not in times:
        return ratios
    for name in times:
        if name not in ("sgd", "torch-sgd"):
            ratios[f"{name}/sgd"] = statistics.median(a / b for a, b in zip(times[name], times["sgd"]))
    if "torch-sgd" in times:            # ours relative to the peer, the other way round
        ratios["sgd/torch-sgd"] = statistics.median(
            a / b for a, b in zip(times["sgd"], times["torch-sgd"]))
    return ratios


# ----------------------------------------------------------------------------- breakdown

class SectionTimer:
    """Wall time of chosen functions per (label, part), through ``sys.setprofile``.

    The hook sees every call; for the code objects in ``PARTS`` it times the
    call and files it under a label: the layer for forward/backward (by the
    ``self`` of the call), "Affine{index}" for an updater's per-layer update,
    and the layer being updated for the preconditioner calls made inside it.
    Nested calls are recorded too ("precondition" lies inside "update")."""

    PARTS = {}
    for _cls in (layers.Affine, layers.Pnorm, layers.Normalize, layers.Relu,
                 layers.SoftmaxCrossEntropy):
        PARTS[_cls.forward.__code__] = "forward"
        PARTS[_cls.backward.__code__] = "backward"
    for _cls in (optim.SgdUpdater, optim.OnlineNgUpdater, optim.SimpleNgUpdater):
        PARTS[_cls._update_layer.__code__] = "update"
    PARTS[ng_online.OnlineNaturalGradient.precondition.__code__] = "precondition"
    PARTS[ng_simple.leave_one_out.__code__] = "precondition"
    PARTS[ng_online.DeferredUpdates.finish.__code__] = "fisher"

    def __init__(self, network):
        self.sink = defaultdict(float)
        counts = defaultdict(int)
        self.labels = {}
        for layer in network.layers:
            kind = type(layer).__name__
            self.labels[id(layer)] = f"{kind}{counts[kind]}"
            counts[kind] += 1
        self._stack = []
        self._current = "other"

    def _key(self, frame, part):
        if part in ("forward", "backward"):
            return self.labels.get(id(frame.f_locals.get("self")), "other"), part
        if part == "update":
            self._current = f"Affine{frame.f_locals['index']}"
            return self._current, part
        if part == "fisher":
            return "Fisher updates", "precondition"
        return self._current, part

    def _hook(self, frame, event, arg):
        if event == "call":
            part = self.PARTS.get(frame.f_code)
            if part is not None:
                self._stack.append((frame, self._key(frame, part), time.perf_counter()))
        elif event == "return" and self._stack and self._stack[-1][0] is frame:
            _, key, t0 = self._stack.pop()
            self.sink[key] += time.perf_counter() - t0

    def __enter__(self):
        sys.setprofile(self._hook)
        return self

    def __exit__(self, *exc):
        sys.setprofile(None)


def breakdown(size: Size, optimizers, batches, reps: int, steps: int, settle: float) -> dict:
    """Median seconds per minibatch of each (layer, part), per optimiser; the
    instrumented runners take turns like the totals."""
    runners = {}
    for name in optimizers:
        runners[name] = NumpyRunner(size, name, batches)
        for _ in range(12):
            runners[name].step()
    samples = {name: defaultdict(list) for name in optimizers}
    for rep in range(reps):
        for name in optimizers[rep % len(optimizers):] + optimizers[:rep % len(optimizers)]:
            time.sleep(settle)
            t0 = time.perf_counter()
            with SectionTimer(runners[name].net) as timer:
                for _ in range(steps):
                    runners[name].step()
            total = time.perf_counter() - t0
            sink = timer.sink
            # Whatever no section saw: the network's glue (checks, objective statistics).
            # (Preconditioner time is inside "update", so it is not added again.)
            seen = sum(v for (label, part), v in sink.items()
                       if part != "precondition" or label.startswith("Fisher"))
            sink[("other", "forward")] += total - seen
            for key, seconds in sink.items():
                samples[name][key].append(seconds / steps)
    result = {}
    for name in optimizers:
        table = {key: statistics.median(v) for key, v in samples[name].items()}
        # "update" includes the preconditioner calls made inside it: report the rest.
        for (label, part), seconds in list(table.items()):
            if part == "precondition" and not label.startswith("Fisher"):
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


# ----------------------------------------------------------------------------- memory

def memory_probe(size: Size, optimizer: str, steps: int) -> dict:
    """In this (fresh) process: peak RSS after ``steps`` minibatches, and its parts."""
    def peak_mb():
        # VmHWM: this process's peak RSS (ru_maxrss would include the parent's: Linux keeps
        # it across fork and exec).
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024.0

    batches = make_batches(size, count=4)
    baseline = peak_mb()                          # interpreter, NumPy, BLAS, the minibatches
    runner = NumpyRunner(size, optimizer, batches)
    for _ in range(steps):
        runner.step()
    net, updater = runner.net, runner.updater
    state = updater.state_dict()
    state_bytes = sum(side[key].nbytes for layer in state["layers"] for side in layer.values()
                      for key in ("W", "d"))
    activations = sum(layer.work.nbytes for layer in net.layers if hasattr(layer, "work"))
    preconditioners = getattr(updater, "input_side", []) + getattr(updater, "output_side", [])
    work = updater.work.nbytes + sum(p.work.nbytes for p in preconditioners)
    mb = 1.0 / 2 ** 20
    return {"optimizer": optimizer, "size": size.name, "peak_rss_mb": peak_mb(),
            "baseline_mb": baseline, "params_mb": net.params.nbytes * mb,
            "optimizer_state_mb": state_bytes * mb, "layer_buffers_mb": activations * mb,
            "updater_work_mb": work * mb,
            "minibatch_mb": sum(X.nbytes + y.nbytes for X, y in batches) * mb}


def memory_report(size_name: str, optimizers, steps: int) -> list[dict]:
    rows = []
    for name in optimizers:
        out = subprocess.run([sys.executable, __file__, "--memory-probe", name, "--sizes", size_name,
                              "--memory-steps", str(steps)], capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"\n  peak resident memory per process (rank), {size_name} size, after {steps} minibatches (MiB):")
    print(f"    {'optimizer':<10}{'peak RSS':>10}{'params':>9}{'opt state':>11}{'layer bufs':>12}"
          f"{'upd work':>10}{'base+data':>11}{'other':>8}")
    for r in rows:
        known = (r["params_mb"] + r["optimizer_state_mb"] + r["layer_buffers_mb"] + r["updater_work_mb"]
                 + r["baseline_mb"])
        r["other_mb"] = r["peak_rss_mb"] - known
        print(f"    {r['optimizer']:<10}{r['peak_rss_mb']:10.1f}{r['params_mb']:9.1f}"
              f"{r['optimizer_state_mb']:11.1f}{r['layer_buffers_mb']:12.1f}{r['updater_work_mb']:10.1f}"
              f"{r['baseline_mb']:11.1f}{r['other_mb']:8.1f}")
    return rows


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
            "OPENBLAS_L2_SIZE": os.environ.get("OPENBLAS_L2_SIZE"),
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
    ap.add_argument("--memory", action="store_true", help="also report peak memory per optimiser")
    ap.add_argument("--memory-only", action="store_true", help="only the memory report")
    ap.add_argument("--memory-steps", type=int, default=8, help=argparse.SUPPRESS)
    ap.add_argument("--memory-probe", help=argparse.SUPPRESS)     # the child process of --memory
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
    if args.memory_probe:
        with threadpool_limits(1):
            print(json.dumps(memory_probe(SIZES[sizes[0]], args.memory_probe, args.memory_steps)))
        return 0

    torch = None
    if not args.no_torch:
        try:
            import torch  # noqa: PLC0415 - optional benchmark dependency
        except ImportError:
            print("PyTorch not installed: skipping the PyTorch baseline "
                  "(pip install 'ngsgd_mpi[bench]')")

    info = machine_description()
    print(f"machine: {info['cpu']}, {info['cores_usable']} usable cores; numpy {info['numpy']}; "
          f"OPENBLAS_CORETYPE={info['OPENBLAS_CORETYPE']}, OPENBLAS_L2_SIZE={info['OPENBLAS_L2_SIZE']}; "
          f"load average {info['load_average_1min']:.2f} (other processes share these cores); {info['date']}")
    for lib in info["blas"]:
        print(f"  BLAS: {lib['internal_api']} {lib['version']} ({lib['architecture']}) {lib['filepath']}")
    if torch is not None:
        print(f"  torch {torch.__version__}")
    report = {"machine": info, "args": vars(args), "runs": [], "memory": []}
    ng_config = OptimizerConfig()
    for size_name in sizes if args.memory_only else ():
        report["memory"] += memory_report(size_name, optimizers, args.memory_steps)
    for size_name in () if args.memory_only else sizes:
        size = SIZES[size_name]
        N = size.minibatch
        macs = multiply_adds(size, ng_config)
        sgd = macs["sgd_macs"]
        print(f"\n=== size {size_name}: {size.net.input_dim} -> {size.net.num_hidden_layers} x "
              f"({size.net.pnorm_input_dim} p-norm -> {size.net.pnorm_output_dim}) -> "
              f"{size.net.num_classes}, minibatch {N}")
        print(f"  multiply-adds per minibatch (ngsgd_mpi.costs): SGD {sgd / 1e6:,.1f} M; NG-online extra "
              f"{macs['ng_online_extra_macs_straightforward'] / 1e6:,.1f} M straightforward (floor ratio "
              f"{1 + macs['ng_online_extra_macs_straightforward'] / sgd:.3f}), "
              f"{macs['ng_online_extra_macs_factored'] / 1e6:,.1f} M as implemented (floor ratio "
              f"{1 + macs['ng_online_extra_macs_factored'] / sgd:.3f}); NG-simple extra "
              f"{macs['ng_simple_extra_macs'] / 1e6:,.1f} M (floor ratio "
              f"{1 + macs['ng_simple_extra_macs'] / sgd:.3f})")
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
                wall, cpu = time_interleaved(runners, args.reps, args.batches, args.settle)
                medians = {name: statistics.median(v) for name, v in wall.items()}
                cpu_medians = {name: statistics.median(v) for name, v in cpu.items()}
                print(f"\n  threads {threads}: median ms per minibatch over {args.reps} interleaved "
                      f"repetitions of {args.batches} (load average now {os.getloadavg()[0]:.2f})")
                for name, t in medians.items():
                    print(f"    {name:<10} {1e3 * t:9.2f} ms wall  {1e3 * cpu_medians[name]:9.2f} ms CPU"
                          f"   ({N / t:,.0f} frames/s)")
                ratios, ratios_cpu = paired_ratios(wall), paired_ratios(cpu)
                for name, value in ratios.items():
                    print(f"    ratio {name:<18} {value:.3f} wall, {ratios_cpu[name]:.3f} CPU  "
                          f"(medians of paired ratios)")
                run = {"size": size_name, "threads": threads, "minibatch": N,
                       "load_average_1min": os.getloadavg()[0], **macs,
                       "ms": {k: 1e3 * v for k, v in medians.items()},
                       "ms_all": {k: [1e3 * x for x in v] for k, v in wall.items()},
                       "cpu_ms": {k: 1e3 * v for k, v in cpu_medians.items()},
                       "ratios": ratios, "ratios_cpu": ratios_cpu}
                if not args.no_breakdown:
                    tables = breakdown(size, optimizers, batches, args.breakdown_reps, args.batches,
                                       args.settle)
                    print_breakdown(tables)
                    run["breakdown_ms"] = {name: {f"{label}/{part}": 1e3 * v
                                                  for (label, part), v in table.items()}
                                           for name, table in tables.items()}
                report["runs"].append(run)
        if args.memory:
            report["memory"] += memory_report(size_name, optimizers, args.memory_steps)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
