"""SKConv: forward and running statistics against a loop oracle written from the seed's
SelectiveConv, gradients by central differences (every input and parameter, training
and eval, 2 and 3 paths, groups 2 and 4), state_dict layout, errors."""

import math

import numpy as np
import pytest
from blocks_testlib import (
    apply_running,
    batch_norm_loop,
    check_gradients,
    conv2d_loop,
    randomize_state,
    relu,
    zero_grad_keys_before_batch_norm,
)

from npattn import SKConv

CONFIGS = [  # (in_channels, out_channels, groups, paths)
    (4, 8, 2, 2),
    (4, 8, 4, 3),
    (4, 8, 2, 3),
]


def make(cin, cout, groups, paths, seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    return randomize_state(SKConv(cin, cout, groups, paths=paths, rng=rng, dtype=dtype), rng)


def make_input(shape, seed=1):
    """Per-(sample, channel) offsets spread the pooled values, so that the squeeze's
    ReLUs are active on some samples and not on others."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal(shape) + rng.normal(0.0, 1.0, shape[:2] + (1, 1))


def sk_oracle(x, state, paths, groups, training, momentum=0.1, eps=1e-5):
    """SelectiveConv.forward by loops (biases absent: bias=False); returns the output and
    the state after it. ``momentum``, ``eps``: every BatchNorm's."""
    state = {k: np.array(v, dtype=np.float64) if v.dtype.kind == "f" else v.copy() for k, v in state.items()}
    n, _, h, w = x.shape
    feats = []
    for i in range(paths):
        c = conv2d_loop(x, state[f"convs.{i}.0.weight"], state.get(f"convs.{i}.0.bias"), 1 + i, 1 + i, groups)
        b, stats = batch_norm_loop(c, state, f"convs.{i}.1.", training, momentum, eps)
        apply_running(state, f"convs.{i}.1.", stats)
        feats.append(relu(b))
    c_out = feats[0].shape[1]
    fused = sum(feats)
    s = fused.reshape(n, c_out, h * w).mean(axis=2)  # (N, C)
    wc = state["compress.0.weight"]
    bc = state.get("compress.0.bias", np.zeros(wc.shape[0]))
    hc = np.array([[sum(wc[k, ch] * s[a, ch] for ch in range(c_out)) + bc[k] for k in range(wc.shape[0])] for a in range(n)])
    hb, stats = batch_norm_loop(hc, state, "compress.1.", training, momentum, eps)
    apply_running(state, "compress.1.", stats)
    z = relu(hb)
    y = np.zeros_like(feats[0])
    for a in range(n):
        for ch in range(c_out):
            logits = []
            for i in range(paths):
                wp = state[f"projections.{i}.weight"][:, :, 0, 0]
                bp = state.get(f"projections.{i}.bias", np.zeros(wp.shape[0]))
                logits.append(sum(wp[ch, k] * z[a, k] for k in range(z.shape[1])) + bp[ch])
            top = max(logits)
            e = [math.exp(v - top) for v in logits]
            att = [v / sum(e) for v in e]
            y[a, ch] = sum(att[i] * feats[i][a, ch] for i in range(paths))
    return y, state


@pytest.mark.parametrize("cin,cout,groups,paths", CONFIGS[:2])
@pytest.mark.parametrize("training", [False, True])
def test_forward_and_running_statistics_match_loop_oracle(cin, cout, groups, paths, training):
    blk = make(cin, cout, groups, paths)
    x = make_input((3, cin, 4, 5))
    expected, state_after = sk_oracle(x, blk.state_dict(), paths, groups, training)
    y, _ = blk.forward(x, training=training)
    np.testing.assert_allclose(y, expected, rtol=1e-12, atol=1e-13)
    got = blk.state_dict()
    for k, v in state_after.items():
        if v.dtype.kind == "f":
            np.testing.assert_allclose(got[k], v, rtol=1e-12, atol=1e-14, err_msg=k)
        else:
            assert got[k] == v, k


@pytest.mark.parametrize("cin,cout,groups,paths", CONFIGS)
@pytest.mark.parametrize("training", [False, True])
def test_gradients_every_input_and_parameter(cin, cout, groups, paths, training):
    blk = make(cin, cout, groups, paths, seed=2)
    check_gradients(blk, [make_input((3, cin, 4, 5), seed=3)], training=training,
                    zero_keys=zero_grad_keys_before_batch_norm(blk, training))


def test_gradients_batch_one_in_eval():
    blk = make(4, 8, 2, 2, seed=4)
    state = blk.state_dict()  # one sample: keep the squeeze's ReLUs active, or they check nothing
    state["compress.1.bias"] = state["compress.1.bias"] + 1.0
    blk.load_state_dict(state)
    check_gradients(blk, [make_input((1, 4, 3, 5), seed=5)], training=False)


def test_reduced_dim_and_state_dict_layout():
    assert SKConv(4, 8, 2).reduced_dim == 32  # max(8 // 16, 32)
    assert SKConv(64, 1024, 32).reduced_dim == 64
    sd = SKConv(6, 12, 3, ratio=4, paths=3, rng=0).state_dict()
    expected = []
    for i in range(3):
        expected += [f"convs.{i}.0.weight", f"convs.{i}.0.bias"]
        expected += [f"convs.{i}.1.{n}" for n in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")]
    expected += ["compress.0.weight", "compress.0.bias"]
    expected += [f"compress.1.{n}" for n in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")]
    for i in range(3):
        expected += [f"projections.{i}.weight", f"projections.{i}.bias"]
    assert list(sd) == expected
    assert sd["convs.2.0.weight"].shape == (12, 2, 3, 3)
    assert sd["compress.0.weight"].shape == (32, 12)
    assert sd["compress.1.running_mean"].shape == (32,)
    assert sd["projections.1.weight"].shape == (12, 32, 1, 1)
    assert sd["projections.1.bias"].shape == (12,)
    bound = 1 / math.sqrt(2 * 9)
    assert np.all(np.abs(sd["convs.0.0.weight"]) <= bound)


def test_one_path_is_conv_bn_relu():
    """With one path the softmax is 1: the output is the path's features."""
    blk = make(4, 8, 2, 1)
    x = make_input((2, 4, 3, 5))
    state = blk.state_dict()
    c = conv2d_loop(x, state["convs.0.0.weight"], state["convs.0.0.bias"], 1, 1, 2)
    expected = relu(batch_norm_loop(c, state, "convs.0.1.", False)[0])
    np.testing.assert_allclose(blk.forward(x)[0], expected, rtol=1e-12, atol=1e-13)


def test_training_with_batch_one_raises_like_pytorch_and_touches_nothing():
    blk = make(4, 8, 2, 2)
    before = blk.state_dict()
    with pytest.raises(ValueError, match=r"Expected more than 1 value per channel when training, got input size \(1, 32\)"):
        blk.forward(make_input((1, 4, 3, 3)), training=True)
    for k, v in blk.state_dict().items():
        np.testing.assert_array_equal(v, before[k])


def test_float32_in_float32_out():
    blk = make(4, 8, 2, 2, dtype=np.float32)
    x = make_input((2, 4, 5, 3)).astype(np.float32)
    y, cache = blk.forward(x, training=True)
    (dx,), grads = blk.backward(np.ones_like(y), cache)
    assert y.dtype == dx.dtype == np.float32 and all(g.dtype == np.float32 for g in grads.values())
    y64, _ = make(4, 8, 2, 2).forward(x.astype(np.float64), training=True)
    np.testing.assert_allclose(y, y64, rtol=1e-4, atol=1e-5)


def test_errors():
    with pytest.raises(ValueError, match="groups must divide"):
        SKConv(4, 6, 4)
    with pytest.raises(ValueError, match="paths must be >= 1"):
        SKConv(4, 8, 2, paths=0)
    blk = SKConv(4, 8, 2, rng=0)
    with pytest.raises(ValueError, match="x must have 4 channels"):
        blk.forward(np.zeros((2, 8, 5, 5), np.float32))
    with pytest.raises(ValueError, match="x must have 4 dimensions"):
        blk.forward(np.zeros((4, 5, 5), np.float32))
    with pytest.raises(TypeError, match="float32 or float64"):
        blk.forward(np.zeros((2, 4, 5, 5), np.uint8))
    y, cache = blk.forward(np.ones((2, 4, 5, 5), np.float32))
    with pytest.raises(ValueError, match="grad_out must have shape"):
        blk.backward(np.ones((2, 4, 5, 5), np.float32), cache)


def test_eval_with_batch_zero():
    """An empty batch in eval mode: the backward raised "cannot reshape array of size 0
    into shape (0,newaxis)" (a reshape with -1; found by tests/fuzz). The output and the
    input gradient are empty, every parameter gradient is 0."""
    blk = SKConv(2, 2, 1, rng=0, dtype=np.float64)
    x = np.zeros((0, 2, 3, 4))
    y, cache = blk.forward(x, training=False)
    assert y.shape == (0, 2, 3, 4)
    (dx,), grads = blk.backward(np.zeros(y.shape), cache)
    assert dx.shape == x.shape
    assert sorted(grads) == sorted(blk.parameter_names())
    for k, g in grads.items():
        np.testing.assert_array_equal(g, np.zeros_like(blk[k]), err_msg=k)


@pytest.mark.parametrize("shape", [(2, 4, 0, 3), (2, 4, 3, 0)])
def test_empty_image_raises_naming_x(shape):
    """H or W = 0: PyTorch's SKConv refuses it in its 3x3 path convolutions; npattn
    raised conv2d's "output height would be 0", naming no argument of the block (and the
    forward then held 1 / (H W)). Now a ValueError naming x."""
    with pytest.raises(ValueError, match=r"x must have H >= 1 and W >= 1") as info:
        SKConv(4, 4, 2, rng=0, dtype=np.float64).forward(np.zeros(shape))
    assert str(info.value).startswith("SKConv: x must") and str(shape) in str(info.value)


# ------------------------------------------------------ bias=False, BatchNorm settings

@pytest.mark.parametrize("training", [False, True])
def test_no_bias_and_bn_settings_match_loop_oracle(training):
    """bias=False (the authors' Caffe release) with the Caffe BatchNorm momentum 0.05 and
    eps 1e-3: the output and the running statistics after a step as the oracle's."""
    rng = np.random.default_rng(5)
    blk = randomize_state(SKConv(4, 6, 2, paths=2, bias=False, bn_momentum=0.05, bn_eps=1e-3, rng=rng,
                                 dtype=np.float64), rng)
    assert not [k for k in blk.state_dict() if k.endswith(".bias") and not k.endswith(("1.bias"))]
    assert (blk.bn_momentum, blk.bn_eps) == (0.05, 1e-3)
    x = make_input((3, 4, 5, 4), seed=6)
    expected, state_after = sk_oracle(x, blk.state_dict(), 2, 2, training, momentum=0.05, eps=1e-3)
    y, _ = blk.forward(x, training=training)
    np.testing.assert_allclose(y, expected, rtol=1e-12, atol=1e-13)
    for k, v in state_after.items():
        np.testing.assert_allclose(blk[k], v, rtol=1e-12, atol=1e-14, err_msg=k)
    default, _ = sk_oracle(x, state_after, 2, 2, False)
    assert np.max(np.abs(default - blk.forward(x)[0])) > 1e-6  # eps matters here: the check can fail


@pytest.mark.parametrize("training", [False, True])
def test_no_bias_gradients_every_input_and_parameter(training, paths=3):
    rng = np.random.default_rng(7)
    blk = randomize_state(SKConv(4, 8, 4, paths=paths, bias=False, bn_momentum=0.3, bn_eps=0.01, rng=rng,
                                 dtype=np.float64), rng)
    check_gradients(blk, [make_input((3, 4, 5, 3), seed=8)], training=training,
                    zero_keys=zero_grad_keys_before_batch_norm(blk, training))


def test_bias_and_bn_settings_are_checked():
    with pytest.raises(TypeError, match="SKConv: bias must be a bool"):
        SKConv(4, 4, 2, bias=1)
    with pytest.raises(ValueError, match="SKConv: bn_momentum must lie in"):
        SKConv(4, 4, 2, bn_momentum=1.5)
    with pytest.raises(ValueError, match="SKConv: bn_eps must be positive"):
        SKConv(4, 4, 2, bn_eps=0.0)
    assert list(SKConv(4, 4, 2, bias=False, rng=0).state_dict())[:2] == ["convs.0.0.weight", "convs.0.1.weight"]
