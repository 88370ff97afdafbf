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
"""

from __future__ import annotations

import math

from ngsgd_mpi import backend


class Workspace:
    """Named reusable arrays of one owner (see the module docstring)."""

    __slots__ = ("_flat", "_views")

    def __init__(self):
        self._flat: dict[str, object] = {}
        self._views: dict[str, object] = {}     # the last view handed out per role

    def array(self, role: str, shape: tuple[int, ...], dtype, xp):
        """A C-contiguous ``xp`` array of ``shape`` and ``dtype`` for ``role``
        (uninitialised; reuses the role's memory when it is large enough)."""
        view = self._views.get(role)
        if view is not None and view.shape == shape and view.dtype == dtype and type(view) is xp.ndarray:
            return view                         # the common case: same request as last time
        size = math.prod(shape)
        flat = self._flat.get(role)
        if (flat is None or flat.size < size or flat.dtype != dtype
                or backend.array_module(flat) is not xp):
            flat = self._flat[role] = xp.empty(size, dtype=dtype)
        view = self._views[role] = flat[:size].reshape(shape)
        return view

    def clear(self) -> None:
        """Drop every array (they are reallocated on the next request)."""
        self._flat.clear()
        self._views.clear()

    @property
    def nbytes(self) -> int:
        """Bytes held by this workspace."""
        return sum(int(flat.nbytes) for flat in self._flat.values())
