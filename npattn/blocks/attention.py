"""Multi-head self-attention (Vaswani et al.: "Attention Is All You Need", NeurIPS 2017) in
the two layouts people have weights for: timm's vision-transformer ``Attention``
(``ViTAttention``, Dosovitskiy et al., ICLR 2021) and ``torch.nn.MultiheadAttention``
(``MultiheadAttention``, dropout 0).

Both project the inputs, split the embedding into h heads of d = E / h channels (head i
owns channels i d ... (i + 1) d - 1), run scaled dot-product attention per head with the
scale 1 / sqrt(d), join the heads and project back::

    Q = X_q W_q^T + b_q,  K = X_k W_k^T + b_k,  V = X_v W_v^T + b_v      (N, L|S|S, E)
    Q_i, K_i, V_i = the channels of head i                                (N, h, L|S|S, d)
    A_i = softmax_rows(Q_i K_i^T / sqrt(d) + M_i)                         (N, h, L, S)
    O_i = A_i V_i;  O = the heads side by side                            (N, L, E)
    out = O W_o^T + b_o                                                   (N, L, E)

``ViTAttention`` has one input x (N, tokens, dim) for all three (self-attention), its
three projections stacked in ``qkv.weight`` (3 dim, dim) (and ``qkv.bias`` with
``qkv_bias=True``), the output projection ``proj.weight``, ``proj.bias``, and by default
no mask; timm's options (head width, output width, qk_norm, scale_norm, a gate, masks and
is_causal) are derived in the last section below.
``MultiheadAttention`` takes query, key and value (in (L, N, E) order unless
``batch_first``), stores torch's keys (``in_proj_weight`` (3E, E) and ``in_proj_bias``
(3E,), or ``q_proj_weight`` (E, E), ``k_proj_weight`` (E, kdim), ``v_proj_weight``
(E, vdim) when kdim or vdim differ from E; ``out_proj.weight``, ``out_proj.bias``), and
masks as torch:

- ``key_padding_mask`` (N, S) and ``attn_mask`` (L, S) or (N h, L, S) (entry n h + i for
  sample n, head i); **boolean: True = NOT allowed** (the key is ignored: -inf is added);
  float: added to the scores. The two are added: M = attn_mask + key_padding_mask.
- A query whose every key is masked: ``nn.MultiheadAttention`` (need_weights=True, its
  default, and its inference fast path) returns NaN for that query's output and
  weights, and its backward spreads NaN into the gradients of that sample's key, value,
  and of the projection weights. npattn does exactly the same (the softmax's 0/0); it
  does not substitute a number. (``F.scaled_dot_product_attention``, and
  ``nn.MultiheadAttention`` with need_weights=False, give 0 there instead.)
- ``cache.attn_weights`` (N, L, S) are the weights averaged over the heads, what torch
  returns with ``need_weights=True, average_attn_weights=True``.

Backward, for dout = dL/dout, in the order the code computes it (the attention's own
backward per head is derived in ``npattn/functional/attention.py``: dV_i = A_i^T dO_i,
dS_i = A_i * (dO_i V_i^T - rowsum(dO_i V_i^T * A_i)), dQ_i = dS_i K_i / sqrt(d),
dK_i = dS_i^T Q_i / sqrt(d))::

    dO   = dout W_o;   dW_o = dout^T O;   db_o = sum dout                 output projection
    dQ_i, dK_i, dV_i = attention'(dO_i)                                   per head
    dX_q = dQ W_q;     dW_q = dQ^T X_q;   db_q = sum dQ                   and likewise for K, V

The key bias b_k (``in_proj_bias[E:2E]``, ``qkv.bias[dim:2 dim]``) has a zero gradient in
exact arithmetic: it adds Q_i . b_k to every score of a row, and a softmax does not change
when a row is shifted (sum_j dS_ij = 0). npattn returns exact zeros there (NaN only where
a fully masked query has made the whole backward NaN, as torch).

Self-attention with one array: when query, key and value are the same array, the
gradient with respect to it is the SUM of the three returned gradients
``d_query + d_key + d_value``; npattn returns them separately, as torch does for three
tensors, and the caller adds them.

``ViTAttention``'s options (timm 1.0.31's ``Attention``)
--------------------------------------------------------

h heads of width d (``attn_head_dim``, default dim / h), A = h d channels inside the
attention (``attn_dim``), D_out output channels (``dim_out``, default dim). Every
LayerNorm below is over the last axis with eps ``norm_eps`` (1e-6, the eps of timm's
``LayerNorm`` that its VisionTransformer passes as ``norm_layer``); LN(y; gamma, beta) =
gamma y_hat + beta, y_hat = (y - mean y) / sqrt(var y + eps). Forward, for x (N, T, dim)
with the rows of x written X (N T, dim)::

    QKV = X W_qkv^T + b_qkv                         (N T, 3A)    b_qkv with qkv_bias
    Q, K, V = its thirds, split into heads          (N, h, T, d)
    Q' = LN_d(Q; gamma_q, beta_q)                   (N, h, T, d) qk_norm   (q_norm.*)
    K' = LN_d(K; gamma_k, beta_k)                   (N, h, T, d) qk_norm   (k_norm.*)
    Z  = Q' K'^T / sqrt(d) + M                      (N, h, T, T) M: the mask, below
    P  = softmax_rows(Z);  O = P V                  (N, h, T, d)
    O  = the heads side by side                     (N T, A)
    U  = LN_A(O; gamma_n, beta_n)                   (N T, A)     scale_norm (norm.*)
    G  = sigmoid(X W_g^T + b_g)                     (N T, A)     gated (gate.*; b_g with qkv_bias)
    Y  = U * G                                      (N T, A)     gated
    out = Y W_p^T + b_p                             (N T, D_out) b_p with proj_bias

Without an option its line is the identity (Q' = Q, U = O, Y = U). The gate is computed
from the block's input x and multiplies the attention output after ``norm`` and before
``proj``, as timm's forward does.

The mask M (``forward(x, attn_mask=..., is_causal=...)``), timm's semantics, which are
``torch.nn.functional.scaled_dot_product_attention``'s:

- ``attn_mask`` broadcastable to (N, h, T, T): **boolean True = may attend** (False: -inf
  added), floating: added to the scores (the block's dtype);
- ``is_causal=True``: query i attends to keys j <= i (M_ij = -inf for j > i);
- both at once raise ``ValueError``, as timm's default (fused) path does;
- a query whose every key is masked gets O = 0 and passes no gradient, what timm's
  default path (``F.scaled_dot_product_attention``) returns on the CPU. (timm's unfused
  path, ``fused_attn=False``, gives NaN there and lets ``is_causal`` win over a mask.)

Backward, for dout = dL/dout (N T, D_out), in the order the code computes it; each line
is the chain rule through the forward line named on its right::

    dY       = dout W_p                  (N T, A)       out = Y W_p^T + b_p
    dW_p     = dout^T Y                  (D_out, A)     the same line
    db_p     = sum_rows dout             (D_out,)       the same line
    dU       = dY * G                    (N T, A)       Y = U * G, product rule
    dG       = dY * U                    (N T, A)       the same line
    dA_g     = dG * G (1 - G)            (N T, A)       G = sigmoid(A_g), sigmoid' = G (1 - G)
    dW_g     = dA_g^T X                  (A, dim)       A_g = X W_g^T + b_g
    db_g     = sum_rows dA_g             (A,)           the same line
    dX_g     = dA_g W_g                  (N T, dim)     the same line
    dgamma_n = sum_rows dU * O_hat       (A,)           U = gamma_n O_hat + beta_n
    dbeta_n  = sum_rows dU               (A,)           the same line
    dO       = LN_A'(dU)                 (N T, A)       U = LN_A(O), through mean and variance
    dQ', dK', dV = attention'(dO)        (N, h, T, d)   O = softmax(Q' K'^T / sqrt(d) + M) V, above
    dgamma_q = sum_{N,h,T} dQ' * Q_hat   (d,)           Q' = gamma_q Q_hat + beta_q
    dbeta_q  = sum_{N,h,T} dQ'           (d,)           the same line
    dQ       = LN_d'(dQ')                (N, h, T, d)   Q' = LN_d(Q)
    dgamma_k = sum_{N,h,T} dK' * K_hat   (d,)           K' = gamma_k K_hat + beta_k
    dbeta_k  = 0 exactly                 (d,)           a shift of every score row (below)
    dK       = LN_d'(dK')                (N, h, T, d)   K' = LN_d(K)
    dQKV     = dQ, dK, dV joined         (N T, 3A)      the split into heads is a permutation
    dW_qkv   = dQKV^T X                  (3A, dim)      QKV = X W_qkv^T + b_qkv
    db_qkv   = sum_rows dQKV             (3A,)          the same line
    dX       = dQKV W_qkv + dX_g         (N T, dim)     x feeds both qkv and gate: the sum

with LN'(g) = r (g gamma - mean(g gamma) - y_hat mean(g gamma y_hat)) over the normalised
axis, r = 1 / sqrt(var + eps) (derived in ``npattn/functional/layer_norm.py``). Exact
zeros: ``k_norm.bias`` (beta_k adds Q'_i . beta_k / sqrt(d) to every score of row i, a
shift the softmax ignores), and the key third of ``qkv.bias`` without ``qk_norm`` (the
same shift); with ``qk_norm`` that key bias passes through K's normalisation, which is
not a shift, and its gradient is not zero. With d = 1 and ``qk_norm``, Q_hat = K_hat = 0
(a LayerNorm of one value), so Q' = beta_q and K' = beta_k: the query and key rows of
``qkv`` get exact zero gradients (LN' of one value is 0), and so do ``q_norm.weight`` and
``k_norm.weight`` (their gradients are sums of dQ' * Q_hat). The scores of row i are then
beta_q beta_k / sqrt(d) + M_ij: beta_q shifts the whole row (without a mask P = 1 / T), so
the gradient of ``q_norm.bias`` is zero as well, and npattn returns it exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .. import functional as F
from .._checks import float_array, positive_int, shape_is
from ..functional.attention import (
    attention,
    attention_backward,
    scaled_dot_product_attention_backward,
    scaled_dot_product_attention_forward,
)
from .base import Block, kaiming_uniform, make_rng

__all__ = ["ViTAttention", "MultiheadAttention"]


def _split_heads(a, heads):
    """(N, T, E) -> (N, h, T, d): head i owns channels i d ... (i + 1) d - 1."""
    n, t, e = a.shape
    return a.reshape(n, t, heads, e // heads).transpose(0, 2, 1, 3)


def _join_heads(a):
    """(N, h, T, d) -> (N T, E), contiguous (the inverse of _split_heads, flattened)."""
    n, h, t, d = a.shape
    return np.ascontiguousarray(a.transpose(0, 2, 1, 3)).reshape(n * t, h * d)


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
    x_shape: tuple  # (N, T, dim)
    dtype: np.dtype
    qkv: object  # LinearCache of qkv: x as (N T, dim)
    q_norm: object  # LayerNormCache of q_norm over Q (N, h, T, d), or None (no qk_norm)
    k_norm: object  # LayerNormCache of k_norm over K (N, h, T, d), or None
    att: object  # AttentionCache: Q', K', V (N, h, T, d), weights (N, h, T, T); None when T = 0
    norm: object  # LayerNormCache of norm over O (N T, A), or None (no scale_norm)
    gate_lin: object  # LinearCache of gate: x as (N T, dim), or None (not gated)
    gate: np.ndarray  # (N T, A) G = sigmoid(gate(x)), or None
    gated_in: np.ndarray  # (N T, A) U, what the gate multiplies, or None
    proj: object  # LinearCache of proj: Y as (N T, A)


class ViTAttention(Block):
    """timm's ``Attention`` (``timm.layers.attention``, used by ``vision_transformer``;
    timm 1.0.31), dropout 0. The defaults are timm's default configuration: no qk_norm,
    no scale_norm, no gate, proj_bias True.

    Parameters
    ----------
    dim : int
        Token width of the input (and of the output unless ``dim_out``).
    num_heads : int, default 8
        h; it must divide ``dim`` unless ``attn_head_dim`` is given.
    qkv_bias : bool, default False
        Whether ``qkv`` (and ``gate``) have a bias (``qkv.bias`` (3 A,), ``gate.bias`` (A,)).

    Keyword-only, timm's names and meaning:

    attn_head_dim : int or None, default None
        d, the width of each head; None: dim / num_heads. A = num_heads d channels run
        through the attention (``attn_dim``) and the scale is d ** -0.5.
    dim_out : int or None, default None
        Output width (``proj.weight`` (dim_out, A)); None: dim.
    proj_bias : bool, default True
        Whether ``proj`` has a bias.
    qk_norm : bool, default False
        A LayerNorm over each head's d channels of q and of k (``q_norm.weight``,
        ``q_norm.bias``, ``k_norm.weight``, ``k_norm.bias``, (d,) each).
    scale_norm : bool, default False
        A LayerNorm over the A channels of the joined heads, before ``proj``
        (``norm.weight``, ``norm.bias`` (A,)).
    gated : bool, default False
        An elementwise sigmoid gate sigmoid(gate(x)) (``gate.weight`` (A, dim), and
        ``gate.bias`` with ``qkv_bias``) multiplying the attention output after ``norm``
        and before ``proj``.
    norm_eps : float, default 1e-6
        eps of the LayerNorms (timm's ``LayerNorm``, which its VisionTransformer passes
        as ``norm_layer``; ``torch.nn.LayerNorm``'s default is 1e-5).
    rng : None, int or numpy.random.Generator (PyTorch's default Linear initialisation;
        LayerNorm weights 1, biases 0)
    dtype : float32 (default) or float64

    ``forward(x, training=False, attn_mask=None, is_causal=False)`` with x (N, tokens,
    dim) -> (out (N, tokens, dim_out), cache): masks as timm's (and
    ``torch.nn.functional.scaled_dot_product_attention``'s): **boolean True = may
    attend**, float added, broadcastable to (N, num_heads, tokens, tokens); ``is_causal``
    lets token i attend to tokens 0 ... i. ``backward(dout, cache) -> ((dx,), grads)``;
    exact zero gradients: ``k_norm.bias``, and ``qkv.bias[A:2A]`` (the key bias) without
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

    def _mask(self, op, attn_mask, is_causal, n, t):
        """The mask for scaled_dot_product_attention_forward (True = attend, or float
        added), or None."""
        if not isinstance(is_causal, (bool, np.bool_)):
            raise TypeError(f"{op}: is_causal must be a bool, got {is_causal!r}")
        if is_causal:
            if attn_mask is not None:
                raise ValueError(f"{op}: give attn_mask or is_causal=True, not both (timm's default path, torch's scaled_dot_product_attention, refuses the pair)")
            return np.tril(np.ones((t, t), dtype=bool))  # (T, T) key j <= query i
        if attn_mask is None:
            return None
        if not isinstance(attn_mask, np.ndarray):
            raise TypeError(f"{op}: attn_mask must be None or a numpy.ndarray, got {type(attn_mask).__name__}")
        if attn_mask.dtype != np.bool_:
            if attn_mask.dtype.kind != "f":
                raise TypeError(f"{op}: attn_mask must be boolean (True = may attend) or floating (added), got dtype {attn_mask.dtype}")
            if attn_mask.dtype != self.dtype:
                raise TypeError(f"{op}: a float attn_mask must have the block's dtype {self.dtype}, got {attn_mask.dtype}")
        scores = (n, self.num_heads, t, t)
        try:
            ok = np.broadcast_shapes(attn_mask.shape, scores) == scores
        except ValueError:
            ok = False
        if not ok:
            raise ValueError(f"{op}: attn_mask must be broadcastable to (N, num_heads, tokens, tokens) = {scores}, got shape {tuple(attn_mask.shape)}")
        return attn_mask

    def forward(self, x, training=False, attn_mask=None, is_causal=False):
        """Self-attention over the tokens of x (N, T, dim) -> (out (N, T, dim_out), cache).
        ``training`` is accepted for a uniform block API (dropout is 0: both modes compute
        the same). ``attn_mask``: boolean (True = may attend) or float (added),
        broadcastable to (N, num_heads, T, T); ``is_causal``: token i attends to 0 ... i."""
        op = "ViTAttention"
        if not isinstance(training, (bool, np.bool_)):  # timm's forward(x, attn_mask, is_causal) takes the mask second
            raise TypeError(f"{op}: training must be a bool, got {type(training).__name__}; pass a mask as attn_mask=...")
        x = _check_tokens(op, "x", x, self.dtype, self.dim, "dim", "(N, tokens, dim)")
        n, t, e = x.shape
        h, d, a = self.num_heads, self.head_dim, self.attn_dim
        mask = self._mask(op, attn_mask, is_causal, n, t)
        xf = x.reshape(n * t, e)  # (N T, dim)
        qkv, k_qkv = self._linear("qkv.", xf)  # (N T, 3A)
        q, k, v = qkv.reshape(n, t, 3, h, d).transpose(2, 0, 3, 1, 4)  # (N, h, T, d) each
        k_qn = k_kn = None
        if self.qk_norm:
            q, k_qn = self._layer_norm("q_norm.", q)  # (N, h, T, d) Q'
            k, k_kn = self._layer_norm("k_norm.", k)  # (N, h, T, d) K'
        if t:
            o, k_att = scaled_dot_product_attention_forward(q, k, v, attn_mask=mask, scale=self.scale)  # (N, h, T, d)
        else:  # no tokens: nothing to attend to, an empty output (as timm)
            o, k_att = np.zeros((n, h, 0, d), dtype=x.dtype), None
        u = _join_heads(o)  # (N T, A) O
        k_norm = None
        if self.scale_norm:
            u, k_norm = self._layer_norm("norm.", u)  # (N T, A) U
        k_gate = g = u_in = None
        if self.gated:
            a_g, k_gate = self._linear("gate.", xf)  # (N T, A)
            g = F.sigmoid(a_g)  # (N T, A) G
            u_in = u
            u = u * g  # (N T, A) Y
        out, k_proj = self._linear("proj.", u)  # (N T, dim_out)
        cache = ViTAttentionCache(x.shape, x.dtype, k_qkv, k_qn, k_kn, k_att, k_norm, k_gate, g, u_in, k_proj)
        return out.reshape(n, t, self.dim_out), cache

    def backward(self, grad_out, cache: ViTAttentionCache):
        """Returns ``((dx,), grads)``; grads keyed like the state_dict."""
        op = "ViTAttention.backward"
        dy = float_array(op, "grad_out", grad_out, 3, "(N, tokens, dim_out)")
        n, t, e = cache.x_shape
        shape_is(op, "grad_out", dy, (n, t, self.dim_out))
        if dy.dtype != cache.dtype:
            raise TypeError(f"{op}: grad_out must have the forward input's dtype {cache.dtype}, got {dy.dtype}")
        h, d, a = self.num_heads, self.head_dim, self.attn_dim
        grads = self.zero_grads()
        d_u = self._linear_backward("proj.", dy.reshape(n * t, self.dim_out), cache.proj, grads)  # (N T, A) dY
        d_x_gate = None
        if self.gated:
            g = cache.gate
            d_g = d_u * cache.gated_in  # (N T, A) dG = dY * U
            d_u = d_u * g  # (N T, A) dU = dY * G
            d_ag = d_g * g * (1 - g)  # (N T, A) through the sigmoid
            d_x_gate = self._linear_backward("gate.", d_ag, cache.gate_lin, grads)  # (N T, dim)
        if self.scale_norm:
            d_u = self._layer_norm_backward("norm.", d_u, cache.norm, grads)  # (N T, A) dO
        d_o = _split_heads(d_u.reshape(n, t, a), h)  # (N, h, T, d)
        if cache.att is not None:
            g_att = scaled_dot_product_attention_backward(d_o, cache.att)
            d_q, d_k, d_v = g_att["q"], g_att["k"], g_att["v"]  # (N, h, T, d) dQ', dK', dV
        else:
            d_q = d_k = d_v = np.zeros((n, h, 0, d), dtype=cache.dtype)
        if self.qk_norm:
            d_q = self._layer_norm_backward("q_norm.", d_q, cache.q_norm, grads)  # (N, h, T, d) dQ
            d_k = self._layer_norm_backward("k_norm.", d_k, cache.k_norm, grads)  # (N, h, T, d) dK
            grads["k_norm.bias"][...] = 0  # beta_k shifts every score row by a constant
            if d == 1:
                grads["q_norm.bias"][...] = 0  # Q' = beta_q, K' = beta_k: every score of a row equal
        d_qkv = np.stack([d_q, d_k, d_v])  # (3, N, h, T, d)
        d_qkv = d_qkv.transpose(1, 3, 0, 2, 4).reshape(n * t, 3 * a)  # (N T, 3A), qkv's layout
        d_x = self._linear_backward("qkv.", d_qkv, cache.qkv, grads)  # (N T, dim)
        if d_x_gate is not None:
            d_x = d_x + d_x_gate  # x feeds qkv and gate
        if self.qkv_bias and not self.qk_norm:
            grads["qkv.bias"][a : 2 * a] = 0  # the key bias shifts every score row by a constant
        return (d_x.reshape(n, t, e),), grads


# ================================================================= torch.nn.MultiheadAttention

@dataclass(frozen=True)
class MultiheadAttentionCache:
    query_shape: tuple  # as given: (L, N, E), or (N, L, E) with batch_first
    key_shape: tuple  # (S, N, kdim) or (N, S, kdim)
    value_shape: tuple  # (S, N, vdim) or (N, S, vdim)
    dtype: np.dtype
    proj: tuple  # LinearCache of the q, k, v projections: inputs (N L, E), (N S, kdim), (N S, vdim)
    att: object  # AttentionCache: Q (N, h, L, d), K, V (N, h, S, d), weights (N, h, L, S)
    out_proj: object  # LinearCache of out_proj: O as (N L, E)
    attn_weights: np.ndarray  # (N, L, S) weights averaged over the heads (torch's need_weights output)


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
    -> (attn_output, cache)``, ``cache.attn_weights`` (N, L, S) averaged over the heads;
    ``backward(dout, cache) -> ((d_query, d_key, d_value), grads)``.
    BOOLEAN MASKS: True = NOT allowed to attend (torch.nn.MultiheadAttention's convention,
    the opposite of ``scaled_dot_product_attention_forward``'s). With one array as
    query, key and value, its gradient is ``d_query + d_key + d_value``.
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

    def _masks(self, op, key_padding_mask, attn_mask, n, l, s):
        """The additive mask (broadcastable to (N, h, L, S)) or None."""
        total = None
        if key_padding_mask is not None:
            m = self._additive(op, "key_padding_mask", key_padding_mask, [(n, s)], "(N, S)")
            total = m.reshape(n, 1, 1, s)
        if attn_mask is not None:
            h = self.num_heads
            m = self._additive(op, "attn_mask", attn_mask, [(l, s), (n * h, l, s)], "(L, S) or (N * num_heads, L, S)")
            m = m.reshape(n, h, l, s) if m.ndim == 3 else m
            total = m if total is None else total + m  # (N, h, L, S) or (L, S)
        return total

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
        """Returns ``(attn_output, cache)``: attn_output (L, N, E), or (N, L, E) with
        ``batch_first``; ``cache.attn_weights`` (N, L, S). ``training`` is accepted for a
        uniform block API (dropout is 0: both modes compute the same)."""
        op = "MultiheadAttention"
        order = "(N, L, E)" if self.batch_first else "(L, N, E)"
        korder = "(N, S, kdim)" if self.batch_first else "(S, N, kdim)"
        vorder = "(N, S, vdim)" if self.batch_first else "(S, N, vdim)"
        query = _check_tokens(op, "query", query, self.dtype, self.embed_dim, "embed_dim", order)
        key = _check_tokens(op, "key", key, self.dtype, self.kdim, "kdim", korder)
        value = _check_tokens(op, "value", value, self.dtype, self.vdim, "vdim", vorder)
        if self.batch_first:
            xq, xk, xv = query, key, value  # (N, L, E), (N, S, kdim), (N, S, vdim)
        else:
            xq, xk, xv = (a.transpose(1, 0, 2) for a in (query, key, value))
        n, l, e = xq.shape
        s = xk.shape[1]
        if xk.shape[0] != n or xv.shape[0] != n:
            raise ValueError(f"{op}: query, key and value must have the same batch size, got query {tuple(query.shape)}, key {tuple(key.shape)}, value {tuple(value.shape)} ({order})")
        if xv.shape[1] != s:
            raise ValueError(f"{op}: value must have key's sequence length S = {s}, got value {tuple(value.shape)}, key {tuple(key.shape)}")
        if s < 1:
            raise ValueError(f"{op}: key must hold at least one position (S >= 1), got shape {tuple(key.shape)}")
        bias = self._masks(op, key_padding_mask, attn_mask, n, l, s)
        h = self.num_heads
        (wq, wk, wv), (bq, bk, bv) = self._proj_weights()
        qp, k_q = F.linear_forward(xq.reshape(n * l, e), wq, bq)  # (N L, E)
        kp, k_k = F.linear_forward(xk.reshape(n * s, self.kdim), wk, bk)  # (N S, E)
        vp, k_v = F.linear_forward(xv.reshape(n * s, self.vdim), wv, bv)  # (N S, E)
        q = _split_heads(qp.reshape(n, l, e), h)  # (N, h, L, d)
        k = _split_heads(kp.reshape(n, s, e), h)  # (N, h, S, d)
        v = _split_heads(vp.reshape(n, s, e), h)  # (N, h, S, d)
        o, k_att = attention(q, k, v, bias, 1.0 / math.sqrt(self.head_dim), empty_rows="nan")  # (N, h, L, d)
        out, k_o = self._linear("out_proj.", _join_heads(o))  # (N L, E)
        out = out.reshape(n, l, e)
        if not self.batch_first:
            out = np.ascontiguousarray(out.transpose(1, 0, 2))  # (L, N, E)
        weights = k_att.p.mean(axis=1)  # (N, L, S)
        cache = MultiheadAttentionCache(query.shape, key.shape, value.shape, query.dtype, (k_q, k_k, k_v), k_att, k_o, weights)
        return out, cache

    def backward(self, grad_out, cache: MultiheadAttentionCache):
        """Returns ``((d_query, d_key, d_value), grads)`` in the inputs' layouts; grads keyed
        like the state_dict (the key part of ``in_proj_bias`` is an exact zero)."""
        op = "MultiheadAttention.backward"
        order = "(N, L, E)" if self.batch_first else "(L, N, E)"
        dy = float_array(op, "grad_out", grad_out, 3, order)
        shape_is(op, "grad_out", dy, cache.query_shape)
        if dy.dtype != cache.dtype:
            raise TypeError(f"{op}: grad_out must have the forward input's dtype {cache.dtype}, got {dy.dtype}")
        if not self.batch_first:
            dy = dy.transpose(1, 0, 2)  # (N, L, E)
        n, l, e = dy.shape
        s = cache.att.k.shape[2]
        grads = self.zero_grads()
        d_o = self._linear_backward("out_proj.", np.ascontiguousarray(dy).reshape(n * l, e), cache.out_proj, grads)  # (N L, E)
        d_o = _split_heads(d_o.reshape(n, l, e), self.num_heads)  # (N, h, L, d)
        d_q, d_k, d_v = attention_backward(d_o, cache.att)  # (N, h, L|S|S, d)
        d_inputs, d_ws, d_bs = [], [], []
        for d, k_lin in zip((d_q, d_k, d_v), cache.proj):
            g = F.linear_backward(_join_heads(d), k_lin)  # x (N T, width), weight (E, width), bias (E,)
            d_inputs.append(g["x"])
            d_ws.append(g["weight"])
            d_bs.append(g.get("bias"))
        if self.separate_proj:
            for name, dw in zip("qkv", d_ws):
                grads[f"{name}_proj_weight"] += dw
        else:
            grads["in_proj_weight"] += np.concatenate(d_ws)  # (3E, E)
        if self.bias:
            # the key bias shifts every score row by a constant: exactly 0 (NaN where a
            # fully masked query made the backward NaN, as torch)
            d_bs[1] = np.where(np.isnan(d_bs[1]), d_bs[1], d_bs[1].dtype.type(0))
            grads["in_proj_bias"] += np.concatenate(d_bs)  # (3E,)
        d_query = d_inputs[0].reshape(n, l, e)
        d_key = d_inputs[1].reshape(n, s, self.kdim)
        d_value = d_inputs[2].reshape(n, s, self.vdim)
        if not self.batch_first:
            d_query, d_key, d_value = (np.ascontiguousarray(a.transpose(1, 0, 2)) for a in (d_query, d_key, d_value))
        return (d_query, d_key, d_value), grads


def _xavier_uniform(rng, shape, dtype):
    """torch.nn.init.xavier_uniform_ for a 2-D weight: U(-a, a), a = sqrt(6 / (fan_in + fan_out))."""
    fan_out, fan_in = shape
    bound = math.sqrt(6.0 / (fan_in + fan_out))
    return rng.uniform(-bound, bound, size=shape).astype(dtype)
