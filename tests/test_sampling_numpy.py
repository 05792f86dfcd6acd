"""The NumPy sampling backend (npattn/sampling/numpy.py) against independent references:
a plain-Python loop oracle of torchvision's bilinear rule, scipy.ndimage.map_coordinates,
hand-computed values, the adjoint identity, and finite differences."""

import warnings

import numpy as np
import pytest
import scipy.ndimage as ndi

from npattn.gradcheck import gradcheck
from npattn.sampling import numpy as B

# ---- plain-Python oracles (float64, scalar loops) -----------------------------------


def oracle_bilinear(img, y, x):
    """torchvision's bilinear_interpolate, one scalar at a time."""
    h, w = len(img), len(img[0])
    if y <= -1 or y >= h or x <= -1 or x >= w:
        return 0.0
    y0, x0 = int(np.floor(y)), int(np.floor(x))
    ly, lx = y - y0, x - x0

    def v(r, c):
        return float(img[r][c]) if 0 <= r < h and 0 <= c < w else 0.0

    return (1 - ly) * (1 - lx) * v(y0, x0) + (1 - ly) * lx * v(y0, x0 + 1) + ly * (1 - lx) * v(y0 + 1, x0) + ly * lx * v(y0 + 1, x0 + 1)


def oracle_im2col(x, offset, mask, kernel_hw, stride, padding, dilation, out_hw, groups):
    n, c, _, _ = x.shape
    kh, kw = kernel_hw
    out = np.zeros((n, c, kh, kw) + tuple(out_hw))
    for b in range(n):
        for ch in range(c):
            g = ch // (c // groups)
            for i in range(kh):
                for j in range(kw):
                    k = i * kw + j
                    for oy in range(out_hw[0]):
                        for ox in range(out_hw[1]):
                            py = oy * stride[0] - padding[0] + i * dilation[0] + offset[b, 2 * (g * kh * kw + k), oy, ox]
                            px = ox * stride[1] - padding[1] + j * dilation[1] + offset[b, 2 * (g * kh * kw + k) + 1, oy, ox]
                            m = 1.0 if mask is None else mask[b, g * kh * kw + k, oy, ox]
                            out[b, ch, i, j, oy, ox] = m * oracle_bilinear(x[b, ch], py, px)
    return out


def positions(offset, kernel_hw, stride, padding, dilation, out_hw, groups):
    """Sample positions p_y, p_x as (N, G, K, out_h, out_w), from the definition."""
    n = offset.shape[0]
    kh, kw = kernel_hw
    off = offset.reshape(n, groups, kh * kw, 2, *out_hw)
    i = np.arange(kh).repeat(kw)[:, None, None]
    j = np.tile(np.arange(kw), kh)[:, None, None]
    oy = np.arange(out_hw[0])[None, :, None]
    ox = np.arange(out_hw[1])[None, None, :]
    return (oy * stride[0] - padding[0] + i * dilation[0]) + off[:, :, :, 0], (ox * stride[1] - padding[1] + j * dilation[1]) + off[:, :, :, 1]


# An uneven geometry (torchvision's test settings): kernel (3, 2), stride (2, 1),
# padding (1, 0), dilation (2, 1), 3 offset groups.
GEOM = dict(kernel_hw=(3, 2), stride=(2, 1), padding=(1, 0), dilation=(2, 1))
N, C, H, W, G = 2, 6, 7, 6, 3
OUT_HW = ((H + 2 - 2 * 2 - 1) // 2 + 1, (W - 1 - 1) // 1 + 1)  # (3, 5)
K = 6


def args(x, offset, mask):
    return (x, offset, mask, GEOM["kernel_hw"], GEOM["stride"], GEOM["padding"], GEOM["dilation"])


def offsets_to(rng, p_y, p_x):
    """Offsets that put every sample at the given positions (N, G, K, oh, ow)."""
    base_y, base_x = positions(np.zeros((N, 2 * G * K) + OUT_HW), **GEOM, out_hw=OUT_HW, groups=G)
    off = np.stack([p_y - base_y, p_x - base_x], axis=3)  # (N, G, K, 2, oh, ow)
    return off.reshape(N, 2 * G * K, *OUT_HW)


def away_from_integers(rng, lo, hi, shape, margin=0.05):
    """Uniform in (lo, hi) with every value at least ``margin`` from an integer."""
    v = rng.uniform(lo, hi, shape)
    f = v - np.floor(v)
    return np.floor(v) + np.clip(f, margin, 1 - margin)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


# ---- deform_im2col ------------------------------------------------------------------


@pytest.mark.parametrize("with_mask", [False, True])
def test_im2col_matches_loop_oracle(rng, with_mask):
    x = rng.standard_normal((N, C, H, W))
    # a mix of everything: inside, partly outside, far outside, exact integers, exact -1 and H
    offset = rng.uniform(-4, 4, (N, 2 * G * K) + OUT_HW)
    offset[:, :, 0, :2] = np.round(offset[:, :, 0, :2])
    base_y, base_x = positions(np.zeros_like(offset), **GEOM, out_hw=OUT_HW, groups=G)  # integers
    offset[0, 0, 1, 1] = -1 - base_y[0, 0, 0, 1, 1]  # p_y = -1 exactly
    offset[0, 1, 1, 2] = W - base_x[0, 0, 0, 1, 2]  # p_x = W exactly
    offset[1, 3, 2, 3] = -1 - base_x[1, 0, 1, 2, 3]  # p_x = -1 exactly
    offset[1, 4, 0, 0] = H - base_y[1, 0, 2, 0, 0]  # p_y = H exactly
    mask = rng.uniform(-1, 2, (N, G * K) + OUT_HW) if with_mask else None
    cols = B.deform_im2col(*args(x, offset, mask), OUT_HW, G)
    expected = oracle_im2col(x, offset, mask, GEOM["kernel_hw"], GEOM["stride"], GEOM["padding"], GEOM["dilation"], OUT_HW, G)
    assert cols.shape == (N, C, 3, 2) + OUT_HW
    np.testing.assert_allclose(cols, expected, rtol=1e-14, atol=1e-14)


def test_im2col_matches_scipy_map_coordinates(rng):
    """Interior samples: scipy's order-1 spline is bilinear interpolation; with
    mode="grid-constant" it also zero-pads as torchvision does, on any position."""
    x = rng.standard_normal((N, C, H, W))
    offset = rng.uniform(-5, 5, (N, 2 * G * K) + OUT_HW)
    cols = B.deform_im2col(*args(x, offset, None), OUT_HW, G).reshape(N, G, C // G, K, *OUT_HW)
    p_y, p_x = positions(offset, **GEOM, out_hw=OUT_HW, groups=G)
    interior = (p_y >= 0) & (p_y <= H - 1) & (p_x >= 0) & (p_x <= W - 1)
    assert 50 < interior.sum() < interior.size  # both kinds present
    xg = x.reshape(N, G, C // G, H, W)
    for n in range(N):
        for g in range(G):
            for cc in range(C // G):
                img = xg[n, g, cc]
                coords = [p_y[n, g].ravel(), p_x[n, g].ravel()]
                got = cols[n, g, cc].ravel()
                inside = interior[n, g].ravel()
                ref = ndi.map_coordinates(img, coords, order=1)
                np.testing.assert_allclose(got[inside], ref[inside], rtol=1e-13, atol=1e-13)
                ref_all = ndi.map_coordinates(img, coords, order=1, mode="grid-constant", cval=0.0)
                np.testing.assert_allclose(got, ref_all, rtol=1e-13, atol=1e-13)


def test_im2col_hand_computed_half_pixel_offset():
    """ONNX's node-test case: 3x3 arange input, one row offset of 0.5 at tap (0, 0) of
    output (0, 0); a 2x2 kernel of ones sums the taps by hand."""
    x = np.arange(9.0).reshape(1, 1, 3, 3)
    offset = np.zeros((1, 8, 2, 2))
    offset[0, 0, 0, 0] = 0.5
    cols = B.deform_im2col(x, offset, None, (2, 2), (1, 1), (0, 0), (1, 1), (2, 2), 1)
    # output (0, 0): x at (0.5, 0) = 1.5, then x[0, 1], x[1, 0], x[1, 1] = 1, 3, 4
    assert cols[0, 0, 0, 0, 0, 0] == 1.5
    np.testing.assert_array_equal(cols.sum(axis=(2, 3))[0, 0], [[9.5, 12.0], [20.0, 24.0]])


def test_im2col_float32_stays_float32(rng):
    x = rng.standard_normal((N, C, H, W)).astype(np.float32)
    offset = rng.uniform(-2, 2, (N, 2 * G * K) + OUT_HW).astype(np.float32)
    mask = rng.uniform(0, 1, (N, G * K) + OUT_HW).astype(np.float32)
    cols = B.deform_im2col(*args(x, offset, mask), OUT_HW, G)
    assert cols.dtype == np.float32
    d_cols = rng.standard_normal(cols.shape).astype(np.float32)
    assert B.deform_col2im(d_cols, offset, mask, x.shape, *args(x, offset, mask)[3:], G).dtype == np.float32
    d_off, d_mask = B.deform_col2im_coord(d_cols, *args(x, offset, mask), G)
    assert d_off.dtype == np.float32 and d_mask.dtype == np.float32
    ref = B.deform_im2col(*args(x.astype(np.float64), offset.astype(np.float64), mask.astype(np.float64)), OUT_HW, G)
    np.testing.assert_allclose(cols, ref, rtol=1e-5, atol=1e-5)


# ---- deform_col2im: the adjoint of im2col in x --------------------------------------


@pytest.mark.parametrize("with_mask", [False, True])
def test_col2im_is_the_adjoint_of_im2col(rng, with_mask):
    """<im2col(x), D> = <x, col2im(D)> for every x and D (im2col is linear in x)."""
    x = rng.standard_normal((N, C, H, W))
    offset = rng.uniform(-4, 4, (N, 2 * G * K) + OUT_HW)
    offset[:, :, :, 0] = np.round(offset[:, :, :, 0])  # integer positions too
    mask = rng.uniform(-1, 2, (N, G * K) + OUT_HW) if with_mask else None
    d_cols = rng.standard_normal((N, C, 3, 2) + OUT_HW)
    cols = B.deform_im2col(*args(x, offset, mask), OUT_HW, G)
    d_x = B.deform_col2im(d_cols, offset, mask, x.shape, *args(x, offset, mask)[3:], G)
    assert d_x.shape == x.shape
    lhs, rhs = np.sum(cols * d_cols), np.sum(x * d_x)
    assert abs(lhs - rhs) <= 1e-12 * max(abs(lhs), 1.0)
    # and element by element: d_x is the Jacobian-transpose product, column by column
    for idx in [(0, 0, 0, 0), (1, 5, 6, 5), (1, 2, 3, 1)]:
        e = np.zeros_like(x)
        e[idx] = 1.0
        assert np.isclose(np.sum(B.deform_im2col(*args(e, offset, mask), OUT_HW, G) * d_cols), d_x[idx], rtol=1e-12, atol=1e-12)


# ---- deform_col2im_coord: offset and mask gradients ----------------------------------


def _op_forward(x, offset, mask):
    return B.deform_im2col(*args(x, offset, mask), OUT_HW, G), (x, offset, mask)


def _op_backward(d_cols, cache):
    x, offset, mask = cache
    d_off, d_mask = B.deform_col2im_coord(d_cols, *args(x, offset, mask), G)
    return {"x": B.deform_col2im(d_cols, offset, mask, x.shape, *args(x, offset, mask)[3:], G), "offset": d_off, "mask": d_mask}


@pytest.mark.parametrize("region", ["interior", "border_cells"])
def test_sampling_gradients_by_finite_differences(rng, region):
    """Positions at least 0.05 from any integer (the kinks of bilinear sampling): inside
    (0, H-1) x (0, W-1), or in the border cells (-1, 0) and (H-1, H) where some corners
    are outside the image."""
    if region == "interior":
        p_y = away_from_integers(rng, 0, H - 1, (N, G, K) + OUT_HW)
        p_x = away_from_integers(rng, 0, W - 1, (N, G, K) + OUT_HW)
    else:
        side = rng.random((N, G, K) + OUT_HW) < 0.5
        p_y = np.where(side, away_from_integers(rng, -1, 0, side.shape), away_from_integers(rng, H - 1, H, side.shape))
        p_x = away_from_integers(rng, -1, W, side.shape)
    offset = offsets_to(rng, p_y, p_x)
    x = rng.standard_normal((N, C, H, W))
    mask = rng.uniform(-1, 2, (N, G * K) + OUT_HW)
    report = gradcheck(_op_forward, _op_backward, {"x": x, "offset": offset, "mask": mask}, max_full_size=1200)
    assert report.ok
    assert report.max_rel_err < 1e-8, str(report)


def test_offset_gradient_at_p_equal_minus_one_is_the_right_derivative(rng):
    """At exactly p_y = -1 the sample is 0 but npattn (as torchvision) returns the
    derivative from the right, which is nonzero; check it against a one-sided finite
    difference (exact up to rounding: the sample is linear in p_y on the cell)."""
    x = rng.standard_normal((1, 1, 4, 5))
    offset = np.zeros((1, 2, 1, 1))
    offset[0, 0] = -1.0  # p_y = -1
    offset[0, 1] = 2.3  # p_x = 2.3
    d_cols = np.ones((1, 1, 1, 1, 1, 1))
    a = (x, offset, None, (1, 1), (1, 1), (0, 0), (1, 1))
    assert B.deform_im2col(*a, (1, 1), 1)[0, 0, 0, 0, 0, 0] == 0.0
    d_off, _ = B.deform_col2im_coord(d_cols, *a, 1)
    h = 1e-7
    plus = offset.copy()
    plus[0, 0] += h
    right = (B.deform_im2col(x, plus, None, *a[3:], (1, 1), 1)[0, 0, 0, 0, 0, 0] - 0.0) / h
    expected = 0.7 * x[0, 0, 0, 2] + 0.3 * x[0, 0, 0, 3]  # d/dp_y of (p_y + 1) * row 0 at x = 2.3
    assert d_off[0, 0, 0, 0] != 0.0
    assert np.isclose(d_off[0, 0, 0, 0], expected, rtol=1e-14)
    assert np.isclose(d_off[0, 0, 0, 0], right, rtol=1e-6)
    # the x-direction derivative on the line p_y = -1 is 0 (the sample is 0 all along it)
    assert d_off[0, 1, 0, 0] == 0.0
    # and no input gradient: the sample reads nothing
    assert np.all(B.deform_col2im(d_cols, offset, None, x.shape, *a[3:], 1) == 0)


def test_offset_gradient_at_integer_positions_is_one_sided(rng):
    """At an integer position the offset gradient is the derivative on the cell to the
    right/below (torchvision's floor rule), not the average of both sides."""
    x = rng.standard_normal((1, 1, 4, 5))
    offset = np.array([1.0, 2.0]).reshape(1, 2, 1, 1)  # p = (1, 2) exactly
    d_off, _ = B.deform_col2im_coord(np.ones((1, 1, 1, 1, 1, 1)), x, offset, None, (1, 1), (1, 1), (0, 0), (1, 1), 1)
    assert d_off[0, 0, 0, 0] == x[0, 0, 2, 2] - x[0, 0, 1, 2]
    assert d_off[0, 1, 0, 0] == x[0, 0, 1, 3] - x[0, 0, 1, 2]


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, 1e30, -1e30])
def test_non_finite_and_huge_offsets_sample_zero_with_zero_gradients(rng, bad):
    x = rng.standard_normal((N, C, H, W))
    offset = rng.uniform(-2, 2, (N, 2 * G * K) + OUT_HW)
    mask = rng.uniform(0, 1, (N, G * K) + OUT_HW)
    hit = np.zeros(offset.shape, dtype=bool)
    hit[0, 0, 1, 2] = hit[1, 7, 0, 0] = hit[1, 2 * G * K - 1, 2, 4] = True  # dy, dx and dx components
    bad_offset = np.where(hit, bad, offset)
    far_offset = np.where(hit, 1e3, offset)  # finite and far outside: same semantics
    d_cols = rng.standard_normal((N, C, 3, 2) + OUT_HW)
    with warnings.catch_warnings(), np.errstate(all="raise"):
        warnings.simplefilter("error")
        cols = B.deform_im2col(*args(x, bad_offset, mask), OUT_HW, G)
        d_x = B.deform_col2im(d_cols, bad_offset, mask, x.shape, *args(x, offset, mask)[3:], G)
        d_off, d_mask = B.deform_col2im_coord(d_cols, *args(x, bad_offset, mask), G)
    assert np.all(np.isfinite(cols)) and np.all(np.isfinite(d_x)) and np.all(np.isfinite(d_off)) and np.all(np.isfinite(d_mask))
    cols_far = B.deform_im2col(*args(x, far_offset, mask), OUT_HW, G)
    np.testing.assert_array_equal(cols, cols_far)
    np.testing.assert_array_equal(d_x, B.deform_col2im(d_cols, far_offset, mask, x.shape, *args(x, offset, mask)[3:], G))
    d_off_far, d_mask_far = B.deform_col2im_coord(d_cols, *args(x, far_offset, mask), G)
    np.testing.assert_array_equal(d_off, d_off_far)
    np.testing.assert_array_equal(d_mask, d_mask_far)
    # the samples that use a bad offset are 0 and have zero offset (both components) and mask gradients
    for n, ch, oy, ox in zip(*np.nonzero(hit)):
        g, k = divmod(ch // 2, K)
        assert np.all(cols.reshape(N, G, C // G, K, *OUT_HW)[n, g, :, k, oy, ox] == 0)
        assert d_off[n, 2 * (g * K + k), oy, ox] == 0 and d_off[n, 2 * (g * K + k) + 1, oy, ox] == 0
        assert d_mask[n, g * K + k, oy, ox] == 0


# ---- the seed's clamped sampling ----------------------------------------------------


def oracle_clamped(img, r, c):
    """The seed's sampling of one point, scalar Python."""
    h, w = len(img), len(img[0])
    r, c = min(max(r, 0.0), h - 1.0), min(max(c, 0.0), w - 1.0)
    r0, r1, c0, c1 = int(np.floor(r)), int(np.ceil(r)), int(np.floor(c)), int(np.ceil(c))
    fr, fc = r - r0, c - c0
    left = fr * (img[r1][c0] - img[r0][c0]) + img[r0][c0]
    right = fr * (img[r1][c1] - img[r0][c1]) + img[r0][c1]
    return fc * (right - left) + left


def test_clamped_sampling_matches_oracle_and_scipy_nearest(rng):
    """scipy's order-1 spline with mode="nearest" on the clamped coordinates is the
    upstream repository's own reference (sp_batch_map_coordinates)."""
    x = rng.standard_normal((3, 5, 7))  # non-square
    coords = np.stack([rng.uniform(-3, 8, (3, 40)), rng.uniform(-3, 10, (3, 40))], axis=-1)
    coords[0, :5] = np.round(coords[0, :5])  # integers, including clamped ones
    out = B.map_coordinates_clamped(x, coords)
    assert out.shape == (3, 40)
    for b in range(3):
        ref = [oracle_clamped(x[b], r, c) for r, c in coords[b]]
        np.testing.assert_allclose(out[b], ref, rtol=1e-15, atol=1e-15)
        clamped = [np.clip(coords[b, :, 0], 0, 4), np.clip(coords[b, :, 1], 0, 6)]
        np.testing.assert_allclose(out[b], ndi.map_coordinates(x[b], clamped, order=1, mode="nearest"), rtol=1e-13, atol=1e-13)


def test_clamped_sampling_hand_computed():
    x = np.arange(12.0).reshape(1, 3, 4)  # x[r, c] = 4 r + c
    coords = np.array([[[0.5, 0.25], [1.0, 2.0], [-5.0, 10.0], [2.5, -1.0], [1.25, 3.5]]])
    # bilinear of a linear function is exact; clamps: (-5, 10) -> (0, 3); (2.5, -1) -> (2, 0); (1.25, 3.5) -> (1.25, 3)
    expected = [2.25, 6.0, 3.0, 8.0, 8.0]
    np.testing.assert_allclose(B.map_coordinates_clamped(x, coords)[0], expected, rtol=0, atol=1e-15)


def _clamped_forward(x, coords):
    return B.map_coordinates_clamped(x, coords), (x, coords)


def _clamped_backward(d_out, cache):
    d_x, d_coords = B.map_coordinates_clamped_backward(d_out, *cache)
    return {"x": d_x, "coords": d_coords}


def test_clamped_sampling_gradients_by_finite_differences(rng):
    """Coordinates away from integers, inside the clamp range and outside it (where the
    clamp makes the output flat in that coordinate)."""
    x = rng.standard_normal((2, 5, 6))
    rows = np.where(rng.random((2, 30)) < 0.7, away_from_integers(rng, 0, 4, (2, 30)), away_from_integers(rng, -3, 8, (2, 30)))
    cols = np.where(rng.random((2, 30)) < 0.7, away_from_integers(rng, 0, 5, (2, 30)), away_from_integers(rng, -3, 9, (2, 30)))
    coords = np.stack([rows, cols], axis=-1)
    report = gradcheck(_clamped_forward, _clamped_backward, {"x": x, "coords": coords})
    assert report.ok
    assert report.max_rel_err < 1e-8, str(report)


def test_clamped_sampling_zero_coordinate_gradient_at_integers_and_outside(rng):
    x = rng.standard_normal((1, 4, 5))
    coords = np.array([[[2.0, 1.5], [1.5, 3.0], [-0.5, 1.5], [1.5, 7.0], [3.0, 4.0], [0.0, 0.0]]])
    d_x, d_coords = B.map_coordinates_clamped_backward(np.ones((1, 6)), x, coords)
    assert d_coords[0, 0, 0] == 0 and d_coords[0, 0, 1] != 0  # integer row
    assert d_coords[0, 1, 1] == 0 and d_coords[0, 1, 0] != 0  # integer col
    assert d_coords[0, 2, 0] == 0 and d_coords[0, 2, 1] != 0  # row clamped
    assert d_coords[0, 3, 1] == 0 and d_coords[0, 3, 0] != 0  # col clamped
    np.testing.assert_array_equal(d_coords[0, 4:], 0)  # corners, clamp bounds
    assert np.isclose(d_x.sum(), 6.0, rtol=1e-14)  # the weights of every sample sum to 1


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_clamped_sampling_nan_and_inf(rng, dtype):
    x = rng.standard_normal((2, 4, 5)).astype(dtype)
    coords = rng.uniform(0, 3, (2, 6, 2)).astype(dtype)
    coords[0, 0, 0] = np.nan
    coords[1, 3, 1] = np.nan
    coords[0, 2] = [np.inf, -np.inf]
    coords[1, 1] = [1e30, 2.5]
    with warnings.catch_warnings(), np.errstate(all="raise"):
        warnings.simplefilter("error")
        out = B.map_coordinates_clamped(x, coords)
        d_x, d_coords = B.map_coordinates_clamped_backward(np.ones((2, 6), dtype=dtype), x, coords)
    assert out.dtype == dtype and d_x.dtype == dtype and d_coords.dtype == dtype
    assert out[0, 0] == 0 and out[1, 3] == 0
    np.testing.assert_array_equal(d_coords[0, 0], 0)
    np.testing.assert_array_equal(d_coords[1, 3], 0)
    assert out[0, 2] == x[0, 3, 0]  # +inf row -> H-1, -inf col -> 0
    np.testing.assert_array_equal(d_coords[0, 2], 0)
    assert np.isclose(out[1, 1], 0.5 * (x[1, 3, 2] + x[1, 3, 3]), rtol=1e-6)
    assert d_coords[1, 1, 0] == 0
    # the NaN pairs scatter nothing: the rest sums to one weight per sample
    assert np.isclose(d_x.sum(dtype=np.float64), 10.0, rtol=1e-6)


def test_backend_contract_names():
    from npattn.sampling import FUNCTIONS

    assert B.unavailable_reason() is None
    for name in FUNCTIONS:
        assert callable(getattr(B, name))
