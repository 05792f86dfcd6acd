"""A stand-in for CuPy in tests without a GPU: device arrays that refuse to become NumPy.

npattn's device path is written once against an array module ``xp`` (NumPy or CuPy).
Its characteristic bug is a NumPy function left on that path (``np.zeros``,
``np.concatenate``, ``np.matmul``, ``np.asarray``, a NumPy parameter added to a device
array): with CuPy it either fails or silently copies to the host and back. CuPy cannot
run without a GPU, so these tests put this module in its place.

``FakeDeviceArray`` holds a NumPy array and is not an ``np.ndarray``:

* it has ``__cuda_array_interface__``, so ``npattn._xp.is_cuda_array`` takes it for a
  CUDA array (its data pointer is host memory: nothing may dereference it, and nothing in
  these tests does), and ``__cuda_ndarray__``, Numba's CUDA simulator's mark of a device
  array (``npattn/sampling/cuda.py`` checks arrays with it under the simulator);
* its class lives in a module named ``cupy...``, so ``npattn/sampling/cuda.py`` treats it
  as a CuPy array, exactly as it treats real ones: outputs allocated with ``cupy.empty`` /
  ``cupy.zeros``, the kernels launched on the arrays themselves (the simulator's kernels
  then index them element by element);
* ``__array__`` raises and ``__array_ufunc__ = None``: any NumPy function or operator
  applied to it (``np.matmul``, ``np.concatenate``, ``ndarray + it``, ``ndarray += it``,
  ``ndarray[...] = it``) raises ``TypeError`` instead of computing on the host;
* its operators and the namespace's functions refuse NumPy arrays as operands (host data
  in a device computation; CuPy refuses them too); Python and NumPy scalars are fine.

:func:`make_namespace` builds the ``cupy`` module: the functions npattn calls on the
device path, each computed with NumPy on the wrapped data. Host to device goes only
through ``asarray(numpy array)``, counted in ``ns.uploads`` (shapes); device to host only
through ``.get()`` / ``asnumpy``, counted in ``ns.downloads``. A function npattn calls
that is missing here raises ``AttributeError``: add it only after checking that CuPy has
it with NumPy's semantics (CuPy's reference documentation).

:func:`install` (with pytest's ``monkeypatch``) makes it npattn's CuPy for one test:
``npattn._xp``'s cached module and ``sys.modules["cupy"]`` (``sampling/cuda.py`` imports
``cupy`` by name when it meets a CuPy array).
"""

from __future__ import annotations

import sys
import types

import numpy as np

_SCALARS = (bool, int, float, complex, np.generic)


class HostLeak(TypeError):
    """A NumPy array met a device array without an explicit copy."""


def _operand(v):
    """The NumPy data behind a device operand; scalars pass; anything else (a NumPy array
    above all) raises ``HostLeak``."""
    if isinstance(v, FakeDeviceArray):
        return v._a
    if isinstance(v, _SCALARS):
        return v
    raise HostLeak(
        f"{type(v).__name__} operand in a device computation: host data must be uploaded explicitly (cupy.asarray)"
    )


def _wrap(r):
    return FakeDeviceArray(r) if isinstance(r, np.ndarray) else r


def _index(idx):
    parts = idx if isinstance(idx, tuple) else (idx,)
    for p in parts:
        if isinstance(p, (np.ndarray, FakeDeviceArray, list)):
            raise HostLeak(f"array index {type(p).__name__}: npattn's device path indexes with ints and slices only")
    return idx


class FakeDeviceArray:
    """A device array for tests (see the module docstring)."""

    __module__ = "cupy._fake_device"  # sampling/cuda.py: "a CuPy array"
    __array_ufunc__ = None  # NumPy ufuncs and ndarray operators refuse it
    __cuda_ndarray__ = True  # Numba's CUDA simulator: "a device array"

    def __init__(self, data):
        if not isinstance(data, np.ndarray):
            raise TypeError(f"FakeDeviceArray wraps a NumPy array, got {type(data).__name__}")
        self._a = data

    # ---- what CuPy arrays have ----------------------------------------------------
    shape = property(lambda self: self._a.shape)
    dtype = property(lambda self: self._a.dtype)
    ndim = property(lambda self: self._a.ndim)
    size = property(lambda self: self._a.size)
    strides = property(lambda self: self._a.strides)
    itemsize = property(lambda self: self._a.itemsize)

    @property
    def flags(self):  # CuPy's ndarray.flags: c_contiguous, f_contiguous, owndata
        f = self._a.flags
        return types.SimpleNamespace(c_contiguous=f.c_contiguous, f_contiguous=f.f_contiguous, owndata=f.owndata)

    @property
    def __cuda_array_interface__(self):
        a = self._a
        return {
            "shape": a.shape,
            "typestr": a.dtype.str,
            "data": (a.ctypes.data, False),
            "strides": None if a.flags.c_contiguous else a.strides,
            "version": 3,
        }

    def __array__(self, *args, **kwargs):
        raise HostLeak("implicit conversion of a device array to a NumPy array (use .get() or cupy.asnumpy)")

    def __iter__(self):
        raise HostLeak("iteration over a device array")

    def __len__(self):
        return len(self._a)

    def __repr__(self):
        return f"FakeDeviceArray(shape={self.shape}, dtype={self.dtype})"

    def __getitem__(self, idx):
        return _wrap(self._a[_index(idx)])  # a full index gives a scalar (the simulator's kernels read them)

    def __setitem__(self, idx, value):
        self._a[_index(idx)] = _operand(value)

    def reshape(self, *shape, order="C"):
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = tuple(shape[0])
        return FakeDeviceArray(self._a.reshape(shape, order=order))  # a view where NumPy (and CuPy) give one

    def transpose(self, *axes):
        return FakeDeviceArray(self._a.transpose(*axes))

    def sum(self, axis=None, dtype=None, keepdims=False):
        return FakeDeviceArray(np.asarray(self._a.sum(axis=axis, dtype=dtype, keepdims=keepdims)))

    def astype(self, dtype, copy=True):
        return FakeDeviceArray(self._a.astype(dtype, copy=copy))

    def copy(self):
        return FakeDeviceArray(self._a.copy())

    def get(self):
        """Device to host, explicitly (CuPy's ``ndarray.get``)."""
        _NS.downloads.append(self.shape)
        return self._a.copy()

    # ---- operators: device operands and scalars only ------------------------------
    def _binary(self, other, fn):
        return _wrap(fn(self._a, _operand(other)))

    def _inplace(self, other, fn):
        fn(self._a, _operand(other), out=self._a)
        return self

    __add__ = lambda self, o: self._binary(o, np.add)
    __radd__ = lambda self, o: self._binary(o, lambda a, b: np.add(b, a))
    __sub__ = lambda self, o: self._binary(o, np.subtract)
    __rsub__ = lambda self, o: self._binary(o, lambda a, b: np.subtract(b, a))
    __mul__ = lambda self, o: self._binary(o, np.multiply)
    __rmul__ = lambda self, o: self._binary(o, lambda a, b: np.multiply(b, a))
    __truediv__ = lambda self, o: self._binary(o, np.true_divide)
    __rtruediv__ = lambda self, o: self._binary(o, lambda a, b: np.true_divide(b, a))
    __iadd__ = lambda self, o: self._inplace(o, np.add)
    __isub__ = lambda self, o: self._inplace(o, np.subtract)
    __imul__ = lambda self, o: self._inplace(o, np.multiply)
    __itruediv__ = lambda self, o: self._inplace(o, np.true_divide)

    def __neg__(self):
        return FakeDeviceArray(-self._a)


def _dev(name, a):
    if not isinstance(a, FakeDeviceArray):
        raise HostLeak(f"cupy.{name}: {type(a).__name__} argument, expected a device array")
    return a._a


def _out(name, out):
    return None if out is None else _dev(name, out)


def make_namespace():
    """A fresh fake ``cupy`` module (see the module docstring)."""
    ns = types.ModuleType("cupy")
    ns.__doc__ = "tests/_fake_cupy.py: a CuPy stand-in whose arrays refuse to become NumPy arrays"
    ns.ndarray = FakeDeviceArray
    ns.uploads = []  # shapes of the host arrays copied to the device (asarray)
    ns.downloads = []  # shapes of the device arrays copied to the host (.get, asnumpy)

    def asarray(a, dtype=None):
        if isinstance(a, FakeDeviceArray):
            return a if dtype is None or np.dtype(dtype) == a.dtype else a.astype(dtype)
        if isinstance(a, np.ndarray):  # the explicit upload
            ns.uploads.append(a.shape)
            return FakeDeviceArray(np.array(a, dtype=dtype, copy=True))
        raise TypeError(f"cupy.asarray (fake): {type(a).__name__} is neither a NumPy nor a fake device array")

    def asnumpy(a):
        return a.get() if isinstance(a, FakeDeviceArray) else np.asarray(a)

    def ascontiguousarray(a, dtype=None):
        return FakeDeviceArray(np.ascontiguousarray(_dev("ascontiguousarray", a), dtype=dtype))

    def _new(shape, dtype, fill):
        dtype = np.dtype(float if dtype is None else dtype)
        return FakeDeviceArray(np.full(shape, fill, dtype=dtype))

    def empty(shape, dtype=float):
        # uninitialised on a GPU: NaN here for float dtypes, so a read before a write shows
        return _new(shape, dtype, np.nan if np.dtype(dtype).kind == "f" else 0)

    def zeros(shape, dtype=float):
        return _new(shape, dtype, 0)

    def empty_like(a, dtype=None):
        a = _dev("empty_like", a)
        return empty(a.shape, a.dtype if dtype is None else dtype)

    def zeros_like(a, dtype=None):
        a = _dev("zeros_like", a)
        return zeros(a.shape, a.dtype if dtype is None else dtype)

    def matmul(a, b, out=None):
        r = np.matmul(_dev("matmul", a), _dev("matmul", b), out=_out("matmul", out))
        return out if out is not None else FakeDeviceArray(r)

    def einsum(subscripts, *operands):  # CuPy's einsum has no out=
        return FakeDeviceArray(np.asarray(np.einsum(subscripts, *(_dev("einsum", o) for o in operands))))

    def pad(a, pad_width, mode="constant"):
        return FakeDeviceArray(np.pad(_dev("pad", a), pad_width, mode=mode))

    def concatenate(arrays, axis=0):
        return FakeDeviceArray(np.concatenate([_dev("concatenate", a) for a in arrays], axis=axis))

    def stack(arrays, axis=0):
        return FakeDeviceArray(np.stack([_dev("stack", a) for a in arrays], axis=axis))

    def meshgrid(*xs, indexing="xy"):
        return [FakeDeviceArray(m) for m in np.meshgrid(*(_dev("meshgrid", x) for x in xs), indexing=indexing)]

    def arange(*args, dtype=None):
        return FakeDeviceArray(np.arange(*args, dtype=dtype))

    def _ufunc(name, fn):
        def f(x, out=None):
            r = fn(_dev(name, x), out=_out(name, out))
            return out if out is not None else FakeDeviceArray(r)

        f.__name__ = name
        return f

    for fn_ in (asarray, asnumpy, ascontiguousarray, empty, zeros, empty_like, zeros_like, matmul, einsum, pad,
                concatenate, stack, meshgrid, arange):
        setattr(ns, fn_.__name__, fn_)
    for name in ("negative", "exp", "reciprocal"):
        setattr(ns, name, _ufunc(name, getattr(np, name)))
    return ns


_NS = make_namespace()  # the module FakeDeviceArray.get reports to; install() gives a fresh one


def install(monkeypatch):
    """Make a fresh fake ``cupy`` npattn's CuPy for the test; returns it."""
    import npattn._xp

    ns = make_namespace()
    monkeypatch.setattr(sys.modules[__name__], "_NS", ns)
    monkeypatch.setattr(npattn._xp, "_CUPY", ns)
    monkeypatch.setitem(sys.modules, "cupy", ns)
    return ns


def to_device(a):
    """A test's own upload (not counted in ``uploads``)."""
    return FakeDeviceArray(np.array(a, copy=True))
