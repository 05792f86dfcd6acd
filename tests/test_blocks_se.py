"""SEBlock: forward against a loop oracle, gradients by central differences (every input
and parameter, training and eval), state_dict layout, initialisation, errors."""

import math

import numpy as np
import pytest
from blocks_testlib import check_gradients

from npattn import SEBlock


def se_oracle(x, state, bias):
    """Loops over the seed's layout: GAP -> Linear -> ReLU -> Linear -> sigmoid -> scale."""
    n, c, h, w = x.shape
    w1, w2 = state["fc.0.weight"], state["fc.2.weight"]
    d = w1.shape[0]
    y = np.zeros(x.shape)
    for a in range(n):
        s = [sum(float(v) for v in x[a, ch].ravel()) / (h * w) for ch in range(c)]
        hid = []
        for k in range(d):
            acc = sum(float(w1[k, ch]) * s[ch] for ch in range(c)) + (float(state["fc.0.bias"][k]) if bias else 0.0)
            hid.append(max(acc, 0.0))
        for ch in range(c):
            z = sum(float(w2[ch, k]) * hid[k] for k in range(d)) + (float(state["fc.2.bias"][ch]) if bias else 0.0)
            g = 1.0 / (1.0 + math.exp(-z))
            y[a, ch] = x[a, ch] * g
    return y


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(3, 8, 4, 5), (1, 8, 2, 7)])
def test_forward_matches_loop_oracle(bias, shape):
    rng = np.random.default_rng(0)
    blk = SEBlock(8, reduction=2, bias=bias, rng=1, dtype=np.float64)
    x = rng.standard_normal(shape)
    for training in (False, True):
        y, _ = blk.forward(x, training=training)
        np.testing.assert_allclose(y, se_oracle(x, blk.state_dict(), bias), rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("shape", [(3, 8, 4, 5), (1, 8, 3, 2)])
def test_gradients_every_input_and_parameter(bias, training, shape):
    blk = SEBlock(8, reduction=2, bias=bias, rng=2, dtype=np.float64)
    x = np.random.default_rng(3).standard_normal(shape)
    check_gradients(blk, [x], training=training)


def test_state_dict_keys_shapes_and_order():
    assert {k: v.shape for k, v in SEBlock(32, 16, rng=0).state_dict().items()} == {
        "fc.0.weight": (2, 32),
        "fc.2.weight": (32, 2),
    }
    sd = SEBlock(32, 8, bias=True, rng=0).state_dict()
    assert list(sd) == ["fc.0.weight", "fc.0.bias", "fc.2.weight", "fc.2.bias"]
    assert [sd[k].shape for k in sd] == [(4, 32), (4,), (32, 4), (32,)]


def test_initialisation_follows_pytorch_bounds_and_rng():
    a = SEBlock(64, 4, bias=True, rng=5).state_dict()
    b = SEBlock(64, 4, bias=True, rng=np.random.default_rng(5)).state_dict()
    c = SEBlock(64, 4, bias=True, rng=6).state_dict()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
        assert not np.array_equal(a[k], c[k])
        assert a[k].dtype == np.float32
    fan_in = {"fc.0": 64, "fc.2": 16}
    for k, v in a.items():
        bound = 1 / math.sqrt(fan_in[k[:4]])
        assert np.all(np.abs(v) <= bound) and np.max(np.abs(v)) > 0.5 * bound


def test_float32_in_float32_out_and_close_to_float64():
    blk = SEBlock(16, 4, bias=True, rng=0)
    x = np.random.default_rng(1).standard_normal((2, 16, 5, 3)).astype(np.float32)
    y, cache = blk.forward(x)
    (dx,), grads = blk.backward(np.ones_like(y), cache)
    assert y.dtype == dx.dtype == np.float32 and all(g.dtype == np.float32 for g in grads.values())
    blk64 = SEBlock(16, 4, bias=True, rng=0, dtype=np.float64)
    y64, _ = blk64.forward(x.astype(np.float64))
    np.testing.assert_allclose(y, y64, rtol=1e-5, atol=1e-6)


def test_bad_inputs_raise_naming_the_argument():
    blk = SEBlock(8, 4, rng=0)
    with pytest.raises(ValueError, match="x must have 4 dimensions"):
        blk.forward(np.zeros((2, 8, 3), np.float32))
    with pytest.raises(ValueError, match="x must have 8 channels"):
        blk.forward(np.zeros((2, 6, 3, 3), np.float32))
    with pytest.raises(TypeError, match="x must have dtype float32 or float64"):
        blk.forward(np.zeros((2, 8, 3, 3), np.int64))
    with pytest.raises(TypeError, match="x has dtype float64"):
        blk.forward(np.zeros((2, 8, 3, 3), np.float64))
    y, cache = blk.forward(np.ones((2, 8, 3, 3), np.float32))
    with pytest.raises(ValueError, match="grad_out must have shape"):
        blk.backward(np.ones((2, 8, 3, 4), np.float32), cache)
    with pytest.raises(ValueError, match="reduction"):
        SEBlock(8, 16)
    with pytest.raises(TypeError, match="bias"):
        SEBlock(8, 4, bias="yes")


@pytest.mark.filterwarnings("ignore:Mean of empty slice:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:invalid value encountered in divide:RuntimeWarning")  # numpy: 0 / 0 in that mean
@pytest.mark.parametrize("shape", [(2, 4, 0, 3), (2, 4, 3, 0), (0, 4, 0, 0)])
def test_empty_image_as_pytorch(shape):
    """H or W = 0: the backward raised ZeroDivisionError (1 / (H W)). PyTorch's module
    (tools/torch_ref_blocks.py SEBlock, torch 2.14.1) returns the empty output and an
    empty input gradient; the squeeze is the mean of nothing, NaN, so the weight
    gradients are NaN for a non-empty batch (0 for an empty one). npattn does the same."""
    blk = SEBlock(4, 2, bias=True, rng=0, dtype=np.float64)
    x = np.zeros(shape)
    y, cache = blk.forward(x)
    (dx,), grads = blk.backward(np.zeros(shape), cache)
    assert y.shape == dx.shape == shape and y.dtype == dx.dtype == np.float64
    for k in ("fc.0.weight", "fc.2.weight", "fc.2.bias"):
        assert grads[k].shape == blk[k].shape
        assert np.isnan(grads[k]).all() if shape[0] else not grads[k].any(), k
