"""``ngsgd-train``: parse, then train.  No training logic lives here."""

from __future__ import annotations

import contextlib
import os
import sys


def train_main(argv=None) -> int:
    from . import config, distributed, trainer  # noqa: PLC0415
    from .faults import InputError, StopRequest, report_bad_input  # noqa: PLC0415

    stop = StopRequest()                  # before MPI starts: a preemption signal is never lost
    dist = distributed.init()
    # every rank parses the same arguments; only rank 0 speaks about a bad one
    quiet = contextlib.nullcontext() if dist.rank == 0 else contextlib.redirect_stderr(open(os.devnull, "w"))
    try:
        with quiet:
            cfg = config.parse(argv)
    except InputError as exc:             # every rank sees the same error; one prints it
        return report_bad_input("ngsgd-train", exc, speak=dist.rank == 0)
    with distributed.abort_on_exception(dist):
        return trainer.main_guarded(cfg, dist, stop)


if __name__ == "__main__":
    sys.exit(train_main())
