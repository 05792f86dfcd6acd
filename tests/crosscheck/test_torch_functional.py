"""Primitive ops against PyTorch in float64: outputs, every gradient, running statistics."""

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="PyTorch not installed: cross-check skipped")
pytestmark = pytest.mark.crosscheck

from npattn import functional as F  # noqa: E402

TOL = 1e-10  # normwise relative error


def rel_err(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


def t(a):
    return torch.from_numpy(np.array(a)).requires_grad_(True)


CONV_CASES = [
    ((3, 4, 7, 5), (6, 2, 3, 2), (2, 1), (1, 0), (2, 1), 2, True),
    ((1, 3, 6, 9), (4, 3, 3, 3), (1, 2), (0, 1), (1, 2), 1, False),
    ((3, 4, 5, 6), (4, 1, 3, 3), 1, 1, 1, 4, True),
    ((2, 6, 9, 7), (6, 2, 3, 3), 1, 2, 2, 3, True),
]


@pytest.mark.parametrize("case", CONV_CASES)
def test_conv2d_matches_torch(case):
    xs, ws, s, p, d, g, has_b = case
    r = np.random.default_rng(0)
    x, w = r.standard_normal(xs), r.standard_normal(ws)
    b = r.standard_normal(ws[0]) if has_b else None
    y, cache = F.conv2d_forward(x, w, b, stride=s, padding=p, dilation=d, groups=g)
    dy = r.standard_normal(y.shape)
    grads = F.conv2d_backward(dy, cache)

    tx, tw = t(x), t(w)
    tb = t(b) if has_b else None
    ty = torch.nn.functional.conv2d(tx, tw, tb, stride=s, padding=p, dilation=d, groups=g)
    ty.backward(torch.from_numpy(dy))
    assert rel_err(y, ty.detach().numpy()) < TOL
    assert rel_err(grads["x"], tx.grad.numpy()) < TOL
    assert rel_err(grads["weight"], tw.grad.numpy()) < TOL
    if has_b:
        assert rel_err(grads["bias"], tb.grad.numpy()) < TOL


@pytest.mark.parametrize("shape", [(3, 5), (4, 3, 5, 2), (1, 3, 2, 2)])
@pytest.mark.parametrize("training", [True, False])
def test_batch_norm_matches_torch_including_running_stats(shape, training):
    r = np.random.default_rng(1)
    c = shape[1]
    x = r.standard_normal(shape) * 3 + 1
    w, b = r.standard_normal(c), r.standard_normal(c)
    rm, rv = r.standard_normal(c), r.random(c) + 0.5
    y, cache = F.batch_norm_forward(x, w, b, rm, rv, training=training, momentum=0.1, eps=1e-5)
    dy = r.standard_normal(shape)
    grads = F.batch_norm_backward(dy, cache)

    bn = (torch.nn.BatchNorm1d if len(shape) == 2 else torch.nn.BatchNorm2d)(c).double()
    with torch.no_grad():
        bn.weight.copy_(torch.from_numpy(w))
        bn.bias.copy_(torch.from_numpy(b))
        bn.running_mean.copy_(torch.from_numpy(rm))
        bn.running_var.copy_(torch.from_numpy(rv))
    bn.train(training)
    tx = t(x)
    ty = bn(tx)
    ty.backward(torch.from_numpy(dy))
    assert rel_err(y, ty.detach().numpy()) < TOL
    assert rel_err(grads["x"], tx.grad.numpy()) < TOL
    assert rel_err(grads["weight"], bn.weight.grad.numpy()) < TOL
    assert rel_err(grads["bias"], bn.bias.grad.numpy()) < TOL
    assert rel_err(cache.running_mean, bn.running_mean.numpy()) < TOL
    assert rel_err(cache.running_var, bn.running_var.numpy()) < TOL


def test_batch_norm_one_value_per_channel_error_matches_torch():
    bn = torch.nn.BatchNorm1d(4).double().train()
    with pytest.raises(ValueError) as torch_err:
        bn(torch.zeros(1, 4, dtype=torch.float64))
    with pytest.raises(ValueError) as np_err:
        F.batch_norm_forward(np.zeros((1, 4)), None, None, np.zeros(4), np.ones(4), training=True)
    assert str(np_err.value) == str(torch_err.value).replace("torch.Size([1, 4])", "(1, 4)")


@pytest.mark.parametrize("has_b", [True, False])
def test_linear_matches_torch(has_b):
    r = np.random.default_rng(2)
    x, w = r.standard_normal((3, 5)), r.standard_normal((4, 5))
    b = r.standard_normal(4) if has_b else None
    y, cache = F.linear_forward(x, w, b)
    dy = r.standard_normal(y.shape)
    grads = F.linear_backward(dy, cache)
    tx, tw = t(x), t(w)
    tb = t(b) if has_b else None
    ty = torch.nn.functional.linear(tx, tw, tb)
    ty.backward(torch.from_numpy(dy))
    assert rel_err(y, ty.detach().numpy()) < TOL
    assert rel_err(grads["x"], tx.grad.numpy()) < TOL
    assert rel_err(grads["weight"], tw.grad.numpy()) < TOL
    if has_b:
        assert rel_err(grads["bias"], tb.grad.numpy()) < TOL


@pytest.mark.parametrize(
    "name",
    ["relu", "sigmoid", "tanh", "abs", "softmax1", "gap", "sum"],
)
def test_elementwise_and_reductions_match_torch(name):
    r = np.random.default_rng(3)
    x = r.standard_normal((2, 3, 4, 5)) * 4
    x[0, 0, 0, :2] = 0.0  # the kinks of relu and abs
    ops = {
        "relu": (F.relu_forward, F.relu_backward, torch.relu),
        "sigmoid": (F.sigmoid_forward, F.sigmoid_backward, torch.sigmoid),
        "tanh": (F.tanh_forward, F.tanh_backward, torch.tanh),
        "abs": (F.abs_forward, F.abs_backward, torch.abs),
        "softmax1": (lambda a: F.softmax_forward(a, 1), F.softmax_backward, lambda a: torch.softmax(a, 1)),
        "gap": (F.global_avg_pool2d_forward, F.global_avg_pool2d_backward, lambda a: torch.nn.functional.adaptive_avg_pool2d(a, 1)),
        "sum": (F.spatial_sum_forward, F.spatial_sum_backward, lambda a: a.sum((2, 3), keepdim=True)),
    }
    fwd, bwd, tfn = ops[name]
    y, cache = fwd(x)
    dy = r.standard_normal(y.shape)
    gx = bwd(dy, cache)["x"]
    tx = t(x)
    ty = tfn(tx)
    ty.backward(torch.from_numpy(dy))
    assert rel_err(y, ty.detach().numpy()) < TOL
    assert rel_err(gx, tx.grad.numpy()) < TOL


@pytest.mark.parametrize("shape, affine, eps", [((3, 5), True, 1e-6), ((2, 3, 4, 7), True, 1e-5), ((4, 1), True, 1e-6),
                                                ((2, 5, 3), False, 0.1)])
def test_layer_norm_last_axis_matches_torch(shape, affine, eps):
    r = np.random.default_rng(4)
    x = r.standard_normal(shape) * 3 + 1
    c = shape[-1]
    w, b = (r.uniform(0.5, 1.5, c), r.standard_normal(c)) if affine else (None, None)
    y, cache = F.layer_norm_forward(x, w, b, eps)
    dy = r.standard_normal(y.shape)
    grads = F.layer_norm_backward(dy, cache)
    tx = t(x)
    tw, tb = (t(w), t(b)) if affine else (None, None)
    ty = torch.nn.functional.layer_norm(tx, (c,), tw, tb, eps)
    ty.backward(torch.from_numpy(dy))
    assert rel_err(y, ty.detach().numpy()) < TOL
    if c > 1:
        assert rel_err(grads["x"], tx.grad.numpy()) < TOL
    else:  # one value: the output is beta; torch's gradient is 0 up to rounding, npattn's exactly 0
        assert np.all(grads["x"] == 0.0) and np.max(np.abs(tx.grad.numpy())) < 1e-12
    if affine:
        assert rel_err(grads["bias"], tb.grad.numpy()) < TOL
        if c > 1:
            assert rel_err(grads["weight"], tw.grad.numpy()) < TOL
        else:
            assert np.all(grads["weight"] == 0.0) and np.max(np.abs(tw.grad.numpy())) < 1e-12


@pytest.mark.parametrize("kernel, shape", [(2, (2, 3, 7, 5)), ((2, 3), (1, 2, 6, 9)), ((3, 1), (2, 2, 5, 4))])
def test_max_pool2d_ties_and_nan_match_torch_bit_for_bit(kernel, shape):
    """Small integers make ties in most windows, and a few NaNs (two in one window):
    the output and the gradient (which element of a window gets it) are torch's CPU
    max_pool2d's exactly (no arithmetic but the selection)."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 3, shape).astype(np.float64)
    x[0, 0, 0, 0] = x[0, 0, 1, 0] = np.nan
    x[-1, -1, 2, 1] = np.nan
    y, cache = F.max_pool2d_forward(x, kernel)
    dy = rng.standard_normal(y.shape)
    dx = F.max_pool2d_backward(dy, cache)["x"]
    tx = t(x)
    ty = torch.nn.functional.max_pool2d(tx, kernel)
    ty.backward(torch.from_numpy(dy))
    np.testing.assert_array_equal(y, ty.detach().numpy())  # NaN where torch has NaN
    np.testing.assert_array_equal(dx, tx.grad.numpy())
