"""CBAM's pools and SEModule's activations as primitives: amax with max_grad="first",
the L2-norm and log-sum-exp reductions, SiLU, exact GELU and the hard sigmoid. Values
against independent formulas (NumPy, scipy.special.logsumexp, math.erf), gradients by
float64 central differences, the tie and kink rules by hand."""

import math

import numpy as np
import pytest
import scipy.special

from npattn import functional as F
from npattn.gradcheck import gradcheck

RTOL_GRAD = 1e-7

CASES = [((3, 4, 5, 2), (2, 3), True), ((3, 4, 5, 2), 1, True), ((3, 4, 5, 2), (0, 2), False), ((2, 7), -1, False)]


def assert_grads_close(report):
    assert report.ok, report.failure_message()
    assert report.max_rel_err < RTOL_GRAD, str(report)


# ------------------------------------------------------------------ amax, max_grad="first"


@pytest.mark.parametrize("shape, axis, keepdims", CASES)
def test_amax_first_without_ties_equals_split_and_gradchecks(shape, axis, keepdims):
    x = np.random.default_rng(1).standard_normal(shape)
    y1, c1 = F.amax_forward(x, axis, keepdims, max_grad="first")
    y2, c2 = F.amax_forward(x, axis, keepdims)
    np.testing.assert_array_equal(y1, y2)
    np.testing.assert_array_equal(c1.share, c2.share)
    assert_grads_close(gradcheck(F.amax_forward, F.amax_backward,
                                 {"x": x, "axis": axis, "keepdims": keepdims, "max_grad": "first"}))


def test_amax_first_gives_the_whole_gradient_to_the_first_maximum_in_row_major_order():
    x = np.array([[1.0, 2.0, 2.0, 0.0], [5.0, 5.0, 5.0, -1.0], [3.0, 0.0, 1.0, 3.0]])
    _, cache = F.amax_forward(x, 1, keepdims=False, max_grad="first")
    dx = F.amax_backward(np.array([1.0, 3.0, -2.0]), cache)["x"]
    np.testing.assert_array_equal(dx, [[0, 1, 0, 0], [3, 0, 0, 0], [-2, 0, 0, 0]])
    z = np.zeros((1, 2, 2, 3))
    z[0, 0] = [[1, 0, 4], [4, 0, 4]]  # over (H, W): row-major, so (0, 2) before (1, 0)
    z[0, 1] = [[0, 2, 0], [2, 0, 0]]
    _, cache = F.amax_forward(z, (2, 3), max_grad="first")
    np.testing.assert_array_equal(cache.share[0, 0], [[0, 0, 1], [0, 0, 0]])
    np.testing.assert_array_equal(cache.share[0, 1], [[0, 1, 0], [0, 0, 0]])
    _, cache = F.amax_forward(z, (0, 1), max_grad="first")  # over (N, C): channel 0 first where tied
    np.testing.assert_array_equal(cache.share[0, :, 0, 0], [1, 0])


def test_amax_first_with_nan_goes_to_the_first_nan():
    x = np.array([[1.0, np.nan, 2.0, np.nan], [1.0, 3.0, 2.0, 3.0]])
    y, cache = F.amax_forward(x, 1, keepdims=False, max_grad="first")
    assert math.isnan(y[0]) and y[1] == 3.0
    np.testing.assert_array_equal(F.amax_backward(np.ones(2), cache)["x"], [[0, 1, 0, 0], [0, 1, 0, 0]])


def test_amax_max_grad_is_checked():
    with pytest.raises(ValueError, match=r"amax: max_grad must be one of \('split', 'first'\), got 'last'"):
        F.amax_forward(np.zeros((2, 3)), 1, max_grad="last")
    with pytest.raises(TypeError, match="max_grad must be a str"):
        F.amax_forward(np.zeros((2, 3)), 1, max_grad=None)


# ------------------------------------------------------------------------ L2 norm, log-sum-exp


@pytest.mark.parametrize("shape, axis, keepdims", CASES)
def test_l2_norm_values_and_gradcheck(shape, axis, keepdims):
    x = np.random.default_rng(2).standard_normal(shape)
    y, _ = F.l2_norm_forward(x, axis, keepdims)
    np.testing.assert_allclose(y, np.sqrt(np.sum(x * x, axis=axis, keepdims=keepdims)), rtol=1e-15)
    assert_grads_close(gradcheck(F.l2_norm_forward, F.l2_norm_backward, {"x": x, "axis": axis, "keepdims": keepdims}))


def test_l2_norm_at_an_all_zero_group_has_gradient_zero_and_gradchecks():
    """The kink at 0: the gradient is 0 (torch's lp_pool2d's), which is also the central
    difference there, (|e| - |-e|) / 2e = 0."""
    x = np.random.default_rng(3).standard_normal((2, 3, 4, 3))
    x[1, 2] = 0.0
    y, cache = F.l2_norm_forward(x, (2, 3))
    assert y[1, 2, 0, 0] == 0.0 and np.all(cache.share[1, 2] == 0.0)
    assert_grads_close(gradcheck(F.l2_norm_forward, F.l2_norm_backward, {"x": x, "axis": (2, 3)}))


@pytest.mark.parametrize("shape, axis, keepdims", CASES)
def test_logsumexp_values_and_gradcheck(shape, axis, keepdims):
    x = np.random.default_rng(4).standard_normal(shape) * 3
    y, _ = F.logsumexp_forward(x, axis, keepdims)
    np.testing.assert_allclose(y, scipy.special.logsumexp(x, axis=axis, keepdims=keepdims), rtol=1e-14)
    assert_grads_close(gradcheck(F.logsumexp_forward, F.logsumexp_backward, {"x": x, "axis": axis, "keepdims": keepdims}))


def test_logsumexp_is_smooth_at_ties_and_safe_for_large_values():
    x = np.array([[2.0, 2.0, -1.0], [800.0, 799.0, -800.0]])
    y, cache = F.logsumexp_forward(x, 1, keepdims=False)
    np.testing.assert_allclose(y, [2 + math.log(2 + math.exp(-3)), 800 + math.log(1 + math.exp(-1))], rtol=1e-15)
    e = math.exp(-3)
    np.testing.assert_allclose(cache.share[0], [1 / (2 + e), 1 / (2 + e), e / (2 + e)], rtol=1e-15)
    assert_grads_close(gradcheck(F.logsumexp_forward, F.logsumexp_backward, {"x": x[:1], "axis": 1}))


# ------------------------------------------------------------------------ activations


def test_silu_and_gelu_values_and_gradcheck():
    x = np.random.default_rng(5).uniform(-6, 6, (4, 7))
    y, _ = F.silu_forward(x)
    np.testing.assert_allclose(y, x / (1 + np.exp(-x)), rtol=1e-14)
    y, _ = F.gelu_forward(x)
    np.testing.assert_allclose(y, [[v * 0.5 * (1 + math.erf(v / math.sqrt(2))) for v in row] for row in x],
                               rtol=1e-14, atol=1e-300)
    assert_grads_close(gradcheck(F.silu_forward, F.silu_backward, {"x": x}))
    assert_grads_close(gradcheck(F.gelu_forward, F.gelu_backward, {"x": x}))


def test_hard_sigmoid_values_gradcheck_and_kinks():
    x = np.random.default_rng(6).uniform(-5, 5, 40)
    x = x[np.abs(np.abs(x) - 3) > 1e-3]
    y, _ = F.hard_sigmoid_forward(x)
    np.testing.assert_allclose(y, [min(max(v + 3, 0.0), 6.0) / 6.0 for v in x], rtol=1e-15)
    assert_grads_close(gradcheck(F.hard_sigmoid_forward, F.hard_sigmoid_backward, {"x": x}))
    k = np.array([-3.0, 3.0, -3.5, 0.0])
    _, cache = F.hard_sigmoid_forward(k)
    np.testing.assert_array_equal(F.hard_sigmoid_backward(np.ones(4), cache)["x"], [0, 0, 0, 1 / 6])


@pytest.mark.parametrize("op", ["silu", "gelu", "hard_sigmoid", "l2_norm", "logsumexp", "amax_first"])
def test_float32_in_float32_out(op):
    x = np.random.default_rng(7).standard_normal((3, 4)).astype(np.float32)
    if op == "amax_first":
        y, cache = F.amax_forward(x, 1, max_grad="first")
        dx = F.amax_backward(np.ones_like(y), cache)["x"]
    elif op in ("l2_norm", "logsumexp"):
        fwd, bwd = getattr(F, f"{op}_forward"), getattr(F, f"{op}_backward")
        y, cache = fwd(x, 1)
        dx = bwd(np.ones_like(y), cache)["x"]
    else:
        fwd, bwd = getattr(F, f"{op}_forward"), getattr(F, f"{op}_backward")
        y, cache = fwd(x)
        dx = bwd(np.ones_like(y), cache)["x"]
    assert y.dtype == dx.dtype == np.float32


def test_empty_kept_axes_give_empty_results():
    """A batch of 0 (an empty axis that is not reduced): empty outputs and gradients."""
    x = np.zeros((0, 3, 2, 2))
    for fwd, bwd, kw in [(F.amax_forward, F.amax_backward, {"max_grad": "first"}), (F.amax_forward, F.amax_backward, {}),
                         (F.l2_norm_forward, F.l2_norm_backward, {}), (F.logsumexp_forward, F.logsumexp_backward, {})]:
        y, cache = fwd(x, (2, 3), **kw)
        assert y.shape == (0, 3, 1, 1) and bwd(np.zeros(y.shape), cache)["x"].shape == x.shape
