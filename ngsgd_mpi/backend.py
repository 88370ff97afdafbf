"""Array backend: the one module that knows about CuPy.

Every array operation in ngsgd_mpi is written against an array-module object
``xp`` with the NumPy API.  On the CPU ``xp`` is :mod:`numpy`; on a GPU it is
:mod:`cupy`.  The choice is made once per process with :func:`use_device`
(from the ``device: cpu|gpu`` config option); math code asks
:func:`array_module` for the module that owns the arrays it was handed, so a
preconditioner fed NumPy arrays works with NumPy even in a GPU process (used
by tests and by host-side reference code).

No other module imports cupy.  GPU paths have NOT been run on a real GPU in
this project's CI (there is none); they are exercised with NumPy and, for the
MPI glue, with a fake device array exposing ``__cuda_array_interface__``.
"""

from __future__ import annotations

import numpy as np

_cupy = None          # the cupy module once a GPU device is selected
_device = "cpu"


def use_device(device: str) -> None:
    """Select ``"cpu"`` (NumPy) or ``"gpu"`` (CuPy) for arrays created from now on."""
    global _cupy, _device
    if device == "cpu":
        _device = "cpu"
        return
    if device != "gpu":
        raise ValueError(f"device must be 'cpu' or 'gpu', got {device!r}")
    try:
        import cupy  # noqa: PLC0415 - the single import of cupy in the package
    except ImportError as exc:  # pragma: no cover - depends on the machine
        raise RuntimeError("device: gpu needs CuPy (pip install 'ngsgd_mpi[gpu]')") from exc
    if cupy.cuda.runtime.getDeviceCount() < 1:  # pragma: no cover
        raise RuntimeError("device: gpu was requested but CUDA reports no GPU")
    _cupy, _device = cupy, "gpu"


def device() -> str:
    return _device


def xp():
    """The array module for new arrays: numpy, or cupy after ``use_device('gpu')``."""
    return _cupy if _device == "gpu" else np


def array_module(array):
    """The array module that owns ``array`` (numpy for host arrays)."""
    if _cupy is not None and isinstance(array, _cupy.ndarray):
        return _cupy
    return np


def is_device_array(array) -> bool:
    """True for arrays in GPU memory (anything exposing ``__cuda_array_interface__``)."""
    return hasattr(array, "__cuda_array_interface__")


def to_host(array) -> np.ndarray:
    """A NumPy copy/view of ``array`` (one device-to-host transfer for GPU arrays)."""
    if _cupy is not None and isinstance(array, _cupy.ndarray):
        return _cupy.asnumpy(array)
    return np.asarray(array)


def to_device(array, dtype=None):
    """``array`` as an array of the selected backend."""
    return xp().asarray(array, dtype=dtype)


def synchronize() -> None:
    """Wait for queued GPU work (a no-op on the CPU).  Call before handing
    device memory to MPI: the library reads it outside the CUDA stream."""
    if _cupy is not None and _device == "gpu":
        _cupy.cuda.get_current_stream().synchronize()
