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
checked against. See ``numpy.py`` for the semantics of each function. The "numba"
backend has more, which ``deform_conv2d`` uses when they are there: the product tiles
on its threads (:func:`products`) and ``deform_conv_forward``, the forward's sampling
and product without a column array (the same arithmetic as ``deform_im2col`` followed
by ``products_forward``).

Border convention of the offset gradient. ``deform_col2im_coord`` of every backend takes
``border_grad``, one of :data:`BORDER_GRADS`:

* ``"torchvision"`` (the default): the offset gradient is the derivative of the bilinear
  formula on the cell ``[floor p, floor p + 1]`` wherever a corner of that cell is in the
  image, including at exactly ``py = -1`` or ``px = -1``, where the sample itself is 0
  (torchvision's ``deform_conv2d`` and ONNX DeformConv's reference);
* ``"mmcv"``: the offset gradient is 0 unless ``-1 < py < H`` and ``-1 < px < W``
  (mmcv's DCNv1 and DCNv2 kernels test ``p <= -1 || p >= size`` first).

The two agree everywhere except at positions exactly at -1 on either axis. Sampling,
the input gradient and the mask gradient do not depend on the convention.
"""

from __future__ import annotations

import contextlib
import importlib
import os

import numpy as np

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


# Offset-gradient conventions at the image border (see the module docstring).
BORDER_GRADS = ("torchvision", "mmcv")


def check_border_grad(op: str, border_grad) -> str:
    """``border_grad`` if it is one of :data:`BORDER_GRADS`, else a ValueError naming ``op``."""
    if not isinstance(border_grad, str) or border_grad not in BORDER_GRADS:
        raise ValueError(f"{op}: border_grad must be one of {BORDER_GRADS}, got {border_grad!r}")
    return border_grad


class BackendUnavailable(RuntimeError):
    """The requested sampling backend cannot run here; the message says why."""


def _load(name):
    if name not in _MODULES:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    try:
        module = importlib.import_module(f".{_MODULES[name]}", __name__)
    except ImportError as exc:
        raise BackendUnavailable(f"sampling backend {name!r} is not available: {exc}") from exc
    except Exception as exc:  # e.g. a numba / numba-cuda release that breaks on this NumPy at import
        raise BackendUnavailable(
            f"sampling backend {name!r} is not available: importing it failed with {type(exc).__name__}: {exc}"
        ) from exc
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


class _ArrayProducts:
    """The matrix products of ``deform_conv2d`` through ``xp.matmul``: NumPy's BLAS
    (threaded as NumPy's BLAS is) for the "numpy" backend and the "cuda" backend's host
    path, cuBLAS through CuPy for CUDA arrays."""

    def __init__(self, xp):
        self.xp = xp

    def forward(self, w_g, cols, out):  # out[n, g] = w_g[g] @ cols[n, g]
        self.xp.matmul(w_g[None], cols, out=out)
        return out

    def d_cols(self, w_g, dy, d_cols):  # d_cols[n, g] = w_g[g].T @ dy[n, g]
        self.xp.matmul(w_g.transpose(0, 2, 1)[None], dy, out=d_cols)
        return d_cols

    def d_weight(self, dy, cols, d_w):  # d_w[g] += sum_n dy[n, g] @ cols[n, g].T
        d_w += self.xp.matmul(dy, cols.transpose(0, 1, 3, 2)).sum(axis=0)
        return d_w


_NumpyProducts = _ArrayProducts(np)


class _NumbaProducts:
    """The same products as tiles on Numba's threads (``cpu.products_*``)."""

    def __init__(self, module):
        self.forward = module.products_forward
        self.d_cols = module.products_d_cols
        self.d_weight = module.products_d_weight


def products(backend_name: str, xp=None):
    """The matrix products of ``deform_conv2d`` for this backend: an object with
    ``forward(w_g, cols, out)``, ``d_cols(w_g, dy, d_cols)`` and ``d_weight(dy, cols, d_w)``
    (shapes: w_g (G, M, Ck), cols and d_cols (N, G, Ck, L), out and dy (N, G, M, L), d_w
    (G, M, Ck), all C-contiguous). For "numba" they run as tiles on Numba's threads, the
    pool that runs the sampling kernels (``npattn/sampling/cpu.py``, "Threads"); for the
    other backends through ``np.matmul``."""
    if backend_name == "numba":
        return _NumbaProducts(_load("numba"))
    if xp is not None and xp is not np:
        return _ArrayProducts(xp)
    return _NumpyProducts


def threading_info() -> dict:
    """What the numba backend runs on: Numba's threading layer and thread count, the BLAS
    libraries and their thread counts (now and while ``deform_conv2d`` runs), the product
    tiles (``cpu.threading_info``). Without numba: ``{"numba": <why not>}`` plus what
    threadpoolctl reports when it is installed."""
    try:
        module = _load("numba")
    except BackendUnavailable as exc:
        info = {"numba": str(exc), "threadpoolctl": None}
        try:
            from threadpoolctl import threadpool_info
        except ImportError:
            return info
        info["threadpoolctl"] = threadpool_info()
        return info
    return module.threading_info()


def blas_context(backend_name: str):
    """Context manager for code that alternates this backend's kernels with NumPy matrix
    products (deformable im2col, matmul, col2im, ...).

    For "numba": every OpenBLAS in the process (NumPy's, and SciPy's, which the product
    tiles call from Numba's threads) runs on one thread inside the block, so each product
    tile runs on the Numba thread that issues it and no OpenBLAS worker wakes up to
    busy-wait against the kernels (see "Threads" in ``npattn/sampling/cpu.py``). The
    settings are restored on exit; while they last they are process-wide. For the other
    backends: does nothing.
    """
    if backend_name == "numba":
        return _load("numba").single_threaded_blas()
    return contextlib.nullcontext()
