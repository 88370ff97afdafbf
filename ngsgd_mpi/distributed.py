"""The thin MPI layer: everything ngsgd_mpi does across ranks goes through here.

* :func:`init` returns a :class:`Dist` for COMM_WORLD (works without
  ``mpiexec`` too: MPI singleton start gives one rank).
* :meth:`Dist.average_` averages a flat parameter buffer in place with one
  ``Allreduce(SUM)`` and a division.  GPU buffers go to MPI directly only when
  the MPI library is CUDA-aware; otherwise they are staged through a
  persistent host buffer.  The CUDA stream is synchronised first because MPI
  reads device memory outside the stream.
* :meth:`Dist.agree` runs a step that may fail on bad input on every rank and makes every
  rank fail together, with every rank's message (no rank is left waiting in a collective).
* :meth:`Dist.any_flags` ORs a small flag word over ranks (stop / divergence agreement).
* :class:`Watchdog` bounds the wait in **every** collective above (see below).
* :func:`abort_on_exception` makes an uncaught exception on any rank print the
  rank and traceback and call ``MPI_Abort``, so the other ranks do not hang in
  a collective.

The hang watchdog
-----------------
Every collective of :class:`Dist` is bracketed by ``Watchdog.enter(what)`` / ``leave()``:
two assignments of a ``(count, what, since)`` tuple, nothing sent.  A thread per rank
(``ngsgd-watchdog``) wakes every ``TICK`` seconds and

1. reads stop signals from ``StopRequest.wakeup_fd`` (the main thread may be stuck in C
   code, where Python signal handlers never run);
2. answers other ranks' "where are you?" queries on its own duplicate communicator:
   (collectives entered, inside one or not, milliseconds since);
3. checks the deadline: inside a collective, ``collective_timeout`` after entering it; after
   a stop signal also ``stop_timeout`` after the signal or the last change, inside a
   collective or not (a rank stuck in BLAS or I/O cannot reach the coordinated checkpoint).

Past the deadline it asks every other rank where it is, waits ``REPLY_WAIT`` seconds for
the answers, prints which ranks did not arrive and why (no answer: stopped, dead or cut off;
busy outside MPI; in another collective), and calls ``MPI_Abort`` with ``EXIT_RANK_LOST``
from the thread (MPI is initialised with ``MPI_THREAD_MULTIPLE``, mpi4py's default).  The
main thread pays nothing on the way through a collective but the two tuple assignments;
blocking collectives stay blocking (no polling loop on the data path).
"""

from __future__ import annotations

import os
import select
import shutil
import sys
import threading
import time
import traceback
from contextlib import contextmanager

import numpy as np

from . import backend
from .faults import EXIT_BAD_INPUT, EXIT_CRASH, EXIT_RANK_LOST, AgreedInputError, InputError, StopRequest

TAG_QUERY, TAG_REPLY = 0x5EED, 0x5EEE

SPIN_SECONDS = 2e-4             # any_flags: test a pending collective this long without sleeping,
POLL_SECONDS = 1e-3             # then sleep this long between tests


def _mpi():
    # MPICH's default multi-node Allreduce sums within each node first, so where the ranks run
    # would change the last bits of the average; the flat algorithm gives the same result for
    # any placement (tests/test_multihost.py).  A value set by the user wins.
    os.environ.setdefault("MPIR_CVAR_ALLREDUCE_COMPOSITION", "2")
    from mpi4py import MPI  # noqa: PLC0415 - imported lazily so math code never pulls in MPI
    return MPI


def mpi_is_cuda_aware() -> bool:
    """Whether device pointers may be handed to MPI.

    ``NGSGD_CUDA_AWARE_MPI=0|1`` overrides; otherwise ask the library
    (MPIX_Query_cuda_support via mpi4py, where available).  Unknown means no:
    staging through the host is always correct, only slower."""
    forced = os.environ.get("NGSGD_CUDA_AWARE_MPI")
    if forced is not None:
        return forced.strip() not in ("0", "", "false", "no")
    query = getattr(_mpi(), "Query_cuda_support", None)
    try:
        return bool(query()) if query is not None else False
    except Exception:  # noqa: BLE001 - a library without the extension
        return False


class Dist:
    """Rank, size and the few collectives the trainer needs, each one watched once
    :meth:`start_watchdog` has run.  ``what`` names a collective in a timeout message."""

    def __init__(self, comm=None, cuda_aware: bool | None = None):
        MPI = _mpi()
        self.MPI = MPI
        self.comm = comm if comm is not None else MPI.COMM_WORLD
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        self.cuda_aware = mpi_is_cuda_aware() if cuda_aware is None else cuda_aware
        self._host_staging: np.ndarray | None = None
        self.watchdog: Watchdog | None = None

    # ------------------------------------------------------------------ the watchdog

    def start_watchdog(self, timeout: float, stop_timeout: float = 0.0,
                       stop: StopRequest | None = None) -> None:
        """Watch every later collective (``timeout`` 0 or one rank: no watchdog).  A collective
        call; all ranks make it right after start-up."""
        if self.size == 1 or timeout <= 0 or self.watchdog is not None:
            return
        if self.MPI.Query_thread() != self.MPI.THREAD_MULTIPLE:       # a site MPI built without it
            if self.rank == 0:
                sys.stderr.write("warning: MPI was initialised without MPI_THREAD_MULTIPLE; collectives "
                                 "are not watched (a hung rank is not detected)\n")
            return
        self.watchdog = Watchdog(self, timeout, stop_timeout, getattr(stop, "wakeup_fd", None))

    def stop_watchdog(self) -> None:
        if self.watchdog is not None:
            self.watchdog.close()
            self.watchdog = None

    def _collective(self, what: str, call, *args):
        watchdog = self.watchdog
        if watchdog is None:
            return call(*args)
        watchdog.enter(what)
        try:
            return call(*args)
        finally:
            watchdog.leave()

    # ------------------------------------------------------------------ collectives

    def local_size(self) -> int:
        """Number of ranks on this node (for sharing its cores)."""
        node = self._collective("the node-size query at start-up", self.comm.Split_type,
                                self.MPI.COMM_TYPE_SHARED)
        try:
            return node.Get_size()
        finally:
            node.Free()

    def average_(self, buf, weight: float = 1.0, total_weight: float | None = None,
                 what: str = "the average") -> None:
        """buf <- sum over ranks of weight * buf / total_weight, in place, with one Allreduce.

        Default: the plain mean.  A rank left out of an average passes weight 0
        (``total_weight`` is then the number of ranks kept, known to all)."""
        if self.size == 1 and weight == 1.0:
            return
        total_weight = float(self.size if total_weight is None else total_weight)

        def reduce(target):
            if weight != 1.0:
                target *= target.dtype.type(weight)
            self._collective(what, self.comm.Allreduce, self.MPI.IN_PLACE, target, self.MPI.SUM)
            target *= target.dtype.type(1.0 / total_weight)

        self._on_host_if_needed(buf, reduce)

    def broadcast_(self, buf, root: int, what: str = "the broadcast of the best rank") -> None:
        """buf <- root's buf, in place (Kaldi's 'pick the best job' instead of averaging)."""
        if self.size > 1:
            self._on_host_if_needed(buf, lambda target: self._collective(what, self.comm.Bcast, target, root))

    def _on_host_if_needed(self, buf, operation) -> None:
        """Run an in-place MPI ``operation`` on ``buf``, staging device memory
        through a reused host buffer unless MPI is CUDA-aware."""
        if backend.is_device_array(buf):
            backend.synchronize()              # MPI reads device memory outside the CUDA stream
            if not self.cuda_aware:
                host = self._staging_for(buf)
                host[...] = backend.to_host(buf)
                operation(host)
                buf[...] = backend.to_device(host)
                return
        operation(buf)

    def agree(self, step, what: str = "the check of the input at start-up"):
        """``step()`` on every rank.  If it raises InputError on any rank, every rank raises
        AgreedInputError holding each distinct message (one per line) and the kinds of error
        raised; else its result.  ``step`` may make a collective call only where no rank can
        have failed before it."""
        try:
            result, failure = step(), None
        except InputError as exc:
            kinds = [c.__name__ for c in type(exc).__mro__ if issubclass(c, InputError)]
            result, failure = None, (str(exc), kinds)
        failures = self.gather_objects(failure, what)
        failed = [f for f in failures if f]
        if failed:
            raise AgreedInputError("\n".join(dict.fromkeys(m for m, _ in failed)),
                                   {k for _, kinds in failed for k in kinds})
        return result

    def any_flags(self, flag: int, what: str = "the stop/divergence agreement") -> int:
        """Bitwise OR of a small integer over ranks (stop / divergence agreement).

        A non-blocking Allreduce, waited for by spinning briefly and then sleeping between
        tests: a rank that waits long (an idle rank of the job ramp, everyone while rank 0
        validates) leaves the CPU to the ranks that work, which matters when ranks share cores."""
        if self.size == 1:
            return int(flag)
        value = np.array([flag], np.int64)
        self._collective(what, self._wait_politely, self.comm.Iallreduce(self.MPI.IN_PLACE, value,
                                                                          op=self.MPI.BOR))
        return int(value[0])

    @staticmethod
    def _wait_politely(request) -> None:
        spin_until = time.perf_counter() + SPIN_SECONDS
        while not request.Test():
            if time.perf_counter() > spin_until:
                time.sleep(POLL_SECONDS)

    def _staging_for(self, buf) -> np.ndarray:
        if (self._host_staging is None or self._host_staging.shape != buf.shape
                or self._host_staging.dtype != buf.dtype):
            self._host_staging = np.empty(buf.shape, dtype=buf.dtype)
        return self._host_staging

    def sum(self, values, what: str = "a sum over ranks") -> np.ndarray:
        """Element-wise float64 sum over ranks of a small host vector (all ranks get it)."""
        arr = np.ascontiguousarray(values, dtype=np.float64)
        if self.size > 1:
            self._collective(what, self.comm.Allreduce, self.MPI.IN_PLACE, arr, self.MPI.SUM)
        return arr

    def sum_named(self, named: dict, what: str = "a sum over ranks") -> dict:
        """Element-wise float64 sums over ranks of several small host arrays, in one Allreduce."""
        arrays = {k: np.asarray(v, np.float64) for k, v in named.items()}
        flat = self.sum(np.concatenate([a.ravel() for a in arrays.values()]), what)
        out, offset = {}, 0
        for key, a in arrays.items():
            out[key] = flat[offset:offset + a.size].reshape(a.shape)
            offset += a.size
        return out

    def gather(self, values, what: str = "a gather over ranks") -> np.ndarray:
        """Rows of a small float64 vector from every rank, (size, len) on all ranks."""
        arr = np.ascontiguousarray(values, dtype=np.float64).ravel()
        out = np.empty((self.size, arr.size), np.float64)
        if self.size > 1:
            self._collective(what, self.comm.Allgather, arr, out)
        else:
            out[0] = arr
        return out

    def gather_objects(self, value, what: str = "a gather over ranks") -> list:
        """Every rank's small JSON-like ``value`` (lists, strings, numbers), in rank order."""
        return self._collective(what, self.comm.allgather, value) if self.size > 1 else [value]

    def barrier(self, what: str = "a barrier") -> None:
        if self.size > 1:
            self._collective(what, self.comm.Barrier)

    def abort(self, code: int = EXIT_CRASH) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        # MPI_Abort makes the launcher kill every rank at once; give it a moment to forward
        # what this rank just printed (seen lost under load with MPICH's hydra)
        time.sleep(0.5)
        self.comm.Abort(code)
        os._exit(code)                     # not reached with a real MPI


class Watchdog:
    """The per-rank hang watchdog thread (module docstring: how it works, what it costs)."""

    TICK = 0.1           # seconds between the thread's checks (detection latency; CPU per second)
    REPLY_WAIT = 3.0     # seconds to wait for the other ranks' answers before aborting

    def __init__(self, dist: Dist, timeout: float, stop_timeout: float, wakeup_fd: int | None):
        self.dist, self.timeout, self.stop_timeout, self.wakeup_fd = dist, timeout, stop_timeout, wakeup_fd
        self.comm = dist.comm.Dup()          # its own messages never match the trainer's
        self.state = (0, None, time.monotonic())   # (collectives entered, what or None, since)
        self.last = "start-up"                     # the collective before the current stretch
        self.stop_since: float | None = None
        self._query = np.zeros(1, np.int64)
        self._inbox = None
        self._sends: list = []                     # (request, buffer) of answers in flight
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="ngsgd-watchdog", daemon=True)
        self._thread.start()

    # called by the main thread around every collective
    def enter(self, what: str) -> None:
        self.state = (self.state[0] + 1, what, time.monotonic())

    def leave(self) -> None:
        count, self.last, _ = self.state
        self.state = (count, None, time.monotonic())

    def close(self) -> None:
        self._closing = True
        self._thread.join(timeout=5)

    # the thread
    def _run(self) -> None:
        MPI = self.dist.MPI
        try:
            self._inbox = self.comm.Irecv(self._query, source=MPI.ANY_SOURCE, tag=TAG_QUERY)
            while not self._closing:
                self._wait_tick()
                self._answer_queries()
                overdue = self._overdue(time.monotonic())
                if overdue:
                    self._fire(*overdue)
        except Exception as exc:  # noqa: BLE001 - a broken watchdog must not take training down
            sys.stderr.write(f"[rank {self.dist.rank}/{self.dist.size}] warning: the hang watchdog "
                             f"stopped ({type(exc).__name__}: {exc}); collectives are no longer watched\n")
        finally:
            if self._inbox is not None:
                try:
                    self._inbox.Cancel()
                    self._inbox.Wait()
                except Exception:  # noqa: BLE001, S110 - best effort at exit
                    pass

    def _wait_tick(self) -> None:
        if self.wakeup_fd is None:
            time.sleep(self.TICK)
            return
        ready, _, _ = select.select([self.wakeup_fd], [], [], self.TICK)
        if not ready:
            return
        try:
            received = os.read(self.wakeup_fd, 512)
        except (BlockingIOError, OSError):
            return
        if self.stop_since is None and any(sig in received for sig in StopRequest.SIGNALS):
            self.stop_since = time.monotonic()

    def _answer_queries(self) -> None:
        """Tell every rank that asked where this rank is."""
        MPI = self.dist.MPI
        status = MPI.Status()
        while self._inbox.Test(status):
            count, what, since = self.state
            answer = np.array([count, what is not None, int(1000 * (time.monotonic() - since))], np.int64)
            self._sends.append((self.comm.Isend(answer, dest=status.Get_source(), tag=TAG_REPLY), answer))
            self._inbox = self.comm.Irecv(self._query, source=MPI.ANY_SOURCE, tag=TAG_QUERY)
        self._sends = [(req, buf) for req, buf in self._sends if not req.Test()]

    def _overdue(self, now: float):
        """(count, what, limit) once the current wait or stretch is past its deadline, else None."""
        count, what, since = self.state
        deadlines = []
        if what is not None:
            deadlines.append((since + self.timeout, f"within collective_timeout {self.timeout:g} s"))
        if self.stop_since is not None and self.stop_timeout > 0:
            deadlines.append((max(since, self.stop_since) + self.stop_timeout,
                              f"within stop_timeout {self.stop_timeout:g} s of the stop signal"))
        if deadlines and now > min(deadlines)[0]:
            return count, what, min(deadlines)[1]
        return None

    def _fire(self, count: int, what: str | None, limit: str) -> None:
        rank, size = self.dist.rank, self.dist.size
        if what is None:
            message = (f"rank {rank} received a stop signal but has been busy outside MPI since "
                       f"{self.last}, so it cannot reach the coordinated checkpoint {limit} "
                       f"(stuck in computation or I/O?)")
        else:
            answers = self._ask_everyone(count)
            if self.state[0] != count or self.state[1] is None:
                return                            # the last rank arrived while we asked
            missing = {r: _describe(a, count) for r, a in answers.items()
                       if a is None or not (a[1] and a[0] == count)}
            if missing:
                message = (f"rank(s) {sorted(missing)} did not arrive at {what} {limit} ("
                           + "; ".join(f"rank {r}: {d}" for r, d in sorted(missing.items())) + ")")
            else:
                message = (f"every rank is waiting in {what} but it did not complete {limit} "
                           f"(a network fault between ranks?)")
        sys.stderr.write(f"[rank {rank}/{size}] collective timeout: {message}; aborting the job "
                         f"(exit {EXIT_RANK_LOST})\n")
        self.dist.abort(EXIT_RANK_LOST)

    def _ask_everyone(self, count: int) -> dict:
        """{rank: (count, inside, ms) or None if it did not answer within REPLY_WAIT}."""
        others = [r for r in range(self.dist.size) if r != self.dist.rank]
        replies = {r: np.full(3, -1, np.int64) for r in others}
        query = np.array([count], np.int64)
        pending, sends = {}, []
        for r in others:
            try:
                pending[r] = self.comm.Irecv(replies[r], source=r, tag=TAG_REPLY)
                sends.append(self.comm.Isend(query, dest=r, tag=TAG_QUERY))
            except Exception:  # noqa: BLE001, S112 - an unreachable rank simply does not answer
                continue
        deadline = time.monotonic() + self.REPLY_WAIT
        while pending and time.monotonic() < deadline:
            self._answer_queries()            # the others may be asking this rank at the same time
            pending = {r: req for r, req in pending.items() if not req.Test()}
            time.sleep(0.01)
        return {r: None if r in pending or replies[r][0] < 0 else tuple(int(v) for v in replies[r])
                for r in others}


def _describe(answer, count: int) -> str:
    if answer is None:
        return "no answer (stopped, dead, cut off, or stuck holding the Python interpreter)"
    their_count, inside, ms = answer
    if not inside:
        return f"busy outside MPI for {ms / 1000:.1f} s (computing, reading data, or stuck there)"
    return (f"waiting in collective #{their_count} while this rank is in #{count} "
            f"(the ranks called different collectives: a bug)")


def init() -> Dist:
    return Dist()


def mpiexec() -> str:
    """The mpiexec beside this Python (the PyPI mpich in a venv), else the one on PATH."""
    local = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    found = local if os.path.exists(local) else shutil.which("mpiexec")
    if found is None:
        raise FileNotFoundError("no mpiexec found: pip install mpich (or load your site's MPI)")
    return found


@contextmanager
def abort_on_exception(dist: Dist, prog: str = "ngsgd-train"):
    """Turn an exception on any rank into a prompt whole-job abort.

    With one rank the exception propagates normally (a clean traceback and
    exit code 1 from Python); with several, the others would wait forever in
    the next collective, so this rank prints the error and aborts them all.
    Bad input found by one rank alone (a data file that turned bad mid-run) is one
    ``prog: error:`` line and exit 2, not a traceback.
    """
    try:
        yield
    except SystemExit:
        raise
    except InputError as exc:
        if dist.size == 1 or isinstance(exc, AgreedInputError):
            raise
        lines = "; ".join(line for line in str(exc).splitlines() if line)
        sys.stderr.write(f"{prog}: error: {lines} (found by rank {dist.rank}/{dist.size} alone; "
                         f"aborting the job)\n")
        dist.abort(EXIT_BAD_INPUT)
    except BaseException as exc:  # noqa: BLE001
        if dist.size == 1:
            raise
        msg = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        sys.stderr.write(f"[rank {dist.rank}/{dist.size}] fatal error, aborting the job:\n{msg}")
        dist.abort(EXIT_CRASH)
