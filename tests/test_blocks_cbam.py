"""CBAM (timm's CbamModule layout): forward against a loop oracle, gradients of every
input and parameter in training and eval (uneven shapes, batch 1 and 3, every option),
the tie rule of both maxima, state_dict, errors."""

import math

import numpy as np
import pytest
from blocks_testlib import apply_running, batch_norm_loop, check_gradients, conv2d_loop, randomize_state

from npattn import CBAM

C = 12


def sig(v):
    return 1.0 / (1.0 + np.exp(-v))


def cbam_oracle(x, state, k, training):
    """Loops / plain NumPy, written from timm's CbamModule.forward; returns y and the BN
    statistics after the call."""
    n, c, h, w = x.shape
    w1, w2 = state["channel.fc1.weight"][:, :, 0, 0], state["channel.fc2.weight"][:, :, 0, 0]

    def mlp(v):
        return np.array([sum(w2[o, j] * max(sum(w1[j, i] * v[i] for i in range(c)), 0.0) for j in range(w1.shape[0]))
                         for o in range(c)])

    x1 = np.zeros(x.shape)
    for a in range(n):
        avg = np.array([np.sum(x[a, ch]) / (h * w) for ch in range(c)])
        mx = np.array([max(x[a, ch].ravel()) for ch in range(c)])
        g = sig(mlp(avg) + mlp(mx))
        for ch in range(c):
            x1[a, ch] = x[a, ch] * g[ch]
    p = np.zeros((n, 2, h, w))
    for a in range(n):
        for i in range(h):
            for j in range(w):
                col = [x1[a, ch, i, j] for ch in range(c)]
                p[a, 0, i, j] = sum(col) / c
                p[a, 1, i, j] = max(col)
    q = conv2d_loop(p, state["spatial.conv.conv.weight"], None, (k - 1) // 2, 1, 1)
    r, stats = batch_norm_loop(q, state, "spatial.conv.bn.", training)
    return x1 * sig(r), stats


CONFIGS = [
    ({}, 7),  # rd_ratio 1/16, rd_divisor 1: D = max(1, int(0.75 + 0.5)) = 1
    ({"rd_channels": 3, "spatial_kernel_size": 3}, 3),
    ({"rd_ratio": 0.25, "rd_divisor": 2, "spatial_kernel_size": 5}, 5),  # D = int(3 + 1) // 2 * 2 = 4
    ({"rd_channels": 2, "spatial_kernel_size": 1}, 1),
]


@pytest.mark.parametrize("kwargs, k", CONFIGS)
@pytest.mark.parametrize("training", [True, False])
def test_forward_and_running_stats_match_loop_oracle(kwargs, k, training):
    rng = np.random.default_rng(0)
    blk = randomize_state(CBAM(C, **kwargs, rng=1, dtype=np.float64), rng)
    x = rng.standard_normal((2, C, 4, 5))
    state = blk.state_dict()
    expected, stats = cbam_oracle(x, state, k, training)
    y, _ = blk.forward(x, training=training)
    np.testing.assert_allclose(y, expected, rtol=1e-12, atol=1e-13)
    apply_running(state, "spatial.conv.bn.", stats)
    for key, v in state.items():
        np.testing.assert_allclose(blk.state_dict()[key], v, rtol=1e-13, atol=1e-15, err_msg=key)


@pytest.mark.parametrize("kwargs, k", CONFIGS)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shape", [(3, C, 5, 4), (1, C, 3, 6)])
def test_gradients_every_input_and_parameter(kwargs, k, training, shape):
    rng = np.random.default_rng(2)
    blk = randomize_state(CBAM(C, **kwargs, rng=3, dtype=np.float64), rng)
    # shift the channels along the sign of fc1's weights so that no hidden ReLU is dead
    # (with D = 1 and batch 1 a dead unit would leave the MLP's gradients 0)
    shift = np.sign(blk["channel.fc1.weight"][:, :, 0, 0].sum(axis=0))[None, :, None, None]
    x = rng.standard_normal(shape) + shift
    check_gradients(blk, [x], training=training)


def test_gradient_at_two_way_ties_of_the_spatial_max_is_split_evenly():
    """Every channel's maximum over (H, W) is attained twice; the even split is what
    central differences give at a two-way tie, so gradcheck checks it exactly."""
    rng = np.random.default_rng(4)
    blk = randomize_state(CBAM(C, rd_channels=3, spatial_kernel_size=3, rng=5, dtype=np.float64), rng)
    x = rng.standard_normal((3, C, 4, 5))
    top = x.max(axis=(2, 3)) + 0.4
    x[:, :, 0, 1] = top
    x[:, :, 3, 2] = top
    _, cache = blk.forward(x, training=True)
    assert np.all(cache.max_hw.share[:, :, 0, 1] == 0.5) and np.all(cache.max_hw.share[:, :, 3, 2] == 0.5)
    for training in (True, False):
        check_gradients(blk, [x], training=training)


def test_gradient_at_two_way_ties_of_the_channel_max_is_split_evenly():
    """Channels 0 and 1 equal and largest, with equal rows of fc2: their gated maps x1 are
    equal, so the max over channels is tied at every pixel."""
    rng = np.random.default_rng(6)
    blk = randomize_state(CBAM(C, rd_channels=3, spatial_kernel_size=3, rng=7, dtype=np.float64), rng)
    state = blk.state_dict()
    state["channel.fc2.weight"][1] = state["channel.fc2.weight"][0]
    blk.load_state_dict(state)
    x = rng.standard_normal((2, C, 3, 4))
    x[:, 0] = x[:, 0] + 6.0
    x[:, 1] = x[:, 0]
    _, cache = blk.forward(x, training=True)
    share = cache.max_c.share
    assert np.all(share[:, 0] == 0.5) and np.all(share[:, 1] == 0.5) and np.all(share[:, 2:] == 0)
    for training in (True, False):
        check_gradients(blk, [x], training=training)


def test_three_way_tie_gets_a_third_each():
    blk = CBAM(4, rd_channels=1, spatial_kernel_size=3, rng=0, dtype=np.float64)
    x = np.zeros((2, 4, 3, 3))
    x[:, :, 1, 1] = x[:, :, 0, 2] = x[:, :, 2, 0] = 1.0  # three spatial maxima per channel
    _, cache = blk.forward(x, training=False)
    np.testing.assert_array_equal(cache.max_hw.share[0, 0], [[0, 0, 1 / 3], [0, 1 / 3, 0], [1 / 3, 0, 0]])
    np.testing.assert_array_equal(cache.max_c.share[:, :, 0, 0], np.full((2, 4), 0.25))  # all four channels tie


def test_state_dict_keys_and_shapes_are_timms():
    sd = CBAM(32, rng=0).state_dict()
    assert [(k, v.shape) for k, v in sd.items()] == [
        ("channel.fc1.weight", (2, 32, 1, 1)), ("channel.fc2.weight", (32, 2, 1, 1)),
        ("spatial.conv.conv.weight", (1, 2, 7, 7)), ("spatial.conv.bn.weight", (1,)), ("spatial.conv.bn.bias", (1,)),
        ("spatial.conv.bn.running_mean", (1,)), ("spatial.conv.bn.running_var", (1,)),
        ("spatial.conv.bn.num_batches_tracked", ())]
    assert CBAM(32, rng=0).parameter_names() == list(sd)[:5]


def test_state_dict_round_trip_and_training_updates_running_stats():
    rng = np.random.default_rng(8)
    a = randomize_state(CBAM(C, rd_channels=3, rng=0, dtype=np.float64), rng)
    b = CBAM(C, rd_channels=3, rng=1, dtype=np.float64)
    b.load_state_dict(a.state_dict())
    x = rng.standard_normal((2, C, 4, 3))
    np.testing.assert_array_equal(a.forward(x)[0], b.forward(x)[0])
    before = b.state_dict()
    b.forward(x, training=True)
    after = b.state_dict()
    assert int(after["spatial.conv.bn.num_batches_tracked"]) == int(before["spatial.conv.bn.num_batches_tracked"]) + 1
    assert not np.array_equal(after["spatial.conv.bn.running_mean"], before["spatial.conv.bn.running_mean"])


def test_batch_one_training_works_and_single_value_raises_like_pytorch():
    blk = CBAM(C, rd_channels=2, spatial_kernel_size=3, rng=0, dtype=np.float64)
    blk.forward(np.random.default_rng(0).standard_normal((1, C, 2, 3)), training=True)
    before = blk.state_dict()
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        blk.forward(np.ones((1, C, 1, 1)), training=True)
    assert all(np.array_equal(v, blk.state_dict()[k]) for k, v in before.items())
    blk.forward(np.ones((1, C, 1, 1)), training=False)  # eval is fine


def test_bad_arguments_and_inputs():
    with pytest.raises(ValueError, match="spatial_kernel_size must be odd"):
        CBAM(8, spatial_kernel_size=4)
    with pytest.raises(TypeError, match="rd_channels must be None or an int"):
        CBAM(8, rd_channels=2.0)
    blk = CBAM(8, rng=0)
    with pytest.raises(ValueError, match="x must have 8 channels"):
        blk.forward(np.zeros((2, 4, 3, 3), np.float32))
    with pytest.raises(ValueError, match="x must have 4 dimensions"):
        blk.forward(np.zeros((2, 8, 3), np.float32))
    _, cache = blk.forward(np.ones((2, 8, 3, 3), np.float32))
    with pytest.raises(TypeError, match="grad_out must have the same dtype"):
        blk.backward(np.ones((2, 8, 3, 3)), cache)


@pytest.mark.parametrize("shape", [(2, 16, 0, 3), (2, 16, 3, 0)])
def test_empty_image_raises_naming_x(shape):
    """H or W = 0: timm's CbamModule refuses it (amax over an empty axis); npattn raised
    the amax primitive's error. Now CBAM's own ValueError naming x."""
    with pytest.raises(ValueError, match=r"x must have H >= 1 and W >= 1") as info:
        CBAM(16, rd_channels=4, rng=0, dtype=np.float64).forward(np.zeros(shape))
    assert str(info.value).startswith("CBAM: x must") and str(shape) in str(info.value)


# ---------------------------------------------------------- the official code's options


def cbam_oracle_options(x, state, k, training, pool_types, mlp_bias, no_spatial, spatial_order, momentum, eps):
    """Plain NumPy / loops, written from the paper and the official code's ChannelGate and
    SpatialGate; returns y and the BN statistics after the call (None with no_spatial)."""
    n, c, h, w = x.shape
    w1, w2 = state["channel.fc1.weight"][:, :, 0, 0], state["channel.fc2.weight"][:, :, 0, 0]
    b1 = state["channel.fc1.bias"] if mlp_bias else np.zeros(w1.shape[0])
    b2 = state["channel.fc2.bias"] if mlp_bias else np.zeros(c)

    def pool(v, t):  # v: the H W values of one channel
        v = [float(a) for a in v.ravel()]
        if t == "avg":
            return sum(v) / len(v)
        if t == "max":
            return max(v)
        if t == "lp":
            return math.sqrt(sum(a * a for a in v))
        return math.log(sum(math.exp(a) for a in v))

    def mlp(v):
        hid = [max(sum(w1[j, i] * v[i] for i in range(c)) + b1[j], 0.0) for j in range(w1.shape[0])]
        return np.array([sum(w2[o, j] * hid[j] for j in range(len(hid))) + b2[o] for o in range(c)])

    x1 = np.zeros(x.shape)
    for a in range(n):
        z = sum(mlp([pool(x[a, ch], t) for ch in range(c)]) for t in pool_types)
        for ch in range(c):
            x1[a, ch] = x[a, ch] * sig(z[ch])
    if no_spatial:
        return x1, None
    p = np.zeros((n, 2, h, w))
    i_mean, i_max = (0, 1) if spatial_order == "avg_max" else (1, 0)
    for a in range(n):
        for i in range(h):
            for j in range(w):
                col = [x1[a, ch, i, j] for ch in range(c)]
                p[a, i_mean, i, j] = sum(col) / c
                p[a, i_max, i, j] = max(col)
    q = conv2d_loop(p, state["spatial.conv.conv.weight"], None, (k - 1) // 2, 1, 1)
    r, stats = batch_norm_loop(q, state, "spatial.conv.bn.", training, momentum=momentum, eps=eps)
    return x1 * sig(r), stats


OPTION_CONFIGS = [
    dict(mlp_bias=True, spatial_order="max_avg", max_grad="first", bn_momentum=0.01, rd_channels=3),  # official
    dict(pool_types=("avg", "max", "lp", "lse"), mlp_bias=True, spatial_kernel_size=3, rd_channels=2),
    dict(pool_types=["lse", "lp"], spatial_order="max_avg", bn_eps=1e-3, bn_momentum=0.5, spatial_kernel_size=5),
    dict(pool_types=("max",), no_spatial=True, mlp_bias=True, max_grad="first", rd_channels=4),
    dict(pool_types=("lp", "avg"), no_spatial=True, rd_ratio=0.25),
]


def _option_args(kw):
    return (kw.get("spatial_kernel_size", 7), tuple(kw.get("pool_types", ("avg", "max"))), kw.get("mlp_bias", False),
            kw.get("no_spatial", False), kw.get("spatial_order", "avg_max"), kw.get("bn_momentum", 0.1),
            kw.get("bn_eps", 1e-5))


@pytest.mark.parametrize("kwargs", OPTION_CONFIGS)
@pytest.mark.parametrize("training", [True, False])
def test_options_forward_and_running_stats_match_loop_oracle(kwargs, training):
    rng = np.random.default_rng(10)
    blk = randomize_state(CBAM(C, **kwargs, rng=11, dtype=np.float64), rng)
    state = blk.state_dict()
    for key in ("channel.fc1.bias", "channel.fc2.bias"):
        if key in state:
            state[key] = rng.normal(0, 0.5, state[key].shape)
    blk.load_state_dict(state)
    x = rng.standard_normal((2, C, 4, 5))
    k, pools, bias, no_spatial, order, momentum, eps = _option_args(kwargs)
    expected, stats = cbam_oracle_options(x, state, k, training, pools, bias, no_spatial, order, momentum, eps)
    y, _ = blk.forward(x, training=training)
    np.testing.assert_allclose(y, expected, rtol=1e-12, atol=1e-13)
    if stats is not None:
        apply_running(state, "spatial.conv.bn.", stats)
    for key, v in state.items():
        np.testing.assert_allclose(blk.state_dict()[key], v, rtol=1e-13, atol=1e-15, err_msg=key)


@pytest.mark.parametrize("kwargs, shape", [(kw, [(3, C, 5, 4), (1, C, 3, 6)][i % 2]) for i, kw in enumerate(OPTION_CONFIGS)]
                         + [(OPTION_CONFIGS[0], (1, C, 3, 6))])
@pytest.mark.parametrize("training", [True, False])
def test_options_gradients_every_input_and_parameter(kwargs, training, shape):
    rng = np.random.default_rng(12)
    blk = randomize_state(CBAM(C, **kwargs, rng=13, dtype=np.float64), rng)
    shift = np.sign(blk["channel.fc1.weight"][:, :, 0, 0].sum(axis=0))[None, :, None, None]
    x = rng.standard_normal(shape) + shift
    check_gradients(blk, [x], training=training)


def test_lp_pool_at_an_all_zero_channel_gradchecks():
    """An all-zero channel puts the L2 pool on its kink, where the gradient is 0 (torch's
    lp_pool2d's): that is also the central difference, so gradcheck holds."""
    rng = np.random.default_rng(14)
    blk = randomize_state(CBAM(C, rd_channels=3, pool_types=("lp", "avg"), mlp_bias=True, spatial_kernel_size=3,
                               rng=15, dtype=np.float64), rng)
    x = rng.standard_normal((2, C, 3, 4)) + 0.5
    x[1, 5] = 0.0
    _, cache = blk.forward(x, training=True)
    assert np.all(cache.pools[0][1].share[1, 5] == 0)
    for training in (True, False):
        check_gradients(blk, [x], training=training)


def test_max_grad_first_sends_tied_gradients_to_the_first_maximum():
    """Two spatial maxima per channel and two equal largest channels: "first" puts a share
    of 1 on the first in row-major order (gradcheck cannot see this at a tie: the central
    difference is the split; the torch cross-check covers it); "split" halves it."""
    rng = np.random.default_rng(16)
    kw = dict(rd_channels=3, spatial_kernel_size=3, mlp_bias=True)
    first = randomize_state(CBAM(C, max_grad="first", **kw, rng=17, dtype=np.float64), rng)
    split = CBAM(C, **kw, rng=0, dtype=np.float64)
    state = first.state_dict()
    state["channel.fc2.weight"][1] = state["channel.fc2.weight"][0]
    state["channel.fc2.bias"][1] = state["channel.fc2.bias"][0]
    first.load_state_dict(state)
    split.load_state_dict(state)
    x = rng.standard_normal((2, C, 3, 4))
    top = x.max(axis=(2, 3)) + 0.4
    x[:, :, 2, 0] = x[:, :, 0, 3] = top
    x[:, 0] += 8.0
    x[:, 1] = x[:, 0]
    _, cf = first.forward(x)
    _, cs = split.forward(x)
    assert np.all(cf.max_hw.share[:, :, 0, 3] == 1) and np.all(cf.max_hw.share[:, :, 2, 0] == 0)
    assert np.all(cs.max_hw.share[:, :, 0, 3] == 0.5) and np.all(cs.max_hw.share[:, :, 2, 0] == 0.5)
    tied = cf.max_c.share[:, 0] + cf.max_c.share[:, 1] == 1  # pixels where channels 0 and 1 hold the max
    assert tied.all() and np.all(cf.max_c.share[:, 0] == 1) and np.all(cs.max_c.share[:, 0] == 0.5)
    dy = rng.standard_normal(x.shape)
    (dxf,), gf = first.backward(dy, cf)
    (dxs,), gs = split.backward(dy, cs)
    # the rules differ from the maxima backwards: the spatial gate's gradients agree
    for key in ("spatial.conv.conv.weight", "spatial.conv.bn.weight", "spatial.conv.bn.bias"):
        np.testing.assert_allclose(gf[key], gs[key], rtol=1e-12, atol=1e-14, err_msg=key)
    assert not np.allclose(dxf, dxs) and not np.allclose(gf["channel.fc2.weight"], gs["channel.fc2.weight"])


def test_no_spatial_state_dict_and_option_errors():
    assert list(CBAM(8, rd_channels=2, no_spatial=True, mlp_bias=True, rng=0).state_dict()) == [
        "channel.fc1.weight", "channel.fc1.bias", "channel.fc2.weight", "channel.fc2.bias"]
    CBAM(8, rd_channels=2, no_spatial=True, rng=0).forward(np.ones((1, 8, 1, 1), np.float32), training=True)
    with pytest.raises(ValueError, match=r"pool_types must name pools among \('avg', 'max', 'lp', 'lse'\)"):
        CBAM(8, pool_types=("avg", "mean"))
    with pytest.raises(TypeError, match="pool_types must be a non-empty tuple or list"):
        CBAM(8, pool_types="avg")
    with pytest.raises(TypeError, match="pool_types must be a non-empty tuple or list"):
        CBAM(8, pool_types=())
    with pytest.raises(ValueError, match="spatial_order must be one of"):
        CBAM(8, spatial_order="mean_max")
    with pytest.raises(ValueError, match="CBAM: max_grad must be one of"):
        CBAM(8, max_grad="last")
    with pytest.raises(TypeError, match="mlp_bias must be a bool"):
        CBAM(8, mlp_bias=1)
    with pytest.raises(ValueError, match="bn_momentum must lie in"):
        CBAM(8, bn_momentum=1.5)
    with pytest.raises(ValueError, match="bn_eps must be positive"):
        CBAM(8, bn_eps=0.0)
