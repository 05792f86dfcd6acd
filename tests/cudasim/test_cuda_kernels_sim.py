"""The "cuda" sampling backend (npattn/sampling/cuda.py) against the NumPy definition.

Meant for Numba's CUDA simulator, in a pytest run of its own::

    NUMBA_ENABLE_CUDASIM=1 python -m pytest tests/cudasim -q

(the simulator spends ~150 us per thread, so every case here launches at most a few
thousand). On a machine with an NVIDIA GPU the same tests run on the device; without
either they are skipped.
"""


import numpy as np
import pytest

from npattn.sampling import numpy as ref

from _gpu import CUDA_MARKS, SIMULATOR, gpu_present

pytestmark = CUDA_MARKS

if gpu_present():
    from numba import cuda as nbcuda

    from npattn.sampling import cuda as cu

# name: (N, C, H, W, kernel_hw, stride, padding, dilation, offset_groups), all tiny
CONFIGS = {
    "uneven": (2, 3, 5, 4, (3, 2), (2, 1), (1, 0), (2, 1), 3),
    "square": (1, 2, 4, 4, (3, 3), (1, 1), (1, 1), (1, 1), 1),
    "batch0": (0, 2, 4, 4, (3, 3), (1, 1), (1, 1), (1, 1), 1),
    "H1": (1, 2, 1, 5, (1, 3), (1, 1), (0, 1), (1, 1), 2),
    "W1": (2, 2, 5, 1, (3, 1), (2, 1), (1, 0), (1, 1), 1),
}
# Agreement with numpy.py, as max |difference| <= TOL * max |expected| per array. On a real
# GPU, NVVM fuses a * b + c into one fused multiply-add (one rounding where numpy.py has
# two), and the scatters add in the order of their atomics, so results agree to rounding,
# not bit for bit: a bilinear blend of four corners times a mask is a handful of roundings
# (float32: 1e-6 is about 8 ulps of the largest value), col2im a sum over every column
# entry that lands on a pixel, accumulated in float64 (1e-12, far above float64 rounding).
TOL = {np.float64: 1e-12, np.float32: 1e-6}


def out_hw(cfg):
    n, c, h, w, (kh, kw), (sh, sw), (ph, pw), (dh, dw), g = cfg
    return (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1


def make_inputs(rng, cfg, dtype, with_mask, bad=None):
    n, c, h, w, (kh, kw), _, (ph, _), _, g = cfg
    oh, ow = out_hw(cfg)
    x = rng.standard_normal((n, c, h, w)).astype(dtype)
    offset = rng.uniform(-2.5, 2.5, (n, 2 * g * kh * kw, oh, ow))
    offset[:, ::3] = np.round(offset[:, ::3])
    if n:
        offset[0, 0, 0, 0] = -1.0 + ph  # p_y = -1 exactly
        if bad is not None:
            offset[0, 2, 0, -1] = bad
            offset[-1, -1, -1, 0] = bad
            offset[-1, 2 * (g * kh * kw) - 2 :, 0, 0] = bad
    offset = offset.astype(dtype)
    mask = rng.uniform(-0.5, 1.5, (n, g * kh * kw, oh, ow)).astype(dtype) if with_mask else None
    d_cols = rng.standard_normal((n, c, kh, kw, oh, ow)).astype(dtype)
    return x, offset, mask, d_cols


def run_all(backend, x, offset, mask, d_cols, cfg, x_shape=None):
    geo = cfg[4:8]
    g = cfg[8]
    cols = backend.deform_im2col(x, offset, mask, *geo, out_hw(cfg), g)
    d_x = backend.deform_col2im(d_cols, offset, mask, x_shape or x.shape, *geo, g)
    d_offset, d_mask = backend.deform_col2im_coord(d_cols, x, offset, mask, *geo, g)
    return cols, d_x, d_offset, d_mask


def assert_matches(actual, expected, dtype, what):
    assert isinstance(actual, np.ndarray), f"{what}: NumPy inputs must give a NumPy result, got {type(actual)}"
    assert actual.dtype == expected.dtype == np.dtype(dtype), what
    assert actual.shape == expected.shape, what
    if expected.size == 0:
        return
    err = float(np.max(np.abs(actual.astype(np.float64) - expected.astype(np.float64))))
    scale = float(np.max(np.abs(expected)))
    assert err <= TOL[dtype] * scale, f"{what}: max abs difference {err:.3e} (scale {scale:.3e})"


@pytest.mark.parametrize("with_mask", [True, False], ids=["mask", "nomask"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_deform_kernels_match_numpy_backend(name, dtype, with_mask):
    cfg = CONFIGS[name]
    rng = np.random.default_rng([31, list(CONFIGS).index(name)])
    x, offset, mask, d_cols = make_inputs(rng, cfg, dtype, with_mask)
    got = run_all(cu, x, offset, mask, d_cols, cfg)
    want = run_all(ref, x, offset, mask, d_cols, cfg)
    for what, a, b in zip(("cols", "d_x", "d_offset", "d_mask"), got, want):
        if b is None:
            assert a is None
        else:
            assert_matches(a, b, dtype, what)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, 1e30, -1e30], ids=["nan", "inf", "-inf", "1e30", "-1e30"])
def test_non_finite_and_huge_offsets(dtype, bad):
    cfg = CONFIGS["uneven"]
    rng = np.random.default_rng(37)
    x, offset, mask, d_cols = make_inputs(rng, cfg, dtype, True, bad=bad)
    got = run_all(cu, x, offset, mask, d_cols, cfg)
    want = run_all(ref, x, offset, mask, d_cols, cfg)
    for what, a, b in zip(("cols", "d_x", "d_offset", "d_mask"), got, want):
        assert np.all(np.isfinite(a)), what
        assert_matches(a, b, dtype, what)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("shape", [(2, 4, 3, 16), (1, 1, 4, 9), (2, 4, 1, 9), (0, 3, 3, 5)])
def test_clamped_sampling_matches_numpy_backend(shape, dtype):
    b, h, w, p = shape
    rng = np.random.default_rng([b, h, w, p, 41])
    x = rng.standard_normal((b, h, w)).astype(dtype)
    coords = np.stack([rng.uniform(-2, h + 1, (b, p)), rng.uniform(-2, w + 1, (b, p))], axis=-1)
    coords[:, ::3] = np.round(coords[:, ::3])
    if b and p >= 6:
        coords[0, :6] = [[np.nan, 1], [1, np.nan], [np.inf, 0.5], [-np.inf, 0.5], [0, 0], [1e30, -1e30]]
    coords = coords.astype(dtype)
    d_out = rng.standard_normal((b, p)).astype(dtype)
    assert_matches(cu.map_coordinates_clamped(x, coords), ref.map_coordinates_clamped(x, coords), dtype, "out")
    got = cu.map_coordinates_clamped_backward(d_out, x, coords)
    want = ref.map_coordinates_clamped_backward(d_out, x, coords)
    assert_matches(got[0], want[0], dtype, "d_x")
    assert_matches(got[1], want[1], dtype, "d_coords")


def test_device_arrays_in_device_arrays_out():
    cfg = CONFIGS["uneven"]
    rng = np.random.default_rng(43)
    x, offset, mask, d_cols = make_inputs(rng, cfg, np.float32, True)
    want = run_all(ref, x, offset, mask, d_cols, cfg)
    dev = [nbcuda.to_device(a) for a in (x, offset, mask, d_cols)]
    got = run_all(cu, *dev, cfg, x_shape=x.shape)
    for what, a, b in zip(("cols", "d_x", "d_offset", "d_mask"), got, want):
        assert cu._is_device_array(a) and not isinstance(a, np.ndarray), f"{what}: expected a device array"
        assert_matches(a.copy_to_host(), b, np.float32, what)
    # a mix of host and device inputs also stays on the device
    cols = cu.deform_im2col(x, dev[1], mask, *cfg[4:8], out_hw(cfg), cfg[8])
    assert cu._is_device_array(cols) and not isinstance(cols, np.ndarray)
    if SIMULATOR:  # the simulator runs the kernel source as Python: numpy.py's arithmetic, bit for bit
        np.testing.assert_array_equal(cols.copy_to_host(), want[0])
    else:  # a real device fuses multiply-adds: agreement to rounding (TOL)
        assert_matches(cols.copy_to_host(), want[0], np.float32, "cols (mixed host and device inputs)")


def test_bad_arguments_raise_before_any_launch():
    cfg = CONFIGS["uneven"]
    rng = np.random.default_rng(47)
    x, offset, mask, d_cols = make_inputs(rng, cfg, np.float64, True)
    with pytest.raises(ValueError, match="offset must have shape"):
        cu.deform_im2col(x, offset[:, :-2], mask, *cfg[4:8], out_hw(cfg), cfg[8])
    with pytest.raises(TypeError, match="x must be a numpy.ndarray or a CUDA device array"):
        cu.deform_im2col(x.tolist(), offset, mask, *cfg[4:8], out_hw(cfg), cfg[8])
    with pytest.raises(TypeError, match="coords must have the same dtype as x"):
        cu.map_coordinates_clamped(np.zeros((1, 3, 3)), np.zeros((1, 2, 2), np.float32))


def test_backend_reports_available():
    from npattn import sampling

    assert cu.unavailable_reason() is None
    assert sampling.get_backend("cuda") is cu


def test_coord_gradient_fills_cols_out_like_im2col():
    rng = np.random.default_rng(3)
    geo = ((2, 2), (1, 1), (0, 0), (1, 1))
    x = rng.standard_normal((1, 2, 3, 4))
    offset = rng.uniform(-1.5, 1.5, (1, 8, 2, 3))
    mask = rng.uniform(0.2, 1.0, (1, 4, 2, 3))
    cols = ref.deform_im2col(x, offset, mask, *geo, (2, 3), 1)
    d_cols = rng.standard_normal(cols.shape)
    buf = np.zeros_like(cols)
    d_off, d_m = cu.deform_col2im_coord(d_cols, x, offset, mask, *geo, 1, cols_out=buf)
    np.testing.assert_allclose(buf, cols, rtol=1e-14, atol=1e-15)
    r_off, r_m = ref.deform_col2im_coord(d_cols, x, offset, mask, *geo, 1)
    np.testing.assert_allclose(d_off, r_off, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(d_m, r_m, rtol=1e-12, atol=1e-14)


def test_availability_is_tested_by_launching_a_kernel():
    assert cu.unavailable_reason() is None
    assert cu._PROBE_OUTCOME == ""  # the test kernel was compiled, launched and checked


@pytest.mark.parametrize("border_grad", ["torchvision", "mmcv"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("name", ["uneven", "square", "H1"])
def test_coord_kernel_border_grad_matches_numpy_backend(name, dtype, border_grad):
    """The offset gradient in both border conventions (make_inputs puts a sample on p_y = -1
    and rounds a third of the offsets to integers); mmcv's differs from torchvision's only
    by zeros there."""
    cfg = CONFIGS[name]
    rng = np.random.default_rng([53, list(CONFIGS).index(name)])
    x, offset, mask, d_cols = make_inputs(rng, cfg, dtype, True)
    offset[0, 1, 0, 0] = cfg[6][1] + 0.3  # that sample at p = (-1, 0.3)
    geo, g = cfg[4:8], cfg[8]
    got = cu.deform_col2im_coord(d_cols, x, offset, mask, *geo, g, border_grad=border_grad)
    want = ref.deform_col2im_coord(d_cols, x, offset, mask, *geo, g, border_grad=border_grad)
    assert_matches(got[0], want[0], dtype, "d_offset")
    assert_matches(got[1], want[1], dtype, "d_mask")
    if border_grad == "mmcv":
        assert got[0][0, 0, 0, 0] == 0.0  # p_y = -1 exactly
        tv = ref.deform_col2im_coord(d_cols, x, offset, mask, *geo, g)[0]
        assert tv[0, 0, 0, 0] != 0.0
        differ = tv != want[0]
        assert np.all(got[0][differ] == 0.0)
    with pytest.raises(ValueError, match="border_grad must be one of"):
        cu.deform_col2im_coord(d_cols, x, offset, mask, *geo, g, border_grad="torch")


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("name", ["uneven", "W1"])
def test_64_bit_index_fallback_gives_the_same_numbers(name, dtype, monkeypatch):
    # The deformable kernels do their index arithmetic in unsigned 32 bits when every flat
    # index of the call is below NARROW_LIMIT, else in 64 bits (the "/64" kernels). Both
    # must give the same numbers: force the 64-bit kernels and compare with the 32-bit
    # ones and with numpy.py. (The decision itself is also checked: a real call takes the
    # 32-bit path.)
    cfg = CONFIGS[name]
    rng = np.random.default_rng([37, list(CONFIGS).index(name)])
    x, offset, mask, d_cols = make_inputs(rng, cfg, dtype, True)
    assert cu._narrow(x.shape[0] * offset.shape[1] // 2 * int(np.prod(out_hw(cfg))))
    narrow = run_all(cu, x, offset, mask, d_cols, cfg)
    monkeypatch.setattr(cu, "NARROW_LIMIT", 0)
    assert not cu._narrow(1)
    wide = run_all(cu, x, offset, mask, d_cols, cfg)
    want = run_all(ref, x, offset, mask, d_cols, cfg)
    for what, a, b, r in zip(("cols", "d_x", "d_offset", "d_mask"), wide, narrow, want):
        assert_matches(a, r, dtype, what)
        if SIMULATOR:  # the kernel source as Python: the same arithmetic, bit for bit
            np.testing.assert_array_equal(a, b, err_msg=f"{what}: 64-bit and 32-bit indexing differ")
        else:  # two compiled kernels: NVVM may contract multiply-adds differently, and atomics add in any order
            assert_matches(a, b, dtype, f"{what}: 64-bit vs 32-bit indexing")


def test_non_contiguous_device_arrays_are_copied_or_refused_by_name():
    # The deformable kernels read flat C-contiguous memory. A non-contiguous device input
    # is copied into a contiguous one on the device when CuPy is installed; without CuPy
    # (the simulator) it is refused with a ValueError that says what to do.
    cfg = CONFIGS["square"]
    rng = np.random.default_rng(43)
    x, offset, mask, _ = make_inputs(rng, cfg, np.float64, True)
    wide = np.zeros(x.shape[:3] + (2 * x.shape[3],))
    wide[..., ::2] = x
    x_strided = nbcuda.to_device(wide)[:, :, :, ::2]  # x's values, every other column of a wider array
    assert not x_strided.is_c_contiguous()
    geo = cfg[4:8]
    try:
        import cupy  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match="C-contiguous"):
            cu.deform_im2col(x_strided, nbcuda.to_device(offset), nbcuda.to_device(mask), *geo, out_hw(cfg), cfg[8])
        return
    got = cu.deform_im2col(x_strided, nbcuda.to_device(offset), nbcuda.to_device(mask), *geo, out_hw(cfg), cfg[8])
    want = ref.deform_im2col(x, offset, mask, *geo, out_hw(cfg), cfg[8])
    got = got.get() if hasattr(got, "get") else got.copy_to_host()
    assert_matches(got, want, np.float64, "cols from a strided x")
