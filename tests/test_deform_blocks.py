"""DeformConv2d and ModulatedDeformConv2dPack blocks: state, initialisation, forward
against the functional op / conv2d, finite-difference gradients of every input and
parameter, argument checks."""

import numpy as np
import pytest

import npattn
from npattn import functional as F
from npattn.gradcheck import gradcheck_block

BACKEND = "numpy"


def away_from_integers(rng, lo, hi, shape, margin=0.05):
    v = rng.uniform(lo, hi, shape)
    f = v - np.floor(v)
    return np.floor(v) + np.clip(f, margin, 1 - margin)


@pytest.fixture
def rng():
    return np.random.default_rng(5)


# ---- DeformConv2d -------------------------------------------------------------------


def test_deform_conv2d_state_and_init():
    blk = npattn.DeformConv2d(6, 4, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(2, 1), groups=2, rng=0)
    assert list(blk.state_dict()) == ["weight", "bias"]
    assert blk["weight"].shape == (4, 3, 3, 2) and blk["bias"].shape == (4,)
    bound = 1 / np.sqrt(3 * 3 * 2)  # fan_in = in / groups * kh * kw
    assert np.all(np.abs(blk["weight"]) <= bound) and np.all(np.abs(blk["bias"]) <= bound)
    assert np.abs(blk["weight"]).max() > 0.8 * bound
    assert list(npattn.DeformConv2d(2, 2, 3, bias=False).state_dict()) == ["weight"]


def test_deform_conv2d_block_is_the_op(rng):
    blk = npattn.DeformConv2d(6, 4, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(2, 1), groups=2, rng=1, dtype=np.float64, backend=BACKEND)
    x = rng.standard_normal((2, 6, 7, 6))
    offset = rng.uniform(-2, 2, (2, 36, 3, 5))
    mask = rng.uniform(0, 1, (2, 18, 3, 5))
    y, cache = blk.forward(x, offset, mask)
    ref = F.deform_conv2d(x, offset, blk["weight"], blk["bias"], (2, 1), (1, 0), (2, 1), mask, backend=BACKEND)
    np.testing.assert_array_equal(y, ref)
    inputs, params = blk.backward(np.ones_like(y), cache)
    assert len(inputs) == 3 and set(params) == {"weight", "bias"}
    _, cache = blk.forward(x, offset)
    assert len(blk.backward(np.ones_like(y), cache)[0]) == 2


@pytest.mark.parametrize("batch", [1, 3])
def test_deform_conv2d_block_gradcheck(rng, batch):
    blk = npattn.DeformConv2d(6, 4, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(2, 1), groups=2, rng=2, dtype=np.float64, backend=BACKEND)
    h, w, oh, ow = 7, 6, 3, 5
    # every sample inside the image, >= 0.05 from integers: offset = target - base position
    i = np.arange(3).repeat(2)[:, None, None]
    j = np.tile(np.arange(2), 3)[:, None, None]
    base_y = np.arange(oh)[None, :, None] * 2 - 1 + i * 2
    base_x = np.arange(ow)[None, None, :] + j
    shape = (batch, 3, 6, oh, ow)
    off = np.stack([away_from_integers(rng, 0, h - 1, shape) - base_y, away_from_integers(rng, 0, w - 1, shape) - base_x], axis=3)
    offset = off.reshape(batch, 36, oh, ow)
    x = rng.standard_normal((batch, 6, h, w))
    mask = rng.uniform(0, 1, (batch, 18, oh, ow))
    report = gradcheck_block(blk, (x, offset, mask))
    assert {t.name for t in report.tensors} == {"input.0", "input.1", "input.2", "param.weight", "param.bias"}
    assert report.ok and report.max_rel_err < 1e-8, str(report)


def test_deform_conv2d_block_checks():
    with pytest.raises(ValueError, match="in_channels must be divisible by groups, got in_channels=5, groups=2"):
        npattn.DeformConv2d(5, 4, 3, groups=2)
    with pytest.raises(ValueError, match="out_channels must be divisible by groups, got out_channels=3, groups=2"):
        npattn.DeformConv2d(4, 3, 3, groups=2)
    with pytest.raises(TypeError, match="kernel_size must be an int or a pair of ints"):
        npattn.DeformConv2d(4, 4, 2.5)
    blk = npattn.DeformConv2d(4, 4, 3)
    with pytest.raises(ValueError, match=r"DeformConv2d: x must have 4 channels, got shape \(1, 3, 5, 5\)"):
        blk.forward(np.zeros((1, 3, 5, 5), dtype=np.float32), np.zeros((1, 18, 3, 3), dtype=np.float32))
    with pytest.raises(ValueError, match=r"offset must have shape \(1, 18, 3, 3\)"):
        blk.forward(np.zeros((1, 4, 5, 5), dtype=np.float32), np.zeros((1, 18, 5, 5), dtype=np.float32))


# ---- ModulatedDeformConv2dPack ------------------------------------------------------


def test_dcnv2_pack_state_and_init():
    blk = npattn.ModulatedDeformConv2dPack(6, 4, (3, 2), groups=2, deform_groups=3, rng=0)
    assert list(blk.state_dict()) == ["weight", "bias", "conv_offset.weight", "conv_offset.bias"]
    assert blk["weight"].shape == (4, 3, 3, 2)
    assert blk["conv_offset.weight"].shape == (3 * 3 * 6, 6, 3, 2) and blk["conv_offset.bias"].shape == (54,)
    stdv = 1 / np.sqrt(6 * 3 * 2)  # mmcv counts all input channels
    assert np.all(np.abs(blk["weight"]) <= stdv) and np.abs(blk["weight"]).max() > 0.8 * stdv
    for k in ("bias", "conv_offset.weight", "conv_offset.bias"):
        np.testing.assert_array_equal(blk[k], 0)
    assert "bias" not in npattn.ModulatedDeformConv2dPack(2, 2, 3, bias=False).state_dict()


def test_dcnv2_pack_at_init_is_half_a_conv(rng):
    """Zero conv_offset: offsets 0 and mask sigmoid(0) = 1/2 everywhere."""
    blk = npattn.ModulatedDeformConv2dPack(6, 4, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(2, 1), groups=2, deform_groups=3, rng=3, dtype=np.float64, backend=BACKEND)
    blk.load_state_dict({**blk.state_dict(), "bias": rng.standard_normal(4)})
    x = rng.standard_normal((2, 6, 7, 6))
    y, _ = blk.forward(x)
    conv, _ = F.conv2d_forward(x, blk["weight"], None, (2, 1), (1, 0), (2, 1), groups=2)
    np.testing.assert_allclose(y, 0.5 * conv + blk["bias"][None, :, None, None], rtol=1e-14, atol=1e-14)


def test_dcnv2_pack_splits_offsets_and_mask_as_mmcv(rng):
    """t = conv_offset(x); offset = t[:, :2GK] (cat of the first two chunks), mask = sigmoid(t[:, 2GK:])."""
    blk = npattn.ModulatedDeformConv2dPack(4, 2, 3, padding=1, deform_groups=2, rng=4, dtype=np.float64, backend=BACKEND)
    state = blk.state_dict()
    state["conv_offset.weight"] = rng.normal(0, 0.2, state["conv_offset.weight"].shape)
    state["conv_offset.bias"] = rng.normal(0, 0.5, state["conv_offset.bias"].shape)
    blk.load_state_dict(state)
    x = rng.standard_normal((2, 4, 5, 6))
    t, _ = F.conv2d_forward(x, state["conv_offset.weight"], state["conv_offset.bias"], 1, 1, 1)
    o1, o2, m = t[:, :18], t[:, 18:36], t[:, 36:]
    ref = F.deform_conv2d(x, np.concatenate([o1, o2], axis=1), state["weight"], state["bias"], 1, 1, 1, 1 / (1 + np.exp(-m)), backend=BACKEND)
    np.testing.assert_allclose(blk.forward(x)[0], ref, rtol=1e-14, atol=1e-14)


def test_dcnv2_pack_gradcheck(rng):
    """Every input element and every parameter. conv_offset's bias puts all offsets near
    0.3 .. 0.7 and its weight is small, so no sample is near an integer (checked)."""
    blk = npattn.ModulatedDeformConv2dPack(6, 4, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(2, 1), groups=2, deform_groups=3, rng=6, dtype=np.float64, backend=BACKEND)
    state = blk.state_dict()
    gk = 3 * 6
    state["bias"] = rng.standard_normal(4)
    state["conv_offset.weight"] = rng.normal(0, 0.01, state["conv_offset.weight"].shape)
    state["conv_offset.bias"] = np.concatenate([rng.uniform(0.3, 0.7, 2 * gk), rng.normal(0, 1, gk)])
    blk.load_state_dict(state)
    x = rng.standard_normal((2, 6, 7, 5))
    t, _ = F.conv2d_forward(x, state["conv_offset.weight"], state["conv_offset.bias"], (2, 1), (1, 0), (2, 1))
    frac = t[:, : 2 * gk] - np.floor(t[:, : 2 * gk])  # base positions are integers
    assert 0.05 < frac.min() and frac.max() < 0.95  # the test's premise
    report = gradcheck_block(blk, (x,))
    assert {t.name for t in report.tensors} == {"input.0", "param.weight", "param.bias", "param.conv_offset.weight", "param.conv_offset.bias"}
    # besides gradcheck's own tolerances: the central differences' rounding noise here is
    # about 1e-8 relative (measured 9e-9 on x, which enters twice), hence 5e-8
    assert report.ok and report.max_rel_err < 5e-8, str(report)


def test_dcnv2_pack_checks():
    with pytest.raises(ValueError, match="in_channels must be divisible by deform_groups, got in_channels=6, deform_groups=4"):
        npattn.ModulatedDeformConv2dPack(6, 4, 3, deform_groups=4)
    blk = npattn.ModulatedDeformConv2dPack(2, 2, 3)
    with pytest.raises(ValueError, match=r"ModulatedDeformConv2dPack: x must have 2 channels, got shape \(1, 3, 5, 5\)"):
        blk.forward(np.zeros((1, 3, 5, 5), dtype=np.float32))
    y, cache = blk.forward(np.ones((1, 2, 5, 5), dtype=np.float32))
    assert y.dtype == np.float32
    (d_x,), params = blk.backward(np.ones_like(y), cache)
    assert d_x.dtype == np.float32 and all(v.dtype == np.float32 for v in params.values())


# ---- DeformConv2dPack (mmcv's DCNv1 layer) --------------------------------------------


def test_dcnv1_pack_state_and_init():
    blk = npattn.DeformConv2dPack(6, 4, (3, 2), groups=2, deform_groups=3, rng=0)
    assert list(blk.state_dict()) == ["weight", "conv_offset.weight", "conv_offset.bias"]
    assert blk["weight"].shape == (4, 3, 3, 2)
    assert blk["conv_offset.weight"].shape == (2 * 3 * 6, 6, 3, 2) and blk["conv_offset.bias"].shape == (36,)
    bound = np.sqrt(6 / (3 * 3 * 2))  # kaiming_uniform(nonlinearity="relu"), fan_in = in / groups * kh * kw
    assert np.all(np.abs(blk["weight"]) <= bound) and np.abs(blk["weight"]).max() > 0.8 * bound
    np.testing.assert_array_equal(blk["conv_offset.weight"], 0)
    np.testing.assert_array_equal(blk["conv_offset.bias"], 0)
    assert blk.border_grad == "mmcv" and blk.dtype == np.float32


def test_dcnv1_pack_is_conv_offset_then_deform_conv2d(rng):
    blk = npattn.DeformConv2dPack(4, 6, 3, stride=(1, 2), padding=(1, 2), dilation=(2, 1), groups=2, deform_groups=2,
                                  rng=7, dtype=np.float64, backend=BACKEND)
    state = blk.state_dict()
    state["conv_offset.weight"] = rng.normal(0, 0.3, state["conv_offset.weight"].shape)
    state["conv_offset.bias"] = rng.normal(0, 0.5, state["conv_offset.bias"].shape)
    blk.load_state_dict(state)
    x = rng.standard_normal((2, 4, 7, 6))
    offset, _ = F.conv2d_forward(x, state["conv_offset.weight"], state["conv_offset.bias"], (1, 2), (1, 2), (2, 1))
    ref = F.deform_conv2d(x, offset, state["weight"], None, (1, 2), (1, 2), (2, 1), backend=BACKEND)
    y, cache = blk.forward(x)
    np.testing.assert_array_equal(y, ref)
    # at initialisation (zero offset conv): a plain grouped convolution
    blk.load_state_dict({**state, "conv_offset.weight": np.zeros(state["conv_offset.weight"].shape),
                         "conv_offset.bias": np.zeros(state["conv_offset.bias"].shape)})
    conv, _ = F.conv2d_forward(x, state["weight"], None, (1, 2), (1, 2), (2, 1), groups=2)
    np.testing.assert_allclose(blk.forward(x)[0], conv, rtol=1e-14, atol=1e-14)


def test_dcnv1_pack_gradcheck(rng):
    """Every input element and every parameter; conv_offset's bias keeps every sample
    0.3 .. 0.7 from the grid and its weight is small, so none is near an integer (checked)."""
    blk = npattn.DeformConv2dPack(6, 4, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(2, 1), groups=2,
                                  deform_groups=3, rng=8, dtype=np.float64, backend=BACKEND)
    state = blk.state_dict()
    state["conv_offset.weight"] = rng.normal(0, 0.01, state["conv_offset.weight"].shape)
    state["conv_offset.bias"] = rng.uniform(0.3, 0.7, state["conv_offset.bias"].shape)
    blk.load_state_dict(state)
    x = rng.standard_normal((2, 6, 7, 5))
    t, _ = F.conv2d_forward(x, state["conv_offset.weight"], state["conv_offset.bias"], (2, 1), (1, 0), (2, 1))
    frac = t - np.floor(t)
    assert 0.05 < frac.min() and frac.max() < 0.95  # the test's premise
    report = gradcheck_block(blk, (x,))
    assert {t.name for t in report.tensors} == {"input.0", "param.weight", "param.conv_offset.weight", "param.conv_offset.bias"}
    assert report.ok and report.max_rel_err < 5e-8, str(report)


def test_dcnv1_pack_state_dict_round_trip(rng):
    a = npattn.DeformConv2dPack(4, 2, 3, padding=1, deform_groups=2, rng=9, dtype=np.float64)
    state = a.state_dict()
    state["conv_offset.weight"] = rng.normal(0, 0.1, state["conv_offset.weight"].shape)
    a.load_state_dict(state)
    b = npattn.DeformConv2dPack(4, 2, 3, padding=1, deform_groups=2, rng=10, dtype=np.float64)
    b.load_state_dict(a.state_dict())
    for k, v in a.state_dict().items():
        np.testing.assert_array_equal(b.state_dict()[k], v)
    x = rng.standard_normal((1, 4, 5, 5))
    np.testing.assert_array_equal(a.forward(x)[0], b.forward(x)[0])
    with pytest.raises(KeyError, match=r"missing keys \['conv_offset.bias'\], unexpected keys \['bias'\]"):
        b.load_state_dict({**{k: v for k, v in state.items() if k != "conv_offset.bias"}, "bias": np.zeros(2)})
    with pytest.raises(ValueError, match=r"'conv_offset.weight' must have shape \(36, 4, 3, 3\), got \(18, 4, 3, 3\)"):
        b.load_state_dict({**state, "conv_offset.weight": np.zeros((18, 4, 3, 3))})


def test_dcnv1_pack_checks():
    with pytest.raises(ValueError, match=r"DeformConv2dPack: bias must be False \(mmcv's DeformConv2dPack has no bias\), got True"):
        npattn.DeformConv2dPack(2, 2, 3, bias=True)
    with pytest.raises(ValueError, match="in_channels must be divisible by deform_groups, got in_channels=6, deform_groups=4"):
        npattn.DeformConv2dPack(6, 4, 3, deform_groups=4)
    with pytest.raises(ValueError, match="DeformConv2dPack: border_grad must be one of"):
        npattn.DeformConv2dPack(2, 2, 3, border_grad="tv")
    blk = npattn.DeformConv2dPack(2, 2, 3)
    with pytest.raises(ValueError, match=r"DeformConv2dPack: x must have 2 channels, got shape \(1, 3, 5, 5\)"):
        blk.forward(np.zeros((1, 3, 5, 5), dtype=np.float32))
    y, cache = blk.forward(np.ones((1, 2, 5, 5), dtype=np.float32))
    assert y.dtype == np.float32 and y.shape == (1, 2, 3, 3)
    (d_x,), params = blk.backward(np.ones_like(y), cache)
    assert d_x.dtype == np.float32 and set(params) == {"weight", "conv_offset.weight", "conv_offset.bias"}
    assert all(v.dtype == np.float32 for v in params.values())


@pytest.mark.parametrize("shape", [(2, 3, 0, 4), (2, 3, 4, 0), (0, 3, 0, 0)])
def test_conv_offset2d_empty_image_raises_naming_x(shape):
    """H or W = 0: the seed's layer refuses it in PyTorch (its 3x3 offset convolution,
    padding 1, has no output); npattn raised conv2d's "output height would be 0", naming
    no argument of the block. Now a ValueError naming x."""
    with pytest.raises(ValueError, match=r"x must have H >= 1 and W >= 1") as info:
        npattn.ConvOffset2D(3, dtype=np.float64).forward(np.zeros(shape))
    assert str(info.value).startswith("ConvOffset2D: x must") and str(shape) in str(info.value)


def test_deform_conv2d_block_stated_offset_groups(rng):
    from npattn import DeformConv2d

    blk = DeformConv2d(4, 6, 3, padding=1, groups=2, offset_groups=2, rng=0, dtype=np.float64)
    x = rng.standard_normal((1, 4, 4, 5))
    y, _ = blk.forward(x, rng.uniform(-1, 1, (1, 2 * 2 * 9, 4, 5)))
    assert y.shape == (1, 6, 4, 5)
    with pytest.raises(ValueError, match="offset_groups=2 disagrees with the shapes, which give offset_groups = 1"):
        blk.forward(x, rng.uniform(-1, 1, (1, 18, 4, 5)))
    with pytest.raises(ValueError, match="in_channels must be divisible by offset_groups"):
        DeformConv2d(4, 6, 3, offset_groups=3)
