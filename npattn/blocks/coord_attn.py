"""Coordinate attention (Hou, Zhou, Feng: "Coordinate Attention for Efficient Mobile
Network Design", CVPR 2021), in timm's layout (``timm.layers.coord_attn.CoordAttn``).

Pool along each spatial axis, encode both strips with one shared 1x1 conv + BatchNorm +
Hardswish, then gate the map with one sigmoid per row and one per column. For x of shape
(N, C, H, W) and D the hidden width; ``^T`` swaps the last two axes, the subscripts _h
and _w name the two strips (one value per row, one per column), and a 1x1 convolution
is written as its matrix (``W1 = conv1.weight[:, :, 0, 0]``, acting on the channel axis).
The lines below have all three biases (``bias=True``, as the authors' code; without it
b1 = b_h = b_w = 0 and their lines drop out), in ``npattn.explain``'s format; ``npattn
explain CoordAttn`` walks them in training mode.

Forward::

    W1 = conv1.weight                  (D, C)        the shared encoder, 1x1 conv as a matrix   [param("conv1.weight")[:, :, 0, 0]]
    b1 = conv1.bias                    (D,)                                                     [param("conv1.bias")]
    gamma = bn1.weight                 (D,)          bn1's scale                                [param("bn1.weight")]
    beta = bn1.bias                    (D,)          bn1's shift                                [param("bn1.bias")]
    rm = bn1.running_mean              (D,)          buffers, used in eval                      [buffer("bn1.running_mean")]
    rv = bn1.running_var               (D,)                                                     [buffer("bn1.running_var")]
    eps = bn_eps                       ()                                                       [attr("bn_eps")]
    W_h = conv_h.weight                (C, D)        the row gate's 1x1 conv                    [param("conv_h.weight")[:, :, 0, 0]]
    b_h = conv_h.bias                  (C,)                                                     [param("conv_h.bias")]
    W_w = conv_w.weight                (C, D)        the column gate's 1x1 conv                 [param("conv_w.weight")[:, :, 0, 0]]
    b_w = conv_w.bias                  (C,)                                                     [param("conv_w.bias")]
    s_h = mean_W x                     (N, C, H, 1)  pool each row                              [mean(x, 3, keepdims=True)]
    s_w = mean_H x                     (N, C, 1, W)  pool each column                           [mean(x, 2, keepdims=True)]
    u = [s_h; s_w^T]                   (N, C, H + W, 1)  the strips stacked on axis 2   [concat([s_h, s_w.transpose(0, 1, 3, 2)], 2)]
    h = W1 u + b1                      (N, D, H + W, 1)  conv1 at each of H + W places  [conv2d(u, W1[:, :, None, None], b1)]
    hn = BN(h)                         (N, D, H + W, 1)  bn1 (training: batch statistics)  [batch_norm(h, gamma, beta, rm, rv, training, eps=eps)]
    a = hardswish(hn)                  (N, D, H + W, 1)  hn relu6(hn + 3) / 6           [hardswish(hn)]
    a_h = a[:, :, :H]                  (N, D, H, 1)  split the strips again                     [a[:, :, :x.shape[2]]]
    a_w = a[:, :, H:]^T                (N, D, 1, W)                                             [a[:, :, x.shape[2]:].transpose(0, 1, 3, 2)]
    z_h = W_h a_h + b_h                (N, C, H, 1)  conv_h                                     [conv2d(a_h, W_h[:, :, None, None], b_h)]
    z_w = W_w a_w + b_w                (N, C, 1, W)  conv_w                                     [conv2d(a_w, W_w[:, :, None, None], b_w)]
    g_h = sigmoid(z_h)                 (N, C, H, 1)  one gate per row                           [sigmoid(z_h)]
    g_w = sigmoid(z_w)                 (N, C, 1, W)  one gate per column                        [sigmoid(z_w)]
    y = x * g_w * g_h                  (N, C, H, W)  both gates, broadcast                      [x * g_w * g_h]

timm's ``has_skip`` adds the input: ``y = x * g_w * g_h + x``, and ``dx`` below gains
``+ dy``.

Backward, for dy = dL/dy, in the order the code computes it::

    dg_h = sum_W dy * x * g_w          (N, C, H, 1)  y is linear in g_h, broadcast over W: sum over W
    dg_w = sum_H dy * x * g_h          (N, C, 1, W)  y is linear in g_w, broadcast over H: sum over H
    dz_h = dg_h * g_h (1 - g_h)        (N, C, H, 1)  sigmoid' = g (1 - g)
    dz_w = dg_w * g_w (1 - g_w)        (N, C, 1, W)
    dW_h = sum_{n, i} dz_h a_h^T       (C, D)        z_h is linear in W_h: one outer product per row i
    db_h = sum_{n, i} dz_h             (C,)          b_h is added at every row
    da_h = W_h^T dz_h                  (N, D, H, 1)  z_h is linear in a_h (conv_h's adjoint)
    dW_w = sum_{n, j} dz_w a_w^T       (C, D)        the same for the columns
    db_w = sum_{n, j} dz_w             (C,)
    da_w = W_w^T dz_w                  (N, D, 1, W)
    da = [da_h; da_w^T]                (N, D, H + W, 1)
                                                     a_h and a_w are two slices of a: their gradients
                                                     fill the two parts
    dhn = da * hardswish'(hn)          (N, D, H + W, 1)
                                                     hardswish' = 0 (hn <= -3), hn / 3 + 1/2 (-3 < hn < 3), 1
    dgamma = sum_{n, p} dhn * hn_hat   (D,)          hn = gamma hn_hat + beta, hn_hat the normalised h
    dbeta = sum_{n, p} dhn             (D,)
    dh = BN backward of dhn            (N, D, H + W, 1)
                                                     training: gamma / sigma (dhn - mean dhn - hn_hat mean(dhn hn_hat)),
                                                     also through the batch mean and variance; eval: dhn gamma / sqrt(rv + eps)
    dW1 = sum_{n, p} dh u^T            (D, C)        h is linear in W1: one outer product per position p
    db1 = sum_{n, p} dh                (D,)          b1 is added everywhere; exactly 0 in training (below)
    du = W1^T dh                       (N, C, H + W, 1)
                                                     h is linear in u (conv1's adjoint)
    ds_h = du[:, :, :H]                (N, C, H, 1)  u stacks s_h and s_w^T: split its gradient
    ds_w = du[:, :, H:]^T              (N, C, 1, W)
    dx = dy * g_w * g_h + ds_h / W + ds_w / H
                                       (N, C, H, W)  the gates' factor, and the two means, which spread
                                                     ds_h evenly over a row and ds_w over a column

Exact zero: with ``bias=True`` in training, conv1's bias only shifts every value of a
BatchNorm channel by the same amount, which the batch mean removes; its gradient
``db1 = sum dh`` is 0 in exact arithmetic (the BN backward subtracts the mean of dhn), and the
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
        N, C, H, W = x.shape
        s_h = x.mean(axis=3, keepdims=True)  # (N, C, H, 1)
        s_w = x.mean(axis=2, keepdims=True)  # (N, C, 1, W)
        u = np.concatenate([s_h, s_w.transpose(0, 1, 3, 2)], axis=2)  # (N, C, H + W, 1)
        h, k_conv1 = self._conv("conv1.", u)  # (N, D, H + W, 1)
        hn, k_bn1 = self._batch_norm("bn1.", h, training)  # (N, D, H + W, 1)
        a, k_act = F.hardswish_forward(hn)  # (N, D, H + W, 1)
        a_h = np.ascontiguousarray(a[:, :, :H])  # (N, D, H, 1)
        a_w = np.ascontiguousarray(a[:, :, H:].transpose(0, 1, 3, 2))  # (N, D, 1, W)
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
        N, C, H, W = x.shape
        grads = self.zero_grads()  # dW1, db1 (conv1.*), dgamma, dbeta (bn1.*), dW_h, db_h, dW_w, db_w are added into it
        dyx = dy * x  # (N, C, H, W)
        dg_h = np.einsum("nchw,ncw->nch", dyx, g_w[:, :, 0])[..., None]  # (N, C, H, 1)
        dg_w = np.einsum("nchw,nch->ncw", dyx, g_h[..., 0])[:, :, None]  # (N, C, 1, W)
        dz_h = dg_h * (g_h * (1 - g_h))  # (N, C, H, 1)
        dz_w = dg_w * (g_w * (1 - g_w))  # (N, C, 1, W)
        da_h = self._conv_backward("conv_h.", dz_h, cache.conv_h, grads)  # (N, D, H, 1); dW_h, db_h
        da_w = self._conv_backward("conv_w.", dz_w, cache.conv_w, grads)  # (N, D, 1, W); dW_w, db_w
        da = np.concatenate([da_h, da_w.transpose(0, 1, 3, 2)], axis=2)  # (N, D, H + W, 1)
        dhn = F.hardswish_backward(da, cache.act)["x"]  # (N, D, H + W, 1)
        dh = self._batch_norm_backward("bn1.", dhn, cache.bn1, grads)  # (N, D, H + W, 1); dgamma, dbeta
        # conv1's bias feeds bn1: exactly 0 in training (base.bias_grad_is_zero)
        du = self._conv_backward("conv1.", dh, cache.conv1, grads, next_bn=cache.bn1)  # (N, C, H + W, 1); dW1, db1
        ds_h = du[:, :, :H]  # (N, C, H, 1)
        ds_w = du[:, :, H:].transpose(0, 1, 3, 2)  # (N, C, 1, W)
        dx = dy * g_w  # (N, C, H, W) direct path
        dx *= g_h
        if self.has_skip:
            dx += dy  # through the skip
        dx += ds_h * x.dtype.type(1.0 / W)  # (N, C, H, 1) mean over W, broadcast
        dx += ds_w * x.dtype.type(1.0 / H)  # (N, C, 1, W) mean over H
        return (dx,), grads
