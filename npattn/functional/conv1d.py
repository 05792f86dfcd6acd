"""1-D convolution, NCL input and OIK weight, as ``torch.nn.functional.conv1d``.

It is the 2-D convolution of :mod:`npattn.functional.conv` on maps of height 1 (weight
of height 1, no padding, stride or dilation along that axis), so the arithmetic and its
backward are that op's; this module only fixes the 1-D shapes and names.
"""

from __future__ import annotations

from dataclasses import dataclass

from .._checks import float_array, positive_int
from .conv import Conv2dCache, conv2d_backward, conv2d_forward


@dataclass(frozen=True)
class Conv1dCache:
    conv: Conv2dCache  # the height-1 2-D convolution: x (N, C_in, 1, L), weight (C_out, C_in/G, 1, k)
    x_shape: tuple  # (N, C_in, L)
    weight_shape: tuple  # (C_out, C_in/G, k)
    out_shape: tuple  # (N, C_out, L_out)


def conv1d_forward(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """1-D convolution (cross-correlation) with zero padding on both ends.

    Parameters
    ----------
    x : ndarray (N, C_in, L), float32 or float64
    weight : ndarray (C_out, C_in / groups, k), same dtype
    bias : ndarray (C_out,) or None
    stride, dilation : int >= 1; padding : int >= 0; groups : int dividing C_in and C_out

    Returns
    -------
    y : ndarray (N, C_out, L_out), ``L_out = (L + 2 padding - dilation (k - 1) - 1) // stride + 1``
    cache : Conv1dCache

    Notes
    -----
    Forward, with x_pad the input padded by ``padding`` zeros at both ends::

        y[n, o, t] = b[o] + sum_{c in group of o} sum_j w[o, c, j] x_pad[n, c, t s + j d]

    Backward (each x_pad element receives the weight it was multiplied by, once per tap
    that read it; padded positions are dropped)::

        db[o]       = sum_{n, t} dy[n, o, t]
        dw[o, c, j] = sum_{n, t} dy[n, o, t] x_pad[n, c, t s + j d]
        dx_pad[n, c, t s + j d] += sum_{o in group of c} w[o, c, j] dy[n, o, t]
        dx          = dx_pad without the padding

    ECA uses it over the channel axis: ``x`` of shape (N, 1, C), one filter of k taps,
    ``padding = (k - 1) / 2``.
    """
    op = "conv1d"
    x = float_array(op, "x", x, 3, "(N, C_in, L)")
    weight = float_array(op, "weight", weight, 3, "(C_out, C_in/groups, k)")
    stride = positive_int(op, "stride", stride, 1)
    padding = positive_int(op, "padding", padding, 0)
    dilation = positive_int(op, "dilation", dilation, 1)
    y4, conv = conv2d_forward(
        x[:, :, None, :], weight[:, :, None, :], bias,
        stride=(1, stride), padding=(0, padding), dilation=(1, dilation), groups=groups,
    )
    y = y4.reshape(y4.shape[0], y4.shape[1], y4.shape[3])  # (N, C_out, L_out)
    return y, Conv1dCache(conv, x.shape, weight.shape, y.shape)


def conv1d_backward(dy, cache: Conv1dCache):
    """Gradients of :func:`conv1d_forward`: dict with ``x``, ``weight`` and ``bias`` (when given)."""
    dy = float_array("conv1d_backward", "dy", dy, 3)
    if dy.shape != cache.out_shape:
        raise ValueError(f"conv1d_backward: dy must have shape {tuple(cache.out_shape)}, got {tuple(dy.shape)}")
    g = conv2d_backward(dy[:, :, None, :], cache.conv)
    out = {"x": g["x"].reshape(cache.x_shape), "weight": g["weight"].reshape(cache.weight_shape)}
    if "bias" in g:
        out["bias"] = g["bias"]
    return out
