"""Squeeze-and-excitation (Hu, Shen, Sun: "Squeeze-and-Excitation Networks", CVPR 2018).

The layout is the common PyTorch one, ``fc = Sequential(Linear(C, C//r), ReLU,
Linear(C//r, C), Sigmoid)`` with state_dict keys ``fc.0.weight`` and ``fc.2.weight``
(plus ``fc.0.bias`` and ``fc.2.bias`` with ``bias=True``, as in the original Caffe model).

Forward, for x of shape (N, C, H, W) and D = C // r::

    s = mean_{h, w} x                      (N, C)     squeeze
    h = s W1^T + b1                        (N, D)     fc.0
    a = relu(h)                            (N, D)     fc.1
    z = a W2^T + b2                        (N, C)     fc.2
    g = sigmoid(z)                         (N, C)     fc.3
    y = x * g[:, :, None, None]            (N, C, H, W)  excitation

Backward, for dy = dL/dy, in the order the code computes it::

    dg  = sum_{h, w} dy * x                (N, C)     y is bilinear in (x, g)
    dz  = dg * g * (1 - g)                 (N, C)     sigmoid' = g (1 - g)
    dW2 = dz^T a,  db2 = sum_n dz          (C, D), (C,)
    da  = dz W2                            (N, D)
    dh  = da * [h > 0]                     (N, D)     relu'(0) = 0, as PyTorch
    dW1 = dh^T s,  db1 = sum_n dh          (D, C), (D,)
    ds  = dh W1                            (N, C)
    dx  = dy * g + ds / (H W)              (N, C, H, W)  both paths from x to y

``SEModule`` is the same computation in timm's layout (``timm.layers.SEModule``, the SE
of timm's ResNets and EfficientNets): the two layers are 1x1 convolutions ``fc1`` (D, C,
1, 1) and ``fc2`` (C, D, 1, 1) with biases by default, and the hidden width is timm's
``D = make_divisible(C * rd_ratio, rd_divisor, round_limit=0)`` unless ``rd_channels``
is given. On the pooled (N, C, 1, 1) map a 1x1 convolution is the linear layer above
with W1 = fc1.weight[:, :, 0, 0], so the forward and backward are the lines above.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import functional as F
from .._checks import float_array, positive_int, same_dtype, shape_is
from ._timm import check_bool, pointwise, pointwise_backward, reduced_channels
from .base import Block, inv_area, make_rng

__all__ = ["SEBlock", "SEModule"]


@dataclass(frozen=True)
class SECache:
    x: np.ndarray  # (N, C, H, W) the input
    fc0: object  # LinearCache of fc.0: s (N, C), W1 (D, C)
    relu: object  # ReluCache: h > 0, (N, D)
    fc2: object  # LinearCache of fc.2: a (N, D), W2 (C, D)
    gate: np.ndarray  # (N, C, 1, 1) g = sigmoid(z)


class SEBlock(Block):
    """Squeeze-and-excitation block: ``y = x * sigmoid(fc2(relu(fc1(mean_hw x))))``.

    Parameters
    ----------
    channels : int
        C, the channels of the input.
    reduction : int, default 16
        r; the hidden width is ``D = channels // reduction`` (at least 1).
    bias : bool, default False
        Whether the two linear layers have biases (keys ``fc.0.bias``, ``fc.2.bias``).
    rng : None, int or numpy.random.Generator
        Source of the PyTorch-default initialisation U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    dtype : float32 (default, as PyTorch) or float64

    The math, forward and backward, is in the module docstring.
    """

    def __init__(self, channels, reduction=16, bias=False, *, rng=None, dtype=np.float32):
        super().__init__(dtype)
        op = "SEBlock"
        self.channels = positive_int(op, "channels", channels)
        self.reduction = positive_int(op, "reduction", reduction)
        if not isinstance(bias, (bool, np.bool_)):
            raise TypeError(f"{op}: bias must be a bool, got {bias!r}")
        self.bias = bool(bias)
        self.hidden = self.channels // self.reduction
        if self.hidden < 1:
            raise ValueError(
                f"{op}: reduction must be at most channels so that channels // reduction >= 1, "
                f"got channels={self.channels}, reduction={self.reduction}"
            )
        rng = make_rng(rng)
        self._add_linear("fc.0.", rng, self.channels, self.hidden, bias=self.bias)
        self._add_linear("fc.2.", rng, self.hidden, self.channels, bias=self.bias)

    def forward(self, x, training=False):
        """``y = x * g`` with the channel gate ``g`` of the module docstring.

        ``training`` is accepted for a uniform block API; SE has no batch statistics, so
        both modes compute the same thing. Returns ``(y, cache)``, y of shape and dtype of x.
        """
        x = self._check_input("x", x, 4, self.channels)
        n, c = x.shape[:2]
        s = x.mean(axis=(2, 3))  # (N, C) squeeze
        h, fc0 = self._linear("fc.0.", s)  # (N, D)
        a, relu = F.relu_forward(h)  # (N, D)
        z, fc2 = self._linear("fc.2.", a)  # (N, C)
        g = F.sigmoid(z).reshape(n, c, 1, 1)  # (N, C, 1, 1)
        y = x * g  # (N, C, H, W)
        return y, SECache(x, fc0, relu, fc2, g)

    def backward(self, grad_out, cache: SECache):
        """Returns ``((dx,), {"fc.0.weight": ..., "fc.2.weight": ..., [biases]})``."""
        op = "SEBlock.backward"
        x, g = cache.x, cache.gate
        dy = float_array(op, "grad_out", grad_out, 4, "(N, C, H, W)")
        shape_is(op, "grad_out", dy, x.shape)
        same_dtype(op, "x", x, grad_out=dy)
        n, c, h, w = x.shape
        grads = self.zero_grads()
        d_g = np.einsum("ncl,ncl->nc", dy.reshape(n, c, h * w), x.reshape(n, c, h * w))  # (N, C)
        d_z = d_g * (g * (1 - g)).reshape(n, c)  # (N, C)
        d_a = self._linear_backward("fc.2.", d_z, cache.fc2, grads)  # (N, D)
        d_h = F.relu_backward(d_a, cache.relu)["x"]  # (N, D)
        d_s = self._linear_backward("fc.0.", d_h, cache.fc0, grads)  # (N, C)
        d_x = dy * g  # (N, C, H, W) through the gate's factor
        d_x += (d_s * inv_area(x.dtype, h, w)).reshape(n, c, 1, 1)  # through the squeeze
        return (d_x,), grads


@dataclass(frozen=True)
class SEModuleCache:
    x: np.ndarray  # (N, C, H, W) the input
    fc1: object  # LinearCache of fc1 on the pooled vector: s (N, C), W1 (D, C)
    relu: object  # ReluCache: h > 0, (N, D)
    fc2: object  # LinearCache of fc2: a (N, D), W2 (C, D)
    gate: np.ndarray  # (N, C, 1, 1) g = sigmoid(z)


class SEModule(Block):
    """Squeeze-and-excitation in timm's layout (``timm.layers.SEModule``):
    ``y = x * sigmoid(fc2(relu(fc1(mean_hw x))))`` with 1x1 convolutions.

    Parameters
    ----------
    channels : int
        C, the channels of the input.
    rd_ratio : float, default 1/16
    rd_channels : int or None, default None
        The hidden width D; None (or 0, as timm) computes
        ``D = make_divisible(channels * rd_ratio, rd_divisor, round_limit=0)``.
    rd_divisor : int, default 8
    bias : bool, default True
        Biases of ``fc1`` and ``fc2``.
    rng : None, int or numpy.random.Generator
        Source of PyTorch's default Conv2d initialisation U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    dtype : float32 (default) or float64

    State_dict keys (timm's): ``fc1.weight`` (D, C, 1, 1), ``fc1.bias`` (D,),
    ``fc2.weight`` (C, D, 1, 1), ``fc2.bias`` (C,). timm's optional ``add_maxpool``,
    ``norm_layer`` and other activations are not offered. The math is in the module
    docstring.
    """

    def __init__(self, channels, rd_ratio=1.0 / 16, rd_channels=None, rd_divisor=8, bias=True, *, rng=None,
                 dtype=np.float32):
        super().__init__(dtype)
        op = "SEModule"
        self.config = dict(channels=channels, rd_ratio=rd_ratio, rd_channels=rd_channels, rd_divisor=rd_divisor, bias=bias)
        self.channels = positive_int(op, "channels", channels)
        self.bias = check_bool(op, "bias", bias)
        self.rd_channels = reduced_channels(op, self.channels, rd_ratio, rd_channels, rd_divisor)
        rng = make_rng(rng)
        self._add_conv("fc1.", rng, self.channels, self.rd_channels, 1, bias=self.bias)
        self._add_conv("fc2.", rng, self.rd_channels, self.channels, 1, bias=self.bias)

    def forward(self, x, training=False):
        """``y = x * g``; both modes compute the same (no batch statistics)."""
        x = self._check_input("x", x, 4, self.channels)
        n, c = x.shape[:2]
        s = x.mean(axis=(2, 3))  # (N, C) squeeze
        h, fc1 = pointwise(self, "fc1.", s)  # (N, D)
        a, relu = F.relu_forward(h)  # (N, D)
        z, fc2 = pointwise(self, "fc2.", a)  # (N, C)
        g = F.sigmoid(z).reshape(n, c, 1, 1)  # (N, C, 1, 1)
        y = x * g  # (N, C, H, W)
        return y, SEModuleCache(x, fc1, relu, fc2, g)

    def backward(self, grad_out, cache: SEModuleCache):
        """Returns ``((dx,), {"fc1.weight": ..., "fc1.bias": ..., "fc2.weight": ..., "fc2.bias": ...})``."""
        op = "SEModule.backward"
        x, g = cache.x, cache.gate
        dy = float_array(op, "grad_out", grad_out, 4, "(N, C, H, W)")
        shape_is(op, "grad_out", dy, x.shape)
        same_dtype(op, "x", x, grad_out=dy)
        n, c, h, w = x.shape
        grads = self.zero_grads()
        d_g = np.einsum("ncl,ncl->nc", dy.reshape(n, c, h * w), x.reshape(n, c, h * w))  # (N, C)
        d_z = d_g * (g * (1 - g)).reshape(n, c)  # (N, C)
        d_a = pointwise_backward(self, "fc2.", d_z, cache.fc2, grads)  # (N, D)
        d_h = F.relu_backward(d_a, cache.relu)["x"]  # (N, D)
        d_s = pointwise_backward(self, "fc1.", d_h, cache.fc1, grads)  # (N, C)
        d_x = dy * g  # (N, C, H, W) through the gate's factor
        d_x += (d_s * inv_area(x.dtype, h, w)).reshape(n, c, 1, 1)  # through the squeeze
        return (d_x,), grads
