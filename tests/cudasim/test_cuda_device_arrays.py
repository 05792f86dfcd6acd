"""CUDA arrays in, CUDA arrays out: deform_conv2d, batch_map_offsets and the DeformConv2d
block on CuPy arrays, PyTorch CUDA tensors and Numba device arrays, on a real GPU.

Needs an NVIDIA GPU and CuPy (the ``gpu`` extra); skipped otherwise, and on Numba's
simulator, where CuPy cannot run (there ``test_cuda_glue.py`` runs the same glue with
the NumPy array module).
"""

import os

import numpy as np
import pytest

import npattn
from npattn._xp import cupy_or_reason
from npattn.functional import deform as D

SIMULATOR = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
cp, WHY = (None, "Numba's simulator: CuPy cannot run there") if SIMULATOR else cupy_or_reason()
pytestmark = [pytest.mark.cudasim, pytest.mark.skipif(cp is None, reason=f"needs a GPU and CuPy: {WHY}")]

TOL = {np.float64: 1e-12, np.float32: 2e-6}  # as test_cuda_glue.py: rounding, per array


def make(rng, dtype):
    a = {
        "input": rng.standard_normal((3, 4, 7, 6)),
        "offset": rng.uniform(-2, 2, (3, 2 * 2 * 6, 3, 5)),
        "weight": rng.standard_normal((6, 2, 3, 2)),
        "bias": rng.standard_normal(6),
        "mask": rng.uniform(0.1, 1, (3, 2 * 6, 3, 5)),
    }
    return {k: v.astype(dtype) for k, v in a.items()}, {"stride": (2, 1), "padding": (1, 0), "dilation": (2, 1)}


def close(actual, expected, dtype, what):
    assert isinstance(actual, cp.ndarray), f"{what}: CUDA inputs must give CuPy results, got {type(actual)}"
    actual = cp.asnumpy(actual)
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, what
    err = float(np.max(np.abs(actual.astype(np.float64) - expected)))
    assert err <= TOL[dtype] * float(np.max(np.abs(expected))), f"{what}: {err:.3e}"


@pytest.mark.parametrize("kind", ["cupy", "torch", "numba"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_deform_conv2d_keeps_cuda_arrays_on_the_device(kind, dtype):
    rng = np.random.default_rng(71)
    a, kw = make(rng, dtype)
    if kind == "cupy":
        dev = {k: cp.asarray(v) for k, v in a.items()}
    elif kind == "torch":
        torch = pytest.importorskip("torch", reason="PyTorch not installed")
        if not torch.cuda.is_available():
            pytest.skip("this PyTorch has no CUDA")
        dev = {k: torch.from_numpy(v).cuda() for k, v in a.items()}
    else:
        from numba import cuda

        dev = {k: cuda.to_device(v) for k, v in a.items()}
    out, cache = D.deform_conv2d_forward(**dev, **kw)  # backend=None: CUDA arrays mean "cuda"
    ref, rcache = D.deform_conv2d_forward(**a, **kw, backend="numpy")
    close(out, ref, dtype, "output")
    dy = rng.standard_normal(ref.shape).astype(dtype)
    got = D.deform_conv2d_backward(cp.asarray(dy), cache)
    want = D.deform_conv2d_backward(dy, rcache)
    for k in want:
        close(got[k], want[k], dtype, k)


def test_batch_map_offsets_and_the_block_on_cupy_arrays():
    rng = np.random.default_rng(73)
    x = rng.standard_normal((2, 5, 4))
    off = rng.uniform(-1.5, 1.5, (2, 5, 4, 2))
    out, cache = D.batch_map_offsets_forward(cp.asarray(x), cp.asarray(off))
    ref, rcache = D.batch_map_offsets_forward(x, off, backend="numpy")
    close(out, ref, np.float64, "batch_map_offsets")
    dy = rng.standard_normal(ref.shape)
    got, want = D.batch_map_offsets_backward(cp.asarray(dy), cache), D.batch_map_offsets_backward(dy, rcache)
    for k in want:
        close(got[k], want[k], np.float64, k)

    blk = npattn.DeformConv2d(4, 6, 3, padding=1, groups=2, rng=0, dtype=np.float64)
    xb = rng.standard_normal((2, 4, 5, 6))
    ob = rng.uniform(-2, 2, (2, 18, 5, 6))
    y, c = blk.forward(cp.asarray(xb), cp.asarray(ob))
    yr, cr = blk.forward(xb, ob)
    close(y, yr, np.float64, "DeformConv2d")
    (gx, go), gp = blk.backward(cp.ones(y.shape), c)
    (rx, ro), rp = blk.backward(np.ones(yr.shape), cr)
    close(gx, rx, np.float64, "d x")
    close(go, ro, np.float64, "d offset")
    for k in rp:
        close(gp[k], rp[k], np.float64, k)


def test_mixed_or_misplaced_arrays_are_refused():
    rng = np.random.default_rng(79)
    a, kw = make(rng, np.float64)
    dev = {k: cp.asarray(v) for k, v in a.items()}
    with pytest.raises(TypeError, match="weight must be a CUDA array"):
        D.deform_conv2d_forward(**{**dev, "weight": a["weight"]}, **kw)
    with pytest.raises(ValueError, match="backend='cuda'"):
        D.deform_conv2d_forward(**dev, **kw, backend="numba")
    out, cache = D.deform_conv2d_forward(**dev, **kw)
    with pytest.raises(TypeError, match="grad_out must be a CUDA array"):
        D.deform_conv2d_backward(np.ones(out.shape), cache)


def test_numpy_arrays_on_the_cuda_backend_come_back_as_numpy():
    rng = np.random.default_rng(83)
    a, kw = make(rng, np.float32)
    out, cache = D.deform_conv2d_forward(**a, **kw, backend="cuda")
    assert isinstance(out, np.ndarray) and cache.on_device and cache.to_host
    g = D.deform_conv2d_backward(np.ones(out.shape, np.float32), cache)
    assert all(isinstance(v, np.ndarray) for v in g.values())
