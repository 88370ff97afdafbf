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
* :meth:`Dist.checkin` is the hang watchdog: before an average every rank
  reports to rank 0 with non-blocking messages; whoever waits longer than
  the timeout aborts the job naming the ranks that did not arrive.
* :func:`abort_on_exception` makes an uncaught exception on any rank print the
  rank and traceback and call ``MPI_Abort``, so the other ranks do not hang in
  a collective.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
import traceback
from contextlib import contextmanager

import numpy as np

from . import backend
from .faults import InputError

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
    """Rank, size and the few collectives the trainer needs."""

    def __init__(self, comm=None, cuda_aware: bool | None = None):
        MPI = _mpi()
        self.MPI = MPI
        self.comm = comm if comm is not None else MPI.COMM_WORLD
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        self.cuda_aware = mpi_is_cuda_aware() if cuda_aware is None else cuda_aware
        self._host_staging: np.ndarray | None = None

    def local_size(self) -> int:
        """Number of ranks on this node (for sharing its cores)."""
        node = self.comm.Split_type(self.MPI.COMM_TYPE_SHARED)
        try:
            return node.Get_size()
        finally:
            node.Free()

    def average_(self, buf, weight: float = 1.0, total_weight: float | None = None) -> None:
        """buf <- sum over ranks of weight * buf / total_weight, in place, with one Allreduce.

        Default: the plain mean.  A rank left out of an average passes weight 0
        (``total_weight`` is then the number of ranks kept, known to all)."""
        if self.size == 1 and weight == 1.0:
            return
        total_weight = float(self.size if total_weight is None else total_weight)

        def reduce(target):
            if weight != 1.0:
                target *= target.dtype.type(weight)
            self.comm.Allreduce(self.MPI.IN_PLACE, target, op=self.MPI.SUM)
            target *= target.dtype.type(1.0 / total_weight)

        self._on_host_if_needed(buf, reduce)

    def broadcast_(self, buf, root: int) -> None:
        """buf <- root's buf, in place (Kaldi's 'pick the best job' instead of averaging)."""
        if self.size > 1:
            self._on_host_if_needed(buf, lambda target: self.comm.Bcast(target, root=root))

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

    def agree(self, step):
        """``step()`` on every rank.  If it raises InputError on any rank, every rank raises
        InputError holding each distinct message (one per line); else its result.  ``step``
        may make a collective call only where no rank can have failed before it."""
        try:
            result, message = step(), None
        except InputError as exc:
            result, message = None, str(exc)
        messages = self.comm.allgather(message) if self.size > 1 else [message]
        failed = list(dict.fromkeys(m for m in messages if m))
        if failed:
            raise InputError("\n".join(failed))
        return result

    def any_flags(self, flag: int) -> int:
        """Bitwise OR of a small integer over ranks (stop / divergence agreement).

        A non-blocking Allreduce, waited for by spinning briefly and then sleeping between
        tests: a rank that waits long (an idle rank of the job ramp, everyone while rank 0
        validates) leaves the CPU to the ranks that work, which matters when ranks share cores."""
        if self.size == 1:
            return int(flag)
        value = np.array([flag], np.int64)
        request = self.comm.Iallreduce(self.MPI.IN_PLACE, value, op=self.MPI.BOR)
        spin_until = time.perf_counter() + SPIN_SECONDS
        while not request.Test():
            if time.perf_counter() > spin_until:
                time.sleep(POLL_SECONDS)
        return int(value[0])

    def checkin(self, timeout: float, what: str) -> None:
        """Every rank arrives here within ``timeout`` seconds, or the job is aborted
        with a message naming the ranks that did not (0 = no watchdog)."""
        if self.size == 1 or timeout <= 0:
            return
        tag = 0x5EED
        token = np.zeros(1, np.int32)
        deadline = time.monotonic() + timeout
        if self.rank == 0:
            inbox = np.zeros(self.size - 1, np.int32)
            pending = {r: self.comm.Irecv(inbox[r - 1:r], source=r, tag=tag) for r in range(1, self.size)}
            while pending:
                pending = {r: req for r, req in pending.items() if not req.Test()}
                if pending and time.monotonic() > deadline:
                    self._hang(f"rank(s) {sorted(pending)} did not arrive at {what} within "
                               f"{timeout:g} s")
                time.sleep(0.0005 if pending else 0)
        else:
            self.comm.Isend(token, dest=0, tag=tag).Wait()
        release = self.comm.Ibcast(token, root=0)          # rank 0 lets everyone go
        while not release.Test():
            if time.monotonic() > deadline:
                self._hang(f"rank 0 did not release {what} within {timeout:g} s")
            time.sleep(0.0005)

    def _hang(self, message: str) -> None:
        sys.stderr.write(f"[rank {self.rank}/{self.size}] collective timeout: {message}; aborting\n")
        self.abort(1)

    def _staging_for(self, buf) -> np.ndarray:
        if (self._host_staging is None or self._host_staging.shape != buf.shape
                or self._host_staging.dtype != buf.dtype):
            self._host_staging = np.empty(buf.shape, dtype=buf.dtype)
        return self._host_staging

    def sum(self, values) -> np.ndarray:
        """Element-wise float64 sum over ranks of a small host vector (all ranks get it)."""
        arr = np.ascontiguousarray(values, dtype=np.float64)
        if self.size > 1:
            self.comm.Allreduce(self.MPI.IN_PLACE, arr, op=self.MPI.SUM)
        return arr

    def sum_named(self, named: dict) -> dict:
        """Element-wise float64 sums over ranks of several small host arrays, in one Allreduce."""
        arrays = {k: np.asarray(v, np.float64) for k, v in named.items()}
        flat = self.sum(np.concatenate([a.ravel() for a in arrays.values()]))
        out, offset = {}, 0
        for key, a in arrays.items():
            out[key] = flat[offset:offset + a.size].reshape(a.shape)
            offset += a.size
        return out

    def gather(self, values) -> np.ndarray:
        """Rows of a small float64 vector from every rank, (size, len) on all ranks."""
        arr = np.ascontiguousarray(values, dtype=np.float64).ravel()
        out = np.empty((self.size, arr.size), np.float64)
        if self.size > 1:
            self.comm.Allgather(arr, out)
        else:
            out[0] = arr
        return out

    def barrier(self) -> None:
        if self.size > 1:
            self.comm.Barrier()

    def abort(self, code: int = 1) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        # MPI_Abort makes the launcher kill every rank at once; give it a moment to forward
        # what this rank just printed (seen lost under load with MPICH's hydra)
        time.sleep(0.5)
        self.comm.Abort(code)


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
def abort_on_exception(dist: Dist):
    """Turn an exception on any rank into a prompt whole-job abort.

    With one rank the exception propagates normally (a clean traceback and
    exit code 1 from Python); with several, the others would wait forever in
    the next collective, so this rank prints the error and aborts them all.
    """
    try:
        yield
    except SystemExit:
        raise
    except BaseException as exc:  # noqa: BLE001
        if dist.size == 1:
            raise
        msg = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        sys.stderr.write(f"[rank {dist.rank}/{dist.size}] fatal error, aborting the job:\n{msg}")
        dist.abort(1)
