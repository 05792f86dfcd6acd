"""Attentional feature fusion (Dai, Gieseke, Oehmcke, Wu, Barnard: "Attentional Feature
Fusion", WACV 2021): DAF, MS_CAM, AFF and iAFF, as the authors' ``aff_pytorch`` code
computes them.

Multi-scale channel attention (MS-CAM). With C channels and Cr = C // r, two branches map
a map X of shape (N, C, H, W) to the logits of a gate::

    local_att:  L(X) = BN4(conv3(relu(BN1(conv0(X)))))            (N, C, H, W)
    global_att: T(X) = BN5(conv4(relu(BN2(conv1(mean_{H, W} X)))))  (N, C, 1, 1)
    M(X)        = sigmoid(L(X) + T(X))                             (N, C, H, W), T broadcast

where conv_k are 1x1 convolutions with bias (C -> Cr then Cr -> C) and BN_k are
BatchNorm2d (T is the paper's g(X): g is the gate here, as in the package's notation); the index k is the position in the PyTorch ``Sequential``, hence the
state_dict keys ``local_att.0.weight`` ... ``global_att.5.num_batches_tracked``. The
symbols below carry the same index: ``l0 .. l4`` are the outputs of ``local_att.0 .. 4``,
``t0 .. t5`` those of ``global_att.0 .. 5`` (t0 the pooling), ``Wl0, bl0`` the weight and
bias of ``local_att.0``, ``gamma_t2 ... rv_t2`` the BatchNorm ``global_att.2``.

The four blocks (x the input, res the residual, ``residual`` in the code)::

    DAF:     y = x + res
    MS_CAM:  g = M(x);                        y = x * g
    AFF:     g = M(x + res);                  y = 2 x g + 2 res (1 - g) = 2 (res + g (x - res))
    iAFF:    g = M(x + res);                  xi = x g + res (1 - g) = res + g (x - res)
             g_2 = M2(xi);                    y  = x g_2 + res (1 - g_2) = res + g_2 (x - res)

iAFF's M2 uses ``local_att2`` and, in its global half, ``global_att`` again when
``share_global_att=True`` (what the published PyTorch code does: ``global_att2`` is
created, stays in the state_dict and is never used, so its gradient is zero) or
``global_att2`` when ``share_global_att=False`` (the paper and the MXNet code). Sharing
also means that in training the BatchNorm buffers of ``global_att`` are updated twice
per forward, as in PyTorch. AFF has the factor 2 (the two weights sum to 2, as in
x + res); MS_CAM and iAFF do not.

The lines below are MS_CAM's, in ``npattn.explain``'s format; ``npattn explain MS_CAM``
walks them in training mode, and AFF and iAFF change or add the lines given further down.
In the code ``_ms_cam`` and ``_ms_cam_backward`` compute one gate: their locals l0 ... t5
and dt5 ... dl0 are the lines' symbols (with iAFF's second gate, ``suffix="_2"``).

Forward::

    Wl0 = local_att.0.weight           (Cr, C, 1, 1)  the local branch's first 1x1 conv  [param("local_att.0.weight")]
    bl0 = local_att.0.bias             (Cr,)                                            [param("local_att.0.bias")]
    gamma_l1 = local_att.1.weight      (Cr,)          its BatchNorm2d                   [param("local_att.1.weight")]
    beta_l1 = local_att.1.bias         (Cr,)                                            [param("local_att.1.bias")]
    rm_l1 = local_att.1.running_mean   (Cr,)          buffers, used in eval             [buffer("local_att.1.running_mean")]
    rv_l1 = local_att.1.running_var    (Cr,)                                            [buffer("local_att.1.running_var")]
    Wl3 = local_att.3.weight           (C, Cr, 1, 1)  the second 1x1 conv               [param("local_att.3.weight")]
    bl3 = local_att.3.bias             (C,)                                             [param("local_att.3.bias")]
    gamma_l4 = local_att.4.weight      (C,)           its BatchNorm2d                   [param("local_att.4.weight")]
    beta_l4 = local_att.4.bias         (C,)                                             [param("local_att.4.bias")]
    rm_l4 = local_att.4.running_mean   (C,)                                             [buffer("local_att.4.running_mean")]
    rv_l4 = local_att.4.running_var    (C,)                                             [buffer("local_att.4.running_var")]
    Wt1 = global_att.1.weight          (Cr, C, 1, 1)  the global branch, the same layers  [param("global_att.1.weight")]
    bt1 = global_att.1.bias            (Cr,)                                            [param("global_att.1.bias")]
    gamma_t2 = global_att.2.weight     (Cr,)                                            [param("global_att.2.weight")]
    beta_t2 = global_att.2.bias        (Cr,)                                            [param("global_att.2.bias")]
    rm_t2 = global_att.2.running_mean  (Cr,)                                            [buffer("global_att.2.running_mean")]
    rv_t2 = global_att.2.running_var   (Cr,)                                            [buffer("global_att.2.running_var")]
    Wt4 = global_att.4.weight          (C, Cr, 1, 1)                                    [param("global_att.4.weight")]
    bt4 = global_att.4.bias            (C,)                                             [param("global_att.4.bias")]
    gamma_t5 = global_att.5.weight     (C,)                                             [param("global_att.5.weight")]
    beta_t5 = global_att.5.bias        (C,)                                             [param("global_att.5.bias")]
    rm_t5 = global_att.5.running_mean  (C,)                                             [buffer("global_att.5.running_mean")]
    rv_t5 = global_att.5.running_var   (C,)                                             [buffer("global_att.5.running_var")]
    eps = bn_eps                       ()             every BatchNorm's epsilon         [attr("bn_eps")]
    l0 = conv0(x)                      (N, Cr, H, W)  local_att.0, per pixel Wl0 x + bl0  [conv2d(x, Wl0, bl0)]
    l1 = BN1(l0)                       (N, Cr, H, W)  training: statistics of N H W values  [batch_norm(l0, gamma_l1, beta_l1, rm_l1, rv_l1, training, eps=eps)]
    l2 = relu(l1)                      (N, Cr, H, W)                                    [relu(l1)]
    l3 = conv3(l2)                     (N, C, H, W)                                     [conv2d(l2, Wl3, bl3)]
    l4 = BN4(l3)                       (N, C, H, W)   L(x), the local logits            [batch_norm(l3, gamma_l4, beta_l4, rm_l4, rv_l4, training, eps=eps)]
    t0 = mean_{H, W} x                 (N, C, 1, 1)   global_att.0, the pooling         [mean(x, (2, 3), keepdims=True)]
    t1 = conv1(t0)                     (N, Cr, 1, 1)                                    [conv2d(t0, Wt1, bt1)]
    t2 = BN2(t1)                       (N, Cr, 1, 1)  training: statistics of the N values  [batch_norm(t1, gamma_t2, beta_t2, rm_t2, rv_t2, training, eps=eps)]
    t3 = relu(t2)                      (N, Cr, 1, 1)                                    [relu(t2)]
    t4 = conv4(t3)                     (N, C, 1, 1)                                     [conv2d(t3, Wt4, bt4)]
    t5 = BN5(t4)                       (N, C, 1, 1)   T(x), the global logits           [batch_norm(t4, gamma_t5, beta_t5, rm_t5, rv_t5, training, eps=eps)]
    z = l4 + t5                        (N, C, H, W)   t5 broadcast over H W             [l4 + t5]
    g = sigmoid(z)                     (N, C, H, W)   the gate M(x)                     [sigmoid(z)]
    y = x * g                          (N, C, H, W)                                     [x * g]

Backward, for dy = dL/dy, in the order the code runs::

    dg = dy * x                        (N, C, H, W)   y = x * g: dy/dg is x
    dz = dg * g (1 - g)                (N, C, H, W)   sigmoid' = g (1 - g)
    dt5 = sum_{H, W} dz                (N, C, 1, 1)   z = l4 + t5 with t5 broadcast: its gradient sums over H W
    dgamma_t5 = sum_n dt5 * t4hat      (C,)           t5 = gamma_t5 t4hat + beta_t5, t4hat = (t4 - mean) / sqrt(var + eps)
    dbeta_t5 = sum_n dt5               (C,)           beta_t5 is added to every sample
    dt4 = BN backward of dt5           (N, C, 1, 1)   in training mean and var are functions of t4 too, so
                                                      gamma_t5 / sqrt(var + eps) (dt5 - mean_n dt5
                                                      - t4hat mean_n(dt5 t4hat)); in eval the first term only
    dWt4 = sum_n dt4 t3^T              (C, Cr, 1, 1)  t4 = Wt4 t3 + bt4 per sample
    dbt4 = sum_n dt4, exactly 0 in training
                                       (C,)           bt4 shifts every sample of t4 alike and BN5's batch mean
                                                      removes it: y does not depend on bt4, and the code returns
                                                      exact zeros (base.bias_grad_is_zero), not the noise of a
                                                      sum that cancels; in eval the sum
    dt3 = Wt4^T dt4                    (N, Cr, 1, 1)  t4 is linear in t3
    dt2 = dt3 * [t2 > 0]               (N, Cr, 1, 1)  relu' = [t2 > 0]; relu'(0) = 0, as PyTorch
    dgamma_t2 = sum_n dt2 * t1hat      (Cr,)          as dgamma_t5
    dbeta_t2 = sum_n dt2               (Cr,)
    dt1 = BN backward of dt2           (N, Cr, 1, 1)  as dt4
    dWt1 = sum_n dt1 t0^T              (Cr, C, 1, 1)  t1 = Wt1 t0 + bt1
    dbt1 = sum_n dt1, exactly 0 in training
                                       (Cr,)          as dbt4: BN2's batch mean absorbs it
    dt0 = Wt1^T dt1                    (N, C, 1, 1)   t1 is linear in t0
    dl4 = dz                           (N, C, H, W)   z = l4 + t5                       [dz]
    dgamma_l4 = sum_{n,h,w} dl4 * l3hat
                                       (C,)           as dgamma_t5, over N H W
    dbeta_l4 = sum_{n,h,w} dl4         (C,)
    dl3 = BN backward of dl4           (N, C, H, W)   as dt4, the statistics over N H W per channel
    dWl3 = sum_{n,h,w} dl3 l2^T        (C, Cr, 1, 1)  l3 = Wl3 l2 + bl3 at every pixel
    dbl3 = sum_{n,h,w} dl3, exactly 0 in training
                                       (C,)           as dbt4: BN4's batch mean absorbs it
    dl2 = Wl3^T dl3                    (N, Cr, H, W)
    dl1 = dl2 * [l1 > 0]               (N, Cr, H, W)  relu'
    dgamma_l1 = sum_{n,h,w} dl1 * l0hat
                                       (Cr,)
    dbeta_l1 = sum_{n,h,w} dl1         (Cr,)
    dl0 = BN backward of dl1           (N, Cr, H, W)
    dWl0 = sum_{n,h,w} dl0 x^T         (Cr, C, 1, 1)  l0 = Wl0 x + bl0 at every pixel
    dbl0 = sum_{n,h,w} dl0, exactly 0 in training
                                       (Cr,)          as dbt4: BN1's batch mean absorbs it
    dx = dy * g + Wl0^T dl0 + dt0 / (H W)
                                       (N, C, H, W)   the three uses of x: y's factor, the local conv, and the
                                                      pooling, whose mean spreads dt0 evenly over H W

Each "BN backward" is ``npattn.functional.batch_norm_backward``, each 1x1 conv
``conv2d_backward`` (the sums over n, h, w are its weight gradient, W^T times the upstream
gradient its input gradient). In eval mode the BatchNorms use their running statistics and the conv biases
have the usual gradients ``sum d``.

AFF fuses x and its residual: the gate reads xa = x + res, and y moves along e = x - res.
These lines replace MS_CAM's of the same symbols, and the new ones are inserted before
the next replaced line (``npattn explain AFF`` walks them)::

    xa = x + res                       (N, C, H, W)   the gate's input                  [x + residual]
    l0 = conv0(xa)                     (N, Cr, H, W)  local_att.0                       [conv2d(xa, Wl0, bl0)]
    t0 = mean_{H, W} xa                (N, C, 1, 1)   global_att.0                      [mean(xa, (2, 3), keepdims=True)]
    e = x - res                        (N, C, H, W)                                     [x - residual]
    y = 2 (res + g e)                  (N, C, H, W)   = 2 x g + 2 res (1 - g)           [2 * (residual + g * e)]
    dg = 2 dy * e                      (N, C, H, W)   y = 2 (res + g e): dy/dg is 2 e
    dxa = Wl0^T dl0 + dt0 / (H W)      (N, C, H, W)   xa feeds the local conv and the pooling
    de = 2 dy * g                      (N, C, H, W)   y = 2 (res + g e)
    dresidual = 2 dy - de + dxa        (N, C, H, W)   res enters y directly, e = x - res and xa = x + res
    dx = de + dxa                      (N, C, H, W)   x enters e and xa

iAFF runs the gate twice. The second gate's symbols carry the suffix ``_2``: its local
branch has its own keys (``local_att2``: Wl0_2 ... rv_l4_2) and, in the default
``share_global_att=True``, its global branch reads ``global_att`` again (Wt1 ... rv_t5),
while ``global_att2`` is bound and never read (``npattn explain iAFF`` walks these lines)::

    xa = x + res                       (N, C, H, W)   the first gate's input            [x + residual]
    l0 = conv0(xa)                     (N, Cr, H, W)  local_att.0                       [conv2d(xa, Wl0, bl0)]
    t0 = mean_{H, W} xa                (N, C, 1, 1)   global_att.0                      [mean(xa, (2, 3), keepdims=True)]
    e = x - res                        (N, C, H, W)                                     [x - residual]
    xi = res + g e                     (N, C, H, W)   the first fusion, = x g + res (1 - g)  [residual + g * e]
    Wl0_2 = local_att2.0.weight        (Cr, C, 1, 1)  the second gate's local branch    [param("local_att2.0.weight")]
    bl0_2 = local_att2.0.bias          (Cr,)                                            [param("local_att2.0.bias")]
    gamma_l1_2 = local_att2.1.weight   (Cr,)                                            [param("local_att2.1.weight")]
    beta_l1_2 = local_att2.1.bias      (Cr,)                                            [param("local_att2.1.bias")]
    rm_l1_2 = local_att2.1.running_mean
                                       (Cr,)                                            [buffer("local_att2.1.running_mean")]
    rv_l1_2 = local_att2.1.running_var
                                       (Cr,)                                            [buffer("local_att2.1.running_var")]
    Wl3_2 = local_att2.3.weight        (C, Cr, 1, 1)                                    [param("local_att2.3.weight")]
    bl3_2 = local_att2.3.bias          (C,)                                             [param("local_att2.3.bias")]
    gamma_l4_2 = local_att2.4.weight   (C,)                                             [param("local_att2.4.weight")]
    beta_l4_2 = local_att2.4.bias      (C,)                                             [param("local_att2.4.bias")]
    rm_l4_2 = local_att2.4.running_mean
                                       (C,)                                             [buffer("local_att2.4.running_mean")]
    rv_l4_2 = local_att2.4.running_var
                                       (C,)                                             [buffer("local_att2.4.running_var")]
    Wt1_2 = global_att2.1.weight       (Cr, C, 1, 1)  global_att2: kept in the state_dict, never read  [param("global_att2.1.weight")]
    bt1_2 = global_att2.1.bias         (Cr,)                                            [param("global_att2.1.bias")]
    gamma_t2_2 = global_att2.2.weight  (Cr,)                                            [param("global_att2.2.weight")]
    beta_t2_2 = global_att2.2.bias     (Cr,)                                            [param("global_att2.2.bias")]
    Wt4_2 = global_att2.4.weight       (C, Cr, 1, 1)                                    [param("global_att2.4.weight")]
    bt4_2 = global_att2.4.bias         (C,)                                             [param("global_att2.4.bias")]
    gamma_t5_2 = global_att2.5.weight  (C,)                                             [param("global_att2.5.weight")]
    beta_t5_2 = global_att2.5.bias     (C,)                                             [param("global_att2.5.bias")]
    l0_2 = conv0_2(xi)                 (N, Cr, H, W)  local_att2.0                      [conv2d(xi, Wl0_2, bl0_2)]
    l1_2 = BN1_2(l0_2)                 (N, Cr, H, W)                                    [batch_norm(l0_2, gamma_l1_2, beta_l1_2, rm_l1_2, rv_l1_2, training, eps=eps)]
    l2_2 = relu(l1_2)                  (N, Cr, H, W)                                    [relu(l1_2)]
    l3_2 = conv3_2(l2_2)               (N, C, H, W)                                     [conv2d(l2_2, Wl3_2, bl3_2)]
    l4_2 = BN4_2(l3_2)                 (N, C, H, W)                                     [batch_norm(l3_2, gamma_l4_2, beta_l4_2, rm_l4_2, rv_l4_2, training, eps=eps)]
    t0_2 = mean_{H, W} xi              (N, C, 1, 1)   the global branch of global_att, shared  [mean(xi, (2, 3), keepdims=True)]
    t1_2 = conv1(t0_2)                 (N, Cr, 1, 1)  the same Wt1, bt1 as t1           [conv2d(t0_2, Wt1, bt1)]
    t2_2 = BN2(t1_2)                   (N, Cr, 1, 1)  the same BatchNorm, its own batch statistics  [batch_norm(t1_2, gamma_t2, beta_t2, rm_t2, rv_t2, training, eps=eps)]
    t3_2 = relu(t2_2)                  (N, Cr, 1, 1)                                    [relu(t2_2)]
    t4_2 = conv4(t3_2)                 (N, C, 1, 1)                                     [conv2d(t3_2, Wt4, bt4)]
    t5_2 = BN5(t4_2)                   (N, C, 1, 1)                                     [batch_norm(t4_2, gamma_t5, beta_t5, rm_t5, rv_t5, training, eps=eps)]
    z_2 = l4_2 + t5_2                  (N, C, H, W)                                     [l4_2 + t5_2]
    g_2 = sigmoid(z_2)                 (N, C, H, W)   the second gate M2(xi)            [sigmoid(z_2)]
    y = res + g_2 e                    (N, C, H, W)   = x g_2 + res (1 - g_2)           [residual + g_2 * e]
    dg_2 = dy * e                      (N, C, H, W)   y = res + g_2 e
    dz_2 = dg_2 * g_2 (1 - g_2)        (N, C, H, W)   sigmoid'
    dt5_2 = sum_{H, W} dz_2            (N, C, 1, 1)   the second gate's backward: MS_CAM's lines
    dt4_2 = BN backward of dt5_2       (N, C, 1, 1)   (global_att's BatchNorm, on t4_2's batch statistics)
    dt3_2 = Wt4^T dt4_2                (N, Cr, 1, 1)
    dt2_2 = dt3_2 * [t2_2 > 0]         (N, Cr, 1, 1)
    dt1_2 = BN backward of dt2_2       (N, Cr, 1, 1)
    dt0_2 = Wt1^T dt1_2                (N, C, 1, 1)
    dl4_2 = dz_2                       (N, C, H, W)                                     [dz_2]
    dgamma_l4_2 = sum_{n,h,w} dl4_2 * l3hat_2
                                       (C,)           local_att2's parameters: one use each
    dbeta_l4_2 = sum_{n,h,w} dl4_2     (C,)
    dl3_2 = BN backward of dl4_2       (N, C, H, W)
    dWl3_2 = sum_{n,h,w} dl3_2 l2_2^T  (C, Cr, 1, 1)
    dbl3_2 = sum_{n,h,w} dl3_2, exactly 0 in training
                                       (C,)
    dl2_2 = Wl3_2^T dl3_2              (N, Cr, H, W)
    dl1_2 = dl2_2 * [l1_2 > 0]         (N, Cr, H, W)
    dgamma_l1_2 = sum_{n,h,w} dl1_2 * l0hat_2
                                       (Cr,)
    dbeta_l1_2 = sum_{n,h,w} dl1_2     (Cr,)
    dl0_2 = BN backward of dl1_2       (N, Cr, H, W)
    dWl0_2 = sum_{n,h,w} dl0_2 xi^T    (Cr, C, 1, 1)
    dbl0_2 = sum_{n,h,w} dl0_2, exactly 0 in training
                                       (Cr,)
    dxi = Wl0_2^T dl0_2 + dt0_2 / (H W)
                                       (N, C, H, W)   xi feeds the second gate's local conv and pooling
    dg = dxi * e                       (N, C, H, W)   xi = res + g e; then MS_CAM's lines down to dl0
    dgamma_t5 = sum_n (dt5 t4hat + dt5_2 t4hat_2)
                                       (C,)           global_att is read by both gates: the sum of their shares
    dbeta_t5 = sum_n (dt5 + dt5_2)     (C,)
    dWt4 = sum_n (dt4 t3^T + dt4_2 t3_2^T)
                                       (C, Cr, 1, 1)
    dbt4 = 0 in training               (C,)           each share is exactly 0 (BN5's batch mean absorbs bt4)
    dgamma_t2 = sum_n (dt2 t1hat + dt2_2 t1hat_2)
                                       (Cr,)
    dbeta_t2 = sum_n (dt2 + dt2_2)     (Cr,)
    dWt1 = sum_n (dt1 t0^T + dt1_2 t0_2^T)
                                       (Cr, C, 1, 1)
    dbt1 = 0 in training               (Cr,)
    dWt1_2 = 0                         (Cr, C, 1, 1)  share_global_att=True: no line reads global_att2, so y does
                                                      not depend on it and its gradient is exactly zero (the
                                                      published code's global_att2 is created and never called)
    dbt1_2 = 0                         (Cr,)
    dgamma_t2_2 = 0                    (Cr,)
    dbeta_t2_2 = 0                     (Cr,)
    dWt4_2 = 0                         (C, Cr, 1, 1)
    dbt4_2 = 0                         (C,)
    dgamma_t5_2 = 0                    (C,)
    dbeta_t5_2 = 0                     (C,)
    dxa = Wl0^T dl0 + dt0 / (H W)      (N, C, H, W)   xa feeds the first gate's local conv and pooling
    de = dy * g_2 + dxi * g            (N, C, H, W)   e enters y and xi
    dresidual = dy + dxi - de + dxa    (N, C, H, W)   res enters y, xi, e = x - res and xa = x + res
    dx = de + dxa                      (N, C, H, W)   x enters e and xa

With ``share_global_att=False`` (the paper) t1_2 ... t5_2 read global_att2's Wt1_2 ...
rv_t5_2 instead, the global_att lines get one share each (MS_CAM's lines) and
global_att2's gradients are those of MS_CAM's lines with the suffix ``_2``.

DAF adds its inputs; ``npattn explain DAF`` walks its own two blocks.

DAF forward::

    y = x + res                        (N, C, H, W)   no parameters                     [x + residual]

DAF backward::

    dresidual = dy                     (N, C, H, W)   y = x + res: each addend's gradient is dy
    dx = dy                            (N, C, H, W)   (the code returns two copies)

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
    local: tuple  # (conv0, BN1, relu, conv3, BN4) caches of the local branch, maps (N, Cr or C, H, W)
    glob: tuple  # (pool, conv1, BN2, relu, conv4, BN5) caches of the global branch, maps (N, Cr or C, 1, 1)


@dataclass(frozen=True)
class FusionCache:
    x_shape: tuple  # (N, C, H, W)
    dtype: np.dtype  # of x
    x: np.ndarray  # (N, C, H, W) MS_CAM's input (None for AFF / iAFF)
    diff: np.ndarray  # (N, C, H, W) e = x - res (None for MS_CAM)
    w1: np.ndarray  # (N, C, H, W) the (first) sigmoid gate g
    att1: MSCAMCache  # branches of the first gate
    w2: np.ndarray  # (N, C, H, W) iAFF's second gate g_2 (None otherwise)
    att2: MSCAMCache  # branches of iAFF's second gate (None otherwise)


def _check_grad(op, grad_out, x_shape, dtype):
    dy = float_array(op, "grad_out", grad_out, 4, "(N, C, H, W)")
    shape_is(op, "grad_out", dy, x_shape)
    if dy.dtype != dtype:
        raise TypeError(f"{op}: grad_out must have the forward input's dtype {dtype}, got {dy.dtype}")
    return dy


def _sigmoid_slope(g):
    """sigmoid'(z) expressed with g = sigmoid(z): g (1 - g)."""
    slope = 1 - g
    slope *= g
    return slope


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
        y = x + residual  # (N, C, H, W)
        return y, DAFCache(tuple(x.shape), x.dtype)

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

    def _ms_cam(self, local, glob, xin, training, suffix=""):
        """``z = L(xin) + T(xin)`` (the logits of the gate), (N, C, H, W). ``suffix``: the
        derivation's suffix of this gate's symbols (iAFF's second gate: ``"_2"``)."""
        l0, k_l0 = self._conv(f"{local}0.", xin)  # (N, Cr, H, W)
        l1, k_l1 = self._batch_norm(f"{local}1.", l0, training)  # (N, Cr, H, W)
        l2, k_l2 = F.relu_forward(l1)  # (N, Cr, H, W)
        l3, k_l3 = self._conv(f"{local}3.", l2)  # (N, C, H, W)
        l4, k_l4 = self._batch_norm(f"{local}4.", l3, training)  # (N, C, H, W) L(xin)

        t0, k_t0 = F.global_avg_pool2d_forward(xin)  # (N, C, 1, 1)
        t1, k_t1 = self._conv(f"{glob}1.", t0)  # (N, Cr, 1, 1)
        t2, k_t2 = self._batch_norm(f"{glob}2.", t1, training)  # (N, Cr, 1, 1)
        t3, k_t3 = F.relu_forward(t2)  # (N, Cr, 1, 1)
        t4, k_t4 = self._conv(f"{glob}4.", t3)  # (N, C, 1, 1)
        t5, k_t5 = self._batch_norm(f"{glob}5.", t4, training)  # (N, C, 1, 1) T(xin)

        z = l4 + t5  # (N, C, H, W), t5 broadcast over (H, W)
        return z, MSCAMCache((k_l0, k_l1, k_l2, k_l3, k_l4), (k_t0, k_t1, k_t2, k_t3, k_t4, k_t5))

    def _ms_cam_backward(self, local, glob, dz, cache: MSCAMCache, grads, suffix=""):
        """Gradient of ``z = L(xin) + T(xin)`` with respect to xin; parameter gradients are
        added into ``grads``. ``suffix`` as in :meth:`_ms_cam`."""
        k_l0, k_l1, k_l2, k_l3, k_l4 = cache.local
        k_t0, k_t1, k_t2, k_t3, k_t4, k_t5 = cache.glob
        dt5 = dz.sum(axis=(2, 3), keepdims=True)  # (N, C, 1, 1)
        dt4 = self._batch_norm_backward(f"{glob}5.", dt5, k_t5, grads)  # (N, C, 1, 1); dgamma_t5, dbeta_t5
        dt3 = self._conv_backward(f"{glob}4.", dt4, k_t4, grads, next_bn=k_t5)  # (N, Cr, 1, 1); dWt4, dbt4
        dt2 = F.relu_backward(dt3, k_t3)["x"]  # (N, Cr, 1, 1)
        dt1 = self._batch_norm_backward(f"{glob}2.", dt2, k_t2, grads)  # (N, Cr, 1, 1); dgamma_t2, dbeta_t2
        dt0 = self._conv_backward(f"{glob}1.", dt1, k_t1, grads, next_bn=k_t2)  # (N, C, 1, 1); dWt1, dbt1

        dl3 = self._batch_norm_backward(f"{local}4.", dz, k_l4, grads)  # (N, C, H, W); dl4 = dz
        dl2 = self._conv_backward(f"{local}3.", dl3, k_l3, grads, next_bn=k_l4)  # (N, Cr, H, W)
        dl1 = F.relu_backward(dl2, k_l2)["x"]  # (N, Cr, H, W)
        dl0 = self._batch_norm_backward(f"{local}1.", dl1, k_l1, grads)  # (N, Cr, H, W)
        dxin = self._conv_backward(f"{local}0.", dl0, k_l0, grads, next_bn=k_l1)  # (N, C, H, W)
        H, W = dz.shape[2:]
        dxin += dt0 * dt0.dtype.type(1.0 / (H * W))  # (N, C, H, W) the pool's share, broadcast over (H, W)
        return dxin

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
    """Multi-scale channel attention on one map: ``y = x * sigmoid(L(x) + T(x))``.

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
        g = F.sigmoid(z)  # (N, C, H, W)
        y = x * g  # (N, C, H, W)
        return y, FusionCache(x.shape, x.dtype, x, None, g, att, None, None)

    def backward(self, grad_out, cache: FusionCache):
        dy = _check_grad("MS_CAM.backward", grad_out, cache.x_shape, cache.dtype)
        grads = self.zero_grads()
        g = cache.w1
        dg = dy * cache.x  # (N, C, H, W)
        dz = dg * _sigmoid_slope(g)  # (N, C, H, W)
        dx = self._ms_cam_backward("local_att.", "global_att.", dz, cache.att1, grads)  # (N, C, H, W)
        dx += dy * g  # (N, C, H, W)
        return (dx,), grads


class AFF(_AttentionFusion):
    """Attentional feature fusion: ``g = M(x + res)``, ``y = 2 x g + 2 res (1 - g)``.

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
        g = F.sigmoid(z)  # (N, C, H, W)
        e = x - residual  # (N, C, H, W)
        y = g * e  # (N, C, H, W)
        y += residual
        y *= 2  # = 2 (res + g e) = 2 x g + 2 res (1 - g)
        return y, FusionCache(x.shape, x.dtype, None, e, g, att, None, None)

    def backward(self, grad_out, cache: FusionCache):
        dy = _check_grad("AFF.backward", grad_out, cache.x_shape, cache.dtype)
        grads = self.zero_grads()
        g, e = cache.w1, cache.diff
        dy2 = 2 * dy  # (N, C, H, W)
        dg = dy2 * e  # (N, C, H, W)
        dz = dg * _sigmoid_slope(g)  # (N, C, H, W)
        dxa = self._ms_cam_backward("local_att.", "global_att.", dz, cache.att1, grads)  # (N, C, H, W)
        de = dy2 * g  # (N, C, H, W)
        dresidual = dy2  # (N, C, H, W) becomes 2 dy - de + dxa
        dresidual -= de
        dresidual += dxa
        dx = de + dxa  # (N, C, H, W)
        return (dx, dresidual), grads


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
        z, att1 = self._ms_cam("local_att.", "global_att.", xa, training)  # (N, C, H, W)
        g = F.sigmoid(z)  # (N, C, H, W)
        e = x - residual  # (N, C, H, W)
        xi = g * e  # (N, C, H, W)
        xi += residual  # = res + g e = x g + res (1 - g)
        z_2, att2 = self._ms_cam("local_att2.", self._global2, xi, training, suffix="_2")  # (N, C, H, W)
        g_2 = F.sigmoid(z_2)  # (N, C, H, W)
        y = g_2 * e  # (N, C, H, W)
        y += residual  # = res + g_2 e = x g_2 + res (1 - g_2)
        return y, FusionCache(x.shape, x.dtype, None, e, g, att1, g_2, att2)

    def backward(self, grad_out, cache: FusionCache):
        dy = _check_grad("iAFF.backward", grad_out, cache.x_shape, cache.dtype)
        grads = self.zero_grads()
        g, g_2, e = cache.w1, cache.w2, cache.diff
        dg_2 = dy * e  # (N, C, H, W)
        dz_2 = dg_2 * _sigmoid_slope(g_2)  # (N, C, H, W)
        dxi = self._ms_cam_backward("local_att2.", self._global2, dz_2, cache.att2, grads, suffix="_2")  # (N, C, H, W)
        dg = dxi * e  # (N, C, H, W)
        dz = dg * _sigmoid_slope(g)  # (N, C, H, W)
        dxa = self._ms_cam_backward("local_att.", "global_att.", dz, cache.att1, grads)  # (N, C, H, W)
        de = dy * g_2  # (N, C, H, W) e enters y and xi
        de += dxi * g
        dresidual = dy + dxi  # (N, C, H, W) becomes dy + dxi - de + dxa
        dresidual -= de
        dresidual += dxa
        dx = de + dxa  # (N, C, H, W)
        return (dx, dresidual), grads
