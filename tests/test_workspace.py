"""workspace.py: reusable arrays by role."""

import numpy as np

from ngsgd_mpi.workspace import Workspace


def test_arrays_are_reused_by_role_and_grow_only():
    work = Workspace()
    a = work.array("x", (4, 5), np.float32, np)
    a[...] = 1.0
    b = work.array("x", (4, 5), np.float32, np)
    assert np.shares_memory(a, b) and b.flags.c_contiguous and b[0, 0] == 1.0
    smaller = work.array("x", (2, 3), np.float32, np)        # a view of the same memory
    assert np.shares_memory(a, smaller) and smaller.shape == (2, 3)
    other = work.array("y", (4, 5), np.float32, np)
    assert not np.shares_memory(a, other)
    assert work.nbytes == 2 * 80
    larger = work.array("x", (5, 5), np.float32, np)         # grows: new memory
    assert not np.shares_memory(a, larger) and work.nbytes == 100 + 80
    assert work.array("x", (5, 5), np.float64, np).dtype == np.float64   # dtype change: new
    work.clear()
    assert work.nbytes == 0
