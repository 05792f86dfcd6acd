"""Rotary position embedding (RoPE, Su et al. 2021), in its two memory layouts, with the
hand-derived backward.

Each position t turns D/2 pairs of coordinates of x by the angles::

    theta_i = base^(-2 i / D)                      i = 0 .. D/2 - 1
    phi[t, i] = positions[t] * theta_i             (T, D/2)

The layouts differ only in which coordinates form pair i:

    rotate-half (Hugging Face, GPT-NeoX):           (x[i], x[i + D/2])
    interleaved (Meta's original Llama, GPT-J):     (x[2 i], x[2 i + 1])

Forward, for x (..., T, D) and a pair (a, b) of coordinates of x at position t::

    a' = a cos(phi) - b sin(phi)                   (..., T, D/2)
    b' = b cos(phi) + a sin(phi)                   (..., T, D/2)

(the complex number a + i b multiplied by e^{i phi}). A rotation is orthogonal, so the
backward is the rotation by -phi::

    da = da' cos(phi) + db' sin(phi)               (..., T, D/2)   transpose of the 2 x 2 rotation
    db = db' cos(phi) - da' sin(phi)               (..., T, D/2)

The positions and the base are constants (no gradient). The angles are computed in
float64 and their cosine and sine rounded once to x's dtype.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np

from .._checks import float_array, upstream

__all__ = ["rotary_embedding_backward", "rotary_embedding_forward"]


@dataclass(frozen=True)
class RotaryCache:
    cos: np.ndarray  # (T, D/2) cos(phi), x's dtype
    sin: np.ndarray  # (T, D/2) sin(phi), x's dtype
    interleaved: bool
    shape: tuple  # x's shape (..., T, D)
    dtype: np.dtype


def _pairs(x, interleaved):
    """The two coordinates (a, b) of every pair, (..., T, D/2) each."""
    if interleaved:
        return x[..., 0::2], x[..., 1::2]
    half = x.shape[-1] // 2
    return x[..., :half], x[..., half:]


def _unpairs(a, b, interleaved):
    """Inverse of :func:`_pairs`: (..., T, D)."""
    if interleaved:
        return np.stack((a, b), axis=-1).reshape(a.shape[:-1] + (2 * a.shape[-1],))
    return np.concatenate((a, b), axis=-1)


def rotary_embedding_forward(x, positions, base=10000.0, *, interleaved=False):
    """Rotate the coordinate pairs of ``x`` by ``positions[t] * base^(-2 i / D)``.

    Parameters
    ----------
    x : ndarray (..., T, D), float32 or float64, D even
    positions : ndarray (T,), integer or floating, finite: the position of each row t
    base : float > 0, the base of the frequencies (10000 in RoFormer and Llama)
    interleaved : bool; False: rotate-half layout, pairs (i, i + D/2) (Hugging Face,
        GPT-NeoX); True: pairs (2 i, 2 i + 1) (Meta's original Llama, GPT-J)

    Returns
    -------
    out : ndarray (..., T, D), x's dtype
    cache : RotaryCache (cos and sin of the angles (T, D/2), the layout)

    Notes
    -----
    The equations and the backward are in the module docstring.
    """
    op = "rotary_embedding"
    x = float_array(op, "x", x)
    if x.ndim < 2:
        raise ValueError(f"{op}: x must have at least 2 dimensions (..., T, D), got shape {tuple(x.shape)}")
    d = x.shape[-1]
    if d < 2 or d % 2:
        raise ValueError(f"{op}: x's last dimension D must be even and >= 2, got shape {tuple(x.shape)}")
    if not isinstance(positions, np.ndarray) or positions.dtype.kind not in "iuf":
        got = positions.dtype if isinstance(positions, np.ndarray) else type(positions).__name__
        raise TypeError(f"{op}: positions must be an integer or floating numpy.ndarray (T,), got {got}")
    if positions.shape != (x.shape[-2],):
        raise ValueError(f"{op}: positions must have shape (T,) = ({x.shape[-2]},), got {tuple(positions.shape)}")
    if positions.dtype.kind == "f" and not np.all(np.isfinite(positions)):
        raise ValueError(f"{op}: positions must be finite")
    if not isinstance(base, numbers.Real) or isinstance(base, (bool, np.bool_)) or not math.isfinite(base):
        raise TypeError(f"{op}: base must be a finite real number, got {base!r}")
    if not base > 0:
        raise ValueError(f"{op}: base must be > 0, got {base!r}")
    if not isinstance(interleaved, (bool, np.bool_)):
        raise TypeError(f"{op}: interleaved must be a bool, got {interleaved!r}")
    theta = float(base) ** (-2.0 * np.arange(d // 2) / d)  # (D/2,) float64
    phi = positions.astype(np.float64)[:, None] * theta[None, :]  # (T, D/2)
    cos, sin = np.cos(phi).astype(x.dtype), np.sin(phi).astype(x.dtype)  # (T, D/2) each
    a, b = _pairs(x, bool(interleaved))  # (..., T, D/2) each
    out = _unpairs(a * cos - b * sin, b * cos + a * sin, bool(interleaved))  # (..., T, D)
    return out, RotaryCache(cos, sin, bool(interleaved), x.shape, x.dtype)


def rotary_embedding_backward(d_out, cache: RotaryCache):
    """Gradient of :func:`rotary_embedding_forward`: ``{"x"}`` (the rotation by -phi)."""
    op = "rotary_embedding_backward"
    d_out = upstream(op, "d_out", d_out, cache.shape, cache.dtype)
    da_, db_ = _pairs(d_out, cache.interleaved)  # (..., T, D/2) each
    d_a = da_ * cache.cos + db_ * cache.sin  # (..., T, D/2)
    d_b = db_ * cache.cos - da_ * cache.sin  # (..., T, D/2)
    return {"x": _unpairs(d_a, d_b, cache.interleaved)}
