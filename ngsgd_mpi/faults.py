"""What a failure becomes: exit codes, the bad-input error types, the stop-signal flag.

Every user-facing command reports bad input the same way (docs/reliability.md): one line
``<prog>: error: <what, naming the file or option>`` on stderr and exit code 2, with nothing
half-written.  Modules raise a subclass of :class:`InputError` (DataError, ConfigError,
CheckpointError, PrepareError, ...); :func:`report_bad_input` turns it into that line.
"""

from __future__ import annotations

import os
import signal
import sys

EXIT_OK = 0
EXIT_CRASH = 1          # an exception on some rank; the job was aborted (MPI_Abort)
EXIT_BAD_INPUT = 2      # bad input or config (before training: nothing written)
EXIT_RANK_LOST = 3      # a rank did not arrive at a collective in time (hung, stopped, dead, cut off)
EXIT_DIVERGED = 4       # training kept diverging (or diverged with divergence_action: abort)
EXIT_STOPPED = 75       # stopped on SIGUSR1/SIGTERM after a coordinated checkpoint (EX_TEMPFAIL)


class InputError(ValueError):
    """Bad input: the message names the file or option and what was expected."""


class AgreedInputError(InputError):
    """Bad input that every rank raised together (``Dist.agree``): each rank may simply exit 2.
    Any other InputError surfacing on one rank mid-run has to abort the job instead."""

    def __init__(self, message: str, kinds=()):
        super().__init__(message)
        self.kinds = frozenset(kinds)      # class names of the errors the ranks raised, with bases

    def raised(self, cls) -> bool:
        """Whether some rank raised ``cls`` (or a subclass of it)."""
        return cls.__name__ in self.kinds


class DivergedError(RuntimeError):
    """Training diverged beyond what ``max_divergence_retries`` / ``divergence_action`` allow."""


def report_bad_input(prog: str, exc: InputError, speak: bool = True) -> int:
    """Write ``prog: error: ...`` (one line per distinct problem) and return EXIT_BAD_INPUT."""
    if speak:
        sys.stderr.write("".join(f"{prog}: error: {line}\n" for line in str(exc).splitlines() if line))
        sys.stderr.flush()
    return EXIT_BAD_INPUT


class StopRequest:
    """Remembers that SIGUSR1/SIGTERM arrived; the training loop acts on it at its next check.

    Installed before MPI starts, so a preemption signal during start-up is not lost.  Python
    runs signal handlers only between bytecodes of the main thread, so a rank stuck in a C
    call (a collective waiting for a stopped peer, BLAS) would never see the signal: the C
    handler also writes the signal number to :attr:`wakeup_fd`, which the hang watchdog
    (``distributed.Watchdog``) reads from its own thread."""

    SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

    def __init__(self):
        self.requested = False
        self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        self.wakeup_fd, self._wakeup_write = os.pipe()
        for fd in (self.wakeup_fd, self._wakeup_write):
            os.set_blocking(fd, False)
        self._previous_wakeup = signal.set_wakeup_fd(self._wakeup_write, warn_on_full_buffer=False)

    def _handle(self, signum, frame):
        self.requested = True

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        if self._wakeup_write is not None:
            signal.set_wakeup_fd(self._previous_wakeup)
            os.close(self._wakeup_write)
            self._wakeup_write = None       # the read end stays open: a watchdog may still poll it
