"""Attentional feature fusion (Dai, Gieseke, Oehmcke, Wu, Barnard: "Attentional Feature
Fusion", WACV 2021): DAF, MS_CAM, AFF and iAFF, as the authors' ``aff_pytorch`` code
computes them.

Multi-scale channel attention (MS-CAM). With C channels and C' = C // r, two branches map
a map X of shape (N, C, H, W) to channel logits::

    local_att:  L(X) = BN4(conv3(relu(BN1(conv0(X)))))            (N, C, H, W)
    global_att: G(X) = BN5(conv4(relu(BN2(conv1(mean_hw X)))))    (N, C, 1, 1)
    M(X)        = sigmoid(L(X) + G(X))                             (N, C, H, W), G broadcast

where conv_k are 1x1 convolutions with bias (C -> C' then C' -> C) and BN_k are
BatchNorm2d; the index k is the position in the PyTorch ``Sequential``, hence the
state_dict keys ``local_att.0.weight`` ... ``global_att.5.num_batches_tracked``.

The four blocks (x the input, res the residual)::

    DAF:     y = x + res
    MS_CAM:  w = M(x);                        y = x * w
    AFF:     w = M(x + res);                  y = 2 x w + 2 res (1 - w) = 2 (res + w (x - res))
    iAFF:    w1 = M(x + res);                 xi = x w1 + res (1 - w1) = res + w1 (x - res)
             w2 = M2(xi);                     y  = x w2 + res (1 - w2) = res + w2 (x - res)

iAFF's M2 uses ``local_att2`` and, in its global half, ``global_att`` again when
``share_global_att=True`` (what the published PyTorch code does: ``global_att2`` is
created, stays in the state_dict and is never used, so its gradient is zero) or
``global_att2`` when ``share_global_att=False`` (the paper and the MXNet code). Sharing
also means that in training the BatchNorm buffers of ``global_att`` are updated twice
per forward, as in PyTorch. AFF has the factor 2 (the two weights sum to 2, as in
x + res); MS_CAM and iAFF do not.

Backward of M, for dz = dL/d(L + G) (the sigmoid's input) in the order the code runs::

    dG      = sum_{h, w} dz                                 (N, C, 1, 1)
    local:  dBN4 -> dconv3 -> relu' -> dBN1 -> dconv0       d_xa_local (N, C, H, W)
    global: dBN5 -> dconv4 -> relu' -> dBN2 -> dconv1       d_pool     (N, C, 1, 1)
    dX      = d_xa_local + d_pool / (H W)                   (N, C, H, W)

each step being the backward of the primitive op in ``npattn.functional`` (1x1 conv:
``dW = sum dy x^T``, ``dX = W^T dy``; BatchNorm in training also differentiates the batch
statistics). Every conv here feeds a BatchNorm, so in training the conv biases
(``*.0.bias``, ``*.3.bias``, ``*.1.bias``, ``*.4.bias``) have a gradient that is exactly
zero: the batch normalisation subtracts the batch mean, which absorbs any per-channel
constant, so the output does not depend on them at all. The backward returns exact zeros
there (``base.bias_grad_is_zero``) rather than the rounding noise of ``sum dc``; in eval
mode (running statistics) their gradient is the usual ``sum dc``. With d = x - res and ds = sigmoid' = w (1 - w)::

    MS_CAM:  dz  = dy * x * ds;            dx = dy * w + dX(dz)
    AFF:     dz  = 2 dy * d * ds;          dx = 2 dy w + dX(dz);   dres = 2 dy (1 - w) + dX(dz)
    iAFF:    dz2 = dy * d * ds2;           dxi = dX2(dz2)          (xi = res + w1 d)
             dz1 = dxi * d * ds1;          dxa = dX(dz1)
             dx  = dy w2 + dxi w1 + dxa;   dres = dy (1 - w2) + dxi (1 - w1) + dxa
    DAF:     dx = dy;  dres = dy

With one sample per batch the global branch's BatchNorm sees one value per channel, and
training raises PyTorch's error "Expected more than 1 value per channel when training";
npattn raises it before any running statistic is touched.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import functional as F
from .._checks import float_array, positive_int, same_dtype, shape_is
from .base import Block, make_rng

__all__ = ["DAF", "MS_CAM", "AFF", "iAFF"]


@dataclass(frozen=True)
class DAFCache:
    x_shape: tuple  # (N, C, H, W)
    dtype: np.dtype  # of x and residual


@dataclass(frozen=True)
class MSCAMCache:
    local: tuple  # (conv0, BN1, relu, conv3, BN4) caches of the local branch, maps (N, C' or C, H, W)
    glob: tuple  # (pool, conv1, BN2, relu, conv4, BN5) caches of the global branch, maps (N, C' or C, 1, 1)


@dataclass(frozen=True)
class FusionCache:
    x_shape: tuple  # (N, C, H, W)
    dtype: np.dtype  # of x
    x: np.ndarray  # (N, C, H, W) MS_CAM's input (None for AFF / iAFF)
    diff: np.ndarray  # (N, C, H, W) x - res (None for MS_CAM)
    w1: np.ndarray  # (N, C, H, W) first sigmoid gate
    att1: MSCAMCache  # branches of the first gate
    w2: np.ndarray  # (N, C, H, W) iAFF's second gate (None otherwise)
    att2: MSCAMCache  # branches of iAFF's second gate (None otherwise)


def _check_grad(op, grad_out, x_shape, dtype):
    dy = float_array(op, "grad_out", grad_out, 4, "(N, C, H, W)")
    shape_is(op, "grad_out", dy, x_shape)
    if dy.dtype != dtype:
        raise TypeError(f"{op}: grad_out must have the forward input's dtype {dtype}, got {dy.dtype}")
    return dy


def _sigmoid_slope(w):
    """sigmoid'(z) expressed with w = sigmoid(z): w (1 - w)."""
    s = 1 - w
    s *= w
    return s


class DAF(Block):
    """Direct add fusion, ``y = x + res``: the baseline the attentional fusions replace.

    No parameters (empty state_dict). ``forward(x, residual)`` takes two float arrays of
    equal shape (N, C, H, W) and equal dtype, float32 or float64 (DAF holds no arrays, so
    its ``dtype`` does not constrain them); ``backward`` returns ``((dy, dy), {})`` (two
    copies). ``rng`` is accepted for a uniform constructor and ignored.
    """

    def __init__(self, *, rng=None, dtype=np.float32):
        super().__init__(dtype)

    def forward(self, x, residual, training=False):
        op = "DAF"
        x = float_array(op, "x", x, 4, "(N, C, H, W)")
        residual = float_array(op, "residual", residual, 4, "(N, C, H, W)")
        if residual.shape != x.shape:
            raise ValueError(f"{op}: residual must have the shape of x {tuple(x.shape)}, got {tuple(residual.shape)}")
        same_dtype(op, "x", x, residual=residual)
        return x + residual, DAFCache(tuple(x.shape), x.dtype)

    def backward(self, grad_out, cache):
        dy = _check_grad("DAF.backward", grad_out, cache.x_shape, cache.dtype)
        return (dy.copy(), dy.copy()), {}


class _AttentionFusion(Block):
    """What MS_CAM, AFF and iAFF share: the MS-CAM branches and the input checks."""

    def __init__(self, channels, r, dtype, bn_momentum=0.1, bn_eps=1e-5):
        super().__init__(dtype)
        op = type(self).__name__
        self._set_bn(bn_momentum, bn_eps)
        self.channels = positive_int(op, "channels", channels)
        self.r = positive_int(op, "r", r)
        self.inter_channels = self.channels // self.r
        if self.inter_channels < 1:
            raise ValueError(
                f"{op}: r must be at most channels so that channels // r >= 1, got channels={self.channels}, r={self.r}"
            )

    # ---- MS-CAM: registration, forward, backward ----------------------------------
    def _add_ms_cam(self, local, glob, rng):
        c, ci = self.channels, self.inter_channels
        self._add_conv(f"{local}0.", rng, c, ci, 1)
        self._add_batch_norm(f"{local}1.", ci)
        self._add_conv(f"{local}3.", rng, ci, c, 1)
        self._add_batch_norm(f"{local}4.", c)
        self._add_conv(f"{glob}1.", rng, c, ci, 1)
        self._add_batch_norm(f"{glob}2.", ci)
        self._add_conv(f"{glob}4.", rng, ci, c, 1)
        self._add_batch_norm(f"{glob}5.", c)

    def _ms_cam(self, local, glob, xa, training):
        """``z = L(xa) + G(xa)`` (the logits of the gate), (N, C, H, W)."""
        c0, k_c0 = self._conv(f"{local}0.", xa)  # (N, C', H, W)
        b1, k_b1 = self._batch_norm(f"{local}1.", c0, training)  # (N, C', H, W)
        a, k_a = F.relu_forward(b1)  # (N, C', H, W)
        c3, k_c3 = self._conv(f"{local}3.", a)  # (N, C, H, W)
        xl, k_b4 = self._batch_norm(f"{local}4.", c3, training)  # (N, C, H, W)

        p, k_p = F.global_avg_pool2d_forward(xa)  # (N, C, 1, 1)
        g1, k_g1 = self._conv(f"{glob}1.", p)  # (N, C', 1, 1)
        g2, k_g2 = self._batch_norm(f"{glob}2.", g1, training)  # (N, C', 1, 1)
        ga, k_ga = F.relu_forward(g2)  # (N, C', 1, 1)
        g4, k_g4 = self._conv(f"{glob}4.", ga)  # (N, C, 1, 1)
        xg, k_g5 = self._batch_norm(f"{glob}5.", g4, training)  # (N, C, 1, 1)

        z = xl  # (N, C, H, W) the BatchNorm output is ours: add the global logits in place
        z += xg
        return z, MSCAMCache((k_c0, k_b1, k_a, k_c3, k_b4), (k_p, k_g1, k_g2, k_ga, k_g4, k_g5))

    def _ms_cam_backward(self, local, glob, d_z, cache: MSCAMCache, grads):
        """Gradient of ``z = L(xa) + G(xa)`` with respect to xa; parameter gradients are
        added into ``grads``."""
        k_c0, k_b1, k_a, k_c3, k_b4 = cache.local
        k_p, k_g1, k_g2, k_ga, k_g4, k_g5 = cache.glob
        d_xg = d_z.sum(axis=(2, 3), keepdims=True)  # (N, C, 1, 1)
        d_g4 = self._batch_norm_backward(f"{glob}5.", d_xg, k_g5, grads)  # (N, C, 1, 1)
        d_ga = self._conv_backward(f"{glob}4.", d_g4, k_g4, grads, next_bn=k_g5)  # (N, C', 1, 1)
        d_g2 = F.relu_backward(d_ga, k_ga)["x"]  # (N, C', 1, 1)
        d_g1 = self._batch_norm_backward(f"{glob}2.", d_g2, k_g2, grads)  # (N, C', 1, 1)
        d_p = self._conv_backward(f"{glob}1.", d_g1, k_g1, grads, next_bn=k_g2)  # (N, C, 1, 1)

        d_c3 = self._batch_norm_backward(f"{local}4.", d_z, k_b4, grads)  # (N, C, H, W)
        d_a = self._conv_backward(f"{local}3.", d_c3, k_c3, grads, next_bn=k_b4)  # (N, C', H, W)
        d_b1 = F.relu_backward(d_a, k_a)["x"]  # (N, C', H, W)
        d_c0 = self._batch_norm_backward(f"{local}1.", d_b1, k_b1, grads)  # (N, C', H, W)
        d_xa = self._conv_backward(f"{local}0.", d_c0, k_c0, grads, next_bn=k_b1)  # (N, C, H, W)
        h, w = d_z.shape[2:]
        d_xa += d_p * d_p.dtype.type(1.0 / (h * w))  # (N, C, H, W) the pool's share, broadcast over (H, W)
        return d_xa

    # ---- checks -------------------------------------------------------------------
    def _check_training_batch(self, x, training):
        """BatchNorm of the global branch sees N values per channel; PyTorch refuses one."""
        if training and x.shape[0] == 1:
            raise ValueError(
                "Expected more than 1 value per channel when training, got input size "
                f"{(1, self.inter_channels, 1, 1)}"
            )

    def _check_pair(self, x, residual):
        op = type(self).__name__
        x = self._check_input("x", x, 4, self.channels)
        residual = self._check_input("residual", residual, 4, self.channels)
        if residual.shape != x.shape:
            raise ValueError(f"{op}: residual must have the shape of x {tuple(x.shape)}, got {tuple(residual.shape)}")
        self._check_image("x", x, _EMPTY)
        return x, residual


_EMPTY = "PyTorch's 1x1 convolutions of the local branch refuse an empty image"


class MS_CAM(_AttentionFusion):
    """Multi-scale channel attention on one map: ``y = x * sigmoid(L(x) + G(x))``.

    Parameters
    ----------
    channels : int, default 64
    r : int, default 4; the branches' hidden width is ``channels // r``
    bn_momentum : float, default 0.1
        Momentum of every BatchNorm's running statistics (PyTorch's convention).
    bn_eps : float, default 1e-5
        Added to the variance in every BatchNorm.
    rng : None, int or numpy.random.Generator (PyTorch-default initialisation)
    dtype : float32 (default) or float64

    ``forward(x, training=False) -> (y, cache)``; ``backward(dy, cache) -> ((dx,), grads)``.
    The math is in the module docstring.
    """

    def __init__(self, channels=64, r=4, *, bn_momentum=0.1, bn_eps=1e-5, rng=None, dtype=np.float32):
        super().__init__(channels, r, dtype, bn_momentum, bn_eps)
        self._add_ms_cam("local_att.", "global_att.", make_rng(rng))

    def forward(self, x, training=False):
        x = self._check_input("x", x, 4, self.channels)
        self._check_image("x", x, _EMPTY)
        self._check_training_batch(x, training)
        z, att = self._ms_cam("local_att.", "global_att.", x, training)  # (N, C, H, W)
        w = F.sigmoid(z)  # (N, C, H, W)
        y = x * w  # (N, C, H, W)
        return y, FusionCache(x.shape, x.dtype, x, None, w, att, None, None)

    def backward(self, grad_out, cache: FusionCache):
        dy = _check_grad("MS_CAM.backward", grad_out, cache.x_shape, cache.dtype)
        grads = self.zero_grads()
        w = cache.w1
        d_z = dy * cache.x  # (N, C, H, W)
        d_z *= _sigmoid_slope(w)
        d_x = self._ms_cam_backward("local_att.", "global_att.", d_z, cache.att1, grads)  # (N, C, H, W)
        d_x += dy * w  # (N, C, H, W)
        return (d_x,), grads


class AFF(_AttentionFusion):
    """Attentional feature fusion: ``w = M(x + res)``, ``y = 2 x w + 2 res (1 - w)``.

    Parameters as :class:`MS_CAM`. ``forward(x, residual, training=False)``;
    ``backward(dy, cache) -> ((dx, dres), grads)``. The math is in the module docstring.
    """

    def __init__(self, channels=64, r=4, *, bn_momentum=0.1, bn_eps=1e-5, rng=None, dtype=np.float32):
        super().__init__(channels, r, dtype, bn_momentum, bn_eps)
        self._add_ms_cam("local_att.", "global_att.", make_rng(rng))

    def forward(self, x, residual, training=False):
        x, residual = self._check_pair(x, residual)
        self._check_training_batch(x, training)
        xa = x + residual  # (N, C, H, W)
        z, att = self._ms_cam("local_att.", "global_att.", xa, training)  # (N, C, H, W)
        w = F.sigmoid(z)  # (N, C, H, W)
        diff = x - residual  # (N, C, H, W)
        y = w * diff  # (N, C, H, W)
        y += residual
        y *= 2  # = 2 x w + 2 res (1 - w)
        return y, FusionCache(x.shape, x.dtype, None, diff, w, att, None, None)

    def backward(self, grad_out, cache: FusionCache):
        dy = _check_grad("AFF.backward", grad_out, cache.x_shape, cache.dtype)
        grads = self.zero_grads()
        w = cache.w1
        dy2 = 2 * dy  # (N, C, H, W)
        d_z = dy2 * cache.diff  # (N, C, H, W)
        d_z *= _sigmoid_slope(w)
        d_xa = self._ms_cam_backward("local_att.", "global_att.", d_z, cache.att1, grads)  # (N, C, H, W)
        d_x = dy2 * w  # (N, C, H, W) direct path: 2 dy w
        d_res = dy2  # (N, C, H, W) becomes 2 dy (1 - w) + d_xa
        d_res -= d_x
        d_res += d_xa
        d_x += d_xa  # (N, C, H, W) 2 dy w + d_xa
        return (d_x, d_res), grads


class iAFF(_AttentionFusion):
    """Iterative attentional feature fusion: two AFF-style fusions, the second gated by
    the first one's result (no factor 2).

    Parameters
    ----------
    channels : int, default 64
    r : int, default 4
    share_global_att : bool, default True
        True: the second pass reuses ``global_att`` (the published PyTorch code;
        ``global_att2`` is in the state_dict, unused, with gradient zero). False: the
        second pass uses ``global_att2`` (the paper and the MXNet code).
    bn_momentum, bn_eps : float, default 0.1 and 1e-5
        The settings of every BatchNorm (as :class:`MS_CAM`).
    rng : None, int or numpy.random.Generator
    dtype : float32 (default) or float64

    ``forward(x, residual, training=False)``; ``backward(dy, cache) -> ((dx, dres), grads)``.
    The math is in the module docstring.
    """

    def __init__(self, channels=64, r=4, share_global_att=True, *, bn_momentum=0.1, bn_eps=1e-5, rng=None,
                 dtype=np.float32):
        super().__init__(channels, r, dtype, bn_momentum, bn_eps)
        if not isinstance(share_global_att, (bool, np.bool_)):
            raise TypeError(f"iAFF: share_global_att must be a bool, got {share_global_att!r}")
        self.share_global_att = bool(share_global_att)
        rng = make_rng(rng)
        # PyTorch's registration order: local_att, global_att, local_att2, global_att2
        self._add_ms_cam("local_att.", "global_att.", rng)
        self._add_ms_cam("local_att2.", "global_att2.", rng)
        self._global2 = "global_att." if self.share_global_att else "global_att2."

    def forward(self, x, residual, training=False):
        x, residual = self._check_pair(x, residual)
        self._check_training_batch(x, training)
        xa = x + residual  # (N, C, H, W)
        z1, att1 = self._ms_cam("local_att.", "global_att.", xa, training)  # (N, C, H, W)
        w1 = F.sigmoid(z1)  # (N, C, H, W)
        diff = x - residual  # (N, C, H, W)
        xi = w1 * diff  # (N, C, H, W)
        xi += residual  # = x w1 + res (1 - w1)
        z2, att2 = self._ms_cam("local_att2.", self._global2, xi, training)  # (N, C, H, W)
        w2 = F.sigmoid(z2)  # (N, C, H, W)
        y = w2 * diff  # (N, C, H, W)
        y += residual  # = x w2 + res (1 - w2)
        return y, FusionCache(x.shape, x.dtype, None, diff, w1, att1, w2, att2)

    def backward(self, grad_out, cache: FusionCache):
        dy = _check_grad("iAFF.backward", grad_out, cache.x_shape, cache.dtype)
        grads = self.zero_grads()
        w1, w2, diff = cache.w1, cache.w2, cache.diff
        d_z2 = dy * diff  # (N, C, H, W)
        d_z2 *= _sigmoid_slope(w2)
        d_xi = self._ms_cam_backward("local_att2.", self._global2, d_z2, cache.att2, grads)  # (N, C, H, W)
        d_z1 = d_xi * diff  # (N, C, H, W)
        d_z1 *= _sigmoid_slope(w1)
        d_xa = self._ms_cam_backward("local_att.", "global_att.", d_z1, cache.att1, grads)  # (N, C, H, W)
        d_x = dy * w2  # (N, C, H, W) direct paths: dy w2 + d_xi w1
        d_x += d_xi * w1
        d_res = dy + d_xi  # (N, C, H, W) becomes dy (1 - w2) + d_xi (1 - w1) + d_xa
        d_res -= d_x
        d_res += d_xa
        d_x += d_xa  # (N, C, H, W) dy w2 + d_xi w1 + d_xa
        return (d_x, d_res), grads
