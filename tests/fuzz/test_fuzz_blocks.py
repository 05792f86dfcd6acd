"""Fuzzing the blocks: SEBlock, SKConv, DAF, AFF, iAFF, MS_CAM, GCT, ConvOffset2D,
DeformConv2d, ModulatedDeformConv2dPack (SKConv's bias and the BatchNorm settings of the
BatchNorm blocks in a test of their own).

Random configurations (channels, reductions, kernels, uneven stride/padding/dilation,
groups, offset groups), float32 and float64, training and eval, batch 0 and 1, H or W = 1,
H or W = 0 (SEBlock, DAF, GCT: PyTorch's result, NaN weight gradients for SEBlock;
SKConv, AFF, iAFF, MS_CAM, ConvOffset2D: a ValueError naming x, where PyTorch's module
refuses it), non-contiguous / negative-stride / read-only inputs, non-finite values. Valid draws:
output and gradients of the right shapes and dtype (a gradient for every parameter),
nothing modified (inputs, upstream gradient, the block's previous arrays), finite in
finite out, the deformable blocks' two CPU backends agreeing to rounding, and what is
known exactly: DAF adds, GCT at initialisation is the identity, SE and MS_CAM scale by a
gate in [0, 1], AFF and iAFF blend x and residual, DeformConv2d at zero offsets and
ModulatedDeformConv2dPack at initialisation are convolutions. Invalid inputs raise
ValueError/TypeError naming the argument.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, note
from hypothesis import strategies as st

import npattn
from npattn import functional as F

import fuzzlib as fz

# casting the NaN (or 1e30) of a drawn array to a wrong dtype on purpose
pytestmark = [pytest.mark.filterwarnings("ignore:invalid value encountered in cast:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")]

BN_BLOCKS = ("SKConv", "AFF", "iAFF", "MS_CAM")  # BatchNorm: training needs more than one value per channel
EMPTY_REFUSED = ("SKConv", "AFF", "iAFF", "MS_CAM", "ConvOffset2D")  # H or W = 0: ValueError naming x


def bn_settings(draw, on):
    """BatchNorm momentum and eps (drawn only with ``on``: the other tests keep their examples)."""
    if not on:
        return {}
    return dict(bn_momentum=draw(st.sampled_from([0.1, 0.0, 1.0, 0.05])), bn_eps=draw(st.sampled_from([1e-5, 1e-3])))


def sk_options(draw, on):
    return dict(bn_settings(draw, on), bias=draw(st.booleans())) if on else {}


@st.composite
def block_cases(draw, names=None, bn_options=False):
    rng = draw(fz.rngs())
    dtype = draw(fz.dtypes)
    name = draw(st.sampled_from(names or ["SEBlock", "SKConv", "DAF", "AFF", "iAFF", "MS_CAM", "GCT", "ConvOffset2D",
                                          "DeformConv2d", "ModulatedDeformConv2dPack"]))
    n = draw(st.integers(0, 3))
    # H or W = 0 for the blocks without convolutions in front (the deformable ones keep
    # an output: their empty images are drawn in test_fuzz_deform.py)
    empty_ok = name in ("SEBlock", "SKConv", "DAF", "AFF", "iAFF", "MS_CAM", "GCT", "ConvOffset2D")
    h, w = draw(st.integers(0 if empty_ok else 1, 5)), draw(st.integers(0 if empty_ok else 1, 5))
    seed = int(rng.integers(2**31))
    extra = {}
    if name == "SEBlock":
        c = draw(st.integers(1, 6))
        blk = npattn.SEBlock(c, draw(st.integers(1, c)), bias=draw(st.booleans()), rng=seed, dtype=dtype)
    elif name == "SKConv":
        g = draw(st.integers(1, 2))
        c = g * draw(st.integers(1, 2))
        blk = npattn.SKConv(c, g * draw(st.integers(1, 2)), g, ratio=draw(st.integers(1, 4)), paths=draw(st.integers(1, 3)),
                            **sk_options(draw, bn_options), rng=seed, dtype=dtype)
    elif name in ("AFF", "iAFF", "MS_CAM"):
        c = draw(st.integers(1, 6))
        r = draw(st.integers(1, c))
        kw = dict(share_global_att=draw(st.booleans())) if name == "iAFF" else {}
        blk = getattr(npattn, name)(c, r, **kw, **bn_settings(draw, bn_options), rng=seed, dtype=dtype)
    elif name == "DAF":
        c = draw(st.integers(1, 4))
        blk = npattn.DAF(dtype=dtype)
    elif name == "GCT":
        c = draw(st.integers(1, 5))
        blk = npattn.GCT(c, epsilon=draw(st.sampled_from([1e-5, 0.0, 1.0])), mode=draw(st.sampled_from(["l2", "l1"])),
                         after_relu=draw(st.booleans()), rng=seed, dtype=dtype)
    elif name == "ConvOffset2D":
        c = draw(st.integers(1, 3))
        blk = npattn.ConvOffset2D(c, init_normal_stddev=draw(st.sampled_from([0.01, 0.5])), rng=seed, dtype=dtype)
    else:
        g = draw(st.integers(1, 2))
        c = g * draw(st.integers(1, 2))
        geo = dict(kernel_size=(draw(st.integers(1, 3)), draw(st.integers(1, 3))),
                   stride=(draw(st.integers(1, 2)), draw(st.integers(1, 2))),
                   padding=(draw(st.integers(0, 2)), draw(st.integers(0, 2))),
                   dilation=(draw(st.integers(1, 2)), draw(st.integers(1, 2))))
        h += geo["dilation"][0] * (geo["kernel_size"][0] - 1)
        w += geo["dilation"][1] * (geo["kernel_size"][1] - 1)
        out = g * draw(st.integers(1, 2))
        if name == "DeformConv2d":
            blk = npattn.DeformConv2d(c, out, **geo, groups=g, bias=draw(st.booleans()), rng=seed, dtype=dtype)
        else:
            blk = npattn.ModulatedDeformConv2dPack(c, out, **geo, groups=g, deform_groups=draw(st.sampled_from([d for d in (1, 2) if c % d == 0])),
                                                   bias=draw(st.booleans()), rng=seed, dtype=dtype)
        extra = geo
    kind = draw(st.sampled_from(["normal", "normal", "special"]))
    x = fz.relayout(fz.fill(rng, (n, c, h, w), dtype, kind), draw(fz.layouts), rng)
    inputs = [x]
    if name in ("DAF", "AFF", "iAFF"):
        inputs.append(fz.relayout(fz.fill(rng, x.shape, dtype), draw(fz.layouts), rng))
    if name == "DeformConv2d":
        k = extra["kernel_size"][0] * extra["kernel_size"][1]
        oh = (h + 2 * extra["padding"][0] - extra["dilation"][0] * (extra["kernel_size"][0] - 1) - 1) // extra["stride"][0] + 1
        ow = (w + 2 * extra["padding"][1] - extra["dilation"][1] * (extra["kernel_size"][1] - 1) - 1) // extra["stride"][1] + 1
        g_off = draw(st.sampled_from([d for d in (1, 2) if c % d == 0]))
        zero = draw(st.booleans())
        off = np.zeros((n, 2 * g_off * k, oh, ow), dtype) if zero else (rng.uniform(-2, 2, (n, 2 * g_off * k, oh, ow))).astype(dtype)
        inputs.append(fz.relayout(off, draw(fz.layouts), rng))
        if draw(st.booleans()):
            inputs.append(rng.uniform(0, 1, (n, g_off * k, oh, ow)).astype(dtype))
        extra["zero_offsets"] = zero
    randomize = draw(st.booleans()) and name not in ("DAF",)
    if randomize:  # parameters and statistics away from the initialisation
        state = blk.state_dict()
        for key, v in state.items():
            if v.dtype.kind == "f":
                state[key] = (np.abs(rng.standard_normal(v.shape)) + 0.5 if key.endswith("running_var")
                              else rng.standard_normal(v.shape) * 0.5).astype(dtype)
        blk.load_state_dict(state)
    training = draw(st.booleans())
    note(f"block={name} dtype={np.dtype(dtype)} training={training} shapes={[a.shape for a in inputs]} randomized={randomize}")
    return dict(name=name, block=blk, inputs=inputs, training=training, dtype=np.dtype(dtype), rng=rng,
                randomized=randomize, extra=extra, kind=kind)


def grad_out_for(case, y):
    return fz.relayout(fz.fill(case["rng"], y.shape, case["dtype"]), "negative" if y.ndim else "c", case["rng"])


@fz.examples(4)
@given(case=block_cases())
def test_block_valid(case):
    blk, inputs, training, dtype, name = case["block"], case["inputs"], case["training"], case["dtype"], case["name"]
    n, _, h, w = inputs[0].shape
    if h * w == 0 and name in EMPTY_REFUSED:  # as PyTorch's module, which refuses it in a convolution
        fz.expect_error(["x"], blk.forward, *inputs, training=training)
        return
    if training and name in BN_BLOCKS and n <= 1:
        fz.expect_error(["input size"], blk.forward, *inputs, training=True)
        return
    before = snapshot_state(blk)
    # SEBlock on an empty image: the squeeze is the mean of nothing, NaN weight gradients (as PyTorch)
    fin = fz.finite(*inputs) and case["kind"] == "normal" and not (name == "SEBlock" and h * w == 0)
    y, cache = fz.run(blk.forward, *inputs, training=training, finite=fin)
    assert y.dtype == dtype and y.shape[0] == n
    dy = grad_out_for(case, y)
    grads_in, grads_p = fz.run(blk.backward, dy, cache, finite=fin)
    assert_state_arrays_untouched(before)
    assert len(grads_in) == len(inputs)
    for a, g in zip(inputs, grads_in):
        assert g.shape == a.shape and g.dtype == dtype, (g.shape, a.shape, g.dtype)
    assert sorted(grads_p) == sorted(blk.parameter_names())
    for k, g in grads_p.items():
        assert g.shape == blk[k].shape and g.dtype == dtype, (k, g.shape, g.dtype)
    if name == "SEBlock" and h * w == 0 and n:
        assert np.isnan(grads_p["fc.0.weight"]).all() and np.isnan(grads_p["fc.2.weight"]).all(), "NaN as PyTorch"
    if not fin:
        return
    fz.assert_finite(name, y, *grads_in, *grads_p.values())
    x = inputs[0].astype(np.float64)
    tol = fz.TOL[dtype]
    if name == "DAF":
        fz.assert_bitwise(y, inputs[0] + inputs[1], "DAF is x + residual")
    elif name == "GCT" and not case["randomized"]:
        fz.assert_bitwise(y, np.ascontiguousarray(inputs[0]), "GCT at initialisation is the identity")
    elif name in ("SEBlock", "MS_CAM"):
        assert np.all(np.abs(y) <= np.abs(x) * (1 + tol)), f"{name}: the gate is not in [0, 1]"
    elif name in ("AFF", "iAFF"):
        f = 2.0 if name == "AFF" else 1.0
        r = inputs[1].astype(np.float64)
        lo, hi = np.minimum(f * x, f * r), np.maximum(f * x, f * r)
        slack = tol * (np.abs(x) + np.abs(r)) * f * 4
        assert np.all(y >= lo - slack) and np.all(y <= hi + slack), f"{name}: not a blend of x and residual"
    elif name == "DeformConv2d" and case["extra"]["zero_offsets"] and len(inputs) == 2:
        ex = case["extra"]
        want, _ = F.conv2d_forward(inputs[0], blk["weight"], blk.state_dict().get("bias"), ex["stride"], ex["padding"],
                                   ex["dilation"], groups=blk.groups)
        scale = conv_abs(inputs[0], blk["weight"], ex, blk.groups)
        fz.assert_close(y, want, scale, "DeformConv2d at zero offsets vs conv2d")
    elif name == "ModulatedDeformConv2dPack" and not case["randomized"]:
        ex = case["extra"]
        want, _ = F.conv2d_forward(inputs[0], blk["weight"] * dtype.type(0.5), blk.state_dict().get("bias"), ex["stride"],
                                   ex["padding"], ex["dilation"], groups=blk.groups)
        scale = conv_abs(inputs[0], blk["weight"], ex, blk.groups)
        fz.assert_close(y, want, scale, "ModulatedDeformConv2dPack at initialisation vs conv2d with mask 0.5")


@fz.examples(2)
@given(case=block_cases(["SKConv", "AFF", "iAFF", "MS_CAM"], bn_options=True))
def test_block_bn_settings_and_sk_bias_valid(case):
    """SKConv's ``bias`` and the BatchNorm blocks' ``bn_momentum`` / ``bn_eps`` drawn too
    (0 and 1 included): everything test_block_valid checks."""
    test_block_valid.hypothesis.inner_test(case)


def conv_abs(x, w, ex, groups):
    y, _ = F.conv2d_forward(np.abs(x.astype(np.float64)), np.abs(w.astype(np.float64)), None, ex["stride"], ex["padding"],
                            ex["dilation"], groups=groups)
    return y


def snapshot_state(blk):
    """The block's arrays before the call: replaced by training, never written in place."""
    return [(blk[k], blk[k].copy()) for k in blk.state_dict()]


def assert_state_arrays_untouched(snap):
    fz.assert_unchanged(snap, "a block array")


@fz.examples(2)
@given(case=block_cases(["ConvOffset2D", "DeformConv2d", "ModulatedDeformConv2dPack"]))
def test_deformable_blocks_backends_agree(case):
    """The same block on the "numpy" and "numba" backends: the same output and gradients
    to rounding (relative to each tensor's largest magnitude; finite inputs)."""
    x = case["inputs"][0]
    if not fz.finite(*case["inputs"]) or x.shape[2] * x.shape[3] == 0:  # ConvOffset2D refuses an empty image
        return
    res = {}
    for be in ("numpy", "numba"):
        blk = case["block"]
        blk.backend = be
        y, cache = fz.run(blk.forward, *case["inputs"], training=case["training"])
        dy = np.random.default_rng(0).standard_normal(y.shape).astype(case["dtype"])
        gi, gp = fz.run(blk.backward, dy, cache)
        res[be] = [y, *gi, *(gp[k] for k in sorted(gp))]
    for i, (a, b) in enumerate(zip(res["numba"], res["numpy"])):
        # the offset paths go through conv2d products, so the scale is the tensors' own magnitude
        scale = float(np.max(np.abs(b), initial=0.0)) * 10 + float(np.max(np.abs(a), initial=0.0)) * 10
        fz.assert_close(a, b, scale, f"{case['name']} tensor {i} numba vs numpy")


@fz.examples(3)
@given(case=block_cases(), what=st.sampled_from(["dtype", "other_float", "rank", "channels", "non_array", "residual",
                                                 "grad_out"]), data=st.data())
def test_block_invalid_inputs(case, what, data):
    blk, inputs, rng, dtype, name = case["block"], list(case["inputs"]), case["rng"], case["dtype"], case["name"]
    training = case["training"] and not (name in BN_BLOCKS and inputs[0].shape[0] <= 1)
    x = inputs[0]
    if x.shape[2] * x.shape[3] == 0 and name in EMPTY_REFUSED:
        return  # refused whatever else is wrong (test_block_valid)
    if what == "residual":
        if name not in ("DAF", "AFF", "iAFF"):
            return
        r = inputs[1]
        inputs[1] = np.zeros(r.shape[:3] + (r.shape[3] + 1,), dtype=dtype)
        names = ["residual"]
    elif what == "grad_out":
        y, cache = fz.run(blk.forward, *inputs, training=training)
        g = fz.fill(rng, y.shape, dtype)
        bad = data.draw(st.sampled_from(["dtype", "other_float", "rank", "shape", "non_array"]))
        g = {"dtype": lambda: g.astype(data.draw(fz.bad_dtypes)),
             "other_float": lambda: g.astype(np.float32 if dtype == np.float64 else np.float64),
             "rank": lambda: fz.wrong_rank(g, rng),
             "shape": lambda: np.zeros(g.shape[:3] + (g.shape[3] + 1,), dtype=dtype),
             "non_array": lambda: fz.non_array(g, rng)}[bad]()
        fz.expect_error(["grad_out"], blk.backward, g, cache)
        return
    else:
        i = data.draw(st.integers(0, len(inputs) - 1))
        a = inputs[i]
        if what == "channels" and name in ("DAF",):
            return  # DAF takes any channels
        if what == "other_float" and name == "DAF":
            if i == 0:
                return  # DAF holds no arrays: its inputs only need one dtype
        inputs[i] = {"dtype": lambda: a.astype(data.draw(fz.bad_dtypes)),
                     "other_float": lambda: a.astype(np.float32 if dtype == np.float64 else np.float64),
                     "rank": lambda: fz.wrong_rank(a, rng),
                     "channels": lambda: np.concatenate([a, a[:, :1]], axis=1),
                     "non_array": lambda: fz.non_array(a, rng)}[what]()
        names = [["x", "residual", "offset", "mask"][i] if name in ("DAF", "AFF", "iAFF") or i == 0
                 else ["x", "offset", "mask"][i]]
        if what == "channels" and name in ("DAF",):
            names.append("x")
        if name == "DAF" and i == 1:
            names.append("x")  # "residual must have the shape / dtype of x"
    fz.expect_error(names, blk.forward, *inputs, training=training)
