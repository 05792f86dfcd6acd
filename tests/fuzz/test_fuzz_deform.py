"""Fuzzing deform_conv2d(_forward/_backward) and batch_map_offsets(_forward/_backward)
on both CPU backends ("numpy", the definition, and "numba").

Properties of every valid draw:
- both backends run, results have the documented shapes and the input's dtype, and no
  argument is modified;
- the backends agree: bit for bit on the sampling (deformable im2col, the seed's clamped
  sampling) and on the offset/mask/coordinate gradients computed from the same upstream
  columns, as docs/backends.md states; to rounding (``TOL`` times an a-priori magnitude)
  on everything that goes through BLAS products or reordered scatters;
- finite inputs with offsets of moderate size give finite outputs and gradients, and no
  floating-point warning;
- correct numbers, checked against independent computations: conv2d at zero offsets,
  a scalar loop oracle (float64) at small sizes, and the adjoint identities of the
  arguments the output is linear in (input, weight, mask for deform_conv2d; input for
  batch_map_offsets): ``<dY, f(v)> = <grad, v>`` to rounding.
Every invalid draw (wrong dtype, rank, type, shape, geometry, backend) raises
ValueError/TypeError naming the argument.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import given, note
from hypothesis import strategies as st

import npattn
from npattn import functional as F
from npattn.sampling import cpu as numba_backend
from npattn.sampling import numpy as numpy_backend

import fuzzlib as fz

# casting the NaN of a drawn array to a wrong (int) dtype on purpose
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered in cast:RuntimeWarning")

BACKENDS = ("numpy", "numba")


def out_size(size, k, s, p, d):
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def divisors(n):
    return [d for d in range(1, n + 1) if n % d == 0]


# ------------------------------------------------------------------ deform_conv2d draws


@st.composite
def deform_cases(draw, max_hw=6):
    """A valid deform_conv2d call: dict(args=..., meta=...)."""
    rng = draw(fz.rngs())
    dtype = draw(fz.dtypes)
    g_off = draw(st.integers(1, 3))
    c_in = g_off * draw(st.integers(1, 2))
    g_w = draw(st.sampled_from(divisors(c_in)))
    c_out = g_w * draw(st.integers(1, 2))
    kernel = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    padding = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
    dilation = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    hw = []
    for a in range(2):
        lo = max(0, dilation[a] * (kernel[a] - 1) + 1 - 2 * padding[a])  # smallest size with an output
        hw.append(draw(st.integers(lo, lo + max_hw)))
    n = draw(st.integers(0, 2))
    oh = out_size(hw[0], kernel[0], stride[0], padding[0], dilation[0])
    ow = out_size(hw[1], kernel[1], stride[1], padding[1], dilation[1])
    k = kernel[0] * kernel[1]

    x_kind = draw(st.sampled_from(["normal", "normal", "special"]))
    off_kind = draw(st.sampled_from(["zero", "small", "integer", "half", "wide", "special"]))
    mask_kind = draw(st.sampled_from([None, "ones", "uniform", "special"]))
    off_shape = (n, 2 * g_off * k, oh, ow)
    if off_kind == "zero":
        offset = np.zeros(off_shape)
    elif off_kind == "small":
        offset = rng.uniform(-2, 2, off_shape)
    elif off_kind == "integer":
        offset = rng.integers(-3, 4, off_shape).astype(float)
    elif off_kind == "half":
        offset = rng.integers(-6, 7, off_shape) / 2.0
    elif off_kind == "wide":
        offset = rng.uniform(-max(hw) - 3, max(hw) + 3, off_shape)
    else:
        offset = fz.fill(rng, off_shape, np.float64, "special", 2.0)
    offset = offset.astype(dtype)
    if mask_kind is None:
        mask = None
    elif mask_kind == "ones":
        mask = np.ones((n, g_off * k, oh, ow), dtype=dtype)
    elif mask_kind == "uniform":
        mask = rng.uniform(-0.5, 1.5, (n, g_off * k, oh, ow)).astype(dtype)
    else:
        mask = fz.fill(rng, (n, g_off * k, oh, ow), dtype, "special")
    args = dict(
        input=fz.fill(rng, (n, c_in) + tuple(hw), dtype, x_kind),
        offset=offset,
        weight=fz.fill(rng, (c_out, c_in // g_w) + kernel, dtype),
        bias=draw(st.sampled_from([None, "b"])),
        stride=stride, padding=padding, dilation=dilation,
        mask=mask,
    )
    if args["bias"] is not None:
        args["bias"] = fz.fill(rng, (c_out,), dtype)
    # argument forms: an int where both entries are equal, lists, numpy ints
    for key in ("stride", "padding", "dilation"):
        v = args[key]
        form = draw(st.sampled_from(["tuple", "list", "np", "int"]))
        if form == "list":
            args[key] = list(v)
        elif form == "np":
            args[key] = (np.int64(v[0]), np.int32(v[1]))
        elif form == "int" and v[0] == v[1]:
            args[key] = int(v[0])
    for key in ("input", "offset", "weight", "bias", "mask"):
        if args[key] is not None:
            args[key] = fz.relayout(args[key], draw(fz.layouts), rng)
    grad_out = fz.relayout(fz.fill(rng, (n, c_out, oh, ow), dtype), draw(fz.layouts), rng)
    meta = dict(
        dtype=np.dtype(dtype), n=n, c_in=c_in, c_out=c_out, hw=tuple(hw), out_hw=(oh, ow), g_w=g_w, g_off=g_off,
        kernel=kernel, stride=stride, padding=padding, dilation=dilation, off_kind=off_kind,
        mask_kind=mask_kind, rng=rng,
        budget=draw(st.sampled_from([npattn.functional.deform.DEFAULT_COLUMN_BUDGET_BYTES, 1, 700])),
    )
    note(f"meta={ {k: v for k, v in meta.items() if k != 'rng'} }")
    return dict(args=args, grad_out=grad_out, meta=meta)


def moderate(case):
    a = case["args"]
    return fz.finite(a["input"], a["offset"], a["weight"], a["bias"], a["mask"], case["grad_out"])


def oracle_bilinear(img, y, x):
    h, w = img.shape
    if not (y > -1 and y < h and x > -1 and x < w):
        return 0.0
    y0, x0 = math.floor(y), math.floor(x)
    ly, lx = y - y0, x - x0
    val = 0.0
    for r, c, wt in ((y0, x0, (1 - ly) * (1 - lx)), (y0, x0 + 1, (1 - ly) * lx), (y0 + 1, x0, ly * (1 - lx)), (y0 + 1, x0 + 1, ly * lx)):
        if 0 <= r < h and 0 <= c < w:
            val += wt * float(img[r, c])
    return val


def oracle_deform(args, meta):
    """Plain-Python loops in float64 over torchvision's definition."""
    x, wt, b, m = (None if args[k] is None else np.asarray(args[k], dtype=np.float64)
                   for k in ("input", "weight", "bias", "mask"))
    off, dt = np.asarray(args["offset"]), meta["dtype"].type
    n, c_in, h, w = x.shape
    c_out, cpg, kh, kw = wt.shape
    (oh, ow), (sh, sw), (ph, pw), (dh, dw) = meta["out_hw"], meta["stride"], meta["padding"], meta["dilation"]
    c_per_og = c_in // meta["g_off"]
    out = np.zeros((n, c_out, oh, ow))
    for bb, o, oy, ox in itertools.product(range(n), range(c_out), range(oh), range(ow)):
        wg = o // (c_out // meta["g_w"])
        acc = 0.0 if b is None else b[o]
        for ci in range(cpg):
            c = wg * cpg + ci
            for i in range(kh):
                for j in range(kw):
                    k = (c // c_per_og) * kh * kw + i * kw + j
                    # positions in the input's dtype, as the backends compute them
                    py = float(dt(oy * sh - ph + i * dh) + off[bb, 2 * k, oy, ox])
                    px = float(dt(ox * sw - pw + j * dw) + off[bb, 2 * k + 1, oy, ox])
                    mm = 1.0 if m is None else m[bb, k, oy, ox]
                    acc += wt[o, ci, i, j] * mm * oracle_bilinear(x[bb, c], py, px)
        out[bb, o, oy, ox] = acc
    return out


def magnitude(args, **replace):
    """A-priori magnitude of every output element: the output of |input|, |weight|,
    |mask|, |bias| (bilinear weights are >= 0), non-finite entries as 0."""
    a = {k: (None if args[k] is None else np.nan_to_num(np.abs(np.asarray(args[k], dtype=np.float64)), nan=0, posinf=0, neginf=0))
         for k in ("input", "weight", "bias", "mask")}
    a.update(replace)
    off = np.nan_to_num(np.asarray(args["offset"], dtype=np.float64), nan=0.0, posinf=1e9, neginf=-1e9)
    return npattn.deform_conv2d(a["input"], off, a["weight"], a["bias"], args["stride"], args["padding"],
                                args["dilation"], a["mask"], backend="numpy")


def abs_gradients(args, grad_out):
    """A-priori magnitudes of the gradients: the backward of the absolute values (finite
    arguments), float64."""
    a = {k: (None if args[k] is None else np.abs(np.asarray(args[k], dtype=np.float64))) for k in args if k not in ("stride", "padding", "dilation")}
    a["offset"] = np.asarray(args["offset"], dtype=np.float64)
    _, cache = npattn.deform_conv2d_forward(a["input"], a["offset"], a["weight"], a["bias"], args["stride"],
                                            args["padding"], args["dilation"], a["mask"], backend="numpy")
    return npattn.deform_conv2d_backward(np.abs(grad_out.astype(np.float64)), cache)


@fz.examples(3)
@given(case=deform_cases())
def test_deform_conv2d_valid(case):
    args, meta, grad_out = case["args"], case["meta"], case["grad_out"]
    dtype, fin = meta["dtype"], moderate(case)
    res = {}
    for be in BACKENDS:
        out, cache = fz.run(npattn.deform_conv2d_forward, **args, backend=be, column_budget_bytes=meta["budget"], finite=fin)
        grads = fz.run(npattn.deform_conv2d_backward, grad_out, cache, finite=fin)
        res[be] = (out, grads)
        assert out.shape == (meta["n"], meta["c_out"]) + meta["out_hw"] and out.dtype == dtype
        want_keys = {"input", "offset", "weight"} | {k for k in ("bias", "mask") if args[k] is not None}
        assert set(grads) == want_keys, sorted(grads)
        for key, g in grads.items():
            assert g.shape == np.shape(args[key]) and g.dtype == dtype, (key, g.shape, g.dtype)
        if fin:
            fz.assert_finite(f"deform_conv2d[{be}]", out, *grads.values())
        only = fz.run(npattn.deform_conv2d, **args, backend=be, finite=fin)
        fz.assert_close(only, out, magnitude(args), f"deform_conv2d[{be}] vs deform_conv2d_forward")

    # the backends agree to rounding
    (o_np, g_np), (o_nb, g_nb) = res["numpy"], res["numba"]
    mag = magnitude(args)
    fz.assert_close(o_nb, o_np, mag, "out numba vs numpy")
    if fin:
        g_abs = abs_gradients(args, grad_out)
        for key in g_np:
            if key == "offset":  # differences of pixels: judged against the results' own size
                scale = float(np.max(np.abs(g_np[key]), initial=0.0)) + float(np.max(np.abs(g_nb[key]), initial=0.0))
            else:
                scale = float(np.max(g_abs[key], initial=0.0))
            fz.assert_close(g_nb[key], g_np[key], scale, f"grad {key} numba vs numpy")
    else:
        for key in g_np:  # non-finite values: the same positions of NaN and +-inf
            for test in (np.isnan, np.isposinf, np.isneginf):
                assert np.array_equal(test(g_nb[key]), test(g_np[key])), f"grad {key}: {test.__name__} differs"

    if not fin:
        return
    # correct numbers: conv2d at zero offsets and unit mask, a loop oracle when small
    if meta["off_kind"] == "zero" and meta["mask_kind"] in (None, "ones"):
        want, _ = F.conv2d_forward(args["input"], args["weight"], args["bias"], args["stride"], args["padding"],
                                   args["dilation"], groups=meta["g_w"])
        fz.assert_close(o_np, want, mag, "deform_conv2d at zero offsets vs conv2d")
    size = o_np.size * args["weight"][0].size
    if size <= 4000:
        want = oracle_deform(args, meta)
        fz.assert_close(o_np.astype(np.float64), want, mag, "deform_conv2d vs loop oracle", dtype)
    # adjoint identities: the output is linear in input, weight and mask
    rng = meta["rng"]
    x, off, w, m = (None if args[k] is None else np.asarray(args[k]) for k in ("input", "offset", "weight", "mask"))
    geo = dict(stride=args["stride"], padding=args["padding"], dilation=args["dilation"])
    for name, v in (("input", x), ("weight", w), ("mask", m)):
        if v is None:
            continue
        d = rng.standard_normal(v.shape).astype(dtype)
        parts = dict(input=x, weight=w, mask=m)
        parts[name] = d
        f_d = npattn.deform_conv2d(parts["input"], off, parts["weight"], None, mask=parts["mask"], backend="numpy", **geo)
        lhs, rhs = fz.inner(grad_out, f_d), fz.inner(g_np[name], d)
        absparts = {k: (None if p is None else np.abs(p.astype(np.float64))) for k, p in parts.items()}
        f_abs = npattn.deform_conv2d(absparts["input"], off.astype(np.float64), absparts["weight"], None,
                                     mask=absparts["mask"], backend="numpy", **geo)
        scale = fz.inner(np.abs(grad_out), f_abs)
        assert abs(lhs - rhs) <= fz.TOL[dtype] * max(scale, 1e-300), f"adjoint of {name}: {lhs!r} vs {rhs!r} (scale {scale:.3e})"


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # non-finite draws: inf - inf in the corner differences
@fz.examples(3)
@given(case=deform_cases(), seed=st.integers(0, 2**32 - 1))
def test_deform_sampling_backends_bit_for_bit(case, seed):
    """The sampling kernels (im2col and the offset/mask gradient from given upstream
    columns) of the numba backend reproduce numpy.py bit for bit."""
    args, meta = case["args"], case["meta"]
    x = np.ascontiguousarray(args["input"])
    off = np.ascontiguousarray(args["offset"])
    m = None if args["mask"] is None else np.ascontiguousarray(args["mask"])
    geo = (meta["kernel"], meta["stride"], meta["padding"], meta["dilation"])
    d_cols = fz.fill(np.random.default_rng(seed), (meta["n"], meta["c_in"]) + meta["kernel"] + meta["out_hw"], meta["dtype"])
    got = {}
    for name, be in (("numpy", numpy_backend), ("numba", numba_backend)):
        cols = be.deform_im2col(x, off, m, *geo, meta["out_hw"], meta["g_off"])
        d_off, d_m = be.deform_col2im_coord(d_cols, x, off, m, *geo, meta["g_off"])
        got[name] = (cols, d_off, d_m)
    for what, a, b in zip(("cols", "d_offset", "d_mask"), got["numba"], got["numpy"]):
        if b is None:
            assert a is None
        else:
            fz.assert_bitwise(a, b, what)


# ------------------------------------------------------------------ invalid deform_conv2d

CORRUPTIONS = [
    "dtype", "mixed_dtype", "rank", "non_array", "offset_channels", "offset_hw", "offset_batch", "mask_shape",
    "bias_shape", "weight_groups", "no_channels", "geometry", "no_output", "backend", "budget", "grad_out",
]


@fz.examples(4)
@given(case=deform_cases(max_hw=3), what=st.sampled_from(CORRUPTIONS), data=st.data())
def test_deform_conv2d_invalid_arguments(case, what, data):
    args, meta = dict(case["args"]), case["meta"]
    rng, dtype = meta["rng"], meta["dtype"]
    kw = dict(backend=data.draw(st.sampled_from(BACKENDS)))
    fwd = npattn.deform_conv2d_forward
    arrays = [k for k in ("input", "offset", "weight", "bias", "mask") if args[k] is not None]
    if what in ("dtype", "mixed_dtype", "rank", "non_array"):
        key = data.draw(st.sampled_from(arrays if what != "mixed_dtype" else arrays[1:]))
        a = np.asarray(args[key])
        if what == "dtype":
            args[key] = a.astype(data.draw(fz.bad_dtypes))
        elif what == "mixed_dtype":
            args[key] = a.astype(np.float32 if dtype == np.float64 else np.float64)
        elif what == "rank":
            args[key] = fz.wrong_rank(a, rng)
        else:
            args[key] = fz.non_array(a, rng)
        names = [key, "input"] if what == "rank" and key in ("offset", "mask") else [key]
    elif what == "offset_channels":
        k2 = 2 * meta["kernel"][0] * meta["kernel"][1]
        c = data.draw(st.sampled_from([0, k2 - 1, k2 + 1, 2 * meta["g_off"] * k2 + 2] if k2 > 2 else [0, 1, 3]))
        if meta["c_in"] % max(c // k2, 1) == 0 and c % k2 == 0 and c:
            c += 1
        args["offset"] = np.zeros((meta["n"], c) + meta["out_hw"], dtype=dtype)
        names = ["offset"]
    elif what == "offset_hw":
        oh, ow = meta["out_hw"]
        args["offset"] = np.zeros(np.shape(args["offset"])[:2] + (oh + 1, ow), dtype=dtype)
        names = ["offset"]
    elif what == "offset_batch":
        args["offset"] = np.zeros((meta["n"] + 1,) + np.shape(args["offset"])[1:], dtype=dtype)
        names = ["offset"]
    elif what == "mask_shape":
        s = list(np.shape(args["offset"]))
        s[1] //= 2
        s[data.draw(st.integers(0, 3))] += 1
        args["mask"] = np.ones(s, dtype=dtype)
        names = ["mask"]
    elif what == "bias_shape":
        args["bias"] = np.zeros(meta["c_out"] + 1, dtype=dtype)
        names = ["bias"]
    elif what == "weight_groups":
        w = np.asarray(args["weight"])
        args["weight"] = np.zeros((w.shape[0], meta["c_in"] + 1) + w.shape[2:], dtype=dtype)
        names = ["weight", "input"]
    elif what == "no_channels":
        args["input"] = np.zeros((meta["n"], 0) + meta["hw"], dtype=dtype)
        names = ["input"]
    elif what == "geometry":
        key = data.draw(st.sampled_from(["stride", "padding", "dilation"]))
        bad = data.draw(st.sampled_from([-1, 0, 1.0, True, (1, 1, 1), (1,), "1", None, (1, 2.0), [1, None]]))
        if key == "padding" and bad in (0, (1, 1, 1)) and not isinstance(bad, bool):
            bad = -1 if bad == 0 else bad
        if isinstance(bad, int) and not isinstance(bad, bool) and bad >= (0 if key == "padding" else 1):
            bad = -2
        args[key] = bad
        names = [key]
    elif what == "no_output":
        h = meta["hw"][0]
        args["padding"] = 0
        args["dilation"] = 1
        args["stride"] = 1
        args["weight"] = np.zeros((meta["c_out"], meta["c_in"] // meta["g_w"], h + 1, 1), dtype=dtype)
        names = ["height", "input"]
    elif what == "backend":
        kw["backend"] = data.draw(st.sampled_from(["cpu", "NUMPY", "", 3, ["numpy"], {"numpy": 1}]))
        names = ["backend"]
    elif what == "budget":
        kw["column_budget_bytes"] = data.draw(st.sampled_from([0, -5, 1.5, "16", True, None]))
        names = ["column_budget_bytes"]
    else:
        _, cache = fz.run(fwd, **args, **kw)
        g = case["grad_out"]
        bad = data.draw(st.sampled_from(["dtype", "other_float", "rank", "shape", "non_array"]))
        if bad == "dtype":
            g = g.astype(data.draw(fz.bad_dtypes))
        elif bad == "other_float":
            g = g.astype(np.float32 if dtype == np.float64 else np.float64)
        elif bad == "rank":
            g = fz.wrong_rank(g, rng)
        elif bad == "shape":
            g = np.zeros(g.shape[:3] + (g.shape[3] + 1,), dtype=dtype)
        else:
            g = fz.non_array(g, rng)
        fz.expect_error(["grad_out"], npattn.deform_conv2d_backward, g, cache)
        return
    fz.expect_error(names, fwd, **args, **kw)


# ------------------------------------------------------------------ batch_map_offsets


@st.composite
def map_cases(draw):
    rng = draw(fz.rngs())
    dtype = draw(fz.dtypes)
    b, h, w = draw(st.integers(0, 3)), draw(st.integers(1, 6)), draw(st.integers(1, 6))
    x_kind = draw(st.sampled_from(["normal", "normal", "special"]))
    off_kind = draw(st.sampled_from(["zero", "small", "integer", "half", "wide", "special"]))
    shape = (b, h, w, 2)
    if off_kind == "zero":
        off = np.zeros(shape)
    elif off_kind == "small":
        off = rng.uniform(-2, 2, shape)
    elif off_kind == "integer":
        off = rng.integers(-3, 4, shape).astype(float)
    elif off_kind == "half":
        off = rng.integers(-6, 7, shape) / 2.0
    elif off_kind == "wide":
        off = rng.uniform(-10, 10, shape)
    else:
        off = fz.fill(rng, shape, np.float64, "special", 2.0)
    args = dict(input=fz.fill(rng, (b, h, w), dtype, x_kind), offsets=off.astype(dtype))
    for key in args:
        args[key] = fz.relayout(args[key], draw(fz.layouts), rng)
    grad_out = fz.relayout(fz.fill(rng, (b, h, w), dtype), draw(fz.layouts), rng)
    return dict(args=args, grad_out=grad_out, dtype=np.dtype(dtype), off_kind=off_kind, rng=rng)


def oracle_clamped(img, r, c):
    h, w = img.shape
    r = min(max(r, 0.0), h - 1.0)
    c = min(max(c, 0.0), w - 1.0)
    r0, r1, c0, c1 = math.floor(r), math.ceil(r), math.floor(c), math.ceil(c)
    fr, fc = r - r0, c - c0
    left = fr * (img[r1, c0] - img[r0, c0]) + img[r0, c0]
    right = fr * (img[r1, c1] - img[r0, c1]) + img[r0, c1]
    return fc * (right - left) + left


@fz.examples(3)
@given(case=map_cases())
def test_batch_map_offsets_valid(case):
    args, dtype, grad_out = case["args"], case["dtype"], case["grad_out"]
    fin = fz.finite(args["input"], args["offsets"], grad_out)
    res = {}
    for be in BACKENDS:
        out, cache = fz.run(npattn.batch_map_offsets_forward, **args, backend=be, finite=fin)
        grads = fz.run(npattn.batch_map_offsets_backward, grad_out, cache, finite=fin)
        assert out.shape == args["input"].shape and out.dtype == dtype
        assert set(grads) == {"input", "offsets"}
        for key, g in grads.items():
            assert g.shape == args[key].shape and g.dtype == dtype, (key, g.shape, g.dtype)
        if fin:
            fz.assert_finite(f"batch_map_offsets[{be}]", out, *grads.values())
        fz.assert_bitwise(fz.run(npattn.batch_map_offsets, **args, backend=be), out, "batch_map_offsets vs _forward")
        res[be] = (out, grads)
    (o_np, g_np), (o_nb, g_nb) = res["numpy"], res["numba"]
    fz.assert_bitwise(o_nb, o_np, "batch_map_offsets out numba vs numpy")
    fz.assert_bitwise(g_nb["offsets"], g_np["offsets"], "batch_map_offsets d_offsets numba vs numpy")
    # the input gradient is a scatter: rounding, bounded by the sum of |d_out| (weights in [0, 1])
    scale = np.nan_to_num(np.abs(grad_out.astype(np.float64)), nan=0, posinf=0).sum(axis=(1, 2), keepdims=True)
    fz.assert_close(g_nb["input"], g_np["input"], scale, "batch_map_offsets d_input numba vs numpy")
    if not fin:
        return
    x, off = (np.asarray(args[k], np.float64) for k in ("input", "offsets"))
    if case["off_kind"] == "zero":
        # equal values (-0.0 comes out as +0.0: fc * (right - left) + left)
        assert np.array_equal(o_np, args["input"]), "zero offsets give the input"
    b, h, w = x.shape
    if x.size <= 200:
        want = np.zeros_like(x)
        for bb, i, j in itertools.product(range(b), range(h), range(w)):
            r = np.asarray(i, dtype) + np.asarray(args["offsets"][bb, i, j, 0])  # coords in the input's dtype
            c = np.asarray(j, dtype) + np.asarray(args["offsets"][bb, i, j, 1])
            want[bb, i, j] = oracle_clamped(x[bb], float(r), float(c))
        mag = np.abs(x).max(axis=(1, 2), keepdims=True) if x.size else 0.0
        fz.assert_close(o_np.astype(np.float64), want, mag, "batch_map_offsets vs loop oracle", dtype)
    # adjoint identity in the input
    d = case["rng"].standard_normal(x.shape).astype(dtype)
    lhs = fz.inner(grad_out, npattn.batch_map_offsets(d, args["offsets"], backend="numpy"))
    rhs = fz.inner(g_np["input"], d)
    scale = fz.inner(np.abs(grad_out), npattn.batch_map_offsets(np.abs(d), args["offsets"], backend="numpy"))
    assert abs(lhs - rhs) <= fz.TOL[dtype] * max(scale, 1e-300), f"adjoint of input: {lhs!r} vs {rhs!r}"


@fz.examples(3)
@given(case=map_cases(), what=st.sampled_from(["dtype", "mixed_dtype", "rank", "non_array", "shape", "backend", "grad_out"]),
       data=st.data())
def test_batch_map_offsets_invalid_arguments(case, what, data):
    args, rng, dtype = dict(case["args"]), case["rng"], case["dtype"]
    kw = dict(backend=data.draw(st.sampled_from(BACKENDS)))
    if what in ("dtype", "rank", "non_array", "mixed_dtype"):
        key = "offsets" if what == "mixed_dtype" else data.draw(st.sampled_from(["input", "offsets"]))
        a = np.asarray(args[key])
        args[key] = {"dtype": lambda: a.astype(data.draw(fz.bad_dtypes)),
                     "mixed_dtype": lambda: a.astype(np.float32 if dtype == np.float64 else np.float64),
                     "rank": lambda: fz.wrong_rank(a, rng),
                     "non_array": lambda: fz.non_array(a, rng)}[what]()
        names = [key]
    elif what == "shape":
        s = list(args["offsets"].shape)
        s[data.draw(st.integers(0, 3))] += 1
        args["offsets"] = np.zeros(s, dtype=dtype)
        names = ["offsets"]
    elif what == "backend":
        kw["backend"] = data.draw(st.sampled_from(["cpu", 0, ["numba"]]))
        names = ["backend"]
    else:
        _, cache = fz.run(npattn.batch_map_offsets_forward, **args, **kw)
        g = case["grad_out"]
        bad = data.draw(st.sampled_from(["dtype", "other_float", "rank", "shape", "non_array"]))
        g = {"dtype": lambda: g.astype(data.draw(fz.bad_dtypes)),
             "other_float": lambda: g.astype(np.float32 if dtype == np.float64 else np.float64),
             "rank": lambda: fz.wrong_rank(g, rng),
             "shape": lambda: np.zeros(g.shape[:2] + (g.shape[2] + 1,), dtype=dtype),
             "non_array": lambda: fz.non_array(g, rng)}[bad]()
        fz.expect_error(["grad_out"], npattn.batch_map_offsets_backward, g, cache)
        return
    fz.expect_error(names, npattn.batch_map_offsets_forward, **args, **kw)
