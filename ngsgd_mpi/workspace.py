"""Reusable work arrays: the one buffer cache of the hot path.

A training step would otherwise allocate the same large temporaries on every
minibatch (layer outputs, input derivatives, the [X, 1] copy, GEMM products,
preconditioner intermediates); fresh large allocations cost page faults (about
6 % of a paper-size step) and, on a GPU, allocator traffic.  Every owner of
such temporaries -- each layer, each updater, each preconditioner -- keeps one
:class:`Workspace` and asks it for its arrays by role::

    Y = self.work.array("output", (N, D), X.dtype, xp)

The first request for a role allocates; later requests return a view of the
same memory (a flat buffer grown to the largest size asked for, so a smaller
last minibatch does not reallocate).  An array from :meth:`Workspace.array`
is valid until the next request for the same role: owners document which of
their results live in their workspace.

Workspaces hold no state that matters for results: clearing one only costs
reallocation.  :attr:`Workspace.nbytes` is what the memory report counts as
"work buffers".

Spare rows: with :meth:`Workspace.reserve_rows` every 2-D array gets room for
k more rows after it in its role's memory, and :meth:`Workspace.with_rows_after`
hands that room out as the (n + k) x d array whose first n rows are the
array.  The online updater stacks k rows under a layer's output derivative G
this way, so that Gᵀ X̂ and its low-rank correction are one GEMM (optim.py):
the memory after the current array of a role is unused by this contract.
"""

from __future__ import annotations

import math

from ngsgd_mpi import backend


class Workspace:
    """Named reusable arrays of one owner (see the module docstring)."""

    __slots__ = ("_flat", "_views", "_spare_rows")

    def __init__(self):
        self._flat: dict[str, object] = {}
        self._views: dict[str, object] = {}     # the last view handed out per role
        self._spare_rows = 0                    # room reserved after every 2-D array

    def array(self, role: str, shape: tuple[int, ...], dtype, xp):
        """A C-contiguous ``xp`` array of ``shape`` and ``dtype`` for ``role``
        (uninitialised; reuses the role's memory when it is large enough)."""
        view = self._views.get(role)
        if view is not None and view.shape == shape and view.dtype == dtype and type(view) is xp.ndarray:
            return view                         # the common case: same request as last time
        size = math.prod(shape)
        capacity = size + (self._spare_rows * shape[1] if len(shape) == 2 else 0)
        flat = self._flat.get(role)
        if (flat is None or flat.size < capacity or flat.dtype != dtype
                or backend.array_module(flat) is not xp):
            flat = self._flat[role] = xp.empty(capacity, dtype=dtype)
        view = self._views[role] = flat[:size].reshape(shape)
        return view

    def reserve_rows(self, rows: int) -> None:
        """Give every later 2-D array room for ``rows`` more rows.  When that is
        more than before, the current arrays are dropped (arrays handed out stay
        valid; each role is reallocated on its next request)."""
        if rows > self._spare_rows:
            self._spare_rows = rows
            self.clear()

    def with_rows_after(self, view, rows: int):
        """The (n + rows) x d array whose first n rows are ``view``, if ``view``
        is this workspace's current 2-D array of some role and its memory has
        the room; else None."""
        for role, current in self._views.items():
            if current is view:
                if view.ndim != 2:
                    return None
                shape = (view.shape[0] + rows, view.shape[1])
                size, flat = math.prod(shape), self._flat[role]
                return flat[:size].reshape(shape) if size <= flat.size else None
        return None

    def clear(self) -> None:
        """Drop every array (they are reallocated on the next request)."""
        self._flat.clear()
        self._views.clear()

    @property
    def nbytes(self) -> int:
        """Bytes held by this workspace."""
        return sum(int(flat.nbytes) for flat in self._flat.values())
