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

Notation, for a sample position (p_y, p_x) inside the image's support::

    y0 = floor(p_y), x0 = floor(p_x), ly = p_y - y0, lx = p_x - x0, hy = 1 - ly, hx = 1 - lx
    value  = hy hx v00 + hy lx v01 + ly hx v10 + ly lx v11,   vab = v(y0 + a, x0 + b)
    d value / d p_y = lx (v11 - v01) + hx (v10 - v00)
    d value / d p_x = ly (v11 - v10) + hy (v01 - v00)

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
    """Whether (p_y, p_x) has an in-image corner: ``-1 < p < size`` on both axes, or
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
    """``(d value / d p_y, d value / d p_x)`` on the cell (the one-sided derivative from
    above at an integer position, as torchvision)."""
    gy = lx * (v11 - v01) + hx * (v10 - v00)
    gx = ly * (v11 - v10) + hy * (v01 - v00)
    return gy, gx


# ---------------------------------------------------------------------------------------
# the seed's clamped sampling (th_batch_map_coordinates)


def clamped_point(x, b, y, xq, hmax, wmax, tp):
    """The seed's sample of map ``x[b]`` (H, W) at (y, xq): 0 when either coordinate is
    NaN; else each coordinate clamped to [0, hmax] / [0, wmax] (+-inf clamp like any
    other value), the corners floor and ceil, interpolated along the rows first.
    The corners are named as in the seed: lt = (i0, j0), rb = (i1, j1), lb = (i0, j1),
    rt = (i1, j0)."""
    zero = tp(0)
    if math.isnan(y) or math.isnan(xq):
        return zero
    yc = min(max(y, zero), hmax)
    xc = min(max(xq, zero), wmax)
    i0 = int(math.floor(yc))
    i1 = int(math.ceil(yc))
    j0 = int(math.floor(xc))
    j1 = int(math.ceil(xc))
    fy = yc - tp(i0)
    fx = xc - tp(j0)
    v_lt = x[b, i0, j0]
    v_rb = x[b, i1, j1]
    v_lb = x[b, i0, j1]
    v_rt = x[b, i1, j0]
    vals_t = fy * (v_rt - v_lt) + v_lt
    vals_b = fy * (v_rb - v_lb) + v_lb
    return fx * (vals_b - vals_t) + vals_t


def clamped_point_backward(x, b, y, xq, d, hmax, wmax, tp):
    """The adjoint of :func:`clamped_point` for an incoming gradient ``d``:
    ``(i0, i1, j0, j1, d_lt, d_rt, d_lb, d_rb, d_y, d_xq)``, the corners, the terms to add
    to ``d_x[b]`` at (i0, j0), (i1, j0), (i0, j1), (i1, j1) (in the dtype of x; the
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
    i0 = int(math.floor(yc))
    i1 = int(math.ceil(yc))
    j0 = int(math.floor(xc))
    j1 = int(math.ceil(xc))
    fy = yc - tp(i0)
    fx = xc - tp(j0)
    v_lt = x[b, i0, j0]
    v_rb = x[b, i1, j1]
    v_lb = x[b, i0, j1]
    v_rt = x[b, i1, j0]
    vals_t = fy * (v_rt - v_lt) + v_lt
    vals_b = fy * (v_rb - v_lb) + v_lb
    d_vals_b = fx * d
    d_vals_t = (one - fx) * d
    d_fx = (vals_b - vals_t) * d
    d_fy = (v_rt - v_lt) * d_vals_t + (v_rb - v_lb) * d_vals_b
    d_y = d_fy if (y >= 0 and y <= hmax) else zero
    d_xq = d_fx if (xq >= 0 and xq <= wmax) else zero
    return (i0, i1, j0, j1, (one - fy) * d_vals_t, fy * d_vals_t, (one - fy) * d_vals_b, fy * d_vals_b, d_y,
            d_xq)
