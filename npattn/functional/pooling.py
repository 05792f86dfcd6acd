"""Reductions over the spatial axes of an (N, C, H, W) map, and a max-pool over
non-overlapping windows."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .._checks import float_array, pair, upstream


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


@dataclass(frozen=True)
class MaxPool2dCache:
    x_shape: tuple  # (N, C, H, W)
    kernel: tuple  # (kh, kw), also the stride
    index: np.ndarray  # (N, C, Ho, Wo) int: the winner's place in its window, row-major in 0 .. kh kw - 1
    dtype: np.dtype  # of x


def _windows(a, kh, kw, ho, wo):
    """(N, C, Ho kh, Wo kw) -> (N, C, Ho, Wo, kh kw): each window's elements, row-major."""
    n, c = a.shape[:2]
    return a.reshape(n, c, ho, kh, wo, kw).transpose(0, 1, 2, 4, 3, 5).reshape(n, c, ho, wo, kh * kw)


def max_pool2d_forward(x, kernel_size=2):
    """``torch.nn.functional.max_pool2d(x, kernel_size)`` with the stride equal to the
    kernel (non-overlapping windows), no padding, no dilation, floor mode::

        y[n, c, i, j] = max_{a < kh, b < kw} x[n, c, i kh + a, j kw + b]
        Ho = floor(H / kh),  Wo = floor(W / kw)   (trailing rows / columns are dropped)

    Backward: each output's gradient goes to one element of its window, the winner;
    everything else (losers, dropped rows and columns) gets 0::

        dx[n, c, i kh + a*, j kw + b*] = dy[n, c, i, j]

    Tie rule (PyTorch's CPU kernel): when the maximum is attained several times in a
    window, the winner is the FIRST maximal element in row-major order (the scan keeps
    its candidate unless a later value is strictly larger; 0.0 and -0.0 tie, and the output
    is the first of them). A window holding NaN gives
    NaN, and its gradient goes to the LAST NaN of the window in row-major order (the
    CPU kernel also takes a NaN as the new candidate, each time it meets one).

    Refuses (ValueError naming x) an input whose pooled size would be 0 (H < kh or
    W < kw), as torch does ("Output size is too small").
    """
    op = "max_pool2d"
    x = float_array(op, "x", x, 4, "(N, C, H, W)")
    kh, kw = pair(op, "kernel_size", kernel_size, 1)
    n, c, h, w = x.shape
    ho, wo = h // kh, w // kw
    if ho < 1 or wo < 1:
        raise ValueError(f"{op}: x must have H >= {kh} and W >= {kw} for kernel_size {(kh, kw)} "
                         f"(the output would be empty), got shape {tuple(x.shape)}")
    win = _windows(x[:, :, : ho * kh, : wo * kw], kh, kw, ho, wo)  # (N, C, Ho, Wo, kh kw)
    index = np.argmax(win, axis=-1)  # (N, C, Ho, Wo) the first maximum (np.argmax: the first NaN)
    nan = np.isnan(win)
    if nan.any():
        last_nan = kh * kw - 1 - np.argmax(nan[..., ::-1], axis=-1)  # (N, C, Ho, Wo)
        index = np.where(nan.any(axis=-1), last_nan, index)
    y = np.take_along_axis(win, index[..., None], axis=-1)[..., 0]  # (N, C, Ho, Wo)
    return y, MaxPool2dCache(x.shape, (kh, kw), index, x.dtype)


def max_pool2d_backward(dy, cache: MaxPool2dCache):
    n, c, h, w = cache.x_shape
    kh, kw = cache.kernel
    ho, wo = cache.index.shape[2:]
    dy = upstream("max_pool2d_backward", "dy", dy, (n, c, ho, wo), cache.dtype or dy.dtype)
    d_win = np.zeros((n, c, ho, wo, kh * kw), dtype=dy.dtype)  # (N, C, Ho, Wo, kh kw)
    np.put_along_axis(d_win, cache.index[..., None], dy[..., None], axis=-1)  # to the winner
    dx = np.zeros(cache.x_shape, dtype=dy.dtype)  # (N, C, H, W): dropped rows / columns get 0
    dx[:, :, : ho * kh, : wo * kw] = d_win.reshape(n, c, ho, wo, kh, kw).transpose(0, 1, 2, 4, 3, 5).reshape(
        n, c, ho * kh, wo * kw)
    return {"x": dx}
