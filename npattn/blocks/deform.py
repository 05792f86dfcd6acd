"""Deformable convolution blocks: Dai et al., "Deformable Convolutional Networks" (ICCV
2017) and Zhu et al., "Deformable ConvNets v2" (CVPR 2019). This docstring is the one
place where deformable convolution is derived; :mod:`npattn.functional.deform` (the op)
and :mod:`npattn.sampling` (its three backends) refer to it.

Four blocks:

- ``DeformConv2d``: torchvision.ops.DeformConv2d, ``forward(x, offset, mask=None)``,
  the op :func:`npattn.functional.deform_conv2d` with the block's weight and bias;
- ``DeformConv2dPack``: mmcv's DCNv1 layer, which predicts its offsets with a conv;
- ``ModulatedDeformConv2dPack``: mmcv's DCNv2 layer, which predicts offsets and mask;
- ``ConvOffset2D``: the seed's layer (oeway/pytorch-deform-conv), a different op:
  every channel resampled at its own offsets, no convolution after (last section).

Notation. x (N, C, H, W) the input; G offset groups (channel c is in group
``g = c // Cg``, Cg = C / G); kh x kw the kernel, K = kh kw taps, tap ``k = i kw + j``;
Ho x Wo the output, L = Ho Wo output pixels ``l = oy Wo + ox``; Co output channels;
Gw weight groups, Cw = C / Gw input channels per weight group. Sampling positions are
(py, px); the offset components are (delta_y, delta_x), never dy, dx: a ``d`` prefixes
gradients only (``dy = dL/dy``, ``dx = dL/dx``).

Sampling
--------

The offset holds a (delta_y, delta_x) pair per group, tap and output pixel, y first,
interleaved: channel ``2 (g K + k)`` is delta_y and ``2 (g K + k) + 1`` is delta_x
(torchvision's layout, also ONNX's and mmcv's). The mask has one channel ``g K + k``.
Tap k of output pixel (oy, ox) samples each channel of its group at::

    py = oy s_h - pad_h + i d_h + delta_y[n, g, k, l]
    px = ox s_w - pad_w + j d_w + delta_x[n, g, k, l]

(the integer base converted to the input's dtype before the offset is added, as
torchvision). s, pad and d are the stride, padding and dilation.

The bilinear cell. With ``y0 = floor(py)``, ``x0 = floor(px)``, ``y1 = y0 + 1``,
``x1 = x0 + 1``, ``ly = py - y0``, ``lx = px - x0``, ``hy = 1 - ly``, ``hx = 1 - lx``,
the corners (y0, x0), (y0, x1), (y1, x0), (y1, x1) have the values v00, v01, v10, v11
(``vab = x[n, c, ya, xb]``, 0 for a corner outside the image: zero padding) and the
weights::

    w00 = hy hx    w01 = hy lx    w10 = ly hx    w11 = ly lx
    xs = bilinear(x[n, c], py, px) = w00 v00 + w01 v01 + w10 v10 + w11 v11

xs is 0 when ``py <= -1``, ``py >= H``, ``px <= -1`` or ``px >= W`` (every corner
outside), and for a NaN or infinite position. xs is linear in x: the weights are the
derivative ``d xs / d x[n, c, ya, xb] = wab``. On the open cell it is bilinear in
(ly, lx), so its derivatives in the position are::

    jy = d xs / d py = hx (v10 - v00) + lx (v11 - v01)
    jx = d xs / d px = hy (v01 - v00) + ly (v11 - v10)

At an integer position the formula of the cell [y0, y0 + 1] is used: the derivative
from the right (zero offsets are such a point; a central difference disagrees there).

im2col as a matrix. The columns ``cols = m * xs`` (m the mask, 1 without one) hold,
for every channel c, tap k and output pixel l, the modulated sample. For weight group
g they form a matrix ``X_g`` of Cw K rows (channel-major, then tap) and L columns, the
weight of the group is ``Wd_g`` (Co / Gw, Cw K), and the convolution and its two
gradients are three matrix products per image and weight group::

    y_g = Wd_g X_g + b            (forward)
    dX_g = Wd_g^T dy_g            (the columns' gradient)
    dWd_g = sum_n dy_g X_g^T      (the weight's gradient)

col2im is the adjoint of im2col. For a fixed position, im2col is a linear map
``x -> xs`` whose matrix has the entries wab (a row per sample, at most four nonzero
entries in it); col2im is its transpose: every sample adds ``wab * dxs`` to its four
corners (``sum`` over the samples that land on a pixel). So ``<dxs, im2col(v)> =
<col2im(dxs), v>`` for every v, the identity ``npattn explain`` checks for dx.

The offset and mask gradients. py depends on delta_y alone with derivative 1, so
``d delta_y = dpy = sum_c dxs * jy`` over the Cg channels of the group that share the
position (likewise x), and since ``cols = m * xs``, ``dmask = sum_c dcols * xs`` and
``dxs = m * dcols``.

The two border conventions. At ``py = -1`` exactly (or ``px = -1``) the sample is 0
whatever the offset on the left and its right-hand derivative is not, so frameworks
disagree on the offset gradient there (``border_grad``):

- ``"torchvision"`` (torchvision, ONNX's reference; DeformConv2d's default): jy and jx
  of the cell [-1, 0], nonzero where a corner of it is in the image. The gradient lives
  on ``[-1, H) x [-1, W)``;
- ``"mmcv"`` (mmcv's DCNv1 and DCNv2 kernels test ``p <= -1`` first; the default of
  the two Pack layers): 0. The gradient lives on ``(-1, H) x (-1, W)``, the support of
  the sample itself.

Everywhere else, ``p >= H`` and ``p >= W`` included (every corner is outside, both
give 0), the two are identical (pytorch/vision #6885). Zero offsets with ``padding >=
1`` put the border taps exactly on ``p = -1``: the initial state of a Pack layer.

DeformConv2d, line by line
--------------------------

``npattn explain DeformConv2d`` walks these lines on the NumPy backend
(``npattn/sampling/numpy.py``, where ``sample_positions``, ``bilinear_sample``,
``deform_im2col``, ``deform_col2im`` and ``deform_col2im_coord`` hold the symbols
below as locals; ``npattn/functional/deform.py`` runs them chunk by chunk of images
and makes the products). Positions and samples are kept per offset group:
(N, G, K, L) and (N, G, Cg, K, L); ``m`` is the mask read as (N, G, 1, K, L).

Forward, for x (N, C, H, W), offset (N, 2 G K, Ho, Wo) and mask (N, G K, Ho, Wo)::

    Wd = weight                    (Co, Cw, kh, kw)  the kernel, Cw = C / Gw      [param("weight")]
    b = bias                       (Co,)                                          [param("bias")]
    stride = (s_h, s_w)            (2,)                                           [attr("stride")]
    padding = (pad_h, pad_w)       (2,)                                           [attr("padding")]
    dilation = (d_h, d_w)          (2,)                                           [attr("dilation")]
    py = oy s_h - pad_h + i d_h + delta_y
                                   (N, G, K, L)      the sample rows              [sample_positions(offset, Wd.shape[2:], stride, padding, dilation)[0]]
    px = ox s_w - pad_w + j d_w + delta_x
                                   (N, G, K, L)      the sample columns           [sample_positions(offset, Wd.shape[2:], stride, padding, dilation)[1]]
    xs = bilinear(x, py, px)       (N, G, Cg, K, L)  w00 v00 + w01 v01 + w10 v10 + w11 v11  [bilinear_sample(x, py, px)]
    cols = m * xs                  (N, G, Cg, K, L)  im2col: X_g = cols as (Cw K, L) per weight group  [mask.reshape(xs.shape[:2] + (1,) + xs.shape[3:]) * xs]
    y = Wd_g X_g + b               (N, Co, Ho, Wo)   the convolution as a product  [conv_cols(Wd, cols, b, offset.shape[2:])]

Backward, for dy = dL/dy (dy_g: dy's channels of weight group g as (Co / Gw, L))::

    db = sum_{n, oy, ox} dy        (Co,)             y = ... + b
    dWd = sum_n dy_g X_g^T         (Co, Cw, kh, kw)  y is linear in Wd: the third product
    dcols = Wd_g^T dy_g            (N, G, Cg, K, L)  y is linear in X_g: the second product
    dmask = sum_c dcols * xs       (N, G*K, Ho, Wo)  cols = m * xs; the group's channels share m
    dxs = m * dcols                (N, G, Cg, K, L)  cols = m * xs
    dpy = sum_c dxs * jy           (N, G, K, L)      xs depends on py through the cell, jy = d xs / d py;
                                                     the group's channels share py. (The code folds m into
                                                     jy first, m jy dcols: the compiled kernels' order.)
    dpx = sum_c dxs * jx           (N, G, K, L)      jx = d xs / d px
    doffset = (dpy, dpx) interleaved
                                   (N, 2*G*K, Ho, Wo)  py = base + delta_y: d delta_y = dpy, d delta_x = dpx
    dx = col2im(dxs)               (N, G*Cg, H, W)   xs is linear in x: each sample adds wab dxs to its
                                                     corner (ya, xb), the transpose of im2col

The jy, jx above are on the cell with the torchvision convention (``border_grad``);
the walk's positions are random, away from integers and from -1.

DeformConv2dPack, line by line
------------------------------

mmcv's DCNv1 layer (no mask, no bias: mmcv asserts ``bias=False``) predicts the offset
with a conv of the layer's kernel, stride, padding and dilation. Its lines are
DeformConv2d's with ``m = 1`` (so cols = xs) and no b, after the offset conv;
``npattn explain DeformConv2dPack`` walks them.

Forward, for x (N, C, H, W)::

    Wd = weight                    (Co, Cw, kh, kw)  the kernel                   [param("weight")]
    stride = (s_h, s_w)            (2,)                                           [attr("stride")]
    padding = (pad_h, pad_w)       (2,)                                           [attr("padding")]
    dilation = (d_h, d_w)          (2,)                                           [attr("dilation")]
    Woff = conv_offset.weight      (T, C, kh, kw)    T = 2 G K                    [param("conv_offset.weight")]
    boff = conv_offset.bias        (T,)                                           [param("conv_offset.bias")]
    offset = conv(x, Woff, boff)   (N, T, Ho, Wo)    the layer's stride, padding, dilation  [conv2d(x, Woff, boff, stride=(int(stride[0]), int(stride[1])), padding=(int(padding[0]), int(padding[1])), dilation=(int(dilation[0]), int(dilation[1])))]
    py = oy s_h - pad_h + i d_h + delta_y
                                   (N, G, K, L)      the sample rows              [sample_positions(offset, Wd.shape[2:], stride, padding, dilation)[0]]
    px = ox s_w - pad_w + j d_w + delta_x
                                   (N, G, K, L)      the sample columns           [sample_positions(offset, Wd.shape[2:], stride, padding, dilation)[1]]
    xs = bilinear(x, py, px)       (N, G, Cg, K, L)  the columns: X_g = xs as (Cw K, L)  [bilinear_sample(x, py, px)]
    y = Wd_g X_g                   (N, Co, Ho, Wo)   the convolution as a product  [conv_cols(Wd, xs, None, offset.shape[2:])]

Backward, for dy = dL/dy::

    dWd = sum_n dy_g X_g^T         (Co, Cw, kh, kw)  y is linear in Wd
    dxs = Wd_g^T dy_g              (N, G, Cg, K, L)  y is linear in X_g (the code's dcols: m = 1)
    dpy = sum_c dxs * jy           (N, G, K, L)      xs depends on py through the cell
    dpx = sum_c dxs * jx           (N, G, K, L)
    doffset = (dpy, dpx) interleaved
                                   (N, T, Ho, Wo)    py = base + delta_y
    dWoff = conv weight gradient   (T, C, kh, kw)    the correlation of doffset with x
    dboff = sum_{n, oy, ox} doffset
                                   (T,)
    dx = col2im(dxs) + conv backward of doffset
                                   (N, C, H, W)      x reaches y through the samples and the offsets

ModulatedDeformConv2dPack
-------------------------

``ModulatedDeformConv2dPack`` predicts offset and mask from one conv of 3 G K channels,
split in three as ``torch.chunk(t, 3, dim=1)``: the first two thirds are the offset
(read as (delta_y, delta_x) pairs, not as a y half and an x half), the last third the
mask's pre-activation. The lines below replace those of DeformConv2d with the same
symbols (the others are inserted before them);
``npattn explain ModulatedDeformConv2dPack`` walks DeformConv2d's lines with these::

    Woff = conv_offset.weight      (T, C, kh, kw)    T = 3 G K          [param("conv_offset.weight")]
    boff = conv_offset.bias        (T,)                                 [param("conv_offset.bias")]
    t = conv(x, Woff, boff)        (N, T, Ho, Wo)    the layer's stride, padding, dilation  [conv2d(x, Woff, boff, stride=(int(stride[0]), int(stride[1])), padding=(int(padding[0]), int(padding[1])), dilation=(int(dilation[0]), int(dilation[1])))]
    offset = t[:, :2GK]            (N, 2*T//3, Ho, Wo)  o1, o2 of the chunk, concatenated  [t[:, : 2 * t.shape[1] // 3]]
    z = t[:, 2GK:]                 (N, T//3, Ho, Wo)  the mask's pre-activation         [t[:, 2 * t.shape[1] // 3 :]]
    mask = sigmoid(z)              (N, T//3, Ho, Wo)                                    [sigmoid(z)]
    py = oy s_h - pad_h + i d_h + delta_y
                                   (N, G, K, L)      the sample rows              [sample_positions(offset, Wd.shape[2:], stride, padding, dilation)[0]]
    dz = dmask * mask (1 - mask)   (N, T//3, Ho, Wo)  sigmoid'
    dt = [doffset, dz]             (N, T, Ho, Wo)    t's two parts
    dWoff = conv weight gradient   (T, C, kh, kw)    the correlation of dt with x
    dboff = sum_{n, oy, ox} dt     (T,)
    dx = col2im(dxs) + conv backward of dt
                                   (N, G*Cg, H, W)   x reaches y through the samples and through t

ConvOffset2D
------------

The seed's layer: a ``Conv2d(C, 2C, 3, padding=1, bias=False)`` predicts an offset
per channel and pixel, and every channel is resampled at its own grid plus offset
with the seed's clamped sampling (:func:`npattn.functional.batch_map_offsets`, whose
sampling and adjoint are ``map_coordinates_clamped`` and its backward in
``npattn/sampling/numpy.py``). For a map b = n C + c and a coordinate pair (row, col)
of ``coords[b]``::

    r = clamp(row, 0, H - 1)       q = clamp(col, 0, W - 1)       (each axis on its own)
    y0, y1 = floor(r), ceil(r)     x0, x1 = floor(q), ceil(q)     ly = r - y0, lx = q - x0
    vx0 = ly (v10 - v00) + v00     vx1 = ly (v11 - v01) + v01     (columns x0 and x1)
    value = lx (vx1 - vx0) + vx0

and its adjoint, for the value's gradient dv::

    dvx0 = dv (1 - lx),  dvx1 = dv lx,  dlx = dv (vx1 - vx0),  dly = dvx0 (v10 - v00) + dvx1 (v11 - v01)
    dx_sample[y0, x0] += dvx0 (1 - ly),  [y1, x0] += dvx0 ly,  [y0, x1] += dvx1 (1 - ly),  [y1, x1] += dvx1 ly
    (drow, dcol) = (dly where 0 <= row <= H - 1, dlx where 0 <= col <= W - 1), else 0   (the clamp)

With floor and ceil as corners, at an integer coordinate y0 = y1 and dly = 0 (likewise
dlx): the seed's behaviour, kept. See the class docstring for the layer's quirks.
``npattn explain ConvOffset2D`` walks these lines.

Forward, for x (N, C, H, W)::

    Wt = weight                    (T, C, 3, 3)      T = 2 C, no bias              [param("weight")]
    t = conv(x, Wt), padding 1     (N, T, H, W)                                   [conv2d(x, Wt, padding=1)]
    off = t.reshape(N C, H, W, 2)  (N*C, H, W, 2)    the seed's .view: memory reinterpretation, not a permute  [t.reshape(-1, t.shape[2], t.shape[3], 2)]
    coords = (i, j) + off          (N*C, H*W, 2)     (row, col) of every pixel of every map  [off.reshape(off.shape[0], -1, 2) + np.stack(np.meshgrid(np.arange(off.shape[1]), np.arange(off.shape[2]), indexing="ij"), -1).reshape(-1, 2)]
    y = value at coords            (N, C, H, W)      the clamped bilinear sample of map n C + c  [map_coordinates_clamped(x.reshape(coords.shape[0], x.shape[2], x.shape[3]), coords).reshape(x.shape)]

Backward, for dy = dL/dy::

    dcoords = (drow, dcol)         (N*C, H*W, 2)     the adjoint above, dv = dy
    doff = dcoords as (N C, H, W, 2)
                                   (N*C, H, W, 2)    coords = grid + off: the grid is constant
    dt = doff.reshape(N, 2C, H, W)  (N, T, H, W)     undo the reinterpretation (the same memory)
    dWt = conv weight gradient     (T, C, 3, 3)      the correlation of dt with x
    dx = dx_sample + conv backward of dt
                                   (N, C, H, W)      x reaches y through the samples (dx_sample, the
                                                     scatter above) and through t
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .. import functional as F
from .. import sampling
from .._checks import pair, positive_int
from .._xp import array_module, like_forward
from ..functional.deform import (
    batch_map_offsets_backward,
    batch_map_offsets_forward,
    deform_conv2d_backward,
    deform_conv2d_forward,
)
from .base import Block, make_rng

__all__ = ["ConvOffset2D", "DeformConv2d", "DeformConv2dPack", "ModulatedDeformConv2dPack"]


def _conv_config(op, in_channels, out_channels, kernel_size, stride, padding, dilation, groups):
    in_channels = positive_int(op, "in_channels", in_channels)
    out_channels = positive_int(op, "out_channels", out_channels)
    groups = positive_int(op, "groups", groups)
    if in_channels % groups:
        raise ValueError(f"{op}: in_channels must be divisible by groups, got in_channels={in_channels}, groups={groups}")
    if out_channels % groups:
        raise ValueError(f"{op}: out_channels must be divisible by groups, got out_channels={out_channels}, groups={groups}")
    return (
        in_channels,
        out_channels,
        pair(op, "kernel_size", kernel_size, 1),
        pair(op, "stride", stride, 1),
        pair(op, "padding", padding, 0),
        pair(op, "dilation", dilation, 1),
        groups,
    )


class DeformConv2d(Block):
    """Deformable convolution layer, as ``torchvision.ops.DeformConv2d``.

    Parameters
    ----------
    in_channels, out_channels : int
    kernel_size, stride, padding, dilation : int or pair (h, w)
    groups : int, weight groups (divides in_channels and out_channels)
    bias : bool
    rng : None, int or numpy Generator (initialisation)
    dtype : float32 (default, as PyTorch) or float64
    backend : sampling backend for the op (see :mod:`npattn.sampling`)
    border_grad : "torchvision" (default, this layer's framework) or "mmcv": the offset
        gradient at positions exactly at -1 on either axis (right-hand derivative, or 0);
        see :func:`npattn.functional.deform_conv2d_forward`
    offset_groups : int or None
        None (default, as torchvision): the number of offset groups follows from the
        offset's channels at each call. An int states it, and a forward whose offset
        has another number of groups raises ValueError.

    State: ``weight`` (out_channels, in_channels / groups, kh, kw) and ``bias``
    (out_channels,), initialised as torchvision (kaiming_uniform(a=sqrt(5)), i.e.
    U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for both, fan_in = in_channels / groups * kh * kw).

    ``forward(x, offset, mask=None, training=False)``: offset (N, 2 G_off kh kw, out_h,
    out_w) and mask (N, G_off kh kw, out_h, out_w) as :func:`npattn.functional.deform_conv2d`
    (the number of offset groups follows from the offset's channels). ``backward`` returns
    ``((dx, doffset), params)`` or ``((dx, doffset, dmask), params)`` when a mask was
    given.
    """

    def __init__(
        self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1, bias=True,
        *, rng=None, dtype=np.float32, backend=None, border_grad="torchvision", offset_groups=None,
    ):
        super().__init__(dtype)
        op = type(self).__name__
        (self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding, self.dilation,
         self.groups) = _conv_config(op, in_channels, out_channels, kernel_size, stride, padding, dilation, groups)
        self.backend = backend
        self.border_grad = sampling.check_border_grad(op, border_grad)
        self.offset_groups = None if offset_groups is None else positive_int(op, "offset_groups", offset_groups)
        if self.offset_groups is not None and self.in_channels % self.offset_groups:
            raise ValueError(
                f"{op}: in_channels must be divisible by offset_groups, got in_channels={self.in_channels}, "
                f"offset_groups={self.offset_groups}"
            )
        self._add_conv("", make_rng(rng), self.in_channels, self.out_channels, self.kernel_size, self.groups, bias)

    def forward(self, x, offset, mask=None, *, training=False):
        """``x``, ``offset``, ``mask``: NumPy arrays, or all CUDA arrays (see
        :func:`npattn.functional.deform_conv2d_forward`): the block's parameters, NumPy
        arrays, are then copied to the device for the call, and the output and every
        gradient (parameter gradients included) are CuPy arrays."""
        xp, x = self._placed_input("x", x, 4, self.in_channels)
        return deform_conv2d_forward(
            x, offset, self._param("weight", xp), self._param("bias", xp), self.stride, self.padding, self.dilation, mask,
            backend=self.backend, border_grad=self.border_grad, offset_groups=self.offset_groups,
        )

    def backward(self, grad_out, cache):
        g = deform_conv2d_backward(grad_out, cache)
        params = {"weight": g["weight"]}
        if "bias" in g:
            params["bias"] = g["bias"]
        inputs = (g["input"], g["offset"]) + ((g["mask"],) if "mask" in g else ())
        return inputs, params


@dataclass(frozen=True)
class DeformConv2dPackCache:
    conv_offset: object  # Conv2dCache of conv_offset: x -> offset (N, 2 G K, out_h, out_w)
    deform: object  # DeformConv2dCache of the main deformable convolution


class DeformConv2dPack(Block):
    """DCNv1 layer that predicts its own offsets, as mmcv's ``DeformConv2dPack``
    (registered there as "DCN").

    Parameters
    ----------
    in_channels, out_channels : int
    kernel_size, stride, padding, dilation : int or pair (h, w)
    groups : int, weight groups
    deform_groups : int, offset groups (divides in_channels)
    bias : False. mmcv's layer has no bias (it asserts ``bias=False``); True raises.
    rng, dtype, backend : as :class:`DeformConv2d`
    border_grad : "mmcv" (default, this layer's framework) or "torchvision", as
        :class:`ModulatedDeformConv2dPack`.

    State (mmcv's keys and order): ``weight`` (out, in / groups, kh, kw) ~ U(-b, b) with
    ``b = sqrt(6 / fan_in)``, ``fan_in = in / groups * kh * kw`` (mmcv's
    ``kaiming_uniform_(nonlinearity="relu")``); ``conv_offset.weight`` (2 deform_groups
    kh kw, in, kh, kw) and ``conv_offset.bias`` zeros (a full convolution with the layer's
    kernel, stride, padding and dilation): at initialisation the layer is a plain
    convolution.

    ``forward(x, training=False)``; the module docstring gives the equations.
    ``backward`` returns ``((dx,), params)``.

    ``x`` may be a CUDA array (CuPy array, PyTorch CUDA tensor, Numba device array; needs
    CuPy): as :class:`DeformConv2d`, the parameters are copied to the device for the call,
    the offset convolution runs in CuPy and the deformable convolution on the "cuda"
    backend, and the output and every gradient are CuPy arrays (``grad_out`` must then be
    a CUDA array: a NumPy one raises ``TypeError``).
    """

    def __init__(
        self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1, deform_groups=1,
        bias=False, *, rng=None, dtype=np.float32, backend=None, border_grad="mmcv",
    ):
        super().__init__(dtype)
        op = type(self).__name__
        (self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding, self.dilation,
         self.groups) = _conv_config(op, in_channels, out_channels, kernel_size, stride, padding, dilation, groups)
        if bias is not False:
            raise ValueError(f"{op}: bias must be False (mmcv's DeformConv2dPack has no bias), got {bias!r}")
        self.border_grad = sampling.check_border_grad(op, border_grad)
        self.deform_groups = positive_int(op, "deform_groups", deform_groups)
        if self.in_channels % self.deform_groups:
            raise ValueError(
                f"{op}: in_channels must be divisible by deform_groups, got in_channels={self.in_channels}, "
                f"deform_groups={self.deform_groups}"
            )
        self.backend = backend
        rng = make_rng(rng)
        kh, kw = self.kernel_size
        bound = math.sqrt(6.0 / (self.in_channels // self.groups * kh * kw))
        self._add_param("weight", rng.uniform(-bound, bound, (self.out_channels, self.in_channels // self.groups, kh, kw)))
        n_offset = 2 * self.deform_groups * kh * kw
        self._add_param("conv_offset.weight", np.zeros((n_offset, self.in_channels, kh, kw)))
        self._add_param("conv_offset.bias", np.zeros(n_offset))

    def forward(self, x, *, training=False):
        xp, x = self._placed_input("x", x, 4, self.in_channels)
        offset, conv_cache = self._conv(
            "conv_offset.", x, stride=self.stride, padding=self.padding, dilation=self.dilation
        )  # (N, 2 G K, out_h, out_w)
        y, deform_cache = deform_conv2d_forward(
            x, offset, self._param("weight", xp), None, self.stride, self.padding, self.dilation, None,
            backend=self.backend, border_grad=self.border_grad,
        )  # (N, C_out, out_h, out_w)
        return y, DeformConv2dPackCache(conv_cache, deform_cache)

    def backward(self, grad_out, cache):
        params = self.zero_grads(array_module(cache.conv_offset.weight))  # on the forward's side
        g = deform_conv2d_backward(grad_out, cache.deform)
        params["weight"] += g["weight"]
        dx_offset = self._conv_backward("conv_offset.", g["offset"], cache.conv_offset, params)  # (N, C_in, H, W)
        dx = g["input"] + dx_offset  # (N, C_in, H, W)
        return (dx,), params


@dataclass(frozen=True)
class ModulatedDeformConv2dPackCache:
    conv_offset: object  # Conv2dCache of conv_offset: x -> t (N, 3 G K, out_h, out_w)
    sigmoid: object  # SigmoidCache: mask = sigmoid(t[:, 2GK:]) (N, G K, out_h, out_w)
    deform: object  # DeformConv2dCache of the main deformable convolution


class ModulatedDeformConv2dPack(Block):
    """DCNv2 layer that predicts its own offsets and mask, as mmcv's
    ``ModulatedDeformConv2dPack`` (registered there as "DCNv2").

    Parameters
    ----------
    in_channels, out_channels : int
    kernel_size, stride, padding, dilation : int or pair (h, w)
    groups : int, weight groups
    deform_groups : int, offset groups (divides in_channels)
    bias : bool
    rng, dtype, backend : as :class:`DeformConv2d`
    border_grad : "mmcv" (default, this layer's framework) or "torchvision", as
        :class:`DeformConv2d`. At initialisation (zero offsets) with ``padding >= 1`` the
        border taps sit exactly on ``p = -1``, where the conventions differ: mmcv's
        ``conv_offset`` gradients are those of ``border_grad="mmcv"``.

    State (mmcv's keys and order): ``weight`` (out, in / groups, kh, kw) ~
    U(-1/sqrt(in kh kw), 1/sqrt(in kh kw)) (mmcv's fan counts all input channels),
    ``bias`` (out,) zeros, ``conv_offset.weight`` (3 deform_groups kh kw, in, kh, kw) and
    ``conv_offset.bias`` zeros: at initialisation the layer is a plain convolution with
    every sample weighted by sigmoid(0) = 0.5.

    ``forward(x, training=False)``; the module docstring gives the equations.
    ``backward`` returns ``((dx,), params)``.

    ``x`` may be a CUDA array (needs CuPy): the parameters are copied to the device for
    the call, the offset convolution, the sigmoid and the concatenation run in CuPy, the
    deformable convolution on the "cuda" backend, and the output and every gradient are
    CuPy arrays (``grad_out`` must then be a CUDA array), as :class:`DeformConv2dPack`.
    """

    def __init__(
        self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1, deform_groups=1,
        bias=True, *, rng=None, dtype=np.float32, backend=None, border_grad="mmcv",
    ):
        super().__init__(dtype)
        op = type(self).__name__
        (self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding, self.dilation,
         self.groups) = _conv_config(op, in_channels, out_channels, kernel_size, stride, padding, dilation, groups)
        self.border_grad = sampling.check_border_grad(op, border_grad)
        self.deform_groups = positive_int(op, "deform_groups", deform_groups)
        if self.in_channels % self.deform_groups:
            raise ValueError(
                f"{op}: in_channels must be divisible by deform_groups, got in_channels={self.in_channels}, "
                f"deform_groups={self.deform_groups}"
            )
        self.backend = backend
        rng = make_rng(rng)
        kh, kw = self.kernel_size
        stdv = 1.0 / math.sqrt(self.in_channels * kh * kw)
        self._add_param("weight", rng.uniform(-stdv, stdv, (self.out_channels, self.in_channels // self.groups, kh, kw)))
        if bias:
            self._add_param("bias", np.zeros(self.out_channels))
        n_offset = 3 * self.deform_groups * kh * kw
        self._add_param("conv_offset.weight", np.zeros((n_offset, self.in_channels, kh, kw)))
        self._add_param("conv_offset.bias", np.zeros(n_offset))

    def forward(self, x, *, training=False):
        xp, x = self._placed_input("x", x, 4, self.in_channels)
        gk = self.deform_groups * self.kernel_size[0] * self.kernel_size[1]
        t, conv_cache = self._conv(
            "conv_offset.", x, stride=self.stride, padding=self.padding, dilation=self.dilation
        )  # (N, 3 G K, out_h, out_w)
        offset = t[:, : 2 * gk]  # cat(o1, o2): (N, 2 G K, out_h, out_w)
        z = t[:, 2 * gk :]  # (N, G K, out_h, out_w) the mask's pre-activation
        mask, sig_cache = F.sigmoid_forward(z)  # (N, G K, out_h, out_w)
        y, deform_cache = deform_conv2d_forward(
            x, offset, self._param("weight", xp), self._param("bias", xp), self.stride, self.padding, self.dilation, mask,
            backend=self.backend, border_grad=self.border_grad,
        )
        return y, ModulatedDeformConv2dPackCache(conv_cache, sig_cache, deform_cache)

    def backward(self, grad_out, cache):
        xp = array_module(cache.conv_offset.weight)  # the forward's side: NumPy or CuPy
        params = self.zero_grads(xp)
        g = deform_conv2d_backward(grad_out, cache.deform)
        params["weight"] += g["weight"]
        if "bias" in g:
            params["bias"] += g["bias"]
        dz = F.sigmoid_backward(g["mask"], cache.sigmoid)["x"]  # (N, G K, out_h, out_w)
        dt = xp.concatenate([g["offset"], dz], axis=1)  # (N, 3 G K, out_h, out_w)
        dx_offset = self._conv_backward("conv_offset.", dt, cache.conv_offset, params)  # (N, C_in, H, W)
        dx = g["input"] + dx_offset  # (N, C_in, H, W)
        return (dx,), params


@dataclass(frozen=True)
class ConvOffset2DCache:
    x_shape: tuple  # (N, C, H, W)
    conv: object  # Conv2dCache: x -> t (N, 2C, H, W)
    sampling: object  # BatchMapOffsetsCache: (N C, H, W) maps at (N C, H, W, 2) offsets


class ConvOffset2D(Block):
    """The seed's deformable sampling layer (oeway/pytorch-deform-conv ``ConvOffset2D``).

    A ``Conv2d(filters, 2 * filters, 3, padding=1, bias=False)`` predicts offsets from
    ``x`` (N, C, H, W), C = filters, and every channel of ``x`` is bilinearly resampled at
    its pixel grid plus those offsets. The output has the shape of ``x``. It reproduces the
    original code exactly, including its quirks:

    - **Per-channel offsets.** Each of the C channels gets its own offset field (there
      are 2C offset channels), unlike deformable convolution where one field is shared
      by the channels of an offset group and there is one offset per kernel tap.
    - **The offsets are a memory reinterpretation, not a permute.** The conv output
      (N, 2C, H, W) is viewed as (N C, H, W, 2) (``.view`` on contiguous memory): pixel
      (i, j) of channel c takes its (delta_row, delta_col) from the flat positions
      ``2 (i W + j)`` and ``2 (i W + j) + 1`` of the 2 H W values that conv channels
      ``2c`` and ``2c + 1`` form together. So the first half of the map's pixels read
      both components from channel ``2c`` and the second half from ``2c + 1``; it is
      not ``(delta_row, delta_col) = (t[2c], t[2c+1])`` at the same pixel.
    - **Border clamping.** Positions are clamped to [0, H-1] and [0, W-1] per axis
      (border replication), not zero-padded.
    - **Zero coordinate gradient at integer positions.** The corners are floor and ceil,
      which coincide at an integer coordinate, so the offset gradient is 0 there (at
      initialisation-sized offsets near 0 this matters). It is also 0 where the clamp is
      active (strictly outside the range).
    - The conv has no bias; its weight is initialised N(0, init_normal_stddev = 0.01).

    Parameters
    ----------
    filters : int, the number of channels of x
    init_normal_stddev : float
    rng, dtype, backend : as :class:`DeformConv2d`

    State: ``weight`` (2 filters, filters, 3, 3).
    ``forward(x, training=False)``; ``backward`` returns ``((dx,), {"weight": ...})``,
    dx including the path through the offset conv.

    ``x`` may be a CUDA array (needs CuPy): the weight is copied to the device for the
    call, the offset convolution runs in CuPy and the sampling on the "cuda" backend, and
    the output and every gradient are CuPy arrays (``grad_out`` must then be a CUDA array),
    as :class:`DeformConv2dPack`.
    """

    def __init__(self, filters, init_normal_stddev=0.01, *, rng=None, dtype=np.float32, backend=None):
        super().__init__(dtype)
        op = type(self).__name__
        self.filters = positive_int(op, "filters", filters)
        self.init_normal_stddev = float(init_normal_stddev)
        self.backend = backend
        rng = make_rng(rng)
        self._add_param("weight", rng.normal(0.0, self.init_normal_stddev, (2 * self.filters, self.filters, 3, 3)))

    def forward(self, x, *, training=False):
        _, x = self._placed_input("x", x, 4, self.filters)
        self._check_image("x", x, "the seed's 3x3 offset convolution, padding 1, refuses an empty image in PyTorch")
        N, C, H, W = x.shape
        t, conv_cache = self._conv("", x, stride=1, padding=1)  # (N, 2C, H, W)
        off = t.reshape(N * C, H, W, 2)  # the seed's .view(b*c, h, w, 2) of the same memory
        y_maps, map_cache = batch_map_offsets_forward(x.reshape(N * C, H, W), off, backend=self.backend)  # (N C, H, W)
        y = y_maps.reshape(N, C, H, W)  # (N, C, H, W)
        return y, ConvOffset2DCache(x.shape, conv_cache, map_cache)

    def backward(self, grad_out, cache):
        N, C, H, W = cache.x_shape
        xp = array_module(cache.conv.weight)  # the forward's side: NumPy or CuPy
        params = self.zero_grads(xp)
        grad_out = like_forward(type(self).__name__, "grad_out", grad_out, xp)
        grad_out = self._check_input("grad_out", grad_out, 4, C, xp=xp)
        if grad_out.shape != (N, C, H, W):
            raise ValueError(f"{type(self).__name__}: grad_out must have shape {(N, C, H, W)}, got {tuple(grad_out.shape)}")
        g = batch_map_offsets_backward(grad_out.reshape(N * C, H, W), cache.sampling)
        doff = g["offsets"]  # (N C, H, W, 2)
        dt = doff.reshape(N, 2 * C, H, W)  # (N, 2C, H, W): undo the reinterpretation
        dx_conv = self._conv_backward("", dt, cache.conv, params)  # (N, C, H, W)
        dx = g["input"].reshape(N, C, H, W) + dx_conv  # (N, C, H, W)
        return (dx,), params
