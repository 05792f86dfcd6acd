"""The "numba" sampling backend: parallel Numba kernels for the bilinear-sampling hot loop.

Same functions, signatures and numbers as ``numpy.py`` (the definition); see the package
docstring and ``numpy.py`` for the semantics. Shapes and names follow torchvision's
``deform_conv2d_kernel.cpp``: ``G`` offset groups, ``K = kh * kw`` taps, tap ``k = i*kw + j``,
sample position::

    p_y = oy*stride_h - pad_h + i*dilation_h + offset[n, 2*(g*K + k),     oy, ox]
    p_x = ox*stride_w - pad_w + j*dilation_w + offset[n, 2*(g*K + k) + 1, oy, ox]

Kernels
-------
Every kernel is ``@njit(cache=True, parallel=True)`` with ``fastmath`` off, and every
``prange`` iteration writes a set of output elements no other iteration touches, so the
result does not depend on the number of threads or their timing (identical run to run):

* ``deform_im2col``: one iteration per output row (n, g, k, oy); it computes the corner
  indices and weights of the row once and then fills ``cols[n, c, i, j, oy, :]`` for the
  channels c of group g.
* ``deform_col2im``: one iteration per (n, g, block of channels); the iteration owns the
  planes ``d_x[n, c]`` of its channels and adds into them in a fixed order (k, oy, ox).
* ``deform_col2im_coord``: one iteration per output row (n, g, k, oy); it owns
  ``d_offset[n, 2*(g*K+k) : 2*(g*K+k)+2, oy, :]`` and ``d_mask[n, g*K+k, oy, :]`` and sums
  over the channels of the group in increasing order.
* ``map_coordinates_clamped`` and its backward: one iteration per map b (the backward
  owns ``d_x[b]`` and ``d_coords[b]``).

Memory safety: Numba does not bounds-check. A corner index is computed only after the
position has passed a floating-point range test that is false for NaN and +-inf, so a
non-finite or huge offset never reaches an integer conversion or an index.

Threads
-------
On a machine with few cores, Numba's OpenMP worker threads and OpenBLAS's worker threads
both busy-wait for a while after their work is done. When a kernel and a BLAS matrix
product alternate (deformable im2col, matmul, im2col, ...), each pool's spinning threads
take the cores the other one needs and both slow down several times over. This module
therefore asks Numba for its "workqueue" threading layer (whose workers sleep instead of
spinning) when the process has not chosen a layer yet (neither ``NUMBA_THREADING_LAYER``
nor ``numba.config.THREADING_LAYER`` set to something else) and no parallel region has
started; see :func:`threading_info` and ``tools/bench.py`` for the measurements.
"""

from __future__ import annotations

import os

import numpy as np

import numba
from numba import njit, prange

from .._checks import float_array, pair, positive_int

__all__ = [
    "unavailable_reason",
    "deform_im2col",
    "deform_col2im",
    "deform_col2im_coord",
    "map_coordinates_clamped",
    "map_coordinates_clamped_backward",
    "threading_info",
]

# ---------------------------------------------------------------------------------------
# threading layer (see "Threads" in the module docstring)

_LAYER_CHOSEN_HERE = False


def _prefer_workqueue():
    """Select Numba's non-spinning "workqueue" layer unless the process chose one already."""
    global _LAYER_CHOSEN_HERE
    if os.environ.get("NUMBA_THREADING_LAYER"):
        return
    if numba.config.THREADING_LAYER != "default":
        return
    try:  # once a parallel region has run, the layer is fixed; leave it alone
        numba.threading_layer()
        return
    except ValueError:
        pass
    numba.config.THREADING_LAYER = "workqueue"
    _LAYER_CHOSEN_HERE = True


_prefer_workqueue()


def threading_info() -> dict:
    """Which threading layer the kernels use, how many threads, and who chose the layer."""
    try:
        layer = numba.threading_layer()
    except ValueError:
        layer = None  # no parallel region has run yet
    return {
        "configured_layer": numba.config.THREADING_LAYER,
        "active_layer": layer,
        "num_threads": numba.get_num_threads(),
        "chosen_by_npattn": _LAYER_CHOSEN_HERE,
    }


def unavailable_reason():
    """None: this backend only needs numba, which imported (else the import failed)."""
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
# Loop-invariant index arithmetic is hoisted by hand: a row (n, g, k, oy) of the output
# shares its offsets, positions, corner indices and weights across the channels of group g.


@njit(cache=True)
def _corner_row(offset, n, ch, oy, base_y, base_x, sw, H, W, idx, ok, wts):
    """Corners of the samples of one output row, torchvision's ``bilinear_interpolate``.

    For ox in range(ow), position ``p_y = base_y + offset[n, ch, oy, ox]``, ``p_x = base_x
    + ox*sw + offset[n, ch+1, oy, ox]``. Corner q (0: (y0, x0), 1: (y0, x0+1), 2: (y0+1,
    x0), 3: (y0+1, x0+1)) gets ``ok[q, ox]`` (inside the image, and the sample nonzero:
    -1 < p_y < H and -1 < p_x < W), its flat index ``idx[q, ox] = y*W + x`` (0 when not
    ok, so every index is a valid address) and its bilinear weight ``wts[q, ox]``. The
    range test is false for NaN and +-inf: no integer is ever made from a non-finite or
    out-of-range position.
    """
    tp = wts.dtype.type
    one = tp(1)
    by = tp(base_y)
    for ox in range(idx.shape[1]):
        py = by + offset[n, ch, oy, ox]
        px = tp(base_x + ox * sw) + offset[n, ch + 1, oy, ox]
        if py > -1 and py < H and px > -1 and px < W:
            yl = tp(np.floor(py))
            xl = tp(np.floor(px))
            ly = py - yl
            lx = px - xl
            hy = one - ly
            hx = one - lx
            y0 = int(yl)  # in [-1, H-1]
            x0 = int(xl)  # in [-1, W-1]
            up = y0 >= 0
            down = y0 + 1 <= H - 1
            left = x0 >= 0
            right = x0 + 1 <= W - 1
            ok[0, ox] = up and left
            ok[1, ox] = up and right
            ok[2, ox] = down and left
            ok[3, ox] = down and right
            idx[0, ox] = y0 * W + x0 if ok[0, ox] else 0
            idx[1, ox] = y0 * W + x0 + 1 if ok[1, ox] else 0
            idx[2, ox] = (y0 + 1) * W + x0 if ok[2, ox] else 0
            idx[3, ox] = (y0 + 1) * W + x0 + 1 if ok[3, ox] else 0
            wts[0, ox] = hy * hx
            wts[1, ox] = hy * lx
            wts[2, ox] = ly * hx
            wts[3, ox] = ly * lx
        else:
            for q in range(4):
                ok[q, ox] = False
                idx[q, ox] = 0
                wts[q, ox] = 0


@njit(cache=True, parallel=True)
def _im2col_kernel(x, offset, mask, has_mask, H, W, kh, kw, sh, sw, ph, pw, dh, dw, G, cols):
    # x (N, C, H*W); offset (N, 2*G*K, oh, ow); mask (N, G*K, oh, ow) (unused unless has_mask)
    # cols (N, C, K, oh, ow): every element written.
    N = x.shape[0]
    C = x.shape[1]
    K = kh * kw
    oh = cols.shape[3]
    ow = cols.shape[4]
    cpg = C // G
    zero = x.dtype.type(0)
    for r in prange(N * G * K * oh):
        oy = r % oh
        t = r // oh
        k = t % K
        t = t // K
        g = t % G
        n = t // G
        i = k // kw
        j = k - i * kw
        idx = np.empty((4, ow), np.int64)
        ok = np.empty((4, ow), np.bool_)
        wts = np.empty((4, ow), x.dtype)
        _corner_row(offset, n, 2 * (g * K + k), oy, oy * sh - ph + i * dh, j * dw - pw, sw, H, W, idx, ok, wts)
        for c in range(g * cpg, (g + 1) * cpg):
            xc = x[n, c]
            out = cols[n, c, k, oy]
            for ox in range(ow):
                # a corner outside the image is 0 (a select, not a product with weight 0,
                # so a non-finite pixel elsewhere cannot leak in)
                v0 = xc[idx[0, ox]] if ok[0, ox] else zero
                v1 = xc[idx[1, ox]] if ok[1, ox] else zero
                v2 = xc[idx[2, ox]] if ok[2, ox] else zero
                v3 = xc[idx[3, ox]] if ok[3, ox] else zero
                v = wts[0, ox] * v0 + wts[1, ox] * v1 + wts[2, ox] * v2 + wts[3, ox] * v3
                if has_mask:
                    v = mask[n, g * K + k, oy, ox] * v
                out[ox] = v


@njit(cache=True, parallel=True)
def _col2im_kernel(d_cols, offset, mask, has_mask, H, W, kh, kw, sh, sw, ph, pw, dh, dw, G, cblock, d_x):
    # d_cols (N, C, K, oh, ow); d_x (N, C, H*W) float64, zero on entry. Iteration
    # (n, g, block of channels) owns the planes d_x[n, c] of its channels and adds into
    # them in (k, oy, ox) order. Each term w * (m * D) is formed in the dtype of d_cols and
    # accumulated in float64, as numpy.py does.
    N = d_x.shape[0]
    C = d_x.shape[1]
    K = kh * kw
    oh = d_cols.shape[3]
    ow = d_cols.shape[4]
    cpg = C // G
    nblk = (cpg + cblock - 1) // cblock
    for t in prange(N * G * nblk):
        b = t % nblk
        u = t // nblk
        g = u % G
        n = u // G
        c_lo = g * cpg + b * cblock
        c_hi = min(c_lo + cblock, (g + 1) * cpg)
        idx = np.empty((4, ow), np.int64)
        ok = np.empty((4, ow), np.bool_)
        wts = np.empty((4, ow), d_cols.dtype)
        for k in range(K):
            i = k // kw
            j = k - i * kw
            for oy in range(oh):
                _corner_row(offset, n, 2 * (g * K + k), oy, oy * sh - ph + i * dh, j * dw - pw, sw, H, W, idx, ok, wts)
                for c in range(c_lo, c_hi):
                    dxc = d_x[n, c]
                    for ox in range(ow):
                        d = d_cols[n, c, k, oy, ox]
                        if has_mask:
                            d = mask[n, g * K + k, oy, ox] * d
                        for q in range(4):
                            if ok[q, ox]:
                                dxc[idx[q, ox]] += wts[q, ox] * d


@njit(cache=True, parallel=True)
def _coord_kernel(d_cols, x, offset, mask, has_mask, H, W, kh, kw, sh, sw, ph, pw, dh, dw, G, d_offset, d_mask):
    # d_cols (N, C, K, oh, ow); x (N, C, H*W); d_offset (N, 2*G*K, oh, ow) and, when
    # has_mask, d_mask (N, G*K, oh, ow): every element written. Iteration (n, g, k, oy)
    # owns one row of each and sums over the group's channels in increasing order.
    N = x.shape[0]
    C = x.shape[1]
    K = kh * kw
    oh = d_cols.shape[3]
    ow = d_cols.shape[4]
    cpg = C // G
    tp = x.dtype.type
    zero = tp(0)
    one = tp(1)
    for r in prange(N * G * K * oh):
        oy = r % oh
        t = r // oh
        k = t % K
        t = t // K
        g = t % G
        n = t // G
        i = k // kw
        j = k - i * kw
        ch = 2 * (g * K + k)
        by = tp(oy * sh - ph + i * dh)
        idx = np.zeros((4, ow), np.int64)  # corners 00, 01, 10, 11: flat index (0 when not ok)
        ok = np.zeros((4, ow), np.bool_)  # corner inside the image and position in the support
        frac = np.zeros((4, ow), x.dtype)  # ly, lx, hy, hx of the cell (0 outside the support)
        smp = np.zeros(ow, np.bool_)  # -1 < p_y and -1 < p_x as well: a nonzero sample
        mrow = np.empty(ow, x.dtype)
        acc_y = np.zeros(ow, x.dtype)
        acc_x = np.zeros(ow, x.dtype)
        acc_m = np.zeros(ow, x.dtype)
        for ox in range(ow):
            mrow[ox] = mask[n, g * K + k, oy, ox] if has_mask else one
            py = by + offset[n, ch, oy, ox]
            px = tp(ox * sw - pw + j * dw) + offset[n, ch + 1, oy, ox]
            # torchvision's get_coordinate_weight has no range test of its own; outside
            # the support [-1, H) x [-1, W) all four corners are outside, so the gradient
            # is 0 there. The test is false for NaN and inf, so no index comes from them.
            if py >= -1 and py < H and px >= -1 and px < W:
                yl = tp(np.floor(py))
                xl = tp(np.floor(px))
                y0 = int(yl)  # in [-1, H-1]
                x0 = int(xl)  # in [-1, W-1]
                up = y0 >= 0
                down = y0 + 1 <= H - 1
                left = x0 >= 0
                right = x0 + 1 <= W - 1
                ok[0, ox] = up and left
                ok[1, ox] = up and right
                ok[2, ox] = down and left
                ok[3, ox] = down and right
                idx[0, ox] = y0 * W + x0 if ok[0, ox] else 0
                idx[1, ox] = y0 * W + x0 + 1 if ok[1, ox] else 0
                idx[2, ox] = (y0 + 1) * W + x0 if ok[2, ox] else 0
                idx[3, ox] = (y0 + 1) * W + x0 + 1 if ok[3, ox] else 0
                ly = py - yl
                lx = px - xl
                frac[0, ox] = ly
                frac[1, ox] = lx
                frac[2, ox] = one - ly
                frac[3, ox] = one - lx
                smp[ox] = py > -1 and px > -1
        for c in range(g * cpg, (g + 1) * cpg):
            xc = x[n, c]
            dc = d_cols[n, c, k, oy]
            for ox in range(ow):
                v00 = xc[idx[0, ox]] if ok[0, ox] else zero
                v01 = xc[idx[1, ox]] if ok[1, ox] else zero
                v10 = xc[idx[2, ox]] if ok[2, ox] else zero
                v11 = xc[idx[3, ox]] if ok[3, ox] else zero
                ly = frac[0, ox]
                lx = frac[1, ox]
                hy = frac[2, ox]
                hx = frac[3, ox]
                d = dc[ox]
                gy = lx * (v11 - v01) + hx * (v10 - v00)  # d bilinear / d p_y on the cell
                gx = ly * (v11 - v10) + hy * (v01 - v00)  # d bilinear / d p_x on the cell
                if has_mask:
                    m = mrow[ox]
                    acc_y[ox] += (m * gy) * d
                    acc_x[ox] += (m * gx) * d
                    val = hy * hx * v00 + hy * lx * v01 + ly * hx * v10 + ly * lx * v11
                    acc_m[ox] += (val if smp[ox] else zero) * d
                else:
                    acc_y[ox] += gy * d
                    acc_x[ox] += gx * d
        for ox in range(ow):
            d_offset[n, ch, oy, ox] = acc_y[ox]
            d_offset[n, ch + 1, oy, ox] = acc_x[ox]
            if has_mask:
                d_mask[n, g * K + k, oy, ox] = acc_m[ox]


# ---------------------------------------------------------------------------------------
# kernels: the seed's clamped sampling (th_batch_map_coordinates)


@njit(cache=True, parallel=True)
def _map_kernel(x, coords, out):
    # x (B, H, W); coords (B, P, 2) as (row, col); out (B, P): every element written.
    B = x.shape[0]
    H = x.shape[1]
    W = x.shape[2]
    P = coords.shape[1]
    tp = x.dtype.type
    zero = tp(0)
    hmax = tp(H - 1)
    wmax = tp(W - 1)
    for b in prange(B):
        for p in range(P):
            y = coords[b, p, 0]
            xq = coords[b, p, 1]
            if np.isnan(y) or np.isnan(xq):
                out[b, p] = zero
                continue
            yc = min(max(y, zero), hmax)  # +-inf clamp like any other value
            xc = min(max(xq, zero), wmax)
            yf = tp(np.floor(yc))
            xf = tp(np.floor(xc))
            i0 = int(yf)
            i1 = int(np.ceil(yc))
            j0 = int(xf)
            j1 = int(np.ceil(xc))
            fy = yc - yf
            fx = xc - xf
            v_lt = x[b, i0, j0]
            v_rb = x[b, i1, j1]
            v_lb = x[b, i0, j1]
            v_rt = x[b, i1, j0]
            vals_t = fy * (v_rt - v_lt) + v_lt
            vals_b = fy * (v_rb - v_lb) + v_lb
            out[b, p] = fx * (vals_b - vals_t) + vals_t


@njit(cache=True, parallel=True)
def _map_backward_kernel(d_out, x, coords, d_x, d_coords):
    # d_x (B, H, W) float64, zero on entry (each term is formed in the dtype of x and
    # accumulated in float64, as numpy.py does); d_coords (B, P, 2): every element
    # written. Iteration b owns d_x[b] and d_coords[b].
    B = x.shape[0]
    H = x.shape[1]
    W = x.shape[2]
    P = coords.shape[1]
    tp = x.dtype.type
    zero = tp(0)
    one = tp(1)
    hmax = tp(H - 1)
    wmax = tp(W - 1)
    for b in prange(B):
        for p in range(P):
            y = coords[b, p, 0]
            xq = coords[b, p, 1]
            if np.isnan(y) or np.isnan(xq):
                d_coords[b, p, 0] = zero
                d_coords[b, p, 1] = zero
                continue
            yc = min(max(y, zero), hmax)
            xc = min(max(xq, zero), wmax)
            yf = tp(np.floor(yc))
            xf = tp(np.floor(xc))
            i0 = int(yf)
            i1 = int(np.ceil(yc))
            j0 = int(xf)
            j1 = int(np.ceil(xc))
            fy = yc - yf
            fx = xc - xf
            v_lt = x[b, i0, j0]
            v_rb = x[b, i1, j1]
            v_lb = x[b, i0, j1]
            v_rt = x[b, i1, j0]
            vals_t = fy * (v_rt - v_lt) + v_lt
            vals_b = fy * (v_rb - v_lb) + v_lb
            d = d_out[b, p]
            d_vals_b = fx * d
            d_vals_t = (one - fx) * d
            d_fx = (vals_b - vals_t) * d
            d_fy = (v_rt - v_lt) * d_vals_t + (v_rb - v_lb) * d_vals_b
            d_x[b, i0, j0] += (one - fy) * d_vals_t
            d_x[b, i1, j0] += fy * d_vals_t
            d_x[b, i0, j1] += (one - fy) * d_vals_b
            d_x[b, i1, j1] += fy * d_vals_b
            # torch.clamp passes the gradient on [lo, hi] (bounds included); at an integer
            # coordinate floor == ceil, so v_rt == v_lt and the seed's formula gives 0.
            d_coords[b, p, 0] = d_fy if (y >= 0 and y <= hmax) else zero
            d_coords[b, p, 1] = d_fx if (xq >= 0 and xq <= wmax) else zero


# ---------------------------------------------------------------------------------------
# the backend functions (contract of npattn.sampling)


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
    _im2col_kernel(_c(x).reshape(N, C, H * W), _c(offset), m, has_mask, H, W, kh, kw, sh, sw, ph, pw, dh, dw, G,
                   cols.reshape(N, C, kh * kw, oh, ow))
    return cols


def _channel_block(N, G, cpg):
    """Channels per col2im task: enough tasks to keep every thread busy, few enough that
    the corner computation of a row is shared by several channels."""
    tasks_wanted = 8 * max(1, numba.get_num_threads())
    blocks_per_group = min(cpg, max(1, -(-tasks_wanted // max(1, N * G))))
    return max(1, -(-cpg // blocks_per_group))


def deform_col2im(d_cols, offset, mask, x_shape, kernel_hw, stride, padding, dilation, offset_groups):
    """Adjoint of :func:`deform_im2col` w.r.t. x: ``d_x`` of ``x_shape`` (N, C, H, W)."""
    N, C, H, W, kh, kw, sh, sw, ph, pw, dh, dw, oh, ow, G = check_deform_args(
        "deform_col2im", tuple(x_shape), None, offset, mask, kernel_hw, stride, padding, dilation, offset_groups,
        d_cols=d_cols)
    d_x = np.zeros((N, C, H, W), dtype=np.float64)  # accumulated in float64
    if d_x.size and d_cols.size:
        m, has_mask = _mask_or_dummy(mask, d_cols.dtype)
        cblock = _channel_block(N, G, C // G)
        _col2im_kernel(_c(d_cols).reshape(N, C, kh * kw, oh, ow), _c(offset), m, has_mask, H, W, kh, kw, sh, sw,
                       ph, pw, dh, dw, G, cblock, d_x.reshape(N, C, H * W))
    return d_x.astype(d_cols.dtype, copy=False)


def deform_col2im_coord(d_cols, x, offset, mask, kernel_hw, stride, padding, dilation, offset_groups):
    """Gradients w.r.t. offset and mask: ``(d_offset, d_mask or None)``."""
    N, C, H, W, kh, kw, sh, sw, ph, pw, dh, dw, oh, ow, G = check_deform_args(
        "deform_col2im_coord", None, x, offset, mask, kernel_hw, stride, padding, dilation, offset_groups,
        d_cols=d_cols)
    d_offset = np.zeros(offset.shape, dtype=x.dtype)
    d_mask = None if mask is None else np.zeros(mask.shape, dtype=x.dtype)
    if d_offset.size == 0:
        return d_offset, d_mask
    m, has_mask = _mask_or_dummy(mask, x.dtype)
    d_mask_arg = d_mask if has_mask else np.zeros((1, 1, 1, 1), dtype=x.dtype)
    _coord_kernel(_c(d_cols).reshape(N, C, kh * kw, oh, ow), _c(x).reshape(N, C, H * W), _c(offset), m, has_mask,
                  H, W, kh, kw, sh, sw, ph, pw, dh, dw, G, d_offset, d_mask_arg)
    return d_offset, d_mask


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
