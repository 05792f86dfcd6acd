"""NonLocalAttn, ViTAttention and MultiheadAttention: forward against loop oracles written
from the reference modules' code, gradients by central differences (every input and
parameter, training and eval, masks of both kinds, L != S, head width 1, batch 1 and 3),
exact zero gradients, fully masked queries, self-attention with one array, state_dict
layout and initialisation, errors naming the argument."""

import math

import numpy as np
import pytest
from blocks_testlib import batch_norm_loop, check_gradients, conv2d_loop, randomize_params

import npattn
from npattn import MultiheadAttention, NonLocalAttn, ViTAttention
from npattn.gradcheck import gradcheck




# --------------------------------------------------------------------------- oracles


def softmax_row(scores):
    """softmax of a list of floats (-inf allowed); NaN when every entry is -inf (0/0)."""
    top = max(scores)
    if top == -math.inf:
        return [math.nan] * len(scores)
    e = [math.exp(s - top) for s in scores]
    return [x / sum(e) for x in e]


def heads_attention_loop(q, k, v, heads, add):
    """q (N, L, E), k (N, S, E), v (N, S, E), add (N, heads, L, S) or None, by loops."""
    n, L, e = q.shape
    S = k.shape[1]
    d = e // heads
    out = np.zeros((n, L, e))
    weights = np.zeros((n, heads, L, S))
    for b in range(n):
        for h in range(heads):
            cols = slice(h * d, (h + 1) * d)
            for i in range(L):
                scores = []
                for j in range(S):
                    s = sum(float(q[b, i, cols][c]) * float(k[b, j, cols][c]) for c in range(d)) / math.sqrt(d)
                    scores.append(s + (0.0 if add is None else float(add[b, h, i, j])))
                w = softmax_row(scores)
                weights[b, h, i] = w
                for j in range(S):
                    out[b, i, cols] += w[j] * v[b, j, cols]
    return out, weights


def mha_oracle(blk, query, key, value, key_padding_mask=None, attn_mask=None):
    """torch.nn.functional.multi_head_attention_forward's steps, from its source."""
    s = blk.state_dict()
    if not blk.batch_first:
        query, key, value = (a.transpose(1, 0, 2) for a in (query, key, value))
    n, L, e = query.shape
    S = key.shape[1]
    h = blk.num_heads
    if blk.separate_proj:
        wq, wk, wv = s["q_proj_weight"], s["k_proj_weight"], s["v_proj_weight"]
    else:
        wq, wk, wv = np.split(s["in_proj_weight"], 3)
    bq, bk, bv = np.split(s["in_proj_bias"], 3) if blk.bias else (0.0, 0.0, 0.0)
    q, k, v = query @ wq.T + bq, key @ wk.T + bk, value @ wv.T + bv
    add = np.zeros((n, h, L, S))
    for mask, kind in ((key_padding_mask, "kpm"), (attn_mask, "am")):
        if mask is None:
            continue
        m = np.where(mask, -np.inf, 0.0) if mask.dtype == bool else mask
        if kind == "kpm":
            add += m[:, None, None, :]
        elif m.ndim == 2:
            add += m[None, None]
        else:
            add += m.reshape(n, h, L, S)
    o, w = heads_attention_loop(q, k, v, h, add)
    out = o @ s["out_proj.weight"].T + (s["out_proj.bias"] if blk.bias else 0.0)
    if not blk.batch_first:
        out = out.transpose(1, 0, 2)
    return out, w.mean(axis=1)


def vit_oracle(blk, x):
    s = blk.state_dict()
    qkv = x @ s["qkv.weight"].T + (s["qkv.bias"] if blk.qkv_bias else 0.0)
    q, k, v = np.split(qkv, 3, axis=-1)
    o, _ = heads_attention_loop(q, k, v, blk.num_heads, None)
    return o @ s["proj.weight"].T + s["proj.bias"]


def non_local_oracle(blk, x, training):
    """timm's NonLocalAttn.forward, from its source; returns (out, running statistics)."""
    s = blk.state_dict()
    b, c, hh, ww = x.shape
    t, p, g = (conv2d_loop(x, s[f"{n}.weight"], s[f"{n}.bias"], 0, 1, 1) for n in "tpg")
    cr = t.shape[1]
    tt = t.reshape(b, cr, -1).transpose(0, 2, 1)
    pp = p.reshape(b, cr, -1)
    gg = g.reshape(b, cr, -1).transpose(0, 2, 1)
    y = np.zeros_like(tt)
    scale = c ** -0.5 if blk.use_scale else 1.0
    for n in range(b):
        for i in range(hh * ww):
            w = softmax_row([float(tt[n, i] @ pp[n, :, j]) * scale for j in range(hh * ww)])
            y[n, i] = sum(w[j] * gg[n, j] for j in range(hh * ww))
    u = y.transpose(0, 2, 1).reshape(b, cr, hh, ww)
    z = conv2d_loop(u, s["z.weight"], s["z.bias"], 0, 1, 1)
    out, stats = batch_norm_loop(z, s, "norm.", training)
    return out + x, stats


# ------------------------------------------------------------------ MHA configurations

MHA_CONFIGS = {
    # name: (constructor kwargs, N, L, S)
    "seq_first": (dict(embed_dim=6, num_heads=2), 3, 4, 5),
    "batch_first": (dict(embed_dim=6, num_heads=3, batch_first=True), 3, 5, 2),
    "kdim_vdim": (dict(embed_dim=4, num_heads=2, kdim=3, vdim=5), 3, 2, 4),
    "no_bias_head_dim_1": (dict(embed_dim=3, num_heads=3, bias=False, batch_first=True), 1, 3, 4),
    "one_head_batch_1": (dict(embed_dim=4, num_heads=1, kdim=2), 1, 4, 3),
}


def make_mha(name, seed=0, dtype=np.float64):
    cfg, n, L, S = MHA_CONFIGS[name]
    rng = np.random.default_rng(seed)
    blk = randomize_params(MultiheadAttention(**cfg, rng=rng, dtype=dtype), rng)
    bf = blk.batch_first
    shape = (lambda t, w: (n, t, w)) if bf else (lambda t, w: (t, n, w))
    xs = [rng.standard_normal(shape(L, blk.embed_dim)), rng.standard_normal(shape(S, blk.kdim)), rng.standard_normal(shape(S, blk.vdim))]
    return blk, [x.astype(dtype) for x in xs], (n, L, S)


def masks(kind, n, h, L, S, seed, three_d=False):
    """(key_padding_mask, attn_mask) of ``kind`` "bool" (True = masked) or "float";
    key 0 is never masked, so no query loses every key."""
    rng = np.random.default_rng(seed)
    am_shape = (n * h, L, S) if three_d else (L, S)
    if kind == "bool":
        kpm, am = rng.random((n, S)) < 0.3, rng.random(am_shape) < 0.3
        kpm[:, 0] = False
        am[..., 0] = False
        return kpm, am
    kpm, am = rng.normal(0.0, 1.0, (n, S)), rng.normal(0.0, 1.0, am_shape)
    am[..., 1:][rng.random(am[..., 1:].shape) < 0.2] = -np.inf
    return kpm, am


class WithMasks:
    """A block whose forward has the masks fixed, for gradcheck_block (masks are
    constants: not differentiated)."""

    def __init__(self, blk, kpm, am):
        self.blk, self.kpm, self.am = blk, kpm, am
        self.dtype = blk.dtype

    def __getattr__(self, name):
        return getattr(self.blk, name)

    def forward(self, q, k, v, training=False):
        return self.blk.forward(q, k, v, self.kpm, self.am, training=training)

    def backward(self, dy, cache):
        return self.blk.backward(dy, cache)


# --------------------------------------------------------------------------- MHA: forward


@pytest.mark.parametrize("name", list(MHA_CONFIGS))
@pytest.mark.parametrize("mask_kind", [None, "bool", "float"])
def test_mha_forward_and_weights_match_loop_oracle(name, mask_kind):
    blk, xs, (n, L, S) = make_mha(name)
    kpm, am = (None, None) if mask_kind is None else masks(mask_kind, n, blk.num_heads, L, S, seed=1, three_d=name == "seq_first")
    out, cache = blk.forward(*xs, kpm, am)
    exp_out, exp_w = mha_oracle(blk, *xs, kpm, am)
    np.testing.assert_allclose(out, exp_out, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(cache.attn_weights, exp_w, rtol=1e-12, atol=1e-14)
    assert cache.attn_weights.shape == (n, L, S)
    np.testing.assert_allclose(cache.attn_weights.sum(axis=-1), 1.0, atol=1e-14)
    if mask_kind == "bool":
        every_head = am.reshape(n, -1, L, S).all(axis=1) if am.ndim == 3 else am[None]  # masked in every head
        assert np.all(cache.attn_weights[kpm[:, None, :] | every_head] == 0.0)


def test_mha_mixed_mask_kinds_add_up():
    blk, xs, (n, L, S) = make_mha("seq_first")
    kpm_b, am_b = masks("bool", n, 2, L, S, seed=2)
    _, am_f = masks("float", n, 2, L, S, seed=3)
    out, _ = blk.forward(*xs, kpm_b, am_f)
    np.testing.assert_allclose(out, mha_oracle(blk, *xs, kpm_b, am_f)[0], rtol=1e-12, atol=1e-13)


def test_mha_fully_masked_query_is_nan_as_torch():
    """torch's MultiheadAttention (need_weights=True, its default) returns NaN for a query
    whose every key is masked; so does npattn, and the NaN spreads in the backward to that
    sample's key and value gradients and to the projection weights (torch's pattern, checked
    in tests/crosscheck)."""
    blk, xs, (n, L, S) = make_mha("batch_first")  # N 3, L 5, S 2
    kpm = np.zeros((n, S), bool)
    kpm[1, 0] = True
    am = np.zeros((L, S), bool)
    am[3, 1] = True  # sample 1, query 3: both keys masked
    out, cache = blk.forward(*xs, kpm, am)
    nan_rows = np.zeros((n, L), bool)
    nan_rows[1, 3] = True
    assert np.all(np.isnan(out[nan_rows])) and not np.any(np.isnan(out[~nan_rows]))
    assert np.all(np.isnan(cache.attn_weights[1, 3])) and np.isnan(cache.attn_weights).sum() == S
    np.testing.assert_allclose(out[~nan_rows], mha_oracle(blk, *xs, kpm, am)[0][~nan_rows], rtol=1e-12, atol=1e-13)
    dy = np.random.default_rng(4).standard_normal(out.shape)
    (dq, dk, dv), grads = blk.backward(dy, cache)
    assert np.array_equal(np.isnan(dq).any(axis=-1), nan_rows)
    assert np.all(np.isnan(dk[1])) and np.all(np.isnan(dv[1])) and not np.any(np.isnan(dk[[0, 2]]))
    assert np.all(np.isnan(grads["in_proj_weight"]))


# --------------------------------------------------------------------------- MHA: gradients


@pytest.mark.parametrize("name", list(MHA_CONFIGS))
@pytest.mark.parametrize("mask_kind", [None, "bool", "float"])
@pytest.mark.parametrize("training", [False, True])
def test_mha_gradients_every_input_and_parameter(name, mask_kind, training):
    blk, xs, (n, L, S) = make_mha(name, seed=5)
    kpm, am = (None, None) if mask_kind is None else masks(mask_kind, n, blk.num_heads, L, S, seed=6, three_d=name == "kdim_vdim")
    check_gradients(WithMasks(blk, kpm, am), xs, training=training)


@pytest.mark.parametrize("name", ["seq_first", "kdim_vdim"])
def test_mha_key_bias_gradient_is_exactly_zero(name):
    blk, xs, (n, L, S) = make_mha(name, seed=7)
    kpm, am = masks("float", n, blk.num_heads, L, S, seed=8)
    y, cache = blk.forward(*xs, kpm, am)
    _, grads = blk.backward(np.random.default_rng(9).standard_normal(y.shape), cache)
    e = blk.embed_dim
    assert np.all(grads["in_proj_bias"][e : 2 * e] == 0.0)
    assert np.all(grads["in_proj_bias"][:e] != 0.0) and np.all(grads["in_proj_bias"][2 * e :] != 0.0)


def test_mha_self_attention_gradient_is_the_sum_of_the_three():
    """One array x as query, key and value: dL/dx = d_query + d_key + d_value, checked by
    central differences of x -> forward(x, x, x)."""
    blk, xs, (n, L, S) = make_mha("batch_first", seed=10)
    x = xs[0]
    kpm, am = masks("bool", n, blk.num_heads, L, L, seed=11)

    def fwd(x):
        return blk.forward(x, x, x, kpm, am)

    def bwd(dy, cache):
        (dq, dk, dv), _ = blk.backward(dy, cache)
        return {"x": dq + dk + dv}

    report = gradcheck(fwd, bwd, {"x": x}, raise_on_failure=False)
    assert report.ok, report.failure_message()
    assert report.tensors[0].max_abs_err / report.tensors[0].scale < 1e-6


def test_mha_forward_twice_then_backward_and_float32():
    blk, xs, _ = make_mha("seq_first", seed=12)
    y1, c1 = blk.forward(*xs)
    y2, c2 = blk.forward(*[2 * x for x in xs])
    g1 = blk.backward(np.ones_like(y1), c1)
    g1_again = blk.backward(np.ones_like(y1), c1)
    np.testing.assert_array_equal(g1[0][0], g1_again[0][0])
    blk32 = blk.to(np.float32)
    y32, c32 = blk32.forward(*[x.astype(np.float32) for x in xs])
    assert y32.dtype == np.float32 and c32.attn_weights.dtype == np.float32
    np.testing.assert_allclose(y32, y1, rtol=1e-4, atol=1e-5)
    (dq, dk, dv), grads = blk32.backward(np.ones_like(y32), c32)
    assert dq.dtype == dk.dtype == dv.dtype == np.float32
    assert all(g.dtype == np.float32 for g in grads.values())


# --------------------------------------------------------------------------- MHA: layout


def test_mha_state_dict_keys_shapes_and_initialisation():
    blk = MultiheadAttention(8, 2, rng=0)
    assert list(blk.state_dict()) == ["in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias"]
    assert blk["in_proj_weight"].shape == (24, 8) and blk["in_proj_bias"].shape == (24,)
    assert np.all(blk["in_proj_bias"] == 0) and np.all(blk["out_proj.bias"] == 0)
    assert np.max(np.abs(blk["in_proj_weight"])) <= math.sqrt(6 / 32)
    assert blk.dtype == np.float32 and blk["in_proj_weight"].dtype == np.float32
    sep = MultiheadAttention(8, 2, kdim=3, vdim=5, bias=False, rng=0)
    assert [(k, v.shape) for k, v in sep.state_dict().items()] == [
        ("q_proj_weight", (8, 8)), ("k_proj_weight", (8, 3)), ("v_proj_weight", (8, 5)), ("out_proj.weight", (8, 8))]
    assert list(MultiheadAttention(8, 2, kdim=8, vdim=8, rng=0).state_dict())[0] == "in_proj_weight"
    with pytest.raises(KeyError, match="missing keys"):
        blk.load_state_dict({"in_proj_weight": blk["in_proj_weight"]})


def test_mha_bad_inputs_raise_naming_the_argument():
    blk = MultiheadAttention(6, 2, kdim=4, rng=0)
    q, k, v = np.zeros((3, 2, 6), np.float32), np.zeros((5, 2, 4), np.float32), np.zeros((5, 2, 6), np.float32)
    blk.forward(q, k, v)
    with pytest.raises(ValueError, match=r"query must have 3 dimensions \(L, N, E\)"):
        blk.forward(q[0], k, v)
    with pytest.raises(ValueError, match=r"key must have kdim = 4 features"):
        blk.forward(q, v, v)
    with pytest.raises(TypeError, match="value has dtype float64 but the block's parameters are float32"):
        blk.forward(q, k, v.astype(np.float64))
    with pytest.raises(ValueError, match="same batch size"):
        blk.forward(q, k[:, :1], v[:, :1])
    with pytest.raises(ValueError, match="value must have key's sequence length S = 5"):
        blk.forward(q, k, v[:4])
    with pytest.raises(ValueError, match=r"key_padding_mask must have shape \(N, S\) = \(2, 5\), got \(5, 2\)"):
        blk.forward(q, k, v, key_padding_mask=np.zeros((5, 2), bool))
    with pytest.raises(ValueError, match=r"attn_mask must have shape \(L, S\) or \(N \* num_heads, L, S\) = \(3, 5\) or \(4, 3, 5\), got \(2, 3, 5\)"):
        blk.forward(q, k, v, attn_mask=np.zeros((2, 3, 5), bool))
    with pytest.raises(TypeError, match="attn_mask must be boolean"):
        blk.forward(q, k, v, attn_mask=np.zeros((3, 5), np.int8))
    with pytest.raises(TypeError, match="a float key_padding_mask must have the block's dtype float32"):
        blk.forward(q, k, v, key_padding_mask=np.zeros((2, 5)))
    with pytest.raises(ValueError, match="num_heads must divide embed_dim"):
        MultiheadAttention(6, 4)
    with pytest.raises(TypeError, match="batch_first must be a bool"):
        MultiheadAttention(6, 2, batch_first=1)
    y, cache = blk.forward(q, k, v)
    with pytest.raises(ValueError, match=r"grad_out must have shape \(3, 2, 6\)"):
        blk.backward(np.zeros((2, 3, 6), np.float32), cache)
    with pytest.raises(TypeError, match="grad_out must have the forward input's dtype"):
        blk.backward(np.zeros((3, 2, 6)), cache)


# --------------------------------------------------------------------------- ViTAttention


def make_vit(dim=6, heads=3, qkv_bias=True, seed=0):
    rng = np.random.default_rng(seed)
    return randomize_params(ViTAttention(dim, heads, qkv_bias=qkv_bias, rng=rng, dtype=np.float64), rng)


@pytest.mark.parametrize("dim,heads,qkv_bias,shape", [(6, 3, True, (3, 5, 6)), (4, 4, False, (1, 3, 4)), (8, 2, True, (2, 1, 8))])
def test_vit_forward_matches_loop_oracle(dim, heads, qkv_bias, shape):
    blk = make_vit(dim, heads, qkv_bias)
    x = np.random.default_rng(1).standard_normal(shape)
    out, _ = blk.forward(x)
    np.testing.assert_allclose(out, vit_oracle(blk, x), rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("dim,heads,qkv_bias,shape", [(6, 3, True, (3, 5, 6)), (4, 4, False, (1, 3, 4)), (6, 2, True, (3, 4, 6))])
@pytest.mark.parametrize("training", [False, True])
def test_vit_gradients_and_exact_zero_key_bias(dim, heads, qkv_bias, shape, training):
    blk = make_vit(dim, heads, qkv_bias, seed=2)
    x = np.random.default_rng(3).standard_normal(shape)
    check_gradients(blk, [x], training=training)
    if qkv_bias:
        y, cache = blk.forward(x, training=training)
        _, grads = blk.backward(np.random.default_rng(4).standard_normal(y.shape), cache)
        assert np.all(grads["qkv.bias"][dim : 2 * dim] == 0.0) and np.all(grads["qkv.bias"][:dim] != 0.0)


def test_vit_state_dict_and_errors():
    blk = ViTAttention(8, 2, rng=0)
    assert [(k, v.shape) for k, v in blk.state_dict().items()] == [("qkv.weight", (24, 8)), ("proj.weight", (8, 8)), ("proj.bias", (8,))]
    assert list(ViTAttention(8, 2, qkv_bias=True, rng=0).state_dict()) == ["qkv.weight", "qkv.bias", "proj.weight", "proj.bias"]
    assert blk.scale == 0.5
    with pytest.raises(ValueError, match=r"x must have 3 dimensions \(N, tokens, dim\)"):
        blk.forward(np.zeros((2, 8), np.float32))
    with pytest.raises(ValueError, match="x must have dim = 8 features"):
        blk.forward(np.zeros((2, 3, 6), np.float32))
    with pytest.raises(ValueError, match="num_heads must divide dim"):
        ViTAttention(8, 3)


# --------------------------------------------------------------------------- NonLocalAttn


def make_nl(seed=0, **cfg):
    rng = np.random.default_rng(seed)
    cfg = {"in_channels": 8, **cfg}
    return randomize_params(NonLocalAttn(**cfg, rng=rng, dtype=np.float64), rng)


NL_CASES = {
    # name: (constructor kwargs, input shape)
    "default": (dict(in_channels=16), (3, 16, 3, 4)),
    "no_scale_rd4": (dict(in_channels=8, use_scale=False, rd_channels=4), (3, 8, 2, 5)),
    "batch_1": (dict(in_channels=8, rd_channels=2), (1, 8, 3, 3)),
}


@pytest.mark.parametrize("name", list(NL_CASES))
@pytest.mark.parametrize("training", [False, True])
def test_non_local_forward_and_running_statistics_match_loop_oracle(name, training):
    cfg, shape = NL_CASES[name]
    blk = make_nl(**cfg)
    x = np.random.default_rng(1).standard_normal(shape)
    expected, stats = non_local_oracle(blk, x, training)
    out, _ = blk.forward(x, training=training)
    np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-13)
    s = blk.state_dict()
    np.testing.assert_allclose(s["norm.running_mean"], stats[0], rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(s["norm.running_var"], stats[1], rtol=1e-12, atol=1e-14)
    assert int(s["norm.num_batches_tracked"]) == stats[2]


def nl_zero_keys(training):
    return ("p.bias", "g.bias", "z.bias") if training else ("p.bias",)


@pytest.mark.parametrize("name", list(NL_CASES))
@pytest.mark.parametrize("training", [False, True])
def test_non_local_gradients_every_input_and_parameter(name, training):
    cfg, shape = NL_CASES[name]
    blk = make_nl(seed=2, **cfg)
    x = np.random.default_rng(3).standard_normal(shape)
    check_gradients(blk, [x], training=training, zero_keys=nl_zero_keys(training))
    y, cache = blk.forward(x, training=training)
    _, grads = blk.backward(np.random.default_rng(4).standard_normal(y.shape), cache)
    for k in blk.parameter_names():
        if k in nl_zero_keys(training):
            assert np.all(grads[k] == 0.0), k  # exact zeros, not rounding noise
        else:
            assert np.any(grads[k] != 0.0), k


def test_non_local_channels_scale_and_identity_at_initialisation():
    assert NonLocalAttn(64, rng=0).rd_channels == 8
    assert NonLocalAttn(16, rng=0).rd_channels == 8  # at least the divisor
    assert NonLocalAttn(200, rng=0).rd_channels == 24  # 25 rounded to a multiple of 8
    assert NonLocalAttn(64, rd_ratio=1 / 4, rd_divisor=4, rng=0).rd_channels == 16
    assert NonLocalAttn(64, rng=0).scale == 64 ** -0.5  # timm: the input channels
    assert NonLocalAttn(64, use_scale=False, rng=0).scale == 1.0
    blk = NonLocalAttn(8, rd_channels=4, rng=0)
    assert list(blk.state_dict()) == [
        "t.weight", "t.bias", "p.weight", "p.bias", "g.weight", "g.bias", "z.weight", "z.bias",
        "norm.weight", "norm.bias", "norm.running_mean", "norm.running_var", "norm.num_batches_tracked"]
    assert blk["t.weight"].shape == (4, 8, 1, 1) and blk["z.weight"].shape == (8, 4, 1, 1)
    assert np.all(blk["norm.weight"] == 0) and np.all(blk["t.bias"] == 0)
    x = np.random.default_rng(0).standard_normal((2, 8, 3, 3)).astype(np.float32)
    for training in (False, True):
        out, _ = blk.forward(x, training=training)
        np.testing.assert_array_equal(out, x)  # timm's zero BatchNorm weight: the identity


def test_non_local_errors():
    blk = NonLocalAttn(8, rng=0)
    with pytest.raises(ValueError, match="x must have 8 channels"):
        blk.forward(np.zeros((2, 4, 3, 3), np.float32))
    with pytest.raises(ValueError, match="x must have 4 dimensions"):
        blk.forward(np.zeros((8, 3, 3), np.float32))
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        blk.forward(np.zeros((1, 8, 1, 1), np.float32), training=True)
    with pytest.raises(TypeError, match="use_scale must be a bool"):
        NonLocalAttn(8, use_scale=None)
    y, cache = blk.forward(np.zeros((2, 8, 3, 3), np.float32))
    with pytest.raises(ValueError, match="grad_out must have shape"):
        blk.backward(np.zeros((2, 8, 3, 2), np.float32), cache)


def test_exported():
    for name in ("NonLocalAttn", "ViTAttention", "MultiheadAttention"):
        assert name in npattn.__all__


@pytest.mark.parametrize("shape", [(2, 4, 0, 3), (2, 4, 3, 0)])
def test_non_local_empty_image_raises_naming_x(shape):
    """H or W = 0: timm's NonLocalAttn refuses it in its 1x1 convolutions; npattn raised
    conv2d's "output height would be 0", naming no argument of the block. Now a
    ValueError naming x."""
    with pytest.raises(ValueError, match=r"x must have H >= 1 and W >= 1") as info:
        NonLocalAttn(4, dtype=np.float64).forward(np.zeros(shape))
    assert str(info.value).startswith("NonLocalAttn: x must") and str(shape) in str(info.value)


@pytest.mark.parametrize("n", [0, 2])
def test_vit_attention_zero_tokens_as_timm(n):
    """x with 0 tokens: the forward raised numpy's "zero-size array to reduction operation
    maximum which has no identity" (the scores' row maximum over no keys). timm's
    Attention returns the empty output and zero gradients; npattn now does the same."""
    blk = ViTAttention(4, 2, qkv_bias=True, rng=0, dtype=np.float64)
    y, cache = blk.forward(np.zeros((n, 0, 4)))
    (dx,), grads = blk.backward(np.zeros((n, 0, 4)), cache)
    assert y.shape == dx.shape == (n, 0, 4)
    for k, g in grads.items():
        assert g.shape == blk[k].shape and g.dtype == np.float64 and not g.any(), k


# ------------------------------------------------------- ViTAttention: timm's options


def layer_norm_rows_loop(a, gamma, beta, eps):
    """LayerNorm over the last axis, by loops (biased variance, as torch)."""
    out = np.zeros(a.shape)
    for idx in np.ndindex(*a.shape[:-1]):
        vals = [float(v) for v in a[idx]]
        mu = sum(vals) / len(vals)
        var = sum((v - mu) ** 2 for v in vals) / len(vals)
        out[idx] = [(v - mu) / math.sqrt(var + eps) * float(g) + float(b) for v, g, b in zip(vals, gamma, beta)]
    return out


def vit_options_oracle(blk, x, attn_mask=None, is_causal=False):
    """timm's Attention.forward with its default (fused) path, from its source: gate from
    x, qkv, per-head q_norm / k_norm, softmax with the mask (boolean True = attend, float
    added, is_causal: keys j <= i), a query with no key left gives 0 (as
    F.scaled_dot_product_attention), norm, gate, proj."""
    s = blk.state_dict()
    n, t, _ = x.shape
    h, d, a = blk.num_heads, blk.head_dim, blk.attn_dim
    qkv = x @ s["qkv.weight"].T + (s["qkv.bias"] if blk.qkv_bias else 0.0)
    q, k, v = qkv[..., :a], qkv[..., a : 2 * a], qkv[..., 2 * a :]
    if blk.qk_norm:
        eps = blk.norm_eps
        q = layer_norm_rows_loop(q.reshape(n, t, h, d), s["q_norm.weight"], s["q_norm.bias"], eps).reshape(n, t, a)
        k = layer_norm_rows_loop(k.reshape(n, t, h, d), s["k_norm.weight"], s["k_norm.bias"], eps).reshape(n, t, a)
    add = np.zeros((n, h, t, t))
    if is_causal:
        add += np.where(np.arange(t)[None, :] > np.arange(t)[:, None], -np.inf, 0.0)
    elif attn_mask is not None:
        add += np.where(attn_mask, 0.0, -np.inf) if attn_mask.dtype == bool else attn_mask
    o, _ = heads_attention_loop(q, k, v, h, add)
    o = np.where(np.isnan(o), 0.0, o)  # the loop's 0/0 for a query with no key: 0, as torch's fused path
    if blk.scale_norm:
        o = layer_norm_rows_loop(o, s["norm.weight"], s["norm.bias"], blk.norm_eps)
    if blk.gated:
        pre = x @ s["gate.weight"].T + (s["gate.bias"] if blk.qkv_bias else 0.0)
        o = o * (1.0 / (1.0 + np.exp(-pre)))
    return o @ s["proj.weight"].T + (s["proj.bias"] if blk.proj_bias else 0.0)


def make_vit_options(seed=0, **cfg):
    """Every parameter random, the LayerNorm weights around 1."""
    rng = np.random.default_rng(seed)
    blk = ViTAttention(**cfg, rng=rng, dtype=np.float64)
    state = blk.state_dict()
    for k, v in state.items():
        state[k] = rng.uniform(0.5, 1.5, v.shape) if k.endswith("norm.weight") else rng.normal(0.0, 0.5, v.shape)
    blk.load_state_dict(state)
    return blk


class WithForwardArgs:
    """A block whose forward always gets the given keywords (masks, is_causal): what the
    gradient checks call."""

    def __init__(self, block, **kw):
        self.block, self.kw = block, kw

    def __getattr__(self, name):
        return getattr(self.block, name)

    def forward(self, *inputs, training=False):
        return self.block.forward(*inputs, training=training, **self.kw)


VIT_OPTION_CASES = {
    # name: (constructor kwargs, x shape); odd token counts, head widths and widths
    "head_dim_3_dim_out_7": (dict(dim=5, num_heads=2, attn_head_dim=3, dim_out=7, qkv_bias=True), (3, 5, 5)),
    "qk_norm": (dict(dim=6, num_heads=2, qkv_bias=True, qk_norm=True), (2, 5, 6)),
    "scale_norm_no_proj_bias": (dict(dim=6, num_heads=3, scale_norm=True, proj_bias=False), (3, 3, 6)),
    "gated_qkv_bias": (dict(dim=6, num_heads=3, gated=True, qkv_bias=True), (2, 5, 6)),
    "gated_no_bias": (dict(dim=4, num_heads=1, gated=True), (1, 3, 4)),
    "all_eps_1e-5": (dict(dim=5, num_heads=3, attn_head_dim=3, dim_out=4, qkv_bias=True, qk_norm=True, scale_norm=True,
                          gated=True, proj_bias=False, norm_eps=1e-5), (3, 5, 5)),
}


def vit_mask(kind, blk, n, t, seed=0):
    """Forward keywords: a boolean mask (N, 1, T, T) True = attend, with sample 0's query 1
    fully masked; a float mask (h, T, T) with -inf entries; or is_causal."""
    rng = np.random.default_rng(seed)
    if kind == "bool":
        m = rng.random((n, 1, t, t)) < 0.6
        m[..., 0] = True
        m[0, 0, 1] = False
        return {"attn_mask": m}
    if kind == "float":
        m = rng.normal(0.0, 1.0, (blk.num_heads, t, t))
        m[..., 1:][rng.random(m[..., 1:].shape) < 0.3] = -np.inf
        return {"attn_mask": m}
    return {"is_causal": True} if kind == "causal" else {}


@pytest.mark.parametrize("name", list(VIT_OPTION_CASES))
@pytest.mark.parametrize("kind", [None, "bool", "float", "causal"])
def test_vit_options_forward_matches_loop_oracle(name, kind):
    cfg, shape = VIT_OPTION_CASES[name]
    blk = make_vit_options(**cfg)
    x = np.random.default_rng(1).standard_normal(shape)
    kw = vit_mask(kind, blk, shape[0], shape[1])
    out, _ = blk.forward(x, **kw)
    assert out.shape == shape[:2] + (blk.dim_out,)
    np.testing.assert_allclose(out, vit_options_oracle(blk, x, **kw), rtol=1e-12, atol=1e-13)


def vit_zero_keys(blk):
    return ("k_norm.bias",) if blk.qk_norm else ()


@pytest.mark.parametrize("name", list(VIT_OPTION_CASES))
@pytest.mark.parametrize("training", [False, True])
def test_vit_options_gradients(name, training):
    cfg, shape = VIT_OPTION_CASES[name]
    blk = make_vit_options(seed=2, **cfg)
    x = np.random.default_rng(3).standard_normal(shape)
    check_gradients(blk, [x], training=training, zero_keys=vit_zero_keys(blk))


@pytest.mark.parametrize("name", ["qk_norm", "all_eps_1e-5", "head_dim_3_dim_out_7"])
@pytest.mark.parametrize("kind", ["bool", "float", "causal"])
@pytest.mark.parametrize("training", [False, True])
def test_vit_options_gradients_with_masks(name, kind, training):
    cfg, shape = VIT_OPTION_CASES[name]
    blk = make_vit_options(seed=4, **cfg)
    x = np.random.default_rng(5).standard_normal(shape)
    check_gradients(WithForwardArgs(blk, **vit_mask(kind, blk, shape[0], shape[1], seed=6)), [x], training=training,
                    zero_keys=vit_zero_keys(blk))


def test_vit_exact_zeros_with_and_without_qk_norm():
    """The key bias shifts each score row by a constant only without qk_norm; k_norm's
    beta always does."""
    x = np.random.default_rng(7).standard_normal((2, 5, 6))
    for qk_norm in (False, True):
        blk = make_vit_options(dim=6, num_heads=2, qkv_bias=True, qk_norm=qk_norm, gated=True)
        y, cache = blk.forward(x, is_causal=True)
        _, grads = blk.backward(np.random.default_rng(8).standard_normal(y.shape), cache)
        key_bias = grads["qkv.bias"][6:12]
        assert np.all(key_bias != 0.0) if qk_norm else np.all(key_bias == 0.0)
        if qk_norm:
            assert np.all(grads["k_norm.bias"] == 0.0) and np.all(grads["q_norm.bias"] != 0.0)


def test_vit_qk_norm_head_dim_1_gives_beta_and_exact_zeros():
    """A LayerNorm of one value is its beta: q and k no longer depend on x, the query and
    key rows of qkv and the LayerNorm weights get exact zero gradients; every score of a
    row is beta_q beta_k / sqrt(d), so the weights are uniform and beta_q has none either."""
    blk = make_vit_options(dim=3, num_heads=3, qkv_bias=True, qk_norm=True)
    x = np.random.default_rng(9).standard_normal((2, 4, 3))
    y, cache = blk.forward(x)
    v = x @ blk["qkv.weight"][6:].T + blk["qkv.bias"][6:]  # (N, T, 3)
    uniform = np.broadcast_to(v.mean(axis=1, keepdims=True), v.shape)  # every query: the mean of the values
    np.testing.assert_allclose(y, uniform @ blk["proj.weight"].T + blk["proj.bias"], rtol=1e-13, atol=1e-14)
    _, grads = blk.backward(np.random.default_rng(10).standard_normal(y.shape), cache)
    assert np.all(grads["qkv.weight"][:6] == 0.0) and np.all(grads["qkv.bias"][:6] == 0.0)
    for k in ("q_norm.weight", "q_norm.bias", "k_norm.weight", "k_norm.bias"):
        assert np.all(grads[k] == 0.0), k
    assert np.all(grads["qkv.weight"][6:] != 0.0)
    check_gradients(blk, [x], training=False, zero_keys=("q_norm.weight", "q_norm.bias", "k_norm.weight", "k_norm.bias"))


def test_vit_fully_masked_query_gives_zero_attention_and_no_gradient_through_it():
    blk = make_vit_options(dim=4, num_heads=2, qkv_bias=True)
    x = np.random.default_rng(11).standard_normal((2, 3, 4))
    m = np.ones((2, 2, 3, 3), bool)
    m[1, :, 2] = False  # sample 1, query 2: no key in either head
    y, cache = blk.forward(x, attn_mask=m)
    np.testing.assert_array_equal(y[1, 2], blk["proj.bias"])  # O = 0: only the projection's bias
    dy = np.zeros_like(y)
    dy[1, 2] = 1.0
    (dx,), grads = blk.backward(dy, cache)
    assert not dx.any() and not grads["qkv.weight"].any() and np.all(grads["proj.weight"] == 0.0)


def test_vit_options_state_dict_layout_and_initialisation():
    blk = ViTAttention(5, 2, qkv_bias=True, attn_head_dim=3, dim_out=7, qk_norm=True, scale_norm=True, gated=True,
                       proj_bias=False, rng=0)
    assert [(k, v.shape) for k, v in blk.state_dict().items()] == [
        ("qkv.weight", (18, 5)), ("qkv.bias", (18,)), ("q_norm.weight", (3,)), ("q_norm.bias", (3,)),
        ("k_norm.weight", (3,)), ("k_norm.bias", (3,)), ("norm.weight", (6,)), ("norm.bias", (6,)),
        ("gate.weight", (6, 5)), ("gate.bias", (6,)), ("proj.weight", (7, 6)),
    ]
    for k in ("q_norm.", "k_norm.", "norm."):
        assert np.all(blk[k + "weight"] == 1.0) and np.all(blk[k + "bias"] == 0.0)
    assert blk.attn_dim == 6 and blk.scale == 3 ** -0.5 and blk.norm_eps == 1e-6
    assert list(ViTAttention(8, 2, gated=True, rng=0).state_dict()) == ["qkv.weight", "gate.weight", "proj.weight", "proj.bias"]
    # the defaults draw what they drew before the options existed
    plain, explicit = ViTAttention(8, 2, rng=3), ViTAttention(8, 2, rng=3, attn_head_dim=4, dim_out=8, proj_bias=True)
    for k, v in plain.state_dict().items():
        np.testing.assert_array_equal(v, explicit[k])


def test_vit_options_errors_name_the_argument():
    with pytest.raises(ValueError, match="num_heads must divide dim"):
        ViTAttention(8, 3)
    assert ViTAttention(8, 3, attn_head_dim=2).attn_dim == 6  # no divisibility needed then
    for name, bad in (("qk_norm", 1), ("scale_norm", None), ("gated", "yes"), ("proj_bias", 0)):
        with pytest.raises(TypeError, match=f"{name} must be a bool"):
            ViTAttention(8, 2, **{name: bad})
    with pytest.raises(ValueError, match="attn_head_dim must be"):
        ViTAttention(8, 2, attn_head_dim=0)
    with pytest.raises(ValueError, match="dim_out must be"):
        ViTAttention(8, 2, dim_out=-1)
    with pytest.raises(ValueError, match="norm_eps must be a finite number >= 0"):
        ViTAttention(8, 2, norm_eps=-1e-6)
    with pytest.raises(TypeError, match="norm_eps must be a real number"):
        ViTAttention(8, 2, norm_eps="1e-6")
    blk = ViTAttention(6, 2, dim_out=4, rng=0)
    x = np.zeros((2, 3, 6), np.float32)
    with pytest.raises(ValueError, match="give attn_mask or is_causal=True, not both"):
        blk.forward(x, attn_mask=np.ones((3, 3), bool), is_causal=True)
    with pytest.raises(TypeError, match="is_causal must be a bool"):
        blk.forward(x, is_causal=1)
    with pytest.raises(TypeError, match="training must be a bool, got ndarray; pass a mask as attn_mask="):
        blk.forward(x, np.ones((3, 3), bool))  # timm's positional order: forward(x, attn_mask)
    with pytest.raises(TypeError, match="attn_mask must be None or a numpy.ndarray"):
        blk.forward(x, attn_mask=[[True]])
    with pytest.raises(TypeError, match="attn_mask must be boolean"):
        blk.forward(x, attn_mask=np.ones((3, 3), np.int64))
    with pytest.raises(TypeError, match="a float attn_mask must have the block's dtype float32"):
        blk.forward(x, attn_mask=np.zeros((3, 3)))
    with pytest.raises(ValueError, match=r"attn_mask must be broadcastable to \(N, num_heads, tokens, tokens\) = \(2, 2, 3, 3\)"):
        blk.forward(x, attn_mask=np.ones((3, 4), bool))
    y, cache = blk.forward(x)
    assert y.shape == (2, 3, 4)
    with pytest.raises(ValueError, match=r"grad_out must have shape \(2, 3, 4\)"):
        blk.backward(np.zeros((2, 3, 6), np.float32), cache)


@pytest.mark.parametrize("n", [0, 2])
def test_vit_options_zero_tokens(n):
    blk = make_vit_options(dim=4, num_heads=2, qkv_bias=True, qk_norm=True, scale_norm=True, gated=True, dim_out=3)
    y, cache = blk.forward(np.zeros((n, 0, 4)), is_causal=True)
    (dx,), grads = blk.backward(np.zeros((n, 0, 3)), cache)
    assert y.shape == (n, 0, 3) and dx.shape == (n, 0, 4)
    for k, g in grads.items():
        assert g.shape == blk[k].shape and not g.any(), k


def test_vit_float32_with_options_matches_float64():
    blk = make_vit_options(dim=6, num_heads=2, qkv_bias=True, qk_norm=True, scale_norm=True, gated=True)
    x = np.random.default_rng(12).standard_normal((2, 5, 6))
    m = np.random.default_rng(13).normal(0.0, 1.0, (5, 5))
    y64, c64 = blk.forward(x, attn_mask=m)
    (dx64,), g64 = blk.backward(np.ones_like(y64), c64)
    blk.to(np.float32)
    y32, c32 = blk.forward(x.astype(np.float32), attn_mask=m.astype(np.float32))
    (dx32,), g32 = blk.backward(np.ones(y32.shape, np.float32), c32)
    assert y32.dtype == dx32.dtype == np.float32 and all(g.dtype == np.float32 for g in g32.values())
    for a, b in [(y32, y64), (dx32, dx64)] + [(g32[k], g64[k]) for k in g64 if g64[k].any()]:
        assert np.max(np.abs(a - b)) <= 1e-4 * max(1.0, np.max(np.abs(b)))
