"""Cost of the hang watchdog (distributed.Watchdog) per minibatch.

    mpiexec -n 2 python scripts/bench_watchdog.py [--calls 4000] [--steps 12] [--small]

The watchdog costs the training loop three things; each is measured with it off and on, in
alternating blocks on the same ranks (so machine load drifts into both columns alike):

1. the bracket around every collective: median time of ``Dist.any_flags`` (the 8-byte flag
   Allreduce made every ``signal_check_every`` minibatches) and of ``Dist.average_`` of a
   paper-size parameter buffer (once per period);
2. the thread itself: CPU seconds it burns per wall second (it wakes every TICK to read the
   signal pipe and answer queries), measured while the main thread sleeps;
3. the minibatch: median ng-online step of the paper-size network (360 -> 3 x (3000 p-norm
   -> 300) -> 2000, minibatch 512) with the thread running and not.

Prints one table (rank 0) and the BLAS kernel threadpoolctl reports.
"""

import argparse
import os
import resource
import time

import numpy as np
from threadpoolctl import threadpool_info, threadpool_limits

from ngsgd_mpi import distributed
from ngsgd_mpi.network import Network, NetworkConfig
from ngsgd_mpi.optim import OptimizerConfig, make_updater


def median_time(fn, calls: int, dist) -> float:
    times = []
    for _ in range(calls):
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def alternating(measure, dist, blocks: int = 4) -> tuple[float, float]:
    """(median off, median on) of ``measure()`` over ``blocks`` alternating off/on blocks."""
    off, on = [], []
    for _ in range(blocks):
        dist.stop_watchdog()
        off.append(measure())
        dist.start_watchdog(timeout=600.0)
        on.append(measure())
    dist.stop_watchdog()
    return float(np.median(off)), float(np.median(on))


def thread_cpu_per_second(dist, seconds: float) -> float:
    """CPU seconds per wall second the process uses while the main thread sleeps."""
    def cpu():
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime
    dist.barrier()
    c0, t0 = cpu(), time.perf_counter()
    time.sleep(seconds)
    return (cpu() - c0) / (time.perf_counter() - t0)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=4000, help="flag Allreduces per block")
    parser.add_argument("--steps", type=int, default=12, help="minibatches per block")
    parser.add_argument("--idle", type=float, default=5.0, help="seconds of idle CPU measurement")
    parser.add_argument("--small", action="store_true", help="tiny network (smoke test)")
    args = parser.parse_args()
    threadpool_limits(1)
    dist = distributed.init()

    flag_off, flag_on = alternating(lambda: median_time(lambda: dist.any_flags(0), args.calls // 4, dist), dist)
    cfg = (NetworkConfig(input_dim=40, num_classes=10, num_hidden_layers=1, pnorm_input_dim=40,
                         pnorm_output_dim=4) if args.small else
           NetworkConfig(input_dim=360, num_classes=2000, num_hidden_layers=3))
    net = Network(cfg, seed=0)
    params = np.array(net.params, copy=True)
    avg_off, avg_on = alternating(lambda: median_time(lambda: dist.average_(params), 5, dist), dist)

    idle_off, idle_on = alternating(lambda: thread_cpu_per_second(dist, args.idle / 4), dist, blocks=2)

    updater = make_updater(net, OptimizerConfig(optimizer="ng-online"))
    rng = np.random.default_rng(dist.rank)
    x = rng.standard_normal((512, cfg.input_dim)).astype(np.float32)
    y = rng.integers(0, cfg.num_classes, 512)

    def steps():
        times = []
        for _ in range(args.steps // 4 or 1):
            t0 = time.perf_counter()
            net.train_gradients(x, y)
            updater.step(1e-4)
            times.append(time.perf_counter() - t0)
        return float(np.median(times))
    step_off, step_on = alternating(steps, dist)

    if dist.rank == 0:
        blas = [(d.get("internal_api"), d.get("version"), d.get("architecture")) for d in threadpool_info()]
        env = {k: os.environ.get(k) for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")}
        print(f"ranks {dist.size}; BLAS {blas}; {env}; load average {os.getloadavg()[0]:.2f}")
        print(f"{'':38s} {'watchdog off':>14s} {'watchdog on':>14s} {'difference':>12s}")
        rows = [("flag Allreduce (any_flags), us", flag_off * 1e6, flag_on * 1e6),
                (f"average_ of {params.size:,} floats, ms", avg_off * 1e3, avg_on * 1e3),
                ("idle CPU, ms per s", idle_off * 1e3, idle_on * 1e3),
                ("ng-online minibatch, ms", step_off * 1e3, step_on * 1e3)]
        for name, off, on in rows:
            print(f"{name:38s} {off:14.3f} {on:14.3f} {on - off:+12.3f}")
        per_batch = (flag_on - flag_off) / 4 + (idle_on - idle_off) * step_off
        print(f"per minibatch (flag check every 4, thread CPU over one step): {per_batch * 1e6:+.2f} us "
              f"= {100 * per_batch / step_off:+.4f} % of the step; measured step difference "
              f"{100 * (step_on - step_off) / step_off:+.2f} %")


if __name__ == "__main__":
    main()
