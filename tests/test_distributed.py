"""The MPI glue, single process: a fake communicator and a fake device array
(host memory behind ``__cuda_array_interface__``, as mpi4py's own tests do)."""

import numpy as np
import pytest

from ngsgd_mpi import backend, distributed


class FakeDeviceArray:
    """Host memory that looks like GPU memory to anything checking the CUDA array interface."""

    def __init__(self, host):
        self.host = host

    @property
    def __cuda_array_interface__(self):
        return {"shape": self.host.shape, "typestr": self.host.dtype.str,
                "data": (self.host.ctypes.data, False), "version": 3, "strides": None}

    def __array__(self, dtype=None, copy=None):
        raise AssertionError("device memory must not be read implicitly")

    def __setitem__(self, key, value):
        self.host[key] = value

    def __imul__(self, other):
        self.host *= other
        return self

    shape = property(lambda self: self.host.shape)
    dtype = property(lambda self: self.host.dtype)


class FakeComm:
    """Two 'ranks': the other one contributes ``other``; records what MPI was handed."""

    def __init__(self, other, events):
        self.other, self.events = other, events

    def Get_rank(self):
        return 0

    def Get_size(self):
        return 2

    def Allreduce(self, sendbuf, recvbuf, op):
        self.events.append(("allreduce", type(recvbuf).__name__))
        target = recvbuf.host if isinstance(recvbuf, FakeDeviceArray) else recvbuf
        target += self.other


@pytest.fixture
def events(monkeypatch):
    events = []
    monkeypatch.setattr(backend, "synchronize", lambda: events.append(("sync", None)))
    monkeypatch.setattr(backend, "to_host",
                        lambda a: a.host.copy() if isinstance(a, FakeDeviceArray) else np.asarray(a))
    return events


def test_host_buffer_average_in_place(events):
    dist = distributed.Dist(FakeComm(np.full(4, 3.0, np.float32), events), cuda_aware=False)
    buf = np.ones(4, np.float32)
    dist.average_(buf)
    np.testing.assert_array_equal(buf, np.full(4, 2.0))
    assert events == [("allreduce", "ndarray")]


def test_device_buffer_is_staged_through_host_when_mpi_is_not_cuda_aware(events):
    dist = distributed.Dist(FakeComm(np.full(4, 3.0, np.float32), events), cuda_aware=False)
    dev = FakeDeviceArray(np.ones(4, np.float32))
    dist.average_(dev)
    np.testing.assert_array_equal(dev.host, np.full(4, 2.0))
    assert events == [("sync", None), ("allreduce", "ndarray")]   # synced first, MPI saw host memory
    staging = dist._host_staging
    dist.average_(dev)
    assert dist._host_staging is staging                            # staging buffer reused


def test_device_buffer_goes_to_mpi_directly_when_cuda_aware(events):
    dist = distributed.Dist(FakeComm(np.full(4, 3.0, np.float32), events), cuda_aware=True)
    dev = FakeDeviceArray(np.ones(4, np.float32))
    dist.average_(dev)
    np.testing.assert_array_equal(dev.host, np.full(4, 2.0))
    assert events == [("sync", None), ("allreduce", "FakeDeviceArray")]


def test_cuda_awareness_override(monkeypatch):
    monkeypatch.setenv("NGSGD_CUDA_AWARE_MPI", "1")
    assert distributed.mpi_is_cuda_aware()
    monkeypatch.setenv("NGSGD_CUDA_AWARE_MPI", "0")
    assert not distributed.mpi_is_cuda_aware()


def test_fake_device_array_is_seen_as_device_memory():
    assert backend.is_device_array(FakeDeviceArray(np.zeros(2)))
    assert not backend.is_device_array(np.zeros(2))


def test_single_rank_world():
    dist = distributed.init()
    assert (dist.rank, dist.size) == (0, 1)
    buf = np.arange(3, dtype=np.float32)
    dist.average_(buf)
    np.testing.assert_array_equal(buf, [0, 1, 2])
    np.testing.assert_array_equal(dist.sum([1.0, 2.0]), [1.0, 2.0])


def test_watchdog_describes_what_a_missing_rank_was_doing():
    assert "no answer (stopped" in distributed._describe(None, 7)
    assert "busy outside MPI for 2.5 s" in distributed._describe((6, 0, 2500), 7)
    assert "called different collectives" in distributed._describe((5, 1, 10), 7)


def test_watchdog_deadlines():
    """Inside a collective: collective_timeout after entering; after a stop signal also
    stop_timeout after the signal or the last change, inside a collective or not."""
    dog = distributed.Watchdog.__new__(distributed.Watchdog)        # the logic, without a thread
    dog.timeout, dog.stop_timeout, dog.stop_since = 10.0, 2.0, None
    dog.state = (3, "the average", 100.0)
    assert dog._overdue(109.0) is None
    assert dog._overdue(110.5) == (3, "the average", "within collective_timeout 10 s")
    dog.stop_since = 105.0
    assert dog._overdue(107.5)[2] == "within stop_timeout 2 s of the stop signal"
    dog.state = (3, None, 106.0)                                      # busy between collectives
    assert dog._overdue(107.9) is None and dog._overdue(108.1)[1] is None
    dog.stop_timeout = 0.0
    assert dog._overdue(1000.0) is None                               # outside: only with a stop


def test_bench_watchdog_runs_on_two_ranks():
    import os
    import sys

    import synthetic

    script = os.path.join(os.path.dirname(__file__), "..", "scripts", "bench_watchdog.py")
    res = synthetic.run([synthetic.mpiexec(), "-n", "2", sys.executable, script, "--small", "--calls", "40",
                         "--steps", "4", "--idle", "0.4"], timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "flag Allreduce" in res.stdout and "per minibatch" in res.stdout
