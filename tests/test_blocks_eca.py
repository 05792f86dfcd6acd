"""ECA (timm's EcaModule layout): the adaptive kernel size, forward against a loop
oracle, gradients (training and eval), state_dict, errors."""

import math

import numpy as np
import pytest
from blocks_testlib import check_gradients

from npattn import ECA
from npattn.blocks.eca import eca_kernel_size


@pytest.mark.parametrize("channels, gamma, beta, k", [
    (16, 2, 1, 3),     # t = int(5 / 2) = 2 -> 3
    (64, 2, 1, 3),     # t = int(7 / 2) = 3
    (256, 2, 1, 5),    # t = int(9 / 2) = 4 -> 5
    (512, 2, 1, 5),    # t = int(10 / 2) = 5
    (2048, 2, 1, 7),   # t = int(12 / 2) = 6 -> 7
    (1, 2, 1, 3),      # t = 0 -> 1, at least 3
    (16, 1, 1, 5),     # t = 5
    (16, 1, 2, 7),     # t = 6 -> 7
    (100, 2, -20, 7),  # |log2(100) - 20| = 13.36 -> t = 6 -> 7 (the absolute value)
])
def test_adaptive_kernel_size_formula(channels, gamma, beta, k):
    t = int(abs(math.log2(channels) + beta) / gamma)
    assert max(t if t % 2 else t + 1, 3) == k
    assert eca_kernel_size(channels, gamma, beta) == k
    blk = ECA(channels, kernel_size=9, gamma=gamma, beta=beta, rng=0)  # kernel_size ignored with channels
    assert blk.kernel_size == k and blk["conv.weight"].shape == (1, 1, k)


def eca_oracle(x, wk):
    n, c, h, w = x.shape
    k = len(wk)
    pad = (k - 1) // 2
    y = np.zeros(x.shape)
    for a in range(n):
        s = [float(np.sum(x[a, ch])) / (h * w) for ch in range(c)]
        for ch in range(c):
            z = sum(wk[j] * s[ch + j - pad] for j in range(k) if 0 <= ch + j - pad < c)
            y[a, ch] = x[a, ch] / (1 + math.exp(-z))
    return y


@pytest.mark.parametrize("kwargs", [{}, {"kernel_size": 5}, {"channels": 10, "gamma": 1}, {"kernel_size": 1}])
@pytest.mark.parametrize("shape", [(3, 10, 4, 5), (1, 10, 2, 3)])
def test_forward_matches_loop_oracle(kwargs, shape):
    blk = ECA(**kwargs, rng=1, dtype=np.float64)
    x = np.random.default_rng(0).standard_normal(shape)
    y, _ = blk.forward(x)
    np.testing.assert_allclose(y, eca_oracle(x, blk["conv.weight"][0, 0]), rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize("kwargs", [{}, {"kernel_size": 7}, {"channels": 10, "gamma": 1}])
@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("shape", [(3, 10, 4, 5), (1, 10, 3, 2), (2, 3, 2, 5)])
def test_gradients_every_input_and_parameter(kwargs, training, shape):
    shape = (shape[0], kwargs.get("channels", shape[1])) + shape[2:]  # the block fixes C when given
    blk = ECA(**kwargs, rng=2, dtype=np.float64)
    x = np.random.default_rng(3).standard_normal(shape) + 0.2
    check_gradients(blk, [x], training=training)


def test_state_dict_and_init():
    sd = ECA(256, rng=0).state_dict()
    assert [(k, v.shape) for k, v in sd.items()] == [("conv.weight", (1, 1, 5))]
    w = ECA(kernel_size=9, rng=3)["conv.weight"]
    assert np.all(np.abs(w) <= 1 / 3) and np.max(np.abs(w)) > 0.1
    a, b = ECA(kernel_size=5, rng=0), ECA(kernel_size=5, rng=1)
    b.load_state_dict(a.state_dict())
    np.testing.assert_array_equal(a["conv.weight"], b["conv.weight"])
    with pytest.raises(ValueError, match=r"'conv.weight' must have shape \(1, 1, 5\)"):
        b.load_state_dict({"conv.weight": np.zeros((1, 1, 3))})


def test_bad_arguments_and_inputs():
    with pytest.raises(ValueError, match="kernel_size must be odd"):
        ECA(kernel_size=4)
    with pytest.raises(ValueError, match="gamma must be non-zero"):
        ECA(16, gamma=0)
    with pytest.raises(ValueError, match="x must have 16 channels"):
        ECA(16, rng=0).forward(np.zeros((2, 8, 3, 3), np.float32))
    blk = ECA(rng=0)
    blk.forward(np.zeros((2, 8, 3, 3), np.float32))  # without channels: any C
    with pytest.raises(ValueError, match="x must have 4 dimensions"):
        blk.forward(np.zeros((2, 8, 3), np.float32))


@pytest.mark.filterwarnings("ignore:Mean of empty slice:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:invalid value encountered in divide:RuntimeWarning")  # numpy: 0 / 0 in that mean
@pytest.mark.parametrize("shape", [(2, 10, 0, 3), (1, 10, 3, 0)])
def test_empty_image_as_timm(shape):
    """H or W = 0: the backward raised ZeroDivisionError (1 / (H W)). timm's EcaModule
    returns the empty output, an empty input gradient and a NaN conv.weight gradient
    (the squeeze is the mean of nothing); npattn does the same."""
    blk = ECA(rng=0, dtype=np.float64)
    y, cache = blk.forward(np.zeros(shape))
    (dx,), grads = blk.backward(np.ones(shape), cache)
    assert y.shape == dx.shape == shape
    assert grads["conv.weight"].shape == blk["conv.weight"].shape and np.isnan(grads["conv.weight"]).all()
