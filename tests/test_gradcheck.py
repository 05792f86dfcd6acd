"""The finite-difference checker must catch wrong backward passes and say where."""

import numpy as np
import pytest

from npattn import functional as F
from npattn.gradcheck import GradcheckError, gradcheck


def conv_args(seed=0):
    r = np.random.default_rng(seed)
    return {"x": r.standard_normal((2, 3, 5, 4)), "weight": r.standard_normal((4, 3, 3, 2)), "bias": r.standard_normal(4)}


def test_correct_backward_passes():
    report = gradcheck(F.conv2d_forward, F.conv2d_backward, conv_args())
    assert report.ok
    assert {t.name for t in report.tensors} == {"x", "weight", "bias"}
    assert all(t.method == "full" for t in report.tensors)
    assert report.max_rel_err < 1e-8


def test_reports_a_wrong_element_with_tensor_index_and_values():
    def bad_backward(dy, cache):
        g = F.conv2d_backward(dy, cache)
        g["weight"] = g["weight"].copy()
        g["weight"][2, 1, 0, 1] *= 1.01
        return g

    with pytest.raises(GradcheckError) as exc:
        gradcheck(F.conv2d_forward, bad_backward, conv_args())
    msg = str(exc.value)
    assert "'weight'" in msg and "index (2, 1, 0, 1)" in msg
    assert "numerical" in msg and "analytic" in msg


def test_reports_a_scaled_gradient_without_raising_when_asked():
    def bad_backward(dy, cache):
        g = F.conv2d_backward(dy, cache)
        g["x"] = g["x"] * 1.01
        return g

    report = gradcheck(F.conv2d_forward, bad_backward, conv_args(), raise_on_failure=False)
    assert not report.ok
    failed = [t.name for t in report.tensors if not t.passed]
    assert failed == ["x"]
    assert "NO" in str(report)


def test_projection_mode_catches_a_wrong_large_gradient():
    r = np.random.default_rng(1)
    x = r.standard_normal((4, 8, 20, 20))  # 12800 elements > max_full_size

    def bad_backward(dy, cache):
        return {"x": F.tanh_backward(dy, cache)["x"] * 1.01}

    report = gradcheck(F.tanh_forward, F.tanh_backward, {"x": x})
    assert report.ok and report.tensors[0].method == "projection"
    with pytest.raises(GradcheckError, match="random direction"):
        gradcheck(F.tanh_forward, bad_backward, {"x": x})


def test_missing_gradient_wrong_shape_and_dtype_are_reported():
    def missing(dy, cache):
        g = F.conv2d_backward(dy, cache)
        del g["bias"]
        return g

    with pytest.raises(GradcheckError, match="backward returned no gradient for 'bias'"):
        gradcheck(F.conv2d_forward, missing, conv_args())

    def wrong_shape(dy, cache):
        g = F.conv2d_backward(dy, cache)
        g["bias"] = g["bias"][:2]
        return g

    with pytest.raises(GradcheckError, match=r"gradient of 'bias' has shape \(2,\), expected \(4,\)"):
        gradcheck(F.conv2d_forward, wrong_shape, conv_args())

    def wrong_dtype(dy, cache):
        g = F.conv2d_backward(dy, cache)
        g["bias"] = g["bias"].astype(np.float32)
        return g

    with pytest.raises(GradcheckError, match="gradient of 'bias' has dtype float32, expected float64"):
        gradcheck(F.conv2d_forward, wrong_dtype, conv_args())


def test_zero_upstream_and_repeatability_and_mutation_are_checked():
    def nonzero_at_zero(dy, cache):
        g = F.conv2d_backward(dy, cache)
        g["bias"] = g["bias"] + (0.0 if np.any(dy) else 1.0)
        return g

    with pytest.raises(GradcheckError, match="a zero grad_output gives a nonzero gradient for 'bias'"):
        gradcheck(F.conv2d_forward, nonzero_at_zero, conv_args())

    calls = []

    def not_repeatable(dy, cache):
        calls.append(1)
        g = F.conv2d_backward(dy, cache)
        g["x"] = g["x"] + 1e-9 * len(calls)
        return g

    with pytest.raises(GradcheckError, match="backward run twice gives different gradients for 'x'"):
        gradcheck(F.conv2d_forward, not_repeatable, conv_args())

    def mutating(dy, cache):
        g = F.conv2d_backward(dy, cache)
        dy *= 1.0 + 0.0 * dy  # harmless value, but a write
        dy[...] = dy + 0.0
        dy.flat[0] += 1.0
        return g

    with pytest.raises(GradcheckError, match="backward modified grad_output"):
        gradcheck(F.conv2d_forward, mutating, conv_args())


def test_works_on_a_users_own_op():
    def cube_forward(x):
        return x**3, x

    def cube_backward(dy, x):
        return {"x": 3 * x**2 * dy}

    r = np.random.default_rng(2)
    assert gradcheck(cube_forward, cube_backward, {"x": r.standard_normal(7)}).ok

    def wrong(dy, x):
        return {"x": 3 * x * dy}

    with pytest.raises(GradcheckError):
        gradcheck(cube_forward, wrong, {"x": r.standard_normal(7)})


def test_a_nan_numerical_derivative_fails():
    """A forward that turns NaN under perturbation (its loss is NaN on one side) has no
    numerical derivative there: that is a failure, never a pass by NaN comparisons."""
    x0 = np.array([0.5, 1.0, 2.0])

    def forward(x):
        y = x.copy()
        y[x != x0] = np.nan  # any perturbed element is NaN
        return y, None

    def backward(dy, cache):
        return {"x": dy.copy()}  # the derivative at x0 is 1

    report = gradcheck(forward, backward, {"x": x0}, raise_on_failure=False, structural=False)
    assert not report.ok
    assert not report.tensors[0].passed
