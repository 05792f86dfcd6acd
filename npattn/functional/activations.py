"""Element-wise activations and softmax, each with its backward.

Every backward follows PyTorch's choice at the kinks: ``relu'(0) = 0``,
``abs'(0) = 0``, and ``hard_sigmoid'`` 0 at -3 and 3.
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


# ---- the gates and activations of timm's SEModule (``act``, ``gate``) ------------------


@dataclass(frozen=True)
class SiluCache:
    x: np.ndarray  # the input
    s: np.ndarray  # shape of x: sigmoid(x)


def silu_forward(x):
    """``y = x * sigmoid(x)`` (SiLU, "swish"), as ``torch.nn.SiLU``.

    Notes
    -----
    With s = sigmoid(x) and s' = s (1 - s)::

        y  = x s
        dx = dy * (s + x s (1 - s)) = dy * s * (1 + x (1 - s))

    Smooth everywhere. For very negative x, s underflows to 0 and so do y and dx.
    """
    x = float_array("silu", "x", x)
    s = sigmoid(x)
    return x * s, SiluCache(x, s)


def silu_backward(dy, cache: SiluCache):
    x, s = cache.x, cache.s
    dy = upstream("silu_backward", "dy", dy, x.shape, x.dtype)
    return {"x": dy * s * (1 + x * (1 - s))}  # shape of x


@dataclass(frozen=True)
class GeluCache:
    x: np.ndarray  # the input
    cdf: np.ndarray  # shape of x: Phi(x), the standard normal distribution function


def gelu_forward(x):
    """``y = x * Phi(x)`` with the exact normal distribution function (``erf``), as
    ``torch.nn.GELU(approximate="none")`` and timm's ``GELU``.

    Notes
    -----
    With Phi(x) = (1 + erf(x / sqrt 2)) / 2 and the normal density
    phi(x) = exp(-x^2 / 2) / sqrt(2 pi) = Phi'(x)::

        y  = x Phi(x)
        dx = dy * (Phi(x) + x phi(x))

    Smooth everywhere (no tanh approximation). ``erf`` is ``scipy.special.erf``.
    """
    from scipy.special import erf  # imported here: ``import npattn`` stays fast

    x = float_array("gelu", "x", x)
    dt = x.dtype.type
    cdf = (dt(0.5) * (dt(1) + erf(x * dt(1 / np.sqrt(2))))).astype(x.dtype, copy=False)
    return x * cdf, GeluCache(x, cdf)


def gelu_backward(dy, cache: GeluCache):
    x = cache.x
    dy = upstream("gelu_backward", "dy", dy, x.shape, x.dtype)
    dt = x.dtype.type
    pdf = np.exp(dt(-0.5) * x * x) * dt(1 / np.sqrt(2 * np.pi))  # shape of x: phi(x)
    return {"x": dy * (cache.cdf + x * pdf)}  # shape of x


HARD_SIGMOID_SLOPE = 1.0 / 6.0  # the derivative inside (-3, 3), exact (see hard_sigmoid_forward)


@dataclass(frozen=True)
class HardSigmoidCache:
    slope: np.ndarray  # shape of x: 1/6 for -3 < x < 3, else 0


def hard_sigmoid_forward(x):
    """``y = relu6(x + 3) / 6``, as ``torch.nn.Hardsigmoid`` (timm's ``"hard_sigmoid"``).

    Notes
    -----
    Forward, piecewise::

        y = 0              x <= -3
        y = x / 6 + 1/2    -3 < x < 3
        y = 1              x >= 3

    Backward, ``dx = dy * slope`` with slope = 1/6 strictly inside (-3, 3) and 0 outside
    and at the two kinks, PyTorch's choice (the one-sided slopes are 0 and 1/6 at each).

    PyTorch's CPU kernel multiplies by the float32 constant ``1.0f / 6.0f`` even for
    float64 tensors, so its float64 gradient is 1/6 (1 + 2.98e-8); npattn keeps the exact
    1/6 (``HARD_SIGMOID_SLOPE``), and its cross-check against timm accounts for the constant.
    """
    x = float_array("hard_sigmoid", "x", x)
    dt = x.dtype.type
    y = np.clip(x + dt(3), dt(0), dt(6)) / dt(6)
    slope = np.where((x > -3) & (x < 3), dt(HARD_SIGMOID_SLOPE), dt(0)).astype(x.dtype, copy=False)
    return y, HardSigmoidCache(slope)


def hard_sigmoid_backward(dy, cache: HardSigmoidCache):
    dy = upstream("hard_sigmoid_backward", "dy", dy, cache.slope.shape, cache.slope.dtype)
    return {"x": dy * cache.slope}  # shape of x
