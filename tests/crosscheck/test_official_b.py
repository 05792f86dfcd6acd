"""npattn against the transcriptions of the papers' official modules
(tools/torch_ref_official_b.py: the Non-local PyTorch port's four modes and the authors'
Caffe2 block, GCNet's ContextBlock, both CoordAtt files, the SKNet Caffe SK unit, GCT,
SimAM, open-aff's MS_CAM / AFF / iAFF), in float64 over two training steps and an eval
step: output, input gradients, every parameter gradient (mapped back through the key
map) and the running statistics after each step, within 1e-10. Also: the official
initialisations that npattn reproduces, the official code's failures that the porting
page reports, and the BatchNorm settings against torch modules built with them."""

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="PyTorch not installed: cross-check skipped")
pytestmark = pytest.mark.crosscheck

import npattn  # noqa: E402
import torch_ref_official_b as off  # noqa: E402  (tools/, on sys.path via conftest)

TOL = 1e-10
ZERO_TOL = 1e-12
SHAPE = (3, 16, 7, 5)  # odd H and W: the 2x2 pools drop a row and a column


def rel_err(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-300)) if b.size else 0.0


def randomize(block, rng):
    """Every floating array non-trivial: the zero-initialised BatchNorm / last convs too."""
    state = block.state_dict()
    for k, v in state.items():
        if v.dtype.kind != "f":
            state[k] = np.array(int(rng.integers(0, 20)), dtype=v.dtype)
        elif k.endswith("running_var") or k.endswith(("norm.weight", "1.weight", "bn1.weight", "alpha")):
            state[k] = rng.uniform(0.5, 1.5, v.shape)
        else:
            state[k] = rng.normal(0.0, 0.4, v.shape)
    block.load_state_dict(state)
    return block


def build(name, rng):
    reference, block, kwargs = off.OFFICIAL[name]
    blk = randomize(getattr(npattn, block)(**kwargs, rng=rng, dtype=np.float64), rng)
    if block == "SKConv":  # moderate path logits: a saturated softmax leaves gradients of rounding noise
        blk.load_state_dict({k: (0.1 * v if k.startswith("projections.") else v) for k, v in blk.state_dict().items()})
    module, mapping, _ = off.make_official(reference, blk)
    return blk, module, mapping


def inputs(name, blk, rng):
    n_in = 2 if type(blk).__name__ in ("AFF", "iAFF") else 1
    xs = [rng.standard_normal(SHAPE) + rng.normal(0.0, 1.0, SHAPE[:2] + (1, 1)) for _ in range(n_in)]
    if name.endswith("after_relu"):
        xs = [np.abs(x) for x in xs]
    return xs


def zero_keys(blk, training):
    """The parameters whose gradient npattn returns as exact zeros."""
    name = type(blk).__name__
    if name == "NonLocalAttn":
        return set(blk.zero_grad_keys(training))
    keys = set()
    if name == "GlobalContext" and blk.use_attn:
        keys.add("conv_attn.bias")
    if name == "iAFF":
        keys |= {k for k in blk.parameter_names() if k.startswith("global_att2.")}
    if training and name in ("AFF", "iAFF", "MS_CAM", "CoordAttn", "SKConv"):
        state = blk.state_dict()
        for k in blk.parameter_names():  # a bias in front of a BatchNorm
            if k.endswith(".bias") and not k.startswith("global_att2."):
                p = k[: -len("bias")].rstrip(".").split(".")
                nxt = ".".join(p[:-1] + [str(int(p[-1]) + 1)]) if p[-1].isdigit() else None
                if (nxt and nxt + ".running_mean" in state) or k == "conv1.bias":
                    keys.add(k)
    return keys


def one_step(blk, module, mapping, xs, training, rng):
    y, cache = blk.forward(*xs, training=training)
    dy = rng.standard_normal(y.shape)
    dxs, grads = blk.backward(dy, cache)
    module.train(training)
    for p in module.parameters():
        p.grad = None
    txs = [torch.from_numpy(x.copy()).requires_grad_(True) for x in xs]
    ty = module(*txs)
    ty.backward(torch.from_numpy(dy))
    errs = {"output": rel_err(y, ty.detach().numpy())}
    for i, (dx, tx) in enumerate(zip(dxs, txs)):
        errs[f"grad.input.{i}"] = rel_err(dx, tx.grad.numpy())
    named = {k: (p.grad.numpy() if p.grad is not None else np.zeros(tuple(p.shape))) for k, p in module.named_parameters()}
    theirs = off.from_official(named, mapping, {k: blk[k].shape for k in blk.parameter_names()})
    zero = zero_keys(blk, training)
    scale = max(float(np.max(np.abs(g))) for g in list(grads.values()) + list(dxs))
    for k, g in grads.items():
        if k in zero:
            assert np.all(g == 0.0), f"{k}: npattn should return exact zeros"
            assert float(np.max(np.abs(theirs[k]))) < ZERO_TOL * scale, f"{k}: official {np.max(np.abs(theirs[k])):.3e}"
        else:
            assert np.max(np.abs(g)) > 0, f"{k}: a zero gradient checks nothing"
            errs[f"grad.{k}"] = rel_err(g, theirs[k])
    state = {k: v.numpy() for k, v in module.state_dict().items()}
    after = off.from_official(state, mapping, {k: blk[k].shape for k in blk.buffer_names()})
    for k in blk.buffer_names():
        if "num_batches_tracked" in k:
            assert int(after[k]) == int(blk[k]), k
        else:
            errs[k] = rel_err(blk[k], after[k])
    return errs


@pytest.mark.parametrize("name", list(off.OFFICIAL))
def test_npattn_matches_the_official_module(name):
    # seed 1: with seed 0, AFF's global ReLUs are on for all three samples of one channel
    # and off for the others, which makes global_att.2.bias's gradient identically 0 (a
    # shift through the next BatchNorm), both sides then comparing rounding noise
    rng = np.random.default_rng(1)
    blk, module, mapping = build(name, rng)
    worst = {}
    for training in (True, True, False):
        for k, e in one_step(blk, module, mapping, inputs(name, blk, rng), training, rng).items():
            worst[k] = max(worst.get(k, 0.0), e)
    bad = {k: e for k, e in worst.items() if not e < TOL}
    assert not bad, f"{name}: relative errors above {TOL}: {bad}"
    print(f"{name}: worst relative error {max(worst.values()):.2e} ({max(worst, key=worst.get)})")


def test_key_maps_cover_every_official_key_exactly_once():
    """npattn's state_dict, mapped, loads strictly into the official module (make_official
    loads with strict=True) and maps back to itself."""
    rng = np.random.default_rng(1)
    for name in off.OFFICIAL:
        blk, module, mapping = build(name, rng)
        state = {k: v.numpy() for k, v in module.state_dict().items()}
        back = off.from_official(state, mapping, {k: v.shape for k, v in blk.state_dict().items()})
        for k, v in blk.state_dict().items():
            np.testing.assert_array_equal(back[k], v, err_msg=f"{name}: {k}")


# ----------------------------------------------------------- official initialisations


def test_gcnet_init_is_the_official_one():
    torch.manual_seed(0)
    ref = off.ContextBlock(16, 0.25, "att", ("channel_add", "channel_mul"))
    blk = npattn.GlobalContext(16, fuse_add=True, rd_channels=4, ln_eps=1e-5, init="gcnet", rng=0, dtype=np.float64)
    state = off.to_official_state(blk.state_dict(), off.KEY_MAPS["gcnet"], ref)
    for k, v in ref.state_dict().items():
        if k.startswith(("channel_add_conv.3.", "channel_mul_conv.3.", "channel_add_conv.1.", "channel_mul_conv.1.")) \
                or k == "conv_mask.bias":
            np.testing.assert_array_equal(state[k].numpy(), v.numpy(), err_msg=k)  # zeros / LayerNorm's 1 and 0
    assert ref.channel_add_conv[1].eps == blk.ln_eps == 1e-5


def test_non_local_port_init_is_the_identity_as_npattn():
    x = torch.randn(2, 8, 6, 5, dtype=torch.float64)
    for bn in (True, False):
        ref = off.NonLocalPort2d(8, 4, sub_sample=True, bn_layer=bn).double().train()
        np.testing.assert_array_equal(ref(x).detach().numpy(), x.numpy())
        blk = npattn.NonLocalAttn(8, rd_channels=4, use_scale=False, sub_sample=True, norm=bn, rng=0, dtype=np.float64)
        np.testing.assert_array_equal(blk.forward(x.numpy(), training=True)[0], x.numpy())


# --------------------------------------------------- what the official code does

def test_official_quirks_reported_on_the_porting_page():
    x = torch.randn(2, 16, 4, 3, dtype=torch.float64)
    with pytest.raises(NameError, match="sys"):
        off.GCTOfficial(16, mode="linf").double()(x)  # sys is never imported
    with pytest.raises(RuntimeError):
        off.CoordAtt(16, 32).double()(x)  # oup != inp: gates of 32 channels on 16
    y = off.SimAMOfficial().double()(torch.randn(2, 3, 1, 1, dtype=torch.float64))
    assert torch.isnan(y).all()  # H W = 1: n = 0, 0 / 0
    with pytest.raises(ValueError, match="at least 2 spatial positions"):  # npattn refuses it
        npattn.SimAM(dtype=np.float64).forward(np.ones((2, 3, 1, 1)))
    assert off.NonLocalPort2d(16).inter_channels == 8  # the port's default C' = C // 2


# ---------------------------------------------------- BatchNorm settings against torch

@pytest.mark.parametrize("make", [
    lambda: npattn.SKConv(4, 8, 2, bias=False, bn_momentum=0.3, bn_eps=0.02, rng=0, dtype=np.float64),
    lambda: npattn.AFF(8, 4, bn_momentum=0.3, bn_eps=0.02, rng=0, dtype=np.float64),
    lambda: npattn.iAFF(8, 4, bn_momentum=0.3, bn_eps=0.02, rng=0, dtype=np.float64),
    lambda: npattn.MS_CAM(8, 4, bn_momentum=0.3, bn_eps=0.02, rng=0, dtype=np.float64),
    lambda: npattn.CoordAttn(8, rd_channels=4, has_skip=True, bn_momentum=0.3, bn_eps=0.02, rng=0, dtype=np.float64),
    lambda: npattn.NonLocalAttn(8, rd_channels=4, bn_momentum=0.3, bn_eps=0.02, rng=0, dtype=np.float64),
], ids=["SKConv", "AFF", "iAFF", "MS_CAM", "CoordAttn", "NonLocalAttn"])
def test_bn_settings_match_torch_modules_built_with_them(make):
    """A training step then an eval step: the running statistics move with momentum 0.3
    and the output normalises with eps 0.02, as torch's BatchNorm built with them (the
    module's BatchNorms get the settings; torch's defaults would differ by > 1e-4)."""
    import torch_ref_attention
    import torch_ref_blocks
    import torch_ref_timm

    blk = make()
    rng = np.random.default_rng(2)
    randomize(blk, rng)
    name = type(blk).__name__
    lib = {"CoordAttn": torch_ref_timm, "NonLocalAttn": torch_ref_attention}.get(name, torch_ref_blocks)
    module = lib.make_torch_block(blk)
    bns = [m for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert bns and all(m.momentum == 0.3 and m.eps == 0.02 for m in bns)
    for training in (True, False):
        xs = [rng.standard_normal((3, blk_in(blk), 5, 4)) for _ in range(2 if name in ("AFF", "iAFF") else 1)]
        y, _ = blk.forward(*xs, training=training)
        module.train(training)
        ty = module(*[torch.from_numpy(x) for x in xs]).detach().numpy()
        assert rel_err(y, ty) < TOL
        for k, v in module.state_dict().items():
            if "running" in k:
                assert rel_err(blk[k], v.numpy()) < TOL, k
    default = lib.make_torch_block(blk)
    for m in default.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.momentum, m.eps = 0.1, 1e-5
    assert rel_err(y, default(*[torch.from_numpy(x) for x in xs]).detach().numpy()) > 1e-4


def blk_in(blk):
    return getattr(blk, "in_channels", None) or blk.channels
