"""Scaled dot-product attention, as ``torch.nn.functional.scaled_dot_product_attention``,
and the variants attention kernels are validated against (causal masks with either
diagonal, sliding windows, ALiBi, softcap, grouped-query heads, the log-sum-exp, given
dropout masks, packed batches of variable-length sequences), with the hand-derived
backward. Every variant goes through one masking pipeline, in one fixed order.

MASK CONVENTION OF THIS FUNCTION (the one of ``torch.nn.functional.scaled_dot_product_attention``,
whose name and arguments it carries)::

    boolean attn_mask:  True  = the query MAY attend to this key
                        False = masked out (its score becomes -inf)
    float attn_mask:    added to the scores

This is the OPPOSITE of ``torch.nn.MultiheadAttention`` (and of npattn's
``MultiheadAttention`` block), whose boolean masks mark with True the positions that are
NOT allowed. Code ported from ``nn.MultiheadAttention`` must pass ``~mask`` here.

THE DIAGONAL. With L queries and Lk keys, query i's diagonal key is::

    diag_i = i                alignment="top_left"      torch's is_causal
    diag_i = i + Lk - L       alignment="bottom_right"  flash-attn >= 2.1, torch's causal_lower_right

``is_causal`` masks the keys j > diag_i. ``window=(left, right)`` masks the keys j < diag_i - left
and j > diag_i + right; -1 leaves that side unbounded (flash-attn's ``window_size``). ALiBi's
distance is |diag_i - j|. With L = Lk both alignments are the same; with L > Lk and
``bottom_right`` the first L - Lk queries of a causal mask have no key at all.

Forward, for q (..., Hq, L, E), k (..., Hk, Lk, E), v (..., Hk, Lk, Ev), scale c (1/sqrt(E)
unless given). Query head h reads key/value head g(h) = h // (Hq / Hk) with
``enable_gqa`` (torch's rule), g(h) = h otherwise (then Hq = Hk and any leading
dimensions are allowed, the head axis included or not)::

    S0 = c q k^T                                  (..., Hq, L, Lk)  1. logits, k of head g(h)
    Tc = tanh(S0 / cap),  S1 = cap Tc             (..., Hq, L, Lk)  2. softcap cap (S1 = S0 without)
    S2 = S1 + mask                                (..., Hq, L, Lk)  3. float attn_mask
    S3 = S2 - a_h |diag_i - j|                    (..., Hq, L, Lk)  4. ALiBi slope a_h (per head, or per batch and head)
    S  = S3 where allowed, -inf elsewhere         (..., Hq, L, Lk)  5. allowed = boolean attn_mask & causal & window
    m  = max_j S                                  (..., Hq, L, 1)   row maximum (0 for a row of -inf)
    lse = m + log sum_j exp(S - m)                (..., Hq, L)      log-sum-exp of the logits
    P  = exp(S - m) / sum_j exp(S - m)            (..., Hq, L, Lk)  6. softmax over the keys
    Pd = P keep / (1 - p)                         (..., Hq, L, Lk)  7. boolean keep mask, dropout_p p (Pd = P without)
    O  = Pd v                                     (..., Hq, L, Ev)  v of head g(h)

Subtracting the row maximum keeps every exponent <= 0 (no overflow) and changes nothing
in exact arithmetic. A row whose every logit is -inf (a query with every key masked) gets
lse = -inf, P = 0, therefore O = 0 and no gradient through it: that is what
``torch.nn.functional.scaled_dot_product_attention`` returns (torch 2.14.1 on the CPU,
float32 and float64: output 0, gradients 0; tested in tests/crosscheck).
``torch.nn.MultiheadAttention`` gives NaN there instead; npattn's ``MultiheadAttention``
block follows it (:func:`attention`, with ``empty_rows="nan"``).

Backward, for dO = dL/dO and, when given, dlse = dL/dlse, in the order the code computes
it (each line with the rule it comes from)::

    dv  = sum_{h: g(h) = g} Pd_h^T dO_h           (..., Hk, Lk, Ev)  O = Pd v is linear in v; the heads sharing v add up
    dPd = dO v^T                                  (..., Hq, L, Lk)  the same product, differentiated in Pd
    dP  = dPd keep / (1 - p)                      (..., Hq, L, Lk)  Pd is P times a constant
    dS  = P * (dP - sum_j (dP * P)_j)             (..., Hq, L, Lk)  softmax's Jacobian diag(P) - P P^T
          + P * dlse                                                d lse / dS_j = exp(S_j - lse) = P_j
    dS3 = dS2 = dS1 = dS                                            5.-3.: steps 3 and 4 add constants; a masked
                                                                    logit is the constant -inf, and P = 0 there,
                                                                    so dS is exactly 0 on it
    dS0 = dS1 * (1 - Tc^2)                        (..., Hq, L, Lk)  d(cap tanh(s / cap)) / ds = 1 - tanh^2 (dS0 = dS1 without softcap)
    dq  = c dS0 k                                 (..., Hq, L, E)   S0 = c q k^T, differentiated in q
    dk  = c sum_{h: g(h) = g} dS0_h^T q_h         (..., Hk, Lk, E)  ... in k; the heads sharing k add up
    dM  = dS2 summed over M's broadcast axes      M's shape          a float attn_mask M is added in step 3 (as torch)

The boolean masks, ALiBi slopes, softcap and keep mask are constants (no gradient). Adding the
same number to every logit of a row does not change P (sum_j dS_j = 0 for every row when
dlse is 0), which is why a bias on the keys has a zero gradient in the attention blocks.
An empty row has P = 0, so its dS, and its share of dq, dk and dv, is exactly 0.

Packed batches (:func:`varlen_attention_forward`, flash-attn's varlen layout): q
(total_q, Hq, E), k (total_k, Hk, E), v (total_k, Hk, Ev); sequence b holds the query rows
cu_seqlens_q[b]:cu_seqlens_q[b + 1] and the key rows cu_seqlens_k[b]:cu_seqlens_k[b + 1]
and is the pipeline above on its own (L_b, Lk_b), with its own diagonal; lse has shape
(Hq, total_q). A sequence with no keys has lse = -inf and output 0; one with no queries
contributes nothing.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass

import numpy as np

from .._checks import float_array, positive_int, same_dtype, upstream

__all__ = [
    "ALIGNMENTS", "alibi_distance", "position_mask", "scaled_dot_product_attention_backward",
    "scaled_dot_product_attention_forward", "varlen_attention_backward", "varlen_attention_forward",
]

ALIGNMENTS = ("top_left", "bottom_right")


@dataclass(frozen=True)
class AttentionCache:
    Q: np.ndarray  # (..., L, E) the queries the logits were computed from
    K: np.ndarray  # (..., Lk, E)
    V: np.ndarray  # (..., Lk, Ev)
    P: np.ndarray  # (..., L, Lk) the attention weights (0 on masked keys)
    scale: float  # c


# ---------------------------------------------------------------------------- the math

def attention(Q, K, V, mask, scale, empty_rows="zero"):
    """``O = softmax(c Q K^T + mask) V`` without argument checks: the attention of the
    blocks (``MultiheadAttention``, ``ViTAttention``, ``NonLocalAttn``). Its local names
    are the blocks' derivation symbols (S the logits, P the weights, O the output), which
    ``npattn explain`` reads in this function's frame.

    ``mask``: None, a boolean array (True = may attend; False: the logit becomes -inf) or a
    float one added to the logits (-inf where masked), broadcastable to (..., L, Lk).
    ``empty_rows``: what a query whose every logit is -inf gets: ``"zero"`` (P = 0, as
    ``F.scaled_dot_product_attention``) or ``"nan"`` (0/0 = NaN, as
    ``nn.MultiheadAttention``). Returns ``(O, AttentionCache)``.
    """
    c = Q.dtype.type(scale)
    S = np.matmul(Q, np.swapaxes(K, -1, -2))  # (..., L, Lk) Q K^T
    S *= c
    if mask is not None:
        S = np.where(mask, S, c.dtype.type(-np.inf)) if mask.dtype == np.bool_ else S + mask  # (..., L, Lk)
    row_max = S.max(axis=-1, keepdims=True, initial=-np.inf)  # (..., L, 1); initial: Lk = 0 is an empty row
    if empty_rows == "zero":
        empty = row_max == -np.inf  # (..., L, 1) queries with no key
        row_max = np.where(empty, c.dtype.type(0), row_max)  # exp(-inf - 0) = 0: the row's weights are all 0
        with np.errstate(invalid="ignore"):  # a non-finite input gives NaN, without a warning
            e = np.exp(S - row_max)  # (..., L, Lk) exp(S - max), each in [0, 1]
        total = np.where(empty, c.dtype.type(1), e.sum(axis=-1, keepdims=True))  # 0 / 1 = 0 on an empty row
    else:
        with np.errstate(invalid="ignore"):  # -inf - (-inf) = NaN on an empty row, as torch
            e = np.exp(S - row_max)
        total = e.sum(axis=-1, keepdims=True)  # (..., L, 1)
    P = e / total  # (..., L, Lk) softmax over the keys
    O = np.matmul(P, V)  # (..., L, Ev)
    return O, AttentionCache(Q, K, V, P, float(scale))


def attention_backward(dO, cache: AttentionCache):
    """``(dQ, dK, dV)`` of :func:`attention` (the module docstring's backward without
    softcap, dropout and dlse; the derivations' dV, dP, dS, dQ, dK)."""
    Q, K, V, P = cache.Q, cache.K, cache.V, cache.P
    c = Q.dtype.type(cache.scale)
    dV = np.matmul(np.swapaxes(P, -1, -2), dO)  # (..., Lk, Ev) P^T dO
    dP = np.matmul(dO, np.swapaxes(V, -1, -2))  # (..., L, Lk) dO V^T
    rowsum = np.einsum("...ls,...ls->...l", dP, P)[..., None]  # (..., L, 1) sum_j dP_j P_j
    dS = (dP - rowsum) * P  # (..., L, Lk) P * (dP - rowsum(dP * P))
    dQ = np.matmul(dS, K)  # (..., L, E)
    dQ *= c
    dK = np.matmul(np.swapaxes(dS, -1, -2), Q)  # (..., Lk, E)
    dK *= c
    return dQ, dK, dV


# ---------------------------------------------------------------------------- positions

def _check_positions(op, is_causal, alignment, window):
    """``(is_causal, alignment, window)`` checked; window as a tuple of two ints or None."""
    if not isinstance(is_causal, (bool, np.bool_)):
        raise TypeError(f"{op}: is_causal must be a bool, got {is_causal!r}")
    if not isinstance(alignment, str) or alignment not in ALIGNMENTS:
        raise ValueError(f"{op}: alignment must be one of {ALIGNMENTS}, got {alignment!r}")
    if window is not None:
        ok = isinstance(window, (tuple, list)) and len(window) == 2 and all(
            isinstance(w, numbers.Integral) and not isinstance(w, (bool, np.bool_)) for w in window)
        if not ok:
            raise TypeError(f"{op}: window must be None or a pair of ints (left, right), got {window!r}")
        if window[0] < -1 or window[1] < -1:
            raise ValueError(f"{op}: window sides must be >= 0, or -1 for unbounded, got {tuple(window)!r}")
        window = (int(window[0]), int(window[1]))
    return bool(is_causal), alignment, window


def _diagonal(L, S, alignment):
    """(L,) the diagonal key diag_i of every query (the module docstring)."""
    return np.arange(L) + (S - L if alignment == "bottom_right" else 0)


def position_mask(L, S, *, is_causal=False, alignment="top_left", window=None):
    """The (L, S) boolean mask (True = may attend) that ``is_causal`` and ``window`` give
    for ``L`` queries and ``S`` keys with the diagonal of ``alignment``; all True when
    neither is set. This is the mask the attention functions apply (step 5)."""
    op = "position_mask"
    L = positive_int(op, "L", L, 0)
    S = positive_int(op, "S", S, 0)
    is_causal, alignment, window = _check_positions(op, is_causal, alignment, window)
    return _position_mask(L, S, is_causal, alignment, window)


def _position_mask(L, S, is_causal, alignment, window):
    diag = _diagonal(L, S, alignment)[:, None]  # (L, 1)
    j = np.arange(S)[None, :]  # (1, S)
    allowed = np.ones((L, S), dtype=bool)
    if is_causal:
        allowed &= j <= diag
    if window is not None:
        left, right = window
        if left >= 0:
            allowed &= j >= diag - left
        if right >= 0:
            allowed &= j <= diag + right
    return allowed


def alibi_distance(L, S, *, alignment="top_left"):
    """The (L, S) integer distances |diag_i - j| that ALiBi multiplies by each head's slope
    (step 4), for the diagonal of ``alignment``."""
    op = "alibi_distance"
    L = positive_int(op, "L", L, 0)
    S = positive_int(op, "S", S, 0)
    _, alignment, _ = _check_positions(op, False, alignment, None)
    return np.abs(_diagonal(L, S, alignment)[:, None] - np.arange(S)[None, :])


# ---------------------------------------------------------------------------- the pipeline

@dataclass(frozen=True)
class SDPACache:
    q: np.ndarray  # (..., Hq, L, E)
    k: np.ndarray  # (..., Hk, S, E)
    v: np.ndarray  # (..., Hk, S, Ev)
    p: np.ndarray  # (..., Hq, L, S) softmax P before dropout (0 on masked keys)
    lse: np.ndarray  # (..., Hq, L) log-sum-exp of the logits S (-inf for a query with no key)
    scale: float  # c
    groups: int  # Hq / Hk, the query heads per key/value head (1 without enable_gqa)
    tanh: np.ndarray | None  # (..., Hq, L, S) T = tanh(S0 / cap); None without softcap
    keep: np.ndarray | None  # broadcastable to P: K / (1 - p); None without a dropout mask
    mask_shape: tuple | None = None  # the shape of a float attn_mask (it gets a gradient); None otherwise


def _grouped(a, groups):
    """(..., H, X, Y) -> (..., H / groups, groups, X, Y), the query heads of each key head."""
    return a.reshape(a.shape[:-3] + (a.shape[-3] // groups, groups) + a.shape[-2:])


def _shared(a, groups):
    """k or v (..., Hk, S, Y) as (..., Hk, 1, S, Y) against :func:`_grouped` queries."""
    return a[..., None, :, :] if groups > 1 else a


def _sdpa(q, k, v, scale, groups, softcap, add, allowed, keep):
    """The forward of the module docstring without checks. ``add``: None or a float array
    broadcastable to the scores (steps 3 and 4); ``allowed``: None or a boolean one (step 5);
    ``keep``: None or K / (1 - p) broadcastable to the scores (step 7)."""
    dt = q.dtype.type
    c = dt(scale)
    qg = _grouped(q, groups) if groups > 1 else q  # (..., Hk, G, L, E)
    s = np.matmul(qg, np.swapaxes(_shared(k, groups), -1, -2))  # (..., Hk, G, L, S) q k^T
    s = s.reshape(q.shape[:-1] + (k.shape[-2],))  # (..., Hq, L, S)
    s *= c  # S0
    t = None
    if softcap is not None:
        cap = dt(softcap)
        t = np.tanh(s / cap)  # (..., Hq, L, S) T
        s = cap * t  # S1
    if add is not None:
        s = s + add  # S2, S3 (a new array: add may broadcast to a larger shape)
    if allowed is not None:
        s = np.where(allowed, s, dt(-np.inf))  # S
    m = s.max(axis=-1, keepdims=True, initial=-np.inf)  # (..., Hq, L, 1); initial: S = 0 is an empty row
    empty = m == -np.inf  # (..., Hq, L, 1) queries with no key
    m = np.where(empty, dt(0), m)  # exp(-inf - 0) = 0: an empty row's weights are all 0
    e = np.exp(s - m)  # (..., Hq, L, S) exp(S - m), each in [0, 1]
    total = e.sum(axis=-1, keepdims=True)  # (..., Hq, L, 1) >= 1 unless the row is empty
    with np.errstate(divide="ignore"):  # log 0 = -inf: an empty row's lse
        lse = (m + np.log(total))[..., 0]  # (..., Hq, L)
    total = np.where(empty, dt(1), total)  # 0 / 1 = 0
    p = e / total  # (..., Hq, L, S) P
    pd = p if keep is None else p * keep  # (..., Hq, L, S) Pd
    pg = _grouped(pd, groups) if groups > 1 else pd
    out = np.matmul(pg, _shared(v, groups))  # (..., Hk, G, L, Ev)
    out = out.reshape(q.shape[:-1] + (v.shape[-1],))  # (..., Hq, L, Ev)
    return out, SDPACache(q, k, v, p, lse, float(scale), groups, t, keep)


def _sdpa_backward(d_out, d_lse, cache: SDPACache, with_ds=False):
    """``(dq, dk, dv)`` of :func:`_sdpa` (the module docstring's backward); with ``with_ds``
    also dS, the gradient of the final logits, (..., Hq, L, S)."""
    q, k, v, p, g = cache.q, cache.k, cache.v, cache.p, cache.groups
    c = q.dtype.type(cache.scale)
    keep = cache.keep
    pd = p if keep is None else p * keep  # (..., Hq, L, S)
    if g > 1:
        d_og = _grouped(d_out, g)  # (..., Hk, G, L, Ev)
        d_v = np.matmul(np.swapaxes(_grouped(pd, g), -1, -2), d_og).sum(axis=-3)  # (..., Hk, S, Ev)
        d_pd = np.matmul(d_og, np.swapaxes(v[..., None, :, :], -1, -2)).reshape(p.shape)  # (..., Hq, L, S)
    else:
        d_v = np.matmul(np.swapaxes(pd, -1, -2), d_out)  # (..., S, Ev)
        d_pd = np.matmul(d_out, np.swapaxes(v, -1, -2))  # (..., L, S)
    d_p = d_pd if keep is None else d_pd * keep  # (..., Hq, L, S)
    dot = np.einsum("...ls,...ls->...l", d_p, p)[..., None]  # (..., Hq, L, 1) sum_j dP_j P_j
    d_z = (d_p - dot) * p  # (..., Hq, L, S) P * (dP - sum dP P)
    if d_lse is not None:
        d_lse = np.where(np.isneginf(cache.lse), 0, d_lse)  # (..., Hq, L) a query with no key: P = 0, no gradient
        d_z += p * d_lse[..., None]  # d lse / dS = P
    d_s = d_z  # (..., Hq, L, S) dS1 (steps 3 to 5 add constants)
    if cache.tanh is not None:
        d_s = d_s * (1 - cache.tanh * cache.tanh)  # dS0
    if g > 1:
        d_sg = _grouped(d_s, g)  # (..., Hk, G, L, S)
        d_q = np.matmul(d_sg, k[..., None, :, :]).reshape(q.shape)  # (..., Hq, L, E)
        d_k = np.matmul(np.swapaxes(d_sg, -1, -2), _grouped(q, g)).sum(axis=-3)  # (..., Hk, S, E)
    else:
        d_q = np.matmul(d_s, k)  # (..., L, E)
        d_k = np.matmul(np.swapaxes(d_s, -1, -2), q)  # (..., S, E)
    d_q *= c
    d_k *= c
    if with_ds:
        return d_q, d_k, d_v, d_z
    return d_q, d_k, d_v


def _sum_to(a, shape):
    """``a`` summed over the axes that broadcasting ``shape`` to ``a.shape`` added or
    stretched: the gradient of an array that entered the forward broadcast."""
    lead = a.ndim - len(shape)
    a = a.sum(axis=tuple(range(lead))) if lead else a
    axes = tuple(i for i, n in enumerate(shape) if n == 1 and a.shape[i] != 1)
    return a.sum(axis=axes, keepdims=True) if axes else a


# ---------------------------------------------------------------------------- argument checks

def _check_real(op, name, value, *, positive=False):
    if not isinstance(value, numbers.Real) or isinstance(value, (bool, np.bool_)) or not math.isfinite(value):
        raise TypeError(f"{op}: {name} must be None or a finite real number, got {value!r}")
    if positive and not value > 0:
        raise ValueError(f"{op}: {name} must be > 0 (None turns it off), got {value!r}")
    return float(value)


def _check_scale(op, scale, e):
    if scale is None:
        return 1.0 / math.sqrt(e)
    return _check_real(op, "scale", scale)


def _check_dropout(op, dropout_mask, dropout_p, shape, layout, dtype):
    """K / (1 - p) (broadcastable to ``shape``) or None."""
    if not isinstance(dropout_p, numbers.Real) or isinstance(dropout_p, (bool, np.bool_)) or not 0 <= dropout_p < 1:
        raise ValueError(f"{op}: dropout_p must be a real number in [0, 1), got {dropout_p!r}")
    if dropout_mask is None:
        if dropout_p != 0:
            raise ValueError(f"{op}: dropout_p = {dropout_p!r} needs the keep mask dropout_mask (npattn draws no random numbers), got None")
        return None
    if not isinstance(dropout_mask, np.ndarray) or dropout_mask.dtype != np.bool_:
        got = dropout_mask.dtype if isinstance(dropout_mask, np.ndarray) else type(dropout_mask).__name__
        raise TypeError(f"{op}: dropout_mask must be None or a boolean numpy.ndarray (True = keep), got {got}")
    _check_broadcast(op, "dropout_mask", dropout_mask, shape, layout)
    return np.where(dropout_mask, dtype.type(1.0 / (1.0 - float(dropout_p))), dtype.type(0))


def _check_slopes(op, alibi_slopes, q_shape, dtype, batch_name="N"):
    """The slopes as an array broadcastable to (..., Hq, 1, 1), or None. ``q_shape`` is
    (N, Hq, L, E) for the dense function (slopes (Hq,) need only the head axis)."""
    if alibi_slopes is None:
        return None
    if not isinstance(alibi_slopes, np.ndarray):
        raise TypeError(f"{op}: alibi_slopes must be None or a numpy.ndarray, got {type(alibi_slopes).__name__}")
    if alibi_slopes.dtype != dtype:
        raise TypeError(f"{op}: alibi_slopes must have the dtype of q ({dtype}), got {alibi_slopes.dtype}")
    hq = q_shape[-3] if len(q_shape) >= 3 else None
    if hq is None:
        raise ValueError(f"{op}: alibi_slopes needs a head axis: q must be (..., Hq, L, E), got shape {tuple(q_shape)}")
    ok = alibi_slopes.shape == (hq,) or (len(q_shape) == 4 and alibi_slopes.shape == (q_shape[0], hq))
    if not ok:
        want = f"({hq},)" + (f" or ({q_shape[0]}, {hq})" if len(q_shape) == 4 else "")
        raise ValueError(f"{op}: alibi_slopes must have shape (Hq,) or ({batch_name}, Hq) = {want}, got {tuple(alibi_slopes.shape)}")
    return alibi_slopes[..., None, None]  # (Hq, 1, 1) or (N, Hq, 1, 1)


def _split_mask(op, attn_mask, shape, layout, dtype):
    """(float mask to add, boolean allowed), either None, for attn_mask."""
    if attn_mask is None:
        return None, None
    if not isinstance(attn_mask, np.ndarray):
        raise TypeError(f"{op}: attn_mask must be None or a numpy.ndarray, got {type(attn_mask).__name__}")
    _check_broadcast(op, "attn_mask", attn_mask, shape, layout)
    if attn_mask.dtype == np.bool_:
        return None, attn_mask  # True = attend
    if attn_mask.dtype.kind != "f":
        raise TypeError(f"{op}: attn_mask must be boolean (True = attend) or floating (added), got dtype {attn_mask.dtype}")
    if attn_mask.dtype != dtype:
        raise TypeError(f"{op}: a float attn_mask must have the dtype of q ({dtype}), got {attn_mask.dtype}")
    return attn_mask, None


def _gqa_groups(op, q, k, v, enable_gqa, layout_q, layout_k, layout_v):
    """Hq / Hk after checking the leading dimensions of q, k and v."""
    if not isinstance(enable_gqa, (bool, np.bool_)):
        raise TypeError(f"{op}: enable_gqa must be a bool, got {enable_gqa!r}")
    if not enable_gqa:
        if k.shape[:-2] != q.shape[:-2] or v.shape[:-2] != q.shape[:-2]:
            raise ValueError(
                f"{op}: q, k and v must have the same leading dimensions (enable_gqa=False), got q {tuple(q.shape)}, "
                f"k {tuple(k.shape)}, v {tuple(v.shape)}"
            )
        return 1
    for name, a, layout in (("q", q, layout_q), ("k", k, layout_k), ("v", v, layout_v)):
        if a.ndim < 3:
            raise ValueError(f"{op}: with enable_gqa, {name} must have a head axis {layout}, got shape {tuple(a.shape)}")
    if k.shape[:-3] != q.shape[:-3] or v.shape[:-2] != k.shape[:-2]:
        raise ValueError(
            f"{op}: q, k and v must have the same dimensions before the head axis, and k and v the same heads, "
            f"got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    hq, hk = q.shape[-3], k.shape[-3]
    if hk == 0:
        if hq != 0:
            raise ValueError(f"{op}: k has no head (Hk = 0) for Hq = {hq} query heads, got k {tuple(k.shape)}")
        return 1
    if hq % hk:
        raise ValueError(f"{op}: with enable_gqa, the query heads Hq = {hq} must be a multiple of the key/value heads Hk = {hk}")
    return hq // hk


# ---------------------------------------------------------------------------- public API

def scaled_dot_product_attention_forward(q, k, v, attn_mask=None, scale=None, *, is_causal=False, alignment="top_left",
                                         window=None, alibi_slopes=None, softcap=None, enable_gqa=False,
                                         dropout_mask=None, dropout_p=0.0):
    """``softmax(scale * q k^T + mask) v``, as ``torch.nn.functional.scaled_dot_product_attention``,
    with the variants of attention kernels (one pipeline, the module docstring's order).

    Parameters
    ----------
    q : ndarray (..., Hq, L, E), float32 or float64
    k : ndarray (..., Hk, S, E), same dtype as q; Hk = Hq (any leading dimensions) unless
        ``enable_gqa``
    v : ndarray (..., Hk, S, Ev), same leading dimensions and dtype as k
    attn_mask : None, or an ndarray broadcastable to (..., Hq, L, S):

        - **boolean: True = ATTEND, False = masked** (torch.nn.functional's convention;
          the opposite of ``torch.nn.MultiheadAttention``'s, where True = masked);
        - floating (q's dtype): added to the scores (use -inf to mask).

    scale : None or float; None means ``1 / sqrt(E)``
    is_causal : bool; masks the keys after each query's diagonal key
    alignment : "top_left" (query i's diagonal is key i, torch's ``is_causal``) or
        "bottom_right" (key i + S - L: flash-attn >= 2.1, torch's ``causal_lower_right``);
        for ``is_causal``, ``window`` and ALiBi
    window : None or (left, right): masks the keys more than ``left`` before or ``right``
        after the diagonal; -1 leaves that side unbounded (flash-attn's ``window_size``)
    alibi_slopes : None or an ndarray (Hq,) or (N, Hq) (q of 4 dimensions), q's dtype:
        adds ``-slope_h * |diagonal - j|``
    softcap : None or a float cap > 0: the scores become ``cap * tanh(scores / cap)``
        before the masks (Gemma 2)
    enable_gqa : bool; query head h uses key/value head ``h // (Hq / Hk)`` (torch's rule)
    dropout_mask : None or a boolean ndarray broadcastable to (..., Hq, L, S), True = keep
    dropout_p : the dropout probability the kept weights are divided by (1 - dropout_p)
        for; nonzero only with a ``dropout_mask``

    Returns
    -------
    out : ndarray (..., Hq, L, Ev)
    cache : SDPACache (q, k, v, the weights P (..., Hq, L, S), lse (..., Hq, L), ...);
        ``cache.lse`` is the log-sum-exp of the final logits, -inf for a query with no key

    Notes
    -----
    The forward and backward equations are in the module docstring. A query whose every
    key is masked gets the output 0, lse = -inf and passes no gradient, as torch's
    function does (``torch.nn.MultiheadAttention`` gives NaN there).
    """
    op = "scaled_dot_product_attention"
    q = float_array(op, "q", q)
    k = float_array(op, "k", k)
    v = float_array(op, "v", v)
    for name, a, layout in (("q", q, "(..., L, E)"), ("k", k, "(..., S, E)"), ("v", v, "(..., S, Ev)")):
        if a.ndim < 2:
            raise ValueError(f"{op}: {name} must have at least 2 dimensions {layout}, got shape {tuple(a.shape)}")
    same_dtype(op, "q", q, k=k, v=v)
    groups = _gqa_groups(op, q, k, v, enable_gqa, "(..., Hq, L, E)", "(..., Hk, S, E)", "(..., Hk, S, Ev)")
    if k.shape[-1] != q.shape[-1]:
        raise ValueError(f"{op}: k must have q's last dimension E = {q.shape[-1]}, got shape {tuple(k.shape)}")
    if v.shape[-2] != k.shape[-2]:
        raise ValueError(f"{op}: v must have k's sequence length S = {k.shape[-2]}, got shape {tuple(v.shape)}")
    if q.shape[-1] < 1:
        raise ValueError(f"{op}: q must have an embedding dimension E >= 1, got shape {tuple(q.shape)}")
    if k.shape[-2] < 1:
        raise ValueError(f"{op}: k must have at least one key (S >= 1), got shape {tuple(k.shape)}")
    L, S = q.shape[-2], k.shape[-2]
    scores_shape = q.shape[:-1] + (S,)  # (..., Hq, L, S)
    add, allowed = _split_mask(op, attn_mask, scores_shape, "(..., L, S)", q.dtype)
    mask_shape = None if add is None else tuple(np.shape(attn_mask))  # a float mask: it gets a gradient
    scale = _check_scale(op, scale, q.shape[-1])
    is_causal, alignment, window = _check_positions(op, is_causal, alignment, window)
    slopes = _check_slopes(op, alibi_slopes, q.shape, q.dtype)
    if softcap is not None:
        softcap = _check_real(op, "softcap", softcap, positive=True)
    keep = _check_dropout(op, dropout_mask, dropout_p, scores_shape, "(..., L, S)", q.dtype)
    if slopes is not None:
        alibi = -slopes * alibi_distance(L, S, alignment=alignment).astype(q.dtype)  # (..., Hq, L, S)
        add = alibi if add is None else add + alibi
    if is_causal or window is not None:
        pos = _position_mask(L, S, is_causal, alignment, window)  # (L, S)
        allowed = pos if allowed is None else allowed & pos
    out, cache = _sdpa(q, k, v, scale, groups, softcap, add, allowed, keep)
    return out, (cache if mask_shape is None else dataclasses.replace(cache, mask_shape=mask_shape))


def scaled_dot_product_attention_backward(d_out, cache: SDPACache, dlse=None):
    """Gradients of :func:`scaled_dot_product_attention_forward`: ``{"q", "k", "v"}``, and
    ``"attn_mask"`` when the mask was a float one (it is added to the logits, so its
    gradient is dS summed over the axes it was broadcast along, as torch gives it; the
    boolean masks, ALiBi slopes, softcap and keep mask are constants and have none).
    ``dlse``: None or the gradient of ``cache.lse``, (..., Hq, L); it joins the gradient of
    the logits (d lse / dS = P)."""
    op = "scaled_dot_product_attention_backward"
    d_out = float_array(op, "d_out", d_out)
    expected = cache.q.shape[:-1] + (cache.v.shape[-1],)
    if d_out.shape != expected:
        raise ValueError(f"{op}: d_out must have the output's shape {expected}, got {tuple(d_out.shape)}")
    if d_out.dtype != cache.q.dtype:
        raise TypeError(f"{op}: d_out must have the forward's dtype {cache.q.dtype}, got {d_out.dtype}")
    if dlse is not None:
        dlse = upstream(op, "dlse", dlse, cache.lse.shape, cache.q.dtype)
    if cache.mask_shape is None:
        d_q, d_k, d_v = _sdpa_backward(d_out, dlse, cache)
        return {"q": d_q, "k": d_k, "v": d_v}
    d_q, d_k, d_v, d_s = _sdpa_backward(d_out, dlse, cache, with_ds=True)
    d_mask = _sum_to(d_s, cache.mask_shape)  # the mask's shape: dS summed over its broadcast axes
    return {"q": d_q, "k": d_k, "v": d_v, "attn_mask": d_mask}


def _check_broadcast(op, name, mask, shape, layout):
    try:
        ok = np.broadcast_shapes(mask.shape, shape) == tuple(shape)
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(f"{op}: {name} must be broadcastable to the scores' shape {layout} = {tuple(shape)}, got shape {tuple(mask.shape)}")


# ---------------------------------------------------------------------------- packed sequences

@dataclass(frozen=True)
class VarlenCache:
    sequences: tuple  # one SDPACache per sequence, q (Hq, L_b, E), k (Hk, S_b, E), v (Hk, S_b, Ev)
    cu_seqlens_q: np.ndarray  # (B + 1,) int64
    cu_seqlens_k: np.ndarray  # (B + 1,) int64
    q_shape: tuple  # (total_q, Hq, E)
    k_shape: tuple  # (total_k, Hk, E)
    v_shape: tuple  # (total_k, Hk, Ev)
    dtype: np.dtype
    lse: np.ndarray  # (Hq, total_q)
    mask_shape: tuple | None = None  # the shape of a float attn_mask (it gets a gradient); None otherwise


def _check_cu_seqlens(op, name, cu, total, what):
    if not isinstance(cu, np.ndarray) or cu.dtype.kind not in "iu":
        got = cu.dtype if isinstance(cu, np.ndarray) else type(cu).__name__
        raise TypeError(f"{op}: {name} must be a 1-D integer numpy.ndarray (B + 1,), got {got}")
    if cu.ndim != 1 or cu.shape[0] < 1:
        raise ValueError(f"{op}: {name} must have shape (B + 1,) with B >= 0, got {tuple(cu.shape)}")
    cu = cu.astype(np.int64)
    if cu[0] != 0 or cu[-1] != total or np.any(np.diff(cu) < 0):
        raise ValueError(
            f"{op}: {name} must start at 0, never decrease and end at total_{what} = {total}, got {cu.tolist()}")
    return cu


def varlen_attention_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, scale=None, *, attn_mask=None, is_causal=False,
                             alignment="top_left", window=None, alibi_slopes=None, softcap=None, enable_gqa=False,
                             dropout_mask=None, dropout_p=0.0):
    """Attention over a packed batch of sequences of different lengths (flash-attn's
    varlen layout): sequence b attends only within itself, aligned on its own diagonal.

    Parameters
    ----------
    q : ndarray (total_q, Hq, E), float32 or float64
    k : ndarray (total_k, Hk, E), same dtype; Hk = Hq unless ``enable_gqa``
    v : ndarray (total_k, Hk, Ev), same dtype
    cu_seqlens_q, cu_seqlens_k : integer ndarrays (B + 1,), 0 first, non-decreasing,
        total_q (total_k) last: sequence b is the rows ``cu[b]:cu[b + 1]``; empty sequences
        are allowed (no keys: output 0, lse -inf)
    scale : None (``1 / sqrt(E)``) or float
    attn_mask, dropout_mask : None, or arrays broadcastable to (Hq, total_q, total_k), of
        which only each sequence's block (its query rows, its key columns) is used;
        conventions as :func:`scaled_dot_product_attention_forward`
    alibi_slopes : None or an ndarray (Hq,) or (B, Hq)
    is_causal, alignment, window, softcap, enable_gqa, dropout_p : as
        :func:`scaled_dot_product_attention_forward`, per sequence

    Returns
    -------
    out : ndarray (total_q, Hq, Ev)
    cache : VarlenCache, with ``cache.lse`` (Hq, total_q)

    Notes
    -----
    Each sequence is the module docstring's pipeline on q[rows].transpose(1, 0, 2), and so
    is its backward.
    """
    op = "varlen_attention"
    q = float_array(op, "q", q, 3, "(total_q, Hq, E)")
    k = float_array(op, "k", k, 3, "(total_k, Hk, E)")
    v = float_array(op, "v", v, 3, "(total_k, Hk, Ev)")
    same_dtype(op, "q", q, k=k, v=v)
    if not isinstance(enable_gqa, (bool, np.bool_)):
        raise TypeError(f"{op}: enable_gqa must be a bool, got {enable_gqa!r}")
    hq, hk = q.shape[1], k.shape[1]
    if k.shape[-1] != q.shape[-1]:
        raise ValueError(f"{op}: k must have q's last dimension E = {q.shape[-1]}, got shape {tuple(k.shape)}")
    if v.shape[:2] != k.shape[:2]:
        raise ValueError(f"{op}: v must have k's rows and heads (total_k, Hk) = {k.shape[:2]}, got shape {tuple(v.shape)}")
    if q.shape[-1] < 1:
        raise ValueError(f"{op}: q must have an embedding dimension E >= 1, got shape {tuple(q.shape)}")
    if enable_gqa:
        if (hk == 0 and hq != 0) or (hk and hq % hk):
            raise ValueError(f"{op}: with enable_gqa, the query heads Hq = {hq} must be a multiple of the key/value heads Hk = {hk}")
        groups = hq // hk if hk else 1
    else:
        if hk != hq:
            raise ValueError(f"{op}: k and v must have q's Hq = {hq} heads (enable_gqa=False), got k {tuple(k.shape)}")
        groups = 1
    cu_q = _check_cu_seqlens(op, "cu_seqlens_q", cu_seqlens_q, q.shape[0], "q")
    cu_k = _check_cu_seqlens(op, "cu_seqlens_k", cu_seqlens_k, k.shape[0], "k")
    if cu_q.shape != cu_k.shape:
        raise ValueError(f"{op}: cu_seqlens_q and cu_seqlens_k must describe the same B sequences, got lengths "
                         f"{cu_q.shape[0]} and {cu_k.shape[0]}")
    n_seq = cu_q.shape[0] - 1
    packed = (hq, q.shape[0], k.shape[0])
    layout = "(Hq, total_q, total_k)"
    add, allowed = _split_mask(op, attn_mask, packed, layout, q.dtype)
    scale = _check_scale(op, scale, q.shape[-1])
    is_causal, alignment, window = _check_positions(op, is_causal, alignment, window)
    slopes = _check_slopes(op, alibi_slopes, (n_seq, hq, 0, 0), q.dtype, batch_name="B")
    if softcap is not None:
        softcap = _check_real(op, "softcap", softcap, positive=True)
    keep = _check_dropout(op, dropout_mask, dropout_p, packed, layout, q.dtype)

    def block(a, rows, cols):  # a sequence's block of an array broadcastable to (Hq, total_q, total_k)
        a = a.reshape((1,) * (3 - a.ndim) + a.shape)
        return a[:, rows if a.shape[1] > 1 else slice(None), cols if a.shape[2] > 1 else slice(None)]

    out = np.zeros((q.shape[0], hq, v.shape[-1]), dtype=q.dtype)  # (total_q, Hq, Ev)
    lse = np.empty((hq, q.shape[0]), dtype=q.dtype)  # (Hq, total_q)
    caches = []
    for b in range(n_seq):
        rows, cols = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
        L, S = rows.stop - rows.start, cols.stop - cols.start
        qb = q[rows].transpose(1, 0, 2)  # (Hq, L, E)
        kb = k[cols].transpose(1, 0, 2)  # (Hk, S, E)
        vb = v[cols].transpose(1, 0, 2)  # (Hk, S, Ev)
        add_b = None if add is None else block(add, rows, cols)
        if slopes is not None:
            sl = slopes if slopes.ndim == 3 else slopes[b]  # (Hq, 1, 1)
            alibi = -sl * alibi_distance(L, S, alignment=alignment).astype(q.dtype)  # (Hq, L, S)
            add_b = alibi if add_b is None else add_b + alibi
        allowed_b = None if allowed is None else block(allowed, rows, cols)
        if is_causal or window is not None:
            pos = _position_mask(L, S, is_causal, alignment, window)  # (L, S)
            allowed_b = pos if allowed_b is None else allowed_b & pos
        keep_b = None if keep is None else block(keep, rows, cols)
        o_b, c_b = _sdpa(qb, kb, vb, scale, groups, softcap, add_b, allowed_b, keep_b)
        out[rows] = o_b.transpose(1, 0, 2)
        lse[:, rows] = c_b.lse
        caches.append(c_b)
    mask_shape = None if add is None else tuple(np.shape(attn_mask))  # a float mask: it gets a gradient
    cache = VarlenCache(tuple(caches), cu_q, cu_k, q.shape, k.shape, v.shape, q.dtype, lse, mask_shape)
    return out, cache


def varlen_attention_backward(d_out, cache: VarlenCache, dlse=None):
    """Gradients of :func:`varlen_attention_forward`: ``{"q", "k", "v"}``, each sequence
    by the module docstring's backward, and ``"attn_mask"`` for a float mask (each
    sequence's dS in its block of the packed (Hq, total_q, total_k) logits, 0 outside the
    blocks, which no query reads; summed over the mask's broadcast axes). ``dlse``: None or
    the gradient of ``cache.lse`` (Hq, total_q)."""
    op = "varlen_attention_backward"
    out_shape = (cache.q_shape[0], cache.q_shape[1], cache.v_shape[-1])
    d_out = upstream(op, "d_out", d_out, out_shape, cache.dtype)
    if dlse is not None:
        dlse = upstream(op, "dlse", dlse, cache.lse.shape, cache.dtype)
    d_q = np.zeros(cache.q_shape, dtype=cache.dtype)  # (total_q, Hq, E)
    d_k = np.zeros(cache.k_shape, dtype=cache.dtype)  # (total_k, Hk, E)
    d_v = np.zeros(cache.v_shape, dtype=cache.dtype)  # (total_k, Hk, Ev)
    cu_q, cu_k = cache.cu_seqlens_q, cache.cu_seqlens_k
    with_ds = cache.mask_shape is not None
    if with_ds:
        d_s = np.zeros((cache.q_shape[1], cache.q_shape[0], cache.k_shape[0]), dtype=cache.dtype)  # (Hq, total_q, total_k)
    for b, c_b in enumerate(cache.sequences):
        rows, cols = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
        res = _sdpa_backward(d_out[rows].transpose(1, 0, 2), None if dlse is None else dlse[:, rows], c_b, with_ds)
        d_q[rows] = res[0].transpose(1, 0, 2)
        d_k[cols] = res[1].transpose(1, 0, 2)
        d_v[cols] = res[2].transpose(1, 0, 2)
        if with_ds:
            d_s[:, rows, cols] = res[3]
    grads = {"q": d_q, "k": d_k, "v": d_v}
    if with_ds:
        grads["attn_mask"] = _sum_to(d_s, cache.mask_shape)
    return grads
