"""Deformable convolution blocks: Dai et al., "Deformable Convolutional Networks" (ICCV
2017) and Zhu et al., "Deformable ConvNets v2" (CVPR 2019).

Four blocks:

``DeformConv2d``
    torchvision.ops.DeformConv2d: ``forward(x, offset, mask=None)`` is
    :func:`npattn.functional.deform_conv2d` with the block's ``weight`` and ``bias``.

``DeformConv2dPack``
    mmcv's DCNv1 layer, which predicts its own offsets (no mask, no bias)::

        offset = conv_offset(x)                              (N, 2 G K, out_h, out_w)
        y = deform_conv2d(x, offset, weight, None, stride, padding, dilation)

    Backward::

        d_x(1), d_offset, d_weight = deform_conv2d_backward(dy)
        d_x(2), d_conv_offset.weight, d_conv_offset.bias = conv2d_backward(d_offset)
        d_x = d_x(1) + d_x(2)

``ModulatedDeformConv2dPack``
    mmcv's DCNv2 layer, which predicts its own offsets and mask::

        t = conv_offset(x)                                   (N, 3 G K, out_h, out_w), K = kh kw
        o1, o2, m = t[:, :GK], t[:, GK:2GK], t[:, 2GK:]      (torch.chunk(t, 3, dim=1))
        offset = cat(o1, o2) = t[:, :2GK]                    (read as (dy, dx) pairs per group and tap)
        mask = sigmoid(m)
        y = deform_conv2d(x, offset, weight, bias, stride, padding, dilation, mask)

    Backward, in reverse::

        d_x(1), d_offset, d_mask, d_weight, d_bias = deform_conv2d_backward(dy)
        d_m = d_mask * mask * (1 - mask)
        d_t = cat(d_offset, d_m)
        d_x(2), d_conv_offset.weight, d_conv_offset.bias = conv2d_backward(d_t)
        d_x = d_x(1) + d_x(2)

``ConvOffset2D``
    the seed's layer (oeway/pytorch-deform-conv): a 3x3 convolution predicts offsets and
    every channel is resampled at its own offset positions (the layer does not convolve
    the resampled map). See its docstring for the quirks it reproduces::

        t = conv(x)                        (b, 2c, h, w), Conv2d(c, 2c, 3, padding=1, bias=False)
        off = t.reshape(b*c, h, w, 2)      memory reinterpretation, not a permute
        y = batch_map_offsets(x.reshape(b*c, h, w), off).reshape(b, c, h, w)

    Backward::

        d_x(1), d_off = batch_map_offsets_backward(dy.reshape(b*c, h, w))
        d_t = d_off.reshape(b, 2c, h, w)
        d_x(2), d_weight = conv2d_backward(d_t)
        d_x = d_x(1).reshape(b, c, h, w) + d_x(2)
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
    ``((d_x, d_offset), params)`` or ``((d_x, d_offset, d_mask), params)`` when a mask was
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
    ``backward`` returns ``((d_x,), params)``.

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
        d_x_offset = self._conv_backward("conv_offset.", g["offset"], cache.conv_offset, params)  # (N, C_in, H, W)
        d_x = g["input"] + d_x_offset  # (N, C_in, H, W)
        return (d_x,), params


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
    ``backward`` returns ``((d_x,), params)``.

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
        mask, sig_cache = F.sigmoid_forward(t[:, 2 * gk :])  # (N, G K, out_h, out_w)
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
        d_m = F.sigmoid_backward(g["mask"], cache.sigmoid)["x"]  # (N, G K, out_h, out_w)
        d_t = xp.concatenate([g["offset"], d_m], axis=1)  # (N, 3 G K, out_h, out_w)
        d_x_offset = self._conv_backward("conv_offset.", d_t, cache.conv_offset, params)  # (N, C_in, H, W)
        d_x = g["input"] + d_x_offset  # (N, C_in, H, W)
        return (d_x,), params


@dataclass(frozen=True)
class ConvOffset2DCache:
    x_shape: tuple  # (b, c, h, w)
    conv: object  # Conv2dCache: x -> t (b, 2c, h, w)
    sampling: object  # BatchMapOffsetsCache: (b*c, h, w) maps at (b*c, h, w, 2) offsets


class ConvOffset2D(Block):
    """The seed's deformable sampling layer (oeway/pytorch-deform-conv ``ConvOffset2D``).

    A ``Conv2d(filters, 2 * filters, 3, padding=1, bias=False)`` predicts offsets from
    ``x`` (b, c, h, w), c = filters, and every channel of ``x`` is bilinearly resampled at
    its pixel grid plus those offsets. The output has the shape of ``x``. It reproduces the
    original code exactly, including its quirks:

    - **Per-channel offsets.** Each of the c channels gets its own offset field (there
      are 2c offset channels), unlike deformable convolution where one field is shared
      by the channels of an offset group and there is one offset per kernel tap.
    - **The offsets are a memory reinterpretation, not a permute.** The conv output
      (b, 2c, h, w) is viewed as (b*c, h, w, 2) (``.view`` on contiguous memory): pixel
      (i, j) of channel c takes its (d_row, d_col) from the flat positions
      ``2 (i w + j)`` and ``2 (i w + j) + 1`` of the 2hw values that conv channels
      ``2c`` and ``2c + 1`` form together. So the first half of the map's pixels read
      both components from channel ``2c`` and the second half from ``2c + 1``; it is
      not ``(d_row, d_col) = (t[2c], t[2c+1])`` at the same pixel.
    - **Border clamping.** Positions are clamped to [0, h-1] and [0, w-1] per axis
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
    ``forward(x, training=False)``; ``backward`` returns ``((d_x,), {"weight": ...})``,
    d_x including the path through the offset conv.

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
        b, c, h, w = x.shape
        t, conv_cache = self._conv("", x, stride=1, padding=1)  # (b, 2c, h, w)
        off = t.reshape(b * c, h, w, 2)  # the seed's .view(b*c, h, w, 2) of the same memory
        y, map_cache = batch_map_offsets_forward(x.reshape(b * c, h, w), off, backend=self.backend)  # (b*c, h, w)
        return y.reshape(b, c, h, w), ConvOffset2DCache(x.shape, conv_cache, map_cache)

    def backward(self, grad_out, cache):
        b, c, h, w = cache.x_shape
        xp = array_module(cache.conv.weight)  # the forward's side: NumPy or CuPy
        params = self.zero_grads(xp)
        grad_out = like_forward(type(self).__name__, "grad_out", grad_out, xp)
        grad_out = self._check_input("grad_out", grad_out, 4, c, xp=xp)
        if grad_out.shape != (b, c, h, w):
            raise ValueError(f"{type(self).__name__}: grad_out must have shape {(b, c, h, w)}, got {tuple(grad_out.shape)}")
        g = batch_map_offsets_backward(grad_out.reshape(b * c, h, w), cache.sampling)
        d_t = g["offsets"].reshape(b, 2 * c, h, w)  # (b, 2c, h, w): undo the reinterpretation
        d_x_conv = self._conv_backward("", d_t, cache.conv, params)  # (b, c, h, w)
        d_x = g["input"].reshape(b, c, h, w) + d_x_conv  # (b, c, h, w)
        return (d_x,), params
