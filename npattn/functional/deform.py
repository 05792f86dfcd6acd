"""Deformable convolution (DCNv1 / DCNv2) and the seed's deformable sampling.

``deform_conv2d`` has the argument order, layouts and numbers of
``torchvision.ops.deform_conv2d`` (also ONNX DeformConv and mmcv's deform convs);
``batch_map_offsets`` is the seed's ``th_batch_map_offsets`` (oeway/pytorch-deform-conv).
The bilinear sampling itself lives in :mod:`npattn.sampling`, whose NumPy backend
(``npattn/sampling/numpy.py``) is the readable definition. The derivation of deformable
convolution, forward and backward line by line, is in one place: the module docstring of
:mod:`npattn.blocks.deform` (``npattn explain DeformConv2d`` walks it on this op).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import sampling
from .._checks import conv_out_size, float_array, pair, positive_int, same_dtype
from .._xp import cupy_or_reason, device_namespace, is_cuda_array, like_forward

__all__ = [
    "DEFAULT_COLUMN_BUDGET_BYTES",
    "batch_map_offsets",
    "batch_map_offsets_backward",
    "batch_map_offsets_forward",
    "deform_conv2d",
    "deform_conv2d_backward",
    "deform_conv2d_forward",
]

DEFAULT_COLUMN_BUDGET_BYTES = 16 * 2**20  # 16 MiB of deformable columns per chunk of images
DEVICE_COLUMN_BUDGET_BYTES = 256 * 2**20  # on the GPU (column_budget_bytes=None): 256 MiB per chunk


@dataclass(frozen=True)
class DeformConv2dCache:
    input: np.ndarray  # (N, C_in, H, W), C-contiguous
    offset: np.ndarray  # (N, 2 * G_off * kh * kw, out_h, out_w), C-contiguous
    mask: np.ndarray  # (N, G_off * kh * kw, out_h, out_w), C-contiguous, or None
    weight: np.ndarray  # (C_out, C_in / G_w, kh, kw)
    has_bias: bool
    stride: tuple  # (s_h, s_w)
    padding: tuple  # (pad_h, pad_w)
    dilation: tuple  # (d_h, d_w)
    out_hw: tuple  # (out_h, out_w)
    weight_groups: int  # G_w = C_in / weight.shape[1]
    offset_groups: int  # G_off = offset.shape[1] / (2 kh kw)
    backend: str  # sampling backend name ("numpy", "numba", "cuda")
    images_per_chunk: int  # images per im2col chunk (column budget)
    border_grad: str = "torchvision"  # offset-gradient convention at p = -1: "torchvision" or "mmcv"
    on_device: bool = False  # the arrays above are CuPy arrays (the forward ran on the GPU)
    to_host: bool = False  # the caller gave NumPy arrays: results go back to the host


def _images_per_chunk(op, column_budget_bytes, c_in, k_taps, out_hw, itemsize):
    if not isinstance(column_budget_bytes, (int, np.integer)) or isinstance(column_budget_bytes, bool):
        raise TypeError(f"{op}: column_budget_bytes must be an int, got {column_budget_bytes!r}")
    if column_budget_bytes < 1:
        raise ValueError(f"{op}: column_budget_bytes must be >= 1, got {column_budget_bytes}")
    per_image = c_in * k_taps * out_hw[0] * out_hw[1] * itemsize  # bytes of one image's columns
    return max(1, int(column_budget_bytes) // max(per_image, 1))


def _placement(op, backend, arrays):
    """Where a deformable op runs: ``(xp, backend_name, upload, arrays)``.

    * CUDA arrays in (CuPy, PyTorch CUDA, Numba device arrays: ``__cuda_array_interface__``):
      viewed as CuPy arrays (no copy), the "cuda" backend (``backend=None`` means it; any
      other raises), results stay on the device as CuPy arrays;
    * NumPy arrays with the "cuda" backend and CuPy usable: ``upload`` is True, the caller
      uploads once after the checks and downloads the results once;
    * NumPy arrays otherwise: NumPy, the chosen backend (without CuPy the "cuda" kernels
      copy their arguments to and from the device at every call and the products run in
      NumPy on the host).
    """
    if any(is_cuda_array(a) for a in arrays.values()):
        if backend is not None and backend != "cuda":
            raise ValueError(f"{op}: CUDA arrays run on backend='cuda'; got backend={backend!r}")
        xp, arrays = device_namespace(op, arrays)
        return xp, "cuda", False, arrays  # the caller's get_backend("cuda") says why if it cannot run
    name = sampling.resolve_backend(backend)
    if name == "cuda":
        cupy, _ = cupy_or_reason()
        if cupy is not None:
            return cupy, name, True, arrays
    return np, name, False, arrays


def _grad_placement(op, grad_out, cache, ndim, layout):
    """``(xp, grad_out)`` for a backward: on the device when the forward ran there (a
    NumPy grad_out is uploaded when the forward took NumPy arrays, refused when it took
    CUDA arrays), checked as a float array of ``ndim`` dimensions."""
    xp = np
    if cache.on_device:
        xp, _ = cupy_or_reason()
        if cache.to_host:  # the forward took NumPy arrays: so does the backward
            grad_out = xp.asarray(float_array(op, "grad_out", grad_out, ndim, layout))
        else:
            grad_out = like_forward(op, "grad_out", grad_out, xp)
    return xp, float_array(op, "grad_out", grad_out, ndim, layout, xp=xp)


def _to_host(a):
    return None if a is None else a.get()


def deform_conv2d_forward(
    input,
    offset,
    weight,
    bias=None,
    stride=1,
    padding=0,
    dilation=1,
    mask=None,
    *,
    backend=None,
    column_budget_bytes=None,
    border_grad="torchvision",
    groups=None,
    offset_groups=None,
):
    """Deformable 2-D convolution, exactly as ``torchvision.ops.deform_conv2d``.

    Parameters
    ----------
    input : ndarray (N, C_in, H, W), float32 or float64
    offset : ndarray (N, 2 * G_off * kh * kw, out_h, out_w), same dtype
        For offset group g and tap k = i * kw + j, channel ``2 (g K + k)`` holds the
        row offset delta_y and channel ``2 (g K + k) + 1`` the column offset delta_x (K = kh kw).
        The number of offset groups is ``G_off = offset.shape[1] // (2 kh kw)``; input
        channel c belongs to group ``c // (C_in / G_off)``.
    weight : ndarray (C_out, C_in / G_w, kh, kw), same dtype; the number of weight groups
        is ``G_w = C_in // weight.shape[1]``
    bias : ndarray (C_out,) or None
    stride, padding, dilation : int or pair (h, w)
    mask : ndarray (N, G_off * kh * kw, out_h, out_w) or None
        DCNv2 modulation, a raw multiplier of every sample (apply any sigmoid outside).
    backend : "numpy", "numba", "cuda" or None (see :mod:`npattn.sampling`)
    column_budget_bytes : int or None
        Images are processed in chunks whose deformable columns (C_in * kh * kw *
        out_h * out_w values per image) stay under this many bytes (at least one image
        per chunk), like torchvision's ``n_parallel_imgs``. The result does not depend
        on it. None: 16 MiB on the CPU (``DEFAULT_COLUMN_BUDGET_BYTES``), 256 MiB on the
        GPU (``DEVICE_COLUMN_BUDGET_BYTES``). The NumPy backend's temporaries are a few
        times this buffer (measured: about 4x in the forward and 10x in the backward,
        float32). The numba backend's forward makes no column array at all: each of its
        tasks samples the columns of one tile of output pixels next to that tile's
        product (:func:`npattn.sampling.cpu.deform_conv_forward`, the same arithmetic); its
        backward uses the budget.

    Arrays may be NumPy arrays or, all of them, CUDA arrays (CuPy arrays, PyTorch CUDA
    tensors, Numba device arrays: anything with ``__cuda_array_interface__``; needs CuPy).
    CUDA arrays run on the "cuda" backend and never leave the device: the sampling in
    npattn's numba.cuda kernels, the products in CuPy (cuBLAS); the results are CuPy
    arrays (``torch.from_dlpack(out)`` gives a tensor without a copy). NumPy arrays with
    ``backend="cuda"`` are uploaded once and the results downloaded once when CuPy is
    installed.
    border_grad : "torchvision" (default) or "mmcv"
        The offset gradient's convention at the image border, used by the backward
        (stored in the cache); the forward does not depend on it. See Notes.
    groups, offset_groups : int or None
        The weight groups and offset groups as stated by the caller (the fixtures'
        manifest states both, as the frameworks that take them as arguments need).
        None (default): inferred from the shapes as above. An int must equal the number
        the shapes give; a different one raises ValueError.

    Returns
    -------
    out : ndarray (N, C_out, out_h, out_w), dtype of input, with
        ``out_h = (H + 2 pad_h - d_h (kh - 1) - 1) // s_h + 1`` (likewise out_w)
    cache : DeformConv2dCache

    Notes
    -----
    The derivation is the module docstring of :mod:`npattn.blocks.deform`. The op: with
    the positions ``py = oy s_h - pad_h + i d_h + delta_y`` and ``px = ox s_w - pad_w +
    j d_w + delta_x``, the columns ``cols = m * bilinear(input, py, px)`` (0 outside
    ``(-1, H) x (-1, W)``, corners outside the image contribute 0) and, per weight group
    g, ``out_g = W_g X_g + b`` with ``X_g`` the columns as a (C_in/G_w kh kw, out_h out_w)
    matrix. The backward (the three products, col2im as the adjoint of im2col, the offset
    and mask gradients) is derived there, line by line.

    Border convention (``border_grad``, derived there too). At exactly ``py = -1`` or
    ``px = -1`` the sample is 0 whatever the offset on the left, and frameworks disagree
    on ``d_offset``: ``"torchvision"`` (torchvision, ONNX's reference) takes the right-hand
    derivative, ``"mmcv"`` (mmcv's DCNv1 and DCNv2 kernels) 0. Everywhere else the two are
    identical (pytorch/vision #6885). At integer positions (zero offsets too) ``d_offset``
    is likewise one-sided.

    Non-finite offsets: a position with a NaN or infinite component samples 0 and gets
    zero input, offset and mask gradients; no memory outside the input is ever read.

    A batch of 0 images gives an empty output and empty gradients (``d_weight`` 0).
    """
    op = "deform_conv2d"
    xp, backend_name, upload, a = _placement(
        op, backend, {"input": input, "offset": offset, "weight": weight, "bias": bias, "mask": mask}
    )
    host_xp = np if upload else xp  # the module of the arrays as given, for the checks
    input = float_array(op, "input", a["input"], 4, "(N, C_in, H, W)", xp=host_xp)
    offset = float_array(op, "offset", a["offset"], 4, "(N, 2 * offset_groups * kh * kw, out_h, out_w)", xp=host_xp)
    weight = float_array(op, "weight", a["weight"], 4, "(C_out, C_in / groups, kh, kw)", xp=host_xp)
    bias, mask = a["bias"], a["mask"]
    if bias is not None:
        bias = float_array(op, "bias", bias, 1, "(C_out,)", xp=host_xp)
    if mask is not None:
        mask = float_array(op, "mask", mask, 4, "(N, offset_groups * kh * kw, out_h, out_w)", xp=host_xp)
    same_dtype(op, "input", input, offset=offset, weight=weight, bias=bias, mask=mask)
    stride = pair(op, "stride", stride, 1)
    padding = pair(op, "padding", padding, 0)
    dilation = pair(op, "dilation", dilation, 1)

    n, c_in, height, width = input.shape
    c_out, c_per_group, weight_h, weight_w = weight.shape
    k_taps = weight_h * weight_w
    if k_taps == 0 or c_per_group == 0 or c_out == 0:
        raise ValueError(f"{op}: weight must have no zero-sized dimension, got shape {tuple(weight.shape)}")
    if c_in == 0 or c_in % c_per_group:  # 0 channels would make groups = 0
        raise ValueError(
            f"{op}: the input channels must be a positive multiple of weight.shape[1] (C_in / groups); "
            f"got input with {c_in} channels and weight shape {tuple(weight.shape)}"
        )
    weight_groups = c_in // c_per_group
    if c_out % weight_groups:
        raise ValueError(
            f"{op}: the output channels must be divisible by groups = {weight_groups} "
            f"(C_in {c_in} / weight.shape[1] {c_per_group}); got weight shape {tuple(weight.shape)}"
        )
    if bias is not None and bias.shape != (c_out,):
        raise ValueError(f"{op}: bias must have shape ({c_out},), got {tuple(bias.shape)}")
    out_h = conv_out_size(op, height, weight_h, stride[0], padding[0], dilation[0], "height")
    out_w = conv_out_size(op, width, weight_w, stride[1], padding[1], dilation[1], "width")

    n_offset_groups = offset.shape[1] // (2 * k_taps)
    if n_offset_groups == 0 or offset.shape[1] != 2 * k_taps * n_offset_groups:
        raise ValueError(
            f"{op}: offset must have 2 * offset_groups * kh * kw channels, a positive multiple of "
            f"2 * {weight_h} * {weight_w} = {2 * k_taps}; got offset shape {tuple(offset.shape)}"
        )
    for name, stated, inferred in (("groups", groups, weight_groups), ("offset_groups", offset_groups, n_offset_groups)):
        if stated is not None and positive_int(op, name, stated) != inferred:
            raise ValueError(
                f"{op}: {name}={stated} disagrees with the shapes, which give {name} = {inferred} "
                f"(input {tuple(input.shape)}, offset {tuple(offset.shape)}, weight {tuple(weight.shape)})"
            )
    offset_groups = n_offset_groups
    if c_in % offset_groups:
        raise ValueError(
            f"{op}: the input channels must be divisible by offset_groups = {offset_groups} "
            f"(offset channels {offset.shape[1]} / (2 * {weight_h} * {weight_w})); got input with {c_in} channels"
        )
    expected = (n, 2 * offset_groups * k_taps, out_h, out_w)
    if offset.shape != expected:
        raise ValueError(
            f"{op}: offset must have shape {expected} (batch, 2 * offset_groups * kh * kw, out_h, out_w), "
            f"got {tuple(offset.shape)}"
        )
    if mask is not None:
        expected = (n, offset_groups * k_taps, out_h, out_w)
        if mask.shape != expected:
            raise ValueError(
                f"{op}: mask must have shape {expected} (batch, offset_groups * kh * kw, out_h, out_w), "
                f"got {tuple(mask.shape)}"
            )
    border_grad = sampling.check_border_grad(op, border_grad)
    be = sampling.get_backend(backend_name)
    if column_budget_bytes is None:
        column_budget_bytes = DEVICE_COLUMN_BUDGET_BYTES if xp is not np else DEFAULT_COLUMN_BUDGET_BYTES
    chunk = _images_per_chunk(op, column_budget_bytes, c_in, k_taps, (out_h, out_w), input.dtype.itemsize)

    if upload:  # NumPy arrays on the GPU: one copy to the device now, one back at the end
        input, offset, weight = (xp.asarray(v) for v in (input, offset, weight))
        bias = None if bias is None else xp.asarray(bias)
        mask = None if mask is None else xp.asarray(mask)
    input = xp.ascontiguousarray(input)  # the kernels read flat memory; no copy when already contiguous
    offset = xp.ascontiguousarray(offset)
    mask = None if mask is None else xp.ascontiguousarray(mask)
    geometry = ((weight_h, weight_w), stride, padding, dilation)
    w_g = xp.ascontiguousarray(weight.reshape(weight_groups, c_out // weight_groups, c_per_group * k_taps))  # (G_w, C_out/G_w, Ck)
    y = xp.empty((n, c_out, out_h, out_w), dtype=input.dtype)
    prod = sampling.products(backend_name, xp)  # numba: tiles on the kernels' threads (npattn.sampling.products)
    fused = getattr(be, "deform_conv_forward", None)  # numba: the columns of each tile sampled next to its product
    with sampling.blas_context(backend_name):  # kernels and BLAS share the cores: see blas_context
        if fused is not None:  # the arithmetic of the chunks below, without a column array
            fused(input, offset, mask, w_g, *geometry, offset_groups,
                  y.reshape(n, weight_groups, c_out // weight_groups, out_h * out_w))  # (N, G_w, C_out/G_w, L)
        for s in range(0, n if fused is None else 0, chunk):
            sl = slice(s, min(s + chunk, n))
            m = len(range(*sl.indices(n)))
            cols = be.deform_im2col(
                input[sl], offset[sl], None if mask is None else mask[sl], *geometry, (out_h, out_w), offset_groups
            )  # (m, C_in, kh, kw, out_h, out_w)
            cols = xp.ascontiguousarray(cols).reshape(m, weight_groups, c_per_group * k_taps, out_h * out_w)  # (m, G_w, Ck, L)
            prod.forward(w_g, cols, y[sl].reshape(m, weight_groups, c_out // weight_groups, out_h * out_w))  # (m, G_w, C_out/G_w, L)
    if bias is not None:
        y += bias[None, :, None, None]
    cache = DeformConv2dCache(
        input, offset, mask, weight, bias is not None, stride, padding, dilation, (out_h, out_w),
        weight_groups, offset_groups, backend_name, chunk, border_grad, xp is not np, upload,
    )
    return (_to_host(y) if upload else y), cache


def deform_conv2d_backward(grad_out, cache: DeformConv2dCache):
    """Gradients of :func:`deform_conv2d_forward` (its Notes give the derivation), with
    the forward's ``border_grad`` convention (``cache.border_grad``).

    Returns
    -------
    dict with ``input``, ``offset``, ``weight``, plus ``bias`` and ``mask`` when they were
    given; each has the shape and dtype of its argument.
    """
    op = "deform_conv2d_backward"
    x, offset, mask, weight = cache.input, cache.offset, cache.mask, cache.weight
    n, c_in, height, width = x.shape
    c_out, c_per_group, weight_h, weight_w = weight.shape
    out_h, out_w = cache.out_hw
    k_taps = weight_h * weight_w
    g_w = cache.weight_groups
    xp, grad_out = _grad_placement(op, grad_out, cache, 4, "(N, C_out, out_h, out_w)")
    if grad_out.shape != (n, c_out, out_h, out_w):
        raise ValueError(f"{op}: grad_out must have shape {(n, c_out, out_h, out_w)}, got {tuple(grad_out.shape)}")
    same_dtype(op, "the forward's input", x, grad_out=grad_out)
    be = sampling.get_backend(cache.backend)
    geometry = ((weight_h, weight_w), cache.stride, cache.padding, cache.dilation)
    grad_out = xp.ascontiguousarray(grad_out)
    w_g = xp.ascontiguousarray(weight.reshape(g_w, c_out // g_w, c_per_group * k_taps))  # (G_w, C_out/G_w, Ck)

    dx = xp.empty_like(x)  # (N, C_in, H, W)
    doffset = xp.empty_like(offset)  # (N, 2 G_off K, out_h, out_w)
    dmask = None if mask is None else xp.empty_like(mask)  # (N, G_off K, out_h, out_w)
    d_w_g = xp.zeros_like(w_g)  # (G_w, C_out/G_w, Ck)
    prod = sampling.products(cache.backend, xp)  # numba: tiles on the kernels' threads (npattn.sampling.products)
    with sampling.blas_context(cache.backend):  # kernels and BLAS share the cores: see blas_context
        for s in range(0, n, cache.images_per_chunk):
            sl = slice(s, min(s + cache.images_per_chunk, n))
            m = len(range(*sl.indices(n)))
            mask_sl = None if mask is None else mask[sl]
            dy_g = grad_out[sl].reshape(m, g_w, c_out // g_w, out_h * out_w)  # (m, G_w, C_out/G_w, L)
            d_cols = xp.empty((m, g_w, c_per_group * k_taps, out_h * out_w), dtype=x.dtype)
            prod.d_cols(w_g, dy_g, d_cols)  # (m, G_w, Ck, L)
            d_cols = d_cols.reshape(m, c_in, weight_h, weight_w, out_h, out_w)  # (m, C_in, kh, kw, out_h, out_w)
            dx[sl] = be.deform_col2im(d_cols, offset[sl], mask_sl, (m, c_in, height, width), *geometry, cache.offset_groups)
            # the offset/mask gradient also recomputes the forward's columns (for d_weight)
            cols = xp.empty((m, c_in, weight_h, weight_w, out_h, out_w), dtype=x.dtype)
            d_off, d_m = be.deform_col2im_coord(
                d_cols, x[sl], offset[sl], mask_sl, *geometry, cache.offset_groups, cols_out=cols,
                border_grad=cache.border_grad,
            )
            doffset[sl] = d_off  # (m, 2 G_off K, out_h, out_w)
            if dmask is not None:
                dmask[sl] = d_m  # (m, G_off K, out_h, out_w)
            cols = cols.reshape(m, g_w, c_per_group * k_taps, out_h * out_w)  # (m, G_w, Ck, L)
            prod.d_weight(dy_g, cols, d_w_g)  # d_w_g += sum over the chunk's images: (G_w, C_out/G_w, Ck)

    dWd = d_w_g.reshape(weight.shape)  # (C_out, C_in / G_w, kh, kw)
    grads = {"input": dx, "offset": doffset, "weight": dWd}
    if cache.has_bias:
        db = grad_out.sum(axis=(0, 2, 3))  # (C_out,)
        grads["bias"] = db
    if dmask is not None:
        grads["mask"] = dmask
    if cache.to_host:
        grads = {k: _to_host(v) for k, v in grads.items()}
    return grads


def deform_conv2d(
    input,
    offset,
    weight,
    bias=None,
    stride=1,
    padding=0,
    dilation=1,
    mask=None,
    *,
    backend=None,
    column_budget_bytes=None,
    border_grad="torchvision",
):
    """Deformable convolution, forward only; see :func:`deform_conv2d_forward`
    (``border_grad`` is checked and, the forward not depending on it, otherwise unused)."""
    out, _ = deform_conv2d_forward(
        input, offset, weight, bias, stride, padding, dilation, mask,
        backend=backend, column_budget_bytes=column_budget_bytes, border_grad=border_grad,
    )
    return out


# ---- the seed's deformable sampling -------------------------------------------------


@dataclass(frozen=True)
class BatchMapOffsetsCache:
    input: np.ndarray  # (B, H, W), C-contiguous
    coords: np.ndarray  # (B, H*W, 2): grid + offsets, (row, col), before the clamp
    backend: str  # sampling backend name
    on_device: bool = False  # the arrays above are CuPy arrays (the forward ran on the GPU)
    to_host: bool = False  # the caller gave NumPy arrays: results go back to the host


def batch_map_offsets_forward(input, offsets, *, backend=None):
    """The seed's ``th_batch_map_offsets``: sample every map at its own grid plus offset.

    Parameters
    ----------
    input : ndarray (B, H, W), float32 or float64
    offsets : ndarray (B, H, W, 2), same dtype; ``offsets[b, i, j] = (d_row, d_col)``
    backend : "numpy", "numba", "cuda" or None (see :mod:`npattn.sampling`)

    Returns
    -------
    out : ndarray (B, H, W), dtype of input. (The seed returns the same numbers as
        (B, H*W); ``out.reshape(B, -1)`` gives that layout.)
    cache : BatchMapOffsetsCache

    Notes
    -----
    Forward, per map b and pixel (i, j), with ``(row, col) = (i, j) + offsets[b, i, j]``::

        r = clamp(row, 0, H - 1)            q = clamp(col, 0, W - 1)
        y0, y1 = floor(r), ceil(r)          x0, x1 = floor(q), ceil(q)
        ly = r - y0                         lx = q - x0
        vx0 = ly (x[y1, x0] - x[y0, x0]) + x[y0, x0]      (column x0)
        vx1 = ly (x[y1, x1] - x[y0, x1]) + x[y0, x1]      (column x1)
        out = lx (vx1 - vx0) + vx0

    i.e. bilinear interpolation with the border replicated (each axis clamped on its
    own, so non-square maps work as in the upstream repository).

    Backward (derived in :mod:`npattn.blocks.deform`, section ConvOffset2D)::

        dvx0 = dout (1 - lx),   dvx1 = dout lx
        dinput[corner] += dvx0 / dvx1 times (1 - ly) or ly     (scatter to 4 corners)
        dly = dvx0 (x[y1, x0] - x[y0, x0]) + dvx1 (x[y1, x1] - x[y0, x1])
        dlx = dout (vx1 - vx0)
        doffsets[b, i, j] = (dly [0 <= row <= H-1], dlx [0 <= col <= W-1])

    The corners are floor and *ceil*: at an integer coordinate they coincide, so the
    coordinate gradient is 0 there (the seed's behaviour). Outside the clamp range the
    gradient is 0; at the bounds themselves it passes (``torch.clamp``). A NaN offset
    samples 0 and gets zero gradients; +-inf clamp to the border.
    """
    op = "batch_map_offsets"
    xp, backend_name, upload, a = _placement(op, backend, {"input": input, "offsets": offsets})
    host_xp = np if upload else xp
    input = float_array(op, "input", a["input"], 3, "(B, H, W)", xp=host_xp)
    offsets = float_array(op, "offsets", a["offsets"], 4, "(B, H, W, 2)", xp=host_xp)
    same_dtype(op, "input", input, offsets=offsets)
    b, height, width = input.shape
    if offsets.shape != (b, height, width, 2):
        raise ValueError(f"{op}: offsets must have shape {(b, height, width, 2)} (B, H, W, 2), got {tuple(offsets.shape)}")
    be = sampling.get_backend(backend_name)
    if upload:  # NumPy arrays on the GPU: one copy to the device now, one back at the end
        input, offsets = xp.asarray(input), xp.asarray(offsets)
    rows, cols = xp.meshgrid(xp.arange(height), xp.arange(width), indexing="ij")
    grid = xp.stack([rows, cols], axis=-1).reshape(height * width, 2).astype(input.dtype)  # (H*W, 2) (row, col)
    coords = offsets.reshape(b, height * width, 2) + grid  # (B, H*W, 2)
    input = xp.ascontiguousarray(input)
    out = be.map_coordinates_clamped(input, coords).reshape(b, height, width)  # (B, H, W)
    cache = BatchMapOffsetsCache(input, coords, backend_name, xp is not np, upload)
    return (_to_host(out) if upload else out), cache


def batch_map_offsets_backward(grad_out, cache: BatchMapOffsetsCache):
    """Gradients of :func:`batch_map_offsets_forward`: dict with ``input`` and ``offsets``."""
    op = "batch_map_offsets_backward"
    b, height, width = cache.input.shape
    xp, grad_out = _grad_placement(op, grad_out, cache, 3, "(B, H, W)")
    if grad_out.shape != (b, height, width):
        raise ValueError(f"{op}: grad_out must have shape {(b, height, width)}, got {tuple(grad_out.shape)}")
    same_dtype(op, "the forward's input", cache.input, grad_out=grad_out)
    be = sampling.get_backend(cache.backend)
    d_out = xp.ascontiguousarray(grad_out).reshape(b, height * width)  # (B, H*W)
    d_input, d_coords = be.map_coordinates_clamped_backward(d_out, cache.input, cache.coords)
    grads = {
        "input": d_input,  # (B, H, W)
        "offsets": d_coords.reshape(b, height, width, 2),  # (B, H, W, 2); d coords / d offsets = 1
    }
    if cache.to_host:
        grads = {k: _to_host(v) for k, v in grads.items()}
    return grads


def batch_map_offsets(input, offsets, *, backend=None):
    """The seed's ``th_batch_map_offsets``, forward only; see :func:`batch_map_offsets_forward`."""
    out, _ = batch_map_offsets_forward(input, offsets, backend=backend)
    return out
