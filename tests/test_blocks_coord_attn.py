"""CoordAttn (timm's layout): forward against a loop oracle, gradients of every input and
parameter in training and eval (uneven shapes, batch 1 and 3, bias on/off), the exact
zero of conv1's bias in training, state_dict, errors."""

import math

import numpy as np
import pytest
from blocks_testlib import apply_running, batch_norm_loop, check_gradients, randomize_state

from npattn import CoordAttn

C = 10


def hswish(v):
    return v * min(max(v + 3.0, 0.0), 6.0) / 6.0


def coord_oracle(x, state, bias, training, bn_args=(0.1, 1e-5), has_skip=False):
    n, c, h, w = x.shape
    w1 = state["conv1.weight"][:, :, 0, 0]
    d = w1.shape[0]
    u = np.zeros((n, c, h + w, 1))
    for a in range(n):
        for ch in range(c):
            for i in range(h):
                u[a, ch, i, 0] = sum(x[a, ch, i, j] for j in range(w)) / w
            for j in range(w):
                u[a, ch, h + j, 0] = sum(x[a, ch, i, j] for i in range(h)) / h
    v = np.zeros((n, d, h + w, 1))
    for a in range(n):
        for k in range(d):
            for t in range(h + w):
                v[a, k, t, 0] = sum(w1[k, ch] * u[a, ch, t, 0] for ch in range(c)) + (state["conv1.bias"][k] if bias else 0)
    b, stats = batch_norm_loop(v, state, "bn1.", training, *bn_args)
    act = np.vectorize(hswish)(b)
    y = np.zeros(x.shape)
    for a in range(n):
        for ch in range(c):
            gh = [1 / (1 + math.exp(-(sum(state["conv_h.weight"][ch, k, 0, 0] * act[a, k, i, 0] for k in range(d))
                                      + (state["conv_h.bias"][ch] if bias else 0)))) for i in range(h)]
            gw = [1 / (1 + math.exp(-(sum(state["conv_w.weight"][ch, k, 0, 0] * act[a, k, h + j, 0] for k in range(d))
                                      + (state["conv_w.bias"][ch] if bias else 0)))) for j in range(w)]
            for i in range(h):
                for j in range(w):
                    y[a, ch, i, j] = x[a, ch, i, j] * gw[j] * gh[i] + (x[a, ch, i, j] if has_skip else 0.0)
    return y, stats


CONFIGS = [{"rd_channels": 3}, {"rd_channels": 4, "bias": True}, {"rd_ratio": 0.5, "rd_divisor": 2, "se_factor": 0.5, "bias": True}]


@pytest.mark.parametrize("kwargs", CONFIGS)
@pytest.mark.parametrize("training", [True, False])
def test_forward_and_running_stats_match_loop_oracle(kwargs, training):
    rng = np.random.default_rng(0)
    blk = randomize_state(CoordAttn(C, **kwargs, rng=1, dtype=np.float64), rng)
    x = rng.standard_normal((2, C, 4, 3)) * 2
    state = blk.state_dict()
    expected, stats = coord_oracle(x, state, blk.bias, training)
    y, _ = blk.forward(x, training=training)
    np.testing.assert_allclose(y, expected, rtol=1e-12, atol=1e-13)
    apply_running(state, "bn1.", stats)
    for key, v in state.items():
        np.testing.assert_allclose(blk.state_dict()[key], v, rtol=1e-13, atol=1e-15, err_msg=key)


@pytest.mark.parametrize("kwargs", CONFIGS)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shape", [(3, C, 5, 4), (1, C, 2, 6)])
def test_gradients_every_input_and_parameter(kwargs, training, shape):
    rng = np.random.default_rng(2)
    blk = randomize_state(CoordAttn(C, **kwargs, rng=3, dtype=np.float64), rng)
    x = rng.standard_normal(shape) * 3  # BN outputs spread over all three pieces of hardswish
    zero = ("conv1.bias",) if training and blk.bias else ()
    check_gradients(blk, [x], training=training, zero_keys=zero)
    y, cache = blk.forward(x, training=training)
    _, grads = blk.backward(rng.standard_normal(y.shape), cache)
    if zero:
        assert np.all(grads["conv1.bias"] == 0.0)  # exact zeros, not rounding noise
    elif blk.bias:
        assert np.all(grads["conv1.bias"] != 0.0)


@pytest.mark.parametrize("channels, kwargs, hidden", [
    (32, {}, 8), (256, {}, 8), (96, {"rd_divisor": 1}, 4), (64, {"se_factor": 1.0, "rd_ratio": 0.25}, 16),
    (16, {"rd_channels": 5}, 5), (16, {"rd_channels": 0}, 8),
])
def test_hidden_width_is_timms(channels, kwargs, hidden):
    assert CoordAttn(channels, **kwargs, rng=0).rd_channels == hidden


def test_state_dict_keys_and_shapes_are_timms():
    sd = CoordAttn(32, bias=True, rng=0).state_dict()
    assert [(k, v.shape) for k, v in sd.items()] == [
        ("conv1.weight", (8, 32, 1, 1)), ("conv1.bias", (8,)), ("bn1.weight", (8,)), ("bn1.bias", (8,)),
        ("bn1.running_mean", (8,)), ("bn1.running_var", (8,)), ("bn1.num_batches_tracked", ()),
        ("conv_h.weight", (32, 8, 1, 1)), ("conv_h.bias", (32,)), ("conv_w.weight", (32, 8, 1, 1)), ("conv_w.bias", (32,))]
    assert [k for k in CoordAttn(32, rng=0).state_dict() if k.endswith(".bias")] == ["bn1.bias"]


def test_state_dict_round_trip():
    rng = np.random.default_rng(4)
    a = randomize_state(CoordAttn(C, rd_channels=3, bias=True, rng=0, dtype=np.float64), rng)
    b = CoordAttn(C, rd_channels=3, bias=True, rng=1, dtype=np.float64)
    b.load_state_dict(a.state_dict())
    x = rng.standard_normal((2, C, 3, 5))
    np.testing.assert_array_equal(a.forward(x)[0], b.forward(x)[0])


def test_batch_one_training_is_allowed():
    """BatchNorm sees N (H + W) >= 2 values per channel, so batch 1 trains (as in timm)."""
    blk = CoordAttn(C, rd_channels=2, rng=0, dtype=np.float64)
    y, _ = blk.forward(np.random.default_rng(0).standard_normal((1, C, 1, 1)), training=True)
    assert y.shape == (1, C, 1, 1) and int(blk["bn1.num_batches_tracked"]) == 1


def test_bad_arguments_and_inputs():
    with pytest.raises(ValueError, match="se_factor must be > 0"):
        CoordAttn(8, se_factor=0)
    with pytest.raises(TypeError, match="bias must be a bool"):
        CoordAttn(8, bias=None)
    blk = CoordAttn(8, rng=0)
    with pytest.raises(ValueError, match="x must have 8 channels"):
        blk.forward(np.zeros((2, 4, 3, 3), np.float32))
    _, cache = blk.forward(np.ones((2, 8, 3, 3), np.float32))
    with pytest.raises(ValueError, match="grad_out must have shape"):
        blk.backward(np.ones((2, 8, 3, 2), np.float32), cache)


@pytest.mark.parametrize("shape", [(2, 16, 0, 3), (2, 16, 3, 0)])
def test_empty_image_raises_naming_x(shape):
    """H or W = 0: timm's CoordAttn refuses it in conv1; npattn raised conv2d's "output
    height would be 0", naming no argument of the block. Now a ValueError naming x."""
    with pytest.raises(ValueError, match=r"x must have H >= 1 and W >= 1") as info:
        CoordAttn(16, rng=0, dtype=np.float64).forward(np.zeros(shape))
    assert str(info.value).startswith("CoordAttn: x must") and str(shape) in str(info.value)


# ------------------------------------------------- has_skip (timm), BatchNorm settings

SKIP_BN = dict(has_skip=True, bn_momentum=0.25, bn_eps=0.03)


@pytest.mark.parametrize("training", [True, False])
def test_skip_and_bn_settings_match_loop_oracle(training):
    rng = np.random.default_rng(5)
    blk = randomize_state(CoordAttn(C, rd_channels=4, bias=True, **SKIP_BN, rng=1, dtype=np.float64), rng)
    x = rng.standard_normal((2, C, 5, 3)) * 2
    state = blk.state_dict()
    expected, stats = coord_oracle(x, state, True, training, (0.25, 0.03), has_skip=True)
    y, _ = blk.forward(x, training=training)
    np.testing.assert_allclose(y, expected, rtol=1e-12, atol=1e-13)
    plain, plain_stats = coord_oracle(x, state, True, training)
    assert np.max(np.abs(plain + x - y)) > 1e-6  # eps changes the numbers: the check can fail
    if training:
        assert np.max(np.abs(plain_stats[0] - stats[0])) > 1e-6
    apply_running(state, "bn1.", stats)
    for key, v in state.items():
        np.testing.assert_allclose(blk.state_dict()[key], v, rtol=1e-13, atol=1e-15, err_msg=key)


@pytest.mark.parametrize("training", [True, False])
def test_skip_and_bn_settings_gradients(training):
    rng = np.random.default_rng(6)
    blk = randomize_state(CoordAttn(C, rd_channels=3, bias=True, **SKIP_BN, rng=3, dtype=np.float64), rng)
    x = rng.standard_normal((3, C, 5, 2)) * 3
    check_gradients(blk, [x], training=training, zero_keys=("conv1.bias",) if training else ())


def test_skip_is_checked_and_in_timms_config():
    with pytest.raises(TypeError, match="CoordAttn: has_skip must be a bool"):
        CoordAttn(8, has_skip=1)
    blk = CoordAttn(8, has_skip=True, bn_eps=1e-3, rng=0)
    assert blk.config["has_skip"] is True and "bn_eps" not in blk.config  # config: timm's arguments only
