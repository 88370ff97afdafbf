"""What a failure becomes: exit codes, the bad-input error type, the stop-signal flag.

Every user-facing command reports bad input the same way (docs/reliability.md): one line
``<prog>: error: <what, naming the file or option>`` on stderr and exit code 2, with nothing
half-written.  Modules raise a subclass of :class:`InputError` (DataError, ConfigError,
CheckpointError, PrepareError, ...); :func:`exit_code_for_bad_input` turns it into that line.
"""

from __future__ import annotations

import signal
import sys

EXIT_OK = 0
EXIT_CRASH = 1          # an exception on some rank; the job was aborted (MPI_Abort)
EXIT_BAD_INPUT = 2      # bad input or config, found before anything was written
EXIT_DIVERGED = 4       # training kept diverging
EXIT_STOPPED = 75       # stopped on SIGUSR1/SIGTERM after a coordinated checkpoint (EX_TEMPFAIL)


class InputError(ValueError):
    """Bad input: the message names the file or option and what was expected."""


class DivergedError(RuntimeError):
    """Training kept diverging after the allowed number of retries."""


def report_bad_input(prog: str, exc: InputError, speak: bool = True) -> int:
    """Write ``prog: error: ...`` (one line per distinct problem) and return EXIT_BAD_INPUT."""
    if speak:
        sys.stderr.write("".join(f"{prog}: error: {line}\n" for line in str(exc).splitlines() if line))
    return EXIT_BAD_INPUT


class StopRequest:
    """Remembers that SIGUSR1/SIGTERM arrived; the training loop acts on it at its next check.

    Installed before MPI starts, so a preemption signal during start-up is not lost."""

    SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

    def __init__(self):
        self.requested = False
        self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}

    def _handle(self, signum, frame):
        self.requested = True

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
