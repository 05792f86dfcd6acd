"""GlobalContext (timm's layout): forward against a loop oracle for every fusion and
pooling option, gradients of every input and parameter (training and eval), the exact
zero of conv_attn's bias, timm's initialisation, state_dict, errors."""

import math

import numpy as np
import pytest
from blocks_testlib import check_gradients

from npattn import GlobalContext

C = 9


def randomize_all(blk, rng):
    """Every floating array random (mlp_add.fc2.weight is zero-initialised, the LayerNorm
    affine is 1 / 0)."""
    state = {k: rng.normal(0.0, 0.5, v.shape) for k, v in blk.state_dict().items()}
    for k in state:
        if k.endswith("norm.weight"):
            state[k] = rng.uniform(0.5, 1.5, state[k].shape)
    blk.load_state_dict(state)
    return blk


def gc_oracle(x, s, use_attn, fuse_add, fuse_scale, ln_eps=1e-6):
    n, c, h, w = x.shape
    y = x.copy()
    for a in range(n):
        cols = x[a].reshape(c, h * w)
        if use_attn:
            logits = [sum(s["conv_attn.weight"][0, ch, 0, 0] * cols[ch, i] for ch in range(c)) + s["conv_attn.bias"][0]
                      for i in range(h * w)]
            top = max(logits)
            ex = [math.exp(v - top) for v in logits]
            p = [e / sum(ex) for e in ex]
            ctx = [sum(cols[ch, i] * p[i] for i in range(h * w)) for ch in range(c)]
        else:
            ctx = [sum(cols[ch]) / (h * w) for ch in range(c)]

        def mlp(prefix):
            w1 = s[prefix + "fc1.weight"][:, :, 0, 0]
            d = w1.shape[0]
            hid = [sum(w1[k, ch] * ctx[ch] for ch in range(c)) + s[prefix + "fc1.bias"][k] for k in range(d)]
            mu = sum(hid) / d
            var = sum((v - mu) ** 2 for v in hid) / d
            hid = [max((v - mu) / math.sqrt(var + ln_eps) * s[prefix + "norm.weight"][k] + s[prefix + "norm.bias"][k], 0.0)
                   for k, v in enumerate(hid)]
            w2 = s[prefix + "fc2.weight"][:, :, 0, 0]
            return [sum(w2[ch, k] * hid[k] for k in range(d)) + s[prefix + "fc2.bias"][ch] for ch in range(c)]

        if fuse_scale:
            o = mlp("mlp_scale.")
            for ch in range(c):
                y[a, ch] = y[a, ch] / (1 + math.exp(-o[ch]))
        if fuse_add:
            o = mlp("mlp_add.")
            for ch in range(c):
                y[a, ch] = y[a, ch] + o[ch]
    return y


CONFIGS = [
    {"rd_channels": 4},  # attention pooling, scale fusion (timm's defaults but the width)
    {"fuse_add": True, "fuse_scale": False, "rd_channels": 3},
    {"use_attn": False, "fuse_add": True, "rd_channels": 5},
    {"use_attn": True, "fuse_add": True, "rd_ratio": 0.5, "rd_divisor": 2},  # D = int(4.5 + 1) // 2 * 2 = 4
    {"init_last_zero": True, "rd_channels": 3},
]


@pytest.mark.parametrize("kwargs", CONFIGS)
def test_forward_matches_loop_oracle(kwargs):
    rng = np.random.default_rng(0)
    blk = randomize_all(GlobalContext(C, **kwargs, rng=1, dtype=np.float64), rng)
    x = rng.standard_normal((2, C, 4, 3))
    y, _ = blk.forward(x)
    np.testing.assert_allclose(y, gc_oracle(x, blk.state_dict(), blk.use_attn, blk.fuse_add, blk.fuse_scale),
                               rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("kwargs", CONFIGS)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shape", [(3, C, 5, 4), (1, C, 2, 7)])
def test_gradients_every_input_and_parameter(kwargs, training, shape):
    rng = np.random.default_rng(2)
    blk = randomize_all(GlobalContext(C, **kwargs, rng=3, dtype=np.float64), rng)
    x = rng.standard_normal(shape) * 1.5
    zero = ("conv_attn.bias",) if blk.use_attn else ()
    check_gradients(blk, [x], training=training, zero_keys=zero)
    if zero:
        y, cache = blk.forward(x, training=training)
        _, grads = blk.backward(rng.standard_normal(y.shape), cache)
        assert np.all(grads["conv_attn.bias"] == 0.0)  # exact: softmax ignores a common shift


def test_without_fusion_it_is_the_identity_with_zero_gradients():
    blk = randomize_all(GlobalContext(C, fuse_scale=False, rng=0, dtype=np.float64), np.random.default_rng(0))
    assert list(blk.state_dict()) == ["conv_attn.weight", "conv_attn.bias"]
    x = np.random.default_rng(1).standard_normal((2, C, 3, 3))
    y, cache = blk.forward(x)
    np.testing.assert_array_equal(y, x)
    (dx,), grads = blk.backward(2 * x, cache)
    np.testing.assert_array_equal(dx, 2 * x)
    assert all(np.all(g == 0.0) for g in grads.values())


def test_state_dict_keys_shapes_and_init_are_timms():
    blk = GlobalContext(32, fuse_add=True, rng=0)
    assert [(k, v.shape) for k, v in blk.state_dict().items()] == [
        ("conv_attn.weight", (1, 32, 1, 1)), ("conv_attn.bias", (1,)),
        ("mlp_add.fc1.weight", (4, 32, 1, 1)), ("mlp_add.fc1.bias", (4,)), ("mlp_add.norm.weight", (4,)),
        ("mlp_add.norm.bias", (4,)), ("mlp_add.fc2.weight", (32, 4, 1, 1)), ("mlp_add.fc2.bias", (32,)),
        ("mlp_scale.fc1.weight", (4, 32, 1, 1)), ("mlp_scale.fc1.bias", (4,)), ("mlp_scale.norm.weight", (4,)),
        ("mlp_scale.norm.bias", (4,)), ("mlp_scale.fc2.weight", (32, 4, 1, 1)), ("mlp_scale.fc2.bias", (32,))]
    assert np.all(blk["mlp_add.fc2.weight"] == 0) and np.any(blk["mlp_scale.fc2.weight"] != 0)
    assert np.all(blk["mlp_add.norm.weight"] == 1) and np.all(blk["mlp_add.norm.bias"] == 0)
    big = GlobalContext(4096, fuse_scale=False, rng=0, dtype=np.float64)["conv_attn.weight"]
    assert abs(big.std() - math.sqrt(2 / 4096)) < 0.05 * math.sqrt(2 / 4096)  # kaiming normal, fan_in
    assert list(GlobalContext(16, use_attn=False, rng=0).state_dict())[0] == "mlp_scale.fc1.weight"


def test_bad_arguments_and_inputs():
    with pytest.raises(ValueError, match="rd_channels must be None or >= 1"):
        GlobalContext(8, rd_channels=0)
    with pytest.raises(TypeError, match="use_attn must be a bool"):
        GlobalContext(8, use_attn=1)
    blk = GlobalContext(8, rng=0)
    with pytest.raises(ValueError, match="x must have 8 channels"):
        blk.forward(np.zeros((2, 4, 3, 3), np.float32))
    _, cache = blk.forward(np.ones((2, 8, 3, 3), np.float32))
    with pytest.raises(ValueError, match="grad_out must have shape"):
        blk.backward(np.ones((2, 8, 3, 2), np.float32), cache)


@pytest.mark.filterwarnings("ignore:Mean of empty slice:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:invalid value encountered in divide:RuntimeWarning")  # numpy: 0 / 0 in that mean
@pytest.mark.parametrize("shape", [(2, 16, 0, 3), (1, 16, 3, 0)])
def test_empty_image_as_timm(shape):
    """H or W = 0. With the mean context (use_attn=False) the backward raised
    ZeroDivisionError (1 / (H W)); timm's GlobalContext returns the empty output, an
    empty input gradient and NaN weight gradients (the context is the mean of nothing),
    as npattn now does. With the attention context timm's 1x1 conv_attn refuses an
    empty image (and a softmax over no positions is no distribution); npattn returned
    a context of 0 and now raises ValueError naming x."""
    blk = GlobalContext(16, use_attn=False, fuse_add=True, rd_channels=5, rng=0, dtype=np.float64)
    y, cache = blk.forward(np.zeros(shape))
    (dx,), grads = blk.backward(np.ones(shape), cache)
    assert y.shape == dx.shape == shape
    for k in ("mlp_scale.fc1.weight", "mlp_scale.fc2.weight", "mlp_add.fc1.weight", "mlp_add.fc2.weight"):
        assert np.isnan(grads[k]).all(), k
    with pytest.raises(ValueError, match=r"GlobalContext: x must have H >= 1 and W >= 1 .*got shape"):
        GlobalContext(16, rd_channels=4, rng=0, dtype=np.float64).forward(np.zeros(shape))


# ------------------------------------------------------ ln_eps, init="gcnet" (official)

GCNET = [  # the official ContextBlock's configurations: fusion ('channel_add',) / both, 'att' / 'avg'
    {"fuse_add": True, "fuse_scale": False, "rd_channels": 3, "ln_eps": 1e-5, "init": "gcnet"},
    {"use_attn": False, "fuse_add": True, "rd_channels": 2, "ln_eps": 1e-5, "init": "gcnet"},
    {"fuse_add": True, "rd_channels": 4, "ln_eps": 0.05},
]


@pytest.mark.parametrize("kwargs", GCNET)
def test_ln_eps_matches_loop_oracle(kwargs):
    rng = np.random.default_rng(7)
    blk = randomize_all(GlobalContext(C, **kwargs, rng=1, dtype=np.float64), rng)
    x = rng.standard_normal((2, C, 3, 5))
    y, _ = blk.forward(x)
    args = (blk.use_attn, blk.fuse_add, blk.fuse_scale)
    np.testing.assert_allclose(y, gc_oracle(x, blk.state_dict(), *args, ln_eps=kwargs["ln_eps"]), rtol=1e-12, atol=1e-13)
    assert np.max(np.abs(y - gc_oracle(x, blk.state_dict(), *args))) > 1e-9  # eps seen: the check can fail


@pytest.mark.parametrize("kwargs", GCNET[:2])
@pytest.mark.parametrize("training", [True, False])
def test_ln_eps_gradients(kwargs, training):
    rng = np.random.default_rng(8)
    blk = randomize_all(GlobalContext(C, **kwargs, rng=3, dtype=np.float64), rng)
    x = rng.standard_normal((3, C, 4, 3)) * 1.5
    check_gradients(blk, [x], training=training, zero_keys=("conv_attn.bias",) if blk.use_attn else ())


def test_gcnet_init_zeroes_the_last_conv_of_both_mlps():
    blk = GlobalContext(16, fuse_add=True, rd_channels=4, init="gcnet", rng=0, dtype=np.float64)
    timm_like = GlobalContext(16, fuse_add=True, rd_channels=4, rng=0, dtype=np.float64)
    for k in ("mlp_add.fc2.weight", "mlp_add.fc2.bias", "mlp_scale.fc2.weight", "mlp_scale.fc2.bias", "conv_attn.bias"):
        assert np.all(blk[k] == 0), k
    assert np.any(timm_like["mlp_scale.fc2.weight"] != 0) and np.any(timm_like["mlp_add.fc2.bias"] != 0)
    np.testing.assert_array_equal(blk["conv_attn.weight"], timm_like["conv_attn.weight"])  # both kaiming (fan_in)
    x = np.random.default_rng(0).standard_normal((2, 16, 3, 3))
    np.testing.assert_allclose(blk.forward(x)[0], 0.5 * x, rtol=1e-15)  # adds 0, gates by sigmoid(0)
    assert blk.ln_eps == 1e-6 and GlobalContext(8, ln_eps=1e-5).ln_eps == 1e-5
    with pytest.raises(ValueError, match="GlobalContext: init must be 'timm' or 'gcnet', got 'mmcv'"):
        GlobalContext(8, init="mmcv")
    with pytest.raises(ValueError, match="GlobalContext: ln_eps must be > 0"):
        GlobalContext(8, ln_eps=0.0)
