"""Reductions over the spatial axes of an (N, C, H, W) map."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .._checks import float_array, upstream


@dataclass(frozen=True)
class SpatialCache:
    x_shape: tuple  # (N, C, H, W)
    dtype: np.dtype = None  # dtype of x


def global_avg_pool2d_forward(x):
    """``adaptive_avg_pool2d(x, (1, 1))``: ``y[n, c, 0, 0] = mean_{h, w} x[n, c, h, w]``.

    Backward: every pixel receives an equal share, ``dx = dy / (H W)`` broadcast over (H, W).
    """
    x = float_array("global_avg_pool2d", "x", x, 4, "(N, C, H, W)")
    return x.mean(axis=(2, 3), keepdims=True), SpatialCache(x.shape, x.dtype)  # (N, C, 1, 1)


def global_avg_pool2d_backward(dy, cache: SpatialCache):
    n, c, h, w = cache.x_shape
    dy = upstream("global_avg_pool2d_backward", "dy", dy, (n, c, 1, 1), cache.dtype or dy.dtype)
    scale = dy.dtype.type(1.0 / (h * w) if h * w else 0.0)  # H W = 0: the gradient is empty anyway
    return {"x": np.broadcast_to(dy * scale, cache.x_shape).copy()}  # (N, C, H, W)


def spatial_sum_forward(x):
    """``y[n, c, 0, 0] = sum_{h, w} x[n, c, h, w]``. Backward: ``dx = dy`` broadcast over (H, W)."""
    x = float_array("spatial_sum", "x", x, 4, "(N, C, H, W)")
    return x.sum(axis=(2, 3), keepdims=True), SpatialCache(x.shape, x.dtype)  # (N, C, 1, 1)


def spatial_sum_backward(dy, cache: SpatialCache):
    n, c = cache.x_shape[:2]
    dy = upstream("spatial_sum_backward", "dy", dy, (n, c, 1, 1), cache.dtype or dy.dtype)
    return {"x": np.broadcast_to(dy, cache.x_shape).copy()}  # (N, C, H, W)
