"""The attention variants of npattn.functional.attention (causal alignments, windows,
ALiBi, softcap, grouped-query heads, dropout masks, lse and its gradient, packed
variable-length batches) against a float64 loop oracle written here, one query row at a
time in plain Python; every gradient (dlse included) against central differences; fully
masked queries; errors naming the argument."""

import math

import numpy as np
import pytest

import npattn
from npattn.functional import (
    alibi_distance,
    position_mask,
    scaled_dot_product_attention_backward,
    scaled_dot_product_attention_forward,
    varlen_attention_backward,
    varlen_attention_forward,
)
from npattn.gradcheck import gradcheck

TOL = 1e-10  # float64, normwise relative


def rel_err(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    same = a == b  # equal infinities (lse of an empty row) count as equal
    with np.errstate(invalid="ignore"):  # inf - inf where both are -inf: taken as equal
        diff = np.where(same, 0.0, np.abs(a - b))
    finite = b[np.isfinite(b)]
    return float(np.max(diff) / max(float(np.max(np.abs(finite))) if finite.size else 0.0, 1e-300)) if b.size else 0.0


# ------------------------------------------------------------------ the loop oracle

def oracle(q, k, v, attn_mask=None, scale=None, is_causal=False, alignment="top_left", window=None, alibi=None,
           softcap=None, gqa=False, keep=None, dropout_p=0.0):
    """q (N, Hq, L, E), k (N, Hk, S, E), v (N, Hk, S, Ev): (out, lse), one query row at a
    time in plain Python floats, following the issue's text: scores, softcap, float mask,
    ALiBi, boolean masks, softmax, dropout."""
    n_b, hq, L, E = q.shape
    hk, S = k.shape[1], k.shape[2]
    group = hq // hk if gqa else 1
    c = 1 / math.sqrt(E) if scale is None else scale
    mask = None if attn_mask is None else np.broadcast_to(attn_mask, (n_b, hq, L, S))
    keep = None if keep is None else np.broadcast_to(keep, (n_b, hq, L, S))
    out = np.zeros((n_b, hq, L, v.shape[-1]))
    lse = np.full((n_b, hq, L), -math.inf)
    for n in range(n_b):
        for h in range(hq):
            g = h // group
            slope = None if alibi is None else float(alibi[h] if alibi.ndim == 1 else alibi[n, h])
            for i in range(L):
                diag = i if alignment == "top_left" else i + S - L
                logits = {}
                for j in range(S):
                    if is_causal and j > diag:
                        continue
                    if window is not None:
                        left, right = window
                        if (left != -1 and j < diag - left) or (right != -1 and j > diag + right):
                            continue
                    if mask is not None and mask.dtype == bool and not mask[n, h, i, j]:
                        continue
                    s = c * sum(float(q[n, h, i, e]) * float(k[n, g, j, e]) for e in range(E))
                    if softcap is not None:
                        s = softcap * math.tanh(s / softcap)
                    if mask is not None and mask.dtype != bool:
                        s += float(mask[n, h, i, j])
                    if slope is not None:
                        s -= slope * abs(diag - j)
                    if s != -math.inf:
                        logits[j] = s
                if not logits:
                    continue
                top = max(logits.values())
                row_lse = top + math.log(sum(math.exp(s - top) for s in logits.values()))
                lse[n, h, i] = row_lse
                for j, s in logits.items():
                    w = math.exp(s - row_lse)
                    if keep is not None:
                        w = w * float(keep[n, h, i, j]) / (1 - dropout_p)
                    out[n, h, i] += w * v[n, g, j]
    return out, lse


def varlen_oracle(q, k, v, cu_q, cu_k, scale=None, attn_mask=None, alibi=None, keep=None, **kw):
    """The packed layout, one sequence at a time through :func:`oracle`."""
    hq = q.shape[1]
    out = np.zeros((q.shape[0], hq, v.shape[-1]))
    lse = np.full((hq, q.shape[0]), -math.inf)
    for b in range(len(cu_q) - 1):
        r0, r1, c0, c1 = cu_q[b], cu_q[b + 1], cu_k[b], cu_k[b + 1]
        def seq(a, rows):
            return a[rows].transpose(1, 0, 2)[None]
        def blk(m):
            return None if m is None else np.broadcast_to(m, (hq, q.shape[0], k.shape[0]))[:, r0:r1, c0:c1][None]
        sl = None if alibi is None else (alibi if alibi.ndim == 1 else alibi[b])
        o, s = oracle(seq(q, slice(r0, r1)), seq(k, slice(c0, c1)), seq(v, slice(c0, c1)), blk(attn_mask), scale,
                      alibi=sl, keep=blk(keep), **kw)
        out[r0:r1] = o[0].transpose(1, 0, 2)
        lse[:, r0:r1] = s[0]
    return out, lse


def draw(shape_q, shape_k, ev, seed):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal(shape_q)
    k = rng.standard_normal(shape_k)
    v = rng.standard_normal(shape_k[:-1] + (ev,))
    return q, k, v, rng


# (N, Hq, Hk, L, S, E, Ev, keywords); rng-dependent keywords are filled in by `case`
CASES = {
    "causal_top_left_L_lt_S": (2, 3, 3, 4, 6, 3, 2, dict(is_causal=True)),
    "causal_bottom_right_L_lt_S": (2, 3, 3, 4, 6, 3, 2, dict(is_causal=True, alignment="bottom_right")),
    "causal_bottom_right_L_gt_S": (1, 2, 2, 6, 3, 2, 3, dict(is_causal=True, alignment="bottom_right")),
    "window_2_1_top_left": (2, 2, 2, 5, 7, 3, 2, dict(window=(2, 1))),
    "window_1_0_bottom_right": (2, 2, 2, 5, 7, 3, 2, dict(window=(1, 0), alignment="bottom_right")),
    "window_0_0": (1, 2, 2, 5, 5, 2, 2, dict(window=(0, 0))),
    "window_left_unbounded_L_gt_S": (1, 2, 2, 7, 4, 3, 2, dict(window=(-1, 1), alignment="bottom_right")),
    "window_and_causal": (1, 2, 2, 4, 6, 3, 3, dict(window=(3, -1), is_causal=True, alignment="bottom_right")),
    "alibi_heads": (2, 3, 3, 4, 5, 3, 2, dict(alibi="heads")),
    "alibi_batch_heads_causal_bottom_right": (2, 3, 3, 3, 6, 2, 4, dict(alibi="batch", is_causal=True, alignment="bottom_right")),
    "softcap": (2, 2, 2, 4, 5, 3, 3, dict(softcap=0.7, scale=2.0)),
    "softcap_float_mask_alibi": (1, 4, 4, 3, 5, 3, 2, dict(softcap=1.3, attn_mask="float", alibi="heads")),
    "gqa_3_to_1": (2, 3, 1, 4, 5, 3, 2, dict(enable_gqa=True)),
    "gqa_6_to_2_causal_window": (1, 6, 2, 5, 4, 2, 3, dict(enable_gqa=True, is_causal=True, window=(1, -1), alignment="bottom_right")),
    "gqa_4_to_2_bool_mask": (2, 4, 2, 3, 4, 3, 2, dict(enable_gqa=True, attn_mask="bool")),
    "dropout_mask": (2, 2, 2, 4, 5, 3, 2, dict(dropout="keep", dropout_p=0.3)),
    "everything": (2, 4, 2, 5, 6, 3, 2, dict(enable_gqa=True, attn_mask="float", alibi="batch", softcap=2.0,
                                             window=(2, 2), is_causal=True, alignment="bottom_right",
                                             dropout="keep", dropout_p=0.2, scale=0.8)),
}


def case(name, seed=0):
    n, hq, hk, L, S, E, ev, kw = CASES[name]
    q, k, v, rng = draw((n, hq, L, E), (n, hk, S, E), ev, seed)
    kw = dict(kw)
    if kw.get("alibi") == "heads":
        kw["alibi_slopes"] = rng.uniform(0.1, 1.0, hq)
    elif kw.get("alibi") == "batch":
        kw["alibi_slopes"] = rng.uniform(0.1, 1.0, (n, hq))
    kw.pop("alibi", None)
    if kw.get("attn_mask") == "float":
        m = rng.standard_normal((hq, L, S))
        m[rng.random(m.shape) < 0.2] = -np.inf
        kw["attn_mask"] = m
    elif kw.get("attn_mask") == "bool":
        kw["attn_mask"] = rng.random((n, 1, L, S)) < 0.7
    if kw.pop("dropout", None):
        kw["dropout_mask"] = rng.random((n, hq, L, S)) < 0.7
    return q, k, v, kw


def oracle_kw(kw):
    o = dict(kw)
    if "alibi_slopes" in o:
        o["alibi"] = o.pop("alibi_slopes")
    if "enable_gqa" in o:
        o["gqa"] = o.pop("enable_gqa")
    if "dropout_mask" in o:
        o["keep"] = o.pop("dropout_mask")
    return o


@pytest.mark.parametrize("name", sorted(CASES))
def test_forward_and_lse_match_the_loop_oracle(name):
    q, k, v, kw = case(name)
    out, cache = scaled_dot_product_attention_forward(q, k, v, **kw)
    want, want_lse = oracle(q, k, v, **oracle_kw(kw))
    assert out.shape == want.shape and cache.lse.shape == want_lse.shape
    assert rel_err(out, want) < TOL, rel_err(out, want)
    assert np.array_equal(np.isneginf(cache.lse), np.isneginf(want_lse))
    assert rel_err(cache.lse, want_lse) < TOL, rel_err(cache.lse, want_lse)


def with_lse(fwd, bwd, zero_rows=True):
    """forward/backward pair for gradcheck whose output is (out, lse) flattened together,
    so the central differences cover d_out and dlse at once. An lse of -inf (no key: a
    constant) is given as 0 so the scalar loss stays finite."""
    def forward(**a):
        out, cache = fwd(**a)
        lse = np.where(np.isneginf(cache.lse), 0.0, cache.lse)
        return np.concatenate([out.ravel(), lse.ravel()]), (cache, out.shape)

    def backward(g, state):
        cache, shape = state
        n = int(np.prod(shape))
        return bwd(g[:n].reshape(shape), cache, dlse=g[n:].reshape(cache.lse.shape))

    return forward, backward


@pytest.mark.parametrize("name", sorted(CASES))
def test_gradients_with_dlse_by_central_differences(name):
    q, k, v, kw = case(name, seed=1)
    fwd, bwd = with_lse(lambda **a: scaled_dot_product_attention_forward(**a, **kw), scaled_dot_product_attention_backward)
    report = gradcheck(fwd, bwd, {"q": q, "k": k, "v": v}, atol=1e-8, rtol=1e-6, seed=3)
    assert report.ok and {t.name for t in report.tensors} == {"q", "k", "v"}


def test_gradients_without_dlse_equal_dlse_zero():
    q, k, v, kw = case("everything", seed=2)
    out, cache = scaled_dot_product_attention_forward(q, k, v, **kw)
    dy = np.random.default_rng(5).standard_normal(out.shape)
    a = scaled_dot_product_attention_backward(dy, cache)
    b = scaled_dot_product_attention_backward(dy, cache, dlse=np.zeros(cache.lse.shape))
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])


def test_dlse_alone_is_the_gradient_of_the_lse():
    """With dO = 0 the gradients are those of sum(dlse * lse), by central differences."""
    q, k, v, kw = case("softcap_float_mask_alibi", seed=4)
    dlse = np.random.default_rng(6).standard_normal(q.shape[:-1])

    def fwd(**a):
        _, cache = scaled_dot_product_attention_forward(**a, **kw)
        return cache.lse, cache

    def bwd(g, cache):
        return scaled_dot_product_attention_backward(np.zeros(cache.q.shape[:-1] + (cache.v.shape[-1],)), cache, dlse=g)

    assert gradcheck(fwd, bwd, {"q": q, "k": k, "v": v}, grad_output=dlse, atol=1e-8, rtol=1e-6).ok
    g = bwd(dlse, fwd(q=q, k=k, v=v)[1])
    assert not g["v"].any()  # lse does not depend on v


def test_lse_logsumexp_identity_and_weights():
    q, k, v, kw = case("window_2_1_top_left")
    out, cache = scaled_dot_product_attention_forward(q, k, v, **kw)
    np.testing.assert_allclose(cache.p.sum(-1), 1.0, rtol=0, atol=1e-14)
    allowed = position_mask(q.shape[-2], k.shape[-2], window=(2, 1))
    assert not cache.p[..., ~allowed].any()


@pytest.mark.parametrize("kw", [
    dict(is_causal=True, alignment="bottom_right"),  # L > S: the first L - S queries have no key
    dict(window=(0, 0), alignment="bottom_right"),
    dict(attn_mask="rows"),
])
def test_fully_masked_queries_give_zero_output_zero_gradients_and_lse_minus_inf(kw):
    q, k, v, rng = draw((2, 3, 6, 3), (2, 3, 3, 3), 2, 7)
    kw = dict(kw)
    if kw.get("attn_mask") == "rows":
        m = rng.random((2, 3, 6, 3)) < 0.7
        m[:, :, 1] = False
        m[0, 2, 4] = False
        kw["attn_mask"] = m
    out, cache = scaled_dot_product_attention_forward(q, k, v, **kw)
    empty = np.isneginf(cache.lse)
    assert empty.any() and not np.isnan(out).any()
    _, want_lse = oracle(q, k, v, **kw)
    np.testing.assert_array_equal(empty, np.isneginf(want_lse))
    assert not out[empty].any()
    g = scaled_dot_product_attention_backward(rng.standard_normal(out.shape), cache, dlse=rng.standard_normal(empty.shape))
    assert not g["q"][empty].any() and np.all(np.isfinite(g["k"])) and np.all(np.isfinite(g["v"]))
    # the empty rows pass nothing to k and v: the same gradients with their upstream zeroed
    dy = rng.standard_normal(out.shape)
    dl = rng.standard_normal(empty.shape)
    g1 = scaled_dot_product_attention_backward(dy, cache, dlse=dl)
    dy[empty] = 0
    dl[empty] = 0
    g2 = scaled_dot_product_attention_backward(dy, cache, dlse=dl)
    for key in g1:
        np.testing.assert_array_equal(g1[key], g2[key])


def test_gqa_equals_repeated_heads():
    q, k, v, kw = case("gqa_6_to_2_causal_window", seed=3)
    out, cache = scaled_dot_product_attention_forward(q, k, v, **kw)
    kw2 = dict(kw, enable_gqa=False)
    kr, vr = np.repeat(k, 3, axis=1), np.repeat(v, 3, axis=1)
    out2, cache2 = scaled_dot_product_attention_forward(q, kr, vr, **kw2)
    assert rel_err(out, out2) < TOL
    dy = np.random.default_rng(0).standard_normal(out.shape)
    g, g2 = scaled_dot_product_attention_backward(dy, cache), scaled_dot_product_attention_backward(dy, cache2)
    assert rel_err(g["q"], g2["q"]) < TOL
    for key in ("k", "v"):  # the shared heads' gradients add up
        assert rel_err(g[key], g2[key].reshape(g[key].shape[:1] + (2, 3) + g[key].shape[2:]).sum(2)) < TOL


def test_defaults_are_the_plain_function():
    q, k, v, _ = case("softcap")
    a, ca = scaled_dot_product_attention_forward(q, k, v)
    b, cb = scaled_dot_product_attention_forward(q, k, v, None, None, is_causal=False, alignment="bottom_right",
                                                 window=(-1, -1), dropout_mask=np.ones((1,), bool), dropout_p=0.0)
    assert rel_err(a, b) < 1e-15 and rel_err(ca.lse, cb.lse) < 1e-15


def test_float32_in_float32_out_and_alignments_agree_when_L_equals_S():
    q, k, v, kw = case("everything")
    kw32 = {n: (a.astype(np.float32) if isinstance(a, np.ndarray) and a.dtype == np.float64 else a) for n, a in kw.items()}
    out, cache = scaled_dot_product_attention_forward(q.astype(np.float32), k.astype(np.float32), v.astype(np.float32), **kw32)
    assert out.dtype == cache.lse.dtype == np.float32
    g = scaled_dot_product_attention_backward(out, cache, dlse=cache.lse.copy())  # -inf where no key: ignored
    assert np.isneginf(cache.lse).any()
    assert all(a.dtype == np.float32 and np.all(np.isfinite(a)) for a in g.values())
    ref, _ = scaled_dot_product_attention_forward(q, k, v, **kw)
    assert rel_err(out, ref) < 1e-5
    np.testing.assert_array_equal(position_mask(4, 4, is_causal=True, window=(1, -1)),
                                  position_mask(4, 4, is_causal=True, window=(1, -1), alignment="bottom_right"))


def test_position_mask_and_alibi_distance_by_hand():
    tl = position_mask(3, 5, is_causal=True)
    br = position_mask(3, 5, is_causal=True, alignment="bottom_right")
    np.testing.assert_array_equal(tl, [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0]])
    np.testing.assert_array_equal(br, [[1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    np.testing.assert_array_equal(position_mask(3, 5, window=(1, 0), alignment="bottom_right"),
                                  [[0, 1, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 0, 1, 1]])
    np.testing.assert_array_equal(alibi_distance(2, 4, alignment="bottom_right"), [[2, 1, 0, 1], [3, 2, 1, 0]])
    np.testing.assert_array_equal(alibi_distance(2, 4), [[0, 1, 2, 3], [1, 0, 1, 2]])


# ------------------------------------------------------------------ packed sequences

VARLEN = {
    # (seqlens_q, seqlens_k, Hq, Hk, keywords)
    "plain": ([3, 1, 4], [2, 5, 4], 2, 2, dict()),
    "empty_sequences_causal_bottom_right": ([2, 0, 3, 2], [4, 3, 0, 2], 2, 2, dict(is_causal=True, alignment="bottom_right")),
    "gqa_window_alibi_batch": ([3, 4], [5, 2], 4, 2, dict(enable_gqa=True, window=(1, 1), alibi="batch")),
    "mask_dropout_softcap": ([2, 3], [3, 3], 2, 2, dict(attn_mask="float", dropout="keep", dropout_p=0.25, softcap=0.9,
                                                        is_causal=True)),
    "bool_mask_alibi_heads_top_left": ([4, 1], [2, 3], 3, 3, dict(attn_mask="bool", alibi="heads", is_causal=True)),
}


def varlen_case(name, seed=0):
    lq, lk, hq, hk, kw = VARLEN[name]
    cu_q, cu_k = np.concatenate([[0], np.cumsum(lq)]), np.concatenate([[0], np.cumsum(lk)])
    q, k, v, rng = draw((cu_q[-1], hq, 3), (cu_k[-1], hk, 3), 2, seed)
    kw = dict(kw)
    alibi = kw.pop("alibi", None)
    if alibi == "heads":
        kw["alibi_slopes"] = rng.uniform(0.1, 1.0, hq)
    elif alibi == "batch":
        kw["alibi_slopes"] = rng.uniform(0.1, 1.0, (len(lq), hq))
    if kw.get("attn_mask") == "float":
        kw["attn_mask"] = rng.standard_normal((hq, cu_q[-1], cu_k[-1]))
    elif kw.get("attn_mask") == "bool":
        kw["attn_mask"] = rng.random((1, cu_q[-1], cu_k[-1])) < 0.7
    if kw.pop("dropout", None):
        kw["dropout_mask"] = rng.random((hq, cu_q[-1], cu_k[-1])) < 0.7
    return q, k, v, cu_q, cu_k, kw


@pytest.mark.parametrize("name", sorted(VARLEN))
def test_varlen_matches_the_loop_oracle(name):
    q, k, v, cu_q, cu_k, kw = varlen_case(name)
    out, cache = varlen_attention_forward(q, k, v, cu_q, cu_k, **kw)
    want, want_lse = varlen_oracle(q, k, v, cu_q, cu_k, **oracle_kw(kw))
    assert out.shape == want.shape and cache.lse.shape == want_lse.shape == (q.shape[1], q.shape[0])
    assert rel_err(out, want) < TOL and rel_err(cache.lse, want_lse) < TOL
    np.testing.assert_array_equal(np.isneginf(cache.lse), np.isneginf(want_lse))


@pytest.mark.parametrize("name", sorted(VARLEN))
def test_varlen_gradients_with_dlse_by_central_differences(name):
    q, k, v, cu_q, cu_k, kw = varlen_case(name, seed=1)
    fwd, bwd = with_lse(lambda **a: varlen_attention_forward(**a, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, **kw),
                        varlen_attention_backward)
    report = gradcheck(fwd, bwd, {"q": q, "k": k, "v": v}, atol=1e-8, rtol=1e-6, seed=2)
    assert report.ok


def test_varlen_sequence_equals_the_dense_function():
    q, k, v, cu_q, cu_k, kw = varlen_case("gqa_window_alibi_batch", seed=5)
    out, cache = varlen_attention_forward(q, k, v, cu_q, cu_k, **kw)
    dy = np.random.default_rng(1).standard_normal(out.shape)
    g = varlen_attention_backward(dy, cache)
    b = 1
    r, c = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
    kw_b = dict(kw, alibi_slopes=kw["alibi_slopes"][b])
    o_b, c_b = scaled_dot_product_attention_forward(q[r].transpose(1, 0, 2), k[c].transpose(1, 0, 2),
                                                     v[c].transpose(1, 0, 2), **kw_b)
    assert rel_err(out[r], o_b.transpose(1, 0, 2)) < 1e-14
    g_b = scaled_dot_product_attention_backward(dy[r].transpose(1, 0, 2), c_b)
    assert rel_err(g["k"][c], g_b["k"].transpose(1, 0, 2)) < 1e-14


def test_varlen_with_no_sequence_and_only_empty_ones():
    q, k, v = np.zeros((0, 2, 3)), np.zeros((0, 2, 3)), np.zeros((0, 2, 4))
    out, cache = varlen_attention_forward(q, k, v, np.array([0]), np.array([0]))
    assert out.shape == (0, 2, 4) and cache.lse.shape == (2, 0)
    q = np.ones((2, 2, 3))
    out, cache = varlen_attention_forward(q, k, v, np.array([0, 0, 2]), np.array([0, 0, 0]))
    assert not out.any() and np.all(np.isneginf(cache.lse))
    g = varlen_attention_backward(np.ones(out.shape), cache, dlse=np.ones(cache.lse.shape))
    assert not g["q"].any() and g["k"].shape == (0, 2, 3)


# ------------------------------------------------------------------ errors

def test_bad_keywords_raise_naming_the_argument():
    q, k, v, _ = case("alibi_heads")
    f = scaled_dot_product_attention_forward
    bad = [
        (dict(is_causal=1), TypeError, "is_causal must be a bool"),
        (dict(alignment="lower_right"), ValueError, "alignment must be one of"),
        (dict(window=3), TypeError, "window must be None or a pair of ints"),
        (dict(window=(1, -2)), ValueError, "window sides must be >= 0, or -1"),
        (dict(alibi_slopes=np.ones(2)), ValueError, r"alibi_slopes must have shape \(Hq,\) or \(N, Hq\)"),
        (dict(alibi_slopes=np.ones(3, np.float32)), TypeError, "alibi_slopes must have the dtype of q"),
        (dict(alibi_slopes=[1.0, 1.0, 1.0]), TypeError, "alibi_slopes must be None or a numpy.ndarray"),
        (dict(softcap=0.0), ValueError, "softcap must be > 0"),
        (dict(softcap="1"), TypeError, "softcap must be None or a finite real"),
        (dict(enable_gqa="yes"), TypeError, "enable_gqa must be a bool"),
        (dict(dropout_p=0.5), ValueError, "dropout_p = 0.5 needs the keep mask dropout_mask"),
        (dict(dropout_p=1.0, dropout_mask=np.ones(1, bool)), ValueError, r"dropout_p must be a real number in \[0, 1\)"),
        (dict(dropout_mask=np.ones((2, 3, 4, 5))), TypeError, "dropout_mask must be None or a boolean"),
        (dict(dropout_mask=np.ones((7,), bool)), ValueError, "dropout_mask must be broadcastable"),
    ]
    for kw, exc, msg in bad:
        with pytest.raises(exc, match=msg):
            f(q, k, v, **kw)
    with pytest.raises(ValueError, match="Hq = 3 must be a multiple of the key/value heads Hk = 2"):
        f(q, k[:, :2], v[:, :2], enable_gqa=True)
    with pytest.raises(ValueError, match="with enable_gqa, q must have a head axis"):
        f(q[0, 0], k[0, 0], v[0, 0], enable_gqa=True)
    with pytest.raises(ValueError, match="alibi_slopes needs a head axis"):
        f(q[0, 0], k[0, 0], v[0, 0], alibi_slopes=np.ones(3))
    out, cache = f(q, k, v)
    with pytest.raises(ValueError, match="dlse must have the forward output's shape"):
        scaled_dot_product_attention_backward(out, cache, dlse=np.zeros(3))
    with pytest.raises(TypeError, match="dlse must have the forward's dtype"):
        scaled_dot_product_attention_backward(out, cache, dlse=np.zeros(cache.lse.shape, np.float32))
    with pytest.raises(ValueError, match="L must be >= 0"):
        position_mask(-1, 3)


def test_varlen_bad_arguments_raise_naming_the_argument():
    q, k, v, cu_q, cu_k, _ = varlen_case("plain")
    f = varlen_attention_forward
    with pytest.raises(ValueError, match="cu_seqlens_q must start at 0, never decrease and end at total_q = 8"):
        f(q, k, v, np.array([0, 3, 2, 8]), cu_k)
    with pytest.raises(ValueError, match="end at total_k = 11"):
        f(q, k, v, cu_q, np.array([0, 2, 7, 10]))
    with pytest.raises(TypeError, match="cu_seqlens_k must be a 1-D integer numpy.ndarray"):
        f(q, k, v, cu_q, cu_k.astype(float))
    with pytest.raises(ValueError, match="cu_seqlens_q and cu_seqlens_k must describe the same B sequences"):
        f(q, k, v, np.array([0, 8]), cu_k)
    with pytest.raises(ValueError, match=r"q must have 3 dimensions \(total_q, Hq, E\)"):
        f(q[0], k, v, cu_q, cu_k)
    with pytest.raises(ValueError, match="k and v must have q's Hq = 2 heads"):
        f(q, k[:, :1], v[:, :1], cu_q, cu_k)
    with pytest.raises(ValueError, match=r"alibi_slopes must have shape \(Hq,\) or \(B, Hq\)"):
        f(q, k, v, cu_q, cu_k, alibi_slopes=np.ones((2, 2)))
    with pytest.raises(ValueError, match=r"attn_mask must be broadcastable to the scores' shape \(Hq, total_q, total_k\)"):
        f(q, k, v, cu_q, cu_k, attn_mask=np.ones((8, 8), bool))
    out, cache = f(q, k, v, cu_q, cu_k)
    with pytest.raises(ValueError, match="d_out must have the forward output's shape"):
        varlen_attention_backward(out[1:], cache)


def test_exported_from_npattn():
    for name in ("varlen_attention_forward", "varlen_attention_backward", "rotary_embedding_forward",
                 "rotary_embedding_backward"):
        assert getattr(npattn, name) is getattr(npattn.functional, name)


@pytest.mark.parametrize("mask_shape", [(2, 4, 3, 5), (3, 5), (4, 1, 5)])
def test_float_mask_gradient_by_central_differences_with_every_variant(mask_shape):
    """A float attn_mask gets a gradient (it is added to the logits after the softcap),
    checked by central differences together with q, k, v and dlse, through the causal
    bottom-right diagonal, a window, ALiBi, softcap and grouped-query heads."""
    r = np.random.default_rng(11)
    args = {"q": r.standard_normal((2, 4, 3, 3)), "k": r.standard_normal((2, 2, 5, 3)),
            "v": r.standard_normal((2, 2, 5, 2)), "attn_mask": r.standard_normal(mask_shape)}
    kw = dict(is_causal=True, alignment="bottom_right", window=(2, 0), alibi_slopes=np.array([0.5, 0.25, 0.125, 0.0625]),
              softcap=3.0, enable_gqa=True)
    dlse = r.standard_normal((2, 4, 3))

    def fwd(q, k, v, attn_mask):
        y, cache = scaled_dot_product_attention_forward(q, k, v, attn_mask, **kw)
        lse = np.where(np.isneginf(cache.lse), 0.0, cache.lse)  # a query with no key: a constant
        return np.concatenate([y.ravel(), lse.ravel()]), cache

    def bwd(d, cache):
        n = cache.q.shape[:-1] + (cache.v.shape[-1],)
        return scaled_dot_product_attention_backward(d[: int(np.prod(n))].reshape(n), cache, dlse=d[int(np.prod(n)):].reshape(dlse.shape))

    y, _ = fwd(**args)
    rng_dy = np.random.default_rng(12).standard_normal(y.shape)
    report = gradcheck(fwd, bwd, args, grad_output=rng_dy, raise_on_failure=False)
    assert report.ok, str(report)
    assert {t.name for t in report.tensors} == {"q", "k", "v", "attn_mask"}


def test_a_mask_constant_along_the_keys_has_the_gradient_of_the_lse_only():
    """Adding one number to every logit of a row leaves P unchanged and moves the lse by
    that number: a (..., L, 1) mask's gradient is dlse on every row that has a key (and
    rounding-level 0 without dlse)."""
    r = np.random.default_rng(13)
    q, k, v = r.standard_normal((2, 3, 4, 3)), r.standard_normal((2, 3, 6, 3)), r.standard_normal((2, 3, 6, 2))
    m = r.standard_normal((2, 3, 4, 1))
    y, cache = scaled_dot_product_attention_forward(q, k, v, m)
    dy, dlse = r.standard_normal(y.shape), r.standard_normal((2, 3, 4))
    g = scaled_dot_product_attention_backward(dy, cache, dlse=dlse)["attn_mask"]
    np.testing.assert_allclose(g[..., 0], dlse, rtol=0, atol=1e-12 * np.abs(dy).max() * 10)
    g0 = scaled_dot_product_attention_backward(dy, cache)["attn_mask"]
    assert np.abs(g0).max() <= 1e-13 * np.abs(scaled_dot_product_attention_backward(dy, cache)["q"]).max() * 10
    # a boolean mask is a constant: no gradient entry
    _, c_bool = scaled_dot_product_attention_forward(q, k, v, r.random((4, 6)) < 0.8)
    assert set(scaled_dot_product_attention_backward(dy, c_bool)) == {"q", "k", "v"}


@pytest.mark.parametrize("mask_shape", [(4, 7, 9), (7, 9), (4, 1, 9)])
def test_varlen_float_mask_gradient_by_central_differences(mask_shape):
    """Packed sequences (one of them empty) with a float mask over the packed logits: its
    gradient (each sequence's dS in its block, 0 elsewhere) by central differences."""
    r = np.random.default_rng(17)
    cu_q, cu_k = np.array([0, 3, 3, 7]), np.array([0, 4, 4, 9])
    args = {"q": r.standard_normal((7, 4, 3)), "k": r.standard_normal((9, 2, 3)), "v": r.standard_normal((9, 2, 2)),
            "attn_mask": r.standard_normal(mask_shape)}

    def fwd(q, k, v, attn_mask):
        return varlen_attention_forward(q, k, v, cu_q, cu_k, attn_mask=attn_mask, is_causal=True,
                                        alignment="bottom_right", softcap=3.0, enable_gqa=True)

    report = gradcheck(fwd, varlen_attention_backward, args, raise_on_failure=False)
    assert report.ok, str(report)
    assert {t.name for t in report.tensors} == {"q", "k", "v", "attn_mask"}
    if mask_shape == (4, 7, 9):  # the logits no query reads (across sequences) get exactly 0
        _, cache = fwd(**args)
        g = varlen_attention_backward(np.ones((7, 4, 2)), cache)["attn_mask"]
        assert np.all(g[:, :3, 4:] == 0) and np.all(g[:, 3:, :4] == 0)
