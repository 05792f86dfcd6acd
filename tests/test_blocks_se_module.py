"""SEModule (timm's layout): channel arithmetic, forward against a loop oracle, gradients
of every input and parameter (training and eval), state_dict, errors."""

import math

import numpy as np
import pytest
from blocks_testlib import apply_running, batch_norm_loop, check_gradients, randomize_state

from npattn import SEModule
from npattn.blocks._timm import make_divisible


def se_module_oracle(x, state, bias):
    n, c, h, w = x.shape
    w1, w2 = state["fc1.weight"][:, :, 0, 0], state["fc2.weight"][:, :, 0, 0]
    y = np.zeros(x.shape)
    for a in range(n):
        s = [sum(float(v) for v in x[a, ch].ravel()) / (h * w) for ch in range(c)]
        hid = []
        for k in range(w1.shape[0]):
            acc = sum(float(w1[k, ch]) * s[ch] for ch in range(c)) + (float(state["fc1.bias"][k]) if bias else 0.0)
            hid.append(max(acc, 0.0))
        for ch in range(c):
            z = sum(float(w2[ch, k]) * hid[k] for k in range(len(hid))) + (float(state["fc2.bias"][ch]) if bias else 0.0)
            y[a, ch] = x[a, ch] / (1.0 + math.exp(-z))
    return y


@pytest.mark.parametrize("channels, kwargs, hidden", [
    (64, {}, 8),  # make_divisible(4, 8) = 8
    (256, {}, 16),
    (24, {"rd_ratio": 0.25, "rd_divisor": 1}, 6),
    (24, {"rd_ratio": 0.25, "rd_divisor": 4}, 8),  # int(6 + 2) // 4 * 4
    (16, {"rd_channels": 3}, 3),
    (16, {"rd_channels": 0, "rd_divisor": 2}, 2),  # 0 means "compute", as timm's `if not rd_channels`
])
def test_hidden_width_is_timms(channels, kwargs, hidden):
    assert SEModule(channels, **kwargs, rng=0).rd_channels == hidden


def test_make_divisible_examples():
    assert make_divisible(4.0, 8, round_limit=0.0) == 8
    assert make_divisible(12.0, 8, round_limit=0.0) == 16
    assert make_divisible(11.9, 8, round_limit=0.0) == 8
    assert make_divisible(20.0, 8) == 24 and make_divisible(7.0, 8) == 8


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(3, 12, 4, 5), (1, 12, 2, 7)])
def test_forward_matches_loop_oracle(bias, shape):
    blk = SEModule(12, rd_channels=5, bias=bias, rng=1, dtype=np.float64)
    x = np.random.default_rng(0).standard_normal(shape)
    y, _ = blk.forward(x)
    np.testing.assert_allclose(y, se_module_oracle(x, blk.state_dict(), bias), rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize("kwargs", [{"rd_channels": 5}, {"rd_channels": 4, "bias": False}, {"rd_ratio": 0.25, "rd_divisor": 2}])
@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("shape", [(3, 12, 4, 5), (1, 12, 3, 2)])
def test_gradients_every_input_and_parameter(kwargs, training, shape):
    blk = SEModule(12, **kwargs, rng=2, dtype=np.float64)
    x = np.random.default_rng(3).standard_normal(shape) + 0.3
    check_gradients(blk, [x], training=training)


def test_state_dict_keys_and_shapes_are_timms():
    sd = SEModule(32, rng=0).state_dict()
    assert [(k, v.shape) for k, v in sd.items()] == [
        ("fc1.weight", (8, 32, 1, 1)), ("fc1.bias", (8,)), ("fc2.weight", (32, 8, 1, 1)), ("fc2.bias", (32,))]
    assert list(SEModule(32, bias=False, rng=0).state_dict()) == ["fc1.weight", "fc2.weight"]


def test_state_dict_round_trip_and_strict_load():
    a = SEModule(16, rd_channels=4, rng=0, dtype=np.float64)
    b = SEModule(16, rd_channels=4, rng=1, dtype=np.float64)
    b.load_state_dict(a.state_dict())
    x = np.random.default_rng(0).standard_normal((2, 16, 3, 3))
    np.testing.assert_array_equal(a.forward(x)[0], b.forward(x)[0])
    sd = a.state_dict()
    sd["fc1.weight"] = sd["fc1.weight"][:, :, 0]
    with pytest.raises(ValueError, match="'fc1.weight' must have shape"):
        b.load_state_dict(sd)
    with pytest.raises(KeyError, match="missing keys"):
        b.load_state_dict({"fc1.weight": a["fc1.weight"]})


def test_bad_inputs_raise_naming_the_argument():
    blk = SEModule(8, rd_channels=2, rng=0)
    with pytest.raises(ValueError, match="x must have 8 channels"):
        blk.forward(np.zeros((2, 6, 3, 3), np.float32))
    with pytest.raises(TypeError, match="x has dtype float64"):
        blk.forward(np.zeros((2, 8, 3, 3)))
    y, cache = blk.forward(np.ones((2, 8, 3, 3), np.float32))
    with pytest.raises(ValueError, match="grad_out must have shape"):
        blk.backward(np.ones((2, 8, 3, 4), np.float32), cache)
    with pytest.raises(TypeError, match="bias must be a bool"):
        SEModule(8, bias=1)
    with pytest.raises(ValueError, match="rd_channels must be None or >= 1"):
        SEModule(8, rd_channels=-1)
    with pytest.raises(ValueError, match="rd_ratio must be > 0"):
        SEModule(8, rd_ratio=0.0)
    with pytest.raises(ValueError, match="rd_divisor must be >= 1"):
        SEModule(8, rd_divisor=0)


@pytest.mark.filterwarnings("ignore:Mean of empty slice:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:invalid value encountered in divide:RuntimeWarning")  # numpy: 0 / 0 in that mean
@pytest.mark.parametrize("shape", [(2, 16, 0, 3), (1, 16, 3, 0)])
def test_empty_image_as_timm(shape):
    """H or W = 0: the backward raised ZeroDivisionError (1 / (H W)). timm's SEModule
    returns the empty output, an empty input gradient and NaN weight gradients (the
    squeeze is the mean of nothing); npattn does the same."""
    blk = SEModule(16, rd_channels=4, rng=0, dtype=np.float64)
    y, cache = blk.forward(np.zeros(shape))
    (dx,), grads = blk.backward(np.ones(shape), cache)
    assert y.shape == dx.shape == shape
    for k in ("fc1.weight", "fc2.weight", "fc2.bias"):
        assert grads[k].shape == blk[k].shape and np.isnan(grads[k]).all(), k


# ------------------------------------------------------------------------ timm's options

ACTS = {
    "relu": lambda v: max(v, 0.0),
    "silu": lambda v: v / (1 + math.exp(-v)),
    "hardswish": lambda v: v * min(max(v + 3, 0.0), 6.0) / 6,
    "gelu": lambda v: v * 0.5 * (1 + math.erf(v / math.sqrt(2))),
}
GATES = {"sigmoid": lambda v: 1 / (1 + math.exp(-v)), "hard_sigmoid": lambda v: min(max(v + 3, 0.0), 6.0) / 6}


def se_module_options_oracle(x, state, cfg, training):
    """Loops written from timm's SEModule.forward; returns y and bn's running statistics after."""
    n, c, h, w = x.shape
    w1, w2 = state["fc1.weight"][:, :, 0, 0], state["fc2.weight"][:, :, 0, 0]
    d = w1.shape[0]
    b1 = state["fc1.bias"] if cfg.get("bias", True) else np.zeros(d)
    b2 = state["fc2.bias"] if cfg.get("bias", True) else np.zeros(c)
    s = np.array([[sum(float(v) for v in x[a, ch].ravel()) / (h * w) for ch in range(c)] for a in range(n)])
    if cfg.get("add_maxpool"):
        s = 0.5 * s + 0.5 * np.array([[max(x[a, ch].ravel()) for ch in range(c)] for a in range(n)])
    hid = np.array([[sum(w1[k, ch] * s[a, ch] for ch in range(c)) + b1[k] for k in range(d)] for a in range(n)])
    stats = None
    if cfg.get("norm"):
        hid, stats = batch_norm_loop(hid, state, "bn.", training, cfg.get("bn_momentum", 0.1), cfg.get("bn_eps", 1e-5))
    act, gate = ACTS[cfg.get("act", "relu")], GATES[cfg.get("gate", "sigmoid")]
    y = np.zeros(x.shape)
    for a in range(n):
        hv = [act(v) for v in hid[a]]
        for ch in range(c):
            y[a, ch] = x[a, ch] * gate(sum(w2[ch, k] * hv[k] for k in range(d)) + b2[ch])
    return y, stats


OPTION_CONFIGS = [
    dict(add_maxpool=True, rd_channels=5),
    dict(norm=True, rd_channels=6, bn_momentum=0.3, bn_eps=1e-3),
    dict(act="silu", rd_channels=4, bias=False),
    dict(act="gelu", gate="hard_sigmoid", rd_channels=4),
    dict(act="hardswish", norm=True, add_maxpool=True, rd_ratio=0.25, rd_divisor=2),
]


@pytest.mark.parametrize("cfg", OPTION_CONFIGS)
@pytest.mark.parametrize("training", [True, False])
def test_options_forward_and_running_stats_match_loop_oracle(cfg, training):
    rng = np.random.default_rng(20)
    blk = randomize_state(SEModule(12, **cfg, rng=21, dtype=np.float64), rng)
    x = rng.standard_normal((3, 12, 4, 5)) + 0.3
    state = blk.state_dict()
    expected, stats = se_module_options_oracle(x, state, cfg, training)
    y, _ = blk.forward(x, training=training)
    np.testing.assert_allclose(y, expected, rtol=1e-12, atol=1e-13)
    if stats is not None:
        apply_running(state, "bn.", stats)
    for key, v in state.items():
        np.testing.assert_allclose(blk.state_dict()[key], v, rtol=1e-13, atol=1e-15, err_msg=key)


@pytest.mark.parametrize("cfg, shape", [(cfg, [(3, 12, 4, 5), (2, 12, 3, 2)][i % 2]) for i, cfg in enumerate(OPTION_CONFIGS)]
                         + [(dict(add_maxpool=True, rd_channels=5), (1, 12, 2, 5))])
@pytest.mark.parametrize("training", [False, True])
def test_options_gradients_every_input_and_parameter(cfg, shape, training):
    rng = np.random.default_rng(22)
    blk = randomize_state(SEModule(12, **cfg, rng=23, dtype=np.float64), rng)
    x = rng.standard_normal(shape) + 0.3
    # in training a BatchNorm after fc1 removes fc1's bias: its gradient is exactly 0
    zero = ("fc1.bias",) if training and cfg.get("norm") and cfg.get("bias", True) else ()
    check_gradients(blk, [x], training=training, zero_keys=zero)


def test_add_maxpool_gradient_at_two_way_ties_is_split():
    rng = np.random.default_rng(24)
    blk = SEModule(8, rd_channels=3, add_maxpool=True, rng=25, dtype=np.float64)
    x = rng.standard_normal((2, 8, 3, 4))
    top = x.max(axis=(2, 3)) + 0.5
    x[:, :, 0, 0] = x[:, :, 2, 3] = top
    _, cache = blk.forward(x)
    assert np.all(cache.max_hw.share[:, :, 0, 0] == 0.5)
    check_gradients(blk, [x], training=False)


def test_options_state_dict_keys_are_timms():
    sd = SEModule(16, rd_channels=4, norm=True, rng=0).state_dict()
    assert [(k, v.shape) for k, v in sd.items()] == [
        ("fc1.weight", (4, 16, 1, 1)), ("fc1.bias", (4,)), ("bn.weight", (4,)), ("bn.bias", (4,)),
        ("bn.running_mean", (4,)), ("bn.running_var", (4,)), ("bn.num_batches_tracked", ()),
        ("fc2.weight", (16, 4, 1, 1)), ("fc2.bias", (16,))]
    assert SEModule(16, rd_channels=4, norm=True, rng=0).parameter_names() == [
        "fc1.weight", "fc1.bias", "bn.weight", "bn.bias", "fc2.weight", "fc2.bias"]


def test_options_errors():
    with pytest.raises(ValueError, match=r"act must be one of \('relu', 'silu', 'hardswish', 'gelu'\), got 'tanh'"):
        SEModule(8, act="tanh")
    with pytest.raises(ValueError, match=r"gate must be one of \('sigmoid', 'hard_sigmoid'\)"):
        SEModule(8, gate="tanh")
    with pytest.raises(TypeError, match="norm must be a bool"):
        SEModule(8, norm=1)
    with pytest.raises(TypeError, match="add_maxpool must be a bool"):
        SEModule(8, add_maxpool="yes")
    with pytest.raises(ValueError, match="bn_eps must be positive"):
        SEModule(8, norm=True, bn_eps=-1.0)
    blk = SEModule(8, rd_channels=2, norm=True, rng=0)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        blk.forward(np.ones((1, 8, 3, 3), np.float32), training=True)
    blk.forward(np.ones((1, 8, 3, 3), np.float32), training=False)
    with pytest.raises(ValueError, match=r"x must have H >= 1 and W >= 1"):
        SEModule(8, add_maxpool=True, rng=0).forward(np.ones((1, 8, 0, 3), np.float32))
