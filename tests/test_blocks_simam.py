"""SimAM: forward against a loop oracle of the paper's formula, gradients by central
differences, no parameters, errors (the PyTorch transcription is in tests/crosscheck)."""

import math

import numpy as np
import pytest
from blocks_testlib import check_gradients

from npattn import SimAM


def simam_oracle(x, lam):
    n, c, h, w = x.shape
    y = np.zeros(x.shape)
    for a in range(n):
        for ch in range(c):
            vals = [float(v) for v in x[a, ch].ravel()]
            mu = sum(vals) / len(vals)
            var = sum((v - mu) ** 2 for v in vals) / (len(vals) - 1)
            for i in range(h):
                for j in range(w):
                    e = (x[a, ch, i, j] - mu) ** 2 / (4 * (var + lam)) + 0.5
                    y[a, ch, i, j] = x[a, ch, i, j] / (1 + math.exp(-e))
    return y


@pytest.mark.parametrize("lam", [1e-4, 0.5])
@pytest.mark.parametrize("shape", [(3, 4, 5, 3), (1, 2, 1, 2), (2, 3, 7, 1)])
def test_forward_matches_loop_oracle(lam, shape):
    x = np.random.default_rng(0).standard_normal(shape) * 2
    y, _ = SimAM(lam, dtype=np.float64).forward(x)
    np.testing.assert_allclose(y, simam_oracle(x, lam), rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize("lam", [1e-4, 0.3])
@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("shape", [(3, 4, 5, 3), (1, 3, 2, 1), (2, 2, 3, 4)])
def test_gradients(lam, training, shape):
    x = np.random.default_rng(1).standard_normal(shape) + 0.5
    check_gradients(SimAM(lam, dtype=np.float64), [x], training=training)


def test_no_parameters_and_float32():
    blk = SimAM()
    assert blk.state_dict() == {} and blk.parameter_names() == []
    x = np.random.default_rng(2).standard_normal((2, 3, 4, 4)).astype(np.float32)
    y, cache = blk.forward(x)
    (dx,), grads = blk.backward(np.ones_like(y), cache)
    assert y.dtype == dx.dtype == np.float32 and grads == {}
    np.testing.assert_allclose(y, simam_oracle(x.astype(np.float64), 1e-4), rtol=1e-5, atol=1e-6)


def test_bad_arguments_and_inputs():
    with pytest.raises(ValueError, match="at least 2 spatial positions"):
        SimAM(dtype=np.float64).forward(np.ones((2, 3, 1, 1)))
    with pytest.raises(ValueError, match="e_lambda must be > 0"):
        SimAM(0.0)
    with pytest.raises(TypeError, match="e_lambda must be a real number"):
        SimAM("1e-4")
    with pytest.raises(TypeError, match="x has dtype float64"):
        SimAM().forward(np.ones((2, 3, 2, 2)))
