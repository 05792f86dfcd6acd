"""Non-local block (Wang, Girshick, Gupta, He: "Non-local Neural Networks", CVPR 2018), in
the layout of timm's ``NonLocalAttn`` (timm.layers.non_local_attn, the image-classification
variant of the BAT code): embedded-Gaussian attention over the H W positions of a map,
a 1x1 convolution back to C channels, BatchNorm, and the residual. Options reproduce
the paper's other pairwise functions and the official implementations (the PyTorch port
AlexHex7/Non-local_pytorch and the authors' Caffe2 code): ``mode``, ``sub_sample``,
``sub_sample_at``, ``scale``, ``norm``.

Layers, with C = in_channels and D = rd_channels (by default C / 8 rounded to a multiple
of 8, at least 8, as timm's ``make_divisible``), all 1x1 convolutions with bias::

    t: C -> D   (query)     p: C -> D   (key)     g: C -> D   (value)
    z: D -> C               norm: BatchNorm2d(C)   (only with norm=True)
    concat_project.0: 2D -> 1, no bias             (only with mode="concatenation")

state_dict keys ``t.*``, ``p.*``, ``g.*``, ``z.*``, ``norm.*`` (BatchNorm's running
statistics included); ``mode="gaussian"`` has no ``t`` and ``p`` (the raw input is its
own query and key, as in the port); ``mode="concatenation"`` adds the port's
``concat_project.0.weight`` (1, 2D, 1, 1). timm initialises the convolutions with
Kaiming-normal (fan_out, ReLU gain), their biases with 0, and norm.weight = norm.bias =
0, so that a fresh block is the identity; npattn does the same (with ``norm=False``,
``z.weight`` = 0 instead, as the port's ``bn_layer=False``; concat_project as PyTorch's
default conv init).

For x of shape (N, C, H, W): L = H W query positions, Lk key positions (Lk = L, or
floor(H/2) floor(W/2) with ``sub_sample``), x_l the column of x at position l, and the
score scale c: ``scale`` when given, else C^(-1/2) with ``use_scale`` (timm scales by
the INPUT channels C, not by D; the authors' Caffe2 code scales by D^(-1/2): pass
``scale=D ** -0.5``), else 1. Queries, keys and values are position-major, one row per
position, and a 1x1 convolution is written as its matrix (``Wt = t.weight[:, :, 0, 0]``).
The lines below are timm's default configuration (embedded Gaussian, no sub-sampling,
norm), in ``npattn.explain``'s format; ``npattn explain NonLocalAttn`` walks them in
training mode.

Forward::

    Wt = t.weight                      (D, C)        the query conv as a matrix         [param("t.weight")[:, :, 0, 0]]
    bt = t.bias                        (D,)                                             [param("t.bias")]
    Wp = p.weight                      (D, C)        the key conv                       [param("p.weight")[:, :, 0, 0]]
    bp = p.bias                        (D,)                                             [param("p.bias")]
    Wg = g.weight                      (D, C)        the value conv                     [param("g.weight")[:, :, 0, 0]]
    bg = g.bias                        (D,)                                             [param("g.bias")]
    Wz = z.weight                      (C, D)        the output conv                    [param("z.weight")[:, :, 0, 0]]
    bz = z.bias                        (C,)                                             [param("z.bias")]
    gamma = norm.weight                (C,)          the BatchNorm's scale              [param("norm.weight")]
    beta = norm.bias                   (C,)          and shift                          [param("norm.bias")]
    rm = norm.running_mean             (C,)          buffers, used in eval              [buffer("norm.running_mean")]
    rv = norm.running_var              (C,)                                             [buffer("norm.running_var")]
    eps = bn_eps                       ()                                               [attr("bn_eps")]
    c = scale                          ()            the score scale                    [attr("scale")]
    Q = Wt x_l + bt                    (N, L, D)     one query per position             [einsum("dc,ncl->nld", Wt, x.reshape(x.shape[0], x.shape[1], -1)) + bt]
    K = Wp x_l + bp                    (N, Lk, D)     one key per position               [einsum("dc,ncl->nld", Wp, x.reshape(x.shape[0], x.shape[1], -1)) + bp]
    V = Wg x_l + bg                    (N, Lk, D)     one value per position             [einsum("dc,ncl->nld", Wg, x.reshape(x.shape[0], x.shape[1], -1)) + bg]
    S = c Q K^T                        (N, L, Lk)    the logits, query l against key j  [c * Q @ K.transpose(0, 2, 1)]
    P = softmax_rows(S)                (N, L, Lk)    each row: weights over the keys    [softmax(S, -1)]
    Y = P V                            (N, L, D)     row l: the weighted mean of the values  [P @ V]
    U = Y as (N, D, H, W)              (N, D, H, W)  back to a map                      [Y.transpose(0, 2, 1).reshape(x.shape[0], -1, x.shape[2], x.shape[3])]
    o = Wz U + bz                      (N, C, H, W)  z, back to C channels              [conv2d(U, Wz[:, :, None, None], bz)]
    r = BN(o)                          (N, C, H, W)  norm; training: batch statistics   [batch_norm(o, gamma, beta, rm, rv, training, eps=eps)]
    y = r + x                          (N, C, H, W)  the residual                       [r + x]

The options change single lines (names as in the constructor)::

    sub_sample=True:    K and V come from a 2x2 max-pool (stride 2, floor), Lk = floor(H/2) floor(W/2):
      sub_sample_at="after_conv"  (the port):   K = pool(Wp x + bp),  V = pool(Wg x + bg)
      sub_sample_at="before_conv" (Caffe2):     K = Wp pool(x) + bp,  V = Wg pool(x) + bg
    mode="gaussian":    Q = x_l, K = x_l (or pool(x)): no t and no p; S = c Q K^T with C columns
    mode="dot_product": P = S / Lk (the port's f / N), no softmax
    mode="concatenation": S_lj = relu(w_t . Q_l + w_p . K_j), [w_t, w_p] = concat_project.0.weight,
                        P = c S / Lk
    norm=False:         y = o + x, no norm.* keys

(the max-pool is ``npattn.functional.max_pool2d_forward``, whose gradient goes to the
first maximal element of each window, as torch's CPU kernel; S, P, Y and dV, dP, dS, dQ,
dK are computed by ``npattn.functional.attention``'s ``attention`` and
``attention_backward``, the attention of MultiheadAttention and ViTAttention too, whose
module docstring derives the backward.) With ``sub_sample=True``
(after the convolutions, the port's default) the key and value lines are these
(``tests/test_explain.py`` walks them)::

    K = pool(Wp x + bp)                (N, Lk, D)     keys of the 2x2 max-pooled map     [max_pool2d(conv2d(x, Wp[:, :, None, None], bp), 2).reshape(x.shape[0], Wp.shape[0], -1).transpose(0, 2, 1)]
    V = pool(Wg x + bg)                (N, Lk, D)     values of the pooled map           [max_pool2d(conv2d(x, Wg[:, :, None, None], bg), 2).reshape(x.shape[0], Wg.shape[0], -1).transpose(0, 2, 1)]

Backward, for dy = dL/dy, in the order the code computes it::

    dr = dy                            (N, C, H, W)  y = r + x: the residual passes dy to both
    dgamma = sum_{n, h, w} dr * o_hat  (C,)          r = gamma o_hat + beta, o_hat the normalised o
    dbeta = sum_{n, h, w} dr           (C,)
    do = BN backward of dr             (N, C, H, W)  training: also through the batch mean and variance
    dWz = sum_{n, h, w} do U^T         (C, D)        o is linear in Wz: one outer product per position
    dbz = sum_{n, h, w} do             (C,)          0 exactly in training (below): the block returns zeros
    dU = Wz^T do                       (N, D, H, W)  o is linear in U (z's adjoint)
    dY = dU as (N, L, D)               (N, L, D)     U is Y rearranged
    dV = P^T dY                        (N, Lk, D)     Y is linear in V
    dP = dY V^T                        (N, L, Lk)     Y is linear in P
    dS = P * (dP - rowsum(dP * P))     (N, L, Lk)    softmax's Jacobian diag(P_l) - P_l P_l^T, row by row
    dQ = c dS K                        (N, L, D)     S is bilinear in (Q, K)
    dK = c dS^T Q                      (N, Lk, D)
    dWt = sum_{n, l} dQ_l x_l^T        (D, C)        Q is linear in Wt
    dbt = sum_{n, l} dQ_l              (D,)
    dWp = sum_{n, j} dK_j x_j^T        (D, C)        K is linear in Wp
    dbp = sum_{n, j} dK_j              (D,)          0 exactly (below)
    dWg = sum_{n, j} dV_j x_j^T        (D, C)        V is linear in Wg
    dbg = sum_{n, j} dV_j              (D,)          0 exactly in training (below)
    dx = dy + Wt^T dQ_l + Wp^T dK_l + Wg^T dV_l
                                       (N, C, H, W)  four paths: the residual and the three convs,
                                                     each gradient row put back at its position l
                                                     (sub_sample: dK and dV first go through pool's
                                                     backward, to the winner of each window; before_conv:
                                                     the convs' gradient goes onto pool(x), then through it)

The options' backward lines, in the same notation::

    dot_product:    dS = dP / Lk                      (no softmax)
    concatenation:  dR = c dP / Lk * [w_t . Q_l + w_p . K_j > 0]   (relu'(0) = 0)
                    dQ = rowsum(dR) w_t;  dK = colsum(dR) w_p
                    dw_t = sum_{n, l} rowsum(dR)_l Q_l;  dw_p = sum_{n, j} colsum(dR)_j K_j
    gaussian:       dx += dQ_l + dK_l as maps (the input is its own query and key; dK through
                    pool's backward with sub_sample)
    norm=False:     do = dr

Parameter gradients that are zero in exact arithmetic, which npattn returns as exact zeros
(``np.zeros``), never as the rounding noise the formulas above would give:

- ``p.bias`` in the embedded_gaussian mode (the gaussian mode has no p): it adds ``c Q_l . bp``
  to every score of row l, the same number for every key, and a softmax does not change
  when a row is shifted (sum_j dS_lj = 0). (In dot_product and concatenation it is an
  ordinary gradient.)
- ``z.bias`` in training with ``norm``: it feeds a BatchNorm that normalises with the
  batch statistics, which removes any per-channel constant.
- ``g.bias`` in training with ``norm`` in the softmax modes: it adds bg to every value,
  every row of P sums to 1, so Y gains the same bg at every position (max-pooling
  keeps a constant shift), and z maps that to the per-channel constant Wz bg, removed
  by the BatchNorm. (With P = S / Lk the rows do not sum to 1 and the gradient is not 0.)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import functional as F
from ..functional.attention import attention, attention_backward
from .._checks import float_array, positive_int, shape_is
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
    x_shape: tuple  # (N, C, H, W)
    dtype: np.dtype  # of x
    training: bool
    key_hw: tuple  # (Hk, Wk) of the key / value maps: (H, W), or the pooled size
    pool_x: object  # MaxPool2dCache of pool(x) (before_conv, or gaussian keys), else None
    convs: tuple  # Conv2dCache of t, p, g (None where absent); t on x, p and g on x or pool(x)
    pools: tuple  # MaxPool2dCache of pool(p(x)), pool(g(x)) (after_conv), else (None, None)
    qkv: tuple  # (Q (N, L, Dq), K (N, Lk, Dq), V (N, Lk, D), P (N, L, Lk), relu mask (N, L, Lk) or None)
    attn: object  # functional.attention's AttentionCache in the softmax modes, else None
    z: object  # Conv2dCache of z: input U (N, D, H, W)
    norm: object  # BatchNormCache of norm: (N, C, H, W), None without norm


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
        D; None means ``reduced_channels(in_channels * rd_ratio, rd_divisor)``.
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
        The score scale c; None: ``use_scale``'s choice. The authors scale by D^(-1/2).
    norm : bool, default True
        BatchNorm after z (False: the port's ``bn_layer=False``, no ``norm.*`` keys).
    bn_momentum : float, default 0.1
        Momentum of norm's running statistics (PyTorch's convention).
    bn_eps : float, default 1e-5
        Added to norm's variance.
    rng : None, int or numpy.random.Generator (timm's initialisation)
    dtype : float32 (default) or float64

    ``forward(x, training=False) -> (y, cache)``; ``backward(dy, cache) -> ((dx,), grads)``.
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
        """``y = norm(z(attention)) + x``, (N, C, H, W) -> (N, C, H, W). In training the
        BatchNorm uses and updates the batch statistics."""
        x = self._check_input("x", x, 4, self.in_channels)
        self._check_image("x", x, "timm's 1x1 convolutions refuse an empty image")
        N, C, H, W = x.shape
        if self.sub_sample and (H < 2 or W < 2):
            raise ValueError(f"NonLocalAttn: x must have H >= 2 and W >= 2 with sub_sample (torch's 2x2 max-pool "
                             f"refuses an empty output), got shape {tuple(x.shape)}")
        D, L = self.rd_channels, H * W
        gaussian, before = self.mode == "gaussian", self.sub_sample and self.sub_sample_at == "before_conv"
        after = self.sub_sample and not before
        xp = cache_pool_x = None
        if before or (self.sub_sample and gaussian):
            xp, cache_pool_x = F.max_pool2d_forward(x, 2)  # (N, C, H // 2, W // 2)
        src = xp if before else x  # input of p and g
        cache_t = cache_p = cache_pool_p = cache_pool_g = None
        if gaussian:
            q_map = x  # (N, C, H, W) the input is its own query
            k_map = xp if self.sub_sample else x  # (N, C, Hk, Wk) and its own key
        else:
            q_map, cache_t = self._conv("t.", x)  # (N, D, H, W)
            k_map, cache_p = self._conv("p.", src)  # (N, D, ., .)
            if after:
                k_map, cache_pool_p = F.max_pool2d_forward(k_map, 2)  # (N, D, Hk, Wk)
        v_map, cache_g = self._conv("g.", src)  # (N, D, ., .)
        if after:
            v_map, cache_pool_g = F.max_pool2d_forward(v_map, 2)  # (N, D, Hk, Wk)
        Hk, Wk = v_map.shape[2:]
        Lk, Dq = Hk * Wk, q_map.shape[1]
        Q = q_map.reshape(N, Dq, L).transpose(0, 2, 1)  # (N, L, Dq) queries, one per position
        K = k_map.reshape(N, Dq, Lk).transpose(0, 2, 1)  # (N, Lk, Dq) keys
        V = v_map.reshape(N, D, Lk).transpose(0, 2, 1)  # (N, Lk, D) values
        mask = attn = None
        if self.mode in SOFTMAX_MODES:
            # S = c Q K^T, P = softmax over the keys, Y = P V: npattn.functional.attention (a
            # row of -inf only, from non-finite inputs, gives P = 0 there)
            Y, attn = attention(Q, K, V, None, self.scale, empty_rows="zero")  # (N, L, D)
            P = attn.P  # (N, L, Lk)
        else:
            c = x.dtype.type(self.scale)
            if self.mode == "dot_product":
                S = np.matmul(Q, K.transpose(0, 2, 1))  # (N, L, Lk) Q K^T
            else:
                wcat = self._state["concat_project.0.weight"].reshape(2 * D)
                pre = (Q @ wcat[:D])[:, :, None] + (K @ wcat[D:])[:, None, :]  # (N, L, Lk) w_t.Q_l + w_p.K_j
                mask = pre > 0
                S = np.maximum(pre, x.dtype.type(0))  # (N, L, Lk) relu
            P = S * (c / x.dtype.type(Lk))  # (N, L, Lk) P = c S / Lk
            Y = np.matmul(P, V)  # (N, L, D)
        U = np.ascontiguousarray(Y.transpose(0, 2, 1)).reshape(N, D, H, W)  # (N, D, H, W)
        o, cache_z = self._conv("z.", U)  # (N, C, H, W)
        cache_norm = None
        if self.norm:
            r, cache_norm = self._batch_norm("norm.", o, training)  # (N, C, H, W)
        else:
            r = o
        y = r + x  # (N, C, H, W) the residual
        return y, NonLocalCache(x.shape, x.dtype, bool(training), (Hk, Wk), cache_pool_x, (cache_t, cache_p, cache_g),
                                (cache_pool_p, cache_pool_g), (Q, K, V, P, mask), attn, cache_z, cache_norm)

    def backward(self, grad_out, cache: NonLocalCache):
        """Returns ``((dx,), grads)``, grads keyed like the state_dict's parameters; the
        keys of :meth:`zero_grad_keys` are exact zeros (module docstring)."""
        op = "NonLocalAttn.backward"
        dy = float_array(op, "grad_out", grad_out, 4, "(N, C, H, W)")
        shape_is(op, "grad_out", dy, cache.x_shape)
        if dy.dtype != cache.dtype:
            raise TypeError(f"{op}: grad_out must have the forward input's dtype {cache.dtype}, got {dy.dtype}")
        N, C, H, W = cache.x_shape
        D, L = self.rd_channels, H * W
        Hk, Wk = cache.key_hw
        Lk = Hk * Wk
        gaussian = self.mode == "gaussian"
        grads = self.zero_grads()  # every parameter's gradient is added into it
        Q, K, V, P, mask = cache.qkv
        dx = dy.copy()  # (N, C, H, W) through the residual
        dr = dy  # (N, C, H, W) y = r + x
        if self.norm:
            do = self._batch_norm_backward("norm.", dr, cache.norm, grads)  # (N, C, H, W); dgamma, dbeta
        else:
            do = dr
        dU = self._conv_backward("z.", do, cache.z, grads, next_bn=cache.norm)  # (N, D, H, W); dWz, dbz (base.bias_grad_is_zero)
        dY = dU.reshape(N, D, L).transpose(0, 2, 1)  # (N, L, D)
        if self.mode in SOFTMAX_MODES:
            dQ, dK, dV = attention_backward(dY, cache.attn)  # (N, L|Lk|Lk, Dq|Dq|D); dP, dS inside
        else:
            sc = dy.dtype.type(self.scale) / dy.dtype.type(Lk)
            dV = np.matmul(P.transpose(0, 2, 1), dY)  # (N, Lk, D) P^T dY
            dP = np.matmul(dY, V.transpose(0, 2, 1))  # (N, L, Lk) dY V^T
            dS = dP * sc  # (N, L, Lk) through P = c S / Lk
            if self.mode == "dot_product":
                dQ = np.matmul(dS, K)  # (N, L, D)
                dK = np.matmul(dS.transpose(0, 2, 1), Q)  # (N, Lk, D)
            else:
                dS *= mask  # (N, L, Lk) relu': the docstring's dR
                wcat = self._state["concat_project.0.weight"].reshape(2 * D)
                d_rows = dS.sum(axis=2)  # (N, L) dL/d(w_t . Q_l)
                d_cols = dS.sum(axis=1)  # (N, Lk) dL/d(w_p . K_j)
                dQ = d_rows[:, :, None] * wcat[:D]  # (N, L, D)
                dK = d_cols[:, :, None] * wcat[D:]  # (N, Lk, D)
                dw = np.concatenate([np.einsum("bn,bnc->c", d_rows, Q), np.einsum("bm,bmc->c", d_cols, K)])  # (2D,)
                grads["concat_project.0.weight"] = dw.reshape(1, 2 * D, 1, 1)
        Dq = dQ.shape[2]
        dq_map = np.ascontiguousarray(dQ.transpose(0, 2, 1)).reshape(N, Dq, H, W)  # (N, Dq, H, W)
        dk_map = np.ascontiguousarray(dK.transpose(0, 2, 1)).reshape(N, Dq, Hk, Wk)  # (N, Dq, Hk, Wk)
        dv_map = np.ascontiguousarray(dV.transpose(0, 2, 1)).reshape(N, D, Hk, Wk)  # (N, D, Hk, Wk)
        cache_t, cache_p, cache_g = cache.convs
        cache_pool_p, cache_pool_g = cache.pools
        before = self.sub_sample and self.sub_sample_at == "before_conv"
        dxp = None if cache.pool_x is None else np.zeros(cache.pool_x.index.shape[:2] + (Hk, Wk), dtype=dy.dtype)
        if cache_pool_g is not None:
            dv_map = F.max_pool2d_backward(dv_map, cache_pool_g)["x"]  # (N, D, H, W) to each window's winner
        dsrc = self._conv_backward("g.", dv_map, cache_g, grads)  # (N, C, ., .) input of g; dWg, dbg
        if gaussian:
            if dxp is not None:
                dxp += dk_map  # (N, C, Hk, Wk) the key is pool(x)
            else:
                dx += dk_map  # the key is x
            dx += dq_map  # the query is x
        else:
            if cache_pool_p is not None:
                dk_map = F.max_pool2d_backward(dk_map, cache_pool_p)["x"]  # (N, D, H, W)
            dsrc += self._conv_backward("p.", dk_map, cache_p, grads)  # (N, C, ., .); dWp, dbp
            dx += self._conv_backward("t.", dq_map, cache_t, grads)  # (N, C, H, W); dWt, dbt
        if before:
            dxp += dsrc  # (N, C, Hk, Wk) p and g read pool(x)
        else:
            dx += dsrc  # p and g read x
        if dxp is not None:
            dx += F.max_pool2d_backward(dxp, cache.pool_x)["x"]  # (N, C, H, W)
        for key in self.zero_grad_keys(cache.training):
            grads[key] = np.zeros_like(grads[key])  # see the module docstring
        return (dx,), grads
