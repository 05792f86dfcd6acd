"""deform_conv2d and batch_map_offsets end to end on the "cuda" backend, against the
NumPy backend, with NumPy arrays in and out.

On Numba's simulator (``NUMBA_ENABLE_CUDASIM=1``, no CuPy) this runs the glue with the
NumPy array module and the kernels as Python; on a GPU machine with CuPy the same calls
upload the arrays once, run the products in cuBLAS and download the results once. Tiny
shapes: the simulator spends ~150 us per thread.
"""


import numpy as np
import pytest

from npattn.functional import deform as D

from _gpu import CUDA_MARKS, SIMULATOR, gpu_present

pytestmark = CUDA_MARKS

# float64: the products sum in another order (cuBLAS or NumPy's BLAS on another
# chunking), the device fuses multiply-adds, col2im's atomics add in any order: agreement
# to rounding, as max |difference| <= TOL * max |expected| per array
TOL = {np.float64: 1e-12, np.float32: 2e-6}

# (N, C_in, H, W, C_out, kernel, stride, padding, dilation, weight groups, offset groups)
CASES = {
    "uneven": (2, 4, 5, 4, 6, (3, 2), (2, 1), (1, 0), (2, 1), 2, 2),
    "plain": (1, 2, 4, 4, 3, (3, 3), (1, 1), (1, 1), (1, 1), 1, 1),
    "batch0": (0, 2, 4, 4, 2, (3, 3), (1, 1), (1, 1), (1, 1), 1, 1),
}


def make(rng, case, dtype, with_mask):
    n, c_in, h, w, c_out, (kh, kw), (sh, sw), (ph, pw), (dh, dw), g_w, g_off = case
    oh = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    ow = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    a = {
        "input": rng.standard_normal((n, c_in, h, w)),
        "offset": rng.uniform(-1.8, 1.8, (n, 2 * g_off * kh * kw, oh, ow)),
        "weight": rng.standard_normal((c_out, c_in // g_w, kh, kw)),
        "bias": rng.standard_normal(c_out),
        "mask": rng.uniform(0.1, 1.0, (n, g_off * kh * kw, oh, ow)) if with_mask else None,
    }
    a = {k: (None if v is None else v.astype(dtype)) for k, v in a.items()}
    kw_ = {"stride": (sh, sw), "padding": (ph, pw), "dilation": (dh, dw)}
    return a, kw_


def close(actual, expected, dtype, what):
    assert isinstance(actual, np.ndarray), f"{what}: NumPy inputs must give NumPy results, got {type(actual)}"
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, what
    if expected.size:
        err = float(np.max(np.abs(actual.astype(np.float64) - expected)))
        assert err <= TOL[dtype] * max(float(np.max(np.abs(expected))), 1e-300), f"{what}: {err:.3e}"


@pytest.mark.parametrize("border_grad", ["torchvision", "mmcv"])
@pytest.mark.parametrize("with_mask", [True, False], ids=["mask", "nomask"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("name", list(CASES))
def test_deform_conv2d_cuda_matches_numpy(name, dtype, with_mask, border_grad):
    rng = np.random.default_rng([61, list(CASES).index(name)])
    a, kw = make(rng, CASES[name], dtype, with_mask)
    # budget of one image: the chunk loop runs more than once
    per_image = 1 if not a["input"].shape[0] else None
    out, cache = D.deform_conv2d_forward(**a, **kw, backend="cuda", border_grad=border_grad, column_budget_bytes=per_image)
    ref, rcache = D.deform_conv2d_forward(**a, **kw, backend="numpy", border_grad=border_grad)
    close(out, ref, dtype, "output")
    dy = rng.standard_normal(out.shape).astype(dtype)
    got = D.deform_conv2d_backward(dy, cache)
    want = D.deform_conv2d_backward(dy, rcache)
    assert set(got) == set(want)
    for k in want:
        close(got[k], want[k], dtype, k)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_batch_map_offsets_cuda_matches_numpy(dtype):
    rng = np.random.default_rng(67)
    x = rng.standard_normal((3, 4, 5)).astype(dtype)
    off = rng.uniform(-1.5, 1.5, (3, 4, 5, 2)).astype(dtype)
    out, cache = D.batch_map_offsets_forward(x, off, backend="cuda")
    ref, rcache = D.batch_map_offsets_forward(x, off, backend="numpy")
    close(out, ref, dtype, "output")
    dy = rng.standard_normal(out.shape).astype(dtype)
    got, want = D.batch_map_offsets_backward(dy, cache), D.batch_map_offsets_backward(dy, rcache)
    for k in want:
        close(got[k], want[k], dtype, k)
