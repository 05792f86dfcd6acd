"""Layer normalisation: over the channel axis of (N, C) or (N, C, H, W), as timm's
``LayerNorm2d`` (``F.layer_norm`` over C after moving the channels last), and over the
last axis of an array of any rank, as ``torch.nn.functional.layer_norm(x, (C,))`` (timm's
``LayerNorm`` in its transformer blocks)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .._checks import float_array, same_dtype, upstream


@dataclass(frozen=True)
class LayerNorm2dCache:
    x_hat: np.ndarray  # shape of x: (x - mean_c x) / sqrt(var_c x + eps)
    inv_std: np.ndarray  # (N, 1[, H, W]) 1 / sqrt(var_c x + eps)
    weight: np.ndarray  # (C,) or None
    has_bias: bool


def layer_norm2d_forward(x, weight=None, bias=None, eps=1e-6):
    """Normalise every position's C channel values to mean 0, variance 1, then scale and shift.

    Parameters
    ----------
    x : ndarray (N, C) or (N, C, H, W)
    weight, bias : ndarray (C,) or None (elementwise affine gamma, beta)
    eps : float >= 0, default 1e-6 (timm's ``LayerNorm2d``; ``torch.nn.LayerNorm`` uses 1e-5)

    Notes
    -----
    Forward, at each (n, h, w), over the C values x_c (biased variance, as torch)::

        mu    = (1/C) sum_c x_c
        var   = (1/C) sum_c (x_c - mu)^2
        x_hat = (x - mu) / sqrt(var + eps)
        y     = gamma x_hat + beta

    Backward, with g_c = dy_c gamma_c (the gradient reaching x_hat) and r = 1/sqrt(var + eps)::

        dbeta  = sum_{n, h, w} dy
        dgamma = sum_{n, h, w} dy * x_hat
        dx_c   = r (g_c - (1/C) sum_k g_k - x_hat_c (1/C) sum_k g_k x_hat_k)

    (the mean removes the average of g; the variance removes its component along x_hat).
    The same formula as batch normalisation in training, with the roles of the axes
    swapped: here the statistics are per position, over channels. With C = 1, x_hat = 0
    and dx = 0 exactly: the output is beta whatever x is.
    """
    op = "layer_norm2d"
    x = float_array(op, "x", x, (2, 4), "(N, C) or (N, C, H, W)")
    c = x.shape[1]
    for name, a in (("weight", weight), ("bias", bias)):
        if a is not None:
            float_array(op, name, a, 1, "(C,)")
            if a.shape != (c,):
                raise ValueError(f"{op}: {name} must have shape ({c},) to match x's {c} channels, got {tuple(a.shape)}")
    same_dtype(op, "x", x, weight=weight, bias=bias)
    if not (isinstance(eps, (int, float)) and not isinstance(eps, bool) and eps >= 0):
        raise ValueError(f"{op}: eps must be a number >= 0, got {eps!r}")
    if c == 0:
        raise ValueError(f"{op}: x must have at least 1 channel, got shape {tuple(x.shape)}")
    dt = x.dtype.type
    view = (1, c) + (1,) * (x.ndim - 2)
    mu = x.mean(axis=1, keepdims=True)  # (N, 1[, H, W])
    xc = x - mu  # shape of x
    var = (xc * xc).mean(axis=1, keepdims=True)  # (N, 1[, H, W]) biased
    inv_std = 1.0 / np.sqrt(var + dt(eps))  # (N, 1[, H, W])
    x_hat = xc  # normalised in place (xc is ours)
    x_hat *= inv_std
    y = x_hat * weight.reshape(view) if weight is not None else x_hat.copy()
    if bias is not None:
        y += bias.reshape(view)
    return y, LayerNorm2dCache(x_hat, inv_std, weight, bias is not None)


def layer_norm2d_backward(dy, cache: LayerNorm2dCache):
    """Gradients of :func:`layer_norm2d_forward`: dict with ``x`` and, when given, ``weight``, ``bias``."""
    x_hat = cache.x_hat
    dy = upstream("layer_norm2d_backward", "dy", dy, x_hat.shape, x_hat.dtype)
    c = x_hat.shape[1]
    axes = (0,) if x_hat.ndim == 2 else (0, 2, 3)
    view = (1, c) + (1,) * (x_hat.ndim - 2)
    grads = {}
    d_xhat = dy * cache.weight.reshape(view) if cache.weight is not None else dy  # shape of x
    mean_g = d_xhat.mean(axis=1, keepdims=True)  # (N, 1[, H, W])
    mean_gx = (d_xhat * x_hat).mean(axis=1, keepdims=True)  # (N, 1[, H, W])
    grads["x"] = (d_xhat - mean_g - x_hat * mean_gx) * cache.inv_std  # shape of x
    if cache.weight is not None:
        grads["weight"] = (dy * x_hat).sum(axis=axes)  # (C,)
    if cache.has_bias:
        grads["bias"] = dy.sum(axis=axes)  # (C,)
    return grads


# ---------------------------------------------------------------- over the last axis


@dataclass(frozen=True)
class LayerNormCache:
    x_hat: np.ndarray  # shape of x (..., C): (x - mean x) / sqrt(var x + eps) over the last axis
    inv_std: np.ndarray  # (..., 1) 1 / sqrt(var x + eps)
    weight: np.ndarray  # (C,) or None
    has_bias: bool


def layer_norm_forward(x, weight=None, bias=None, eps=1e-5):
    """Normalise the C values of the last axis of x to mean 0, variance 1, then scale and
    shift: ``torch.nn.functional.layer_norm(x, (C,), weight, bias, eps)``.

    Parameters
    ----------
    x : ndarray (..., C), at least 1 dimension, C >= 1
    weight, bias : ndarray (C,) or None (elementwise affine gamma, beta)
    eps : float >= 0, default 1e-5 (``torch.nn.LayerNorm``'s; timm's ``LayerNorm`` and its
        vision transformers use 1e-6)

    Notes
    -----
    Forward, for every leading index, over the C values x_c of the last axis (biased
    variance, as torch)::

        mu    = (1/C) sum_c x_c                               (..., 1)
        var   = (1/C) sum_c (x_c - mu)^2                      (..., 1)
        r     = 1 / sqrt(var + eps)                           (..., 1)
        x_hat = (x - mu) r                                    (..., C)
        y     = gamma x_hat + beta                            (..., C)

    Backward, for dy = dL/dy (..., C). The affine step is elementwise, so its parameters
    collect dy over every leading index::

        dbeta  = sum_{...} dy                                 (C,)
        dgamma = sum_{...} dy * x_hat                         (C,)
        g      = dy * gamma                                   (..., C)   dL/dx_hat

    x_hat depends on x through mu and r. With dmu/dx_k = 1/C and
    dr/dx_k = -r^3 (x_k - mu) / C = -r^2 x_hat_k / C (the sum over c of (x_c - mu) is 0,
    so mu's change drops out of var's derivative), the chain rule through
    x_hat_c = (x_c - mu) r gives::

        dx_hat_c/dx_k = r (delta_ck - 1/C) - x_hat_c r x_hat_k / C
        dx_k = sum_c g_c dx_hat_c/dx_k
             = r (g_k - (1/C) sum_c g_c - x_hat_k (1/C) sum_c g_c x_hat_c)    (..., C)

    The mean removes the average of g, the variance removes g's component along x_hat;
    therefore sum_k dx_k = 0: shifting the input by a constant changes nothing. With C = 1, x_hat = 0 and dx = 0 exactly
    (the output is beta whatever x is). This is :func:`layer_norm2d_forward`'s formula
    with the statistics taken over the last axis instead of axis 1.
    """
    op = "layer_norm"
    x = float_array(op, "x", x)
    if x.ndim < 1:
        raise ValueError(f"{op}: x must have at least 1 dimension (..., C), got shape {tuple(x.shape)}")
    c = x.shape[-1]
    for name, a in (("weight", weight), ("bias", bias)):
        if a is not None:
            float_array(op, name, a, 1, "(C,)")
            if a.shape != (c,):
                raise ValueError(f"{op}: {name} must have shape ({c},) to match x's last dimension C = {c}, got {tuple(a.shape)}")
    same_dtype(op, "x", x, weight=weight, bias=bias)
    if not (isinstance(eps, (int, float)) and not isinstance(eps, bool) and eps >= 0):
        raise ValueError(f"{op}: eps must be a number >= 0, got {eps!r}")
    if c == 0:
        raise ValueError(f"{op}: x must have C >= 1 values in its last dimension, got shape {tuple(x.shape)}")
    dt = x.dtype.type
    mu = x.mean(axis=-1, keepdims=True)  # (..., 1)
    xc = x - mu  # (..., C)
    var = (xc * xc).mean(axis=-1, keepdims=True)  # (..., 1) biased
    inv_std = 1.0 / np.sqrt(var + dt(eps))  # (..., 1)
    x_hat = xc  # normalised in place (xc is ours)
    x_hat *= inv_std
    y = x_hat * weight if weight is not None else x_hat.copy()  # (..., C)
    if bias is not None:
        y += bias
    return y, LayerNormCache(x_hat, inv_std, weight, bias is not None)


def layer_norm_backward(dy, cache: LayerNormCache):
    """Gradients of :func:`layer_norm_forward`: dict with ``x`` and, when given, ``weight``, ``bias``."""
    x_hat = cache.x_hat
    dy = upstream("layer_norm_backward", "dy", dy, x_hat.shape, x_hat.dtype)
    lead = tuple(range(x_hat.ndim - 1))  # every axis but the last
    grads = {}
    g = dy * cache.weight if cache.weight is not None else dy  # (..., C) dL/dx_hat
    mean_g = g.mean(axis=-1, keepdims=True)  # (..., 1)
    mean_gx = (g * x_hat).mean(axis=-1, keepdims=True)  # (..., 1)
    grads["x"] = (g - mean_g - x_hat * mean_gx) * cache.inv_std  # (..., C)
    if cache.weight is not None:
        grads["weight"] = (dy * x_hat).sum(axis=lead)  # (C,)
    if cache.has_bias:
        grads["bias"] = dy.sum(axis=lead)  # (C,)
    return grads
