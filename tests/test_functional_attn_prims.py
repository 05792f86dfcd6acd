"""The primitives of the channel and spatial attention blocks (mean / amax reductions,
conv1d, layer_norm2d, layer_norm over the last axis, hardswish): forward against independent computations (loops,
numpy, scipy), backward against central differences in float64, the tie rule of the
maximum, the kinks of hardswish, dtypes and errors."""

import math
import re

import numpy as np
import pytest
import scipy.signal

from npattn import functional as F
from npattn.gradcheck import gradcheck

RTOL_GRAD = 1e-7  # required worst normwise relative error of every gradient


def rng(seed=0):
    return np.random.default_rng(seed)


def assert_grads_close(report):
    assert report.ok, report.failure_message()
    assert report.max_rel_err < RTOL_GRAD, str(report)


# ------------------------------------------------------------------- mean and amax

REDUCE_CASES = [((3, 4, 5, 2), (2, 3), True), ((3, 4, 5, 2), 1, True), ((3, 4, 5, 2), (0, 2), False),
                ((2, 7), -1, False), ((1, 3, 1, 4), (1, 3), True)]


@pytest.mark.parametrize("shape, axis, keepdims", REDUCE_CASES)
def test_mean_forward_and_gradcheck(shape, axis, keepdims):
    x = rng(1).standard_normal(shape)
    y, _ = F.mean_forward(x, axis, keepdims)
    np.testing.assert_allclose(y, np.mean(x, axis=axis, keepdims=keepdims), rtol=1e-15, atol=1e-15)
    assert_grads_close(gradcheck(F.mean_forward, F.mean_backward, {"x": x, "axis": axis, "keepdims": keepdims}))


@pytest.mark.parametrize("shape, axis, keepdims", REDUCE_CASES)
def test_amax_forward_and_gradcheck_without_ties(shape, axis, keepdims):
    x = rng(2).standard_normal(shape)
    y, _ = F.amax_forward(x, axis, keepdims)
    np.testing.assert_array_equal(y, np.max(x, axis=axis, keepdims=keepdims))
    assert_grads_close(gradcheck(F.amax_forward, F.amax_backward, {"x": x, "axis": axis, "keepdims": keepdims}))


def test_amax_splits_the_gradient_evenly_among_tied_maxima():
    x = np.array([[1.0, 2.0, 2.0, 0.0], [5.0, 5.0, 5.0, -1.0], [3.0, 0.0, 1.0, 2.0]])
    y, cache = F.amax_forward(x, 1, keepdims=False)
    np.testing.assert_array_equal(y, [2.0, 5.0, 3.0])
    dx = F.amax_backward(np.array([1.0, 3.0, -2.0]), cache)["x"]
    np.testing.assert_array_equal(dx, [[0, 0.5, 0.5, 0], [1.0, 1.0, 1.0, 0], [-2.0, 0, 0, 0]])


def test_amax_over_two_axes_counts_ties_across_both():
    x = np.zeros((1, 2, 2, 3))
    x[0, 0] = [[1, 4, 4], [4, 0, 1]]  # three maxima over (H, W)
    x[0, 1] = [[2, 1, 0], [0, 1, 2]]  # two
    _, cache = F.amax_forward(x, (2, 3))
    dx = F.amax_backward(np.array([[[[3.0]], [[1.0]]]]), cache)["x"]
    np.testing.assert_array_equal(dx[0, 0], [[0, 1, 1], [1, 0, 0]])
    np.testing.assert_array_equal(dx[0, 1], [[0.5, 0, 0], [0, 0, 0.5]])


def test_amax_gradcheck_at_two_way_ties():
    """At a tie of two, the even split equals the central difference in any direction:
    (f(+e) - f(-e)) / 2e = (u + v) / 2 for the two branches' slopes u, v."""
    x = rng(3).standard_normal((3, 4, 3, 5))
    x[:, :, 2, 4] = x.max(axis=(2, 3)) + 0.5
    x[:, :, 0, 1] = x[:, :, 2, 4]  # every (n, c) has its maximum twice
    _, cache = F.amax_forward(x, (2, 3))
    assert np.all(cache.share[:, :, 2, 4] == 0.5)
    assert_grads_close(gradcheck(F.amax_forward, F.amax_backward, {"x": x, "axis": (2, 3)}))


def test_amax_nan_group_gives_nan_like_torch():
    x = np.array([[1.0, np.nan, 2.0], [1.0, 3.0, 2.0]])
    y, cache = F.amax_forward(x, 1, keepdims=False)
    assert math.isnan(y[0]) and y[1] == 3.0
    dx = F.amax_backward(np.ones(2), cache)["x"]
    assert np.all(np.isnan(dx[0])) and np.array_equal(dx[1], [0, 1, 0])


def test_reduce_bad_arguments():
    x = np.zeros((2, 3, 4), np.float32)
    with pytest.raises(ValueError, match=r"amax: axis must be in \[-3, 3\)"):
        F.amax_forward(x, 3)
    with pytest.raises(ValueError, match="must not repeat"):
        F.mean_forward(x, (1, -2))
    with pytest.raises(TypeError, match="axis must be an int or a non-empty tuple"):
        F.amax_forward(x, [1])
    with pytest.raises(ValueError, match="empty axis"):
        F.amax_forward(np.zeros((2, 0, 3)), 1)
    with pytest.raises(TypeError, match="x must have dtype float32 or float64"):
        F.mean_forward(np.zeros((2, 3), np.int32), 1)
    _, cache = F.amax_forward(x, 1)
    with pytest.raises(ValueError, match=r"dy must have the shape of the forward's output \(2, 1, 4\)"):
        F.amax_backward(np.zeros((2, 4), np.float32), cache)
    _, cache = F.mean_forward(x, 1, keepdims=False)
    with pytest.raises(ValueError, match=r"dy must have the shape of the forward's output \(2, 4\)"):
        F.mean_backward(np.zeros((2, 1, 4), np.float32), cache)


# ------------------------------------------------------------------------- conv1d


def conv1d_loop(x, w, b, stride, padding, dilation, groups):
    n, c_in, length = x.shape
    c_out, cg, k = w.shape
    out_len = (length + 2 * padding - dilation * (k - 1) - 1) // stride + 1
    og = c_out // groups
    y = np.zeros((n, c_out, out_len))
    for a in range(n):
        for o in range(c_out):
            g = o // og
            for t in range(out_len):
                acc = 0.0 if b is None else float(b[o])
                for c in range(cg):
                    for j in range(k):
                        pos = t * stride - padding + j * dilation
                        if 0 <= pos < length:
                            acc += float(w[o, c, j]) * float(x[a, g * cg + c, pos])
                y[a, o, t] = acc
    return y


CONV1D_CASES = [
    # (N, C_in, L, C_out, k, stride, padding, dilation, groups, bias)
    (3, 1, 11, 1, 3, 1, 1, 1, 1, False),  # ECA: one filter over the channel axis
    (1, 1, 16, 1, 5, 1, 2, 1, 1, False),
    (2, 4, 9, 6, 3, 2, 1, 2, 2, True),
    (2, 3, 7, 2, 4, 1, 0, 1, 1, True),
]


@pytest.mark.parametrize("case", CONV1D_CASES)
def test_conv1d_forward_matches_loop_oracle_and_gradcheck(case):
    n, c_in, length, c_out, k, stride, padding, dilation, groups, has_b = case
    r = rng(4)
    x = r.standard_normal((n, c_in, length))
    w = r.standard_normal((c_out, c_in // groups, k))
    b = r.standard_normal(c_out) if has_b else None
    y, _ = F.conv1d_forward(x, w, b, stride, padding, dilation, groups)
    np.testing.assert_allclose(y, conv1d_loop(x, w, b, stride, padding, dilation, groups), rtol=1e-12, atol=1e-12)
    inputs = {"x": x, "weight": w, "bias": b, "stride": stride, "padding": padding, "dilation": dilation, "groups": groups}
    assert_grads_close(gradcheck(F.conv1d_forward, F.conv1d_backward, inputs))


def test_conv1d_single_filter_equals_scipy_correlate():
    r = rng(5)
    x = r.standard_normal((2, 1, 13))
    w = r.standard_normal((1, 1, 5))
    y, _ = F.conv1d_forward(x, w, padding=2)
    for a in range(2):
        np.testing.assert_allclose(y[a, 0], scipy.signal.correlate(x[a, 0], w[0, 0], mode="same"), rtol=1e-12, atol=1e-12)


def test_conv1d_bad_inputs():
    x = np.zeros((2, 4, 5))
    with pytest.raises(ValueError, match=r"conv1d: x must have 3 dimensions \(N, C_in, L\)"):
        F.conv1d_forward(np.zeros((2, 4)), np.zeros((1, 4, 3)))
    with pytest.raises(ValueError, match="conv1d: weight must have 3 dimensions"):
        F.conv1d_forward(x, np.zeros((1, 4, 3, 1)))
    with pytest.raises(ValueError, match="padding must be >= 0"):
        F.conv1d_forward(x, np.zeros((1, 4, 3)), padding=-1)
    with pytest.raises(ValueError, match="output width would be"):
        F.conv1d_forward(x, np.zeros((1, 4, 7)))
    _, cache = F.conv1d_forward(x, np.zeros((1, 4, 3)), padding=1)
    with pytest.raises(ValueError, match=r"conv1d_backward: dy must have shape \(2, 1, 5\)"):
        F.conv1d_backward(np.zeros((2, 1, 4)), cache)


# ---------------------------------------------------------------------- layer_norm2d


def layer_norm_loop(x, gamma, beta, eps):
    x4 = x if x.ndim == 4 else x[:, :, None, None]
    n, c, h, w = x4.shape
    y = np.zeros(x4.shape)
    for a in range(n):
        for i in range(h):
            for j in range(w):
                vals = [float(x4[a, ch, i, j]) for ch in range(c)]
                mu = sum(vals) / c
                var = sum((v - mu) ** 2 for v in vals) / c
                for ch in range(c):
                    g = 1.0 if gamma is None else float(gamma[ch])
                    b = 0.0 if beta is None else float(beta[ch])
                    y[a, ch, i, j] = (vals[ch] - mu) / math.sqrt(var + eps) * g + b
    return y.reshape(x.shape)


@pytest.mark.parametrize("shape", [(3, 5), (2, 4, 3, 2), (1, 3, 1, 1)])
@pytest.mark.parametrize("affine", [True, False])
def test_layer_norm2d_forward_and_gradcheck(shape, affine):
    r = rng(6)
    x = r.standard_normal(shape) * 2 + 0.5
    c = shape[1]
    gamma = r.uniform(0.5, 1.5, c) if affine else None
    beta = r.standard_normal(c) if affine else None
    for eps in (1e-6, 0.1):
        y, _ = F.layer_norm2d_forward(x, gamma, beta, eps=eps)
        np.testing.assert_allclose(y, layer_norm_loop(x, gamma, beta, eps), rtol=1e-12, atol=1e-12)
    assert_grads_close(gradcheck(F.layer_norm2d_forward, F.layer_norm2d_backward, {"x": x, "weight": gamma, "bias": beta}))


def test_layer_norm2d_over_one_channel_is_beta_with_exact_zero_gradient():
    x = rng(7).standard_normal((3, 1, 2, 2))
    y, cache = F.layer_norm2d_forward(x, np.array([2.0]), np.array([0.25]))
    np.testing.assert_array_equal(y, np.full(x.shape, 0.25))
    g = F.layer_norm2d_backward(np.ones_like(x), cache)
    assert np.all(g["x"] == 0.0) and g["weight"][0] == 0.0 and g["bias"][0] == 12.0


def test_layer_norm2d_bad_inputs():
    x = np.zeros((2, 4, 3, 3))
    with pytest.raises(ValueError, match=r"layer_norm2d: weight must have shape \(4,\)"):
        F.layer_norm2d_forward(x, np.ones(3))
    with pytest.raises(ValueError, match="layer_norm2d: x must have 2 or 4 dimensions"):
        F.layer_norm2d_forward(np.zeros((2, 4, 3)))
    with pytest.raises(TypeError, match="bias must have the same dtype as x"):
        F.layer_norm2d_forward(x, None, np.ones(4, np.float32))
    with pytest.raises(ValueError, match="eps must be a number >= 0"):
        F.layer_norm2d_forward(x, eps=-1.0)


# ------------------------------------------------------------- layer_norm (last axis)


@pytest.mark.parametrize("shape", [(7,), (3, 5), (2, 3, 4, 3), (1, 1, 2)])
@pytest.mark.parametrize("affine", [True, False])
def test_layer_norm_last_axis_forward_and_gradcheck(shape, affine):
    r = rng(8)
    x = r.standard_normal(shape) * 2 + 0.5
    c = shape[-1]
    gamma = r.uniform(0.5, 1.5, c) if affine else None
    beta = r.standard_normal(c) if affine else None
    for eps in (1e-6, 0.1):
        y, _ = F.layer_norm_forward(x, gamma, beta, eps=eps)
        # the channels-first loop of layer_norm2d, on x with its last axis moved to axis 1
        moved = np.moveaxis(x.reshape((-1,) + x.shape[-1:]), -1, 1)  # (M, C)
        want = layer_norm_loop(moved, gamma, beta, eps)  # (M, C)
        np.testing.assert_allclose(y.reshape(want.shape), want, rtol=1e-12, atol=1e-12)
    assert_grads_close(gradcheck(F.layer_norm_forward, F.layer_norm_backward, {"x": x, "weight": gamma, "bias": beta, "eps": 0.01}))


def test_layer_norm_last_axis_on_a_strided_view_and_one_value():
    x = rng(9).standard_normal((2, 5, 3, 4)).transpose(0, 2, 1, 3)[:, ::-1]  # (2, 3, 5, 4), negative strides
    y, cache = F.layer_norm_forward(x, eps=1e-6)
    y2, _ = F.layer_norm_forward(np.ascontiguousarray(x), eps=1e-6)
    np.testing.assert_allclose(y, y2, rtol=0, atol=1e-14)
    np.testing.assert_allclose(y.mean(axis=-1), 0.0, atol=1e-14)
    g = F.layer_norm_backward(np.ones_like(x), cache)  # a shift of the output: no gradient to x
    assert np.max(np.abs(g["x"])) < 1e-14
    x1 = rng(10).standard_normal((3, 2, 1))
    y1, c1 = F.layer_norm_forward(x1, np.array([2.0]), np.array([0.25]))
    np.testing.assert_array_equal(y1, np.full(x1.shape, 0.25))
    g1 = F.layer_norm_backward(np.ones_like(x1), c1)
    assert np.all(g1["x"] == 0.0) and g1["weight"][0] == 0.0 and g1["bias"][0] == 6.0


def test_layer_norm_last_axis_bad_inputs():
    x = np.zeros((2, 3, 4))
    with pytest.raises(ValueError, match=r"layer_norm: weight must have shape \(4,\) to match x's last dimension C = 4"):
        F.layer_norm_forward(x, np.ones(3))
    with pytest.raises(ValueError, match="layer_norm: x must have at least 1 dimension"):
        F.layer_norm_forward(np.zeros(()))
    with pytest.raises(ValueError, match="layer_norm: x must have C >= 1 values"):
        F.layer_norm_forward(np.zeros((2, 0)))
    with pytest.raises(TypeError, match="bias must have the same dtype as x"):
        F.layer_norm_forward(x, None, np.ones(4, np.float32))
    with pytest.raises(ValueError, match="eps must be a number >= 0"):
        F.layer_norm_forward(x, eps=-1.0)
    _, cache = F.layer_norm_forward(x)
    with pytest.raises(ValueError, match="layer_norm_backward: dy must have the forward output's shape"):
        F.layer_norm_backward(np.zeros((2, 3, 3)), cache)


# ------------------------------------------------------------------------- hardswish


def test_hardswish_forward_values_and_gradcheck_away_from_kinks():
    x = rng(8).uniform(-6, 6, (4, 5, 3))
    x = x[np.abs(np.abs(x) - 3) > 1e-3]
    y, _ = F.hardswish_forward(x)
    expected = np.array([v * min(max(v + 3, 0.0), 6.0) / 6.0 for v in x])
    np.testing.assert_allclose(y, expected, rtol=1e-15, atol=0)
    assert_grads_close(gradcheck(F.hardswish_forward, F.hardswish_backward, {"x": x}))


def test_hardswish_slope_at_the_kinks_is_pytorchs():
    """torch.nn.functional.hardswish's backward: 0 for x <= -3, x/3 + 1/2 for -3 < x < 3,
    1 for x >= 3 (so 0 at -3 and 1 at +3)."""
    x = np.array([-4.0, -3.0, -2.5, 0.0, 1.5, 3.0, 4.0])
    y, cache = F.hardswish_forward(x)
    np.testing.assert_array_equal(y, [0.0, 0.0, -2.5 * 0.5 / 6, 0.0, 1.5 * 4.5 / 6, 3.0, 4.0])
    dx = F.hardswish_backward(np.ones_like(x), cache)["x"]
    np.testing.assert_array_equal(dx, [0.0, 0.0, -2.5 / 3 + 0.5, 0.5, 1.0, 1.0, 1.0])


# ------------------------------------------------------------------------- dtypes


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_dtype_in_equals_dtype_out_and_inputs_untouched(dtype):
    r = rng(9)
    x = r.standard_normal((2, 3, 4, 5)).astype(dtype)
    keep = x.copy()
    ops = [
        (F.mean_forward, F.mean_backward, (x, (2, 3))),
        (F.amax_forward, F.amax_backward, (x, 1)),
        (F.layer_norm2d_forward, F.layer_norm2d_backward, (x, np.ones(3, dtype), np.zeros(3, dtype))),
        (F.hardswish_forward, F.hardswish_backward, (x,)),
        (F.conv1d_forward, F.conv1d_backward, (x[:, :, 0], np.ones((2, 3, 3), dtype), None, 1, 1)),
    ]
    for fwd, bwd, args in ops:
        y, cache = fwd(*args)
        assert y.dtype == dtype, fwd.__name__
        grads = bwd(np.ones_like(y), cache)
        assert all(g.dtype == dtype for g in grads.values()), fwd.__name__
    np.testing.assert_array_equal(x, keep)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_backward_refuses_an_upstream_gradient_of_another_dtype_or_kind(dtype):
    """mean/amax/layer_norm2d/hardswish backward took a dy of the other float dtype and
    returned a gradient of that dtype (not x's); a list or an int dy was not refused
    with the argument's name."""
    other = np.float32 if dtype == np.float64 else np.float64
    x = rng(10).standard_normal((2, 3, 4, 5)).astype(dtype)
    ops = [
        ("mean_backward", F.mean_forward, F.mean_backward, (x, (2, 3))),
        ("amax_backward", F.amax_forward, F.amax_backward, (x, 1)),
        ("layer_norm2d_backward", F.layer_norm2d_forward, F.layer_norm2d_backward, (x,)),
        ("hardswish_backward", F.hardswish_forward, F.hardswish_backward, (x,)),
    ]
    for name, fwd, bwd, args in ops:
        y, cache = fwd(*args)
        with pytest.raises(TypeError, match=rf"{name}: dy must have the forward's dtype {np.dtype(dtype)}, got {np.dtype(other)}"):
            bwd(np.ones_like(y, dtype=other), cache)
        with pytest.raises(TypeError, match=rf"{name}: dy must have dtype float32 or float64, got int64"):
            bwd(np.ones(y.shape, np.int64), cache)
        with pytest.raises(TypeError, match=rf"{name}: dy must be a numpy.ndarray, got list"):
            bwd(y.tolist(), cache)


def test_reduce_keepdims_must_be_a_bool():
    """keepdims='no' was taken as True by amax and raised numpy's "'str' object cannot be
    interpreted as an integer" in mean (no argument named)."""
    x = np.zeros((2, 3), np.float64)
    for fwd, op in ((F.mean_forward, "mean"), (F.amax_forward, "amax")):
        for bad in ("no", None, 1, 0.0):
            with pytest.raises(TypeError, match=rf"{op}: keepdims must be a bool, got {re.escape(repr(bad))}"):
                fwd(x, 1, keepdims=bad)
        assert fwd(x, 1, keepdims=np.bool_(False))[0].shape == (2,)
