"""Selective kernel convolution (Li, Wang, Hu, Yang: "Selective Kernel Networks", CVPR
2019), as ``SelectiveConv`` of TeodorPoncu/selective-kernel-conv computes it.

With P paths, C = out_channels and d = max(C // ratio, 32), for x of shape (N, C_in, H, W)::

    split:   for path i = 0 .. P-1 (3x3 conv, groups, dilation = padding = 1 + i, bias):
             c_i = conv_i(x)                              (N, C, H, W)   convs.i.0
             b_i = BN2d_i(c_i)                            (N, C, H, W)   convs.i.1
             f_i = relu(b_i)                              (N, C, H, W)   convs.i.2
    fuse:    u   = sum_i f_i                              (N, C, H, W)
             s   = mean_{h, w} u = sum_i mean_{h, w} f_i  (N, C)         (u itself is never needed)
             h   = s Wc^T + bc                            (N, d)         compress.0 (Linear)
             hb  = BN1d(h)                                (N, d)         compress.1
             z   = relu(hb)                               (N, d)         compress.2
    select:  a_i = z Wp_i^T + bp_i                        (N, C)         projections.i (1x1 conv)
             att = softmax over i of a                    (N, P, C)
             y   = sum_i att_i[:, :, None, None] * f_i    (N, C, H, W)

(The original code concatenates the paths on the channel axis and views the result as
(N, P, C, H, W), so path i is exactly channels i*C .. (i+1)*C: the same as above.)

Backward, for dy = dL/dy, in the order the code computes it::

    datt_i = sum_{h, w} dy * f_i                          (N, C)         y is bilinear in (att, f)
    df_i   = dy * att_i                                   (N, C, H, W)   direct path
    da     = att * (datt - sum_i datt_i att_i)            (N, P, C)      softmax'
    dz     = sum_i da_i Wp_i,  dWp_i = da_i^T z,  dbp_i = sum_n da_i
    dhb    = dz * [hb > 0]                                (N, d)
    dh     = BN1d'(dhb)                                   (N, d)         batch statistics in training
    ds     = dh Wc,  dWc = dh^T s,  dbc = sum_n dh        (N, C)
    du     = ds / (H W)                                   (N, C, 1, 1)   broadcast over (H, W)
    df_i  += du                                           (N, C, H, W)   through the fusion sum
    db_i   = df_i * [b_i > 0]
    dc_i   = BN2d_i'(db_i)
    dx     = sum_i conv_i'(dc_i)                          (N, C_in, H, W)

every primed step being the backward of the op in ``npattn.functional`` (with
``bias=False`` the bias terms and their gradients are simply absent). In training,
``dbc`` and the path convs' bias gradients ``db_conv_i = sum_{n,h,w} dc_i`` are exactly
zero: each bias feeds a BatchNorm whose batch mean absorbs any per-channel constant (the
output does not depend on it), so the backward returns exact zeros there
(``base.bias_grad_is_zero``) instead of the rounding noise of a cancelling sum. In training the
squeeze's BatchNorm1d sees N values per feature, so batch size 1 raises PyTorch's error
"Expected more than 1 value per channel when training" (before any running statistic is
touched).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import functional as F
from .._checks import float_array, positive_int, same_dtype, shape_is
from .base import Block, make_rng

__all__ = ["SKConv"]


@dataclass(frozen=True)
class SKCache:
    x_shape: tuple  # (N, C_in, H, W)
    paths: tuple  # per path (Conv2dCache, BatchNormCache, ReluCache), maps (N, C, H, W)
    features: tuple  # per path f_i, (N, C, H, W)
    pool_scale: float  # 1 / (H W)
    compress: tuple  # (LinearCache (N, C) -> (N, d), BatchNormCache (N, d), ReluCache (N, d))
    projections: tuple  # per path Conv2dCache of the 1x1 conv (N, d, 1, 1) -> (N, C, 1, 1)
    softmax: object  # SoftmaxCache over axis 1 of (N, P, C)


class SKConv(Block):
    """Selective kernel convolution with P 3x3 paths of growing dilation.

    Parameters
    ----------
    in_channels, out_channels : int
    groups : int
        Groups of every path's 3x3 convolution; divides both channel counts.
    ratio : int, default 16
        The squeeze width is ``d = max(out_channels // ratio, 32)``.
    paths : int, default 2
        Path i uses dilation and padding 1 + i (spatial size preserved).
    bias : bool, default True
        Biases of the path convolutions, of ``compress.0`` and of the projections
        (``SelectiveConv``'s). False drops all of them, as the authors' Caffe release
        (SKNet's prototxt: ``bias_term: false`` on every convolution).
    bn_momentum : float, default 0.1
        Momentum of every BatchNorm's running statistics (PyTorch's convention:
        ``running = (1 - m) running + m batch``; the Caffe release's 0.95 is m = 0.05).
    bn_eps : float, default 1e-5
        Added to the variance in every BatchNorm.
    rng : None, int or numpy.random.Generator (PyTorch-default initialisation)
    dtype : float32 (default) or float64

    State_dict keys are those of the original ``SelectiveConv``: ``convs.{i}.0.weight``,
    ``convs.{i}.0.bias``, ``convs.{i}.1.*`` (BatchNorm2d), ``compress.0.weight``,
    ``compress.0.bias``, ``compress.1.*`` (BatchNorm1d), ``projections.{i}.weight``
    (out_channels, d, 1, 1) and ``projections.{i}.bias`` (the ``*.bias`` of the convolutions,
    the linear layer and the projections only with ``bias=True``). The math is in the module
    docstring.
    """

    def __init__(self, in_channels, out_channels, groups, ratio=16, paths=2, bias=True, *, bn_momentum=0.1, bn_eps=1e-5,
                 rng=None, dtype=np.float32):
        super().__init__(dtype)
        op = "SKConv"
        if not isinstance(bias, (bool, np.bool_)):
            raise TypeError(f"{op}: bias must be a bool, got {bias!r}")
        self.bias = bool(bias)
        self._set_bn(bn_momentum, bn_eps)
        self.in_channels = positive_int(op, "in_channels", in_channels)
        self.out_channels = positive_int(op, "out_channels", out_channels)
        self.groups = positive_int(op, "groups", groups)
        self.ratio = positive_int(op, "ratio", ratio)
        self.paths = positive_int(op, "paths", paths)
        if self.in_channels % self.groups or self.out_channels % self.groups:
            raise ValueError(
                f"{op}: groups must divide in_channels and out_channels, got in_channels={self.in_channels}, "
                f"out_channels={self.out_channels}, groups={self.groups}"
            )
        self.reduced_dim = max(self.out_channels // self.ratio, 32)
        rng = make_rng(rng)
        c, d = self.out_channels, self.reduced_dim
        for i in range(self.paths):
            self._add_conv(f"convs.{i}.0.", rng, self.in_channels, c, 3, groups=self.groups, bias=self.bias)
            self._add_batch_norm(f"convs.{i}.1.", c)
        self._add_linear("compress.0.", rng, c, d, bias=self.bias)
        self._add_batch_norm("compress.1.", d)
        for i in range(self.paths):
            self._add_conv(f"projections.{i}.", rng, d, c, 1, bias=self.bias)

    def forward(self, x, training=False):
        """Returns ``(y, cache)`` with y of shape (N, out_channels, H, W)."""
        x = self._check_input("x", x, 4, self.in_channels)
        self._check_image("x", x, "PyTorch's 3x3 path convolutions refuse an empty image")
        n, _, h, w = x.shape
        c, p = self.out_channels, self.paths
        if training and n == 1:
            raise ValueError(
                f"Expected more than 1 value per channel when training, got input size {(1, self.reduced_dim)}"
            )
        path_caches, features = [], []
        for i in range(p):
            c_i, k_conv = self._conv(f"convs.{i}.0.", x, padding=1 + i, dilation=1 + i, groups=self.groups)  # (N, C, H, W)
            b_i, k_bn = self._batch_norm(f"convs.{i}.1.", c_i, training)  # (N, C, H, W)
            f_i, k_relu = F.relu_forward(b_i)  # (N, C, H, W)
            path_caches.append((k_conv, k_bn, k_relu))
            features.append(f_i)
        s = sum(f_i.mean(axis=(2, 3)) for f_i in features)  # (N, C) = mean_hw u, u never formed
        hc, k_lin = self._linear("compress.0.", s)  # (N, d)
        hb, k_bn1d = self._batch_norm("compress.1.", hc, training)  # (N, d)
        z, k_zrelu = F.relu_forward(hb)  # (N, d)
        logits, proj_caches = [], []
        for i in range(p):
            a_i, k_proj = self._conv(f"projections.{i}.", z[:, :, None, None])  # (N, C, 1, 1)
            logits.append(a_i.reshape(n, c))
            proj_caches.append(k_proj)
        att, k_sm = F.softmax_forward(np.stack(logits, axis=1), axis=1)  # (N, P, C)
        y = features[0] * att[:, 0, :, None, None]  # (N, C, H, W)
        for i in range(1, p):
            y += features[i] * att[:, i, :, None, None]  # (N, C, H, W)
        cache = SKCache(
            tuple(x.shape), tuple(path_caches), tuple(features), 1.0 / (h * w),
            (k_lin, k_bn1d, k_zrelu), tuple(proj_caches), k_sm,
        )
        return y, cache

    def backward(self, grad_out, cache: SKCache):
        """Returns ``((dx,), grads)`` with a gradient for every parameter key."""
        op = "SKConv.backward"
        n, _, h, w = cache.x_shape
        c, p = self.out_channels, self.paths
        dy = float_array(op, "grad_out", grad_out, 4, "(N, C, H, W)")
        shape_is(op, "grad_out", dy, (n, c, h, w))
        same_dtype(op, "the forward input", cache.features[0], grad_out=dy)
        grads = self.zero_grads()
        att = cache.softmax.y  # (N, P, C)
        dy_flat = dy.reshape(n, c, h * w)
        d_att = np.stack(
            [np.einsum("ncl,ncl->nc", dy_flat, f_i.reshape(n, c, h * w)) for f_i in cache.features], axis=1
        )  # (N, P, C)
        d_logits = F.softmax_backward(d_att, cache.softmax)["x"]  # (N, P, C)
        d_z = 0
        for i in range(p):
            d_z = d_z + self._conv_backward(
                f"projections.{i}.", d_logits[:, i, :, None, None], cache.projections[i], grads
            )  # (N, d, 1, 1)
        k_lin, k_bn1d, k_zrelu = cache.compress
        d_hb = F.relu_backward(d_z.reshape(n, self.reduced_dim), k_zrelu)["x"]  # (N, d); not -1: ambiguous for N = 0
        d_hc = self._batch_norm_backward("compress.1.", d_hb, k_bn1d, grads)  # (N, d)
        d_s = self._linear_backward("compress.0.", d_hc, k_lin, grads, next_bn=k_bn1d)  # (N, C)
        d_u = (d_s * dy.dtype.type(cache.pool_scale)).reshape(n, c, 1, 1)  # (N, C, 1, 1)
        d_x = None
        for i in range(p):
            k_conv, k_bn, k_relu = cache.paths[i]
            d_f = dy * att[:, i, :, None, None]  # (N, C, H, W)
            d_f += d_u
            d_b = F.relu_backward(d_f, k_relu)["x"]  # (N, C, H, W)
            d_c = self._batch_norm_backward(f"convs.{i}.1.", d_b, k_bn, grads)  # (N, C, H, W)
            d_x_i = self._conv_backward(f"convs.{i}.0.", d_c, k_conv, grads, next_bn=k_bn)  # (N, C_in, H, W)
            if d_x is None:
                d_x = d_x_i
            else:
                d_x += d_x_i
        return (d_x,), grads
