"""Fully connected layer, weight (out, in) as ``torch.nn.functional.linear``."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .._checks import float_array, same_dtype


@dataclass(frozen=True)
class LinearCache:
    x: np.ndarray  # (N, in_features)
    weight: np.ndarray  # (out_features, in_features)
    has_bias: bool


def linear_forward(x, weight, bias=None):
    """``y = x @ W^T + b``.

    Parameters
    ----------
    x : ndarray (N, in_features)
    weight : ndarray (out_features, in_features)
    bias : ndarray (out_features,) or None

    Notes
    -----
    Forward: ``y[n, o] = sum_i x[n, i] W[o, i] + b[o]``.

    Backward::

        dx = dy @ W          (N, in)
        dW = dy^T @ x        (out, in)
        db = sum_n dy        (out,)
    """
    op = "linear"
    x = float_array(op, "x", x, 2, "(N, in_features)")
    weight = float_array(op, "weight", weight, 2, "(out_features, in_features)")
    if bias is not None:
        bias = float_array(op, "bias", bias, 1, "(out_features,)")
    same_dtype(op, "x", x, weight=weight, bias=bias)
    if weight.shape[1] != x.shape[1]:
        raise ValueError(
            f"{op}: weight must have in_features = {x.shape[1]} columns to match x, got weight shape {tuple(weight.shape)}"
        )
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"{op}: bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    y = x @ weight.T  # (N, out)
    if bias is not None:
        y = y + bias
    return y, LinearCache(x, weight, bias is not None)


def linear_backward(dy, cache: LinearCache):
    """Gradients of :func:`linear_forward`: dict with ``x``, ``weight`` and ``bias`` (when given)."""
    x, weight = cache.x, cache.weight
    dy = float_array("linear_backward", "dy", dy, 2)
    same_dtype("linear_backward", "the forward's x", x, dy=dy)
    if dy.shape != (x.shape[0], weight.shape[0]):
        raise ValueError(f"linear_backward: dy must have shape {(x.shape[0], weight.shape[0])}, got {tuple(dy.shape)}")
    grads = {}
    grads["x"] = dy @ weight  # (N, in)
    grads["weight"] = dy.T @ x  # (out, in)
    if cache.has_bias:
        grads["bias"] = dy.sum(axis=0)  # (out,)
    return grads
