"""Convolutional block attention module (Woo, Park, Lee, Kweon: "CBAM: Convolutional Block
Attention Module", ECCV 2018), in timm's layout (``timm.layers.cbam.CbamModule``), with the
options that reproduce the authors' release (Jongchan/attention-module, see docs/porting.md).

A channel gate, then a spatial gate. For x of shape (N, C, H, W), D the hidden width,
k the odd spatial kernel size and pad = (k - 1) / 2. The lines below are timm's default
configuration (pools "avg" and "max", no MLP bias, spatial_order "avg_max"), in
``npattn.explain``'s format; ``npattn explain CBAM`` walks them in training mode.

Forward::

    W1 = channel.fc1.weight            (D, C)        the MLP's first 1x1 conv as a matrix   [param("channel.fc1.weight")[:, :, 0, 0]]
    W2 = channel.fc2.weight            (C, D)        the MLP's second                        [param("channel.fc2.weight")[:, :, 0, 0]]
    Ws = spatial.conv.conv.weight      (1, 2, k, k)  the spatial conv, no bias               [param("spatial.conv.conv.weight")]
    gamma = spatial.conv.bn.weight     (1,)          the spatial BatchNorm                   [param("spatial.conv.bn.weight")]
    beta = spatial.conv.bn.bias        (1,)                                                  [param("spatial.conv.bn.bias")]
    rm = spatial.conv.bn.running_mean  (1,)          buffers, used in eval                   [buffer("spatial.conv.bn.running_mean")]
    rv = spatial.conv.bn.running_var   (1,)                                                  [buffer("spatial.conv.bn.running_var")]
    eps = bn_eps                       ()                                                    [attr("bn_eps")]
    v_avg = mean_{H, W} x              (N, C)        average pool                            [mean(x, (2, 3))]
    v_max = max_{H, W} x               (N, C)        max pool                                [amax(x, (2, 3))]
    z_avg = relu(v_avg W1^T) W2^T      (N, C)        the shared MLP on each pool             [linear(relu(linear(v_avg, W1)), W2)]
    z_max = relu(v_max W1^T) W2^T      (N, C)                                                [linear(relu(linear(v_max, W1)), W2)]
    zc = z_avg + z_max                 (N, C)                                                [z_avg + z_max]
    gc = sigmoid(zc)                   (N, C)        the channel gate                        [sigmoid(zc)]
    x1 = x * gc                        (N, C, H, W)                                          [x * gc[:, :, None, None]]
    p = [mean_c x1, max_c x1]          (N, 2, H, W)  two maps over the channels              [concat([mean(x1, 1, keepdims=True), amax(x1, 1, keepdims=True)], 1)]
    q = conv_kxk(p), zero padding pad  (N, 1, H, W)                                          [conv2d(p, Ws, padding=(Ws.shape[2] - 1) // 2)]
    r = BN(q)                          (N, 1, H, W)  training: batch statistics of N H W values  [batch_norm(q, gamma, beta, rm, rv, training, eps=eps)]
    gs = sigmoid(r)                    (N, 1, H, W)  the spatial gate                        [sigmoid(r)]
    y = x1 * gs                        (N, C, H, W)                                          [x1 * gs]

The options change single lines (names as in the constructor)::

    mlp_bias=True:    z_t = (relu(v_t W1^T + b1)) W2^T + b2, keys channel.fc1.bias (D,), channel.fc2.bias (C,)
    pool_types:       one v_t, z_t per entry t, zc = sum_t z_t, in the order given; besides
                      "avg" and "max": v_lp = sqrt(sum_{H, W} x^2) (L2 pool, lp_pool2d with p = 2),
                      v_lse = log sum_{H, W} exp(x) (log-sum-exp pool)
    spatial_order:    "max_avg" (official: ChannelPool stacks [max, mean]) swaps p's two maps
    no_spatial=True:  y = x1, no spatial.* keys

Backward, for dy = dL/dy, in the order the code runs::

    dgs = sum_c dy * x1                (N, 1, H, W)  y = x1 * gs, gs broadcast over C
    dr = dgs * gs (1 - gs)             (N, 1, H, W)  sigmoid'
    dq = BN backward of dr             (N, 1, H, W)  training: also through the batch mean and variance
    dgamma = sum_{n,h,w} dr * q_hat    (1,)          r = gamma q_hat + beta
    dbeta = sum_{n,h,w} dr             (1,)
    dp = conv backward of dq           (N, 2, H, W)  the adjoint of the convolution
    dWs = conv weight gradient         (1, 2, k, k)  the correlation of dq with p
    dx1 = dy * gs + dp_mean / C + dp_max * share_c
                                       (N, C, H, W)  the factor of y, the mean over C (equal shares)
                                                     and the max over C (share: see below)
    dgc = sum_{H, W} dx1 * x           (N, C)        x1 = x * gc
    dzc = dgc * gc (1 - gc)            (N, C)        sigmoid'
    dz_avg = dzc                       (N, C)        zc = z_avg + z_max                         [dzc]
    dz_max = dzc                       (N, C)                                                   [dzc]
    dv_avg = ((dz_avg W2) * [h_avg > 0]) W1
                                       (N, C)        the MLP backward, relu'(0) = 0
    dv_max = ((dz_max W2) * [h_max > 0]) W1
                                       (N, C)        h_t = v_t W1^T
    dW2 = sum_t dz_t^T a_t             (C, D)        both pools use W2: the sum of their shares
    dW1 = sum_t dh_t^T v_t             (D, C)        dh_t = (dz_t W2) * [h_t > 0]
    dx = dx1 * gc + dv_avg / (H W) + dv_max * share_hw
                                       (N, C, H, W)  x1's factor, and the two pools
                                                     (for "lp": dv_lp * x / v_lp, 0 where v_lp = 0;
                                                     for "lse": dv_lse * exp(x - v_lse), a softmax over H W)

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
    gate_c: np.ndarray  # (N, C) channel gate gc
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
        # channel gate: per pool t, v[t] and z[t] (the derivation's v_avg, z_avg, ...)
        v, z = {}, {}
        zc = None
        pools = []
        for t in self.pool_types:
            v[t], k_pool = self._pool(t, x)  # (N, C)
            z[t], k_mlp = self._mlp(v[t])  # (N, C)
            zc = z[t] if zc is None else zc + z[t]  # (N, C) in the order of pool_types
            pools.append((t, k_pool, k_mlp))
        max_hw = next((k for t, k, _ in pools if t == "max"), None)
        gc = F.sigmoid(zc)  # (N, C)
        x1 = x * gc[:, :, None, None]  # (N, C, H, W)
        if self.no_spatial:
            return x1, CBAMCache(x, tuple(pools), max_hw, gc, x1, None, None, None, None)
        # spatial gate
        mx_c, k_max_c = F.amax_forward(x1, 1, max_grad=self.max_grad)  # (N, 1, H, W)
        mean_c = x1.mean(axis=1, keepdims=True)  # (N, 1, H, W)
        maps = [mean_c, mx_c] if self.spatial_order == "avg_max" else [mx_c, mean_c]
        p = np.concatenate(maps, axis=1)  # (N, 2, H, W)
        pad = (self.spatial_kernel_size - 1) // 2
        q, k_conv = self._conv("spatial.conv.conv.", p, padding=pad)  # (N, 1, H, W)
        r, k_bn = self._batch_norm("spatial.conv.bn.", q, training)  # (N, 1, H, W)
        gs = F.sigmoid(r)  # (N, 1, H, W)
        y = x1 * gs  # (N, C, H, W)
        return y, CBAMCache(x, tuple(pools), max_hw, gc, x1, k_max_c, k_conv, k_bn, gs)

    def backward(self, grad_out, cache: CBAMCache):
        """Returns ``((dx,), grads)`` with a gradient for every parameter key."""
        op = "CBAM.backward"
        x, x1, gc, gs = cache.x, cache.x1, cache.gate_c, cache.gate_s
        dy = float_array(op, "grad_out", grad_out, 4, "(N, C, H, W)")
        shape_is(op, "grad_out", dy, x.shape)
        same_dtype(op, "x", x, grad_out=dy)
        N, C, H, W = x.shape
        grads = self.zero_grads()  # dW1, dW2, dWs, dgamma, dbeta are added into it
        if self.no_spatial:
            dx1 = dy  # (N, C, H, W) y = x1
        else:
            # spatial gate
            dgs = np.einsum("nchw,nchw->nhw", dy, x1)[:, None]  # (N, 1, H, W)
            dx1 = dy * gs  # (N, C, H, W) direct path
            dr = dgs * (gs * (1 - gs))  # (N, 1, H, W)
            dq = self._batch_norm_backward("spatial.conv.bn.", dr, cache.bn, grads)  # (N, 1, H, W); dgamma, dbeta
            dp = self._conv_backward("spatial.conv.conv.", dq, cache.conv, grads)  # (N, 2, H, W); dWs
            i_mean, i_max = (0, 1) if self.spatial_order == "avg_max" else (1, 0)
            dx1 += dp[:, i_mean:i_mean + 1] * x.dtype.type(1.0 / C)  # (N, C, H, W) mean over channels
            dx1 += F.amax_backward(dp[:, i_max:i_max + 1], cache.max_c)["x"]  # (N, C, H, W) max over channels
        # channel gate
        dgc = np.einsum("nchw,nchw->nc", dx1, x)  # (N, C)
        dzc = dgc * (gc * (1 - gc))  # (N, C) = dz_t for every pool t
        dx = dx1 * gc[:, :, None, None]  # (N, C, H, W) through x1 = x * gc
        dv = {}  # per pool t: the derivation's dv_avg, dv_max, ...
        for t, k_pool, k_mlp in cache.pools:
            dv[t] = self._mlp_backward(dzc, k_mlp, grads)  # (N, C); dW1, dW2
            dx += self._pool_backward(t, dv[t], k_pool, x)  # (N, C, H, W) through the pool t
        return (dx,), grads
