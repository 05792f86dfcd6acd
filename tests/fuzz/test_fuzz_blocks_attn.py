"""Fuzzing the attention blocks added after the seed: SEModule, CBAM, ECA, CoordAttn,
GlobalContext, SimAM, NonLocalAttn, DeformConv2dPack (image blocks), ViTAttention and
MultiheadAttention (token blocks), and the ``border_grad`` argument of deform_conv2d.

Image blocks: random configurations, float32 and float64, training and eval, batch 0,
H or W = 0 or 1, non-contiguous / negative-stride / read-only inputs, non-finite values,
parameters at initialisation or random. An empty image gives what PyTorch's module gives
(SEModule, ECA and GlobalContext's mean context: an empty output and NaN weight
gradients) or a ValueError naming x (the modules PyTorch refuses it for; SimAM needs
H W >= 2). Valid draws: shapes and dtypes, a gradient for every parameter, nothing
modified, finite in finite out, what is known exactly (the gates are in [0, 1]:
|y| <= |x|; NonLocalAttn at initialisation and GlobalContext without fusion are the
identity; DeformConv2dPack at initialisation is a convolution; its numba and numpy
backends agree), and in float64 the gradients of x and of every parameter against
central differences along one random direction.

Token blocks: against a float64 transcription (projections, heads, a per-row softmax
with torch.nn.MultiheadAttention's masks: boolean True = NOT allowed, float added; a
query with every key masked gives NaN, as torch), batch_first both ways, kdim/vdim,
key_padding_mask with attn_mask (L, S) or (N heads, L, S), and central differences.
ViTAttention with timm's options (qk_norm, scale_norm, gated, proj_bias, attn_head_dim,
dim_out, norm_eps) and timm's masks (boolean True = may attend, float added, broadcast
shapes, is_causal; a query with every key masked gives 0, as timm's default path).

border_grad: "torchvision" and "mmcv" give the same output and the same gradients but
the offset gradient, which may differ only where a sampling coordinate is exactly -1;
anything else raises ValueError naming border_grad.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.special
from hypothesis import event, given, note
from hypothesis import strategies as st

import npattn
from npattn import functional as F

import fuzzlib as fz
import test_fuzz_deform as fdeform

# casting the NaN of a drawn array to a wrong (int) dtype on purpose; the mean of an empty image
pytestmark = [pytest.mark.filterwarnings("ignore:invalid value encountered in cast:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:Mean of empty slice:RuntimeWarning")]

IMAGE_BLOCKS = ["SEModule", "CBAM", "ECA", "CoordAttn", "GlobalContext", "SimAM", "NonLocalAttn", "DeformConv2dPack"]
GATED = ("SEModule", "CBAM", "ECA", "CoordAttn", "SimAM")  # y = x * gates in [0, 1]


def empty_image_behaviour(name, blk, h, w):
    """What the block does on this image size: "ok", "nan_grads" (PyTorch's result on
    an empty image: empty output, NaN weight gradients) or "error" (ValueError naming x)."""
    if name == "SimAM":
        return "error" if h * w < 2 else "ok"
    if name == "NonLocalAttn" and blk.sub_sample and (h < 2 or w < 2):
        return "error"  # the 2x2 max-pool would be empty: torch refuses it
    if name == "DeformConv2dPack" or h * w > 0:
        return "ok"
    if name == "SEModule" and blk.add_maxpool:
        return "error"  # the maximum of an empty image does not exist (timm's amax refuses it)
    if name in ("SEModule", "ECA"):
        return "nan_grads"
    if name == "GlobalContext":
        if blk.use_attn:
            return "error"
        return "nan_grads" if (blk.fuse_scale or blk.fuse_add) else "ok"
    return "error"  # CBAM, CoordAttn, NonLocalAttn


def bn_values(name, n, h, w, blk=None):
    """Values per channel a training-mode BatchNorm of the block sees (None: no BatchNorm)."""
    if name == "NonLocalAttn" and blk is not None and not blk.norm:
        return None
    if name == "CBAM" and blk is not None and blk.no_spatial:
        return None
    if name == "SEModule":
        return n if blk is not None and blk.norm else None
    return {"CBAM": n * h * w, "CoordAttn": n * (h + w), "NonLocalAttn": n * h * w}.get(name)


@st.composite
def image_block_cases(draw, names=None):
    rng = draw(fz.rngs())
    dtype = draw(fz.dtypes)
    name = draw(st.sampled_from(names or IMAGE_BLOCKS))
    n = draw(st.integers(0, 3))
    h, w = draw(st.integers(0, 5)), draw(st.integers(0, 5))
    seed = int(rng.integers(2**31))
    extra = {}
    c = draw(st.integers(1, 6))
    if name == "SEModule":
        rd = dict(rd_channels=draw(st.integers(1, 4))) if draw(st.booleans()) else dict(rd_ratio=0.5, rd_divisor=1)
        opts = dict(add_maxpool=draw(st.booleans()), norm=draw(st.booleans()),
                    act=draw(st.sampled_from(["relu", "silu", "hardswish", "gelu"])),
                    gate=draw(st.sampled_from(["sigmoid", "hard_sigmoid"])),
                    bn_momentum=draw(st.sampled_from([0.1, 0.01, 1.0])), bn_eps=draw(st.sampled_from([1e-5, 1e-3])))
        blk = npattn.SEModule(c, **rd, bias=draw(st.booleans()), **opts, rng=seed, dtype=dtype)
    elif name == "CBAM":
        opts = dict(mlp_bias=draw(st.booleans()), no_spatial=draw(st.booleans()),
                    pool_types=draw(st.lists(st.sampled_from(["avg", "max", "lp", "lse"]), min_size=1, max_size=4)),
                    spatial_order=draw(st.sampled_from(["avg_max", "max_avg"])),
                    max_grad=draw(st.sampled_from(["split", "first"])),
                    bn_momentum=draw(st.sampled_from([0.1, 0.01])), bn_eps=draw(st.sampled_from([1e-5, 1e-3])))
        blk = npattn.CBAM(c, rd_channels=draw(st.integers(1, 3)), spatial_kernel_size=draw(st.sampled_from([1, 3, 5, 7])),
                          **opts, rng=seed, dtype=dtype)
    elif name == "ECA":
        variant = draw(st.sampled_from(["k", "adaptive", "ns", "mlp"]))
        if variant == "k":
            blk = npattn.ECA(kernel_size=draw(st.sampled_from([1, 3, 5])), rng=seed, dtype=dtype)
        elif variant == "adaptive":
            blk = npattn.ECA(c, gamma=draw(st.sampled_from([1, 2])), beta=draw(st.sampled_from([1, 2])), rng=seed, dtype=dtype)
        elif variant == "ns":  # ECA-NS: one kernel per channel
            blk = npattn.ECA(c, kernel_size=draw(st.sampled_from([1, 3, 5])), shared=False, rng=seed, dtype=dtype)
        else:  # timm's use_mlp
            blk = npattn.ECA(c, use_mlp=True, rd_channels=draw(st.sampled_from([None, 1, 3])), rd_divisor=draw(st.sampled_from([1, 8])),
                             rng=seed, dtype=dtype)
    elif name == "CoordAttn":
        blk = npattn.CoordAttn(c, rd_channels=draw(st.integers(1, 4)), bias=draw(st.booleans()),
                               has_skip=draw(st.booleans()), bn_momentum=draw(st.sampled_from([0.1, 0.0, 1.0, 0.05])),
                               bn_eps=draw(st.sampled_from([1e-5, 1e-3])), rng=seed, dtype=dtype)
    elif name == "GlobalContext":
        blk = npattn.GlobalContext(c, use_attn=draw(st.booleans()), fuse_add=draw(st.booleans()),
                                   fuse_scale=draw(st.booleans()), rd_channels=draw(st.integers(1, 4)),
                                   ln_eps=draw(st.sampled_from([1e-6, 1e-5])), init=draw(st.sampled_from(["timm", "gcnet"])),
                                   rng=seed, dtype=dtype)
    elif name == "SimAM":
        blk = npattn.SimAM(draw(st.sampled_from([1e-4, 0.5])), dtype=dtype)
    elif name == "NonLocalAttn":
        blk = npattn.NonLocalAttn(c, use_scale=draw(st.booleans()), rd_channels=draw(st.integers(1, 4)),
                                  mode=draw(st.sampled_from(["embedded_gaussian", "dot_product", "gaussian", "concatenation"])),
                                  sub_sample=draw(st.booleans()), sub_sample_at=draw(st.sampled_from(["after_conv", "before_conv"])),
                                  scale=draw(st.sampled_from([None, 0.5])), norm=draw(st.booleans()),
                                  bn_momentum=draw(st.sampled_from([0.1, 0.3])), bn_eps=draw(st.sampled_from([1e-5, 1e-3])),
                                  rng=seed, dtype=dtype)
    else:
        g = draw(st.integers(1, 2))
        dg = draw(st.integers(1, 2))
        c = g * dg * draw(st.integers(1, 2))
        geo = dict(kernel_size=(draw(st.integers(1, 3)), draw(st.integers(1, 3))),
                   stride=(draw(st.integers(1, 2)), draw(st.integers(1, 2))),
                   padding=(draw(st.integers(0, 2)), draw(st.integers(0, 2))),
                   dilation=(draw(st.integers(1, 2)), draw(st.integers(1, 2))))
        # the smallest size with an output (0 when the padding alone makes one)
        lo = [max(0, geo["dilation"][a] * (geo["kernel_size"][a] - 1) + 1 - 2 * geo["padding"][a]) for a in range(2)]
        h, w = lo[0] + min(h, 3), lo[1] + min(w, 3)
        blk = npattn.DeformConv2dPack(c, g * draw(st.integers(1, 2)), **geo, groups=g, deform_groups=dg, rng=seed,
                                      dtype=dtype, backend=draw(st.sampled_from(["numpy", "numba"])),
                                      border_grad=draw(st.sampled_from(["mmcv", "torchvision"])))
        extra = geo
    if name == "ECA" or name == "SimAM":
        c = getattr(blk, "channels", None) or c
    kind = draw(st.sampled_from(["normal", "normal", "special"]))
    x = fz.relayout(fz.fill(rng, (n, c, h, w), dtype, kind), draw(fz.layouts), rng)
    randomize = draw(st.booleans())
    if randomize:  # parameters and statistics away from the initialisation
        state = blk.state_dict()
        for key, v in state.items():
            if v.dtype.kind == "f":
                scale = 0.2 if name == "DeformConv2dPack" and key.startswith("conv_offset") else 0.5
                state[key] = (np.abs(rng.standard_normal(v.shape)) + 0.5 if key.endswith("running_var")
                              else rng.standard_normal(v.shape) * scale).astype(dtype)
        blk.load_state_dict(state)
    training = draw(st.booleans())
    note(f"block={name} dtype={np.dtype(dtype)} training={training} x={x.shape} randomized={randomize} "
         f"config={getattr(blk, 'config', extra)}")
    return dict(name=name, block=blk, x=x, training=training, dtype=np.dtype(dtype), rng=rng, randomized=randomize,
                extra=extra, kind=kind)


def snapshot_state(blk):
    return [(blk[k], blk[k].copy()) for k in blk.state_dict()]


def directional_check(blk, inputs, grads_in, grads_p, training, dy, rng, skip_params=False, fwd_kw=None):
    """<dy, y> differentiated along one random direction in every input and parameter,
    by central differences in float64, against the backward's gradients."""
    fwd_kw = fwd_kw or {}
    names = [] if skip_params else [k for k in blk.parameter_names()]
    u_in = [rng.standard_normal(a.shape) for a in inputs]
    u_p = {k: rng.standard_normal(blk[k].shape) for k in names}
    base = {k: blk[k].copy() for k in names}
    dy64 = dy.astype(np.float64)

    def loss(t):
        state = blk.state_dict()
        for k in names:
            state[k] = base[k] + t * u_p[k]
        blk.load_state_dict(state)
        y, _ = blk.forward(*[a + t * u for a, u in zip(inputs, u_in)], training=training, **fwd_kw)
        return fz.inner(dy64, y)

    step = 1e-6
    try:
        fd = (loss(step) - loss(-step)) / (2 * step)
    finally:
        state = blk.state_dict()
        state.update(base)
        blk.load_state_dict(state)
    y0, _ = blk.forward(*inputs, training=training, **fwd_kw)
    an = sum(fz.inner(g, u) for g, u in zip(grads_in, u_in)) + sum(fz.inner(grads_p[k], u_p[k]) for k in names)
    norm = math.sqrt(sum(fz.inner(g, g) for g in grads_in) + sum(fz.inner(grads_p[k], grads_p[k]) for k in names))
    unorm = math.sqrt(sum(fz.inner(u, u) for u in u_in) + sum(fz.inner(u, u) for u in u_p.values()))
    # truncation (relative) + the difference's rounding: a few ulps of <|dy|, |y|> over the step
    bound = 1e-5 * (norm * unorm + abs(fd)) + 4e-16 * fz.inner(np.abs(dy64), np.abs(y0)) / step + 1e-12
    assert abs(fd - an) <= bound, f"directional derivative: backward {an!r} vs central difference {fd!r} (bound {bound:.2e})"


@fz.examples(12)
@given(case=image_block_cases())
def test_image_block_valid(case):
    blk, x, training, dtype, name, rng = (case[k] for k in ("block", "x", "training", "dtype", "name", "rng"))
    n, c, h, w = x.shape
    behaviour = empty_image_behaviour(name, blk, h, w)
    event(f"{name}: {behaviour}" + (" (empty image)" if h * w == 0 else ""))
    if behaviour == "error":
        fz.expect_error(["x"], blk.forward, x, training=training)
        return
    m = bn_values(name, n, h, w, blk)
    if training and m is not None and m <= 1:  # PyTorch's error for one value per channel, with the input size
        fz.expect_error(["input size"], blk.forward, x, training=training)
        return
    before = snapshot_state(blk)
    fin = fz.finite(x) and case["kind"] == "normal" and behaviour == "ok"
    y, cache = fz.run(blk.forward, x, training=training, finite=fin)
    assert y.dtype == dtype and y.shape[:2] == (n, blk.out_channels if name == "DeformConv2dPack" else c)
    dy = fz.relayout(fz.fill(rng, y.shape, dtype), "negative" if y.ndim else "c", rng)
    (dx,), grads_p = fz.run(blk.backward, dy, cache, finite=fin)
    fz.assert_unchanged(before, "a block array")
    assert dx.shape == x.shape and dx.dtype == dtype
    assert sorted(grads_p) == sorted(blk.parameter_names())
    for k, g in grads_p.items():
        assert g.shape == blk[k].shape and g.dtype == dtype, (k, g.shape, g.dtype)
    if behaviour == "nan_grads":  # PyTorch: the mean of an empty image is NaN, and so are the weight gradients
        assert y.size == 0 and dx.size == 0
        if n and grads_p:
            assert any(np.isnan(g).all() for g in grads_p.values()), "an empty image: NaN weight gradients (PyTorch)"
        return
    if not fin:
        return
    fz.assert_finite(name, y, dx, *grads_p.values())
    tol = fz.TOL[dtype]
    x64 = x.astype(np.float64)
    if name in GATED or (name == "GlobalContext" and blk.fuse_scale and not blk.fuse_add):
        top = 2 if getattr(blk, "has_skip", False) else 1  # CoordAttn's has_skip: x * gates + x
        assert np.all(np.abs(y) <= top * np.abs(x64) * (1 + 4 * tol)), f"{name}: a gate outside [0, 1]"
    if name == "GlobalContext" and not (blk.fuse_scale or blk.fuse_add):
        fz.assert_bitwise(y, np.ascontiguousarray(x), "GlobalContext without fusion is the identity")
    if name == "NonLocalAttn" and not case["randomized"]:
        fz.assert_bitwise(y, np.ascontiguousarray(x), "NonLocalAttn at initialisation (norm.weight 0, or z.weight 0 "
                                                      "without norm) is the identity")
    if name == "DeformConv2dPack" and not case["randomized"]:
        ex = case["extra"]
        want, _ = F.conv2d_forward(x, blk["weight"], None, ex["stride"], ex["padding"], ex["dilation"], groups=blk.groups)
        scale, _ = F.conv2d_forward(np.abs(x64), np.abs(blk["weight"].astype(np.float64)), None, ex["stride"],
                                    ex["padding"], ex["dilation"], groups=blk.groups)
        fz.assert_close(y, want, scale, "DeformConv2dPack at initialisation vs conv2d")
    if dtype == np.float64 and x.size:
        # Exactly on a kink a central difference gives the mean of the one-sided slopes,
        # not the derivative PyTorch (and npattn) take there. DeformConv2dPack at
        # initialisation samples on the pixel grid, where bilinear sampling has kinks: its
        # offset parameters are left out there. GlobalContext with a hidden width of 1:
        # LayerNorm over one channel outputs its bias, 0 at initialisation, exactly on the
        # following ReLU's kink: checked only with random parameters.
        on_kink = name == "GlobalContext" and not case["randomized"] and (blk.fuse_scale or blk.fuse_add) and \
            blk.rd_channels == 1
        if not on_kink:
            directional_check(blk, [x64], [dx], grads_p, training, dy, rng,
                              skip_params=name == "DeformConv2dPack" and not case["randomized"])


@fz.examples(2)
@given(case=image_block_cases(["DeformConv2dPack"]))
def test_deform_conv2d_pack_backends_and_conventions_agree(case):
    """DeformConv2dPack on both CPU backends and both border conventions: the outputs
    agree to rounding (the conventions bit for bit), the gradients to rounding."""
    blk, x, training, dtype = case["block"], case["x"], case["training"], case["dtype"]
    if not fz.finite(x):
        return
    dy = np.random.default_rng(0).standard_normal((x.shape[0], blk.out_channels, 1, 1))
    res = {}
    for be in ("numpy", "numba"):
        for conv in ("mmcv", "torchvision"):
            blk.backend, blk.border_grad = be, conv
            y, cache = fz.run(blk.forward, x, training=training)
            (dx,), gp = fz.run(blk.backward, np.broadcast_to(dy, y.shape).astype(dtype), cache)
            res[be, conv] = [y, dx, *(gp[k] for k in sorted(gp))]
    fz.assert_bitwise(res["numpy", "mmcv"][0], res["numpy", "torchvision"][0], "output, mmcv vs torchvision")
    for key in res:
        for i, (a, b) in enumerate(zip(res[key], res["numpy", "mmcv"])):
            scale = (float(np.max(np.abs(a), initial=0.0)) + float(np.max(np.abs(b), initial=0.0))) * 10
            if key[1] == "mmcv" or i == 0:
                fz.assert_close(a, b, scale, f"DeformConv2dPack tensor {i} {key} vs numpy/mmcv")


@fz.examples(6)
@given(case=image_block_cases(), what=st.sampled_from(["dtype", "other_float", "rank", "channels", "non_array",
                                                       "grad_out"]), data=st.data())
def test_image_block_invalid_inputs(case, what, data):
    blk, x, rng, dtype, name = case["block"], case["x"], case["rng"], case["dtype"], case["name"]
    n, c, h, w = x.shape
    training = case["training"]
    m = bn_values(name, n, h, w, blk)
    valid = empty_image_behaviour(name, blk, h, w) != "error" and not (training and m is not None and m <= 1)
    extra = [] if valid else ["x", "input size"]  # the draw itself may be refused first
    if what == "grad_out":
        if not valid:
            return
        y, cache = fz.run(blk.forward, x, training=training)
        g = fz.fill(rng, y.shape, dtype)
        bad = data.draw(st.sampled_from(["dtype", "other_float", "rank", "shape", "non_array"]))
        g = {"dtype": lambda: g.astype(data.draw(fz.bad_dtypes)),
             "other_float": lambda: g.astype(np.float32 if dtype == np.float64 else np.float64),
             "rank": lambda: fz.wrong_rank(g, rng),
             "shape": lambda: np.zeros(g.shape[:3] + (g.shape[3] + 1,), dtype=dtype),
             "non_array": lambda: fz.non_array(g, rng)}[bad]()
        fz.expect_error(["grad_out"], blk.backward, g, cache)
        return
    if what == "channels" and (name == "SimAM" or (name == "ECA" and blk.channels is None)):
        return  # SimAM, and ECA built without channels, take any number of channels
    bad = {"dtype": lambda: x.astype(data.draw(fz.bad_dtypes)),
           "other_float": lambda: x.astype(np.float32 if dtype == np.float64 else np.float64),
           "rank": lambda: fz.wrong_rank(x, rng),
           "channels": lambda: np.concatenate([x, x[:, :1]], axis=1),
           "non_array": lambda: fz.non_array(x, rng)}[what]()
    fz.expect_error(["x"] + (extra if what == "channels" else []), blk.forward, bad, training=training)


# ------------------------------------------------------------------ token blocks


@st.composite
def token_cases(draw, name=None):
    rng = draw(fz.rngs())
    dtype = draw(fz.dtypes)
    name = name or draw(st.sampled_from(["ViTAttention", "MultiheadAttention"]))
    heads, d = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    e = heads * d
    n, L = draw(st.integers(0, 3)), draw(st.integers(0, 4))
    seed = int(rng.integers(2**31))
    kind = draw(st.sampled_from(["normal", "normal", "special"]))
    masks = {}
    if name == "ViTAttention":
        opts = {}
        if draw(st.booleans()):  # timm's options
            opts = dict(qk_norm=draw(st.booleans()), scale_norm=draw(st.booleans()), gated=draw(st.booleans()),
                        proj_bias=draw(st.booleans()), attn_head_dim=draw(st.sampled_from([None, 1, 2])),
                        dim_out=draw(st.sampled_from([None, 1, 3])), norm_eps=draw(st.sampled_from([1e-6, 1e-5])))
        blk = npattn.ViTAttention(e, heads, qkv_bias=draw(st.booleans()), rng=seed, dtype=dtype, **opts)
        inputs = [fz.fill(rng, (n, L, e), dtype, kind)]
        S = L
        mk = draw(st.sampled_from([None, None, "bool", "float", "float_inf", "causal"]))
        if mk == "causal":
            masks["is_causal"] = True
        elif mk is not None:  # timm's convention: boolean True = may attend
            mshape = draw(st.sampled_from([(L, L), (n, 1, L, L), (n, heads, L, L), (heads, 1, L)]))
            if mk == "bool":
                m = rng.random(mshape) < draw(st.sampled_from([0.0, 0.4, 0.8, 1.0]))
            else:
                m = fz.fill(rng, mshape, dtype)
                if mk == "float_inf" and m.size:
                    m[rng.random(mshape) < 0.4] = -np.inf
            masks["attn_mask"] = fz.relayout(m, draw(fz.layouts), rng)
    else:
        kdim = draw(st.sampled_from([None, e, 1, 2, 4]))
        vdim = draw(st.sampled_from([None, e, 1, 3]))
        bf = draw(st.booleans())
        blk = npattn.MultiheadAttention(e, heads, bias=draw(st.booleans()), kdim=kdim, vdim=vdim, batch_first=bf,
                                        rng=seed, dtype=dtype)
        S = draw(st.integers(1, 4))
        shapes = [(n, L, e), (n, S, blk.kdim), (n, S, blk.vdim)]
        if not bf:
            shapes = [(s[1], s[0], s[2]) for s in shapes]
        same = draw(st.booleans()) and L == S and blk.kdim == blk.vdim == e  # self-attention with one array
        inputs = [fz.fill(rng, shapes[0], dtype, kind)]
        inputs += [inputs[0]] * 2 if same else [fz.fill(rng, s, dtype) for s in shapes[1:]]
        for key, mshape in (("key_padding_mask", (n, S)),
                            ("attn_mask", draw(st.sampled_from([(L, S), (n * heads, L, S)])))):
            mk = draw(st.sampled_from([None, "bool", "float", "float_inf"]))
            if mk == "bool":
                masks[key] = rng.random(mshape) < draw(st.sampled_from([0.0, 0.3, 0.7, 1.0]))  # True = NOT allowed
            elif mk is not None:
                mm = fz.fill(rng, mshape, dtype)
                if mk == "float_inf" and mm.size:
                    mm[rng.random(mshape) < 0.4] = -np.inf
                masks[key] = mm
        masks = {k: fz.relayout(v, draw(fz.layouts), rng) for k, v in masks.items()}
    inputs = [fz.relayout(a, draw(fz.layouts), rng) for a in inputs]
    if draw(st.booleans()):
        state = blk.state_dict()
        for key, v in state.items():
            state[key] = (rng.standard_normal(v.shape) * 0.5).astype(dtype)
        blk.load_state_dict(state)
    note(f"block={name} dtype={np.dtype(dtype)} shapes={[a.shape for a in inputs]} heads={heads} "
         f"masks={ {k: (v.dtype, v.shape) if isinstance(v, np.ndarray) else v for k, v in masks.items()} }"
         + (f" options={ {k: getattr(blk, k) for k in ('qk_norm', 'scale_norm', 'gated', 'proj_bias', 'head_dim', 'dim_out')} }"
            if name == "ViTAttention" else ""))
    return dict(name=name, block=blk, inputs=inputs, masks=masks, dtype=np.dtype(dtype), rng=rng, kind=kind, S=S)


def layer_norm_ref(a, gamma, beta, eps):
    """LayerNorm over the last axis in float64 (two-pass variance)."""
    mu = a.mean(axis=-1, keepdims=True)
    var = ((a - mu) ** 2).mean(axis=-1, keepdims=True)
    return (a - mu) / np.sqrt(var + eps) * gamma + beta


def attention_ref(blk, name, inputs, masks):
    """float64 transcription: (out in the inputs' layout, head-averaged weights or None)."""
    s = {k: v.astype(np.float64) for k, v in blk.state_dict().items()}
    if name == "ViTAttention":
        x = inputs[0].astype(np.float64)
        e, heads = blk.attn_dim, blk.num_heads
        qkv = x @ s["qkv.weight"].T + (s["qkv.bias"] if "qkv.bias" in s else 0)
        xq, xk, xv = qkv[..., :e], qkv[..., e:2 * e], qkv[..., 2 * e:]
        wo, bo = s["proj.weight"], s.get("proj.bias", 0.0)
    else:
        e, heads = blk.embed_dim, blk.num_heads
        q_in, k_in, v_in = (a.astype(np.float64) if blk.batch_first else a.astype(np.float64).transpose(1, 0, 2)
                            for a in inputs)
        if blk.separate_proj:
            ws = s["q_proj_weight"], s["k_proj_weight"], s["v_proj_weight"]
        else:
            ws = s["in_proj_weight"][:e], s["in_proj_weight"][e:2 * e], s["in_proj_weight"][2 * e:]
        bs = (np.zeros(e),) * 3 if "in_proj_bias" not in s else (s["in_proj_bias"][:e], s["in_proj_bias"][e:2 * e],
                                                                 s["in_proj_bias"][2 * e:])
        xq, xk, xv = (a @ wm.T + b for a, wm, b in zip((q_in, k_in, v_in), ws, bs))
        wo, bo = s["out_proj.weight"], s.get("out_proj.bias", np.zeros(e))
    n, L = xq.shape[:2]
    S = xk.shape[1]
    d = e // heads
    split = lambda a, t: a.reshape(n, t, heads, d).transpose(0, 2, 1, 3)  # noqa: E731
    q, k, v = split(xq, L), split(xk, S), split(xv, S)
    if name == "ViTAttention" and blk.qk_norm:
        q = layer_norm_ref(q, s["q_norm.weight"], s["q_norm.bias"], blk.norm_eps)
        k = layer_norm_ref(k, s["k_norm.weight"], s["k_norm.bias"], blk.norm_eps)
    z = np.einsum("nhld,nhsd->nhls", q, k) / math.sqrt(d)
    allowed = np.ones(z.shape, dtype=bool)
    if name == "ViTAttention":  # timm: boolean True = may attend, float added, is_causal: keys j <= i
        mm = masks.get("attn_mask")
        if masks.get("is_causal"):
            allowed = allowed & np.tri(L, S, dtype=bool)
        elif mm is not None and mm.dtype == np.bool_:
            allowed = allowed & np.broadcast_to(mm, z.shape)
        elif mm is not None:
            z = z + mm.astype(np.float64)
            allowed = allowed & ~np.broadcast_to(np.isneginf(mm), z.shape)
    if name == "MultiheadAttention":
        for key, mm in masks.items():
            mm = np.asarray(mm)
            mm = mm.reshape(n, 1, 1, S) if key == "key_padding_mask" else (mm.reshape(n, heads, L, S) if mm.ndim == 3 else mm)
            if mm.dtype == np.bool_:
                allowed = allowed & ~np.broadcast_to(mm, z.shape)  # True = NOT allowed
            else:
                z = z + mm.astype(np.float64)
                allowed = allowed & ~np.broadcast_to(np.isneginf(mm), z.shape)
    p = np.zeros(z.shape)
    for idx in np.ndindex(*z.shape[:-1]):
        a = allowed[idx]
        if a.any():
            p[idx][a] = scipy.special.softmax(z[idx][a])
        elif name == "MultiheadAttention":
            p[idx][:] = np.nan  # torch.nn.MultiheadAttention: a query with no key left is NaN
        # ViTAttention (timm's default path, F.scaled_dot_product_attention): 0 there
    o = np.einsum("nhls,nhsd->nhld", p, v).transpose(0, 2, 1, 3).reshape(n, L, e)
    if name == "ViTAttention" and blk.scale_norm:
        o = layer_norm_ref(o, s["norm.weight"], s["norm.bias"], blk.norm_eps)
    if name == "ViTAttention" and blk.gated:
        o = o * scipy.special.expit(x @ s["gate.weight"].T + s.get("gate.bias", 0.0))
    out = o @ wo.T + bo
    if name == "MultiheadAttention" and not blk.batch_first:
        out = out.transpose(1, 0, 2)
    return out, p.mean(axis=1)


@fz.examples(9)
@given(case=token_cases())
def test_token_block_valid(case):
    blk, inputs, masks, dtype, name, rng = (case[k] for k in ("block", "inputs", "masks", "dtype", "name", "rng"))
    before = snapshot_state(blk)
    fin_in = fz.finite(*inputs) and case["kind"] == "normal" and all(
        m.dtype == np.bool_ or fz.finite(np.where(np.isneginf(m), 0, m)) for m in masks.values() if isinstance(m, np.ndarray))
    want, want_w = attention_ref(blk, name, inputs, masks) if fin_in else (None, None)
    # a query with every key masked is NaN (as torch): no finiteness promised for those draws
    fin = fin_in and not np.isnan(want).any()
    y, cache = fz.run(blk.forward, *inputs, **masks, finite=fin)
    dy = fz.relayout(fz.fill(rng, y.shape, dtype), "negative" if y.size else "c", rng)
    grads_in, grads_p = fz.run(blk.backward, dy, cache, finite=fin)
    fz.assert_unchanged(before, "a block array")
    assert y.dtype == dtype and y.shape == inputs[0].shape[:2] + (blk.dim_out if name == "ViTAttention"
                                                                   else blk.embed_dim,)
    assert len(grads_in) == len(inputs)
    for a, g in zip(inputs, grads_in):
        assert g.shape == a.shape and g.dtype == dtype
    assert sorted(grads_p) == sorted(blk.parameter_names())
    for k, g in grads_p.items():
        assert g.shape == blk[k].shape and g.dtype == dtype, (k, g.shape, g.dtype)
    if not fin_in:
        return
    # the magnitude of the output: |O| W_o^T with O bounded by the largest |V|, in float64
    scale = (np.max(np.abs(want[np.isfinite(want)]), initial=0.0) + 1) * 10 * max(1, case["S"])
    fz.assert_close(y.astype(np.float64), want, scale, f"{name} vs float64 transcription", dtype)
    if name == "MultiheadAttention":
        fz.assert_close(cache.attn_weights.astype(np.float64), want_w, 10.0, "head-averaged attention weights", dtype)
        empty = np.isnan(want_w).all(axis=-1) if want_w.size else np.zeros(0, bool)
        event(f"MultiheadAttention: {'a fully masked query (NaN)' if empty.any() else 'no fully masked query'}")
    if not fin:
        return
    fz.assert_finite(name, y, *grads_in, *grads_p.values())
    if name == "MultiheadAttention" and blk.bias:
        e = blk.embed_dim
        assert not grads_p["in_proj_bias"][e:2 * e].any(), "the key bias has an exact zero gradient"
    if name == "ViTAttention" and blk.qkv_bias and not blk.qk_norm:
        assert not grads_p["qkv.bias"][blk.attn_dim:2 * blk.attn_dim].any(), "the key bias has an exact zero gradient"
    if name == "ViTAttention" and blk.qk_norm:
        assert not grads_p["k_norm.bias"].any(), "k_norm's beta has an exact zero gradient"
    if name == "ViTAttention":
        event(f"ViTAttention: {'timm options' if blk.qk_norm or blk.scale_norm or blk.gated else 'default layers'}, "
              f"{'is_causal' if masks.get('is_causal') else 'attn_mask' if 'attn_mask' in masks else 'no mask'}")
    if dtype == np.float64 and y.size:
        ins = [a.astype(np.float64) for a in inputs]
        if name == "MultiheadAttention" and inputs[1] is inputs[0]:  # one array: its gradient is the sum
            directional_check_shared(blk, ins[0], sum(grads_in), grads_p, dy, rng, masks)
        else:
            directional_check(blk, ins, grads_in, grads_p, False, dy, rng, fwd_kw=masks)


def directional_check_shared(blk, x, gx, grads_p, dy, rng, masks):
    """As directional_check, for query = key = value = x (one perturbation of x)."""
    names = blk.parameter_names()
    u = rng.standard_normal(x.shape)
    u_p = {k: rng.standard_normal(blk[k].shape) for k in names}
    base = {k: blk[k].copy() for k in names}

    def loss(t):
        state = blk.state_dict()
        for k in names:
            state[k] = base[k] + t * u_p[k]
        blk.load_state_dict(state)
        xt = x + t * u
        return fz.inner(dy.astype(np.float64), blk.forward(xt, xt, xt, **masks)[0])

    step = 1e-6
    try:
        fd = (loss(step) - loss(-step)) / (2 * step)
    finally:
        state = blk.state_dict()
        state.update(base)
        blk.load_state_dict(state)
    an = fz.inner(gx, u) + sum(fz.inner(grads_p[k], u_p[k]) for k in names)
    norm = math.sqrt(fz.inner(gx, gx) + sum(fz.inner(grads_p[k], grads_p[k]) for k in names))
    unorm = math.sqrt(fz.inner(u, u) + sum(fz.inner(v, v) for v in u_p.values()))
    y0 = blk.forward(x, x, x, **masks)[0]
    bound = 1e-5 * (norm * unorm + abs(fd)) + 4e-16 * fz.inner(np.abs(dy.astype(np.float64)), np.abs(y0)) / step + 1e-12
    assert abs(fd - an) <= bound, f"self-attention directional derivative: {an!r} vs {fd!r}"


MHA_CORRUPTIONS = ["dtype", "other_float", "rank", "width", "non_array", "batch", "value_len", "no_keys", "mask_type",
                   "mask_dtype", "mask_float_dtype", "mask_shape", "grad_out", "mask_and_causal"]


@fz.examples(6)
@given(case=token_cases(), what=st.sampled_from(MHA_CORRUPTIONS), data=st.data())
def test_token_block_invalid_inputs(case, what, data):
    blk, inputs, masks, rng, dtype, name = (case[k] for k in ("block", "inputs", "masks", "rng", "dtype", "name"))
    inputs, masks = list(inputs), dict(masks)
    arg_names = ["x"] if name == "ViTAttention" else ["query", "key", "value"]
    if what == "grad_out":
        y, cache = fz.run(blk.forward, *inputs, **masks)
        g = fz.fill(rng, y.shape, dtype)
        bad = data.draw(st.sampled_from(["dtype", "other_float", "rank", "shape", "non_array"]))
        g = {"dtype": lambda: g.astype(data.draw(fz.bad_dtypes)),
             "other_float": lambda: g.astype(np.float32 if dtype == np.float64 else np.float64),
             "rank": lambda: fz.wrong_rank(g, rng),
             "shape": lambda: np.zeros(g.shape[:2] + (g.shape[2] + 1,), dtype=dtype),
             "non_array": lambda: fz.non_array(g, rng)}[bad]()
        fz.expect_error(["grad_out"], blk.backward, g, cache)
        return
    if what in ("dtype", "other_float", "rank", "width", "non_array"):
        i = data.draw(st.integers(0, len(inputs) - 1))
        a = inputs[i]
        inputs[i] = {"dtype": lambda: a.astype(data.draw(fz.bad_dtypes)),
                     "other_float": lambda: a.astype(np.float32 if dtype == np.float64 else np.float64),
                     "rank": lambda: fz.wrong_rank(a, rng),
                     "width": lambda: np.zeros(a.shape[:2] + (a.shape[2] + 1,), dtype),
                     "non_array": lambda: fz.non_array(a, rng)}[what]()
        fz.expect_error([arg_names[i]], blk.forward, *inputs, **masks)
        return
    if name == "ViTAttention":  # one input; timm's attn_mask (True = may attend) and is_causal
        if what in ("batch", "value_len", "no_keys"):
            return
        L = inputs[0].shape[1]
        masks.pop("is_causal", None)
        good = (L, L)
        masks["attn_mask"] = {"mask_type": lambda: data.draw(st.sampled_from([[[True]], 1.0, "mask"])),
                              "mask_dtype": lambda: np.zeros(good, dtype=data.draw(st.sampled_from([np.int64, np.uint8, object]))),
                              "mask_float_dtype": lambda: np.zeros(good, dtype=np.float32 if dtype == np.float64 else np.float64),
                              "mask_shape": lambda: np.ones((L, L + 2), dtype=bool),  # + 2: not broadcastable even at L = 0
                              "mask_and_causal": lambda: np.ones(good, dtype=bool)}[what]()
        if what == "mask_and_causal":
            masks["is_causal"] = True
        fz.expect_error(["attn_mask"], blk.forward, *inputs, **masks)
        return
    if what == "mask_and_causal":
        return  # MultiheadAttention has no is_causal
    bf = blk.batch_first
    q, k, v = inputs
    seq_axis, batch_axis = (1, 0) if bf else (0, 1)
    if what == "batch":
        i = data.draw(st.sampled_from([1, 2]))
        a = inputs[i]
        shape = list(a.shape)
        shape[batch_axis] += 1
        inputs[i] = np.zeros(shape, dtype)
        names = ["query", "key", "value"]
    elif what == "value_len":
        shape = list(v.shape)
        shape[seq_axis] += 1
        inputs[2] = np.zeros(shape, dtype)
        names = ["value"]
    elif what == "no_keys":
        for i in (1, 2):
            shape = list(inputs[i].shape)
            shape[seq_axis] = 0
            inputs[i] = np.zeros(shape, dtype)
        masks = {}
        names = ["key"]
    else:
        key = data.draw(st.sampled_from(["key_padding_mask", "attn_mask"]))
        n, L = (q.shape[0], q.shape[1]) if bf else (q.shape[1], q.shape[0])
        S = k.shape[seq_axis]
        good = (n, S) if key == "key_padding_mask" else (L, S)
        masks[key] = {"mask_type": lambda: data.draw(st.sampled_from([[[True]], 1.0, "mask"])),
                      "mask_dtype": lambda: np.zeros(good, dtype=data.draw(st.sampled_from([np.int64, np.uint8, object]))),
                      "mask_float_dtype": lambda: np.zeros(good, dtype=np.float32 if dtype == np.float64 else np.float64),
                      "mask_shape": lambda: np.zeros(good[:-1] + (good[-1] + 1,), dtype=bool)}[what]()
        names = [key]
    fz.expect_error(names, blk.forward, *inputs, **masks)


# ------------------------------------------------------------------ border_grad of deform_conv2d


@fz.examples(3)
@given(case=fdeform.deform_cases(max_hw=4), be=st.sampled_from(["numpy", "numba"]))
def test_deform_conv2d_border_grad_conventions(case, be):
    """The two conventions differ only in the offset gradient, and there only where a
    sampling coordinate is exactly -1 (on the axis of that coordinate's offset)."""
    args, meta, grad_out = case["args"], case["meta"], case["grad_out"]
    if not fdeform.moderate(case):
        return
    res = {}
    for conv in ("torchvision", "mmcv"):
        out, cache = fz.run(npattn.deform_conv2d_forward, **args, backend=be, border_grad=conv, finite=True)
        res[conv] = (out, fz.run(npattn.deform_conv2d_backward, grad_out, cache, finite=True))
    (o_tv, g_tv), (o_mm, g_mm) = res["torchvision"], res["mmcv"]
    fz.assert_bitwise(o_mm, o_tv, "output mmcv vs torchvision")
    for key in g_tv:
        if key != "offset":
            fz.assert_bitwise(g_mm[key], g_tv[key], f"grad {key} mmcv vs torchvision")
    # sampling coordinates of every offset entry, in the input's dtype as the backends compute them
    off = np.asarray(args["offset"])
    n, _, oh, ow = off.shape
    kh, kw = meta["kernel"]
    (sh, sw), (ph, pw), (dh, dw) = meta["stride"], meta["padding"], meta["dilation"]
    dt = meta["dtype"].type
    base = np.zeros(off.shape, dtype=meta["dtype"])
    for ch in range(off.shape[1]):
        tap = (ch // 2) % (kh * kw)
        i, j = divmod(tap, kw)
        if ch % 2 == 0:
            base[:, ch] = (np.arange(oh) * sh - ph + i * dh)[None, :, None]
        else:
            base[:, ch] = (np.arange(ow) * sw - pw + j * dw)[None, None, :]
    pos = base + off  # dt arithmetic: what the kernels compute
    at_minus_one = pos == dt(-1)
    pair = at_minus_one.reshape(n, off.shape[1] // 2, 2, oh, ow).any(axis=2, keepdims=True)
    pair = np.broadcast_to(pair, (n, off.shape[1] // 2, 2, oh, ow)).reshape(off.shape)
    differ = (g_tv["offset"] != g_mm["offset"]) & ~(np.isnan(g_tv["offset"]) & np.isnan(g_mm["offset"]))
    assert not (differ & ~pair).any(), "the conventions differ away from a coordinate at -1"
    event("a coordinate at -1" if pair.any() else "no coordinate at -1")
    event("the conventions differ somewhere" if differ.any() else "the conventions agree everywhere")


@fz.examples(2)
@given(bad=st.one_of(st.sampled_from(["", "TorchVision", "mmcv ", "pytorch", "numpy"]), st.none(), st.integers(),
                     st.lists(st.just("mmcv"), max_size=1), st.binary(max_size=3)),
       where=st.sampled_from(["deform_conv2d", "deform_conv2d_forward", "DeformConv2d", "DeformConv2dPack",
                              "ModulatedDeformConv2dPack"]))
def test_border_grad_anything_else_is_refused(bad, where):
    x = np.zeros((1, 2, 3, 3))
    w = np.zeros((2, 2, 1, 1))
    off = np.zeros((1, 2, 3, 3))
    if where == "deform_conv2d":
        fz.expect_error(["border_grad"], npattn.deform_conv2d, x, off, w, border_grad=bad)
    elif where == "deform_conv2d_forward":
        fz.expect_error(["border_grad"], npattn.deform_conv2d_forward, x, off, w, border_grad=bad)
    else:
        cls = getattr(npattn, where)
        fz.expect_error(["border_grad"], cls, 2, 2, 1, dtype=np.float64, border_grad=bad)
