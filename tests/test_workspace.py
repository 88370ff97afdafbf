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


def test_reserved_rows_extend_the_current_array_of_a_role():
    work = Workspace()
    before = work.array("x", (4, 5), np.float32, np)
    assert work.with_rows_after(before, 2) is None            # no room reserved yet
    work.reserve_rows(3)
    a = work.array("x", (4, 5), np.float32, np)               # reallocated with room
    a[...] = 7.0
    extended = work.with_rows_after(a, 3)
    assert extended.shape == (7, 5) and np.shares_memory(extended, a)
    np.testing.assert_array_equal(extended[:4], a)
    assert work.with_rows_after(a, 4) is None                 # more than reserved
    assert work.with_rows_after(a.copy(), 1) is None          # not this workspace's array
    assert work.with_rows_after(work.array("v", (6,), np.float32, np), 1) is None   # 1-D: no rows
    smaller = work.array("x", (2, 5), np.float32, np)         # the room follows the current array
    assert work.with_rows_after(a, 1) is None and work.with_rows_after(smaller, 5).shape == (7, 5)
    assert work.nbytes == 4 * (7 * 5 + 6)
