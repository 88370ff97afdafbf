"""Cost of the coordinated-stop agreement (one 8-byte Allreduce(BOR)) next to a training step.

    mpiexec -n 2 python scripts/bench_signal_check.py [--calls 2000]

Prints the median time of ``Dist.any_flags`` and its share of the median minibatch time of
the paper-size network (360 -> 3 x (3000 p-norm -> 300) -> 2000, minibatch 512, ng-online),
measured on the same ranks, for checks every 1 and every ``signal_check_every`` minibatches.
"""

import argparse
import time

import numpy as np
from threadpoolctl import threadpool_limits

from ngsgd_mpi import distributed
from ngsgd_mpi.network import Network, NetworkConfig
from ngsgd_mpi.optim import OptimizerConfig, make_updater


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--small", action="store_true", help="tiny net (smoke test)")
    args = parser.parse_args()
    threadpool_limits(1)
    dist = distributed.init()
    times = []
    for _ in range(args.calls):
        dist.barrier()
        t0 = time.perf_counter()
        dist.any_flags(0)
        times.append(time.perf_counter() - t0)
    check = float(np.median(times))

    cfg = (NetworkConfig(input_dim=40, num_classes=10, num_hidden_layers=1, pnorm_input_dim=40,
                         pnorm_output_dim=4) if args.small else
           NetworkConfig(input_dim=360, num_classes=2000, num_hidden_layers=3))
    net = Network(cfg, seed=0)
    updater = make_updater(net, OptimizerConfig(optimizer="ng-online"))
    rng = np.random.default_rng(dist.rank)
    x = rng.standard_normal((512, cfg.input_dim)).astype(np.float32)
    y = rng.integers(0, cfg.num_classes, 512)
    steps = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        net.train_gradients(x, y)
        updater.step(1e-4)
        steps.append(time.perf_counter() - t0)
    step = float(np.median(steps))
    if dist.rank == 0:
        print(f"ranks {dist.size}: any_flags median {check * 1e6:.1f} us; minibatch median {step * 1e3:.1f} ms")
        for every in (1, 4):
            print(f"  check every {every} minibatch(es): {100 * check / (every * step):.4f} % of step time")


if __name__ == "__main__":
    main()
