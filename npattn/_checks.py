"""Argument checks shared by every op and block.

Each check raises ``TypeError`` (wrong kind of object or dtype) or ``ValueError``
(wrong shape or value) with a message that names the argument, what was expected and
what was got, e.g. ``conv2d: weight must have 4 dimensions (O, I/groups, kh, kw), got
shape (3, 3)``.
"""

from __future__ import annotations

import numbers

import numpy as np

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def float_array(op: str, name: str, a, ndim=None, layout: str = "", *, xp=np) -> np.ndarray:
    """Return ``a`` as an ndarray after checking it is float32/float64 with ``ndim`` dims.

    ``ndim`` may be an int or a tuple of allowed ints. ``layout`` (e.g. "(N, C, H, W)") is
    quoted in the message. ``xp``: the array module whose arrays are accepted (NumPy, or
    CuPy for the functions that run on CUDA arrays).
    """
    if not isinstance(a, xp.ndarray):
        raise TypeError(f"{op}: {name} must be a {xp.__name__}.ndarray, got {type(a).__name__}")
    if a.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: {name} must have dtype float32 or float64, got {a.dtype}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if a.ndim not in allowed:
            want = " or ".join(str(d) for d in allowed)
            lay = f" {layout}" if layout else ""
            raise ValueError(
                f"{op}: {name} must have {want} dimensions{lay}, got shape {tuple(a.shape)}"
            )
    return a


def same_dtype(op: str, ref_name: str, ref: np.ndarray, **others) -> None:
    """Every array in ``others`` (None allowed) must share ``ref``'s dtype."""
    for name, a in others.items():
        if a is not None and a.dtype != ref.dtype:
            raise TypeError(
                f"{op}: {name} must have the same dtype as {ref_name} ({ref.dtype}), got {a.dtype}"
            )


def upstream(op: str, name: str, dy, shape: tuple, dtype, *, xp=np) -> np.ndarray:
    """A backward's upstream gradient: a float ndarray of the forward output's ``shape``
    and of the forward's ``dtype`` (so every gradient keeps its argument's dtype);
    ``xp`` as in :func:`float_array`."""
    dy = float_array(op, name, dy, xp=xp)
    if dy.dtype != dtype:
        raise TypeError(f"{op}: {name} must have the forward's dtype {np.dtype(dtype)}, got {dy.dtype}")
    if tuple(dy.shape) != tuple(shape):
        raise ValueError(f"{op}: {name} must have the forward output's shape {tuple(shape)}, got {tuple(dy.shape)}")
    return dy


def shape_is(op: str, name: str, a: np.ndarray, expected: tuple) -> None:
    if tuple(a.shape) != tuple(expected):
        raise ValueError(f"{op}: {name} must have shape {tuple(expected)}, got {tuple(a.shape)}")


def pair(op: str, name: str, v, minimum: int) -> tuple[int, int]:
    """Normalise an int or a pair of ints to a pair, each at least ``minimum``."""
    if isinstance(v, (numbers.Integral,)) and not isinstance(v, bool):
        out = (int(v), int(v))
    elif (
        isinstance(v, (tuple, list))
        and len(v) == 2
        and all(isinstance(e, numbers.Integral) and not isinstance(e, bool) for e in v)
    ):
        out = (int(v[0]), int(v[1]))
    else:
        raise TypeError(f"{op}: {name} must be an int or a pair of ints, got {v!r}")
    if out[0] < minimum or out[1] < minimum:
        raise ValueError(f"{op}: {name} must be >= {minimum}, got {v!r}")
    return out


def positive_int(op: str, name: str, v, minimum: int = 1) -> int:
    if not isinstance(v, numbers.Integral) or isinstance(v, bool):
        raise TypeError(f"{op}: {name} must be an int, got {v!r}")
    if v < minimum:
        raise ValueError(f"{op}: {name} must be >= {minimum}, got {v}")
    return int(v)


def conv_out_size(op: str, size: int, k: int, s: int, p: int, d: int, axis: str) -> int:
    """Output length of a convolution along one axis, as torch computes it."""
    out = (size + 2 * p - d * (k - 1) - 1) // s + 1
    if out < 1:
        raise ValueError(
            f"{op}: output {axis} would be {out} (input {axis} {size}, kernel {k}, stride {s}, "
            f"padding {p}, dilation {d}); expected an output size of at least 1"
        )
    return out
