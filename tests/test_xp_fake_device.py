"""conv2d and sigmoid on device arrays, without a GPU: the fake CuPy of ``_fake_cupy.py``.

conv2d_forward / _backward and sigmoid_forward / _backward are written once against the
array module of their inputs. On fake device arrays (which refuse any implicit
conversion to NumPy) they must give device arrays with the NumPy path's numbers, copy
nothing between host and device, and refuse a NumPy array among device arrays with a
``TypeError`` naming it. The deformable blocks that use them run end to end on the fake
in ``tests/cudasim/test_cuda_blocks_fake_device.py`` (their sampling needs Numba's CUDA
simulator).
"""

import numpy as np
import pytest

import _fake_cupy as fc
from npattn.functional import conv2d_backward, conv2d_forward, sigmoid_backward, sigmoid_forward

# the device path runs the same NumPy calls on the same data here, so the numbers agree to
# rounding at most; per array: max |difference| <= TOL * max |expected|
TOL = {np.float64: 1e-12, np.float32: 2e-6}


@pytest.fixture
def cupy(monkeypatch):
    return fc.install(monkeypatch)


def close(actual, expected, dtype, what):
    assert isinstance(actual, fc.FakeDeviceArray), f"{what}: device inputs must give device results, got {type(actual)}"
    got = actual.get()
    assert got.dtype == expected.dtype and got.shape == expected.shape, what
    if expected.size:
        err = float(np.max(np.abs(got.astype(np.float64) - expected)))
        assert err <= TOL[dtype] * max(float(np.max(np.abs(expected))), 1e-300), f"{what}: {err:.3e}"


def test_the_fake_refuses_host_arrays(cupy):
    """The harness can fail: every way a NumPy array can meet a device array raises."""
    d = fc.to_device(np.ones((2, 3)))
    h = np.ones((2, 3))
    attempts = {
        "np.asarray": lambda: np.asarray(d),
        "np.zeros_like": lambda: np.zeros_like(d),
        "np.concatenate": lambda: np.concatenate([h, d]),
        "np.matmul": lambda: np.matmul(h, d.transpose(1, 0)),
        "host + device": lambda: h + d,
        "device + host": lambda: d + h,
        "device += host": lambda: d.__iadd__(h),
        "host[...] = device": lambda: h.__setitem__(Ellipsis, d),
        "device[...] = host": lambda: d.__setitem__(Ellipsis, h),
        "cupy.concatenate(host)": lambda: cupy.concatenate([d, h]),
        "cupy.matmul(host)": lambda: cupy.matmul(d, h.T),
    }
    for what, f in attempts.items():
        with pytest.raises(TypeError):
            f()
            pytest.fail(what)
    d += 1.5  # scalars are fine
    assert float(d.get().sum()) == 15.0


# (x shape, weight shape, stride, padding, dilation, groups): the stride-1 path with and
# without junk columns, its 1x1 shortcut, the im2col path, small (einsum) and large
# (matmul) per-group weight gradients
CONV_CASES = {
    "3x3-pad": ((2, 4, 5, 6), (6, 4, 3, 3), 1, 1, 1, 1),
    "1x1": ((2, 4, 5, 3), (6, 4, 1, 1), 1, 0, 1, 1),
    "strided-groups": ((2, 4, 7, 6), (6, 2, 3, 2), (2, 1), (1, 0), (2, 1), 2),
    "large-groups": ((1, 12, 5, 4), (10, 6, 2, 3), 1, (0, 1), 1, 2),
}


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("name", list(CONV_CASES))
def test_conv2d_on_device_arrays(cupy, name, dtype, bias):
    xs, ws, stride, padding, dilation, groups = CONV_CASES[name]
    rng = np.random.default_rng([5, list(CONV_CASES).index(name)])
    x, w = rng.standard_normal(xs).astype(dtype), rng.standard_normal(ws).astype(dtype)
    b = rng.standard_normal(ws[0]).astype(dtype) if bias else None
    geo = {"stride": stride, "padding": padding, "dilation": dilation, "groups": groups}
    y, cache = conv2d_forward(x, w, b, **geo)
    dy = rng.standard_normal(y.shape).astype(dtype)
    want = conv2d_backward(dy, cache)
    yd, cache_d = conv2d_forward(fc.to_device(x), fc.to_device(w), None if b is None else fc.to_device(b), **geo)
    got = conv2d_backward(fc.to_device(dy), cache_d)
    assert cupy.uploads == [] and cupy.downloads == []  # nothing crossed between host and device
    close(yd, y, dtype, "y")
    assert set(got) == set(want)
    for k in want:
        close(got[k], want[k], dtype, k)


def test_conv2d_refuses_mixed_arrays_naming_them(cupy):
    rng = np.random.default_rng(3)
    x, w, b = rng.standard_normal((1, 2, 4, 4)), rng.standard_normal((3, 2, 3, 3)), rng.standard_normal(3)
    xd, wd, bd = fc.to_device(x), fc.to_device(w), fc.to_device(b)
    with pytest.raises(TypeError, match="conv2d: weight must be a CUDA array"):
        conv2d_forward(xd, w, bd)
    with pytest.raises(TypeError, match="conv2d: bias must be a CUDA array"):
        conv2d_forward(xd, wd, b)
    with pytest.raises(TypeError, match="conv2d: x must be a CUDA array"):
        conv2d_forward(x, wd, bd)
    y, cache_d = conv2d_forward(xd, wd, bd)
    with pytest.raises(TypeError, match="conv2d_backward: dy must be a CUDA array like the forward's input"):
        conv2d_backward(np.ones(y.shape), cache_d)
    _, cache = conv2d_forward(x, w, b)
    with pytest.raises(TypeError, match="conv2d_backward: dy must be a NumPy array like the forward's input"):
        conv2d_backward(fc.to_device(np.ones(y.shape)), cache)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_sigmoid_on_device_arrays(cupy, dtype):
    rng = np.random.default_rng(7)
    x = (rng.standard_normal((2, 3, 4)) * 30).astype(dtype)  # overflowing exp(-x) included
    y, cache = sigmoid_forward(x)
    yd, cache_d = sigmoid_forward(fc.to_device(x))
    close(yd, y, dtype, "y")
    dy = rng.standard_normal(x.shape).astype(dtype)
    close(sigmoid_backward(fc.to_device(dy), cache_d)["x"], sigmoid_backward(dy, cache)["x"], dtype, "dx")
    with pytest.raises(TypeError, match="sigmoid_backward: dy must be a CUDA array"):
        sigmoid_backward(dy, cache_d)
    with pytest.raises(TypeError, match="sigmoid_backward: dy must be a NumPy array"):
        sigmoid_backward(fc.to_device(dy), cache)
    assert cupy.uploads == []
