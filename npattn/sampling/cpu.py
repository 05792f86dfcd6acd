"""The "numba" sampling backend: parallel Numba kernels for the bilinear-sampling hot loop.

Same functions, signatures and numbers as ``numpy.py`` (the definition); see the package
docstring and ``numpy.py`` for the semantics. Shapes and names follow torchvision's
``deform_conv2d_kernel.cpp``: ``G`` offset groups, ``K = kh * kw`` taps, tap ``k = i*kw + j``,
sample position::

    py = oy*stride_h - pad_h + i*dilation_h + offset[n, 2*(g*K + k),     oy, ox]
    px = ox*stride_w - pad_w + j*dilation_w + offset[n, 2*(g*K + k) + 1, oy, ox]

Kernels
-------
Every kernel is ``@njit(cache=True, parallel=True)`` with ``fastmath`` off, and every
``prange`` iteration writes a set of output elements no other iteration touches, so the
result does not depend on the number of threads or their timing (identical run to run):

* ``deform_im2col``: one iteration per output row (n, g, k, oy); it computes the positions,
  corner index and weights of the row once and then fills ``cols[n, c, i, j, oy, :]``
  for the channels c of group g.
* ``deform_col2im``: first the cells of every sample (corner index and weights), once,
  one iteration per output row; then one iteration per (n, g, block of channels), which
  owns the planes ``d_x[n, c]`` of its channels and adds into them in a fixed order
  (k, oy, ox), in float64 like numpy.py. The blocks shrink as threads are added (more
  tasks), and since the cells are computed once, that adds no arithmetic.
* ``deform_col2im_coord``: one iteration per output row (n, g, k, oy); it owns
  ``d_offset[n, 2*(g*K+k) : 2*(g*K+k)+2, oy, :]`` and ``d_mask[n, g*K+k, oy, :]`` and sums
  over the channels of the group in increasing order.
* ``deform_conv_forward`` (deform_conv2d's forward on this backend): one iteration per
  (n, weight group, tile of ``PRODUCT_COLUMNS`` output pixels); it samples the tile's
  columns into a buffer of its own, with im2col's arithmetic, and owns the tile of the
  output, which it computes with one gemm call (see "the matrix products" below).
* ``map_coordinates_clamped`` and its backward: one iteration per map b (the backward
  owns ``d_x[b]`` and ``d_coords[b]``).

The scalar arithmetic is ``_bilinear.py``'s, shared with cuda.py (compiled here with
``njit``). The deformable kernels read the image (and accumulate its gradient) through a
copy with a zero border, so a corner outside the image reads 0 without a test per corner; the
arithmetic is numpy.py's, in the same order and dtype, so im2col and the offset/mask
gradients agree with it bit for bit and the scatters to rounding (summation order).

Memory safety: Numba does not bounds-check. A corner index is computed only after the
position has passed a floating-point range test that is false for NaN and +-inf, so a
non-finite or huge offset never reaches an integer conversion or an index.

Threads
-------
A deformable convolution alternates these kernels with matrix products (im2col, W @
cols, col2im, ...). Measured with ``tools/bench.py`` on 2 cores, OpenBLAS's own workers
busy-wait for about 0.1 s after every product: a parallel kernel that starts in that
window splits its rows statically over one thread per core and runs at the speed of the
thread that shares its core with a spinning BLAS worker; Numba's OpenMP workers likewise
spin after a kernel and slow the next multi-threaded product. Pinning BLAS to one thread
avoids that but leaves the products, most of the work, on one core.

So Numba's thread pool runs both: ``deform_conv2d`` issues its products through
:func:`products_forward`, :func:`products_d_cols` and :func:`products_d_weight`,
parallel kernels whose iterations each compute one tile of a product with one BLAS gemm
call on their own thread (Numba's ``numba_xxgemm``, the sgemm / dgemm of
``scipy.linalg.cython_blas``, as Numba's ``np.dot``), while
``npattn.sampling.blas_context("numba")`` (:func:`single_threaded_blas`) sets every
OpenBLAS in the process, NumPy's and SciPy's, to one thread and restores them on exit.
No BLAS worker ever wakes and nothing spins against anything; the kernels and the product
tiles use the same threads in turn. Numba's threading layer is left to Numba (or to
``NUMBA_THREADING_LAYER``).

The results never depend on the number of threads: every sampling-kernel element is
computed by one iteration in a fixed order, and the product tiles are fixed by the shapes
(``PRODUCT_COLUMNS`` output pixels, ``WEIGHT_ROWS`` weight-gradient rows), never by the
thread count, so each product element comes from the same single-threaded BLAS call
whatever the thread count; the weight gradient adds the images in increasing order.
:func:`threading_info` (also ``npattn.sampling.threading_info()``) says what is in use.
"""

from __future__ import annotations

import ctypes
import os

import numpy as np

import numba
from numba import njit, prange, types

from .._checks import float_array, pair, positive_int
from .. import _numba_cache
from . import _bilinear
from . import check_border_grad

# before any @njit(cache=True): the cache goes to the per-user folder, never inside the package
_numba_cache.install()

__all__ = [
    "unavailable_reason",
    "deform_im2col",
    "deform_col2im",
    "deform_col2im_coord",
    "map_coordinates_clamped",
    "map_coordinates_clamped_backward",
    "products_forward",
    "deform_conv_forward",
    "products_d_cols",
    "products_d_weight",
    "single_threaded_blas",
    "threading_info",
]

# ---------------------------------------------------------------------------------------
# threads (see "Threads" in the module docstring)

_BLAS = {}  # "libs": [(path, set, get)] of the loaded OpenBLAS copies; "numpy": NumPy's entry or None


def _openblas_handle(lib):
    for prefix in ("scipy_openblas", "openblas"):
        for suffix in ("64_", ""):
            setter = getattr(lib, f"{prefix}_set_num_threads{suffix}", None)
            getter = getattr(lib, f"{prefix}_get_num_threads{suffix}", None)
            if setter is not None and getter is not None:
                getter.restype = ctypes.c_int
                setter.argtypes = [ctypes.c_int]
                return setter, getter
    return None


def _loaded_openblas():
    """ctypes handles on every OpenBLAS in the process: NumPy's (its matrix products) and
    SciPy's (the ``sgemm`` / ``dgemm`` that the product kernels call, through Numba's
    ``numba_xxgemm``). Found once, after ``scipy.linalg.cython_blas`` has loaded its copy."""
    if _BLAS:
        return _BLAS
    paths = []
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.split()[-1] if line.rstrip().endswith(".so") or ".so." in line else ""
                if "openblas" in os.path.basename(path).lower() and path not in paths:
                    paths.append(path)
    except OSError:
        pass
    libs = []
    for path in paths:
        try:
            handle = _openblas_handle(ctypes.CDLL(path))
        except OSError:
            continue
        if handle is not None:
            libs.append((path, *handle))
    numpy_dir = os.path.join(os.path.dirname(os.path.dirname(np.__file__)), "numpy")
    own = [lib for lib in libs if lib[0].startswith(numpy_dir)]  # wheels bundle it in numpy.libs
    _BLAS["libs"] = libs
    _BLAS["numpy"] = own[0] if own else (libs[0] if len(libs) == 1 else None)
    return _BLAS


class single_threaded_blas:
    """Context manager: every OpenBLAS in the process runs on one thread inside the block.

    The product kernels call BLAS from Numba's threads, one call per tile; each call must
    then run on its caller's thread alone, never wake OpenBLAS's own workers (which would
    busy-wait against the kernels, see "Threads" in the module docstring). The previous
    thread counts are restored on exit. Process-wide while it lasts (OpenBLAS has one
    setting): a product that another Python thread runs meanwhile is single-threaded too.
    Where no OpenBLAS is found, threadpoolctl (when installed) limits the BLAS it knows;
    else the block does nothing (``threading_info()`` says what was found).
    """

    def __enter__(self):
        self._previous = []
        self._limiter = None
        libs = _loaded_openblas()["libs"]
        for _path, setter, getter in libs:
            before = getter()
            if before != 1:
                setter(1)
            self._previous.append((setter, before))
        if not libs:
            try:
                from threadpoolctl import threadpool_limits
            except ImportError:
                return self
            self._limiter = threadpool_limits(limits=1, user_api="blas")
        return self

    def __exit__(self, *exc):
        for setter, before in reversed(self._previous):
            if before != 1:
                setter(before)
        if self._limiter is not None:
            self._limiter.restore_original_limits()
        return False


def threading_info() -> dict:
    """What the kernels and products run on.

    ``configured_layer`` / ``active_layer``: Numba's threading layer (``active_layer`` is
    None until a parallel kernel has run); ``num_threads``: Numba's thread count, the
    threads that run both the kernels and the products; ``blas``: NumPy's OpenBLAS (or
    why none was found) and ``blas_threads`` its current thread count; ``blas_libraries``:
    every OpenBLAS loaded, with its current thread count; ``blas_threads_in_kernels``: the
    thread count npattn gives each of them while ``deform_conv2d`` runs (1: each product
    tile runs on the Numba thread that calls it), None where none was found;
    ``product_tiles``: the fixed tile sizes of the products; ``threadpoolctl``: what
    threadpoolctl reports, when it is installed (else None).
    """
    _ensure_gemm()
    try:
        layer = numba.threading_layer()
    except ValueError:
        layer = None  # no parallel region has run yet
    blas = _loaded_openblas()
    own = blas["numpy"]
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        pools = None
    else:
        pools = [{k: d.get(k) for k in ("user_api", "internal_api", "filepath", "version", "num_threads",
                                        "threading_layer")} for d in threadpool_info()]
    return {
        "configured_layer": numba.config.THREADING_LAYER,
        "active_layer": layer,
        "num_threads": numba.get_num_threads(),
        "blas": own[0] if own else "NumPy's BLAS is not an OpenBLAS found among the loaded libraries",
        "blas_threads": own[2]() if own else None,
        "blas_libraries": [{"library": path, "threads": getter()} for path, _s, getter in blas["libs"]],
        "blas_threads_in_kernels": 1 if blas["libs"] or pools else None,
        "product_tiles": {"columns": PRODUCT_COLUMNS, "weight_rows": WEIGHT_ROWS},
        "threadpoolctl": pools,
    }


def unavailable_reason():
    """None when numba imported (else the import failed) and SciPy's BLAS, which the
    product kernels call, imports; else why not."""
    try:
        import scipy.linalg.cython_blas  # noqa: F401
    except ImportError as exc:
        return f"the product kernels need scipy.linalg.cython_blas ({exc})"
    return None


# ---------------------------------------------------------------------------------------
# argument checks (shared with cuda.py, which passes array-like objects with .shape/.dtype)

_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))


def _check_float(op, name, a, ndim, layout, arrays_ok):
    if arrays_ok is None:
        return float_array(op, name, a, ndim, layout)
    if not arrays_ok(a):
        raise TypeError(f"{op}: {name} must be a numpy.ndarray or a CUDA device array, got {type(a).__name__}")
    if np.dtype(a.dtype) not in _FLOATS:
        raise TypeError(f"{op}: {name} must have dtype float32 or float64, got {a.dtype}")
    if len(a.shape) != ndim:
        raise ValueError(f"{op}: {name} must have {ndim} dimensions {layout}, got shape {tuple(a.shape)}")
    return a


def _check_same(op, name, a, ref, expected_shape):
    if np.dtype(a.dtype) != np.dtype(ref.dtype):
        raise TypeError(f"{op}: {name} must have the same dtype as x ({ref.dtype}), got {a.dtype}")
    if tuple(a.shape) != tuple(expected_shape):
        raise ValueError(f"{op}: {name} must have shape {tuple(expected_shape)}, got {tuple(a.shape)}")


def check_deform_args(op, x_shape, x, offset, mask, kernel_hw, stride, padding, dilation,
                      offset_groups, d_cols=None, out_hw=None, arrays_ok=None):
    """Validate the arguments of the deformable functions; return the normalised ints.

    ``x`` may be None (col2im gets only ``x_shape``); ``out_hw`` None takes it from
    ``offset``. Returns ``(N, C, H, W, kh, kw, sh, sw, ph, pw, dh, dw, oh, ow, G)``.
    """
    kh, kw = pair(op, "kernel_hw", kernel_hw, 1)
    sh, sw = pair(op, "stride", stride, 1)
    ph, pw = pair(op, "padding", padding, 0)
    dh, dw = pair(op, "dilation", dilation, 1)
    G = positive_int(op, "offset_groups", offset_groups)
    ref = _check_float(op, "offset", offset, 4, "(N, 2*G*kh*kw, out_h, out_w)", arrays_ok)
    if x is not None:
        _check_float(op, "x", x, 4, "(N, C, H, W)", arrays_ok)
        x_shape = tuple(x.shape)
        ref = x
    if len(x_shape) != 4 or not all(isinstance(s, (int, np.integer)) and s >= 0 for s in x_shape):
        raise ValueError(f"{op}: x_shape must be 4 non-negative ints (N, C, H, W), got {x_shape!r}")
    N, C, H, W = (int(s) for s in x_shape)
    if C % G != 0:
        raise ValueError(f"{op}: channels ({C}) must be divisible by offset_groups ({G})")
    K = kh * kw
    if out_hw is None:
        oh, ow = int(offset.shape[2]), int(offset.shape[3])
    else:
        oh, ow = pair(op, "out_hw", out_hw, 1)
    _check_same(op, "offset", offset, ref, (N, 2 * G * K, oh, ow))
    if mask is not None:
        _check_float(op, "mask", mask, 4, "(N, G*kh*kw, out_h, out_w)", arrays_ok)
        _check_same(op, "mask", mask, ref, (N, G * K, oh, ow))
    if d_cols is not None:
        _check_float(op, "d_cols", d_cols, 6, "(N, C, kh, kw, out_h, out_w)", arrays_ok)
        _check_same(op, "d_cols", d_cols, ref, (N, C, kh, kw, oh, ow))
    return N, C, H, W, kh, kw, sh, sw, ph, pw, dh, dw, oh, ow, G


def check_map_args(op, x, coords, d_out=None, arrays_ok=None):
    """Validate the seed-sampling arguments; return (B, H, W, P)."""
    _check_float(op, "x", x, 3, "(B, H, W)", arrays_ok)
    _check_float(op, "coords", coords, 3, "(B, P, 2)", arrays_ok)
    B, H, W = (int(s) for s in x.shape)
    P = int(coords.shape[1])
    _check_same(op, "coords", coords, x, (B, P, 2))
    if d_out is not None:
        _check_float(op, "d_out", d_out, 2, "(B, P)", arrays_ok)
        _check_same(op, "d_out", d_out, x, (B, P))
    if H < 1 or W < 1:
        raise ValueError(f"{op}: x must have H >= 1 and W >= 1, got shape {tuple(x.shape)}")
    return B, H, W, P


def _c(a):
    return np.ascontiguousarray(a)


# ---------------------------------------------------------------------------------------
# kernels: deformable convolution (torchvision semantics)
#
# The image is read (and its gradient accumulated) through a copy with a zero border:
# one row above, two below, one column left and right, i.e. planes of (H+3) x (W+2)
# with pixel (y, x) at ((y+1) * (W+2) + x + 1). Every corner of a sample inside
# (-1, H) x (-1, W) (and of the gradient support [-1, H) x [-1, W)) lies in that plane,
# and a corner outside the image lands on the border, which holds 0: the bilinear sum
# needs no per-corner test, exactly as numpy.py's "corner value 0 when outside". A sample
# outside the support gets weights 0 and the base index of the all-zero 2x2 block at
# (H+1, 0), so it reads zeros and (in col2im) writes only into the border, which is
# cropped. The index is formed only after a floating-point range test that is false
# for NaN and +-inf, so no index ever comes from a non-finite or out-of-range position.
# A row (n, g, k, oy) of the output shares its positions, base indices and weights
# across the channels of group g: they are computed once per row.


# the scalar arithmetic shared with cuda.py (_bilinear.py), compiled for the CPU
_in_support = njit(cache=True)(_bilinear.in_support)
_cell = njit(cache=True)(_bilinear.cell)
_corner_weights = njit(cache=True)(_bilinear.corner_weights)
_bilinear_value = njit(cache=True)(_bilinear.bilinear)
_position_grads = njit(cache=True)(_bilinear.position_grads)
_clamped_point = njit(cache=True)(_bilinear.clamped_point)
_clamped_point_backward = njit(cache=True)(_bilinear.clamped_point_backward)


@njit(cache=True, parallel=True)
def _pad_kernel(x, xp):
    # x (N, C, H, W) -> xp (N, C, (H+3)*(W+2)) with the zero border described above
    N, C, H, W = x.shape
    Wp = W + 2
    zero = xp.dtype.type(0)
    for t in prange(N * C):
        n = t // C
        c = t - n * C
        plane = xp[n, c]
        for q in range(Wp):  # border row above
            plane[q] = zero
        for y in range(H):
            row = (y + 1) * Wp
            plane[row] = zero
            for xx in range(W):
                plane[row + xx + 1] = x[n, c, y, xx]
            plane[row + W + 1] = zero
        for q in range((H + 1) * Wp, (H + 3) * Wp):  # two border rows below
            plane[q] = zero


@njit(cache=True)
def _row_cells(offset, n, ch, oy, base_y, base_x, sw, H, W, inclusive, base, frac):
    """Cells of the samples of one output row.

    For ox in range(ow): ``py = base_y + offset[n, ch, oy, ox]`` and ``px = base_x +
    ox*sw + offset[n, ch+1, oy, ox]``. Inside the support -- ``-1 < py < H`` and
    ``-1 < px < W`` (sampling), or with ``-1 <=`` when ``inclusive`` (the offset
    gradient) -- ``base[ox]`` is the padded index of corner (floor py, floor px) and
    ``frac[:, ox]`` = (ly, lx, hy, hx) = (py - floor py, px - floor px, 1 - ly,
    1 - lx); outside (NaN and +-inf included) ``base`` is the all-zero block and ``frac`` 0.
    """
    tp = frac.dtype.type
    zero = tp(0)
    by = tp(base_y)
    Wp = W + 2
    empty = (H + 1) * Wp  # the all-zero 2x2 block of the border
    for ox in range(base.shape[0]):
        py = by + offset[n, ch, oy, ox]
        px = tp(base_x + ox * sw) + offset[n, ch + 1, oy, ox]
        if _in_support(py, px, H, W, inclusive):  # false for NaN and +-inf
            y0, x0, ly, lx, hy, hx = _cell(py, px, tp)
            base[ox] = (y0 + 1) * Wp + x0 + 1  # y0 in [-1, H-1], x0 in [-1, W-1]
            frac[0, ox] = ly
            frac[1, ox] = lx
            frac[2, ox] = hy
            frac[3, ox] = hx
        else:
            base[ox] = empty
            for q in range(4):
                frac[q, ox] = zero


@njit(cache=True)
def _row_index(r, oh, K, G, kw):
    """``(n, g, k, oy, i, j)`` of output row r in the row-major order (N, G, K, oh), with
    tap k = i kw + j."""
    oy = r % oh
    q = r // oh
    k = q % K
    q = q // K
    i = k // kw
    return q // G, q % G, k, oy, i, k - i * kw


@njit(cache=True, parallel=True)
def _im2col_kernel(xp, offset, mask, has_mask, H, W, kh, kw, sh, sw, ph, pw, dh, dw, G, cols):
    # xp (N, C, (H+3)*(W+2)) zero-bordered; offset (N, 2*G*K, oh, ow); mask (N, G*K, oh,
    # ow) (read only if has_mask); cols (N, C, K, oh, ow): every element written.
    N = xp.shape[0]
    C = xp.shape[1]
    K = kh * kw
    oh = cols.shape[3]
    ow = cols.shape[4]
    cpg = C // G
    Wp = W + 2
    for r in prange(N * G * K * oh):
        n, g, k, oy, i, j = _row_index(r, oh, K, G, kw)
        base = np.empty(ow, np.int64)
        frac = np.empty((4, ow), xp.dtype)
        wts = np.empty((4, ow), xp.dtype)
        _row_cells(offset, n, 2 * (g * K + k), oy, oy * sh - ph + i * dh, j * dw - pw, sw, H, W, False, base, frac)
        for ox in range(ow):
            wts[0, ox], wts[1, ox], wts[2, ox], wts[3, ox] = _corner_weights(frac[0, ox], frac[1, ox], frac[2, ox],
                                                                             frac[3, ox])
        for c in range(g * cpg, (g + 1) * cpg):
            xc = xp[n, c]
            out = cols[n, c, k, oy]
            for ox in range(ow):
                b = base[ox]
                v = _bilinear_value(wts[0, ox], wts[1, ox], wts[2, ox], wts[3, ox], xc[b], xc[b + 1], xc[b + Wp],
                                    xc[b + Wp + 1])
                if has_mask:
                    v = mask[n, g * K + k, oy, ox] * v
                out[ox] = v


@njit(cache=True, parallel=True)
def _sample_cells(offset, H, W, kh, kw, sh, sw, ph, pw, dh, dw, G, base, wts):
    # The cells of every sample, once: base (N, G, K, oh, ow) the padded index of the
    # upper-left corner (the all-zero block outside the support), wts (N, G, K, oh, 4, ow)
    # the corner weights (0 outside). One iteration per row (n, g, k, oy).
    N, _, K, oh, ow = base.shape
    for r in prange(N * G * K * oh):
        n, g, k, oy, i, j = _row_index(r, oh, K, G, kw)
        row_w = wts[n, g, k, oy]
        frac = np.empty((4, ow), wts.dtype)
        _row_cells(offset, n, 2 * (g * K + k), oy, oy * sh - ph + i * dh, j * dw - pw, sw, H, W, False,
                   base[n, g, k, oy], frac)
        for ox in range(ow):
            row_w[0, ox], row_w[1, ox], row_w[2, ox], row_w[3, ox] = _corner_weights(frac[0, ox], frac[1, ox],
                                                                                     frac[2, ox], frac[3, ox])


@njit(cache=True, parallel=True)
def _col2im_kernel(d_cols, mask, has_mask, base, wts, W, cblock, d_xp):
    # d_cols (N, C, K, oh, ow); base, wts: _sample_cells; d_xp (N, C, (H+3)*(W+2))
    # float64, zero on entry, with the zero border (cropped by the caller). Iteration
    # (n, g, block of channels) owns the planes d_xp[n, c] of its channels and adds into
    # them in (k, oy, ox) order, whatever the blocks. Each term w * (m * D) is formed in
    # the dtype of d_cols and accumulated in float64, as numpy.py.
    N = d_xp.shape[0]
    C = d_xp.shape[1]
    G = base.shape[1]
    K = base.shape[2]
    oh = d_cols.shape[3]
    ow = d_cols.shape[4]
    cpg = C // G
    Wp = W + 2
    nblk = (cpg + cblock - 1) // cblock
    for t in prange(N * G * nblk):
        b_ = t % nblk
        u = t // nblk
        g = u % G
        n = u // G
        c_lo = g * cpg + b_ * cblock
        c_hi = min(c_lo + cblock, (g + 1) * cpg)
        for k in range(K):
            for oy in range(oh):
                row_b = base[n, g, k, oy]
                row_w = wts[n, g, k, oy]
                for c in range(c_lo, c_hi):
                    acc = d_xp[n, c]
                    dc = d_cols[n, c, k, oy]
                    for ox in range(ow):
                        d = dc[ox]
                        if has_mask:
                            d = mask[n, g * K + k, oy, ox] * d
                        b = row_b[ox]
                        acc[b] += row_w[0, ox] * d
                        acc[b + 1] += row_w[1, ox] * d
                        acc[b + Wp] += row_w[2, ox] * d
                        acc[b + Wp + 1] += row_w[3, ox] * d


@njit(cache=True, parallel=True)
def _coord_kernel(d_cols, xp, offset, mask, has_mask, H, W, kh, kw, sh, sw, ph, pw, dh, dw, G, d_offset, d_mask,
                  want_cols, cols, border_mmcv):
    # d_cols (N, C, K, oh, ow); xp (N, C, (H+3)*(W+2)) zero-bordered; d_offset (N, 2*G*K,
    # oh, ow) and, when has_mask, d_mask (N, G*K, oh, ow): every element written.
    # Iteration (n, g, k, oy) owns one row of each and sums over the group's channels in
    # increasing order (numpy.py's order, so the sums agree bit for bit). When want_cols,
    # it also writes the row's columns cols[n, c, k, oy, :] (N, C, K, oh, ow), with
    # _im2col_kernel's arithmetic, from the corner values it reads anyway. border_mmcv
    # (bool): the offset gradient's support is the sample's, (-1, H) x (-1, W) (mmcv);
    # else [-1, H) x [-1, W) (torchvision).
    N = xp.shape[0]
    C = xp.shape[1]
    K = kh * kw
    oh = d_cols.shape[3]
    ow = d_cols.shape[4]
    cpg = C // G
    Wp = W + 2
    tp = xp.dtype.type
    zero = tp(0)
    one = tp(1)
    for r in prange(N * G * K * oh):
        n, g, k, oy, i, j = _row_index(r, oh, K, G, kw)
        ch = 2 * (g * K + k)
        # torchvision's get_coordinate_weight has no range test of its own: the offset
        # gradient lives on the support [-1, H) x [-1, W) (outside it all four corners
        # are outside the image); the sample itself only on (-1, H) x (-1, W). mmcv's
        # tests p <= -1 first, so with border_mmcv the cells are the sample's: at p = -1
        # the corners read the zero block and the weights are 0, the gradient exactly 0.
        base = np.empty(ow, np.int64)
        frac = np.empty((4, ow), xp.dtype)
        _row_cells(offset, n, ch, oy, oy * sh - ph + i * dh, j * dw - pw, sw, H, W, not border_mmcv, base, frac)
        smp = np.empty(ow, np.bool_)
        mrow = np.empty(ow, xp.dtype)
        by = tp(oy * sh - ph + i * dh)
        for ox in range(ow):
            py = by + offset[n, ch, oy, ox]
            px = tp(ox * sw - pw + j * dw) + offset[n, ch + 1, oy, ox]
            smp[ox] = _in_support(py, px, H, W, False)
            mrow[ox] = mask[n, g * K + k, oy, ox] if has_mask else one
        acc_y = np.zeros(ow, xp.dtype)
        acc_x = np.zeros(ow, xp.dtype)
        acc_m = np.zeros(ow, xp.dtype)
        for c in range(g * cpg, (g + 1) * cpg):
            xc = xp[n, c]
            dc = d_cols[n, c, k, oy]
            for ox in range(ow):
                b = base[ox]
                v00 = xc[b]
                v01 = xc[b + 1]
                v10 = xc[b + Wp]
                v11 = xc[b + Wp + 1]
                ly, lx, hy, hx = frac[0, ox], frac[1, ox], frac[2, ox], frac[3, ox]
                d = dc[ox]
                jy, jx = _position_grads(ly, lx, hy, hx, v00, v01, v10, v11)  # d xs / d (py, px)
                if has_mask or want_cols:
                    w00, w01, w10, w11 = _corner_weights(ly, lx, hy, hx)
                    val = _bilinear_value(w00, w01, w10, w11, v00, v01, v10, v11)
                    val = val if smp[ox] else zero
                if has_mask:
                    m = mrow[ox]
                    acc_y[ox] += (m * jy) * d
                    acc_x[ox] += (m * jx) * d
                    acc_m[ox] += val * d
                    if want_cols:
                        cols[n, c, k, oy, ox] = m * val
                else:
                    acc_y[ox] += jy * d
                    acc_x[ox] += jx * d
                    if want_cols:
                        cols[n, c, k, oy, ox] = val
        for ox in range(ow):
            d_offset[n, ch, oy, ox] = acc_y[ox]
            d_offset[n, ch + 1, oy, ox] = acc_x[ox]
            if has_mask:
                d_mask[n, g * K + k, oy, ox] = acc_m[ox]


# ---------------------------------------------------------------------------------------
# kernels: the matrix products of deform_conv2d, on Numba's threads
#
# Each product is cut into tiles fixed by the shapes alone (PRODUCT_COLUMNS columns of
# the L = out_h * out_w axis; WEIGHT_ROWS rows of the weight gradient), never by the
# number of threads. One prange iteration computes one tile with one BLAS gemm call on its
# own thread (every OpenBLAS is set to one thread meanwhile: single_threaded_blas), so
# every output element is the result of the same call with the same operands whatever the
# thread count: bit-identical results for 1 or 64 threads. The weight gradient sums over
# images in increasing order (a gemm with beta = 1 per image), inside the iteration that
# owns its tile. The calls go through Numba's own ``numba_xxgemm`` (the sgemm / dgemm of
# scipy.linalg.cython_blas, as Numba's np.dot), which takes leading dimensions: a tile is
# a strided block of the arrays, no copy. All matrices are C-contiguous row-major; BLAS
# sees them as column-major transposes.

PRODUCT_COLUMNS = 256  # columns (output pixels) per tile of the forward and d_cols products
WEIGHT_ROWS = 32  # rows of W_g^T (channel-taps) per tile of the weight gradient

_XXGEMM = types.ExternalFunction("numba_xxgemm", types.intc(
    types.char, types.char, types.char, types.intp, types.intp, types.intp,  # kind, transa, transb, m, n, k
    types.voidptr, types.voidptr, types.intp, types.voidptr, types.intp,  # alpha, a, lda, b, ldb
    types.voidptr, types.voidptr, types.intp))  # beta, c, ldc
_NOTRANS = 78  # ord("N")
_TRANS = 84  # ord("T")


@njit(cache=True)
def _gemm(transa, transb, m, n, k, a, lda, b, ldb, beta, c, ldc):
    """Column-major ``C (m x n) = op(A) op(B) + beta C`` on the calling thread; ``a``,
    ``b``, ``c`` are 1-D contiguous views starting at each matrix's first element."""
    scal = np.empty(2, c.dtype)
    scal[0] = 1
    scal[1] = beta
    kind = 115 if c.itemsize == 4 else 100  # "s" / "d"
    _XXGEMM(kind, transa, transb, m, n, k, scal[0:1].ctypes, a.ctypes, lda, b.ctypes, ldb, scal[1:2].ctypes,
            c.ctypes, ldc)


@njit(cache=True)
def _tile_forward(w_g, cols, out, n, g, lo, hi):
    # out[n, g][:, lo:hi] = w_g[g] @ cols[n, g][:, lo:hi]; (m, n, k) = (hi - lo, M, Ck)
    N, G, Ck, L = cols.shape
    M = w_g.shape[1]
    _gemm(_NOTRANS, _NOTRANS, hi - lo, M, Ck, cols.reshape(N, G, Ck * L)[n, g, lo:], L,
          w_g.reshape(G, M * Ck)[g], Ck, 0.0, out.reshape(N, G, M * L)[n, g, lo:], L)


@njit(cache=True)
def _tile_d_cols(w_g, dy, d_cols, n, g, lo, hi):
    # d_cols[n, g][:, lo:hi] = w_g[g].T @ dy[n, g][:, lo:hi]; (m, n, k) = (hi - lo, Ck, M)
    N, G, M, L = dy.shape
    Ck = w_g.shape[2]
    _gemm(_NOTRANS, _TRANS, hi - lo, Ck, M, dy.reshape(N, G, M * L)[n, g, lo:], L,
          w_g.reshape(G, M * Ck)[g], Ck, 0.0, d_cols.reshape(N, G, Ck * L)[n, g, lo:], L)


@njit(cache=True)
def _tile_d_weight(dy, cols, d_w, n, g, lo, hi):
    # d_w[g][:, lo:hi] += dy[n, g] @ cols[n, g][lo:hi, :].T; (m, n, k) = (hi - lo, M, L)
    N, G, Ck, L = cols.shape
    M = dy.shape[2]
    _gemm(_TRANS, _NOTRANS, hi - lo, M, L, cols.reshape(N, G, Ck * L)[n, g, lo * L:], L,
          dy.reshape(N, G, M * L)[n, g], L, 1.0, d_w.reshape(G, M * Ck)[g, lo:], Ck)


@njit(cache=True)
def _tile_forward_buffer(w_g, buf, out, n, g, lo, hi):
    # out[n, g][:, lo:hi] = w_g[g] @ buf, buf (Ck, hi - lo) C-contiguous
    N, G, M, L = out.shape
    Ck = w_g.shape[2]
    _gemm(_NOTRANS, _NOTRANS, hi - lo, M, Ck, buf.reshape(Ck * (hi - lo)), hi - lo, w_g.reshape(G, M * Ck)[g], Ck,
          0.0, out.reshape(N, G, M * L)[n, g, lo:], L)


if numba.config.DISABLE_JIT:  # plain Python (NUMBA_DISABLE_JIT=1): the same tiles through NumPy
    def _tile_forward(w_g, cols, out, n, g, lo, hi):  # noqa: F811
        out[n, g, :, lo:hi] = w_g[g] @ cols[n, g, :, lo:hi]

    def _tile_d_cols(w_g, dy, d_cols, n, g, lo, hi):  # noqa: F811
        d_cols[n, g, :, lo:hi] = w_g[g].T @ dy[n, g, :, lo:hi]

    def _tile_d_weight(dy, cols, d_w, n, g, lo, hi):  # noqa: F811
        d_w[g, :, lo:hi] += dy[n, g] @ cols[n, g, lo:hi, :].T

    def _tile_forward_buffer(w_g, buf, out, n, g, lo, hi):  # noqa: F811
        out[n, g, :, lo:hi] = w_g[g] @ buf


@njit(cache=True, parallel=True)
def _forward_products(w_g, cols, out, tile):
    # w_g (G, M, Ck); cols (N, G, Ck, L); out (N, G, M, L): every element written.
    N, G, Ck, L = cols.shape
    nt = (L + tile - 1) // tile
    for t in prange(N * G * nt):
        q = t % nt
        u = t // nt
        g = u % G
        n = u // G
        _tile_forward(w_g, cols, out, n, g, q * tile, min(q * tile + tile, L))


@njit(cache=True, parallel=True)
def _d_cols_products(w_g, dy, d_cols, tile):
    # w_g (G, M, Ck); dy (N, G, M, L); d_cols (N, G, Ck, L): every element written.
    N, G, M, L = dy.shape
    nt = (L + tile - 1) // tile
    for t in prange(N * G * nt):
        q = t % nt
        u = t // nt
        g = u % G
        n = u // G
        _tile_d_cols(w_g, dy, d_cols, n, g, q * tile, min(q * tile + tile, L))


@njit(cache=True, parallel=True)
def _d_weight_products(dy, cols, d_w, tile):
    # dy (N, G, M, L); cols (N, G, Ck, L); d_w (G, M, Ck), added to. Iteration (g, tile)
    # owns d_w[g][:, tile] and adds the images in increasing n.
    N, G, Ck, L = cols.shape
    nt = (Ck + tile - 1) // tile
    for t in prange(G * nt):
        q = t % nt
        g = t // nt
        for n in range(N):
            _tile_d_weight(dy, cols, d_w, n, g, q * tile, min(q * tile + tile, Ck))


@njit(cache=True)
def _range_cells(offset, n, ch, lo, hi, ow, sh, sw, ph, pw, i, j, dh, dw, H, W, base, wts):
    """Cells of the samples at the flat output pixels lo <= l < hi (oy, ox = divmod(l, ow))
    of tap (i, j) and offset channels (ch, ch + 1): ``base[l - lo]`` the padded corner
    index (the all-zero block outside the support) and ``wts[:, l - lo]`` the corner
    weights (0 outside); the arithmetic of :func:`_row_cells` and _im2col_kernel."""
    tp = wts.dtype.type
    zero = tp(0)
    Wp = W + 2
    empty = (H + 1) * Wp
    for l in range(lo, hi):
        oy = l // ow
        ox = l - oy * ow
        py = tp(oy * sh - ph + i * dh) + offset[n, ch, oy, ox]
        px = tp(j * dw - pw + ox * sw) + offset[n, ch + 1, oy, ox]
        q = l - lo
        if _in_support(py, px, H, W, False):  # false for NaN and +-inf
            y0, x0, ly, lx, hy, hx = _cell(py, px, tp)
            base[q] = (y0 + 1) * Wp + x0 + 1
            wts[0, q], wts[1, q], wts[2, q], wts[3, q] = _corner_weights(ly, lx, hy, hx)
        else:
            base[q] = empty
            for r in range(4):
                wts[r, q] = zero


@njit(cache=True, parallel=True)
def _fused_forward_kernel(xp, offset, mask, has_mask, H, W, kh, kw, sh, sw, ph, pw, dh, dw, G, ow, w_g, out, tile):
    # The forward without a column array: iteration (n, weight group gw, tile of output
    # pixels) samples the columns of its tile, (Ck, tile) with Ck = C/Gw * K, into a
    # buffer of its own (the arithmetic of _im2col_kernel), then computes
    # out[n, gw][:, tile] = w_g[gw] @ buffer with one single-threaded gemm (as
    # _tile_forward). xp (N, C, (H+3)*(W+2)) zero-bordered; offset (N, 2*G*K, oh, ow);
    # mask (N, G*K, oh, ow) (read only if has_mask); w_g (Gw, M, Ck); out (N, Gw, M, L).
    N = xp.shape[0]
    C = xp.shape[1]
    Gw = w_g.shape[0]
    Ck = w_g.shape[2]
    L = out.shape[3]
    K = kh * kw
    cpw = C // Gw  # channels per weight group
    cpo = C // G  # channels per offset group
    Wp = W + 2
    nt = (L + tile - 1) // tile
    for t in prange(N * Gw * nt):
        q = t % nt
        u = t // nt
        gw = u % Gw
        n = u // Gw
        lo = q * tile
        hi = min(lo + tile, L)
        T = hi - lo
        buf = np.empty((Ck, T), xp.dtype)
        base = np.empty(T, np.int64)
        wts = np.empty((4, T), xp.dtype)
        mrow = np.empty(T, xp.dtype)
        c_lo = gw * cpw
        c_hi = c_lo + cpw
        for k in range(K):
            i = k // kw
            j = k - i * kw
            for g in range(c_lo // cpo, (c_hi - 1) // cpo + 1):  # the offset groups the weight group meets
                _range_cells(offset, n, 2 * (g * K + k), lo, hi, ow, sh, sw, ph, pw, i, j, dh, dw, H, W, base, wts)
                if has_mask:
                    m_flat = mask[n, g * K + k].reshape(L)
                    for l in range(T):
                        mrow[l] = m_flat[lo + l]
                for c in range(max(c_lo, g * cpo), min(c_hi, (g + 1) * cpo)):
                    xc = xp[n, c]
                    row = buf[(c - c_lo) * K + k]
                    for l in range(T):
                        b = base[l]
                        v = _bilinear_value(wts[0, l], wts[1, l], wts[2, l], wts[3, l], xc[b], xc[b + 1], xc[b + Wp],
                                            xc[b + Wp + 1])
                        row[l] = mrow[l] * v if has_mask else v
        _tile_forward_buffer(w_g, buf, out, n, gw, lo, hi)


# ---------------------------------------------------------------------------------------
# kernels: the seed's clamped sampling (th_batch_map_coordinates)


@njit(cache=True, parallel=True)
def _map_kernel(x, coords, out):
    # x (B, H, W); coords (B, P, 2) as (row, col); out (B, P): every element written.
    B, H, W = x.shape
    P = coords.shape[1]
    tp = x.dtype.type
    hmax = tp(H - 1)
    wmax = tp(W - 1)
    for b in prange(B):
        for p in range(P):
            out[b, p] = _clamped_point(x, b, coords[b, p, 0], coords[b, p, 1], hmax, wmax, tp)


@njit(cache=True, parallel=True)
def _map_backward_kernel(d_out, x, coords, d_x, d_coords):
    # d_x (B, H, W) float64, zero on entry (each term is formed in the dtype of x and
    # accumulated in float64, as numpy.py does); d_coords (B, P, 2): every element
    # written. Iteration b owns d_x[b] and d_coords[b].
    B, H, W = x.shape
    P = coords.shape[1]
    tp = x.dtype.type
    hmax = tp(H - 1)
    wmax = tp(W - 1)
    for b in prange(B):
        for p in range(P):
            y0, y1, x0, x1, d00, d10, d01, d11, dyq, dxq = _clamped_point_backward(
                x, b, coords[b, p, 0], coords[b, p, 1], d_out[b, p], hmax, wmax, tp)
            d_x[b, y0, x0] += d00
            d_x[b, y1, x0] += d10
            d_x[b, y0, x1] += d01
            d_x[b, y1, x1] += d11
            d_coords[b, p, 0] = dyq
            d_coords[b, p, 1] = dxq


# ---------------------------------------------------------------------------------------
# the backend functions (contract of npattn.sampling)


def _padded(x):
    """x (N, C, H, W) as (N, C, (H+3)*(W+2)) with the zero border of the kernels."""
    N, C, H, W = x.shape
    xp = np.empty((N, C, (H + 3) * (W + 2)), dtype=x.dtype)
    _pad_kernel(_c(x), xp)
    return xp


def _mask_or_dummy(mask, dtype):
    if mask is None:
        return np.zeros((1, 1, 1, 1), dtype=dtype), False
    return _c(mask), True


def deform_im2col(x, offset, mask, kernel_hw, stride, padding, dilation, out_hw, offset_groups):
    """Deformable im2col: ``cols (N, C, kh, kw, out_h, out_w)``, dtype of x (see numpy.py)."""
    N, C, H, W, kh, kw, sh, sw, ph, pw, dh, dw, oh, ow, G = check_deform_args(
        "deform_im2col", None, x, offset, mask, kernel_hw, stride, padding, dilation, offset_groups,
        out_hw=out_hw)
    cols = np.empty((N, C, kh, kw, oh, ow), dtype=x.dtype)
    if cols.size == 0:
        return cols
    m, has_mask = _mask_or_dummy(mask, x.dtype)
    _im2col_kernel(_padded(x), _c(offset), m, has_mask, H, W, kh, kw, sh, sw, ph, pw, dh, dw, G,
                   cols.reshape(N, C, kh * kw, oh, ow))
    return cols


def _channel_block(N, G, cpg):
    """Channels per col2im task: enough tasks to keep every thread busy, few enough that
    a row's cells are read once for several channels."""
    tasks_wanted = 8 * max(1, numba.get_num_threads())
    blocks_per_group = min(cpg, max(1, -(-tasks_wanted // max(1, N * G))))
    return max(1, -(-cpg // blocks_per_group))


def deform_col2im(d_cols, offset, mask, x_shape, kernel_hw, stride, padding, dilation, offset_groups):
    """Adjoint of :func:`deform_im2col` w.r.t. x: ``d_x`` of ``x_shape`` (N, C, H, W)."""
    N, C, H, W, kh, kw, sh, sw, ph, pw, dh, dw, oh, ow, G = check_deform_args(
        "deform_col2im", tuple(x_shape), None, offset, mask, kernel_hw, stride, padding, dilation, offset_groups,
        d_cols=d_cols)
    if N * C * H * W == 0 or d_cols.size == 0:
        return np.zeros((N, C, H, W), dtype=d_cols.dtype)
    d_xp = np.zeros((N, C, (H + 3) * (W + 2)), dtype=np.float64)  # accumulated in float64, zero border
    m, has_mask = _mask_or_dummy(mask, d_cols.dtype)
    cblock = _channel_block(N, G, C // G)
    base = np.empty((N, G, kh * kw, oh, ow), dtype=np.int64)
    wts = np.empty((N, G, kh * kw, oh, 4, ow), dtype=d_cols.dtype)
    _sample_cells(_c(offset), H, W, kh, kw, sh, sw, ph, pw, dh, dw, G, base, wts)
    _col2im_kernel(_c(d_cols).reshape(N, C, kh * kw, oh, ow), m, has_mask, base, wts, W, cblock, d_xp)
    d_x = d_xp.reshape(N, C, H + 3, W + 2)[:, :, 1 : H + 1, 1 : W + 1]  # crop the border
    return np.array(d_x, dtype=d_cols.dtype, order="C")


def deform_col2im_coord(d_cols, x, offset, mask, kernel_hw, stride, padding, dilation, offset_groups,
                        cols_out=None, border_grad="torchvision"):
    """Gradients w.r.t. offset and mask: ``(d_offset, d_mask or None)``.

    ``cols_out``: an optional C-contiguous array of the columns' shape and dtype, filled
    with ``deform_im2col``'s result (bit for bit) from the corner values this kernel reads
    anyway, which saves the backward a second im2col. ``border_grad``: "torchvision" or
    "mmcv", the offset gradient's convention at exactly p = -1 (see numpy.py)."""
    border_mmcv = check_border_grad("deform_col2im_coord", border_grad) == "mmcv"
    N, C, H, W, kh, kw, sh, sw, ph, pw, dh, dw, oh, ow, G = check_deform_args(
        "deform_col2im_coord", None, x, offset, mask, kernel_hw, stride, padding, dilation, offset_groups,
        d_cols=d_cols)
    _check_cols_out("deform_col2im_coord", cols_out, (N, C, kh, kw, oh, ow), x.dtype)
    d_offset = np.zeros(offset.shape, dtype=x.dtype)
    d_mask = None if mask is None else np.zeros(mask.shape, dtype=x.dtype)
    if d_offset.size == 0 or d_cols.size == 0:
        if cols_out is not None and cols_out.size:
            cols_out[...] = deform_im2col(x, offset, mask, kernel_hw, stride, padding, dilation, (oh, ow), offset_groups)
        return d_offset, d_mask
    m, has_mask = _mask_or_dummy(mask, x.dtype)
    d_mask_arg = d_mask if has_mask else np.zeros((1, 1, 1, 1), dtype=x.dtype)
    want_cols = cols_out is not None
    cols_arg = cols_out.reshape(N, C, kh * kw, oh, ow) if want_cols else np.zeros((1, 1, 1, 1, 1), dtype=x.dtype)
    _coord_kernel(_c(d_cols).reshape(N, C, kh * kw, oh, ow), _padded(x), _c(offset), m, has_mask, H, W, kh, kw,
                  sh, sw, ph, pw, dh, dw, G, d_offset, d_mask_arg, want_cols, cols_arg, border_mmcv)
    return d_offset, d_mask


def _check_cols_out(op, cols_out, shape, dtype):
    """``cols_out`` must be None or a writable C-contiguous ndarray of ``shape``, ``dtype``."""
    if cols_out is None:
        return
    if not isinstance(cols_out, np.ndarray) or cols_out.shape != tuple(shape) or cols_out.dtype != dtype \
            or not cols_out.flags.c_contiguous or not cols_out.flags.writeable:
        got = f"{type(cols_out).__name__} {getattr(cols_out, 'shape', '')} {getattr(cols_out, 'dtype', '')}"
        raise ValueError(f"{op}: cols_out must be a writable C-contiguous ndarray of shape {tuple(shape)} and dtype {dtype}, got {got}")


def _ensure_gemm():
    """Load SciPy's BLAS before any parallel kernel calls it: ``numba_xxgemm`` looks its
    function up under the GIL on first use, which a worker thread must never need."""
    if _GEMM_READY:
        return
    import scipy.linalg.cython_blas  # noqa: F401  (also brings SciPy's OpenBLAS into the process)

    for dt in (np.float32, np.float64):
        one = np.ones((1, 1, 1, 1), dtype=dt)
        out = np.zeros((1, 1, 1, 1), dtype=dt)
        if not numba.config.DISABLE_JIT:
            _tile_forward(one[0], one, out, 0, 0, 0, 1)  # serial, on this thread
    _GEMM_READY.append(True)


_GEMM_READY = []


def _check_products(op, w_g, cols_like, other):
    for name, a in (("w_g", w_g), ("first operand", cols_like), ("second operand", other)):
        if not isinstance(a, np.ndarray) or not a.flags.c_contiguous or a.dtype not in _FLOATS:
            raise ValueError(f"{op}: {name} must be a C-contiguous float32/float64 ndarray, got "
                             f"{type(a).__name__} {getattr(a, 'dtype', '')}")
    if len({w_g.dtype, cols_like.dtype, other.dtype}) != 1:
        raise TypeError(f"{op}: all operands must have one dtype, got {w_g.dtype}, {cols_like.dtype}, {other.dtype}")


def products_forward(w_g, cols, out):
    """``out[n, g] = w_g[g] @ cols[n, g]`` for w_g (G, M, Ck), cols (N, G, Ck, L) into
    ``out`` (N, G, M, L), all C-contiguous, one dtype; tiles on Numba's threads (see
    "the matrix products" above: the result does not depend on the thread count)."""
    _check_products("products_forward", w_g, cols, out)
    N, G, Ck, L = cols.shape
    if w_g.shape[0] != G or w_g.shape[2] != Ck or out.shape != (N, G, w_g.shape[1], L):
        raise ValueError(f"products_forward: shapes w_g {w_g.shape}, cols {cols.shape}, out {out.shape} do not fit")
    if out.size == 0:
        return out
    if Ck == 0:
        out[...] = 0
        return out
    _ensure_gemm()
    _forward_products(w_g, cols, out, PRODUCT_COLUMNS)
    return out


def deform_conv_forward(x, offset, mask, w_g, kernel_hw, stride, padding, dilation, offset_groups, out):
    """The deformable convolution's product without a column array:
    ``out[n, g] = w_g[g] @ deform_im2col(x, ...)[n, g]`` for w_g (G_w, M, Ck),
    Ck = C/G_w * kh * kw, into ``out`` (N, G_w, M, out_h * out_w), C-contiguous, dtype
    of x. Each task (image, weight group, tile of ``PRODUCT_COLUMNS`` output pixels)
    samples its tile's columns into a buffer of its own, with deform_im2col's
    arithmetic, and multiplies with one single-threaded gemm, as
    :func:`products_forward` does with the same tile: so the result never depends on
    the thread count, and the columns never travel through main memory."""
    op = "deform_conv_forward"
    if not isinstance(out, np.ndarray) or out.ndim != 4:
        raise ValueError(f"{op}: out must be a 4-d ndarray (N, G_w, M, L), got {type(out).__name__}")
    N, C, H, W, kh, kw, sh, sw, ph, pw, dh, dw, oh, ow, G = check_deform_args(
        op, None, x, offset, mask, kernel_hw, stride, padding, dilation, offset_groups)
    _check_products(op, w_g, out, out)
    if w_g.dtype != x.dtype:
        raise TypeError(f"{op}: w_g and out must have the dtype of x ({x.dtype}), got {w_g.dtype}")
    Gw = w_g.shape[0]
    if Gw < 1 or C % Gw or w_g.shape[2] != C // Gw * kh * kw or out.shape != (N, Gw, w_g.shape[1], oh * ow):
        raise ValueError(f"{op}: shapes w_g {w_g.shape}, out {out.shape} do not fit x {x.shape} and a "
                         f"{kh}x{kw} kernel with {oh}x{ow} outputs")
    if out.size == 0:
        return out
    if w_g.shape[2] == 0:
        out[...] = 0
        return out
    _ensure_gemm()
    m, has_mask = _mask_or_dummy(mask, x.dtype)
    _fused_forward_kernel(_padded(x), _c(offset), m, has_mask, H, W, kh, kw, sh, sw, ph, pw, dh, dw, G, ow, w_g, out,
                          PRODUCT_COLUMNS)
    return out


def products_d_cols(w_g, dy, d_cols):
    """``d_cols[n, g] = w_g[g].T @ dy[n, g]`` for w_g (G, M, Ck), dy (N, G, M, L) into
    ``d_cols`` (N, G, Ck, L); tiles on Numba's threads."""
    _check_products("products_d_cols", w_g, dy, d_cols)
    N, G, M, L = dy.shape
    if w_g.shape[:2] != (G, M) or d_cols.shape != (N, G, w_g.shape[2], L):
        raise ValueError(f"products_d_cols: shapes w_g {w_g.shape}, dy {dy.shape}, d_cols {d_cols.shape} do not fit")
    if d_cols.size == 0:
        return d_cols
    if M == 0:
        d_cols[...] = 0
        return d_cols
    _ensure_gemm()
    _d_cols_products(w_g, dy, d_cols, PRODUCT_COLUMNS)
    return d_cols


def products_d_weight(dy, cols, d_w):
    """``d_w[g] += sum_n dy[n, g] @ cols[n, g].T`` (images added in increasing n) for
    dy (N, G, M, L), cols (N, G, Ck, L), d_w (G, M, Ck); tiles on Numba's threads."""
    _check_products("products_d_weight", d_w, dy, cols)
    N, G, Ck, L = cols.shape
    if dy.shape[:2] != (N, G) or dy.shape[3] != L or d_w.shape != (G, dy.shape[2], Ck):
        raise ValueError(f"products_d_weight: shapes dy {dy.shape}, cols {cols.shape}, d_w {d_w.shape} do not fit")
    if d_w.size == 0 or N == 0 or L == 0:
        return d_w
    _ensure_gemm()
    _d_weight_products(dy, cols, d_w, WEIGHT_ROWS)
    return d_w


def map_coordinates_clamped(x, coords):
    """The seed's clamped bilinear sampling: x (B, H, W), coords (B, P, 2) -> (B, P)."""
    B, H, W, P = check_map_args("map_coordinates_clamped", x, coords)
    out = np.empty((B, P), dtype=x.dtype)
    if out.size:
        _map_kernel(_c(x), _c(coords), out)
    return out


def map_coordinates_clamped_backward(d_out, x, coords):
    """Backward of :func:`map_coordinates_clamped`: ``(d_x (B, H, W), d_coords (B, P, 2))``."""
    B, H, W, P = check_map_args("map_coordinates_clamped_backward", x, coords, d_out=d_out)
    d_x = np.zeros((B, H, W), dtype=np.float64)  # accumulated in float64
    d_coords = np.empty((B, P, 2), dtype=x.dtype)
    if d_coords.size:
        _map_backward_kernel(_c(d_out), _c(x), _c(coords), d_x, d_coords)
    return d_x.astype(x.dtype, copy=False), d_coords
