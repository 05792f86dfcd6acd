"""Gated channel transformation (Yang, Zhu, Wu, Yang: "Gated Channel Transformation for
Visual Recognition", CVPR 2020), as the authors' PyTorch code computes it.

Parameters alpha, gamma, beta have shape (1, C, 1, 1); at initialisation alpha = 1,
gamma = 0, beta = 0, so the gate is 1 and the block is the identity. All sums below
keep their reduced axes (as ``keepdim=True``); eps is ``epsilon``.

Forward, mode "l2"::

    l    = sqrt(sum_{h, w} x^2 + eps)                 (N, C, 1, 1)  global context
    emb  = alpha * l                                  (N, C, 1, 1)  embedding
    r    = sqrt(mean_c emb^2 + eps)                   (N, 1, 1, 1)
    norm = gamma / r                                  (N, C, 1, 1)  channel normalisation
    t    = tanh(emb * norm + beta)                    (N, C, 1, 1)
    y    = x * (1 + t)                                (N, C, H, W)  gating

Forward, mode "l1" (``after_relu=True`` skips the absolute value: the input is known to
be non-negative)::

    l    = sum_{h, w} |x|        (or sum_{h, w} x)    (N, C, 1, 1)
    emb  = alpha * l                                  (N, C, 1, 1)
    r    = mean_c |emb| + eps                         (N, 1, 1, 1)
    norm = gamma / r                                  (N, C, 1, 1)
    t, y as in "l2"

Backward, for dy = dL/dy, in the order the code computes it (u = emb * norm + beta)::

    dgate  = sum_{h, w} dy * x                        (N, C, 1, 1)
    du     = dgate * (1 - t^2)                        (N, C, 1, 1)  tanh' = 1 - t^2
    dbeta  = sum_n du                                 (1, C, 1, 1)
    demb   = du * norm                                (N, C, 1, 1)  direct path
    dnorm  = du * emb                                 (N, C, 1, 1)
    dgamma = sum_n dnorm / r                          (1, C, 1, 1)
    dr     = -sum_c dnorm * gamma / r^2               (N, 1, 1, 1)
    l2:  demb += dr * emb / (C r)                     dr/demb_c = emb_c / (C r)
    l1:  demb += dr * sign(emb) / C                   dr/demb_c = sign(emb_c) / C
    dalpha = sum_n demb * l                           (1, C, 1, 1)
    dl     = demb * alpha                             (N, C, 1, 1)
    l2:  dx = dy * (1 + t) + (dl / l) * x             dl/dx = x / l
    l1:  dx = dy * (1 + t) + dl * sign(x)             (dl * 1 with after_relu)

with ``sign(0) = 0`` (PyTorch's derivative of |.| at 0).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np

from .. import functional as F
from .._checks import float_array, positive_int, same_dtype, shape_is
from .base import Block

__all__ = ["GCT"]

MODES = ("l2", "l1")


@dataclass(frozen=True)
class GCTCache:
    x: np.ndarray  # (N, C, H, W) the input
    l: np.ndarray  # (N, C, 1, 1) global context: sqrt(sum x^2 + eps) (l2), sum |x| (l1)
    emb: np.ndarray  # (N, C, 1, 1) alpha * l
    r: np.ndarray  # (N, 1, 1, 1) the normaliser: sqrt(mean emb^2 + eps) (l2), mean |emb| + eps (l1)
    norm: np.ndarray  # (N, C, 1, 1) gamma / r
    tanh: object  # TanhCache of t = tanh(emb * norm + beta), (N, C, 1, 1)
    gate: np.ndarray  # (N, C, 1, 1) 1 + t
    abs_x: object  # AbsCache of |x| (mode l1 without after_relu), else None


class GCT(Block):
    """Gated channel transformation: ``y = x * (1 + tanh(alpha l(x) * gamma / r + beta))``.

    Parameters
    ----------
    num_channels : int
        C, the channels of the input.
    epsilon : float, default 1e-5
    mode : "l2" (default) or "l1"; any other value raises ``ValueError``.
    after_relu : bool, default False
        Mode "l1" only: the input is non-negative, so ``|x|`` is replaced by ``x``.
        Ignored in mode "l2", as in the original code.
    rng : ignored
        Accepted so that every block takes the same constructor arguments; GCT's
        initialisation is deterministic (alpha = 1, gamma = 0, beta = 0).
    dtype : float32 (default, as PyTorch) or float64

    The math, forward and backward, is in the module docstring.
    """

    def __init__(self, num_channels, epsilon=1e-5, mode="l2", after_relu=False, *, rng=None, dtype=np.float32):
        super().__init__(dtype)
        op = "GCT"
        self.num_channels = positive_int(op, "num_channels", num_channels)
        if not isinstance(epsilon, numbers.Real) or isinstance(epsilon, bool):
            raise TypeError(f"{op}: epsilon must be a real number, got {epsilon!r}")
        if not (math.isfinite(epsilon) and epsilon >= 0):
            raise ValueError(f"{op}: epsilon must be finite and >= 0, got {epsilon!r}")
        if mode not in MODES:
            raise ValueError(f"{op}: mode must be one of {MODES}, got {mode!r}")
        if not isinstance(after_relu, (bool, np.bool_)):
            raise TypeError(f"{op}: after_relu must be a bool, got {after_relu!r}")
        self.epsilon = float(epsilon)
        self.mode = mode
        self.after_relu = bool(after_relu)
        shape = (1, self.num_channels, 1, 1)
        self._add_param("alpha", np.ones(shape))
        self._add_param("gamma", np.zeros(shape))
        self._add_param("beta", np.zeros(shape))

    def forward(self, x, training=False):
        """``y = x * gate`` with the gate of the module docstring; ``training`` does not
        change anything (GCT has no batch statistics). Returns ``(y, cache)``."""
        x = self._check_input("x", x, 4, self.num_channels)
        n, c, h, w = x.shape
        alpha, gamma, beta = self["alpha"], self["gamma"], self["beta"]
        eps = x.dtype.type(self.epsilon)
        x_flat = x.reshape(n, c, h * w)  # (N, C, HW) a view
        abs_x = None
        if self.mode == "l2":
            sum_sq = np.einsum("ncl,ncl->nc", x_flat, x_flat).reshape(n, c, 1, 1)  # (N, C, 1, 1)
            l = np.sqrt(sum_sq + eps)  # (N, C, 1, 1)
            emb = alpha * l  # (N, C, 1, 1)
            r = np.sqrt((emb * emb).mean(axis=1, keepdims=True) + eps)  # (N, 1, 1, 1)
        else:
            if self.after_relu:
                l = x.sum(axis=(2, 3), keepdims=True)  # (N, C, 1, 1)
            else:
                ax, abs_x = F.abs_forward(x)  # (N, C, H, W)
                l = ax.sum(axis=(2, 3), keepdims=True)  # (N, C, 1, 1)
            emb = alpha * l  # (N, C, 1, 1)
            r = np.abs(emb).mean(axis=1, keepdims=True) + eps  # (N, 1, 1, 1)
        norm = gamma / r  # (N, C, 1, 1)
        t, tanh = F.tanh_forward(emb * norm + beta)  # (N, C, 1, 1)
        gate = 1 + t  # (N, C, 1, 1)
        y = x * gate  # (N, C, H, W)
        return y, GCTCache(x, l, emb, r, norm, tanh, gate, abs_x)

    def backward(self, grad_out, cache: GCTCache):
        """Returns ``((dx,), {"alpha": ..., "gamma": ..., "beta": ...})``."""
        op = "GCT.backward"
        x = cache.x
        dy = float_array(op, "grad_out", grad_out, 4, "(N, C, H, W)")
        shape_is(op, "grad_out", dy, x.shape)
        same_dtype(op, "x", x, grad_out=dy)
        n, c, h, w = x.shape
        alpha, gamma = self["alpha"], self["gamma"]
        emb, r, norm, l = cache.emb, cache.r, cache.norm, cache.l

        d_gate = np.einsum("ncl,ncl->nc", dy.reshape(n, c, h * w), x.reshape(n, c, h * w)).reshape(n, c, 1, 1)  # (N, C, 1, 1)
        d_u = F.tanh_backward(d_gate, cache.tanh)["x"]  # (N, C, 1, 1)
        d_beta = d_u.sum(axis=0, keepdims=True)  # (1, C, 1, 1)
        d_emb = d_u * norm  # (N, C, 1, 1)
        d_norm = d_u * emb  # (N, C, 1, 1)
        d_gamma = (d_norm / r).sum(axis=0, keepdims=True)  # (1, C, 1, 1)
        d_r = -(d_norm * gamma).sum(axis=1, keepdims=True) / (r * r)  # (N, 1, 1, 1)
        if self.mode == "l2":
            d_emb = d_emb + d_r * emb / (c * r)  # (N, C, 1, 1)
        else:
            d_emb = d_emb + d_r * np.sign(emb) / c  # (N, C, 1, 1)
        d_alpha = (d_emb * l).sum(axis=0, keepdims=True)  # (1, C, 1, 1)
        d_l = d_emb * alpha  # (N, C, 1, 1)
        d_x = dy * cache.gate  # (N, C, H, W) through the gate's factor
        if self.mode == "l2":
            d_x += (d_l / l) * x  # through l = sqrt(sum x^2 + eps)
        elif self.after_relu:
            d_x += d_l  # through l = sum x
        else:
            d_x += F.abs_backward(np.broadcast_to(d_l, x.shape), cache.abs_x)["x"]  # through l = sum |x|
        grads = {"alpha": d_alpha, "gamma": d_gamma, "beta": d_beta}
        return (d_x,), grads
