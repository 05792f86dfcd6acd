"""Gated channel transformation (Yang, Zhu, Wu, Yang: "Gated Channel Transformation for
Visual Recognition", CVPR 2020), as the authors' PyTorch code computes it.

Parameters alpha, gamma, beta have shape (1, C, 1, 1); at initialisation alpha = 1,
gamma = 0, beta = 0, so the gate is 1 and the block is the identity. All sums below
keep their reduced axes (as ``keepdim=True``); eps is ``epsilon``.

The lines below are mode "l2", in ``npattn.explain``'s format (``npattn explain GCT``
walks them).

Forward, mode "l2"::

    alpha = alpha                      (1, C, 1, 1)  embedding weight                   [param("alpha")]
    gamma = gamma                      (1, C, 1, 1)  gating weight                      [param("gamma")]
    beta = beta                        (1, C, 1, 1)  gating bias                        [param("beta")]
    eps = epsilon                      ()                                               [attr("epsilon")]
    l = sqrt(sum_{H, W} x^2 + eps)     (N, C, 1, 1)  global context                     [sqrt(sum(x * x, (2, 3), keepdims=True) + eps)]
    emb = alpha * l                    (N, C, 1, 1)  embedding                          [alpha * l]
    r = sqrt(mean_c emb^2 + eps)       (N, 1, 1, 1)                                     [sqrt(mean(emb * emb, 1, keepdims=True) + eps)]
    norm = gamma / r                   (N, C, 1, 1)  channel normalisation              [gamma / r]
    u = emb * norm + beta              (N, C, 1, 1)                                     [emb * norm + beta]
    t = tanh(u)                        (N, C, 1, 1)                                     [tanh(u)]
    gate = 1 + t                       (N, C, 1, 1)                                     [1 + t]
    y = x * gate                       (N, C, H, W)  gating                             [x * gate]

Forward, mode "l1" (``after_relu=True`` skips the absolute value: the input is known to
be non-negative), the lines that differ::

    l    = sum_{h, w} |x|        (or sum_{h, w} x)    (N, C, 1, 1)
    r    = mean_c |emb| + eps                         (N, 1, 1, 1)

Backward, for dy = dL/dy, in the order the code computes it::

    dgate = sum_{H, W} dy * x          (N, C, 1, 1)  y = x * gate, gate broadcast over H W
    dt = dgate                         (N, C, 1, 1)  gate = 1 + t
    du = dt * (1 - t^2)                (N, C, 1, 1)  tanh' = 1 - t^2
    dbeta = sum_n du                   (1, C, 1, 1)  beta broadcast over N
    dnorm = du * emb                   (N, C, 1, 1)  u = emb * norm + beta
    dgamma = sum_n dnorm / r           (1, C, 1, 1)  norm = gamma / r
    dr = -sum_c dnorm * gamma / r^2    (N, 1, 1, 1)  d(gamma / r)/dr = -gamma / r^2, r broadcast over C
    demb = du * norm + dr * emb / (C r)
                                       (N, C, 1, 1)  directly in u, and through r: dr/demb_c = emb_c / (C r)
    dalpha = sum_n demb * l            (1, C, 1, 1)  emb = alpha * l
    dl = demb * alpha                  (N, C, 1, 1)
    dx = dy * gate + (dl / l) * x      (N, C, H, W)  the factor of y, and l: dl/dx = x / l

In mode "l1" the lines that differ are ``demb = du * norm + dr * sign(emb) / C``
(dr/demb_c = sign(emb_c) / C) and ``dx = dy * gate + dl * sign(x)`` (``dl`` alone with
``after_relu``), ``sign(0) = 0`` being PyTorch's derivative of |.| at 0.
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
        N, C, H, W = x.shape
        alpha, gamma, beta = self["alpha"], self["gamma"], self["beta"]
        eps = x.dtype.type(self.epsilon)
        x_flat = x.reshape(N, C, H * W)  # (N, C, HW) a view
        abs_x = None
        if self.mode == "l2":
            sum_sq = np.einsum("ncl,ncl->nc", x_flat, x_flat).reshape(N, C, 1, 1)  # (N, C, 1, 1)
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
        u = emb * norm + beta  # (N, C, 1, 1)
        t, tanh = F.tanh_forward(u)  # (N, C, 1, 1)
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
        N, C, H, W = x.shape
        alpha, gamma = self["alpha"], self["gamma"]
        emb, r, norm, l = cache.emb, cache.r, cache.norm, cache.l

        dgate = np.einsum("ncl,ncl->nc", dy.reshape(N, C, H * W), x.reshape(N, C, H * W)).reshape(N, C, 1, 1)  # (N, C, 1, 1)
        dt = dgate  # (N, C, 1, 1) gate = 1 + t
        du = F.tanh_backward(dt, cache.tanh)["x"]  # (N, C, 1, 1)
        dbeta = du.sum(axis=0, keepdims=True)  # (1, C, 1, 1)
        dnorm = du * emb  # (N, C, 1, 1)
        dgamma = (dnorm / r).sum(axis=0, keepdims=True)  # (1, C, 1, 1)
        dr = -(dnorm * gamma).sum(axis=1, keepdims=True) / (r * r)  # (N, 1, 1, 1)
        if self.mode == "l2":
            demb = du * norm + dr * emb / (C * r)  # (N, C, 1, 1) directly, and through r
        else:
            demb = du * norm + dr * np.sign(emb) / C  # (N, C, 1, 1)
        dalpha = (demb * l).sum(axis=0, keepdims=True)  # (1, C, 1, 1)
        dl = demb * alpha  # (N, C, 1, 1)
        dx = dy * cache.gate  # (N, C, H, W) through the gate's factor
        if self.mode == "l2":
            dx += (dl / l) * x  # through l = sqrt(sum x^2 + eps)
        elif self.after_relu:
            dx += dl  # through l = sum x
        else:
            dx += F.abs_backward(np.broadcast_to(dl, x.shape), cache.abs_x)["x"]  # through l = sum |x|
        grads = {"alpha": dalpha, "gamma": dgamma, "beta": dbeta}
        return (dx,), grads
