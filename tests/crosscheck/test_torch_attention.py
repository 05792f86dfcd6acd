"""npattn's self-attention against the reference modules themselves, in float64 at 1e-10
(normwise relative): torch.nn.functional.scaled_dot_product_attention,
torch.nn.MultiheadAttention (batch_first both ways, kdim/vdim, no bias, boolean and float
masks, 2-D and 3-D attn_mask, attention weights, one shared tensor, fully masked
queries), timm's NonLocalAttn (two training steps and an eval step, running statistics)
and timm's vision_transformer Attention (attn_head_dim, dim_out, proj_bias, qk_norm,
scale_norm, gated, norm_eps, boolean and float masks of every broadcast shape and
is_causal through both of timm's attention paths)."""

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="PyTorch not installed: cross-check skipped")
pytestmark = pytest.mark.crosscheck

import torch.nn.functional as TF  # noqa: E402

import npattn  # noqa: E402
from npattn.functional import scaled_dot_product_attention_backward, scaled_dot_product_attention_forward  # noqa: E402

TOL = 1e-10


def rel_err(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-300)) if b.size else 0.0


def same_nan_pattern_and_values(a, b):
    b = b.detach().numpy() if hasattr(b, "detach") else b
    nan = np.isnan(a)
    assert np.array_equal(nan, np.isnan(b))
    if (~nan).any():
        assert rel_err(a[~nan], b[~nan]) < TOL


def randomize(block, rng):
    state = block.state_dict()
    for k, v in state.items():
        if v.dtype.kind != "f":
            state[k] = np.array(int(rng.integers(0, 20)), dtype=v.dtype)
        elif k.endswith("running_var"):
            state[k] = rng.uniform(0.5, 2.0, v.shape)
        elif k.startswith("norm.") and k.endswith("weight"):
            state[k] = rng.uniform(0.5, 1.5, v.shape)
        else:
            state[k] = rng.normal(0.0, 0.5, v.shape)
    block.load_state_dict(state)
    return block


# ------------------------------------------------------------ F.scaled_dot_product_attention

SDPA_CASES = {
    # name: (lead, L, S, E, Ev, mask kind, mask shape, scale)
    "no_mask": ((2, 3), 4, 6, 5, 3, None, None, None),
    "bool_broadcast": ((2, 3), 4, 6, 5, 3, "bool", (4, 6), None),
    "bool_full": ((3,), 5, 2, 1, 2, "bool", (3, 5, 2), None),
    "float_scale": ((2, 2), 3, 7, 4, 4, "float", (2, 1, 3, 7), 0.3),
    "batch_1_head_dim_1": ((1, 1), 3, 4, 1, 1, "float", (3, 4), None),
}


def sdpa_case(name, seed=0):
    lead, L, S, E, Ev, kind, mshape, scale = SDPA_CASES[name]
    rng = np.random.default_rng(seed)
    q, k, v = rng.standard_normal(lead + (L, E)), rng.standard_normal(lead + (S, E)), rng.standard_normal(lead + (S, Ev))
    mask = None
    if kind == "bool":
        mask = rng.random(mshape) < 0.6  # True = attend
        mask[..., 0] = True
    elif kind == "float":
        mask = rng.normal(0.0, 1.0, mshape)
        mask[..., 1:][rng.random(mask[..., 1:].shape) < 0.2] = -np.inf
    return q, k, v, mask, scale


def torch_sdpa(q, k, v, mask, scale, dy):
    tq, tk, tv = (torch.from_numpy(a.copy()).requires_grad_(True) for a in (q, k, v))
    tm = None if mask is None else torch.from_numpy(mask)
    ty = TF.scaled_dot_product_attention(tq, tk, tv, attn_mask=tm, scale=scale)
    ty.backward(torch.from_numpy(dy))
    return ty.detach().numpy(), {"q": tq.grad.numpy(), "k": tk.grad.numpy(), "v": tv.grad.numpy()}


@pytest.mark.parametrize("name", list(SDPA_CASES))
def test_sdpa_matches_torch_functional(name):
    q, k, v, mask, scale = sdpa_case(name)
    out, cache = scaled_dot_product_attention_forward(q, k, v, attn_mask=mask, scale=scale)
    dy = np.random.default_rng(1).standard_normal(out.shape)
    grads = scaled_dot_product_attention_backward(dy, cache)
    t_out, t_grads = torch_sdpa(q, k, v, mask, scale, dy)
    assert rel_err(out, t_out) < TOL
    for n in "qkv":
        assert rel_err(grads[n], t_grads[n]) < TOL, n


@pytest.mark.parametrize("kind", ["bool", "float"])
def test_sdpa_fully_masked_rows_as_torch_functional(kind):
    """torch's function gives 0 output and 0 gradients for a query with no key; so does npattn."""
    q, k, v, _, _ = sdpa_case("bool_full", seed=2)  # (3, 5, *), S = 2
    allowed = np.ones((3, 5, 2), bool)
    allowed[1, 2] = False
    allowed[0, 4, 1] = False
    mask = allowed if kind == "bool" else np.where(allowed, 0.0, -np.inf)
    out, cache = scaled_dot_product_attention_forward(q, k, v, attn_mask=mask)
    dy = np.random.default_rng(3).standard_normal(out.shape)
    grads = scaled_dot_product_attention_backward(dy, cache)
    t_out, t_grads = torch_sdpa(q, k, v, mask, None, dy)
    assert np.all(t_out[1, 2] == 0.0) and np.all(out[1, 2] == 0.0)  # what torch gives, and npattn
    assert rel_err(out, t_out) < TOL
    for n in "qkv":
        assert rel_err(grads[n], t_grads[n]) < TOL, n
    assert np.all(t_grads["q"][1, 2] == 0.0) and np.all(grads["q"][1, 2] == 0.0)


def test_sdpa_boolean_mask_convention_is_torch_functionals_not_multihead_attentions():
    q, k, v, mask, _ = sdpa_case("bool_broadcast", seed=4)
    out, _ = scaled_dot_product_attention_forward(q, k, v, attn_mask=mask)
    t_out, _ = torch_sdpa(q, k, v, mask, None, np.zeros_like(out))
    t_inverted, _ = torch_sdpa(q, k, v, ~mask, None, np.zeros_like(out))
    assert rel_err(out, t_out) < TOL and rel_err(out, t_inverted) > 1e-3


# ------------------------------------------------------------ torch.nn.MultiheadAttention

MHA_CASES = {
    # name: (constructor kwargs, N, L, S, mask kind, attn_mask 3-D)
    "seq_first_bool": (dict(embed_dim=8, num_heads=2), 3, 4, 5, "bool", False),
    "batch_first_float_3d": (dict(embed_dim=8, num_heads=4, batch_first=True), 3, 5, 3, "float", True),
    "kdim_vdim_bool_3d": (dict(embed_dim=6, num_heads=3, kdim=4, vdim=5), 2, 3, 6, "bool", True),
    "kdim_vdim_batch_first_float": (dict(embed_dim=6, num_heads=2, kdim=3, vdim=7, batch_first=True), 3, 4, 2, "float", False),
    "no_bias_head_dim_1": (dict(embed_dim=4, num_heads=4, bias=False), 1, 3, 4, "bool", False),
    "no_bias_no_mask": (dict(embed_dim=4, num_heads=2, bias=False, batch_first=True), 3, 2, 5, None, False),
    "kpm_only_float": (dict(embed_dim=4, num_heads=2), 2, 3, 4, "kpm_float", False),
}


def mha_case(name, seed=0):
    cfg, n, L, S, kind, three_d = MHA_CASES[name]
    rng = np.random.default_rng(seed)
    blk = randomize(npattn.MultiheadAttention(**cfg, rng=rng, dtype=np.float64), rng)
    shape = (lambda t, w: (n, t, w)) if blk.batch_first else (lambda t, w: (t, n, w))
    xs = [rng.standard_normal(shape(L, blk.embed_dim)), rng.standard_normal(shape(S, blk.kdim)), rng.standard_normal(shape(S, blk.vdim))]
    am_shape = (n * blk.num_heads, L, S) if three_d else (L, S)
    kpm = am = None
    if kind == "bool":
        kpm, am = rng.random((n, S)) < 0.3, rng.random(am_shape) < 0.3  # True = masked
        kpm[:, 0] = False
        am[..., 0] = False
    elif kind == "float":
        kpm, am = rng.normal(0.0, 1.0, (n, S)), rng.normal(0.0, 1.0, am_shape)
        am[..., 1:][rng.random(am[..., 1:].shape) < 0.2] = -np.inf
    elif kind == "kpm_float":
        kpm = rng.normal(0.0, 2.0, (n, S))
    return blk, xs, kpm, am


def run_torch_mha(blk, xs, kpm, am, dy, shared=False):
    from torch_ref_attention import make_torch_block

    module = make_torch_block(blk)
    assert list(module.state_dict()) == list(blk.state_dict())
    if shared:
        t = torch.from_numpy(xs[0].copy()).requires_grad_(True)
        txs = [t, t, t]
    else:
        txs = [torch.from_numpy(x.copy()).requires_grad_(True) for x in xs]
    tk = None if kpm is None else torch.from_numpy(kpm)
    ta = None if am is None else torch.from_numpy(am)
    out, weights = torch.nn.MultiheadAttention.forward(module, *txs, key_padding_mask=tk, attn_mask=ta, need_weights=True)
    out.backward(torch.from_numpy(dy))
    grads_in = [txs[0].grad.numpy()] if shared else [t.grad.numpy() for t in txs]
    params = {k: p.grad.numpy() for k, p in module.named_parameters()}
    return out.detach().numpy(), weights.detach().numpy(), grads_in, params


@pytest.mark.parametrize("name", list(MHA_CASES))
def test_multihead_attention_matches_torch(name):
    blk, xs, kpm, am = mha_case(name)
    out, cache = blk.forward(*xs, kpm, am)
    dy = np.random.default_rng(1).standard_normal(out.shape)
    grads_in, grads = blk.backward(dy, cache)
    t_out, t_w, t_in, t_params = run_torch_mha(blk, xs, kpm, am, dy)
    assert rel_err(out, t_out) < TOL
    assert rel_err(cache.attn_weights, t_w) < TOL
    for g, tg in zip(grads_in, t_in):
        assert rel_err(g, tg) < TOL
    assert set(grads) == set(t_params)
    for k, g in grads.items():
        assert rel_err(g, t_params[k]) < TOL, k


@pytest.mark.parametrize("name", ["seq_first_bool", "batch_first_float_3d", "no_bias_no_mask"])
def test_self_attention_with_one_shared_tensor(name):
    """torch accumulates the three gradients of one tensor; npattn's user adds them."""
    blk, xs, kpm, am = mha_case(name, seed=2)
    x = xs[0]
    n, L = (x.shape[0], x.shape[1]) if blk.batch_first else (x.shape[1], x.shape[0])
    rng = np.random.default_rng(7)
    if am is not None:  # self-attention: S = L; masks of the case's kind and layout
        shape = (L, L) if am.ndim == 2 else (n * blk.num_heads, L, L)
        am = rng.random(shape) < 0.3 if am.dtype == bool else rng.normal(0.0, 1.0, shape)
        am[..., 0] = False if am.dtype == bool else 0.0
    if kpm is not None:
        kpm = rng.random((n, L)) < 0.3 if kpm.dtype == bool else rng.normal(0.0, 1.0, (n, L))
        kpm[:, 0] = False if kpm.dtype == bool else 0.0
    out, cache = blk.forward(x, x, x, kpm, am)
    dy = np.random.default_rng(3).standard_normal(out.shape)
    (dq, dk, dv), grads = blk.backward(dy, cache)
    t_out, t_w, (t_dx,), t_params = run_torch_mha(blk, [x], kpm, am, dy, shared=True)
    assert rel_err(out, t_out) < TOL and rel_err(cache.attn_weights, t_w) < TOL
    assert rel_err(dq + dk + dv, t_dx) < TOL
    for k, g in grads.items():
        assert rel_err(g, t_params[k]) < TOL, k


@pytest.mark.parametrize("batch_first", [False, True])
def test_fully_masked_query_gives_torchs_nan_pattern(batch_first):
    """nn.MultiheadAttention (need_weights=True) gives NaN for a query with no key, and its
    backward spreads the NaN; npattn gives the same NaNs and the same finite numbers."""
    cfg = dict(embed_dim=8, num_heads=2, batch_first=batch_first)
    rng = np.random.default_rng(5)
    blk = randomize(npattn.MultiheadAttention(**cfg, rng=rng, dtype=np.float64), rng)
    n, L, S = 3, 4, 5
    shape = (n, L, 8) if batch_first else (L, n, 8)
    kshape = (n, S, 8) if batch_first else (S, n, 8)
    xs = [rng.standard_normal(shape), rng.standard_normal(kshape), rng.standard_normal(kshape)]
    kpm = np.zeros((n, S), bool)
    kpm[1, :3] = True
    am = np.zeros((L, S), bool)
    am[2, 3:] = True  # sample 1, query 2: every key masked
    out, cache = blk.forward(*xs, kpm, am)
    dy = rng.standard_normal(out.shape)
    grads_in, grads = blk.backward(dy, cache)
    t_out, t_w, t_in, t_params = run_torch_mha(blk, xs, kpm, am, dy)
    assert np.isnan(t_out).any() and not np.isnan(t_out).all()
    same_nan_pattern_and_values(out, t_out)
    same_nan_pattern_and_values(cache.attn_weights, t_w)
    for g, tg in zip(grads_in, t_in):
        same_nan_pattern_and_values(g, tg)
    for k, g in grads.items():
        same_nan_pattern_and_values(g, t_params[k])


def test_torch_state_dict_saved_as_numpy_loads_into_npattn():
    module = torch.nn.MultiheadAttention(6, 3, kdim=4, vdim=2, batch_first=True, dtype=torch.float64)
    arrays = {k: v.detach().numpy().copy() for k, v in module.state_dict().items()}
    blk = npattn.MultiheadAttention(6, 3, kdim=4, vdim=2, batch_first=True, dtype=np.float64)
    blk.load_state_dict(arrays)
    rng = np.random.default_rng(6)
    q, k, v = rng.standard_normal((2, 3, 6)), rng.standard_normal((2, 5, 4)), rng.standard_normal((2, 5, 2))
    out, _ = blk.forward(q, k, v)
    with torch.no_grad():
        t_out = module(*(torch.from_numpy(a) for a in (q, k, v)))[0].numpy()
    assert rel_err(out, t_out) < TOL


# ------------------------------------------------------------ timm


timm = pytest.importorskip("timm", reason="timm not installed: timm cross-checks skipped")


def run_block_vs_module(blk, module, x, training, rng):
    module.train(training)
    for p in module.parameters():
        p.grad = None
    y, cache = blk.forward(x, training=training)
    dy = rng.standard_normal(y.shape)
    (dx,), grads = blk.backward(dy, cache)
    tx = torch.from_numpy(x.copy()).requires_grad_(True)
    ty = module(tx)
    ty.backward(torch.from_numpy(dy))
    errs = {"output": rel_err(y, ty.detach().numpy()), "grad.input": rel_err(dx, tx.grad.numpy())}
    scale = max(float(np.max(np.abs(g))) for g in grads.values())
    tparams = dict(module.named_parameters())
    assert set(grads) == set(tparams)
    zero = set()
    for k, g in grads.items():
        tg = tparams[k].grad.numpy()
        if np.all(g == 0.0):  # npattn's exact zeros: torch's rounding noise must be tiny
            zero.add(k)
            assert np.max(np.abs(tg)) < 1e-12 * scale, k
        else:
            errs[f"grad.{k}"] = rel_err(g, tg)
    state, tstate = blk.state_dict(), module.state_dict()
    assert list(state) == list(tstate)
    for k, v in tstate.items():
        if "num_batches_tracked" in k:
            assert int(state[k]) == int(v), k
        elif "running" in k:
            errs[k] = rel_err(state[k], v.numpy())
    return errs, zero


NL_CASES = {
    "default_c16": (dict(in_channels=16), (3, 16, 4, 5)),
    "no_scale_rd4": (dict(in_channels=8, use_scale=False, rd_channels=4), (2, 8, 3, 5)),
    "c64_rd_ratio_quarter_batch1": (dict(in_channels=64, rd_ratio=0.25, rd_divisor=4), (1, 64, 3, 2)),
}


@pytest.mark.parametrize("name", list(NL_CASES))
def test_non_local_matches_timm_over_train_train_eval(name):
    from torch_ref_attention import make_torch_block

    cfg, shape = NL_CASES[name]
    rng = np.random.default_rng(0)
    blk = randomize(npattn.NonLocalAttn(**cfg, rng=rng, dtype=np.float64), rng)
    module = make_torch_block(blk)
    assert isinstance(module, timm.layers.non_local_attn.NonLocalAttn)
    for step, training in enumerate((True, True, False)):
        x = rng.standard_normal(shape)
        errs, zero = run_block_vs_module(blk, module, x, training, rng)
        worst = max(errs.values())
        assert worst < TOL, (step, errs)
        assert zero == ({"p.bias", "g.bias", "z.bias"} if training else {"p.bias"}), zero


def test_non_local_timm_initialisation_is_the_identity_in_npattn_too():
    timm_block = timm.layers.non_local_attn.NonLocalAttn(32).double().eval()
    blk = npattn.NonLocalAttn(32, dtype=np.float64, rng=0)
    assert blk.rd_channels == timm_block.t.out_channels and blk.scale == timm_block.scale
    assert [(k, tuple(v.shape)) for k, v in blk.state_dict().items()] == [(k, tuple(v.shape)) for k, v in timm_block.state_dict().items()]
    for k, v in timm_block.state_dict().items():
        if k.startswith("norm.") or k.endswith("bias"):
            np.testing.assert_array_equal(blk[k], v.numpy(), err_msg=k)


VIT_CASES = {
    "qkv_bias": (dict(dim=12, num_heads=3, qkv_bias=True), (2, 7, 12)),
    "no_qkv_bias_head_dim_1": (dict(dim=4, num_heads=4), (3, 5, 4)),
    "one_token_batch_1": (dict(dim=8, num_heads=2, qkv_bias=True), (1, 1, 8)),
    # timm's options, one at a time and together
    "attn_head_dim_5_dim_out_7": (dict(dim=6, num_heads=3, attn_head_dim=5, dim_out=7, qkv_bias=True), (2, 5, 6)),
    "no_proj_bias": (dict(dim=6, num_heads=2, proj_bias=False), (3, 3, 6)),
    "qk_norm": (dict(dim=12, num_heads=3, qkv_bias=True, qk_norm=True), (2, 7, 12)),
    "qk_norm_head_dim_1": (dict(dim=3, num_heads=3, qk_norm=True), (2, 5, 3)),
    "scale_norm": (dict(dim=10, num_heads=2, scale_norm=True), (3, 5, 10)),
    "gated": (dict(dim=8, num_heads=2, gated=True), (2, 5, 8)),
    "gated_qkv_bias": (dict(dim=9, num_heads=3, gated=True, qkv_bias=True), (2, 7, 9)),
    "qk_norm_scale_norm_eps_1e-5": (dict(dim=8, num_heads=4, qk_norm=True, scale_norm=True, norm_eps=1e-5), (1, 9, 8)),
    "all": (dict(dim=7, num_heads=3, attn_head_dim=3, dim_out=5, qkv_bias=True, qk_norm=True, scale_norm=True,
                 gated=True, proj_bias=False), (3, 5, 7)),
}


@pytest.mark.parametrize("name", list(VIT_CASES))
@pytest.mark.parametrize("training", [False, True])
def test_vit_attention_matches_timm(name, training):
    from torch_ref_attention import make_torch_block

    cfg, shape = VIT_CASES[name]
    rng = np.random.default_rng(1)
    blk = randomize(npattn.ViTAttention(**cfg, rng=rng, dtype=np.float64), rng)
    module = make_torch_block(blk)
    assert type(module).__name__ == "Attention" and module.scale == blk.scale
    errs, zero = run_block_vs_module(blk, module, rng.standard_normal(shape), training, rng)
    assert max(errs.values()) < TOL, errs
    # qkv.bias is zero only in its key third (without qk_norm); k_norm.bias entirely; with
    # a head width of 1 every q_norm and k_norm gradient (a LayerNorm of one value is its beta)
    one = {"q_norm.weight", "q_norm.bias", "k_norm.weight"} if blk.head_dim == 1 else set()
    want = ({"k_norm.bias"} | one) if blk.qk_norm else set()
    assert zero == want, zero


def vit_forward_args(kind, blk, n, t, rng):
    """Forward keywords of the mask cases: masks as timm (True = may attend), with one
    key always allowed (no query loses every key: timm's two paths agree there)."""
    if kind == "causal":
        return {"is_causal": True}
    shape = {"bool_2d": (t, t), "bool_4d": (n, blk.num_heads, t, t), "float_3d": (blk.num_heads, t, t),
             "float_4d_broadcast": (n, 1, t, t)}[kind]
    free = int(rng.integers(0, t))
    if kind.startswith("bool"):
        m = rng.random(shape) < 0.6
        m[..., free] = True
    else:
        m = rng.normal(0.0, 1.0, shape)
        m[rng.random(shape) < 0.3] = -np.inf
        m[..., free] = rng.normal(0.0, 1.0, shape[:-1])
    return {"attn_mask": m}


def run_vit_vs_timm(blk, module, x, kw, rng):
    """Output, input gradient and every parameter gradient of npattn against timm's
    module, with the forward keywords ``kw`` (attn_mask as a tensor)."""
    for p in module.parameters():
        p.grad = None
    y, cache = blk.forward(x, **kw)
    dy = rng.standard_normal(y.shape)
    (dx,), grads = blk.backward(dy, cache)
    tx = torch.from_numpy(x.copy()).requires_grad_(True)
    tkw = {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in kw.items()}
    ty = module(tx, **tkw)
    ty.backward(torch.from_numpy(dy))
    errs = {"output": rel_err(y, ty.detach().numpy()), "grad.input": rel_err(dx, tx.grad.numpy())}
    scale = max(float(np.max(np.abs(g))) for g in grads.values())
    for k, p in module.named_parameters():
        if np.all(grads[k] == 0.0):
            assert np.max(np.abs(p.grad.numpy())) < 1e-12 * scale, k
        else:
            errs[f"grad.{k}"] = rel_err(grads[k], p.grad.numpy())
    return errs, y, ty.detach().numpy()


VIT_MASK_CASES = ["qkv_bias", "qk_norm", "gated_qkv_bias", "all", "attn_head_dim_5_dim_out_7"]


@pytest.mark.parametrize("name", VIT_MASK_CASES)
@pytest.mark.parametrize("kind", ["bool_2d", "bool_4d", "float_3d", "float_4d_broadcast", "causal"])
def test_vit_attention_masks_match_timm_fused_and_unfused(name, kind):
    """timm's two paths (F.scaled_dot_product_attention, its default, and its own
    softmax with resolve_self_attn_mask) agree with npattn when no query loses every key."""
    from torch_ref_attention import make_torch_block

    cfg, shape = VIT_CASES[name]
    rng = np.random.default_rng(2)
    blk = randomize(npattn.ViTAttention(**cfg, rng=rng, dtype=np.float64), rng)
    x = rng.standard_normal(shape)
    kw = vit_forward_args(kind, blk, shape[0], shape[1], rng)
    module = make_torch_block(blk)
    for fused in (True, False):
        module.fused_attn = fused
        errs, _, _ = run_vit_vs_timm(blk, module, x, kw, np.random.default_rng(3))
        assert max(errs.values()) < TOL, (fused, errs)


@pytest.mark.parametrize("name", ["qkv_bias", "all"])
def test_vit_attention_fully_masked_query_as_timms_default_path(name):
    """A query with no key: timm's default (fused) path gives 0 attention output and no
    gradient through it, as npattn; timm's unfused path gives NaN there."""
    from torch_ref_attention import make_torch_block

    cfg, shape = VIT_CASES[name]
    rng = np.random.default_rng(4)
    blk = randomize(npattn.ViTAttention(**cfg, rng=rng, dtype=np.float64), rng)
    x = rng.standard_normal(shape)
    m = rng.random((shape[0], 1, shape[1], shape[1])) < 0.6
    m[..., 0] = True
    m[1, 0, 2] = False  # sample 1, query 2: every key masked in every head
    module = make_torch_block(blk)
    assert module.fused_attn  # timm's default
    errs, y, ty = run_vit_vs_timm(blk, module, x, {"attn_mask": m}, np.random.default_rng(5))
    assert max(errs.values()) < TOL, errs
    module.fused_attn = False
    with torch.no_grad():
        unfused = module(torch.from_numpy(x), attn_mask=torch.from_numpy(m)).numpy()
    assert np.isnan(unfused[1, 2]).all() and np.isfinite(y).all()


def test_vit_attention_mask_with_is_causal_refused_as_timm():
    from torch_ref_attention import make_torch_block

    blk = npattn.ViTAttention(6, 2, rng=0, dtype=np.float64)
    module = make_torch_block(blk)
    x, m = np.zeros((1, 3, 6)), np.ones((3, 3), bool)
    with pytest.raises(RuntimeError, match="attn_mask should not be set when is_causal"):
        module(torch.from_numpy(x), attn_mask=torch.from_numpy(m), is_causal=True)
    with pytest.raises(ValueError, match="not both"):
        blk.forward(x, attn_mask=m, is_causal=True)


def test_vit_attention_timm_initialisation_layout():
    """timm's module built with the same options has npattn's keys, shapes and LayerNorm
    initialisation; a timm state_dict loads into npattn and gives timm's output."""
    import functools

    from timm.layers import Attention, LayerNorm

    cfg = dict(attn_head_dim=3, dim_out=5, qkv_bias=True, qk_norm=True, scale_norm=True, gated=True, proj_bias=False)
    timm_block = Attention(7, 3, norm_layer=functools.partial(LayerNorm, eps=1e-6), **cfg).double().eval()
    blk = npattn.ViTAttention(7, 3, **cfg, rng=0, dtype=np.float64)
    assert [(k, tuple(v.shape)) for k, v in blk.state_dict().items()] == [(k, tuple(v.shape)) for k, v in timm_block.state_dict().items()]
    for k, v in timm_block.state_dict().items():
        if "norm" in k:
            np.testing.assert_array_equal(blk[k], v.numpy(), err_msg=k)
    assert blk.scale == timm_block.scale and blk.attn_dim == timm_block.attn_dim
    blk.load_state_dict({k: v.detach().numpy().copy() for k, v in timm_block.state_dict().items()})
    x = np.random.default_rng(6).standard_normal((2, 4, 7))
    with torch.no_grad():
        t_out = timm_block(torch.from_numpy(x)).numpy()
    assert rel_err(blk.forward(x)[0], t_out) < TOL
