"""npattn's timm-layout blocks against timm 1.0.31's own modules (SimAM against the
PyTorch transcription of the paper's formula in tools/torch_ref_timm.py), in float64:
state_dict keys and shapes, output, every input and parameter gradient, running
statistics and num_batches_tracked over two training steps and one eval step, ties of
CBAM's maxima, and a timm module's state_dict loaded into npattn without renaming."""

import io

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="PyTorch not installed: cross-check skipped")
pytest.importorskip("timm", reason="timm not installed: cross-check against timm skipped")
pytestmark = pytest.mark.crosscheck

import npattn  # noqa: E402
from torch_ref_timm import make_torch_block  # noqa: E402

TOL = 1e-10  # normwise relative error
ZERO_TOL = 1e-12  # a gradient 0 in exact arithmetic: npattn exactly 0, torch rounding below this

F64 = np.float64
CASES = {
    # name: (constructor, input shape, {training: parameter keys whose gradient is exactly 0})
    "SEModule": (lambda r: npattn.SEModule(16, rd_ratio=0.25, rd_divisor=2, rng=r, dtype=F64), (3, 16, 4, 5), {}),
    "SEModule_nobias": (lambda r: npattn.SEModule(16, rd_channels=3, bias=False, rng=r, dtype=F64), (1, 16, 5, 3), {}),
    "SEModule_default": (lambda r: npattn.SEModule(64, rng=r, dtype=F64), (2, 64, 3, 2), {}),
    "CBAM": (lambda r: npattn.CBAM(16, rd_ratio=0.25, rng=r, dtype=F64), (3, 16, 5, 4), {}),
    "CBAM_k3_rd3": (lambda r: npattn.CBAM(12, rd_channels=3, spatial_kernel_size=3, rng=r, dtype=F64), (1, 12, 3, 6), {}),
    "CBAM_divisor": (lambda r: npattn.CBAM(20, rd_ratio=0.25, rd_divisor=4, spatial_kernel_size=5, rng=r, dtype=F64), (2, 20, 4, 4), {}),
    "ECA": (lambda r: npattn.ECA(rng=r, dtype=F64), (3, 10, 4, 5), {}),
    "ECA_k5": (lambda r: npattn.ECA(kernel_size=5, rng=r, dtype=F64), (2, 7, 3, 2), {}),
    "ECA_adaptive": (lambda r: npattn.ECA(256, rng=r, dtype=F64), (2, 256, 2, 3), {}),
    "ECA_gamma_beta": (lambda r: npattn.ECA(16, gamma=1, beta=2, rng=r, dtype=F64), (1, 16, 3, 3), {}),
    "CoordAttn": (lambda r: npattn.CoordAttn(16, rng=r, dtype=F64), (3, 16, 5, 4), {}),
    "CoordAttn_bias": (lambda r: npattn.CoordAttn(16, rd_channels=4, bias=True, rng=r, dtype=F64), (3, 16, 4, 6),
                       {True: ("conv1.bias",)}),
    "CoordAttn_factor": (lambda r: npattn.CoordAttn(24, rd_ratio=0.25, rd_divisor=2, se_factor=0.5, bias=True, rng=r,
                                                    dtype=F64), (1, 24, 3, 5), {True: ("conv1.bias",)}),
    "GlobalContext": (lambda r: npattn.GlobalContext(16, rd_channels=4, rng=r, dtype=F64), (3, 16, 4, 5),
                      {True: ("conv_attn.bias",), False: ("conv_attn.bias",)}),
    "GlobalContext_add": (lambda r: npattn.GlobalContext(16, fuse_add=True, fuse_scale=False, rd_ratio=0.25, rng=r, dtype=F64),
                          (2, 16, 3, 4), {True: ("conv_attn.bias",), False: ("conv_attn.bias",)}),
    "GlobalContext_both_mean": (lambda r: npattn.GlobalContext(16, use_attn=False, fuse_add=True, rd_channels=5, rng=r,
                                                               dtype=F64), (1, 16, 5, 3), {}),
    "GlobalContext_both_attn": (lambda r: npattn.GlobalContext(12, fuse_add=True, init_last_zero=True, rd_ratio=0.5,
                                                               rd_divisor=2, rng=r, dtype=F64), (3, 12, 3, 3),
                                {True: ("conv_attn.bias",), False: ("conv_attn.bias",)}),
    # timm's has_skip, and npattn's BatchNorm / LayerNorm settings set on timm's module
    "CoordAttn_skip_bn": (lambda r: npattn.CoordAttn(16, rd_channels=4, bias=True, has_skip=True, bn_momentum=0.3,
                                                     bn_eps=1e-3, rng=r, dtype=F64), (3, 16, 5, 3), {True: ("conv1.bias",)}),
    "CoordAttn_skip": (lambda r: npattn.CoordAttn(12, has_skip=True, rng=r, dtype=F64), (2, 12, 3, 6), {}),
    "GlobalContext_ln_eps_gcnet_init": (lambda r: npattn.GlobalContext(16, fuse_add=True, rd_channels=4, ln_eps=1e-5,
                                                                       init="gcnet", rng=r, dtype=F64), (3, 16, 4, 5),
                                        {True: ("conv_attn.bias",), False: ("conv_attn.bias",)}),
    # timm's options of SEModule, EcaModule and CbamModule
    "SEModule_maxpool": (lambda r: npattn.SEModule(16, rd_channels=5, add_maxpool=True, rng=r, dtype=F64), (3, 16, 5, 4), {}),
    "SEModule_norm": (lambda r: npattn.SEModule(16, rd_channels=6, norm=True, bn_momentum=0.3, bn_eps=1e-3, rng=r,
                                                dtype=F64), (3, 16, 3, 5), {True: ("fc1.bias",)}),
    "SEModule_silu": (lambda r: npattn.SEModule(12, rd_channels=4, act="silu", rng=r, dtype=F64), (2, 12, 3, 4), {}),
    "SEModule_gelu": (lambda r: npattn.SEModule(12, rd_channels=4, act="gelu", rng=r, dtype=F64), (2, 12, 4, 3), {}),
    "SEModule_hardswish_hard_sigmoid": (lambda r: npattn.SEModule(12, rd_ratio=0.25, rd_divisor=2, act="hardswish",
                                                                  gate="hard_sigmoid", rng=r, dtype=F64), (3, 12, 5, 3), {}),
    "SEModule_all_options_hard_sigmoid": (lambda r: npattn.SEModule(20, rd_channels=7, add_maxpool=True, bias=False, norm=True,
                                                       act="gelu", gate="hard_sigmoid", rng=r, dtype=F64), (2, 20, 3, 4), {}),
    "ECA_mlp": (lambda r: npattn.ECA(16, use_mlp=True, rng=r, dtype=F64), (3, 16, 4, 5), {}),
    "ECA_mlp_rd3": (lambda r: npattn.ECA(24, use_mlp=True, rd_channels=3, rng=r, dtype=F64), (1, 24, 3, 2), {}),
    "ECA_mlp_ratio_divisor": (lambda r: npattn.ECA(40, use_mlp=True, rd_ratio=0.25, rd_divisor=4, gamma=1, rng=r,
                                                   dtype=F64), (2, 40, 2, 3), {}),
    "CBAM_mlp_bias": (lambda r: npattn.CBAM(16, rd_channels=4, mlp_bias=True, rng=r, dtype=F64), (3, 16, 4, 5), {}),
    "SimAM": (lambda r: npattn.SimAM(dtype=F64), (3, 8, 4, 5), {}),
    "SimAM_lambda": (lambda r: npattn.SimAM(0.25, dtype=F64), (1, 5, 2, 7), {}),
}


def randomize(block, rng):
    """Every floating array non-trivial (BatchNorm statistics and affine, LayerNorm affine,
    the zero-initialised mlp_add.fc2.weight)."""
    state = block.state_dict()
    for k, v in state.items():
        if v.dtype.kind != "f":
            state[k] = np.array(int(rng.integers(0, 20)), dtype=v.dtype)
        elif k.endswith("running_var") or k.endswith(("bn.weight", "bn1.weight", "norm.weight")):
            state[k] = rng.uniform(0.5, 1.5, v.shape)
        else:
            state[k] = rng.normal(0.0, 0.4, v.shape)
    block.load_state_dict(state)


def rel_err(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-300)) if b.size else 0.0


def one_step(block, module, x, training, rng, zero):
    y, cache = block.forward(x, training=training)
    dy = rng.standard_normal(y.shape)
    (dx,), param_grads = block.backward(dy, cache)
    module.train(training)
    for p in module.parameters():
        p.grad = None
    tx = torch.from_numpy(x.copy()).requires_grad_(True)
    ty = module(tx)
    ty.backward(torch.from_numpy(dy))
    errs = {"output": rel_err(y, ty.detach().numpy()), "grad.input": rel_err(dx, tx.grad.numpy())}
    tparams = dict(module.named_parameters())
    assert set(param_grads) == set(tparams) == set(block.parameter_names())
    scale = max([float(np.max(np.abs(dx)))] + [float(np.max(np.abs(g))) for g in param_grads.values()])
    for k, g in param_grads.items():
        tg = np.zeros_like(g) if tparams[k].grad is None else tparams[k].grad.numpy()
        if k in zero:
            assert np.all(g == 0.0), f"{k}: npattn should return exact zeros, got {g}"
            assert float(np.max(np.abs(tg))) < ZERO_TOL * scale, f"{k}: torch {np.max(np.abs(tg)):.3e}"
        else:
            assert np.max(np.abs(g)) > 0, f"{k}: a zero gradient checks nothing; change the case"
            errs[f"grad.{k}"] = rel_err(g, tg)
    tstate, nstate = module.state_dict(), block.state_dict()
    assert list(nstate) == list(tstate)
    for k, v in tstate.items():
        if "num_batches_tracked" in k:
            assert int(nstate[k]) == int(v), k
        elif "running" in k:
            errs[k] = rel_err(nstate[k], v.numpy())
    return errs


# PyTorch's CPU hardsigmoid backward multiplies by the float32 constant 1.0f / 6.0f also in
# float64 (1/6 (1 + 2.98e-8)); npattn's slope is the exact 1/6. The hard-sigmoid cases run
# npattn with torch's constant, so that the rest is held to 1e-10, and
# test_hard_sigmoid_differs_from_torch_by_its_float32_constant shows that constant is the
# whole difference.
TORCH_HARD_SIGMOID_SLOPE = float(np.float32(1.0) / np.float32(6.0))


def test_hard_sigmoid_differs_from_torch_by_its_float32_constant():
    from npattn.functional import hard_sigmoid_backward, hard_sigmoid_forward

    x = np.array([-3.0, -2.5, 0.0, 1.0, 2.999, 3.0, 4.0])
    tx = torch.from_numpy(x.copy()).requires_grad_(True)
    torch.nn.functional.hardsigmoid(tx).backward(torch.ones_like(tx))
    _, cache = hard_sigmoid_forward(x)
    dx = hard_sigmoid_backward(np.ones_like(x), cache)["x"]
    np.testing.assert_array_equal(dx, [0, 1 / 6, 1 / 6, 1 / 6, 1 / 6, 0, 0])
    np.testing.assert_array_equal(tx.grad.numpy(), np.where(dx != 0, TORCH_HARD_SIGMOID_SLOPE, 0.0))


@pytest.mark.parametrize("name", list(CASES))
def test_block_matches_timm_over_train_train_eval(name, monkeypatch):
    make, shape, zeros = CASES[name]
    if "hard_sigmoid" in name:
        from npattn.functional import activations

        monkeypatch.setattr(activations, "HARD_SIGMOID_SLOPE", TORCH_HARD_SIGMOID_SLOPE)
    rng = np.random.default_rng(0)
    block = make(rng)
    randomize(block, rng)
    module = make_torch_block(block)
    assert [(k, tuple(v.shape)) for k, v in module.state_dict().items()] == [
        (k, v.shape) for k, v in block.state_dict().items()]
    worst = {}
    for training in (True, True, False):
        x = rng.standard_normal(shape) + rng.normal(0, 1, shape[:2] + (1, 1))
        for k, e in one_step(block, module, x, training, rng, zeros.get(training, ())).items():
            worst[k] = max(worst.get(k, 0.0), e)
    bad = {k: e for k, e in worst.items() if not e < TOL}
    assert not bad, f"{name}: relative errors above {TOL}: {bad}"
    print(f"{name}: worst relative error {max(worst.values()):.2e} ({max(worst, key=worst.get)})")


@pytest.mark.parametrize("training", [True, False])
def test_cbam_ties_match_torch_amax(training):
    """Maxima attained two and three times over (H, W) and, through equal channels with
    equal fc2 rows, over C: npattn's even split is torch.amax's."""
    rng = np.random.default_rng(1)
    block = npattn.CBAM(8, rd_channels=2, spatial_kernel_size=3, rng=0, dtype=F64)
    randomize(block, rng)
    state = block.state_dict()
    state["channel.fc2.weight"][1] = state["channel.fc2.weight"][0]
    state["channel.fc2.weight"][2] = state["channel.fc2.weight"][0]
    block.load_state_dict(state)
    module = make_torch_block(block)
    x = rng.standard_normal((2, 8, 4, 5))
    top = x.max(axis=(2, 3)) + 0.3
    x[:, :, 0, 0] = x[:, :, 1, 3] = top
    x[:, 4:, 3, 4] = top[:, 4:]  # three-way ties in half the channels
    x[:, 0] += 10.0
    x[:, 1] = x[:, 0]
    x[:, 2] = x[:, 0]  # three equal, largest channels
    _, cache = block.forward(x, training=False)
    assert np.all(cache.max_c.share[:, :3] == 1 / 3) and np.all(cache.max_hw.share[:, 4:, 3, 4] == 1 / 3)
    errs = one_step(block, module, x, training, rng, ())
    assert max(errs.values()) < TOL, errs


@pytest.mark.parametrize("name", ["SEModule", "CBAM", "ECA_adaptive", "CoordAttn_bias", "GlobalContext_both_attn",
                                  "SEModule_norm", "ECA_mlp", "CBAM_mlp_bias"])
def test_timm_state_dict_saved_to_npz_loads_into_npattn(name):
    """A timm module's own state_dict (its initialisation, then perturbed by torch) saved
    with NumPy loads into the npattn block without renaming, and the outputs agree."""
    make, shape, _ = CASES[name]
    rng = np.random.default_rng(2)
    block = make(rng)
    module = make_torch_block(block)
    torch.manual_seed(0)
    with torch.no_grad():
        for k, t in module.state_dict().items():
            if t.is_floating_point():
                t.copy_(torch.rand_like(t) + 0.5 if "var" in k else t + torch.randn_like(t) * 0.3)
    buf = io.BytesIO()
    np.savez(buf, **{k: v.numpy() for k, v in module.state_dict().items()})
    buf.seek(0)
    with np.load(buf, allow_pickle=False) as arrays:
        block.load_state_dict(dict(arrays))
    x = rng.standard_normal(shape)
    y, _ = block.forward(x)
    assert rel_err(y, module.eval()(torch.from_numpy(x)).detach().numpy()) < TOL


@pytest.mark.parametrize("name", ["CBAM", "CoordAttn_bias", "GlobalContext_both_attn", "ECA_adaptive"])
def test_float32_agrees_with_timm_float32(name):
    make, shape, _ = CASES[name]
    rng = np.random.default_rng(3)
    block = make(rng)
    randomize(block, rng)
    module = make_torch_block(block, dtype=torch.float32).train()
    block.to(np.float32)
    x = rng.standard_normal(shape).astype(np.float32)
    y, cache = block.forward(x, training=True)
    (dx,), _ = block.backward(np.ones_like(y), cache)
    tx = torch.from_numpy(x.copy()).requires_grad_(True)
    ty = module(tx)
    ty.backward(torch.ones_like(ty))
    assert y.dtype == dx.dtype == np.float32
    assert rel_err(y, ty.detach().numpy()) < 1e-5
    assert rel_err(dx, tx.grad.numpy()) < 1e-4
