"""Mean and maximum over chosen axes, each with its backward.

The maximum follows ``torch.amax``: where several elements share the maximum, the
gradient is split evenly among them (``torch.max(dim)``, which returns one index, would
give it all to one element).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .._checks import float_array


def _axes(op, x, axis):
    """Normalise an int or a tuple of ints to a sorted tuple of distinct non-negative axes."""
    items = (axis,) if isinstance(axis, (int, np.integer)) and not isinstance(axis, bool) else axis
    if not isinstance(items, tuple) or not items or not all(
        isinstance(a, (int, np.integer)) and not isinstance(a, bool) for a in items
    ):
        raise TypeError(f"{op}: axis must be an int or a non-empty tuple of ints, got {axis!r}")
    out = []
    for a in items:
        if not -x.ndim <= a < x.ndim:
            raise ValueError(f"{op}: axis must be in [{-x.ndim}, {x.ndim}) for x of shape {tuple(x.shape)}, got {axis!r}")
        out.append(int(a) % x.ndim)
    if len(set(out)) != len(out):
        raise ValueError(f"{op}: axis must not repeat an axis, got {axis!r}")
    if any(x.shape[a] == 0 for a in out):
        raise ValueError(f"{op}: cannot reduce over an empty axis, got x of shape {tuple(x.shape)} and axis {axis!r}")
    return tuple(sorted(out))


@dataclass(frozen=True)
class MeanCache:
    x_shape: tuple  # shape of x
    axes: tuple  # the reduced axes, sorted, non-negative
    out_shape: tuple  # shape of y
    dtype: np.dtype = None  # dtype of x


def mean_forward(x, axis, keepdims=True):
    """``y = mean(x, axis)``, as ``torch.mean(x, dim=axis, keepdim=keepdims)``.

    Notes
    -----
    Forward, with m the number of elements reduced into each output::

        y[k] = (1 / m) sum_{i in group k} x[i]

    Backward: each input is in exactly one group, with weight 1 / m::

        dx[i] = dy[k(i)] / m          (dy broadcast back over the reduced axes)
    """
    op = "mean"
    x = float_array(op, "x", x)
    axes = _axes(op, x, axis)
    keepdims = _keepdims(op, keepdims)
    y = x.mean(axis=axes, keepdims=keepdims)
    return y, MeanCache(x.shape, axes, y.shape, x.dtype)


def mean_backward(dy, cache: MeanCache):
    """Gradient of :func:`mean_forward`: dict with ``x``."""
    kept = tuple(1 if a in cache.axes else s for a, s in enumerate(cache.x_shape))
    dy = _check_reduced_grad("mean_backward", dy, cache.out_shape, cache.dtype)
    m = int(np.prod([cache.x_shape[a] for a in cache.axes]))
    d_x = np.broadcast_to(dy.reshape(kept) * dy.dtype.type(1.0 / m), cache.x_shape).copy()  # shape of x
    return {"x": d_x}


@dataclass(frozen=True)
class AmaxCache:
    share: np.ndarray  # shape of x: [x == max] / (number of maxima in the group), 0 elsewhere
    kept: tuple  # shape of y with the reduced axes kept as 1
    out_shape: tuple  # shape of y


def amax_forward(x, axis, keepdims=True):
    """``y = max(x, axis)``, as ``torch.amax(x, dim=axis, keepdim=keepdims)``.

    Notes
    -----
    Forward, per group k of elements reduced into one output::

        y[k] = max_{i in group k} x[i]

    Backward. The maximum is differentiable where it is attained once; where t elements
    of a group equal the maximum, ``torch.amax`` splits the gradient evenly among them
    (the average of the one-sided choices, a subgradient), and so does npattn::

        dx[i] = dy[k(i)] * [x[i] == y[k(i)]] / t[k(i)],    t[k] = #{i in group k : x[i] == y[k]}

    With t = 2 this equals the central difference (f(+e) - f(-e)) / 2e of the maximum
    along any direction, so finite differences check it exactly at two-way ties. A group
    holding a NaN has the maximum NaN and a NaN gradient for every element (as torch).
    """
    op = "amax"
    x = float_array(op, "x", x)
    axes = _axes(op, x, axis)
    keepdims = _keepdims(op, keepdims)
    y_kept = x.max(axis=axes, keepdims=True)  # shape of x, reduced axes of size 1
    is_max = x == y_kept  # shape of x
    count = is_max.sum(axis=axes, keepdims=True)  # maxima per group
    with np.errstate(divide="ignore", invalid="ignore"):  # count 0 only in a group holding NaN: 0/0
        share = is_max / count.astype(x.dtype)
    share = share.astype(x.dtype, copy=False)
    y = y_kept if keepdims else y_kept.reshape([s for a, s in enumerate(y_kept.shape) if a not in axes])
    return y, AmaxCache(share, y_kept.shape, y.shape)


def amax_backward(dy, cache: AmaxCache):
    """Gradient of :func:`amax_forward`: dict with ``x``."""
    dy = _check_reduced_grad("amax_backward", dy, cache.out_shape, cache.share.dtype)
    return {"x": cache.share * dy.reshape(cache.kept)}  # shape of x


def _keepdims(op, keepdims):
    if not isinstance(keepdims, (bool, np.bool_)):
        raise TypeError(f"{op}: keepdims must be a bool, got {keepdims!r}")
    return bool(keepdims)


def _check_reduced_grad(op, dy, out_shape, dtype):
    """dy: a float array of the forward output's shape and of x's dtype (``dtype``; None
    for a cache made before it was recorded)."""
    dy = float_array(op, "dy", dy)
    if dtype is not None and dy.dtype != dtype:
        raise TypeError(f"{op}: dy must have the forward's dtype {np.dtype(dtype)}, got {dy.dtype}")
    if tuple(dy.shape) != tuple(out_shape):
        raise ValueError(f"{op}: dy must have the shape of the forward's output {tuple(out_shape)}, got {tuple(dy.shape)}")
    return dy
