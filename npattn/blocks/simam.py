"""SimAM, a parameter-free attention module (Yang, Zhang, Li, Xie: "SimAM: A Simple,
Parameter-Free Attention Module for Convolutional Neural Networks", ICML 2021).

Each neuron is weighted by the inverse of its minimal energy, computed in closed form
from the mean and variance of its channel. For x of shape (N, C, H, W), per (n, c), with
m = H W values and M = m - 1 (the paper's n); the format of the lines is
``npattn.explain``'s, and ``npattn explain SimAM`` walks them.

Forward::

    lam = e_lambda                     ()            the paper's lambda                 [attr("e_lambda")]
    mu = (1/m) sum_{H, W} x            (N, C, 1, 1)  channel mean                       [mean(x, (2, 3), keepdims=True)]
    xc = x - mu                        (N, C, H, W)  centred                            [x - mu]
    d = xc^2                           (N, C, H, W)  squared distance to the mean       [xc * xc]
    v = (1/M) sum_{H, W} d             (N, C, 1, 1)  unbiased variance                  [sum(d, (2, 3), keepdims=True) / (x.shape[2] * x.shape[3] - 1)]
    q = 4 (v + lam)                    (N, C, 1, 1)                                     [4 * (v + lam)]
    e = d / q + 1/2                    (N, C, H, W)  inverse energy                     [d / q + 0.5]
    s = sigmoid(e)                     (N, C, H, W)                                     [sigmoid(e)]
    y = x * s                          (N, C, H, W)                                     [x * s]

Backward, for dy = dL/dy::

    ds = dy * x                        (N, C, H, W)  y = x * s is bilinear
    de = ds * s (1 - s)                (N, C, H, W)  sigmoid' = s (1 - s)
    dq = -sum_{H, W} de * d / q^2      (N, C, 1, 1)  d(d/q)/dq = -d / q^2, summed where q is broadcast
    dv = 4 dq                          (N, C, 1, 1)  q = 4 (v + lam)
    dd = de / q + dv / M               (N, C, H, W)  d reaches e directly and q through v
    dxc = 2 xc dd                      (N, C, H, W)  d = xc^2
    dmu = -sum_{H, W} dxc              (N, C, 1, 1)  xc = x - mu, mu broadcast over H W
    dx = dy * s + dxc + dmu / (H W)    (N, C, H, W)  three paths: the factor of y, xc, and mu = mean x

H W = 1 divides by M = 0 (0/0, NaN in PyTorch); npattn refuses it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import functional as F
from .._checks import float_array, same_dtype, shape_is
from ._timm import check_real
from .base import Block

__all__ = ["SimAM"]


@dataclass(frozen=True)
class SimAMCache:
    x: np.ndarray  # (N, C, H, W) the input
    xc: np.ndarray  # (N, C, H, W) x - mu
    d: np.ndarray  # (N, C, H, W) (x - mu)^2
    q: np.ndarray  # (N, C, 1, 1) 4 (v + lambda)
    s: np.ndarray  # (N, C, H, W) sigmoid(e)


class SimAM(Block):
    """SimAM: ``y = x * sigmoid((x - mu)^2 / (4 (var + e_lambda)) + 1/2)`` per channel
    (module docstring; var the unbiased variance over H W).

    Parameters
    ----------
    e_lambda : float > 0, default 1e-4 (the paper's lambda)
    rng : accepted for a uniform constructor and ignored (no parameters)
    dtype : float32 (default) or float64; the input's dtype must match

    Empty state_dict; any number of channels; H W must be at least 2.
    """

    def __init__(self, e_lambda=1e-4, *, rng=None, dtype=np.float32):
        super().__init__(dtype)
        self.config = dict(e_lambda=e_lambda)
        self.e_lambda = check_real("SimAM", "e_lambda", e_lambda)

    def forward(self, x, training=False):
        """``y = x * s``; both modes compute the same."""
        x = self._check_input("x", x, 4)
        N, C, H, W = x.shape
        if H * W < 2:
            raise ValueError(f"SimAM: x must have at least 2 spatial positions (H W - 1 divides), got shape {tuple(x.shape)}")
        dt = x.dtype.type
        mu = x.mean(axis=(2, 3), keepdims=True)  # (N, C, 1, 1)
        xc = x - mu  # (N, C, H, W)
        d = xc * xc  # (N, C, H, W)
        v = d.sum(axis=(2, 3), keepdims=True) / dt(H * W - 1)  # (N, C, 1, 1)
        q = 4 * (v + dt(self.e_lambda))  # (N, C, 1, 1)
        e = d / q + dt(0.5)  # (N, C, H, W)
        s = F.sigmoid(e)  # (N, C, H, W)
        y = x * s  # (N, C, H, W)
        return y, SimAMCache(x, xc, d, q, s)

    def backward(self, grad_out, cache: SimAMCache):
        """Returns ``((dx,), {})``."""
        op = "SimAM.backward"
        x, s, q = cache.x, cache.s, cache.q
        dy = float_array(op, "grad_out", grad_out, 4, "(N, C, H, W)")
        shape_is(op, "grad_out", dy, x.shape)
        same_dtype(op, "x", x, grad_out=dy)
        N, C, H, W = x.shape
        dt = x.dtype.type
        xc, d = cache.xc, cache.d
        ds = dy * x  # (N, C, H, W)
        de = ds * (s * (1 - s))  # (N, C, H, W)
        dq = -(de * d).sum(axis=(2, 3), keepdims=True) / (q * q)  # (N, C, 1, 1)
        dv = 4 * dq  # (N, C, 1, 1)
        dd = de / q + dv * dt(1.0 / (H * W - 1))  # (N, C, H, W)
        dxc = 2 * xc * dd  # (N, C, H, W)
        dmu = -dxc.sum(axis=(2, 3), keepdims=True)  # (N, C, 1, 1)
        dx = dy * s  # (N, C, H, W) direct path
        dx += dxc
        dx += dmu / dt(H * W)  # through mu
        return (dx,), {}
