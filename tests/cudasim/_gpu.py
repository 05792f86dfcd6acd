"""Whether the CUDA kernels can run in this session: on Numba's simulator
(``NUMBA_ENABLE_CUDASIM=1``) or on an NVIDIA GPU; and the skip marks that say so."""

import os

import pytest

SIMULATOR = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"


def gpu_present():
    if SIMULATOR:
        return True
    try:
        from numba import cuda

        return cuda.is_available()
    except Exception:
        return False


CUDA_MARKS = [
    pytest.mark.cudasim,
    pytest.mark.skipif(
        not gpu_present(),
        reason="CUDA kernels need NUMBA_ENABLE_CUDASIM=1 (Numba's simulator) or an NVIDIA GPU; neither is present",
    ),
]
