"""SimAM, a parameter-free attention module (Yang, Zhang, Li, Xie: "SimAM: A Simple,
Parameter-Free Attention Module for Convolutional Neural Networks", ICML 2021).

Each neuron is weighted by the inverse of its minimal energy, computed in closed form
from the mean and variance of its channel. For x of shape (N, C, H, W), per (n, c), with
m = H W values and M = m - 1 (the paper's n)::

    mu   = (1/m) sum_{h, w} x                    (N, C, 1, 1)
    d    = (x - mu)^2                            (N, C, H, W)
    v    = (1/M) sum_{h, w} d                    (N, C, 1, 1)   unbiased variance
    q    = 4 (v + lambda)                        (N, C, 1, 1)
    e    = d / q + 1/2                           (N, C, H, W)   inverse energy
    s    = sigmoid(e)                            (N, C, H, W)
    y    = x * s                                 (N, C, H, W)

Backward, for dy = dL/dy::

    de   = dy * x * s (1 - s)                    (N, C, H, W)
    dq   = -sum_{h, w} de * d / q^2              (N, C, 1, 1)
    dd   = de / q + 4 dq / M                     (N, C, H, W)   direct, and through v
    dxc  = 2 (x - mu) dd                         (N, C, H, W)   d = xc^2, xc = x - mu
    dx   = dy * s + dxc - mean_{h, w} dxc        (N, C, H, W)   mu depends on x

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
        n, c, h, w = x.shape
        if h * w < 2:
            raise ValueError(f"SimAM: x must have at least 2 spatial positions (H W - 1 divides), got shape {tuple(x.shape)}")
        dt = x.dtype.type
        xc = x - x.mean(axis=(2, 3), keepdims=True)  # (N, C, H, W)
        d = xc * xc  # (N, C, H, W)
        q = 4 * (d.sum(axis=(2, 3), keepdims=True) / dt(h * w - 1) + dt(self.e_lambda))  # (N, C, 1, 1)
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
        n, c, h, w = x.shape
        dt = x.dtype.type
        d_e = dy * x * (s * (1 - s))  # (N, C, H, W)
        d_q = -(d_e * cache.d).sum(axis=(2, 3), keepdims=True) / (q * q)  # (N, C, 1, 1)
        d_d = d_e / q + d_q * dt(4.0 / (h * w - 1))  # (N, C, H, W)
        d_xc = 2 * cache.xc * d_d  # (N, C, H, W)
        d_x = dy * s  # (N, C, H, W) direct path
        d_x += d_xc
        d_x -= d_xc.mean(axis=(2, 3), keepdims=True)  # through mu
        return (d_x,), {}
