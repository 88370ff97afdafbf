"""ngsgd-train with faults injected, for test_faults.py (never used in production).

    python fault_driver.py FAULT [ngsgd-train args...]

FAULT is one of
    none
    nan:RANK:PERIOD[:TIMES]   objective becomes NaN on RANK in PERIOD (1-based), the first TIMES tries
    kill_in_write:PERIOD      SIGKILL this process half-way through writing checkpoint PERIOD's model
    hang:RANK:PERIOD          RANK sleeps forever before the average closing PERIOD
    nan_data:RANK:LOAD        RANK's LOAD-th window read (1-based) comes back with a NaN in its first
                              frame, as if its partition file had changed after the start-up scan
    spin:RANK:PERIOD:DIR      RANK writes DIR/rank<r>.pid, then DIR/rank<r>.spinning during minibatch 2
                              of PERIOD and multiplies matrices there forever (a rank stuck in BLAS;
                              stop signals are received but never acted on)
    stop_at:RANK:PERIOD:BATCH RANK sends itself SIGUSR1 during minibatch BATCH of PERIOD (1-based)
    wait_at:RANK:PERIOD:DIR   RANK writes DIR/rank<r>.pid, then DIR/rank<r>.waiting during minibatch 2
                              of PERIOD and waits there until a stop signal arrives (or 120 s pass):
                              the test signals or kills it at a known point instead of racing training

stop_at and wait_at make the fault tests deterministic: where the stop lands never depends on
how fast the machine is.
"""

import os
import signal
import sys
import time

import numpy as np

from ngsgd_mpi import cli, data, storage, trainer


def main():
    fault, args = sys.argv[1].split(":"), sys.argv[2:]
    rank = int(os.environ.get("PMI_RANK", os.environ.get("OMPI_COMM_WORLD_RANK", "0")))
    kind = fault[0]
    if kind in ("stop_at", "wait_at"):
        target_rank, period = int(fault[1]), int(fault[2])
        batch = int(fault[3]) if kind == "stop_at" else 2
        if kind == "wait_at" and rank == target_rank:
            with open(os.path.join(fault[3], f"rank{rank}.pid"), "w") as f:
                f.write(str(os.getpid()))
        stops = []
        original_init = trainer.StopRequest.__init__

        def init(self):
            original_init(self)
            stops.append(self)
        trainer.StopRequest.__init__ = init
        original_step = trainer.train_step

        def train_step(network, updater, batch_, lr, prog):
            if rank == target_rank and prog.period + 1 == period and prog.batch + 1 == batch:
                if kind == "stop_at":
                    os.kill(os.getpid(), signal.SIGUSR1)
                else:
                    open(os.path.join(fault[3], f"rank{rank}.waiting"), "w").close()
                    deadline = time.monotonic() + 120
                    while not stops[0].requested and time.monotonic() < deadline:
                        time.sleep(0.01)
            return original_step(network, updater, batch_, lr, prog)
        trainer.train_step = train_step
    elif kind == "nan":
        bad_rank, bad_period = int(fault[1]), int(fault[2])
        times = [int(fault[3]) if len(fault) > 3 else 1]
        original = trainer.train_step

        def train_step(network, updater, batch, lr, prog):
            flags = original(network, updater, batch, lr, prog)
            if rank == bad_rank and prog.period + 1 == bad_period and prog.batch == 2 and times[0] > 0:
                times[0] -= 1
                return trainer.DIVERGED
            return flags
        trainer.train_step = train_step
    elif kind == "kill_in_write":
        period = int(fault[1])
        original = storage.write

        def write(path, fmt, record, meta=None):
            if path.endswith("model.h5") and f"ckpt-{period:06d}" in path:
                with open(f"{path}.tmp{os.getpid()}", "wb") as f:
                    f.write(b"\x89HDF\r\n\x1a\n partial")        # a torn write
                os.kill(os.getpid(), signal.SIGKILL)
            original(path, fmt, record, meta)
        storage.write = write
    elif kind == "hang":
        hang_rank, period = int(fault[1]), int(fault[2])
        original = trainer.finish_period

        def finish_period(cfg, dist, model, network, updater, prog, *rest):
            if dist.rank == hang_rank and prog.period + 1 == period:
                time.sleep(3600)
            return original(cfg, dist, model, network, updater, prog, *rest)
        trainer.finish_period = finish_period
    elif kind == "nan_data":
        bad_rank, load = int(fault[1]), int(fault[2])
        loads, original_init = [0], data.MinibatchStream.__init__

        class Poisoned:
            """An h5py file whose 'feats' reads are counted and the LOAD-th one poisoned."""

            def __init__(self, file):
                self.file = file

            def __getitem__(self, name):
                return PoisonedFeats(self.file[name]) if name == "feats" else self.file[name]

            def close(self):
                self.file.close()

        class PoisonedFeats:
            def __init__(self, dset):
                self.dset = dset

            def __getitem__(self, key):
                rows = self.dset[key]
                loads[0] += 1
                if loads[0] == load:
                    rows[0, 0] = np.nan
                return rows

        def init(self, *args, **kwargs):
            original_init(self, *args, **kwargs)
            if rank == bad_rank:
                self._files = [Poisoned(f) for f in self._files]
        data.MinibatchStream.__init__ = init
    elif kind == "spin":
        spin_rank, period, where = int(fault[1]), int(fault[2]), fault[3]
        original = trainer.train_step
        if rank == spin_rank:
            with open(os.path.join(where, f"rank{rank}.pid"), "w") as f:
                f.write(str(os.getpid()))

        def train_step(network, updater, batch_, lr, prog):
            if rank == spin_rank and prog.period + 1 == period and prog.batch + 1 == 2:
                open(os.path.join(where, f"rank{rank}.spinning"), "w").close()
                a = np.ones((400, 400), np.float32)
                while True:
                    a = (a @ a) * np.float32(1e-3)      # BLAS, GIL released, never returns
            return original(network, updater, batch_, lr, prog)
        trainer.train_step = train_step
    sys.exit(cli.train_main(args))


if __name__ == "__main__":
    main()
