"""Deformable convolution and the seed's deformable sampling against PyTorch in float64:
torchvision.ops.deform_conv2d (forward and all five gradients), the project's PyTorch
transcription of the seed's th_batch_map_offsets / ConvOffset2D (tools/torch_ref_deform.py,
autograd gives the reference gradients), and a torch composition of mmcv's
ModulatedDeformConv2dPack."""

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="PyTorch not installed: cross-check skipped")
torchvision = pytest.importorskip("torchvision", reason="torchvision not installed: cross-check skipped")
pytestmark = pytest.mark.crosscheck

import npattn  # noqa: E402
from npattn import functional as F  # noqa: E402
from npattn.functional.deform import (  # noqa: E402
    batch_map_offsets_backward,
    batch_map_offsets_forward,
    deform_conv2d_backward,
    deform_conv2d_forward,
)

import torch_ref_deform as ref  # noqa: E402  (tools/, put on sys.path by tests/conftest.py)

TOL = 1e-10  # normwise relative error
BACKEND = "numpy"


def rel_err(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if b.size == 0:
        return 0.0 if a.shape == b.shape else np.inf
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


def t(a):
    return torch.from_numpy(np.array(a)).requires_grad_(True)


def out_size(size, k, s, p, d):
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


# (batch, C_in, H, W, C_out, kernel, stride, padding, dilation, weight groups, offset groups)
UNEVEN = [
    (1, 6, 7, 6, 4, (3, 2), (2, 1), (1, 0), (2, 1), 2, 3),
    (3, 6, 8, 6, 4, (3, 2), (2, 1), (1, 0), (2, 1), 2, 3),
    (3, 4, 5, 6, 6, (2, 3), (1, 2), (0, 1), (1, 2), 1, 2),
    (2, 4, 6, 6, 4, 3, 1, 1, 1, 4, 1),
    (0, 6, 7, 6, 4, (3, 2), (2, 1), (1, 0), (2, 1), 2, 3),
]


def make_case(rng, case, with_mask, with_bias):
    n, c_in, h, w, c_out, kernel, stride, padding, dilation, g_w, g_off = case
    kernel = (kernel, kernel) if isinstance(kernel, int) else kernel
    stride = (stride, stride) if isinstance(stride, int) else stride
    padding = (padding, padding) if isinstance(padding, int) else padding
    dilation = (dilation, dilation) if isinstance(dilation, int) else dilation
    k = kernel[0] * kernel[1]
    oh, ow = out_size(h, kernel[0], stride[0], padding[0], dilation[0]), out_size(w, kernel[1], stride[1], padding[1], dilation[1])
    offset = rng.uniform(-3, 3, (n, 2 * g_off * k, oh, ow))
    if n:
        offset[:, :, 0, :] = np.round(offset[:, :, 0, :])  # integer positions (one-sided gradients)
        # exactly p = -1 on both axes somewhere: offset = -1 - base position
        offset[0, 0, 0, 0] = -1 - (0 * stride[0] - padding[0])  # tap (0, 0), output (0, 0): p_y = -1
        offset[0, 1, -1, -1] = -1 - ((ow - 1) * stride[1] - padding[1])  # p_x = -1
        offset[0, 2, 0, 0] = -1 - (0 * stride[0] - padding[0])  # tap (0, 1): p_y = -1
        offset[0, 3, 0, 0] = 0.3  # with p_x inside
    return dict(
        input=rng.standard_normal((n, c_in, h, w)),
        offset=offset,
        weight=rng.standard_normal((c_out, c_in // g_w) + kernel),
        bias=rng.standard_normal(c_out) if with_bias else None,
        stride=stride, padding=padding, dilation=dilation,
        mask=rng.uniform(-0.5, 1.5, (n, g_off * k, oh, ow)) if with_mask else None,
    )


@pytest.mark.parametrize("case", UNEVEN, ids=[f"case{i}" for i in range(len(UNEVEN))])
@pytest.mark.parametrize("with_mask,with_bias", [(True, True), (False, True), (True, False), (False, False)])
def test_deform_conv2d_matches_torchvision(case, with_mask, with_bias):
    rng = np.random.default_rng(11)
    a = make_case(rng, case, with_mask, with_bias)
    out, cache = deform_conv2d_forward(**a, backend=BACKEND)
    dy = rng.standard_normal(out.shape)
    g = deform_conv2d_backward(dy, cache)

    names = ["input", "offset", "weight"] + (["bias"] if with_bias else []) + (["mask"] if with_mask else [])
    tt = {k: t(a[k]) for k in names}
    ty = torchvision.ops.deform_conv2d(
        tt["input"], tt["offset"], tt["weight"], tt.get("bias"), a["stride"], a["padding"], a["dilation"], tt.get("mask")
    )
    assert out.shape == tuple(ty.shape)
    assert rel_err(out, ty.detach().numpy()) < TOL
    if case[0] == 0:
        return  # torchvision's backward does not run on an empty batch; shapes checked in test_deform_conv
    ty.backward(torch.from_numpy(dy))
    assert set(g) == set(names)
    for k in names:
        assert g[k].shape == a[k].shape
        assert rel_err(g[k], tt[k].grad.numpy()) < TOL, k


def test_offset_gradient_at_p_minus_one_equals_torchvision():
    """The decided behaviour: at exactly p_y = -1 the offset gradient is torchvision's
    (nonzero), not mmcv's (0)."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((1, 1, 4, 5))
    w = rng.standard_normal((1, 1, 1, 1))
    offset = np.zeros((1, 2, 4, 5))
    offset[0, 0, 0, 2] = -1.0  # output (0, 2): p = (-1, 2.35)
    offset[0, 1, 0, 2] = 0.35
    out, cache = deform_conv2d_forward(x, offset, w, backend=BACKEND)
    g = deform_conv2d_backward(np.ones_like(out), cache)
    to = t(offset)
    torchvision.ops.deform_conv2d(torch.from_numpy(x), to, torch.from_numpy(w)).sum().backward()
    assert out[0, 0, 0, 2] == 0.0
    assert g["offset"][0, 0, 0, 2] != 0.0
    assert g["offset"][0, 0, 0, 2] == pytest.approx(to.grad.numpy()[0, 0, 0, 2], rel=1e-14)


def test_deform_conv2d_float32_matches_torchvision():
    rng = np.random.default_rng(12)
    a = make_case(rng, UNEVEN[1], True, True)
    a = {k: (v.astype(np.float32) if isinstance(v, np.ndarray) else v) for k, v in a.items()}
    out = F.deform_conv2d(**a, backend=BACKEND)
    ty = torchvision.ops.deform_conv2d(*(torch.from_numpy(a[k]) for k in ("input", "offset", "weight", "bias")),
                                       a["stride"], a["padding"], a["dilation"], torch.from_numpy(a["mask"]))
    assert out.dtype == np.float32
    assert rel_err(out, ty.numpy()) < 1e-5


# ---- the seed's sampling ------------------------------------------------------------


@pytest.mark.parametrize("shape", [(3, 5, 7), (2, 6, 4), (1, 1, 5)])
def test_batch_map_offsets_matches_seed_transcription(shape):
    rng = np.random.default_rng(13)
    b, h, w = shape
    x = rng.standard_normal(shape)
    offsets = rng.uniform(-3, 3, shape + (2,))
    offsets[0, 0] = np.round(offsets[0, 0])  # integer coordinates, some clamped to the border
    offsets[-1, -1, 0] = [-(h - 1), 0.5]  # row exactly 0 after the shift
    out, cache = batch_map_offsets_forward(x, offsets, backend=BACKEND)
    dy = rng.standard_normal(out.shape)
    g = batch_map_offsets_backward(dy, cache)

    tx, to = t(x), t(offsets)
    ty = ref.th_batch_map_offsets(tx, to)  # (b, h*w)
    ty.backward(torch.from_numpy(dy.reshape(b, h * w)))
    assert rel_err(out.reshape(b, h * w), ty.detach().numpy()) < TOL
    assert rel_err(g["input"], tx.grad.numpy()) < TOL
    assert rel_err(g["offsets"], to.grad.numpy()) < TOL


def test_conv_offset2d_matches_seed_transcription():
    rng = np.random.default_rng(14)
    blk = npattn.ConvOffset2D(3, rng=15, dtype=np.float64, backend=BACKEND)
    blk.load_state_dict({"weight": rng.normal(0, 0.4, (6, 3, 3, 3))})  # offsets of a few pixels: clamping happens
    module = ref.make_torch_block(blk)
    assert list(module.state_dict()) == list(blk.state_dict())
    x = rng.standard_normal((2, 3, 5, 4))
    y, cache = blk.forward(x)
    dy = rng.standard_normal(y.shape)
    (d_x,), params = blk.backward(dy, cache)
    tx = t(x)
    ty = module(tx)
    ty.backward(torch.from_numpy(dy))
    assert rel_err(y, ty.detach().numpy()) < TOL
    assert rel_err(d_x, tx.grad.numpy()) < TOL
    assert rel_err(params["weight"], module.weight.grad.numpy()) < TOL


def test_conv_offset2d_at_init_scale():
    """With the seed's N(0, 0.01) initialisation the offsets are tiny (coordinates near
    integers, where the seed's gradient rule matters): still identical to the seed."""
    rng = np.random.default_rng(16)
    blk = npattn.ConvOffset2D(4, rng=17, dtype=np.float64, backend=BACKEND)
    module = ref.make_torch_block(blk)
    x = rng.standard_normal((2, 4, 6, 6))
    y, cache = blk.forward(x)
    dy = rng.standard_normal(y.shape)
    (d_x,), params = blk.backward(dy, cache)
    tx = t(x)
    ty = module(tx)
    ty.backward(torch.from_numpy(dy))
    assert rel_err(y, ty.detach().numpy()) < TOL
    assert rel_err(d_x, tx.grad.numpy()) < TOL
    assert rel_err(params["weight"], module.weight.grad.numpy()) < TOL


# ---- blocks -------------------------------------------------------------------------


def test_deform_conv2d_block_matches_torchvision_module():
    rng = np.random.default_rng(18)
    blk = npattn.DeformConv2d(6, 4, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(2, 1), groups=2, rng=19, dtype=np.float64, backend=BACKEND)
    module = ref.make_torch_block(blk)
    assert list(module.state_dict()) == list(blk.state_dict())
    x = rng.standard_normal((3, 6, 7, 6))
    offset = rng.uniform(-2, 2, (3, 36, 3, 5))
    mask = rng.uniform(0, 1, (3, 18, 3, 5))
    y, cache = blk.forward(x, offset, mask)
    dy = rng.standard_normal(y.shape)
    (d_x, d_off, d_mask), params = blk.backward(dy, cache)
    tx, to, tm = t(x), t(offset), t(mask)
    ty = module(tx, to, tm)
    ty.backward(torch.from_numpy(dy))
    assert rel_err(y, ty.detach().numpy()) < TOL
    for mine, theirs in ((d_x, tx), (d_off, to), (d_mask, tm)):
        assert rel_err(mine, theirs.grad.numpy()) < TOL
    assert rel_err(params["weight"], module.weight.grad.numpy()) < TOL
    assert rel_err(params["bias"], module.bias.grad.numpy()) < TOL


@pytest.mark.parametrize("with_bias", [True, False])
def test_dcnv2_pack_matches_torch_composition(with_bias):
    rng = np.random.default_rng(20)
    blk = npattn.ModulatedDeformConv2dPack(6, 4, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(2, 1), groups=2, deform_groups=3, bias=with_bias, rng=21, dtype=np.float64, backend=BACKEND)
    state = blk.state_dict()
    state["conv_offset.weight"] = rng.normal(0, 0.3, state["conv_offset.weight"].shape)
    state["conv_offset.bias"] = rng.normal(0, 1.0, state["conv_offset.bias"].shape)
    if with_bias:
        state["bias"] = rng.standard_normal(4)
    blk.load_state_dict(state)
    module = ref.make_torch_block(blk)
    assert list(module.state_dict()) == list(blk.state_dict())
    x = rng.standard_normal((3, 6, 7, 5))
    y, cache = blk.forward(x)
    dy = rng.standard_normal(y.shape)
    (d_x,), params = blk.backward(dy, cache)
    tx = t(x)
    ty = module(tx)
    ty.backward(torch.from_numpy(dy))
    assert rel_err(y, ty.detach().numpy()) < TOL
    assert rel_err(d_x, tx.grad.numpy()) < TOL
    torch_params = dict(module.named_parameters())
    assert set(params) == set(torch_params)
    for k, v in params.items():
        assert rel_err(v, torch_params[k].grad.numpy()) < TOL, k


def test_dcnv2_pack_default_init_matches_torch_module_init_rule():
    """Same initialisation law as the torch composition (mmcv's): weight within
    1/sqrt(in kh kw), bias and conv_offset zero."""
    blk = npattn.ModulatedDeformConv2dPack(8, 4, 3, deform_groups=2, rng=0)
    module = ref.ModulatedDeformConv2dPack(8, 4, 3, deform_groups=2)
    for k, v in module.state_dict().items():
        assert tuple(v.shape) == blk[k].shape
    bound = float(module.weight.detach().abs().max())
    assert bound <= 1 / np.sqrt(72) and np.abs(blk["weight"]).max() <= 1 / np.sqrt(72)
