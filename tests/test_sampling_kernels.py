"""The "numba" sampling backend (npattn/sampling/cpu.py) against the NumPy definition
(npattn/sampling/numpy.py), a plain-Python loop oracle, hand-computed values and finite
differences.

The kernels are also checked as plain Python: CI runs this file with NUMBA_DISABLE_JIT=1
and ``-k "not jit"`` (the tests named ``*jit*`` need Numba's compiler: the on-disk cache
and the threading layer).
"""

import os
import subprocess
import sys

import numba
import numpy as np
import pytest

import npattn
from npattn import sampling
from npattn.gradcheck import gradcheck
from npattn.sampling import cpu
from npattn.sampling import numpy as ref

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name: (N, C, H, W, kernel_hw, stride, padding, dilation, offset_groups); every size is
# small so that the file also runs with NUMBA_DISABLE_JIT=1.
CONFIGS = {
    "uneven": (3, 6, 7, 5, (3, 2), (2, 1), (1, 0), (2, 1), 3),
    "square": (1, 4, 6, 6, (3, 3), (1, 1), (1, 1), (1, 1), 1),
    "wide": (2, 6, 5, 7, (2, 3), (1, 2), (0, 1), (1, 2), 2),
    "batch0": (0, 4, 5, 5, (3, 3), (1, 1), (1, 1), (1, 1), 2),
    "H1": (2, 2, 1, 6, (1, 3), (1, 1), (0, 1), (1, 1), 1),
    "W1": (2, 4, 6, 1, (3, 1), (2, 1), (1, 0), (1, 1), 2),
    "1x1": (2, 3, 4, 3, (1, 1), (1, 1), (0, 0), (1, 1), 3),
}
# normwise relative agreement with numpy.py: max |a - b| <= TOL * max |b|
TOL = {np.float64: 1e-12, np.float32: 1e-6}


def out_hw(cfg):
    n, c, h, w, (kh, kw), (sh, sw), (ph, pw), (dh, dw), g = cfg
    return (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1


def geometry(cfg):
    """The positional arguments after (x/d_cols, offset, mask): kernel, stride, padding, dilation."""
    return cfg[4], cfg[5], cfg[6], cfg[7]


def make_inputs(rng, cfg, dtype, with_mask):
    """x, offset, mask, d_cols; offsets spread over [-2.5, 2.5] (many samples fall
    outside the image), some exact integers, and one position at exactly p_y = -1."""
    n, c, h, w, (kh, kw), stride, (ph, pw), dil, g = cfg
    oh, ow = out_hw(cfg)
    k = kh * kw
    x = rng.standard_normal((n, c, h, w)).astype(dtype)
    offset = rng.uniform(-2.5, 2.5, (n, 2 * g * k, oh, ow))
    offset[:, ::3] = np.round(offset[:, ::3])  # integer positions (the one-sided derivative)
    if n:
        offset[0, 0, 0, 0] = -1.0 + ph  # tap (0, 0) at oy = 0: p_y = -ph + dy = -1 exactly
        offset[0, 1, 0, 0] = 0.3
    offset = offset.astype(dtype)
    mask = rng.uniform(-0.5, 1.5, (n, g * k, oh, ow)).astype(dtype) if with_mask else None
    d_cols = rng.standard_normal((n, c, kh, kw, oh, ow)).astype(dtype)
    return x, offset, mask, d_cols


def assert_matches(actual, expected, dtype, what):
    assert actual.dtype == expected.dtype == np.dtype(dtype), f"{what}: dtype {actual.dtype} vs {expected.dtype}"
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} vs {expected.shape}"
    if expected.size == 0:
        return 0.0
    err = float(np.max(np.abs(actual.astype(np.float64) - expected.astype(np.float64))))
    scale = float(np.max(np.abs(expected)))
    assert err <= TOL[dtype] * scale, f"{what}: max abs difference {err:.3e} (scale {scale:.3e})"
    return err / scale if scale else 0.0


def run_all(backend, x, offset, mask, d_cols, cfg):
    """The three deformable functions of one backend: cols, d_x, d_offset, d_mask."""
    geo = geometry(cfg)
    g = cfg[8]
    cols = backend.deform_im2col(x, offset, mask, *geo, out_hw(cfg), g)
    d_x = backend.deform_col2im(d_cols, offset, mask, x.shape, *geo, g)
    d_offset, d_mask = backend.deform_col2im_coord(d_cols, x, offset, mask, *geo, g)
    return cols, d_x, d_offset, d_mask


# ---- deformable sampling: parity with the NumPy definition ---------------------------


@pytest.mark.parametrize("with_mask", [True, False], ids=["mask", "nomask"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_deform_functions_match_numpy_backend(name, dtype, with_mask):
    cfg = CONFIGS[name]
    rng = np.random.default_rng([7, list(CONFIGS).index(name)])
    x, offset, mask, d_cols = make_inputs(rng, cfg, dtype, with_mask)
    got = run_all(cpu, x, offset, mask, d_cols, cfg)
    want = run_all(ref, x, offset, mask, d_cols, cfg)
    for what, a, b in zip(("cols", "d_x", "d_offset", "d_mask"), got, want):
        if b is None:
            assert a is None, f"{what}: expected None without a mask"
        else:
            assert_matches(a, b, dtype, what)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize(
    "bad", [np.nan, np.inf, -np.inf, 1e30, -1e30, "max", "-max"], ids=["nan", "inf", "-inf", "1e30", "-1e30", "max", "-max"]
)
def test_non_finite_and_huge_offsets_sample_zero_with_zero_gradients(dtype, bad):
    cfg = CONFIGS["uneven"]
    rng = np.random.default_rng(11)
    x, offset, mask, d_cols = make_inputs(rng, cfg, dtype, True)
    value = {"max": np.finfo(dtype).max, "-max": -np.finfo(dtype).max}.get(bad, bad)
    n, c, h, w, (kh, kw), _, _, _, g = cfg
    k = kh * kw
    off = offset.reshape(n, g, k, 2, *out_hw(cfg))
    # (n, g, k, axis, oy, ox): the bad value in dy, in dx, and in both
    hits = [(0, 0, 0, 0, 0, 0), (1, 2, 5, 1, 2, 3), (2, 1, 3, 0, 1, 1), (2, 1, 3, 1, 1, 1)]
    for n_, g_, k_, a_, oy, ox in hits:
        off[n_, g_, k_, a_, oy, ox] = value
    offset = off.reshape(offset.shape)
    cols, d_x, d_offset, d_mask = run_all(cpu, x, offset, mask, d_cols, cfg)
    for arr in (cols, d_x, d_offset, d_mask):
        assert np.all(np.isfinite(arr))
    cpg = c // g
    d_off = d_offset.reshape(off.shape)
    d_m = d_mask.reshape(n, g, k, *out_hw(cfg))
    for n_, g_, k_, _, oy, ox in hits:
        i, j = divmod(k_, kw)
        assert np.all(cols[n_, g_ * cpg : (g_ + 1) * cpg, i, j, oy, ox] == 0)
        assert np.all(d_off[n_, g_, k_, :, oy, ox] == 0)
        assert d_m[n_, g_, k_, oy, ox] == 0
    # the bad samples add nothing to d_x: zeroing their d_cols changes nothing
    d_cols_clean = d_cols.copy()
    for n_, g_, k_, _, oy, ox in hits:
        i, j = divmod(k_, kw)
        d_cols_clean[n_, g_ * cpg : (g_ + 1) * cpg, i, j, oy, ox] = 0
    d_x_clean = cpu.deform_col2im(d_cols_clean, offset, mask, x.shape, *geometry(cfg), g)
    np.testing.assert_array_equal(d_x, d_x_clean)
    for what, a, b in zip(("cols", "d_x", "d_offset", "d_mask"), (cols, d_x, d_offset, d_mask),
                          run_all(ref, x, offset, mask, d_cols, cfg)):
        assert_matches(a, b, dtype, what)


def test_offset_gradient_at_p_minus_one_is_the_right_derivative():
    """p_y = -1 exactly: the sample is 0 but the offset gradient is the derivative on the
    cell [-1, 0] (torchvision's behaviour), hand-computed."""
    x = np.array([[[[2.0, 5.0, -1.0], [7.0, 3.0, 4.0]]]])  # (1, 1, 2, 3)
    offset = np.array([-1.0, 0.25]).reshape(1, 2, 1, 1)  # p = (-1, 0.25) for kernel 1x1
    mask = np.array([0.5]).reshape(1, 1, 1, 1)
    geo = ((1, 1), (1, 1), (0, 0), (1, 1))
    cols = cpu.deform_im2col(x, offset, mask, *geo, (1, 1), 1)
    assert cols.item() == 0.0
    d_cols = np.ones((1, 1, 1, 1, 1, 1))
    d_offset, d_mask = cpu.deform_col2im_coord(d_cols, x, offset, mask, *geo, 1)
    # cell rows -1 (outside, 0) and 0; lx = 0.25: d/dp_y = 0.75 * (2 - 0) + 0.25 * (5 - 0)
    assert d_offset[0, 0, 0, 0] == pytest.approx(0.5 * (0.75 * 2.0 + 0.25 * 5.0), abs=1e-15)
    # d/dp_x on that cell: ly = 0, hy = 1, row -1 is 0: 1 * (0 - 0) + 0 * ... = 0
    assert d_offset[0, 1, 0, 0] == 0.0
    assert d_mask.item() == 0.0  # d_mask = d_cols * sample = 0
    np.testing.assert_array_equal(cpu.deform_col2im(d_cols, offset, mask, x.shape, *geo, 1), np.zeros_like(x))


def test_hand_computed_half_pixel_offset():
    """A single offset of 0.5 on an arange input (ONNX DeformConv's node-test idea)."""
    x = np.arange(12, dtype=np.float64).reshape(1, 1, 3, 4)
    offset = np.zeros((1, 2, 3, 4))
    offset[0, 1, 1, 1] = 0.5  # dx = 0.5 at output (1, 1)
    cols = cpu.deform_im2col(x, offset, None, (1, 1), (1, 1), (0, 0), (1, 1), (3, 4), 1)
    expected = x.copy()
    expected[0, 0, 1, 1] = (5.0 + 6.0) / 2
    np.testing.assert_array_equal(cols.reshape(1, 1, 3, 4), expected)


# ---- an independent plain-Python oracle ----------------------------------------------


def oracle_bilinear(img, y, x):
    """torchvision's bilinear rule, one scalar at a time."""
    h, w = len(img), len(img[0])
    if not (-1 < y < h and -1 < x < w):
        return 0.0
    y0, x0 = int(np.floor(y)), int(np.floor(x))
    ly, lx = y - y0, x - x0
    total = 0.0
    for r, wr in ((y0, 1 - ly), (y0 + 1, ly)):
        for s, ws in ((x0, 1 - lx), (x0 + 1, lx)):
            if 0 <= r < h and 0 <= s < w:
                total += wr * ws * float(img[r][s])
    return total


@pytest.mark.parametrize("name", ["uneven", "wide", "W1"])
def test_im2col_matches_loop_oracle(name):
    cfg = CONFIGS[name]
    n, c, h, w, (kh, kw), (sh, sw), (ph, pw), (dh, dw), g = cfg
    oh, ow = out_hw(cfg)
    rng = np.random.default_rng(3)
    x, offset, mask, _ = make_inputs(rng, cfg, np.float64, True)
    cols = cpu.deform_im2col(x, offset, mask, *geometry(cfg), (oh, ow), g)
    k_taps = kh * kw
    for b in range(n):
        for ch in range(c):
            gg = ch // (c // g)
            for i in range(kh):
                for j in range(kw):
                    k = i * kw + j
                    for oy in range(oh):
                        for ox in range(ow):
                            py = oy * sh - ph + i * dh + offset[b, 2 * (gg * k_taps + k), oy, ox]
                            px = ox * sw - pw + j * dw + offset[b, 2 * (gg * k_taps + k) + 1, oy, ox]
                            want = mask[b, gg * k_taps + k, oy, ox] * oracle_bilinear(x[b, ch], py, px)
                            assert cols[b, ch, i, j, oy, ox] == pytest.approx(want, rel=1e-13, abs=1e-13)


# ---- finite differences (float64, positions away from integers) -----------------------


def _sampling_forward(x, offset, mask):
    cfg = CONFIGS["uneven"]
    return cpu.deform_im2col(x, offset, mask, *geometry(cfg), out_hw(cfg), cfg[8]), (x, offset, mask)


def _sampling_backward(d_cols, cache):
    x, offset, mask = cache
    cfg = CONFIGS["uneven"]
    geo, g = geometry(cfg), cfg[8]
    d_offset, d_mask = cpu.deform_col2im_coord(d_cols, x, offset, mask, *geo, g)
    return {"x": cpu.deform_col2im(d_cols, offset, mask, x.shape, *geo, g), "offset": d_offset, "mask": d_mask}


def test_deform_gradients_by_finite_differences():
    cfg = CONFIGS["uneven"]
    n, c, h, w, (kh, kw), _, _, _, g = cfg
    rng = np.random.default_rng(5)
    x = rng.standard_normal((1, c, h, w))
    shape = (1, 2 * g * kh * kw) + out_hw(cfg)
    # integer base + integer shift + a fraction in [0.15, 0.85]: never on a kink
    offset = rng.integers(-2, 2, shape) + rng.uniform(0.15, 0.85, shape)
    mask = rng.uniform(0.2, 1.2, (1, g * kh * kw) + out_hw(cfg))
    report = gradcheck(_sampling_forward, _sampling_backward, {"x": x, "offset": offset, "mask": mask})
    assert report.ok, str(report)
    assert report.max_rel_err < 1e-7, str(report)


# ---- the seed's clamped sampling -----------------------------------------------------


def make_coords(rng, b, h, w, p, dtype):
    coords = np.stack([rng.uniform(-2, h + 1, (b, p)), rng.uniform(-2, w + 1, (b, p))], axis=-1)
    coords[:, ::4] = np.round(coords[:, ::4])  # integers, bounds 0 and H-1 among them
    if b and p >= 8:
        coords[0, :8] = [[np.nan, 1], [1, np.nan], [np.inf, 0.5], [-np.inf, 0.5], [0.5, np.inf],
                         [0, 0], [h - 1, w - 1], [1e30, -1e30]]
    return coords.astype(dtype)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("shape", [(3, 5, 4, 30), (2, 1, 5, 12), (2, 5, 1, 12), (1, 1, 1, 9), (0, 3, 3, 6), (2, 3, 3, 0)])
def test_clamped_sampling_matches_numpy_backend(shape, dtype):
    b, h, w, p = shape
    rng = np.random.default_rng([b, h, w, p])
    x = rng.standard_normal((b, h, w)).astype(dtype)
    coords = make_coords(rng, b, h, w, p, dtype)
    d_out = rng.standard_normal((b, p)).astype(dtype)
    out = cpu.map_coordinates_clamped(x, coords)
    d_x, d_coords = cpu.map_coordinates_clamped_backward(d_out, x, coords)
    assert_matches(out, ref.map_coordinates_clamped(x, coords), dtype, "out")
    want_dx, want_dc = ref.map_coordinates_clamped_backward(d_out, x, coords)
    assert_matches(d_x, want_dx, dtype, "d_x")
    assert_matches(d_coords, want_dc, dtype, "d_coords")
    if b and p >= 8:
        assert out[0, 0] == 0 and out[0, 1] == 0  # NaN samples 0 ...
        assert np.all(d_coords[0, :2] == 0)  # ... with zero gradients
        # +inf row clamps to the last row, col 0.5 is between columns 0 and 1
        top = x[0, h - 1, 0].astype(np.float64)
        right = x[0, h - 1, min(1, w - 1)].astype(np.float64)
        assert out[0, 2] == pytest.approx(0.5 * top + 0.5 * right, rel=1e-6, abs=1e-6)
        # the clamp blocks the gradient of an infinite or far-away coordinate, and an
        # integer coordinate has zero gradient (floor == ceil)
        assert d_coords[0, 2, 0] == 0 and d_coords[0, 3, 0] == 0 and d_coords[0, 4, 1] == 0
        assert np.all(d_coords[0, 5:8] == 0)


def oracle_clamped(img, r, c):
    """The seed's th_batch_map_coordinates for one (row, col), as plain Python."""
    h, w = len(img), len(img[0])
    r = min(max(r, 0.0), h - 1.0)
    c = min(max(c, 0.0), w - 1.0)
    r0, r1, c0, c1 = int(np.floor(r)), int(np.ceil(r)), int(np.floor(c)), int(np.ceil(c))
    fr, fc = r - r0, c - c0
    left = fr * (img[r1][c0] - img[r0][c0]) + img[r0][c0]
    right = fr * (img[r1][c1] - img[r0][c1]) + img[r0][c1]
    return fc * (right - left) + left


def test_clamped_sampling_matches_loop_oracle():
    rng = np.random.default_rng(9)
    b, h, w, p = 2, 4, 6, 25
    x = rng.standard_normal((b, h, w))
    coords = make_coords(rng, b, h, w, p, np.float64)
    coords[0, :2] = 1.5  # the NaN pairs of make_coords have their own test above
    out = cpu.map_coordinates_clamped(x, coords)
    for bb in range(b):
        for q in range(p):
            assert out[bb, q] == pytest.approx(oracle_clamped(x[bb], *coords[bb, q]), rel=1e-14, abs=1e-14)


def _clamped_forward(x, coords):
    return cpu.map_coordinates_clamped(x, coords), (x, coords)


def _clamped_backward(d_out, cache):
    d_x, d_coords = cpu.map_coordinates_clamped_backward(d_out, *cache)
    return {"x": d_x, "coords": d_coords}


def test_clamped_sampling_gradients_by_finite_differences():
    rng = np.random.default_rng(13)
    b, h, w, p = 2, 4, 5, 20
    x = rng.standard_normal((b, h, w))
    shape = (b, p)
    rows = rng.integers(-2, h + 1, shape) + rng.uniform(0.15, 0.85, shape)
    cols = rng.integers(-2, w + 1, shape) + rng.uniform(0.15, 0.85, shape)
    report = gradcheck(_clamped_forward, _clamped_backward, {"x": x, "coords": np.stack([rows, cols], -1)})
    assert report.ok, str(report)
    assert report.max_rel_err < 1e-7, str(report)


# ---- determinism, threads, caller's arrays, layouts -----------------------------------


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_results_identical_run_to_run_and_for_any_thread_count(dtype):
    cfg = (4, 8, 9, 7, (3, 3), (1, 1), (1, 1), (1, 1), 2)
    rng = np.random.default_rng(17)
    x, offset, mask, d_cols = make_inputs(rng, cfg, dtype, True)
    coords = make_coords(rng, 6, 5, 4, 40, dtype)
    xs = rng.standard_normal((6, 5, 4)).astype(dtype)
    d_out = rng.standard_normal((6, 40)).astype(dtype)

    def everything():
        return (*run_all(cpu, x, offset, mask, d_cols, cfg), cpu.map_coordinates_clamped(xs, coords),
                *cpu.map_coordinates_clamped_backward(d_out, xs, coords))

    first = everything()
    second = everything()
    saved = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        single = everything()
    finally:
        numba.set_num_threads(saved)
    for a, b, s in zip(first, second, single):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, s)


def test_inputs_not_modified_and_non_contiguous_inputs():
    cfg = CONFIGS["uneven"]
    rng = np.random.default_rng(19)
    x, offset, mask, d_cols = make_inputs(rng, cfg, np.float64, True)
    want = run_all(cpu, x, offset, mask, d_cols, cfg)
    # the same values in non-contiguous layouts
    x_nc = np.asfortranarray(x)
    offset_nc = np.repeat(offset, 2, axis=3)[..., ::2]  # every other column of a wider array
    mask_nc = np.swapaxes(np.swapaxes(mask, 2, 3).copy(), 2, 3)
    d_cols_nc = np.asfortranarray(d_cols)
    assert not (x_nc.flags.c_contiguous or offset_nc.flags.c_contiguous or mask_nc.flags.c_contiguous)
    copies = [a.copy() for a in (x_nc, offset_nc, mask_nc, d_cols_nc)]
    got = run_all(cpu, x_nc, offset_nc, mask_nc, d_cols_nc, cfg)
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)
    for a, b in zip((x_nc, offset_nc, mask_nc, d_cols_nc), copies):
        np.testing.assert_array_equal(a, b)


# ---- argument checks and dispatch ----------------------------------------------------


def test_bad_arguments_raise_with_the_argument_named():
    cfg = CONFIGS["uneven"]
    rng = np.random.default_rng(23)
    x, offset, mask, d_cols = make_inputs(rng, cfg, np.float64, True)
    geo, g, hw = geometry(cfg), cfg[8], out_hw(cfg)
    with pytest.raises(ValueError, match="offset must have shape"):
        cpu.deform_im2col(x, offset[:, :-2], mask, *geo, hw, g)
    with pytest.raises(ValueError, match="mask must have shape"):
        cpu.deform_im2col(x, offset, mask[:, :-1], *geo, hw, g)
    with pytest.raises(TypeError, match="offset must have the same dtype as x"):
        cpu.deform_im2col(x, offset.astype(np.float32), mask, *geo, hw, g)
    with pytest.raises(ValueError, match="divisible by offset_groups"):
        cpu.deform_im2col(x, offset, mask, *geo, hw, 4)
    with pytest.raises(ValueError, match="d_cols must have shape"):
        cpu.deform_col2im(d_cols[:, :, :, :, :-1], offset, mask, x.shape, *geo, g)
    with pytest.raises(ValueError, match="d_cols must have shape"):
        cpu.deform_col2im_coord(d_cols[:1], x, offset, mask, *geo, g)
    with pytest.raises(TypeError, match="x must have dtype float32 or float64"):
        cpu.deform_im2col(x.astype(np.int64), offset, mask, *geo, hw, g)
    with pytest.raises(ValueError, match="coords must have shape"):
        cpu.map_coordinates_clamped(np.zeros((2, 3, 3)), np.zeros((2, 4, 3)))
    with pytest.raises(ValueError, match="d_out must have shape"):
        cpu.map_coordinates_clamped_backward(np.zeros((2, 5)), np.zeros((2, 3, 3)), np.zeros((2, 4, 2)))


def test_dispatch_gives_this_module(monkeypatch):
    monkeypatch.delenv("NPATTN_BACKEND", raising=False)
    assert sampling.get_backend("numba") is cpu
    assert sampling.resolve_backend(None) == "numba"
    assert sampling.get_backend(None) is cpu
    monkeypatch.setenv("NPATTN_BACKEND", "numpy")
    assert sampling.get_backend(None) is ref
    for name in sampling.FUNCTIONS:
        assert callable(getattr(cpu, name))


# ---- compiler-only behaviour (deselected with -k "not jit" under NUMBA_DISABLE_JIT=1) ---

_CHILD = """
import json, time, numpy as np
from npattn.sampling import cpu
rng = np.random.default_rng(0)
t0 = time.perf_counter()
for dt in (np.float32, np.float64):
    x = rng.standard_normal((1, 2, 5, 5)).astype(dt)
    off = rng.uniform(-1, 1, (1, 18, 5, 5)).astype(dt)
    m = rng.uniform(0, 1, (1, 9, 5, 5)).astype(dt)
    geo = ((3, 3), (1, 1), (1, 1), (1, 1))
    cols = cpu.deform_im2col(x, off, m, *geo, (5, 5), 1)
    cpu.deform_col2im(cols, off, m, x.shape, *geo, 1)
    cpu.deform_col2im_coord(cols, x, off, m, *geo, 1)
    c = rng.uniform(0, 4, (2, 7, 2)).astype(dt)
    cpu.map_coordinates_clamped(x[0], c)
    cpu.map_coordinates_clamped_backward(np.ones((2, 7), dt), x[0], c)
seconds = time.perf_counter() - t0
kernels = [cpu._im2col_kernel, cpu._col2im_kernel, cpu._coord_kernel, cpu._map_kernel, cpu._map_backward_kernel]
print(json.dumps({"seconds": seconds, "threading": cpu.threading_info(),
                  "misses": {k.py_func.__name__: sum(k.stats.cache_misses.values()) for k in kernels},
                  "hits": {k.py_func.__name__: sum(k.stats.cache_hits.values()) for k in kernels}}))
"""


def _child(env_updates=()):
    import json

    env = {k: v for k, v in os.environ.items() if k not in ("NUMBA_THREADING_LAYER", "NUMBA_DISABLE_JIT")}
    env.update(dict(env_updates))
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_jit_second_process_loads_the_kernels_from_the_cache():
    _child()  # compiles (or loads) and writes the on-disk cache
    info = _child()
    assert all(v == 0 for v in info["misses"].values()), info
    assert all(v >= 2 for v in info["hits"].values()), info  # float32 and float64


def test_jit_threading_layer_is_left_to_numba_and_to_the_user():
    info = _child()
    assert info["threading"]["configured_layer"] == "default", info
    assert info["threading"]["active_layer"] in ("tbb", "omp", "workqueue"), info
    info = _child({"NUMBA_THREADING_LAYER": "workqueue"})
    assert info["threading"]["active_layer"] == "workqueue", info


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_non_finite_pixels_propagate_as_in_numpy_backend(dtype):
    """An inf or NaN pixel reaches exactly the outputs numpy.py lets it reach (a corner
    outside the image is 0 and never multiplies a pixel)."""
    cfg = CONFIGS["uneven"]
    rng = np.random.default_rng(29)
    x, offset, mask, d_cols = make_inputs(rng, cfg, dtype, True)
    x[0, 0, 0, 0] = np.inf
    x[1, 3, 2, 4] = np.nan
    x[2, 5, 6, 0] = -np.inf
    with np.errstate(invalid="ignore"):
        got = run_all(cpu, x, offset, mask, d_cols, cfg)
        want = run_all(ref, x, offset, mask, d_cols, cfg)
    for what, a, b in zip(("cols", "d_x", "d_offset", "d_mask"), got, want):
        np.testing.assert_array_equal(np.isnan(a), np.isnan(b), err_msg=what)
        np.testing.assert_array_equal(np.isinf(a), np.isinf(b), err_msg=what)
        fin = np.isfinite(b)
        assert_matches(np.where(fin, a, 0), np.where(fin, b, 0), dtype, what)


def test_single_threaded_blas_limits_and_restores_numpy_blas():
    info = cpu.threading_info()
    if info["blas_threads"] is None:
        # NumPy's BLAS is not an OpenBLAS this module can find: the block is a no-op
        with cpu.single_threaded_blas():
            assert cpu.threading_info()["blas_threads"] is None
        return
    before = info["blas_threads"]
    with cpu.single_threaded_blas():
        assert cpu.threading_info()["blas_threads"] == 1
        a = np.arange(64.0).reshape(8, 8)
        np.testing.assert_array_equal(a @ a, np.einsum("ij,jk->ik", a, a))
    assert cpu.threading_info()["blas_threads"] == before
    with pytest.raises(RuntimeError):
        with cpu.single_threaded_blas():
            raise RuntimeError("restored on the way out")
    assert cpu.threading_info()["blas_threads"] == before


def test_deform_conv2d_runs_its_kernels_with_single_threaded_blas_and_restores_it(monkeypatch):
    seen = []

    def spy(real):
        def wrapped(*args, **kwargs):
            seen.append(cpu.threading_info()["blas_threads"])
            return real(*args, **kwargs)
        return wrapped

    before = cpu.threading_info()["blas_threads"]
    monkeypatch.setattr(cpu, "deform_conv_forward", spy(cpu.deform_conv_forward))  # forward (no column array)
    monkeypatch.setattr(cpu, "deform_col2im_coord", spy(cpu.deform_col2im_coord))  # backward
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 2, 5, 4))
    offset = rng.standard_normal((2, 18, 5, 4))
    y, cache = npattn.functional.deform_conv2d_forward(x, offset, rng.standard_normal((3, 2, 3, 3)), padding=1, backend="numba")
    npattn.functional.deform_conv2d_backward(np.ones_like(y), cache)
    assert len(seen) == 2  # forward and backward
    if before is not None:  # NumPy's OpenBLAS found: one thread inside, restored after
        assert seen == [1, 1]
    assert cpu.threading_info()["blas_threads"] == before
    assert sampling.blas_context("numpy").__class__.__name__ == "nullcontext"


# ---- end to end: the ops of npattn.functional on the numba backend ---------------------


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_deform_conv2d_and_batch_map_offsets_match_numpy_backend(dtype):
    from npattn.functional.deform import (
        batch_map_offsets_backward,
        batch_map_offsets_forward,
        deform_conv2d_backward,
        deform_conv2d_forward,
    )

    rng = np.random.default_rng(31)
    n, c_in, c_out, h, w = 3, 6, 4, 7, 5
    kh, kw, g_off = 3, 2, 3
    stride, padding, dilation = (2, 1), (1, 0), (2, 1)
    oh, ow = (h + 2 - 2 * 2 - 1) // 2 + 1, (w - 1 - 1) // 1 + 1
    args = dict(
        input=rng.standard_normal((n, c_in, h, w)).astype(dtype),
        offset=rng.uniform(-2, 2, (n, 2 * g_off * kh * kw, oh, ow)).astype(dtype),
        weight=rng.standard_normal((c_out, c_in // 2, kh, kw)).astype(dtype),  # 2 weight groups
        bias=rng.standard_normal(c_out).astype(dtype),
        stride=stride, padding=padding, dilation=dilation,
        mask=rng.uniform(0, 1, (n, g_off * kh * kw, oh, ow)).astype(dtype),
    )
    grad_out = rng.standard_normal((n, c_out, oh, ow)).astype(dtype)
    results = {}
    for backend in ("numba", "numpy"):
        out, cache = deform_conv2d_forward(**args, backend=backend, column_budget_bytes=1)  # one image per chunk
        results[backend] = {"out": out, **deform_conv2d_backward(grad_out, cache)}
    assert set(results["numba"]) == {"out", "input", "offset", "weight", "bias", "mask"}
    for key, want in results["numpy"].items():
        assert_matches(results["numba"][key], want, dtype, f"deform_conv2d {key}")

    x = rng.standard_normal((4, 5, 6)).astype(dtype)
    offsets = rng.uniform(-3, 3, (4, 5, 6, 2)).astype(dtype)
    d_out = rng.standard_normal((4, 5, 6)).astype(dtype)
    seed = {}
    for backend in ("numba", "numpy"):
        out, cache = batch_map_offsets_forward(x, offsets, backend=backend)
        seed[backend] = {"out": out, **batch_map_offsets_backward(d_out, cache)}
    for key, want in seed["numpy"].items():
        assert_matches(seed["numba"][key], want, dtype, f"batch_map_offsets {key}")


@pytest.mark.parametrize("backend", ["numpy", "numba"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("with_mask", [True, False])
def test_coord_gradient_fills_cols_out_exactly_like_im2col(backend, dtype, with_mask):
    be = sampling.get_backend(backend)
    rng = np.random.default_rng(11)
    geo = ((3, 2), (2, 1), (1, 0), (2, 1))
    x = rng.standard_normal((2, 4, 7, 6)).astype(dtype)
    offset = (2 * rng.standard_normal((2, 2 * 2 * 6, 3, 5))).astype(dtype)
    offset[0, 0, 0, :3] = [np.nan, np.inf, -1e30]
    offset[1, 2, 1, 1] = -2.0  # channel 2 is dy of tap k = 1 (i = 0): p_y = 1*2 - 1 + 0*2 - 2 = -1 exactly
    mask = rng.uniform(0.2, 1.0, (2, 2 * 6, 3, 5)).astype(dtype) if with_mask else None
    cols = be.deform_im2col(x, offset, mask, *geo, (3, 5), 2)
    d_cols = rng.standard_normal(cols.shape).astype(dtype)
    buf = np.full_like(cols, 7.0)
    with np.errstate(all="raise"):
        d_off, d_m = be.deform_col2im_coord(d_cols, x, offset, mask, *geo, 2, cols_out=buf)
    np.testing.assert_array_equal(buf, cols)
    d_off2, d_m2 = be.deform_col2im_coord(d_cols, x, offset, mask, *geo, 2)
    np.testing.assert_array_equal(d_off, d_off2)
    if with_mask:
        np.testing.assert_array_equal(d_m, d_m2)
    with pytest.raises(ValueError, match="cols_out must be"):
        cpu.deform_col2im_coord(d_cols, x, offset, mask, *geo, 2, cols_out=buf[:1])


# ---- the matrix products of deform_conv2d on Numba's threads ----------------------------


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_products_match_matmul(dtype):
    """cpu.products_* against np.matmul, with L and Ck not multiples of the tiles (edge
    tiles) and the weight gradient added to a nonzero start."""
    rng = np.random.default_rng(41)
    n, g, m, ck, L = 3, 2, 5, cpu.WEIGHT_ROWS + 7, cpu.PRODUCT_COLUMNS + 45
    w_g = rng.standard_normal((g, m, ck)).astype(dtype)
    cols = rng.standard_normal((n, g, ck, L)).astype(dtype)
    dy = rng.standard_normal((n, g, m, L)).astype(dtype)
    out = np.full((n, g, m, L), np.nan, dtype=dtype)
    d_cols = np.full((n, g, ck, L), np.nan, dtype=dtype)
    start = rng.standard_normal((g, m, ck)).astype(dtype)
    d_w = start.copy()
    cpu.products_forward(w_g, cols, out)
    cpu.products_d_cols(w_g, dy, d_cols)
    cpu.products_d_weight(dy, cols, d_w)
    as64 = lambda a: a.astype(np.float64)  # noqa: E731
    assert_matches(out, np.matmul(as64(w_g)[None], as64(cols)).astype(dtype), dtype, "forward")
    assert_matches(d_cols, np.matmul(as64(w_g).transpose(0, 2, 1)[None], as64(dy)).astype(dtype), dtype, "d_cols")
    want = as64(start) + np.matmul(as64(dy), as64(cols).transpose(0, 1, 3, 2)).sum(axis=0)
    assert_matches(d_w, want.astype(dtype), dtype, "d_weight")
    with pytest.raises(ValueError, match="products_forward"):
        cpu.products_forward(w_g, cols[:, :, 1:], out)
    with pytest.raises(ValueError, match="C-contiguous"):
        cpu.products_d_cols(w_g, dy[..., ::2], d_cols[..., ::2])
    with pytest.raises(TypeError, match="one dtype"):
        cpu.products_d_weight(dy.astype(np.float32 if dtype == np.float64 else np.float64), cols, d_w)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_deform_conv2d_identical_for_one_and_two_numba_threads(dtype):
    """Every output and gradient of deform_conv2d (kernels and product tiles) is bit for
    bit the same run to run and with 1 or 2 Numba threads: the tiles are fixed by the
    shapes and each element is summed by one single-threaded BLAS call or kernel iteration."""
    from npattn.functional.deform import deform_conv2d_backward, deform_conv2d_forward

    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("Numba has a single thread here (NUMBA_NUM_THREADS < 2)")
    rng = np.random.default_rng(43)
    n, c_in, c_out, h, w, kh, kw = 5, 8, 6, 13, 23, 3, 3  # L = 299 > PRODUCT_COLUMNS; Ck = 36 > WEIGHT_ROWS
    args = dict(
        input=rng.standard_normal((n, c_in, h, w)).astype(dtype),
        offset=rng.uniform(-2, 2, (n, 2 * 2 * kh * kw, h, w)).astype(dtype),  # 2 offset groups
        weight=rng.standard_normal((c_out, c_in // 2, kh, kw)).astype(dtype),  # 2 weight groups
        bias=rng.standard_normal(c_out).astype(dtype),
        stride=1, padding=1, dilation=1,
        mask=rng.uniform(0, 1, (n, 2 * kh * kw, h, w)).astype(dtype),
    )
    grad_out = rng.standard_normal((n, c_out, h, w)).astype(dtype)
    per_image = c_in * kh * kw * h * w * np.dtype(dtype).itemsize

    def run():
        out, cache = deform_conv2d_forward(**args, backend="numba", column_budget_bytes=2 * per_image)  # 3 chunks
        return {"out": out, **deform_conv2d_backward(grad_out, cache)}

    saved = numba.get_num_threads()
    try:
        numba.set_num_threads(2)
        two, again = run(), run()
        numba.set_num_threads(1)
        one = run()
    finally:
        numba.set_num_threads(saved)
    assert set(two) == {"out", "input", "offset", "weight", "bias", "mask"}
    for key in two:
        np.testing.assert_array_equal(two[key], again[key], err_msg=f"{key}: run to run")
        np.testing.assert_array_equal(two[key], one[key], err_msg=f"{key}: 2 threads vs 1")
    numpy_out, numpy_cache = deform_conv2d_forward(**args, backend="numpy")
    assert_matches(two["out"], numpy_out, dtype, "out")
    for key, want in deform_conv2d_backward(grad_out, numpy_cache).items():
        assert_matches(two[key], want, dtype, key)


def test_deform_conv2d_products_run_with_every_openblas_on_one_thread(monkeypatch):
    seen = []

    def spy(real):
        def wrapped(*a, **kw):
            seen.append([lib["threads"] for lib in cpu.threading_info()["blas_libraries"]])
            return real(*a, **kw)
        return wrapped

    for name in ("deform_conv_forward", "products_d_cols", "products_d_weight"):
        monkeypatch.setattr(cpu, name, spy(getattr(cpu, name)))
    before = [lib["threads"] for lib in cpu.threading_info()["blas_libraries"]]
    rng = np.random.default_rng(6)
    x = rng.standard_normal((2, 2, 5, 4))
    y, cache = npattn.functional.deform_conv2d_forward(x, rng.standard_normal((2, 18, 5, 4)),
                                                       rng.standard_normal((3, 2, 3, 3)), padding=1, backend="numba")
    npattn.functional.deform_conv2d_backward(np.ones_like(y), cache)
    assert len(seen) == 3  # forward (sampling and product tiles), d_cols, d_weight (one chunk)
    assert all(t == 1 for threads in seen for t in threads), seen
    assert [lib["threads"] for lib in cpu.threading_info()["blas_libraries"]] == before


def test_threading_info_reports_layer_threads_and_blas():
    info = sampling.threading_info()
    assert info["num_threads"] == numba.get_num_threads()
    assert info["configured_layer"] == numba.config.THREADING_LAYER
    assert info["product_tiles"] == {"columns": cpu.PRODUCT_COLUMNS, "weight_rows": cpu.WEIGHT_ROWS}
    for lib in info["blas_libraries"]:
        assert os.path.exists(lib["library"]) and lib["threads"] >= 1, lib
    if info["blas_libraries"]:
        assert info["blas_threads_in_kernels"] == 1


@pytest.mark.parametrize("with_mask", [True, False], ids=["mask", "nomask"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_offset_gradient_mmcv_border_matches_numpy_backend(name, dtype, with_mask):
    """border_grad="mmcv": the offset/mask gradient (and the columns it fills) bit for bit
    as numpy.py; it differs from torchvision's only at p = -1 (make_inputs puts one there)."""
    cfg = CONFIGS[name]
    rng = np.random.default_rng([8, list(CONFIGS).index(name)])
    x, offset, mask, d_cols = make_inputs(rng, cfg, dtype, with_mask)
    geo, g = geometry(cfg), cfg[8]
    cols = np.empty(d_cols.shape, dtype=dtype)
    got = cpu.deform_col2im_coord(d_cols, x, offset, mask, *geo, g, cols_out=cols, border_grad="mmcv")
    want = ref.deform_col2im_coord(d_cols, x, offset, mask, *geo, g, border_grad="mmcv")
    np.testing.assert_array_equal(cols, ref.deform_im2col(x, offset, mask, *geo, out_hw(cfg), g))
    np.testing.assert_array_equal(got[0], want[0])
    if with_mask:
        np.testing.assert_array_equal(got[1], want[1])
    tv = cpu.deform_col2im_coord(d_cols, x, offset, mask, *geo, g, border_grad="torchvision")[0]
    differ = got[0] != tv
    assert np.all(got[0][differ] == 0.0)  # where they differ, mmcv's is the 0 at p = -1
    if x.shape[0]:  # the sample on p_y = -1 (tap (0, 0), oy = 0, p_x = 0.3 - pw)
        assert got[0][0, 0, 0, 0] == 0.0 and differ[0, 0, 0, 0]


@pytest.mark.parametrize("with_mask", [True, False], ids=["mask", "nomask"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize(
    "case",
    [  # (N, C, H, W, M, kernel, stride, padding, dilation, offset groups, weight groups)
        (2, 6, 7, 9, 4, (3, 2), (2, 1), (1, 0), (2, 1), 3, 2),  # weight groups cross offset groups
        (3, 8, 20, 17, 6, (3, 3), (1, 1), (1, 1), (1, 1), 2, 1),  # 340 pixels: two tiles, the second short
        (2, 12, 19, 23, 6, (3, 3), (1, 1), (1, 1), (1, 1), 2, 3),
        (1, 4, 1, 5, 2, (1, 3), (1, 1), (0, 1), (1, 1), 4, 2),  # H = 1, one channel per offset group
    ],
    ids=["groups", "two-tiles", "g3", "H1"],
)
def test_fused_forward_equals_im2col_then_product_tiles(case, dtype, with_mask):
    # The numba forward samples each tile's columns into a buffer next to its product
    # (deform_conv_forward). Its columns are deform_im2col's arithmetic and its product
    # the same single-threaded gemm call on the same tile as products_forward (only the
    # buffer's leading dimension differs). BLAS may pick another kernel for another
    # leading dimension, so both are held to the dot-product rounding bound around the
    # float64 product of numpy.py's columns, not compared bit for bit.
    n, c, h, w, m, (kh, kw), stride, padding, dilation, g, g_w = case
    rng = np.random.default_rng([41, h, w])
    oh = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    x = rng.standard_normal((n, c, h, w)).astype(dtype)
    offset = rng.uniform(-3, 3, (n, 2 * g * kh * kw, oh, ow)).astype(dtype)
    mask = rng.uniform(-0.5, 1.5, (n, g * kh * kw, oh, ow)).astype(dtype) if with_mask else None
    ck = c // g_w * kh * kw
    w_g = rng.standard_normal((g_w, m // g_w, ck)).astype(dtype)
    geo = ((kh, kw), stride, padding, dilation)
    cols = cpu.deform_im2col(x, offset, mask, *geo, (oh, ow), g).reshape(n, g_w, ck, oh * ow)
    tiles = np.empty((n, g_w, m // g_w, oh * ow), dtype)
    cpu.products_forward(w_g, np.ascontiguousarray(cols), tiles)
    fused = np.full_like(tiles, np.nan)
    assert cpu.deform_conv_forward(x, offset, mask, w_g, *geo, g, fused) is fused
    ref_cols = ref.deform_im2col(x, offset, mask, *geo, (oh, ow), g).reshape(n, g_w, ck, oh * ow).astype(np.float64)
    exact = np.einsum("gmk,ngkl->ngml", w_g.astype(np.float64), ref_cols)
    bound = ck * np.finfo(dtype).eps * np.einsum("gmk,ngkl->ngml", np.abs(w_g.astype(np.float64)), np.abs(ref_cols))
    for got in (fused, tiles):
        assert np.all(np.abs(got - exact) <= bound + np.finfo(dtype).tiny)


def test_fused_forward_checks_its_arguments():
    x = np.zeros((2, 4, 5, 5))
    offset = np.zeros((2, 18, 5, 5))
    w_g = np.zeros((2, 3, 18))
    geo = ((3, 3), (1, 1), (1, 1), (1, 1))
    with pytest.raises(ValueError, match="do not fit"):
        cpu.deform_conv_forward(x, offset, None, w_g, *geo, 1, np.zeros((2, 2, 3, 24)))
    with pytest.raises(ValueError, match="do not fit"):
        cpu.deform_conv_forward(x, offset, None, np.zeros((2, 3, 17)), *geo, 1, np.zeros((2, 2, 3, 25)))
    with pytest.raises(TypeError, match="dtype of x"):
        cpu.deform_conv_forward(x, offset, None, w_g.astype(np.float32), *geo, 1, np.zeros((2, 2, 3, 25), np.float32))
    with pytest.raises(ValueError, match="out must be"):
        cpu.deform_conv_forward(x, offset, None, w_g, *geo, 1, [[0.0]])


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, 1e30, -1e30], ids=["nan", "inf", "-inf", "1e30", "-1e30"])
def test_fused_forward_samples_zero_at_non_finite_and_huge_offsets(bad):
    # As deform_im2col: a position outside the support (NaN and +-inf included) samples 0
    # and never indexes memory; the fused forward must give the product of those columns.
    rng = np.random.default_rng(47)
    n, c, h, w, m = 2, 4, 6, 5, 3
    x = rng.standard_normal((n, c, h, w))
    offset = rng.uniform(-2, 2, (n, 18, h, w))
    offset[0, 0, 0, 0] = bad
    offset[1, 17, h - 1, w - 1] = bad
    offset[1, 4:6, 2, 3] = bad
    mask = rng.uniform(0, 1, (n, 9, h, w))
    w_g = rng.standard_normal((1, m, c * 9))
    geo = ((3, 3), (1, 1), (1, 1), (1, 1))
    cols = cpu.deform_im2col(x, offset, mask, *geo, (h, w), 1).reshape(n, 1, c * 9, h * w)
    assert np.all(np.isfinite(cols))
    want = np.einsum("gmk,ngkl->ngml", w_g, cols)
    got = cpu.deform_conv_forward(x, offset, mask, w_g, *geo, 1, np.empty((n, 1, m, h * w)))
    bound = c * 9 * np.finfo(np.float64).eps * np.einsum("gmk,ngkl->ngml", np.abs(w_g), np.abs(cols))
    assert np.all(np.abs(got - want) <= bound)
