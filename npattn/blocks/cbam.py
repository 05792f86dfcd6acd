"""Convolutional block attention module (Woo, Park, Lee, Kweon: "CBAM: Convolutional Block
Attention Module", ECCV 2018), in timm's layout (``timm.layers.cbam.CbamModule``), with the
options that reproduce the authors' release (Jongchan/attention-module, see docs/porting.md).

A channel gate, then a spatial gate. For x of shape (N, C, H, W), D the hidden width,
k the odd spatial kernel size and p = (k - 1) / 2::

    channel gate ("channel.*", fc1 (D, C, 1, 1) and fc2 (C, D, 1, 1), biases b1, b2 with
    mlp_bias=True), one pooled vector v_t per entry t of ``pool_types``:
    v_avg = mean_{h, w} x                    (N, C)       average pool
    v_max = max_{h, w} x                     (N, C)       max pool
    v_lp  = sqrt(sum_{h, w} x^2)             (N, C)       L2 pool (lp_pool2d with p = 2)
    v_lse = log sum_{h, w} exp(x)            (N, C)       log-sum-exp pool
    z_t = fc2(relu(fc1(v_t)))                (N, C)       one MLP, applied to each pool
    gc  = sigmoid(sum_t z_t)                 (N, C)
    x1  = x * gc                             (N, C, H, W)

    spatial gate ("spatial.conv.conv.weight" (1, 2, k, k) without bias, then the
    BatchNorm "spatial.conv.bn.*" of one channel, timm's ConvNormAct without activation):
    p   = [mean_c x1, max_c x1]              (N, 2, H, W)  spatial_order="avg_max" (timm)
        = [max_c x1, mean_c x1]                            spatial_order="max_avg" (official)
    q   = conv_kxk(p), zero padding p        (N, 1, H, W)
    r   = BN(q)                              (N, 1, H, W)  training: statistics over N H W values
    gs  = sigmoid(r)                         (N, 1, H, W)
    y   = x1 * gs                            (N, C, H, W)  (no_spatial=True: y = x1)

Backward, for dy = dL/dy, in the order the code runs::

    dgs = sum_c dy * x1                      (N, 1, H, W)
    dx1 = dy * gs                            (N, C, H, W)  direct path
    dr  = dgs * gs (1 - gs)                  (N, 1, H, W)
    dq  = BN backward (training: also through the batch mean and variance)
    dp, dW_s = conv backward                 (N, 2, H, W), (1, 2, k, k)
    dx1 += dp_mean / C                       mean over channels: equal shares
    dx1 += dp_max * share_c                  max over channels (share: see below)
    dgc = sum_{h, w} dx1 * x                 (N, C)
    dz  = dgc * gc (1 - gc)                  (N, C)        shared by every z_t
    MLP backward once per pool (relu'(0) = 0), the weight (and bias) gradients summed:
    dv_t                                     (N, C)
    dx  = dx1 * gc + sum_t dv_t * dpool_t    (N, C, H, W)
          dpool_avg = 1 / (H W),  dpool_max = share_hw,
          dpool_lp  = x / v_lp (0 where v_lp = 0),  dpool_lse = exp(x - v_lse) (softmax over H W)

Ties and kinks. ``max_grad`` fixes the gradient of both maxima at ties: ``"split"``
(default) shares it evenly among the t equal elements (share = [x == max] / t), as
``torch.amax`` (which timm uses); ``"first"`` gives it all to the first maximal element in
row-major order (of (H, W) for the pool, of C for the channel map), as the official code's
``F.max_pool2d`` and ``torch.max(x, 1)`` do on the CPU. The L2 pool has a kink where a
channel is all zeros: its gradient there is 0 (torch's ``lp_pool2d`` gives 0 too). The
log-sum-exp pool is smooth; its internal shift by the maximum does not reach the gradient
(see ``npattn.functional.logsumexp_forward``, ``l2_norm_forward``, ``amax_forward``).

The spatial BatchNorm sees N H W values of its one channel; training with a single value
(N = H = W = 1) raises PyTorch's "Expected more than 1 value per channel when training".
Its momentum and eps are ``bn_momentum`` and ``bn_eps`` (the official code uses momentum
0.01). An even ``spatial_kernel_size`` is refused: timm pads it by (k - 1) // 2, the gate
comes out one row and column short and the product with x fails.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import functional as F
from .._checks import float_array, positive_int, same_dtype, shape_is
from ..functional.reduce import check_max_grad
from ._timm import check_bool, pointwise, pointwise_backward, reduced_channels
from .base import Block, make_rng

__all__ = ["CBAM"]

POOL_TYPES = ("avg", "max", "lp", "lse")
SPATIAL_ORDERS = ("avg_max", "max_avg")


@dataclass(frozen=True)
class CBAMCache:
    x: np.ndarray  # (N, C, H, W) the input
    pools: tuple  # per pool type t: (t, cache of the pool over (H, W) or None for "avg", (fc1, relu, fc2) caches)
    max_hw: object  # AmaxCache of the first "max" pool over (H, W) of x, None without one
    gate_c: np.ndarray  # (N, C, 1, 1) channel gate gc
    x1: np.ndarray  # (N, C, H, W) x * gc
    max_c: object  # AmaxCache of max over C of x1 (None with no_spatial)
    conv: object  # Conv2dCache of the k x k conv on p (N, 2, H, W) (None with no_spatial)
    bn: object  # BatchNormCache of the spatial BatchNorm (N, 1, H, W) (None with no_spatial)
    gate_s: np.ndarray  # (N, 1, H, W) spatial gate gs (None with no_spatial)


class CBAM(Block):
    """CBAM in timm's layout: ``y = x1 * sigmoid(BN(conv([mean_c x1, max_c x1])))`` with
    ``x1 = x * sigmoid(sum_t mlp(pool_t x))``, pools mean and max over H W by default.

    Parameters
    ----------
    channels : int
    rd_ratio : float, default 1/16
    rd_channels : int or None, default None
        The MLP's hidden width D; None (or 0, as timm) computes
        ``D = make_divisible(channels * rd_ratio, rd_divisor, round_limit=0)``. The official
        code's ``reduction_ratio`` r is ``rd_channels=channels // r``.
    rd_divisor : int, default 1
    spatial_kernel_size : odd int, default 7
    mlp_bias : bool, default False
        Biases of fc1 and fc2 (keys ``channel.fc1.bias`` (D,), ``channel.fc2.bias`` (C,));
        timm's option, True in the official code (two ``nn.Linear``).
    pool_types : sequence of "avg", "max", "lp", "lse", default ("avg", "max")
        The pools over H W fed through the shared MLP, summed in this order (the official
        code's argument; "lp" is the L2 norm, "lse" the log-sum-exp).
    no_spatial : bool, default False
        True: no spatial gate (``y = x1``) and no ``spatial.*`` keys (the official option).
    spatial_order : "avg_max" (default, timm) or "max_avg" (official: ChannelPool stacks [max, mean])
        The order of the two maps the spatial conv reads.
    max_grad : "split" (default, torch.amax) or "first" (torch.max / max_pool2d, official)
        The gradient of both maxima at ties (see the module docstring).
    bn_momentum, bn_eps : float, default 0.1 and 1e-5 (PyTorch's); the official spatial
        BatchNorm uses momentum 0.01.
    rng : None, int or numpy.random.Generator (PyTorch's default initialisation)
    dtype : float32 (default) or float64

    State_dict keys (timm's ``CbamModule``): ``channel.fc1.weight`` (D, C, 1, 1),
    ``channel.fc2.weight`` (C, D, 1, 1), ``spatial.conv.conv.weight`` (1, 2, k, k),
    ``spatial.conv.bn.{weight, bias, running_mean, running_var, num_batches_tracked}`` (1,).
    ReLU and sigmoid gates (timm's defaults; its other activations are not offered). The
    math is in the module docstring.
    """

    def __init__(self, channels, rd_ratio=1.0 / 16, rd_channels=None, rd_divisor=1, spatial_kernel_size=7, *,
                 mlp_bias=False, pool_types=("avg", "max"), no_spatial=False, spatial_order="avg_max",
                 max_grad="split", bn_momentum=0.1, bn_eps=1e-5, rng=None, dtype=np.float32):
        super().__init__(dtype)
        op = "CBAM"
        self.config = dict(channels=channels, rd_ratio=rd_ratio, rd_channels=rd_channels, rd_divisor=rd_divisor,
                           spatial_kernel_size=spatial_kernel_size, mlp_bias=mlp_bias, pool_types=pool_types,
                           no_spatial=no_spatial, spatial_order=spatial_order, max_grad=max_grad,
                           bn_momentum=bn_momentum, bn_eps=bn_eps)
        self.channels = positive_int(op, "channels", channels)
        self.rd_channels = reduced_channels(op, self.channels, rd_ratio, rd_channels, rd_divisor)
        self.spatial_kernel_size = positive_int(op, "spatial_kernel_size", spatial_kernel_size)
        if self.spatial_kernel_size % 2 == 0:
            raise ValueError(
                f"{op}: spatial_kernel_size must be odd (timm pads by (k - 1) // 2, so an even kernel "
                f"shrinks the map), got {self.spatial_kernel_size}"
            )
        self.mlp_bias = check_bool(op, "mlp_bias", mlp_bias)
        self.no_spatial = check_bool(op, "no_spatial", no_spatial)
        if isinstance(pool_types, str) or not isinstance(pool_types, (tuple, list)) or not pool_types:
            raise TypeError(f"{op}: pool_types must be a non-empty tuple or list of {POOL_TYPES}, got {pool_types!r}")
        bad = [t for t in pool_types if t not in POOL_TYPES]
        if bad:
            raise ValueError(f"{op}: pool_types must name pools among {POOL_TYPES}, got {list(pool_types)!r}")
        self.pool_types = tuple(pool_types)
        if spatial_order not in SPATIAL_ORDERS:
            raise ValueError(f"{op}: spatial_order must be one of {SPATIAL_ORDERS}, got {spatial_order!r}")
        self.spatial_order = spatial_order
        self.max_grad = check_max_grad(op, max_grad)
        self._set_bn(bn_momentum, bn_eps)
        rng = make_rng(rng)
        self._add_conv("channel.fc1.", rng, self.channels, self.rd_channels, 1, bias=self.mlp_bias)
        self._add_conv("channel.fc2.", rng, self.rd_channels, self.channels, 1, bias=self.mlp_bias)
        if not self.no_spatial:
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

    def _pool(self, t, x):
        """The pool ``t`` over (H, W): ``(v (N, C), cache)``, cache None for the mean."""
        if t == "avg":
            return x.mean(axis=(2, 3)), None
        if t == "max":
            return F.amax_forward(x, (2, 3), keepdims=False, max_grad=self.max_grad)
        if t == "lp":
            return F.l2_norm_forward(x, (2, 3), keepdims=False)
        return F.logsumexp_forward(x, (2, 3), keepdims=False)

    @staticmethod
    def _pool_backward(t, d_v, cache, x):
        """Gradient of the pool ``t`` with respect to x (N, C, H, W), for d_v (N, C)."""
        n, c, h, w = x.shape
        if t == "avg":
            return np.broadcast_to((d_v * x.dtype.type(1.0 / (h * w))).reshape(n, c, 1, 1), x.shape)
        if t == "max":
            return F.amax_backward(d_v, cache)["x"]
        if t == "lp":
            return F.l2_norm_backward(d_v, cache)["x"]
        return F.logsumexp_backward(d_v, cache)["x"]

    def forward(self, x, training=False):
        """Returns ``(y, cache)``; in training the spatial BatchNorm uses batch statistics
        and updates its running statistics."""
        x = self._check_input("x", x, 4, self.channels)
        self._check_image("x", x, "the maximum over H W of an empty image does not exist; timm's amax refuses it")
        n, c, h, w = x.shape
        if training and not self.no_spatial and n * h * w == 1:
            raise ValueError(
                f"Expected more than 1 value per channel when training, got input size {(1, 1, 1, 1)}"
            )
        # channel gate
        z_sum = None
        pools = []
        for t in self.pool_types:
            v, k_pool = self._pool(t, x)  # (N, C)
            z, k_mlp = self._mlp(v)  # (N, C)
            z_sum = z if z_sum is None else z_sum + z  # (N, C) in the order of pool_types
            pools.append((t, k_pool, k_mlp))
        max_hw = next((k for t, k, _ in pools if t == "max"), None)
        g_c = F.sigmoid(z_sum).reshape(n, c, 1, 1)  # (N, C, 1, 1)
        x1 = x * g_c  # (N, C, H, W)
        if self.no_spatial:
            return x1, CBAMCache(x, tuple(pools), max_hw, g_c, x1, None, None, None, None)
        # spatial gate
        mx_c, k_max_c = F.amax_forward(x1, 1, max_grad=self.max_grad)  # (N, 1, H, W)
        mean_c = x1.mean(axis=1, keepdims=True)  # (N, 1, H, W)
        maps = [mean_c, mx_c] if self.spatial_order == "avg_max" else [mx_c, mean_c]
        p = np.concatenate(maps, axis=1)  # (N, 2, H, W)
        pad = (self.spatial_kernel_size - 1) // 2
        q, k_conv = self._conv("spatial.conv.conv.", p, padding=pad)  # (N, 1, H, W)
        r, k_bn = self._batch_norm("spatial.conv.bn.", q, training)  # (N, 1, H, W)
        g_s = F.sigmoid(r)  # (N, 1, H, W)
        y = x1 * g_s  # (N, C, H, W)
        return y, CBAMCache(x, tuple(pools), max_hw, g_c, x1, k_max_c, k_conv, k_bn, g_s)

    def backward(self, grad_out, cache: CBAMCache):
        """Returns ``((dx,), grads)`` with a gradient for every parameter key."""
        op = "CBAM.backward"
        x, x1, g_c, g_s = cache.x, cache.x1, cache.gate_c, cache.gate_s
        dy = float_array(op, "grad_out", grad_out, 4, "(N, C, H, W)")
        shape_is(op, "grad_out", dy, x.shape)
        same_dtype(op, "x", x, grad_out=dy)
        n, c, h, w = x.shape
        grads = self.zero_grads()
        if self.no_spatial:
            d_x1 = dy  # (N, C, H, W) y = x1
        else:
            # spatial gate
            d_gs = np.einsum("nchw,nchw->nhw", dy, x1)[:, None]  # (N, 1, H, W)
            d_x1 = dy * g_s  # (N, C, H, W) direct path
            d_r = d_gs * (g_s * (1 - g_s))  # (N, 1, H, W)
            d_q = self._batch_norm_backward("spatial.conv.bn.", d_r, cache.bn, grads)  # (N, 1, H, W)
            d_p = self._conv_backward("spatial.conv.conv.", d_q, cache.conv, grads)  # (N, 2, H, W)
            i_mean, i_max = (0, 1) if self.spatial_order == "avg_max" else (1, 0)
            d_x1 += d_p[:, i_mean:i_mean + 1] * x.dtype.type(1.0 / c)  # (N, C, H, W) mean over channels
            d_x1 += F.amax_backward(d_p[:, i_max:i_max + 1], cache.max_c)["x"]  # (N, C, H, W) max over channels
        # channel gate
        d_gc = np.einsum("nchw,nchw->nc", d_x1, x)  # (N, C)
        d_z = d_gc * (g_c * (1 - g_c)).reshape(n, c)  # (N, C) = d z_t for every pool t
        d_x = d_x1 * g_c  # (N, C, H, W) through x1 = x * gc
        for t, k_pool, k_mlp in cache.pools:
            d_v = self._mlp_backward(d_z, k_mlp, grads)  # (N, C)
            d_x += self._pool_backward(t, d_v, k_pool, x)  # (N, C, H, W) through the pool t
        return (d_x,), grads
