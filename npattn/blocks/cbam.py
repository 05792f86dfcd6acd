"""Convolutional block attention module (Woo, Park, Lee, Kweon: "CBAM: Convolutional Block
Attention Module", ECCV 2018), in timm's layout (``timm.layers.cbam.CbamModule``).

A channel gate, then a spatial gate. For x of shape (N, C, H, W), D the hidden width,
k the odd spatial kernel size and p = (k - 1) / 2::

    channel gate ("channel.*", fc1 (D, C, 1, 1) and fc2 (C, D, 1, 1) without bias):
    a   = mean_{h, w} x                      (N, C)       average pool
    m   = max_{h, w} x                       (N, C)       max pool (torch.amax)
    za  = fc2(relu(fc1(a)))                  (N, C)       one MLP, applied twice
    zm  = fc2(relu(fc1(m)))                  (N, C)
    gc  = sigmoid(za + zm)                   (N, C)
    x1  = x * gc                             (N, C, H, W)

    spatial gate ("spatial.conv.conv.weight" (1, 2, k, k) without bias, then the
    BatchNorm "spatial.conv.bn.*" of one channel, timm's ConvNormAct without activation):
    p   = [mean_c x1, max_c x1]              (N, 2, H, W)
    q   = conv_kxk(p), zero padding p        (N, 1, H, W)
    r   = BN(q)                              (N, 1, H, W)  training: statistics over N H W values
    gs  = sigmoid(r)                         (N, 1, H, W)
    y   = x1 * gs                            (N, C, H, W)

Backward, for dy = dL/dy, in the order the code runs::

    dgs = sum_c dy * x1                      (N, 1, H, W)
    dx1 = dy * gs                            (N, C, H, W)  direct path
    dr  = dgs * gs (1 - gs)                  (N, 1, H, W)
    dq  = BN backward (training: also through the batch mean and variance)
    dp, dW_s = conv backward                 (N, 2, H, W), (1, 2, k, k)
    dx1 += dp[:, 0] / C                      mean over channels: equal shares
    dx1 += dp[:, 1] * [x1 == max_c x1] / t   max over channels: split among the t maxima
    dgc = sum_{h, w} dx1 * x                 (N, C)
    dz  = dgc * gc (1 - gc)                  (N, C)        shared by za and zm
    MLP backward twice (relu'(0) = 0), the weight gradients of both passes summed:
    da, dm                                   (N, C)
    dx  = dx1 * gc + da / (H W) + dm * [x == max_hw x] / t'      (N, C, H, W)

Ties of a maximum get the gradient split evenly among the equal elements, as
``torch.amax`` (which timm uses) does (see ``npattn.functional.amax_forward``).

The spatial BatchNorm sees N H W values of its one channel; training with a single value
(N = H = W = 1) raises PyTorch's "Expected more than 1 value per channel when training".
An even ``spatial_kernel_size`` is refused: timm pads it by (k - 1) // 2, the gate comes out
one row and column short and the product with x fails.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import functional as F
from .._checks import float_array, positive_int, same_dtype, shape_is
from ._timm import pointwise, pointwise_backward, reduced_channels
from .base import Block, make_rng

__all__ = ["CBAM"]


@dataclass(frozen=True)
class CBAMCache:
    x: np.ndarray  # (N, C, H, W) the input
    avg_mlp: tuple  # (fc1, relu, fc2) caches of the MLP on the average pool, vectors (N, D) / (N, C)
    max_mlp: tuple  # (fc1, relu, fc2) caches of the MLP on the max pool
    max_hw: object  # AmaxCache of max over (H, W) of x
    gate_c: np.ndarray  # (N, C, 1, 1) channel gate gc
    x1: np.ndarray  # (N, C, H, W) x * gc
    max_c: object  # AmaxCache of max over C of x1
    conv: object  # Conv2dCache of the k x k conv on p (N, 2, H, W)
    bn: object  # BatchNormCache of the spatial BatchNorm (N, 1, H, W)
    gate_s: np.ndarray  # (N, 1, H, W) spatial gate gs


class CBAM(Block):
    """CBAM in timm's layout: ``y = x1 * sigmoid(BN(conv([mean_c x1, max_c x1])))`` with
    ``x1 = x * sigmoid(mlp(mean_hw x) + mlp(max_hw x))``.

    Parameters
    ----------
    channels : int
    rd_ratio : float, default 1/16
    rd_channels : int or None, default None
        The MLP's hidden width D; None (or 0, as timm) computes
        ``D = make_divisible(channels * rd_ratio, rd_divisor, round_limit=0)``.
    rd_divisor : int, default 1
    spatial_kernel_size : odd int, default 7
    rng : None, int or numpy.random.Generator (PyTorch's default initialisation)
    dtype : float32 (default) or float64

    State_dict keys (timm's ``CbamModule``): ``channel.fc1.weight`` (D, C, 1, 1),
    ``channel.fc2.weight`` (C, D, 1, 1), ``spatial.conv.conv.weight`` (1, 2, k, k),
    ``spatial.conv.bn.{weight, bias, running_mean, running_var, num_batches_tracked}`` (1,).
    ReLU and sigmoid gates, MLP without bias (timm's defaults; its other activations and
    ``mlp_bias`` are not offered). The math is in the module docstring.
    """

    def __init__(self, channels, rd_ratio=1.0 / 16, rd_channels=None, rd_divisor=1, spatial_kernel_size=7, *,
                 rng=None, dtype=np.float32):
        super().__init__(dtype)
        op = "CBAM"
        self.config = dict(channels=channels, rd_ratio=rd_ratio, rd_channels=rd_channels, rd_divisor=rd_divisor,
                           spatial_kernel_size=spatial_kernel_size)
        self.channels = positive_int(op, "channels", channels)
        self.rd_channels = reduced_channels(op, self.channels, rd_ratio, rd_channels, rd_divisor)
        self.spatial_kernel_size = positive_int(op, "spatial_kernel_size", spatial_kernel_size)
        if self.spatial_kernel_size % 2 == 0:
            raise ValueError(
                f"{op}: spatial_kernel_size must be odd (timm pads by (k - 1) // 2, so an even kernel "
                f"shrinks the map), got {self.spatial_kernel_size}"
            )
        rng = make_rng(rng)
        self._add_conv("channel.fc1.", rng, self.channels, self.rd_channels, 1, bias=False)
        self._add_conv("channel.fc2.", rng, self.rd_channels, self.channels, 1, bias=False)
        self._add_conv("spatial.conv.conv.", rng, 2, 1, self.spatial_kernel_size, bias=False)
        self._add_batch_norm("spatial.conv.bn.", 1)

    def _mlp(self, v):
        h, k1 = pointwise(self, "channel.fc1.", v)  # (N, D)
        a, kr = F.relu_forward(h)  # (N, D)
        z, k2 = pointwise(self, "channel.fc2.", a)  # (N, C)
        return z, (k1, kr, k2)

    def _mlp_backward(self, d_z, caches, grads):
        k1, kr, k2 = caches
        d_a = pointwise_backward(self, "channel.fc2.", d_z, k2, grads)  # (N, D)
        d_h = F.relu_backward(d_a, kr)["x"]  # (N, D)
        return pointwise_backward(self, "channel.fc1.", d_h, k1, grads)  # (N, C)

    def forward(self, x, training=False):
        """Returns ``(y, cache)``; in training the spatial BatchNorm uses batch statistics
        and updates its running statistics."""
        x = self._check_input("x", x, 4, self.channels)
        self._check_image("x", x, "the maximum over H W of an empty image does not exist; timm's amax refuses it")
        n, c, h, w = x.shape
        if training and n * h * w == 1:
            raise ValueError(
                f"Expected more than 1 value per channel when training, got input size {(1, 1, 1, 1)}"
            )
        # channel gate
        avg = x.mean(axis=(2, 3))  # (N, C)
        mx, k_max_hw = F.amax_forward(x, (2, 3), keepdims=False)  # (N, C)
        z_avg, k_avg = self._mlp(avg)  # (N, C)
        z_max, k_mx = self._mlp(mx)  # (N, C)
        g_c = F.sigmoid(z_avg + z_max).reshape(n, c, 1, 1)  # (N, C, 1, 1)
        x1 = x * g_c  # (N, C, H, W)
        # spatial gate
        mx_c, k_max_c = F.amax_forward(x1, 1)  # (N, 1, H, W)
        p = np.concatenate([x1.mean(axis=1, keepdims=True), mx_c], axis=1)  # (N, 2, H, W)
        pad = (self.spatial_kernel_size - 1) // 2
        q, k_conv = self._conv("spatial.conv.conv.", p, padding=pad)  # (N, 1, H, W)
        r, k_bn = self._batch_norm("spatial.conv.bn.", q, training)  # (N, 1, H, W)
        g_s = F.sigmoid(r)  # (N, 1, H, W)
        y = x1 * g_s  # (N, C, H, W)
        return y, CBAMCache(x, k_avg, k_mx, k_max_hw, g_c, x1, k_max_c, k_conv, k_bn, g_s)

    def backward(self, grad_out, cache: CBAMCache):
        """Returns ``((dx,), grads)`` with a gradient for every parameter key."""
        op = "CBAM.backward"
        x, x1, g_c, g_s = cache.x, cache.x1, cache.gate_c, cache.gate_s
        dy = float_array(op, "grad_out", grad_out, 4, "(N, C, H, W)")
        shape_is(op, "grad_out", dy, x.shape)
        same_dtype(op, "x", x, grad_out=dy)
        n, c, h, w = x.shape
        grads = self.zero_grads()
        # spatial gate
        d_gs = np.einsum("nchw,nchw->nhw", dy, x1)[:, None]  # (N, 1, H, W)
        d_x1 = dy * g_s  # (N, C, H, W) direct path
        d_r = d_gs * (g_s * (1 - g_s))  # (N, 1, H, W)
        d_q = self._batch_norm_backward("spatial.conv.bn.", d_r, cache.bn, grads)  # (N, 1, H, W)
        d_p = self._conv_backward("spatial.conv.conv.", d_q, cache.conv, grads)  # (N, 2, H, W)
        d_x1 += d_p[:, :1] * x.dtype.type(1.0 / c)  # (N, C, H, W) mean over channels
        d_x1 += F.amax_backward(d_p[:, 1:], cache.max_c)["x"]  # (N, C, H, W) max over channels
        # channel gate
        d_gc = np.einsum("nchw,nchw->nc", d_x1, x)  # (N, C)
        d_z = d_gc * (g_c * (1 - g_c)).reshape(n, c)  # (N, C) = d z_avg = d z_max
        d_avg = self._mlp_backward(d_z, cache.avg_mlp, grads)  # (N, C)
        d_mx = self._mlp_backward(d_z, cache.max_mlp, grads)  # (N, C)
        d_x = d_x1 * g_c  # (N, C, H, W) through x1 = x * gc
        d_x += (d_avg * x.dtype.type(1.0 / (h * w))).reshape(n, c, 1, 1)  # average pool
        d_x += F.amax_backward(d_mx, cache.max_hw)["x"]  # max pool
        return (d_x,), grads
