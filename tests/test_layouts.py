"""npattn.layouts: every adapter's round trip, its index map element by element, and the
MultiheadAttention and mask adapters against the math they stand for (no framework)."""

import numpy as np
import pytest

import npattn
from npattn import layouts as L


@pytest.fixture
def rng():
    return np.random.default_rng(19)


def test_import_layouts_imports_no_framework():
    import subprocess
    import sys

    code = "import sys, npattn.layouts; bad = [m for m in ('torch', 'jax', 'keras', 'paddle', 'openvino', 'mindspore', 'tvm', 'tensorflow') if m in sys.modules]; print(bad)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_nchw_nhwc_round_trip_and_index_map(rng, dtype):
    a = rng.standard_normal((2, 3, 5, 4)).astype(dtype)
    b = L.nchw_to_nhwc(a)
    assert b.shape == (2, 5, 4, 3) and b.dtype == dtype and b.flags.c_contiguous
    assert b[1, 4, 2, 0] == a[1, 0, 4, 2] and b[0, 3, 1, 2] == a[0, 2, 3, 1]
    assert np.array_equal(L.nhwc_to_nchw(b), a)
    c = rng.standard_normal((2, 3, 7))  # 1-D spatial: channel axis moves to the end too
    assert np.array_equal(L.nhwc_to_nchw(L.nchw_to_nhwc(c)), c)
    with pytest.raises(ValueError, match="at least 3"):
        L.nchw_to_nhwc(np.zeros((2, 3)))


def test_oihw_hwio_and_linear_dense(rng):
    w = rng.standard_normal((6, 2, 3, 2))
    k = L.oihw_to_hwio(w)
    assert k.shape == (3, 2, 2, 6) and k[2, 1, 0, 5] == w[5, 0, 2, 1]
    assert np.array_equal(L.hwio_to_oihw(k), w)
    lw = rng.standard_normal((4, 7))
    x = rng.standard_normal((3, 7))
    assert np.allclose(x @ L.linear_to_dense(lw), x @ lw.T, rtol=0, atol=0)
    assert np.array_equal(L.dense_to_linear(L.linear_to_dense(lw)), lw)
    with pytest.raises(ValueError, match="4-D"):
        L.oihw_to_hwio(lw)


def test_tokens_and_heads(rng):
    a = rng.standard_normal((4, 2, 3, 5))
    assert np.array_equal(L.bthd_to_bhtd(L.bhtd_to_bthd(a)), a)
    assert L.bhtd_to_bthd(a)[1, 2, 1, 4] == a[1, 1, 2, 4]
    s = rng.standard_normal((5, 3, 8))
    assert L.seq_first_to_batch_first(s)[2, 4, 1] == s[4, 2, 1]
    assert np.array_equal(L.batch_first_to_seq_first(L.seq_first_to_batch_first(s)), s)


def _keras_mha(weights, q, k, v, attend, num_heads):
    """Keras MultiHeadAttention's arithmetic, written out with its EinsumDense kernels:
    q, k, v (B, T, width); attend (B, L, S) True = may attend, or None."""
    def proj(x, name):
        y = np.einsum("bte,ehd->bthd", x, weights[f"{name}.kernel"])
        return y + weights[f"{name}.bias"] if f"{name}.bias" in weights else y

    qh, kh, vh = proj(q, "query"), proj(k, "key"), proj(v, "value")
    d = qh.shape[-1]
    scores = np.einsum("blhd,bshd->bhls", qh / np.sqrt(d), kh)
    if attend is not None:
        scores = np.where(attend[:, None], scores, -np.inf)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    o = np.einsum("bhls,bshd->blhd", p, vh)
    y = np.einsum("blhd,hde->ble", o, weights["attention_output.kernel"])
    return y + weights["attention_output.bias"] if "attention_output.bias" in weights else y


@pytest.mark.parametrize("kdim,vdim,bias", [(None, None, True), (4, 5, True), (None, None, False)])
def test_torch_mha_to_keras_computes_the_same_attention(rng, kdim, vdim, bias):
    e, h = 6, 3
    blk = npattn.MultiheadAttention(e, h, bias=bias, kdim=kdim, vdim=vdim, batch_first=True, rng=1, dtype=np.float64)
    state = {k: v + 0.1 * rng.standard_normal(v.shape) for k, v in blk.state_dict().items()}  # nonzero biases
    blk.load_state_dict(state)
    q = rng.standard_normal((2, 4, e))
    k = rng.standard_normal((2, 5, kdim or e))
    v = rng.standard_normal((2, 5, vdim or e))
    kpm = rng.random((2, 5)) < 0.3
    kpm[:, 0] = False
    am = rng.random((4, 5)) < 0.3
    am[:, 0] = False
    y, _ = blk.forward(q, k, v, key_padding_mask=kpm, attn_mask=am)
    weights = L.torch_mha_to_keras(state, num_heads=h)
    assert list(weights) == [n for n in L.KERAS_MHA_ORDER if bias or not n.endswith("bias")]
    assert weights["query.kernel"].shape == (e, h, e // h)
    assert weights["key.kernel"].shape == (kdim or e, h, e // h)
    assert weights["attention_output.kernel"].shape == (h, e // h, e)
    attend = L.torch_mha_mask_to_keras(kpm, am, batch=2, num_heads=h, tgt_len=4, src_len=5)
    y_keras = _keras_mha(weights, q, k, v, attend, h)
    np.testing.assert_allclose(y_keras, y, rtol=1e-12, atol=1e-12)
    back = L.keras_mha_to_torch(weights)
    assert list(back) == list(state) and all(np.array_equal(back[k], state[k]) for k in state)
    back_list = L.keras_mha_to_torch([weights[n] for n in L.KERAS_MHA_ORDER if n in weights])
    assert all(np.array_equal(back_list[k], state[k]) for k in state)


def test_keras_mha_gradients_map_back_like_weights(rng):
    """The adapter is linear and a permutation: the gradient of a Keras kernel is the
    torch gradient mapped the same way (checked against npattn's own backward)."""
    e, h = 4, 2
    blk = npattn.MultiheadAttention(e, h, batch_first=True, rng=2, dtype=np.float64)
    q = rng.standard_normal((2, 3, e))
    y, cache = blk.forward(q, q, q)
    dy = rng.standard_normal(y.shape)
    _, grads = blk.backward(dy, cache)
    state = blk.state_dict()
    w = L.torch_mha_to_keras(state, num_heads=h)
    g = L.torch_mha_to_keras(grads, num_heads=h)
    # directional derivative: <dL/dW, dW> is the same in both layouts
    t = {k: rng.standard_normal(v.shape) for k, v in w.items()}
    t_torch = L.keras_mha_to_torch(t)
    assert np.isclose(sum(np.sum(g[k] * t[k]) for k in w), sum(np.sum(grads[k] * t_torch[k]) for k in grads), rtol=1e-13)


def test_mha_adapter_argument_errors():
    with pytest.raises(ValueError, match="num_heads"):
        L.torch_mha_to_keras({"in_proj_weight": np.zeros((12, 4)), "out_proj.weight": np.zeros((4, 4))}, num_heads=3)
    with pytest.raises(ValueError, match="only one of"):
        L.torch_mha_to_keras({"in_proj_weight": np.zeros((12, 4)), "out_proj.weight": np.zeros((4, 4)), "in_proj_bias": np.zeros(12)}, num_heads=2)
    with pytest.raises(ValueError, match="8 arrays"):
        L.keras_mha_to_torch([np.zeros((4, 2, 2))] * 3)


def test_mask_conventions(rng):
    attend = rng.random((3, 4, 5)) < 0.6
    assert np.array_equal(L.masked_to_attend(L.attend_to_masked(attend)), attend)
    add = L.attend_to_additive(attend, np.float32)
    assert add.dtype == np.float32 and set(np.unique(add)) <= {0.0, -np.inf}
    assert np.array_equal(L.additive_to_attend(add), attend)
    with pytest.raises(ValueError, match="only an additive mask of 0 and -inf"):
        L.additive_to_attend(np.array([[0.0, -0.5]]))
    with pytest.raises(TypeError, match="boolean"):
        L.attend_to_masked(add)
    # Keras -> torch -> Keras is the identity; torch's 3-D form repeats the batch mask per head
    torch_mask = L.keras_mask_to_torch_mha(attend, num_heads=2)
    assert torch_mask.shape == (6, 4, 5) and np.array_equal(torch_mask[3], ~attend[1])
    assert np.array_equal(L.torch_mha_mask_to_keras(None, torch_mask, batch=3, num_heads=2, tgt_len=4, src_len=5), attend)
    per_head = torch_mask.copy()
    per_head[1, 0, 0] = ~per_head[1, 0, 0]
    with pytest.raises(ValueError, match="differs between heads"):
        L.torch_mha_mask_to_keras(None, per_head, batch=3, num_heads=2, tgt_len=4, src_len=5)
    assert L.torch_mha_mask_to_keras(batch=3, num_heads=2, tgt_len=4, src_len=5) is None


def test_torch_masks_to_keras_and_back_give_the_same_attention(rng):
    """torch masks -> Keras mask -> torch 3-D mask: npattn's MultiheadAttention gives the
    same output with the original pair and with the round-tripped mask."""
    blk = npattn.MultiheadAttention(4, 2, rng=3, dtype=np.float64)  # sequence-first
    q, k = rng.standard_normal((3, 2, 4)), rng.standard_normal((5, 2, 4))
    kpm = np.array([[False, True, False, False, True], [True, False, False, True, False]])
    am = np.where(rng.random((3, 5)) < 0.3, -np.inf, 0.0)
    am[:, 2] = 0.0
    y0, _ = blk.forward(q, k, k, key_padding_mask=kpm, attn_mask=am)
    attend = L.torch_mha_mask_to_keras(kpm, am, batch=2, num_heads=2, tgt_len=3, src_len=5)
    y1, _ = blk.forward(q, k, k, attn_mask=L.keras_mask_to_torch_mha(attend, num_heads=2))
    np.testing.assert_allclose(y1, y0, rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("with_mask", [True, False])
def test_mindspore_packing_index_map_and_round_trip(rng, with_mask):
    n, g, kh, kw, oh, ow = 2, 2, 3, 2, 4, 3
    taps = kh * kw
    offset = rng.standard_normal((n, 2 * g * taps, oh, ow))
    mask = rng.standard_normal((n, g * taps, oh, ow)) if with_mask else None
    packed = L.mindspore_pack_offset_mask(offset, mask, taps=taps)
    assert packed.shape == (n, 3 * g * taps, oh, ow)
    for gi in range(g):
        for k in range(taps):
            c = gi * taps + k
            assert np.array_equal(packed[:, c], offset[:, 2 * c + 1])  # dx block first
            assert np.array_equal(packed[:, g * taps + c], offset[:, 2 * c])  # then dy
            assert np.array_equal(packed[:, 2 * g * taps + c], mask[:, c] if with_mask else np.ones((n, oh, ow)))
    off2, mask2 = L.mindspore_unpack_offset_mask(packed, taps=taps)
    assert np.array_equal(off2, offset)
    assert np.array_equal(mask2, mask if with_mask else np.ones_like(mask2))
    with pytest.raises(ValueError, match="multiple of 2 \\* taps"):
        L.mindspore_pack_offset_mask(offset[:, :5], taps=taps)
    with pytest.raises(ValueError, match="mask must have shape"):
        L.mindspore_pack_offset_mask(offset, offset, taps=taps)


@pytest.mark.parametrize("float_masks", [False, True])
def test_torch_masks_to_bhls_and_back_give_the_same_attention(rng, float_masks):
    """torch's key_padding_mask + attn_mask -> one (B, H, L, S) mask -> torch's 3-D
    attn_mask: npattn's MultiheadAttention gives the same output; boolean masks stay
    boolean (True = attend), float ones become their sum."""
    b, h, l, s = 2, 3, 4, 5
    blk = npattn.MultiheadAttention(6, h, batch_first=True, rng=4, dtype=np.float64)
    q, k = rng.standard_normal((b, l, 6)), rng.standard_normal((b, s, 6))
    kpm = rng.random((b, s)) < 0.3
    am = rng.random((b * h, l, s)) < 0.3
    kpm[:, 0] = False
    am[:, :, 0] = False
    if float_masks:
        am = np.where(am, -np.inf, rng.standard_normal(am.shape))
    y0, _ = blk.forward(q, k, k, key_padding_mask=kpm, attn_mask=am)
    m = L.torch_mha_mask_to_bhls(kpm, am, batch=b, num_heads=h, tgt_len=l, src_len=s)
    assert m.shape == (b, h, l, s) and (m.dtype == np.float64 if float_masks else m.dtype == np.bool_)
    if not float_masks:
        assert m[1, 2, 3, 4] == (not kpm[1, 4] and not am[1 * h + 2, 3, 4])
    y1, _ = blk.forward(q, k, k, attn_mask=L.bhls_mask_to_torch_mha(m))
    np.testing.assert_allclose(y1, y0, rtol=1e-14, atol=1e-14)
    m2 = L.torch_mha_mask_to_bhls(None, L.bhls_mask_to_torch_mha(m), batch=b, num_heads=h, tgt_len=l, src_len=s)
    assert np.array_equal(m2, m)
