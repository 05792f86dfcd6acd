"""Every CUDA sampling kernel compiles to PTX, for float32 and float64, without a GPU.

``numba.cuda.compile_ptx`` only needs NVVM, which ``numba-cuda[cu13]`` installs; this
catches typing and lowering errors in npattn/sampling/cuda.py on machines with no GPU
(the simulator runs the kernels as Python and would not notice them).
"""

import os
import re

import numpy as np
import pytest

SIMULATOR = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
# CI sets this where it installed the cuda extra: there a missing NVVM is a failure, not a skip
REQUIRED = os.environ.get("NPATTN_REQUIRE_PTX") == "1"
EXTRA = "needs NVVM, which the cuda extra installs (pip install -e '.[cuda]')"


def _ptx_unavailable():
    """Why PTX cannot be compiled here (None when it can): a trivial kernel is compiled."""
    try:
        from numba import cuda

        def probe(a):
            a[0] = 1.0

        cuda.compile_ptx(probe, "void(float32[:])", cc=(7, 5))
    except Exception as exc:  # ImportError, or Numba's error when it finds no NVVM / CUDA library
        return f"{EXTRA}; here: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return None


UNAVAILABLE = None if SIMULATOR else _ptx_unavailable()
if UNAVAILABLE and REQUIRED:
    raise RuntimeError(f"NPATTN_REQUIRE_PTX=1 but the PTX compiler is missing: {UNAVAILABLE}")
pytestmark = [
    pytest.mark.skipif(
        SIMULATOR, reason="NUMBA_ENABLE_CUDASIM=1 replaces the CUDA compiler by the simulator; PTX is checked in the normal run"
    ),
    pytest.mark.skipif(UNAVAILABLE is not None, reason=str(UNAVAILABLE)),
]

if not SIMULATOR and UNAVAILABLE is None:
    from numba import cuda

    from npattn.sampling import cuda as cu

# the oldest compute capability this NVVM accepts, the A100's and the H100's
CCS = [(7, 5), (8, 0), (9, 0)]
# the deformable kernels twice: 32-bit index arithmetic, and the 64-bit fallback ("/64")
KERNELS = ["im2col", "col2im", "coord", "im2col/64", "col2im/64", "coord/64", "map", "map_backward", "cast", "zero"]
# the float64 accumulators of the scatters use atomic adds
ATOMIC = {"col2im", "col2im/64", "map_backward"}


@pytest.mark.parametrize("cc", CCS, ids=lambda cc: f"sm_{cc[0]}{cc[1]}")
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", KERNELS)
def test_kernel_compiles_to_ptx(name, dtype, cc):
    kernels = cu.ptx_kernels(dtype)
    assert set(kernels) == set(KERNELS)
    pyfunc, signature = kernels[name]
    ptx, restype = cuda.compile_ptx(pyfunc, signature, cc=cc)
    assert str(restype) == "none"
    assert f".target sm_{cc[0]}{cc[1]}" in ptx
    assert ".entry" in ptx
    has_atomic = "atom.global.add.f64" in ptx
    assert has_atomic == (name in ATOMIC), f"{name}: float64 atomic add {'missing' if not has_atomic else 'unexpected'}"
    if name in ("im2col", "col2im", "coord"):  # the 32-bit variants split their flat index with 32-bit divisions
        assert re.search(r"\b(div|rem)\.u32\b", ptx), f"{name}: no 32-bit division"
    if np.dtype(dtype) == np.float32 and name not in ("cast", "zero"):
        # float32 kernels compute in float32: no silent promotion of the arithmetic to
        # float64 (only the accumulators of the scatters are float64, via atomics)
        ops = set(re.findall(r"\s((?:mul|fma|sub|add|div)(?:\.rn)?\.f(?:32|64))\s", ptx))
        assert ops & {"mul.f32", "mul.rn.f32", "fma.rn.f32"}, ops
        assert not {op for op in ops if op.endswith("f64")}, ops


def test_cuda_backend_reports_whether_a_device_is_present():
    from npattn import sampling

    if cuda.is_available():
        assert cu.unavailable_reason() is None
        assert sampling.get_backend("cuda") is cu
        return
    reason = cu.unavailable_reason()
    assert reason and "no CUDA device" in reason
    with pytest.raises(sampling.BackendUnavailable, match="no CUDA device"):
        sampling.get_backend("cuda")
    x = np.zeros((1, 1, 3, 3))
    with pytest.raises(sampling.BackendUnavailable, match="no CUDA device"):
        cu.deform_im2col(x, np.zeros((1, 2, 3, 3)), None, (1, 1), 1, 0, 1, (3, 3), 1)


def test_a_compiler_that_fails_is_reported_as_unavailable_with_its_error(monkeypatch):
    """An incompatible numba-cuda / NumPy pair fails inside the compiler at the first
    launch (numba-cuda 0.30.4 under NumPy 2.5: np.row_stack is gone). The backend must
    say so when asked, not when a kernel is launched."""
    from npattn import sampling

    calls = []

    def broken_jit(*args, **kwargs):
        calls.append(args)
        raise AttributeError("module 'numpy' has no attribute 'row_stack'")

    monkeypatch.setattr(cu.cuda, "is_available", lambda: True)
    monkeypatch.setattr(cu.cuda, "jit", broken_jit)
    monkeypatch.setattr(cu, "_PROBE_OUTCOME", None)
    monkeypatch.setattr(cu.cuda, "to_device", lambda a: np.array(a))
    reason = cu.unavailable_reason()
    assert "test kernel failed to compile or launch" in reason
    assert "AttributeError: module 'numpy' has no attribute 'row_stack'" in reason
    with pytest.raises(sampling.BackendUnavailable, match="row_stack"):
        sampling.get_backend("cuda")
    assert "row_stack" in sampling.available_backends()["cuda"]
    assert len(calls) == 1  # probed once, the outcome cached


def test_a_kernel_that_computes_wrong_numbers_is_reported(monkeypatch):
    class Launch:
        def __getitem__(self, cfg):
            return lambda dev: None  # "runs" and leaves the array as it was

    monkeypatch.setattr(cu.cuda, "is_available", lambda: True)
    monkeypatch.setattr(cu.cuda, "jit", lambda f: Launch())
    monkeypatch.setattr(cu.cuda, "to_device", lambda a: type("Dev", (), {"copy_to_host": lambda self: np.array(a)})())
    monkeypatch.setattr(cu, "_PROBE_OUTCOME", None)
    reason = cu.unavailable_reason()
    assert reason.startswith("a test kernel ran but computed [0.0, 1.0, 2.0, 3.0] instead of [1.0, 3.0, 5.0, 7.0]")
