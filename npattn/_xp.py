"""The array module of a call's arrays: NumPy for host arrays, CuPy for CUDA arrays.

npattn's deformable convolution and sampling, ``conv2d``, ``sigmoid`` and the deformable
blocks are written once against an array module ``xp`` (reshapes, products, sums), the
way SciPy's array-API support does it, so the same function runs on NumPy arrays and,
with the sampling kernels of the "cuda" backend, on CUDA arrays without leaving the
device. A CUDA array is anything with
``__cuda_array_interface__``: CuPy arrays, PyTorch CUDA tensors, Numba device arrays;
the last two are viewed as CuPy arrays without a copy (``cupy.asarray``), and results are
CuPy arrays (zero-copy to PyTorch and JAX through DLPack: ``torch.from_dlpack(out)``).

CuPy is optional (the ``gpu`` extra) and imported only when a CUDA array arrives or the
"cuda" backend is asked for; ``import npattn`` never imports it.
"""

from __future__ import annotations

import numpy as np

__all__ = ["array_module", "cupy_or_reason", "device_namespace", "is_cuda_array", "like_forward", "namespace"]


def is_cuda_array(a) -> bool:
    """True for a CUDA array (``__cuda_array_interface__``), False for NumPy arrays and
    anything else."""
    return not isinstance(a, np.ndarray) and hasattr(a, "__cuda_array_interface__")


_CUPY = None  # the module once imported and usable, or the reason it is not (str)


def cupy_or_reason():
    """``(cupy, None)`` when CuPy imports and sees a device, else ``(None, why)``."""
    global _CUPY
    if _CUPY is None:
        try:
            import cupy

            cupy.cuda.runtime.getDeviceCount()  # raises without a driver or device
            _CUPY = cupy
        except Exception as exc:  # ImportError, CUDARuntimeError, ...
            _CUPY = f"CuPy is not usable here ({type(exc).__name__}: {exc}); install the gpu extra (cupy-cuda13x) on a machine with an NVIDIA GPU"
    if isinstance(_CUPY, str):
        return None, _CUPY
    return _CUPY, None


def device_namespace(op: str, arrays: dict):
    """For an op that received CUDA arrays: ``(cupy, {name: cupy array or None})``, the
    arrays viewed as CuPy arrays without copying. Raises ``TypeError`` naming an
    argument that is neither a CUDA array nor None when another one is (mixing host and
    device arrays would hide a copy), and ``BackendUnavailable`` without CuPy."""
    from .sampling import BackendUnavailable

    cupy, why = cupy_or_reason()
    if cupy is None:
        names = [n for n, a in arrays.items() if is_cuda_array(a)]
        raise BackendUnavailable(f"{op}: {names[0]} is a CUDA array, which needs CuPy: {why}")
    out = {}
    for name, a in arrays.items():
        if a is None:
            out[name] = None
        elif is_cuda_array(a):
            out[name] = cupy.asarray(a)
        else:
            raise TypeError(
                f"{op}: {name} must be a CUDA array like the other arguments (all on the device or all "
                f"NumPy arrays), got {type(a).__name__}"
            )
    return cupy, out


def namespace(op: str, arrays: dict):
    """``(xp, arrays)`` for a call: ``(numpy, arrays)`` unchanged when none of them is a
    CUDA array, else :func:`device_namespace` (every array a CUDA array viewed as CuPy,
    ``TypeError`` naming the first NumPy array among them)."""
    if any(is_cuda_array(a) for a in arrays.values()):
        return device_namespace(op, arrays)
    return np, arrays


def array_module(*arrays):
    """The array module of arrays that a call already placed (a forward's cache): CuPy
    when any of them is a CUDA array, else NumPy. Checks nothing else."""
    if any(is_cuda_array(a) for a in arrays):
        cupy, why = cupy_or_reason()
        if cupy is None:
            from .sampling import BackendUnavailable

            raise BackendUnavailable(f"a CUDA array needs CuPy: {why}")
        return cupy
    return np


def like_forward(op: str, name: str, a, xp):
    """An upstream gradient ``a`` on the side its forward ran on (``xp``): a CUDA array
    viewed as CuPy when ``xp`` is CuPy, ``a`` itself otherwise (the caller checks it as a
    NumPy array). ``TypeError`` naming ``name`` when ``a`` is on the other side: a
    NumPy array for a forward that ran on the device, or a CUDA array for one that ran
    on the host (either would hide a copy)."""
    if xp is np:
        if is_cuda_array(a):
            raise TypeError(
                f"{op}: {name} must be a NumPy array like the forward's input, got {type(a).__name__} (a CUDA array)"
            )
        return a
    if not is_cuda_array(a):
        raise TypeError(f"{op}: {name} must be a CUDA array like the forward's input, got {type(a).__name__}")
    return xp.asarray(a)
