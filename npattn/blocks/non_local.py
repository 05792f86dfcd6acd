"""Non-local block (Wang, Girshick, Gupta, He: "Non-local Neural Networks", CVPR 2018), in
the layout of timm's ``NonLocalAttn`` (timm.layers.non_local_attn, the image-classification
variant of the BAT code): embedded-Gaussian attention over the H W positions of a map,
a 1x1 convolution back to C channels, BatchNorm, and the residual. Options reproduce
the paper's other pairwise functions and the official implementations (the PyTorch port
AlexHex7/Non-local_pytorch and the authors' Caffe2 code): ``mode``, ``sub_sample``,
``sub_sample_at``, ``scale``, ``norm``.

Layers, with C = in_channels and C' = rd_channels (by default C / 8 rounded to a multiple
of 8, at least 8, as timm's ``make_divisible``), all 1x1 convolutions with bias::

    t: C -> C'   (query)     p: C -> C'   (key)     g: C -> C'   (value)
    z: C' -> C               norm: BatchNorm2d(C)   (only with norm=True)
    concat_project.0: 2C' -> 1, no bias             (only with mode="concatenation")

state_dict keys ``t.*``, ``p.*``, ``g.*``, ``z.*``, ``norm.*`` (BatchNorm's running
statistics included); ``mode="gaussian"`` has no ``t`` and ``p`` (the raw input is its
own query and key, as in the port); ``mode="concatenation"`` adds the port's
``concat_project.0.weight`` (1, 2C', 1, 1). timm initialises the convolutions with
Kaiming-normal (fan_out, ReLU gain), their biases with 0, and norm.weight = norm.bias =
0, so that a fresh block is the identity; npattn does the same (with ``norm=False``,
``z.weight`` = 0 instead, as the port's ``bn_layer=False``; concat_project as PyTorch's
default conv init).

Forward, for x (B, C, H, W), n = H W query positions, and the scale c: ``scale`` when
given, else C^(-1/2) with ``use_scale`` (timm scales by the INPUT channels C, not by C';
the authors' Caffe2 code scales by C'^(-1/2): pass ``scale=C' ** -0.5``), else 1::

    keys and values from the pool (sub_sample: pool = 2x2 max-pool, stride 2, floor):
      sub_sample_at="after_conv"  (the port):    P = pool(p(x)),  G = pool(g(x))
      sub_sample_at="before_conv" (Caffe2):      P = p(pool(x)),  G = g(pool(x))
      no sub_sample:                             P = p(x),        G = g(x)
    T = t(x)                                           (B, C', H, W)
    gaussian mode: T = x and P = x, or pool(x) with sub_sample (no t, no p)
    Q = T as (B, n, C'), K = P as (B, m, C'), V = G as (B, m, C')  (position-major;
                                                  m = H W, or floor(H/2) floor(W/2) pooled)
    S = c Q K^T                                        (B, n, m) embedded_gaussian, gaussian, dot_product
    S_ij = c relu(w_t . Q_i + w_p . K_j)               (B, n, m) concatenation; [w_t, w_p] = concat_project.0.weight
    A = softmax_rows(S)                                embedded_gaussian, gaussian
    A = S / m                                          dot_product, concatenation (the port's f / N)
    Y = A V                                            (B, n, C')
    U = Y as (B, C', H, W)
    out = norm(z(U)) + x,  or z(U) + x with norm=False (B, C, H, W)

(the softmax attention is ``npattn.functional.attention`` with scale c; its file derives
the softmax backward; the max-pool is ``npattn.functional.max_pool2d_forward``, whose
gradient goes to the first maximal element of each window, as torch's CPU kernel.)

Backward, for dout = dL/dout, in the order the code computes it::

    dx   = dout                                       (B, C, H, W) the residual
    dZ   = norm'(dout)  (or dout without norm)        (B, C, H, W) BatchNorm backward (batch statistics in training)
    dU   = z'(dZ)                                     (B, C', H, W) with dW_z, db_z
    dY   = dU as (B, n, C')
    dV   = A^T dY;  dA = dY V^T                       (B, m, C'), (B, n, m)
    softmax modes:  dS = A * (dA - rowsum(dA * A))    (B, n, m)
    dot_product:    dS = dA / m
    concatenation:  dR = c dA / m * [w_t . Q_i + w_p . K_j > 0]   (relu'(0) = 0)
                    dQ = rowsum(dR) w_t;  dK = colsum(dR) w_p
                    dw_t = sum_{b,i} rowsum(dR)_i Q_i;  dw_p = sum_{b,j} colsum(dR)_j K_j
    other modes:    dQ = c dS K;   dK = c dS^T Q
    dT, dP, dG = dQ, dK, dV as maps
    after_conv:     dP, dG through pool' (to the winners), then p', g' onto dx
    before_conv:    p'(dP) + g'(dG) onto d(pool(x)), then pool' onto dx
    dx  += t'(dT)  (gaussian: dx += dT, and dP onto pool(x) or x)

Parameter gradients that are zero in exact arithmetic, which npattn returns as exact zeros
(``np.zeros``), never as the rounding noise the formulas above would give:

- ``p.bias`` in the embedded_gaussian mode (the gaussian mode has no p): it adds ``c Q_i . b_p`` to every score of row i, the
  same number for every key, and a softmax does not change when a row is shifted
  (sum_j dS_ij = 0). (In dot_product and concatenation it is an ordinary gradient.)
- ``z.bias`` in training with ``norm``: it feeds a BatchNorm that normalises with the
  batch statistics, which removes any per-channel constant.
- ``g.bias`` in training with ``norm`` in the softmax modes: it adds b_g to every value,
  every row of A sums to 1, so Y gains the same b_g at every position (max-pooling
  keeps a constant shift), and z maps that to the per-channel constant W_z b_g, removed
  by the BatchNorm. (With A = S / m the rows do not sum to 1 and the gradient is not 0.)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import functional as F
from .._checks import float_array, positive_int, shape_is
from ..functional.attention import attention, attention_backward
from .base import Block, kaiming_uniform, make_rng

__all__ = ["NonLocalAttn", "reduced_channels"]


def reduced_channels(value, divisor=8, round_limit=0.9):
    """``value`` rounded to the nearest multiple of ``divisor`` (at least ``divisor``),
    one multiple more when rounding lost more than 10% (timm's ``make_divisible``)."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if rounded < round_limit * value:
        rounded += divisor
    return rounded


MODES = ("embedded_gaussian", "dot_product", "gaussian", "concatenation")
SOFTMAX_MODES = ("embedded_gaussian", "gaussian")


@dataclass(frozen=True)
class NonLocalCache:
    x_shape: tuple  # (B, C, H, W)
    dtype: np.dtype  # of x
    training: bool
    key_hw: tuple  # (Hk, Wk) of the key / value maps: (H, W), or the pooled size
    pool_x: object  # MaxPool2dCache of pool(x) (before_conv, or gaussian keys), else None
    convs: tuple  # Conv2dCache of t, p, g (None where absent); t on x, p and g on x or pool(x)
    pools: tuple  # MaxPool2dCache of pool(p(x)), pool(g(x)) (after_conv), else (None, None)
    att: object  # AttentionCache: Q (B, n, Cq), K (B, m, Cq), V (B, m, C'), A (B, n, m), softmax modes
    pairwise: tuple  # (Q, K, V, A (B, n, m), relu mask (B, n, m) or None), dot_product / concatenation
    z: object  # Conv2dCache of z: input U (B, C', H, W)
    norm: object  # BatchNormCache of norm: (B, C, H, W), None without norm


class NonLocalAttn(Block):
    """timm's ``NonLocalAttn``: ``norm(z(softmax(c t(x)^T p(x)) g(x))) + x``, and the
    official variants.

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
    mode : str, default "embedded_gaussian"
        The pairwise function: ``"embedded_gaussian"`` (timm's, softmax of c t p^T),
        ``"dot_product"`` (c t p^T / m), ``"gaussian"`` (softmax of c x x^T: no t, p),
        ``"concatenation"`` (c relu(w [t; p]) / m), the port's four variants.
    sub_sample : bool, default False
        A 2x2 max-pool (stride 2) on the key and value paths (the port's default True).
    sub_sample_at : {"after_conv", "before_conv"}, default "after_conv"
        Pool the outputs of p and g (the PyTorch port) or pool x before them (the
        authors' Caffe2 code); the two differ, a max does not commute with a 1x1 conv.
    scale : float or None, default None
        The score scale c; None: ``use_scale``'s choice. The authors scale by C'^(-1/2).
    norm : bool, default True
        BatchNorm after z (False: the port's ``bn_layer=False``, no ``norm.*`` keys).
    bn_momentum : float, default 0.1
        Momentum of norm's running statistics (PyTorch's convention).
    bn_eps : float, default 1e-5
        Added to norm's variance.
    rng : None, int or numpy.random.Generator (timm's initialisation)
    dtype : float32 (default) or float64

    ``forward(x, training=False) -> (out, cache)``; ``backward(dout, cache) -> ((dx,), grads)``.
    The math is in the module docstring.
    """

    def __init__(self, in_channels, use_scale=True, rd_ratio=1 / 8, rd_channels=None, rd_divisor=8, *,
                 mode="embedded_gaussian", sub_sample=False, sub_sample_at="after_conv", scale=None, norm=True,
                 bn_momentum=0.1, bn_eps=1e-5, rng=None, dtype=np.float32):
        super().__init__(dtype)
        op = "NonLocalAttn"
        self.in_channels = positive_int(op, "in_channels", in_channels)
        for name, v in (("use_scale", use_scale), ("sub_sample", sub_sample), ("norm", norm)):
            if not isinstance(v, (bool, np.bool_)):
                raise TypeError(f"{op}: {name} must be a bool, got {v!r}")
        if mode not in MODES:
            raise ValueError(f"{op}: mode must be one of {MODES}, got {mode!r}")
        if sub_sample_at not in ("after_conv", "before_conv"):
            raise ValueError(f"{op}: sub_sample_at must be 'after_conv' or 'before_conv', got {sub_sample_at!r}")
        if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float, np.floating))
                                  or not np.isfinite(scale)):
            raise TypeError(f"{op}: scale must be None or a finite real number, got {scale!r}")
        self.use_scale = bool(use_scale)
        self.mode = mode
        self.sub_sample = bool(sub_sample)
        self.sub_sample_at = sub_sample_at
        self.norm = bool(norm)
        self._set_bn(bn_momentum, bn_eps)
        if rd_channels is None:
            if isinstance(rd_ratio, bool) or not isinstance(rd_ratio, (int, float)) or not rd_ratio > 0:
                raise ValueError(f"{op}: rd_ratio must be a positive number, got {rd_ratio!r}")
            rd_divisor = positive_int(op, "rd_divisor", rd_divisor)
            rd_channels = reduced_channels(self.in_channels * rd_ratio, rd_divisor)
        self.rd_ratio = rd_ratio
        self.rd_divisor = rd_divisor
        self.rd_channels = positive_int(op, "rd_channels", rd_channels)
        if scale is not None:
            self.scale = float(scale)
        else:
            self.scale = self.in_channels ** -0.5 if self.use_scale else 1.0
        rng = make_rng(rng)
        c, cr = self.in_channels, self.rd_channels
        layers = (("g", c, cr), ("z", cr, c)) if mode == "gaussian" else (("t", c, cr), ("p", c, cr), ("g", c, cr), ("z", cr, c))
        for name, cin, cout in layers:
            if name == "z" and mode == "concatenation":
                self._add_param("concat_project.0.weight", kaiming_uniform(rng, (1, 2 * cr, 1, 1), 2 * cr, self.dtype))
            std = np.sqrt(2.0 / cout)  # kaiming_normal_(mode="fan_out", nonlinearity="relu"), 1x1 kernel
            self._add_param(f"{name}.weight", rng.normal(0.0, std, (cout, cin, 1, 1)))
            self._add_param(f"{name}.bias", np.zeros(cout))
        if self.norm:
            self._add_batch_norm("norm.", c)
            self._state["norm.weight"] = np.zeros(c, dtype=self.dtype)  # timm: the block starts as the identity
        else:
            self._state["z.weight"] = np.zeros((c, cr, 1, 1), dtype=self.dtype)  # the port's bn_layer=False init

    def zero_grad_keys(self, training):
        """The parameters whose gradient is identically 0 (module docstring)."""
        keys = []
        if self.mode == "embedded_gaussian":
            keys.append("p.bias")
        if training and self.norm:
            if self.mode in SOFTMAX_MODES:
                keys.append("g.bias")
            keys.append("z.bias")
        return tuple(keys)

    def forward(self, x, training=False):
        """``out = norm(z(attention)) + x``, (B, C, H, W) -> (B, C, H, W). In training the
        BatchNorm uses and updates the batch statistics."""
        x = self._check_input("x", x, 4, self.in_channels)
        self._check_image("x", x, "timm's 1x1 convolutions refuse an empty image")
        b, c, h, w = x.shape
        if self.sub_sample and (h < 2 or w < 2):
            raise ValueError(f"NonLocalAttn: x must have H >= 2 and W >= 2 with sub_sample (torch's 2x2 max-pool "
                             f"refuses an empty output), got shape {tuple(x.shape)}")
        cr, n = self.rd_channels, h * w
        gaussian, before = self.mode == "gaussian", self.sub_sample and self.sub_sample_at == "before_conv"
        after = self.sub_sample and not before
        xp = k_px = None
        if before or (self.sub_sample and gaussian):
            xp, k_px = F.max_pool2d_forward(x, 2)  # (B, C, H // 2, W // 2)
        src = xp if before else x  # input of p and g
        k_t = k_p = k_pp = k_gp = None
        if gaussian:
            t = x  # (B, C, H, W) the input is its own query
            p = xp if self.sub_sample else x  # (B, C, Hk, Wk) and its own key
        else:
            t, k_t = self._conv("t.", x)  # (B, C', H, W)
            p, k_p = self._conv("p.", src)  # (B, C', ., .)
            if after:
                p, k_pp = F.max_pool2d_forward(p, 2)  # (B, C', Hk, Wk)
        g, k_g = self._conv("g.", src)  # (B, C', ., .)
        if after:
            g, k_gp = F.max_pool2d_forward(g, 2)  # (B, C', Hk, Wk)
        hk, wk = g.shape[2:]
        m, cq = hk * wk, t.shape[1]
        q = t.reshape(b, cq, n).transpose(0, 2, 1)  # (B, n, Cq) queries, one per position
        k = p.reshape(b, cq, m).transpose(0, 2, 1)  # (B, m, Cq) keys
        v = g.reshape(b, cr, m).transpose(0, 2, 1)  # (B, m, C') values
        k_att = pairwise = None
        if self.mode in SOFTMAX_MODES:
            y, k_att = attention(q, k, v, None, self.scale)  # (B, n, C')
        else:
            sc = x.dtype.type(self.scale)
            mask = None
            if self.mode == "dot_product":
                a = np.matmul(q, k.transpose(0, 2, 1))  # (B, n, m) Q K^T
            else:
                wcat = self._state["concat_project.0.weight"].reshape(2 * cr)
                pre = (q @ wcat[:cr])[:, :, None] + (k @ wcat[cr:])[:, None, :]  # (B, n, m) w_t.Q_i + w_p.K_j
                mask = pre > 0
                a = np.maximum(pre, x.dtype.type(0))  # (B, n, m) relu
            a *= sc / x.dtype.type(m)  # (B, n, m) A = c S' / m
            y = np.matmul(a, v)  # (B, n, C')
            pairwise = (q, k, v, a, mask)
        u = np.ascontiguousarray(y.transpose(0, 2, 1)).reshape(b, cr, h, w)  # (B, C', H, W)
        zz, k_z = self._conv("z.", u)  # (B, C, H, W)
        k_n = None
        if self.norm:
            out, k_n = self._batch_norm("norm.", zz, training)  # (B, C, H, W)
        else:
            out = zz
        out += x  # the residual (out is a fresh array)
        return out, NonLocalCache(x.shape, x.dtype, bool(training), (hk, wk), k_px, (k_t, k_p, k_g), (k_pp, k_gp),
                                  k_att, pairwise, k_z, k_n)

    def backward(self, grad_out, cache: NonLocalCache):
        """Returns ``((dx,), grads)``, grads keyed like the state_dict's parameters; the
        keys of :meth:`zero_grad_keys` are exact zeros (module docstring)."""
        op = "NonLocalAttn.backward"
        dy = float_array(op, "grad_out", grad_out, 4, "(B, C, H, W)")
        shape_is(op, "grad_out", dy, cache.x_shape)
        if dy.dtype != cache.dtype:
            raise TypeError(f"{op}: grad_out must have the forward input's dtype {cache.dtype}, got {dy.dtype}")
        b, c, h, w = cache.x_shape
        cr, n = self.rd_channels, h * w
        hk, wk = cache.key_hw
        m = hk * wk
        gaussian = self.mode == "gaussian"
        grads = self.zero_grads()
        d_x = dy.copy()  # (B, C, H, W) through the residual
        if self.norm:
            d_zz = self._batch_norm_backward("norm.", dy, cache.norm, grads)  # (B, C, H, W)
        else:
            d_zz = dy
        d_u = self._conv_backward("z.", d_zz, cache.z, grads, next_bn=cache.norm)  # (B, C', H, W); z.bias: base.bias_grad_is_zero
        d_y = d_u.reshape(b, cr, n).transpose(0, 2, 1)  # (B, n, C')
        if self.mode in SOFTMAX_MODES:
            d_q, d_k, d_v = attention_backward(d_y, cache.att)  # (B, n, Cq), (B, m, Cq), (B, m, C')
        else:
            q, k, v, a, mask = cache.pairwise
            sc = dy.dtype.type(self.scale) / dy.dtype.type(m)
            d_v = np.matmul(a.transpose(0, 2, 1), d_y)  # (B, m, C') A^T dY
            d_s = np.matmul(d_y, v.transpose(0, 2, 1))  # (B, n, m) dA = dY V^T
            d_s *= sc  # (B, n, m) through A = c S' / m
            if self.mode == "dot_product":
                d_q = np.matmul(d_s, k)  # (B, n, C')
                d_k = np.matmul(d_s.transpose(0, 2, 1), q)  # (B, m, C')
            else:
                d_s *= mask  # (B, n, m) relu'
                wcat = self._state["concat_project.0.weight"].reshape(2 * cr)
                d_rows = d_s.sum(axis=2)  # (B, n) dL/d(w_t . Q_i)
                d_cols = d_s.sum(axis=1)  # (B, m) dL/d(w_p . K_j)
                d_q = d_rows[:, :, None] * wcat[:cr]  # (B, n, C')
                d_k = d_cols[:, :, None] * wcat[cr:]  # (B, m, C')
                d_w = np.concatenate([np.einsum("bn,bnc->c", d_rows, q), np.einsum("bm,bmc->c", d_cols, k)])  # (2C',)
                grads["concat_project.0.weight"] = d_w.reshape(1, 2 * cr, 1, 1)
        cq = d_q.shape[2]
        d_t = np.ascontiguousarray(d_q.transpose(0, 2, 1)).reshape(b, cq, h, w)  # (B, Cq, H, W)
        d_p = np.ascontiguousarray(d_k.transpose(0, 2, 1)).reshape(b, cq, hk, wk)  # (B, Cq, Hk, Wk)
        d_g = np.ascontiguousarray(d_v.transpose(0, 2, 1)).reshape(b, cr, hk, wk)  # (B, C', Hk, Wk)
        k_t, k_p, k_g = cache.convs
        k_pp, k_gp = cache.pools
        before = self.sub_sample and self.sub_sample_at == "before_conv"
        d_xp = None if cache.pool_x is None else np.zeros(cache.pool_x.index.shape[:2] + (hk, wk), dtype=dy.dtype)
        if k_gp is not None:
            d_g = F.max_pool2d_backward(d_g, k_gp)["x"]  # (B, C', H, W) to each window's winner
        d_src = self._conv_backward("g.", d_g, k_g, grads)  # (B, C, ., .) input of g
        if gaussian:
            if d_xp is not None:
                d_xp += d_p  # (B, C, Hk, Wk) the key is pool(x)
            else:
                d_x += d_p  # the key is x
            d_x += d_t  # the query is x
        else:
            if k_pp is not None:
                d_p = F.max_pool2d_backward(d_p, k_pp)["x"]  # (B, C', H, W)
            d_src += self._conv_backward("p.", d_p, k_p, grads)  # (B, C, ., .)
            d_x += self._conv_backward("t.", d_t, k_t, grads)  # (B, C, H, W)
        if before:
            d_xp += d_src  # (B, C, Hk, Wk) p and g read pool(x)
        else:
            d_x += d_src  # p and g read x
        if d_xp is not None:
            d_x += F.max_pool2d_backward(d_xp, cache.pool_x)["x"]  # (B, C, H, W)
        for key in self.zero_grad_keys(cache.training):
            grads[key] = np.zeros_like(grads[key])  # see the module docstring
        return (d_x,), grads
