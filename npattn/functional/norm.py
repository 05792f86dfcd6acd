"""Batch normalisation for (N, C) and (N, C, H, W), as ``torch.nn.functional.batch_norm``."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .._checks import float_array, same_dtype


@dataclass(frozen=True)
class BatchNormCache:
    x_hat: np.ndarray  # same shape as x: the normalised input
    inv_std: np.ndarray  # (C,): 1 / sqrt(var + eps), var the batch or the running variance
    weight: np.ndarray  # (C,) or None
    has_bias: bool
    training: bool
    count: int  # values per channel m = N (* H * W)
    running_mean: np.ndarray  # (C,) running mean after this call (updated in training), or None
    running_var: np.ndarray  # (C,) running variance after this call (updated in training), or None


def _channel_dot(a, b):
    """``sum(a * b)`` per channel over every other axis of (N, C) or (N, C, H, W), (C,)."""
    n, c = a.shape[:2]
    length = int(np.prod(a.shape[2:], dtype=np.int64))  # not -1: ambiguous when n = 0
    return np.einsum("ncl,ncl->c", a.reshape(n, c, length), b.reshape(n, c, length))


def _channel_view(a, ndim):
    """(C,) -> broadcastable against (N, C) or (N, C, H, W)."""
    return a.reshape((1, -1) + (1,) * (ndim - 2))


def batch_norm_forward(
    x, weight=None, bias=None, running_mean=None, running_var=None, *, training, momentum=0.1, eps=1e-5
):
    """Batch normalisation over the channel axis 1.

    Parameters
    ----------
    x : ndarray (N, C) or (N, C, H, W)
    weight, bias : ndarray (C,) or None (affine scale gamma and shift beta)
    running_mean, running_var : ndarray (C,) or None; required in eval mode
    training : bool
        True: normalise with the batch statistics and compute updated running
        statistics (returned in the cache as ``running_mean`` / ``running_var``;
        the caller's arrays are not modified). False: normalise with the running
        statistics.
    momentum : float, running = (1 - momentum) * running + momentum * batch_stat
    eps : float

    Returns
    -------
    y : ndarray, shape of x
    cache : BatchNormCache

    Notes
    -----
    With the reduction over the m = N*H*W values of channel c (m = N for 2-D input)::

        training:  mu = mean(x),  var = mean((x - mu)^2)       (biased, to normalise)
                   running_mean <- (1 - momentum) running_mean + momentum mu
                   running_var  <- (1 - momentum) running_var  + momentum var * m / (m - 1)
        eval:      mu = running_mean, var = running_var
        x_hat = (x - mu) / sqrt(var + eps)
        y     = gamma x_hat + beta

    Backward. Eval mode is an affine map::

        dbeta  = sum dy
        dgamma = sum dy * x_hat
        dx     = dy * gamma / sqrt(var + eps)

    Training mode also differentiates mu and var (both depend on x); with dx_hat = dy gamma
    and k = gamma / sqrt(var + eps)::

        dx     = inv_std / m * (m dx_hat - sum(dx_hat) - x_hat sum(dx_hat * x_hat))
               = k * (dy - sum(dy) / m - x_hat * sum(dy * x_hat) / m)

    (the second line is what the code computes, from the two sums that dbeta and
    dgamma need anyway).

    Like PyTorch, training with one value per channel (m = 1) is an error.
    """
    op = "batch_norm"
    x = float_array(op, "x", x, (2, 4), "(N, C) or (N, C, H, W)")
    c = x.shape[1]
    for name, a in (("weight", weight), ("bias", bias), ("running_mean", running_mean), ("running_var", running_var)):
        if a is not None:
            float_array(op, name, a, 1, "(C,)")
            if a.shape != (c,):
                raise ValueError(f"{op}: {name} must have shape ({c},) to match x's {c} channels, got {tuple(a.shape)}")
    same_dtype(op, "x", x, weight=weight, bias=bias, running_mean=running_mean, running_var=running_var)
    if (running_mean is None) != (running_var is None):
        raise ValueError(f"{op}: running_mean and running_var must be given together")
    axes = (0,) if x.ndim == 2 else (0, 2, 3)
    count = x.size // c if c else 0
    dt = x.dtype.type

    if training:
        if count <= 1:
            raise ValueError(
                f"Expected more than 1 value per channel when training, got input size {tuple(x.shape)}"
            )
        mu = x.mean(axis=axes)  # (C,)
        xc = x - _channel_view(mu, x.ndim)  # shape of x
        var = _channel_dot(xc, xc) / dt(count)  # (C,) biased
        inv_std = 1.0 / np.sqrt(var + dt(eps))  # (C,)
        if running_mean is not None:
            m = dt(momentum)
            new_mean = (1 - m) * running_mean + m * mu
            new_var = (1 - m) * running_var + m * var * dt(count / (count - 1))
        else:
            new_mean = new_var = None
    else:
        if running_mean is None:
            raise ValueError(f"{op}: running_mean and running_var are required when training=False")
        inv_std = 1.0 / np.sqrt(running_var + dt(eps))  # (C,)
        xc = x - _channel_view(running_mean, x.ndim)
        new_mean, new_var = running_mean, running_var
    x_hat = xc  # shape of x; xc is a fresh array, normalised in place
    x_hat *= _channel_view(inv_std, x.ndim)
    y = x_hat * _channel_view(weight, x.ndim) if weight is not None else x_hat.copy()
    if bias is not None:
        y += _channel_view(bias, x.ndim)
    cache = BatchNormCache(x_hat, inv_std, weight, bias is not None, bool(training), count, new_mean, new_var)
    return y, cache


def batch_norm_backward(dy, cache: BatchNormCache):
    """Gradients of :func:`batch_norm_forward`: dict with ``x`` and, when given, ``weight``, ``bias``."""
    x_hat = cache.x_hat
    dy = float_array("batch_norm_backward", "dy", dy, x_hat.ndim)
    same_dtype("batch_norm_backward", "the forward's x", x_hat, dy=dy)
    if dy.shape != x_hat.shape:
        raise ValueError(f"batch_norm_backward: dy must have shape {tuple(x_hat.shape)}, got {tuple(dy.shape)}")
    nd = x_hat.ndim
    axes = (0,) if nd == 2 else (0, 2, 3)
    grads = {}
    sum_dy = dy.sum(axis=axes)  # (C,)
    sum_dy_xhat = _channel_dot(dy, x_hat)  # (C,)
    k = cache.inv_std * cache.weight if cache.weight is not None else cache.inv_std  # (C,) gamma / sqrt(var + eps)
    grads["x"] = dy * _channel_view(k, nd)  # shape of x
    if cache.training:
        m = cache.count
        grads["x"] -= x_hat * _channel_view(k * sum_dy_xhat / m, nd)
        grads["x"] -= _channel_view(k * sum_dy / m, nd)
    if cache.weight is not None:
        grads["weight"] = sum_dy_xhat  # (C,)
    if cache.has_bias:
        grads["bias"] = sum_dy  # (C,)
    return grads
