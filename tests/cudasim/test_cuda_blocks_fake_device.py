"""DeformConv2dPack, ModulatedDeformConv2dPack and ConvOffset2D on device arrays, end to
end, without a GPU: the fake CuPy of ``tests/_fake_cupy.py`` (arrays that refuse any
implicit conversion to NumPy) with the "cuda" sampling backend on Numba's simulator.

Each block's forward and backward on a fake device ``x`` and ``grad_out`` must keep
every step on the device: the offset convolution, sigmoid and concatenation in the
(fake) CuPy, the sampling in npattn's numba.cuda kernels (launched on the device arrays
themselves, as with CuPy), and the only host-to-device copies are the block's
parameters, once per forward; nothing comes back to the host. The numbers must be the
NumPy path's (``backend="numpy"``) to rounding. A NumPy ``grad_out`` for a device
forward, or a device one for a NumPy forward, raises ``TypeError`` naming it.

Tiny shapes: the simulator runs each thread in Python.
"""

import numpy as np
import pytest

import _fake_cupy as fc
import npattn

from _gpu import CUDA_MARKS

pytestmark = CUDA_MARKS

# float64: the sampling kernels accumulate the scatters in float64 in another order (and
# the device fuses multiply-adds); per array, max |difference| <= TOL * max |expected|,
# the bounds of test_cuda_glue.py
TOL = {np.float64: 1e-12, np.float32: 2e-6}

# block, constructor arguments, x shape: stride, padding, uneven kernel, weight and offset
# groups, and the layers' own defaults
CASES = {
    "dcnv1-strided-groups": (
        npattn.DeformConv2dPack,
        dict(in_channels=4, out_channels=2, kernel_size=(3, 2), stride=(2, 1), padding=1, groups=2, deform_groups=2),
        (2, 4, 5, 3),
    ),
    "dcnv1-default": (npattn.DeformConv2dPack, dict(in_channels=2, out_channels=3, kernel_size=3, padding=1), (1, 2, 3, 4)),
    "dcnv2-bias": (
        npattn.ModulatedDeformConv2dPack,
        dict(in_channels=2, out_channels=3, kernel_size=(2, 3), padding=(1, 0), dilation=(1, 2)),
        (2, 2, 3, 6),
    ),
    "dcnv2-nobias-groups": (
        npattn.ModulatedDeformConv2dPack,
        dict(in_channels=4, out_channels=2, kernel_size=2, stride=2, groups=2, deform_groups=2, bias=False,
             border_grad="torchvision"),
        (1, 4, 5, 4),
    ),
    "convoffset": (npattn.ConvOffset2D, dict(filters=3), (2, 3, 3, 4)),
}


def make(name, dtype, backend=None):
    """The block (``backend``) and its NumPy-backend twin with the same random state:
    nonzero offset convolutions, so the offsets (and the mask) are not the trivial ones."""
    cls, kw, x_shape = CASES[name]
    rng = np.random.default_rng([83, list(CASES).index(name)])
    blk = cls(**kw, rng=0, dtype=dtype, backend=backend)
    state = {k: rng.uniform(-0.6, 0.6, v.shape) for k, v in blk.state_dict().items()}
    blk.load_state_dict(state)
    ref = cls(**kw, rng=0, dtype=dtype, backend="numpy")
    ref.load_state_dict(state)
    x = rng.standard_normal(x_shape).astype(dtype)
    return blk, ref, x, rng


def close(actual, expected, dtype, what, kind=fc.FakeDeviceArray):
    assert isinstance(actual, kind), f"{what}: expected a {kind.__name__}, got {type(actual).__name__}"
    got = actual.get() if isinstance(actual, fc.FakeDeviceArray) else actual
    assert got.dtype == expected.dtype and got.shape == expected.shape, what
    if expected.size:
        err = float(np.max(np.abs(got.astype(np.float64) - expected)))
        assert err <= TOL[dtype] * max(float(np.max(np.abs(expected))), 1e-300), f"{what}: {err:.3e}"


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("name", list(CASES))
def test_block_stays_on_the_device(monkeypatch, name, dtype):
    cupy = fc.install(monkeypatch)
    blk, ref, x, rng = make(name, dtype)
    y_ref, cache_ref = ref.forward(x)
    dy = rng.standard_normal(y_ref.shape).astype(dtype)
    (dx_ref,), params_ref = ref.backward(dy, cache_ref)

    y, cache = blk.forward(fc.to_device(x))
    uploads = sorted(cupy.uploads)
    (dx,), params = blk.backward(fc.to_device(dy), cache)
    # the parameters, once each, in the forward; nothing else crosses in either direction
    assert uploads == sorted(v.shape for v in blk.state_dict().values())
    assert sorted(cupy.uploads) == uploads and cupy.downloads == []
    # the block's state is still NumPy (the device copies were for the call)
    assert all(type(v) is np.ndarray for v in blk._state.values())

    close(y, y_ref, dtype, "y")
    close(dx, dx_ref, dtype, "d x")
    assert list(params) == list(params_ref)
    for k in params_ref:
        close(params[k], params_ref[k], dtype, k)


@pytest.mark.parametrize("name", ["dcnv1-default", "dcnv2-bias", "convoffset"])
def test_grad_out_on_the_wrong_side_is_refused_naming_it(monkeypatch, name):
    fc.install(monkeypatch)
    blk, _, x, _ = make(name, np.float64)
    y, cache = blk.forward(fc.to_device(x))
    with pytest.raises(TypeError, match="grad_out must be a CUDA array like the forward's input"):
        blk.backward(np.ones(y.shape), cache)
    y, cache = blk.forward(x)
    with pytest.raises(TypeError, match="grad_out must be a"):
        blk.backward(fc.to_device(np.ones(y.shape)), cache)


@pytest.mark.parametrize("name", ["dcnv1-default", "convoffset"])
def test_device_x_needs_the_cuda_backend(monkeypatch, name):
    fc.install(monkeypatch)
    blk, _, x, _ = make(name, np.float64, backend="numpy")
    with pytest.raises(ValueError, match="backend='cuda'"):
        blk.forward(fc.to_device(x))


def test_numpy_x_on_the_cuda_backend_comes_back_as_numpy(monkeypatch):
    """With CuPy present, NumPy arrays on backend="cuda": the deformable convolution
    uploads its arrays once and downloads its results once; the offset convolution and
    everything else of the block stay NumPy, and so do all results."""
    cupy = fc.install(monkeypatch)
    blk, ref, x, rng = make("dcnv2-bias", np.float64, backend="cuda")
    y_ref, cache_ref = ref.forward(x)
    dy = rng.standard_normal(y_ref.shape)
    (dx_ref,), params_ref = ref.backward(dy, cache_ref)
    y, cache = blk.forward(x)
    assert len(cupy.uploads) == 5 and len(cupy.downloads) == 1  # input, offset, weight, bias, mask; out
    (dx,), params = blk.backward(dy, cache)
    assert len(cupy.uploads) == 6 and len(cupy.downloads) == 6  # grad_out; d input, offset, mask, weight, bias
    close(y, y_ref, np.float64, "y", kind=np.ndarray)
    close(dx, dx_ref, np.float64, "d x", kind=np.ndarray)
    for k in params_ref:
        close(params[k], params_ref[k], np.float64, k, kind=np.ndarray)
