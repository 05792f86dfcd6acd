"""GCT: forward against a loop oracle in the three modes, gradients by central
differences with non-trivial alpha, gamma, beta, identity at initialisation, errors."""

import math

import numpy as np
import pytest
from blocks_testlib import check_gradients

from npattn import GCT

MODES = [("l2", False), ("l1", False), ("l1", True)]


def gct_oracle(x, alpha, gamma, beta, eps, mode, after_relu):
    """Loops, written from the authors' GCT.forward."""
    n, c, h, w = x.shape
    y = np.zeros(x.shape)
    for a in range(n):
        if mode == "l2":
            emb = [math.sqrt(sum(float(v) ** 2 for v in x[a, ch].ravel()) + eps) * alpha[ch] for ch in range(c)]
            norm = [gamma[ch] / math.sqrt(sum(e * e for e in emb) / c + eps) for ch in range(c)]
        else:
            emb = [sum((float(v) if after_relu else abs(float(v))) for v in x[a, ch].ravel()) * alpha[ch] for ch in range(c)]
            norm = [gamma[ch] / (sum(abs(e) for e in emb) / c + eps) for ch in range(c)]
        for ch in range(c):
            gate = 1.0 + math.tanh(emb[ch] * norm[ch] + beta[ch])
            y[a, ch] = x[a, ch] * gate
    return y


def nontrivial(blk, seed=0):
    """alpha, gamma, beta away from their initial 1, 0, 0 (at gamma = 0 the alpha
    gradient is identically 0 and checks nothing)."""
    rng = np.random.default_rng(seed)
    c = blk.num_channels
    blk.load_state_dict({
        "alpha": rng.uniform(0.5, 1.5, (1, c, 1, 1)),
        "gamma": rng.uniform(0.5, 2.0, (1, c, 1, 1)) * rng.choice([-1, 1], (1, c, 1, 1)),
        "beta": rng.normal(0.0, 0.5, (1, c, 1, 1)),
    })
    return blk


def make_input(shape, after_relu, seed=1):
    x = np.random.default_rng(seed).standard_normal(shape)
    return np.abs(x) + 0.1 if after_relu else x


@pytest.mark.parametrize("mode,after_relu", MODES)
def test_forward_matches_loop_oracle(mode, after_relu):
    blk = nontrivial(GCT(6, epsilon=1e-3, mode=mode, after_relu=after_relu, dtype=np.float64))
    x = make_input((3, 6, 4, 5), after_relu)
    y, _ = blk.forward(x)
    sd = {k: v.ravel() for k, v in blk.state_dict().items()}
    np.testing.assert_allclose(y, gct_oracle(x, sd["alpha"], sd["gamma"], sd["beta"], 1e-3, mode, after_relu), rtol=1e-13, atol=1e-14)


def test_after_relu_on_signed_input_uses_the_raw_sum():
    blk = nontrivial(GCT(4, mode="l1", after_relu=True, dtype=np.float64))
    x = np.random.default_rng(2).standard_normal((2, 4, 3, 3))
    sd = {k: v.ravel() for k, v in blk.state_dict().items()}
    y, _ = blk.forward(x)
    np.testing.assert_allclose(y, gct_oracle(x, sd["alpha"], sd["gamma"], sd["beta"], 1e-5, "l1", True), rtol=1e-13)


@pytest.mark.parametrize("mode,after_relu", MODES)
def test_identity_at_initialisation(mode, after_relu):
    x = np.random.default_rng(0).standard_normal((2, 5, 3, 4)).astype(np.float32)
    y, _ = GCT(5, mode=mode, after_relu=after_relu).forward(x)
    np.testing.assert_array_equal(y, x)


def test_after_relu_is_ignored_in_l2_mode():
    x = np.random.default_rng(0).standard_normal((2, 5, 3, 4))
    a = nontrivial(GCT(5, mode="l2", dtype=np.float64)).forward(x)[0]
    b = nontrivial(GCT(5, mode="l2", after_relu=True, dtype=np.float64)).forward(x)[0]
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("mode,after_relu", MODES)
@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("shape", [(3, 6, 4, 5), (1, 6, 2, 3)])
def test_gradients_every_input_and_parameter(mode, after_relu, training, shape):
    blk = nontrivial(GCT(6, mode=mode, after_relu=after_relu, dtype=np.float64), seed=3)
    check_gradients(blk, [make_input(shape, after_relu, seed=4)], training=training)


def test_state_dict_and_dtype():
    blk = GCT(7)
    sd = blk.state_dict()
    assert list(sd) == ["alpha", "gamma", "beta"]
    assert all(v.shape == (1, 7, 1, 1) and v.dtype == np.float32 for v in sd.values())
    np.testing.assert_array_equal(sd["alpha"], 1)
    np.testing.assert_array_equal(sd["gamma"], 0)
    np.testing.assert_array_equal(sd["beta"], 0)
    nontrivial(blk)
    x = np.random.default_rng(0).standard_normal((2, 7, 3, 3)).astype(np.float32)
    y, cache = blk.forward(x)
    (dx,), grads = blk.backward(np.ones_like(y), cache)
    assert y.dtype == dx.dtype == np.float32
    assert all(g.dtype == np.float32 and g.shape == (1, 7, 1, 1) for g in grads.values())
    y64, _ = blk.to(np.float64).forward(x.astype(np.float64))
    np.testing.assert_allclose(y, y64, rtol=1e-5, atol=1e-6)


def test_errors():
    with pytest.raises(ValueError, match="mode must be one of"):
        GCT(4, mode="l3")
    with pytest.raises(ValueError, match="epsilon"):
        GCT(4, epsilon=-1.0)
    blk = GCT(4)
    with pytest.raises(ValueError, match="x must have 4 channels"):
        blk.forward(np.zeros((1, 3, 2, 2), np.float32))
    with pytest.raises(ValueError, match="x must have 4 dimensions"):
        blk.forward(np.zeros((4, 2, 2), np.float32))
    with pytest.raises(TypeError, match="float32 or float64"):
        blk.forward(np.zeros((1, 4, 2, 2), np.int32))
    with pytest.raises(KeyError, match="gamma"):
        blk.load_state_dict({"alpha": np.ones((1, 4, 1, 1)), "beta": np.zeros((1, 4, 1, 1))})
    with pytest.raises(ValueError, match="'beta' must have shape"):
        blk.load_state_dict({"alpha": np.ones((1, 4, 1, 1)), "gamma": np.ones((1, 4, 1, 1)), "beta": np.zeros(4)})
