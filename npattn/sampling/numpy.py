"""Bilinear sampling in vectorised NumPy: the definition the other backends are checked against.

Two kinds of sampling live here. Their derivation, forward and backward line by line,
is the module docstring of :mod:`npattn.blocks.deform` (``npattn explain DeformConv2d``
walks it on the functions below); the notation is the same: positions (py, px), offset
components (delta_y, delta_x), corners (y0, x0), (y0, x1), (y1, x0), (y1, x1) with
values v00, v01, v10, v11 and weights w00, w01, w10, w11, and a ``d`` prefix only on
gradients.

**Deformable convolution** (torchvision.ops.deform_conv2d, ONNX DeformConv, mmcv). For
image ``n``, input channel ``c`` in offset group ``g = c // (C // G)``, kernel tap
``(i, j)`` with ``k = i * kw + j`` (``K = kh * kw``) and output pixel ``(oy, ox)``::

    delta_y = offset[n, 2 (g K + k), oy, ox]      delta_x = offset[n, 2 (g K + k) + 1, oy, ox]
    m  = mask[n, g K + k, oy, ox]                 (1 when there is no mask)
    py = oy s_h - pad_h + i d_h + delta_y         px = ox s_w - pad_w + j d_w + delta_x
    xs = bilinear(x[n, c], py, px)                cols[n, c, i, j, oy, ox] = m * xs

(:func:`sample_positions`, :func:`bilinear_sample`, :func:`deform_im2col`). The base
position ``oy s_h - pad_h + i d_h`` is an integer, converted to the dtype of ``x``
before the offset is added (torchvision's order of operations).

``bilinear(img, py, px)`` is torchvision's rule: 0 when ``py <= -1``, ``py >= H``,
``px <= -1`` or ``px >= W``; otherwise, with ``y0 = floor(py)``, ``x0 = floor(px)``,
``y1 = y0 + 1``, ``x1 = x0 + 1``, ``ly = py - y0``, ``lx = px - x0``, ``hy = 1 - ly``,
``hx = 1 - lx``::

    xs = w00 v00 + w01 v01 + w10 v10 + w11 v11,   w00 = hy hx, w01 = hy lx, w10 = ly hx, w11 = ly lx

summed in that order, with ``vab`` the pixel (ya, xb) when it is in the image and 0
otherwise (zero padding).

The gradients, for ``dcols`` the gradient of the columns and ``dxs = m * dcols``:
:func:`deform_col2im` gives ``dx`` (every sample adds ``wab * dxs`` to its corner (ya,
xb), summed in float64), and :func:`deform_col2im_coord` gives ``doffset``, the pairs
``(dpy, dpx)`` with ``dpy = sum_c (m jy) dcols``, ``jy = hx (v10 - v00) + lx (v11 - v01)``,
``dpx = sum_c (m jx) dcols``, ``jx = hy (v01 - v00) + ly (v11 - v10)`` (the derivative on
the cell [y0, y0 + 1] x [x0, x0 + 1], i.e. from the right at an integer position), and
``dmask = sum_c dcols * xs``. The products are in this order (``m jy`` first) in every
backend. Their support at the border is the ``border_grad`` argument of
:func:`deform_col2im_coord`:

* ``"torchvision"`` (default): no range test of its own; nonzero wherever a corner of
  the cell is inside the image, i.e. on ``[-1, H) x [-1, W)``, which includes ``py = -1``
  or ``px = -1`` exactly (the forward is 0 there, its right-hand derivative is not).
  torchvision's behaviour (pytorch/vision issue #6885).
* ``"mmcv"``: 0 unless ``-1 < py < H`` and ``-1 < px < W``, the support of the sample
  itself (mmcv's ``get_coordinate_weight`` tests ``p <= -1 || p >= size`` first).

The two differ only at positions exactly at -1 on either axis (at ``p >= H`` or
``p >= W`` both are 0: every corner of the cell is outside the image).

**The seed's clamped sampling** (oeway/pytorch-deform-conv ``th_batch_map_coordinates``)::

    r = clamp(row, 0, H - 1)    q = clamp(col, 0, W - 1)       (each axis on its own)
    y0 = floor(r), y1 = ceil(r), x0 = floor(q), x1 = ceil(q), ly = r - y0, lx = q - x0
    vx0 = ly (v10 - v00) + v00      (column x0, interpolated along y)
    vx1 = ly (v11 - v01) + v01      (column x1)
    out = lx (vx1 - vx0) + vx0

(the seed calls vx0 and vx1 "t" and "b" although they are the left and right columns;
the value is ordinary bilinear interpolation with border replication). Because the
corners are floor and *ceil*, at an integer coordinate both corners coincide and the
coordinate gradient is 0; the clamp passes the gradient on ``[0, H - 1]`` (bounds
included, as ``torch.clamp``) and blocks it strictly outside.

**Non-finite positions.** A position (or coordinate pair) with a NaN or infinite
component samples 0 and gets zero gradients (input, offset, mask), except that the seed's
clamp maps +-inf to the border like any other value (only NaN is non-samplable there).
No index is ever computed from a non-finite or out-of-range position: such positions are
replaced by 0 before ``floor`` and their corners are marked invalid, so no memory outside
the input is read and no floating-point warning is raised.

Accumulation: the scatters (``deform_col2im``, the input gradient of the seed's
sampling) add with ``numpy.bincount``, which sums in float64 and is rounded to the dtype
of the input at the end; every other result is computed in the dtype of the input.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import check_border_grad

__all__ = [
    "unavailable_reason",
    "bilinear_sample",
    "deform_im2col",
    "deform_col2im",
    "deform_col2im_coord",
    "map_coordinates_clamped",
    "map_coordinates_clamped_backward",
    "sample_positions",
]


def unavailable_reason():
    """The NumPy backend always runs."""
    return None


# ---- deformable convolution ---------------------------------------------------------


@dataclass(frozen=True)
class _Cells:
    """Where every sample of a deformable im2col falls; arrays are (N, G, K, L), L = out_h * out_w."""

    idx: tuple  # 4 x int64 (N, G, K, L): flat pixel index y*W + x of the corners 00, 01, 10, 11 (0 where invalid)
    valid: tuple  # 4 x bool (N, G, K, L): corner inside the image and position in the gradient support
    sample: np.ndarray  # bool (N, G, K, L): -1 < py < H and -1 < px < W (and finite)
    ly: np.ndarray  # (N, G, K, L) dtype of x: py - y0 (0 where not in the support)
    lx: np.ndarray  # (N, G, K, L): px - x0
    hy: np.ndarray  # (N, G, K, L): 1 - ly
    hx: np.ndarray  # (N, G, K, L): 1 - lx


def sample_positions(offset, kernel_hw, stride, padding, dilation, dtype=None):
    """The sample positions ``(py, px)`` of a deformable im2col, each (N, G, K, L).

    For offset group g, tap k = i kw + j (K = kh kw) and output pixel l = oy out_w + ox
    (L = out_h out_w)::

        py = oy s_h - pad_h + i d_h + delta_y       delta_y = offset[n, 2 (g K + k), oy, ox]
        px = ox s_w - pad_w + j d_w + delta_x       delta_x = offset[n, 2 (g K + k) + 1, oy, ox]

    G and the output size come from ``offset`` (N, 2 G K, out_h, out_w). The integer base
    is converted to ``dtype`` (default: the offset's) before the offset is added.
    """
    n, channels, out_h, out_w = offset.shape
    weight_h, weight_w = (int(v) for v in kernel_hw)
    stride_h, stride_w = (int(v) for v in stride)
    pad_h, pad_w = (int(v) for v in padding)
    dilation_h, dilation_w = (int(v) for v in dilation)
    k_taps = weight_h * weight_w
    offset_groups = channels // (2 * k_taps)
    off = offset.reshape(n, offset_groups, k_taps, 2, out_h * out_w)  # (N, G, K, 2, L): (delta_y, delta_x) pairs
    tap_i = np.repeat(np.arange(weight_h), weight_w)  # (K,) i of tap k
    tap_j = np.tile(np.arange(weight_w), weight_h)  # (K,) j of tap k
    oy = np.repeat(np.arange(out_h), out_w)  # (L,)
    ox = np.tile(np.arange(out_w), out_h)  # (L,)
    dtype = offset.dtype if dtype is None else dtype
    base_y = ((oy * stride_h - pad_h)[None, :] + (tap_i * dilation_h)[:, None]).astype(dtype)  # (K, L)
    base_x = ((ox * stride_w - pad_w)[None, :] + (tap_j * dilation_w)[:, None]).astype(dtype)  # (K, L)
    py = base_y + off[:, :, :, 0]  # (N, G, K, L)
    px = base_x + off[:, :, :, 1]  # (N, G, K, L)
    return py, px


def _cells(offset, height, width, kernel_hw, stride, padding, dilation, out_hw, offset_groups, dtype):
    """The cells of every (n, g, k, oy, ox) of a deformable im2col: :func:`sample_positions`,
    then :func:`_cells_at`."""
    py, px = sample_positions(offset, kernel_hw, stride, padding, dilation, dtype)
    return _cells_at(py, px, height, width)


def _cells_at(py, px, height, width):
    """The cell [y0, y0+1] x [x0, x0+1] each position (py, px) (N, G, K, L) falls in.

    The gradient support is ``-1 <= py < H`` and ``-1 <= px < W`` (finite): outside it
    all four corners are outside the image. The sampling support is the same with
    ``p > -1``.
    """
    support = np.isfinite(py) & np.isfinite(px)
    support &= (py >= -1) & (py < height) & (px >= -1) & (px < width)
    sample = support & (py > -1) & (px > -1)
    py_s = np.where(support, py, 0)  # never floor a non-finite or far-away position
    px_s = np.where(support, px, 0)
    y0f = np.floor(py_s)
    x0f = np.floor(px_s)
    ly = py_s - y0f
    lx = px_s - x0f
    y0 = y0f.astype(np.int64)  # in [-1, H-1] inside the support
    x0 = x0f.astype(np.int64)  # in [-1, W-1]

    idx, valid = [], []
    for a, b in ((0, 0), (0, 1), (1, 0), (1, 1)):  # corners (y0, x0), (y0, x1), (y1, x0), (y1, x1)
        ya = y0 + a
        xb = x0 + b
        ok = support & (ya >= 0) & (ya < height) & (xb >= 0) & (xb < width)
        valid.append(ok)
        idx.append(np.where(ok, ya * width + xb, 0))
    return _Cells(tuple(idx), tuple(valid), sample, ly, lx, 1 - ly, 1 - lx)


def bilinear_sample(x, py, px):
    """``xs[n, g, c, k, l] = bilinear(x[n, g Cg + c], py[n, g, k, l], px[n, g, k, l])``
    (module docstring) for x (N, C, H, W) and positions (N, G, K, L), G dividing C:
    the samples, (N, G, Cg, K, L), Cg = C / G."""
    n, c, height, width = x.shape
    offset_groups = py.shape[1]
    cells = _cells_at(py, px, height, width)
    xg = x.reshape(n, offset_groups, c // offset_groups, height * width)  # (N, G, Cg, H*W)
    return _bilinear(xg, cells)


def _corner_values(xg, cells, use_sample):
    """The four corner pixels of every sample, per channel, one corner at a time (a
    generator): 00, 01, 10, 11, each (N, G, Cg, K, L), 0 where the corner is invalid.

    ``xg`` is the input as (N, G, Cg, H*W). With ``use_sample`` a corner also needs the
    position inside the sampling support (-1 < p); otherwise the gradient support.
    """
    n, g, k, l = cells.sample.shape
    for idx, ok in zip(cells.idx, cells.valid):
        if use_sample:
            ok = ok & cells.sample
        v = np.empty((n, g, xg.shape[2], k * l), dtype=xg.dtype)  # (N, G, Cg, K*L)
        if xg.shape[3] == 0:  # an empty image (H or W = 0): every corner is outside it
            v.fill(0)
            yield v.reshape(n, g, xg.shape[2], k, l)
            continue
        for b in range(n):  # per image and group: one gather of all its channels' corners
            for gg in range(g):
                np.take(xg[b, gg], idx[b, gg].reshape(-1), axis=1, out=v[b, gg])
        v = v.reshape(n, g, xg.shape[2], k, l)
        np.copyto(v, 0, where=~ok[:, :, None])  # invalid corners contribute 0 (whatever the pixel)
        yield v


def _bilinear(xg, cells):
    """bilinear(x[n, c], py, px) for every sample: (N, G, Cg, K, L).

    Summed corner by corner in the order w00 v00 + w01 v01 + w10 v10 + w11 v11."""
    weights = (cells.hy * cells.hx, cells.hy * cells.lx, cells.ly * cells.hx, cells.ly * cells.lx)  # (N, G, K, L) each
    val = None
    for w, v in zip(weights, _corner_values(xg, cells, use_sample=True)):
        v *= w[:, :, None]  # (N, G, Cg, K, L), in place: v is a fresh array
        if val is None:
            val = v
        else:
            val += v
    return val


def _mask_g(mask, n, offset_groups, k_taps, length):
    """mask (N, G*K, out_h, out_w) as (N, G, 1, K, L) for broadcasting over channels."""
    return mask.reshape(n, offset_groups, 1, k_taps, length)


def deform_im2col(x, offset, mask, kernel_hw, stride, padding, dilation, out_hw, offset_groups):
    """Deformable im2col.

    Parameters
    ----------
    x : (N, C, H, W)
    offset : (N, 2 G kh kw, out_h, out_w), (delta_y, delta_x) pairs per group and tap
    mask : (N, G kh kw, out_h, out_w) or None (all ones)
    kernel_hw, stride, padding, dilation, out_hw : pairs of ints
    offset_groups : G, dividing C

    Returns
    -------
    cols : (N, C, kh, kw, out_h, out_w), dtype of x:
        ``cols[n, c, i, j, oy, ox] = m * bilinear(x[n, c], py, px)`` (module docstring).
    """
    n, c, height, width = x.shape
    weight_h, weight_w = kernel_hw
    out_h, out_w = out_hw
    k_taps, length = weight_h * weight_w, out_h * out_w
    py, px = sample_positions(offset, kernel_hw, stride, padding, dilation, x.dtype)  # (N, G, K, L) each
    xs = bilinear_sample(x, py, px)  # (N, G, Cg, K, L) the samples
    cols = xs  # (N, G, Cg, K, L)
    if mask is not None:
        m = _mask_g(mask, n, offset_groups, k_taps, length)  # (N, G, 1, K, L)
        cols = m * xs  # (N, G, Cg, K, L) modulated
    return cols.reshape(n, c, weight_h, weight_w, out_h, out_w)


def _scatter_add(flat_size, pairs, dtype):
    """out[idx] += value for every (indices, values) pair in turn (repeated indices add
    up), summed in float64; ``pairs`` may be a generator, so one pair lives at a time."""
    out = np.zeros(flat_size, dtype=np.float64)
    if flat_size == 0:  # an empty image: nothing to add to (every corner is outside it)
        return out.astype(dtype)
    for idx, val in pairs:
        out += np.bincount(idx.ravel(), weights=val.ravel(), minlength=flat_size)
    return out.astype(dtype, copy=False)


def deform_col2im(d_cols, offset, mask, x_shape, kernel_hw, stride, padding, dilation, offset_groups):
    """Adjoint of :func:`deform_im2col` with respect to ``x``.

    Every sample whose position is in the sampling support adds ``wab * dxs`` to each of
    its (in-image) corners (ya, xb), ``dxs = m * dcols``, ``wab`` the corner's bilinear
    weight (w00 = hy hx, w01 = hy lx, w10 = ly hx, w11 = ly lx).

    Returns
    -------
    dx : ndarray of ``x_shape`` (N, C, H, W), dtype of d_cols
    """
    n, c, height, width = x_shape
    weight_h, weight_w, out_h, out_w = d_cols.shape[2:]
    k_taps, length = weight_h * weight_w, out_h * out_w
    cg = c // offset_groups
    cells = _cells(offset, height, width, kernel_hw, stride, padding, dilation, (out_h, out_w), offset_groups, d_cols.dtype)
    dcols = d_cols.reshape(n, offset_groups, cg, k_taps, length)  # (N, G, Cg, K, L)
    dxs = dcols  # (N, G, Cg, K, L) the gradient of the samples, cols = m * xs
    if mask is not None:
        dxs = _mask_g(mask, n, offset_groups, k_taps, length) * dcols
    weights = (cells.hy * cells.hx, cells.hy * cells.lx, cells.ly * cells.hx, cells.ly * cells.lx)  # w00, w01, w10, w11
    # flat index into dx of (n, g, cc) planes: ((n*G + g)*Cg + cc) * H*W
    plane = (np.arange(n * c).reshape(n, offset_groups, cg, 1, 1)) * (height * width)  # (N, G, Cg, 1, 1)
    corners = (
        (
            plane + idx[:, :, None],  # (N, G, Cg, K, L) flat index into dx
            np.where((ok & cells.sample)[:, :, None], w[:, :, None] * dxs, 0),  # (N, G, Cg, K, L)
        )
        for idx, ok, w in zip(cells.idx, cells.valid, weights)
    )  # one corner at a time
    dx = _scatter_add(n * c * height * width, corners, d_cols.dtype).reshape(x_shape)  # (N, C, H, W)
    return dx


def deform_col2im_coord(d_cols, x, offset, mask, kernel_hw, stride, padding, dilation, offset_groups,
                        cols_out=None, border_grad="torchvision"):
    """Gradients of :func:`deform_im2col` with respect to ``offset`` and ``mask``.

    ``cols_out`` (optional, C-contiguous, the columns' shape and dtype) receives
    :func:`deform_im2col`'s result: the backward needs both, and a backend may compute
    them together (the "numba" one does, from the corner values read once).

    ``border_grad``: "torchvision" (the offset gradient lives on ``[-1, H) x [-1, W)``)
    or "mmcv" (on ``(-1, H) x (-1, W)``); see the module docstring. The mask gradient
    does not depend on it.

    Returns
    -------
    doffset : shape of offset, dtype of x
    dmask : shape of mask, or None when mask is None
    """
    border_grad = check_border_grad("deform_col2im_coord", border_grad)
    if cols_out is not None:
        cols_out[...] = deform_im2col(x, offset, mask, kernel_hw, stride, padding, dilation, d_cols.shape[4:], offset_groups)
    n, c, height, width = x.shape
    weight_h, weight_w, out_h, out_w = d_cols.shape[2:]
    k_taps, length = weight_h * weight_w, out_h * out_w
    cells = _cells(offset, height, width, kernel_hw, stride, padding, dilation, (out_h, out_w), offset_groups, x.dtype)
    xg = x.reshape(n, offset_groups, c // offset_groups, height * width)  # (N, G, Cg, H*W)
    dcols = d_cols.reshape(n, offset_groups, c // offset_groups, k_taps, length)  # (N, G, Cg, K, L)

    # torchvision: corners read on the gradient support [-1, H) x [-1, W); mmcv: only where
    # the position samples, (-1, H) x (-1, W), so the derivative is exactly 0 at p = -1
    v00, v01, v10, v11 = _corner_values(xg, cells, use_sample=border_grad == "mmcv")  # 4 x (N, G, Cg, K, L)
    ly, lx = cells.ly[:, :, None], cells.lx[:, :, None]  # (N, G, 1, K, L)
    hy, hx = cells.hy[:, :, None], cells.hx[:, :, None]
    jy = lx * (v11 - v01) + hx * (v10 - v00)  # (N, G, Cg, K, L) d xs / d py on the cell
    jx = ly * (v11 - v10) + hy * (v01 - v00)  # (N, G, Cg, K, L) d xs / d px on the cell
    if mask is not None:  # m folded into the derivative first (the compiled kernels' order): m jy dcols = jy dxs
        m = _mask_g(mask, n, offset_groups, k_taps, length)  # (N, G, 1, K, L)
        jy = m * jy
        jx = m * jx
    dpy = (jy * dcols).sum(axis=2)  # (N, G, K, L)
    dpx = (jx * dcols).sum(axis=2)  # (N, G, K, L)
    doffset = np.stack([dpy, dpx], axis=3).reshape(offset.shape).astype(x.dtype, copy=False)  # (N, 2 G K, out_h, out_w)
    del v00, v01, v10, v11, jy, jx  # free them before the mask gradient

    dmask = None
    if mask is not None:
        xs = _bilinear(xg, cells)  # (N, G, Cg, K, L) the samples, again
        dmask = (dcols * xs).sum(axis=2).reshape(mask.shape).astype(x.dtype, copy=False)  # (N, G K, out_h, out_w)
    return doffset, dmask


# ---- the seed's clamped sampling ----------------------------------------------------


@dataclass(frozen=True)
class _ClampedCells:
    """Corners of every coordinate pair of the seed's sampling; arrays are (B, P)."""

    idx: tuple  # 4 x int64 (B, P): flat index b*H*W + y*W + x of corners (y0, x0), (y1, x0), (y0, x1), (y1, x1)
    ly: np.ndarray  # (B, P): clamped row - y0
    lx: np.ndarray  # (B, P): clamped col - x0
    nan: np.ndarray  # bool (B, P): the pair has a NaN (samples 0, zero gradients)
    pass_r: np.ndarray  # bool (B, P): 0 <= row <= H-1 (clamp passes the row gradient)
    pass_c: np.ndarray  # bool (B, P): 0 <= col <= W-1


def _clamped_cells(x_shape, coords):
    b, height, width = x_shape
    row = coords[..., 0]  # (B, P)
    col = coords[..., 1]  # (B, P)
    nan = np.isnan(row) | np.isnan(col)
    r = np.where(nan, 0, np.clip(row, 0, height - 1))  # clamp per axis; +-inf go to the border
    c = np.where(nan, 0, np.clip(col, 0, width - 1))
    y0f, y1f = np.floor(r), np.ceil(r)
    x0f, x1f = np.floor(c), np.ceil(c)
    y0, y1 = y0f.astype(np.int64), y1f.astype(np.int64)
    x0, x1 = x0f.astype(np.int64), x1f.astype(np.int64)
    base = (np.arange(b) * (height * width))[:, None]  # (B, 1)
    idx = (base + y0 * width + x0, base + y1 * width + x0, base + y0 * width + x1, base + y1 * width + x1)
    pass_r = ~nan & (row >= 0) & (row <= height - 1)
    pass_c = ~nan & (col >= 0) & (col <= width - 1)
    return _ClampedCells(idx, r - y0f, c - x0f, nan, pass_r, pass_c)


def map_coordinates_clamped(x, coords):
    """The seed's bilinear sampling with per-axis clamping (``th_batch_map_coordinates``).

    Parameters
    ----------
    x : (B, H, W)
    coords : (B, P, 2), (row, col) pairs, dtype of x

    Returns
    -------
    out : (B, P), dtype of x; 0 where a coordinate is NaN.
    """
    cells = _clamped_cells(x.shape, coords)
    flat = x.reshape(-1)
    v00, v10, v01, v11 = (flat[i] for i in cells.idx)  # (B, P) each: corners (y0, x0), (y1, x0), (y0, x1), (y1, x1)
    ly, lx = cells.ly, cells.lx
    vx0 = ly * (v10 - v00) + v00  # column x0, interpolated along y
    vx1 = ly * (v11 - v01) + v01  # column x1
    out = lx * (vx1 - vx0) + vx0
    return np.where(cells.nan, 0, out)


def map_coordinates_clamped_backward(d_out, x, coords):
    """Gradients of :func:`map_coordinates_clamped`.

    Backward, in reverse order of the forward (NaN pairs get 0 everywhere)::

        dvx0 = dout (1 - lx)             dvx1 = dout lx
        dlx  = dout (vx1 - vx0)
        dly  = dvx0 (v10 - v00) + dvx1 (v11 - v01)
        dx[y0, x0] += dvx0 (1 - ly)      dx[y1, x0] += dvx0 ly
        dx[y0, x1] += dvx1 (1 - ly)      dx[y1, x1] += dvx1 ly
        drow = dly  where 0 <= row <= H-1, else 0     (y0 = floor is a constant)
        dcol = dlx  where 0 <= col <= W-1, else 0

    At an integer coordinate y0 == y1, so ``dly`` is 0 (likewise for columns).

    Returns
    -------
    dx : (B, H, W), dcoords : (B, P, 2); dtype of x.
    """
    cells = _clamped_cells(x.shape, coords)
    flat = x.reshape(-1)
    v00, v10, v01, v11 = (flat[i] for i in cells.idx)  # (B, P) each
    ly, lx = cells.ly, cells.lx
    dout = np.where(cells.nan, 0, d_out)  # (B, P)
    vx0 = ly * (v10 - v00) + v00  # (B, P)
    vx1 = ly * (v11 - v01) + v01  # (B, P)

    dvx0 = dout * (1 - lx)  # (B, P)
    dvx1 = dout * lx  # (B, P)
    dlx = dout * (vx1 - vx0)  # (B, P)
    dly = dvx0 * (v10 - v00) + dvx1 * (v11 - v01)  # (B, P)
    dx = _scatter_add(
        x.size,
        zip(cells.idx, (dvx0 * (1 - ly), dvx0 * ly, dvx1 * (1 - ly), dvx1 * ly)),
        x.dtype,
    ).reshape(x.shape)  # (B, H, W)
    drow = np.where(cells.pass_r, dly, 0)  # (B, P)
    dcol = np.where(cells.pass_c, dlx, 0)  # (B, P)
    dcoords = np.stack([drow, dcol], axis=-1).astype(x.dtype, copy=False)  # (B, P, 2)
    return dx, dcoords
