"""The attention variants against PyTorch in float64 at 1e-10 (normwise relative):
torch.nn.functional.scaled_dot_product_attention itself for what it has (is_causal,
torch.nn.attention.bias.causal_lower_right, enable_gqa, scale, float and boolean masks),
outputs and every gradient; the log-sum-exp and its gradient (dlse) through torch's
logsumexp; windows, ALiBi, softcap, dropout masks and packed batches through the torch
transcription of the pipeline (tools/torch_ref_attention_variants.py, differentiated by
autograd); rotary embeddings against Hugging Face's rotate-half formula and Meta's
complex form."""

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="PyTorch not installed: cross-check skipped")
pytestmark = pytest.mark.crosscheck

import torch_ref_attention_variants as ref  # noqa: E402  (tools/, on sys.path via conftest)

from npattn.functional import (  # noqa: E402
    rotary_embedding_backward,
    rotary_embedding_forward,
    scaled_dot_product_attention_backward,
    scaled_dot_product_attention_forward,
    varlen_attention_backward,
    varlen_attention_forward,
)

TOL = 1e-10


def rel_err(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if not b.size:
        return 0.0
    with np.errstate(invalid="ignore"):  # -inf - -inf: equal
        diff = np.where(a == b, 0.0, np.abs(a - b))
    diff = np.where(np.isnan(diff), np.inf, diff)
    finite = np.abs(b[np.isfinite(b)])
    return float(diff.max() / max(float(finite.max()) if finite.size else 0.0, 1e-300))


def t(a, grad=True):
    x = torch.from_numpy(np.array(a))
    return x.requires_grad_(True) if grad and x.dtype == torch.float64 else x


# (N, Hq, Hk, L, S, E, Ev, keywords): what torch's own function computes
SDPA = {
    "causal_top_left_L_lt_S": (2, 3, 3, 4, 6, 5, 3, dict(is_causal=True)),
    "causal_top_left_L_gt_S": (2, 2, 2, 6, 4, 3, 2, dict(is_causal=True, scale=0.4)),
    "causal_lower_right_L_lt_S": (2, 3, 3, 4, 7, 3, 4, dict(is_causal=True, alignment="bottom_right")),
    "causal_lower_right_L_gt_S_empty_rows": (1, 2, 2, 6, 3, 3, 3, dict(is_causal=True, alignment="bottom_right")),
    "gqa_4_to_2": (2, 4, 2, 5, 6, 3, 2, dict(enable_gqa=True)),
    "gqa_6_to_1_causal": (1, 6, 1, 4, 4, 2, 3, dict(enable_gqa=True, is_causal=True)),
    "gqa_lower_right": (2, 4, 2, 3, 5, 3, 3, dict(enable_gqa=True, is_causal=True, alignment="bottom_right")),
    "gqa_bool_mask": (2, 6, 3, 4, 5, 3, 2, dict(enable_gqa=True, attn_mask="bool")),
    "gqa_float_mask_scale": (2, 4, 1, 4, 3, 2, 5, dict(enable_gqa=True, attn_mask="float", scale=1.7)),
    "bool_mask_empty_rows": (2, 2, 2, 4, 5, 3, 3, dict(attn_mask="bool_empty")),
}


def sdpa_case(name, seed=0):
    n, hq, hk, L, S, E, ev, kw = SDPA[name]
    rng = np.random.default_rng(seed)
    q, k, v = rng.standard_normal((n, hq, L, E)), rng.standard_normal((n, hk, S, E)), rng.standard_normal((n, hk, S, ev))
    kw = dict(kw)
    if kw.get("attn_mask") in ("bool", "bool_empty"):
        m = rng.random((n, hq, L, S)) < 0.6
        m[..., 0] = True
        if kw["attn_mask"] == "bool_empty":
            m[0, 1, 2] = False
            m[1, :, 0] = False
        kw["attn_mask"] = m
    elif kw.get("attn_mask") == "float":
        kw["attn_mask"] = rng.standard_normal((1, hq, L, S))
    return q, k, v, kw


def npattn_all(q, k, v, kw, dy, dlse):
    out, cache = scaled_dot_product_attention_forward(q, k, v, **kw)
    g = scaled_dot_product_attention_backward(dy, cache)
    g_lse = scaled_dot_product_attention_backward(dy, cache, dlse=dlse)
    return out, cache.lse, g, g_lse


# torch warns that causal_lower_right with L > S "will produce NaNs"; its CPU function gives
# 0 on those queries (checked below), as npattn does
@pytest.mark.filterwarnings("ignore:Lower right causal bias will produce NaNs")
@pytest.mark.parametrize("name", sorted(SDPA))
def test_against_torch_scaled_dot_product_attention(name):
    q, k, v, kw = sdpa_case(name)
    rng = np.random.default_rng(1)
    dy = rng.standard_normal(q.shape[:-1] + (v.shape[-1],))
    dlse = rng.standard_normal(q.shape[:-1])
    out, lse, g, g_lse = npattn_all(q, k, v, kw, dy, dlse)
    assert ref.torch_sdpa_supports(kw, kw)
    tq, tk, tv = t(q), t(k), t(v)
    tkw = {n: (t(a, False) if isinstance(a, np.ndarray) else a) for n, a in kw.items()}
    y = ref.torch_sdpa(tq, tk, tv, **tkw)
    y.backward(torch.from_numpy(dy))
    assert rel_err(out, y.detach().numpy()) < TOL, rel_err(out, y.detach().numpy())
    for key, tt in (("q", tq), ("k", tk), ("v", tv)):
        assert rel_err(g[key], tt.grad.numpy()) < TOL, (key, rel_err(g[key], tt.grad.numpy()))
    # lse and dlse: the transcription, checked here against torch's own output first
    tq, tk, tv = t(q), t(k), t(v)
    y2, tlse = ref.attention_ref(tq, tk, tv, **tkw)
    assert rel_err(y2.detach().numpy(), y.detach().numpy()) < TOL
    assert rel_err(lse, tlse.detach().numpy()) < TOL
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(tlse.detach().numpy()))
    torch.autograd.backward([y2, tlse], [torch.from_numpy(dy), torch.from_numpy(dlse)])
    for key, tt in (("q", tq), ("k", tk), ("v", tv)):
        assert rel_err(g_lse[key], tt.grad.numpy()) < TOL, (key, rel_err(g_lse[key], tt.grad.numpy()))
    if "empty_rows" in name:
        assert np.isneginf(lse).any()
        assert not out[np.isneginf(lse)].any() and not y.detach().numpy()[np.isneginf(lse)].any()


# transcription cases: (N, Hq, Hk, L, S, E, Ev, keywords)
PIPELINE = {
    "window_top_left": (2, 2, 2, 5, 7, 3, 2, dict(window=(2, 1))),
    "window_bottom_right_causal": (2, 3, 3, 4, 7, 3, 3, dict(window=(1, -1), is_causal=True, alignment="bottom_right")),
    "window_0_0_L_gt_S": (1, 2, 2, 6, 4, 2, 2, dict(window=(0, 0), alignment="bottom_right")),
    "alibi_heads": (2, 3, 3, 4, 6, 3, 2, dict(alibi="heads")),
    "alibi_batch_causal_bottom_right": (2, 2, 2, 3, 5, 3, 3, dict(alibi="batch", is_causal=True, alignment="bottom_right")),
    "softcap_float_mask": (2, 2, 2, 4, 5, 3, 2, dict(softcap=0.8, attn_mask="float", scale=1.5)),
    "dropout_gqa": (2, 4, 2, 4, 5, 3, 2, dict(dropout=True, dropout_p=0.3, enable_gqa=True)),
    "everything": (2, 6, 2, 5, 6, 3, 2, dict(enable_gqa=True, attn_mask="bool", alibi="batch", softcap=2.5, window=(2, 1),
                                             is_causal=True, alignment="bottom_right", dropout=True, dropout_p=0.1)),
}


def pipeline_case(name, seed=2):
    n, hq, hk, L, S, E, ev, kw = PIPELINE[name]
    rng = np.random.default_rng(seed)
    q, k, v = rng.standard_normal((n, hq, L, E)), rng.standard_normal((n, hk, S, E)), rng.standard_normal((n, hk, S, ev))
    kw = dict(kw)
    alibi = kw.pop("alibi", None)
    if alibi:
        kw["alibi_slopes"] = rng.uniform(0.1, 1.0, hq if alibi == "heads" else (n, hq))
    if kw.get("attn_mask") == "float":
        kw["attn_mask"] = rng.standard_normal((hq, L, S))
    elif kw.get("attn_mask") == "bool":
        kw["attn_mask"] = rng.random((n, 1, L, S)) < 0.7
    if kw.pop("dropout", False):
        kw["dropout_mask"] = rng.random((n, hq, L, S)) < 0.75
    return q, k, v, kw


def check_against_ref(out, lse, g, run_ref, arrays, dy, dlse):
    tin = {n: t(a) for n, a in arrays.items()}
    y, tlse = run_ref(tin)
    assert rel_err(out, y.detach().numpy()) < TOL, rel_err(out, y.detach().numpy())
    assert rel_err(lse, tlse.detach().numpy()) < TOL
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(tlse.detach().numpy()))
    torch.autograd.backward([y, tlse], [torch.from_numpy(dy), torch.from_numpy(dlse)])
    for key in ("q", "k", "v"):
        assert rel_err(g[key], tin[key].grad.numpy()) < TOL, (key, rel_err(g[key], tin[key].grad.numpy()))


@pytest.mark.parametrize("name", sorted(PIPELINE))
def test_against_the_torch_transcription(name):
    q, k, v, kw = pipeline_case(name)
    rng = np.random.default_rng(3)
    dy, dlse = rng.standard_normal(q.shape[:-1] + (v.shape[-1],)), rng.standard_normal(q.shape[:-1])
    out, cache = scaled_dot_product_attention_forward(q, k, v, **kw)
    g = scaled_dot_product_attention_backward(dy, cache, dlse=dlse)
    tkw = {n: (t(a, False) if isinstance(a, np.ndarray) else a) for n, a in kw.items()}
    check_against_ref(out, cache.lse, g, lambda a: ref.attention_ref(a["q"], a["k"], a["v"], **tkw),
                      {"q": q, "k": k, "v": v}, dy, dlse)


VARLEN = {
    "causal_bottom_right_empty": ([2, 0, 3, 2], [4, 3, 0, 2], 2, 2, dict(is_causal=True, alignment="bottom_right")),
    "gqa_window_alibi_softcap_dropout": ([3, 4], [5, 2], 4, 2, dict(enable_gqa=True, window=(1, 1), alibi=True,
                                                                     softcap=1.1, dropout=True, dropout_p=0.2)),
}


@pytest.mark.parametrize("name", sorted(VARLEN))
def test_varlen_against_the_torch_transcription(name):
    lq, lk, hq, hk, kw = VARLEN[name]
    kw = dict(kw)
    rng = np.random.default_rng(4)
    cu_q, cu_k = np.concatenate([[0], np.cumsum(lq)]), np.concatenate([[0], np.cumsum(lk)])
    q, k, v = rng.standard_normal((cu_q[-1], hq, 3)), rng.standard_normal((cu_k[-1], hk, 3)), rng.standard_normal((cu_k[-1], hk, 2))
    if kw.pop("alibi", False):
        kw["alibi_slopes"] = rng.uniform(0.1, 1.0, (len(lq), hq))
    if kw.pop("dropout", False):
        kw["dropout_mask"] = rng.random((hq, cu_q[-1], cu_k[-1])) < 0.75
    dy, dlse = rng.standard_normal((cu_q[-1], hq, 2)), rng.standard_normal((hq, cu_q[-1]))
    out, cache = varlen_attention_forward(q, k, v, cu_q, cu_k, **kw)
    g = varlen_attention_backward(dy, cache, dlse=dlse)
    tkw = {n: (t(a, False) if isinstance(a, np.ndarray) else a) for n, a in kw.items()}
    check_against_ref(out, cache.lse, g, lambda a: ref.varlen_ref(a["q"], a["k"], a["v"], cu_q, cu_k, **tkw),
                      {"q": q, "k": k, "v": v}, dy, dlse)


@pytest.mark.parametrize("interleaved", [False, True])
def test_rotary_against_hugging_face_and_meta_forms(interleaved):
    rng = np.random.default_rng(5)
    x, pos = rng.standard_normal((2, 3, 5, 8)), np.array([0, 4, 1, 7, 100])
    dy = rng.standard_normal(x.shape)
    out, cache = rotary_embedding_forward(x, pos, 500.0, interleaved=interleaved)
    g = rotary_embedding_backward(dy, cache)["x"]
    tx = t(x)
    y = ref.rotary_ref(tx, torch.from_numpy(pos), 500.0, interleaved=interleaved)
    y.backward(torch.from_numpy(dy))
    assert rel_err(out, y.detach().numpy()) < TOL and rel_err(g, tx.grad.numpy()) < TOL


@pytest.mark.parametrize("mask_shape", [(2, 4, 3, 5), (3, 5), (4, 1, 5), (2, 1, 3, 5)])
def test_float_mask_gradient_matches_torch(mask_shape):
    """A float attn_mask is added to the logits: its gradient is torch's (dS summed over the
    axes it was broadcast along), with grouped-query heads and a scale."""
    r = np.random.default_rng(7)
    q, k, v = r.standard_normal((2, 4, 3, 3)), r.standard_normal((2, 2, 5, 3)), r.standard_normal((2, 2, 5, 2))
    m = r.standard_normal(mask_shape)
    y, cache = scaled_dot_product_attention_forward(q, k, v, m, scale=0.7, enable_gqa=True)
    dy = r.standard_normal(y.shape)
    g = scaled_dot_product_attention_backward(dy, cache)
    tq, tk, tv, tm = (torch.tensor(a, requires_grad=True) for a in (q, k, v, m))
    ty = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, attn_mask=tm, scale=0.7, enable_gqa=True)
    ty.backward(torch.tensor(dy))
    assert rel_err(y, ty.detach().numpy()) < TOL
    for name, t in (("q", tq), ("k", tk), ("v", tv), ("attn_mask", tm)):
        assert g[name].shape == tuple(t.shape)
        assert rel_err(g[name], t.grad.numpy()) < TOL, name
