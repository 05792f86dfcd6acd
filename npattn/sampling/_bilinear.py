"""The scalar bilinear arithmetic of the compiled kernels, written once.

These are plain Python functions of scalars. ``cpu.py`` compiles them with ``numba.njit``
and ``cuda.py`` with ``numba.cuda.jit(device=True, inline="always")`` (inlined into each
kernel when it is typed, so ``numba.cuda.compile_ptx`` builds the kernels without a GPU);
under ``NUMBA_DISABLE_JIT=1`` and on Numba's CUDA simulator they run as Python. So the
two compiled backends share one statement of the arithmetic, and ``numpy.py`` states the
same rules with arrays (its docstring is the definition).

The operations are in numpy.py's order and in the dtype of the operands (``tp`` is the
scalar type, e.g. ``x.dtype.type``: float32 stays float32); changing the order changes
results in the last bit. A helper never calls another helper, because each is compiled
separately for each target.

cpu.py's kernels are cached on disk (``cache=True``, in the folder ``npattn._numba_cache``
chooses), and Numba keys a kernel's cache on its own file: after editing this file, clear
that folder (or touch cpu.py) so that the kernels are compiled again with the new helpers.

Notation, for a sample position (py, px) inside the image's support::

    y0 = floor(py), x0 = floor(px), ly = py - y0, lx = px - x0, hy = 1 - ly, hx = 1 - lx
    value  = hy hx v00 + hy lx v01 + ly hx v10 + ly lx v11,   vab = v(y0 + a, x0 + b)
    jy = d value / d py = lx (v11 - v01) + hx (v10 - v00)
    jx = d value / d px = ly (v11 - v10) + hy (v01 - v00)

and, for the seed's clamped sampling of ``th_batch_map_coordinates`` (numpy.py, second
part), the corners floor and ceil of the clamped coordinates.
"""

from __future__ import annotations

import math

__all__ = [
    "in_support",
    "cell",
    "corner_weights",
    "bilinear",
    "position_grads",
    "clamped_point",
    "clamped_point_backward",
]


# ---------------------------------------------------------------------------------------
# deformable convolution (torchvision's bilinear sampling with zeros outside)


def in_support(py, px, H, W, inclusive):
    """Whether (py, px) has an in-image corner: ``-1 < p < size`` on both axes, or
    ``-1 <= p`` when ``inclusive`` (torchvision's offset-gradient support). False for
    NaN and +-inf, so a position that fails it never reaches an integer conversion."""
    if inclusive:
        return py >= -1 and py < H and px >= -1 and px < W
    return py > -1 and py < H and px > -1 and px < W


def cell(py, px, tp):
    """``(y0, x0, ly, lx, hy, hx)`` of a position inside the support: the upper-left
    corner (integers in [-1, H-1] x [-1, W-1]) and the fractional weights, in type ``tp``."""
    y0 = int(math.floor(py))
    x0 = int(math.floor(px))
    ly = py - tp(y0)
    lx = px - tp(x0)
    return y0, x0, ly, lx, tp(1) - ly, tp(1) - lx


def corner_weights(ly, lx, hy, hx):
    """The weights of the corners (y0, x0), (y0, x0+1), (y0+1, x0), (y0+1, x0+1)."""
    return hy * hx, hy * lx, ly * hx, ly * lx


def bilinear(w00, w01, w10, w11, v00, v01, v10, v11):
    """The sample: the corner values weighted by :func:`corner_weights`, summed in order."""
    return w00 * v00 + w01 * v01 + w10 * v10 + w11 * v11


def position_grads(ly, lx, hy, hx, v00, v01, v10, v11):
    """``(d value / d py, d value / d px)`` on the cell (the one-sided derivative from
    above at an integer position, as torchvision)."""
    jy = lx * (v11 - v01) + hx * (v10 - v00)
    jx = ly * (v11 - v10) + hy * (v01 - v00)
    return jy, jx


# ---------------------------------------------------------------------------------------
# the seed's clamped sampling (th_batch_map_coordinates)


def clamped_point(x, b, y, xq, hmax, wmax, tp):
    """The seed's sample of map ``x[b]`` (H, W) at (y, xq): 0 when either coordinate is
    NaN; else each coordinate clamped to [0, hmax] / [0, wmax] (+-inf clamp like any
    other value), the corners floor and ceil, interpolated along y first. The corners
    are (y0, x0), (y0, x1), (y1, x0), (y1, x1) with values v00, v01, v10, v11, as in
    the deformable sampling above (the seed calls them lt, lb, rt, rb)."""
    zero = tp(0)
    if math.isnan(y) or math.isnan(xq):
        return zero
    yc = min(max(y, zero), hmax)
    xc = min(max(xq, zero), wmax)
    y0 = int(math.floor(yc))
    y1 = int(math.ceil(yc))
    x0 = int(math.floor(xc))
    x1 = int(math.ceil(xc))
    ly = yc - tp(y0)
    lx = xc - tp(x0)
    v00 = x[b, y0, x0]
    v11 = x[b, y1, x1]
    v01 = x[b, y0, x1]
    v10 = x[b, y1, x0]
    vx0 = ly * (v10 - v00) + v00
    vx1 = ly * (v11 - v01) + v01
    return lx * (vx1 - vx0) + vx0


def clamped_point_backward(x, b, y, xq, d, hmax, wmax, tp):
    """The adjoint of :func:`clamped_point` for an incoming gradient ``d``:
    ``(y0, y1, x0, x1, d00, d10, d01, d11, dyq, dxq)``, the corners, the terms to add
    to ``dx[b]`` at (y0, x0), (y1, x0), (y0, x1), (y1, x1) (in the dtype of x; the
    caller accumulates them), and the coordinate gradients. ``torch.clamp`` passes the
    gradient on [0, hi], bounds included; at an integer coordinate floor == ceil, so the
    seed's formula gives 0 there. A NaN coordinate gives zero terms at corner (0, 0) and
    zero coordinate gradients."""
    zero = tp(0)
    one = tp(1)
    if math.isnan(y) or math.isnan(xq):
        return 0, 0, 0, 0, zero, zero, zero, zero, zero, zero
    yc = min(max(y, zero), hmax)
    xc = min(max(xq, zero), wmax)
    y0 = int(math.floor(yc))
    y1 = int(math.ceil(yc))
    x0 = int(math.floor(xc))
    x1 = int(math.ceil(xc))
    ly = yc - tp(y0)
    lx = xc - tp(x0)
    v00 = x[b, y0, x0]
    v11 = x[b, y1, x1]
    v01 = x[b, y0, x1]
    v10 = x[b, y1, x0]
    vx0 = ly * (v10 - v00) + v00
    vx1 = ly * (v11 - v01) + v01
    dvx1 = lx * d
    dvx0 = (one - lx) * d
    dlx = (vx1 - vx0) * d
    dly = (v10 - v00) * dvx0 + (v11 - v01) * dvx1
    dyq = dly if (y >= 0 and y <= hmax) else zero
    dxq = dlx if (xq >= 0 and xq <= wmax) else zero
    return (y0, y1, x0, x1, (one - ly) * dvx0, ly * dvx0, (one - ly) * dvx1, ly * dvx1, dyq,
            dxq)
