"""Efficient channel attention (Wang, Wu, Zhu, Li, Zuo, Hu: "ECA-Net: Efficient Channel
Attention for Deep Convolutional Neural Networks", CVPR 2020), in timm's layout
(``timm.layers.eca.EcaModule``).

A 1-D convolution of k taps over the channel axis of the pooled vector, no bias, zero
padding p = (k - 1) / 2 at both ends. For x of shape (N, C, H, W), in ``npattn.explain``'s
format (``npattn explain ECA`` walks the lines).

Forward::

    w = conv.weight                    (1, 1, k)     the k taps, shared by the channels  [param("conv.weight")]
    s = mean_{H, W} x                  (N, 1, C)     the channels as a sequence         [mean(x, (2, 3))[:, None, :]]
    z = sum_j w[j] s_pad[c + j]        (N, 1, C)     conv1d, s_pad = s padded by p      [conv1d(s, w, padding=(w.shape[2] - 1) // 2)]
    g = sigmoid(z)                     (N, 1, C)                                        [sigmoid(z)]
    y = x * g[:, 0, :, None, None]     (N, C, H, W)                                     [x * g[:, 0, :, None, None]]

With ``channels`` given the kernel size is the paper's adaptive one (timm's rule, the
``kernel_size`` argument is then ignored)::

    t = int(|log2(C) + beta| / gamma);   k = t if t is odd else t + 1;   k = max(k, 3)

Backward, for dy = dL/dy::

    dg = sum_{H, W} dy * x             (N, 1, C)     y = x * g, g broadcast over H W
    dz = dg * g (1 - g)                (N, 1, C)     sigmoid' = g (1 - g)
    dw = sum_{n,c} dz[c] s_pad[c+j]    (1, 1, k)     z is linear in w: tap j saw s_pad[c + j]
    ds = sum_j w[j] dz[c - j + p]      (N, 1, C)     z is linear in s: the adjoint of the
                                                     convolution, padding dropped
    dx = dy * g + ds / (H W)           (N, C, H, W)  the factor of y, and the mean's even share

(the convolution's lines are those of ``npattn.functional.conv1d_forward``).

``shared=False`` is the paper's ECA-NS (BangguWu/ECANet ``models/eca_ns.py``): every
channel has its own k taps, ``conv.weight`` (C, 1, k), a ``Conv1d(C, C, k, groups=C)`` on
the k-wide window of neighbouring channels. It takes ``channels`` and uses ``kernel_size``
as given (the adaptive k applies only to the shared kernel). With w[c, j] =
conv.weight[c, 0, j]::

    win[n, c, j] = s_pad[n, c + j]                                   (N, C, k) the unfolded windows
    z[n, c]      = sum_j w[c, j] win[n, c, j]                        (N, C)
    dw[c, j]     = sum_n dz[n, c] win[n, c, j]                       (C, k)
    ds_pad[n, c + j] += w[c, j] dz[n, c]   (then the padding dropped)

``use_mlp=True`` is timm's experiment (``EcaModule(use_mlp=True)``, not in the paper; it
needs ``channels``, whose adaptive k it uses): a 1x1 Conv1d from 1 to R channels with
bias (``conv.weight`` (R, 1, 1), ``conv.bias`` (R,)), a ReLU, and a k-tap Conv1d from R
channels back to 1 with bias (``conv2.weight`` (1, R, k), ``conv2.bias`` (1,))::

    u[n, r, c] = a[r] s[n, c] + b1[r]                                (N, R, C)  a = conv.weight[:, 0, 0]
    v          = relu(u)                                             (N, R, C)
    z[n, c]    = b2 + sum_r sum_j w2[r, j] v_pad[n, r, c + j]        (N, C)
    dv_pad[n, r, c + j] += w2[r, j] dz[n, c];  dw2[r, j] = sum_{n,c} dz[n, c] v_pad[n, r, c + j]
    du = dv * [u > 0];  da[r] = sum_{n,c} du[n, r, c] s[n, c];  db1[r] = sum_{n,c} du[n, r, c]
    ds[n, c] = sum_r a[r] du[n, r, c]

with R = ``rd_channels``, else timm's ``make_divisible(C * rd_ratio, rd_divisor)`` (its
default ``round_limit=0.9``: one ``rd_divisor`` added when rounding lost more than 10%).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np

from .. import functional as F
from .._checks import float_array, positive_int, same_dtype, shape_is
from ._timm import check_bool, check_real, make_divisible
from .base import Block, inv_area, make_rng

__all__ = ["ECA", "eca_kernel_size"]


def eca_kernel_size(channels, gamma=2, beta=1):
    """The ECA paper's adaptive kernel size for C channels (timm's arithmetic)."""
    t = int(abs(math.log(channels, 2) + beta) / gamma)
    return max(t if t % 2 else t + 1, 3)


@dataclass(frozen=True)
class ECACache:
    x: np.ndarray  # (N, C, H, W) the input
    conv: object  # Conv1dCache of the channel convolution on s (N, 1, C); shared=False: on the windows (N, C, k)
    gate: np.ndarray  # (N, 1, C) g = sigmoid(z)
    relu: object = None  # use_mlp: ReluCache of u (N, R, C)
    conv2: object = None  # use_mlp: Conv1dCache of conv2 on v (N, R, C)


class ECA(Block):
    """ECA in timm's layout: ``y = x * sigmoid(conv1d_over_channels(mean_hw x))``.

    Parameters
    ----------
    channels : int or None, default None
        With C given, the kernel size is the adaptive one of the module docstring and
        ``kernel_size`` is ignored (as timm), except for ECA-NS (``shared=False``). The
        shared-kernel block without ``channels`` accepts any number of channels (its
        convolution does not depend on C); with ``channels`` the input must have C.
    kernel_size : odd int, default 3 (used when ``channels`` is None, and by ECA-NS)
    gamma, beta : float, default 2 and 1 (the adaptive rule's constants)
    shared : bool, default True
        False: ECA-NS, one kernel per channel, ``conv.weight`` (C, 1, k); needs
        ``channels`` and uses ``kernel_size`` as given (module docstring).
    use_mlp : bool, default False
        timm's MLP variant (``conv``, ReLU, ``conv2``, both with bias); needs ``channels``.
    rd_ratio : float, default 1/8; rd_channels : int or None; rd_divisor : int, default 8
        The MLP's hidden width R (``use_mlp`` only), timm's arithmetic.
    rng : None, int or numpy.random.Generator (PyTorch's default Conv1d initialisation,
        U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in = k, or 1 and R k for the MLP's convs)
    dtype : float32 (default) or float64

    State_dict: ``conv.weight`` (1, 1, k); ECA-NS ``conv.weight`` (C, 1, k); ``use_mlp``
    ``conv.weight`` (R, 1, 1), ``conv.bias`` (R,), ``conv2.weight`` (1, R, k),
    ``conv2.bias`` (1,). The sigmoid gate (timm's default). ``kernel_size`` attribute: the
    k used. The math is in the module docstring.
    """

    def __init__(self, channels=None, kernel_size=3, gamma=2, beta=1, *, shared=True, use_mlp=False,
                 rd_ratio=1.0 / 8, rd_channels=None, rd_divisor=8, rng=None, dtype=np.float32):
        super().__init__(dtype)
        op = "ECA"
        self.config = dict(channels=channels, kernel_size=kernel_size, gamma=gamma, beta=beta, shared=shared,
                           use_mlp=use_mlp, rd_ratio=rd_ratio, rd_channels=rd_channels, rd_divisor=rd_divisor)
        self.gamma = check_real(op, "gamma", gamma, positive=False)
        self.beta = check_real(op, "beta", beta, positive=False)
        self.shared = check_bool(op, "shared", shared)
        self.use_mlp = check_bool(op, "use_mlp", use_mlp)
        if (not self.shared or self.use_mlp) and channels is None:
            what = "shared=False (one kernel per channel)" if not self.shared else "use_mlp=True (timm asserts it)"
            raise ValueError(f"{op}: {what} needs channels, got channels=None")
        if not self.shared and self.use_mlp:
            raise ValueError(f"{op}: shared=False and use_mlp=True cannot be combined (no such module exists)")
        if not self.shared:
            self.channels = positive_int(op, "channels", channels)
            self.kernel_size = positive_int(op, "kernel_size", kernel_size)
            if self.kernel_size % 2 == 0:
                raise ValueError(f"{op}: kernel_size must be odd (padding (k - 1) / 2 keeps C values), got {kernel_size}")
        elif channels is not None:
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
        k = self.kernel_size
        if self.use_mlp:
            self.rd_channels = self._mlp_width(op, rd_ratio, rd_channels, rd_divisor)
            r = self.rd_channels
            self._add_param("conv.weight", rng.uniform(-1, 1, (r, 1, 1)))  # fan_in 1
            self._add_param("conv.bias", rng.uniform(-1, 1, (r,)))
            self._add_param("conv2.weight", rng.uniform(-1, 1, (1, r, k)) / math.sqrt(r * k))
            self._add_param("conv2.bias", rng.uniform(-1, 1, (1,)) / math.sqrt(r * k))
        elif self.shared:
            self._add_param("conv.weight", rng.uniform(-1, 1, (1, 1, k)) / math.sqrt(k))
        else:
            self._add_param("conv.weight", rng.uniform(-1, 1, (self.channels, 1, k)) / math.sqrt(k))  # fan_in k

    def _mlp_width(self, op, rd_ratio, rd_channels, rd_divisor):
        """R: ``rd_channels`` when given (``is None`` tested, as timm), else timm's
        ``make_divisible(C * rd_ratio, rd_divisor)`` with its default round_limit 0.9."""
        rd_ratio = check_real(op, "rd_ratio", rd_ratio)
        if not isinstance(rd_divisor, numbers.Integral) or isinstance(rd_divisor, bool):
            raise TypeError(f"{op}: rd_divisor must be an int, got {rd_divisor!r}")
        if rd_divisor < 1:
            raise ValueError(f"{op}: rd_divisor must be >= 1, got {rd_divisor}")
        if rd_channels is None:
            return make_divisible(self.channels * rd_ratio, int(rd_divisor))
        if not isinstance(rd_channels, numbers.Integral) or isinstance(rd_channels, bool):
            raise TypeError(f"{op}: rd_channels must be None or an int, got {rd_channels!r}")
        if rd_channels < 1:
            raise ValueError(f"{op}: rd_channels must be None or >= 1, got {rd_channels}")
        return int(rd_channels)

    def forward(self, x, training=False):
        """``y = x * g``; both modes compute the same (no batch statistics)."""
        x = self._check_input("x", x, 4, self.channels)
        n, c = x.shape[:2]
        pad = (self.kernel_size - 1) // 2
        s = x.mean(axis=(2, 3)).reshape(n, 1, c)  # (N, 1, C) the channels as a sequence
        if not self.shared:  # ECA-NS: the official unfold, then Conv1d(C, C, k, groups=C)
            s_pad = np.pad(s[:, 0], ((0, 0), (pad, pad)))  # (N, C + 2 pad)
            win = np.lib.stride_tricks.sliding_window_view(s_pad, self.kernel_size, axis=1)  # (N, C, k)
            z, k_conv = F.conv1d_forward(np.ascontiguousarray(win), self._state["conv.weight"], groups=c)  # (N, C, 1)
            g = F.sigmoid(z).reshape(n, 1, c)  # (N, 1, C)
            return x * g[:, 0, :, None, None], ECACache(x, k_conv, g)
        if self.use_mlp:
            s_ = self._state
            u, k_conv = F.conv1d_forward(s, s_["conv.weight"], s_["conv.bias"])  # (N, R, C)
            v, k_relu = F.relu_forward(u)  # (N, R, C)
            z, k_conv2 = F.conv1d_forward(v, s_["conv2.weight"], s_["conv2.bias"], padding=pad)  # (N, 1, C)
            g = F.sigmoid(z)  # (N, 1, C)
            return x * g[:, 0, :, None, None], ECACache(x, k_conv, g, k_relu, k_conv2)
        z, k_conv = F.conv1d_forward(s, self._state["conv.weight"], padding=pad)  # (N, 1, C)
        g = F.sigmoid(z)  # (N, 1, C)
        y = x * g[:, 0, :, None, None]  # (N, C, H, W)
        return y, ECACache(x, k_conv, g)

    def backward(self, grad_out, cache: ECACache):
        """Returns ``((dx,), {"conv.weight": ..., [the MLP's other keys]})``."""
        op = "ECA.backward"
        x, g = cache.x, cache.gate
        dy = float_array(op, "grad_out", grad_out, 4, "(N, C, H, W)")
        shape_is(op, "grad_out", dy, x.shape)
        same_dtype(op, "x", x, grad_out=dy)
        N, C, H, W = x.shape
        dg = np.einsum("ncl,ncl->nc", dy.reshape(N, C, H * W), x.reshape(N, C, H * W))[:, None, :]  # (N, 1, C)
        dz = dg * (g * (1 - g))  # (N, 1, C)
        grads = {}  # dw (conv.weight), and the MLP's keys
        if not self.shared:
            gc = F.conv1d_backward(dz.reshape(N, C, 1), cache.conv)  # windows (N, C, k), weight (C, 1, k)
            grads["conv.weight"] = gc["weight"]
            pad = (self.kernel_size - 1) // 2
            d_pad = np.zeros((N, C + 2 * pad), dtype=x.dtype)  # (N, C + 2 pad)
            for j in range(self.kernel_size):  # fold: window tap j of channel c read s_pad[c + j]
                d_pad[:, j:j + C] += gc["x"][:, :, j]
            ds = d_pad[:, pad:pad + C][:, None, :]  # (N, 1, C) the padding dropped
        elif self.use_mlp:
            g2 = F.conv1d_backward(dz, cache.conv2)  # v (N, R, C)
            du = F.relu_backward(g2["x"], cache.relu)["x"]  # (N, R, C)
            g1 = F.conv1d_backward(du, cache.conv)  # s (N, 1, C)
            grads.update({"conv.weight": g1["weight"], "conv.bias": g1["bias"],
                          "conv2.weight": g2["weight"], "conv2.bias": g2["bias"]})
            ds = g1["x"]  # (N, 1, C)
        else:
            gc = F.conv1d_backward(dz, cache.conv)
            grads["conv.weight"] = gc["weight"]  # dw (1, 1, k)
            ds = gc["x"]  # (N, 1, C)
        dx = dy * g[:, 0, :, None, None]  # (N, C, H, W) through the gate's factor
        dx += (ds[:, 0] * inv_area(x.dtype, H, W))[:, :, None, None]  # through the squeeze
        return (dx,), {k: grads[k] for k in self.parameter_names()}
