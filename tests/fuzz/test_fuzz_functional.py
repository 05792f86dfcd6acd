"""Fuzzing the primitive ops of npattn.functional: conv2d, linear, batch_norm, relu,
sigmoid, tanh, abs, softmax, global_avg_pool2d, spatial_sum, max_pool2d (each forward and
backward).

Valid draws: results of the right shape and dtype, nothing modified, finite inputs give
finite results without floating-point warnings, forward against an independent
computation, and for the ops linear in an argument the adjoint identity
``<dy, f(v)> = <grad, v>`` to rounding. Invalid draws raise ValueError/TypeError naming
the argument (the backward's upstream gradient included).
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.special
from hypothesis import given, note
from hypothesis import strategies as st

from npattn import functional as F

import fuzzlib as fz

# casting the NaN of a drawn array to a wrong (int) dtype on purpose
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered in cast:RuntimeWarning")

# --------------------------------------------------------------------------- conv2d


def divisors(n):
    return [d for d in range(1, n + 1) if n % d == 0]


@st.composite
def conv_cases(draw):
    rng = draw(fz.rngs())
    dtype = draw(fz.dtypes)
    groups = draw(st.integers(1, 3))
    c_in, c_out = groups * draw(st.integers(0, 2)), groups * draw(st.integers(1, 2))
    kernel = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    padding = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
    dilation = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    hw = []
    for a in range(2):
        lo = max(1, dilation[a] * (kernel[a] - 1) + 1 - 2 * padding[a])
        hw.append(draw(st.integers(lo, lo + 5)))
    n = draw(st.integers(0, 3))
    x_kind = draw(st.sampled_from(["normal", "normal", "special"]))
    args = dict(
        x=fz.fill(rng, (n, c_in, *hw), dtype, x_kind),
        weight=fz.fill(rng, (c_out, c_in // groups, *kernel), dtype),
        bias=fz.fill(rng, (c_out,), dtype) if draw(st.booleans()) else None,
        stride=stride, padding=padding, dilation=dilation, groups=groups,
    )
    for key in ("x", "weight", "bias"):
        if args[key] is not None:
            args[key] = fz.relayout(args[key], draw(fz.layouts), rng)
    oh = (hw[0] + 2 * padding[0] - dilation[0] * (kernel[0] - 1) - 1) // stride[0] + 1
    ow = (hw[1] + 2 * padding[1] - dilation[1] * (kernel[1] - 1) - 1) // stride[1] + 1
    dy = fz.relayout(fz.fill(rng, (n, c_out, oh, ow), dtype), draw(fz.layouts), rng)
    return dict(args=args, dy=dy, dtype=np.dtype(dtype), rng=rng)


def conv_direct(x, w, b, stride, padding, dilation, groups):
    """Sum over taps of strided slices of the padded input, float64 (no im2col)."""
    x, w = x.astype(np.float64), w.astype(np.float64)
    n, c_in, h, wd = x.shape
    c_out, cg, kh, kw = w.shape
    xp = np.pad(x, ((0, 0), (0, 0), (padding[0],) * 2, (padding[1],) * 2))
    oh = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (wd + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    y = np.zeros((n, c_out, oh, ow))
    og = c_out // groups
    for g in range(groups):
        for i in range(kh):
            for j in range(kw):
                patch = xp[:, g * cg:(g + 1) * cg, i * dilation[0]::stride[0], j * dilation[1]::stride[1]][:, :, :oh, :ow]
                y[:, g * og:(g + 1) * og] += np.einsum("nchw,oc->nohw", patch, w[g * og:(g + 1) * og, :, i, j])
    if b is not None:
        y += b.astype(np.float64)[None, :, None, None]
    return y


def conv_abs(args, **override):
    a = {k: (np.abs(np.asarray(v, np.float64)) if isinstance(v, np.ndarray) else v) for k, v in args.items()}
    a.update(override)
    return conv_direct(a["x"], a["weight"], a["bias"], a["stride"], a["padding"], a["dilation"], a["groups"])


@fz.examples(2)
@given(case=conv_cases())
def test_conv2d_valid(case):
    args, dy, dtype, rng = case["args"], case["dy"], case["dtype"], case["rng"]
    fin = fz.finite(args["x"], args["weight"], args["bias"], dy)
    y, cache = fz.run(F.conv2d_forward, **args, finite=fin)
    assert y.shape == dy.shape and y.dtype == dtype
    grads = fz.run(F.conv2d_backward, dy, cache, finite=fin)
    assert set(grads) == {"x", "weight"} | ({"bias"} if args["bias"] is not None else set())
    for k, g in grads.items():
        assert g.shape == args[k].shape and g.dtype == dtype, (k, g.shape, g.dtype)
    if not fin:
        return
    fz.assert_finite("conv2d", y, *grads.values())
    fz.assert_close(y.astype(np.float64), conv_direct(args["x"], args["weight"], args["bias"], args["stride"],
                                                      args["padding"], args["dilation"], args["groups"]),
                    conv_abs(args), "conv2d vs direct sum", dtype)
    for name in ("x", "weight"):
        v = rng.standard_normal(args[name].shape).astype(dtype)
        parts = {**args, name: v, "bias": None}
        lhs = fz.inner(dy, conv_direct(parts["x"], parts["weight"], None, args["stride"], args["padding"], args["dilation"], args["groups"]))
        rhs = fz.inner(grads[name], v)
        scale = fz.inner(np.abs(dy), conv_abs(parts))
        assert abs(lhs - rhs) <= fz.TOL[dtype] * max(scale, 1e-300), f"adjoint of {name}: {lhs!r} vs {rhs!r} ({scale:.3e})"
    if "bias" in grads:
        fz.assert_close(grads["bias"], dy.sum(axis=(0, 2, 3)), np.abs(dy.astype(np.float64)).sum(axis=(0, 2, 3)), "conv2d bias grad")


BAD_INT_ARGS = [-1, 0, 1.5, True, (1, 1, 1), "1", None, (1, 2.0)]


@fz.examples(2)
@given(case=conv_cases(), what=st.sampled_from(["dtype", "mixed", "rank", "non_array", "channels", "bias", "geometry",
                                                 "groups", "no_output", "dy"]), data=st.data())
def test_conv2d_invalid_arguments(case, what, data):
    args, rng, dtype = dict(case["args"]), case["rng"], case["dtype"]
    arrays = [k for k in ("x", "weight", "bias") if args[k] is not None]
    if what in ("dtype", "mixed", "rank", "non_array"):
        key = data.draw(st.sampled_from(arrays if what != "mixed" else arrays[1:]))
        a = np.asarray(args[key])
        args[key] = {"dtype": lambda: a.astype(data.draw(fz.bad_dtypes)),
                     "mixed": lambda: a.astype(np.float32 if dtype == np.float64 else np.float64),
                     "rank": lambda: fz.wrong_rank(a, rng),
                     "non_array": lambda: fz.non_array(a, rng)}[what]()
        names = [key]
    elif what == "channels":
        w = args["weight"]
        args["weight"] = np.zeros((w.shape[0], w.shape[1] + 1) + w.shape[2:], dtype=dtype)
        names = ["weight"]
    elif what == "bias":
        args["bias"] = np.zeros(args["weight"].shape[0] + 1, dtype=dtype)
        names = ["bias"]
    elif what == "geometry":
        key = data.draw(st.sampled_from(["stride", "padding", "dilation"]))
        bad = data.draw(st.sampled_from(BAD_INT_ARGS))
        if isinstance(bad, int) and not isinstance(bad, bool) and bad >= (0 if key == "padding" else 1):
            bad = -1
        args[key] = bad
        names = [key]
    elif what == "groups":
        args["groups"] = data.draw(st.sampled_from([0, -1, 1.0, "2", None, args["x"].shape[1] + 1 if args["x"].shape[1] else 0]))
        names = ["groups"]
    elif what == "no_output":
        h = args["x"].shape[2]
        args.update(padding=0, dilation=1, stride=1, groups=1)
        args["weight"] = np.zeros((1, args["x"].shape[1], h + 1, 1), dtype=dtype)
        args["bias"] = None
        names = ["height"]
    else:
        _, cache = fz.run(F.conv2d_forward, **args)
        dy = case["dy"]
        bad = data.draw(st.sampled_from(["dtype", "other_float", "rank", "shape", "non_array"]))
        dy = {"dtype": lambda: dy.astype(data.draw(fz.bad_dtypes)),
              "other_float": lambda: dy.astype(np.float32 if dtype == np.float64 else np.float64),
              "rank": lambda: fz.wrong_rank(dy, rng),
              "shape": lambda: np.zeros(dy.shape[:3] + (dy.shape[3] + 1,), dtype=dtype),
              "non_array": lambda: fz.non_array(dy, rng)}[bad]()
        fz.expect_error(["dy"], F.conv2d_backward, dy, cache)
        return
    fz.expect_error(names, F.conv2d_forward, **args)


# --------------------------------------------------------------------------- linear


@st.composite
def linear_cases(draw):
    rng = draw(fz.rngs())
    dtype = draw(fz.dtypes)
    n, i, o = draw(st.integers(0, 4)), draw(st.integers(0, 5)), draw(st.integers(1, 5))
    kind = draw(st.sampled_from(["normal", "normal", "special"]))
    args = dict(x=fz.fill(rng, (n, i), dtype, kind), weight=fz.fill(rng, (o, i), dtype),
                bias=fz.fill(rng, (o,), dtype) if draw(st.booleans()) else None)
    for key in ("x", "weight", "bias"):
        if args[key] is not None:
            args[key] = fz.relayout(args[key], draw(fz.layouts), rng)
    dy = fz.relayout(fz.fill(rng, (n, o), dtype), draw(fz.layouts), rng)
    return dict(args=args, dy=dy, dtype=np.dtype(dtype), rng=rng)


@fz.examples(1)
@given(case=linear_cases())
def test_linear_valid(case):
    args, dy, dtype, rng = case["args"], case["dy"], case["dtype"], case["rng"]
    fin = fz.finite(args["x"], args["weight"], args["bias"], dy)
    y, cache = fz.run(F.linear_forward, **args, finite=fin)
    grads = fz.run(F.linear_backward, dy, cache, finite=fin)
    assert y.shape == dy.shape and y.dtype == dtype
    for k, g in grads.items():
        assert g.shape == args[k].shape and g.dtype == dtype, (k, g.shape, g.dtype)
    if not fin:
        return
    x64, w64 = args["x"].astype(np.float64), args["weight"].astype(np.float64)
    want = np.einsum("ni,oi->no", x64, w64) + (0 if args["bias"] is None else args["bias"].astype(np.float64))
    scale = np.einsum("ni,oi->no", np.abs(x64), np.abs(w64)) + (0 if args["bias"] is None else np.abs(args["bias"].astype(np.float64)))
    fz.assert_close(y.astype(np.float64), want, scale, "linear vs einsum", dtype)
    for name in ("x", "weight"):
        v = rng.standard_normal(args[name].shape)
        parts = {"x": x64, "weight": w64, name: v}
        lhs = fz.inner(dy, parts["x"] @ parts["weight"].T)
        rhs = fz.inner(grads[name], v)
        scale = fz.inner(np.abs(dy), np.abs(parts["x"]) @ np.abs(parts["weight"]).T)
        assert abs(lhs - rhs) <= fz.TOL[dtype] * max(scale, 1e-300), f"adjoint of {name}: {lhs!r} vs {rhs!r}"


@fz.examples(1)
@given(case=linear_cases(), what=st.sampled_from(["dtype", "mixed", "rank", "non_array", "features", "bias", "dy"]), data=st.data())
def test_linear_invalid_arguments(case, what, data):
    args, rng, dtype = dict(case["args"]), case["rng"], case["dtype"]
    if what in ("dtype", "mixed", "rank", "non_array"):
        arrays = [k for k in ("x", "weight", "bias") if args[k] is not None]
        key = data.draw(st.sampled_from(arrays if what != "mixed" else arrays[1:]))
        a = np.asarray(args[key])
        args[key] = {"dtype": lambda: a.astype(data.draw(fz.bad_dtypes)),
                     "mixed": lambda: a.astype(np.float32 if dtype == np.float64 else np.float64),
                     "rank": lambda: fz.wrong_rank(a, rng),
                     "non_array": lambda: fz.non_array(a, rng)}[what]()
        names = [key]
    elif what == "features":
        w = args["weight"]
        args["weight"] = np.zeros((w.shape[0], w.shape[1] + 1), dtype=dtype)
        names = ["weight"]
    elif what == "bias":
        args["bias"] = np.zeros(args["weight"].shape[0] + 1, dtype=dtype)
        names = ["bias"]
    else:
        _, cache = fz.run(F.linear_forward, **args)
        dy = bad_upstream(case["dy"], data, rng, dtype)
        fz.expect_error(["dy"], F.linear_backward, dy, cache)
        return
    fz.expect_error(names, F.linear_forward, **args)


def bad_upstream(dy, data, rng, dtype):
    """An invalid upstream gradient for ``dy``'s forward."""
    bad = data.draw(st.sampled_from(["dtype", "other_float", "rank", "shape", "non_array"]))
    return {"dtype": lambda: dy.astype(data.draw(fz.bad_dtypes)),
            "other_float": lambda: dy.astype(np.float32 if dtype == np.float64 else np.float64),
            "rank": lambda: fz.wrong_rank(dy, rng),
            "shape": lambda: np.zeros(dy.shape[:-1] + (dy.shape[-1] + 1,), dtype=dtype),
            "non_array": lambda: fz.non_array(dy, rng)}[bad]()


# --------------------------------------------------------------------------- batch_norm


@st.composite
def bn_cases(draw):
    rng = draw(fz.rngs())
    dtype = draw(fz.dtypes)
    c = draw(st.integers(1, 4))
    shape = (draw(st.integers(0, 4)), c) + ((draw(st.integers(1, 3)), draw(st.integers(1, 3))) if draw(st.booleans()) else ())
    training = draw(st.booleans())
    kind = draw(st.sampled_from(["normal", "normal", "special"]))
    x = fz.fill(rng, shape, dtype, kind, scale=2.0) + np.dtype(dtype).type(draw(st.sampled_from([0.0, 3.0])))
    args = dict(x=x)
    if draw(st.booleans()):
        args.update(weight=rng.uniform(0.5, 1.5, c).astype(dtype), bias=fz.fill(rng, (c,), dtype))
    if not training or draw(st.booleans()):
        args.update(running_mean=fz.fill(rng, (c,), dtype), running_var=rng.uniform(0.5, 2, c).astype(dtype))
    for key in list(args):
        args[key] = fz.relayout(args[key], draw(fz.layouts), rng)
    dy = fz.relayout(fz.fill(rng, shape, dtype), draw(fz.layouts), rng)
    return dict(args=args, training=training, dy=dy, dtype=np.dtype(dtype), rng=rng)


@fz.examples(1)
@given(case=bn_cases())
def test_batch_norm_valid(case):
    args, dy, dtype, training = case["args"], case["dy"], case["dtype"], case["training"]
    x = args["x"]
    m = x.size // x.shape[1]
    fin = fz.finite(*args.values(), dy)
    if training and m <= 1:  # PyTorch's error, with the input size
        fz.expect_error(["input size"], F.batch_norm_forward, **args, training=True)
        return
    y, cache = fz.run(F.batch_norm_forward, **args, training=training, finite=fin)
    grads = fz.run(F.batch_norm_backward, dy, cache, finite=fin)
    assert y.shape == x.shape and y.dtype == dtype
    for k, g in grads.items():
        assert g.shape == args[k].shape and g.dtype == dtype, (k, g.shape, g.dtype)
    if not fin:
        return
    fz.assert_finite("batch_norm", y, *grads.values())
    axes = (0,) if x.ndim == 2 else (0, 2, 3)
    x64 = x.astype(np.float64)
    if training:
        mu, var = x64.mean(axis=axes), x64.var(axis=axes)
    else:
        mu, var = args["running_mean"].astype(np.float64), args["running_var"].astype(np.float64)
    view = (1, -1) + (1,) * (x.ndim - 2)
    inv = 1 / np.sqrt(var + 1e-5)
    x_hat = (x64 - mu.reshape(view)) * inv.reshape(view)
    gamma = args["weight"].astype(np.float64) if "weight" in args else np.ones(x.shape[1])
    beta = args["bias"].astype(np.float64) if "bias" in args else np.zeros(x.shape[1])
    want = x_hat * gamma.reshape(view) + beta.reshape(view)
    # rounding of x_hat is relative to |x| + |mu| times inv_std
    scale = ((np.abs(x64) + np.abs(mu).reshape(view)) * inv.reshape(view) * np.abs(gamma).reshape(view)
             + np.abs(beta).reshape(view))
    fz.assert_close(y.astype(np.float64), want, scale * 10, "batch_norm vs formula", dtype)
    if "running_mean" in args and training:
        want_mean = 0.9 * args["running_mean"].astype(np.float64) + 0.1 * mu
        fz.assert_close(cache.running_mean.astype(np.float64), want_mean,
                        np.abs(args["running_mean"].astype(np.float64)) + np.abs(x64).max(axis=axes), "running_mean", dtype)


@fz.examples(1)
@given(case=bn_cases(), what=st.sampled_from(["dtype", "mixed", "rank", "non_array", "channels", "dy"]), data=st.data())
def test_batch_norm_invalid_arguments(case, what, data):
    args, rng, dtype, training = dict(case["args"]), case["rng"], case["dtype"], case["training"]
    m = args["x"].size // args["x"].shape[1]
    if what in ("dtype", "mixed", "rank", "non_array", "channels"):
        key = data.draw(st.sampled_from(list(args) if what != "mixed" or len(args) > 1 else ["x"]))
        if what == "channels" and len(args) == 1:
            return  # x alone: any number of channels is valid
        if what == "mixed" and key == "x":
            what = "dtype"
        a = np.asarray(args[key])
        args[key] = {"dtype": lambda: a.astype(data.draw(fz.bad_dtypes)),
                     "mixed": lambda: a.astype(np.float32 if dtype == np.float64 else np.float64),
                     "rank": lambda: fz.wrong_rank(a, rng),
                     "non_array": lambda: fz.non_array(a, rng),
                     "channels": lambda: np.concatenate([a, a], axis=0 if a.ndim == 1 else 1)}[what]()
        names = [key] if key != "x" else ["x", "weight", "bias", "running_mean", "running_var"]  # x's channels vs theirs
        if what == "rank" and key == "x" and args["x"].ndim not in (2, 4):
            names = ["x"]
        fz.expect_error(names + (["input size"] if training else []), F.batch_norm_forward, **args, training=training)
        return
    if training and m <= 1:
        return
    _, cache = fz.run(F.batch_norm_forward, **args, training=training)
    fz.expect_error(["dy"], F.batch_norm_backward, bad_upstream(case["dy"], data, rng, dtype), cache)


# --------------------------------------------------------------------------- element-wise ops, softmax, pooling

ELEMENTWISE = {
    "relu": (F.relu_forward, F.relu_backward, lambda x: np.maximum(x, 0), lambda x, dy: dy * (x > 0)),
    "sigmoid": (F.sigmoid_forward, F.sigmoid_backward, scipy.special.expit,
                lambda x, dy: dy * scipy.special.expit(x) * scipy.special.expit(-x)),
    "tanh": (F.tanh_forward, F.tanh_backward, np.tanh, lambda x, dy: dy / np.cosh(x) ** 2),
    "abs": (F.abs_forward, F.abs_backward, np.abs, lambda x, dy: dy * np.sign(x)),
}


@st.composite
def any_arrays(draw, min_dims=0, max_dims=4, min_side=0):
    rng = draw(fz.rngs())
    dtype = draw(fz.dtypes)
    shape = tuple(draw(st.lists(st.integers(min_side, 4), min_size=min_dims, max_size=max_dims)))
    kind = draw(st.sampled_from(["normal", "normal", "special"]))
    x = fz.relayout(fz.fill(rng, shape, dtype, kind, scale=draw(st.sampled_from([1.0, 30.0]))), draw(fz.layouts), rng)
    dy = fz.relayout(fz.fill(rng, shape, dtype), draw(fz.layouts), rng)
    return dict(x=x, dy=dy, dtype=np.dtype(dtype), rng=rng)


@fz.examples(1)
@given(name=st.sampled_from(sorted(ELEMENTWISE)), case=any_arrays())
def test_elementwise_valid(name, case):
    fwd, bwd, ref, dref = ELEMENTWISE[name]
    x, dy, dtype = case["x"], case["dy"], case["dtype"]
    fin = fz.finite(x, dy)
    y, cache = fz.run(fwd, x, finite=fin)
    g = fz.run(bwd, dy, cache, finite=fin)
    assert set(g) == {"x"} and y.shape == g["x"].shape == x.shape and y.dtype == g["x"].dtype == dtype
    x64, dy64 = x.astype(np.float64), dy.astype(np.float64)
    with np.errstate(all="ignore"):
        want, dwant = ref(x64), dref(x64, dy64)
    fz.assert_close(y.astype(np.float64), want, np.abs(want) + np.finfo(dtype).tiny, f"{name} forward", dtype)
    if fin:
        fz.assert_finite(name, y, g["x"])
        fz.assert_close(g["x"].astype(np.float64), dwant, np.abs(dy64) * 4, f"{name} backward", dtype)


@fz.examples(1)
@given(case=any_arrays(min_dims=1), axis=st.integers(-5, 4))
def test_softmax_valid(case, axis):
    x, dy, dtype = case["x"], case["dy"], case["dtype"]
    if not -x.ndim <= axis < x.ndim:
        fz.expect_error(["axis"], F.softmax_forward, x, axis=axis)
        return
    fin = fz.finite(x, dy)
    y, cache = fz.run(F.softmax_forward, x, axis=axis, finite=fin)
    g = fz.run(F.softmax_backward, dy, cache, finite=fin)
    assert y.shape == g["x"].shape == x.shape and y.dtype == g["x"].dtype == dtype
    if not fin:
        return
    fz.assert_finite("softmax", y, g["x"])
    if x.size == 0:
        return
    want = scipy.special.softmax(x.astype(np.float64), axis=axis)
    fz.assert_close(y.astype(np.float64), want, want + np.finfo(dtype).tiny, "softmax vs scipy", dtype)
    dy64 = dy.astype(np.float64)
    dwant = want * (dy64 - (dy64 * want).sum(axis=axis, keepdims=True))
    scale = want * (np.abs(dy64) + (np.abs(dy64) * want).sum(axis=axis, keepdims=True))
    fz.assert_close(g["x"].astype(np.float64), dwant, scale * 10, "softmax backward", dtype)


POOLS = {
    "global_avg_pool2d": (F.global_avg_pool2d_forward, F.global_avg_pool2d_backward, np.mean),
    "spatial_sum": (F.spatial_sum_forward, F.spatial_sum_backward, np.sum),
}


@fz.examples(1)
@given(name=st.sampled_from(sorted(POOLS)), case=any_arrays(min_dims=4, max_dims=4), data=st.data())
def test_pooling_valid(name, case, data):
    fwd, bwd, ref = POOLS[name]
    x, dtype, rng = case["x"], case["dtype"], case["rng"]
    n, c, h, w = x.shape
    dy = fz.relayout(fz.fill(rng, (n, c, 1, 1), dtype), data.draw(fz.layouts), rng)
    fin = fz.finite(x, dy) and (h * w > 0 or name == "spatial_sum")  # the mean of nothing is NaN (as PyTorch)
    y, cache = fz.run(fwd, x, finite=fin)
    g = fz.run(bwd, dy, cache, finite=fin)
    assert y.shape == (n, c, 1, 1) and y.dtype == dtype and g["x"].shape == x.shape and g["x"].dtype == dtype
    if not fin:
        return
    x64 = x.astype(np.float64)
    fz.assert_close(y.astype(np.float64), ref(x64, axis=(2, 3), keepdims=True), ref(np.abs(x64), axis=(2, 3), keepdims=True),
                    name, dtype)
    v = rng.standard_normal(x.shape)
    lhs, rhs = fz.inner(dy, ref(v, axis=(2, 3), keepdims=True)), fz.inner(g["x"], v)
    scale = fz.inner(np.abs(dy), ref(np.abs(v), axis=(2, 3), keepdims=True))
    assert abs(lhs - rhs) <= fz.TOL[dtype] * max(scale, 1e-300), f"adjoint: {lhs!r} vs {rhs!r}"


@fz.examples(1)
@given(case=any_arrays(min_dims=4, max_dims=4), kernel=st.tuples(st.integers(1, 3), st.integers(1, 3)),
       ties=st.booleans(), data=st.data())
def test_max_pool2d_valid(case, kernel, ties, data):
    """max_pool2d over non-overlapping windows: the output is each window's maximum (NaN
    where the window holds one); the gradient of each window lands, unchanged,
    on one element of it that equals the maximum (any NaN of it), and nowhere else.
    ``ties``: values rounded to integers, so that most windows tie."""
    x, dtype, rng = case["x"], case["dtype"], case["rng"]
    if ties:
        x = np.round(x * 0.5)
    kh, kw = kernel
    n, c, h, w = x.shape
    if h < kh or w < kw:
        fz.expect_error(["x"], F.max_pool2d_forward, x, kernel)
        return
    fin = fz.finite(x)
    y, cache = fz.run(F.max_pool2d_forward, x, kernel, finite=fin)
    ho, wo = h // kh, w // kw
    assert y.shape == (n, c, ho, wo) and y.dtype == dtype
    win = np.ascontiguousarray(x[:, :, : ho * kh, : wo * kw]).reshape(n, c, ho, kh, wo, kw)
    # equal as numbers (0.0 and -0.0 tie: the first of them wins, as torch; np.max may give either)
    assert np.array_equal(y, win.max(axis=(3, 5)), equal_nan=True), "max_pool2d vs the window maximum"
    dy = fz.relayout(fz.fill(rng, y.shape, dtype), data.draw(fz.layouts), rng)
    dx = fz.run(F.max_pool2d_backward, dy, cache, finite=fin)["x"]
    assert dx.shape == x.shape and dx.dtype == dtype
    assert not dx[:, :, ho * kh:].any() and not dx[:, :, :, wo * kw:].any(), "a dropped row or column got a gradient"
    hit = (np.ascontiguousarray(dx[:, :, : ho * kh, : wo * kw]).reshape(n, c, ho, kh, wo, kw) != 0)
    picked = np.where(hit, win, 0).sum(axis=(3, 5))  # the value under the one nonzero gradient of each window
    landed = np.where(hit, dx[:, :, : ho * kh, : wo * kw].reshape(n, c, ho, kh, wo, kw), 0).sum(axis=(3, 5))
    one = hit.sum(axis=(3, 5)) == (dy != 0)
    assert one.all(), "a window's gradient went to more than one element"
    live = dy != 0
    fz.assert_bitwise(landed[live], np.ascontiguousarray(dy)[live], "the gradient each window passes on")
    assert np.array_equal(picked[live], y[live], equal_nan=True), "the element that got the gradient is not the maximum"

UNARY = {**{k: v[:2] for k, v in ELEMENTWISE.items()}, "softmax": (F.softmax_forward, F.softmax_backward),
         **{k: v[:2] for k, v in POOLS.items()}}


@fz.examples(1)
@given(name=st.sampled_from(sorted(UNARY)), case=any_arrays(min_dims=4, max_dims=4, min_side=1),
       what=st.sampled_from(["dtype", "rank", "non_array", "axis", "dy"]), data=st.data())
def test_unary_ops_invalid_arguments(name, case, what, data):
    """Wrong inputs of the element-wise ops, softmax and the pools, and wrong upstream
    gradients of their backward (the backward must check ``dy`` like conv2d's does)."""
    fwd, bwd = UNARY[name]
    x, rng, dtype = case["x"], case["rng"], case["dtype"]
    if what == "dtype":
        fz.expect_error(["x"], fwd, x.astype(data.draw(fz.bad_dtypes)))
    elif what == "rank":
        if name in POOLS:
            fz.expect_error(["x"], fwd, fz.wrong_rank(x, rng))
        elif name == "softmax":
            fz.expect_error(["x"], fwd, x.reshape(()) if x.size == 1 else np.float64(1.0).reshape(()) .astype(dtype))
    elif what == "non_array":
        fz.expect_error(["x"], fwd, fz.non_array(x, rng))
    elif what == "axis":
        if name == "softmax":
            fz.expect_error(["axis"], fwd, x, axis=data.draw(st.sampled_from([1.5, "1", None, (0, 1), 4, -5])))
    else:
        y, cache = fz.run(fwd, x)
        dy = fz.relayout(fz.fill(rng, y.shape, dtype), "c", rng)
        fz.expect_error(["dy"], bwd, bad_upstream(dy, data, rng, dtype), cache)
