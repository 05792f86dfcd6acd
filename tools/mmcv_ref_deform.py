"""mmcv's deformable-convolution kernels as float64 Python loops: a test-only oracle for
npattn's ``border_grad="mmcv"`` convention.

mmcv computes DCNv1 (``deform_conv_cuda_kernel.cuh``) and DCNv2
(``modulated_deform_conv_cuda_kernel.cuh``) with the same three kernels, im2col, col2im
and col2im_coord, built from three scalar rules; this module restates that logic one
scalar at a time, structured as mmcv's kernels are (not as npattn's backends are), so it
is an independent check of npattn rather than a second copy of it:

* the sample (mmcv's im2col): 0 unless ``-1 < h < H`` and ``-1 < w < W``; otherwise the
  bilinear blend of the corners ``floor`` and ``floor + 1``, corners outside the image
  reading 0;
* the input gradient (mmcv's col2im): from the truncated position ``int(h), int(w)``
  (C's cast, towards zero) mmcv visits the 5 x 5 neighbourhood and adds to every pixel
  in the image closer than 1 on both axes the corner weight of that pixel, which is 0
  unless ``-1 < h < H`` and ``-1 < w < W``;
* the offset gradient (mmcv's coordinate weight): 0 when ``h <= -1``, ``h >= H``,
  ``w <= -1`` or ``w >= W``; otherwise the derivative of the bilinear blend on the cell
  ``[floor h, floor h + 1] x [floor w, floor w + 1]``, written as mmcv writes it:
  per in-image corner, plus or minus the distance weight along the other axis times the
  pixel;
* the mask gradient (DCNv2): the sum over the group's channels of the column gradient
  times the sample, only where the position samples.

Only finite offsets are supported (mmcv's C code would cast a NaN to an integer).

``deform_conv2d(...)`` and ``deform_conv2d_backward(...)`` take torchvision's argument
layout (which mmcv shares); ``make_torch_block(np_block)`` composes mmcv's two layers,
``DeformConv2dPack`` and ``ModulatedDeformConv2dPack``, from ``torch.nn.Conv2d`` and
these loops (wrapped in a ``torch.autograd.Function``), for the golden cross-check.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = [
    "sample", "corner_weight", "coordinate_weight", "deform_conv2d", "deform_conv2d_backward",
    "make_torch_block",
]


def _pixel(img, r, c):
    """img[r, c], or 0 for a pixel outside the image."""
    height, width = img.shape
    if 0 <= r < height and 0 <= c < width:
        return float(img[r, c])
    return 0.0


def sample(img, h, w):
    """mmcv's sampled value at (h, w) (float64)."""
    height, width = img.shape
    if not (h > -1 and w > -1 and h < height and w < width):
        return 0.0
    r0, c0 = math.floor(h), math.floor(w)
    dh, dw = h - r0, w - c0  # distances from the top-left corner
    return ((1 - dh) * (1 - dw) * _pixel(img, r0, c0) + (1 - dh) * dw * _pixel(img, r0, c0 + 1)
            + dh * (1 - dw) * _pixel(img, r0 + 1, c0) + dh * dw * _pixel(img, r0 + 1, c0 + 1))


def corner_weight(h, w, r, c, height, width):
    """Weight of pixel (r, c) in the sample at (h, w); 0 outside mmcv's support."""
    if h <= -1 or h >= height or w <= -1 or w >= width:
        return 0.0
    r0, c0 = math.floor(h), math.floor(w)
    if r == r0:
        wr = r + 1 - h
    elif r == r0 + 1:
        wr = h + 1 - r
    else:
        return 0.0
    if c == c0:
        wc = c + 1 - w
    elif c == c0 + 1:
        wc = w + 1 - c
    else:
        return 0.0
    return wr * wc


def coordinate_weight(h, w, img, axis):
    """d sample / d h (axis 0) or d sample / d w (axis 1) on the cell of (h, w), with
    mmcv's range test first: 0 unless -1 < h < H and -1 < w < W."""
    height, width = img.shape
    if h <= -1 or h >= height or w <= -1 or w >= width:
        return 0.0
    r0, c0 = math.floor(h), math.floor(w)
    r1, c1 = r0 + 1, c0 + 1
    top_ok, bottom_ok = r0 >= 0, r1 <= height - 1
    left_ok, right_ok = c0 >= 0, c1 <= width - 1
    total = 0.0
    if axis == 0:  # moving down: the bottom corners gain, the top ones lose
        if top_ok and left_ok:
            total -= (c0 + 1 - w) * float(img[r0, c0])
        if top_ok and right_ok:
            total -= (w - c0) * float(img[r0, c1])
        if bottom_ok and left_ok:
            total += (c0 + 1 - w) * float(img[r1, c0])
        if bottom_ok and right_ok:
            total += (w - c0) * float(img[r1, c1])
    else:  # moving right: the right corners gain, the left ones lose
        if top_ok and left_ok:
            total -= (r0 + 1 - h) * float(img[r0, c0])
        if top_ok and right_ok:
            total += (r0 + 1 - h) * float(img[r0, c1])
        if bottom_ok and left_ok:
            total -= (h - r0) * float(img[r1, c0])
        if bottom_ok and right_ok:
            total += (h - r0) * float(img[r1, c1])
    return total


def _pair(v):
    return (int(v), int(v)) if np.isscalar(v) else (int(v[0]), int(v[1]))


class _Geometry:
    def __init__(self, x, offset, weight, stride, padding, dilation):
        self.n, self.c_in, self.height, self.width = x.shape
        self.c_out, self.c_per_wg, self.kh, self.kw = weight.shape
        self.stride, self.padding, self.dilation = _pair(stride), _pair(padding), _pair(dilation)
        self.out_h, self.out_w = offset.shape[2], offset.shape[3]
        self.taps = self.kh * self.kw
        self.groups_off = offset.shape[1] // (2 * self.taps)
        self.c_per_og = self.c_in // self.groups_off
        self.groups_w = self.c_in // self.c_per_wg
        self.out_per_wg = self.c_out // self.groups_w

    def position(self, offset, b, g, i, j, oy, ox):
        """(h, w) of tap (i, j) of output (oy, ox) in offset group g of image b."""
        k = g * self.taps + i * self.kw + j
        h = oy * self.stride[0] - self.padding[0] + i * self.dilation[0] + float(offset[b, 2 * k, oy, ox])
        w = ox * self.stride[1] - self.padding[1] + j * self.dilation[1] + float(offset[b, 2 * k + 1, oy, ox])
        return h, w

    def modulation(self, mask, b, g, i, j, oy, ox):
        return 1.0 if mask is None else float(mask[b, g * self.taps + i * self.kw + j, oy, ox])

    def positions(self):
        for b in range(self.n):
            for c in range(self.c_in):
                for i in range(self.kh):
                    for j in range(self.kw):
                        for oy in range(self.out_h):
                            for ox in range(self.out_w):
                                yield b, c, i, j, oy, ox


def _columns(x, offset, mask, geo):
    """mmcv's im2col: cols[b, c, i, j, oy, ox] = mask * sample."""
    cols = np.zeros((geo.n, geo.c_in, geo.kh, geo.kw, geo.out_h, geo.out_w))
    for b, c, i, j, oy, ox in geo.positions():
        g = c // geo.c_per_og
        h, w = geo.position(offset, b, g, i, j, oy, ox)
        cols[b, c, i, j, oy, ox] = sample(x[b, c], h, w) * geo.modulation(mask, b, g, i, j, oy, ox)
    return cols


def deform_conv2d(x, offset, weight, bias=None, stride=1, padding=0, dilation=1, mask=None):
    """Forward in float64: torchvision's layout (offset (N, 2 G K, oh, ow) as (dy, dx)
    pairs per group and tap, mask (N, G K, oh, ow) or None)."""
    x, offset, weight = (np.asarray(a, dtype=np.float64) for a in (x, offset, weight))
    geo = _Geometry(x, offset, weight, stride, padding, dilation)
    cols = _columns(x, offset, mask, geo)
    out = np.zeros((geo.n, geo.c_out, geo.out_h, geo.out_w))
    for b in range(geo.n):
        for o in range(geo.c_out):
            wg = o // geo.out_per_wg
            for cl in range(geo.c_per_wg):
                c = wg * geo.c_per_wg + cl
                for i in range(geo.kh):
                    for j in range(geo.kw):
                        out[b, o] += weight[o, cl, i, j] * cols[b, c, i, j]
            if bias is not None:
                out[b, o] += float(bias[o])
    return out


def deform_conv2d_backward(dy, x, offset, weight, bias=None, stride=1, padding=0, dilation=1, mask=None):
    """Gradients in float64, by mmcv's kernels: dict with input, offset, weight, and bias
    / mask when given."""
    x, offset, weight, dy = (np.asarray(a, dtype=np.float64) for a in (x, offset, weight, dy))
    if not (np.all(np.isfinite(offset)) and (mask is None or np.all(np.isfinite(mask)))):
        raise ValueError("mmcv_ref_deform: only finite offsets and masks are supported")
    geo = _Geometry(x, offset, weight, stride, padding, dilation)
    cols = _columns(x, offset, mask, geo)

    # column gradient: d_cols[b, c, i, j] = sum over the weight group's outputs o of weight * dy
    d_cols = np.zeros_like(cols)
    for b, c, i, j, oy, ox in geo.positions():
        wg, cl = divmod(c, geo.c_per_wg)
        acc = 0.0
        for o in range(wg * geo.out_per_wg, (wg + 1) * geo.out_per_wg):
            acc += weight[o, cl, i, j] * dy[b, o, oy, ox]
        d_cols[b, c, i, j, oy, ox] = acc

    # col2im (mmcv's neighbourhood search around the truncated position)
    d_x = np.zeros_like(x)
    for b, c, i, j, oy, ox in geo.positions():
        g = c // geo.c_per_og
        h, w = geo.position(offset, b, g, i, j, oy, ox)
        top = d_cols[b, c, i, j, oy, ox] * geo.modulation(mask, b, g, i, j, oy, ox)
        if abs(h) > 1e9 or abs(w) > 1e9:  # far outside: every weight is 0 (and int() stays small)
            continue
        rh, rw = int(h), int(w)  # truncation towards zero, as C's cast
        for dr in range(-2, 3):
            for dc in range(-2, 3):
                r, cc = rh + dr, rw + dc
                if 0 <= r < geo.height and 0 <= cc < geo.width and abs(h - r) < 1 and abs(w - cc) < 1:
                    d_x[b, c, r, cc] += corner_weight(h, w, r, cc, geo.height, geo.width) * top

    # col2im_coord: per offset channel, the sum over the group's channels
    d_offset = np.zeros_like(offset)
    d_mask = None if mask is None else np.zeros(np.shape(mask))
    for b in range(geo.n):
        for g in range(geo.groups_off):
            for i in range(geo.kh):
                for j in range(geo.kw):
                    k = g * geo.taps + i * geo.kw + j
                    for oy in range(geo.out_h):
                        for ox in range(geo.out_w):
                            h, w = geo.position(offset, b, g, i, j, oy, ox)
                            m = geo.modulation(mask, b, g, i, j, oy, ox)
                            inside = h > -1 and w > -1 and h < geo.height and w < geo.width
                            acc_h = acc_w = acc_m = 0.0
                            for c in range(g * geo.c_per_og, (g + 1) * geo.c_per_og):
                                dc = d_cols[b, c, i, j, oy, ox]
                                acc_h += coordinate_weight(h, w, x[b, c], 0) * dc * m
                                acc_w += coordinate_weight(h, w, x[b, c], 1) * dc * m
                                if inside:
                                    acc_m += dc * sample(x[b, c], h, w)
                            d_offset[b, 2 * k, oy, ox] = acc_h
                            d_offset[b, 2 * k + 1, oy, ox] = acc_w
                            if d_mask is not None:
                                d_mask[b, k, oy, ox] = acc_m

    # weight gradient from the forward's columns
    d_weight = np.zeros_like(weight)
    for o in range(geo.c_out):
        wg = o // geo.out_per_wg
        for cl in range(geo.c_per_wg):
            c = wg * geo.c_per_wg + cl
            for i in range(geo.kh):
                for j in range(geo.kw):
                    d_weight[o, cl, i, j] = float(np.sum(dy[:, o] * cols[:, c, i, j]))
    grads = {"input": d_x, "offset": d_offset, "weight": d_weight}
    if bias is not None:
        grads["bias"] = dy.sum(axis=(0, 2, 3))
    if mask is not None:
        grads["mask"] = d_mask
    return grads


# ---- PyTorch composition of mmcv's layers (for tools/torch_crosscheck.py) -------------


def _torch_function():
    import torch

    class MMCVDeformConv2d(torch.autograd.Function):
        """The loops above as an autograd function (float64, CPU)."""

        @staticmethod
        def forward(ctx, x, offset, weight, mask, stride, padding, dilation):
            ctx.geometry = (stride, padding, dilation)
            ctx.has_mask = mask is not None
            ctx.save_for_backward(x, offset, weight, *(() if mask is None else (mask,)))
            out = deform_conv2d(x.detach().numpy(), offset.detach().numpy(), weight.detach().numpy(), None,
                                stride, padding, dilation, None if mask is None else mask.detach().numpy())
            return torch.from_numpy(out)

        @staticmethod
        def backward(ctx, dy):
            x, offset, weight, *rest = ctx.saved_tensors
            mask = rest[0].numpy() if ctx.has_mask else None
            g = deform_conv2d_backward(dy.numpy(), x.numpy(), offset.numpy(), weight.numpy(), None,
                                       *ctx.geometry, mask)
            d_mask = torch.from_numpy(g["mask"]) if ctx.has_mask else None
            return (torch.from_numpy(g["input"]), torch.from_numpy(g["offset"]), torch.from_numpy(g["weight"]),
                    d_mask, None, None, None)

    return MMCVDeformConv2d


def make_torch_block(np_block):
    """mmcv's ``DeformConv2dPack`` or ``ModulatedDeformConv2dPack`` in float64: the offset
    conv, chunk and sigmoid from torch, the deformable convolution from mmcv's kernels
    (``border_grad="mmcv"``) or from ``torchvision.ops.deform_conv2d`` ("torchvision"),
    with the npattn block's state_dict loaded, in eval mode."""
    import torch
    import torchvision
    from torch import nn

    name = type(np_block).__name__
    if name not in ("DeformConv2dPack", "ModulatedDeformConv2dPack"):
        raise TypeError(f"mmcv_ref_deform.make_torch_block: no mmcv composition of {name}")
    b = np_block
    mmcv_fn = _torch_function()
    chunks = 2 if name == "DeformConv2dPack" else 3

    def deform(x, offset, weight, bias, mask):
        if b.border_grad == "mmcv":
            y = mmcv_fn.apply(x, offset, weight, mask, b.stride, b.padding, b.dilation)
            return y if bias is None else y + bias[None, :, None, None]
        return torchvision.ops.deform_conv2d(x, offset, weight, bias, b.stride, b.padding, b.dilation, mask)

    class Pack(nn.Module):
        def __init__(self):
            super().__init__()
            kh, kw = b.kernel_size
            self.weight = nn.Parameter(torch.zeros(b.out_channels, b.in_channels // b.groups, kh, kw, dtype=torch.float64))
            if "bias" in b.parameter_names():
                self.bias = nn.Parameter(torch.zeros(b.out_channels, dtype=torch.float64))
            else:
                self.bias = None
            self.conv_offset = nn.Conv2d(b.in_channels, chunks * b.deform_groups * kh * kw, (kh, kw), stride=b.stride,
                                         padding=b.padding, dilation=b.dilation, bias=True).double()

        def forward(self, x):
            t = self.conv_offset(x)
            if chunks == 2:
                return deform(x, t, self.weight, self.bias, None)
            o1, o2, m = torch.chunk(t, 3, dim=1)
            return deform(x, torch.cat((o1, o2), dim=1), self.weight, self.bias, torch.sigmoid(m))

    module = Pack()
    module.load_state_dict({k: torch.from_numpy(np.array(v, dtype=np.float64)) for k, v in b.state_dict().items()},
                           strict=True)
    return module.eval()
