"""The seed's deformable sampling: batch_map_offsets and the ConvOffset2D block, against
scalar-Python oracles written from the seed's code, and finite differences."""

import warnings

import numpy as np
import pytest

import npattn
from npattn import functional as F
from npattn.functional.deform import batch_map_offsets_backward, batch_map_offsets_forward
from npattn.gradcheck import gradcheck, gradcheck_block

BACKEND = "numpy"


def oracle_clamped(img, r, c):
    """One point of the seed's th_batch_map_coordinates: clamp per axis, floor/ceil corners."""
    h, w = img.shape
    r, c = min(max(r, 0.0), h - 1.0), min(max(c, 0.0), w - 1.0)
    r0, r1, c0, c1 = int(np.floor(r)), int(np.ceil(r)), int(np.floor(c)), int(np.ceil(c))
    fr, fc = r - r0, c - c0
    left = fr * (img[r1, c0] - img[r0, c0]) + img[r0, c0]
    right = fr * (img[r1, c1] - img[r0, c1]) + img[r0, c1]
    return fc * (right - left) + left


def oracle_batch_map_offsets(x, offsets):
    b, h, w = x.shape
    out = np.zeros((b, h, w))
    for n in range(b):
        for i in range(h):
            for j in range(w):
                out[n, i, j] = oracle_clamped(x[n], i + offsets[n, i, j, 0], j + offsets[n, i, j, 1])
    return out


def away_from_integers(rng, lo, hi, shape, margin=0.05):
    v = rng.uniform(lo, hi, shape)
    f = v - np.floor(v)
    return np.floor(v) + np.clip(f, margin, 1 - margin)


@pytest.fixture
def rng():
    return np.random.default_rng(77)


# ---- batch_map_offsets --------------------------------------------------------------


def test_batch_map_offsets_matches_oracle_non_square(rng):
    x = rng.standard_normal((3, 5, 7))
    offsets = rng.uniform(-3, 3, (3, 5, 7, 2))
    offsets[0, :2] = np.round(offsets[0, :2])  # integer coordinates too
    out = F.batch_map_offsets(x, offsets, backend=BACKEND)
    assert out.shape == (3, 5, 7)
    np.testing.assert_allclose(out, oracle_batch_map_offsets(x, offsets), rtol=1e-15, atol=1e-15)


def test_batch_map_offsets_zero_offsets_is_identity(rng):
    x = rng.standard_normal((2, 4, 6))
    out, cache = batch_map_offsets_forward(x, np.zeros((2, 4, 6, 2)), backend=BACKEND)
    np.testing.assert_array_equal(out, x)
    g = batch_map_offsets_backward(np.ones_like(x), cache)
    np.testing.assert_array_equal(g["input"], np.ones_like(x))
    np.testing.assert_array_equal(g["offsets"], 0)  # integer coordinates: the seed's zero gradient


def test_batch_map_offsets_gradients_by_finite_differences(rng):
    """Coordinates at least 0.05 from integers: most inside the map, some clamped."""
    b, h, w = 2, 5, 4
    rows = np.where(rng.random((b, h, w)) < 0.75, away_from_integers(rng, 0, h - 1, (b, h, w)), away_from_integers(rng, -3, h + 2, (b, h, w)))
    cols = np.where(rng.random((b, h, w)) < 0.75, away_from_integers(rng, 0, w - 1, (b, h, w)), away_from_integers(rng, -3, w + 2, (b, h, w)))
    grid_r, grid_c = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    offsets = np.stack([rows - grid_r, cols - grid_c], axis=-1)
    x = rng.standard_normal((b, h, w))

    def fwd(input, offsets):
        return batch_map_offsets_forward(input, offsets, backend=BACKEND)

    report = gradcheck(fwd, batch_map_offsets_backward, {"input": x, "offsets": offsets})
    assert report.ok and report.max_rel_err < 1e-8, str(report)


def test_batch_map_offsets_nan_offsets(rng):
    x = rng.standard_normal((2, 3, 4))
    offsets = rng.uniform(-1, 1, (2, 3, 4, 2))
    offsets[1, 2, 3, 0] = np.nan
    offsets[0, 0, 0] = [np.inf, -np.inf]
    with warnings.catch_warnings(), np.errstate(all="raise"):
        warnings.simplefilter("error")
        out, cache = batch_map_offsets_forward(x, offsets, backend=BACKEND)
        g = batch_map_offsets_backward(np.ones_like(x), cache)
    assert out[1, 2, 3] == 0
    np.testing.assert_array_equal(g["offsets"][1, 2, 3], 0)
    assert out[0, 0, 0] == x[0, 2, 0]  # +inf row -> last row, -inf col -> first column
    np.testing.assert_array_equal(g["offsets"][0, 0, 0], 0)


@pytest.mark.parametrize(
    "x,offsets,exc,msg",
    [
        (np.zeros((2, 3, 4)), np.zeros((2, 3, 4)), ValueError, r"offsets must have 4 dimensions \(B, H, W, 2\), got shape \(2, 3, 4\)"),
        (np.zeros((2, 3, 4)), np.zeros((2, 4, 3, 2)), ValueError, r"offsets must have shape \(2, 3, 4, 2\) \(B, H, W, 2\), got \(2, 4, 3, 2\)"),
        (np.zeros((2, 3, 4, 1)), np.zeros((2, 3, 4, 2)), ValueError, r"input must have 3 dimensions \(B, H, W\)"),
        (np.zeros((2, 3, 4), dtype=np.int64), np.zeros((2, 3, 4, 2)), TypeError, r"input must have dtype float32 or float64, got int64"),
        (np.zeros((2, 3, 4)), np.zeros((2, 3, 4, 2), dtype=np.float32), TypeError, r"offsets must have the same dtype as input \(float64\), got float32"),
    ],
)
def test_batch_map_offsets_bad_arguments(x, offsets, exc, msg):
    with pytest.raises(exc, match=msg):
        F.batch_map_offsets(x, offsets, backend=BACKEND)


# ---- ConvOffset2D -------------------------------------------------------------------


def oracle_conv_offset2d(x, weight):
    """The seed's forward, written out: conv (checked on its own in test_functional),
    then the (b, 2c, h, w) -> (b*c, h, w, 2) memory reinterpretation by explicit index."""
    b, c, h, w = x.shape
    t, _ = F.conv2d_forward(x, weight, None, stride=1, padding=1)  # (b, 2c, h, w)
    out = np.zeros_like(x)
    for n in range(b):
        for ch in range(c):
            block = t[n, 2 * ch : 2 * ch + 2].ravel()  # the 2hw values of conv channels 2c, 2c+1
            for i in range(h):
                for j in range(w):
                    dy, dx = block[2 * (i * w + j)], block[2 * (i * w + j) + 1]
                    out[n, ch, i, j] = oracle_clamped(x[n, ch], i + dy, j + dx)
    return out


def test_conv_offset2d_state_and_init():
    blk = npattn.ConvOffset2D(8, rng=0)
    assert list(blk.state_dict()) == ["weight"] and blk.parameter_names() == ["weight"]
    w = blk["weight"]
    assert w.shape == (16, 8, 3, 3) and w.dtype == np.float32
    assert 0.009 < w.std() < 0.011 and abs(w.mean()) < 0.001  # N(0, 0.01)
    np.testing.assert_array_equal(npattn.ConvOffset2D(8, rng=0)["weight"], w)
    assert npattn.ConvOffset2D(3, init_normal_stddev=0.5, rng=1)["weight"].std() > 0.3


def test_conv_offset2d_forward_is_the_reinterpretation_not_a_permute(rng):
    blk = npattn.ConvOffset2D(3, rng=1, dtype=np.float64, backend=BACKEND)
    blk.load_state_dict({"weight": rng.normal(0, 0.4, (6, 3, 3, 3))})
    x = rng.standard_normal((2, 3, 5, 4))
    y, _ = blk.forward(x)
    expected = oracle_conv_offset2d(x, blk["weight"])
    np.testing.assert_allclose(y, expected, rtol=1e-14, atol=1e-14)
    # a permute (d_row, d_col) = (t[2c], t[2c+1]) at the same pixel gives other numbers
    t, _ = F.conv2d_forward(x, blk["weight"], None, stride=1, padding=1)
    permuted = t.reshape(2, 3, 2, 5, 4).transpose(0, 1, 3, 4, 2).reshape(6, 5, 4, 2)
    y_perm = F.batch_map_offsets(x.reshape(6, 5, 4), permuted, backend=BACKEND).reshape(x.shape)
    assert np.max(np.abs(y_perm - y)) > 0.1


def test_conv_offset2d_gradcheck(rng):
    """Every input element and weight; offsets large enough that every coordinate is at
    1e-4 from an integer (checked; a finite-difference step of 1e-6 moves them by about
    1e-6), some of them clamped at the border."""
    blk = npattn.ConvOffset2D(3, dtype=np.float64, backend=BACKEND)
    blk.load_state_dict({"weight": rng.normal(0, 0.3, (6, 3, 3, 3))})
    x = rng.standard_normal((2, 3, 5, 4))
    t, _ = F.conv2d_forward(x, blk["weight"], None, stride=1, padding=1)
    off = t.reshape(6, 5, 4, 2)
    grid = np.stack(np.meshgrid(np.arange(5), np.arange(4), indexing="ij"), axis=-1)
    coords = off + grid
    frac = np.abs(coords - np.round(coords))
    assert frac.min() > 1e-4  # the test's premise: no coordinate within FD reach of a kink
    assert np.any(coords[..., 0] < 0) or np.any(coords[..., 0] > 4)  # some clamping happens
    report = gradcheck_block(blk, (x,))
    assert {t.name for t in report.tensors} == {"input.0", "param.weight"}
    assert report.ok and report.max_rel_err < 1e-8, str(report)


def test_conv_offset2d_float32_and_checks(rng):
    blk = npattn.ConvOffset2D(2, rng=3, backend=BACKEND)
    x = rng.standard_normal((1, 2, 3, 5)).astype(np.float32)
    y, cache = blk.forward(x)
    assert y.dtype == np.float32 and y.shape == x.shape
    (d_x,), params = blk.backward(np.ones_like(y), cache)
    assert d_x.dtype == np.float32 and params["weight"].dtype == np.float32
    with pytest.raises(ValueError, match=r"ConvOffset2D: x must have 2 channels, got shape \(1, 3, 3, 5\)"):
        blk.forward(np.zeros((1, 3, 3, 5), dtype=np.float32))
    with pytest.raises(TypeError, match=r"x has dtype float64 but the block's parameters are float32"):
        blk.forward(x.astype(np.float64))
    with pytest.raises(ValueError, match=r"grad_out must have shape \(1, 2, 3, 5\), got \(1, 2, 3, 4\)"):
        blk.backward(np.ones((1, 2, 3, 4), dtype=np.float32), cache)
    with pytest.raises(ValueError, match="filters must be >= 1"):
        npattn.ConvOffset2D(0)
