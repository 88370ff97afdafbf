"""Array backend: the one module that knows which library holds the arrays.

Every array operation in ngsgd_mpi is written against an array module ``xp``
with the NumPy API.  The choice is made once per process with
:func:`use_device` (the ``device: cpu|gpu`` config option):

* ``"cpu"``: :mod:`numpy`;
* ``"gpu"``: :mod:`cupy` (the only import of cupy in the package);
* ``"standin"``: :mod:`ngsgd_mpi.standin`, NumPy behind a device wall that
  counts host transfers and rejects what CuPy rejects (tests; whole runs with
  ``NGSGD_GPU_STANDIN=1``, which makes ``"gpu"`` select it -- ``=raise``
  also makes implicit host synchronisations raise).

Math code asks :func:`array_module` for the module that owns the arrays it
was handed, so a preconditioner fed NumPy arrays works with NumPy even in a
GPU process (tests and host-side reference code rely on this).

Host transfers go through :func:`to_host` / :func:`to_device` /
:func:`synchronize`; for device arrays they are counted
(:func:`transfer_counts`), which is how the GPU self-test and the stand-in
tests check the design of one small transfer per layer per Fisher update.

:func:`gemm` (``C <- alpha A B + beta C`` without a product temporary) and
:func:`spd_inverse` (simple NG's Cholesky + inverse, LAPACK potrf + potri as
Kaldi's ``SymInvertPosDef``) call NumPy's own OpenBLAS on the CPU through
ctypes -- one BLAS and one thread pool (a second OpenBLAS, e.g. SciPy's,
busy-waits against NumPy's with 2 threads: see docs/benchmarks.md) -- and
fall back to ``numpy.matmul`` / ``numpy.linalg.inv`` where that library does
not export CBLAS/LAPACKE; on a device they use the array module.
:func:`row_dots` (row-wise dot products, the online preconditioner's row
norms) is ``numpy.vecdot`` on the host and einsum on a device.

GPU paths have NOT run on a real GPU in this project (there is none); the
stand-in checks where data moves, and tests run the engine on it.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import warnings

import numpy as np

_cupy = None          # the cupy module once a GPU device is selected
_standin = None       # ngsgd_mpi.standin once the stand-in is selected (or imported for a check)
_device = "cpu"
_counts = {"to_host": 0, "to_device": 0, "synchronize": 0}
_forbidding_syncs = False
DEVICES = ("cpu", "gpu", "standin")


def use_device(device: str) -> None:
    """Select ``"cpu"`` (NumPy), ``"gpu"`` (CuPy) or ``"standin"`` for arrays created from now on."""
    global _cupy, _device
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
    if device == "gpu" and os.environ.get("NGSGD_GPU_STANDIN", "") not in ("", "0"):
        _load_standin().set_implicit_syncs(
            "raise" if os.environ["NGSGD_GPU_STANDIN"] == "raise" else "count")
        device = "standin"
    if device == "standin":
        _load_standin()
    elif device == "gpu":
        try:
            import cupy  # noqa: PLC0415 - the single import of cupy in the package
        except ImportError as exc:  # pragma: no cover - depends on the machine
            raise RuntimeError("device: gpu needs CuPy (pip install 'ngsgd_mpi[gpu]')") from exc
        if cupy.cuda.runtime.getDeviceCount() < 1:  # pragma: no cover
            raise RuntimeError("device: gpu was requested but CUDA reports no GPU")
        _cupy = cupy
    _device = device


def _load_standin():
    global _standin
    if _standin is None:
        from ngsgd_mpi import standin  # noqa: PLC0415 - only when asked for
        _standin = standin
    return _standin


def device() -> str:
    return _device


def device_description() -> str:
    """What the selected device is, in words (for logs and reports)."""
    if _device == "gpu":
        properties = _cupy.cuda.runtime.getDeviceProperties(_cupy.cuda.Device().id)
        name = properties["name"]
        name = name.decode() if isinstance(name, bytes) else name
        return f"{name}, {properties['totalGlobalMem'] / 2 ** 30:.0f} GiB; CuPy {_cupy.__version__}"
    if _device == "standin":
        return "the CuPy stand-in (NumPy behind a device wall; ngsgd_mpi.standin)"
    return f"CPU (NumPy {np.__version__})"


def xp():
    """The array module for new arrays (numpy, cupy or the stand-in's)."""
    if _device == "gpu":
        return _cupy
    if _device == "standin":
        return _standin.xp
    return np


def array_module(array):
    """The array module that owns ``array`` (numpy for host arrays)."""
    if _standin is not None and isinstance(array, _standin.DeviceArray):
        return _standin.xp
    if _cupy is not None and isinstance(array, _cupy.ndarray):
        return _cupy
    return np


def is_device_array(array) -> bool:
    """True for arrays in device memory (CuPy, anything exposing
    ``__cuda_array_interface__``, and stand-in arrays)."""
    if _standin is not None and isinstance(array, _standin.DeviceArray):
        return True
    return hasattr(array, "__cuda_array_interface__")


def to_host(array) -> np.ndarray:
    """A NumPy copy of a device array (one counted device-to-host transfer);
    host arrays are returned as they are (``numpy.asarray``)."""
    if _standin is not None and isinstance(array, _standin.DeviceArray):
        _counts["to_host"] += 1
        return array.get()
    if _cupy is not None and isinstance(array, _cupy.ndarray):
        _counts["to_host"] += 1
        with _syncs_allowed():
            return _cupy.asnumpy(array)
    return np.asarray(array)


def to_device(array, dtype=None, like=None):
    """``array`` on the selected device (or on the device of ``like``), as
    ``dtype``: a counted upload for host data going to a device."""
    module = xp() if like is None else array_module(like)
    if module is not np and not is_device_array(array):
        _counts["to_device"] += 1
    return module.asarray(array, dtype=dtype)


def synchronize() -> None:
    """Wait for queued device work (a no-op on the CPU).  Call before handing
    device memory to MPI: the library reads it outside the CUDA stream."""
    if _device == "gpu":
        _counts["synchronize"] += 1
        with _syncs_allowed():
            _cupy.cuda.get_current_stream().synchronize()
    elif _device == "standin":
        _counts["synchronize"] += 1
        _standin.note_stream_sync()


def transfer_counts() -> dict:
    """Counted device transfers so far: ``{"to_host", "to_device", "synchronize"}``."""
    return dict(_counts)


@contextlib.contextmanager
def implicit_syncs_forbidden():
    """Inside, a host read of device data other than :func:`to_host` raises
    (stand-in: ``standin.ImplicitSync``; CuPy: ``cupyx.DeviceSynchronized``,
    which CuPy detects for transfers it makes itself, while it has
    ``cupyx.allow_synchronize``, see :func:`implicit_syncs_detectable`).  No
    effect on NumPy."""
    global _forbidding_syncs
    if _device == "standin":
        with _standin.implicit_syncs("raise"):
            yield
    elif _device == "gpu" and implicit_syncs_detectable():
        import cupyx  # noqa: PLC0415
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")         # allow_synchronize is deprecated in CuPy
            previous, _forbidding_syncs = _forbidding_syncs, True
            try:
                with cupyx.allow_synchronize(False):
                    yield
            finally:
                _forbidding_syncs = previous
    else:
        yield


def implicit_syncs_detectable() -> bool:
    """Whether :func:`implicit_syncs_forbidden` can detect anything here (NumPy:
    nothing to detect; CuPy: only while it still ships the deprecated
    ``cupyx.allow_synchronize``)."""
    if _device == "standin":
        return True
    if _device != "gpu":
        return False
    import cupyx  # noqa: PLC0415
    return hasattr(cupyx, "allow_synchronize")


@contextlib.contextmanager
def _syncs_allowed():
    if not _forbidding_syncs:
        yield
        return
    import cupyx  # noqa: PLC0415
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with cupyx.allow_synchronize(True):
            yield


# ----------------------------------------------------------------------------- linear algebra

def gemm(alpha: float, A, B, beta: float, C, work=None):
    """``C <- alpha A B + beta C`` in place (2-D); returns C.  Host arrays whose
    layouts BLAS takes (each operand row- or column-major with unit stride,
    C row-major) go to NumPy's own OpenBLAS sgemm/dgemm, which accumulates
    into C without a temporary: NumPy's matmul cannot, and every
    ``C += A @ B`` then costs a product buffer and two passes over C.  Else
    (devices, odd strides): the product into ``work`` (an array like C, or a
    function returning one, called only then; None: a new array), then the
    update."""
    if type(C) is np.ndarray and C.size >= GEMM_MIN_OUTPUT and _host_gemm(alpha, A, B, beta, C):
        return C
    product = array_module(C).matmul(A, B, out=work() if callable(work) else work)
    if beta == 0.0:
        if alpha != 1.0:
            product *= alpha
        C[...] = product
        return C
    if beta != 1.0:
        C *= beta
    if alpha == -1.0:
        C -= product
    else:
        if alpha != 1.0:
            product *= alpha
        C += product
    return C


_BLAS_GEMM = None              # {dtype: (routine, c scalar type)} or {} when not reachable
_ROW_MAJOR, _NO_TRANS, _TRANS = 101, 111, 112
# The ctypes call costs ~20 µs more than numpy.matmul; it pays where the saved
# passes over C do (measured: a 128 x 361 output loses, 512 x 301 gains).
GEMM_MIN_OUTPUT = 65536


def _blas_layout(M, itemsize):
    """(transpose flag, leading dimension) of a 2-D operand for row-major BLAS, or None."""
    rows, cols = M.shape
    s0, s1 = M.strides
    if s1 == itemsize and s0 % itemsize == 0 and s0 // itemsize >= max(1, cols):
        return _NO_TRANS, s0 // itemsize
    if s0 == itemsize and s1 % itemsize == 0 and s1 // itemsize >= max(1, rows):
        return _TRANS, s1 // itemsize
    return None


def _host_gemm(alpha, A, B, beta, C) -> bool:
    routines = _blas_gemm().get(C.dtype)
    if (routines is None or type(A) is not np.ndarray or type(B) is not np.ndarray
            or A.dtype != C.dtype or B.dtype != C.dtype or A.ndim != 2 or B.ndim != 2 or C.ndim != 2):
        return False
    (M, K), (K2, N) = A.shape, B.shape
    if K != K2 or C.shape != (M, N) or min(M, N, K) < 1:
        return False
    size = C.itemsize
    a, b = _blas_layout(A, size), _blas_layout(B, size)
    if a is None or b is None or C.strides[1] != size or C.strides[0] < max(1, N) * size:
        return False
    if np.may_share_memory(C, A) or np.may_share_memory(C, B):
        return False
    routine, scalar = routines
    routine(_ROW_MAJOR, a[0], b[0], M, N, K, scalar(alpha), A.ctypes.data, a[1], B.ctypes.data, b[1],
            scalar(beta), C.ctypes.data, C.strides[0] // size)
    return True


def _numpy_openblas():
    """ctypes handles of the OpenBLAS libraries NumPy itself loaded (not SciPy's)."""
    from threadpoolctl import threadpool_info  # noqa: PLC0415
    numpy_dir = os.path.dirname(os.path.dirname(np.__file__))
    return [ctypes.CDLL(lib["filepath"]) for lib in threadpool_info()
            if lib.get("internal_api") == "openblas"
            and os.path.relpath(lib["filepath"], numpy_dir).startswith("numpy")]


def _blas_gemm():
    global _BLAS_GEMM
    if _BLAS_GEMM is not None:
        return _BLAS_GEMM
    _BLAS_GEMM = {}
    try:
        for library in _numpy_openblas():
            for prefix, suffix, int_type in (("scipy_", "64_", ctypes.c_int64), ("", "64_", ctypes.c_int64),
                                             ("", "", ctypes.c_int32)):
                names = {np.dtype(np.float32): (f"{prefix}cblas_sgemm{suffix}", ctypes.c_float),
                         np.dtype(np.float64): (f"{prefix}cblas_dgemm{suffix}", ctypes.c_double)}
                if not all(hasattr(library, name) for name, _ in names.values()):
                    continue
                for dtype, (name, scalar) in names.items():
                    routine = getattr(library, name)
                    routine.restype = None
                    routine.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int, int_type, int_type, int_type,
                                        scalar, ctypes.c_void_p, int_type, ctypes.c_void_p, int_type,
                                        scalar, ctypes.c_void_p, int_type)
                    _BLAS_GEMM[dtype] = (routine, scalar)
                return _BLAS_GEMM
    except (OSError, ImportError):        # pragma: no cover - an unusual NumPy build
        _BLAS_GEMM = {}
    return _BLAS_GEMM


def row_dots(A, B):
    """``sum_j A[i, j] * B[i, j]`` for every row i of two 2-D arrays of one
    shape, in their dtype.  Host: ``numpy.vecdot`` (NumPy >= 2: one BLAS dot
    per row, 1.6x faster than einsum on a 512 x 3000 float32 matrix), else
    einsum; the stand-in runs the host routine, so its results equal the CPU
    path's; CuPy: einsum."""
    module = array_module(A)
    if module is np:
        return _host_row_dots(A, B)
    if _standin is not None and module is _standin.xp:
        return _standin.run_on_device(_host_row_dots, A, B)
    return module.einsum("ij,ij->i", A, B)


def _host_row_dots(A, B):
    if hasattr(np, "vecdot"):
        return np.vecdot(A, B)
    return np.einsum("ij,ij->i", A, B)       # pragma: no cover - NumPy < 2


def spd_inverse(S):
    """The inverse of a symmetric positive definite matrix (float32/float64,
    n x n), as a new array on S's device.  Host: Cholesky (potrf) and its
    inverse (potri) in NumPy's OpenBLAS, numpy.linalg.LinAlgError if S is not
    positive definite; CuPy: ``cupy.linalg.inv`` (no host check)."""
    module = array_module(S)
    if module is np:
        return _host_spd_inverse(S)
    if _standin is not None and module is _standin.xp:
        return _standin.run_on_device(_host_spd_inverse, S)
    return module.linalg.inv(S)


_LAPACK_ROUTINES = None        # {dtype: (potrf, potri)} or {} when LAPACKE is not reachable
_COL_MAJOR = 102


def _lapack_routines():
    """potrf/potri of the OpenBLAS NumPy itself uses (LAPACKE ``_work`` entry
    points: no NaN scan, no transposed copy), or {} (then numpy.linalg.inv)."""
    global _LAPACK_ROUTINES
    if _LAPACK_ROUTINES is not None:
        return _LAPACK_ROUTINES
    _LAPACK_ROUTINES = {}
    try:
        for library in _numpy_openblas():
            for prefix, suffix, int_type in (("scipy_", "64_", ctypes.c_int64),
                                             ("", "64_", ctypes.c_int64), ("", "", ctypes.c_int32)):
                names = {t: (f"{prefix}LAPACKE_{t}potrf_work{suffix}",
                             f"{prefix}LAPACKE_{t}potri_work{suffix}") for t in "sd"}
                if not all(hasattr(library, n) for pair in names.values() for n in pair):
                    continue
                for t, dtype in (("s", np.float32), ("d", np.float64)):
                    pair = []
                    for name in names[t]:
                        routine = getattr(library, name)
                        routine.restype = int_type
                        routine.argtypes = (ctypes.c_int, ctypes.c_char, int_type, ctypes.c_void_p,
                                            int_type)
                        pair.append(routine)
                    _LAPACK_ROUTINES[np.dtype(dtype)] = tuple(pair)
                return _LAPACK_ROUTINES
    except (OSError, ImportError):        # pragma: no cover - an unusual NumPy build
        _LAPACK_ROUTINES = {}
    return _LAPACK_ROUTINES


def _host_spd_inverse(S: np.ndarray) -> np.ndarray:
    if S.ndim != 2 or S.shape[0] != S.shape[1]:
        raise ValueError(f"spd_inverse: expected a square matrix, got shape {S.shape}")
    routines = _lapack_routines().get(S.dtype)
    if routines is None:
        return np.linalg.inv(S)
    potrf, potri = routines
    n = S.shape[0]
    # A C-ordered symmetric matrix read as column-major is the same matrix; 'L'
    # in column-major order is the upper triangle in C order.
    A = np.array(S, order="C", copy=True)
    info = potrf(_COL_MAJOR, b"L", n, A.ctypes.data, n)
    if info == 0:
        info = potri(_COL_MAJOR, b"L", n, A.ctypes.data, n)
    if info != 0:
        raise np.linalg.LinAlgError(f"spd_inverse: matrix is not positive definite (LAPACK info {info})")
    inverse = np.triu(A)
    inverse += np.triu(A, 1).T
    return inverse
