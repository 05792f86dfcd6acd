"""DAF, MS_CAM, AFF, iAFF: forward and running statistics against a loop oracle written
from the seed's PyTorch code, gradients by central differences (every input and
parameter, training and eval), the iAFF sharing quirk, state_dict layout, errors."""

import numpy as np
import pytest
from blocks_testlib import (
    apply_running,
    batch_norm_loop,
    check_gradients,
    conv2d_loop,
    mean_hw,
    randomize_state,
    relu,
    sigmoid,
    zero_grad_keys_before_batch_norm,
)

from npattn import AFF, DAF, MS_CAM, iAFF

SHAPE = (3, 8, 4, 5)  # batch 3, non-square maps; channels 8, r 4 -> inter channels 2


def make(kind, dtype=np.float64, seed=0):
    rng = np.random.default_rng(seed)
    if kind == "MS_CAM":
        blk = MS_CAM(8, 4, rng=rng, dtype=dtype)
    elif kind == "AFF":
        blk = AFF(8, 4, rng=rng, dtype=dtype)
    elif kind == "iAFF":
        blk = iAFF(8, 4, rng=rng, dtype=dtype)
    else:
        blk = iAFF(8, 4, share_global_att=False, rng=rng, dtype=dtype)
    return randomize_state(blk, rng)


def inputs(kind, shape=SHAPE, seed=1):
    """Maps with a per-(sample, channel) offset, so that the pooled values of the global
    branch differ enough for its ReLUs to be active on some samples and not others."""
    rng = np.random.default_rng(seed)
    n, c = shape[:2]
    return [rng.standard_normal(shape) + rng.normal(0.0, 1.5, (n, c, 1, 1)) for _ in range(1 if kind == "MS_CAM" else 2)]


KINDS = ["MS_CAM", "AFF", "iAFF", "iAFF_unshared"]


# --------------------------------------------------------------------------- oracle


def conv1x1(x, state, prefix):
    return conv2d_loop(x, state[prefix + "weight"], state[prefix + "bias"], 0, 1, 1)


def bn(x, state, prefix, training, bn_args=(0.1, 1e-5)):
    y, stats = batch_norm_loop(x, state, prefix, training, *bn_args)
    apply_running(state, prefix, stats)
    return y


def ms_cam_logits(xa, state, local, glob, training, bn_args=(0.1, 1e-5)):
    """local_att(xa) + global_att(xa), the seed's two Sequentials, updating ``state``."""
    t = conv1x1(xa, state, local + "0.")
    t = relu(bn(t, state, local + "1.", training, bn_args))
    t = conv1x1(t, state, local + "3.")
    xl = bn(t, state, local + "4.", training, bn_args)
    g = conv1x1(mean_hw(xa), state, glob + "1.")
    g = relu(bn(g, state, glob + "2.", training, bn_args))
    g = conv1x1(g, state, glob + "4.")
    xg = bn(g, state, glob + "5.", training, bn_args)
    return xl + xg


def oracle(kind, xs, state, training, bn_args=(0.1, 1e-5)):
    """The seed's forward; returns the output and the state after it. ``bn_args``: the
    (momentum, eps) of every BatchNorm."""
    state = {k: np.array(v, dtype=np.float64) if v.dtype.kind == "f" else v.copy() for k, v in state.items()}
    sig = np.vectorize(sigmoid)
    if kind == "MS_CAM":
        (x,) = xs
        wei = sig(ms_cam_logits(x, state, "local_att.", "global_att.", training, bn_args))
        return x * wei, state
    x, res = xs
    wei = sig(ms_cam_logits(x + res, state, "local_att.", "global_att.", training, bn_args))
    if kind == "AFF":
        return 2 * x * wei + 2 * res * (1 - wei), state
    xi = x * wei + res * (1 - wei)
    glob2 = "global_att." if kind == "iAFF" else "global_att2."
    wei2 = sig(ms_cam_logits(xi, state, "local_att2.", glob2, training, bn_args))
    return x * wei2 + res * (1 - wei2), state


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("training", [False, True])
def test_forward_and_running_statistics_match_loop_oracle(kind, training):
    blk = make(kind)
    xs = inputs(kind)
    expected, state_after = oracle(kind, xs, blk.state_dict(), training)
    y, _ = blk.forward(*xs, training=training)
    np.testing.assert_allclose(y, expected, rtol=1e-12, atol=1e-13)
    got = blk.state_dict()
    assert list(got) == list(state_after)
    for k, v in state_after.items():
        if v.dtype.kind == "f":
            np.testing.assert_allclose(got[k], v, rtol=1e-12, atol=1e-14, err_msg=k)
        else:
            assert got[k] == v, k


def test_fusion_of_equal_maps_is_hand_computable():
    """x == res: AFF gives 2 x (its weights sum to 2), iAFF gives x, whatever the gates."""
    x = np.random.default_rng(0).standard_normal(SHAPE)
    np.testing.assert_array_equal(make("AFF").forward(x, x.copy())[0], 2 * x)
    np.testing.assert_array_equal(make("iAFF").forward(x, x.copy())[0], x)
    np.testing.assert_array_equal(DAF().forward(x, x)[0], 2 * x)


# ------------------------------------------------------------------------ gradients


def zero_keys(blk, kind, training):
    keys = list(zero_grad_keys_before_batch_norm(blk, training))
    if kind == "iAFF":  # the published code never uses global_att2
        keys += [k for k in blk.parameter_names() if k.startswith("global_att2.")]
    return keys


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("training", [False, True])
def test_gradients_every_input_and_parameter(kind, training):
    blk = make(kind)
    check_gradients(blk, inputs(kind), training=training, zero_keys=zero_keys(blk, kind, training))


@pytest.mark.parametrize("kind", KINDS)
def test_gradients_batch_one_in_eval(kind):
    blk = make(kind, seed=3)
    state = blk.state_dict()  # one sample: keep the global branches' ReLUs active, or they check nothing
    for k in ("global_att.2.bias", "global_att2.2.bias"):
        if k in state:
            state[k] = state[k] + 1.0
    blk.load_state_dict(state)
    check_gradients(blk, inputs(kind, (1, 8, 3, 2), seed=4), training=False, zero_keys=zero_keys(blk, kind, False))


def test_daf_gradients():
    check_gradients(DAF(dtype=np.float64), inputs("DAF", (2, 3, 4, 2)), training=True)


# --------------------------------------------------------------------- iAFF sharing


def test_iaff_share_flag_selects_the_second_global_branch():
    xs = inputs("iAFF")
    shared, unshared = make("iAFF"), make("iAFF_unshared")
    unshared.load_state_dict(shared.state_dict())
    before = shared.state_dict()
    y_s, c_s = shared.forward(*xs, training=True)
    y_u, c_u = unshared.forward(*xs, training=True)
    assert not np.allclose(y_s, y_u)
    after_s, after_u = shared.state_dict(), unshared.state_dict()
    for bnk in ("global_att.2.", "global_att.5."):
        assert after_s[bnk + "num_batches_tracked"] == before[bnk + "num_batches_tracked"] + 2
        assert after_u[bnk + "num_batches_tracked"] == before[bnk + "num_batches_tracked"] + 1
    for bnk in ("global_att2.2.", "global_att2.5."):
        for buf in ("running_mean", "running_var", "num_batches_tracked"):
            np.testing.assert_array_equal(after_s[bnk + buf], before[bnk + buf])
        assert after_u[bnk + "num_batches_tracked"] == before[bnk + "num_batches_tracked"] + 1
    dy = np.random.default_rng(5).standard_normal(y_s.shape)
    _, g_s = shared.backward(dy, c_s)
    _, g_u = unshared.backward(dy, c_u)
    assert set(g_s) == set(shared.parameter_names())
    # a bias in front of a training-mode BatchNorm has a gradient that is identically 0
    # in both variants: the backward returns exact zeros there
    zero_anyway = set(zero_grad_keys_before_batch_norm(unshared, training=True))
    for k in shared.parameter_names():
        if k.startswith("global_att2."):
            assert np.all(g_s[k] == 0), k
            if k in zero_anyway:
                assert np.all(g_u[k] == 0), k
            else:
                assert np.any(g_u[k] != 0), k


# ------------------------------------------------------------------ errors, layout


@pytest.mark.parametrize("kind", ["MS_CAM", "AFF", "iAFF"])
def test_training_with_batch_one_raises_like_pytorch_and_touches_nothing(kind):
    blk = make(kind)
    before = blk.state_dict()
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        blk.forward(*inputs(kind, (1, 8, 3, 3)), training=True)
    after = blk.state_dict()
    for k in before:
        np.testing.assert_array_equal(after[k], before[k])
    blk.forward(*inputs(kind, (1, 8, 3, 3)), training=False)  # eval is fine


def test_bad_inputs_raise_naming_the_argument():
    blk = AFF(8, 4, rng=0)
    x = np.zeros((2, 8, 3, 3), np.float32)
    with pytest.raises(ValueError, match="x must have 4 dimensions"):
        blk.forward(x[0], x[0])
    with pytest.raises(ValueError, match="residual must have 8 channels"):
        blk.forward(x, np.zeros((2, 6, 3, 3), np.float32))
    with pytest.raises(ValueError, match="residual must have the shape of x"):
        blk.forward(x, np.zeros((2, 8, 3, 4), np.float32))
    with pytest.raises(TypeError, match="residual has dtype float64"):
        blk.forward(x, np.zeros((2, 8, 3, 3)))
    with pytest.raises(TypeError, match="x must have dtype float32 or float64"):
        blk.forward(x.astype(np.int16), x)
    with pytest.raises(ValueError, match="x must have 8 channels"):
        MS_CAM(8, 4, rng=0).forward(np.zeros((2, 4, 3, 3), np.float32))
    with pytest.raises(ValueError, match="residual must have the shape of x"):
        iAFF(8, 4, rng=0).forward(x, np.zeros((3, 8, 3, 3), np.float32))
    with pytest.raises(ValueError, match="residual must have the shape of x"):
        DAF().forward(x, np.zeros((2, 8, 3, 4), np.float32))
    with pytest.raises(TypeError, match="residual must have the same dtype as x"):
        DAF().forward(x, np.zeros((2, 8, 3, 3)))
    with pytest.raises(ValueError, match="r must be at most channels"):
        AFF(4, 8)
    y, cache = blk.forward(x, x)
    with pytest.raises(ValueError, match="grad_out must have shape"):
        blk.backward(np.zeros((2, 8, 3, 2), np.float32), cache)
    with pytest.raises(TypeError, match="grad_out must have the forward input's dtype"):
        blk.backward(np.zeros((2, 8, 3, 3)), cache)


def seq_keys(prefix, modules):
    """Keys of a Sequential: conv -> weight, bias; bn -> the five BatchNorm entries."""
    out = []
    for idx, kind in modules:
        if kind == "conv":
            out += [f"{prefix}{idx}.weight", f"{prefix}{idx}.bias"]
        else:
            out += [f"{prefix}{idx}.{n}" for n in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")]
    return out


LOCAL = [(0, "conv"), (1, "bn"), (3, "conv"), (4, "bn")]
GLOBAL = [(1, "conv"), (2, "bn"), (4, "conv"), (5, "bn")]


def test_state_dict_keys_shapes_and_order():
    expected = seq_keys("local_att.", LOCAL) + seq_keys("global_att.", GLOBAL)
    for cls in (AFF, MS_CAM):
        sd = cls(64, 4, rng=0).state_dict()
        assert list(sd) == expected
        assert sd["local_att.0.weight"].shape == (16, 64, 1, 1)
        assert sd["local_att.3.weight"].shape == (64, 16, 1, 1)
        assert sd["global_att.2.running_var"].shape == (16,)
        assert sd["global_att.5.num_batches_tracked"].shape == () and sd["global_att.5.num_batches_tracked"].dtype == np.int64
    sd = iAFF(64, 4, rng=0).state_dict()
    assert list(sd) == expected + seq_keys("local_att2.", LOCAL) + seq_keys("global_att2.", GLOBAL)
    assert DAF().state_dict() == {}


def test_load_state_dict_is_strict_and_names_the_key():
    blk = AFF(8, 4, rng=0)
    sd = blk.state_dict()
    missing = {k: v for k, v in sd.items() if k != "global_att.5.running_var"}
    with pytest.raises(KeyError, match="global_att.5.running_var"):
        blk.load_state_dict(missing)
    with pytest.raises(KeyError, match="extra.weight"):
        blk.load_state_dict({**sd, "extra.weight": np.zeros(1)})
    with pytest.raises(ValueError, match="local_att.0.weight"):
        blk.load_state_dict({**sd, "local_att.0.weight": np.zeros((2, 8))})


def test_forward_twice_then_backward_of_the_first_cache():
    blk = make("AFF")
    xs = inputs("AFF")
    dy = np.random.default_rng(9).standard_normal(SHAPE)
    state = blk.state_dict()
    y1, c1 = blk.forward(*xs, training=True)
    ref = blk.backward(dy, c1)
    blk.load_state_dict(state)
    y1b, c1b = blk.forward(*xs, training=True)
    blk.forward(*inputs("AFF", seed=7), training=True)  # moves the running statistics again
    got = blk.backward(dy, c1b)
    np.testing.assert_array_equal(y1, y1b)
    for a, b in zip(ref[0], got[0]):
        np.testing.assert_array_equal(a, b)
    for k in ref[1]:
        np.testing.assert_array_equal(ref[1][k], got[1][k])


@pytest.mark.parametrize("kind", KINDS)
def test_float32_in_float32_out(kind):
    blk64 = make(kind)
    blk32 = make(kind, dtype=np.float32)
    xs = [x.astype(np.float32) for x in inputs(kind)]
    y, cache = blk32.forward(*xs, training=True)
    in_grads, grads = blk32.backward(np.ones_like(y), cache)
    assert y.dtype == np.float32
    assert all(g.dtype == np.float32 for g in in_grads) and all(g.dtype == np.float32 for g in grads.values())
    y64, _ = blk64.forward(*[x.astype(np.float64) for x in xs], training=True)
    np.testing.assert_allclose(y, y64, rtol=1e-4, atol=1e-5)


def test_daf_forward_backward():
    x, r = inputs("DAF", (2, 3, 4, 2))
    y, cache = DAF(dtype=np.float64).forward(x, r)
    np.testing.assert_array_equal(y, x + r)
    dy = np.random.default_rng(0).standard_normal(y.shape)
    (dx, dr), grads = DAF().backward(dy, cache)
    np.testing.assert_array_equal(dx, dy)
    np.testing.assert_array_equal(dr, dy)
    assert grads == {} and dx is not dr and dx is not dy


@pytest.mark.parametrize("make, n_inputs", [(lambda: MS_CAM(4, 2, rng=0, dtype=np.float64), 1),
                                            (lambda: AFF(4, 2, rng=0, dtype=np.float64), 2),
                                            (lambda: iAFF(4, 2, rng=0, dtype=np.float64), 2)])
@pytest.mark.parametrize("shape", [(2, 4, 0, 3), (2, 4, 3, 0)])
def test_empty_image_raises_naming_x(make, n_inputs, shape):
    """H or W = 0: PyTorch's module (tools/torch_ref_blocks.py) refuses it in the local
    branch's 1x1 convolution; npattn raised conv2d's "output height would be 0", naming
    no argument of the block (and its backward held 1 / (H W)). Now a ValueError naming x."""
    blk = make()
    for training in (False, True):
        with pytest.raises(ValueError, match=r"x must have H >= 1 and W >= 1") as info:
            blk.forward(*[np.zeros(shape)] * n_inputs, training=training)
        assert str(info.value).startswith(f"{type(blk).__name__}: x must") and str(shape) in str(info.value)


# ------------------------------------------------------------------- BatchNorm settings

BN_ARGS = (0.3, 0.02)  # momentum, eps: far enough from PyTorch's defaults to be seen


def make_bn(kind, seed=0):
    rng = np.random.default_rng(seed)
    cls = {"MS_CAM": MS_CAM, "AFF": AFF, "iAFF": iAFF}[kind]
    blk = cls(8, 4, bn_momentum=BN_ARGS[0], bn_eps=BN_ARGS[1], rng=rng, dtype=np.float64)
    return randomize_state(blk, rng)


@pytest.mark.parametrize("kind", ["MS_CAM", "AFF", "iAFF"])
@pytest.mark.parametrize("training", [False, True])
def test_bn_settings_match_loop_oracle(kind, training):
    """bn_momentum / bn_eps reach every BatchNorm: the output and the running statistics
    after a step as the oracle's with those settings (iAFF's shared global_att: twice)."""
    blk = make_bn(kind)
    xs = inputs(kind)
    state0 = blk.state_dict()
    expected, state_after = oracle(kind, xs, state0, training, BN_ARGS)
    y, _ = blk.forward(*xs, training=training)
    np.testing.assert_allclose(y, expected, rtol=1e-12, atol=1e-13)
    for k, v in state_after.items():
        np.testing.assert_allclose(blk[k], v, rtol=1e-12, atol=1e-14, err_msg=k)
    default, default_after = oracle(kind, xs, state0, training)
    assert np.max(np.abs(default - y)) > 1e-6  # the settings change the numbers: the check can fail
    if training:
        assert np.max(np.abs(default_after["local_att.1.running_mean"] - blk["local_att.1.running_mean"])) > 1e-6


@pytest.mark.parametrize("kind, training", [("MS_CAM", False), ("AFF", True), ("AFF", False), ("iAFF", True)])
def test_bn_settings_gradients(kind, training):
    blk = make_bn(kind, seed=3)
    check_gradients(blk, inputs(kind, shape=(3, 8, 3, 5), seed=4), training=training,
                    zero_keys=zero_keys(blk, kind, training))
