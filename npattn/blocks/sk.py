"""Selective kernel convolution (Li, Wang, Hu, Yang: "Selective Kernel Networks", CVPR
2019), as ``SelectiveConv`` of TeodorPoncu/selective-kernel-conv computes it.

P paths (3x3 convolutions of growing dilation), fused by a sum, squeezed to a vector,
and selected per channel by a softmax over the paths. For x of shape (N, C_in, H, W),
C = out_channels, G the groups of the path convolutions (Cg = C_in / G input channels
per group) and D = max(C // ratio, 32) the squeeze width. Path i uses dilation and padding
1 + i (the spatial size is kept). The lines below are the default P = 2 with biases, in
``npattn.explain``'s format; ``npattn explain SKConv`` walks them in training mode. A
third path (``paths=3``) adds the lines of path 2 (dilation and padding 3, keys
``convs.2.*`` and ``projections.2.*``), a third row of z and g, and its terms in s, y and
dx; nothing else changes. In the code, ``_path(i, ...)`` and ``_path_backward`` compute
one path: their locals q, r, f and df, dr, dq are the lines' q_i, r_i, f_i, df_i, dr_i, dq_i
(their ``suffix``, see ``npattn.explain``).

Forward::

    Ws_0 = convs.0.0.weight            (C, Cg, 3, 3)  path 0's 3x3 conv, G groups       [param("convs.0.0.weight")]
    bs_0 = convs.0.0.bias              (C,)           its bias                          [param("convs.0.0.bias")]
    gamma_0 = convs.0.1.weight         (C,)           path 0's BatchNorm2d              [param("convs.0.1.weight")]
    beta_0 = convs.0.1.bias            (C,)                                             [param("convs.0.1.bias")]
    rm_0 = convs.0.1.running_mean      (C,)           buffers, used in eval             [buffer("convs.0.1.running_mean")]
    rv_0 = convs.0.1.running_var       (C,)                                             [buffer("convs.0.1.running_var")]
    Ws_1 = convs.1.0.weight            (C, Cg, 3, 3)  path 1's conv                     [param("convs.1.0.weight")]
    bs_1 = convs.1.0.bias              (C,)                                             [param("convs.1.0.bias")]
    gamma_1 = convs.1.1.weight         (C,)           path 1's BatchNorm2d              [param("convs.1.1.weight")]
    beta_1 = convs.1.1.bias            (C,)                                             [param("convs.1.1.bias")]
    rm_1 = convs.1.1.running_mean      (C,)                                             [buffer("convs.1.1.running_mean")]
    rv_1 = convs.1.1.running_var       (C,)                                             [buffer("convs.1.1.running_var")]
    W1 = compress.0.weight             (D, C)         the squeeze's Linear              [param("compress.0.weight")]
    b1 = compress.0.bias               (D,)                                             [param("compress.0.bias")]
    gamma = compress.1.weight          (D,)           the squeeze's BatchNorm1d         [param("compress.1.weight")]
    beta = compress.1.bias             (D,)                                             [param("compress.1.bias")]
    rm = compress.1.running_mean       (D,)                                             [buffer("compress.1.running_mean")]
    rv = compress.1.running_var        (D,)                                             [buffer("compress.1.running_var")]
    W2_0 = projections.0.weight        (C, D)         path 0's 1x1 projection as a matrix  [param("projections.0.weight")[:, :, 0, 0]]
    b2_0 = projections.0.bias          (C,)                                             [param("projections.0.bias")]
    W2_1 = projections.1.weight        (C, D)         path 1's                          [param("projections.1.weight")[:, :, 0, 0]]
    b2_1 = projections.1.bias          (C,)                                             [param("projections.1.bias")]
    eps = bn_eps                       ()             every BatchNorm's epsilon         [attr("bn_eps")]
    G = groups                         ()             groups of the path convs          [attr("groups")]
    q_0 = conv_3x3(x; Ws_0, bs_0), dilation = padding = 1
                                       (N, C, H, W)   split: path 0, convs.0.0          [conv2d(x, Ws_0, bs_0, padding=1, dilation=1, groups=int(G))]
    r_0 = BN(q_0)                      (N, C, H, W)   convs.0.1; training: statistics of N H W values  [batch_norm(q_0, gamma_0, beta_0, rm_0, rv_0, training, eps=eps)]
    f_0 = relu(r_0)                    (N, C, H, W)   convs.0.2, path 0's features      [relu(r_0)]
    q_1 = conv_3x3(x; Ws_1, bs_1), dilation = padding = 2
                                       (N, C, H, W)   path 1, convs.1.0                 [conv2d(x, Ws_1, bs_1, padding=2, dilation=2, groups=int(G))]
    r_1 = BN(q_1)                      (N, C, H, W)   convs.1.1                         [batch_norm(q_1, gamma_1, beta_1, rm_1, rv_1, training, eps=eps)]
    f_1 = relu(r_1)                    (N, C, H, W)   convs.1.2                         [relu(r_1)]
    s = mean_{H, W} (f_0 + f_1)        (N, C)         fuse and squeeze (the sum f_0 + f_1 is never formed)  [mean(f_0, (2, 3)) + mean(f_1, (2, 3))]
    h = s W1^T + b1                    (N, D)         compress.0                        [linear(s, W1, b1)]
    hb = BN(h)                         (N, D)         compress.1; training: statistics of the N rows  [batch_norm(h, gamma, beta, rm, rv, training, eps=eps)]
    a = relu(hb)                       (N, D)         compress.2                        [relu(hb)]
    z_0 = a W2_0^T + b2_0              (N, C)         projections.0 on a as (N, D, 1, 1)  [linear(a, W2_0, b2_0)]
    z_1 = a W2_1^T + b2_1              (N, C)         projections.1                     [linear(a, W2_1, b2_1)]
    z = [z_0, z_1]                     (N, P, C)      the logits, stacked on a path axis  [np.stack([z_0, z_1], 1)]
    g = softmax_P(z)                   (N, P, C)      select: per (n, c), weights over the paths that sum to 1  [softmax(z, 1)]
    y = f_0 * g_0 + f_1 * g_1          (N, C, H, W)   g_i = g[:, i] broadcast over H W  [f_0 * g[:, 0, :, None, None] + f_1 * g[:, 1, :, None, None]]

Backward, for dy = dL/dy, in the order the code computes it::

    dg = [sum_{H, W} dy * f_0, sum_{H, W} dy * f_1]
                                       (N, P, C)      y is bilinear in (f_i, g_i): dy/dg_i is f_i, summed over H W
    dz = g * (dg - sum_P dg * g)       (N, P, C)      softmax': J = diag(g) - g g^T over the path axis
    dz_0 = dz[:, 0]                    (N, C)         z stacks z_0 and z_1: its rows go back to them  [dz[:, 0]]
    dz_1 = dz[:, 1]                    (N, C)                                           [dz[:, 1]]
    dW2_0 = dz_0^T a                   (C, D)         z_0 is linear in W2_0, row n adds dz_0[n] a[n]^T
    db2_0 = sum_n dz_0                 (C,)           b2_0 is added to every row
    dW2_1 = dz_1^T a                   (C, D)         the same for path 1
    db2_1 = sum_n dz_1                 (C,)
    da = dz_0 W2_0 + dz_1 W2_1         (N, D)         a feeds both projections: the sum of their shares
    dhb = da * [hb > 0]                (N, D)         relu' = [hb > 0]; relu'(0) = 0, as PyTorch
    dgamma = sum_n dhb * hhat          (D,)           hb = gamma hhat + beta, hhat = (h - mean) / sqrt(var + eps)
    dbeta = sum_n dhb                  (D,)           beta is added to every row
    dh = BN backward of dhb            (N, D)         hb = gamma hhat + beta; in training mean and var are
                                                      functions of h too: dh = gamma / sqrt(var + eps)
                                                      (dhb - mean_n dhb - hhat mean_n(dhb hhat)); in eval
                                                      only the first term, with the running statistics
    dW1 = dh^T s                       (D, C)         h is linear in W1
    db1 = sum_n dh, exactly 0 in training
                                       (D,)           b1 shifts every row of h alike; the batch mean of
                                                      BN removes any per-feature constant, so hb and y do not
                                                      depend on b1: the code returns exact zeros
                                                      (base.bias_grad_is_zero), not the noise of a sum that cancels
    ds = dh W1                         (N, C)         h is linear in s
    df_0 = dy * g_0 + ds / (H W)       (N, C, H, W)   both uses of f_0: its term of y, and the squeeze,
                                                      whose mean spreads ds evenly over H W
    dr_0 = df_0 * [r_0 > 0]            (N, C, H, W)   relu'
    dgamma_0 = sum_{n,h,w} dr_0 * qhat_0
                                       (C,)           r_0 = gamma_0 qhat_0 + beta_0, as dgamma over N H W
    dbeta_0 = sum_{n,h,w} dr_0         (C,)
    dq_0 = BN backward of dr_0         (N, C, H, W)   as dh, the statistics taken over N H W per channel
    dWs_0 = conv weight gradient       (C, Cg, 3, 3)  q_0 is linear in Ws_0: the correlation of dq_0 with the
                                                      padded, dilated x, per group
    dbs_0 = sum_{n,h,w} dq_0, exactly 0 in training
                                       (C,)           as db1: bs_0 feeds BN r_0, whose batch mean absorbs it
    df_1 = dy * g_1 + ds / (H W)       (N, C, H, W)   path 1, the same lines
    dr_1 = df_1 * [r_1 > 0]            (N, C, H, W)
    dgamma_1 = sum_{n,h,w} dr_1 * qhat_1
                                       (C,)
    dbeta_1 = sum_{n,h,w} dr_1         (C,)
    dq_1 = BN backward of dr_1         (N, C, H, W)
    dWs_1 = conv weight gradient       (C, Cg, 3, 3)
    dbs_1 = sum_{n,h,w} dq_1, exactly 0 in training
                                       (C,)
    dx = conv_0^T(dq_0) + conv_1^T(dq_1)
                                       (N, C_in, H, W)  x feeds both paths; each conv's input gradient is
                                                      its adjoint (a transposed dilated conv) applied to dq_i

(The original code concatenates the paths on the channel axis and views the result as
(N, P, C, H, W), so path i is exactly channels i*C .. (i+1)*C: the same as above.) Every
"BN backward" and "conv weight gradient" is the backward of the op in
``npattn.functional`` (``batch_norm_backward``, ``conv2d_backward``). With ``bias=False``
the bias lines (bs_i, b1, b2_i) and their gradients are absent, as in the authors' Caffe
release. In eval mode the BatchNorms use rm, rv: db1 and dbs_i are then the usual sums.
In training the squeeze's BatchNorm1d sees N values per feature, so batch size 1 raises
PyTorch's error "Expected more than 1 value per channel when training" (before any
running statistic is touched).
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
        The squeeze width is ``D = max(out_channels // ratio, 32)``.
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
        C, D = self.out_channels, self.reduced_dim
        for i in range(self.paths):
            self._add_conv(f"convs.{i}.0.", rng, self.in_channels, C, 3, groups=self.groups, bias=self.bias)
            self._add_batch_norm(f"convs.{i}.1.", C)
        self._add_linear("compress.0.", rng, C, D, bias=self.bias)
        self._add_batch_norm("compress.1.", D)
        for i in range(self.paths):
            self._add_conv(f"projections.{i}.", rng, D, C, 1, bias=self.bias)

    def _path(self, i, x, training):
        """Path i: ``q = conv_i(x)``, ``r = BN_i(q)``, ``f = relu(r)``, each (N, C, H, W)."""
        suffix = f"_{i}"  # the derivation's q_0, r_0, f_0 for path 0 (npattn.explain)
        q, k_conv = self._conv(f"convs.{i}.0.", x, padding=1 + i, dilation=1 + i, groups=self.groups)  # (N, C, H, W)
        r, k_bn = self._batch_norm(f"convs.{i}.1.", q, training)  # (N, C, H, W)
        f, k_relu = F.relu_forward(r)  # (N, C, H, W)
        return f, (k_conv, k_bn, k_relu)

    def _path_backward(self, i, df, caches, grads):
        """Backward of path i, from df (N, C, H, W) to its share of dx (N, C_in, H, W);
        dWs_i, dbs_i, dgamma_i, dbeta_i are added into ``grads``."""
        suffix = f"_{i}"  # the derivation's df_0, dr_0, dq_0 for path 0
        k_conv, k_bn, k_relu = caches
        dr = F.relu_backward(df, k_relu)["x"]  # (N, C, H, W)
        dq = self._batch_norm_backward(f"convs.{i}.1.", dr, k_bn, grads)  # (N, C, H, W); dgamma_i, dbeta_i
        return self._conv_backward(f"convs.{i}.0.", dq, k_conv, grads, next_bn=k_bn)  # (N, C_in, H, W); dWs_i, dbs_i

    def forward(self, x, training=False):
        """Returns ``(y, cache)`` with y of shape (N, out_channels, H, W)."""
        x = self._check_input("x", x, 4, self.in_channels)
        self._check_image("x", x, "PyTorch's 3x3 path convolutions refuse an empty image")
        N, _, H, W = x.shape
        C, P = self.out_channels, self.paths
        if training and N == 1:
            raise ValueError(
                f"Expected more than 1 value per channel when training, got input size {(1, self.reduced_dim)}"
            )
        # split: path i gives f_i (its q_i, r_i are locals of _path)
        path_caches, features = [], []
        for i in range(P):
            f_i, k_path = self._path(i, x, training)  # (N, C, H, W)
            path_caches.append(k_path)
            features.append(f_i)
        # fuse and squeeze
        s = sum(f_i.mean(axis=(2, 3)) for f_i in features)  # (N, C) = mean_hw (f_0 + f_1 + ...), never formed
        h, k_lin = self._linear("compress.0.", s)  # (N, D)
        hb, k_bn1d = self._batch_norm("compress.1.", h, training)  # (N, D)
        a, k_relu = F.relu_forward(hb)  # (N, D)
        # select
        logits, proj_caches = [], []
        for i in range(P):
            z_i, k_proj = self._conv(f"projections.{i}.", a[:, :, None, None])  # (N, C, 1, 1)
            logits.append(z_i.reshape(N, C))
            proj_caches.append(k_proj)
        z = np.stack(logits, axis=1)  # (N, P, C)
        g, k_sm = F.softmax_forward(z, axis=1)  # (N, P, C)
        y = features[0] * g[:, 0, :, None, None]  # (N, C, H, W)
        for i in range(1, P):
            y += features[i] * g[:, i, :, None, None]  # (N, C, H, W)
        cache = SKCache(
            tuple(x.shape), tuple(path_caches), tuple(features), 1.0 / (H * W),
            (k_lin, k_bn1d, k_relu), tuple(proj_caches), k_sm,
        )
        return y, cache

    def backward(self, grad_out, cache: SKCache):
        """Returns ``((dx,), grads)`` with a gradient for every parameter key."""
        op = "SKConv.backward"
        N, _, H, W = cache.x_shape
        C, P, D = self.out_channels, self.paths, self.reduced_dim
        dy = float_array(op, "grad_out", grad_out, 4, "(N, C, H, W)")
        shape_is(op, "grad_out", dy, (N, C, H, W))
        same_dtype(op, "the forward input", cache.features[0], grad_out=dy)
        grads = self.zero_grads()  # the parameter gradients are added into it
        g = cache.softmax.y  # (N, P, C)
        dy_flat = dy.reshape(N, C, H * W)
        dg = np.stack(
            [np.einsum("ncl,ncl->nc", dy_flat, f_i.reshape(N, C, H * W)) for f_i in cache.features], axis=1
        )  # (N, P, C)
        dz = F.softmax_backward(dg, cache.softmax)["x"]  # (N, P, C)
        da_map = 0
        for i in range(P):
            da_map = da_map + self._conv_backward(
                f"projections.{i}.", dz[:, i, :, None, None], cache.projections[i], grads
            )  # (N, D, 1, 1); dW2_i, db2_i
        k_lin, k_bn1d, k_relu = cache.compress
        da = da_map.reshape(N, D)  # (N, D); not -1: ambiguous for N = 0
        dhb = F.relu_backward(da, k_relu)["x"]  # (N, D)
        dh = self._batch_norm_backward("compress.1.", dhb, k_bn1d, grads)  # (N, D); dgamma, dbeta
        ds = self._linear_backward("compress.0.", dh, k_lin, grads, next_bn=k_bn1d)  # (N, C); dW1, db1
        ds_hw = (ds * dy.dtype.type(cache.pool_scale)).reshape(N, C, 1, 1)  # (N, C, 1, 1) ds / (H W)
        dx = None
        for i in range(P):
            df = dy * g[:, i, :, None, None]  # (N, C, H, W) its term of y
            df += ds_hw  # and the squeeze
            dx_i = self._path_backward(i, df, cache.paths[i], grads)  # (N, C_in, H, W)
            if dx is None:
                dx = dx_i
            else:
                dx += dx_i
        return (dx,), grads
