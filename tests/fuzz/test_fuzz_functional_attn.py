"""Fuzzing the primitive ops added for the channel/spatial attention and transformer
blocks: conv1d, mean, amax (both max_grad rules), l2_norm, logsumexp, layer_norm2d,
layer_norm (last axis), hardswish, silu, gelu, hard_sigmoid and
scaled_dot_product_attention (each forward and backward), and the attention variants (every
keyword of scaled_dot_product_attention_forward, lse and dlse, varlen_attention_forward
with empty sequences) at the end of the file.

Valid draws: results of the right shape and dtype, nothing modified, finite inputs give
finite results without floating-point warnings, forward against an independent float64
computation (strided slices for conv1d, numpy reductions, the formulas, a per-row
softmax with the mask applied by hand), backward by the adjoint identity
``<dy, f(v)> = <grad, v>`` where the op is linear in an argument, by central differences
along a random direction in float64 elsewhere, amax's tie rule (the gradient split
evenly among the maxima) and the attention's mask convention (boolean True = may attend;
a query with every key masked gives 0 and passes no gradient). Invalid draws raise
ValueError/TypeError naming the argument.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.special
from hypothesis import event, given, note
from hypothesis import strategies as st

from npattn import functional as F

import fuzzlib as fz

# casting the NaN (or 1e30) of a drawn array to a wrong dtype on purpose
pytestmark = [pytest.mark.filterwarnings("ignore:invalid value encountered in cast:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")]


def other_float(dtype):
    return np.float32 if np.dtype(dtype) == np.float64 else np.float64


def bad_upstream(dy, data, rng, dtype):
    """An invalid upstream gradient for ``dy``'s forward."""
    bad = data.draw(st.sampled_from(["dtype", "other_float", "rank", "shape", "non_array"]))
    shape = dy.shape[:-1] + (dy.shape[-1] + 1,) if dy.ndim else (2,)
    return {"dtype": lambda: dy.astype(data.draw(fz.bad_dtypes)),
            "other_float": lambda: dy.astype(other_float(dtype)),
            "rank": lambda: fz.wrong_rank(dy, rng),
            "shape": lambda: np.zeros(shape, dtype=dtype),
            "non_array": lambda: fz.non_array(dy, rng)}[bad]()


def directional(f, args, name, u, h=1e-6):
    """Central difference of the scalar ``f(**args)`` along ``u`` in argument ``name`` (float64)."""
    plus, minus = dict(args), dict(args)
    plus[name] = args[name] + h * u
    minus[name] = args[name] - h * u
    return (f(**plus) - f(**minus)) / (2 * h)


# --------------------------------------------------------------------------- conv1d


@st.composite
def conv1d_cases(draw):
    rng = draw(fz.rngs())
    dtype = draw(fz.dtypes)
    groups = draw(st.integers(1, 3))
    c_in, c_out = groups * draw(st.integers(1, 2)), groups * draw(st.integers(1, 2))
    k, stride, padding, dilation = (draw(st.integers(1, 4)), draw(st.integers(1, 3)), draw(st.integers(0, 3)),
                                    draw(st.integers(1, 3)))
    lo = max(0, dilation * (k - 1) + 1 - 2 * padding)
    length = draw(st.integers(lo, lo + 6))
    n = draw(st.integers(0, 3))
    kind = draw(st.sampled_from(["normal", "normal", "special"]))
    args = dict(x=fz.fill(rng, (n, c_in, length), dtype, kind), weight=fz.fill(rng, (c_out, c_in // groups, k), dtype),
                bias=fz.fill(rng, (c_out,), dtype) if draw(st.booleans()) else None,
                stride=stride, padding=padding, dilation=dilation, groups=groups)
    for key in ("x", "weight", "bias"):
        if args[key] is not None:
            args[key] = fz.relayout(args[key], draw(fz.layouts), rng)
    out_len = (length + 2 * padding - dilation * (k - 1) - 1) // stride + 1
    dy = fz.relayout(fz.fill(rng, (n, c_out, out_len), dtype), draw(fz.layouts), rng)
    note(f"conv1d n={n} c_in={c_in} c_out={c_out} L={length} k={k} s={stride} p={padding} d={dilation} g={groups}")
    return dict(args=args, dy=dy, dtype=np.dtype(dtype), rng=rng)


def conv1d_ref(x, w, b, stride, padding, dilation, groups):
    """float64, one strided slice of the padded input per tap (independent of conv2d)."""
    x, w = x.astype(np.float64), w.astype(np.float64)
    n, c_in, length = x.shape
    c_out, cg, k = w.shape
    out_len = (length + 2 * padding - dilation * (k - 1) - 1) // stride + 1
    xp = np.pad(x, ((0, 0), (0, 0), (padding, padding)))
    y = np.zeros((n, c_out, out_len))
    og = c_out // groups
    for g in range(groups):
        for j in range(k):
            start = j * dilation
            xs = xp[:, g * cg:(g + 1) * cg, start:start + stride * (out_len - 1) + 1:stride]  # (N, cg, L_out)
            y[:, g * og:(g + 1) * og] += np.einsum("oc,ncl->nol", w[g * og:(g + 1) * og, :, j], xs)
    if b is not None:
        y += b.astype(np.float64)[None, :, None]
    return y


@fz.examples(5)
@given(case=conv1d_cases())
def test_conv1d_valid(case):
    args, dy, dtype, rng = case["args"], case["dy"], case["dtype"], case["rng"]
    fin = fz.finite(args["x"], args["weight"], args["bias"], dy)
    y, cache = fz.run(F.conv1d_forward, **args, finite=fin)
    grads = fz.run(F.conv1d_backward, dy, cache, finite=fin)
    assert y.shape == dy.shape and y.dtype == dtype
    assert set(grads) == {"x", "weight"} | ({"bias"} if args["bias"] is not None else set())
    for k, g in grads.items():
        assert g.shape == args[k].shape and g.dtype == dtype, (k, g.shape, g.dtype)
    if not fin:
        return
    fz.assert_finite("conv1d", y, *grads.values())
    geo = {k: args[k] for k in ("stride", "padding", "dilation", "groups")}
    x64, w64 = args["x"].astype(np.float64), args["weight"].astype(np.float64)
    b64 = None if args["bias"] is None else args["bias"].astype(np.float64)
    scale = conv1d_ref(np.abs(x64), np.abs(w64), None if b64 is None else np.abs(b64), **geo)
    fz.assert_close(y.astype(np.float64), conv1d_ref(x64, w64, b64, **geo), scale, "conv1d vs strided slices", dtype)
    for name in ("x", "weight"):  # y is linear in x and in weight
        v = rng.standard_normal(args[name].shape)
        parts = {"x": x64, "weight": w64, name: v}
        lhs, rhs = fz.inner(dy, conv1d_ref(parts["x"], parts["weight"], None, **geo)), fz.inner(grads[name], v)
        scale = fz.inner(np.abs(dy), conv1d_ref(np.abs(parts["x"]), np.abs(parts["weight"]), None, **geo))
        assert abs(lhs - rhs) <= fz.TOL[dtype] * max(scale, 1e-300), f"adjoint of {name}: {lhs!r} vs {rhs!r}"
    if b64 is not None:
        fz.assert_close(grads["bias"].astype(np.float64), dy.astype(np.float64).sum(axis=(0, 2)),
                        np.abs(dy.astype(np.float64)).sum(axis=(0, 2)), "conv1d bias gradient", dtype)


@fz.examples(3)
@given(case=conv1d_cases(), what=st.sampled_from(["dtype", "mixed", "rank", "non_array", "channels", "bias", "geometry",
                                                  "groups", "no_output", "dy"]), data=st.data())
def test_conv1d_invalid_arguments(case, what, data):
    args, rng, dtype = dict(case["args"]), case["rng"], case["dtype"]
    arrays = [k for k in ("x", "weight", "bias") if args[k] is not None]
    if what in ("dtype", "mixed", "rank", "non_array"):
        key = data.draw(st.sampled_from(arrays if what != "mixed" else arrays[1:]))
        a = np.asarray(args[key])
        args[key] = {"dtype": lambda: a.astype(data.draw(fz.bad_dtypes)), "mixed": lambda: a.astype(other_float(dtype)),
                     "rank": lambda: fz.wrong_rank(a, rng), "non_array": lambda: fz.non_array(a, rng)}[what]()
        names = [key] + (["input"] if key == "x" else [])
    elif what == "channels":
        w = args["weight"]
        args["weight"] = np.zeros((w.shape[0], w.shape[1] + 1, w.shape[2]), dtype=dtype)
        names = ["weight", "x", "groups"]
    elif what == "bias":
        args["bias"] = np.zeros(args["weight"].shape[0] + 1, dtype=dtype)
        names = ["bias"]
    elif what == "geometry":
        key = data.draw(st.sampled_from(["stride", "padding", "dilation"]))
        args[key] = data.draw(st.sampled_from([-1, 1.0, "1", None, True, (1, 1)] + ([0] if key != "padding" else [])))
        names = [key]
    elif what == "groups":
        args["groups"] = data.draw(st.sampled_from([0, -1, 1.5, True, args["x"].shape[1] + 1]))
        names = ["groups"]
    elif what == "no_output":
        w = args["weight"]
        args["weight"] = np.zeros(w.shape[:2] + (args["x"].shape[2] + 2 * args["padding"] + 1,), dtype=dtype)
        args["dilation"] = 1
        names = ["width", "output"]
    else:
        _, cache = fz.run(F.conv1d_forward, **args)
        fz.expect_error(["dy"], F.conv1d_backward, bad_upstream(case["dy"], data, rng, dtype), cache)
        return
    fz.expect_error(names, F.conv1d_forward, **args)


# --------------------------------------------------------------------------- mean and amax


@st.composite
def reduce_cases(draw, ties=False):
    rng = draw(fz.rngs())
    dtype = draw(fz.dtypes)
    shape = tuple(draw(st.lists(st.integers(0, 4), min_size=1, max_size=4)))
    nd = len(shape)
    axes = draw(st.lists(st.integers(0, nd - 1), min_size=1, max_size=nd, unique=True))
    axes = [a - nd if draw(st.booleans()) else a for a in axes]
    axis = axes[0] if len(axes) == 1 and draw(st.booleans()) else tuple(axes)
    kind = draw(st.sampled_from(["normal", "normal", "ties", "special"]))
    if kind == "ties":  # few distinct values: many tied maxima
        x = rng.integers(-2, 3, shape).astype(dtype)
    else:
        x = fz.fill(rng, shape, dtype, kind)
    x = fz.relayout(x, draw(fz.layouts), rng)
    return dict(x=x, axis=axis, keepdims=draw(st.sampled_from([True, False, np.bool_(True)])), dtype=np.dtype(dtype),
                rng=rng, kind=kind, layout=draw(fz.layouts))


def norm_axes(axis, nd):
    return tuple(sorted(a % nd for a in ((axis,) if isinstance(axis, int) else axis)))


@fz.examples(5)
@given(op=st.sampled_from(["mean", "amax"]), case=reduce_cases())
def test_reduce_valid(op, case):
    x, axis, keepdims, dtype, rng = case["x"], case["axis"], case["keepdims"], case["dtype"], case["rng"]
    fwd, bwd = (F.mean_forward, F.mean_backward) if op == "mean" else (F.amax_forward, F.amax_backward)
    axes = norm_axes(axis, x.ndim)
    if any(x.shape[a] == 0 for a in axes):  # nothing to reduce (torch: amax raises; mean is NaN)
        fz.expect_error(["axis", "x"], fwd, x, axis, keepdims=keepdims)
        return
    fin = fz.finite(x)
    y, cache = fz.run(fwd, x, axis, keepdims=keepdims, finite=fin)
    x64 = x.astype(np.float64)
    ref = np.mean if op == "mean" else np.max
    with np.errstate(invalid="ignore"):  # inf - inf in the oracle's sum of a non-finite draw
        want = ref(x64, axis=axes, keepdims=bool(keepdims))
    assert y.shape == want.shape and y.dtype == dtype
    dy = fz.relayout(fz.fill(rng, y.shape, dtype), case["layout"], rng)
    g = fz.run(bwd, dy, cache, finite=fin)["x"]
    assert g.shape == x.shape and g.dtype == dtype
    if op == "amax":  # exact: a maximum is one of the values; NaN groups give NaN
        fz.assert_bitwise(y.astype(np.float64), want, "amax vs np.max")
    if not fin:
        return
    fz.assert_finite(op, y, g)
    dy_kept = dy.astype(np.float64).reshape(np.max(x64, axis=axes, keepdims=True).shape)
    if op == "mean":
        fz.assert_close(y.astype(np.float64), want, np.mean(np.abs(x64), axis=axes, keepdims=bool(keepdims)),
                        "mean vs numpy", dtype)
        v = rng.standard_normal(x.shape)  # linear: the adjoint identity
        lhs, rhs = fz.inner(dy, np.mean(v, axis=axes, keepdims=bool(keepdims))), fz.inner(g, v)
        scale = fz.inner(np.abs(dy), np.mean(np.abs(v), axis=axes, keepdims=bool(keepdims)))
        assert abs(lhs - rhs) <= fz.TOL[dtype] * max(scale, 1e-300), f"mean adjoint: {lhs!r} vs {rhs!r}"
    else:  # the tie rule, on x and on x rounded to a few integers (many ties)
        tied = np.clip(np.round(x), -1, 1)
        _, cache_t = fz.run(fwd, tied, axis, keepdims=keepdims, finite=True)
        g_t = fz.run(bwd, dy, cache_t, finite=True)["x"]
        n_tied = 0
        for xv, gv in ((x64, g), (tied.astype(np.float64), g_t)):
            mx = np.max(xv, axis=axes, keepdims=True)
            is_max = xv == mx
            count = is_max.sum(axis=axes, keepdims=True)  # dy split evenly among the maxima, 0 elsewhere
            want_g = np.where(is_max, dy_kept / count, 0.0)
            fz.assert_close(gv.astype(np.float64), want_g, np.abs(want_g), "amax gradient (ties split evenly)", dtype)
            assert not gv[~is_max].any(), "amax: a gradient off the maximum"
            n_tied += int((count > 1).sum())
        event("ties" if n_tied else "no ties")


@fz.examples(3)
@given(op=st.sampled_from(["mean", "amax"]), case=reduce_cases(),
       what=st.sampled_from(["dtype", "non_array", "axis_type", "axis_range", "axis_repeat", "keepdims", "dy"]),
       data=st.data())
def test_reduce_invalid_arguments(op, case, what, data):
    x, axis, rng, dtype = case["x"], case["axis"], case["rng"], case["dtype"]
    fwd, bwd = (F.mean_forward, F.mean_backward) if op == "mean" else (F.amax_forward, F.amax_backward)
    nd = x.ndim
    if what == "dtype":
        fz.expect_error(["x"], fwd, x.astype(data.draw(fz.bad_dtypes)), axis)
    elif what == "non_array":
        fz.expect_error(["x"], fwd, fz.non_array(x, rng), axis)
    elif what == "axis_type":
        fz.expect_error(["axis"], fwd, x, data.draw(st.sampled_from([1.0, "0", None, [0], (), True, (0, 0.5), (True,)])))
    elif what == "axis_range":
        fz.expect_error(["axis"], fwd, x, data.draw(st.sampled_from([nd, -nd - 1, (0, nd), 99])))
    elif what == "axis_repeat":
        fz.expect_error(["axis"], fwd, x, (0, 0) if nd == 1 else (0, -nd))
    elif what == "keepdims":
        empty = any(x.shape[a] == 0 for a in norm_axes(axis, nd))  # checked first: an error naming axis and x
        fz.expect_error(["keepdims"] + (["axis", "x"] if empty else []), fwd, x, axis, keepdims=data.draw(st.sampled_from(["no", None, 1, 0.0, [True]])))
    else:
        if any(x.shape[a] == 0 for a in norm_axes(axis, nd)):
            return
        y, cache = fz.run(fwd, x, axis, keepdims=case["keepdims"])
        dy = np.zeros(y.shape, dtype) if y.ndim else np.zeros((1,), dtype)[0:1].reshape(())
        fz.expect_error(["dy"], bwd, bad_upstream(dy, data, rng, dtype), cache)


# ------------------------------------------- amax with max_grad="first", l2_norm, logsumexp (CBAM's pools)


def first_max_oracle(x, axes, dy_kept):
    """dy at the first maximal element of each group in row-major order of the reduced
    axes (the first NaN if any), 0 elsewhere: loops over np.ndindex, float64."""
    g = np.zeros(x.shape)
    kept = [a for a in range(x.ndim) if a not in axes]
    for out in np.ndindex(*[x.shape[a] for a in kept]):
        best, where = None, None
        for red in np.ndindex(*[x.shape[a] for a in axes]):
            idx = [0] * x.ndim
            for a, i in zip(kept, out):
                idx[a] = i
            for a, i in zip(axes, red):
                idx[a] = i
            v = x[tuple(idx)]
            if best is None or v > best or (math.isnan(v) and not math.isnan(best)):
                best, where = v, tuple(idx)
        g[where] = dy_kept[tuple(0 if a in axes else where[a] for a in range(x.ndim))]
    return g


def lse_oracle(x, axes, keepdims):
    """log sum exp over ``axes`` in float64, shifted by the maximum (scipy's logsumexp
    fails on a tuple of axes with an empty kept axis)."""
    m = np.max(x, axis=axes, keepdims=True)
    y = m + np.log(np.sum(np.exp(x - m), axis=axes, keepdims=True))
    return y if keepdims else np.squeeze(y, axis=axes)


@fz.examples(4)
@given(op=st.sampled_from(["amax_first", "l2_norm", "logsumexp"]), case=reduce_cases())
def test_pools_valid(op, case):
    x, axis, keepdims, dtype, rng = case["x"], case["axis"], case["keepdims"], case["dtype"], case["rng"]
    if op == "amax_first":
        fwd, bwd, kw = F.amax_forward, F.amax_backward, {"max_grad": "first"}
    else:
        fwd, bwd, kw = getattr(F, f"{op}_forward"), getattr(F, f"{op}_backward"), {}
    axes = norm_axes(axis, x.ndim)
    if any(x.shape[a] == 0 for a in axes):
        fz.expect_error(["axis", "x"], fwd, x, axis, keepdims=keepdims, **kw)
        return
    fin = fz.finite(x)
    y, cache = fz.run(fwd, x, axis, keepdims=keepdims, finite=fin, **kw)
    x64 = x.astype(np.float64)
    with np.errstate(all="ignore"):
        want = {"amax_first": lambda: np.max(x64, axis=axes, keepdims=bool(keepdims)),
                "l2_norm": lambda: np.sqrt(np.sum(x64 * x64, axis=axes, keepdims=bool(keepdims))),
                "logsumexp": lambda: lse_oracle(x64, axes, bool(keepdims))}[op]()
    assert y.shape == want.shape and y.dtype == dtype
    dy = fz.relayout(fz.fill(rng, y.shape, dtype), case["layout"], rng)
    g = fz.run(bwd, dy, cache, finite=fin)["x"]
    assert g.shape == x.shape and g.dtype == dtype
    dy_kept = dy.astype(np.float64).reshape(np.max(x64, axis=axes, keepdims=True).shape)
    if op == "amax_first":  # the value is exact; the whole gradient to the first maximum (ties or not)
        fz.assert_bitwise(y.astype(np.float64), want, "amax vs np.max")
        if case["kind"] != "special":
            # (+ 0.0: the other elements hold 0 * dy, which may be -0.0)
            fz.assert_bitwise(g.astype(np.float64) + 0.0, first_max_oracle(x64, axes, dy_kept) + 0.0,
                              "amax first-maximum gradient")
        event("ties" if case["kind"] == "ties" else "other")
        return
    if not fin:
        return
    fz.assert_finite(op, y, g)
    with np.errstate(all="ignore"):
        if op == "l2_norm":  # x / |x|, 0 for an all-zero group (the kink: torch's lp_pool2d gives 0)
            nrm = np.sqrt(np.sum(x64 * x64, axis=axes, keepdims=True))
            want_g = np.where(nrm == 0, 0.0, x64 / nrm) * dy_kept
            event("zero group" if (nrm == 0).any() else "no zero group")
        else:  # the softmax over the group
            want_g = np.exp(x64 - lse_oracle(x64, axes, True)) * dy_kept
    fz.assert_close(y.astype(np.float64), want, np.abs(want) + 1.0, f"{op} vs formula", dtype)
    fz.assert_close(g.astype(np.float64), want_g, np.abs(dy_kept) + 0 * x64, f"{op} gradient", dtype)


@fz.examples(2)
@given(case=reduce_cases(), bad=st.sampled_from(["last", "", None, 1, "Split"]))
def test_amax_max_grad_anything_else_is_refused(case, bad):
    fz.expect_error(["max_grad", "axis", "x"], F.amax_forward, case["x"], case["axis"], max_grad=bad)


# --------------------------------------------------------------------------- layer_norm2d


@st.composite
def ln_cases(draw):
    rng = draw(fz.rngs())
    dtype = draw(fz.dtypes)
    c = draw(st.integers(1, 5))
    shape = (draw(st.integers(0, 3)), c) + ((draw(st.integers(0, 3)), draw(st.integers(0, 3))) if draw(st.booleans()) else ())
    kind = draw(st.sampled_from(["normal", "normal", "special"]))
    x = fz.fill(rng, shape, dtype, kind, scale=draw(st.sampled_from([1.0, 10.0]))) + np.dtype(dtype).type(
        draw(st.sampled_from([0.0, 5.0])))
    args = dict(x=x)
    if draw(st.booleans()):
        args["weight"] = fz.fill(rng, (c,), dtype)
    if draw(st.booleans()):
        args["bias"] = fz.fill(rng, (c,), dtype)
    for key in list(args):
        args[key] = fz.relayout(args[key], draw(fz.layouts), rng)
    args["eps"] = draw(st.sampled_from([1e-6, 1e-5, 0.5, 0, 1]))
    dy = fz.relayout(fz.fill(rng, shape, dtype), draw(fz.layouts), rng)
    return dict(args=args, dy=dy, dtype=np.dtype(dtype), rng=rng)


def ln_ref(x, weight=None, bias=None, eps=1e-6):
    x = x.astype(np.float64)
    mu = x.mean(axis=1, keepdims=True)
    var = ((x - mu) ** 2).mean(axis=1, keepdims=True)
    view = (1, -1) + (1,) * (x.ndim - 2)
    y = (x - mu) / np.sqrt(var + eps)
    if weight is not None:
        y = y * weight.astype(np.float64).reshape(view)
    if bias is not None:
        y = y + bias.astype(np.float64).reshape(view)
    return y


@fz.examples(5)
@given(case=ln_cases())
def test_layer_norm2d_valid(case):
    args, dy, dtype, rng = case["args"], case["dy"], case["dtype"], case["rng"]
    x = args["x"]
    # eps = 0 over one channel (or constant channels) is 0/0, NaN as in torch: outside the finite contract
    fin = fz.finite(x, args.get("weight"), args.get("bias"), dy) and (args["eps"] > 0 or x.shape[1] > 1)
    y, cache = fz.run(F.layer_norm2d_forward, **args, finite=fin and args["eps"] > 0)
    grads = fz.run(F.layer_norm2d_backward, dy, cache, finite=fin and args["eps"] > 0)
    assert y.shape == x.shape and y.dtype == dtype
    assert set(grads) == {"x"} | {k for k in ("weight", "bias") if k in args}
    for k, g in grads.items():
        assert g.shape == args[k].shape and g.dtype == dtype, (k, g.shape, g.dtype)
    if not fin or args["eps"] == 0:
        return
    fz.assert_finite("layer_norm2d", y, *grads.values())
    x64 = x.astype(np.float64)
    mu = x64.mean(axis=1, keepdims=True)
    inv = 1 / np.sqrt(((x64 - mu) ** 2).mean(axis=1, keepdims=True) + args["eps"])
    view = (1, -1) + (1,) * (x.ndim - 2)
    gamma = np.abs(args["weight"].astype(np.float64)).reshape(view) if "weight" in args else 1.0
    beta = np.abs(args["bias"].astype(np.float64)).reshape(view) if "bias" in args else 0.0
    # rounding of x - mu is relative to |x| + |mu|, amplified by 1 / std
    scale = (np.abs(x64) + np.abs(mu)) * inv * gamma * 10 + beta
    fz.assert_close(y.astype(np.float64), ln_ref(**args), scale, "layer_norm2d vs formula", dtype)
    dy64 = dy.astype(np.float64)
    x_hat = ln_ref(x64, eps=args["eps"])
    axes = (0,) if x.ndim == 2 else (0, 2, 3)
    if "bias" in args:
        fz.assert_close(grads["bias"].astype(np.float64), dy64.sum(axis=axes), np.abs(dy64).sum(axis=axes), "dbias", dtype)
    if "weight" in args:
        fz.assert_close(grads["weight"].astype(np.float64), (dy64 * x_hat).sum(axis=axes),
                        (np.abs(dy64) * (np.abs(x64) + np.abs(mu)) * inv).sum(axis=axes) * 10, "dweight", dtype)
    if dtype == np.float64 and x.size:  # dx by central differences along a random direction
        u = rng.standard_normal(x.shape)
        ref_args = {k: v for k, v in args.items()}
        # a step of 1e-4 of the smallest spread over the channels: truncation ~1e-8 relative; the
        # rounding of x - mu (|x| + |mu| ulps, amplified by 1 / std) over the step bounds the rest
        step = 1e-4 / float(inv.max())
        fd = directional(lambda **a: fz.inner(dy64, ln_ref(**a)), {**ref_args, "x": x64}, "x", u, h=step)
        an = fz.inner(grads["x"], u)
        rounding = 4e-16 * fz.inner(np.abs(dy64), (np.abs(x64) + np.abs(mu)) * inv * gamma + beta) / step
        bound = 1e-5 * (np.sqrt(fz.inner(grads["x"], grads["x"]) * fz.inner(u, u)) + abs(fd)) + rounding
        assert abs(fd - an) <= bound, f"layer_norm2d dx: directional {an!r} vs central difference {fd!r}"


@fz.examples(3)
@given(case=ln_cases(), what=st.sampled_from(["dtype", "mixed", "rank", "non_array", "param_shape", "eps", "no_channels",
                                              "dy"]), data=st.data())
def test_layer_norm2d_invalid_arguments(case, what, data):
    args, rng, dtype = dict(case["args"]), case["rng"], case["dtype"]
    arrays = [k for k in ("x", "weight", "bias") if k in args]
    if what in ("dtype", "mixed", "rank", "non_array", "param_shape"):
        if what in ("mixed", "param_shape") and len(arrays) == 1:
            return
        key = data.draw(st.sampled_from(arrays if what not in ("mixed", "param_shape") else arrays[1:]))
        a = np.asarray(args[key])
        args[key] = {"dtype": lambda: a.astype(data.draw(fz.bad_dtypes)), "mixed": lambda: a.astype(other_float(dtype)),
                     "rank": lambda: a.reshape(a.shape + (1, 1, 1)) if key == "x" else a[None],
                     "non_array": lambda: fz.non_array(a, rng),
                     "param_shape": lambda: np.zeros(a.shape[0] + 1, dtype=dtype)}[what]()
        names = [key]
    elif what == "eps":
        args["eps"] = data.draw(st.sampled_from([-1e-5, float("nan"), "1e-5", None, True, [1e-5]]))
        names = ["eps"]
    elif what == "no_channels":
        args = dict(x=np.zeros((2, 0) + args["x"].shape[2:], dtype=dtype))
        names = ["x"]
    else:
        _, cache = fz.run(F.layer_norm2d_forward, **args)
        fz.expect_error(["dy"], F.layer_norm2d_backward, bad_upstream(case["dy"], data, rng, dtype), cache)
        return
    fz.expect_error(names, F.layer_norm2d_forward, **args)


# ------------------------------------------------------- layer_norm over the last axis


@fz.examples(3)
@given(case=ln_cases())
def test_layer_norm_last_axis_valid(case):
    """layer_norm2d's draws with the channels moved last (a strided view): the same
    formula over the last axis, its parameter gradients, dx along a random direction."""
    args, dtype, rng = dict(case["args"]), case["dtype"], case["rng"]
    x = np.moveaxis(args["x"], 1, -1)  # (N, [H, W,] C)
    dy = np.moveaxis(case["dy"], 1, -1)
    eps = args["eps"]
    params = {k: args[k] for k in ("weight", "bias") if k in args}
    fin = fz.finite(x, *params.values(), dy) and eps > 0
    y, cache = fz.run(F.layer_norm_forward, x, **params, eps=eps, finite=fin)
    grads = fz.run(F.layer_norm_backward, dy, cache, finite=fin)
    assert y.shape == x.shape and y.dtype == dtype
    assert set(grads) == {"x"} | set(params)
    assert grads["x"].shape == x.shape and all(grads[k].shape == params[k].shape for k in params)
    assert all(g.dtype == dtype for g in grads.values())
    if not fin:
        return
    fz.assert_finite("layer_norm", y, *grads.values())
    x64, dy64 = x.astype(np.float64), dy.astype(np.float64)
    mu = x64.mean(axis=-1, keepdims=True)
    inv = 1 / np.sqrt(((x64 - mu) ** 2).mean(axis=-1, keepdims=True) + eps)
    gamma = np.abs(params["weight"].astype(np.float64)) if "weight" in params else 1.0
    beta = np.abs(params["bias"].astype(np.float64)) if "bias" in params else 0.0
    scale = (np.abs(x64) + np.abs(mu)) * inv * gamma * 10 + beta
    want = np.moveaxis(ln_ref(args["x"], args.get("weight"), args.get("bias"), eps), 1, -1)
    fz.assert_close(y.astype(np.float64), want, scale, "layer_norm vs formula", dtype)
    lead = tuple(range(x.ndim - 1))
    x_hat = (x64 - mu) * inv
    if "bias" in params:
        fz.assert_close(grads["bias"].astype(np.float64), dy64.sum(axis=lead), np.abs(dy64).sum(axis=lead), "dbias", dtype)
    if "weight" in params:
        fz.assert_close(grads["weight"].astype(np.float64), (dy64 * x_hat).sum(axis=lead),
                        (np.abs(dy64) * (np.abs(x64) + np.abs(mu)) * inv).sum(axis=lead) * 10, "dweight", dtype)
    if dtype == np.float64 and x.size:
        u = rng.standard_normal(x.shape)
        step = 1e-4 / float(inv.max())

        def loss(x):
            return fz.inner(dy64, np.moveaxis(ln_ref(np.moveaxis(x, -1, 1), args.get("weight"), args.get("bias"), eps), 1, -1))

        fd = directional(loss, {"x": x64}, "x", u, h=step)
        an = fz.inner(grads["x"], u)
        rounding = 4e-16 * fz.inner(np.abs(dy64), (np.abs(x64) + np.abs(mu)) * inv * gamma + beta) / step
        bound = 1e-5 * (np.sqrt(fz.inner(grads["x"], grads["x"]) * fz.inner(u, u)) + abs(fd)) + rounding
        assert abs(fd - an) <= bound, f"layer_norm dx: directional {an!r} vs central difference {fd!r}"


@fz.examples(2)
@given(case=ln_cases(), what=st.sampled_from(["dtype", "mixed", "param_shape", "non_array", "eps", "no_channels", "dy"]),
       data=st.data())
def test_layer_norm_last_axis_invalid_arguments(case, what, data):
    args, rng, dtype = dict(case["args"]), case["rng"], case["dtype"]
    args["x"] = np.moveaxis(args["x"], 1, -1)
    arrays = [k for k in ("x", "weight", "bias") if k in args]
    if what in ("dtype", "mixed", "param_shape", "non_array"):
        if what in ("mixed", "param_shape") and len(arrays) == 1:
            return
        key = data.draw(st.sampled_from(arrays if what in ("dtype", "non_array") else arrays[1:]))
        a = np.asarray(args[key])
        args[key] = {"dtype": lambda: a.astype(data.draw(fz.bad_dtypes)), "mixed": lambda: a.astype(other_float(dtype)),
                     "non_array": lambda: fz.non_array(a, rng),
                     "param_shape": lambda: np.zeros(a.shape[0] + 1, dtype=dtype)}[what]()
        names = [key]
    elif what == "eps":
        args["eps"] = data.draw(st.sampled_from([-1e-5, float("nan"), "1e-5", None, True, [1e-5]]))
        names = ["eps"]
    elif what == "no_channels":
        args = dict(x=np.zeros(args["x"].shape[:-1] + (0,), dtype=dtype))
        names = ["x"]
    else:
        _, cache = fz.run(F.layer_norm_forward, **args)
        fz.expect_error(["dy"], F.layer_norm_backward, bad_upstream(np.moveaxis(case["dy"], 1, -1), data, rng, dtype), cache)
        return
    fz.expect_error(names, F.layer_norm_forward, **args)


# --------------------------------------------------------------------------- hardswish


@st.composite
def hardswish_cases(draw):
    rng = draw(fz.rngs())
    dtype = draw(fz.dtypes)
    shape = tuple(draw(st.lists(st.integers(0, 4), min_size=0, max_size=4)))
    kind = draw(st.sampled_from(["normal", "kinks", "special"]))
    x = fz.fill(rng, shape, dtype, "special" if kind == "special" else "normal", scale=3.0)
    if kind == "kinks" and x.size:  # the two kinks, 0 and -0.0 exactly
        flat = x.reshape(-1)
        pick = rng.random(flat.size) < 0.5
        flat[pick] = rng.choice(np.array([-3.0, 3.0, 0.0, -0.0], dtype=dtype), int(pick.sum()))
    x = fz.relayout(x, draw(fz.layouts), rng)
    dy = fz.relayout(fz.fill(rng, shape, dtype), draw(fz.layouts), rng)
    return dict(x=x, dy=dy, dtype=np.dtype(dtype), rng=rng)


@fz.examples(5)
@given(case=hardswish_cases())
def test_hardswish_valid(case):
    x, dy, dtype = case["x"], case["dy"], case["dtype"]
    fin = fz.finite(x, dy)
    y, cache = fz.run(F.hardswish_forward, x, finite=fin)
    g = fz.run(F.hardswish_backward, dy, cache, finite=fin)
    assert set(g) == {"x"} and y.shape == g["x"].shape == x.shape and y.dtype == g["x"].dtype == dtype
    x64 = x.astype(np.float64)
    with np.errstate(all="ignore"):
        want = np.where(x64 <= -3, 0.0, np.where(x64 >= 3, x64, x64 * (x64 + 3) / 6))
        slope = np.where(x64 <= -3, 0.0, np.where(x64 >= 3, 1.0, x64 / 3 + 0.5))  # PyTorch's choice at the kinks
        want[np.isnan(x64) | np.isneginf(x64)] = np.nan  # torch 2.14.1: hardswish(-inf) = -inf * 0 = NaN
    fz.assert_close(y.astype(np.float64), want, np.abs(x64) * (np.abs(x64) + 3) / 6 + np.finfo(dtype).tiny,
                    "hardswish vs formula", dtype)
    if fin:
        fz.assert_finite("hardswish", y, g["x"])
        fz.assert_close(g["x"].astype(np.float64), dy.astype(np.float64) * slope,
                        np.abs(dy.astype(np.float64)) * (np.abs(x64) / 3 + 1), "hardswish backward", dtype)
        kinks = (x64 == -3) | (x64 == 3)
        assert np.array_equal(g["x"][x64 == -3], np.zeros_like(g["x"][x64 == -3])), "slope at -3 is 0 (PyTorch)"
        assert np.array_equal(g["x"][x64 == 3], dy[x64 == 3]), "slope at 3 is 1 (PyTorch)"
        event("kinks" if kinks.any() else "no kinks")


@fz.examples(3)
@given(case=hardswish_cases(), what=st.sampled_from(["dtype", "non_array", "dy"]), data=st.data())
def test_hardswish_invalid_arguments(case, what, data):
    x, rng, dtype = case["x"], case["rng"], case["dtype"]
    if what == "dtype":
        fz.expect_error(["x"], F.hardswish_forward, x.astype(data.draw(fz.bad_dtypes)))
    elif what == "non_array":
        fz.expect_error(["x"], F.hardswish_forward, fz.non_array(x, rng))
    else:
        _, cache = fz.run(F.hardswish_forward, x)
        dy = np.zeros(x.shape, dtype) if x.ndim else np.zeros((1,), dtype)
        if not x.ndim and data.draw(st.booleans()):
            fz.expect_error(["dy"], F.hardswish_backward, dy, cache)  # shape (1,) for a 0-d x
            return
        fz.expect_error(["dy"], F.hardswish_backward, bad_upstream(dy if x.ndim else np.zeros((), dtype), data, rng, dtype),
                        cache)


# --------------------------------------------------------------------------- silu, gelu, hard_sigmoid (SEModule)


@fz.examples(4)
@given(op=st.sampled_from(["silu", "gelu", "hard_sigmoid"]), case=hardswish_cases())
def test_se_activations_valid(op, case):
    x, dy, dtype = case["x"], case["dy"], case["dtype"]
    fwd, bwd = getattr(F, f"{op}_forward"), getattr(F, f"{op}_backward")
    fin = fz.finite(x, dy)
    y, cache = fz.run(fwd, x, finite=fin)
    g = fz.run(bwd, dy, cache, finite=fin)
    assert set(g) == {"x"} and y.shape == g["x"].shape == x.shape and y.dtype == g["x"].dtype == dtype
    if not fin:
        return
    x64, dy64 = x.astype(np.float64), dy.astype(np.float64)
    with np.errstate(all="ignore"):
        if op == "silu":
            s = scipy.special.expit(x64)
            want, slope = x64 * s, s * (1 + x64 * (1 - s))
        elif op == "gelu":
            cdf = scipy.special.ndtr(x64)
            want, slope = x64 * cdf, cdf + x64 * np.exp(-0.5 * x64 * x64) / math.sqrt(2 * math.pi)
        else:  # PyTorch's choice at the kinks: slope 0 at -3 and 3
            want, slope = np.clip(x64 + 3, 0, 6) / 6, np.where((x64 > -3) & (x64 < 3), 1 / 6, 0.0)
    fz.assert_finite(op, y, g["x"])
    fz.assert_close(y.astype(np.float64), want, np.abs(x64) + 1.0, f"{op} vs formula", dtype)
    fz.assert_close(g["x"].astype(np.float64), dy64 * slope, np.abs(dy64) * 1.2, f"{op} backward", dtype)
    if op == "hard_sigmoid":
        on = (x64 == -3) | (x64 == 3)
        assert not g["x"][on].any(), "hard_sigmoid: slope 0 at the kinks (PyTorch)"
        event("kinks" if on.any() else "no kinks")


# --------------------------------------------------------------------------- scaled_dot_product_attention


@st.composite
def sdpa_cases(draw):
    rng = draw(fz.rngs())
    dtype = draw(fz.dtypes)
    lead = tuple(draw(st.lists(st.integers(0, 2), min_size=0, max_size=2)))
    L, S, E, Ev = draw(st.integers(0, 4)), draw(st.integers(1, 4)), draw(st.integers(1, 4)), draw(st.integers(1, 4))
    kind = draw(st.sampled_from(["normal", "normal", "normal", "special"]))
    q = fz.fill(rng, lead + (L, E), dtype, kind, scale=draw(st.sampled_from([1.0, 3.0])))
    k = fz.fill(rng, lead + (S, E), dtype)
    v = fz.fill(rng, lead + (S, Ev), dtype)
    mask_kind = draw(st.sampled_from([None, "bool", "bool", "float", "float_inf"]))
    mask = None
    if mask_kind is not None:
        full = lead + (L, S)
        # a broadcastable shape: drop leading axes, set some axes to 1
        drop = draw(st.integers(0, len(full)))
        mshape = tuple(1 if draw(st.booleans()) else s for s in full[drop:])
        if mask_kind == "bool":
            p_attend = draw(st.sampled_from([0.0, 0.3, 0.7, 1.0]))
            mask = rng.random(mshape) < p_attend
        else:
            mask = fz.fill(rng, mshape, dtype)
            if mask_kind == "float_inf" and mask.size:
                mask[rng.random(mshape) < 0.5] = -np.inf
        mask = fz.relayout(mask, draw(fz.layouts), rng)
    scale = draw(st.sampled_from([None, None, 0.5, -1.0, 0.0, 2, np.float64(0.3), np.float32(1.5)]))
    args = dict(q=q, k=k, v=v)
    for key in args:
        args[key] = fz.relayout(args[key], draw(fz.layouts), rng)
    args.update(attn_mask=mask, scale=scale)
    d_out = fz.relayout(fz.fill(rng, lead + (L, Ev), dtype), draw(fz.layouts), rng)
    note(f"sdpa lead={lead} L={L} S={S} E={E} Ev={Ev} mask={mask_kind}{None if mask is None else mask.shape} scale={scale}")
    return dict(args=args, d_out=d_out, dtype=np.dtype(dtype), rng=rng, mask_kind=mask_kind)


def sdpa_ref(q, k, v, attn_mask=None, scale=None):
    """float64, row by row: softmax over the keys the mask lets through (boolean True =
    attend; float added); a row with no key left gives 0."""
    q, k, v = (a.astype(np.float64) for a in (q, k, v))
    c = 1 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    z = c * np.einsum("...le,...se->...ls", q, k)
    allowed = np.ones(z.shape, dtype=bool)
    if attn_mask is not None:
        m = np.broadcast_to(attn_mask, z.shape)
        if m.dtype == np.bool_:
            allowed = m.copy()
        else:
            z = z + m.astype(np.float64)
            allowed = ~np.isneginf(m)
    p = np.zeros(z.shape)
    for idx in np.ndindex(*z.shape[:-1]):
        a = allowed[idx]
        if a.any() and not np.isneginf(z[idx][a]).all():
            p[idx][a] = scipy.special.softmax(z[idx][a])
    return np.einsum("...ls,...se->...le", p, v), p, allowed


@fz.examples(8)
@given(case=sdpa_cases())
def test_scaled_dot_product_attention_valid(case):
    args, d_out, dtype, rng = case["args"], case["d_out"], case["dtype"], case["rng"]
    mask = args["attn_mask"]
    fin = fz.finite(args["q"], args["k"], args["v"], d_out) and (
        mask is None or mask.dtype == np.bool_ or case["mask_kind"] == "float_inf" or fz.finite(mask))
    out, cache = fz.run(F.scaled_dot_product_attention_forward, **args, finite=fin)
    grads = fz.run(F.scaled_dot_product_attention_backward, d_out, cache, finite=fin)
    assert out.shape == d_out.shape and out.dtype == dtype
    float_mask = mask is not None and mask.dtype != np.bool_
    assert set(grads) == {"q", "k", "v"} | ({"attn_mask"} if float_mask else set())  # a float mask gets dS
    for key, g in grads.items():
        assert g.shape == args[key].shape and g.dtype == dtype, (key, g.shape, g.dtype)
    if not fin:
        return
    fz.assert_finite("scaled_dot_product_attention", out, *grads.values())
    want, p, allowed = sdpa_ref(**args)
    v64 = args["v"].astype(np.float64)
    fz.assert_close(out.astype(np.float64), want, np.einsum("...ls,...se->...le", p, np.abs(v64)) * 10 + 0.0,
                    "sdpa vs per-row softmax", dtype)
    # masked keys get no weight; a query with every key masked: output 0, no gradient
    assert not cache.p[~np.broadcast_to(allowed, cache.p.shape)].any(), "weight on a masked key"
    empty = p.sum(axis=-1) == 0  # (..., L)
    if empty.any():
        assert not out[empty].any() and not grads["q"][empty].any(), "a fully masked query: output and gradient 0"
    event(f"mask {case['mask_kind']}" + (": a fully masked query" if empty.any() else ""))
    # v: the output is linear in v (adjoint identity)
    u = rng.standard_normal(v64.shape)
    lhs, rhs = fz.inner(d_out, np.einsum("...ls,...se->...le", p, u)), fz.inner(grads["v"], u)
    scale = fz.inner(np.abs(d_out), np.einsum("...ls,...se->...le", p, np.abs(u)))
    assert abs(lhs - rhs) <= 10 * fz.TOL[dtype] * max(scale, 1e-300), f"adjoint of v: {lhs!r} vs {rhs!r}"
    # q and k: central differences of <d_out, sdpa_ref> along a random direction (float64)
    if dtype == np.float64:
        d64 = d_out.astype(np.float64)
        ref_args = {key: (a.astype(np.float64) if key in ("q", "k", "v") else a) for key, a in args.items()}
        for name in ("q", "k"):
            u = rng.standard_normal(args[name].shape)
            fd = directional(lambda **a: fz.inner(d64, sdpa_ref(**a)[0]), ref_args, name, u)
            an = fz.inner(grads[name], u)
            bound = 1e-6 * (np.sqrt(fz.inner(grads[name], grads[name]) * fz.inner(u, u)) + abs(fd)) + 1e-8 * (
                fz.inner(np.abs(d64), np.abs(want)) + 1)
            assert abs(fd - an) <= bound, f"d{name}: directional {an!r} vs central difference {fd!r}"


SDPA_CORRUPTIONS = ["dtype", "mixed", "rank", "non_array", "lead", "embed", "value_len", "no_embed", "no_keys", "mask_type",
                    "mask_dtype", "mask_float_dtype", "mask_shape", "scale", "d_out"]


@fz.examples(4)
@given(case=sdpa_cases(), what=st.sampled_from(SDPA_CORRUPTIONS), data=st.data())
def test_scaled_dot_product_attention_invalid_arguments(case, what, data):
    args, rng, dtype = dict(case["args"]), case["rng"], case["dtype"]
    q, k, v = args["q"], args["k"], args["v"]
    if what in ("dtype", "rank", "non_array"):
        key = data.draw(st.sampled_from(["q", "k", "v"]))
        a = args[key]
        args[key] = {"dtype": lambda: a.astype(data.draw(fz.bad_dtypes)),
                     "rank": lambda: a.reshape(-1),
                     "non_array": lambda: fz.non_array(a, rng)}[what]()
        names = [key]
    elif what == "mixed":
        key = data.draw(st.sampled_from(["k", "v"]))
        args[key] = args[key].astype(other_float(dtype))
        names = [key]
    elif what == "lead":
        key = data.draw(st.sampled_from(["k", "v"]))
        args[key] = np.zeros((3,) + args[key].shape, dtype)
        names = ["q", "k", "v"]
    elif what == "embed":
        args["k"] = np.zeros(k.shape[:-1] + (k.shape[-1] + 1,), dtype)
        names = ["k"]
    elif what == "value_len":
        args["v"] = np.zeros(v.shape[:-2] + (v.shape[-2] + 1, v.shape[-1]), dtype)
        names = ["v"]
    elif what == "no_embed":
        args["q"], args["k"] = np.zeros(q.shape[:-1] + (0,), dtype), np.zeros(k.shape[:-1] + (0,), dtype)
        names = ["q"]
    elif what == "no_keys":
        args["k"], args["v"] = np.zeros(k.shape[:-2] + (0, k.shape[-1]), dtype), np.zeros(v.shape[:-2] + (0, v.shape[-1]), dtype)
        args["attn_mask"] = None
        names = ["k"]
    elif what == "mask_type":
        args["attn_mask"] = data.draw(st.sampled_from([[[True]], 1.0, "mask", (0.0,)]))
        names = ["attn_mask"]
    elif what == "mask_dtype":
        args["attn_mask"] = np.ones(q.shape[:-1] + (k.shape[-2],), dtype=data.draw(st.sampled_from(
            [np.int64, np.int8, np.complex128, object, np.uint8])))
        names = ["attn_mask"]
    elif what == "mask_float_dtype":
        args["attn_mask"] = np.zeros(q.shape[:-1] + (k.shape[-2],), dtype=data.draw(st.sampled_from([other_float(dtype),
                                                                                                       np.float16])))
        names = ["attn_mask"]
    elif what == "mask_shape":
        shape = q.shape[:-1] + (k.shape[-2] + 1,) if data.draw(st.booleans()) else (2, 3) + q.shape[:-1] + (k.shape[-2],)
        args["attn_mask"] = np.ones(shape, dtype=bool)
        names = ["attn_mask"]
    elif what == "scale":
        args["scale"] = data.draw(st.sampled_from(["1", True, float("nan"), float("inf"), [1.0], 1j, np.bool_(True)]))
        names = ["scale"]
    else:
        _, cache = fz.run(F.scaled_dot_product_attention_forward, **args)
        fz.expect_error(["d_out"], F.scaled_dot_product_attention_backward, bad_upstream(case["d_out"], data, rng, dtype),
                        cache)
        return
    fz.expect_error(names, F.scaled_dot_product_attention_forward, **args)


# --------------------------------------------------------------------------- attention variants
# is_causal, alignment, window, ALiBi, softcap, grouped-query heads, dropout masks, lse and
# dlse, and the packed variable-length layout: against a float64 reference written here
# (the masks built by comparisons of the indices, the softmax and log-sum-exp of scipy on
# the keys left), a query with no key (output 0, lse -inf, no gradient), and the
# gradients of <d_out, out> + <dlse, lse> by central differences along a random direction.


@st.composite
def attention_keywords(draw, rng, n, hq, L, S, dtype, layout="dense"):
    """Keywords for the variants: every one optional; arrays for the dense layout
    (N, Hq, L, S) or the packed one (Hq, total_q, total_k), with n sequences."""
    kw = {}
    if draw(st.booleans()):
        kw["is_causal"] = True
    if draw(st.booleans()):
        kw["alignment"] = draw(st.sampled_from(["top_left", "bottom_right"]))
    if draw(st.booleans()):
        kw["window"] = (draw(st.sampled_from([-1, 0, 1, 2])), draw(st.sampled_from([-1, 0, 1, 2])))
    alibi = draw(st.sampled_from([None, None, "heads", "batch"]))
    if alibi:
        kw["alibi_slopes"] = rng.uniform(0.0, 1.5, hq if alibi == "heads" else (n, hq)).astype(dtype)
    if draw(st.booleans()):
        kw["softcap"] = draw(st.sampled_from([0.5, 3.0, 50]))
    scores = (n, hq, L, S) if layout == "dense" else (hq, L, S)
    mask = draw(st.sampled_from([None, None, "bool", "float", "float_inf"]))
    if mask == "bool":
        kw["attn_mask"] = rng.random(scores) < draw(st.sampled_from([0.0, 0.5, 0.9]))
    elif mask:
        m = fz.fill(rng, scores, dtype)
        if mask == "float_inf" and m.size:
            m[rng.random(scores) < 0.4] = -np.inf
        kw["attn_mask"] = m
    if draw(st.booleans()):
        kw["dropout_p"] = draw(st.sampled_from([0.0, 0.25, 0.5]))
        kw["dropout_mask"] = rng.random(scores) < 0.7
    return kw


def variant_ref(q, k, v, attn_mask=None, scale=None, is_causal=False, alignment="top_left", window=None,
                alibi_slopes=None, softcap=None, enable_gqa=False, dropout_mask=None, dropout_p=0.0):
    """float64 (out, lse) for q (N, Hq, L, E), k and v (N, Hk, S, .)."""
    q, k, v = (a.astype(np.float64) for a in (q, k, v))
    n, hq, L, E = q.shape
    S = k.shape[-2]
    if enable_gqa and k.shape[1]:
        k, v = np.repeat(k, hq // k.shape[1], axis=1), np.repeat(v, hq // k.shape[1], axis=1)
    c = 1 / math.sqrt(E) if scale is None else float(scale)
    z = c * np.einsum("nhle,nhse->nhls", q, k)
    if softcap is not None:
        z = softcap * np.tanh(z / softcap)
    allowed = np.ones(z.shape, dtype=bool)
    if attn_mask is not None and attn_mask.dtype != np.bool_:
        z = z + attn_mask.astype(np.float64)
    elif attn_mask is not None:
        allowed &= attn_mask
    i, j = np.arange(L)[:, None], np.arange(S)[None, :]
    diag = i + (S - L if alignment == "bottom_right" else 0)
    if alibi_slopes is not None:
        slopes = alibi_slopes.astype(np.float64)
        z = z - (slopes[None, :, None, None] if slopes.ndim == 1 else slopes[:, :, None, None]) * np.abs(diag - j)
    if is_causal:
        allowed &= j <= diag
    if window is not None:
        allowed &= (j >= diag - window[0]) | (window[0] == -1)
        allowed &= (j <= diag + window[1]) | (window[1] == -1)
    p = np.zeros(z.shape)
    lse = np.full(z.shape[:-1], -np.inf)
    for idx in np.ndindex(*z.shape[:-1]):
        a = allowed[idx] & ~np.isneginf(z[idx])
        if a.any():
            p[idx][a] = scipy.special.softmax(z[idx][a])
            lse[idx] = scipy.special.logsumexp(z[idx][a])
    if dropout_mask is not None:
        p = p * dropout_mask / (1 - dropout_p)
    return np.einsum("nhls,nhse->nhle", p, v), lse


def lse_loss(d_out, d_lse, out, lse):
    """<d_out, out> + <dlse, lse>, an lse of -inf (a query with no key: a constant) as 0."""
    return fz.inner(d_out, out) + (0.0 if d_lse is None else fz.inner(d_lse, np.where(np.isneginf(lse), 0.0, lse)))


def check_variant_gradients(grads, args, loss, rng, scale):
    for name in ("q", "k", "v"):
        u = rng.standard_normal(args[name].shape)
        fd = directional(loss, args, name, u)
        an = fz.inner(grads[name], u)
        bound = 1e-6 * (np.sqrt(fz.inner(grads[name], grads[name]) * fz.inner(u, u)) + abs(fd)) + 1e-8 * (scale + 1)
        assert abs(fd - an) <= bound, f"d{name}: directional {an!r} vs central difference {fd!r}"


@st.composite
def sdpa_variant_cases(draw):
    rng = draw(fz.rngs())
    dtype = draw(fz.dtypes)
    gqa = draw(st.booleans())
    n, hk = draw(st.integers(0, 2)), draw(st.integers(1, 3))
    hq = hk * (draw(st.integers(1, 3)) if gqa else 1)
    L, S, E, Ev = draw(st.integers(0, 5)), draw(st.integers(1, 5)), draw(st.integers(1, 3)), draw(st.integers(1, 3))
    args = dict(q=fz.fill(rng, (n, hq, L, E), dtype, scale=draw(st.sampled_from([1.0, 3.0]))),
                k=fz.fill(rng, (n, hk, S, E), dtype), v=fz.fill(rng, (n, hk, S, Ev), dtype))
    for key in ("q", "k", "v"):
        args[key] = fz.relayout(args[key], draw(fz.layouts), rng)
    args.update(draw(attention_keywords(rng, n, hq, L, S, dtype)))
    if gqa:
        args["enable_gqa"] = True
    args["scale"] = draw(st.sampled_from([None, 0.5, 2]))
    d_out = fz.fill(rng, (n, hq, L, Ev), dtype)
    d_lse = fz.fill(rng, (n, hq, L), dtype) if draw(st.booleans()) else None
    note(f"variant n={n} Hq={hq} Hk={hk} L={L} S={S} E={E} Ev={Ev} "
         + " ".join(f"{key}={a if not isinstance(a, np.ndarray) else a.shape}" for key, a in args.items() if key not in "qkv"))
    return dict(args=args, d_out=d_out, d_lse=d_lse, dtype=np.dtype(dtype), rng=rng)


@fz.examples(2)
@given(case=sdpa_variant_cases())
def test_attention_variants_valid(case):
    args, d_out, d_lse, dtype, rng = case["args"], case["d_out"], case["d_lse"], case["dtype"], case["rng"]
    out, cache = fz.run(F.scaled_dot_product_attention_forward, **args, finite=True)
    grads = fz.run(F.scaled_dot_product_attention_backward, d_out, cache, d_lse, finite=True)
    assert out.shape == d_out.shape and out.dtype == cache.lse.dtype == dtype and cache.lse.shape == out.shape[:-1]
    for key, g in grads.items():
        assert g.shape == args[key].shape and g.dtype == dtype, (key, g.shape, g.dtype)
    fz.assert_finite("attention variants", out, *grads.values())
    want, want_lse = variant_ref(**args)
    v_abs = np.abs(args["v"].astype(np.float64))
    n_rep = args["q"].shape[1] // max(args["k"].shape[1], 1)
    scale = np.repeat(v_abs, n_rep, axis=1).max(axis=-2, keepdims=True) if v_abs.size else 0.0
    keep = 1.0 / (1 - args.get("dropout_p", 0.0))
    fz.assert_close(out.astype(np.float64), want, 10 * keep * scale, "variants vs reference", dtype)
    fz.assert_close(cache.lse.astype(np.float64), want_lse, 10 * (np.abs(want_lse) + 1), "lse vs reference", dtype)
    empty = np.isneginf(want_lse)
    if empty.any():  # a query with no key: output 0, no gradient
        assert not out[empty].any() and not grads["q"][empty].any()
    event("a query with no key" if empty.any() else "every query has a key")
    if dtype == np.float64 and out.size:
        def loss(**a):
            return lse_loss(d_out, d_lse, *variant_ref(**a))
        check_variant_gradients(grads, args, loss, rng, lse_loss(np.abs(d_out), None if d_lse is None else np.abs(d_lse),
                                                                   np.abs(want), want_lse))


@st.composite
def varlen_cases(draw):
    rng = draw(fz.rngs())
    dtype = draw(fz.dtypes)
    gqa = draw(st.booleans())
    hk = draw(st.integers(1, 2))
    hq = hk * (draw(st.integers(1, 3)) if gqa else 1)
    b = draw(st.integers(0, 3))
    lq = draw(st.lists(st.integers(0, 3), min_size=b, max_size=b))
    lk = draw(st.lists(st.integers(0, 3), min_size=b, max_size=b))
    cu_q, cu_k = np.concatenate([[0], np.cumsum(lq, dtype=np.int64)]), np.concatenate([[0], np.cumsum(lk, dtype=np.int64)])
    cu_q = cu_q.astype(draw(st.sampled_from([np.int32, np.int64])))
    E, Ev = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    tq, tk = int(cu_q[-1]), int(cu_k[-1])
    args = dict(q=fz.fill(rng, (tq, hq, E), dtype), k=fz.fill(rng, (tk, hk, E), dtype), v=fz.fill(rng, (tk, hk, Ev), dtype),
                cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    args.update(draw(attention_keywords(rng, b, hq, tq, tk, dtype, layout="packed")))
    if gqa:
        args["enable_gqa"] = True
    d_out = fz.fill(rng, (tq, hq, Ev), dtype)
    d_lse = fz.fill(rng, (hq, tq), dtype) if draw(st.booleans()) else None
    note(f"varlen Hq={hq} Hk={hk} seqlens_q={lq} seqlens_k={lk} "
         + " ".join(f"{key}={a if not isinstance(a, np.ndarray) else a.shape}" for key, a in args.items() if key not in "qkv"))
    return dict(args=args, d_out=d_out, d_lse=d_lse, dtype=np.dtype(dtype), rng=rng)


def varlen_ref(q, k, v, cu_seqlens_q, cu_seqlens_k, attn_mask=None, alibi_slopes=None, dropout_mask=None, **kw):
    """Each sequence through :func:`variant_ref` (its block of the packed masks)."""
    hq = q.shape[1]
    out, lse = np.zeros(q.shape[:2] + v.shape[2:]), np.full((hq, q.shape[0]), -np.inf)
    for b in range(len(cu_seqlens_q) - 1):
        r, c = slice(cu_seqlens_q[b], cu_seqlens_q[b + 1]), slice(cu_seqlens_k[b], cu_seqlens_k[b + 1])
        if r.stop == r.start or c.stop == c.start:
            continue
        o, s = variant_ref(q[r].transpose(1, 0, 2)[None], k[c].transpose(1, 0, 2)[None], v[c].transpose(1, 0, 2)[None],
                           None if attn_mask is None else attn_mask[:, r, c][None],
                           alibi_slopes=None if alibi_slopes is None else alibi_slopes[b] if alibi_slopes.ndim == 2 else alibi_slopes,
                           dropout_mask=None if dropout_mask is None else dropout_mask[:, r, c][None], **kw)
        out[r], lse[:, r] = o[0].transpose(1, 0, 2), s[0]
    return out, lse


@fz.examples(1)
@given(case=varlen_cases())
def test_varlen_attention_valid(case):
    args, d_out, d_lse, dtype, rng = case["args"], case["d_out"], case["d_lse"], case["dtype"], case["rng"]
    out, cache = fz.run(F.varlen_attention_forward, **args, finite=True)
    grads = fz.run(F.varlen_attention_backward, d_out, cache, d_lse, finite=True)
    assert out.shape == d_out.shape and out.dtype == dtype and cache.lse.shape == (out.shape[1], out.shape[0])
    for key, g in grads.items():
        assert g.shape == args[key].shape and g.dtype == dtype, (key, g.shape, g.dtype)
    want, want_lse = varlen_ref(**args)
    keep = 1.0 / (1 - args.get("dropout_p", 0.0))
    vmax = float(np.abs(args["v"].astype(np.float64)).max()) if args["v"].size else 0.0
    fz.assert_close(out.astype(np.float64), want, 10 * keep * vmax + 0 * want, "varlen vs reference", dtype)
    fz.assert_close(cache.lse.astype(np.float64), want_lse, 10 * (np.abs(want_lse) + 1), "varlen lse vs reference", dtype)
    lens_k = np.diff(args["cu_seqlens_k"])
    event("an empty sequence" if (np.diff(args["cu_seqlens_q"]) == 0).any() or (lens_k == 0).any() else "no empty sequence")
    if dtype == np.float64 and out.size:
        def loss(**a):
            return lse_loss(d_out, d_lse, *varlen_ref(**a))
        check_variant_gradients(grads, args, loss, rng, lse_loss(np.abs(d_out), None if d_lse is None else np.abs(d_lse),
                                                                   np.abs(want), want_lse))


VARIANT_CORRUPTIONS = ["is_causal", "alignment", "window", "alibi_shape", "alibi_dtype", "softcap", "gqa_heads", "dropout_p",
                       "dropout_mask", "dlse"]


@fz.examples(1)
@given(case=sdpa_variant_cases(), what=st.sampled_from(VARIANT_CORRUPTIONS), data=st.data())
def test_attention_variants_invalid_arguments(case, what, data):
    args, dtype = dict(case["args"]), case["dtype"]
    q = args["q"]
    bad = {
        "is_causal": ("is_causal", lambda: data.draw(st.sampled_from([1, "yes", None]))),
        "alignment": ("alignment", lambda: data.draw(st.sampled_from(["lower_right", "", None, 0]))),
        "window": ("window", lambda: data.draw(st.sampled_from([3, (1,), (1, -2), (0.5, 1), (True, 1), "1,1"]))),
        "alibi_shape": ("alibi_slopes", lambda: np.ones((q.shape[1] + 1,), dtype)),
        "alibi_dtype": ("alibi_slopes", lambda: np.ones((q.shape[1],), other_float(dtype))),
        "softcap": ("softcap", lambda: data.draw(st.sampled_from([0.0, -1.0, float("inf"), "2", True]))),
        "dropout_p": ("dropout_p", lambda: data.draw(st.sampled_from([1.0, -0.1, 2, "0.1", float("nan")]))),
        "dropout_mask": ("dropout_mask", lambda: data.draw(st.sampled_from([np.ones((9, 9, 9, 9, 9), bool),
                                                                            np.ones(q.shape[:-1] + (args["k"].shape[-2],))]))),
    }
    if what == "gqa_heads":
        args["enable_gqa"] = True
        args["k"] = np.zeros(args["k"].shape[:1] + (q.shape[1] + 1,) + args["k"].shape[2:], dtype)
        args["v"] = np.zeros(args["v"].shape[:1] + (q.shape[1] + 1,) + args["v"].shape[2:], dtype)
        fz.expect_error(["Hq", "Hk", "k"], F.scaled_dot_product_attention_forward, **args)
        return
    if what == "dlse":
        _, cache = fz.run(F.scaled_dot_product_attention_forward, **args)
        fz.expect_error(["dlse"], F.scaled_dot_product_attention_backward, case["d_out"], cache,
                        bad_upstream(cache.lse, data, case["rng"], dtype))
        return
    name, value = bad[what]
    args[name] = value()
    if name == "dropout_p":
        args.setdefault("dropout_mask", np.ones((1,), bool))
    fz.expect_error([name], F.scaled_dot_product_attention_forward, **args)
