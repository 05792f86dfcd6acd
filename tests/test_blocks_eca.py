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


# ------------------------------------------------------- ECA-NS (shared=False), use_mlp


def eca_ns_oracle(x, w):
    """Per-channel kernels w (C, k), written from ECANet's models/eca_ns.py (unfold + grouped conv)."""
    n, c, h, wd = x.shape
    k = w.shape[1]
    pad = (k - 1) // 2
    y = np.zeros(x.shape)
    for a in range(n):
        s = [float(np.sum(x[a, ch])) / (h * wd) for ch in range(c)]
        for ch in range(c):
            z = sum(w[ch, j] * s[ch + j - pad] for j in range(k) if 0 <= ch + j - pad < c)
            y[a, ch] = x[a, ch] / (1 + math.exp(-z))
    return y


def eca_mlp_oracle(x, state):
    """timm's EcaModule(use_mlp=True): Conv1d(1, R, 1) + bias, ReLU, Conv1d(R, 1, k) + bias."""
    n, c, h, wd = x.shape
    a, b1 = state["conv.weight"][:, 0, 0], state["conv.bias"]
    w2, b2 = state["conv2.weight"][0], float(state["conv2.bias"][0])
    r, k = w2.shape
    pad = (k - 1) // 2
    y = np.zeros(x.shape)
    for i in range(n):
        s = [float(np.sum(x[i, ch])) / (h * wd) for ch in range(c)]
        v = [[max(a[q] * s[ch] + b1[q], 0.0) for ch in range(c)] for q in range(r)]
        for ch in range(c):
            z = b2 + sum(w2[q, j] * v[q][ch + j - pad] for q in range(r) for j in range(k) if 0 <= ch + j - pad < c)
            y[i, ch] = x[i, ch] / (1 + math.exp(-z))
    return y


@pytest.mark.parametrize("channels, k", [(10, 3), (7, 5), (6, 1), (9, 9)])
def test_eca_ns_forward_matches_loop_oracle(channels, k):
    blk = ECA(channels, kernel_size=k, shared=False, rng=1, dtype=np.float64)
    assert blk.kernel_size == k and blk["conv.weight"].shape == (channels, 1, k)  # k as given, not adaptive
    x = np.random.default_rng(0).standard_normal((2, channels, 3, 4))
    y, _ = blk.forward(x)
    np.testing.assert_allclose(y, eca_ns_oracle(x, blk["conv.weight"][:, 0]), rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize("kwargs, hidden", [({"channels": 16}, 8), ({"channels": 24, "rd_channels": 3}, 3),
                                            ({"channels": 40, "rd_ratio": 0.25, "rd_divisor": 4}, 12),
                                            ({"channels": 64, "rd_ratio": 0.3, "rd_divisor": 8}, 24)])
def test_use_mlp_width_and_forward_match_timms_rule_and_loop_oracle(kwargs, hidden):
    # make_divisible(40 * 0.25, 4) = 12; make_divisible(19.2, 8) = 16 < 0.9 * 19.2, so 24 (round_limit 0.9)
    blk = ECA(**kwargs, use_mlp=True, rng=2, dtype=np.float64)
    assert blk.rd_channels == hidden
    k = blk.kernel_size
    assert [(key, v.shape) for key, v in blk.state_dict().items()] == [
        ("conv.weight", (hidden, 1, 1)), ("conv.bias", (hidden,)), ("conv2.weight", (1, hidden, k)), ("conv2.bias", (1,))]
    x = np.random.default_rng(3).standard_normal((2, kwargs["channels"], 3, 2))
    y, _ = blk.forward(x)
    np.testing.assert_allclose(y, eca_mlp_oracle(x, blk.state_dict()), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("kwargs, shape", [
    ({"channels": 10, "kernel_size": 3, "shared": False}, (3, 10, 4, 5)),
    ({"channels": 7, "kernel_size": 5, "shared": False}, (1, 7, 3, 2)),
    ({"channels": 12, "use_mlp": True, "rd_channels": 3}, (3, 12, 2, 5)),
    ({"channels": 9, "use_mlp": True, "rd_ratio": 0.5, "rd_divisor": 2, "gamma": 1}, (1, 9, 3, 3)),
])
@pytest.mark.parametrize("training", [False, True])
def test_ns_and_mlp_gradients_every_input_and_parameter(kwargs, shape, training):
    blk = ECA(**kwargs, rng=4, dtype=np.float64)
    x = np.random.default_rng(5).standard_normal(shape) + 0.2
    check_gradients(blk, [x], training=training)


def test_ns_and_mlp_errors():
    with pytest.raises(ValueError, match=r"shared=False \(one kernel per channel\) needs channels"):
        ECA(kernel_size=3, shared=False)
    with pytest.raises(ValueError, match="use_mlp=True .* needs channels"):
        ECA(use_mlp=True)
    with pytest.raises(ValueError, match="kernel_size must be odd"):
        ECA(8, kernel_size=4, shared=False)
    with pytest.raises(ValueError, match="cannot be combined"):
        ECA(8, shared=False, use_mlp=True)
    with pytest.raises(TypeError, match="shared must be a bool"):
        ECA(8, shared=0)
    with pytest.raises(ValueError, match="rd_channels must be None or >= 1"):
        ECA(8, use_mlp=True, rd_channels=0)
    with pytest.raises(ValueError, match="x must have 8 channels"):
        ECA(8, shared=False, rng=0).forward(np.zeros((2, 6, 3, 3), np.float32))
