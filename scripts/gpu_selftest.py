#!/usr/bin/env python3
"""GPU self-test: run the engine with CuPy and with NumPy on the same inputs and
check that they agree, report whether MPI is CUDA-aware, count host syncs in
a training step, and time SGD against NG-SGD steps on the GPU.

    .venv/bin/python scripts/gpu_selftest.py [--size paper|small] [--steps 20]

UNVERIFIED: this project has had no GPU; the script has only been run to its
"no CuPy / no GPU" exit.  Exit codes: 0 all checks passed, 1 a check failed,
2 CuPy or a GPU is missing (nothing was tested).

Checks (float32 on both sides; the tolerances allow for different BLAS
summation orders, like the golden tests' free-running tolerances):

1. ``OnlineNaturalGradient``: 24 calls on low-rank inputs, materialised and
   factored (begin/end) forms, nnet2 and nnet3 schedules: γ X̂, the row norms,
   d and rho agree to 1e-3 relative.
2. ``Network``: one forward/backward on the same parameters and minibatch:
   log-probabilities, objective and every affine layer's (X, G) agree to 1e-4.
3. One SGD and three NG-online steps from the same state: the parameters
   agree to 1e-4 relative (the steps include a Fisher update).
4. ``distributed.mpi_is_cuda_aware()``: printed (informational).
5. Host syncs: an NG-online step runs under ``cupyx.allow_synchronize(False)``
   with ``backend.to_host`` as the only allowed synchronisation; the script
   reports the number of to_host calls per step (expected: one per affine
   layer, plus one for the objective statistics) and fails on any hidden sync.
6. Timing: median ms per minibatch of SGD and NG-online steps (after warm-up,
   with ``cupy.cuda.Stream.synchronize`` around each timed block) and the ratio.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np

from ngsgd_mpi import backend, distributed
from ngsgd_mpi.network import Network, NetworkConfig
from ngsgd_mpi.ng_online import OnlineNaturalGradient
from ngsgd_mpi.optim import OptimizerConfig, make_updater

SIZES = {
    "paper": (NetworkConfig(input_dim=360, num_classes=2000), 512),
    "small": (NetworkConfig(input_dim=200, num_classes=300, num_hidden_layers=2,
                            pnorm_input_dim=1000, pnorm_output_dim=100), 128),
}


def rel_err(a, b) -> float:
    a = np.asarray(backend.to_host(a), np.float64)
    b = np.asarray(backend.to_host(b), np.float64)
    norm = np.linalg.norm(b)
    return float(np.linalg.norm(a - b) / norm) if norm > 0 else float(np.linalg.norm(a))


class Report:
    def __init__(self):
        self.failures = 0

    def check(self, what: str, error: float, tolerance: float) -> None:
        ok = error <= tolerance
        self.failures += not ok
        print(f"  [{'ok' if ok else 'FAIL'}] {what}: {error:.2e} (tolerance {tolerance:.0e})")


def check_preconditioner(cp, report: Report) -> None:
    print("1. OnlineNaturalGradient, CuPy vs NumPy")
    rng = np.random.default_rng(0)
    for N, D, rank, period, schedule, factored in [
            (128, 361, 20, 1, "nnet2", False), (512, 400, 20, 4, "nnet3", False),
            (256, 1000, 80, 4, "nnet2", True), (64, 300, 80, 1, "nnet3", True)]:
        basis = rng.standard_normal((12, D)).astype(np.float32)
        host, device = (OnlineNaturalGradient(rank, period, schedule=schedule) for _ in range(2))
        worst = {"output": 0.0, "row norms": 0.0}
        for _ in range(24):
            X = (rng.standard_normal((N, 12)).astype(np.float32) @ basis
                 + 0.1 * rng.standard_normal((N, D)).astype(np.float32))
            results = []
            for ng, xp in ((host, np), (device, cp)):
                Xd = xp.array(X)                      # a copy: preconditioned in place
                call = ng.precondition_begin(Xd, out=Xd, row_norms=True, factored=factored)
                gamma = ng.precondition_end(call, backend.to_host(call.host_values))
                X_hat = call.X_hat if call.X_hat is not None else Xd - call.H @ call.W
                results.append((gamma * X_hat, call.row_sq_norms))
            worst["output"] = max(worst["output"], rel_err(results[1][0], results[0][0]))
            worst["row norms"] = max(worst["row norms"], rel_err(results[1][1], results[0][1]))
        name = f"{N}x{D} r{rank} P{period} {schedule} {'factored' if factored else 'materialised'}"
        for key, value in worst.items():
            report.check(f"{name}: {key}", value, 1e-3)
        report.check(f"{name}: d", rel_err(device.state.d, host.state.d), 1e-3)
        report.check(f"{name}: rho", abs(device.state.rho / host.state.rho - 1.0), 1e-3)


def paired_networks(cp, size: str):
    """(host network, device network) with the same parameters."""
    config, minibatch = SIZES[size]
    backend.use_device("cpu")
    host = Network(config, seed=0)
    backend.use_device("gpu")
    device = Network(config, params=cp.asarray(host.params))
    return host, device, minibatch


def check_network_and_steps(cp, size: str, report: Report) -> None:
    print("2. Network forward/backward, CuPy vs NumPy")
    host, device, N = paired_networks(cp, size)
    rng = np.random.default_rng(1)
    X = rng.standard_normal((N, host.config.input_dim)).astype(np.float32)
    labels = rng.integers(0, host.config.num_classes, N)
    obj_h, _ = host.train_gradients(X, labels)
    obj_d, _ = device.train_gradients(cp.asarray(X), cp.asarray(labels))
    report.check("objective", abs(obj_d - obj_h) / abs(obj_h), 1e-4)
    for i, (lh, ld) in enumerate(zip(host.affine_layers, device.affine_layers)):
        report.check(f"affine {i} input X", rel_err(ld.input, lh.input), 1e-4)
        report.check(f"affine {i} derivative G", rel_err(ld.out_deriv, lh.out_deriv), 1e-4)
    report.check("log-probabilities", rel_err(device.log_probs(cp.asarray(X)), host.log_probs(X)), 1e-4)

    print("3. SGD and NG-online steps, CuPy vs NumPy")
    for name, steps in (("sgd", 1), ("ng-online", 3)):
        host, device, N = paired_networks(cp, size)
        updaters = [make_updater(net, OptimizerConfig(optimizer=name)) for net in (host, device)]
        for k in range(steps):
            X = rng.standard_normal((N, host.config.input_dim)).astype(np.float32)
            labels = rng.integers(0, host.config.num_classes, N)
            host.train_gradients(X, labels)
            device.train_gradients(cp.asarray(X), cp.asarray(labels))
            for updater in updaters:
                updater.step(1e-3)
        report.check(f"{name}: parameters after {steps} step(s)", rel_err(device.params, host.params), 1e-4)


def check_syncs(cp, size: str, report: Report) -> None:
    print("5. Host syncs in an NG-online step")
    try:
        import cupyx  # noqa: PLC0415
    except ImportError:
        print("  cupyx not available: skipped")
        return
    _, device, N = paired_networks(cp, size)
    updater = make_updater(device, OptimizerConfig(optimizer="ng-online"))
    rng = np.random.default_rng(2)
    batches = [(cp.asarray(rng.standard_normal((N, device.config.input_dim)).astype(np.float32)),
                cp.asarray(rng.integers(0, device.config.num_classes, N))) for _ in range(4)]
    for k in range(16):                       # past the initial Fisher updates
        device.train_gradients(*batches[k % 4])
        updater.step(1e-3)
    original = backend.to_host
    count = {"to_host": 0}

    def counted(array):
        count["to_host"] += 1
        with cupyx.allow_synchronize(True):
            return original(array)

    backend.to_host = counted
    hidden = None
    try:
        with cupyx.allow_synchronize(False):
            for k in range(4):                # one period: 3 plain steps and 1 updating step
                device.train_gradients(*batches[k])
                updater.step(1e-3)
    except Exception as exc:  # noqa: BLE001 - cupyx's DeviceSynchronized, whatever its module
        hidden = exc
    finally:
        backend.to_host = original
    layers = len(device.affine_layers)
    print(f"  to_host calls per step: {count['to_host'] / 4:.2f} "
          f"(expected {layers + 1}: one per affine layer, one for the objective)")
    if hidden is not None:
        report.failures += 1
        print(f"  [FAIL] hidden synchronisation: {type(hidden).__name__}: {hidden}")
    else:
        print("  [ok] no synchronisation outside backend.to_host")


def time_steps(cp, size: str, steps: int) -> None:
    print(f"6. Timing on the GPU ({size} size)")
    times = {}
    for name in ("sgd", "ng-online"):
        _, device, N = paired_networks(cp, size)
        updater = make_updater(device, OptimizerConfig(optimizer=name))
        rng = np.random.default_rng(3)
        batches = [(cp.asarray(rng.standard_normal((N, device.config.input_dim)).astype(np.float32)),
                    cp.asarray(rng.integers(0, device.config.num_classes, N))) for _ in range(4)]
        for k in range(12):
            device.train_gradients(*batches[k % 4])
            updater.step(1e-3)
        blocks = []
        for _ in range(max(1, steps // 4)):
            cp.cuda.get_current_stream().synchronize()
            t0 = time.perf_counter()
            for k in range(4):
                device.train_gradients(*batches[k])
                updater.step(1e-3)
            cp.cuda.get_current_stream().synchronize()
            blocks.append((time.perf_counter() - t0) / 4)
        times[name] = statistics.median(blocks)
        print(f"  {name:<10} {1e3 * times[name]:8.2f} ms per minibatch of {N}")
    print(f"  ratio ng-online/sgd: {times['ng-online'] / times['sgd']:.3f}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="paper")
    ap.add_argument("--steps", type=int, default=20, help="timed minibatches per optimiser")
    args = ap.parse_args(argv)
    try:
        import cupy as cp  # noqa: PLC0415 - the self-test is about CuPy
    except ImportError:
        print("gpu_selftest: CuPy is not installed (pip install 'ngsgd_mpi[gpu]' with the wheel "
              "matching your CUDA); nothing was tested", file=sys.stderr)
        return 2
    try:
        backend.use_device("gpu")
    except Exception as exc:  # noqa: BLE001 - no driver, no device: CuPy raises various errors
        print(f"gpu_selftest: no usable GPU ({type(exc).__name__}: {exc}); nothing was tested",
              file=sys.stderr)
        return 2
    device = cp.cuda.Device()
    print(f"GPU {device.id}: {cp.cuda.runtime.getDeviceProperties(device.id)['name'].decode()}; "
          f"CuPy {cp.__version__}")
    report = Report()
    check_preconditioner(cp, report)
    check_network_and_steps(cp, args.size, report)
    print(f"4. MPI CUDA-aware: {distributed.mpi_is_cuda_aware()}")
    check_syncs(cp, args.size, report)
    time_steps(cp, args.size, args.steps)
    print("all checks passed" if not report.failures else f"{report.failures} check(s) FAILED")
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
