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
``qkv_bias=True``), the output projection ``proj.weight``, ``proj.bias``, and no mask.
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
    att: object  # AttentionCache: Q, K, V (N, h, T, d), weights (N, h, T, T)
    proj: object  # LinearCache of proj: O as (N T, dim)


class ViTAttention(Block):
    """timm's ``vision_transformer.Attention`` (timm 1.0.31, its default configuration:
    no qk_norm, no scale_norm, no gate, dropout 0, proj_bias True).

    Parameters
    ----------
    dim : int
        Token width; ``num_heads`` must divide it (head width d = dim / num_heads).
    num_heads : int, default 8
    qkv_bias : bool, default False
        Whether ``qkv`` has a bias (``qkv.bias`` (3 dim,)).
    rng : None, int or numpy.random.Generator (PyTorch's default Linear initialisation)
    dtype : float32 (default) or float64

    ``forward(x, training=False)`` with x (N, tokens, dim) -> (out (N, tokens, dim), cache);
    ``backward(dout, cache) -> ((dx,), grads)``; ``qkv.bias[dim:2 dim]`` (the key bias) has
    an exact zero gradient. The math is in the module docstring.
    """

    def __init__(self, dim, num_heads=8, qkv_bias=False, *, rng=None, dtype=np.float32):
        super().__init__(dtype)
        op = "ViTAttention"
        self.dim = positive_int(op, "dim", dim)
        self.num_heads = positive_int(op, "num_heads", num_heads)
        if self.dim % self.num_heads:
            raise ValueError(f"{op}: num_heads must divide dim, got dim={self.dim}, num_heads={self.num_heads}")
        if not isinstance(qkv_bias, (bool, np.bool_)):
            raise TypeError(f"{op}: qkv_bias must be a bool, got {qkv_bias!r}")
        self.qkv_bias = bool(qkv_bias)
        self.head_dim = self.dim // self.num_heads
        self.scale = self.head_dim ** -0.5
        rng = make_rng(rng)
        self._add_linear("qkv.", rng, self.dim, 3 * self.dim, bias=self.qkv_bias)
        self._add_linear("proj.", rng, self.dim, self.dim, bias=True)

    def forward(self, x, training=False):
        """Self-attention over the tokens of x (N, T, dim). ``training`` is accepted for a
        uniform block API (dropout is 0: both modes compute the same)."""
        op = "ViTAttention"
        x = _check_tokens(op, "x", x, self.dtype, self.dim, "dim", "(N, tokens, dim)")
        n, t, e = x.shape
        h, d = self.num_heads, self.head_dim
        qkv, k_qkv = self._linear("qkv.", x.reshape(n * t, e))  # (N T, 3 dim)
        qkv = qkv.reshape(n, t, 3, h, d).transpose(2, 0, 3, 1, 4)  # (3, N, h, T, d)
        o, k_att = attention(qkv[0], qkv[1], qkv[2], None, self.scale)  # (N, h, T, d)
        out, k_proj = self._linear("proj.", _join_heads(o))  # (N T, dim)
        return out.reshape(n, t, e), ViTAttentionCache(x.shape, x.dtype, k_qkv, k_att, k_proj)

    def backward(self, grad_out, cache: ViTAttentionCache):
        """Returns ``((dx,), grads)``; grads keyed like the state_dict."""
        op = "ViTAttention.backward"
        dy = float_array(op, "grad_out", grad_out, 3, "(N, tokens, dim)")
        shape_is(op, "grad_out", dy, cache.x_shape)
        if dy.dtype != cache.dtype:
            raise TypeError(f"{op}: grad_out must have the forward input's dtype {cache.dtype}, got {dy.dtype}")
        n, t, e = cache.x_shape
        grads = self.zero_grads()
        d_o = self._linear_backward("proj.", dy.reshape(n * t, e), cache.proj, grads)  # (N T, dim)
        d_o = _split_heads(d_o.reshape(n, t, e), self.num_heads)  # (N, h, T, d)
        d_q, d_k, d_v = attention_backward(d_o, cache.att)  # (N, h, T, d) each
        d_qkv = np.stack([d_q, d_k, d_v])  # (3, N, h, T, d)
        d_qkv = d_qkv.transpose(1, 3, 0, 2, 4).reshape(n * t, 3 * e)  # (N T, 3 dim), qkv's layout
        d_x = self._linear_backward("qkv.", d_qkv, cache.qkv, grads)  # (N T, dim)
        if self.qkv_bias:
            grads["qkv.bias"][e : 2 * e] = 0  # the key bias shifts every score row by a constant
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
