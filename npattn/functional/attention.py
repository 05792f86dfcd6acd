"""Scaled dot-product attention, as ``torch.nn.functional.scaled_dot_product_attention``
(no dropout, no ``is_causal``), with its hand-derived backward.

MASK CONVENTION OF THIS FUNCTION (the one of ``torch.nn.functional.scaled_dot_product_attention``,
whose name and arguments it carries)::

    boolean attn_mask:  True  = the query MAY attend to this key
                        False = masked out (its score becomes -inf)
    float attn_mask:    added to the scores

This is the OPPOSITE of ``torch.nn.MultiheadAttention`` (and of npattn's
``MultiheadAttention`` block), whose boolean masks mark with True the positions that are
NOT allowed. Code ported from ``nn.MultiheadAttention`` must pass ``~mask`` here.

Forward, for q (..., L, E), k (..., S, E), v (..., S, Ev), scale c (1/sqrt(E) unless
given) and the additive mask M (..., L, S) (0 / -inf for a boolean mask)::

    Z = c q k^T + M                               (..., L, S)   scores
    m = max_j Z[..., :, j]                        (..., L, 1)   row maximum
    P = exp(Z - m) / sum_j exp(Z - m)_j           (..., L, S)   softmax over the keys
    O = P v                                       (..., L, Ev)

Subtracting the row maximum keeps every exponent <= 0 (no overflow) and changes nothing
in exact arithmetic. A row whose every score is -inf (a query with every key masked)
gets P = 0 and therefore O = 0 and no gradient through it: that is what
``torch.nn.functional.scaled_dot_product_attention`` returns (torch 2.14.1 on the CPU,
float32 and float64: output 0, gradients 0; tested in tests/crosscheck).
``torch.nn.MultiheadAttention`` gives NaN there instead; npattn's ``MultiheadAttention``
block follows it (``empty_rows="nan"`` below).

Backward, for dO = dL/dO, in the order the code computes it::

    dv = P^T dO                                   (..., S, Ev)
    dP = dO v^T                                   (..., L, S)
    dZ = P * (dP - sum_j (dP * P)_j)              (..., L, S)   softmax's Jacobian diag(P) - P P^T
    dq = c dZ k                                   (..., L, E)
    dk = c dZ^T q                                 (..., S, E)

The mask is a constant (no gradient). Adding the same number to every score of a row
does not change P (sum_j dZ_j = 0 for every row), which is why a bias on the keys has a
zero gradient in the attention blocks.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np

from .._checks import float_array, same_dtype

__all__ = ["scaled_dot_product_attention_forward", "scaled_dot_product_attention_backward"]


@dataclass(frozen=True)
class AttentionCache:
    q: np.ndarray  # (..., L, E)
    k: np.ndarray  # (..., S, E)
    v: np.ndarray  # (..., S, Ev)
    p: np.ndarray  # (..., L, S) attention weights P (0 on masked keys)
    scale: float  # c


# ---------------------------------------------------------------------------- the math

def attention(q, k, v, bias, scale, empty_rows="zero"):
    """``O = softmax(c q k^T + bias) v`` without argument checks (the blocks call it).

    ``bias`` is None or a float array broadcastable to (..., L, S), -inf where masked.
    ``empty_rows``: what a row whose every score is -inf gives: ``"zero"`` (P = 0, as
    ``F.scaled_dot_product_attention``) or ``"nan"`` (0/0 = NaN, as
    ``nn.MultiheadAttention``). Returns ``(O, cache)``.
    """
    c = q.dtype.type(scale)
    z = np.matmul(q, np.swapaxes(k, -1, -2))  # (..., L, S) q k^T
    z *= c
    if bias is not None:
        z += bias  # (..., L, S) -inf on masked keys
    m = z.max(axis=-1, keepdims=True, initial=-np.inf)  # (..., L, 1); initial: no keys (S = 0) is an empty row
    empty = None
    if empty_rows == "zero":
        empty = m == -np.inf  # (..., L, 1) rows with every key masked
        if empty.any():
            m[empty] = 0  # exp(-inf - 0) = 0: the row's weights are all 0
        else:
            empty = None
    with np.errstate(invalid="ignore"):  # "nan": -inf - (-inf) = NaN, as torch
        z -= m
    np.exp(z, out=z)  # (..., L, S) exp(Z - m), each in [0, 1]
    total = z.sum(axis=-1, keepdims=True)  # (..., L, 1) >= 1 unless the row is empty
    if empty is not None:
        total[empty] = 1  # 0 / 1 = 0
    z /= total
    p = z  # (..., L, S)
    out = np.matmul(p, v)  # (..., L, Ev)
    return out, AttentionCache(q, k, v, p, float(scale))


def attention_backward(d_out, cache: AttentionCache):
    """``(dq, dk, dv)`` of :func:`attention` (the module docstring's backward)."""
    q, k, v, p = cache.q, cache.k, cache.v, cache.p
    c = q.dtype.type(cache.scale)
    d_v = np.matmul(np.swapaxes(p, -1, -2), d_out)  # (..., S, Ev)
    d_p = np.matmul(d_out, np.swapaxes(v, -1, -2))  # (..., L, S)
    dot = np.einsum("...ls,...ls->...l", d_p, p)[..., None]  # (..., L, 1) sum_j dP_j P_j
    d_p -= dot
    d_z = d_p
    d_z *= p  # (..., L, S) P * (dP - sum dP P)
    d_q = np.matmul(d_z, k)  # (..., L, E)
    d_q *= c
    d_k = np.matmul(np.swapaxes(d_z, -1, -2), q)  # (..., S, E)
    d_k *= c
    return d_q, d_k, d_v


# ---------------------------------------------------------------------------- public API

def scaled_dot_product_attention_forward(q, k, v, attn_mask=None, scale=None):
    """``softmax(scale * q k^T + mask) v``, as ``torch.nn.functional.scaled_dot_product_attention``.

    Parameters
    ----------
    q : ndarray (..., L, E), float32 or float64
    k : ndarray (..., S, E), same leading dimensions and dtype as q
    v : ndarray (..., S, Ev), same leading dimensions and dtype as q
    attn_mask : None, or an ndarray broadcastable to (..., L, S):

        - **boolean: True = ATTEND, False = masked** (torch.nn.functional's convention;
          the opposite of ``torch.nn.MultiheadAttention``'s, where True = masked);
        - floating (q's dtype): added to the scores (use -inf to mask).

    scale : None or float; None means ``1 / sqrt(E)``

    Returns
    -------
    out : ndarray (..., L, Ev)
    cache : AttentionCache (q, k, v, the weights P (..., L, S), scale)

    Notes
    -----
    The forward and backward equations are in the module docstring. A query whose every
    key is masked gets the output 0 and passes no gradient, as torch's function does
    (``torch.nn.MultiheadAttention`` gives NaN there).
    """
    op = "scaled_dot_product_attention"
    q = float_array(op, "q", q)
    k = float_array(op, "k", k)
    v = float_array(op, "v", v)
    for name, a, layout in (("q", q, "(..., L, E)"), ("k", k, "(..., S, E)"), ("v", v, "(..., S, Ev)")):
        if a.ndim < 2:
            raise ValueError(f"{op}: {name} must have at least 2 dimensions {layout}, got shape {tuple(a.shape)}")
    same_dtype(op, "q", q, k=k, v=v)
    if k.shape[:-2] != q.shape[:-2] or v.shape[:-2] != q.shape[:-2]:
        raise ValueError(
            f"{op}: q, k and v must have the same leading dimensions, got q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if k.shape[-1] != q.shape[-1]:
        raise ValueError(f"{op}: k must have q's last dimension E = {q.shape[-1]}, got shape {tuple(k.shape)}")
    if v.shape[-2] != k.shape[-2]:
        raise ValueError(f"{op}: v must have k's sequence length S = {k.shape[-2]}, got shape {tuple(v.shape)}")
    if q.shape[-1] < 1:
        raise ValueError(f"{op}: q must have an embedding dimension E >= 1, got shape {tuple(q.shape)}")
    if k.shape[-2] < 1:
        raise ValueError(f"{op}: k must have at least one key (S >= 1), got shape {tuple(k.shape)}")
    scores_shape = q.shape[:-1] + (k.shape[-2],)  # (..., L, S)
    bias = None
    if attn_mask is not None:
        bias = _additive_mask(op, attn_mask, scores_shape, q.dtype)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    elif not isinstance(scale, numbers.Real) or isinstance(scale, (bool, np.bool_)) or not math.isfinite(scale):
        raise TypeError(f"{op}: scale must be None or a finite real number, got {scale!r}")
    return attention(q, k, v, bias, float(scale), empty_rows="zero")


def scaled_dot_product_attention_backward(d_out, cache: AttentionCache):
    """Gradients of :func:`scaled_dot_product_attention_forward`: ``{"q", "k", "v"}``
    (the mask has none)."""
    op = "scaled_dot_product_attention_backward"
    d_out = float_array(op, "d_out", d_out)
    expected = cache.q.shape[:-1] + (cache.v.shape[-1],)
    if d_out.shape != expected:
        raise ValueError(f"{op}: d_out must have the output's shape {expected}, got {tuple(d_out.shape)}")
    if d_out.dtype != cache.q.dtype:
        raise TypeError(f"{op}: d_out must have the forward's dtype {cache.q.dtype}, got {d_out.dtype}")
    d_q, d_k, d_v = attention_backward(d_out, cache)
    return {"q": d_q, "k": d_k, "v": d_v}


def _additive_mask(op, mask, shape, dtype):
    """The float mask to add to the scores for F.scaled_dot_product_attention's
    convention (boolean True = attend), checked against the scores' ``shape``."""
    if not isinstance(mask, np.ndarray):
        raise TypeError(f"{op}: attn_mask must be None or a numpy.ndarray, got {type(mask).__name__}")
    _check_broadcast(op, "attn_mask", mask, shape, "(..., L, S)")
    if mask.dtype == np.bool_:
        return np.where(mask, dtype.type(0), dtype.type(-np.inf))  # True = attend
    if mask.dtype.kind != "f":
        raise TypeError(f"{op}: attn_mask must be boolean (True = attend) or floating (added), got dtype {mask.dtype}")
    if mask.dtype != dtype:
        raise TypeError(f"{op}: a float attn_mask must have the dtype of q ({dtype}), got {mask.dtype}")
    return mask


def _check_broadcast(op, name, mask, shape, layout):
    try:
        ok = np.broadcast_shapes(mask.shape, shape) == tuple(shape)
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(f"{op}: {name} must be broadcastable to the scores' shape {layout} = {tuple(shape)}, got shape {tuple(mask.shape)}")
