"""What the blocks in timm's layout share: the channel arithmetic of
``timm.layers.helpers.make_divisible``, argument checks, and 1x1 convolutions on pooled vectors."""

from __future__ import annotations

import numbers

from .. import functional as F


def make_divisible(v, divisor=8, min_value=None, round_limit=0.9):
    """Round ``v`` to the nearest multiple of ``divisor`` (halves up), at least
    ``min_value`` (default: ``divisor``); if that lost more than ``1 - round_limit`` of
    ``v``, add one ``divisor``. timm's rule, step for step: the attention layers call it
    with ``round_limit=0`` (never add), so the reduced width is
    ``max(divisor, int(v + divisor / 2) // divisor * divisor)``."""
    min_value = min_value or divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < round_limit * v:
        new_v += divisor
    return new_v


def check_real(op, name, v, *, positive=True):
    if not isinstance(v, numbers.Real) or isinstance(v, bool):
        raise TypeError(f"{op}: {name} must be a real number, got {v!r}")
    if positive and not v > 0:
        raise ValueError(f"{op}: {name} must be > 0, got {v!r}")
    return float(v)


def check_bool(op, name, v):
    if not isinstance(v, bool):
        raise TypeError(f"{op}: {name} must be a bool, got {v!r}")
    return v


def reduced_channels(op, channels, rd_ratio, rd_channels, rd_divisor, factor=1.0, zero_is_none=True):
    """The hidden width: ``rd_channels`` when given, else
    ``make_divisible(channels * rd_ratio * factor, rd_divisor, round_limit=0)``.

    timm's SEModule, CbamModule and CoordAttn test ``if not rd_channels``, so 0 also means
    "compute it" (``zero_is_none=True``); GlobalContext tests ``is None`` and would build
    an empty layer from 0, which npattn refuses."""
    rd_ratio = check_real(op, "rd_ratio", rd_ratio)
    if not isinstance(rd_divisor, numbers.Integral) or isinstance(rd_divisor, bool):
        raise TypeError(f"{op}: rd_divisor must be an int, got {rd_divisor!r}")
    if rd_divisor < 1:
        raise ValueError(f"{op}: rd_divisor must be >= 1, got {rd_divisor}")
    if rd_channels is None or (zero_is_none and isinstance(rd_channels, numbers.Integral) and rd_channels == 0
                               and not isinstance(rd_channels, bool)):
        return make_divisible(channels * rd_ratio * factor, int(rd_divisor), round_limit=0.0)
    if not isinstance(rd_channels, numbers.Integral) or isinstance(rd_channels, bool):
        raise TypeError(f"{op}: rd_channels must be None or an int, got {rd_channels!r}")
    if rd_channels < 1:
        raise ValueError(f"{op}: rd_channels must be None or >= 1, got {rd_channels}")
    return int(rd_channels)


# ---- 1x1 convolutions on pooled vectors ---------------------------------------------
# timm writes the MLPs of these layers as 1x1 Conv2d on (N, C, 1, 1) maps; on a pooled
# vector that is a linear layer with the weight (O, I, 1, 1) read as (O, I).


def pointwise(block, prefix, v):
    """``v @ W^T + b`` for v of shape (M, I) and the conv weight ``prefix + "weight"`` (O, I, 1, 1)."""
    s = block._state
    w = s[f"{prefix}weight"]
    return F.linear_forward(v, w.reshape(w.shape[0], w.shape[1]), s.get(f"{prefix}bias"))


def pointwise_backward(block, prefix, dv, cache, grads):
    """Backward of :func:`pointwise`: adds the weight (and bias) gradient into ``grads``
    (in the conv's (O, I, 1, 1) shape) and returns the gradient of its input (M, I)."""
    g = F.linear_backward(dv, cache)
    grads[f"{prefix}weight"] += g["weight"].reshape(grads[f"{prefix}weight"].shape)
    if "bias" in g:
        grads[f"{prefix}bias"] += g["bias"]
    return g["x"]
