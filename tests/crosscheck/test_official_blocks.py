"""npattn configured as each paper's official module against the transcription of that
module (tools/torch_ref_official.py), float64, within 1e-10 normwise relative error:
output, input gradient, every parameter gradient (through the key mapping), running
statistics and num_batches_tracked over two training steps and one eval step; the official
CBAM's max ties (first maximal element) and its lp pool at an all-zero channel."""

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="PyTorch not installed: cross-check skipped")
pytestmark = pytest.mark.crosscheck

import npattn  # noqa: E402
from torch_ref_official import make_official_block, npattn_key  # noqa: E402

TOL = 1e-10
F64 = np.float64


def official_cbam(channels, r=16, **kw):
    """npattn's CBAM configured as Jongchan/attention-module's CBAM(channels, r, ...)."""
    return lambda rng: npattn.CBAM(channels, rd_channels=channels // r, mlp_bias=True, spatial_order="max_avg",
                                   max_grad="first", bn_momentum=0.01, rng=rng, dtype=F64, **kw)


CASES = {
    # name: (official, constructor, input shape)
    "cbam_default": ("jongchan_cbam", official_cbam(32), (3, 32, 7, 5)),
    "cbam_r4_all_pools": ("jongchan_cbam", official_cbam(16, 4, pool_types=["avg", "max", "lp", "lse"]), (2, 16, 5, 6)),
    "cbam_lp_lse": ("jongchan_cbam", official_cbam(12, 3, pool_types=("lse", "lp")), (3, 12, 4, 3)),
    "cbam_max_only_no_spatial": ("jongchan_cbam", official_cbam(16, 8, pool_types=("max",), no_spatial=True), (2, 16, 3, 5)),
    "cbam_batch1": ("jongchan_cbam", official_cbam(8, 2), (1, 8, 5, 3)),
    "eca_k1": ("bangguwu_eca", lambda rng: npattn.ECA(kernel_size=1, rng=rng, dtype=F64), (3, 32, 7, 5)),
    "eca_k3": ("bangguwu_eca", lambda rng: npattn.ECA(kernel_size=3, rng=rng, dtype=F64), (3, 32, 7, 5)),
    "eca_k5": ("bangguwu_eca", lambda rng: npattn.ECA(kernel_size=5, rng=rng, dtype=F64), (2, 9, 3, 4)),
    "eca_ns_k3": ("bangguwu_eca_ns", lambda rng: npattn.ECA(32, kernel_size=3, shared=False, rng=rng, dtype=F64),
                  (3, 32, 7, 5)),
    "eca_ns_k5": ("bangguwu_eca_ns", lambda rng: npattn.ECA(7, kernel_size=5, shared=False, rng=rng, dtype=F64),
                  (2, 7, 4, 3)),
    "eca_ns_k1": ("bangguwu_eca_ns", lambda rng: npattn.ECA(6, kernel_size=1, shared=False, rng=rng, dtype=F64),
                  (1, 6, 2, 5)),
    "se": ("moskomule_se", lambda rng: npattn.SEBlock(32, 16, rng=rng, dtype=F64), (3, 32, 7, 5)),
    "se_r4": ("moskomule_se", lambda rng: npattn.SEBlock(12, 4, rng=rng, dtype=F64), (1, 12, 3, 4)),
}


def randomize(block, rng):
    state = block.state_dict()
    for k, v in state.items():
        if v.dtype.kind != "f":
            state[k] = np.array(int(rng.integers(0, 20)), dtype=v.dtype)
        elif k.endswith(("running_var", "bn.weight")):
            state[k] = rng.uniform(0.5, 1.5, v.shape)
        else:
            state[k] = rng.normal(0.0, 0.4, v.shape)
    block.load_state_dict(state)


def rel_err(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-300)) if b.size else 0.0


def one_step(block, module, official, x, training, rng):
    y, cache = block.forward(x, training=training)
    dy = rng.standard_normal(y.shape)
    (dx,), grads = block.backward(dy, cache)
    module.train(training)
    module.zero_grad(set_to_none=True)
    tx = torch.from_numpy(x.copy()).requires_grad_(True)
    ty = module(tx)
    ty.backward(torch.from_numpy(dy))
    errs = {"output": rel_err(y, ty.detach().numpy()), "grad.input": rel_err(dx, tx.grad.numpy())}
    tparams = {npattn_key(official, k): p for k, p in module.named_parameters()}
    assert set(tparams) == set(grads) == set(block.parameter_names())
    for k, g in grads.items():
        assert np.max(np.abs(g)) > 0, f"{k}: a zero gradient checks nothing; change the case"
        errs[f"grad.{k}"] = rel_err(g, tparams[k].grad.numpy().reshape(g.shape))
    nstate = block.state_dict()
    tstate = {npattn_key(official, k): v for k, v in module.state_dict().items()}
    assert set(tstate) == set(nstate)
    for k, v in tstate.items():
        if "num_batches_tracked" in k:
            assert int(nstate[k]) == int(v), k
        elif "running" in k:
            errs[k] = rel_err(nstate[k], v.numpy())
    return errs


@pytest.mark.parametrize("name", list(CASES))
def test_npattn_matches_the_official_module(name):
    official, make, shape = CASES[name]
    rng = np.random.default_rng(0)
    block = make(rng)
    randomize(block, rng)
    module = make_official_block(block, official)
    worst = {}
    for training in (True, True, False):
        x = rng.standard_normal(shape) + rng.normal(0, 1, shape[:2] + (1, 1))
        for k, e in one_step(block, module, official, x, training, rng).items():
            worst[k] = max(worst.get(k, 0.0), e)
    bad = {k: e for k, e in worst.items() if not e < TOL}
    assert not bad, f"{name}: relative errors above {TOL}: {bad}"
    print(f"{name}: worst relative error {max(worst.values()):.2e} ({max(worst, key=worst.get)})")


@pytest.mark.parametrize("training", [True, False])
def test_official_cbam_ties_go_to_the_first_maximum(training):
    """Maxima attained two and three times over (H, W), and three equal largest channels
    (equal fc2 rows and biases): max_grad="first" gives each gradient to the first one, as
    the official F.max_pool2d and torch.max(x, 1) do; "split" would not match."""
    rng = np.random.default_rng(1)
    block = official_cbam(8, 4, pool_types=("avg", "max", "lse"))(0)
    randomize(block, rng)
    state = block.state_dict()
    state["channel.fc2.bias"][0] = 4.0  # channels 0 to 2 open: their gated maps are the largest
    for i in (1, 2):
        state["channel.fc2.weight"][i] = state["channel.fc2.weight"][0]
        state["channel.fc2.bias"][i] = state["channel.fc2.bias"][0]
    block.load_state_dict(state)
    module = make_official_block(block, "jongchan_cbam")
    x = rng.standard_normal((2, 8, 4, 5))
    top = x.max(axis=(2, 3)) + 0.3
    x[:, :, 0, 3] = x[:, :, 2, 1] = top
    x[:, 4:, 3, 4] = top[:, 4:]
    x[:, 0] += 10.0
    x[:, 1] = x[:, 0]
    x[:, 2] = x[:, 0]
    _, cache = block.forward(x, training=False)
    assert np.all(cache.max_hw.share[:, :, 0, 3] == 1) and np.all(cache.max_hw.share[:, :, 2, 1] == 0)
    assert np.all(cache.max_c.share[:, 0] == 1) and np.all(cache.max_c.share[:, 1:3] == 0)
    errs = one_step(block, module, "jongchan_cbam", x, training, rng)
    assert max(errs.values()) < TOL, errs
    split = npattn.CBAM(**dict(block.config, max_grad="split"), rng=0, dtype=F64)
    split.load_state_dict(block.state_dict())
    (dx_split,), _ = split.backward(np.ones(x.shape), split.forward(x, training=False)[1])
    (dx_first,), _ = block.backward(np.ones(x.shape), block.forward(x, training=False)[1])
    assert rel_err(dx_split, dx_first) > 1e-3  # the tie rule matters here


def test_official_cbam_lp_pool_at_an_all_zero_channel():
    """Channel 3 is zero everywhere: the L2 pool sits on its kink; torch's lp_pool2d gives
    gradient 0 there and so does npattn."""
    rng = np.random.default_rng(2)
    block = official_cbam(8, 2, pool_types=("lp", "avg"))(0)
    randomize(block, rng)
    module = make_official_block(block, "jongchan_cbam")
    x = rng.standard_normal((2, 8, 3, 4))
    x[:, 3] = 0.0
    errs = one_step(block, module, "jongchan_cbam", x, True, rng)
    assert max(errs.values()) < TOL, errs


def test_key_mapping_is_a_bijection_onto_the_official_state_dict():
    block = official_cbam(32)(0)
    module = make_official_block(block, "jongchan_cbam")
    assert sorted(npattn_key("jongchan_cbam", k) for k in module.state_dict()) == sorted(block.state_dict())
    nospatial = official_cbam(32, pool_types=("avg",), no_spatial=True)(0)
    assert list(nospatial.state_dict()) == ["channel.fc1.weight", "channel.fc1.bias", "channel.fc2.weight",
                                            "channel.fc2.bias"]


@pytest.mark.parametrize("case_id", ["cbam/jongchan_c32_r16_train_f64", "cbam/jongchan_c16_r4_all_pools_eval_f32",
                                     "eca/bangguwu_ns_c32_k3_eval_f64", "se/moskomule_c32_r16_eval_f64"])
def test_npattn_check_passes_the_official_modules_results(case_id, tmp_path, capsys):
    """The porter's workflow: the official module (the transcription), loaded through the
    key mapping, run on a fixture's inputs; its results saved under npattn's keys pass
    ``npattn check``."""
    import pathlib

    import torch_crosscheck

    from npattn import golden
    from npattn.cli import main

    root = pathlib.Path(__file__).resolve().parents[2]
    case = golden.load(case_id, root / "golden")
    assert case.meta["official"]
    results, reference = torch_crosscheck.run_case(case.meta, case.arrays)
    assert reference.startswith("tools/torch_ref_official.py")
    dtype = np.dtype(case.meta["dtype"])
    np.savez(tmp_path / "out.npz", **{k: v.astype(dtype) if v.dtype.kind == "f" else v for k, v in results.items()})
    assert main(["check", case_id, str(tmp_path / "out.npz")]) == 0, capsys.readouterr().out
