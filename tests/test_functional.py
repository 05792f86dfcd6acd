"""Primitive ops: forward against independent computations, backward against central
differences (float64), dtype behaviour and every documented error."""

import itertools

import numpy as np
import pytest
import scipy.signal
import scipy.special

from npattn import functional as F
from npattn.gradcheck import gradcheck

RTOL_GRAD = 1e-7  # required worst normwise relative error of every gradient


def rng(seed=0):
    return np.random.default_rng(seed)


def assert_grads_close(report):
    assert report.ok, report.failure_message()
    assert report.max_rel_err < RTOL_GRAD, str(report)


# --------------------------------------------------------------------------- conv2d

CONV_CASES = [
    # (N, C_in, H, W, C_out, kernel, stride, padding, dilation, groups, bias)
    (3, 4, 7, 5, 6, (3, 2), (2, 1), (1, 0), (2, 1), 2, True),
    (1, 3, 6, 9, 4, (3, 3), (1, 2), (0, 1), (1, 2), 1, False),
    (3, 4, 5, 6, 4, (3, 3), (1, 1), (1, 1), (1, 1), 4, True),  # depthwise
    (1, 6, 8, 3, 9, (2, 3), (2, 2), (1, 1), (1, 1), 3, True),
    (3, 2, 4, 7, 3, (1, 1), (1, 1), (0, 0), (1, 1), 1, True),  # 1x1
]


def conv_oracle(x, w, b, stride, padding, dilation, groups):
    """Seven-deep loop, float64: the definition of torch's conv2d, written independently."""
    n, c_in, h, wd = x.shape
    c_out, cg, kh, kw = w.shape
    out_h = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    out_w = (wd + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    y = np.zeros((n, c_out, out_h, out_w))
    og = c_out // groups
    for b_, o, oy, ox in itertools.product(range(n), range(c_out), range(out_h), range(out_w)):
        g = o // og
        acc = 0.0 if b is None else b[o]
        for c in range(cg):
            for i in range(kh):
                for j in range(kw):
                    yy = oy * stride[0] - padding[0] + i * dilation[0]
                    xx = ox * stride[1] - padding[1] + j * dilation[1]
                    if 0 <= yy < h and 0 <= xx < wd:
                        acc += w[o, c, i, j] * x[b_, g * cg + c, yy, xx]
        y[b_, o, oy, ox] = acc
    return y


def conv_scipy(x, w, b, stride, padding, dilation, groups):
    """Per channel pair with scipy.signal.correlate on the zero-padded input and the
    dilated kernel, then subsampled by the stride."""
    n, c_in, h, wd = x.shape
    c_out, cg, kh, kw = w.shape
    xp = np.pad(x, ((0, 0), (0, 0), (padding[0], padding[0]), (padding[1], padding[1])))
    og = c_out // groups
    outs = []
    for b_ in range(n):
        per_o = []
        for o in range(c_out):
            g = o // og
            kd = np.zeros((dilation[0] * (kh - 1) + 1, dilation[1] * (kw - 1) + 1))
            acc = 0
            for c in range(cg):
                kd[:: dilation[0], :: dilation[1]] = w[o, c]
                acc = acc + scipy.signal.correlate(xp[b_, g * cg + c], kd, mode="valid")
            acc = acc[:: stride[0], :: stride[1]]
            per_o.append(acc + (0 if b is None else b[o]))
        outs.append(per_o)
    return np.array(outs)


@pytest.mark.parametrize("case", CONV_CASES)
def test_conv2d_forward_matches_loop_oracle_and_scipy(case):
    n, c_in, h, w, c_out, k, s, p, d, g, has_b = case
    r = rng(1)
    x = r.standard_normal((n, c_in, h, w))
    wt = r.standard_normal((c_out, c_in // g) + k)
    b = r.standard_normal(c_out) if has_b else None
    y, _ = F.conv2d_forward(x, wt, b, stride=s, padding=p, dilation=d, groups=g)
    ref = conv_oracle(x, wt, b, s, p, d, g)
    assert y.shape == ref.shape
    np.testing.assert_allclose(y, ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(y, conv_scipy(x, wt, b, s, p, d, g), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", CONV_CASES)
def test_conv2d_gradcheck(case):
    n, c_in, h, w, c_out, k, s, p, d, g, has_b = case
    r = rng(2)
    args = {"x": r.standard_normal((n, c_in, h, w)), "weight": r.standard_normal((c_out, c_in // g) + k)}
    if has_b:
        args["bias"] = r.standard_normal(c_out)

    def fwd(**a):
        return F.conv2d_forward(**a, stride=s, padding=p, dilation=d, groups=g)

    assert_grads_close(gradcheck(fwd, F.conv2d_backward, args))


def test_conv2d_int_arguments_equal_pairs():
    r = rng(3)
    x = r.standard_normal((2, 2, 6, 5))
    w = r.standard_normal((3, 2, 3, 3))
    a, _ = F.conv2d_forward(x, w, None, 2, 1, 1, 1)
    b, _ = F.conv2d_forward(x, w, None, (2, 2), (1, 1), (1, 1), 1)
    np.testing.assert_array_equal(a, b)


# --------------------------------------------------------------------------- linear

@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("has_b", [True, False])
def test_linear_forward_and_gradcheck(n, has_b):
    r = rng(4)
    x, w = r.standard_normal((n, 5)), r.standard_normal((7, 5))
    b = r.standard_normal(7) if has_b else None
    y, _ = F.linear_forward(x, w, b)
    ref = np.array([[sum(x[i, k] * w[o, k] for k in range(5)) + (b[o] if has_b else 0) for o in range(7)] for i in range(n)])
    np.testing.assert_allclose(y, ref, rtol=1e-13, atol=1e-13)
    args = {"x": x, "weight": w} | ({"bias": b} if has_b else {})
    assert_grads_close(gradcheck(F.linear_forward, F.linear_backward, args))


# --------------------------------------------------------------------------- batch_norm

BN_SHAPES = [(3, 4), (1, 3, 5, 2), (3, 4, 3, 5), (5, 2)]


def bn_args(shape, affine, seed=5):
    r = rng(seed)
    c = shape[1]
    args = {"x": r.standard_normal(shape) * 2 + 0.5}
    if affine:
        args["weight"] = r.standard_normal(c)
        args["bias"] = r.standard_normal(c)
    return args, r.standard_normal(c), r.random(c) + 0.5


@pytest.mark.parametrize("shape", BN_SHAPES)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("affine", [True, False])
def test_batch_norm_gradcheck(shape, training, affine):
    args, rm, rv = bn_args(shape, affine)

    def fwd(**a):
        return F.batch_norm_forward(**a, running_mean=rm, running_var=rv, training=training)

    assert_grads_close(gradcheck(fwd, F.batch_norm_backward, args))


@pytest.mark.parametrize("shape", BN_SHAPES)
def test_batch_norm_forward_and_running_stats(shape):
    args, rm, rv = bn_args(shape, True)
    x, w, b = args["x"], args["weight"], args["bias"]
    axes = (0,) if x.ndim == 2 else (0, 2, 3)
    view = (1, -1) + (1,) * (x.ndim - 2)
    rm0, rv0, x0 = rm.copy(), rv.copy(), x.copy()
    y, cache = F.batch_norm_forward(x, w, b, rm, rv, training=True, momentum=0.1, eps=1e-5)
    mu, var = x.mean(axis=axes), x.var(axis=axes)
    ref = (x - mu.reshape(view)) / np.sqrt(var.reshape(view) + 1e-5) * w.reshape(view) + b.reshape(view)
    np.testing.assert_allclose(y, ref, rtol=1e-12, atol=1e-12)
    m = x.size // x.shape[1]
    np.testing.assert_allclose(cache.running_mean, 0.9 * rm0 + 0.1 * mu, rtol=1e-13)
    np.testing.assert_allclose(cache.running_var, 0.9 * rv0 + 0.1 * x.var(axis=axes, ddof=1), rtol=1e-13)
    assert m > 1
    # caller arrays untouched
    np.testing.assert_array_equal(rm, rm0)
    np.testing.assert_array_equal(rv, rv0)
    np.testing.assert_array_equal(x, x0)
    # eval uses the running statistics
    y2, cache2 = F.batch_norm_forward(x, w, b, rm, rv, training=False)
    ref2 = (x - rm.reshape(view)) / np.sqrt(rv.reshape(view) + 1e-5) * w.reshape(view) + b.reshape(view)
    np.testing.assert_allclose(y2, ref2, rtol=1e-12, atol=1e-12)
    assert cache2.running_mean is rm


@pytest.mark.parametrize("shape", [(1, 4), (1, 4, 1, 1)])
def test_batch_norm_training_with_one_value_per_channel_raises_like_pytorch(shape):
    x = np.ones(shape)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        F.batch_norm_forward(x, None, None, np.zeros(4), np.ones(4), training=True)
    # eval with one value is fine
    y, _ = F.batch_norm_forward(x, None, None, np.zeros(4), np.ones(4), training=False)
    assert y.shape == shape


# --------------------------------------------------------------------------- activations, pooling

def away_from_zero(shape, seed):
    r = rng(seed)
    return r.choice([-1.0, 1.0], size=shape) * r.uniform(0.1, 2.0, size=shape)


@pytest.mark.parametrize(
    "fwd,bwd,ref",
    [
        (F.relu_forward, F.relu_backward, lambda x: np.maximum(x, 0)),
        (F.sigmoid_forward, F.sigmoid_backward, scipy.special.expit),
        (F.tanh_forward, F.tanh_backward, np.tanh),
        (F.abs_forward, F.abs_backward, np.abs),
    ],
    ids=["relu", "sigmoid", "tanh", "abs"],
)
def test_elementwise_forward_and_gradcheck(fwd, bwd, ref):
    x = away_from_zero((3, 4, 2, 5), 6)
    y, _ = fwd(x)
    np.testing.assert_allclose(y, ref(x), rtol=1e-14, atol=1e-15)
    assert_grads_close(gradcheck(fwd, bwd, {"x": x}))


def test_relu_and_abs_gradient_at_zero_is_zero_like_pytorch():
    x = np.zeros((2, 3))
    dy = np.ones((2, 3))
    assert np.all(F.relu_backward(dy, F.relu_forward(x)[1])["x"] == 0)
    assert np.all(F.abs_backward(dy, F.abs_forward(x)[1])["x"] == 0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sigmoid_is_stable_for_large_inputs(dtype):
    x = np.array([-1e4, -745.0, -100.0, -1.0, 0.0, 1.0, 100.0, 745.0, 1e4], dtype=dtype)
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        y = F.sigmoid(x)
    assert y.dtype == dtype
    np.testing.assert_allclose(y, scipy.special.expit(x.astype(np.float64)), rtol=1e-6 if dtype == np.float32 else 1e-15,
                               atol=np.finfo(dtype).tiny)  # below tiny, float32 values are subnormal
    assert y[0] == 0 and y[-1] == 1


@pytest.mark.parametrize("axis", [0, 1, -1])
def test_softmax_forward_and_gradcheck(axis):
    x = rng(7).standard_normal((3, 4, 2))
    y, _ = F.softmax_forward(x, axis=axis)
    np.testing.assert_allclose(y, scipy.special.softmax(x, axis=axis), rtol=1e-14)
    assert_grads_close(gradcheck(lambda x: F.softmax_forward(x, axis), F.softmax_backward, {"x": x}))


def test_softmax_is_stable_for_large_inputs():
    x = np.array([[1000.0, 1000.0, -1000.0]])
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        y, _ = F.softmax_forward(x, axis=1)
    np.testing.assert_allclose(y, [[0.5, 0.5, 0.0]])


@pytest.mark.parametrize("shape", [(1, 3, 4, 5), (3, 2, 7, 1)])
def test_pooling_forward_and_gradcheck(shape):
    x = rng(8).standard_normal(shape)
    y, _ = F.global_avg_pool2d_forward(x)
    np.testing.assert_allclose(y[:, :, 0, 0], [[x[n, c].sum() / x[n, c].size for c in range(shape[1])] for n in range(shape[0])], rtol=1e-14)
    assert y.shape == shape[:2] + (1, 1)
    assert_grads_close(gradcheck(F.global_avg_pool2d_forward, F.global_avg_pool2d_backward, {"x": x}))
    s, _ = F.spatial_sum_forward(x)
    np.testing.assert_allclose(s, y * (shape[2] * shape[3]), rtol=1e-14)
    assert_grads_close(gradcheck(F.spatial_sum_forward, F.spatial_sum_backward, {"x": x}))


# --------------------------------------------------------------------------- dtype, no mutation

def _all_ops(dtype):
    r = rng(9)
    x4 = r.standard_normal((2, 4, 5, 3)).astype(dtype)
    x2 = r.standard_normal((3, 4)).astype(dtype)
    w = r.standard_normal((6, 2, 3, 2)).astype(dtype)
    c = r.standard_normal(4).astype(dtype)
    return [
        ("conv2d", F.conv2d_forward, F.conv2d_backward, (x4, w, r.standard_normal(6).astype(dtype)), {"padding": 1, "groups": 2}),
        ("linear", F.linear_forward, F.linear_backward, (x2, r.standard_normal((5, 4)).astype(dtype), r.standard_normal(5).astype(dtype)), {}),
        ("bn_train", F.batch_norm_forward, F.batch_norm_backward, (x4, c, c, c, np.abs(c)), {"training": True}),
        ("bn_eval", F.batch_norm_forward, F.batch_norm_backward, (x2, c, c, c, np.abs(c)), {"training": False}),
        ("relu", F.relu_forward, F.relu_backward, (x4,), {}),
        ("sigmoid", F.sigmoid_forward, F.sigmoid_backward, (x4,), {}),
        ("tanh", F.tanh_forward, F.tanh_backward, (x4,), {}),
        ("abs", F.abs_forward, F.abs_backward, (x4,), {}),
        ("softmax", F.softmax_forward, F.softmax_backward, (x4,), {"axis": 1}),
        ("gap", F.global_avg_pool2d_forward, F.global_avg_pool2d_backward, (x4,), {}),
        ("sum", F.spatial_sum_forward, F.spatial_sum_backward, (x4,), {}),
    ]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_dtype_in_equals_dtype_out_and_inputs_untouched(dtype):
    for name, fwd, bwd, args, kw in _all_ops(dtype):
        copies = [a.copy() for a in args]
        y, cache = fwd(*args, **kw)
        assert y.dtype == dtype, name
        dy = np.ones_like(y)
        grads = bwd(dy, cache)
        for k, g in grads.items():
            assert g.dtype == dtype, (name, k)
        for a, c in zip(args, copies):
            np.testing.assert_array_equal(a, c, err_msg=name)
        assert np.all(dy == 1), name


# --------------------------------------------------------------------------- errors

def test_conv2d_bad_inputs():
    x = np.zeros((2, 4, 5, 5))
    w = np.zeros((6, 2, 3, 3))
    with pytest.raises(ValueError, match=r"x must have 4 dimensions .*got shape \(4, 5, 5\)"):
        F.conv2d_forward(x[0], w, groups=2)
    with pytest.raises(ValueError, match="weight must have 4 dimensions"):
        F.conv2d_forward(x, w[0], groups=2)
    with pytest.raises(ValueError, match=r"weight must have C_in/groups = 4 input channels .*got weight shape \(6, 2, 3, 3\)"):
        F.conv2d_forward(x, w)
    with pytest.raises(ValueError, match="groups=3 must divide the input channels, got x with 4 channels"):
        F.conv2d_forward(x, w, groups=3)
    with pytest.raises(ValueError, match="groups=4 must divide the output channels"):
        F.conv2d_forward(x, np.zeros((6, 1, 3, 3)), groups=4)
    with pytest.raises(TypeError, match="x must have dtype float32 or float64, got int64"):
        F.conv2d_forward(x.astype(np.int64), w, groups=2)
    with pytest.raises(TypeError, match="x must be a numpy.ndarray, got list"):
        F.conv2d_forward([[1.0]], w)
    with pytest.raises(TypeError, match="weight must have the same dtype as x"):
        F.conv2d_forward(x, w.astype(np.float32), groups=2)
    with pytest.raises(ValueError, match=r"padding must be >= 0, got \(-1, 0\)"):
        F.conv2d_forward(x, w, padding=(-1, 0), groups=2)
    with pytest.raises(ValueError, match="stride must be >= 1, got 0"):
        F.conv2d_forward(x, w, stride=0, groups=2)
    with pytest.raises(ValueError, match="dilation must be >= 1"):
        F.conv2d_forward(x, w, dilation=(1, 0), groups=2)
    with pytest.raises(TypeError, match="stride must be an int or a pair of ints, got 1.5"):
        F.conv2d_forward(x, w, stride=1.5, groups=2)
    with pytest.raises(ValueError, match=r"output width would be 0 .*expected an output size of at least 1"):
        F.conv2d_forward(np.zeros((1, 4, 5, 2)), w, groups=2)
    with pytest.raises(ValueError, match=r"bias must have shape \(6,\), got \(5,\)"):
        F.conv2d_forward(x, w, np.zeros(5), groups=2)
    with pytest.raises(ValueError, match="groups must be >= 1"):
        F.conv2d_forward(x, w, groups=0)


def test_linear_bad_inputs():
    with pytest.raises(ValueError, match=r"weight must have in_features = 3 columns to match x, got weight shape \(2, 4\)"):
        F.linear_forward(np.zeros((5, 3)), np.zeros((2, 4)))
    with pytest.raises(ValueError, match="x must have 2 dimensions"):
        F.linear_forward(np.zeros(3), np.zeros((2, 3)))
    with pytest.raises(TypeError, match="float32 or float64"):
        F.linear_forward(np.zeros((5, 3), dtype=np.int32), np.zeros((2, 3)))


def test_batch_norm_bad_inputs():
    x = np.zeros((2, 3, 4, 4))
    with pytest.raises(ValueError, match=r"x must have 2 or 4 dimensions .*got shape \(3, 4, 4\)"):
        F.batch_norm_forward(x[0], training=True)
    with pytest.raises(ValueError, match=r"weight must have shape \(3,\) to match x's 3 channels, got \(4,\)"):
        F.batch_norm_forward(x, np.ones(4), training=True)
    with pytest.raises(ValueError, match="running_mean and running_var are required when training=False"):
        F.batch_norm_forward(x, training=False)
    with pytest.raises(TypeError, match="dtype"):
        F.batch_norm_forward(x.astype(np.float16), training=True)


def test_softmax_bad_axis():
    with pytest.raises(ValueError, match=r"axis must be in \[-2, 2\)"):
        F.softmax_forward(np.zeros((2, 3)), axis=2)


def test_backward_rejects_wrong_grad_shape():
    x = np.zeros((2, 4, 5, 5))
    _, cache = F.conv2d_forward(x, np.zeros((3, 4, 3, 3)))
    with pytest.raises(ValueError, match=r"dy must have shape \(2, 3, 3, 3\), got \(2, 3, 3, 2\)"):
        F.conv2d_backward(np.zeros((2, 3, 3, 2)), cache)


# ---- found by tests/fuzz ------------------------------------------------------------

UNARY_PAIRS = [
    (F.relu_forward, F.relu_backward, (2, 3)),
    (F.sigmoid_forward, F.sigmoid_backward, (2, 3)),
    (F.tanh_forward, F.tanh_backward, (2, 3)),
    (F.abs_forward, F.abs_backward, (2, 3)),
    (lambda x: F.softmax_forward(x, 1), F.softmax_backward, (2, 3)),
    (F.global_avg_pool2d_forward, F.global_avg_pool2d_backward, (2, 3, 2, 2)),
    (F.spatial_sum_forward, F.spatial_sum_backward, (2, 3, 2, 2)),
]


@pytest.mark.parametrize("fwd, bwd, shape", UNARY_PAIRS)
def test_unary_backward_checks_dy(fwd, bwd, shape):
    """The backward of the element-wise ops, softmax and the pools used to take any dy: a
    list raised AttributeError, a wrong shape a broadcasting error without the
    argument's name, an int or float32 dy (float64 forward) gave a gradient of another dtype."""
    y, cache = fwd(np.ones(shape))
    with pytest.raises(TypeError, match="dy must be a numpy.ndarray"):
        bwd(np.ones(y.shape).tolist(), cache)
    with pytest.raises(TypeError, match="dy must have dtype float32 or float64, got int64"):
        bwd(np.ones(y.shape, dtype=np.int64), cache)
    with pytest.raises(TypeError, match="dy must have the forward's dtype float64, got float32"):
        bwd(np.ones(y.shape, dtype=np.float32), cache)
    with pytest.raises(ValueError, match=r"dy must have the forward output's shape"):
        bwd(np.ones(y.shape[:-1] + (y.shape[-1] + 1,)), cache)


@pytest.mark.parametrize("fwd, bwd, dy_shape", [
    (lambda x: F.conv2d_forward(x, np.ones((2, 3, 1, 1))), F.conv2d_backward, (2, 2, 2, 2)),
    (lambda x: F.linear_forward(x[:, :, 0, 0], np.ones((2, 3))), F.linear_backward, (2, 2)),
    (lambda x: F.batch_norm_forward(x, training=True), F.batch_norm_backward, (2, 3, 2, 2)),
])
def test_backward_refuses_dy_of_the_other_float_dtype(fwd, bwd, dy_shape):
    """A float32 dy for a float64 forward gave gradients of mixed dtypes (conv2d's x
    gradient float32, its weight gradient float64)."""
    _, cache = fwd(np.random.default_rng(0).standard_normal((2, 3, 2, 2)))
    with pytest.raises(TypeError, match="dy must have the same dtype as the forward's"):
        bwd(np.ones(dy_shape, dtype=np.float32), cache)


def test_global_avg_pool2d_of_an_empty_map_is_nan_and_its_gradient_empty():
    """H or W = 0: the mean of nothing is NaN (as torch's adaptive_avg_pool2d); the
    backward raised ZeroDivisionError instead of returning the empty gradient."""
    x = np.zeros((2, 3, 0, 4))
    with np.errstate(invalid="ignore"), pytest.warns(RuntimeWarning):
        y, cache = F.global_avg_pool2d_forward(x)
    assert y.shape == (2, 3, 1, 1) and np.isnan(y).all()
    g = F.global_avg_pool2d_backward(np.ones((2, 3, 1, 1)), cache)
    assert g["x"].shape == x.shape and g["x"].dtype == x.dtype


@pytest.mark.parametrize("shape", [(0, 3), (0, 3, 2, 2)])
def test_batch_norm_eval_with_batch_zero(shape):
    """An empty batch in eval mode: the backward raised "cannot reshape array of size 0
    into shape (0,3,newaxis)" (a reshape with -1); the gradients are empty and 0."""
    x = np.zeros(shape)
    c = np.arange(1.0, 4.0)
    y, cache = F.batch_norm_forward(x, c, c, c, c, training=False)
    assert y.shape == shape
    g = F.batch_norm_backward(np.zeros(shape), cache)
    assert g["x"].shape == shape
    np.testing.assert_array_equal(g["weight"], np.zeros(3))
    np.testing.assert_array_equal(g["bias"], np.zeros(3))


@pytest.mark.parametrize("axis", [1.5, "1", None, (0, 1), True])
def test_softmax_axis_must_be_an_int(axis):
    """A float, str, None or tuple axis raised numpy's or Python's own TypeError without
    naming axis (found by tests/fuzz)."""
    with pytest.raises(TypeError, match="softmax: axis must be an int"):
        F.softmax_forward(np.zeros((2, 3)), axis=axis)


def test_softmax_along_an_empty_axis_is_empty():
    """It raised numpy's "zero-size array to reduction operation maximum" (as torch, the
    result is empty)."""
    for x in (np.zeros((2, 0)), np.zeros((0, 3))):
        y, cache = F.softmax_forward(x, axis=-1)
        assert y.shape == x.shape
        assert F.softmax_backward(np.zeros(x.shape), cache)["x"].shape == x.shape
