"""Bilinear sampling, the one hot loop: one API, three backends.

This module is the only place that picks a backend. The choice, in order:

1. the ``backend=`` argument of the call ("numpy", "numba" or "cuda");
2. the ``NPATTN_BACKEND`` environment variable;
3. the fastest available: "numba" when numba imports, else "numpy".

Asking for a backend that cannot run (numba not installed, no CUDA device) raises
:class:`BackendUnavailable` saying why. Backend modules are imported on first use, so
``import npattn`` never imports numba.

Every backend module (``numpy.py``, ``cpu.py`` for "numba", ``cuda.py``) defines the same
functions with the same signatures; ``numpy.py`` is the definition the others are
checked against. See ``numpy.py`` for the semantics of each function.
"""

from __future__ import annotations

import contextlib
import importlib
import os

BACKENDS = ("numpy", "numba", "cuda")
_MODULES = {"numpy": "numpy", "numba": "cpu", "cuda": "cuda"}

# Functions every backend module provides.
FUNCTIONS = (
    "deform_im2col",
    "deform_col2im",
    "deform_col2im_coord",
    "map_coordinates_clamped",
    "map_coordinates_clamped_backward",
)


class BackendUnavailable(RuntimeError):
    """The requested sampling backend cannot run here; the message says why."""


def _load(name):
    if name not in _MODULES:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    try:
        module = importlib.import_module(f".{_MODULES[name]}", __name__)
    except ImportError as exc:
        raise BackendUnavailable(f"sampling backend {name!r} is not available: {exc}") from exc
    reason = module.unavailable_reason()
    if reason:
        raise BackendUnavailable(f"sampling backend {name!r} is not available: {reason}")
    return module


def default_backend() -> str:
    """The name the dispatcher picks when neither argument nor environment names one."""
    try:
        _load("numba")
        return "numba"
    except BackendUnavailable:
        return "numpy"


def resolve_backend(backend=None) -> str:
    """Name of the backend a call with ``backend=`` would use."""
    if backend is None:
        backend = os.environ.get("NPATTN_BACKEND") or None
    if backend is None:
        return default_backend()
    if not isinstance(backend, str):  # before the lookup: an unhashable value would raise there
        raise TypeError(f"backend must be one of {BACKENDS} or None (argument or NPATTN_BACKEND), got {backend!r}")
    if backend not in _MODULES:
        raise ValueError(f"backend must be one of {BACKENDS} (argument or NPATTN_BACKEND), got {backend!r}")
    return backend


def get_backend(backend=None):
    """The backend module for ``backend`` (see the module docstring for the order)."""
    return _load(resolve_backend(backend))


def available_backends() -> dict:
    """name -> None when usable, else the reason it is not."""
    out = {}
    for name in BACKENDS:
        try:
            _load(name)
            out[name] = None
        except BackendUnavailable as exc:
            out[name] = str(exc)
    return out


def blas_context(backend_name: str):
    """Context manager for code that alternates this backend's kernels with NumPy matrix
    products (deformable im2col, matmul, col2im, ...).

    For "numba": NumPy's OpenBLAS runs on one thread inside the block, so its workers,
    which busy-wait after every product, do not take the cores the parallel kernels need
    (``tools/bench.py`` measures it: on 2 cores, forward+backward of the benchmark's DCNv2
    shape goes from about 140 ms to about 120 ms). The setting is restored on exit; while
    it lasts it is process-wide. For the other backends: does nothing.
    """
    if backend_name == "numba":
        return _load("numba").single_threaded_blas()
    return contextlib.nullcontext()
