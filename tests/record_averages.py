"""Run under mpiexec by test_trainer.py: trains like ngsgd-train but records every
rank's parameters right before and right after each average in OUT/rank<r>.npz
(broadcasts, used instead of the first average by first_period_pick_best, too)."""

import sys

import numpy as np

from ngsgd_mpi import backend, config, distributed, trainer


class RecordingDist(distributed.Dist):
    def __init__(self):
        super().__init__()
        self.before, self.after = [], []

    def average_(self, buf, **kwargs):
        self.before.append(backend.to_host(buf).copy())
        super().average_(buf, **kwargs)
        self.after.append(backend.to_host(buf).copy())

    def broadcast_(self, buf, root):
        self.before.append(backend.to_host(buf).copy())
        super().broadcast_(buf, root)
        self.after.append(backend.to_host(buf).copy())


def main(argv):
    out, args = argv[0], argv[1:]
    dist = RecordingDist()
    with distributed.abort_on_exception(dist):
        trainer.train(config.parse(args), dist)
        np.savez(f"{out}/rank{dist.rank}.npz", before=np.array(dist.before), after=np.array(dist.after))


if __name__ == "__main__":
    main(sys.argv[1:])
