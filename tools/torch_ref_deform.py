"""The PyTorch versions of npattn's deformable blocks, for the cross-check tests and the
golden tooling.

- ``th_batch_map_coordinates`` / ``th_batch_map_offsets`` / ``ConvOffset2D``: the seed's
  code (oeway/pytorch-deform-conv, ``torch_deform_conv/deform_conv.py`` and
  ``layers.py``) written for current PyTorch: the grid is (row, col) as
  ``meshgrid(..., indexing="ij")``, each axis is clamped on its own (``[0, H-1]`` and
  ``[0, W-1]``, as upstream does; the blog copy clamps both to ``input.size(1) - 1``),
  corners are floor and ceil, the offsets of ``ConvOffset2D`` are the conv output viewed
  as ``(b*c, h, w, 2)``. Deliberate changes, none of which changes a number on finite
  input: no ``Variable``, ``torch.arange`` instead of the removed ``torch.range``, no
  cached grid, the sampling returns ``(b, h*w)`` as the original does.
- ``DeformConv2d``: ``torchvision.ops.DeformConv2d`` itself.
- ``ModulatedDeformConv2dPack``: mmcv's layer composed from ``nn.Conv2d``,
  ``torch.chunk``, ``torch.sigmoid`` and ``torchvision.ops.deform_conv2d`` (mmcv is not
  needed; its kernel equals torchvision's except for the offset gradient at exactly
  ``p = -1``).

``make_torch_block(np_block)`` returns the matching module in float64 with the npattn
block's state_dict loaded.
"""

from __future__ import annotations

import numpy as np
import torch
import torchvision
from torch import nn

__all__ = [
    "th_generate_grid", "th_batch_map_coordinates", "th_batch_map_offsets", "ConvOffset2D",
    "DeformConv2d", "ModulatedDeformConv2dPack", "TORCH_CLASSES", "make_torch_block",
]


def th_generate_grid(batch_size, height, width, dtype):
    """(batch_size, h*w, 2) pixel grid of (row, col) pairs, rows varying slowest."""
    rows, cols = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    grid = torch.stack([rows, cols], dim=-1).reshape(1, height * width, 2).to(dtype)
    return grid.expand(batch_size, height * width, 2)


def th_batch_map_coordinates(input, coords):
    """input (b, h, w), coords (b, n, 2) as (row, col) -> (b, n): clamp per axis, bilinear
    with floor and ceil corners, the seed's formula and order of operations."""
    batch_size, height, width = input.shape
    n_coords = coords.size(1)
    coords = torch.cat(
        (torch.clamp(coords.narrow(2, 0, 1), 0, height - 1), torch.clamp(coords.narrow(2, 1, 1), 0, width - 1)), 2
    )
    coords_lt = coords.floor().long()
    coords_rb = coords.ceil().long()
    coords_lb = torch.stack([coords_lt[..., 0], coords_rb[..., 1]], 2)
    coords_rt = torch.stack([coords_rb[..., 0], coords_lt[..., 1]], 2)
    idx = torch.arange(batch_size).repeat_interleave(n_coords)

    def gather(c):
        flat = idx * (height * width) + c[..., 0].reshape(-1) * width + c[..., 1].reshape(-1)
        return input.reshape(-1).index_select(0, flat).view(batch_size, n_coords)

    vals_lt = gather(coords_lt.detach())
    vals_rb = gather(coords_rb.detach())
    vals_lb = gather(coords_lb.detach())
    vals_rt = gather(coords_rt.detach())
    coords_offset_lt = coords - coords_lt.type(coords.dtype)
    vals_t = coords_offset_lt[..., 0] * (vals_rt - vals_lt) + vals_lt
    vals_b = coords_offset_lt[..., 0] * (vals_rb - vals_lb) + vals_lb
    return coords_offset_lt[..., 1] * (vals_b - vals_t) + vals_t


def th_batch_map_offsets(input, offsets):
    """input (b, h, w), offsets (b, h, w, 2) -> (b, h*w), as the seed."""
    batch_size, height, width = input.shape
    offsets = offsets.reshape(batch_size, -1, 2)
    grid = th_generate_grid(batch_size, height, width, offsets.dtype)
    return th_batch_map_coordinates(input, offsets + grid)


class ConvOffset2D(nn.Conv2d):
    """The seed's layer: 3x3 conv to 2c offset channels, viewed as (b*c, h, w, 2)."""

    def __init__(self, filters, init_normal_stddev=0.01):
        self.filters = filters
        super().__init__(filters, 2 * filters, 3, padding=1, bias=False)
        with torch.no_grad():
            self.weight.normal_(0.0, init_normal_stddev)

    def forward(self, x):
        b, c, h, w = x.shape
        offsets = super().forward(x).contiguous().view(-1, h, w, 2)  # (b*c, h, w, 2)
        x_bc = x.contiguous().view(-1, h, w)  # (b*c, h, w)
        return th_batch_map_offsets(x_bc, offsets).view(b, c, h, w)


DeformConv2d = torchvision.ops.DeformConv2d


class ModulatedDeformConv2dPack(nn.Module):
    """mmcv's ModulatedDeformConv2dPack (DCNv2) composed from torch and torchvision ops."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1,
                 deform_groups=1, bias=True):
        super().__init__()
        kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
        self.stride, self.padding, self.dilation = stride, padding, dilation
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, kh, kw))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        stdv = 1.0 / (in_channels * kh * kw) ** 0.5
        with torch.no_grad():
            self.weight.uniform_(-stdv, stdv)
        self.conv_offset = nn.Conv2d(in_channels, 3 * deform_groups * kh * kw, (kh, kw), stride=stride,
                                     padding=padding, dilation=dilation, bias=True)
        with torch.no_grad():
            self.conv_offset.weight.zero_()
            self.conv_offset.bias.zero_()

    def forward(self, x):
        out = self.conv_offset(x)
        o1, o2, mask = torch.chunk(out, 3, dim=1)
        offset = torch.cat((o1, o2), dim=1)
        mask = torch.sigmoid(mask)
        return torchvision.ops.deform_conv2d(x, offset, self.weight, self.bias, self.stride, self.padding,
                                             self.dilation, mask)


TORCH_CLASSES = {
    "ConvOffset2D": ConvOffset2D,
    "DeformConv2d": DeformConv2d,
    "ModulatedDeformConv2dPack": ModulatedDeformConv2dPack,
}


def torch_config(np_block):
    """Constructor arguments of the torch module matching an npattn block."""
    name = type(np_block).__name__
    b = np_block
    if name == "ConvOffset2D":
        return dict(filters=b.filters, init_normal_stddev=b.init_normal_stddev)
    if name == "DeformConv2d":
        return dict(in_channels=b.in_channels, out_channels=b.out_channels, kernel_size=b.kernel_size,
                    stride=b.stride, padding=b.padding, dilation=b.dilation, groups=b.groups,
                    bias="bias" in b.parameter_names())
    if name == "ModulatedDeformConv2dPack":
        return dict(in_channels=b.in_channels, out_channels=b.out_channels, kernel_size=b.kernel_size,
                    stride=b.stride, padding=b.padding, dilation=b.dilation, groups=b.groups,
                    deform_groups=b.deform_groups, bias="bias" in b.parameter_names())
    raise TypeError(f"make_torch_block: no PyTorch version of {name}")


def make_torch_block(np_block, dtype=torch.float64):
    """The torch module matching ``np_block``, in ``dtype`` (float64 by default), with the
    npattn block's state_dict loaded, in eval mode."""
    module = TORCH_CLASSES[type(np_block).__name__](**torch_config(np_block)).to(dtype)
    state = {k: torch.from_numpy(np.array(v)) for k, v in np_block.state_dict().items()}
    module.load_state_dict(state, strict=True)
    return module.eval()
