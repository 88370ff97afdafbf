#!/usr/bin/env python3
"""GPU self-test (issue 14): everything a GPU run must show, in one command
with its own time limit, written so that the GPU run is a single command.

    .venv/bin/python scripts/gpu_selftest.py [--timeout 600] [--json gpu.json]
    .venv/bin/python scripts/gpu_selftest.py --standin     # the same run on the CuPy stand-in

Sections (each prints ``[ok]`` / ``[FAIL]`` lines and its figures; a section
that does not fit in the time left is skipped, and the report says so):

1. Agreement, device vs NumPy, float32: the Kaldi golden cases (online
   preconditioner, both schedules; simple preconditioner; both NG affine
   updates) against Kaldi's outputs with the CPU tests' tolerances and
   against the NumPy path; whole training steps at paper size for sgd,
   ng-online and ng-simple (parameters to 1e-4 relative after 3 steps).
2. Host synchronisations per minibatch: device-to-host transfers counted by
   the backend (``backend.transfer_counts``) while any other host read of
   device data raises (``backend.implicit_syncs_forbidden``: CuPy's
   ``cupyx.allow_synchronize(False)``, the stand-in's strict policy).  The
   design: one transfer in ``train_gradients`` (the objective), none in
   ``step`` except on ng-online's Fisher-update minibatches (one for the
   whole network, one more when an orthonormality check is due).
3. Step time at paper size and at a GPU-sized net (4 x 5000 p-norm -> 500,
   minibatch 512): sgd, ng-online, ng-simple, and PyTorch on the same GPU as
   the peer (if installed with CUDA); ng-online/sgd against the paper's
   1.10-1.25 and the goal <= 1.15 (reported, not a pass/fail check).
4. Averaging: whether the MPI library is CUDA-aware; two ranks on one GPU
   (the venv's ``mpiexec``): milliseconds per Allreduce of the paper net's
   flat parameter buffer staged through the host, and direct when the
   library is CUDA-aware; frames/s of the SPMD trainer on the demo corpus.
5. Convergence: the demo corpus trained with the same seed and 2 ranks on
   the GPU and on the CPU: validation frame accuracy within 0.5 points.

``--standin`` runs all of it on the CuPy stand-in (``ngsgd_mpi.standin``;
``NGSGD_GPU_STANDIN=1`` for the subprocesses): it checks the script, the
data movement and the trainer's device path end to end; its timings are CPU
timings and say nothing about a GPU.  Exit codes: 0 every check passed, 1 a
check failed, 2 no usable GPU (nothing was tested), 3 the time limit ended
the run before every section ran.  Figures go to ``--json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import bench_step                       # the sibling benchmark: sizes, the PyTorch peer
from ngsgd_mpi import backend, distributed, metrics
from ngsgd_mpi.network import Network, NetworkConfig
from ngsgd_mpi.ng_online import OnlineNaturalGradient
from ngsgd_mpi.ng_simple import precondition_simple, precondition_simple_unscaled
from ngsgd_mpi.optim import OptimizerConfig, make_updater

REPO = Path(__file__).resolve().parents[1]
GOLDEN = REPO.parent / "shared" / "reference" / "golden"
OPTIMIZERS = ("sgd", "ng-online", "ng-simple")
# The CPU tests' tolerances (tests/test_ng_online.py, test_ng_simple.py, test_optim.py).
ONLINE_TOLERANCE = {"online_d100_n128_r20_p1_alpha0": 5e-2, "online_d100_n2_r20_p4_gauss": 1e-1,
                    "online_d40_n1_r20_p1_lowrank": 1e-1, "online_d40_n16_r20_p1_zeros": 1e-1,
                    "online_d10_n1_r2_p1_gauss": 2e-2, "online_d300_n16_r80_p1_lowrank": 3e-3}
ONLINE_DEFAULT_TOLERANCE = 1e-3
SIMPLE_TOLERANCE = {4.0: 2e-5, 0.1: 5e-4}
AFFINE_TOLERANCE = {"affine_online": 5e-5, "affine_simple": 3e-6}
STEP_TOLERANCE = 1e-4


class Report:
    """Check lines, figures for the JSON file, and the time budget."""

    def __init__(self, timeout: float):
        self.failures = 0
        self.skipped: list[str] = []
        self.figures: dict = {}
        self.deadline = time.monotonic() + timeout

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def check(self, what: str, value: float, limit: float) -> bool:
        ok = value <= limit
        self.failures += not ok
        print(f"  [{'ok' if ok else 'FAIL'}] {what}: {value:.2e} (limit {limit:.0e})")
        return ok

    def fail(self, what: str) -> None:
        self.failures += 1
        print(f"  [FAIL] {what}")


def rel_err(a, b) -> float:
    a = np.asarray(backend.to_host(a), np.float64)
    b = np.asarray(backend.to_host(b), np.float64)
    norm = np.linalg.norm(b)
    return float(np.linalg.norm(a - b) / norm) if norm > 0 else float(np.linalg.norm(a))


def on(device: str, make):
    """``make()`` with ``device`` selected (NumPy and device objects side by side)."""
    previous = backend.device()
    backend.use_device("gpu" if device == "device" else "cpu")
    try:
        return make()
    finally:
        backend.use_device("gpu" if previous != "cpu" else "cpu")


def load_golden(path: Path):
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    return json.loads(str(arrays.pop("config_json"))), arrays


# ----------------------------------------------------------------------------- 1. agreement

def check_golden(report: Report) -> None:
    if not GOLDEN.is_dir():
        report.skipped.append(f"golden cases ({GOLDEN} not found)")
        print(f"  golden vectors not found at {GOLDEN}: skipped")
        return
    worst = {}
    for path in sorted(GOLDEN.glob("online_*.npz")):
        cfg, z = load_golden(path)
        tolerance = ONLINE_TOLERANCE.get(path.stem, ONLINE_DEFAULT_TOLERANCE)
        for method in cfg["methods"]:
            args = (cfg["rank_requested"], cfg["update_period"], cfg["num_samples_history"],
                    cfg["alpha"], method, cfg["num_minibatches_history"])
            host, device = OnlineNaturalGradient(*args), OnlineNaturalGradient(*args)
            vs_kaldi = vs_numpy = 0.0
            for i in range(cfg["num_batches"]):
                X = z[f"in_{i:03d}"].astype(np.float32)
                X_hat, gamma = host.precondition(X)
                D_hat, D_gamma = device.precondition(backend.to_device(X))
                kaldi = np.float64(z[f"{method}_scale"][i]) * z[f"{method}_out_{i:03d}"].astype(np.float64)
                ours = backend.to_host(D_hat).astype(np.float64) * float(backend.to_host(D_gamma))
                vs_kaldi = max(vs_kaldi, rel_err(ours, kaldi))
                vs_numpy = max(vs_numpy, rel_err(ours, gamma * X_hat.astype(np.float64)))
            report.check(f"{path.stem} {method}: device vs Kaldi", vs_kaldi, tolerance)
            worst["online vs numpy"] = max(worst.get("online vs numpy", 0.0), vs_numpy)
            report.check(f"{path.stem} {method}: device vs NumPy", vs_numpy, tolerance)
    for path in sorted(GOLDEN.glob("simple_*.npz")):
        cfg, z = load_golden(path)
        error = 0.0
        for i in range(cfg["num_batches"]):
            X = backend.to_device(z[f"in_{i:03d}"].astype(np.float32))
            error = max(error, rel_err(precondition_simple_unscaled(X, cfg["alpha"]), z[f"simple_out_{i:03d}"]),
                        rel_err(precondition_simple(X, cfg["alpha"]), z[f"simple_rescaled_out_{i:03d}"]))
        report.check(f"{path.stem}: device vs Kaldi", error, SIMPLE_TOLERANCE[cfg["alpha"]])
    for path in sorted(GOLDEN.glob("affine_*.npz")):
        cfg, z = load_golden(path)
        report.check(f"{path.stem}: device affine updates vs Kaldi", replay_affine(cfg, z),
                     AFFINE_TOLERANCE[cfg["method"]])
    report.figures["golden_worst"] = worst


def replay_affine(cfg, z) -> float:
    """Worst relative error of our per-step parameter changes on Kaldi's (X, G)
    sequence, on the device (the parameters are reset to Kaldi's before each step)."""
    if cfg["method"] == "affine_online":
        options = dict(optimizer="ng-online", rank_in=cfg["rank_in"], rank_out=cfg["rank_out"],
                       update_period=cfg["update_period"], num_samples_history=cfg["num_samples_history"],
                       alpha=cfg["alpha"], max_change_per_sample=cfg["max_change_per_sample"])
    else:
        options = dict(optimizer="ng-simple", simple_alpha=cfg["alpha"], max_change=cfg["max_change"])
    net = Network(NetworkConfig(input_dim=cfg["in_dim"], num_classes=cfg["out_dim"], num_hidden_layers=0))
    layer = net.affine_layers[0]
    updater = make_updater(net, OptimizerConfig(**options))
    linear, bias = z["init_linear"], z["init_bias"]
    worst = 0.0
    for i in range(cfg["num_batches"]):
        layer.linear[...] = backend.to_device(linear)
        layer.bias[...] = backend.to_device(bias)
        start = np.concatenate([linear.ravel(), bias]).astype(np.float64)
        layer.input = backend.to_device(z[f"in_{i:03d}"].astype(np.float32))
        layer.out_deriv = backend.to_device(z[f"deriv_{i:03d}"].astype(np.float32))
        updater.step(cfg["learning_rate"])
        ours = np.concatenate([backend.to_host(layer.linear).ravel(), backend.to_host(layer.bias)])
        linear, bias = z[f"linear_{i:03d}"], z[f"bias_{i:03d}"]
        kaldi = np.concatenate([linear.ravel(), bias]).astype(np.float64)
        worst = max(worst, rel_err(ours - start, kaldi - start))
    return worst


def check_steps(report: Report, size) -> None:
    rng = np.random.default_rng(1)
    data = [(rng.standard_normal((size.minibatch, size.net.input_dim)).astype(np.float32),
             rng.integers(0, size.net.num_classes, size.minibatch)) for _ in range(3)]
    for name in OPTIMIZERS:
        host = on("cpu", lambda: Network(size.net, seed=0))
        device = on("device", lambda: Network(size.net, params=backend.to_device(host.params)))
        updaters = [make_updater(net, OptimizerConfig(optimizer=name)) for net in (host, device)]
        objective = 0.0
        for X, labels in data:
            lp_host, _ = host.train_gradients(X, labels)
            lp_device, _ = device.train_gradients(backend.to_device(X), backend.to_device(labels))
            objective = max(objective, abs(lp_device / lp_host - 1.0))
            for updater in updaters:
                updater.step(1e-3)
        report.check(f"{name}: objective over 3 steps, device vs NumPy", objective, STEP_TOLERANCE)
        report.check(f"{name}: parameters after 3 steps, device vs NumPy",
                     rel_err(device.params, host.params), STEP_TOLERANCE)


# ----------------------------------------------------------------------------- 2. host syncs

def check_syncs(report: Report, size) -> None:
    layers = len(size.net.affine_shapes())
    if not backend.implicit_syncs_detectable():
        print("  note: this CuPy has no cupyx.allow_synchronize: hidden synchronisations are not "
              "detected, only the explicit transfers are counted")
    rng = np.random.default_rng(2)
    batches = [(backend.to_device(rng.standard_normal((size.minibatch, size.net.input_dim)).astype(np.float32)),
                backend.to_device(rng.integers(0, size.net.num_classes, size.minibatch))) for _ in range(4)]
    figures = {}
    for name in OPTIMIZERS:
        net = Network(size.net, seed=0)
        updater = make_updater(net, OptimizerConfig(optimizer=name))
        for k in range(16):                       # past the initial Fisher updates
            net.train_gradients(*batches[k % 4])
            updater.step(1e-3)
        forward, step = [], []
        try:
            with backend.implicit_syncs_forbidden():
                for k in range(8):                # two update periods
                    before = backend.transfer_counts()["to_host"]
                    net.train_gradients(*batches[k % 4])
                    middle = backend.transfer_counts()["to_host"]
                    updater.step(1e-3)
                    forward.append(middle - before)
                    step.append(backend.transfer_counts()["to_host"] - middle)
        except Exception as exc:  # noqa: BLE001 - DeviceSynchronized / ImplicitSync, whatever the module
            report.fail(f"{name}: a hidden host synchronisation: {type(exc).__name__}: {exc}")
            continue
        figures[name] = {"train_gradients": forward, "step": step}
        print(f"  {name}: device-to-host transfers per minibatch, train_gradients {forward}, step {step} "
              f"({layers} affine layers)")
        ok_forward = all(n == 1 for n in forward)
        if name == "ng-online":
            ok_step = (sum(n > 0 for n in step) == 2 and all(n <= 2 for n in step))
        else:
            ok_step = not any(step)
        if ok_forward and ok_step:
            print(f"  [ok] {name}: as designed")
        else:
            report.fail(f"{name}: transfers differ from the design (1 per train_gradients; step: none, "
                        "ng-online 1-2 on one minibatch in 4)")
    report.figures["transfers_per_minibatch"] = figures


# ----------------------------------------------------------------------------- 3. step time

class DeviceRunner:
    def __init__(self, size, optimizer: str, batches):
        self.net = Network(size.net, seed=0)
        self.updater = make_updater(self.net, OptimizerConfig(optimizer=optimizer))
        self.batches = [(backend.to_device(X), backend.to_device(y)) for X, y in batches]
        self.k = 0

    def step(self):
        X, labels = self.batches[self.k % len(self.batches)]
        self.k += 1
        self.net.train_gradients(X, labels)
        self.updater.step(bench_step.LEARNING_RATE)

    synchronize = staticmethod(backend.synchronize)


def time_steps(report: Report, size, reps: int, standin: bool) -> None:
    batches = bench_step.make_batches(size)
    runners = {name: DeviceRunner(size, name, batches) for name in OPTIMIZERS}
    try:
        import torch  # noqa: PLC0415 - the optional peer
        if torch.cuda.is_available() and not standin:
            peer = bench_step.TorchRunner(size, batches, torch, device="cuda")
            peer.synchronize = torch.cuda.synchronize
            runners["torch-sgd"] = peer
    except ImportError:
        print("  PyTorch not installed: no peer figure (pip install torch)")
    for runner in runners.values():
        for _ in range(6):
            runner.step()
    times = {name: [] for name in runners}
    for rep in range(reps):
        for name in list(runners)[rep % len(runners):] + list(runners)[:rep % len(runners)]:
            runner = runners[name]
            runner.synchronize()
            t0 = time.perf_counter()
            for _ in range(4):
                runner.step()
            runner.synchronize()
            times[name].append((time.perf_counter() - t0) / 4)
    medians = {name: 1e3 * statistics.median(v) for name, v in times.items()}
    ratios = {f"{name}/sgd": statistics.median(a / b for a, b in zip(times[name], times["sgd"]))
              for name in times if name != "sgd"}
    for name, ms in medians.items():
        print(f"  {size.name}: {name:<10} {ms:8.2f} ms per minibatch of {size.minibatch}")
    for name, value in ratios.items():
        print(f"  {size.name}: ratio {name:<16} {value:.3f}")
    online = ratios["ng-online/sgd"]
    print(f"  {size.name}: ng-online/sgd {online:.3f} against the paper's 1.10-1.25: goal <= 1.15 "
          f"{'met' if online <= 1.15 else 'missed'}{' (stand-in: CPU timings)' if standin else ''}")
    report.figures[f"step_ms_{size.name}"] = medians
    report.figures[f"ratios_{size.name}"] = ratios


# ----------------------------------------------------------------------------- 4, 5. MPI and the trainer

def mpiexec() -> str:
    local = Path(sys.executable).with_name("mpiexec")
    found = str(local) if local.exists() else shutil.which("mpiexec")
    if not found:
        raise FileNotFoundError("no mpiexec (pip install 'ngsgd_mpi[mpi]')")
    return found


def allreduce_child(out: str, params: int, repeats: int) -> int:
    """One rank of the averaging benchmark (run under mpiexec -n 2)."""
    backend.use_device("gpu")
    dist = distributed.Dist()
    buf = backend.to_device(np.full(params, dist.rank + 1.0, np.float32))
    result = {"ranks": dist.size, "cuda_aware_reported": dist.cuda_aware, "params": params}
    for direct in ([False, True] if dist.cuda_aware else [False]):
        dist.cuda_aware = direct
        buf[...] = float(dist.rank + 1)
        dist.average_(buf)
        ok = float(backend.to_host(buf[:1])[0]) == (1.0 + dist.size) / 2
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(repeats):
            dist.average_(buf)
        backend.synchronize()
        result["direct" if direct else "staged"] = {"ms": 1e3 * (time.perf_counter() - t0) / repeats,
                                                    "correct": ok}
    if dist.rank == 0:
        Path(out).write_text(json.dumps(result))
    return 0


def check_averaging(report: Report, size, work: Path) -> None:
    aware = distributed.mpi_is_cuda_aware()
    print(f"  MPI CUDA-aware (MPIX_Query_cuda_support / NGSGD_CUDA_AWARE_MPI): {aware}")
    out = work / "allreduce.json"
    command = [mpiexec(), "-n", "2", sys.executable, __file__, "--allreduce-child", str(out),
               "--params", str(size.net.num_params())]
    run = subprocess.run(command, capture_output=True, text=True, timeout=max(30, report.left() - 30))
    if run.returncode != 0 or not out.exists():
        report.fail(f"two-rank Allreduce run failed (exit {run.returncode}): {run.stderr[-2000:]}")
        return
    result = json.loads(out.read_text())
    for mode in ("staged", "direct"):
        if mode in result:
            r = result[mode]
            print(f"  Allreduce of {result['params']:,} float32 parameters, 2 ranks, {mode}: "
                  f"{r['ms']:.2f} ms{'' if r['correct'] else '  WRONG RESULT'}")
            if not r["correct"]:
                report.fail(f"{mode} average gave a wrong value")
    report.figures["allreduce"] = {**result, "cuda_aware_here": aware}


def prepare_demo(work: Path) -> Path:
    data = work / "demo"
    if not (data / "valid.h5").exists():
        subprocess.run([str(Path(sys.executable).with_name("ngsgd-prepare")), "demo", "--out", str(data),
                        "--num-partitions", "2"], check=True, capture_output=True, text=True)
    return data


def train_demo(report: Report, data: Path, out: Path, device: str, epochs: float) -> dict | None:
    command = [mpiexec(), "-n", "2", str(Path(sys.executable).with_name("ngsgd-train")),
               "--config", str(REPO / "configs" / "quickstart.yaml"),
               "--train-data", str(data / "train"), "--valid-data", str(data / "valid.h5"),
               "--out-dir", str(out), "--device", device, "--num-epochs", str(epochs), "--seed", "1"]
    try:
        run = subprocess.run(command, capture_output=True, text=True, timeout=max(30, report.left() - 20))
    except subprocess.TimeoutExpired:
        report.fail(f"training on {device} ran past the time limit")
        return None
    if run.returncode != 0:
        report.fail(f"training on {device} failed (exit {run.returncode}): {run.stdout[-1500:]}{run.stderr[-1500:]}")
        return None
    last = metrics.read_metrics(str(out)).periods[-1]
    return {"valid_acc": last["valid_acc"], "frames_per_sec": last["frames_per_sec"],
            "elapsed": last["elapsed"], "periods": last["period"]}


def check_convergence(report: Report, work: Path, epochs: float) -> None:
    data = prepare_demo(work)
    results = {}
    for device in ("gpu", "cpu"):
        result = train_demo(report, data, work / f"run_{device}", device, epochs)
        if result is None:
            return
        results[device] = result
        print(f"  demo corpus, 2 ranks, {device}: {result['frames_per_sec']:,.0f} frames/s, "
              f"{result['elapsed']:.0f} s, validation accuracy {100 * result['valid_acc']:.2f}%")
    difference = 100 * abs(results["gpu"]["valid_acc"] - results["cpu"]["valid_acc"])
    report.check("validation accuracy, GPU vs CPU (points)", difference, 0.5)
    report.figures["convergence"] = results


# ----------------------------------------------------------------------------- main

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds for the whole run")
    ap.add_argument("--standin", action="store_true", help="run on the CuPy stand-in instead of a GPU")
    ap.add_argument("--reps", type=int, default=7, help="interleaved timing repetitions")
    ap.add_argument("--sizes", default="paper,gpu", help="step-time sizes (bench_step.SIZES)")
    ap.add_argument("--check-size", default="paper", help="size of the step agreement and sync checks")
    ap.add_argument("--epochs", type=float, default=4.0, help="demo-corpus epochs for section 5")
    ap.add_argument("--sections", default="1,2,3,4,5", help="which sections to run")
    ap.add_argument("--work-dir", help="scratch directory (default: a temporary one)")
    ap.add_argument("--json", help="write the figures to this file")
    ap.add_argument("--allreduce-child", help=argparse.SUPPRESS)
    ap.add_argument("--params", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.standin:
        os.environ["NGSGD_GPU_STANDIN"] = "1"            # also for the subprocesses
    if args.allreduce_child:
        return allreduce_child(args.allreduce_child, args.params, repeats=10)
    try:
        backend.use_device("gpu")
    except Exception as exc:  # noqa: BLE001 - no CuPy, no driver, no device: various errors
        print(f"gpu_selftest: no usable GPU ({type(exc).__name__}: {exc}); nothing was tested "
              "(--standin runs the checks on the CuPy stand-in)", file=sys.stderr)
        return 2
    report = Report(args.timeout)
    print(f"device: {backend.device_description()}; time limit {args.timeout:.0f} s")
    sections = {int(s) for s in args.sections.split(",") if s}
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="gpu_selftest_"))
    work.mkdir(parents=True, exist_ok=True)
    plan = [(1, "agreement with NumPy and Kaldi", lambda: (check_golden(report),
                                                           check_steps(report, bench_step.SIZES[args.check_size]))),
            (2, "host synchronisations per minibatch", lambda: check_syncs(report, bench_step.SIZES[args.check_size])),
            (3, "step time", lambda: [time_steps(report, bench_step.SIZES[s], args.reps, args.standin)
                                      for s in args.sizes.split(",") if s]),
            (4, "averaging", lambda: check_averaging(report, bench_step.SIZES["paper"], work)),
            (5, "convergence on the demo corpus", lambda: check_convergence(report, work, args.epochs))]
    timed_out = False
    for number, title, run in plan:
        if number not in sections:
            continue
        if report.left() < 20:
            timed_out = True
            report.skipped.append(f"{number}. {title} (time limit)")
            print(f"\n{number}. {title}: SKIPPED, the time limit is reached")
            continue
        print(f"\n{number}. {title}")
        t0 = time.monotonic()
        run()
        report.figures.setdefault("section_seconds", {})[number] = time.monotonic() - t0
    print(f"\n{report.failures} check(s) FAILED" if report.failures else "\nall checks passed")
    if report.skipped:
        print("not run: " + "; ".join(report.skipped))
    if args.json:
        Path(args.json).write_text(json.dumps({"device": backend.device_description(), "standin": args.standin,
                                               "failures": report.failures, "skipped": report.skipped,
                                               "figures": report.figures}, indent=1, default=float))
    if not args.work_dir:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if report.failures else (3 if timed_out else 0)


if __name__ == "__main__":
    sys.exit(main())
