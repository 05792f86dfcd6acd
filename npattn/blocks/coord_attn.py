"""Coordinate attention (Hou, Zhou, Feng: "Coordinate Attention for Efficient Mobile
Network Design", CVPR 2021), in timm's layout (``timm.layers.coord_attn.CoordAttn``).

Pool along each spatial axis, encode both strips with one shared 1x1 conv + BatchNorm +
Hardswish, then gate the map with one sigmoid per row and one per column. For x of shape
(N, C, H, W), D the hidden width and ``^T`` swapping the last two axes::

    xh  = mean_w x                              (N, C, H, 1)
    xw  = mean_h x                              (N, C, 1, W)
    u   = cat([xh, xw^T], axis=2)               (N, C, H + W, 1)
    v   = conv1(u)   (1x1, bias if bias=True)   (N, D, H + W, 1)
    b   = BN(v)      ("bn1", training: statistics over the N (H + W) values per channel)
    a   = hardswish(b)                          (N, D, H + W, 1)
    ah  = a[:, :, :H]                           (N, D, H, 1)
    aw  = a[:, :, H:]^T                         (N, D, 1, W)
    gh  = sigmoid(conv_h(ah))                   (N, C, H, 1)
    gw  = sigmoid(conv_w(aw))                   (N, C, 1, W)
    y   = x * gw * gh                           (N, C, H, W)
    y   = y + x                                 (has_skip: timm's residual)

Backward, for dy = dL/dy, in the order the code runs::

    dgh  = sum_w dy * x * gw                    (N, C, H, 1)
    dgw  = sum_h dy * x * gh                    (N, C, 1, W)
    dah  = conv_h backward of dgh * gh (1 - gh) (N, D, H, 1)    (+ conv_h weight, bias)
    daw  = conv_w backward of dgw * gw (1 - gw) (N, D, 1, W)    (+ conv_w weight, bias)
    da   = cat([dah, daw^T], axis=2)            (N, D, H + W, 1)
    db   = da * hardswish'(b)                   hardswish' = 0 (b <= -3), b/3 + 1/2 (b < 3), 1
    dv   = BN backward (training: also through the batch mean and variance)
    du   = conv1 backward                       (N, C, H + W, 1) (+ conv1 weight, bias)
    dx   = dy * gw * gh + du[:, :, :H] / W + du[:, :, H:]^T / H      (N, C, H, W), broadcast
    dx  += dy                                   (has_skip)

Exact zero: with ``bias=True`` in training, conv1's bias only shifts every value of a
BatchNorm channel by the same amount, which the batch mean removes; its gradient
``sum dv`` is 0 in exact arithmetic (the BN backward subtracts the mean of dv), and the
block returns exact zeros for it. In eval mode it is an ordinary gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import functional as F
from .._checks import float_array, positive_int, same_dtype, shape_is
from ._timm import check_bool, check_real, reduced_channels
from .base import Block, make_rng

__all__ = ["CoordAttn"]


@dataclass(frozen=True)
class CoordAttnCache:
    x: np.ndarray  # (N, C, H, W) the input
    conv1: object  # Conv2dCache of conv1 on u (N, C, H + W, 1)
    bn1: object  # BatchNormCache of bn1 on v (N, D, H + W, 1)
    act: object  # HardswishCache on b (N, D, H + W, 1)
    conv_h: object  # Conv2dCache of conv_h on ah (N, D, H, 1)
    conv_w: object  # Conv2dCache of conv_w on aw (N, D, 1, W)
    gate_h: np.ndarray  # (N, C, H, 1) gh
    gate_w: np.ndarray  # (N, C, 1, W) gw
    training: bool


class CoordAttn(Block):
    """Coordinate attention in timm's layout: ``y = x * gw * gh`` (module docstring).

    Parameters
    ----------
    channels : int
    rd_ratio : float, default 1/16
    rd_channels : int or None, default None
        Hidden width D; None (or 0, as timm) computes
        ``D = make_divisible(channels * rd_ratio * se_factor, rd_divisor, round_limit=0)``.
    rd_divisor : int, default 8
    se_factor : float, default 2/3
    bias : bool, default False
        Biases of conv1, conv_h and conv_w.
    has_skip : bool, default False
        timm's ``has_skip``: add the input to the output (``y = x * gw * gh + x``).
    bn_momentum : float, default 0.1
        Momentum of bn1's running statistics (PyTorch's convention).
    bn_eps : float, default 1e-5
        Added to bn1's variance.
    rng : None, int or numpy.random.Generator (PyTorch's default initialisation)
    dtype : float32 (default) or float64

    State_dict keys (timm's): ``conv1.weight`` (D, C, 1, 1), ``bn1.{weight, bias,
    running_mean, running_var, num_batches_tracked}`` (D,), ``conv_h.weight`` (C, D, 1, 1),
    ``conv_w.weight`` (C, D, 1, 1), plus ``conv1.bias``, ``conv_h.bias``, ``conv_w.bias``
    with ``bias=True``. Hardswish, BatchNorm2d and sigmoid (timm's defaults; other layers
    are not offered).
    """

    def __init__(self, channels, rd_ratio=1.0 / 16, rd_channels=None, rd_divisor=8, se_factor=2.0 / 3, bias=False,
                 has_skip=False, *, bn_momentum=0.1, bn_eps=1e-5, rng=None, dtype=np.float32):
        super().__init__(dtype)
        op = "CoordAttn"
        self.config = dict(channels=channels, rd_ratio=rd_ratio, rd_channels=rd_channels, rd_divisor=rd_divisor,
                           se_factor=se_factor, bias=bias, has_skip=has_skip)  # timm's arguments
        self.has_skip = check_bool(op, "has_skip", has_skip)
        self._set_bn(bn_momentum, bn_eps)
        self.channels = positive_int(op, "channels", channels)
        self.se_factor = check_real(op, "se_factor", se_factor)
        self.bias = check_bool(op, "bias", bias)
        self.rd_channels = reduced_channels(op, self.channels, rd_ratio, rd_channels, rd_divisor, self.se_factor)
        rng = make_rng(rng)
        c, d = self.channels, self.rd_channels
        self._add_conv("conv1.", rng, c, d, 1, bias=self.bias)
        self._add_batch_norm("bn1.", d)
        self._add_conv("conv_h.", rng, d, c, 1, bias=self.bias)
        self._add_conv("conv_w.", rng, d, c, 1, bias=self.bias)

    def forward(self, x, training=False):
        """Returns ``(y, cache)``; in training bn1 uses batch statistics and updates its
        running statistics."""
        x = self._check_input("x", x, 4, self.channels)
        self._check_image("x", x, "timm's conv1 refuses the empty pooled map")
        n, c, h, w = x.shape
        x_h = x.mean(axis=3, keepdims=True)  # (N, C, H, 1)
        x_w = x.mean(axis=2, keepdims=True)  # (N, C, 1, W)
        u = np.concatenate([x_h, x_w.transpose(0, 1, 3, 2)], axis=2)  # (N, C, H + W, 1)
        v, k_conv1 = self._conv("conv1.", u)  # (N, D, H + W, 1)
        b, k_bn1 = self._batch_norm("bn1.", v, training)  # (N, D, H + W, 1)
        a, k_act = F.hardswish_forward(b)  # (N, D, H + W, 1)
        a_h = np.ascontiguousarray(a[:, :, :h])  # (N, D, H, 1)
        a_w = np.ascontiguousarray(a[:, :, h:].transpose(0, 1, 3, 2))  # (N, D, 1, W)
        z_h, k_conv_h = self._conv("conv_h.", a_h)  # (N, C, H, 1)
        z_w, k_conv_w = self._conv("conv_w.", a_w)  # (N, C, 1, W)
        g_h = F.sigmoid(z_h)  # (N, C, H, 1)
        g_w = F.sigmoid(z_w)  # (N, C, 1, W)
        y = x * g_w  # (N, C, H, W)
        y *= g_h
        if self.has_skip:
            y += x  # timm's skip
        return y, CoordAttnCache(x, k_conv1, k_bn1, k_act, k_conv_h, k_conv_w, g_h, g_w, bool(training))

    def backward(self, grad_out, cache: CoordAttnCache):
        """Returns ``((dx,), grads)`` with a gradient for every parameter key (conv1.bias
        exactly zero in training, see the module docstring)."""
        op = "CoordAttn.backward"
        x, g_h, g_w = cache.x, cache.gate_h, cache.gate_w
        dy = float_array(op, "grad_out", grad_out, 4, "(N, C, H, W)")
        shape_is(op, "grad_out", dy, x.shape)
        same_dtype(op, "x", x, grad_out=dy)
        n, c, h, w = x.shape
        grads = self.zero_grads()
        dyx = dy * x  # (N, C, H, W)
        d_gh = np.einsum("nchw,ncw->nch", dyx, g_w[:, :, 0])[..., None]  # (N, C, H, 1)
        d_gw = np.einsum("nchw,nch->ncw", dyx, g_h[..., 0])[:, :, None]  # (N, C, 1, W)
        d_zh = d_gh * (g_h * (1 - g_h))  # (N, C, H, 1)
        d_zw = d_gw * (g_w * (1 - g_w))  # (N, C, 1, W)
        d_ah = self._conv_backward("conv_h.", d_zh, cache.conv_h, grads)  # (N, D, H, 1)
        d_aw = self._conv_backward("conv_w.", d_zw, cache.conv_w, grads)  # (N, D, 1, W)
        d_a = np.concatenate([d_ah, d_aw.transpose(0, 1, 3, 2)], axis=2)  # (N, D, H + W, 1)
        d_b = F.hardswish_backward(d_a, cache.act)["x"]  # (N, D, H + W, 1)
        d_v = self._batch_norm_backward("bn1.", d_b, cache.bn1, grads)  # (N, D, H + W, 1)
        # conv1's bias feeds bn1: exactly 0 in training (base.bias_grad_is_zero)
        d_u = self._conv_backward("conv1.", d_v, cache.conv1, grads, next_bn=cache.bn1)  # (N, C, H + W, 1)
        d_x = dy * g_w  # (N, C, H, W) direct path
        d_x *= g_h
        if self.has_skip:
            d_x += dy  # through the skip
        d_x += d_u[:, :, :h] * x.dtype.type(1.0 / w)  # (N, C, H, 1) mean over w, broadcast
        d_x += d_u[:, :, h:].transpose(0, 1, 3, 2) * x.dtype.type(1.0 / h)  # (N, C, 1, W) mean over h
        return (d_x,), grads
