"""Strategies and checks shared by the fuzz tests (see conftest.py for the profiles).

Array values come from a NumPy generator seeded by a drawn integer (fast, and the
shapes, layouts and kinds of values still shrink); the layouts (C, Fortran, strided
views over NaN-filled memory, negative strides, read-only) and special values (NaN,
+-inf, +-1e30, -0.0) are drawn.

Every call goes through :func:`run` or :func:`expect_error`:

- ``run`` checks that no array argument was modified and, with ``finite=True``, that
  no floating-point warning was raised; a watchdog (``faulthandler``) ends the process
  with every thread's traceback if one call takes longer than ``HANG_S`` seconds;
- ``expect_error`` checks that the call raises ``ValueError`` or ``TypeError`` whose
  message names one of the given arguments, and modified nothing.

Rounding bounds: ``TOL[dtype] * scale`` with ``scale`` an a-priori magnitude of the
quantity (a sum of absolute values of the terms), never the size of the arrays.
"""

from __future__ import annotations

import faulthandler
import re
import warnings

import numpy as np
import pytest
from hypothesis import settings
from hypothesis import strategies as st

FLOATS = (np.dtype(np.float32), np.dtype(np.float64))
# dtypes the ops must refuse with a TypeError naming the argument
BAD_DTYPES = (np.int64, np.int32, np.bool_, np.complex128, np.float16, object)
# relative rounding bound for results that go through BLAS products or reordered sums
TOL = {np.dtype(np.float64): 1e-12, np.dtype(np.float32): 2e-5}
HANG_S = 120  # one call on these tiny shapes takes milliseconds
SPECIALS = (np.nan, np.inf, -np.inf, 1e30, -1e30, -0.0)
LAYOUTS = ("c", "f", "strided", "negative", "readonly")


# ---------------------------------------------------------------- drawing values


def examples(factor):
    """Settings for a test that runs ``factor`` times the profile's base number of
    examples (the profile is loaded by conftest.py before the test modules import)."""
    return settings(max_examples=max(1, round(factor * settings.default.max_examples)))


def rngs():
    return st.integers(0, 2**32 - 1).map(np.random.default_rng)


dtypes = st.sampled_from(FLOATS)
bad_dtypes = st.sampled_from(BAD_DTYPES)


def fill(rng, shape, dtype, kind="normal", scale=1.0):
    """Values of ``shape``: ``normal`` (N(0, scale^2)), ``special`` (normal with a few
    NaN / inf / 1e30 / -0.0 entries) or ``zero``."""
    if kind == "zero":
        return np.zeros(shape, dtype=dtype)
    a = np.asarray(rng.standard_normal(shape) * scale).astype(dtype)  # (an array for shape () too, not a scalar)
    if kind == "special" and a.size:
        k = int(rng.integers(1, min(a.size, 4) + 1))
        flat = a.reshape(-1)
        flat[rng.choice(a.size, k, replace=False)] = rng.choice(np.array(SPECIALS), k)
    return a


def relayout(a, how, rng):
    """The same values as ``a`` in another memory layout."""
    if how == "c" or a.ndim == 0:
        return np.array(a, order="C", copy=True)  # (np.ascontiguousarray would make a 0-d array 1-d)
    ax = int(rng.integers(a.ndim))
    if how == "f":
        return np.asfortranarray(a)
    if how == "strided":  # every other element of a NaN-filled buffer: reading outside the view shows
        shape = list(a.shape)
        shape[ax] = 2 * shape[ax] + 1
        big = np.full(shape, np.nan, dtype=a.dtype)
        idx = [slice(None)] * a.ndim
        idx[ax] = slice(1, None, 2)
        big[tuple(idx)] = a
        return big[tuple(idx)]
    if how == "negative":
        return np.flip(np.flip(a, ax).copy(), ax)
    if how == "readonly":
        b = a.copy()
        b.flags.writeable = False
        return b
    raise AssertionError(how)


layouts = st.sampled_from(LAYOUTS)


MODERATE = 1e15  # squares stay finite in float32 (|x| >~ 1.8e19 overflows x * x there)


def finite(*arrays):
    """Every value finite and of moderate size (below ``MODERATE``): the draws whose
    results must be finite and match the oracles."""
    return all(a is None or bool((np.abs(a) < MODERATE).all()) for a in arrays)


# ------------------------------------------------------------- corrupting arguments


def wrong_rank(a, rng):
    """``a`` with one axis more (a leading or trailing 1) or one fewer (the last two merged)."""
    if a.ndim < 2 or rng.integers(2):
        return a[None] if rng.integers(2) else a[..., None]
    return a.reshape(a.shape[:-2] + (a.shape[-2] * a.shape[-1],))


def non_array(a, rng):
    """Not an ndarray: nested lists of the same values, a scalar, a string, a tuple."""
    choices = [lambda: a.tolist(), lambda: 1.0, lambda: "x", lambda: (1.0, 2.0), lambda: a.tolist() if a.ndim else [1.0]]
    return choices[int(rng.integers(len(choices)))]()


# ---------------------------------------------------------------- calling and checking


def _arrays(obj, out):
    if isinstance(obj, np.ndarray):
        out.append(obj)
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            _arrays(o, out)
    elif isinstance(obj, dict):
        for o in obj.values():
            _arrays(o, out)
    return out


def snapshot(*objs):
    return [(a, a.copy()) for a in _arrays(objs, [])]


def assert_unchanged(snap, what="an argument"):
    for a, before in snap:
        assert a.shape == before.shape and a.dtype == before.dtype, f"{what} changed shape or dtype"
        assert a.tobytes() == before.tobytes(), f"{what} of shape {a.shape} was modified in place"


def call(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` under the hang watchdog."""
    faulthandler.dump_traceback_later(HANG_S, exit=True)
    try:
        return fn(*args, **kwargs)
    finally:
        faulthandler.cancel_dump_traceback_later()


def run(fn, *args, finite=False, **kwargs):
    """Call, then check no array argument was modified; ``finite``: no floating-point
    warning may be raised (finite inputs of moderate size)."""
    snap = snapshot(args, kwargs)
    with warnings.catch_warnings():
        # non-finite inputs may warn (inf - inf, 0 * inf); finite ones may not
        warnings.simplefilter("error" if finite else "ignore", RuntimeWarning)
        out = call(fn, *args, **kwargs)
    assert_unchanged(snap)
    return out


def expect_error(names, fn, *args, **kwargs):
    """The call must raise ValueError or TypeError naming one of ``names`` (any other
    exception propagates and fails the test) and modify nothing."""
    snap = snapshot(args, kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with pytest.raises((ValueError, TypeError)) as info:
            call(fn, *args, **kwargs)
    msg = str(info.value)
    assert any(re.search(rf"(?<![\w.]){re.escape(n)}(?!\w)", msg) for n in names), (
        f"{type(info.value).__name__} message does not name any of {names}: {msg!r}"
    )
    assert_unchanged(snap)
    return info.value


# ---------------------------------------------------------------- comparisons


def assert_bitwise(a, b, what):
    """Same dtype, shape, NaN positions, and identical bits everywhere else."""
    assert a.dtype == b.dtype and a.shape == b.shape, f"{what}: {a.dtype}{a.shape} vs {b.dtype}{b.shape}"
    nan_a, nan_b = np.isnan(a), np.isnan(b)
    assert np.array_equal(nan_a, nan_b), f"{what}: NaN at different positions"
    ua = np.ascontiguousarray(a).view(np.uint64 if a.dtype.itemsize == 8 else np.uint32)
    ub = np.ascontiguousarray(b).view(ua.dtype)
    diff = (ua != ub) & ~nan_a
    assert not diff.any(), (
        f"{what}: {int(diff.sum())} elements differ in their bits, first at {np.argwhere(diff)[0].tolist()}: "
        f"{a[tuple(np.argwhere(diff)[0])]!r} vs {b[tuple(np.argwhere(diff)[0])]!r}"
    )


def assert_close(a, b, scale, what, dtype=None):
    """Same dtype and shape, the same NaN and +-inf positions, and the finite values
    within ``TOL[dtype] * scale + tiny`` (``scale``: an a-priori magnitude, a scalar or an
    array broadcasting against ``a``)."""
    dtype = np.dtype(dtype or b.dtype)
    assert a.dtype == b.dtype and a.shape == b.shape, f"{what}: {a.dtype}{a.shape} vs {b.dtype}{b.shape}"
    for test, name in ((np.isnan, "NaN"), (np.isposinf, "+inf"), (np.isneginf, "-inf")):
        assert np.array_equal(test(a), test(b)), f"{what}: {name} at different positions"
    ok = np.isfinite(a) & np.isfinite(b)
    err = np.abs(np.where(ok, a, 0).astype(np.float64) - np.where(ok, b, 0).astype(np.float64))
    # below the normal range (subnormals) relative precision is lost: an absolute floor
    bound = TOL[dtype] * np.broadcast_to(np.asarray(scale, dtype=np.float64), a.shape) + np.finfo(dtype).tiny
    bad = ok & ~(err <= bound)
    assert not bad.any(), (
        f"{what}: {int(bad.sum())} elements differ by more than {TOL[dtype]:g} x scale; worst "
        f"{float(err[bad].max()):.3e} with scale {float(bound[bad][np.argmax(err[bad])] / TOL[dtype]):.3e}"
    )


def assert_finite(what, *arrays):
    for i, a in enumerate(arrays):
        if a is not None:
            assert np.isfinite(a).all(), f"{what}[{i}]: finite inputs gave a non-finite result"


def inner(a, b):
    """<a, b> in float64."""
    return float(np.sum(a.astype(np.float64) * b.astype(np.float64)))
