"""The offset-gradient convention at the image border, ``border_grad="torchvision" | "mmcv"``.

- both conventions of every CPU backend against a scalar loop oracle, on positions that
  sit exactly on -1, 0, H - 1, H (and beyond) on either axis;
- the two differ exactly where a coordinate is -1 and nowhere else;
- mmcv's own fixed-value tests (``tests/test_ops/test_modulated_deform_conv.py`` and
  ``tests/test_ops/test_deform_conv.py`` of open-mmlab/mmcv: their expected numbers,
  copied here as independent expected values) reproduced by npattn's mmcv layers in
  float64 and float32;
- npattn's mmcv convention against ``tools/mmcv_ref_deform.py``, a transcription of
  mmcv's kernel logic (float64 loops), on uneven settings.
"""

import os
import sys

import numpy as np
import pytest

import npattn
from npattn import sampling
from npattn.functional.deform import deform_conv2d_backward, deform_conv2d_forward

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))
import mmcv_ref_deform  # noqa: E402

BACKENDS = ["numpy", "numba"]
CONVENTIONS = ["torchvision", "mmcv"]


# ---- a scalar oracle of the offset gradient, both conventions -----------------------


def oracle_offset_grad(img, h, w, axis, border_grad):
    """d sample / d h (axis 0) or d w (axis 1) on the cell [floor, floor + 1]; support
    [-1, H) x [-1, W) for torchvision, (-1, H) x (-1, W) for mmcv."""
    height, width = img.shape
    if border_grad == "torchvision":
        inside = -1 <= h < height and -1 <= w < width
    else:
        inside = -1 < h < height and -1 < w < width
    if not inside:
        return 0.0
    r0, c0 = int(np.floor(h)), int(np.floor(w))
    ly, lx = h - r0, w - c0

    def v(r, c):
        return float(img[r, c]) if 0 <= r < height and 0 <= c < width else 0.0

    if axis == 0:
        return (1 - lx) * (v(r0 + 1, c0) - v(r0, c0)) + lx * (v(r0 + 1, c0 + 1) - v(r0, c0 + 1))
    return (1 - ly) * (v(r0, c0 + 1) - v(r0, c0)) + ly * (v(r0 + 1, c0 + 1) - v(r0 + 1, c0))


def border_positions(height, width):
    """Positions on and around the border of both axes: -1.5, -1 (exactly), -0.6, 0, 0.4,
    H - 1, H - 0.3, H (exactly), H + 0.5, crossed with each other."""
    ys = [-1.5, -1.0, -0.6, 0.0, 0.4, height - 1.0, height - 0.3, float(height), height + 0.5]
    xs = [-1.5, -1.0, -0.6, 0.0, 0.7, width - 1.0, width - 0.3, float(width), width + 0.5]
    return [(y, x) for y in ys for x in xs]


def offsets_for(points):
    """A 1x1-kernel deformable conv with one output pixel per point: offset (1, 2, 1, P)
    places output (0, p) at points[p] (base position (0, p))."""
    p = len(points)
    offset = np.zeros((1, 2, 1, p))
    for q, (y, x) in enumerate(points):
        offset[0, 0, 0, q] = y
        offset[0, 1, 0, q] = x - q
    return offset


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("border_grad", CONVENTIONS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_offset_gradient_matches_the_oracle_on_the_border(backend, border_grad, dtype):
    rng = np.random.default_rng(11)
    height, width, c = 4, 5, 3
    points = border_positions(height, width)
    x = rng.standard_normal((1, c, height, width)).astype(dtype)
    offset = offsets_for(points).astype(dtype)
    # every base position is an integer, so the float32 positions are the float64 ones
    mask = rng.uniform(0.2, 1.0, (1, 1, 1, len(points))).astype(dtype)
    d_cols = rng.standard_normal((1, c, 1, 1, 1, len(points))).astype(dtype)
    be = sampling.get_backend(backend)
    geo = ((1, 1), (1, 1), (0, 0), (1, 1))
    d_offset, d_mask = be.deform_col2im_coord(d_cols, x, offset, mask, *geo, 1, border_grad=border_grad)
    tol = 1e-14 if dtype == np.float64 else 1e-5
    for q, (y, xq) in enumerate(points):
        for axis in (0, 1):
            want = sum(float(mask[0, 0, 0, q]) * float(d_cols[0, ch, 0, 0, 0, q])
                       * oracle_offset_grad(x[0, ch].astype(np.float64), y, xq, axis, border_grad) for ch in range(c))
            got = float(d_offset[0, axis, 0, q])
            assert abs(got - want) <= tol * max(1.0, abs(want)), (q, (y, xq), axis, got, want)
    # the mask gradient does not depend on the convention
    other = "mmcv" if border_grad == "torchvision" else "torchvision"
    np.testing.assert_array_equal(d_mask, be.deform_col2im_coord(d_cols, x, offset, mask, *geo, 1, border_grad=other)[1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_conventions_differ_exactly_at_minus_one(backend):
    """Same inputs, both conventions: identical (bit for bit) wherever neither coordinate
    is exactly -1; mmcv's is exactly 0 there, torchvision's is not (on these inputs)."""
    rng = np.random.default_rng(12)
    height, width = 4, 5
    points = border_positions(height, width)
    x = rng.uniform(0.5, 1.5, (1, 2, height, width))  # positive pixels: no accidental zero gradient
    offset = offsets_for(points)
    d_cols = np.ones((1, 2, 1, 1, 1, len(points)))
    be = sampling.get_backend(backend)
    geo = ((1, 1), (1, 1), (0, 0), (1, 1))
    tv, _ = be.deform_col2im_coord(d_cols, x, offset, None, *geo, 1, border_grad="torchvision")
    mm, _ = be.deform_col2im_coord(d_cols, x, offset, None, *geo, 1, border_grad="mmcv")
    at_minus_one = np.array([y == -1.0 or xq == -1.0 for y, xq in points])
    in_tv_support = np.array([-1 <= y < height and -1 <= xq < width for y, xq in points])
    np.testing.assert_array_equal(tv[0, :, 0, ~at_minus_one], mm[0, :, 0, ~at_minus_one])
    assert np.all(mm[0, :, 0, at_minus_one] == 0.0)
    # torchvision's right-hand derivative there: d/dh is nonzero on p_y = -1 inside the
    # support (the cell's bottom row is in the image); d/dw is nonzero on p_x = -1
    for q, (y, xq) in enumerate(points):
        if in_tv_support[q] and y == -1.0 and xq > -1.0 and xq < width - 1:
            assert tv[0, 0, 0, q] != 0.0, (y, xq)
        if in_tv_support[q] and xq == -1.0 and y > -1.0 and y < height - 1:
            assert tv[0, 1, 0, q] != 0.0, (y, xq)
    assert at_minus_one.sum() >= 10 and (at_minus_one & in_tv_support).sum() >= 6


def test_border_grad_is_checked():
    x = np.zeros((1, 1, 3, 3))
    with pytest.raises(ValueError, match=r"deform_conv2d: border_grad must be one of \('torchvision', 'mmcv'\), got 'caffe'"):
        deform_conv2d_forward(x, np.zeros((1, 2, 3, 3)), np.zeros((1, 1, 1, 1)), border_grad="caffe")
    for backend in BACKENDS:
        with pytest.raises(ValueError, match="deform_col2im_coord: border_grad must be one of"):
            sampling.get_backend(backend).deform_col2im_coord(
                np.zeros((1, 1, 1, 1, 3, 3)), x, np.zeros((1, 2, 3, 3)), None, (1, 1), (1, 1), (0, 0), (1, 1), 1,
                border_grad=None)
    with pytest.raises(ValueError, match="ModulatedDeformConv2dPack: border_grad must be one of"):
        npattn.ModulatedDeformConv2dPack(2, 2, 3, border_grad="MMCV")
    assert npattn.DeformConv2d(2, 2, 3).border_grad == "torchvision"
    assert npattn.ModulatedDeformConv2dPack(2, 2, 3).border_grad == "mmcv"
    assert npattn.DeformConv2dPack(2, 2, 3).border_grad == "mmcv"


# ---- mmcv's own fixed-value tests ---------------------------------------------------
# open-mmlab/mmcv tests/test_ops/test_modulated_deform_conv.py: ModulatedDeformConv2dPack(1, 1,
# kernel_size=(2, 2), stride=1, padding=1, deform_groups=1, bias=False), weight filled with 1,
# the offset conv zero-initialised, upstream gradient of ones (output.sum().backward()).

MDCONV_INPUT = [[[[1.0, 2.0, 3.0], [1.0, 2.0, 3.0], [1.0, 2.0, 3.0]]]]
MDCONV_OUTPUT = [[[[0.5, 1.5, 2.5, 1.5], [1.0, 3.0, 5.0, 3.0], [1.0, 3.0, 5.0, 3.0], [0.5, 1.5, 2.5, 1.5]]]]
MDCONV_INPUT_GRAD = [[[[2.0, 2.0, 2.0], [2.0, 2.0, 2.0], [2.0, 2.0, 2.0]]]]
MDCONV_WEIGHT_GRAD = [[[[9.0, 9.0], [9.0, 9.0]]]]
MDCONV_OFFSET_WEIGHT_GRAD = [
    [[[-7.0, -4.0], [0.0, 0.0]]], [[[-9.0, 7.5], [-6.0, 5.0]]], [[[-4.0, -7.0], [0.0, 0.0]]],
    [[[-7.5, -9.0], [-5.0, -6.0]]], [[[-7.0, -4.0], [-7.0, -4.0]]], [[[-6.0, 5.0], [-9.0, 7.5]]],
    [[[-4.0, -7.0], [-4.0, -7.0]]], [[[-5.0, -6.0], [-7.5, -9.0]]], [[[10.5, 6.0], [7.0, 4.0]]],
    [[[6.0, 10.5], [4.0, 7.0]]], [[[7.0, 4.0], [10.5, 6.0]]], [[[4.0, 7.0], [6.0, 10.5]]],
]
MDCONV_OFFSET_BIAS_GRAD = [-3.0, -1.5, -3.0, -1.5, -3.0, -1.5, -3.0, -1.5, 4.5, 4.5, 4.5, 4.5]

# open-mmlab/mmcv tests/test_ops/test_deform_conv.py: DeformConv2dPack(1, 1, kernel_size=2,
# stride=1, padding=0) with these offset-conv and main weights, upstream gradient of ones
# (mmcv compares with rtol 1e-3; the values are exact, see ATOL).
DCONV_INPUT = [[[[1.0, 2.0, 3.0], [0.0, 1.0, 2.0], [3.0, 5.0, 2.0]]]]
DCONV_OFFSET_WEIGHT = [[[0.1, 0.4, 0.6, 0.1]], [[0.3, 0.2, 0.1, 0.3]], [[0.5, 0.5, 0.2, 0.8]],
                       [[0.8, 0.3, 0.9, 0.1]], [[0.3, 0.1, 0.2, 0.5]], [[0.3, 0.7, 0.5, 0.3]],
                       [[0.6, 0.2, 0.5, 0.3]], [[0.4, 0.1, 0.8, 0.4]]]
DCONV_OFFSET_BIAS = [0.7, 0.1, 0.8, 0.5, 0.6, 0.5, 0.4, 0.7]
DCONV_WEIGHT = [[[0.4, 0.2, 0.1, 0.9]]]
DCONV_OUTPUT = [[[[1.650, 0.0], [0.000, 0.0]]]]
DCONV_INPUT_GRAD = [[[[-0.666, 0.204, 0.000], [0.030, -0.416, 0.012], [0.000, 0.252, 0.129]]]]
DCONV_OFFSET_WEIGHT_GRAD = [[[[1.44, 2.88], [0.00, 1.44]]], [[[-0.72, -1.44], [0.00, -0.72]]],
                            [[[0.00, 0.00], [0.00, 0.00]]], [[[0.00, 0.00], [0.00, 0.00]]],
                            [[[-0.10, -0.20], [0.00, -0.10]]], [[[-0.08, -0.16], [0.00, -0.08]]],
                            [[[-0.54, -1.08], [0.00, -0.54]]], [[[-0.54, -1.08], [0.00, -0.54]]]]
DCONV_OFFSET_BIAS_GRAD = [1.44, -0.72, 0.0, 0.0, -0.10, -0.08, -0.54, -0.54]
DCONV_WEIGHT_GRAD = [[[[3.62, 0.0], [0.40, 0.18]]]]

# mmcv's numbers are the exact values (binary fractions for mdconv; for deform_conv the
# inputs are 1-decimal numbers and the results exact 2- and 3-decimal ones, although
# mmcv itself compares them with rtol 1e-3): float64 to rounding, float32 to the rounding
# of inputs and a handful of products and sums of values of order 10
ATOL = {np.float64: 1e-12, np.float32: 1e-5}


def _run_mdconv(dtype, backend, border_grad):
    blk = npattn.ModulatedDeformConv2dPack(1, 1, (2, 2), stride=1, padding=1, deform_groups=1, bias=False,
                                           dtype=dtype, backend=backend, border_grad=border_grad)
    blk.load_state_dict({**blk.state_dict(), "weight": np.ones((1, 1, 2, 2))})
    np.testing.assert_array_equal(blk["conv_offset.weight"], 0)  # the initial state
    x = np.array(MDCONV_INPUT, dtype=dtype)
    y, cache = blk.forward(x)
    (d_x,), params = blk.backward(np.ones_like(y), cache)
    return y, d_x, params


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("backend", BACKENDS)
def test_mmcv_modulated_deform_conv_fixed_values(dtype, backend):
    """mmcv's layer reproduces mmcv's numbers: output and every gradient."""
    y, d_x, params = _run_mdconv(dtype, backend, "mmcv")
    atol = ATOL[dtype]
    assert y.dtype == d_x.dtype == dtype
    np.testing.assert_allclose(y, MDCONV_OUTPUT, rtol=0, atol=atol)
    np.testing.assert_allclose(d_x, MDCONV_INPUT_GRAD, rtol=0, atol=atol)
    np.testing.assert_allclose(params["weight"], MDCONV_WEIGHT_GRAD, rtol=0, atol=atol)
    np.testing.assert_allclose(params["conv_offset.weight"], MDCONV_OFFSET_WEIGHT_GRAD, rtol=0, atol=atol)
    np.testing.assert_allclose(params["conv_offset.bias"], MDCONV_OFFSET_BIAS_GRAD, rtol=0, atol=atol)


def test_mmcv_fixed_values_fail_under_torchvisions_convention():
    """The same layer with border_grad="torchvision" agrees with mmcv on the output, the
    input and weight gradients, but not on the offset conv's (the taps on p = -1)."""
    y, d_x, params = _run_mdconv(np.float64, "numpy", "torchvision")
    np.testing.assert_allclose(y, MDCONV_OUTPUT, rtol=0, atol=1e-12)
    np.testing.assert_allclose(d_x, MDCONV_INPUT_GRAD, rtol=0, atol=1e-12)
    np.testing.assert_allclose(params["weight"], MDCONV_WEIGHT_GRAD, rtol=0, atol=1e-12)
    w_err = np.abs(params["conv_offset.weight"] - np.array(MDCONV_OFFSET_WEIGHT_GRAD)).max()
    b_err = np.abs(params["conv_offset.bias"] - np.array(MDCONV_OFFSET_BIAS_GRAD)).max()
    assert w_err == pytest.approx(7.0) and b_err == pytest.approx(3.0)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("backend", BACKENDS)
def test_mmcv_deform_conv_pack_fixed_values(dtype, backend):
    blk = npattn.DeformConv2dPack(1, 1, kernel_size=2, stride=1, padding=0, dtype=dtype, backend=backend)
    blk.load_state_dict({
        "weight": np.array(DCONV_WEIGHT).reshape(1, 1, 2, 2),
        "conv_offset.weight": np.array(DCONV_OFFSET_WEIGHT).reshape(8, 1, 2, 2),
        "conv_offset.bias": np.array(DCONV_OFFSET_BIAS),
    })
    x = np.array(DCONV_INPUT, dtype=dtype)
    y, cache = blk.forward(x)
    (d_x,), params = blk.backward(np.ones_like(y), cache)
    atol = ATOL[dtype]
    np.testing.assert_allclose(y, DCONV_OUTPUT, rtol=0, atol=atol)
    np.testing.assert_allclose(d_x, DCONV_INPUT_GRAD, rtol=0, atol=atol)
    np.testing.assert_allclose(params["weight"], DCONV_WEIGHT_GRAD, rtol=0, atol=atol)
    np.testing.assert_allclose(params["conv_offset.weight"], DCONV_OFFSET_WEIGHT_GRAD, rtol=0, atol=atol)
    np.testing.assert_allclose(params["conv_offset.bias"], DCONV_OFFSET_BIAS_GRAD, rtol=0, atol=atol)


# ---- against the transcription of mmcv's kernels ------------------------------------

# (N, C_in, H, W, C_out, kernel, stride, padding, dilation, weight groups, offset groups)
UNEVEN = [
    (2, 4, 5, 6, 6, (3, 3), (1, 1), (1, 1), (1, 1), 2, 2),
    (1, 6, 7, 5, 4, (3, 2), (2, 1), (1, 0), (2, 1), 2, 3),
    (2, 3, 4, 6, 3, (2, 3), (1, 2), (2, 1), (1, 2), 1, 1),
]


def _uneven_case(rng, cfg, with_mask):
    n, c_in, h, w, c_out, (kh, kw), stride, padding, dilation, g_w, g_off = cfg
    oh = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    x = rng.standard_normal((n, c_in, h, w))
    offset = rng.uniform(-2.5, 2.5, (n, 2 * g_off * kh * kw, oh, ow))
    offset[:, ::2, ::2] = np.round(offset[:, ::2, ::2])  # integer rows: p_y = -1, 0, H exactly among them
    offset[:, 1::3, 1::2] = np.round(offset[:, 1::3, 1::2])  # and integer columns
    offset[:, 0] = -1.0 + padding[0] - 0.0  # tap (0, 0) at oy = 0 sits on p_y = -1 exactly
    weight = rng.standard_normal((c_out, c_in // g_w, kh, kw))
    bias = rng.standard_normal(c_out)
    mask = rng.uniform(-0.5, 1.5, (n, g_off * kh * kw, oh, ow)) if with_mask else None
    return dict(input=x, offset=offset, weight=weight, bias=bias, stride=stride, padding=padding,
                dilation=dilation, mask=mask)


def _positions_at_minus_one(a):
    """How many samples sit exactly on p = -1 (either axis), from the offsets."""
    n, c2k, oh, ow = a["offset"].shape
    kh, kw = a["weight"].shape[2:]
    count = 0
    for k in range(c2k // 2):
        i, j = divmod(k % (kh * kw), kw)
        py = np.arange(oh)[:, None] * a["stride"][0] - a["padding"][0] + i * a["dilation"][0] + a["offset"][:, 2 * k]
        px = np.arange(ow)[None, :] * a["stride"][1] - a["padding"][1] + j * a["dilation"][1] + a["offset"][:, 2 * k + 1]
        count += int(np.sum((py == -1) | (px == -1)))
    return count


@pytest.mark.parametrize("with_mask", [True, False], ids=["dcnv2", "dcnv1"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cfg", UNEVEN)
def test_mmcv_convention_matches_the_mmcv_kernel_transcription(cfg, backend, with_mask):
    rng = np.random.default_rng([13, UNEVEN.index(cfg), with_mask])
    a = _uneven_case(rng, cfg, with_mask)
    assert _positions_at_minus_one(a) > 0  # the case covers the convention's difference
    out, cache = deform_conv2d_forward(**a, backend=backend, border_grad="mmcv")
    dy = rng.standard_normal(out.shape)
    g = deform_conv2d_backward(dy, cache)
    ref_out = mmcv_ref_deform.deform_conv2d(a["input"], a["offset"], a["weight"], a["bias"], a["stride"],
                                            a["padding"], a["dilation"], a["mask"])
    ref = mmcv_ref_deform.deform_conv2d_backward(dy, a["input"], a["offset"], a["weight"], a["bias"], a["stride"],
                                                 a["padding"], a["dilation"], a["mask"])
    assert np.max(np.abs(out - ref_out)) <= 1e-13 * np.max(np.abs(ref_out))
    assert set(g) == set(ref)
    for k in g:
        err = np.max(np.abs(g[k] - ref[k]))
        assert err <= 1e-13 * max(np.max(np.abs(ref[k])), 1.0), (k, err)
    # and torchvision's convention does not match mmcv's offset gradient on this case
    cache_tv = deform_conv2d_forward(**a, backend=backend, border_grad="torchvision")[1]
    g_tv = deform_conv2d_backward(dy, cache_tv)
    assert np.max(np.abs(g_tv["offset"] - ref["offset"])) > 1e-3
    for k in set(g) - {"offset"}:
        np.testing.assert_array_equal(g_tv[k], g[k])
