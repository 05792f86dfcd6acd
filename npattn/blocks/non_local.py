"""Non-local block (Wang, Girshick, Gupta, He: "Non-local Neural Networks", CVPR 2018), in
the layout of timm's ``NonLocalAttn`` (timm.layers.non_local_attn, the image-classification
variant of the BAT code): embedded-Gaussian attention over the H W positions of a map,
a 1x1 convolution back to C channels, BatchNorm, and the residual.

Layers, with C = in_channels and C' = rd_channels (by default C / 8 rounded to a multiple
of 8, at least 8, as timm's ``make_divisible``), all 1x1 convolutions with bias::

    t: C -> C'   (query)     p: C -> C'   (key)     g: C -> C'   (value)
    z: C' -> C               norm: BatchNorm2d(C)

state_dict keys ``t.*``, ``p.*``, ``g.*``, ``z.*``, ``norm.*`` (BatchNorm's running
statistics included). timm initialises the convolutions with Kaiming-normal (fan_out,
ReLU gain), their biases with 0, and norm.weight = norm.bias = 0, so that a fresh block
is the identity; npattn does the same.

Forward, for x (B, C, H, W), n = H W positions, and c = C^(-1/2) with ``use_scale``
(timm scales by the INPUT channels C, not by C'), else 1::

    T = t(x), P = p(x), G = g(x)                      (B, C', H, W) each
    Q = T as (B, n, C'),  K = P as (B, n, C'),  V = G as (B, n, C')   (position-major)
    A = softmax_rows(c Q K^T)                         (B, n, n)
    Y = A V                                           (B, n, C')
    U = Y as (B, C', H, W)
    out = norm(z(U)) + x                              (B, C, H, W)

(the attention is ``npattn.functional.scaled_dot_product_attention`` with scale c; its
file derives the softmax backward.)

Backward, for dout = dL/dout, in the order the code computes it::

    dx   = dout                                       (B, C, H, W) the residual
    dZ   = norm'(dout)                                (B, C, H, W) BatchNorm backward (batch statistics in training)
    dU   = z'(dZ)                                     (B, C', H, W) with dW_z, db_z
    dY   = dU as (B, n, C')
    dQ, dK, dV = attention'(dY):  dV = A^T dY;  dS = A * (dY V^T - rowsum(dY V^T * A));
                                  dQ = c dS K;   dK = c dS^T Q
    dT, dP, dG = dQ, dK, dV as (B, C', H, W)
    dx  += t'(dT) + p'(dP) + g'(dG)                   each 1x1 conv backward, with its dW, db

Two parameter gradients are zero in exact arithmetic, and npattn returns them as exact
zeros (``np.zeros``), never as the rounding noise the formulas above would give:

- ``p.bias``, always: it adds ``c Q_i . b_p`` to every score of row i, the same number
  for every key, and a softmax does not change when a row is shifted (sum_j dS_ij = 0).
- ``z.bias`` and ``g.bias``, in training mode: in front of a BatchNorm that normalises
  with the batch statistics, which removes any per-channel constant. ``z.bias`` is such a
  constant; so is ``g.bias``: it adds b_g to every value, every row of A sums to 1, so
  Y gains the same b_g at every position, and z maps that to the per-channel constant
  W_z b_g.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .._checks import float_array, positive_int, shape_is
from ..functional.attention import attention, attention_backward
from .base import Block, make_rng

__all__ = ["NonLocalAttn", "reduced_channels"]


def reduced_channels(value, divisor=8, round_limit=0.9):
    """``value`` rounded to the nearest multiple of ``divisor`` (at least ``divisor``),
    one multiple more when rounding lost more than 10% (timm's ``make_divisible``)."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if rounded < round_limit * value:
        rounded += divisor
    return rounded


@dataclass(frozen=True)
class NonLocalCache:
    x_shape: tuple  # (B, C, H, W)
    dtype: np.dtype  # of x
    training: bool
    convs: tuple  # Conv2dCache of t, p, g; each input x (B, C, H, W)
    att: object  # AttentionCache: Q, K, V (B, n, C'), A (B, n, n)
    z: object  # Conv2dCache of z: input U (B, C', H, W)
    norm: object  # BatchNormCache of norm: (B, C, H, W)


class NonLocalAttn(Block):
    """timm's ``NonLocalAttn``: ``norm(z(softmax(c t(x)^T p(x)) g(x))) + x``.

    Parameters
    ----------
    in_channels : int
        C.
    use_scale : bool, default True
        Scale the scores by ``in_channels ** -0.5`` (timm's choice: the input channels).
    rd_ratio : float, default 1/8
    rd_channels : int or None
        C'; None means ``reduced_channels(in_channels * rd_ratio, rd_divisor)``.
    rd_divisor : int, default 8
    rng : None, int or numpy.random.Generator (timm's initialisation)
    dtype : float32 (default) or float64

    ``forward(x, training=False) -> (out, cache)``; ``backward(dout, cache) -> ((dx,), grads)``.
    The math is in the module docstring.
    """

    def __init__(self, in_channels, use_scale=True, rd_ratio=1 / 8, rd_channels=None, rd_divisor=8, *, rng=None, dtype=np.float32):
        super().__init__(dtype)
        op = "NonLocalAttn"
        self.in_channels = positive_int(op, "in_channels", in_channels)
        if not isinstance(use_scale, (bool, np.bool_)):
            raise TypeError(f"{op}: use_scale must be a bool, got {use_scale!r}")
        self.use_scale = bool(use_scale)
        if rd_channels is None:
            if isinstance(rd_ratio, bool) or not isinstance(rd_ratio, (int, float)) or not rd_ratio > 0:
                raise ValueError(f"{op}: rd_ratio must be a positive number, got {rd_ratio!r}")
            rd_divisor = positive_int(op, "rd_divisor", rd_divisor)
            rd_channels = reduced_channels(self.in_channels * rd_ratio, rd_divisor)
        self.rd_ratio = rd_ratio
        self.rd_divisor = rd_divisor
        self.rd_channels = positive_int(op, "rd_channels", rd_channels)
        self.scale = self.in_channels ** -0.5 if self.use_scale else 1.0
        rng = make_rng(rng)
        c, cr = self.in_channels, self.rd_channels
        for name, cin, cout in (("t", c, cr), ("p", c, cr), ("g", c, cr), ("z", cr, c)):
            std = np.sqrt(2.0 / cout)  # kaiming_normal_(mode="fan_out", nonlinearity="relu"), 1x1 kernel
            self._add_param(f"{name}.weight", rng.normal(0.0, std, (cout, cin, 1, 1)))
            self._add_param(f"{name}.bias", np.zeros(cout))
        self._add_batch_norm("norm.", c)
        self._state["norm.weight"] = np.zeros(c, dtype=self.dtype)  # timm: the block starts as the identity

    def forward(self, x, training=False):
        """``out = norm(z(attention)) + x``, (B, C, H, W) -> (B, C, H, W). In training the
        BatchNorm uses and updates the batch statistics."""
        x = self._check_input("x", x, 4, self.in_channels)
        self._check_image("x", x, "timm's 1x1 convolutions refuse an empty image")
        b, c, h, w = x.shape
        cr, n = self.rd_channels, h * w
        t, k_t = self._conv("t.", x)  # (B, C', H, W)
        p, k_p = self._conv("p.", x)  # (B, C', H, W)
        g, k_g = self._conv("g.", x)  # (B, C', H, W)
        q = t.reshape(b, cr, n).transpose(0, 2, 1)  # (B, n, C') queries, one per position
        k = p.reshape(b, cr, n).transpose(0, 2, 1)  # (B, n, C') keys
        v = g.reshape(b, cr, n).transpose(0, 2, 1)  # (B, n, C') values
        y, k_att = attention(q, k, v, None, self.scale)  # (B, n, C')
        u = np.ascontiguousarray(y.transpose(0, 2, 1)).reshape(b, cr, h, w)  # (B, C', H, W)
        zz, k_z = self._conv("z.", u)  # (B, C, H, W)
        out, k_n = self._batch_norm("norm.", zz, training)  # (B, C, H, W)
        out += x  # the residual (out is the BatchNorm's fresh array)
        return out, NonLocalCache(x.shape, x.dtype, bool(training), (k_t, k_p, k_g), k_att, k_z, k_n)

    def backward(self, grad_out, cache: NonLocalCache):
        """Returns ``((dx,), grads)``, grads keyed like the state_dict's parameters;
        ``p.bias`` (always), ``g.bias`` and ``z.bias`` (training) are exact zeros (module docstring)."""
        op = "NonLocalAttn.backward"
        dy = float_array(op, "grad_out", grad_out, 4, "(B, C, H, W)")
        shape_is(op, "grad_out", dy, cache.x_shape)
        if dy.dtype != cache.dtype:
            raise TypeError(f"{op}: grad_out must have the forward input's dtype {cache.dtype}, got {dy.dtype}")
        b, c, h, w = cache.x_shape
        cr, n = self.rd_channels, h * w
        grads = self.zero_grads()
        d_x = dy.copy()  # (B, C, H, W) through the residual
        d_zz = self._batch_norm_backward("norm.", dy, cache.norm, grads)  # (B, C, H, W)
        d_u = self._conv_backward("z.", d_zz, cache.z, grads, next_bn=cache.norm)  # (B, C', H, W); z.bias: base.bias_grad_is_zero
        d_y = d_u.reshape(b, cr, n).transpose(0, 2, 1)  # (B, n, C')
        d_q, d_k, d_v = attention_backward(d_y, cache.att)  # (B, n, C') each
        k_t, k_p, k_g = cache.convs
        for name, d, k_conv in (("t.", d_q, k_t), ("p.", d_k, k_p), ("g.", d_v, k_g)):
            d_map = np.ascontiguousarray(d.transpose(0, 2, 1)).reshape(b, cr, h, w)  # (B, C', H, W)
            d_x += self._conv_backward(name, d_map, k_conv, grads)  # (B, C, H, W)
        grads["p.bias"] = np.zeros_like(grads["p.bias"])  # shifts each score row by a constant
        if cache.training:  # a per-channel constant through the attention and z, removed by norm's batch mean
            grads["g.bias"] = np.zeros_like(grads["g.bias"])
        return (d_x,), grads
