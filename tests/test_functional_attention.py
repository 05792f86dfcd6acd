"""scaled_dot_product_attention_forward / _backward: the forward against a loop oracle,
the mask convention (boolean True = attend, as torch.nn.functional's), fully masked rows,
gradients by central differences with both mask kinds, errors naming the argument."""

import math

import numpy as np
import pytest

import npattn
from npattn.functional import scaled_dot_product_attention_backward as sdpa_backward
from npattn.functional import scaled_dot_product_attention_forward as sdpa_forward
from npattn.gradcheck import gradcheck

RTOL_GRAD = 1e-6


def oracle(q, k, v, allowed=None, add=None, scale=None):
    """Loops over (batch..., l): softmax over the keys j with allowed[..., l, j] (missing:
    all allowed), plus add[..., l, j]; a row with no allowed key gives 0."""
    lead = q.shape[:-2]
    L, E = q.shape[-2:]
    S = k.shape[-2]
    c = 1 / math.sqrt(E) if scale is None else scale
    out = np.zeros(lead + (L, v.shape[-1]))
    for idx in np.ndindex(*lead):
        for i in range(L):
            scores = {}
            for j in range(S):
                if allowed is not None and not np.broadcast_to(allowed, lead + (L, S))[idx + (i, j)]:
                    continue
                s = c * sum(float(q[idx + (i, e)]) * float(k[idx + (j, e)]) for e in range(E))
                if add is not None:
                    s += float(np.broadcast_to(add, lead + (L, S))[idx + (i, j)])
                if s != -math.inf:
                    scores[j] = s
            if not scores:
                continue
            top = max(scores.values())
            w = {j: math.exp(s - top) for j, s in scores.items()}
            total = sum(w.values())
            for j, wj in w.items():
                out[idx + (i,)] += wj / total * v[idx + (j,)]
    return out


def draw(lead, L, S, E, Ev, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal(lead + (L, E)), rng.standard_normal(lead + (S, E)), rng.standard_normal(lead + (S, Ev))


def bool_mask(shape, seed, keep_one=True):
    """True = attend; every row keeps at least one key."""
    rng = np.random.default_rng(seed)
    m = rng.random(shape) < 0.6
    if keep_one:
        flat = m.reshape(-1, shape[-1])
        flat[np.arange(flat.shape[0]), rng.integers(0, shape[-1], flat.shape[0])] = True
    return m


def check_grads(q, k, v, **kw):
    def fwd(q, k, v):
        return sdpa_forward(q, k, v, **kw)

    report = gradcheck(fwd, sdpa_backward, {"q": q, "k": k, "v": v}, raise_on_failure=False)
    assert report.ok, report.failure_message() + "\n" + str(report)
    for t in report.tensors:
        assert t.max_abs_err / t.scale < RTOL_GRAD, str(report)
    return report


# --------------------------------------------------------------------------- forward

@pytest.mark.parametrize("lead,L,S,E,Ev", [((3,), 4, 6, 5, 2), ((1,), 1, 3, 1, 1), ((2, 3), 5, 2, 3, 4), ((), 3, 7, 2, 3)])
def test_forward_matches_loop_oracle_without_mask(lead, L, S, E, Ev):
    q, k, v = draw(lead, L, S, E, Ev)
    out, cache = sdpa_forward(q, k, v)
    np.testing.assert_allclose(out, oracle(q, k, v), rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(cache.p.sum(axis=-1), 1.0, rtol=0, atol=1e-14)
    assert cache.scale == 1 / math.sqrt(E)


def test_boolean_mask_true_means_attend():
    q, k, v = draw((2, 3), 4, 6, 5, 3, seed=1)
    allowed = bool_mask((4, 6), seed=2)  # broadcast over the leading dimensions
    out, cache = sdpa_forward(q, k, v, attn_mask=allowed)
    np.testing.assert_allclose(out, oracle(q, k, v, allowed=allowed), rtol=1e-12, atol=1e-13)
    assert np.all(cache.p[..., ~allowed] == 0.0)  # masked keys have weight exactly 0
    # dropping the masked keys altogether gives the same numbers (row 0's keys)
    keep = np.flatnonzero(allowed[0])
    sub, _ = sdpa_forward(q[..., :1, :], k[..., keep, :], v[..., keep, :])
    np.testing.assert_allclose(out[..., :1, :], sub, rtol=1e-13, atol=1e-14)


def test_float_mask_is_added_and_minus_inf_masks():
    q, k, v = draw((3,), 4, 5, 2, 3, seed=3)
    rng = np.random.default_rng(4)
    add = rng.normal(0.0, 2.0, (3, 4, 5))
    add[0, 1, 2] = add[2, 3, 0] = -np.inf
    out, cache = sdpa_forward(q, k, v, attn_mask=add, scale=0.7)
    np.testing.assert_allclose(out, oracle(q, k, v, add=add, scale=0.7), rtol=1e-12, atol=1e-13)
    assert cache.p[0, 1, 2] == 0.0 and cache.p[2, 3, 0] == 0.0
    # the boolean mask equals the float mask 0 / -inf
    allowed = bool_mask((3, 4, 5), seed=5)
    a, _ = sdpa_forward(q, k, v, attn_mask=allowed)
    b, _ = sdpa_forward(q, k, v, attn_mask=np.where(allowed, 0.0, -np.inf))
    np.testing.assert_array_equal(a, b)


def test_a_constant_added_to_a_row_changes_nothing():
    q, k, v = draw((2,), 3, 4, 2, 2, seed=6)
    shift = np.random.default_rng(7).normal(0.0, 5.0, (2, 3, 1))
    a, _ = sdpa_forward(q, k, v)
    b, _ = sdpa_forward(q, k, v, attn_mask=np.broadcast_to(shift, (2, 3, 4)).copy())
    np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-13)


def test_fully_masked_rows_give_zero_output_and_pass_no_gradient():
    """As torch.nn.functional.scaled_dot_product_attention (tests/crosscheck compares)."""
    q, k, v = draw((2,), 3, 4, 2, 3, seed=8)
    allowed = bool_mask((2, 3, 4), seed=9)
    allowed[1, 2] = False  # sample 1, query 2: no key
    out, cache = sdpa_forward(q, k, v, attn_mask=allowed)
    assert np.all(out[1, 2] == 0.0) and np.all(cache.p[1, 2] == 0.0)
    np.testing.assert_allclose(out, oracle(q, k, v, allowed=allowed), rtol=1e-12, atol=1e-13)
    dy = np.random.default_rng(10).standard_normal(out.shape)
    g = sdpa_backward(dy, cache)
    assert np.all(g["q"][1, 2] == 0.0)
    # k and v get exactly what they get when query 2 of sample 1 is dropped
    dy_drop = dy.copy()
    dy_drop[1, 2] = 0
    g0 = sdpa_backward(dy_drop, cache)
    np.testing.assert_array_equal(g["k"], g0["k"])
    np.testing.assert_array_equal(g["v"], g0["v"])
    float_mask = np.where(allowed, 0.0, -np.inf)
    out_f, _ = sdpa_forward(q, k, v, attn_mask=float_mask)
    np.testing.assert_array_equal(out_f, out)
    check_grads(q, k, v, attn_mask=allowed)


def test_float32_in_float32_out():
    q, k, v = (a.astype(np.float32) for a in draw((2,), 3, 4, 2, 3, seed=11))
    out, cache = sdpa_forward(q, k, v, attn_mask=np.zeros((3, 4), np.float32))
    assert out.dtype == np.float32
    g = sdpa_backward(np.ones_like(out), cache)
    assert all(g[n].dtype == np.float32 for n in "qkv")
    ref, _ = sdpa_forward(*(a.astype(np.float64) for a in (q, k, v)))
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- gradients

@pytest.mark.parametrize("lead,L,S,E,Ev", [((3,), 4, 6, 5, 2), ((1,), 2, 3, 1, 1), ((2, 3), 5, 2, 3, 4)])
def test_gradients_without_mask(lead, L, S, E, Ev):
    check_grads(*draw(lead, L, S, E, Ev, seed=12))


@pytest.mark.parametrize("mask_shape", [(4, 6), (2, 1, 6), (3, 1, 1, 6), (3, 2, 4, 6)])
def test_gradients_with_a_boolean_mask(mask_shape):
    q, k, v = draw((3, 2), 4, 6, 3, 2, seed=13)
    check_grads(q, k, v, attn_mask=bool_mask(mask_shape, seed=14))


def test_gradients_with_a_float_mask_and_a_scale():
    q, k, v = draw((3,), 4, 5, 2, 3, seed=15)
    add = np.random.default_rng(16).normal(0.0, 1.0, (3, 4, 5))
    add[1, 0, 3] = -np.inf
    check_grads(q, k, v, attn_mask=add, scale=0.35)


# --------------------------------------------------------------------------- errors

def test_bad_inputs_raise_naming_the_argument():
    q, k, v = draw((2,), 3, 4, 2, 3)
    with pytest.raises(ValueError, match="q must have at least 2 dimensions"):
        sdpa_forward(q[0, 0], k, v)
    with pytest.raises(TypeError, match="k must have the same dtype as q"):
        sdpa_forward(q, k.astype(np.float32), v)
    with pytest.raises(TypeError, match="v must be a numpy.ndarray"):
        sdpa_forward(q, k, v.tolist())
    with pytest.raises(ValueError, match="k must have q's last dimension E = 2"):
        sdpa_forward(q, np.zeros((2, 4, 3)), v)
    with pytest.raises(ValueError, match="v must have k's sequence length S = 4"):
        sdpa_forward(q, k, np.zeros((2, 5, 3)))
    with pytest.raises(ValueError, match="same leading dimensions"):
        sdpa_forward(q, k[:1], v[:1])
    with pytest.raises(ValueError, match=r"attn_mask must be broadcastable to the scores' shape \(\.\.\., L, S\) = \(2, 3, 4\), got shape \(3, 5\)"):
        sdpa_forward(q, k, v, attn_mask=np.ones((3, 5), bool))
    with pytest.raises(TypeError, match="attn_mask must be boolean"):
        sdpa_forward(q, k, v, attn_mask=np.ones((3, 4), np.int64))
    with pytest.raises(TypeError, match="a float attn_mask must have the dtype of q"):
        sdpa_forward(q, k, v, attn_mask=np.ones((3, 4), np.float32))
    with pytest.raises(TypeError, match="scale must be None or a finite real number"):
        sdpa_forward(q, k, v, scale="0.5")
    with pytest.raises(ValueError, match=r"k must have at least one key \(S >= 1\)"):
        sdpa_forward(q, k[:, :0], v[:, :0])
    out, cache = sdpa_forward(q, k, v)
    with pytest.raises(ValueError, match=r"d_out must have the output's shape \(2, 3, 3\)"):
        sdpa_backward(np.zeros((2, 3, 2)), cache)
    with pytest.raises(TypeError, match="d_out must have the forward's dtype float64"):
        sdpa_backward(out.astype(np.float32), cache)


def test_exported_from_npattn():
    assert npattn.scaled_dot_product_attention_forward is sdpa_forward
    assert npattn.scaled_dot_product_attention_backward is sdpa_backward
    assert "scaled_dot_product_attention_forward" in npattn.functional.__all__
