"""Mean and maximum over chosen axes, each with its backward.

The maximum's gradient at ties is a named choice, ``max_grad``: ``"split"`` (the
default) shares it evenly among the equal elements, as ``torch.amax``; ``"first"`` gives
it all to the first maximal element in row-major order of the reduced axes, as
``torch.max(x, dim)`` and ``max_pool2d`` on the CPU (which return one index) do.
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


MAX_GRADS = ("split", "first")


def check_max_grad(op, max_grad):
    """``max_grad`` checked: one of :data:`MAX_GRADS`."""
    if not isinstance(max_grad, str):
        raise TypeError(f"{op}: max_grad must be a str, one of {MAX_GRADS}, got {max_grad!r}")
    if max_grad not in MAX_GRADS:
        raise ValueError(f"{op}: max_grad must be one of {MAX_GRADS}, got {max_grad!r}")
    return max_grad


@dataclass(frozen=True)
class AmaxCache:
    share: np.ndarray  # shape of x: the weight of each element in dy (see amax_forward), 0 off the maxima
    kept: tuple  # shape of y with the reduced axes kept as 1
    out_shape: tuple  # shape of y


def amax_forward(x, axis, keepdims=True, max_grad="split"):
    """``y = max(x, axis)``, as ``torch.amax(x, dim=axis, keepdim=keepdims)``.

    ``max_grad``: ``"split"`` (default) or ``"first"``, how the gradient treats ties (below).

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

    ``max_grad="first"`` gives the whole gradient to one element, the first maximal one
    in row-major order of the reduced axes (the index ``torch.max(x, dim)`` returns, and
    the one ``max_pool2d``'s CPU kernel keeps)::

        dx[i] = dy[k(i)] * [i == i*(k(i))],    i*(k) = min{i in group k : x[i] == y[k]}

    also a subgradient (a one-sided derivative), but not what central differences give at
    a tie: finite differences check it only where the maximum is attained once, and at
    ties it is checked against torch. Away from ties the two choices are the same numbers.
    A group holding a NaN has the maximum NaN; its gradient goes to the first NaN, as
    torch's index does (``np.argmax`` also stops at the first NaN), the others get 0.
    """
    op = "amax"
    x = float_array(op, "x", x)
    axes = _axes(op, x, axis)
    keepdims = _keepdims(op, keepdims)
    max_grad = check_max_grad(op, max_grad)
    y_kept = x.max(axis=axes, keepdims=True)  # shape of x, reduced axes of size 1
    if max_grad == "first":
        share = _first_max_share(x, axes)  # shape of x: one 1 per group
    else:
        is_max = x == y_kept  # shape of x
        count = is_max.sum(axis=axes, keepdims=True)  # maxima per group
        with np.errstate(divide="ignore", invalid="ignore"):  # count 0 only in a group holding NaN: 0/0
            share = is_max / count.astype(x.dtype)
        share = share.astype(x.dtype, copy=False)
    y = y_kept if keepdims else y_kept.reshape([s for a, s in enumerate(y_kept.shape) if a not in axes])
    return y, AmaxCache(share, y_kept.shape, y.shape)


def _first_max_share(x, axes):
    """One-hot over each group of the reduced ``axes``: 1 at the first maximal element in
    row-major order of those axes (the first NaN if there is one), 0 elsewhere."""
    kept = [a for a in range(x.ndim) if a not in axes]
    moved = np.transpose(x, kept + list(axes))  # (kept..., reduced...) in row-major order
    m = int(np.prod([x.shape[a] for a in axes]))  # not -1: ambiguous when a kept axis is empty
    flat = moved.reshape(moved.shape[: len(kept)] + (m,))  # (kept..., m)
    idx = np.argmax(flat, axis=-1)[..., None]  # first maximum (first NaN)
    one_hot = np.zeros(flat.shape, dtype=x.dtype)
    np.put_along_axis(one_hot, idx, x.dtype.type(1), axis=-1)
    back = np.argsort(kept + list(axes))  # inverse permutation
    return np.transpose(one_hot.reshape(moved.shape), back)


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


@dataclass(frozen=True)
class L2NormCache:
    share: np.ndarray  # shape of x: x / ||x|| of its group, 0 in a group that is all zeros
    kept: tuple  # shape of y with the reduced axes kept as 1
    out_shape: tuple  # shape of y


def l2_norm_forward(x, axis, keepdims=True):
    """``y = sqrt(sum(x^2, axis))``, the L2 norm of each group: CBAM's ``"lp"`` pool, as
    ``torch.nn.functional.lp_pool2d(x, 2, (H, W))`` computes it over a whole image.

    Notes
    -----
    Forward, per group k of elements reduced into one output::

        y[k] = sqrt(sum_{i in group k} x[i]^2)

    Backward. Away from a group that is all zeros the norm is smooth::

        dx[i] = dy[k(i)] * x[i] / y[k(i)]

    At y = 0 (every element of the group 0) the norm has a kink: its subgradients fill
    the unit ball, and npattn returns 0 there, the gradient torch's ``lp_pool2d`` gives
    (its ``relu`` of the pooled power passes no gradient at 0). A central difference at
    that point gives ``(|e| - |-e|) / 2e = 0`` along any direction, so finite differences
    agree with it too. A NaN or an infinity in a group gives a NaN gradient to its elements.
    """
    op = "l2_norm"
    x = float_array(op, "x", x)
    axes = _axes(op, x, axis)
    keepdims = _keepdims(op, keepdims)
    y_kept = np.sqrt(np.square(x).sum(axis=axes, keepdims=True))  # shape of x, reduced axes of size 1
    with np.errstate(divide="ignore", invalid="ignore"):
        share = np.where(y_kept == 0, x.dtype.type(0), x / y_kept).astype(x.dtype, copy=False)  # shape of x
    y = y_kept if keepdims else y_kept.reshape([s for a, s in enumerate(y_kept.shape) if a not in axes])
    return y, L2NormCache(share, y_kept.shape, y.shape)


def l2_norm_backward(dy, cache: L2NormCache):
    """Gradient of :func:`l2_norm_forward`: dict with ``x``."""
    dy = _check_reduced_grad("l2_norm_backward", dy, cache.out_shape, cache.share.dtype)
    return {"x": cache.share * dy.reshape(cache.kept)}  # shape of x


@dataclass(frozen=True)
class LogSumExpCache:
    share: np.ndarray  # shape of x: softmax of x over its group
    kept: tuple  # shape of y with the reduced axes kept as 1
    out_shape: tuple  # shape of y


def logsumexp_forward(x, axis, keepdims=True):
    """``y = log(sum(exp(x), axis))``: CBAM's ``"lse"`` pool, computed as its official
    code does, shifted by the group's maximum.

    Notes
    -----
    Forward, per group k, with s[k] = max_{i in group k} x[i]::

        y[k] = s[k] + log(sum_{i in group k} exp(x[i] - s[k]))

    The shift changes no value in exact arithmetic and keeps every exponent <= 0 (no
    overflow; the largest term is exp(0) = 1, so the log's argument is >= 1).

    Backward. The log-sum-exp is smooth everywhere; its gradient is the softmax::

        dx[i] = dy[k(i)] * exp(x[i] - y[k(i)])

    The maximum s is only a shift: the derivative of y in s is ``1 - sum_i softmax_i =
    0``, so ties of the maximum do not matter and there is no kink. (Autograd through the
    official code sends the rounding residue of ``1 - sum softmax``, a few ulps of dy, to
    the first maximum; npattn returns the exact derivative.) A NaN in a group gives NaN;
    a group whose maximum is +inf gives y = +inf and a NaN gradient, as torch.
    """
    op = "logsumexp"
    x = float_array(op, "x", x)
    axes = _axes(op, x, axis)
    keepdims = _keepdims(op, keepdims)
    s = x.max(axis=axes, keepdims=True)  # shape of x, reduced axes of size 1
    with np.errstate(invalid="ignore"):
        e = np.exp(x - s)  # shape of x, in (0, 1]
    y_kept = s + np.log(e.sum(axis=axes, keepdims=True))  # shape of y with the reduced axes kept
    with np.errstate(invalid="ignore"):
        share = np.exp(x - y_kept).astype(x.dtype, copy=False)  # softmax over the group
    y = y_kept if keepdims else y_kept.reshape([s_ for a, s_ in enumerate(y_kept.shape) if a not in axes])
    return y, LogSumExpCache(share, y_kept.shape, y.shape)


def logsumexp_backward(dy, cache: LogSumExpCache):
    """Gradient of :func:`logsumexp_forward`: dict with ``x``."""
    dy = _check_reduced_grad("logsumexp_backward", dy, cache.out_shape, cache.share.dtype)
    return {"x": cache.share * dy.reshape(cache.kept)}  # shape of x
