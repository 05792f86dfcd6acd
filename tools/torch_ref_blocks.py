"""The PyTorch versions of npattn's blocks, written from the original code the seed quotes
(TeodorPoncu/selective-kernel-conv, YimianDai/open-aff ``aff_pytorch``, z-x-yang/GCT) and
from the common PyTorch layout of squeeze-and-excitation.

They are what npattn is compared with (tests/crosscheck, the golden fixtures, the speed
benchmark). Changes from the original code, all deliberate:

- ``iAFF`` takes ``share_global_att``: True (default) is the published code, whose second
  pass reuses ``global_att``; False uses ``global_att2`` as the paper and the MXNet code do.
- ``GCT`` raises ``ValueError`` for an unknown mode (the original calls ``sys.exit()``
  without importing sys).
- ``SEBlock`` takes ``bias`` (the common layout has none; the Caffe model has biases).
- ``SelectiveConv`` takes ``bias`` (False: no conv, linear or projection biases, as the
  authors' Caffe release).
- ``make_torch_block`` gives every BatchNorm the npattn block's ``bn_momentum`` and
  ``bn_eps``.
- ``ReLU(inplace=True)`` of open-aff is kept; it changes no number.

``make_torch_block(np_block)`` returns the matching module in float64 with the npattn
block's state_dict loaded (BatchNorm buffers included), in eval mode.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "SEBlock", "SelectiveConv", "Flatten", "DAF", "AFF", "iAFF", "MS_CAM", "GCT",
    "make_torch_block", "TORCH_CLASSES",
]


class SEBlock(nn.Module):
    def __init__(self, channels, reduction=16, bias=False):
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Sequential(
            nn.Linear(channels, channels // reduction, bias=bias),
            nn.ReLU(inplace=True),
            nn.Linear(channels // reduction, channels, bias=bias),
            nn.Sigmoid(),
        )

    def forward(self, x):
        b, c, _, _ = x.size()
        y = self.avg_pool(x).view(b, c)
        y = self.fc(y).view(b, c, 1, 1)
        return x * y.expand_as(x)


class Flatten(nn.Module):
    def forward(self, x):
        return x.view(x.shape[0], -1)


class SelectiveConv(nn.Module):
    def __init__(self, in_channels, out_channels, groups, ratio=16, paths=2, bias=True):
        super().__init__()
        self.reduced_dim = max(out_channels // ratio, 32)
        self.paths = paths
        convs = []
        for i in range(paths):
            convs.append(
                nn.Sequential(
                    nn.Conv2d(in_channels, out_channels, groups=groups, kernel_size=3, dilation=1 + i, padding=1 + i,
                              bias=bias),
                    nn.BatchNorm2d(out_channels),
                    nn.ReLU(),
                )
            )
        self.convs = nn.ModuleList(convs)
        self.flatten = nn.Sequential(nn.AdaptiveAvgPool2d(output_size=(1, 1)), Flatten())
        self.compress = nn.Sequential(
            nn.Linear(out_channels, self.reduced_dim, bias=bias),
            nn.BatchNorm1d(self.reduced_dim),
            nn.ReLU(),
        )
        self.projections = nn.ModuleList([nn.Conv2d(self.reduced_dim, out_channels, 1, bias=bias) for _ in range(paths)])

    def forward(self, x):
        b, _, h, w = x.shape
        features = torch.cat([conv(x) for conv in self.convs], dim=1)
        features = features.view(features.shape[0], self.paths, -1, h, w)
        fused_x = features.sum(dim=1)
        _, c, _, _ = fused_x.shape
        fused_compress = self.compress(self.flatten(fused_x))
        scores = torch.cat([proj(fused_compress[:, :, None, None]) for proj in self.projections], dim=1)
        scores = F.softmax(scores.view(b, self.paths, c, 1, 1), dim=1)
        return (features * scores).sum(dim=1)


def _local_att(channels, inter_channels):
    return nn.Sequential(
        nn.Conv2d(channels, inter_channels, kernel_size=1, stride=1, padding=0),
        nn.BatchNorm2d(inter_channels),
        nn.ReLU(inplace=True),
        nn.Conv2d(inter_channels, channels, kernel_size=1, stride=1, padding=0),
        nn.BatchNorm2d(channels),
    )


def _global_att(channels, inter_channels):
    return nn.Sequential(
        nn.AdaptiveAvgPool2d(1),
        nn.Conv2d(channels, inter_channels, kernel_size=1, stride=1, padding=0),
        nn.BatchNorm2d(inter_channels),
        nn.ReLU(inplace=True),
        nn.Conv2d(inter_channels, channels, kernel_size=1, stride=1, padding=0),
        nn.BatchNorm2d(channels),
    )


class DAF(nn.Module):
    def forward(self, x, residual):
        return x + residual


class iAFF(nn.Module):
    def __init__(self, channels=64, r=4, share_global_att=True):
        super().__init__()
        inter_channels = int(channels // r)
        self.share_global_att = share_global_att
        self.local_att = _local_att(channels, inter_channels)
        self.global_att = _global_att(channels, inter_channels)
        self.local_att2 = _local_att(channels, inter_channels)
        self.global_att2 = _global_att(channels, inter_channels)
        self.sigmoid = nn.Sigmoid()

    def forward(self, x, residual):
        xa = x + residual
        xl = self.local_att(xa)
        xg = self.global_att(xa)
        wei = self.sigmoid(xl + xg)
        xi = x * wei + residual * (1 - wei)

        xl2 = self.local_att2(xi)
        xg2 = self.global_att(xi) if self.share_global_att else self.global_att2(xi)
        wei2 = self.sigmoid(xl2 + xg2)
        return x * wei2 + residual * (1 - wei2)


class AFF(nn.Module):
    def __init__(self, channels=64, r=4):
        super().__init__()
        inter_channels = int(channels // r)
        self.local_att = _local_att(channels, inter_channels)
        self.global_att = _global_att(channels, inter_channels)
        self.sigmoid = nn.Sigmoid()

    def forward(self, x, residual):
        xa = x + residual
        wei = self.sigmoid(self.local_att(xa) + self.global_att(xa))
        return 2 * x * wei + 2 * residual * (1 - wei)


class MS_CAM(nn.Module):
    def __init__(self, channels=64, r=4):
        super().__init__()
        inter_channels = int(channels // r)
        self.local_att = _local_att(channels, inter_channels)
        self.global_att = _global_att(channels, inter_channels)
        self.sigmoid = nn.Sigmoid()

    def forward(self, x):
        wei = self.sigmoid(self.local_att(x) + self.global_att(x))
        return x * wei


class GCT(nn.Module):
    def __init__(self, num_channels, epsilon=1e-5, mode="l2", after_relu=False):
        super().__init__()
        if mode not in ("l2", "l1"):
            raise ValueError(f"GCT: unknown mode {mode!r}")
        self.alpha = nn.Parameter(torch.ones(1, num_channels, 1, 1))
        self.gamma = nn.Parameter(torch.zeros(1, num_channels, 1, 1))
        self.beta = nn.Parameter(torch.zeros(1, num_channels, 1, 1))
        self.epsilon = epsilon
        self.mode = mode
        self.after_relu = after_relu

    def forward(self, x):
        if self.mode == "l2":
            embedding = (x.pow(2).sum((2, 3), keepdim=True) + self.epsilon).pow(0.5) * self.alpha
            norm = self.gamma / (embedding.pow(2).mean(dim=1, keepdim=True) + self.epsilon).pow(0.5)
        else:
            _x = x if self.after_relu else torch.abs(x)
            embedding = _x.sum((2, 3), keepdim=True) * self.alpha
            norm = self.gamma / (torch.abs(embedding).mean(dim=1, keepdim=True) + self.epsilon)
        gate = 1.0 + torch.tanh(embedding * norm + self.beta)
        return x * gate


TORCH_CLASSES = {
    "SEBlock": SEBlock,
    "SKConv": SelectiveConv,
    "DAF": DAF,
    "AFF": AFF,
    "iAFF": iAFF,
    "MS_CAM": MS_CAM,
    "GCT": GCT,
}


def torch_config(np_block):
    """Constructor arguments of the torch module matching an npattn block."""
    name = type(np_block).__name__
    if name == "SEBlock":
        return dict(channels=np_block.channels, reduction=np_block.reduction, bias=np_block.bias)
    if name == "SKConv":
        b = np_block
        return dict(in_channels=b.in_channels, out_channels=b.out_channels, groups=b.groups, ratio=b.ratio, paths=b.paths,
                    bias=b.bias)
    if name == "DAF":
        return {}
    if name in ("AFF", "MS_CAM"):
        return dict(channels=np_block.channels, r=np_block.r)
    if name == "iAFF":
        return dict(channels=np_block.channels, r=np_block.r, share_global_att=np_block.share_global_att)
    if name == "GCT":
        b = np_block
        return dict(num_channels=b.num_channels, epsilon=b.epsilon, mode=b.mode, after_relu=b.after_relu)
    raise TypeError(f"make_torch_block: no PyTorch version of {name}")


def load_numpy_state(module, state):
    """Load a dict of numpy arrays (npattn's state_dict) into ``module``, strictly."""
    module.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()}, strict=True)
    return module


def make_torch_block(np_block, dtype=torch.float64):
    """The torch module matching ``np_block``, in ``dtype`` (float64 by default), with the
    npattn block's parameters and buffers loaded, in eval mode."""
    module = TORCH_CLASSES[type(np_block).__name__](**torch_config(np_block)).to(dtype)
    set_batch_norm(module, np_block)
    load_numpy_state(module, np_block.state_dict())
    return module.eval()


def set_batch_norm(module, np_block):
    """Every BatchNorm of ``module`` with the npattn block's momentum and eps (PyTorch's
    defaults unless the block was built with others)."""
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum, m.eps = np_block.bn_momentum, np_block.bn_eps
    return module
