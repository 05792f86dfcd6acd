"""Hard swish (Howard et al., "Searching for MobileNetV3", ICCV 2019), as ``torch.nn.Hardswish``."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .._checks import float_array, upstream


@dataclass(frozen=True)
class HardswishCache:
    slope: np.ndarray  # shape of x: dy/dx, 0 for x <= -3, x/3 + 1/2 for -3 < x < 3, 1 for x >= 3


def hardswish_forward(x):
    """``y = x * relu6(x + 3) / 6``.

    Notes
    -----
    Forward, piecewise::

        y = 0                  x <= -3
        y = x (x + 3) / 6      -3 < x < 3
        y = x                  x >= 3

    Backward, ``dx = dy * slope(x)`` with PyTorch's choice at the two kinks (where the
    one-sided slopes are (0, -1/2) at -3 and (3/2, 1) at 3)::

        slope = 0              x <= -3
        slope = x / 3 + 1/2    -3 < x < 3
        slope = 1              x >= 3
    """
    x = float_array("hardswish", "x", x)
    dt = x.dtype.type
    r6 = np.clip(x + dt(3), dt(0), dt(6))  # relu6(x + 3)
    y = x * r6 / dt(6)
    slope = np.where(x <= -3, dt(0), np.where(x < 3, x / dt(3) + dt(0.5), dt(1))).astype(x.dtype, copy=False)
    return y, HardswishCache(slope)


def hardswish_backward(dy, cache: HardswishCache):
    dy = upstream("hardswish_backward", "dy", dy, cache.slope.shape, cache.slope.dtype)
    return {"x": dy * cache.slope}  # shape of x
