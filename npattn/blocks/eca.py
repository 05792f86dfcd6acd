"""Efficient channel attention (Wang, Wu, Zhu, Li, Zuo, Hu: "ECA-Net: Efficient Channel
Attention for Deep Convolutional Neural Networks", CVPR 2020), in timm's layout
(``timm.layers.eca.EcaModule``).

A 1-D convolution of k taps over the channel axis of the pooled vector, no bias, zero
padding (k - 1) / 2 at both ends. For x of shape (N, C, H, W) and w = conv.weight[0, 0]::

    s[n, c]  = mean_{h, w} x[n, c]                                   (N, C)
    z[n, c]  = sum_{j=0}^{k-1} w[j] s_pad[n, c + j]                  (N, C), s_pad = s padded by (k-1)/2
    g        = sigmoid(z)                                            (N, C)
    y        = x * g                                                 (N, C, H, W)

With ``channels`` given the kernel size is the paper's adaptive one (timm's rule, the
``kernel_size`` argument is then ignored)::

    t = int(|log2(C) + beta| / gamma);   k = t if t is odd else t + 1;   k = max(k, 3)

Backward, for dy = dL/dy::

    dg[n, c]  = sum_{h, w} dy * x                                    (N, C)
    dz        = dg * g (1 - g)                                       (N, C)
    dw[j]     = sum_{n, c} dz[n, c] s_pad[n, c + j]                  (k,)
    ds_pad[n, c + j] += w[j] dz[n, c]   (then the padding dropped)   (N, C)
    dx        = dy * g + ds / (H W)                                  (N, C, H, W)

(the convolution's lines are those of ``npattn.functional.conv1d_forward``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .. import functional as F
from .._checks import float_array, positive_int, same_dtype, shape_is
from ._timm import check_real
from .base import Block, inv_area, make_rng

__all__ = ["ECA", "eca_kernel_size"]


def eca_kernel_size(channels, gamma=2, beta=1):
    """The ECA paper's adaptive kernel size for C channels (timm's arithmetic)."""
    t = int(abs(math.log(channels, 2) + beta) / gamma)
    return max(t if t % 2 else t + 1, 3)


@dataclass(frozen=True)
class ECACache:
    x: np.ndarray  # (N, C, H, W) the input
    conv: object  # Conv1dCache of the channel convolution on s (N, 1, C)
    gate: np.ndarray  # (N, C, 1, 1) g = sigmoid(z)


class ECA(Block):
    """ECA in timm's layout: ``y = x * sigmoid(conv1d_over_channels(mean_hw x))``.

    Parameters
    ----------
    channels : int or None, default None
        With C given, the kernel size is the adaptive one of the module docstring and
        ``kernel_size`` is ignored (as timm). The block accepts any number of channels
        either way (the convolution does not depend on C).
    kernel_size : odd int, default 3 (used when ``channels`` is None)
    gamma, beta : float, default 2 and 1 (the adaptive rule's constants)
    rng : None, int or numpy.random.Generator (PyTorch's default Conv1d initialisation,
        U(-1/sqrt(k), 1/sqrt(k)))
    dtype : float32 (default) or float64

    State_dict: ``conv.weight`` (1, 1, k). The sigmoid gate and no MLP (timm's defaults;
    its ``use_mlp`` experiment is not offered). ``kernel_size`` attribute: the k used.
    The math is in the module docstring.
    """

    def __init__(self, channels=None, kernel_size=3, gamma=2, beta=1, *, rng=None, dtype=np.float32):
        super().__init__(dtype)
        op = "ECA"
        self.config = dict(channels=channels, kernel_size=kernel_size, gamma=gamma, beta=beta)
        self.gamma = check_real(op, "gamma", gamma, positive=False)
        self.beta = check_real(op, "beta", beta, positive=False)
        if channels is not None:
            self.channels = positive_int(op, "channels", channels)
            if self.gamma == 0:
                raise ValueError(f"{op}: gamma must be non-zero, got {gamma!r}")
            self.kernel_size = eca_kernel_size(self.channels, self.gamma, self.beta)
        else:
            self.channels = None
            self.kernel_size = positive_int(op, "kernel_size", kernel_size)
            if self.kernel_size % 2 == 0:
                raise ValueError(f"{op}: kernel_size must be odd (padding (k - 1) / 2 keeps C values), got {kernel_size}")
        rng = make_rng(rng)
        self._add_param("conv.weight", rng.uniform(-1, 1, (1, 1, self.kernel_size)) / math.sqrt(self.kernel_size))

    def forward(self, x, training=False):
        """``y = x * g``; both modes compute the same (no batch statistics)."""
        x = self._check_input("x", x, 4, self.channels)
        n, c = x.shape[:2]
        s = x.mean(axis=(2, 3)).reshape(n, 1, c)  # (N, 1, C) the channels as a sequence
        z, k_conv = F.conv1d_forward(s, self._state["conv.weight"], padding=(self.kernel_size - 1) // 2)  # (N, 1, C)
        g = F.sigmoid(z).reshape(n, c, 1, 1)  # (N, C, 1, 1)
        y = x * g  # (N, C, H, W)
        return y, ECACache(x, k_conv, g)

    def backward(self, grad_out, cache: ECACache):
        """Returns ``((dx,), {"conv.weight": ...})``."""
        op = "ECA.backward"
        x, g = cache.x, cache.gate
        dy = float_array(op, "grad_out", grad_out, 4, "(N, C, H, W)")
        shape_is(op, "grad_out", dy, x.shape)
        same_dtype(op, "x", x, grad_out=dy)
        n, c, h, w = x.shape
        d_g = np.einsum("ncl,ncl->nc", dy.reshape(n, c, h * w), x.reshape(n, c, h * w))  # (N, C)
        d_z = (d_g * (g * (1 - g)).reshape(n, c)).reshape(n, 1, c)  # (N, 1, C)
        gc = F.conv1d_backward(d_z, cache.conv)
        d_x = dy * g  # (N, C, H, W) through the gate's factor
        d_x += (gc["x"] * inv_area(x.dtype, h, w)).reshape(n, c, 1, 1)  # through the squeeze
        return (d_x,), {"conv.weight": gc["weight"]}
