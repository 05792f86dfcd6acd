"""Multi-head self-attention (Vaswani et al.: "Attention Is All You Need", NeurIPS 2017) in
the two layouts people have weights for: timm's vision-transformer ``Attention``
(``ViTAttention``, Dosovitskiy et al., ICLR 2021) and ``torch.nn.MultiheadAttention``
(``MultiheadAttention``, dropout 0).

Notation (``npattn.explain``'s, one across the package): N samples, L queries and Lk keys
(T tokens in ViTAttention's self-attention), E channels inside the attention, in Nh heads
of width E_h = E / Nh: head i owns channels i E_h ... (i + 1) E_h - 1. ``Q, K, V`` are the
queries, keys and values split into heads, ``S`` the logits, ``P = softmax(S)`` the
attention weights, ``mask`` the additive mask (0 where a key is allowed, -inf where it is
not), ``c = 1 / sqrt(E_h)`` the scale; ``dSYM`` is the gradient of ``SYM`` and the ``d``
prefix means nothing else. Both blocks project the inputs, split the channels into heads,
run scaled dot-product attention per head, merge the heads and project back.

``MultiheadAttention`` takes query, key and value (in (L, N, E) order unless
``batch_first``), stores torch's keys (``in_proj_weight`` (3E, E) and ``in_proj_bias``
(3E,), or ``q_proj_weight`` (E, E), ``k_proj_weight`` (E, kdim), ``v_proj_weight``
(E, vdim) when kdim or vdim differ from E; ``out_proj.weight``, ``out_proj.bias``), and
masks as torch:

- ``key_padding_mask`` (N, Lk) and ``attn_mask`` (L, Lk) or (N Nh, L, Lk) (entry n Nh + i
  for sample n, head i); **boolean: True = NOT allowed** (the key is ignored: -inf is
  added); float: added to the logits. The two are added: mask = attn_mask +
  key_padding_mask.
- A query whose every key is masked: ``nn.MultiheadAttention`` (need_weights=True, its
  default, and its inference fast path) returns NaN for that query's output and
  weights, and its backward spreads NaN into the gradients of that sample's key, value,
  and of the projection weights. npattn does exactly the same (the softmax's 0/0); it
  does not substitute a number. (``F.scaled_dot_product_attention``, and
  ``nn.MultiheadAttention`` with need_weights=False, give 0 there instead.)
- ``cache.attn_weights`` (N, L, Lk) are the weights P averaged over the heads, what torch
  returns with ``need_weights=True, average_attn_weights=True``.

The lines below are torch's default configuration (biases, kdim = vdim = E, sequence
first, no mask), in ``npattn.explain``'s format; ``npattn explain MultiheadAttention``
walks them. Both blocks (and ``NonLocalAttn``) attend with ``npattn.functional.attention``'s
``attention`` and ``attention_backward``, whose locals are S, P, O and dV, dP, dS, dQ, dK.

Forward::

    Wq = in_proj_weight[0:E]       (E, E)            the query's third of the stacked projection  [np.split(param("in_proj_weight"), 3)[0]]
    Wk = in_proj_weight[E:2E]      (E, E)            the key's                             [np.split(param("in_proj_weight"), 3)[1]]
    Wv = in_proj_weight[2E:3E]     (E, E)            the value's                           [np.split(param("in_proj_weight"), 3)[2]]
    bq = in_proj_bias[0:E]         (E,)              the biases, thirds of in_proj_bias    [np.split(param("in_proj_bias"), 3)[0]]
    bk = in_proj_bias[E:2E]        (E,)                                                    [np.split(param("in_proj_bias"), 3)[1]]
    bv = in_proj_bias[2E:3E]       (E,)                                                    [np.split(param("in_proj_bias"), 3)[2]]
    Wo = out_proj.weight           (E, E)            the output projection                 [param("out_proj.weight")]
    bo = out_proj.bias             (E,)                                                    [param("out_proj.bias")]
    c = 1 / sqrt(E_h)              ()                the scale                             [attr("scale")]
    Nh = num_heads                 ()                the number of heads                   [attr("num_heads")]
    Xq = query, batch first        (N, L, E)         torch's (L, N, E) transposed          [query.transpose(1, 0, 2)]
    Xk = key, batch first          (N, Lk, E)                                              [key.transpose(1, 0, 2)]
    Xv = value, batch first        (N, Lk, E)                                              [value.transpose(1, 0, 2)]
    Qp = Xq Wq^T + bq              (N, L, E)         the projections, token by token       [matmul(Xq, Wq.T) + bq]
    Kp = Xk Wk^T + bk              (N, Lk, E)                                              [matmul(Xk, Wk.T) + bk]
    Vp = Xv Wv^T + bv              (N, Lk, E)                                              [matmul(Xv, Wv.T) + bv]
    Q = split_heads(Qp)            (N, Nh, L, E_h)   head i: channels i E_h ... (i + 1) E_h - 1  [split_heads(Qp, Nh)]
    K = split_heads(Kp)            (N, Nh, Lk, E_h)                                        [split_heads(Kp, Nh)]
    V = split_heads(Vp)            (N, Nh, Lk, E_h)                                        [split_heads(Vp, Nh)]
    S = c Q K^T + mask             (N, Nh, L, Lk)    the logits, per head (no mask here)   [c * matmul(Q, K.swapaxes(-1, -2))]
    P = softmax_rows(S)            (N, Nh, L, Lk)    the weights: over the keys of a query  [softmax(S, -1)]
    O = P V                        (N, Nh, L, E_h)   each query's mix of the values        [matmul(P, V)]
    Om = merge_heads(O)            (N, L, E)         the heads side by side                [merge_heads(O)]
    Y = Om Wo^T + bo               (N, L, E)         out_proj                              [matmul(Om, Wo.T) + bo]
    y = Y, sequence first          (L, N, E)         torch's layout                        [Y.transpose(1, 0, 2)]

The reason of each backward line names the forward line it differentiates.

Backward, for dy = dL/dy, in the order the code runs::

    dY = dy, batch first           (N, L, E)         y is a transpose of Y: transpose back
    dOm = dY Wo                    (N, L, E)         Y = Om Wo^T + bo is linear in Om
    dWo = dY^T Om                  (E, E)            ... in Wo (summed over N and L)
    dbo = sum_{N, L} dY            (E,)              ... in bo, added to every token
    dO = split_heads(dOm)          (N, Nh, L, E_h)   merge_heads is a permutation: its adjoint is its inverse
    dV = P^T dO                    (N, Nh, Lk, E_h)  O = P V is linear in V
    dP = dO V^T                    (N, Nh, L, Lk)    ... and in P
    dS = P * (dP - rowsum(dP * P))
                                   (N, Nh, L, Lk)    P = softmax(S) row by row: its Jacobian is diag(P) - P P^T
    dQ = c dS K                    (N, Nh, L, E_h)   S = c Q K^T + mask is linear in Q (mask is a constant)
    dK = c dS^T Q                  (N, Nh, Lk, E_h)  ... and in K
    dQp = merge_heads(dQ)          (N, L, E)         Q = split_heads(Qp): the inverse permutation
    dKp = merge_heads(dK)          (N, Lk, E)
    dVp = merge_heads(dV)          (N, Lk, E)
    dWq = dQp^T Xq                 (E, E)            Qp = Xq Wq^T + bq is linear in Wq (summed over N and L)
    dbq = sum_{N, L} dQp           (E,)              ... in bq
    dXq = dQp Wq                   (N, L, E)         ... in Xq
    dWk = dKp^T Xk                 (E, E)            Kp = Xk Wk^T + bk
    dbk = sum_{N, Lk} dKp = 0      (E,)              exactly 0: bk shifts every logit of a row alike (below)
    dXk = dKp Wk                   (N, Lk, E)
    dWv = dVp^T Xv                 (E, E)            Vp = Xv Wv^T + bv
    dbv = sum_{N, Lk} dVp          (E,)
    dXv = dVp Wv                   (N, Lk, E)
    dquery = dXq, sequence first   (L, N, E)         Xq is a transpose of query: transpose back
    dkey = dXk, sequence first     (Lk, N, E)
    dvalue = dXv, sequence first   (Lk, N, E)

The options change single lines: ``bias=False`` drops bq, bk, bv, bo; kdim or vdim other
than E use ``k_proj_weight`` (E, kdim) and ``v_proj_weight`` (E, vdim) for Wk and Wv (and
``q_proj_weight`` for Wq); ``batch_first`` drops the transposes (Xq = query, y = Y); a mask
adds its (N, Nh, L, Lk) broadcast to S and is a constant of the backward.

The key bias bk (``in_proj_bias[E:2E]``, ``qkv.bias[E:2E]``) has a zero gradient in
exact arithmetic: it adds c Q_i . bk to every logit of row i, and a softmax does not change
when a row is shifted (sum_j dS_ij = 0, so sum over the keys of dK, and of dKp, is 0).
npattn returns exact zeros there (NaN only where a fully masked query has made the whole
backward NaN, as torch).

Self-attention with one array: when query, key and value are the same array, the
gradient with respect to it is the SUM of the three returned gradients
``dquery + dkey + dvalue``; npattn returns them separately, as torch does for three
tensors, and the caller adds them.

``ViTAttention`` (timm 1.0.31's ``Attention``)
-----------------------------------------------

One input x (N, T, C) for all three (self-attention), its three projections stacked in
``qkv.weight`` (3E, C) (and ``qkv.bias`` with ``qkv_bias=True``), the output projection
``proj.weight`` (C_out, E), ``proj.bias``, and by default no mask. Nh heads of width E_h
(``attn_head_dim``, default C / Nh), E = Nh E_h channels inside the attention
(``attn_dim``), C_out output channels (``dim_out``, default C). The lines below are
timm's default configuration (no qkv bias, proj bias, no option); ``npattn explain
ViTAttention`` walks them.

Forward, for x (N, T, C)::

    Wp = proj.weight               (C, E)            the output projection (C_out = C)     [param("proj.weight")]
    bp = proj.bias                 (C,)                                                    [param("proj.bias")]
    Wqkv = qkv.weight              (3*E, C)          the three projections stacked, no bias  [param("qkv.weight")]
    c = E_h^(-1/2)                 ()                the scale                             [attr("scale")]
    Nh = num_heads                 ()                the number of heads                   [attr("num_heads")]
    QKV = x Wqkv^T                 (N, T, 3*E)       token by token                        [matmul(x, Wqkv.T)]
    Q = split_heads(QKV_0:E)       (N, Nh, T, E_h)   its first third, head i: channels i E_h ...  [split_heads(np.split(QKV, 3, -1)[0], Nh)]
    K = split_heads(QKV_E:2E)      (N, Nh, T, E_h)   the second                            [split_heads(np.split(QKV, 3, -1)[1], Nh)]
    V = split_heads(QKV_2E:3E)     (N, Nh, T, E_h)   the third                              [split_heads(np.split(QKV, 3, -1)[2], Nh)]
    S = c Q K^T + mask             (N, Nh, T, T)     the logits (no mask here)             [c * matmul(Q, K.swapaxes(-1, -2))]
    P = softmax_rows(S)            (N, Nh, T, T)     the weights                           [softmax(S, -1)]
    O = P V                        (N, Nh, T, E_h)                                         [matmul(P, V)]
    Om = merge_heads(O)            (N, T, E)         the heads side by side                [merge_heads(O)]
    y = Om Wp^T + bp               (N, T, C)         proj                                  [matmul(Om, Wp.T) + bp]

Backward, for dy = dL/dy, in the order the code runs::

    dOm = dy Wp                    (N, T, E)         y = Om Wp^T + bp is linear in Om
    dWp = dy^T Om                  (C, E)            ... in Wp (summed over N and T)
    dbp = sum_{N, T} dy            (C,)              ... in bp
    dO = split_heads(dOm)          (N, Nh, T, E_h)   merge_heads is a permutation: its adjoint is its inverse
    dV = P^T dO                    (N, Nh, T, E_h)   O = P V is linear in V
    dP = dO V^T                    (N, Nh, T, T)     ... and in P
    dS = P * (dP - rowsum(dP * P))
                                   (N, Nh, T, T)     P = softmax(S) row by row: Jacobian diag(P) - P P^T
    dQ = c dS K                    (N, Nh, T, E_h)   S = c Q K^T + mask is linear in Q
    dK = c dS^T Q                  (N, Nh, T, E_h)   ... and in K
    dQKV = [merge_heads(dQ), merge_heads(dK), merge_heads(dV)]
                                   (N, T, 3*E)       Q, K, V are thirds of QKV, permuted: the inverse, side by side
    dWqkv = dQKV^T x               (3*E, C)          QKV = x Wqkv^T is linear in Wqkv (summed over N and T)
    dx = dQKV Wqkv                 (N, T, C)         ... and in x

With ``qk_norm=True`` a LayerNorm over each head's E_h channels (eps ``norm_eps``)
normalises Q and K before the logits. ``npattn explain ViTAttention_qk_norm`` walks the
lines above, with the lines of ``qk_norm=True`` in place of those of the same symbols::

    gamma_q = q_norm.weight        (E_h,)            q_norm's scale                        [param("q_norm.weight")]
    beta_q = q_norm.bias           (E_h,)            and shift                             [param("q_norm.bias")]
    gamma_k = k_norm.weight        (E_h,)                                                  [param("k_norm.weight")]
    beta_k = k_norm.bias           (E_h,)                                                  [param("k_norm.bias")]
    eps = norm_eps                 ()                                                      [attr("norm_eps")]
    Qn = LN(Q; gamma_q, beta_q)    (N, Nh, T, E_h)   over E_h: gamma_q Q_hat + beta_q      [layer_norm(Q, gamma_q, beta_q, eps)]
    Kn = LN(K; gamma_k, beta_k)    (N, Nh, T, E_h)                                         [layer_norm(K, gamma_k, beta_k, eps)]
    S = c Qn Kn^T + mask           (N, Nh, T, T)     the logits of the normalised heads    [c * matmul(Qn, Kn.swapaxes(-1, -2))]
    dQn = c dS Kn                  (N, Nh, T, E_h)   S = c Qn Kn^T + mask is linear in Qn
    dKn = c dS^T Qn                (N, Nh, T, E_h)   ... and in Kn
    dgamma_q = sum_{N, Nh, T} dQn * Q_hat
                                   (E_h,)            Qn = gamma_q Q_hat + beta_q
    dbeta_q = sum_{N, Nh, T} dQn   (E_h,)            the same line
    dQ = LN'(dQn)                  (N, Nh, T, E_h)   Qn = LN(Q), through the mean and variance of each row
    dgamma_k = sum_{N, Nh, T} dKn * K_hat
                                   (E_h,)            Kn = gamma_k K_hat + beta_k
    dbeta_k = 0                    (E_h,)            exactly 0: beta_k shifts every logit of a row alike
    dK = LN'(dKn)                  (N, Nh, T, E_h)   Kn = LN(K)

with LN'(g) = r (g gamma - mean(g gamma) - y_hat mean(g gamma y_hat)) over the normalised
axis, r = 1 / sqrt(var + eps) (derived in ``npattn/functional/layer_norm.py``).

All of timm's options, with the rows of x written X (N T, C); every LayerNorm is over the
last axis with eps ``norm_eps`` (1e-6, the eps of timm's ``LayerNorm`` that its
VisionTransformer passes as ``norm_layer``); LN(Z; gamma, beta) = gamma Z_hat + beta,
Z_hat = (Z - mean Z) / sqrt(var Z + eps)::

    QKV  = X Wqkv^T + bqkv                          (N T, 3E)    bqkv with qkv_bias
    Q, K, V = its thirds, split into heads          (N, Nh, T, E_h)
    Qn   = LN_E_h(Q; gamma_q, beta_q)               (N, Nh, T, E_h)  qk_norm (q_norm.*)
    Kn   = LN_E_h(K; gamma_k, beta_k)               (N, Nh, T, E_h)  qk_norm (k_norm.*)
    S    = c Qn Kn^T + mask                         (N, Nh, T, T)    mask: below
    P    = softmax_rows(S);  O = P V                (N, Nh, T, E_h)
    Om   = the heads side by side                   (N T, E)
    U    = LN_E(Om; gamma_n, beta_n)                (N T, E)     scale_norm (norm.*)
    G    = sigmoid(Ag),  Ag = X Wg^T + bg           (N T, E)     gated (gate.*; bg with qkv_bias)
    Y    = U * G                                    (N T, E)     gated
    y    = Y Wp^T + bp                              (N T, C_out) bp with proj_bias

Without an option its line is the identity (Qn = Q, U = Om, Y = U). The gate is computed
from the block's input x and multiplies the attention output after ``norm`` and before
``proj``, as timm's forward does.

The mask (``forward(x, attn_mask=..., is_causal=...)``), timm's semantics, which are
``torch.nn.functional.scaled_dot_product_attention``'s:

- ``attn_mask`` broadcastable to (N, Nh, T, T): **boolean True = may attend** (False:
  the logit becomes -inf), floating: added to the logits (the block's dtype);
- ``is_causal=True``: query i attends to keys j <= i (the logit is -inf for j > i);
- both at once raise ``ValueError``, as timm's default (fused) path does;
- a query whose every key is masked gets O = 0 and passes no gradient, what timm's
  default path (``F.scaled_dot_product_attention``) returns on the CPU. (timm's unfused
  path, ``fused_attn=False``, gives NaN there and lets ``is_causal`` win over a mask.)

Backward, for dy = dL/dy (N T, C_out), in the order the code computes it; each line is
the chain rule through the forward line named on its right::

    dY       = dy Wp                  (N T, E)        y = Y Wp^T + bp
    dWp      = dy^T Y                 (C_out, E)      the same line
    dbp      = sum_rows dy            (C_out,)        the same line
    dU       = dY * G                 (N T, E)        Y = U * G, product rule
    dG       = dY * U                 (N T, E)        the same line
    dAg      = dG * G (1 - G)         (N T, E)        G = sigmoid(Ag), sigmoid' = G (1 - G)
    dWg      = dAg^T X                (E, C)          Ag = X Wg^T + bg
    dbg      = sum_rows dAg           (E,)            the same line
    dXg      = dAg Wg                 (N T, C)        the same line
    dgamma_n = sum_rows dU * Om_hat   (E,)            U = gamma_n Om_hat + beta_n
    dbeta_n  = sum_rows dU            (E,)            the same line
    dOm      = LN_E'(dU)              (N T, E)        U = LN_E(Om), through mean and variance
    dQn, dKn, dV = attention'(dOm)    (N, Nh, T, E_h) O = softmax(c Qn Kn^T + mask) V, above
    dgamma_q = sum_{N,Nh,T} dQn * Q_hat  (E_h,)       Qn = gamma_q Q_hat + beta_q
    dbeta_q  = sum_{N,Nh,T} dQn       (E_h,)          the same line
    dQ       = LN_E_h'(dQn)           (N, Nh, T, E_h) Qn = LN_E_h(Q)
    dgamma_k = sum_{N,Nh,T} dKn * K_hat  (E_h,)       Kn = gamma_k K_hat + beta_k
    dbeta_k  = 0 exactly              (E_h,)          a shift of every logit row (below)
    dK       = LN_E_h'(dKn)           (N, Nh, T, E_h) Kn = LN_E_h(K)
    dQKV     = dQ, dK, dV merged      (N T, 3E)       the split into heads is a permutation
    dWqkv    = dQKV^T X               (3E, C)         QKV = X Wqkv^T + bqkv
    dbqkv    = sum_rows dQKV          (3E,)           the same line
    dX       = dQKV Wqkv + dXg        (N T, C)        x feeds both qkv and gate: the sum

Exact zeros: ``k_norm.bias`` (beta_k adds Qn_i . beta_k c to every logit of row i, a
shift the softmax ignores), and the key third of ``qkv.bias`` without ``qk_norm`` (the
same shift); with ``qk_norm`` that key bias passes through K's normalisation, which is
not a shift, and its gradient is not zero. With E_h = 1 and ``qk_norm``, Q_hat = K_hat = 0
(a LayerNorm of one value), so Qn = beta_q and Kn = beta_k: the query and key rows of
``qkv`` get exact zero gradients (LN' of one value is 0), and so do ``q_norm.weight`` and
``k_norm.weight`` (their gradients are sums of dQn * Q_hat). The logits of row i are then
c beta_q beta_k + mask_ij: beta_q shifts the whole row (without a mask P = 1 / T), so
the gradient of ``q_norm.bias`` is zero as well, and npattn returns it exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .. import functional as F
from .._checks import float_array, positive_int, shape_is
from ..functional.attention import attention, attention_backward
from .base import Block, kaiming_uniform, make_rng

__all__ = ["ViTAttention", "MultiheadAttention"]


def _split_heads(a, heads):
    """(N, T, E) -> (N, Nh, T, E_h), a view: head i owns channels i E_h ... (i + 1) E_h - 1."""
    N, T, E = a.shape
    return a.reshape(N, T, heads, E // heads).transpose(0, 2, 1, 3)


def _merge_heads(a):
    """(N, Nh, T, E_h) -> (N, T, Nh E_h), contiguous: the heads side by side (the inverse of
    _split_heads)."""
    N, Nh, T, E_h = a.shape
    return np.ascontiguousarray(a.transpose(0, 2, 1, 3)).reshape(N, T, Nh * E_h)


def _check_tokens(op, name, a, dtype, width, width_name, layout):
    a = float_array(op, name, a, 3, layout)
    if a.dtype != dtype:
        raise TypeError(f"{op}: {name} has dtype {a.dtype} but the block's parameters are {dtype}; convert one of them (block.to({a.dtype.name}))")
    if a.shape[-1] != width:
        raise ValueError(f"{op}: {name} must have {width_name} = {width} features in its last dimension {layout}, got shape {tuple(a.shape)}")
    return a


# ================================================================= timm ViT Attention

@dataclass(frozen=True)
class ViTAttentionCache:
    x_shape: tuple  # (N, T, C)
    dtype: np.dtype
    qkv: object  # LinearCache of qkv: x as (N T, C)
    q_norm: object  # LayerNormCache of q_norm over Q (N, Nh, T, E_h), or None (no qk_norm)
    k_norm: object  # LayerNormCache of k_norm over K (N, Nh, T, E_h), or None
    heads: object  # functional.attention's AttentionCache: Qn, Kn, V (N, Nh, T, E_h), P (N, Nh, T, T); None when T = 0
    norm: object  # LayerNormCache of norm over Om (N T, E), or None (no scale_norm)
    gate: object  # LinearCache of gate: x as (N T, C), or None (not gated)
    G: np.ndarray  # (N T, E) G = sigmoid(gate(x)), or None
    U: np.ndarray  # (N T, E) what the gate multiplies, or None
    proj: object  # LinearCache of proj: Y as (N T, E)


class ViTAttention(Block):
    """timm's ``Attention`` (``timm.layers.attention``, used by ``vision_transformer``;
    timm 1.0.31), dropout 0. The defaults are timm's default configuration: no qk_norm,
    no scale_norm, no gate, proj_bias True.

    Parameters
    ----------
    dim : int
        Token width of the input (and of the output unless ``dim_out``).
    num_heads : int, default 8
        Nh; it must divide ``dim`` unless ``attn_head_dim`` is given.
    qkv_bias : bool, default False
        Whether ``qkv`` (and ``gate``) have a bias (``qkv.bias`` (3 E,), ``gate.bias`` (E,)).

    Keyword-only, timm's names and meaning:

    attn_head_dim : int or None, default None
        E_h, the width of each head; None: dim / num_heads. E = num_heads E_h channels run
        through the attention (``attn_dim``) and the scale is c = E_h ** -0.5.
    dim_out : int or None, default None
        Output width (``proj.weight`` (dim_out, E)); None: dim.
    proj_bias : bool, default True
        Whether ``proj`` has a bias.
    qk_norm : bool, default False
        A LayerNorm over each head's E_h channels of q and of k (``q_norm.weight``,
        ``q_norm.bias``, ``k_norm.weight``, ``k_norm.bias``, (E_h,) each).
    scale_norm : bool, default False
        A LayerNorm over the E channels of the merged heads, before ``proj``
        (``norm.weight``, ``norm.bias`` (E,)).
    gated : bool, default False
        An elementwise sigmoid gate sigmoid(gate(x)) (``gate.weight`` (E, dim), and
        ``gate.bias`` with ``qkv_bias``) multiplying the attention output after ``norm``
        and before ``proj``.
    norm_eps : float, default 1e-6
        eps of the LayerNorms (timm's ``LayerNorm``, which its VisionTransformer passes
        as ``norm_layer``; ``torch.nn.LayerNorm``'s default is 1e-5).
    rng : None, int or numpy.random.Generator (PyTorch's default Linear initialisation;
        LayerNorm weights 1, biases 0)
    dtype : float32 (default) or float64

    ``forward(x, training=False, attn_mask=None, is_causal=False)`` with x (N, tokens,
    dim) -> (y (N, tokens, dim_out), cache): masks as timm's (and
    ``torch.nn.functional.scaled_dot_product_attention``'s): **boolean True = may
    attend**, float added, broadcastable to (N, num_heads, tokens, tokens); ``is_causal``
    lets token i attend to tokens 0 ... i. ``backward(dy, cache) -> ((dx,), grads)``;
    exact zero gradients: ``k_norm.bias``, and ``qkv.bias[E:2E]`` (the key bias) without
    qk_norm. The math is in the module docstring.
    """

    def __init__(
        self, dim, num_heads=8, qkv_bias=False, *, attn_head_dim=None, dim_out=None, proj_bias=True,
        qk_norm=False, scale_norm=False, gated=False, norm_eps=1e-6, rng=None, dtype=np.float32,
    ):
        super().__init__(dtype)
        op = "ViTAttention"
        self.dim = positive_int(op, "dim", dim)
        self.num_heads = positive_int(op, "num_heads", num_heads)
        for name, flag in (("qkv_bias", qkv_bias), ("proj_bias", proj_bias), ("qk_norm", qk_norm),
                           ("scale_norm", scale_norm), ("gated", gated)):
            if not isinstance(flag, (bool, np.bool_)):
                raise TypeError(f"{op}: {name} must be a bool, got {flag!r}")
        if attn_head_dim is None:
            if self.dim % self.num_heads:
                raise ValueError(f"{op}: num_heads must divide dim (or give attn_head_dim), got dim={self.dim}, num_heads={self.num_heads}")
            self.head_dim = self.dim // self.num_heads
        else:
            self.head_dim = positive_int(op, "attn_head_dim", attn_head_dim)
        self.attn_dim = self.num_heads * self.head_dim
        self.dim_out = self.dim if dim_out is None else positive_int(op, "dim_out", dim_out)
        if isinstance(norm_eps, bool) or not isinstance(norm_eps, (int, float, np.floating, np.integer)):
            raise TypeError(f"{op}: norm_eps must be a real number, got {type(norm_eps).__name__}")
        if not (math.isfinite(float(norm_eps)) and float(norm_eps) >= 0.0):
            raise ValueError(f"{op}: norm_eps must be a finite number >= 0, got {norm_eps}")
        self.qkv_bias = bool(qkv_bias)
        self.proj_bias = bool(proj_bias)
        self.qk_norm = bool(qk_norm)
        self.scale_norm = bool(scale_norm)
        self.gated = bool(gated)
        self.norm_eps = float(norm_eps)
        self.scale = self.head_dim ** -0.5
        rng = make_rng(rng)
        a = self.attn_dim
        # timm's registration order: qkv, q_norm, k_norm, norm, gate, proj
        self._add_linear("qkv.", rng, self.dim, 3 * a, bias=self.qkv_bias)
        if self.qk_norm:
            for prefix in ("q_norm.", "k_norm."):
                self._add_param(f"{prefix}weight", np.ones(self.head_dim))
                self._add_param(f"{prefix}bias", np.zeros(self.head_dim))
        if self.scale_norm:
            self._add_param("norm.weight", np.ones(a))
            self._add_param("norm.bias", np.zeros(a))
        if self.gated:
            self._add_linear("gate.", rng, self.dim, a, bias=self.qkv_bias)
        self._add_linear("proj.", rng, a, self.dim_out, bias=self.proj_bias)

    def _layer_norm(self, prefix, y):
        s = self._state
        return F.layer_norm_forward(y, s[f"{prefix}weight"], s[f"{prefix}bias"], self.norm_eps)

    def _layer_norm_backward(self, prefix, dy, cache, param_grads):
        g = F.layer_norm_backward(dy, cache)
        param_grads[f"{prefix}weight"] += g["weight"]
        param_grads[f"{prefix}bias"] += g["bias"]
        return g["x"]

    def _mask(self, op, attn_mask, is_causal, N, T):
        """The mask for the logits (boolean: True = may attend; or float, added), or None."""
        if not isinstance(is_causal, (bool, np.bool_)):
            raise TypeError(f"{op}: is_causal must be a bool, got {is_causal!r}")
        if is_causal:
            if attn_mask is not None:
                raise ValueError(f"{op}: give attn_mask or is_causal=True, not both (timm's default path, torch's scaled_dot_product_attention, refuses the pair)")
            return np.tril(np.ones((T, T), dtype=bool))  # (T, T) key j <= query i
        if attn_mask is None:
            return None
        if not isinstance(attn_mask, np.ndarray):
            raise TypeError(f"{op}: attn_mask must be None or a numpy.ndarray, got {type(attn_mask).__name__}")
        if attn_mask.dtype != np.bool_:
            if attn_mask.dtype.kind != "f":
                raise TypeError(f"{op}: attn_mask must be boolean (True = may attend) or floating (added), got dtype {attn_mask.dtype}")
            if attn_mask.dtype != self.dtype:
                raise TypeError(f"{op}: a float attn_mask must have the block's dtype {self.dtype}, got {attn_mask.dtype}")
        logits = (N, self.num_heads, T, T)
        try:
            ok = np.broadcast_shapes(attn_mask.shape, logits) == logits
        except ValueError:
            ok = False
        if not ok:
            raise ValueError(f"{op}: attn_mask must be broadcastable to (N, num_heads, tokens, tokens) = {logits}, got shape {tuple(attn_mask.shape)}")
        return attn_mask

    def forward(self, x, training=False, attn_mask=None, is_causal=False):
        """Self-attention over the tokens of x (N, T, dim) -> (y (N, T, dim_out), cache).
        ``training`` is accepted for a uniform block API (dropout is 0: both modes compute
        the same). ``attn_mask``: boolean (True = may attend) or float (added),
        broadcastable to (N, num_heads, T, T); ``is_causal``: token i attends to 0 ... i.
        The local names are the module docstring's symbols."""
        op = "ViTAttention"
        if not isinstance(training, (bool, np.bool_)):  # timm's forward(x, attn_mask, is_causal) takes the mask second
            raise TypeError(f"{op}: training must be a bool, got {type(training).__name__}; pass a mask as attn_mask=...")
        x = _check_tokens(op, "x", x, self.dtype, self.dim, "dim", "(N, tokens, dim)")
        N, T, C = x.shape
        Nh, E_h, E = self.num_heads, self.head_dim, self.attn_dim
        mask = self._mask(op, attn_mask, is_causal, N, T)
        X = x.reshape(N * T, C)  # (N T, C) the rows of x
        QKV, lin_qkv = self._linear("qkv.", X)  # (N T, 3E)
        QKV = QKV.reshape(N, T, 3 * E)
        Q, K, V = QKV.reshape(N, T, 3, Nh, E_h).transpose(2, 0, 3, 1, 4)  # (N, Nh, T, E_h) each
        if self.qk_norm:
            Qn, ln_q = self._layer_norm("q_norm.", Q)  # (N, Nh, T, E_h)
            Kn, ln_k = self._layer_norm("k_norm.", K)  # (N, Nh, T, E_h)
        else:
            Qn, Kn, ln_q, ln_k = Q, K, None, None
        if T:
            O, heads = attention(Qn, Kn, V, mask, self.scale, empty_rows="zero")  # (N, Nh, T, E_h)
        else:  # no tokens: nothing to attend to, an empty output (as timm)
            O, heads = np.zeros((N, Nh, 0, E_h), dtype=x.dtype), None
        Om = _merge_heads(O)  # (N, T, E)
        U = Om.reshape(N * T, E)  # (N T, E)
        ln_out = None
        if self.scale_norm:
            U, ln_out = self._layer_norm("norm.", U)  # (N T, E)
        lin_gate = G = None
        Y = U  # (N T, E) what proj reads
        if self.gated:
            Ag, lin_gate = self._linear("gate.", X)  # (N T, E)
            G = F.sigmoid(Ag)  # (N T, E)
            Y = U * G  # (N T, E)
        y, lin_proj = self._linear("proj.", Y)  # (N T, C_out)
        y = y.reshape(N, T, self.dim_out)
        cache = ViTAttentionCache(x.shape, x.dtype, lin_qkv, ln_q, ln_k, heads, ln_out, lin_gate, G,
                                  U if self.gated else None, lin_proj)
        return y, cache

    def backward(self, grad_out, cache: ViTAttentionCache):
        """Returns ``((dx,), grads)``; grads keyed like the state_dict. The local names are
        the module docstring's symbols."""
        op = "ViTAttention.backward"
        dy = float_array(op, "grad_out", grad_out, 3, "(N, tokens, dim_out)")
        N, T, C = cache.x_shape
        shape_is(op, "grad_out", dy, (N, T, self.dim_out))
        if dy.dtype != cache.dtype:
            raise TypeError(f"{op}: grad_out must have the forward input's dtype {cache.dtype}, got {dy.dtype}")
        Nh, E_h, E = self.num_heads, self.head_dim, self.attn_dim
        grads = self.zero_grads()  # dWp, dbp, dWqkv, ... are added into it
        dY = self._linear_backward("proj.", dy.reshape(N * T, self.dim_out), cache.proj, grads)  # (N T, E)
        dXg = None
        dU = dY  # (N T, E) not gated: Y = U
        if self.gated:
            G = cache.G
            dG = dY * cache.U  # (N T, E)
            dU = dY * G  # (N T, E)
            dAg = dG * G * (1 - G)  # (N T, E) through the sigmoid
            dXg = self._linear_backward("gate.", dAg, cache.gate, grads)  # (N T, C)
        dOm = dU  # (N T, E) no scale_norm: U = Om
        if self.scale_norm:
            dOm = self._layer_norm_backward("norm.", dU, cache.norm, grads)  # (N T, E)
        dOm = dOm.reshape(N, T, E)
        dO = _split_heads(dOm, Nh)  # (N, Nh, T, E_h)
        if cache.heads is not None:
            dQn, dKn, dV = attention_backward(dO, cache.heads)  # (N, Nh, T, E_h)
        else:
            dQn = dKn = dV = np.zeros((N, Nh, 0, E_h), dtype=cache.dtype)
        dQ, dK = dQn, dKn  # no qk_norm: Qn = Q, Kn = K
        if self.qk_norm:
            dQ = self._layer_norm_backward("q_norm.", dQn, cache.q_norm, grads)  # (N, Nh, T, E_h)
            dK = self._layer_norm_backward("k_norm.", dKn, cache.k_norm, grads)  # (N, Nh, T, E_h)
            grads["k_norm.bias"][...] = 0  # beta_k shifts every logit of a row alike
            if E_h == 1:
                grads["q_norm.bias"][...] = 0  # Qn = beta_q, Kn = beta_k: every logit of a row equal
        dQKV = np.stack([dQ, dK, dV]).transpose(1, 3, 0, 2, 4).reshape(N, T, 3 * E)  # (N, T, 3E), qkv's layout
        dX = self._linear_backward("qkv.", dQKV.reshape(N * T, 3 * E), cache.qkv, grads)  # (N T, C)
        if dXg is not None:
            dX = dX + dXg  # x feeds qkv and gate
        if self.qkv_bias and not self.qk_norm:
            grads["qkv.bias"][E : 2 * E] = 0  # the key bias shifts every logit of a row alike
        dx = dX.reshape(N, T, C)
        return (dx,), grads


# ================================================================= torch.nn.MultiheadAttention

@dataclass(frozen=True)
class MultiheadAttentionCache:
    query_shape: tuple  # as given: (L, N, E), or (N, L, E) with batch_first
    key_shape: tuple  # (Lk, N, kdim) or (N, Lk, kdim)
    value_shape: tuple  # (Lk, N, vdim) or (N, Lk, vdim)
    dtype: np.dtype
    in_proj: tuple  # LinearCache of the q, k, v projections: inputs (N L, E), (N Lk, kdim), (N Lk, vdim)
    heads: object  # functional.attention's AttentionCache: Q (N, Nh, L, E_h), K, V (N, Nh, Lk, E_h), P (N, Nh, L, Lk)
    out_proj: object  # LinearCache of out_proj: Om as (N L, E)
    attn_weights: np.ndarray  # (N, L, Lk) P averaged over the heads (torch's need_weights output)


class MultiheadAttention(Block):
    """``torch.nn.MultiheadAttention`` with dropout 0 (no add_bias_kv, no add_zero_attn).

    Parameters
    ----------
    embed_dim : int
        E; ``num_heads`` must divide it.
    num_heads : int
    bias : bool, default True
        ``in_proj_bias`` and ``out_proj.bias``.
    kdim, vdim : int or None (None: E)
        Feature widths of key and value; when either differs from E the projections are
        stored separately (``q_proj_weight``, ``k_proj_weight``, ``v_proj_weight``).
    batch_first : bool, default False
        False: inputs and output are (sequence, batch, features), torch's default;
        True: (batch, sequence, features).
    rng : None, int or numpy.random.Generator (torch's initialisation: Xavier-uniform
        projections, zero biases)
    dtype : float32 (default) or float64

    ``forward(query, key, value, key_padding_mask=None, attn_mask=None, training=False)
    -> (y, cache)``, ``cache.attn_weights`` (N, L, Lk) averaged over the heads;
    ``backward(dy, cache) -> ((dquery, dkey, dvalue), grads)``.
    BOOLEAN MASKS: True = NOT allowed to attend (torch.nn.MultiheadAttention's convention,
    the opposite of ``scaled_dot_product_attention_forward``'s). With one array as
    query, key and value, its gradient is ``dquery + dkey + dvalue``.
    The math is in the module docstring.
    """

    def __init__(self, embed_dim, num_heads, bias=True, kdim=None, vdim=None, batch_first=False, *, rng=None, dtype=np.float32):
        super().__init__(dtype)
        op = "MultiheadAttention"
        self.embed_dim = positive_int(op, "embed_dim", embed_dim)
        self.num_heads = positive_int(op, "num_heads", num_heads)
        if self.embed_dim % self.num_heads:
            raise ValueError(f"{op}: num_heads must divide embed_dim, got embed_dim={self.embed_dim}, num_heads={self.num_heads}")
        for name, flag in (("bias", bias), ("batch_first", batch_first)):
            if not isinstance(flag, (bool, np.bool_)):
                raise TypeError(f"{op}: {name} must be a bool, got {flag!r}")
        self.bias = bool(bias)
        self.batch_first = bool(batch_first)
        self.kdim = self.embed_dim if kdim is None else positive_int(op, "kdim", kdim)
        self.vdim = self.embed_dim if vdim is None else positive_int(op, "vdim", vdim)
        self.head_dim = self.embed_dim // self.num_heads
        self.scale = 1.0 / math.sqrt(self.head_dim)  # c
        self.separate_proj = not (self.kdim == self.embed_dim and self.vdim == self.embed_dim)  # torch: not _qkv_same_embed_dim
        rng = make_rng(rng)
        e = self.embed_dim
        if self.separate_proj:
            for name, width in (("q", e), ("k", self.kdim), ("v", self.vdim)):
                self._add_param(f"{name}_proj_weight", _xavier_uniform(rng, (e, width), self.dtype))
        else:
            self._add_param("in_proj_weight", _xavier_uniform(rng, (3 * e, e), self.dtype))
        if self.bias:
            self._add_param("in_proj_bias", np.zeros(3 * e))
        self._add_param("out_proj.weight", kaiming_uniform(rng, (e, e), e, self.dtype))
        if self.bias:
            self._add_param("out_proj.bias", np.zeros(e))

    # ---- the three input projections -----------------------------------------------
    def _proj_weights(self):
        """(W_q, W_k, W_v), (b_q, b_k, b_v) (biases None without ``bias``)."""
        s, e = self._state, self.embed_dim
        if self.separate_proj:
            ws = (s["q_proj_weight"], s["k_proj_weight"], s["v_proj_weight"])
        else:
            w = s["in_proj_weight"]
            ws = (w[:e], w[e : 2 * e], w[2 * e :])
        b = s.get("in_proj_bias")
        bs = (None, None, None) if b is None else (b[:e], b[e : 2 * e], b[2 * e :])
        return ws, bs

    def _masks(self, op, key_padding_mask, attn_mask, N, L, Lk):
        """The additive mask (broadcastable to (N, Nh, L, Lk), -inf where not allowed) or None."""
        mask = None
        if key_padding_mask is not None:
            m = self._additive(op, "key_padding_mask", key_padding_mask, [(N, Lk)], "(N, S)")
            mask = m.reshape(N, 1, 1, Lk)
        if attn_mask is not None:
            Nh = self.num_heads
            m = self._additive(op, "attn_mask", attn_mask, [(L, Lk), (N * Nh, L, Lk)], "(L, S) or (N * num_heads, L, S)")
            m = m.reshape(N, Nh, L, Lk) if m.ndim == 3 else m
            mask = m if mask is None else mask + m  # (N, Nh, L, Lk) or (L, Lk)
        return mask

    def _additive(self, op, name, mask, shapes, layout):
        if not isinstance(mask, np.ndarray):
            raise TypeError(f"{op}: {name} must be None or a numpy.ndarray, got {type(mask).__name__}")
        if tuple(mask.shape) not in shapes:
            want = " or ".join(str(x) for x in shapes)
            raise ValueError(f"{op}: {name} must have shape {layout} = {want}, got {tuple(mask.shape)}")
        if mask.dtype == np.bool_:
            return np.where(mask, self.dtype.type(-np.inf), self.dtype.type(0))  # True = NOT allowed
        if mask.dtype.kind != "f":
            raise TypeError(f"{op}: {name} must be boolean (True = not allowed) or floating (added), got dtype {mask.dtype}")
        if mask.dtype != self.dtype:
            raise TypeError(f"{op}: a float {name} must have the block's dtype {self.dtype}, got {mask.dtype}")
        return mask

    def forward(self, query, key, value, key_padding_mask=None, attn_mask=None, training=False):
        """Returns ``(y, cache)``: y (L, N, E), or (N, L, E) with ``batch_first``;
        ``cache.attn_weights`` (N, L, Lk). ``training`` is accepted for a uniform block API
        (dropout is 0: both modes compute the same). The local names are the module
        docstring's symbols."""
        op = "MultiheadAttention"
        order = "(N, L, E)" if self.batch_first else "(L, N, E)"
        korder = "(N, S, kdim)" if self.batch_first else "(S, N, kdim)"
        vorder = "(N, S, vdim)" if self.batch_first else "(S, N, vdim)"
        query = _check_tokens(op, "query", query, self.dtype, self.embed_dim, "embed_dim", order)
        key = _check_tokens(op, "key", key, self.dtype, self.kdim, "kdim", korder)
        value = _check_tokens(op, "value", value, self.dtype, self.vdim, "vdim", vorder)
        if self.batch_first:
            Xq, Xk, Xv = query, key, value  # (N, L, E), (N, Lk, kdim), (N, Lk, vdim)
        else:
            Xq, Xk, Xv = (a.transpose(1, 0, 2) for a in (query, key, value))
        N, L, E = Xq.shape
        Lk = Xk.shape[1]
        if Xk.shape[0] != N or Xv.shape[0] != N:
            raise ValueError(f"{op}: query, key and value must have the same batch size, got query {tuple(query.shape)}, key {tuple(key.shape)}, value {tuple(value.shape)} ({order})")
        if Xv.shape[1] != Lk:
            raise ValueError(f"{op}: value must have key's sequence length S = {Lk}, got value {tuple(value.shape)}, key {tuple(key.shape)}")
        if Lk < 1:
            raise ValueError(f"{op}: key must hold at least one position (S >= 1), got shape {tuple(key.shape)}")
        mask = self._masks(op, key_padding_mask, attn_mask, N, L, Lk)
        Nh = self.num_heads
        (Wq, Wk, Wv), (bq, bk, bv) = self._proj_weights()
        Qp, lin_q = F.linear_forward(Xq.reshape(N * L, E), Wq, bq)  # (N L, E)
        Kp, lin_k = F.linear_forward(Xk.reshape(N * Lk, self.kdim), Wk, bk)  # (N Lk, E)
        Vp, lin_v = F.linear_forward(Xv.reshape(N * Lk, self.vdim), Wv, bv)  # (N Lk, E)
        Qp, Kp, Vp = Qp.reshape(N, L, E), Kp.reshape(N, Lk, E), Vp.reshape(N, Lk, E)
        Q = _split_heads(Qp, Nh)  # (N, Nh, L, E_h)
        K = _split_heads(Kp, Nh)  # (N, Nh, Lk, E_h)
        V = _split_heads(Vp, Nh)  # (N, Nh, Lk, E_h)
        O, heads = attention(Q, K, V, mask, self.scale, empty_rows="nan")  # (N, Nh, L, E_h)
        Om = _merge_heads(O)  # (N, L, E)
        Y, lin_out = self._linear("out_proj.", Om.reshape(N * L, E))  # (N L, E)
        Y = Y.reshape(N, L, E)
        y = Y if self.batch_first else np.ascontiguousarray(Y.transpose(1, 0, 2))  # (L, N, E)
        attn_weights = heads.P.mean(axis=1)  # (N, L, Lk)
        cache = MultiheadAttentionCache(query.shape, key.shape, value.shape, query.dtype, (lin_q, lin_k, lin_v), heads,
                                        lin_out, attn_weights)
        return y, cache

    def backward(self, grad_out, cache: MultiheadAttentionCache):
        """Returns ``((dquery, dkey, dvalue), grads)`` in the inputs' layouts; grads keyed
        like the state_dict (the key part of ``in_proj_bias`` is an exact zero). The local
        names are the module docstring's symbols."""
        op = "MultiheadAttention.backward"
        order = "(N, L, E)" if self.batch_first else "(L, N, E)"
        dy = float_array(op, "grad_out", grad_out, 3, order)
        shape_is(op, "grad_out", dy, cache.query_shape)
        if dy.dtype != cache.dtype:
            raise TypeError(f"{op}: grad_out must have the forward input's dtype {cache.dtype}, got {dy.dtype}")
        dY = dy if self.batch_first else dy.transpose(1, 0, 2)  # (N, L, E)
        N, L, E = dY.shape
        Lk = cache.heads.K.shape[2]
        grads = self.zero_grads()  # dWo, dbo are added into it
        dOm = self._linear_backward("out_proj.", np.ascontiguousarray(dY).reshape(N * L, E), cache.out_proj, grads)  # (N L, E)
        dOm = dOm.reshape(N, L, E)
        dO = _split_heads(dOm, self.num_heads)  # (N, Nh, L, E_h)
        dQ, dK, dV = attention_backward(dO, cache.heads)  # (N, Nh, L|Lk|Lk, E_h)
        dQp, dKp, dVp = _merge_heads(dQ), _merge_heads(dK), _merge_heads(dV)  # (N, L|Lk|Lk, E)
        lin_q, lin_k, lin_v = cache.in_proj
        gq = F.linear_backward(dQp.reshape(N * L, E), lin_q)  # x (N L, E), weight (E, E), bias (E,)
        gk = F.linear_backward(dKp.reshape(N * Lk, E), lin_k)  # x (N Lk, kdim), weight (E, kdim)
        gv = F.linear_backward(dVp.reshape(N * Lk, E), lin_v)  # x (N Lk, vdim), weight (E, vdim)
        dWq, dWk, dWv = gq["weight"], gk["weight"], gv["weight"]
        if self.separate_proj:
            grads["q_proj_weight"] += dWq
            grads["k_proj_weight"] += dWk
            grads["v_proj_weight"] += dWv
        else:
            grads["in_proj_weight"] += np.concatenate([dWq, dWk, dWv])  # (3E, E)
        if self.bias:
            dbq, dbk, dbv = gq["bias"], gk["bias"], gv["bias"]
            # the key bias shifts every logit of a row alike: exactly 0 (NaN where a fully
            # masked query made the backward NaN, as torch)
            dbk = np.where(np.isnan(dbk), dbk, dbk.dtype.type(0))
            grads["in_proj_bias"] += np.concatenate([dbq, dbk, dbv])  # (3E,)
        dXq = gq["x"].reshape(N, L, E)
        dXk = gk["x"].reshape(N, Lk, self.kdim)
        dXv = gv["x"].reshape(N, Lk, self.vdim)
        if self.batch_first:
            dquery, dkey, dvalue = dXq, dXk, dXv
        else:
            dquery, dkey, dvalue = (np.ascontiguousarray(a.transpose(1, 0, 2)) for a in (dXq, dXk, dXv))
        return (dquery, dkey, dvalue), grads


def _xavier_uniform(rng, shape, dtype):
    """torch.nn.init.xavier_uniform_ for a 2-D weight: U(-a, a), a = sqrt(6 / (fan_in + fan_out))."""
    fan_out, fan_in = shape
    bound = math.sqrt(6.0 / (fan_in + fan_out))
    return rng.uniform(-bound, bound, size=shape).astype(dtype)
