"""npattn.functional.deform_conv2d: forward against a plain-Python loop oracle and
hand-computed values, conv2d at zero offsets, finite-difference gradients on uneven
settings, chunking, non-contiguous inputs, non-finite offsets and argument checks."""

import warnings

import numpy as np
import pytest

from npattn import functional as F
from npattn.functional.deform import deform_conv2d_backward, deform_conv2d_forward
from npattn.gradcheck import gradcheck

BACKEND = "numpy"  # the definition; the fast backends are checked against it elsewhere


def out_size(size, k, s, p, d):
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def oracle_bilinear(img, y, x):
    """torchvision's bilinear rule, scalar Python."""
    h, w = img.shape
    if y <= -1 or y >= h or x <= -1 or x >= w:
        return 0.0
    y0, x0 = int(np.floor(y)), int(np.floor(x))
    ly, lx = y - y0, x - x0
    val = 0.0
    for r, c, wt in ((y0, x0, (1 - ly) * (1 - lx)), (y0, x0 + 1, (1 - ly) * lx), (y0 + 1, x0, ly * (1 - lx)), (y0 + 1, x0 + 1, ly * lx)):
        if 0 <= r < h and 0 <= c < w:
            val += wt * float(img[r, c])
    return val


def oracle_deform_conv2d(x, offset, weight, bias, stride, padding, dilation, mask):
    """Seven nested loops, as torchvision's test expected_fn."""
    n, c_in, h, w = x.shape
    c_out, c_per_wg, kh, kw = weight.shape
    oh, ow = out_size(h, kh, stride[0], padding[0], dilation[0]), out_size(w, kw, stride[1], padding[1], dilation[1])
    g_off = offset.shape[1] // (2 * kh * kw)
    c_per_og = c_in // g_off
    g_w = c_in // c_per_wg
    out_per_wg = c_out // g_w
    out = np.zeros((n, c_out, oh, ow))
    for b in range(n):
        for o in range(c_out):
            wg = o // out_per_wg
            for oy in range(oh):
                for ox in range(ow):
                    acc = 0.0 if bias is None else float(bias[o])
                    for ci in range(c_per_wg):
                        c = wg * c_per_wg + ci
                        og = c // c_per_og
                        for i in range(kh):
                            for j in range(kw):
                                k = og * kh * kw + i * kw + j
                                py = oy * stride[0] - padding[0] + i * dilation[0] + offset[b, 2 * k, oy, ox]
                                px = ox * stride[1] - padding[1] + j * dilation[1] + offset[b, 2 * k + 1, oy, ox]
                                m = 1.0 if mask is None else mask[b, k, oy, ox]
                                acc += weight[o, ci, i, j] * m * oracle_bilinear(x[b, c], py, px)
                    out[b, o, oy, ox] = acc
    return out


def away_from_integers(rng, lo, hi, shape, margin=0.05):
    v = rng.uniform(lo, hi, shape)
    f = v - np.floor(v)
    return np.floor(v) + np.clip(f, margin, 1 - margin)


def safe_offsets(rng, n, g_off, kernel, stride, padding, dilation, in_hw, out_hw):
    """Offsets putting every sample inside (0, H-1) x (0, W-1), >= 0.05 from integers."""
    kh, kw = kernel
    i = np.arange(kh).repeat(kw)[:, None, None]
    j = np.tile(np.arange(kw), kh)[:, None, None]
    base_y = np.arange(out_hw[0])[None, :, None] * stride[0] - padding[0] + i * dilation[0]  # (K, oh, 1)
    base_x = np.arange(out_hw[1])[None, None, :] * stride[1] - padding[1] + j * dilation[1]  # (K, 1, ow)
    shape = (n, g_off, kh * kw) + tuple(out_hw)
    p_y = away_from_integers(rng, 0, in_hw[0] - 1, shape)
    p_x = away_from_integers(rng, 0, in_hw[1] - 1, shape)
    off = np.stack([p_y - base_y, p_x - base_x], axis=3)  # (N, G, K, 2, oh, ow)
    return off.reshape(n, 2 * g_off * kh * kw, *out_hw)


# (batch, C_in, H, W, C_out, kernel, stride, padding, dilation, weight groups, offset groups)
UNEVEN = [
    (1, 6, 7, 6, 4, (3, 2), (2, 1), (1, 0), (2, 1), 2, 3),
    (3, 6, 8, 6, 4, (3, 2), (2, 1), (1, 0), (2, 1), 2, 3),
    (3, 4, 5, 6, 6, (2, 3), (1, 2), (0, 1), (1, 2), 1, 2),
]


def make_case(rng, case, *, with_mask=True, with_bias=True, safe=True):
    n, c_in, h, w, c_out, kernel, stride, padding, dilation, g_w, g_off = case
    oh, ow = out_size(h, kernel[0], stride[0], padding[0], dilation[0]), out_size(w, kernel[1], stride[1], padding[1], dilation[1])
    x = rng.standard_normal((n, c_in, h, w))
    if safe:
        offset = safe_offsets(rng, n, g_off, kernel, stride, padding, dilation, (h, w), (oh, ow))
    else:
        offset = rng.uniform(-3, 3, (n, 2 * g_off * kernel[0] * kernel[1], oh, ow))
    weight = rng.standard_normal((c_out, c_in // g_w) + kernel)
    bias = rng.standard_normal(c_out) if with_bias else None
    mask = rng.uniform(0, 1, (n, g_off * kernel[0] * kernel[1], oh, ow)) if with_mask else None
    return dict(input=x, offset=offset, weight=weight, bias=bias, stride=stride, padding=padding, dilation=dilation, mask=mask)


def fwd(**kw):
    return deform_conv2d_forward(**kw, backend=BACKEND)


@pytest.fixture
def rng():
    return np.random.default_rng(2024)


# ---- forward ------------------------------------------------------------------------


@pytest.mark.parametrize("case", UNEVEN)
@pytest.mark.parametrize("with_mask", [False, True])
def test_forward_matches_loop_oracle(rng, case, with_mask):
    a = make_case(rng, case, with_mask=with_mask, safe=False)  # samples anywhere, in and out of the image
    a["offset"][:, :, 0, 0] = np.round(a["offset"][:, :, 0, 0])  # integer positions too
    out = F.deform_conv2d(**a, backend=BACKEND)
    expected = oracle_deform_conv2d(a["input"], a["offset"], a["weight"], a["bias"], a["stride"], a["padding"], a["dilation"], a["mask"])
    assert out.shape == expected.shape
    err = np.max(np.abs(out - expected)) / np.max(np.abs(expected))
    assert err < 1e-13


def test_forward_hand_computed_onnx_case():
    """ONNX's DeformConv node test: arange input, 2x2 ones kernel, one row offset of 0.5."""
    x = np.arange(9.0).reshape(1, 1, 3, 3)
    w = np.ones((1, 1, 2, 2))
    offset = np.zeros((1, 8, 2, 2))
    offset[0, 0, 0, 0] = 0.5
    out = F.deform_conv2d(x, offset, w, backend=BACKEND)
    np.testing.assert_array_equal(out, [[[[9.5, 12.0], [20.0, 24.0]]]])
    # with a mask of 0.5 on tap 0 only and a bias of 1
    mask = np.ones((1, 4, 2, 2))
    mask[0, 0] = 0.5
    out = F.deform_conv2d(x, offset, w, np.array([1.0]), mask=mask, backend=BACKEND)
    # taps 0 of the four outputs: 1.5, 1, 3, 4 -> halved
    np.testing.assert_array_equal(out, [[[[1 + 9.5 - 0.75, 1 + 12.0 - 0.5], [1 + 20.0 - 1.5, 1 + 24.0 - 2.0]]]])


@pytest.mark.parametrize("case", UNEVEN)
def test_zero_offsets_and_unit_mask_give_conv2d(rng, case):
    a = make_case(rng, case)
    a["offset"] = np.zeros_like(a["offset"])
    ref, _ = F.conv2d_forward(a["input"], a["weight"], a["bias"], a["stride"], a["padding"], a["dilation"], groups=a["input"].shape[1] // a["weight"].shape[1])
    no_mask = F.deform_conv2d(**{**a, "mask": None}, backend=BACKEND)
    ones = F.deform_conv2d(**{**a, "mask": np.ones_like(a["mask"])}, backend=BACKEND)
    np.testing.assert_array_equal(ones, no_mask)  # the same columns, the same product
    # conv2d and deform_conv2d sum the same K products through different BLAS calls, whose
    # summation order depends on the CPU: agreement to the rounding bound of a K-term dot
    # product, |error| <= K eps sum|w x| (+ eps |bias| for the final add)
    groups = a["input"].shape[1] // a["weight"].shape[1]
    k_terms = a["weight"][0].size
    abs_sum, _ = F.conv2d_forward(np.abs(a["input"]), np.abs(a["weight"]), None, a["stride"], a["padding"], a["dilation"], groups=groups)
    bound = k_terms * np.finfo(np.float64).eps * (abs_sum + np.abs(a["bias"])[:, None, None])
    assert np.all(np.abs(no_mask - ref) <= bound), np.max(np.abs(no_mask - ref) / bound)


def test_batch_zero(rng):
    a = make_case(rng, UNEVEN[0])
    a = {k: (v[:0] if k in ("input", "offset", "mask") else v) for k, v in a.items()}
    out, cache = fwd(**a)
    assert out.shape == (0, 4, 3, 5)
    g = deform_conv2d_backward(np.zeros(out.shape), cache)
    assert g["input"].shape == a["input"].shape and g["offset"].shape == a["offset"].shape
    assert g["mask"].shape == a["mask"].shape
    np.testing.assert_array_equal(g["weight"], np.zeros_like(a["weight"]))
    np.testing.assert_array_equal(g["bias"], np.zeros(4))


@pytest.mark.parametrize("backend", ["numpy", "numba"])
@pytest.mark.parametrize("x_shape", [(1, 1, 1, 0), (2, 2, 0, 3)])
def test_empty_image_with_padding_samples_zero(backend, x_shape):
    """H or W = 0 still has an output when padded (as torchvision): every sample is 0, so
    the output is the bias and the offset, mask and weight gradients are 0. (Found by
    tests/fuzz: the numpy backend raised IndexError from a take on the empty image.)"""
    n, c, h, w = x_shape
    out_h, out_w = h + 2, w + 2  # 1x1 kernel, padding 1
    x = np.zeros(x_shape)
    offset = np.full((n, 2, out_h, out_w), 0.25)
    mask = np.ones((n, 1, out_h, out_w))
    weight, bias = np.ones((3, c, 1, 1)), np.array([0.5, -1.0, 2.0])
    out, cache = deform_conv2d_forward(x, offset, weight, bias, padding=1, mask=mask, backend=backend)
    np.testing.assert_array_equal(out, np.broadcast_to(bias[:, None, None], (n, 3, out_h, out_w)))
    g = deform_conv2d_backward(np.ones(out.shape), cache)
    assert g["input"].shape == x_shape
    for key in ("offset", "mask", "weight"):
        np.testing.assert_array_equal(g[key], 0.0 * g[key], err_msg=key)
    np.testing.assert_array_equal(g["bias"], np.full(3, n * out_h * out_w, dtype=float))


def test_chunking_does_not_change_results(rng):
    a = make_case(rng, UNEVEN[1], safe=False)
    out, cache = fwd(**a)
    assert cache.images_per_chunk >= 3  # the default budget holds the whole batch
    dy = rng.standard_normal(out.shape)
    g = deform_conv2d_backward(dy, cache)
    per_image = 6 * 3 * 2 * 3 * 5 * 8  # C_in * kh * kw * out_h * out_w * itemsize
    for budget, chunk in ((1, 1), (2 * per_image + 7, 2)):  # one image per chunk; chunks of 2 and 1
        out_c, cache_c = deform_conv2d_forward(**a, backend=BACKEND, column_budget_bytes=budget)
        assert cache_c.images_per_chunk == chunk
        np.testing.assert_allclose(out_c, out, rtol=1e-14, atol=1e-14)
        g_c = deform_conv2d_backward(dy, cache_c)
        for k in g:
            np.testing.assert_allclose(g_c[k], g[k], rtol=1e-13, atol=1e-13)


def test_non_contiguous_inputs(rng):
    a = make_case(rng, UNEVEN[1], safe=False)
    strided = {}
    for k in ("input", "offset", "mask"):
        v = a[k]
        big = np.zeros(v.shape[:-1] + (2 * v.shape[-1],))
        big[..., ::2] = v
        strided[k] = big[..., ::2]  # every other element of the last axis
        assert not strided[k].flags.c_contiguous
    w_t = np.ascontiguousarray(a["weight"].transpose(0, 1, 3, 2)).transpose(0, 1, 3, 2)  # Fortran-ish weight
    assert not w_t.flags.c_contiguous
    out, cache = fwd(**a)
    out_nc, cache_nc = fwd(**{**a, **strided, "weight": w_t})
    np.testing.assert_array_equal(out_nc, out)
    dy = rng.standard_normal(out.shape)
    dy_nc = np.asfortranarray(dy)
    g, g_nc = deform_conv2d_backward(dy, cache), deform_conv2d_backward(dy_nc, cache_nc)
    for k in g:
        np.testing.assert_allclose(g_nc[k], g[k], rtol=1e-14, atol=1e-14)
    for k in ("input", "offset", "mask"):  # the caller's arrays are untouched
        np.testing.assert_array_equal(strided[k], a[k])


def test_float32_in_float32_out(rng):
    a = make_case(rng, UNEVEN[1], safe=False)
    a32 = {k: (v.astype(np.float32) if isinstance(v, np.ndarray) else v) for k, v in a.items()}
    out32, cache32 = fwd(**a32)
    out64, _ = fwd(**a)
    assert out32.dtype == np.float32
    np.testing.assert_allclose(out32, out64, rtol=1e-4, atol=1e-4)
    g = deform_conv2d_backward(np.ones(out32.shape, dtype=np.float32), cache32)
    for k, v in g.items():
        assert v.dtype == np.float32, k


# ---- backward -----------------------------------------------------------------------


@pytest.mark.parametrize("case", UNEVEN)
@pytest.mark.parametrize("with_mask,with_bias", [(True, True), (False, False)])
def test_gradients_by_finite_differences(rng, case, with_mask, with_bias):
    """input, offset, mask, weight and bias against central differences, every element,
    with every sample inside the image and at least 0.05 from an integer."""
    a = make_case(rng, case, with_mask=with_mask, with_bias=with_bias)
    report = gradcheck(fwd, deform_conv2d_backward, a)
    names = {t.name for t in report.tensors}
    assert names == {"input", "offset", "weight"} | ({"mask"} if with_mask else set()) | ({"bias"} if with_bias else set())
    assert all(t.method == "full" for t in report.tensors)
    assert report.ok and report.max_rel_err < 1e-8, str(report)


def test_offset_gradient_at_p_minus_one_follows_torchvision(rng):
    """At exactly p_y = -1 the output does not depend on the sample (it is 0) but the
    offset gradient is the right-hand derivative: compare with a one-sided difference."""
    x = rng.standard_normal((1, 2, 4, 5))
    w = rng.standard_normal((3, 2, 1, 1))
    offset = np.zeros((1, 2, 4, 5))
    offset[0, 0, 0, 1] = -1.0  # output (0, 1): p_y = -1, p_x = 1
    offset[0, 1, 0, 1] = 0.4  # p_x = 1.4
    out, cache = fwd(input=x, offset=offset, weight=w)
    dy = rng.standard_normal(out.shape)
    g = deform_conv2d_backward(dy, cache)
    h = 1e-7
    plus = offset.copy()
    plus[0, 0, 0, 1] += h
    right = (np.sum(fwd(input=x, offset=plus, weight=w)[0] * dy) - np.sum(out * dy)) / h
    assert g["offset"][0, 0, 0, 1] != 0.0
    assert np.isclose(g["offset"][0, 0, 0, 1], right, rtol=1e-6, atol=0)
    minus = offset.copy()
    minus[0, 0, 0, 1] -= h
    assert np.sum(fwd(input=x, offset=minus, weight=w)[0] * dy) == np.sum(out * dy)  # flat from the left


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, 1e30])
def test_non_finite_offsets(rng, bad):
    a = make_case(rng, UNEVEN[1], safe=False)
    a["offset"][1, 3, 2, 1] = bad  # dx of group 0, tap 1 at output (2, 1) of image 1
    a["offset"][2, 0, 0, 0] = bad
    with warnings.catch_warnings(), np.errstate(all="raise"):
        warnings.simplefilter("error")
        out, cache = fwd(**a)
        g = deform_conv2d_backward(rng.standard_normal(out.shape), cache)
    assert np.all(np.isfinite(out))
    for v in g.values():
        assert np.all(np.isfinite(v))
    assert g["offset"][1, 2, 2, 1] == 0 and g["offset"][1, 3, 2, 1] == 0
    assert g["offset"][2, 0, 0, 0] == 0 and g["offset"][2, 1, 0, 0] == 0
    assert g["mask"][1, 1, 2, 1] == 0 and g["mask"][2, 0, 0, 0] == 0
    # the same as an offset that moves the sample far outside the image
    far = {**a, "offset": np.where(np.isfinite(a["offset"]) & (np.abs(a["offset"]) < 1e3), a["offset"], 1e3)}
    np.testing.assert_array_equal(out, fwd(**far)[0])


# ---- argument checks ----------------------------------------------------------------


def _bad(rng, **changes):
    a = make_case(rng, UNEVEN[1])
    a.update(changes)
    return a


BAD_CASES = [
    # (description, changes, exception, message regex); UNEVEN[1] has out_hw (3, 5), 36 offset and 18 mask channels
    ("offset channels not a multiple of 2*kh*kw", dict(offset=np.zeros((3, 35, 3, 5))), ValueError, r"offset must have 2 \* offset_groups \* kh \* kw channels.*got offset shape \(3, 35, 3, 5\)"),
    ("offset with no channels", dict(offset=np.zeros((3, 0, 3, 5))), ValueError, r"offset must have 2 \* offset_groups"),
    ("offset groups do not divide C_in", dict(offset=np.zeros((3, 48, 3, 5)), mask=None), ValueError, r"divisible by offset_groups = 4.*input with 6 channels"),
    ("wrong output size in offset", dict(offset=np.zeros((3, 36, 3, 4))), ValueError, r"offset must have shape \(3, 36, 3, 5\).*got \(3, 36, 3, 4\)"),
    ("offset batch mismatch", dict(offset=np.zeros((2, 36, 3, 5))), ValueError, r"offset must have shape \(3, 36, 3, 5\).*got \(2, 36, 3, 5\)"),
    ("mask channels do not match", dict(mask=np.zeros((3, 12, 3, 5))), ValueError, r"mask must have shape \(3, 18, 3, 5\).*got \(3, 12, 3, 5\)"),
    ("wrong output size in mask", dict(mask=np.zeros((3, 18, 4, 5))), ValueError, r"mask must have shape \(3, 18, 3, 5\).*got \(3, 18, 4, 5\)"),
    ("C_in not divisible by weight.shape[1]", dict(weight=np.zeros((4, 4, 3, 2))), ValueError, r"input channels must be a positive multiple of weight.shape\[1\].*6 channels.*\(4, 4, 3, 2\)"),
    ("C_out not divisible by groups", dict(weight=np.zeros((5, 3, 3, 2)), bias=None), ValueError, r"output channels must be divisible by groups = 2.*\(5, 3, 3, 2\)"),
    ("bias shape", dict(bias=np.zeros(5)), ValueError, r"bias must have shape \(4,\), got \(5,\)"),
    ("input rank", dict(input=np.zeros((6, 8, 6))), ValueError, r"input must have 4 dimensions.*got shape \(6, 8, 6\)"),
    ("integer input", dict(input=np.zeros((3, 6, 8, 6), dtype=np.int64)), TypeError, r"input must have dtype float32 or float64, got int64"),
    ("integer offset", dict(offset=np.zeros((3, 36, 3, 5), dtype=np.int32)), TypeError, r"offset must have dtype float32 or float64, got int32"),
    ("mixed dtypes", dict(mask=np.zeros((3, 18, 3, 5), dtype=np.float32)), TypeError, r"mask must have the same dtype as input \(float64\), got float32"),
    ("not an array", dict(weight=[[1.0]]), TypeError, r"weight must be a numpy.ndarray, got list"),
    ("kernel larger than input", dict(weight=np.zeros((4, 3, 9, 2)), mask=None), ValueError, r"output height would be -3"),
    ("bad stride", dict(stride=(0, 1)), ValueError, r"stride must be >= 1"),
    ("bad padding", dict(padding=-1), ValueError, r"padding must be >= 0"),
]


@pytest.mark.parametrize("desc,changes,exc,msg", BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_bad_arguments(rng, desc, changes, exc, msg):
    with pytest.raises(exc, match=msg):
        F.deform_conv2d(**_bad(rng, **changes), backend=BACKEND)


def test_input_without_channels_raises_naming_input():
    """0 input channels made the weight groups 0 and raised ZeroDivisionError (found by tests/fuzz)."""
    with pytest.raises(ValueError, match="input channels must be a positive multiple of weight.shape"):
        F.deform_conv2d(np.zeros((1, 0, 4, 4)), np.zeros((1, 18, 2, 2)), np.zeros((4, 1, 3, 3)), backend=BACKEND)


def test_bad_backend_and_budget(rng):
    a = make_case(rng, UNEVEN[1])
    with pytest.raises(ValueError, match="backend must be one of"):
        F.deform_conv2d(**a, backend="fortran")
    # not a string (found by tests/fuzz: a list raised "unhashable type" without naming backend)
    for bad in (["numpy"], {"numpy": 1}, 3):
        with pytest.raises(TypeError, match="backend must be one of"):
            F.deform_conv2d(**a, backend=bad)
        with pytest.raises(TypeError, match="backend must be one of"):
            F.batch_map_offsets(a["input"][:, 0], np.zeros(a["input"][:, 0].shape + (2,)), backend=bad)
    with pytest.raises(ValueError, match="column_budget_bytes must be >= 1, got 0"):
        F.deform_conv2d(**a, backend=BACKEND, column_budget_bytes=0)
    with pytest.raises(TypeError, match="column_budget_bytes must be an int"):
        F.deform_conv2d(**a, backend=BACKEND, column_budget_bytes=1.5)


def test_bad_grad_out(rng):
    out, cache = fwd(**make_case(rng, UNEVEN[1]))
    with pytest.raises(ValueError, match=r"grad_out must have shape \(3, 4, 3, 5\), got \(3, 4, 3, 4\)"):
        deform_conv2d_backward(np.zeros((3, 4, 3, 4)), cache)
    with pytest.raises(TypeError, match=r"grad_out must have the same dtype as the forward's input \(float64\), got float32"):
        deform_conv2d_backward(np.zeros(out.shape, dtype=np.float32), cache)


class _FakeCudaArray:
    """Looks like a CUDA array to npattn (it has __cuda_array_interface__) but is none."""

    __cuda_array_interface__ = {"shape": (1, 1, 3, 3), "typestr": "<f8", "data": (0, False), "version": 3}
    shape, dtype, ndim = (1, 1, 3, 3), np.dtype(np.float64), 4


def test_cuda_arrays_need_the_cuda_backend_and_cupy():
    """CUDA arrays run on backend='cuda' only; without CuPy (or a GPU) the error says so
    and names the argument (on a GPU machine with CuPy, tests/cudasim covers the rest)."""
    from npattn._xp import cupy_or_reason
    from npattn.sampling import BackendUnavailable

    x = _FakeCudaArray()
    w = np.ones((1, 1, 1, 1))
    off = np.zeros((1, 2, 3, 3))
    with pytest.raises(ValueError, match="CUDA arrays run on backend='cuda'; got backend='numba'"):
        deform_conv2d_forward(x, off, w, backend="numba")
    if cupy_or_reason()[0] is None:
        with pytest.raises(BackendUnavailable, match="input is a CUDA array, which needs CuPy"):
            deform_conv2d_forward(x, off, w)


def test_stated_groups_and_offset_groups(rng):
    """groups / offset_groups, when stated, must agree with the shapes; the result is the
    inferred one's (the manifest states both for every deform case)."""
    x = rng.standard_normal((2, 4, 5, 6))
    weight = rng.standard_normal((6, 2, 3, 3))  # groups 2
    offset = rng.uniform(-1.5, 1.5, (2, 2 * 2 * 9, 3, 4))  # offset groups 2
    y0, _ = deform_conv2d_forward(x, offset, weight)
    y1, _ = deform_conv2d_forward(x, offset, weight, groups=2, offset_groups=2)
    assert np.array_equal(y0, y1)
    with pytest.raises(ValueError, match=r"groups=1 disagrees with the shapes, which give groups = 2"):
        deform_conv2d_forward(x, offset, weight, groups=1)
    with pytest.raises(ValueError, match=r"offset_groups=4 disagrees with the shapes, which give offset_groups = 2"):
        deform_conv2d_forward(x, offset, weight, offset_groups=4)
    with pytest.raises(TypeError, match="offset_groups must be an int"):
        deform_conv2d_forward(x, offset, weight, offset_groups=2.0)
