"""The "cuda" sampling backend: numba.cuda kernels for the bilinear-sampling hot loop.

Same functions, signatures and numbers as ``numpy.py`` (the definition) and ``cpu.py``;
see ``numpy.py`` for the semantics. Every kernel is a grid-stride loop:

* ``deform_im2col``: one thread per sampling position (n, g, k, oy, ox): it computes the
  position, its corners and bilinear weights once, then samples the group's channels in
  turn; neighbouring threads differ in ox, so the reads of offset / mask and the writes
  of the columns are coalesced;
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
that cpu.py compiles for the CPU, here compiled as inlined device functions. A kernel
splits its flat thread index into (n, g, k, oy, ox) with unsigned 32-bit divisions when
the call has fewer than 2**32 sampling positions (every realistic one), else with 64-bit
ones; array indexing stays 64-bit.

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
def _unravel(t, ow, oh, K, G, narrow):
    # (n, g, k, oy, ox) of flat position t in the row-major order (N, G, K, oh, ow). With
    # narrow (set by the host when N G K oh ow < 2**32) the divisions are unsigned 32-bit
    # ones, which a GPU does several times faster than 64-bit ones; results are int64.
    if narrow:
        t32 = uint32(t)
        ow32 = uint32(ow)
        oh32 = uint32(oh)
        k32 = uint32(K)
        g32 = uint32(G)
        q1 = uint32(t32 // ow32)
        q2 = uint32(q1 // oh32)
        q3 = uint32(q2 // k32)
        q4 = uint32(q3 // g32)
        return (int64(q4), int64(q3 - q4 * g32), int64(q2 - q3 * k32), int64(q1 - q2 * oh32),
                int64(t32 - q1 * ow32))
    q1 = t // ow
    q2 = q1 // oh
    q3 = q2 // K
    q4 = q3 // G
    return q4, q3 - q4 * G, q2 - q3 * K, q1 - q2 * oh, t - q1 * ow


@_device
def _position(offset, n, g, k, oy, ox, K, kw, sh, sw, ph, pw, dh, dw, tp):
    # (ch, p_y, p_x): the offset channel of tap k of group g and the sample position
    i = k // kw
    j = k - i * kw
    ch = 2 * (g * K + k)
    py = tp(oy * sh - ph + i * dh) + offset[n, ch, oy, ox]
    px = tp(ox * sw - pw + j * dw) + offset[n, ch + 1, oy, ox]
    return ch, py, px


@_device
def _inside_corners(y0, x0, H, W):
    # which rows / columns of the cell at (y0, x0) lie in the image: (up, down, left, right)
    return y0 >= 0, y0 + 1 <= H - 1, x0 >= 0, x0 + 1 <= W - 1


@_device
def _corners(x, n, c, y0, x0, up, down, left, right, zero):
    # the four corner values of channel c, 0 for a corner outside the image (not read)
    v00 = x[n, c, y0, x0] if (up and left) else zero
    v01 = x[n, c, y0, x0 + 1] if (up and right) else zero
    v10 = x[n, c, y0 + 1, x0] if (down and left) else zero
    v11 = x[n, c, y0 + 1, x0 + 1] if (down and right) else zero
    return v00, v01, v10, v11


# ---------------------------------------------------------------------------------------
# kernels: deformable convolution


def _im2col_k(x, offset, mask, has_mask, kh, kw, sh, sw, ph, pw, dh, dw, G, narrow, cols):
    # One thread per sampling position (n, g, k, oy, ox): the position, its corners and
    # bilinear weights are computed once, then the group's channels are sampled in turn.
    # Neighbouring threads differ in ox, so every read of offset / mask and every write of
    # cols is coalesced. x (N, C, H, W); offset (N, 2*G*K, oh, ow); mask (N, G*K, oh, ow)
    # (read only if has_mask); cols (N, C, K, oh, ow)
    N = x.shape[0]
    C = x.shape[1]
    H = x.shape[2]
    W = x.shape[3]
    K = kh * kw
    oh = cols.shape[3]
    ow = cols.shape[4]
    cpg = C // G
    tp = x.dtype.type
    zero = tp(0)
    one = tp(1)
    total = N * G * K * oh * ow
    start = cuda.grid(1)
    step = cuda.gridsize(1)
    for t in range(start, total, step):
        n, g, k, oy, ox = _unravel(t, ow, oh, K, G, narrow)
        ch, py, px = _position(offset, n, g, k, oy, ox, K, kw, sh, sw, ph, pw, dh, dw, tp)
        m = mask[n, g * K + k, oy, ox] if has_mask else one
        if _in_support(py, px, H, W, False):  # false for NaN and inf
            y0, x0, ly, lx, hy, hx = _cell(py, px, tp)  # y0 in [-1, H-1], x0 in [-1, W-1]
            w00, w01, w10, w11 = _corner_weights(ly, lx, hy, hx)
            up, down, left, right = _inside_corners(y0, x0, H, W)
            for c in range(g * cpg, (g + 1) * cpg):
                v00, v01, v10, v11 = _corners(x, n, c, y0, x0, up, down, left, right, zero)
                v = _bilinear_value(w00, w01, w10, w11, v00, v01, v10, v11)
                cols[n, c, k, oy, ox] = m * v if has_mask else v
        else:
            for c in range(g * cpg, (g + 1) * cpg):
                cols[n, c, k, oy, ox] = m * zero if has_mask else zero


def _col2im_k(d_cols, offset, mask, has_mask, kh, kw, sh, sw, ph, pw, dh, dw, G, narrow, d_x):
    # One thread per sampling position (n, g, k, oy, ox), looping over the group's
    # channels: each adds w * (m * D) to the in-image corners with float64 atomics.
    # d_cols (N, C, K, oh, ow); d_x (N, C, H, W) float64, zero on entry
    N = d_cols.shape[0]
    C = d_cols.shape[1]
    H = d_x.shape[2]
    W = d_x.shape[3]
    K = kh * kw
    oh = d_cols.shape[3]
    ow = d_cols.shape[4]
    cpg = C // G
    tp = d_cols.dtype.type
    one = tp(1)
    total = N * G * K * oh * ow
    start = cuda.grid(1)
    step = cuda.gridsize(1)
    for t in range(start, total, step):
        n, g, k, oy, ox = _unravel(t, ow, oh, K, G, narrow)
        ch, py, px = _position(offset, n, g, k, oy, ox, K, kw, sh, sw, ph, pw, dh, dw, tp)
        if _in_support(py, px, H, W, False):
            m = mask[n, g * K + k, oy, ox] if has_mask else one
            y0, x0, ly, lx, hy, hx = _cell(py, px, tp)
            w00, w01, w10, w11 = _corner_weights(ly, lx, hy, hx)
            up, down, left, right = _inside_corners(y0, x0, H, W)
            for c in range(g * cpg, (g + 1) * cpg):
                d = d_cols[n, c, k, oy, ox]
                if has_mask:
                    d = m * d
                if up and left:
                    cuda.atomic.add(d_x, (n, c, y0, x0), float64(w00 * d))
                if up and right:
                    cuda.atomic.add(d_x, (n, c, y0, x0 + 1), float64(w01 * d))
                if down and left:
                    cuda.atomic.add(d_x, (n, c, y0 + 1, x0), float64(w10 * d))
                if down and right:
                    cuda.atomic.add(d_x, (n, c, y0 + 1, x0 + 1), float64(w11 * d))


def _coord_k(d_cols, x, offset, mask, has_mask, kh, kw, sh, sw, ph, pw, dh, dw, G, narrow, d_offset, d_mask,
            border_mmcv, write_cols, cols):
    # One thread per position (n, g, k, oy, ox); sums over the group's channels in order.
    # border_mmcv: the offset gradient's support is (-1, H) x (-1, W) (mmcv), else
    # [-1, H) x [-1, W) (torchvision); they differ only at p exactly -1. write_cols: also
    # write the forward's columns (N, C, K, oh, ow) into cols, the same numbers as
    # _im2col_k (the backward needs them for the weight gradient).
    N = x.shape[0]
    C = x.shape[1]
    H = x.shape[2]
    W = x.shape[3]
    K = kh * kw
    oh = d_cols.shape[3]
    ow = d_cols.shape[4]
    cpg = C // G
    tp = x.dtype.type
    zero = tp(0)
    one = tp(1)
    total = N * G * K * oh * ow
    start = cuda.grid(1)
    step = cuda.gridsize(1)
    for t in range(start, total, step):
        n, g, k, oy, ox = _unravel(t, ow, oh, K, G, narrow)
        ch, py, px = _position(offset, n, g, k, oy, ox, K, kw, sh, sw, ph, pw, dh, dw, tp)
        m = mask[n, g * K + k, oy, ox] if has_mask else one
        acc_y = zero
        acc_x = zero
        acc_m = zero
        sample = _in_support(py, px, H, W, False)
        if _in_support(py, px, H, W, not border_mmcv):  # the gradient's support; false for NaN and inf
            y0, x0, ly, lx, hy, hx = _cell(py, px, tp)
            w00, w01, w10, w11 = _corner_weights(ly, lx, hy, hx)
            up, down, left, right = _inside_corners(y0, x0, H, W)
            for c in range(g * cpg, (g + 1) * cpg):
                v00, v01, v10, v11 = _corners(x, n, c, y0, x0, up, down, left, right, zero)
                d = d_cols[n, c, k, oy, ox]
                gy, gx = _position_grads(ly, lx, hy, hx, v00, v01, v10, v11)
                v = zero
                if sample:
                    v = _bilinear_value(w00, w01, w10, w11, v00, v01, v10, v11)
                if has_mask:
                    acc_y += (m * gy) * d
                    acc_x += (m * gx) * d
                    if sample:
                        acc_m += v * d
                else:
                    acc_y += gy * d
                    acc_x += gx * d
                if write_cols:
                    cols[n, c, k, oy, ox] = m * v if has_mask else v
        elif write_cols:
            for c in range(g * cpg, (g + 1) * cpg):
                cols[n, c, k, oy, ox] = m * zero if has_mask else zero
        d_offset[n, ch, oy, ox] = acc_y
        d_offset[n, ch + 1, oy, ox] = acc_x
        if has_mask:
            d_mask[n, g * K + k, oy, ox] = acc_m


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
        i0, i1, j0, j1, d_lt, d_rt, d_lb, d_rb, d_y, d_xq = _clamped_point_backward(
            x, b, coords[b, p, 0], coords[b, p, 1], d_out[b, p], hmax, wmax, tp)
        cuda.atomic.add(d_x, (b, i0, j0), float64(d_lt))
        cuda.atomic.add(d_x, (b, i1, j0), float64(d_rt))
        cuda.atomic.add(d_x, (b, i0, j1), float64(d_lb))
        cuda.atomic.add(d_x, (b, i1, j1), float64(d_rb))
        d_coords[b, p, 0] = d_y
        d_coords[b, p, 1] = d_xq


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
    "im2col": _im2col_k,
    "col2im": _col2im_k,
    "coord": _coord_k,
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
    launch with C-contiguous arrays."""
    ft = {np.dtype(np.float32): float32, np.dtype(np.float64): float64}[np.dtype(dtype)]
    a4, a5, a3, a2 = ft[:, :, :, ::1], ft[:, :, :, :, ::1], ft[:, :, ::1], ft[:, ::1]
    acc4, acc3 = float64[:, :, :, ::1], float64[:, :, ::1]
    geo = (int64,) * 9
    return {
        "im2col": (_im2col_k, (a4, a4, a4, boolean, *geo, boolean, a5)),
        "col2im": (_col2im_k, (a5, a4, a4, boolean, *geo, boolean, acc4)),
        "coord": (_coord_k, (a5, a4, a4, a4, boolean, *geo, boolean, a4, a4, boolean, boolean, a5)),
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

NARROW_LIMIT = 2**32  # flat sampling positions below this are unravelled in 32-bit arithmetic


def _narrow(total):
    """Whether the deformable kernels may unravel their flat positions (all < ``total``)
    with unsigned 32-bit divisions; else 64-bit ones (the fallback for huge calls)."""
    return total < NARROW_LIMIT


def _is_device_array(a):
    if hasattr(cuda, "is_cuda_array"):
        return cuda.is_cuda_array(a)  # anything with __cuda_array_interface__
    return cuda.devicearray.is_cuda_ndarray(a)  # Numba's CUDA simulator


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
        x_d, off_d = io.dev(x), io.dev(offset)
        m_d = io.dev(mask) if mask is not None else io.dummy(dtype)
        total = N * G * kh * kw * oh * ow
        _launch("im2col", total, x_d, off_d, m_d, mask is not None, kh, kw, sh, sw, ph, pw, dh, dw, G,
                _narrow(total), cols.reshape(N, C, kh * kw, oh, ow))
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
        dc_d, off_d = io.dev(d_cols), io.dev(offset)
        m_d = io.dev(mask) if mask is not None else io.dummy(dtype)
        total = N * G * kh * kw * oh * ow
        _launch("col2im", total, dc_d.reshape(N, C, kh * kw, oh, ow), off_d, m_d, mask is not None, kh, kw, sh, sw,
                ph, pw, dh, dw, G, _narrow(total), acc)
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
    if cols_out is not None:
        cols_d = io.empty(tuple(d_cols.shape), dtype) if cols_host else cols_out
    if d_offset.size:
        dc_d, x_d, off_d = io.dev(d_cols), io.dev(x), io.dev(offset)
        m_d = io.dev(mask) if mask is not None else io.dummy(dtype)
        dm_d = d_mask if d_mask is not None else io.dummy(dtype)
        c_d = cols_d.reshape(N, C, kh * kw, oh, ow) if cols_d is not None else io.dummy(dtype, 5)
        total = N * G * kh * kw * oh * ow
        _launch("coord", total, dc_d.reshape(N, C, kh * kw, oh, ow), x_d, off_d, m_d, mask is not None, kh, kw, sh,
                sw, ph, pw, dh, dw, G, _narrow(total), d_offset, dm_d, border_mmcv, cols_d is not None, c_d)
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
