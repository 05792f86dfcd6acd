"""rotary_embedding_forward / _backward: both layouts against a loop over the pairs written
here, the interleaved layout against complex multiplication (x[2i] + i x[2i+1]) e^{i phi},
the rotate-half layout against the same product on the pairs (i, i + D/2), gradients by
central differences, what a rotation keeps (norms, relative positions), errors."""

import cmath
import math

import numpy as np
import pytest

from npattn.functional import rotary_embedding_backward, rotary_embedding_forward
from npattn.gradcheck import gradcheck

TOL = 1e-12


def loop_rotary(x, positions, base, interleaved):
    """Plain Python: for every row t and pair i, the 2 x 2 rotation by positions[t] * base^(-2i/D)."""
    d = x.shape[-1]
    out = np.empty(x.shape)
    for idx in np.ndindex(*x.shape[:-1]):
        t = idx[-1]
        for i in range(d // 2):
            phi = float(positions[t]) * base ** (-2.0 * i / d)
            ia, ib = (2 * i, 2 * i + 1) if interleaved else (i, i + d // 2)
            a, b = float(x[idx + (ia,)]), float(x[idx + (ib,)])
            out[idx + (ia,)] = a * math.cos(phi) - b * math.sin(phi)
            out[idx + (ib,)] = b * math.cos(phi) + a * math.sin(phi)
    return out


def complex_rotary(x, positions, base, interleaved):
    """(a + i b) * exp(i phi) on each pair, by complex arithmetic."""
    d = x.shape[-1]
    a, b = (x[..., 0::2], x[..., 1::2]) if interleaved else (x[..., : d // 2], x[..., d // 2:])
    phi = positions.astype(np.float64)[:, None] * (float(base) ** (-2.0 * np.arange(d // 2) / d))
    z = (a + 1j * b) * np.exp(1j * phi)
    out = np.empty(x.shape)
    if interleaved:
        out[..., 0::2], out[..., 1::2] = z.real, z.imag
    else:
        out[..., : d // 2], out[..., d // 2:] = z.real, z.imag
    return out


CASES = [
    ((2, 3, 5, 6), np.arange(5), 10000.0),
    ((4, 8), np.array([3, 0, 7, 1]), 10000.0),
    ((2, 3, 4), np.array([0.5, -2.25, 100.0]), 500.0),
    ((1, 7, 2), np.arange(7) + 1000, 10.0),
]


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("shape,positions,base", CASES)
def test_forward_matches_the_loop_and_complex_multiplication(shape, positions, base, interleaved):
    x = np.random.default_rng(len(shape)).standard_normal(shape)
    out, _ = rotary_embedding_forward(x, positions, base, interleaved=interleaved)
    want = loop_rotary(x, positions, base, interleaved)
    scale = np.max(np.abs(want))
    assert np.max(np.abs(out - want)) <= TOL * scale
    assert np.max(np.abs(out - complex_rotary(x, positions, base, interleaved))) <= TOL * scale


def test_one_pair_by_hand():
    """D = 2: one pair, angle = position; position 1 turns (1, 0) into (cos 1, sin 1)."""
    x = np.array([[1.0, 0.0], [0.0, 2.0]])
    out, _ = rotary_embedding_forward(x, np.array([1, 2]))
    np.testing.assert_allclose(out, [[math.cos(1), math.sin(1)], [-2 * math.sin(2), 2 * math.cos(2)]], rtol=0, atol=1e-15)
    z = complex(1, 0) * cmath.exp(1j)
    assert abs(out[0, 0] - z.real) < 1e-15 and abs(out[0, 1] - z.imag) < 1e-15


def test_layouts_are_permutations_of_each_other():
    x = np.random.default_rng(0).standard_normal((3, 5, 8))
    perm = np.array([0, 4, 1, 5, 2, 6, 3, 7])  # rotate-half pair i = (i, i + 4) -> positions (2i, 2i+1)
    half, _ = rotary_embedding_forward(x, np.arange(5))
    inter, _ = rotary_embedding_forward(x[..., perm], np.arange(5), interleaved=True)
    np.testing.assert_allclose(inter, half[..., perm], rtol=0, atol=1e-15)


def test_rotation_keeps_norms_and_dot_products_depend_on_relative_position():
    rng = np.random.default_rng(1)
    q, k = rng.standard_normal(8), rng.standard_normal(8)
    x = np.stack([q, k])
    for interleaved in (False, True):
        a, _ = rotary_embedding_forward(x, np.array([5, 2]), interleaved=interleaved)
        b, _ = rotary_embedding_forward(x, np.array([13, 10]), interleaved=interleaved)
        assert abs(a[0] @ a[1] - b[0] @ b[1]) < 1e-12  # only the offset 3 matters
        np.testing.assert_allclose(np.linalg.norm(a, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-14)
    zero, _ = rotary_embedding_forward(x, np.zeros(2, dtype=np.int64))
    np.testing.assert_array_equal(zero, x)


@pytest.mark.parametrize("interleaved", [False, True])
def test_gradient_by_central_differences(interleaved):
    x = np.random.default_rng(2).standard_normal((2, 3, 4, 6))
    pos = np.array([0, 3, 1, 9])
    report = gradcheck(lambda x: rotary_embedding_forward(x, pos, 100.0, interleaved=interleaved),
                       rotary_embedding_backward, {"x": x}, atol=1e-9, rtol=1e-7)
    assert report.ok and report.tensors[0].name == "x"
    # the backward is the inverse rotation: backward(forward(x)) = x
    y, cache = rotary_embedding_forward(x, pos, 100.0, interleaved=interleaved)
    np.testing.assert_allclose(rotary_embedding_backward(y, cache)["x"], x, rtol=0, atol=1e-14)


def test_float32_in_float32_out():
    x = np.random.default_rng(3).standard_normal((2, 5, 4)).astype(np.float32)
    y, cache = rotary_embedding_forward(x, np.arange(5), interleaved=True)
    g = rotary_embedding_backward(y, cache)["x"]
    assert y.dtype == g.dtype == np.float32
    assert np.max(np.abs(y - loop_rotary(x, np.arange(5), 10000.0, True))) < 1e-6


def test_bad_arguments_raise_naming_the_argument():
    x = np.zeros((3, 4))
    f = rotary_embedding_forward
    with pytest.raises(TypeError, match="x must be a numpy.ndarray"):
        f(x.tolist(), np.arange(3))
    with pytest.raises(ValueError, match="x's last dimension D must be even"):
        f(np.zeros((3, 5)), np.arange(3))
    with pytest.raises(ValueError, match=r"x must have at least 2 dimensions \(..., T, D\)"):
        f(np.zeros(4), np.arange(3))
    with pytest.raises(ValueError, match=r"positions must have shape \(T,\) = \(3,\)"):
        f(x, np.arange(4))
    with pytest.raises(TypeError, match="positions must be an integer or floating numpy.ndarray"):
        f(x, [0, 1, 2])
    with pytest.raises(ValueError, match="positions must be finite"):
        f(x, np.array([0.0, np.nan, 1.0]))
    with pytest.raises(ValueError, match="base must be > 0"):
        f(x, np.arange(3), 0.0)
    with pytest.raises(TypeError, match="base must be a finite real"):
        f(x, np.arange(3), "1e4")
    with pytest.raises(TypeError, match="interleaved must be a bool"):
        f(x, np.arange(3), interleaved="yes")
    _, cache = f(x, np.arange(3))
    with pytest.raises(ValueError, match="d_out must have the forward output's shape"):
        rotary_embedding_backward(np.zeros((3, 2)), cache)
