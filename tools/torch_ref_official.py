"""The papers' own PyTorch modules, transcribed by reading their released code, for the
cross-checks of the npattn options that reproduce them (tests/crosscheck/test_official_blocks.py)
and for the golden fixtures named for each repository (tools/make_golden.py).

Each section names the repository and the commit that was read. The transcriptions keep
every computation the official code performs (the ops it calls, their order, its layer
settings); they are written anew, in float64 when used here. What differs from the
official files, on purpose: the modules take their constructor arguments by keyword, and
deprecated calls (``F.sigmoid``) are the current equivalents (``torch.sigmoid``, the same
function).

``make_official_block(np_block, official)`` builds the official module for an npattn block
configured as that official module (``official`` is a key of :data:`OFFICIAL`), copies the
block's state_dict into it through the key mapping (a table below, written as data), and
returns it in float64, eval mode. ``npattn_key(official, key)`` maps an official key back.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "OFFICIAL", "CBAM_JONGCHAN_KEYS", "JongchanCBAM", "ECALayer", "ECANSLayer", "SELayer",
    "make_official_block", "npattn_key", "describe",
]


# ==================================================================================== CBAM
# Jongchan/attention-module, MODELS/cbam.py, commit 459efad0e05ee7dde50c41ca10a3d0800bc3792a
# (the authors' release of "CBAM: Convolutional Block Attention Module", ECCV 2018).
#
# What the code does, read from the file:
# - ChannelGate: an MLP nn.Sequential(Flatten, Linear(C, C // r), ReLU, Linear(C // r, C)),
#   both Linear layers with biases, applied to each pool in ``pool_types`` and summed in that
#   order; pools over the whole H x W image: "avg" F.avg_pool2d, "max" F.max_pool2d, "lp"
#   F.lp_pool2d with norm 2, "lse" a log-sum-exp shifted by torch.max over the flattened
#   H W; then x * sigmoid(sum).
# - SpatialGate: ChannelPool stacks [torch.max(x, 1)[0], torch.mean(x, 1)] (max first), a
#   7 x 7 Conv2d(2, 1, bias=False, padding 3), BatchNorm2d(1, eps=1e-5, momentum=0.01,
#   affine=True), no ReLU; then x * sigmoid.
# - CBAM(gate_channels, reduction_ratio=16, pool_types=['avg', 'max'], no_spatial=False):
#   the channel gate, then (unless no_spatial) the spatial gate.


class _Flatten(nn.Module):
    def forward(self, x):
        return x.reshape(x.shape[0], -1)


def _logsumexp_hw(x):
    """Log-sum-exp over H W as the official helper computes it: flattened, shifted by
    torch.max over the last axis (autograd goes through that max too)."""
    flat = x.reshape(x.shape[0], x.shape[1], -1)
    top, _ = torch.max(flat, dim=2, keepdim=True)
    return top + (flat - top).exp().sum(dim=2, keepdim=True).log()


class _ChannelGate(nn.Module):
    def __init__(self, gate_channels, reduction_ratio, pool_types):
        super().__init__()
        hidden = gate_channels // reduction_ratio
        self.mlp = nn.Sequential(_Flatten(), nn.Linear(gate_channels, hidden), nn.ReLU(), nn.Linear(hidden, gate_channels))
        self.pool_types = list(pool_types)

    def forward(self, x):
        window = (x.shape[2], x.shape[3])
        total = None
        for kind in self.pool_types:
            if kind == "avg":
                pooled = F.avg_pool2d(x, window, stride=window)
            elif kind == "max":
                pooled = F.max_pool2d(x, window, stride=window)
            elif kind == "lp":
                pooled = F.lp_pool2d(x, 2, window, stride=window)
            elif kind == "lse":
                pooled = _logsumexp_hw(x)
            else:
                raise ValueError(kind)
            raw = self.mlp(pooled)
            total = raw if total is None else total + raw
        return x * torch.sigmoid(total)[:, :, None, None].expand_as(x)


class _BasicConvBN(nn.Module):
    """The official BasicConv as the spatial gate uses it: conv (no bias), BatchNorm with
    momentum 0.01, no ReLU."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel_size=7, stride=1, padding=3, bias=False)
        self.bn = nn.BatchNorm2d(1, eps=1e-5, momentum=0.01, affine=True)

    def forward(self, x):
        return self.bn(self.conv(x))


class _SpatialGate(nn.Module):
    def __init__(self):
        super().__init__()
        self.spatial = _BasicConvBN()

    def forward(self, x):
        pooled = torch.cat((torch.max(x, 1)[0].unsqueeze(1), torch.mean(x, 1).unsqueeze(1)), dim=1)  # [max, mean]
        return x * torch.sigmoid(self.spatial(pooled))


class JongchanCBAM(nn.Module):
    """CBAM as Jongchan/attention-module's MODELS/cbam.py (commit 459efad) defines it."""

    def __init__(self, gate_channels, reduction_ratio=16, pool_types=("avg", "max"), no_spatial=False):
        super().__init__()
        self.ChannelGate = _ChannelGate(gate_channels, reduction_ratio, pool_types)
        self.no_spatial = no_spatial
        if not no_spatial:
            self.SpatialGate = _SpatialGate()

    def forward(self, x):
        out = self.ChannelGate(x)
        return out if self.no_spatial else self.SpatialGate(out)


# npattn key -> official key; the MLP weights are (D, C, 1, 1) in npattn (timm's 1x1 convs)
# and (D, C) in the official Linear layers: same numbers, reshaped
CBAM_JONGCHAN_KEYS = {
    "channel.fc1.weight": "ChannelGate.mlp.1.weight",
    "channel.fc1.bias": "ChannelGate.mlp.1.bias",
    "channel.fc2.weight": "ChannelGate.mlp.3.weight",
    "channel.fc2.bias": "ChannelGate.mlp.3.bias",
    "spatial.conv.conv.weight": "SpatialGate.spatial.conv.weight",
    "spatial.conv.bn.weight": "SpatialGate.spatial.bn.weight",
    "spatial.conv.bn.bias": "SpatialGate.spatial.bn.bias",
    "spatial.conv.bn.running_mean": "SpatialGate.spatial.bn.running_mean",
    "spatial.conv.bn.running_var": "SpatialGate.spatial.bn.running_var",
    "spatial.conv.bn.num_batches_tracked": "SpatialGate.spatial.bn.num_batches_tracked",
}


# ===================================================================================== ECA
# BangguWu/ECANet, commit b332f6b3e6e2afe8a3287dc8ee8440a0fbec74c4 (the authors' release of
# "ECA-Net", CVPR 2020).
# - models/eca_module.py ``eca_layer(channel, k_size=3)``: AdaptiveAvgPool2d(1), then
#   Conv1d(1, 1, k_size, padding=(k_size - 1) // 2, bias=False) over the channel axis
#   (squeeze(-1).transpose(-1, -2) in, the inverse out), sigmoid, x * gate. ``channel`` is
#   not used; k comes from the caller (models/eca_resnet.py takes k_size per stage).
# - models/eca_ns.py ``eca_layer(channel, k_size)`` (ECA-NS, no sharing): the pooled
#   (N, C, 1, 1) map transposed to (N, 1, 1, C), F.unfold with kernel (1, k) and padding
#   (0, (k - 1) // 2) into the k-wide channel windows, Conv1d(C, C, k, groups=C, bias=False)
#   on them (one kernel per channel, weight (C, 1, k)), sigmoid, x * gate.


class ECALayer(nn.Module):
    """ECANet's models/eca_module.py eca_layer (commit b332f6b)."""

    def __init__(self, channel, k_size=3):
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.conv = nn.Conv1d(1, 1, kernel_size=k_size, padding=(k_size - 1) // 2, bias=False)

    def forward(self, x):
        pooled = self.avg_pool(x)  # (N, C, 1, 1)
        z = self.conv(pooled.squeeze(-1).transpose(-1, -2)).transpose(-1, -2).unsqueeze(-1)  # (N, C, 1, 1)
        return x * torch.sigmoid(z).expand_as(x)


class ECANSLayer(nn.Module):
    """ECANet's models/eca_ns.py eca_layer, ECA-NS (commit b332f6b)."""

    def __init__(self, channel, k_size):
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.k_size = k_size
        self.conv = nn.Conv1d(channel, channel, kernel_size=k_size, bias=False, groups=channel)

    def forward(self, x):
        pooled = self.avg_pool(x)  # (N, C, 1, 1)
        windows = F.unfold(pooled.transpose(-1, -3), kernel_size=(1, self.k_size), padding=(0, (self.k_size - 1) // 2))
        z = self.conv(windows.transpose(-1, -2)).unsqueeze(-1)  # (N, C, 1, 1)
        return x * torch.sigmoid(z).expand_as(x)


# ====================================================================================== SE
# moskomule/senet.pytorch, senet/se_module.py, commit 8cb2669fec6fa344481726f9199aa611f08c3fbd
# (a PyTorch port; the authors' release, hujie-frank/SENet, is Caffe). ``SELayer(channel,
# reduction=16)``: AdaptiveAvgPool2d(1), nn.Sequential(Linear(C, C // r, bias=False), ReLU,
# Linear(C // r, C, bias=False), Sigmoid), x * gate.


class SELayer(nn.Module):
    """senet.pytorch's SELayer (commit 8cb2669)."""

    def __init__(self, channel, reduction=16):
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Sequential(
            nn.Linear(channel, channel // reduction, bias=False),
            nn.ReLU(inplace=True),
            nn.Linear(channel // reduction, channel, bias=False),
            nn.Sigmoid(),
        )

    def forward(self, x):
        n, c = x.shape[:2]
        return x * self.fc(self.avg_pool(x).view(n, c)).view(n, c, 1, 1).expand_as(x)


# ============================================================================ the table
# official name -> (repository@commit and file, npattn block, builder from the npattn block,
# npattn key -> official key (None: the same keys))


def _cbam_from(blk):
    return JongchanCBAM(blk.channels, reduction_ratio=blk.channels // blk.rd_channels, pool_types=blk.pool_types,
                        no_spatial=blk.no_spatial)


OFFICIAL = {
    "jongchan_cbam": ("Jongchan/attention-module@459efad MODELS/cbam.py CBAM", "CBAM", _cbam_from, CBAM_JONGCHAN_KEYS),
    "bangguwu_eca": ("BangguWu/ECANet@b332f6b models/eca_module.py eca_layer", "ECA",
                     lambda blk: ECALayer(blk.channels, k_size=blk.kernel_size), None),
    "bangguwu_eca_ns": ("BangguWu/ECANet@b332f6b models/eca_ns.py eca_layer (ECA-NS)", "ECA",
                        lambda blk: ECANSLayer(blk.channels, blk.kernel_size), None),
    "moskomule_se": ("moskomule/senet.pytorch@8cb2669 senet/se_module.py SELayer", "SEBlock",
                     lambda blk: SELayer(blk.channels, reduction=blk.reduction), None),
}


def check_official_config(np_block, official):
    """Raise ValueError unless the npattn block is configured as the official module."""
    _, block_name, _, _ = OFFICIAL[official]
    name = type(np_block).__name__
    if name != block_name:
        raise ValueError(f"{official}: expects an npattn {block_name}, got {name}")
    if official == "jongchan_cbam":
        cfg = np_block.config
        want = {"spatial_kernel_size": 7, "mlp_bias": True, "spatial_order": "max_avg", "max_grad": "first",
                "bn_momentum": 0.01, "bn_eps": 1e-5}
        bad = {k: cfg[k] for k, v in want.items() if cfg[k] != v}
        if bad or np_block.channels % np_block.rd_channels:
            raise ValueError(f"{official}: the npattn CBAM must have {want} and rd_channels dividing channels, got {bad}")
    elif official == "bangguwu_eca" and not (np_block.shared and not np_block.use_mlp):
        raise ValueError(f"{official}: the npattn ECA must have shared=True, use_mlp=False")
    elif official == "bangguwu_eca_ns" and np_block.shared:
        raise ValueError(f"{official}: the npattn ECA must have shared=False")
    elif official == "moskomule_se" and np_block.bias:
        raise ValueError(f"{official}: the npattn SEBlock must have bias=False")


def make_official_block(np_block, official, dtype=torch.float64):
    """The official module for ``np_block`` (configured as it, see docs/porting.md), with the
    block's state_dict copied in through the key mapping, in ``dtype``, eval mode."""
    check_official_config(np_block, official)
    _, _, build, keys = OFFICIAL[official]
    module = build(np_block).to(dtype)
    target = module.state_dict()
    state = {}
    for k, v in np_block.state_dict().items():
        ok = keys[k] if keys else k
        t = torch.from_numpy(np.array(v)).reshape(target[ok].shape)
        state[ok] = t.to(dtype) if t.is_floating_point() else t
    module.load_state_dict(state, strict=True)
    return module.eval()


def npattn_key(official, key):
    """The npattn state_dict key of an official module's key."""
    keys = OFFICIAL[official][3]
    if not keys:
        return key
    back = {v: k for k, v in keys.items()}
    return back[key]


def describe(official):
    return f"tools/torch_ref_official.py ({OFFICIAL[official][0]})"
