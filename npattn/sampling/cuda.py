"""The "cuda" sampling backend: numba.cuda kernels for the bilinear-sampling hot loop.

Same functions, signatures and numbers as ``numpy.py`` (the definition) and ``cpu.py``;
see ``numpy.py`` for the semantics. Every kernel is a grid-stride loop:

* ``deform_im2col``: one thread per sampling position (n, g, k, oy, ox): it computes the
  position, its corners and bilinear weights once, then samples the group's channels in
  turn; neighbouring threads differ in ox, so the reads of offset / mask and the writes
  of the columns are coalesced. The deformable kernels take flat (1-D) views of
  C-contiguous arrays and advance their indices by one plane per channel;
* ``deform_col2im``: one thread per sampling position, looping over the group's
  channels; it adds ``w * (m * D)`` to each in-image corner with ``cuda.atomic.add`` into
  a float64 buffer (as numpy.py sums in float64), which is then rounded to the dtype of
  ``d_cols``;
* ``deform_col2im_coord``: one thread per position; it sums over the group's channels in
  increasing order and writes its own d_offset pair and d_mask entry (no atomics, same
  order as numpy.py), and, given ``cols_out``, the forward's columns in the same pass;
* ``map_coordinates_clamped``: one thread per (b, p); its backward writes d_coords
  directly and scatters d_x with float64 atomics.

The scalar arithmetic (support test, cell and weights, the bilinear blend, its position
derivatives, the seed's clamped sampling) is ``_bilinear.py``'s, the same Python functions
that cpu.py compiles for the CPU, here compiled as inlined device functions. The
deformable kernels are built twice: with their index arithmetic (splitting the thread
index into (n, g, k, oy, ox), the flat indices of x, columns, offset and mask) in
unsigned 32-bit integers, used when every flat index of the call is below 2**32 (every
realistic call), and in 64-bit integers, the fallback ("<name>/64").

The float64 atomic scatters add in an unspecified order, so ``d_x`` may differ from run to
run in the last bits of float64 (for float32 inputs the final rounding almost always hides
it); everything else is deterministic. The arithmetic is written in numpy.py's order and
in the dtype of the input (float32 stays float32), but on a real GPU NVVM fuses
``a * b + c`` into one fused multiply-add (its default; numba.cuda offers no switch for it
apart from fastmath, which would do more), so device results agree with numpy.py to
rounding rather than bit for bit. The simulator runs the same source as Python.

Host wrappers accept NumPy arrays or CUDA arrays (anything with
``__cuda_array_interface__``). With NumPy inputs only, results come back as NumPy arrays;
with CuPy inputs, results are CuPy arrays from CuPy's memory pool; with other device
arrays (Numba's, PyTorch CUDA tensors) they are Numba device arrays. Launch
configurations are cached per kernel and grid size. ``npattn.functional.deform_conv2d``
calls these wrappers on CuPy arrays for CUDA inputs (and for NumPy inputs when CuPy is
installed: one upload, one download per call), so nothing crosses the bus between
kernels.

Memory safety: a corner index is formed only after a floating-point range test that is
false for NaN and +-inf, so non-finite or huge offsets never index outside the input.

The kernels run on Numba's CUDA simulator when ``NUMBA_ENABLE_CUDASIM=1`` (tests use
tiny shapes there: the simulator spends ~150 us per thread), and
:func:`ptx_kernels` lists every kernel with its signatures so that
``numba.cuda.compile_ptx`` can check they compile without a GPU.
"""

from __future__ import annotations

import math

import numpy as np

from numba import cuda, float32, float64, int64, uint32, boolean

from .._xp import cupy_or_reason
from . import _bilinear
from . import check_border_grad
from . import cpu as _cpu  # argument checks shared with the CPU backend

__all__ = [
    "unavailable_reason",
    "deform_im2col",
    "deform_col2im",
    "deform_col2im_coord",
    "map_coordinates_clamped",
    "map_coordinates_clamped_backward",
    "ptx_kernels",
]

THREADS_PER_BLOCK = 256
MAX_BLOCKS = 65535  # grid-stride loops cover the rest


def unavailable_reason():
    """None when a CUDA device (or the simulator) is usable, else why not.

    "Usable" is tested, not assumed: the first time it is asked (per process; the outcome
    is cached), this compiles and launches one tiny kernel and checks its result. So an
    incompatible numba-cuda / NumPy pair (numba-cuda 0.30.4 under NumPy 2.5 fails inside
    its compiler), a missing NVVM or a driver problem is reported here, with the underlying
    error, and the dispatcher raises ``BackendUnavailable``: never an exception from inside
    the first real kernel launch.
    """
    try:
        ok = cuda.is_available()
    except Exception as exc:  # a broken driver install raises instead of answering
        return f"no usable CUDA device: {exc}"
    if not ok:
        return (
            "no CUDA device: numba.cuda.is_available() is False (no NVIDIA driver or GPU); "
            "set NUMBA_ENABLE_CUDASIM=1 to run the kernels on Numba's CUDA simulator"
        )
    global _PROBE_OUTCOME
    if _PROBE_OUTCOME is None:
        _PROBE_OUTCOME = _probe()
    return _PROBE_OUTCOME or None


_PROBE_OUTCOME = None  # None: not run yet; "": the test kernel ran; else why it did not


def _probe_k(v):
    # v (4,) float64: v = 2 v + 1
    i = cuda.grid(1)
    if i < v.shape[0]:
        v[i] = 2.0 * v[i] + 1.0


def _probe() -> str:
    """Compile and launch one small kernel; "" when it ran and gave the right numbers."""
    try:
        host = np.arange(4.0)
        dev = cuda.to_device(host)
        cuda.jit(_probe_k)[1, 32](dev)
        got = dev.copy_to_host()
    except Exception as exc:  # compiler, NVVM, driver: whatever it is, say it
        return f"a test kernel failed to compile or launch: {type(exc).__name__}: {exc}"
    if not np.array_equal(got, 2.0 * host + 1.0):
        return f"a test kernel ran but computed {got.tolist()} instead of {(2.0 * host + 1.0).tolist()}"
    return ""


# ---------------------------------------------------------------------------------------
# device functions: the scalar arithmetic shared with cpu.py (_bilinear.py), and the flat
# index of a sampling position. inline="always" inlines them into each kernel when it is
# typed, so compile_ptx needs no GPU.


def _device(pyfunc):
    return cuda.jit(device=True, inline="always")(pyfunc)


_in_support = _device(_bilinear.in_support)
_cell = _device(_bilinear.cell)
_corner_weights = _device(_bilinear.corner_weights)
_bilinear_value = _device(_bilinear.bilinear)
_position_grads = _device(_bilinear.position_grads)
_clamped_point = _device(_bilinear.clamped_point)
_clamped_point_backward = _device(_bilinear.clamped_point_backward)


@_device
def _divmod(a, b, ity):
    # (a // b, a % b) for non-negative a, b, in the integer type ity
    q = ity(a // b)
    return q, ity(a - q * b)


@_device
def _sample(offset, t, L, ow, K, G, kw, sh, sw, ph, pw, dh, dw, tp, ity):
    # Flat sampling position t in the row-major order (N, G, K, oh, ow) -> (n, g, k, q,
    # pix, py, px): q = (n G + g) K + k, pix = oy ow + ox; the offset pair is at
    # 2 q L + pix and (2 q + 1) L + pix of the flat offset (N, 2 G K, oh, ow), and the
    # mask entry at t itself. Index arithmetic in ity (uint32 or int64), positions in
    # int64 (they may be negative), the sample position in tp.
    q, pix = _divmod(ity(t), ity(L), ity)
    oy, ox = _divmod(pix, ity(ow), ity)
    u, k = _divmod(q, ity(K), ity)
    n, g = _divmod(u, ity(G), ity)
    i, j = _divmod(k, ity(kw), ity)
    oi = ity(ity(2) * q * ity(L) + pix)
    py = tp(int64(oy) * sh - ph + int64(i) * dh) + offset[oi]
    px = tp(int64(ox) * sw - pw + int64(j) * dw) + offset[oi + ity(L)]
    return n, g, k, q, pix, py, px


@_device
def _channel_walk(n, g, k, pix, C, cpg, K, L, ity):
    # (c0, ci): channel c0 = n C + g cpg, the group's first, as a flat (n, c) index, and
    # the flat index of cols[n, c0, k, oy, ox]; a channel step adds K L to ci
    c0 = ity(n * ity(C) + g * ity(cpg))
    return c0, ity(ity(c0 * ity(K) + k) * ity(L) + pix)


@_device
def _cell_walk(py, px, H, W, c0, tp, ity):
    # The cell of a position inside the support: (ly, lx, hy, hx), the corner weights,
    # which rows / columns of the cell lie in the image (up, down, left, right), and b11,
    # the flat index in x of corner (y0 + 1, x0 + 1) of channel c0 (never negative:
    # y0, x0 >= -1); a channel step adds H W to b11
    y0, x0, ly, lx, hy, hx = _cell(py, px, tp)  # y0 in [-1, H-1], x0 in [-1, W-1]
    w00, w01, w10, w11 = _corner_weights(ly, lx, hy, hx)
    b11 = ity(c0 * ity(H * W) + ity(y0 + 1) * ity(W) + ity(x0 + 1))
    return (ly, lx, hy, hx, w00, w01, w10, w11, y0 >= 0, y0 + 1 <= H - 1, x0 >= 0, x0 + 1 <= W - 1, b11)


@_device
def _corners(x, b11, W, up, down, left, right, zero):
    # the four corner values of a cell whose lower-right corner (y0 + 1, x0 + 1) is at flat
    # index b11 (never negative: y0, x0 >= -1); a corner outside the image is not read
    # (its index, which may wrap around in unsigned arithmetic, is not even formed)
    v00 = x[b11 - W - 1] if (up and left) else zero
    v01 = x[b11 - W] if (up and right) else zero
    v10 = x[b11 - 1] if (down and left) else zero
    v11 = x[b11] if (down and right) else zero
    return v00, v01, v10, v11


# ---------------------------------------------------------------------------------------
# kernels: deformable convolution
#
# All arrays are flat (1-D views of C-contiguous arrays). One thread per sampling position
# (n, g, k, oy, ox): the position, its corners and bilinear weights are computed once,
# then the group's channels are visited in turn, the flat indices of x and of the columns
# advancing by H W and K L per channel. Neighbouring threads differ in ox, so the reads of
# offset / mask / columns and the writes of the columns are coalesced. The kernels are
# built twice by _deform_kernels: with unsigned 32-bit index arithmetic (every flat index
# of the call below 2**32) and with 64-bit arithmetic (the fallback).


def _deform_kernels(ity):
    """The three deformable kernels with index arithmetic in ``ity`` (uint32 or int64)."""

    def im2col(x, offset, mask, has_mask, N, C, H, W, kh, kw, sh, sw, ph, pw, dh, dw, G, oh, ow, cols):
        # x (N, C, H, W); offset (N, 2 G K, oh, ow); mask (N, G K, oh, ow) (read only if
        # has_mask); cols (N, C, K, oh, ow): every element written
        K = kh * kw
        L = oh * ow
        cpg = C // G
        tp = x.dtype.type
        zero = tp(0)
        one = tp(1)
        HW = ity(H * W)
        KL = ity(K * L)
        start = cuda.grid(1)
        step = cuda.gridsize(1)
        for t in range(start, N * G * K * L, step):
            n, g, k, q, pix, py, px = _sample(offset, t, L, ow, K, G, kw, sh, sw, ph, pw, dh, dw, tp, ity)
            m = mask[ity(t)] if has_mask else one
            c0, ci = _channel_walk(n, g, k, pix, C, cpg, K, L, ity)
            if _in_support(py, px, H, W, False):  # false for NaN and inf
                ly, lx, hy, hx, w00, w01, w10, w11, up, down, left, right, b11 = _cell_walk(py, px, H, W, c0, tp, ity)
                for _ in range(cpg):
                    v00, v01, v10, v11 = _corners(x, b11, ity(W), up, down, left, right, zero)
                    v = _bilinear_value(w00, w01, w10, w11, v00, v01, v10, v11)
                    cols[ci] = m * v if has_mask else v
                    b11 = ity(b11 + HW)
                    ci = ity(ci + KL)
            else:
                for _ in range(cpg):
                    cols[ci] = m * zero if has_mask else zero
                    ci = ity(ci + KL)

    def col2im(d_cols, offset, mask, has_mask, N, C, H, W, kh, kw, sh, sw, ph, pw, dh, dw, G, oh, ow, d_x):
        # d_cols (N, C, K, oh, ow); d_x (N, C, H, W) float64, zero on entry: each term
        # w * (m * D) is formed in the dtype of d_cols and added with a float64 atomic
        K = kh * kw
        L = oh * ow
        cpg = C // G
        tp = d_cols.dtype.type
        one = tp(1)
        HW = ity(H * W)
        KL = ity(K * L)
        start = cuda.grid(1)
        step = cuda.gridsize(1)
        for t in range(start, N * G * K * L, step):
            n, g, k, q, pix, py, px = _sample(offset, t, L, ow, K, G, kw, sh, sw, ph, pw, dh, dw, tp, ity)
            if _in_support(py, px, H, W, False):
                m = mask[ity(t)] if has_mask else one
                c0, ci = _channel_walk(n, g, k, pix, C, cpg, K, L, ity)
                ly, lx, hy, hx, w00, w01, w10, w11, up, down, left, right, b11 = _cell_walk(py, px, H, W, c0, tp, ity)
                for _ in range(cpg):
                    d = d_cols[ci]
                    if has_mask:
                        d = m * d
                    if up and left:
                        cuda.atomic.add(d_x, b11 - ity(W) - ity(1), float64(w00 * d))
                    if up and right:
                        cuda.atomic.add(d_x, b11 - ity(W), float64(w01 * d))
                    if down and left:
                        cuda.atomic.add(d_x, b11 - ity(1), float64(w10 * d))
                    if down and right:
                        cuda.atomic.add(d_x, b11, float64(w11 * d))
                    b11 = ity(b11 + HW)
                    ci = ity(ci + KL)

    def coord(d_cols, x, offset, mask, has_mask, N, C, H, W, kh, kw, sh, sw, ph, pw, dh, dw, G, oh, ow, d_offset,
              d_mask, border_mmcv, write_cols, cols):
        # Sums over the group's channels in increasing order. border_mmcv: the offset
        # gradient's support is (-1, H) x (-1, W) (mmcv), else [-1, H) x [-1, W)
        # (torchvision); they differ only at p exactly -1. write_cols: also write the
        # forward's columns into cols, the numbers of im2col (for the weight gradient).
        K = kh * kw
        L = oh * ow
        cpg = C // G
        tp = x.dtype.type
        zero = tp(0)
        one = tp(1)
        HW = ity(H * W)
        KL = ity(K * L)
        start = cuda.grid(1)
        step = cuda.gridsize(1)
        for t in range(start, N * G * K * L, step):
            n, g, k, q, pix, py, px = _sample(offset, t, L, ow, K, G, kw, sh, sw, ph, pw, dh, dw, tp, ity)
            m = mask[ity(t)] if has_mask else one
            c0, ci = _channel_walk(n, g, k, pix, C, cpg, K, L, ity)
            acc_y = zero
            acc_x = zero
            acc_m = zero
            sample = _in_support(py, px, H, W, False)
            if _in_support(py, px, H, W, not border_mmcv):  # the gradient's support; false for NaN and inf
                ly, lx, hy, hx, w00, w01, w10, w11, up, down, left, right, b11 = _cell_walk(py, px, H, W, c0, tp, ity)
                for _ in range(cpg):
                    v00, v01, v10, v11 = _corners(x, b11, ity(W), up, down, left, right, zero)
                    d = d_cols[ci]
                    jy, jx = _position_grads(ly, lx, hy, hx, v00, v01, v10, v11)
                    v = zero
                    if sample:
                        v = _bilinear_value(w00, w01, w10, w11, v00, v01, v10, v11)
                    if has_mask:
                        acc_y += (m * jy) * d
                        acc_x += (m * jx) * d
                        if sample:
                            acc_m += v * d
                    else:
                        acc_y += jy * d
                        acc_x += jx * d
                    if write_cols:
                        cols[ci] = m * v if has_mask else v
                    b11 = ity(b11 + HW)
                    ci = ity(ci + KL)
            elif write_cols:
                for _ in range(cpg):
                    cols[ci] = m * zero if has_mask else zero
                    ci = ity(ci + KL)
            oi = ity(ity(2) * q * ity(L) + pix)
            d_offset[oi] = acc_y
            d_offset[oi + ity(L)] = acc_x
            if has_mask:
                d_mask[ity(t)] = acc_m

    return {"im2col": im2col, "col2im": col2im, "coord": coord}


_NARROW_KERNELS = _deform_kernels(uint32)  # every flat index of the call < 2**32
_WIDE_KERNELS = _deform_kernels(int64)


# ---------------------------------------------------------------------------------------
# kernels: the seed's clamped sampling


def _map_k(x, coords, out):
    # one thread per (b, p); x (B, H, W), coords (B, P, 2), out (B, P)
    B, H, W = x.shape
    P = coords.shape[1]
    tp = x.dtype.type
    hmax = tp(H - 1)
    wmax = tp(W - 1)
    start = cuda.grid(1)
    step = cuda.gridsize(1)
    for t in range(start, B * P, step):
        b = t // P
        p = t - b * P
        out[b, p] = _clamped_point(x, b, coords[b, p, 0], coords[b, p, 1], hmax, wmax, tp)


def _map_backward_k(d_out, x, coords, d_x, d_coords):
    # one thread per (b, p); d_x (B, H, W) float64, zero on entry, added to with atomics
    B, H, W = x.shape
    P = coords.shape[1]
    tp = x.dtype.type
    hmax = tp(H - 1)
    wmax = tp(W - 1)
    start = cuda.grid(1)
    step = cuda.gridsize(1)
    for t in range(start, B * P, step):
        b = t // P
        p = t - b * P
        y0, y1, x0, x1, d00, d10, d01, d11, dyq, dxq = _clamped_point_backward(
            x, b, coords[b, p, 0], coords[b, p, 1], d_out[b, p], hmax, wmax, tp)
        cuda.atomic.add(d_x, (b, y0, x0), float64(d00))
        cuda.atomic.add(d_x, (b, y1, x0), float64(d10))
        cuda.atomic.add(d_x, (b, y0, x1), float64(d01))
        cuda.atomic.add(d_x, (b, y1, x1), float64(d11))
        d_coords[b, p, 0] = dyq
        d_coords[b, p, 1] = dxq


def _zero_k(dst):
    # dst (1-D view) = 0
    start = cuda.grid(1)
    step = cuda.gridsize(1)
    for t in range(start, dst.shape[0], step):
        dst[t] = 0


def _cast_k(src, dst):
    # dst.ravel() = src.ravel() rounded to dst's dtype (both 1-D views)
    start = cuda.grid(1)
    step = cuda.gridsize(1)
    for t in range(start, src.shape[0], step):
        dst[t] = src[t]


# ---------------------------------------------------------------------------------------
# compilation: lazily, once per kernel (the simulator and PTX checks use the same source)

_PYFUNCS = {
    **{name: f for name, f in _NARROW_KERNELS.items()},
    **{name + "/64": f for name, f in _WIDE_KERNELS.items()},
    "map": _map_k,
    "map_backward": _map_backward_k,
    "cast": _cast_k,
    "zero": _zero_k,
}
_KERNELS = {}


def _kernel(name):
    k = _KERNELS.get(name)
    if k is None:
        k = _KERNELS[name] = cuda.jit(_PYFUNCS[name])
    return k


def ptx_kernels(dtype):
    """``{name: (python function, signature)}`` of every kernel for ``dtype`` (float32 or
    float64), for ``numba.cuda.compile_ptx``; the signatures are those the host wrappers
    launch with (flat C-contiguous arrays for the deformable kernels, whose 64-bit-index
    variants are named "<name>/64")."""
    ft = {np.dtype(np.float32): float32, np.dtype(np.float64): float64}[np.dtype(dtype)]
    a1, a3, a2 = ft[::1], ft[:, :, ::1], ft[:, ::1]
    acc1, acc3 = float64[::1], float64[:, :, ::1]
    geo = (int64,) * 15  # N, C, H, W, kh, kw, sh, sw, ph, pw, dh, dw, G, oh, ow
    deform = {
        "im2col": (a1, a1, a1, boolean, *geo, a1),
        "col2im": (a1, a1, a1, boolean, *geo, acc1),
        "coord": (a1, a1, a1, a1, boolean, *geo, a1, a1, boolean, boolean, a1),
    }
    return {
        **{name: (_NARROW_KERNELS[name], sig) for name, sig in deform.items()},
        **{name + "/64": (_WIDE_KERNELS[name], sig) for name, sig in deform.items()},
        "map": (_map_k, (a3, a3, a2)),
        "map_backward": (_map_backward_k, (a2, a3, a3, acc3, a3)),
        "cast": (_cast_k, (float64[::1], ft[::1])),
        "zero": (_zero_k, (float64[::1],)),
    }


_CONFIGURED = {}  # (name, blocks) -> the kernel configured for that launch grid


def _launch(name, total, *args):
    """Launch kernel ``name`` with enough threads for ``total`` work items (grid-stride
    loops cover the rest). The configured kernels are cached: a launch costs one
    dispatch on the arguments' types, nothing more."""
    if total <= 0:
        return
    blocks = min(MAX_BLOCKS, (total + THREADS_PER_BLOCK - 1) // THREADS_PER_BLOCK)
    launcher = _CONFIGURED.get((name, blocks))
    if launcher is None:
        launcher = _CONFIGURED[(name, blocks)] = _kernel(name)[blocks, THREADS_PER_BLOCK]
    launcher(*args)


# ---------------------------------------------------------------------------------------
# host wrappers

NARROW_LIMIT = 2**32  # calls whose flat indices all stay below this use 32-bit index arithmetic


def _narrow(*sizes):
    """Whether the deformable kernels may do their index arithmetic in unsigned 32 bits:
    every flat index of the call (below the largest array's size) fits; else the
    64-bit kernels run (the fallback for huge calls)."""
    return max(sizes) < NARROW_LIMIT


def _deform_name(name, *sizes):
    return name if _narrow(*sizes) else name + "/64"


def _is_device_array(a):
    if hasattr(cuda, "is_cuda_array"):
        return cuda.is_cuda_array(a)  # anything with __cuda_array_interface__
    return cuda.devicearray.is_cuda_ndarray(a)  # Numba's CUDA simulator


def _c_contiguous(a):
    flags = getattr(a, "flags", None)
    if flags is not None and hasattr(flags, "c_contiguous"):
        return bool(flags.c_contiguous)  # NumPy, CuPy
    return bool(a.is_c_contiguous())  # Numba device arrays


def _is_cupy(a):
    return type(a).__module__.split(".")[0] == "cupy"


def _is_array(a):
    return isinstance(a, np.ndarray) or _is_device_array(a)


def _require_device(op):
    reason = unavailable_reason()
    if reason:
        from . import BackendUnavailable

        raise BackendUnavailable(f"{op}: the cuda sampling backend cannot run: {reason}")


class _Io:
    """Where a call's arrays live and where its results go.

    * every array input a NumPy array: inputs are copied to the device, results come back
      as NumPy arrays (one copy each way per call of this module);
    * any input a CuPy array: results are CuPy arrays (allocated from CuPy's memory pool),
      nothing is copied;
    * otherwise (Numba device arrays, PyTorch CUDA tensors, anything with
      ``__cuda_array_interface__``): results are Numba device arrays, nothing is copied.
    """

    def __init__(self, *arrays):
        arrays = [a for a in arrays if a is not None]
        self.host = all(isinstance(a, np.ndarray) for a in arrays)
        self.cupy = None
        for a in arrays:
            if _is_cupy(a):
                import cupy

                self.cupy = cupy
                break

    @staticmethod
    def dev(a):
        if a is None:
            return None
        if isinstance(a, np.ndarray):
            return cuda.to_device(np.ascontiguousarray(a))
        if hasattr(a, "copy_to_host") or _is_cupy(a):  # a Numba or CuPy device array already
            return a
        return cuda.as_cuda_array(a)  # e.g. PyTorch CUDA tensors

    def flat(self, a):
        """``a`` on the device as a flat 1-D view of C-contiguous data (the deformable
        kernels index flat memory). A non-contiguous device array is copied into a
        contiguous one on the device when CuPy is at hand, else refused."""
        d = self.dev(a)
        if _is_cupy(d):
            return (d if d.flags.c_contiguous else d.copy()).reshape(-1)  # copy(): C order, on the device
        if not d.is_c_contiguous():
            cupy, why = cupy_or_reason()
            if cupy is None:
                raise ValueError(
                    "the cuda sampling kernels read C-contiguous device arrays; got a non-contiguous "
                    f"{type(a).__name__} of shape {tuple(a.shape)} (make it contiguous, or install CuPy: {why})"
                )
            return cupy.ascontiguousarray(cupy.asarray(d)).reshape(-1)
        return d.reshape(d.size)

    def empty(self, shape, dtype):
        if self.cupy is not None:
            return self.cupy.empty(shape, dtype=dtype)
        return cuda.device_array(shape, dtype=dtype)

    def zeros64(self, shape):
        """A float64 device accumulator of ``shape``, set to 0 on the device."""
        if self.cupy is not None:
            return self.cupy.zeros(shape, dtype=np.float64)
        acc = cuda.device_array(shape, dtype=np.float64)
        if acc.size:
            _launch("zero", acc.size, acc.reshape(acc.size))
        return acc

    def rounded(self, acc, dtype):
        """float64 device accumulator -> device array of ``dtype`` (same shape)."""
        if np.dtype(dtype) == np.float64:
            return acc
        if self.cupy is not None:
            return acc.astype(dtype)
        out = cuda.device_array(acc.shape, dtype=dtype)
        if acc.size:
            _launch("cast", acc.size, acc.reshape(acc.size), out.reshape(out.size))
        return out

    def dummy(self, dtype, ndim=4):
        """Stands in for an absent mask / d_mask / cols (never read or written)."""
        return self.empty((1,) * ndim, dtype)

    def out(self, d):
        if d is None:
            return None
        return d.copy_to_host() if self.host else d


def deform_im2col(x, offset, mask, kernel_hw, stride, padding, dilation, out_hw, offset_groups):
    """Deformable im2col on the GPU: ``cols (N, C, kh, kw, out_h, out_w)`` (see numpy.py)."""
    op = "deform_im2col"
    N, C, H, W, kh, kw, sh, sw, ph, pw, dh, dw, oh, ow, G = _cpu.check_deform_args(
        op, None, x, offset, mask, kernel_hw, stride, padding, dilation, offset_groups, out_hw=out_hw,
        arrays_ok=_is_array)
    _require_device(op)
    io = _Io(x, offset, mask)
    dtype = np.dtype(x.dtype)
    cols = io.empty((N, C, kh, kw, oh, ow), dtype)
    if cols.size:
        x_d, off_d = io.flat(x), io.flat(offset)
        m_d = io.flat(mask) if mask is not None else io.dummy(dtype, 1)
        _launch(_deform_name("im2col", cols.size, x_d.size, off_d.size), N * G * kh * kw * oh * ow, x_d, off_d, m_d,
                mask is not None, N, C, H, W, kh, kw, sh, sw, ph, pw, dh, dw, G, oh, ow, cols.reshape(cols.size))
    return io.out(cols)


def deform_col2im(d_cols, offset, mask, x_shape, kernel_hw, stride, padding, dilation, offset_groups):
    """Adjoint of :func:`deform_im2col` w.r.t. x: ``d_x`` of ``x_shape``, dtype of d_cols."""
    op = "deform_col2im"
    N, C, H, W, kh, kw, sh, sw, ph, pw, dh, dw, oh, ow, G = _cpu.check_deform_args(
        op, tuple(x_shape), None, offset, mask, kernel_hw, stride, padding, dilation, offset_groups,
        d_cols=d_cols, arrays_ok=_is_array)
    _require_device(op)
    io = _Io(d_cols, offset, mask)
    dtype = np.dtype(d_cols.dtype)
    acc = io.zeros64((N, C, H, W))
    if acc.size and d_cols.size:
        dc_d, off_d = io.flat(d_cols), io.flat(offset)
        m_d = io.flat(mask) if mask is not None else io.dummy(dtype, 1)
        _launch(_deform_name("col2im", dc_d.size, acc.size, off_d.size), N * G * kh * kw * oh * ow, dc_d, off_d, m_d,
                mask is not None, N, C, H, W, kh, kw, sh, sw, ph, pw, dh, dw, G, oh, ow, acc.reshape(acc.size))
    return io.out(io.rounded(acc, dtype))


def deform_col2im_coord(d_cols, x, offset, mask, kernel_hw, stride, padding, dilation, offset_groups,
                        cols_out=None, border_grad="torchvision"):
    """Gradients w.r.t. offset and mask on the GPU: ``(d_offset, d_mask or None)``.

    ``cols_out`` (optional, shape of d_cols): receives :func:`deform_im2col`'s result,
    written by the same kernel (a NumPy array when the inputs are NumPy arrays, else a
    device array); ``border_grad`` ("torchvision" or "mmcv") as in numpy.py."""
    op = "deform_col2im_coord"
    border_mmcv = check_border_grad(op, border_grad) == "mmcv"
    N, C, H, W, kh, kw, sh, sw, ph, pw, dh, dw, oh, ow, G = _cpu.check_deform_args(
        op, None, x, offset, mask, kernel_hw, stride, padding, dilation, offset_groups, d_cols=d_cols,
        arrays_ok=_is_array)
    _require_device(op)
    io = _Io(d_cols, x, offset, mask)
    dtype = np.dtype(x.dtype)
    if cols_out is not None and tuple(cols_out.shape) != tuple(d_cols.shape):
        raise ValueError(f"{op}: cols_out must have shape {tuple(d_cols.shape)}, got {tuple(cols_out.shape)}")
    d_offset = io.empty(tuple(offset.shape), dtype)
    d_mask = None if mask is None else io.empty(tuple(mask.shape), dtype)
    cols_host = cols_out is not None and isinstance(cols_out, np.ndarray)
    cols_d = None
    if cols_out is not None and not cols_host and not _c_contiguous(cols_out):
        raise ValueError(f"{op}: cols_out must be C-contiguous (the kernel writes it as flat memory)")
    if cols_out is not None:
        cols_d = io.empty(tuple(d_cols.shape), dtype) if cols_host else cols_out
    if d_offset.size:
        dc_d, x_d, off_d = io.flat(d_cols), io.flat(x), io.flat(offset)
        m_d = io.flat(mask) if mask is not None else io.dummy(dtype, 1)
        dm_d = d_mask.reshape(d_mask.size) if d_mask is not None else io.dummy(dtype, 1)
        c_d = io.flat(cols_d) if cols_d is not None else io.dummy(dtype, 1)
        _launch(_deform_name("coord", dc_d.size, x_d.size, off_d.size), N * G * kh * kw * oh * ow, dc_d, x_d, off_d,
                m_d, mask is not None, N, C, H, W, kh, kw, sh, sw, ph, pw, dh, dw, G, oh, ow,
                d_offset.reshape(d_offset.size), dm_d, border_mmcv, cols_d is not None, c_d)
    if cols_host and cols_d.size:
        cols_out[...] = cols_d.copy_to_host() if hasattr(cols_d, "copy_to_host") else cols_d.get()
    return io.out(d_offset), io.out(d_mask)


def map_coordinates_clamped(x, coords):
    """The seed's clamped bilinear sampling on the GPU: x (B, H, W), coords (B, P, 2) -> (B, P)."""
    op = "map_coordinates_clamped"
    B, H, W, P = _cpu.check_map_args(op, x, coords, arrays_ok=_is_array)
    _require_device(op)
    io = _Io(x, coords)
    out = io.empty((B, P), np.dtype(x.dtype))
    if out.size:
        _launch("map", out.size, io.dev(x), io.dev(coords), out)
    return io.out(out)


def map_coordinates_clamped_backward(d_out, x, coords):
    """Backward of :func:`map_coordinates_clamped`: ``(d_x (B, H, W), d_coords (B, P, 2))``."""
    op = "map_coordinates_clamped_backward"
    B, H, W, P = _cpu.check_map_args(op, x, coords, d_out=d_out, arrays_ok=_is_array)
    _require_device(op)
    io = _Io(d_out, x, coords)
    dtype = np.dtype(x.dtype)
    acc = io.zeros64((B, H, W))
    d_coords = io.empty((B, P, 2), dtype)
    if d_coords.size:
        _launch("map_backward", B * P, io.dev(d_out), io.dev(x), io.dev(coords), acc, d_coords)
    return io.out(io.rounded(acc, dtype)), io.out(d_coords)
