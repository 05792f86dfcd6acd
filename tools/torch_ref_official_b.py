"""The papers' official modules, transcribed as float64 PyTorch modules by reading each
repository's code, for the cross-checks (tests/crosscheck/test_official_b.py) and the
golden fixtures named for the repositories (non_local_attn/alexhex7_*, non_local_attn/
caffe2_*, global_context/gcnet_*, coord_attn/houqb_*, sk/sknet_caffe_*, gct/zxyang_*,
simam/zjjconan_*, aff/yimiandai_* ...).

One section per paper. Each class keeps the official module's structure and therefore
its state_dict keys; where the official code is not PyTorch (the SKNet Caffe prototxt,
the Caffe2 non-local code) the docstring says how its layers were named here. Behaviour
that the official code has and its paper does not (a NameError, a failing shape) is kept
and said so.

``KEY_MAPS`` holds, as data, how npattn's keys map onto each official module's keys:
entries ``(npattn key or prefix, official key or prefix, rows)``; a prefix ends with
".", ``rows = (i, P)`` takes the i-th of P equal blocks of rows of the official array
(SKNet's fc2 holds the projections of both paths). Shapes that differ only by unit axes
(a 1x1 conv's (O, I, 1, 1) against a linear (O, I), GCNet's LayerNorm (D, 1, 1) against
(D,)) are reshaped. ``OFFICIAL`` names, per official configuration, the npattn
constructor call, the transcription built from it, and the key map.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "NonLocalPort2d", "NonLocalCaffe2", "ContextBlock", "CoordAtt", "CoordAttMBV2", "SKUnitCaffe", "GCTOfficial",
    "SimAMOfficial", "AFFOfficial", "iAFFOfficial", "MS_CAMOfficial", "KEY_MAPS", "OFFICIAL",
    "to_official_state", "from_official", "make_official", "run_case",
]


# =========================================================================== Non-local
# AlexHex7/Non-local_pytorch, commit ec15789af4533448169f3dc36abe542badd34221,
# lib/non_local_{embedded_gaussian, dot_product, gaussian, concatenation}.py (2D blocks)


class NonLocalPort2d(nn.Module):
    """``NONLocalBlock2D`` of AlexHex7/Non-local_pytorch (commit ec15789a, lib/), the four
    files in one class selected by ``mode``.

    As the port: ``inter_channels`` defaults to in_channels // 2 (at least 1); g, theta,
    phi are 1x1 convs with bias; with ``sub_sample`` g and phi become
    ``Sequential(conv, MaxPool2d(2))`` (keys ``g.0.*``, ``phi.0.*``), and in the gaussian
    mode phi is the bare max-pool of x (and there is no theta: x is its own query and
    key). ``bn_layer``: W = Sequential(conv, BatchNorm2d) with the BatchNorm's weight and
    bias zeroed (keys ``W.0.*``, ``W.1.*``), else W = conv with weight and bias zeroed.
    concatenation: ``concat_project = Sequential(Conv2d(2 inter, 1, 1, bias=False), ReLU)``.
    The affinity is softmax(theta^T phi) (embedded_gaussian), softmax(x^T x)
    (gaussian), theta^T phi / N or relu(concat) / N (dot_product, concatenation; N the
    number of keys); out = W(f g) + x.
    """

    def __init__(self, in_channels, inter_channels=None, sub_sample=True, bn_layer=True, mode="embedded_gaussian"):
        super().__init__()
        self.mode, self.sub_sample = mode, sub_sample
        self.in_channels = in_channels
        self.inter_channels = inter_channels if inter_channels is not None else max(in_channels // 2, 1)
        ci = self.inter_channels
        self.g = nn.Conv2d(in_channels, ci, 1)
        if bn_layer:
            self.W = nn.Sequential(nn.Conv2d(ci, in_channels, 1), nn.BatchNorm2d(in_channels))
            nn.init.zeros_(self.W[1].weight)
            nn.init.zeros_(self.W[1].bias)
        else:
            self.W = nn.Conv2d(ci, in_channels, 1)
            nn.init.zeros_(self.W.weight)
            nn.init.zeros_(self.W.bias)
        if mode != "gaussian":
            self.theta = nn.Conv2d(in_channels, ci, 1)
            self.phi = nn.Conv2d(in_channels, ci, 1)
        if mode == "concatenation":
            self.concat_project = nn.Sequential(nn.Conv2d(2 * ci, 1, 1, bias=False), nn.ReLU())
        if sub_sample:
            self.g = nn.Sequential(self.g, nn.MaxPool2d(kernel_size=(2, 2)))
            self.phi = nn.MaxPool2d(kernel_size=(2, 2)) if mode == "gaussian" else nn.Sequential(self.phi, nn.MaxPool2d(kernel_size=(2, 2)))

    def forward(self, x):
        b = x.size(0)
        g_x = self.g(x).view(b, self.inter_channels, -1).permute(0, 2, 1)  # (B, m, C')
        if self.mode == "gaussian":
            theta_x = x.view(b, self.in_channels, -1).permute(0, 2, 1)  # (B, n, C)
            phi_x = (self.phi(x) if self.sub_sample else x).view(b, self.in_channels, -1)  # (B, C, m)
            f = F.softmax(torch.matmul(theta_x, phi_x), dim=-1)
        elif self.mode == "concatenation":
            theta_x = self.theta(x).view(b, self.inter_channels, -1, 1)  # (B, C', n, 1)
            phi_x = self.phi(x).view(b, self.inter_channels, 1, -1)  # (B, C', 1, m)
            n, m = theta_x.size(2), phi_x.size(3)
            pair = torch.cat([theta_x.repeat(1, 1, 1, m), phi_x.repeat(1, 1, n, 1)], dim=1)  # (B, 2C', n, m)
            f = self.concat_project(pair).view(b, n, m)
            f = f / f.size(-1)
        else:
            theta_x = self.theta(x).view(b, self.inter_channels, -1).permute(0, 2, 1)  # (B, n, C')
            phi_x = self.phi(x).view(b, self.inter_channels, -1)  # (B, C', m)
            f = torch.matmul(theta_x, phi_x)
            f = F.softmax(f, dim=-1) if self.mode == "embedded_gaussian" else f / f.size(-1)
        y = torch.matmul(f, g_x).permute(0, 2, 1).contiguous()  # (B, C', n)
        y = y.view(b, self.inter_channels, *x.size()[2:])
        return self.W(y) + x


# facebookresearch/video-nonlocal-net, commit c253ed5eb004fa2cae0490ed46f5018a3c3b060f,
# lib/models/nonlocal_helper.py spacetime_nonlocal, lib/core/config.py (NONLOCAL.*)


class NonLocalCaffe2(nn.Module):
    """The authors' Caffe2 non-local block (facebookresearch/video-nonlocal-net, commit
    c253ed5e, ``spacetime_nonlocal`` + ``add_nonlocal``), on images (T = 1).

    The Caffe2 blobs ``{prefix}_theta``, ``_phi``, ``_g``, ``_out`` (1x1 convs, weight and
    bias ``_w`` / ``_b``) and ``_bn`` (SpatialBN: ``_bn_s``, ``_bn_b``, ``_bn_rm``,
    ``_bn_riv``) are the submodules ``theta``, ``phi``, ``g``, ``out``, ``bn`` here.
    Order, as the code: theta on x; a max-pool (kernel 2, stride 2, no padding) of x
    (``USE_MAXPOOL``) feeds phi and g; the affinity theta^T phi is scaled by
    ``dim_inner ** -0.5`` (``USE_SCALE``) and soft-maxed over the keys (``USE_SOFTMAX``),
    or divided by the number of keys without a softmax; y = g p^T; out conv; SpatialBN
    (``USE_BN``, its gamma initialised to ``BN_INIT_GAMMA`` = 0); the sum with the input.
    Config defaults: ``BN_EPSILON = 1.0000001e-5``, ``BN_MOMENTUM = 0.9``: Caffe2 keeps
    0.9 of the running statistic, PyTorch's momentum 0.1. The running-variance update
    is torch's BatchNorm2d's (unbiased batch variance); Caffe2's SpatialBN source is not
    in that repository and was not compared.
    """

    def __init__(self, dim_in, dim_inner, use_maxpool=True, use_softmax=True, use_scale=True, use_bn=True,
                 bn_eps=1.0000001e-5, bn_momentum=0.9):
        super().__init__()
        self.dim_inner, self.use_maxpool, self.use_softmax, self.use_scale = dim_inner, use_maxpool, use_softmax, use_scale
        self.theta = nn.Conv2d(dim_in, dim_inner, 1)
        self.phi = nn.Conv2d(dim_in, dim_inner, 1)
        self.g = nn.Conv2d(dim_in, dim_inner, 1)
        self.out = nn.Conv2d(dim_inner, dim_in, 1)
        for conv in (self.theta, self.phi, self.g, self.out):  # CONV_INIT_STD 0.01, biases 0
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.zeros_(conv.bias)
        self.bn = nn.BatchNorm2d(dim_in, eps=bn_eps, momentum=1.0 - bn_momentum) if use_bn else None
        if self.bn is not None:
            nn.init.zeros_(self.bn.weight)

    def forward(self, x):
        b = x.size(0)
        theta = self.theta(x).view(b, self.dim_inner, -1)  # (B, C', n)
        pooled = F.max_pool2d(x, 2, 2) if self.use_maxpool else x
        phi = self.phi(pooled).view(b, self.dim_inner, -1)  # (B, C', m)
        g = self.g(pooled).view(b, self.dim_inner, -1)  # (B, C', m)
        affinity = torch.bmm(theta.transpose(1, 2), phi)  # (B, n, m)
        if self.use_softmax:
            if self.use_scale:
                affinity = affinity * self.dim_inner ** -0.5
            p = F.softmax(affinity, dim=2)
        else:
            p = affinity / affinity.size(2)  # the denominator is a constant (StopGradient)
        y = torch.bmm(g, p.transpose(1, 2)).view(b, self.dim_inner, *x.shape[2:])  # (B, C', H, W)
        out = self.out(y)
        if self.bn is not None:
            out = self.bn(out)
        return x + out


# =========================================================================== GCNet
# xvjiarui/GCNet, commit 029db5407dc27147eb1d41f62b09dfed8ec88837, mmdet/ops/gcb/context_block.py


class ContextBlock(nn.Module):
    """``ContextBlock`` of xvjiarui/GCNet (commit 029db540, mmdet/ops/gcb/context_block.py).

    ``planes = int(inplanes * ratio)``; pooling 'att' (conv_mask 1x1 C -> 1, softmax over
    H W, weighted sum) or 'avg'; fusions 'channel_add' / 'channel_mul', each a
    Sequential(conv C -> planes, LayerNorm([planes, 1, 1]) (eps 1e-5), ReLU, conv planes
    -> C) (keys ``channel_add_conv.{0,1,3}.*``, ``channel_mul_conv.*``); the mul term
    (sigmoid) is applied before the add term. ``reset_parameters`` as mmcv's
    ``kaiming_init(conv_mask, mode='fan_in')`` (normal, ReLU gain, bias 0) and
    ``last_zero_init`` (the last conv of each MLP: weight and bias 0), written with
    torch.nn.init (no mmcv).
    """

    def __init__(self, inplanes, ratio, pooling_type="att", fusion_types=("channel_add",)):
        super().__init__()
        self.planes = int(inplanes * ratio)
        self.pooling_type = pooling_type

        def mlp():
            return nn.Sequential(nn.Conv2d(inplanes, self.planes, 1), nn.LayerNorm([self.planes, 1, 1]),
                                 nn.ReLU(inplace=True), nn.Conv2d(self.planes, inplanes, 1))

        if pooling_type == "att":
            self.conv_mask = nn.Conv2d(inplanes, 1, kernel_size=1)
        self.channel_add_conv = mlp() if "channel_add" in fusion_types else None
        self.channel_mul_conv = mlp() if "channel_mul" in fusion_types else None
        if pooling_type == "att":
            nn.init.kaiming_normal_(self.conv_mask.weight, mode="fan_in", nonlinearity="relu")
            nn.init.zeros_(self.conv_mask.bias)
        for m in (self.channel_add_conv, self.channel_mul_conv):
            if m is not None:
                nn.init.zeros_(m[-1].weight)
                nn.init.zeros_(m[-1].bias)

    def forward(self, x):
        n, c, h, w = x.shape
        if self.pooling_type == "att":
            weights = F.softmax(self.conv_mask(x).view(n, 1, h * w), dim=2)  # (N, 1, HW)
            context = torch.matmul(x.view(n, 1, c, h * w), weights.unsqueeze(-1)).view(n, c, 1, 1)
        else:
            context = F.adaptive_avg_pool2d(x, 1)
        out = x
        if self.channel_mul_conv is not None:
            out = out * torch.sigmoid(self.channel_mul_conv(context))
        if self.channel_add_conv is not None:
            out = out + self.channel_add_conv(context)
        return out


# =========================================================================== Coordinate attention
# houqb/CoordAttention, commit 7619bea9acbe260b3793833cc78cef3f124c8112, coordatt.py and mbv2_ca.py


class _HSwish(nn.Module):
    """h_swish of the official code: x * relu6(x + 3) / 6."""

    def forward(self, x):
        return x * F.relu6(x + 3.0) / 6.0


class CoordAtt(nn.Module):
    """``CoordAtt`` of houqb/CoordAttention (commit 7619bea9, coordatt.py).

    ``mip = max(8, inp // reduction)``; conv1 (1x1, bias) + BatchNorm2d + h_swish on the
    concatenated strips; conv_h, conv_w (1x1 mip -> oup, bias) with sigmoids; out =
    x * a_w * a_h. With oup != inp the product fails (the gates have oup channels, x has
    inp), as in the official code.
    """

    def __init__(self, inp, oup, reduction=32):
        super().__init__()
        mip = max(8, inp // reduction)
        self.conv1 = nn.Conv2d(inp, mip, 1)
        self.bn1 = nn.BatchNorm2d(mip)
        self.act = _HSwish()
        self.conv_h = nn.Conv2d(mip, oup, 1)
        self.conv_w = nn.Conv2d(mip, oup, 1)

    def strips(self, x):
        n, c, h, w = x.shape
        y = torch.cat([F.adaptive_avg_pool2d(x, (h, 1)), F.adaptive_avg_pool2d(x, (1, w)).permute(0, 1, 3, 2)], dim=2)
        y = self.act(self.bn1(self.conv1(y)))
        y_h, y_w = torch.split(y, [h, w], dim=2)
        return y_h, y_w.permute(0, 1, 3, 2)

    def forward(self, x):
        y_h, y_w = self.strips(x)
        return x * self.conv_w(y_w).sigmoid() * self.conv_h(y_h).sigmoid()


class CoordAttMBV2(CoordAtt):
    """``CoordAtt`` of houqb/CoordAttention's mbv2_ca.py (commit 7619bea9): the same
    computation with ``groups`` for the reduction, conv2 / conv3 for conv_h / conv_w, and
    the h_swish module named ``relu`` (no parameters: no key)."""

    def __init__(self, inp, oup, groups=32):
        nn.Module.__init__(self)
        mip = max(8, inp // groups)
        self.conv1 = nn.Conv2d(inp, mip, 1)
        self.bn1 = nn.BatchNorm2d(mip)
        self.conv2 = nn.Conv2d(mip, oup, 1)
        self.conv3 = nn.Conv2d(mip, oup, 1)
        self.relu = _HSwish()

    @property
    def act(self):
        return self.relu

    def forward(self, x):
        y_h, y_w = self.strips(x)
        h, w = x.shape[2:]
        a_h = self.conv2(y_h).sigmoid().expand(-1, -1, h, w)
        a_w = self.conv3(y_w).sigmoid().expand(-1, -1, h, w)
        return x * a_w * a_h


# =========================================================================== SKNet
# implus/SKNet, commit 17dd7086d4959be0c8c6ccce52e4fd8187836770, models/sknet50.prototxt (unit conv2_1)


class SKUnitCaffe(nn.Module):
    """The SK unit of the authors' Caffe release (implus/SKNet, commit 17dd7086,
    models/sknet50.prototxt, the layers ``conv2_1/3x3g32`` ... ``conv2_1/B_axpy``).

    Layer names, '/' written '_' (PyTorch names cannot hold '/'): ``conv3x3g`` (3x3,
    groups, pad 1) and ``conv3x3gd2`` (3x3, groups, dilation 2, pad 2), each followed by
    a CuDNNBatchNorm (``conv3x3g_bn``, ``conv3x3gd2_bn``) and an in-place ReLU; the Eltwise
    SUM; a global average pool; ``fc1`` (1x1, d outputs) + ``fc1_bn`` + ReLU; ``fc2``
    (1x1, 2C outputs); a Reshape to (N, 2, C, 1), a Softmax over axis 1, Slice, Scale and
    Axpy: out = a0 * branch0 + a1 * branch1. Every convolution has ``bias_term: false``.
    The BatchNorms have ``momentum: 0.95``, which the layer passes to cuDNN as the
    exponential-average factor 1 - 0.95 (PyTorch's momentum 0.05), and the proto's
    default eps 1e-5; cuDNN's running variance is the unbiased one, as PyTorch's.
    """

    def __init__(self, in_channels, channels, groups, d):
        super().__init__()
        self.conv3x3g = nn.Conv2d(in_channels, channels, 3, padding=1, groups=groups, bias=False)
        self.conv3x3g_bn = nn.BatchNorm2d(channels, momentum=0.05)
        self.conv3x3gd2 = nn.Conv2d(in_channels, channels, 3, padding=2, dilation=2, groups=groups, bias=False)
        self.conv3x3gd2_bn = nn.BatchNorm2d(channels, momentum=0.05)
        self.fc1 = nn.Conv2d(channels, d, 1, bias=False)
        self.fc1_bn = nn.BatchNorm2d(d, momentum=0.05)
        self.fc2 = nn.Conv2d(d, 2 * channels, 1, bias=False)
        self.channels = channels

    def forward(self, x):
        b0 = F.relu(self.conv3x3g_bn(self.conv3x3g(x)))
        b1 = F.relu(self.conv3x3gd2_bn(self.conv3x3gd2(x)))
        pooled = F.adaptive_avg_pool2d(b0 + b1, 1)
        a = self.fc2(F.relu(self.fc1_bn(self.fc1(pooled))))  # (N, 2C, 1, 1)
        a = F.softmax(a.view(a.size(0), 2, self.channels, 1), dim=1)
        a0 = a[:, 0].reshape(a.size(0), self.channels, 1, 1)
        a1 = a[:, 1].reshape(a.size(0), self.channels, 1, 1)
        return b0 * a0 + a1 * b1


# =========================================================================== GCT
# z-x-yang/GCT, commit 68983edd87f8cfbe709b1b51214c69eb9c81abd7, PyTorch/GCT.py


class GCTOfficial(nn.Module):
    """``GCT`` of z-x-yang/GCT (commit 68983edd, PyTorch/GCT.py): alpha, gamma, beta of
    shape (1, C, 1, 1) (init 1, 0, 0); l2: embedding = alpha sqrt(sum x^2 + eps), norm =
    gamma / sqrt(mean_c embedding^2 + eps); l1: embedding = alpha sum |x| (x itself after
    a ReLU), norm = gamma / (mean_c |embedding| + eps); out = x (1 + tanh(embedding norm
    + beta)). Any other mode prints and calls ``sys.exit()``, but the file never imports
    sys: the official forward raises NameError, reproduced here."""

    def __init__(self, num_channels, epsilon=1e-5, mode="l2", after_relu=False):
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(1, num_channels, 1, 1))
        self.gamma = nn.Parameter(torch.zeros(1, num_channels, 1, 1))
        self.beta = nn.Parameter(torch.zeros(1, num_channels, 1, 1))
        self.epsilon, self.mode, self.after_relu = epsilon, mode, after_relu

    def forward(self, x):
        if self.mode == "l2":
            emb = (x.pow(2).sum((2, 3), keepdim=True) + self.epsilon).pow(0.5) * self.alpha
            norm = self.gamma / (emb.pow(2).mean(dim=1, keepdim=True) + self.epsilon).pow(0.5)
        elif self.mode == "l1":
            emb = (x if self.after_relu else torch.abs(x)).sum((2, 3), keepdim=True) * self.alpha
            norm = self.gamma / (torch.abs(emb).mean(dim=1, keepdim=True) + self.epsilon)
        else:
            raise NameError("name 'sys' is not defined")  # what the official forward raises
        return x * (1.0 + torch.tanh(emb * norm + self.beta))


# =========================================================================== SimAM
# ZjjConan/SimAM, commit ae98f43a34a051cc82f6e618853c690e1f4c92e6, networks/attentions/simam_module.py


class SimAMOfficial(nn.Module):
    """``simam_module`` of ZjjConan/SimAM (commit ae98f43a): with n = H W - 1, d = (x -
    mean_hw x)^2, y = x sigmoid(d / (4 (sum_hw d / n + lambda)) + 0.5). H W = 1 gives
    0 / 0 = NaN (n = 0), as the official code."""

    def __init__(self, channels=None, e_lambda=1e-4):
        super().__init__()
        self.e_lambda = e_lambda

    def forward(self, x):
        n = x.shape[2] * x.shape[3] - 1
        d = (x - x.mean(dim=[2, 3], keepdim=True)).pow(2)
        return x * torch.sigmoid(d / (4 * (d.sum(dim=[2, 3], keepdim=True) / n + self.e_lambda)) + 0.5)


# =========================================================================== AFF
# YimianDai/open-aff, commit 0bcfd8a1b010a66075db6232b1141b35f0f07532, aff_pytorch/aff_net/fusion.py


def _branch(channels, inter, pooled):
    layers = [nn.AdaptiveAvgPool2d(1)] if pooled else []
    layers += [nn.Conv2d(channels, inter, 1), nn.BatchNorm2d(inter), nn.ReLU(inplace=True),
               nn.Conv2d(inter, channels, 1), nn.BatchNorm2d(channels)]
    return nn.Sequential(*layers)


class MS_CAMOfficial(nn.Module):
    """``MS_CAM`` of YimianDai/open-aff (commit 0bcfd8a1): local_att (conv, BN, ReLU,
    conv, BN) + global_att (avg-pool first) -> sigmoid -> x * wei."""

    def __init__(self, channels=64, r=4):
        super().__init__()
        inter = int(channels // r)
        self.local_att = _branch(channels, inter, False)
        self.global_att = _branch(channels, inter, True)

    def forward(self, x):
        return x * torch.sigmoid(self.local_att(x) + self.global_att(x))


class AFFOfficial(MS_CAMOfficial):
    """``AFF`` of open-aff (commit 0bcfd8a1): wei = M(x + res); 2 x wei + 2 res (1 - wei)."""

    def forward(self, x, residual):
        xa = x + residual
        wei = torch.sigmoid(self.local_att(xa) + self.global_att(xa))
        return 2 * x * wei + 2 * residual * (1 - wei)


class iAFFOfficial(nn.Module):
    """``iAFF`` of open-aff (commit 0bcfd8a1). Its second pass calls ``global_att``, not
    ``global_att2``: global_att2 is built and never used (as in the published code)."""

    def __init__(self, channels=64, r=4):
        super().__init__()
        inter = int(channels // r)
        self.local_att = _branch(channels, inter, False)
        self.global_att = _branch(channels, inter, True)
        self.local_att2 = _branch(channels, inter, False)
        self.global_att2 = _branch(channels, inter, True)

    def forward(self, x, residual):
        xa = x + residual
        wei = torch.sigmoid(self.local_att(xa) + self.global_att(xa))
        xi = x * wei + residual * (1 - wei)
        wei2 = torch.sigmoid(self.local_att2(xi) + self.global_att(xi))
        return x * wei2 + residual * (1 - wei2)


# =========================================================================== key maps

_SAME = [("", "", None)]  # every key as it is

KEY_MAPS = {
    "alexhex7_sub_sample_bn": [("t.", "theta."), ("p.", "phi.0."), ("g.", "g.0."), ("z.", "W.0."), ("norm.", "W.1."),
                               ("concat_project.0.", "concat_project.0.")],
    "alexhex7_bn": [("t.", "theta."), ("p.", "phi."), ("g.", "g."), ("z.", "W.0."), ("norm.", "W.1."),
                    ("concat_project.0.", "concat_project.0.")],
    "alexhex7_sub_sample_no_bn": [("t.", "theta."), ("p.", "phi.0."), ("g.", "g.0."), ("z.", "W."),
                                  ("concat_project.0.", "concat_project.0.")],
    "alexhex7_no_bn": [("t.", "theta."), ("p.", "phi."), ("g.", "g."), ("z.", "W."), ("concat_project.0.", "concat_project.0.")],
    "caffe2": [("t.", "theta."), ("p.", "phi."), ("g.", "g."), ("z.", "out."), ("norm.", "bn.")],
    "gcnet": [("conv_attn.", "conv_mask."), ("mlp_add.fc1.", "channel_add_conv.0."), ("mlp_add.norm.", "channel_add_conv.1."),
              ("mlp_add.fc2.", "channel_add_conv.3."), ("mlp_scale.fc1.", "channel_mul_conv.0."),
              ("mlp_scale.norm.", "channel_mul_conv.1."), ("mlp_scale.fc2.", "channel_mul_conv.3.")],
    "houqb_coordatt": _SAME,
    "houqb_mbv2_ca": [("conv_h.", "conv2."), ("conv_w.", "conv3."), ("", "")],
    "sknet_caffe": [("convs.0.0.weight", "conv3x3g.weight"), ("convs.0.1.", "conv3x3g_bn."),
                    ("convs.1.0.weight", "conv3x3gd2.weight"), ("convs.1.1.", "conv3x3gd2_bn."),
                    ("compress.0.weight", "fc1.weight"), ("compress.1.", "fc1_bn."),
                    ("projections.0.weight", "fc2.weight", (0, 2)), ("projections.1.weight", "fc2.weight", (1, 2))],
    "same": _SAME,
}


def _entries(mapping):
    return [(e[0], e[1], e[2] if len(e) > 2 else None) for e in mapping]


def _lookup(mapping, key):
    """(npattn key, official key, rows) of the npattn ``key``: the first entry, in the
    map's order, whose key equals it or (without rows) whose prefix starts it."""
    for mine, other, rows in _entries(mapping):
        if key == mine:
            return key, other, rows
        if rows is None and (mine == "" or mine.endswith(".")) and key.startswith(mine):
            return key, other + key[len(mine):], None
    raise KeyError(f"no key-map entry for the npattn key {key!r}")


def to_official_state(np_state, mapping, module):
    """npattn's arrays under the official module's keys and shapes (torch float64)."""
    out = {}
    for key, t in module.state_dict().items():
        pieces = [(r, np_state[nk]) for nk, ok, r in (_lookup(mapping, k) for k in np_state) if ok == key]
        if not pieces:
            raise KeyError(f"official key {key!r}: no npattn array maps onto it")
        if pieces[0][0] is None:
            a = np.asarray(pieces[0][1])
        else:  # the row blocks of a split, in order
            pieces.sort(key=lambda p: p[0][0])
            a = np.concatenate([np.asarray(v).reshape((-1,) + tuple(t.shape[1:])) for _, v in pieces])
        a = a.reshape(tuple(t.shape))
        out[key] = torch.from_numpy(np.array(a, dtype=np.float64 if t.is_floating_point() else np.int64))
    return out


def from_official(official, mapping, np_shapes):
    """Official arrays (name -> ndarray) back under npattn's keys and shapes (``np_shapes``:
    key -> shape), the rows of a split taken out."""
    out = {}
    for key, shape in np_shapes.items():
        _, ok, rows = _lookup(mapping, key)
        a = np.asarray(official[ok])
        if rows is not None:
            i, parts = rows
            step = a.shape[0] // parts
            a = a[i * step:(i + 1) * step]
        out[key] = a.reshape(shape)
    return out


# =========================================================================== configurations


def _alexhex7(blk):
    return NonLocalPort2d(blk.in_channels, blk.rd_channels, sub_sample=blk.sub_sample, bn_layer=blk.norm, mode=blk.mode)


def _alexhex7_keys(blk):
    if blk.sub_sample:
        return "alexhex7_sub_sample_bn" if blk.norm else "alexhex7_sub_sample_no_bn"
    return "alexhex7_bn" if blk.norm else "alexhex7_no_bn"


def _caffe2(blk):
    return NonLocalCaffe2(blk.in_channels, blk.rd_channels, use_maxpool=blk.sub_sample,
                          use_softmax=blk.mode == "embedded_gaussian", use_scale=blk.scale != 1.0,
                          bn_eps=blk.bn_eps, bn_momentum=1.0 - blk.bn_momentum)


def _gcnet(blk):
    fusions = tuple(f for f, on in (("channel_add", blk.fuse_add), ("channel_mul", blk.fuse_scale)) if on)
    return ContextBlock(blk.channels, blk.rd_channels / blk.channels, "att" if blk.use_attn else "avg", fusions)


# name -> (reference description, builder(npattn block) -> official module, key map name(npattn block))
REFERENCES = {
    "alexhex7": ("AlexHex7/Non-local_pytorch@ec15789a lib/non_local_*.py NONLocalBlock2D", _alexhex7, _alexhex7_keys),
    "caffe2": ("facebookresearch/video-nonlocal-net@c253ed5e lib/models/nonlocal_helper.py", _caffe2, lambda b: "caffe2"),
    "gcnet": ("xvjiarui/GCNet@029db540 mmdet/ops/gcb/context_block.py ContextBlock", _gcnet, lambda b: "gcnet"),
    "houqb_coordatt": ("houqb/CoordAttention@7619bea9 coordatt.py CoordAtt",
                       lambda b: CoordAtt(b.channels, b.channels, reduction=32), lambda b: "houqb_coordatt"),
    "houqb_mbv2_ca": ("houqb/CoordAttention@7619bea9 mbv2_ca.py CoordAtt",
                      lambda b: CoordAttMBV2(b.channels, b.channels, groups=32), lambda b: "houqb_mbv2_ca"),
    "sknet_caffe": ("implus/SKNet@17dd7086 models/sknet50.prototxt SK unit",
                    lambda b: SKUnitCaffe(b.in_channels, b.out_channels, b.groups, b.reduced_dim), lambda b: "sknet_caffe"),
    "zxyang_gct": ("z-x-yang/GCT@68983edd PyTorch/GCT.py GCT",
                   lambda b: GCTOfficial(b.num_channels, b.epsilon, b.mode, b.after_relu), lambda b: "same"),
    "zjjconan_simam": ("ZjjConan/SimAM@ae98f43a networks/attentions/simam_module.py simam_module",
                       lambda b: SimAMOfficial(e_lambda=b.e_lambda), lambda b: "same"),
    "yimiandai_ms_cam": ("YimianDai/open-aff@0bcfd8a1 aff_pytorch/aff_net/fusion.py MS_CAM",
                         lambda b: MS_CAMOfficial(b.channels, b.r), lambda b: "same"),
    "yimiandai_aff": ("YimianDai/open-aff@0bcfd8a1 aff_pytorch/aff_net/fusion.py AFF",
                      lambda b: AFFOfficial(b.channels, b.r), lambda b: "same"),
    "yimiandai_iaff": ("YimianDai/open-aff@0bcfd8a1 aff_pytorch/aff_net/fusion.py iAFF",
                       lambda b: iAFFOfficial(b.channels, b.r), lambda b: "same"),
}

# The official configurations: name -> (reference, npattn block, npattn constructor
# arguments that reproduce it (C = 16 here; the porting table gives the general rule)).
OFFICIAL = {
    "alexhex7_embedded_gaussian": ("alexhex7", "NonLocalAttn", dict(in_channels=16, rd_channels=8, use_scale=False, sub_sample=True)),
    "alexhex7_dot_product": ("alexhex7", "NonLocalAttn", dict(in_channels=16, rd_channels=8, use_scale=False, sub_sample=True, mode="dot_product")),
    "alexhex7_gaussian": ("alexhex7", "NonLocalAttn", dict(in_channels=16, rd_channels=8, use_scale=False, sub_sample=True, mode="gaussian")),
    "alexhex7_concatenation": ("alexhex7", "NonLocalAttn", dict(in_channels=16, rd_channels=8, use_scale=False, sub_sample=True, mode="concatenation")),
    "alexhex7_no_sub_sample_no_bn": ("alexhex7", "NonLocalAttn", dict(in_channels=16, rd_channels=8, use_scale=False, norm=False, mode="embedded_gaussian")),
    "caffe2_default": ("caffe2", "NonLocalAttn", dict(in_channels=16, rd_channels=8, sub_sample=True, sub_sample_at="before_conv",
                                                      scale=8 ** -0.5, bn_eps=1.0000001e-5)),
    "gcnet_att_add": ("gcnet", "GlobalContext", dict(channels=16, fuse_add=True, fuse_scale=False, rd_channels=4, ln_eps=1e-5, init="gcnet")),
    "gcnet_att_add_mul": ("gcnet", "GlobalContext", dict(channels=16, fuse_add=True, fuse_scale=True, rd_channels=4, ln_eps=1e-5, init="gcnet")),
    "gcnet_avg_mul": ("gcnet", "GlobalContext", dict(channels=16, use_attn=False, fuse_scale=True, rd_channels=4, ln_eps=1e-5, init="gcnet")),
    "houqb_coordatt": ("houqb_coordatt", "CoordAttn", dict(channels=16, rd_channels=8, bias=True)),
    "houqb_mbv2_ca": ("houqb_mbv2_ca", "CoordAttn", dict(channels=16, rd_channels=8, bias=True)),
    "sknet_caffe": ("sknet_caffe", "SKConv", dict(in_channels=16, out_channels=16, groups=4, bias=False, bn_momentum=0.05)),
    "zxyang_gct_l2": ("zxyang_gct", "GCT", dict(num_channels=16, mode="l2")),
    "zxyang_gct_l1": ("zxyang_gct", "GCT", dict(num_channels=16, mode="l1")),
    "zxyang_gct_l1_after_relu": ("zxyang_gct", "GCT", dict(num_channels=16, mode="l1", after_relu=True)),
    "zjjconan_simam": ("zjjconan_simam", "SimAM", dict()),
    "yimiandai_ms_cam": ("yimiandai_ms_cam", "MS_CAM", dict(channels=16, r=4)),
    "yimiandai_aff": ("yimiandai_aff", "AFF", dict(channels=16, r=4)),
    "yimiandai_iaff": ("yimiandai_iaff", "iAFF", dict(channels=16, r=4)),
}


# The transcriptions of tools/torch_ref_official.py (Jongchan's CBAM, BangguWu's ECA and
# ECA-NS, moskomule's SE) go through the same tables, so that every fixture naming an
# official module is run by ``run_case`` below.
def _register_cbam_eca_se():
    import torch_ref_official as other

    for name, (describe, _block, build, keys) in other.OFFICIAL.items():
        KEY_MAPS[f"{name}_keys"] = [(k, v) for k, v in keys.items()] if keys else _SAME
        REFERENCES[name] = (describe, build, lambda b, n=name: f"{n}_keys")
        CONFIG_CHECKS[name] = lambda b, n=name: other.check_official_config(b, n)


CONFIG_CHECKS = {}  # reference -> raises ValueError unless the npattn block is configured as it
_register_cbam_eca_se()


def make_official(reference, np_block, dtype=torch.float64):
    """(official module with the npattn block's arrays loaded strictly, eval mode; key map;
    description) for ``reference`` (a key of REFERENCES)."""
    describe, build, keys = REFERENCES[reference]
    if reference in CONFIG_CHECKS:
        CONFIG_CHECKS[reference](np_block)
    module = build(np_block).to(dtype)
    mapping = KEY_MAPS[keys(np_block)]
    state = to_official_state(np_block.state_dict(), mapping, module)
    module.load_state_dict({k: (v.to(dtype) if v.is_floating_point() else v) for k, v in state.items()}, strict=True)
    return module.eval(), mapping, describe


def run_case(meta, arrays):
    """A golden case whose manifest names an ``official`` reference, run through that
    transcription in float64 (autograd); results under the fixture's (npattn's) keys."""
    from npattn import golden

    arrays = {k: (v.astype(np.float64) if v.dtype.kind == "f" else v) for k, v in arrays.items()}
    blk = golden.build_block(meta, np.float64)
    blk.load_state_dict({k.split(".", 1)[1]: v for k, v in arrays.items() if k.startswith(("param.", "buffer."))})
    module, mapping, describe = make_official(meta["official"], blk)
    module.train(meta["mode"] == "train")
    tin = [torch.from_numpy(arrays[f"input.{n}"].copy()).requires_grad_(True) for n in meta["inputs"]]
    y = module(*tin)
    y.backward(torch.from_numpy(arrays["grad_output"]))
    out = {"output": y.detach().numpy()}
    for n, t in zip(meta["inputs"], tin):
        out[f"grad.input.{n}"] = t.grad.numpy()
    named = {k: (p.grad.numpy() if p.grad is not None else np.zeros(tuple(p.shape))) for k, p in module.named_parameters()}
    params = blk.parameter_names()
    shapes = {k: blk[k].shape for k in params}
    out.update({f"grad.param.{k}": v for k, v in from_official(named, mapping, shapes).items()})
    if meta["mode"] == "train":
        state = {k: v.numpy() for k, v in module.state_dict().items()}
        buffers = {k: blk[k].shape for k in blk.buffer_names()}
        out.update({f"buffer_after.{k}": v for k, v in from_official(state, mapping, buffers).items()})
    if meta["official"] in CONFIG_CHECKS:  # a transcription of tools/torch_ref_official.py
        import torch_ref_official

        return out, torch_ref_official.describe(meta["official"])
    return out, f"tools/torch_ref_official_b.py: {describe}"
