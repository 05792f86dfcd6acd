"""DeformConv2dPack, ModulatedDeformConv2dPack and ConvOffset2D on CuPy arrays and
PyTorch CUDA tensors, on a real GPU, against the NumPy path.

Needs an NVIDIA GPU and CuPy (the ``gpu`` extra); skipped otherwise, and on Numba's
simulator, where CuPy cannot run (there ``test_cuda_blocks_fake_device.py`` runs the
same blocks on a CuPy stand-in).
"""

import os

import numpy as np
import pytest

import npattn
from npattn._xp import cupy_or_reason

SIMULATOR = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
cp, WHY = (None, "Numba's simulator: CuPy cannot run there") if SIMULATOR else cupy_or_reason()
pytestmark = [pytest.mark.cudasim, pytest.mark.skipif(cp is None, reason=f"needs a GPU and CuPy: {WHY}")]

# cuBLAS sums in another order, the device fuses multiply-adds, the scatters' atomics add
# in any order; float32 offsets and masks computed on the device move the sampling
# positions by rounding. Per array: max |difference| <= TOL * max |expected|.
TOL = {np.float64: 1e-12, np.float32: 2e-6}

CASES = {
    "dcnv1": (
        npattn.DeformConv2dPack,
        dict(in_channels=4, out_channels=6, kernel_size=(3, 2), stride=(2, 1), padding=1, groups=2, deform_groups=2),
        (3, 4, 9, 7),
    ),
    "dcnv2": (
        npattn.ModulatedDeformConv2dPack,
        dict(in_channels=4, out_channels=6, kernel_size=3, padding=1, dilation=(1, 2), deform_groups=2),
        (2, 4, 8, 9),
    ),
    "convoffset": (npattn.ConvOffset2D, dict(filters=5), (2, 5, 6, 7)),
}


def make(name, dtype):
    cls, kw, x_shape = CASES[name]
    rng = np.random.default_rng([89, list(CASES).index(name)])
    blk = cls(**kw, rng=0, dtype=dtype)  # backend None: CUDA arrays mean "cuda"
    state = {k: rng.uniform(-0.5, 0.5, v.shape) for k, v in blk.state_dict().items()}  # nonzero offsets
    blk.load_state_dict(state)
    ref = cls(**kw, rng=0, dtype=dtype, backend="numpy")
    ref.load_state_dict(state)
    return blk, ref, rng.standard_normal(x_shape).astype(dtype), rng


def close(actual, expected, dtype, what):
    assert isinstance(actual, cp.ndarray), f"{what}: CUDA inputs must give CuPy results, got {type(actual)}"
    actual = cp.asnumpy(actual)
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, what
    err = float(np.max(np.abs(actual.astype(np.float64) - expected)))
    assert err <= TOL[dtype] * float(np.max(np.abs(expected))), f"{what}: {err:.3e}"


@pytest.mark.parametrize("kind", ["cupy", "torch"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("name", list(CASES))
def test_block_on_cuda_arrays_matches_numpy(name, dtype, kind):
    if kind == "cupy":
        dev = cp.asarray
    else:
        torch = pytest.importorskip("torch", reason="PyTorch not installed")
        if not torch.cuda.is_available():
            pytest.skip("this PyTorch has no CUDA")

        def dev(a):
            return torch.from_numpy(a).cuda()

    blk, ref, x, rng = make(name, dtype)
    y_ref, cache_ref = ref.forward(x)
    dy = rng.standard_normal(y_ref.shape).astype(dtype)
    (dx_ref,), params_ref = ref.backward(dy, cache_ref)
    y, cache = blk.forward(dev(x))
    (dx,), params = blk.backward(dev(dy), cache)
    close(y, y_ref, dtype, "y")
    close(dx, dx_ref, dtype, "d x")
    assert list(params) == list(params_ref)
    for k in params_ref:
        close(params[k], params_ref[k], dtype, k)


@pytest.mark.parametrize("name", list(CASES))
def test_numpy_grad_out_for_a_device_forward_is_refused(name):
    blk, _, x, _ = make(name, np.float64)
    y, cache = blk.forward(cp.asarray(x))
    with pytest.raises(TypeError, match="grad_out must be a CUDA array"):
        blk.backward(np.ones(y.shape), cache)
