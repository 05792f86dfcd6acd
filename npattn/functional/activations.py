"""Element-wise activations and softmax, each with its backward.

Every backward follows PyTorch's choice at the kinks: ``relu'(0) = 0`` and
``abs'(0) = 0``.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import numpy as np

from .._checks import float_array, upstream
from .._xp import array_module, like_forward, namespace


@dataclass(frozen=True)
class ReluCache:
    positive: np.ndarray  # bool, shape of x: x > 0
    dtype: np.dtype = None  # dtype of x


def relu_forward(x):
    """``y = max(x, 0)``. Backward: ``dx = dy * [x > 0]``.

    (``np.maximum`` and a product with the mask, not ``np.where``: the same numbers, NaN
    propagated as ``torch.relu`` does, and many times faster on a random sign pattern.)
    """
    x = float_array("relu", "x", x)
    positive = x > 0
    return np.maximum(x, x.dtype.type(0)), ReluCache(positive, x.dtype)


def relu_backward(dy, cache: ReluCache):
    dy = upstream("relu_backward", "dy", dy, cache.positive.shape, cache.dtype or dy.dtype)
    dx = dy * cache.positive  # shape of x
    if not np.isfinite(dy).all():  # 0 * inf would be NaN; PyTorch's gradient there is 0
        dx = np.where(cache.positive, dy, dy.dtype.type(0))
    return {"x": dx}


@dataclass(frozen=True)
class SigmoidCache:
    y: np.ndarray  # shape of x: sigmoid(x)


def sigmoid(x):
    """Logistic function ``1 / (1 + exp(-x))``, PyTorch's formula, safe for large |x|.

    For very negative x, ``exp(-x)`` overflows to inf and ``1 / inf = 0``, the correct
    limit (the overflow is expected and silenced); for x >= 0 the exponent is <= 0.
    Relative accuracy is kept for negative x, where ``1 - sigmoid(-x)`` would cancel.
    (No ``np.where`` over the two signs: it is ~10x slower on a random sign pattern.)
    ``x``: a NumPy or a CuPy array; the result is of the same module.
    """
    xp = array_module(x)
    e = xp.negative(x, out=xp.empty_like(x))  # one buffer, updated in place: fewer fresh pages
    with np.errstate(over="ignore"):
        xp.exp(e, out=e)  # exp(-x) in (0, inf]
    e += 1
    return xp.reciprocal(e, out=e)


def sigmoid_forward(x):
    """``y = 1 / (1 + exp(-x))``. Backward: ``dx = dy * y * (1 - y)``.

    ``x``: a NumPy array or a CUDA array (viewed as CuPy; ``y`` and the backward's
    ``dx`` are then CuPy arrays, and the backward's ``dy`` must be a CUDA array too)."""
    xp, a = namespace("sigmoid", {"x": x})
    x = float_array("sigmoid", "x", a["x"], xp=xp)
    y = sigmoid(x)
    return y, SigmoidCache(y)


def sigmoid_backward(dy, cache: SigmoidCache):
    y = cache.y
    xp = array_module(y)
    dy = upstream("sigmoid_backward", "dy", like_forward("sigmoid_backward", "dy", dy, xp), y.shape, y.dtype, xp=xp)
    return {"x": dy * y * (1 - y)}  # shape of x


@dataclass(frozen=True)
class TanhCache:
    y: np.ndarray  # shape of x: tanh(x)


def tanh_forward(x):
    """``y = tanh(x)``. Backward: ``dx = dy * (1 - y^2)``."""
    x = float_array("tanh", "x", x)
    y = np.tanh(x)
    return y, TanhCache(y)


def tanh_backward(dy, cache: TanhCache):
    y = cache.y
    dy = upstream("tanh_backward", "dy", dy, y.shape, y.dtype)
    return {"x": dy * (1 - y * y)}  # shape of x


@dataclass(frozen=True)
class AbsCache:
    sign: np.ndarray  # shape of x: sign(x), 0 at 0


def abs_forward(x):
    """``y = |x|``. Backward: ``dx = dy * sign(x)`` with ``sign(0) = 0`` (as PyTorch)."""
    x = float_array("abs", "x", x)
    return np.abs(x), AbsCache(np.sign(x))


def abs_backward(dy, cache: AbsCache):
    dy = upstream("abs_backward", "dy", dy, cache.sign.shape, cache.sign.dtype)
    return {"x": dy * cache.sign}  # shape of x


@dataclass(frozen=True)
class SoftmaxCache:
    y: np.ndarray  # shape of x: softmax(x, axis)
    axis: int


def softmax_forward(x, axis=-1):
    """Softmax along ``axis``.

    Notes
    -----
    Forward (shifted by the maximum so no exponent is positive)::

        y_k = exp(x_k - max x) / sum_j exp(x_j - max x)

    Backward: the Jacobian is ``diag(y) - y y^T``, so::

        dx_k = y_k (dy_k - sum_j dy_j y_j)
    """
    x = float_array("softmax", "x", x)
    if x.ndim == 0:
        raise ValueError("softmax: x must have at least 1 dimension, got a 0-d array")
    if not isinstance(axis, numbers.Integral) or isinstance(axis, bool):
        raise TypeError(f"softmax: axis must be an int, got {axis!r}")
    if not -x.ndim <= axis < x.ndim:
        raise ValueError(f"softmax: axis must be in [{-x.ndim}, {x.ndim}) for x of shape {tuple(x.shape)}, got {axis}")
    axis = axis % x.ndim
    e = np.exp(x - x.max(axis=axis, keepdims=True, initial=-np.inf))  # initial: an empty axis has no maximum
    y = e / e.sum(axis=axis, keepdims=True)
    return y, SoftmaxCache(y, axis)


def softmax_backward(dy, cache: SoftmaxCache):
    y = cache.y
    dy = upstream("softmax_backward", "dy", dy, y.shape, y.dtype)
    dot = (dy * y).sum(axis=cache.axis, keepdims=True)  # shape of x with axis of size 1
    return {"x": y * (dy - dot)}  # shape of x
