"""2-D convolution (cross-correlation, as ``torch.nn.functional.conv2d``) by im2col + matmul.

Written once against the array module of the arguments (``xp``, see ``npattn/_xp.py``):
NumPy arrays run in NumPy, CUDA arrays (all of a call's arrays) in CuPy on the device."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .._checks import conv_out_size, float_array, pair, positive_int, same_dtype
from .._xp import array_module, like_forward, namespace


def im2col(x, kernel, stride, padding, dilation):
    """Unfold the patches of ``x`` into columns.

    Parameters
    ----------
    x : ndarray (N, C, H, W), NumPy or CuPy (the result is of the same module)
    kernel, stride, padding, dilation : pairs of ints (h, w)

    Returns
    -------
    cols : ndarray (N, C, kh, kw, out_h, out_w)
        ``cols[n, c, i, j, oy, ox] = x_pad[n, c, oy*s_h + i*d_h, ox*s_w + j*d_w]`` where
        ``x_pad`` is ``x`` with ``pad_h`` zero rows above and below and ``pad_w`` zero
        columns left and right.
    """
    xp = array_module(x)
    n, c, h, w = x.shape
    weight_h, weight_w = kernel
    stride_h, stride_w = stride
    pad_h, pad_w = padding
    dilation_h, dilation_w = dilation
    out_h = (h + 2 * pad_h - dilation_h * (weight_h - 1) - 1) // stride_h + 1
    out_w = (w + 2 * pad_w - dilation_w * (weight_w - 1) - 1) // stride_w + 1
    x_pad = xp.pad(x, ((0, 0), (0, 0), (pad_h, pad_h), (pad_w, pad_w)), mode="constant") if (pad_h or pad_w) else x
    cols = xp.empty((n, c, weight_h, weight_w, out_h, out_w), dtype=x.dtype)
    for i in range(weight_h):
        y0 = i * dilation_h
        for j in range(weight_w):
            x0 = j * dilation_w
            cols[:, :, i, j] = x_pad[
                :, :, y0 : y0 + stride_h * (out_h - 1) + 1 : stride_h, x0 : x0 + stride_w * (out_w - 1) + 1 : stride_w
            ]
    return cols


def col2im(d_cols, x_shape, stride, padding, dilation):
    """Adjoint of :func:`im2col`: add every column entry back onto the pixel it came from.

    ``d_cols`` has shape (N, C, kh, kw, out_h, out_w); the result has ``x_shape``.
    Within one tap (i, j) the strided slice visits distinct pixels, so a plain ``+=`` per
    tap is exact; different taps that hit the same pixel are added one after the other.
    """
    xp = array_module(d_cols)
    n, c, h, w = x_shape
    _, _, weight_h, weight_w, out_h, out_w = d_cols.shape
    stride_h, stride_w = stride
    pad_h, pad_w = padding
    dilation_h, dilation_w = dilation
    d_x_pad = xp.zeros((n, c, h + 2 * pad_h, w + 2 * pad_w), dtype=d_cols.dtype)
    for i in range(weight_h):
        y0 = i * dilation_h
        for j in range(weight_w):
            x0 = j * dilation_w
            d_x_pad[
                :, :, y0 : y0 + stride_h * (out_h - 1) + 1 : stride_h, x0 : x0 + stride_w * (out_w - 1) + 1 : stride_w
            ] += d_cols[:, :, i, j]
    return xp.ascontiguousarray(d_x_pad[:, :, pad_h : pad_h + h, pad_w : pad_w + w])


def _flat_padded(xp, x, padding, extra):
    """``x`` zero-padded, each (n, c) image flattened to one row of ``Hp * Wp`` values
    followed by ``extra`` zeros: (N, C, Hp * Wp + extra). A view of ``x`` when there is
    nothing to add."""
    n, c, h, w = x.shape
    pad_h, pad_w = padding
    if not (pad_h or pad_w or extra):
        return x.reshape(n, c, h * w)
    hp, wp = h + 2 * pad_h, w + 2 * pad_w
    flat = xp.zeros((n, c, hp * wp + extra), dtype=x.dtype)
    flat[:, :, : hp * wp].reshape(n, c, hp, wp)[:, :, pad_h : pad_h + h, pad_w : pad_w + w] = x
    return flat


def _tap_offsets(kernel, dilation, row_w):
    """Start of tap (i, j) in a flattened padded image whose rows have ``row_w`` values."""
    return [(i, j, i * dilation[0] * row_w + j * dilation[1]) for i in range(kernel[0]) for j in range(kernel[1])]


@dataclass(frozen=True)
class Conv2dCache:
    x_shape: tuple  # (N, C_in, H, W)
    cols: np.ndarray  # (N, G, C_in/G * kh * kw, out_h * out_w) im2col columns; None with stride 1
    x_rows: np.ndarray  # stride 1: (N, C_in, Hp * Wp + (kw - 1) d_w) padded x, one row per image (a view of x for 1x1 without padding); else None
    weight: np.ndarray  # (C_out, C_in/G, kh, kw)
    has_bias: bool
    stride: tuple  # (s_h, s_w)
    padding: tuple  # (pad_h, pad_w)
    dilation: tuple  # (d_h, d_w)
    groups: int
    out_hw: tuple  # (out_h, out_w)


def conv2d_forward(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """2-D convolution, NCHW input and OIHW weight, exactly as ``torch.nn.functional.conv2d``.

    Parameters
    ----------
    x : ndarray (N, C_in, H, W), float32 or float64
    weight : ndarray (C_out, C_in / groups, kh, kw), same dtype
    bias : ndarray (C_out,) or None
    stride, padding, dilation : int or pair (h, w); stride, dilation >= 1, padding >= 0
    groups : int dividing both C_in and C_out

    The arrays are NumPy arrays or, all of them, CUDA arrays (``__cuda_array_interface__``:
    CuPy arrays, PyTorch CUDA tensors, Numba device arrays; needs CuPy): the convolution
    then runs in CuPy on the device and ``y`` and the backward's gradients are CuPy
    arrays. A NumPy array among CUDA arrays raises ``TypeError`` naming it.

    Returns
    -------
    y : ndarray (N, C_out, out_h, out_w) with
        ``out_h = (H + 2 pad_h - d_h (kh - 1) - 1) // s_h + 1`` (likewise out_w)
    cache : Conv2dCache

    Notes
    -----
    Forward (cross-correlation; g is the group of output channel o, G = groups)::

        y[n, o, oy, ox] = b[o] + sum_{c in group g} sum_{i, j}
                          w[o, c, i, j] * x_pad[n, c, oy*s_h + i*d_h, ox*s_w + j*d_w]

    Written as matrices per image n and group g, with ``X_col = im2col(x)`` of shape
    (C_in/G * kh * kw, out_h * out_w) and ``W_g`` of shape (C_out/G, C_in/G * kh * kw)::

        Y[n, g] = W_g @ X_col[n, g] + b_g

    Backward, for upstream ``dY``::

        db       = sum_{n, oy, ox} dY                       (C_out,)
        dW_g     = sum_n dY[n, g] @ X_col[n, g]^T          (C_out/G, C_in/G * kh * kw)
        dX_col   = W_g^T @ dY[n, g]                         (C_in/G * kh * kw, L)
        dx       = col2im(dX_col)                           (N, C_in, H, W)

    Stride 1 needs no column matrix. Flatten each zero-padded image to one row
    ``x_rows`` (row length ``Wp = W + 2 pad_w``, then ``(kw - 1) d_w`` zeros); tap (i, j)
    of output pixel (oy, ox) reads ``x_rows[(oy + i d_h) Wp + ox + j d_w]``, so letting ox
    run over whole padded rows, the tap's inputs are one contiguous slice (a view) of
    length ``L = out_h * Wp`` starting at ``s_ij = i d_h Wp + j d_w``::

        Y_rows[n, g] = sum_{i, j} W_g[:, :, i, j] @ x_rows[n, g, :, s_ij : s_ij + L]
        y            = Y_rows[..., :out_w]       (the other Wp - out_w columns are junk)

    and, with dY_rows = dY padded with zeros in the junk columns::

        dW_g[:, :, i, j]               = sum_n dY_rows[n, g] @ x_rows[n, g, :, s_ij : s_ij + L]^T
        dx_rows[n, g, :, s_ij : +L]   += W_g[:, :, i, j]^T @ dY_rows[n, g]
        dx                             = dx_rows cropped to the image
    """
    op = "conv2d"
    xp, a = namespace(op, {"x": x, "weight": weight, "bias": bias})
    x = float_array(op, "x", a["x"], 4, "(N, C, H, W)", xp=xp)
    weight = float_array(op, "weight", a["weight"], 4, "(C_out, C_in/groups, kh, kw)", xp=xp)
    bias = a["bias"]
    if bias is not None:
        bias = float_array(op, "bias", bias, 1, "(C_out,)", xp=xp)
    same_dtype(op, "x", x, weight=weight, bias=bias)
    stride = pair(op, "stride", stride, 1)
    padding = pair(op, "padding", padding, 0)
    dilation = pair(op, "dilation", dilation, 1)
    groups = positive_int(op, "groups", groups)
    n, c_in, h, w = x.shape
    c_out, c_per_group, weight_h, weight_w = weight.shape
    if c_in % groups:
        raise ValueError(f"{op}: groups={groups} must divide the input channels, got x with {c_in} channels")
    if c_out % groups:
        raise ValueError(f"{op}: groups={groups} must divide the output channels, got weight with {c_out} output channels")
    if c_per_group * groups != c_in:
        raise ValueError(
            f"{op}: weight must have C_in/groups = {c_in // groups} input channels (x has {c_in}, groups={groups}), "
            f"got weight shape {tuple(weight.shape)}"
        )
    if bias is not None and bias.shape != (c_out,):
        raise ValueError(f"{op}: bias must have shape ({c_out},), got {tuple(bias.shape)}")
    out_h = conv_out_size(op, h, weight_h, stride[0], padding[0], dilation[0], "height")
    out_w = conv_out_size(op, w, weight_w, stride[1], padding[1], dilation[1], "width")

    g = groups
    w_g = weight.reshape(g, c_out // g, c_per_group * weight_h * weight_w)  # (G, C_out/G, Ck)
    if stride == (1, 1):
        pad_h, pad_w = padding
        row_w = w + 2 * pad_w  # Wp
        length = out_h * row_w  # L
        x_rows = _flat_padded(xp, x, padding, (weight_w - 1) * dilation[1])  # (N, C_in, Hp * Wp + extra)
        w_taps = weight.reshape(g, c_out // g, c_per_group, weight_h, weight_w)  # (G, C_out/G, C_in/G, kh, kw)
        y = tmp = None
        for i, j, start in _tap_offsets((weight_h, weight_w), dilation, row_w):
            x_tap = x_rows[:, :, start : start + length].reshape(n, g, c_per_group, length)  # a view
            if y is None:
                y = xp.matmul(w_taps[None, :, :, :, i, j], x_tap)  # (N, G, C_out/G, L)
            else:
                tmp = xp.matmul(w_taps[None, :, :, :, i, j], x_tap, out=tmp)
                y += tmp
        y = y.reshape(n, c_out, out_h, row_w)
        if row_w != out_w:
            y = xp.ascontiguousarray(y[:, :, :, :out_w])  # drop the junk columns
        cols = None
    else:
        cols = im2col(x, (weight_h, weight_w), stride, padding, dilation)  # (N, C_in, kh, kw, out_h, out_w)
        cols = cols.reshape(n, g, c_per_group * weight_h * weight_w, out_h * out_w)  # (N, G, Ck, L)
        y = xp.matmul(w_g[None], cols)  # (N, G, C_out/G, L)
        y = y.reshape(n, c_out, out_h, out_w)
        x_rows = None
    if bias is not None:
        y += bias[None, :, None, None]
    cache = Conv2dCache(x.shape, cols, x_rows, weight, bias is not None, stride, padding, dilation, groups, (out_h, out_w))
    return y, cache


def conv2d_backward(dy, cache: Conv2dCache):
    """Gradients of :func:`conv2d_forward`: dict with ``x``, ``weight`` and ``bias`` (when given).
    ``dy`` is on the forward's side: a NumPy array, or a CUDA array when the forward ran
    on the device (then the gradients are CuPy arrays); the other side raises ``TypeError``."""
    xp = array_module(cache.weight)
    n, c_in, h, w = cache.x_shape
    c_out, c_per_group, weight_h, weight_w = cache.weight.shape
    g = cache.groups
    out_h, out_w = cache.out_hw
    dy = float_array("conv2d_backward", "dy", like_forward("conv2d_backward", "dy", dy, xp), 4, xp=xp)
    same_dtype("conv2d_backward", "the forward's weight", cache.weight, dy=dy)
    if dy.shape != (n, c_out, out_h, out_w):
        raise ValueError(f"conv2d_backward: dy must have shape {(n, c_out, out_h, out_w)}, got {tuple(dy.shape)}")
    w_g = cache.weight.reshape(g, c_out // g, c_per_group * weight_h * weight_w)  # (G, C_out/G, Ck)
    grads = {}
    if cache.stride == (1, 1):
        pad_h, pad_w = cache.padding
        row_w = w + 2 * pad_w  # Wp
        length = out_h * row_w  # L
        if row_w != out_w:  # the junk columns get a zero gradient
            dy_rows = xp.zeros((n, c_out, out_h, row_w), dtype=dy.dtype)
            dy_rows[:, :, :, :out_w] = dy
        else:
            dy_rows = dy
        dy_g = dy_rows.reshape(n, g, c_out // g, length)  # (N, G, C_out/G, L)
        w_taps = cache.weight.reshape(g, c_out // g, c_per_group, weight_h, weight_w)  # (G, C_out/G, C_in/G, kh, kw)
        # tiny per-group matrices: einsum's loop beats N*G small BLAS calls
        small = (c_out // g) * c_per_group <= 16
        d_w = xp.empty_like(w_taps)  # (G, C_out/G, C_in/G, kh, kw)
        taps = _tap_offsets((weight_h, weight_w), cache.dilation, row_w)
        for i, j, start in taps:
            x_tap = cache.x_rows[:, :, start : start + length].reshape(n, g, c_per_group, length)  # a view
            if small:
                d_w[:, :, :, i, j] = xp.einsum("ngol,ngcl->goc", dy_g, x_tap)
            else:
                d_w[:, :, :, i, j] = xp.matmul(dy_g, x_tap.transpose(0, 1, 3, 2)).sum(axis=0)
        if weight_h == weight_w == 1 and not (pad_h or pad_w):
            d_rows = xp.matmul(w_taps[None, :, :, :, 0, 0].transpose(0, 1, 3, 2), dy_g)  # (N, G, C_in/G, HW)
            grads["x"] = d_rows.reshape(cache.x_shape)  # (N, C_in, H, W)
        else:
            hp = h + 2 * pad_h
            d_rows = xp.zeros((n, c_in, hp * row_w + (weight_w - 1) * cache.dilation[1]), dtype=dy.dtype)
            d_tap = None
            for i, j, start in taps:
                d_tap = xp.matmul(w_taps[None, :, :, :, i, j].transpose(0, 1, 3, 2), dy_g, out=d_tap)  # (N, G, C_in/G, L)
                d_rows[:, :, start : start + length] += d_tap.reshape(n, c_in, length)
            d_pad = d_rows[:, :, : hp * row_w].reshape(n, c_in, hp, row_w)  # (N, C_in, Hp, Wp)
            grads["x"] = xp.ascontiguousarray(d_pad[:, :, pad_h : pad_h + h, pad_w : pad_w + w])  # (N, C_in, H, W)
    else:
        dy_g = dy.reshape(n, g, c_out // g, out_h * out_w)  # (N, G, C_out/G, L)
        d_cols = xp.matmul(w_g.transpose(0, 2, 1)[None], dy_g)  # (N, G, Ck, L)
        d_cols = d_cols.reshape(n, c_in, weight_h, weight_w, out_h, out_w)  # (N, C_in, kh, kw, out_h, out_w)
        grads["x"] = col2im(d_cols, cache.x_shape, cache.stride, cache.padding, cache.dilation)  # (N, C_in, H, W)
        d_w = xp.matmul(dy_g, cache.cols.transpose(0, 1, 3, 2)).sum(axis=0)  # (G, C_out/G, Ck)
    grads["weight"] = d_w.reshape(cache.weight.shape)  # (C_out, C_in/G, kh, kw)
    if cache.has_bias:
        grads["bias"] = dy.sum(axis=(0, 2, 3))  # (C_out,)
    return grads
