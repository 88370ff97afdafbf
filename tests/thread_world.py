"""Several "ranks" in one process: threads sharing an in-memory communicator.

``run_ranks(n, fn)`` calls ``fn(dist)`` on n threads, each with a real ``distributed.Dist``
whose communicator is a :class:`ThreadComm`; the collectives the trainer uses (Allreduce,
Iallreduce, Bcast, Allgather, allgather, Barrier) exchange values through shared slots and a barrier.
That lets tests inject a Dist and check cross-rank logic (averaging safeguards, rollback,
combination) in process, without mpiexec.
"""

from __future__ import annotations

import threading

import numpy as np
from mpi4py import MPI

from ngsgd_mpi import distributed


class _Done:
    def Test(self):
        return True

    def Wait(self):
        return None


class ThreadComm:
    def __init__(self, world: "ThreadWorld", rank: int):
        self.world, self.rank = world, rank

    def Get_rank(self):
        return self.rank

    def Get_size(self):
        return self.world.size

    def _exchange(self, value):
        """Every rank's ``value``, in rank order (a collective: all ranks must call it)."""
        world = self.world
        world.slots[self.rank] = value
        world.barrier.wait()
        values = list(world.slots)
        world.barrier.wait()
        return values

    def Allreduce(self, sendbuf, recvbuf, op):
        mine = np.array(recvbuf if sendbuf is MPI.IN_PLACE else sendbuf, copy=True)
        values = self._exchange(mine)
        if op == MPI.SUM:
            result = values[0].copy()
            for v in values[1:]:
                result += v
        elif op == MPI.BOR:
            result = np.bitwise_or.reduce(np.stack(values))
        else:
            raise NotImplementedError(op)
        recvbuf[...] = result

    def Iallreduce(self, sendbuf, recvbuf, op):
        """Completes at once (the exchange is synchronous); returns a finished request."""
        self.Allreduce(sendbuf, recvbuf, op)
        return _Done()

    def Bcast(self, buf, root=0):
        buf[...] = self._exchange(np.array(buf, copy=True))[root]

    def Allgather(self, sendbuf, recvbuf):
        recvbuf[...] = np.stack(self._exchange(np.array(sendbuf, copy=True)))

    def allgather(self, obj):
        return self._exchange(obj)

    def Barrier(self):
        self._exchange(None)

    def Abort(self, code=1):
        raise RuntimeError(f"rank {self.rank} aborted the job with code {code}")


class ThreadWorld:
    def __init__(self, size: int, timeout: float = 60.0):
        self.size = size
        self.slots = [None] * size
        self.barrier = threading.Barrier(size, timeout=timeout)


def run_ranks(size: int, fn, timeout: float = 60.0) -> list:
    """[fn(dist) for every rank], run concurrently; the first exception is re-raised."""
    world = ThreadWorld(size, timeout)
    results, errors = [None] * size, [None] * size

    def target(rank):
        try:
            results[rank] = fn(distributed.Dist(ThreadComm(world, rank), cuda_aware=False))
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
            errors[rank] = exc
            world.barrier.abort()     # the other ranks must not wait for this one

    threads = [threading.Thread(target=target, args=(r,), name=f"rank{r}") for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    first = next((e for e in errors if e is not None and not isinstance(e, threading.BrokenBarrierError)),
                 next((e for e in errors if e is not None), None))
    if first is not None:
        raise first
    return results
