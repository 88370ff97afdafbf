"""A device stand-in for CuPy: NumPy arrays behind the wall a GPU puts up.

No GPU is available to this project's tests.  Two kinds of mistakes only
show on a device, and both can be caught without one:

* **host synchronisations**: anything that reads device data on the host
  (``float(x)``, ``bool(x)``, ``x.item()``, a boolean-mask index whose result
  size must be known, an explicit transfer) waits for the device queue;
* **APIs CuPy lacks or refuses**: NumPy functions applied to device arrays,
  host ``numpy.ndarray`` operands in device operations, ``einsum(out=...)``,
  assigning a host array into a device slice (CuPy gh-2079).

:class:`DeviceArray` wraps a ``numpy.ndarray`` that only the stand-in
touches; :data:`xp` is the array module (the subset of the CuPy API this
package uses, :data:`FUNCTIONS`; anything else is an AttributeError so a new
use has to be checked against CuPy first).  Reductions and scalar indexing
return 0-d device arrays, as in CuPy.  ``numpy.asarray(device_array)`` raises
TypeError, as in CuPy.

Counters (:func:`counters`): explicit device-to-host transfers
(``DeviceArray.get``, which ``backend.to_host`` uses) and uploads of host
data, with bytes; implicit synchronisations.  The implicit ones either raise
:class:`ImplicitSync` (policy ``"raise"``, the default, like
``cupyx.allow_synchronize(False)``) or are counted and performed (policy
``"count"``, what CuPy does silently), see :func:`implicit_syncs`.

Selected through ``backend.use_device("standin")`` (or ``NGSGD_GPU_STANDIN=1``
with device "gpu", for whole runs).  Arithmetic is NumPy's, so results are
bit-identical to the CPU path: the stand-in checks *where data moves*, not
GPU numerics (float32 summation order on a GPU differs; see docs/gpu.md).
"""

from __future__ import annotations

import dataclasses
import operator
from contextlib import contextmanager

import numpy as np


class ImplicitSync(RuntimeError):
    """A device value was read on the host outside ``backend.to_host``."""


@dataclasses.dataclass
class Counters:
    to_host: int = 0            # explicit device -> host transfers (get / backend.to_host)
    to_host_bytes: int = 0
    to_device: int = 0          # uploads of host data (asarray/array of host arrays, host values set)
    to_device_bytes: int = 0
    implicit_syncs: int = 0     # float()/int()/bool()/item()/tolist()/mask indexing (policy "count")
    stream_syncs: int = 0       # backend.synchronize()


_counters = Counters()
_policy = "raise"


def counters() -> Counters:
    """A snapshot of the counters (subtract two snapshots to count a region)."""
    return dataclasses.replace(_counters)


def reset_counters() -> None:
    global _counters
    _counters = Counters()


@contextmanager
def implicit_syncs(policy: str):
    """``"raise"``: an implicit synchronisation raises ImplicitSync; ``"count"``:
    it is counted and performed (CuPy's behaviour)."""
    global _policy
    if policy not in ("raise", "count"):
        raise ValueError(f"policy must be 'raise' or 'count', got {policy!r}")
    previous, _policy = _policy, policy
    try:
        yield
    finally:
        _policy = previous


def set_implicit_syncs(policy: str) -> None:
    """Set the policy for the rest of the process (whole-run use)."""
    global _policy
    if policy not in ("raise", "count"):
        raise ValueError(f"policy must be 'raise' or 'count', got {policy!r}")
    _policy = policy


def _implicit(what: str) -> None:
    if _policy == "raise":
        raise ImplicitSync(f"{what} reads a device value on the host (a host synchronisation); "
                           "use backend.to_host where a transfer is intended")
    _counters.implicit_syncs += 1


def _count_upload(array) -> None:
    _counters.to_device += 1
    _counters.to_device_bytes += int(np.asarray(array).nbytes)


def note_stream_sync() -> None:
    """``backend.synchronize`` on the stand-in."""
    _counters.stream_syncs += 1


# ----------------------------------------------------------------------------- wrapping

_SCALARS = (bool, int, float, complex, np.generic)


def _wrap(value, out=None):
    """NumPy result -> device result (arrays and scalars become DeviceArrays)."""
    if isinstance(value, np.ndarray):
        if out is not None and value is out._a:
            return out
        return DeviceArray(value)
    if isinstance(value, np.generic):
        return DeviceArray(np.asarray(value))
    if isinstance(value, tuple):
        return tuple(_wrap(v) for v in value)
    return value            # Python bools from metadata queries, dtypes, None


def _operand(value, where: str, upload: bool = False):
    """A DeviceArray's data, a scalar, or (``upload``) host data copied to the device."""
    if isinstance(value, DeviceArray):
        return value._a
    if isinstance(value, (list, tuple)):
        return type(value)(_operand(v, where, upload) for v in value)
    if isinstance(value, np.ndarray):
        if upload:
            _count_upload(value)
            return value.copy()
        raise TypeError(f"{where}: host numpy.ndarray operand (CuPy: 'Unsupported type "
                        f"numpy.ndarray'); move it to the device first")
    return value


def _kwargs(kwargs, where):
    return {k: _operand(v, f"{where}({k}=...)") for k, v in kwargs.items()}


class DeviceArray:
    """A device array of the stand-in (see the module docstring)."""

    __slots__ = ("_a",)
    __array_ufunc__ = None          # numpy ufuncs on a DeviceArray raise TypeError

    def __init__(self, data: np.ndarray):
        self._a = data

    # ---- metadata (no synchronisation)
    shape = property(lambda self: self._a.shape)
    dtype = property(lambda self: self._a.dtype)
    ndim = property(lambda self: self._a.ndim)
    size = property(lambda self: self._a.size)
    nbytes = property(lambda self: self._a.nbytes)
    itemsize = property(lambda self: self._a.itemsize)
    strides = property(lambda self: self._a.strides)
    flags = property(lambda self: self._a.flags)
    T = property(lambda self: DeviceArray(self._a.T))

    def __len__(self):
        return len(self._a)

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def __repr__(self):
        return f"DeviceArray(shape={self.shape}, dtype={self.dtype})"

    # ---- the wall
    def __array__(self, dtype=None, copy=None):
        raise TypeError("Implicit conversion to a NumPy array is not allowed (as in CuPy); "
                        "use backend.to_host")

    def __array_function__(self, func, types, args, kwargs):
        raise TypeError(f"numpy.{func.__name__} applied to a device array; use the array "
                        "module of the data (backend.array_module)")

    def get(self) -> np.ndarray:
        """Explicit device-to-host copy (CuPy's ``ndarray.get``)."""
        _counters.to_host += 1
        _counters.to_host_bytes += int(self._a.nbytes)
        return self._a.copy()

    def __float__(self):
        _implicit("float(device array)")
        return float(self._a)

    def __int__(self):
        _implicit("int(device array)")
        return int(self._a)

    def __index__(self):
        _implicit("using a device array as an index")
        return operator.index(self._a)

    def __bool__(self):
        _implicit("bool(device array)")
        return bool(self._a)

    def __complex__(self):
        _implicit("complex(device array)")
        return complex(self._a)

    def item(self):
        _implicit("device_array.item()")
        return self._a.item()

    def tolist(self):
        _implicit("device_array.tolist()")
        return self._a.tolist()

    # ---- indexing
    def _key(self, key, where):
        parts = key if isinstance(key, tuple) else (key,)
        out = []
        for part in parts:
            if isinstance(part, DeviceArray):
                if part.dtype == np.bool_:
                    _implicit(f"{where} with a boolean mask (result size)")
                out.append(part._a)
            elif isinstance(part, np.ndarray):
                _count_upload(part)          # CuPy moves a host index array to the device
                out.append(part)
            else:
                out.append(part)
        return tuple(out) if isinstance(key, tuple) else out[0]

    def __getitem__(self, key):
        return _wrap(self._a[self._key(key, "indexing")])

    def __setitem__(self, key, value):
        key = self._key(key, "assignment")
        if isinstance(value, np.ndarray) and value.ndim > 0:
            advanced = any(isinstance(k, np.ndarray)
                           for k in (key if isinstance(key, tuple) else (key,)))
            if not advanced:
                raise TypeError("assigning a host numpy.ndarray into a device array slice "
                                "(CuPy refuses this, gh-2079); move it to the device first")
            _count_upload(value)
        self._a[key] = value._a if isinstance(value, DeviceArray) else value

    # ---- methods (NumPy's, results on the device)
    def astype(self, dtype, copy=True):
        return DeviceArray(self._a.astype(dtype, copy=copy))

    def copy(self):
        return DeviceArray(self._a.copy())

    def fill(self, value):
        self._a.fill(_operand(value, "fill"))

    def reshape(self, *shape):
        return DeviceArray(self._a.reshape(*shape))

    def ravel(self):
        return DeviceArray(self._a.ravel())

    def transpose(self, *axes):
        return DeviceArray(self._a.transpose(*axes))

    def diagonal(self, *args, **kwargs):
        return DeviceArray(self._a.diagonal(*args, **kwargs))


def _method(name):
    def method(self, *args, **kwargs):
        where = f"DeviceArray.{name}"
        return _wrap(getattr(self._a, name)(*_operand(args, where), **_kwargs(kwargs, where)))
    method.__name__ = name
    return method


for _name in ("sum", "mean", "max", "min", "argmax", "argmin", "all", "any", "dot"):
    setattr(DeviceArray, _name, _method(_name))


def _binary(op, reflected=False):
    def method(self, other):
        if isinstance(other, DeviceArray):
            other = other._a
        elif isinstance(other, np.ndarray):
            raise TypeError(f"{op.__name__}: host numpy.ndarray operand with a device array "
                            "(CuPy: 'Unsupported type numpy.ndarray')")
        elif not isinstance(other, _SCALARS):
            return NotImplemented
        return _wrap(op(other, self._a) if reflected else op(self._a, other))
    return method


def _inplace(op):
    def method(self, other):
        if isinstance(other, DeviceArray):
            other = other._a
        elif isinstance(other, np.ndarray):
            raise TypeError(f"{op.__name__}: host numpy.ndarray operand with a device array")
        elif not isinstance(other, _SCALARS):
            return NotImplemented
        op(self._a, other)
        return self
    return method


for _name, _op, _iop in (("add", operator.add, operator.iadd), ("sub", operator.sub, operator.isub),
                         ("mul", operator.mul, operator.imul),
                         ("truediv", operator.truediv, operator.itruediv),
                         ("floordiv", operator.floordiv, operator.ifloordiv),
                         ("pow", operator.pow, operator.ipow), ("matmul", operator.matmul, None),
                         ("and", operator.and_, operator.iand), ("or", operator.or_, operator.ior),
                         ("mod", operator.mod, operator.imod)):
    setattr(DeviceArray, f"__{_name}__", _binary(_op))
    setattr(DeviceArray, f"__r{_name}__", _binary(_op, reflected=True))
    if _iop is not None:
        setattr(DeviceArray, f"__i{_name}__", _inplace(_iop))
for _name, _op in (("lt", operator.lt), ("le", operator.le), ("gt", operator.gt),
                   ("ge", operator.ge), ("eq", operator.eq), ("ne", operator.ne)):
    setattr(DeviceArray, f"__{_name}__", _binary(_op))
DeviceArray.__hash__ = None
DeviceArray.__neg__ = lambda self: DeviceArray(-self._a)
DeviceArray.__abs__ = lambda self: DeviceArray(abs(self._a))
DeviceArray.__invert__ = lambda self: DeviceArray(~self._a)


# ----------------------------------------------------------------------------- the module

# The CuPy functions this package uses (all exist in CuPy with these semantics).
FUNCTIONS = (
    "abs", "add", "all", "any", "arange", "argmax", "bincount", "clip", "concatenate", "diag", "divide",
    "dot", "einsum", "empty", "empty_like", "exp", "eye", "full", "isfinite", "log", "matmul",
    "maximum", "minimum", "multiply", "ones", "outer", "sign", "sqrt", "square", "stack",
    "subtract", "sum", "tril", "triu", "vdot", "where", "zeros", "zeros_like",
)
UPLOADS = ("array", "asarray", "ascontiguousarray")      # accept host data (a counted upload)
METADATA = ("may_share_memory", "result_type")            # host-side answers, no device read
CONSTANTS = ("float16", "float32", "float64", "int32", "int64", "bool_", "newaxis", "inf", "nan",
             "pi", "dtype")


def _function(name):
    numpy_function = getattr(np, name)

    def function(*args, **kwargs):
        where = f"xp.{name}"
        if name == "einsum" and "out" in kwargs:
            raise TypeError("xp.einsum: the 'out' argument is not supported by CuPy")
        out = kwargs.get("out")
        result = numpy_function(*_operand(args, where), **_kwargs(kwargs, where))
        return _wrap(result, out if isinstance(out, DeviceArray) else None)
    function.__name__ = name
    return function


def _upload_function(name):
    numpy_function = getattr(np, name)

    def function(value, dtype=None, **kwargs):
        if isinstance(value, DeviceArray):
            data = numpy_function(value._a, dtype=dtype, **kwargs)
            return value if data is value._a else DeviceArray(data)
        if isinstance(value, np.ndarray) or isinstance(value, (list, tuple)):
            host = np.asarray(value)
            _count_upload(host)
            return DeviceArray(np.array(numpy_function(host, dtype=dtype, **kwargs), copy=True))
        host = np.array(value, dtype=dtype)                       # a scalar
        _count_upload(host)
        return DeviceArray(host)
    function.__name__ = name
    return function


class _Namespace:
    def __init__(self, label, names):
        self._label = label
        self._names = frozenset(names)

    def __getattr__(self, name):
        raise AttributeError(f"{self._label}.{name}: not provided by the CuPy stand-in (check that "
                             "CuPy has it with the same semantics, then add it to standin.py)")


xp = _Namespace("xp", ())
for _name in FUNCTIONS:
    setattr(xp, _name, _function(_name))
for _name in UPLOADS:
    setattr(xp, _name, _upload_function(_name))
for _name in METADATA:
    setattr(xp, _name, lambda *args, _f=getattr(np, _name), **kwargs:
            _f(*(a._a if isinstance(a, DeviceArray) else a for a in args), **kwargs))
for _name in CONSTANTS:
    setattr(xp, _name, getattr(np, _name))
xp.ndarray = DeviceArray
xp.__name__ = "ngsgd_mpi.standin.xp"

linalg = _Namespace("xp.linalg", ())
for _name in ("cholesky", "eigh", "inv", "norm"):
    setattr(linalg, _name, lambda *args, _f=getattr(np.linalg, _name), **kwargs:
            _wrap(_f(*_operand(args, "xp.linalg"), **kwargs)))
linalg.LinAlgError = np.linalg.LinAlgError
xp.linalg = linalg


def run_on_device(function, *arrays):
    """Apply a host routine to device arrays as if it were a device kernel (no
    transfer): used for the few library routines the backend maps to cuSOLVER."""
    return _wrap(function(*(a._a for a in arrays)))
