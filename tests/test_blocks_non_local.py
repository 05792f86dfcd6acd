"""NonLocalAttn's official options (the PyTorch port's four modes, sub_sample after or
before the convolutions, an explicit scale, norm=False, BatchNorm settings) and the
max-pool they use: forward against loop oracles written from the port's and the Caffe2
code, gradients by central differences (every input and parameter, training and eval,
H and W odd or even), exact zero gradients, the max-pool's tie and NaN rules, errors."""

import math

import numpy as np
import pytest
from blocks_testlib import batch_norm_loop, check_gradients, conv2d_loop, randomize_params

from npattn import NonLocalAttn
from npattn.functional import max_pool2d_backward, max_pool2d_forward
from npattn.gradcheck import gradcheck




# --------------------------------------------------------------------------- oracles


def max_pool_loop(x):
    """2x2 windows, stride 2, floor; the first maximum in row-major order wins."""
    n, c, h, w = x.shape
    y = np.zeros((n, c, h // 2, w // 2))
    for a in range(n):
        for ch in range(c):
            for i in range(h // 2):
                for j in range(w // 2):
                    best = -math.inf
                    for di in range(2):
                        for dj in range(2):
                            v = float(x[a, ch, 2 * i + di, 2 * j + dj])
                            if v > best:
                                best = v
                    y[a, ch, i, j] = best
    return y


def non_local_loop(blk, x, training):
    """The port's forward (all four modes), with the Caffe2 pool-before-conv order."""
    s = blk.state_dict()
    b, c, hh, ww = x.shape
    conv = lambda name, a: conv2d_loop(a, s[f"{name}.weight"], s[f"{name}.bias"], 0, 1, 1)  # noqa: E731
    src = max_pool_loop(x) if blk.sub_sample and blk.sub_sample_at == "before_conv" else x
    if blk.mode == "gaussian":
        t, p = x, (max_pool_loop(x) if blk.sub_sample else x)
    else:
        t, p = conv("t", x), conv("p", src)
    g = conv("g", src)
    if blk.sub_sample and blk.sub_sample_at == "after_conv":
        g = max_pool_loop(g)
        if blk.mode != "gaussian":
            p = max_pool_loop(p)
    cq, cr = t.shape[1], g.shape[1]
    tt = t.reshape(b, cq, -1)
    pp = p.reshape(b, cq, -1)
    gg = g.reshape(b, cr, -1)
    n, m = tt.shape[2], pp.shape[2]
    y = np.zeros((b, cr, n))
    for a in range(b):
        for i in range(n):
            if blk.mode == "concatenation":
                wc = s["concat_project.0.weight"].reshape(-1)
                f = [blk.scale * max(sum(wc[k] * tt[a, k, i] for k in range(cq))
                                     + sum(wc[cq + k] * pp[a, k, j] for k in range(cq)), 0.0) for j in range(m)]
            else:
                f = [blk.scale * sum(tt[a, k, i] * pp[a, k, j] for k in range(cq)) for j in range(m)]
            if blk.mode in ("embedded_gaussian", "gaussian"):
                top = max(f)
                e = [math.exp(v - top) for v in f]
                wts = [v / sum(e) for v in e]
            else:
                wts = [v / m for v in f]
            for k in range(cr):
                y[a, k, i] = sum(wts[j] * gg[a, k, j] for j in range(m))
    z = conv("z", y.reshape(b, cr, hh, ww))
    stats = None
    if blk.norm:
        z, stats = batch_norm_loop(z, s, "norm.", training, blk.bn_momentum, blk.bn_eps)
    return z + x, stats


# config name: (constructor kwargs, input shape)
CASES = {
    "eg_after": (dict(in_channels=6, rd_channels=3, sub_sample=True), (3, 6, 5, 4)),
    "eg_before_scale": (dict(in_channels=6, rd_channels=3, sub_sample=True, sub_sample_at="before_conv",
                             scale=3 ** -0.5, bn_momentum=0.3, bn_eps=0.02), (2, 6, 4, 5)),
    "dot_after_no_norm": (dict(in_channels=5, rd_channels=2, mode="dot_product", sub_sample=True, norm=False,
                               use_scale=False), (2, 5, 5, 5)),
    "dot_before": (dict(in_channels=4, rd_channels=3, mode="dot_product", sub_sample=True,
                        sub_sample_at="before_conv", use_scale=False), (3, 4, 4, 3)),
    "gauss_after": (dict(in_channels=4, rd_channels=2, mode="gaussian", sub_sample=True, use_scale=False),
                    (2, 4, 5, 4)),
    "gauss_before_full": (dict(in_channels=4, rd_channels=3, mode="gaussian", sub_sample=True,
                               sub_sample_at="before_conv"), (2, 4, 4, 4)),
    "gauss_no_pool": (dict(in_channels=3, rd_channels=2, mode="gaussian", use_scale=False), (2, 3, 3, 2)),
    "concat_after": (dict(in_channels=5, rd_channels=3, mode="concatenation", sub_sample=True, use_scale=False),
                     (3, 5, 4, 5)),
    "concat_no_pool_no_norm": (dict(in_channels=4, rd_channels=2, mode="concatenation", norm=False),
                               (2, 4, 3, 2)),
}


def make(name, seed=0):
    cfg, shape = CASES[name]
    rng = np.random.default_rng(seed)
    blk = randomize_params(NonLocalAttn(**cfg, rng=rng, dtype=np.float64), rng)
    x = rng.standard_normal(shape) + rng.normal(0.0, 0.5, shape[:2] + (1, 1))
    return blk, x


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("training", [False, True])
def test_forward_and_running_statistics_match_loop_oracle(name, training):
    blk, x = make(name)
    expected, stats = non_local_loop(blk, x, training)
    out, _ = blk.forward(x, training=training)
    np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-13)
    if blk.norm:
        s = blk.state_dict()
        np.testing.assert_allclose(s["norm.running_mean"], stats[0], rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(s["norm.running_var"], stats[1], rtol=1e-12, atol=1e-14)
        assert int(s["norm.num_batches_tracked"]) == stats[2]


GRAD_CASES = ["eg_after", "eg_before_scale", "dot_after_no_norm", "dot_before", "gauss_after", "gauss_before_full",
              "concat_after", "concat_no_pool_no_norm"]


@pytest.mark.parametrize("name", GRAD_CASES)
@pytest.mark.parametrize("training", [False, True])
def test_gradients_every_input_and_parameter(name, training):
    blk, x = make(name, seed=3)
    zero = blk.zero_grad_keys(training)
    check_gradients(blk, [x], training=training, zero_keys=zero)
    y, cache = blk.forward(x, training=training)
    _, grads = blk.backward(np.random.default_rng(4).standard_normal(y.shape), cache)
    for k in blk.parameter_names():
        if k in zero:
            assert np.all(grads[k] == 0.0), k
        else:
            assert np.any(grads[k] != 0.0), k


def test_zero_gradient_keys_by_mode():
    z = lambda **kw: NonLocalAttn(8, rd_channels=2, rng=0, **kw).zero_grad_keys  # noqa: E731
    assert z()(True) == ("p.bias", "g.bias", "z.bias") and z()(False) == ("p.bias",)
    assert z(mode="dot_product")(True) == ("z.bias",) and z(mode="dot_product")(False) == ()
    assert z(mode="gaussian")(True) == ("g.bias", "z.bias")
    assert z(mode="concatenation", norm=False)(True) == ()


def test_state_dict_keys_follow_the_mode():
    keys = lambda **kw: list(NonLocalAttn(8, rd_channels=2, rng=0, **kw).state_dict())  # noqa: E731
    assert keys()[:6] == ["t.weight", "t.bias", "p.weight", "p.bias", "g.weight", "g.bias"]
    assert keys(mode="gaussian")[:4] == ["g.weight", "g.bias", "z.weight", "z.bias"]
    assert "concat_project.0.weight" in keys(mode="concatenation")
    assert NonLocalAttn(8, rd_channels=2, mode="concatenation", rng=0)["concat_project.0.weight"].shape == (1, 4, 1, 1)
    assert not [k for k in keys(norm=False) if k.startswith("norm.")]


def test_identity_at_initialisation_with_and_without_norm():
    x = np.random.default_rng(0).standard_normal((2, 8, 4, 4))
    for kw in ({}, {"norm": False}, {"mode": "concatenation", "sub_sample": True}):
        out, _ = NonLocalAttn(8, rng=0, dtype=np.float64, **kw).forward(x, training=True)
        np.testing.assert_array_equal(out, x)


def test_scale_argument():
    assert NonLocalAttn(64, rd_channels=16, scale=0.25, rng=0).scale == 0.25
    assert NonLocalAttn(64, rd_channels=16, use_scale=False, scale=0.25, rng=0).scale == 0.25
    assert NonLocalAttn(64, rng=0).scale == 64 ** -0.5


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match="NonLocalAttn: mode must be one of"):
        NonLocalAttn(8, mode="embedded")
    with pytest.raises(ValueError, match="sub_sample_at must be 'after_conv' or 'before_conv'"):
        NonLocalAttn(8, sub_sample_at="after")
    with pytest.raises(TypeError, match="NonLocalAttn: scale must be None or a finite real number"):
        NonLocalAttn(8, scale="0.5")
    with pytest.raises(TypeError, match="NonLocalAttn: norm must be a bool"):
        NonLocalAttn(8, norm=0)
    with pytest.raises(ValueError, match="NonLocalAttn: bn_eps must be positive"):
        NonLocalAttn(8, bn_eps=-1.0)
    with pytest.raises(ValueError, match=r"H >= 2 and W >= 2 with sub_sample.*\(2, 8, 1, 5\)"):
        NonLocalAttn(8, sub_sample=True).forward(np.zeros((2, 8, 1, 5), np.float32))


# --------------------------------------------------------------------------- max-pool


def test_max_pool_matches_loop_and_drops_the_trailing_row_and_column():
    x = np.random.default_rng(0).standard_normal((2, 3, 5, 7))
    y, cache = max_pool2d_forward(x, 2)
    np.testing.assert_array_equal(y, max_pool_loop(x))
    dx = max_pool2d_backward(np.ones_like(y), cache)["x"]
    assert dx[:, :, 4].sum() == 0 and dx[:, :, :, 6].sum() == 0 and dx.sum() == y.size


def test_max_pool_ties_go_to_the_first_and_nan_to_the_last():
    """Hand cases: a window [[1, 3], [3, 0]] sends its gradient to (0, 1) (the first 3 in
    row-major order); [[nan, 2], [nan, 5]] gives NaN and sends it to (1, 0), the last NaN."""
    x = np.array([[[[1.0, 3.0, np.nan, 2.0], [3.0, 0.0, np.nan, 5.0]]]])
    y, cache = max_pool2d_forward(x, 2)
    assert y[0, 0, 0, 0] == 3.0 and np.isnan(y[0, 0, 0, 1])
    dx = max_pool2d_backward(np.array([[[[10.0, 20.0]]]]), cache)["x"]
    np.testing.assert_array_equal(dx, [[[[0.0, 10.0, 0.0, 0.0], [0.0, 0.0, 20.0, 0.0]]]])
    y, cache = max_pool2d_forward(np.full((1, 1, 2, 4), 7.0), (2, 2))
    assert np.all(cache.index == 0)  # every element maximal: the first wins


def test_max_pool_gradient_and_errors():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 2, 5, 6))  # no ties: differentiable
    report = gradcheck(lambda x: max_pool2d_forward(x, (2, 3)), lambda d, c: max_pool2d_backward(d, c), {"x": x},
                       raise_on_failure=False)
    assert report.ok, str(report)
    with pytest.raises(ValueError, match=r"max_pool2d: x must have H >= 2 and W >= 2"):
        max_pool2d_forward(np.zeros((1, 1, 1, 4)), 2)
    with pytest.raises(TypeError, match="kernel_size must be an int or a pair"):
        max_pool2d_forward(np.zeros((1, 1, 4, 4)), 2.0)
    y, _ = max_pool2d_forward(x.astype(np.float32), 2)
    assert y.dtype == np.float32
