"""npattn's blocks against the PyTorch transcriptions of the seed code (tools/
torch_ref_blocks.py) in float64: state_dict keys, output, every input and parameter
gradient, running statistics and num_batches_tracked, over two training steps in a row
and one eval step; and a state_dict saved by PyTorch to npz, loaded into npattn."""

import io

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="PyTorch not installed: cross-check skipped")
pytestmark = pytest.mark.crosscheck

import npattn  # noqa: E402
from torch_ref_blocks import make_torch_block  # noqa: E402

TOL = 1e-10  # normwise relative error
ZERO_TOL = 1e-12  # a gradient that is 0 in exact arithmetic, relative to the block's largest gradient

CASES = {
    "SE": (lambda r: npattn.SEBlock(16, 4, rng=r, dtype=np.float64), 1, (3, 16, 4, 5)),
    "SE_bias": (lambda r: npattn.SEBlock(16, 4, bias=True, rng=r, dtype=np.float64), 1, (3, 16, 5, 3)),
    "GCT_l2": (lambda r: npattn.GCT(8, dtype=np.float64), 1, (3, 8, 4, 5)),
    "GCT_l1": (lambda r: npattn.GCT(8, mode="l1", dtype=np.float64), 1, (3, 8, 4, 5)),
    "GCT_l1_relu": (lambda r: npattn.GCT(8, epsilon=1e-3, mode="l1", after_relu=True, dtype=np.float64), 1, (3, 8, 4, 5)),
    "DAF": (lambda r: npattn.DAF(dtype=np.float64), 2, (3, 8, 4, 5)),
    "MS_CAM": (lambda r: npattn.MS_CAM(16, 4, rng=r, dtype=np.float64), 1, (3, 16, 4, 5)),
    "AFF": (lambda r: npattn.AFF(16, 4, rng=r, dtype=np.float64), 2, (3, 16, 4, 5)),
    "iAFF": (lambda r: npattn.iAFF(16, 4, rng=r, dtype=np.float64), 2, (3, 16, 4, 5)),
    "iAFF_unshared": (lambda r: npattn.iAFF(16, 4, share_global_att=False, rng=r, dtype=np.float64), 2, (3, 16, 4, 5)),
    "SK": (lambda r: npattn.SKConv(4, 8, 2, rng=r, dtype=np.float64), 1, (3, 4, 5, 6)),
    "SK_3paths_g4": (lambda r: npattn.SKConv(8, 8, 4, ratio=2, paths=3, rng=r, dtype=np.float64), 1, (2, 8, 7, 5)),
}


def randomize(block, rng):
    """Every floating array non-trivial: BatchNorm affine and running statistics, GCT's
    alpha, gamma, beta (at gamma = 0 GCT is the identity)."""
    state = block.state_dict()
    for k, v in state.items():
        if v.dtype.kind != "f":
            state[k] = np.array(int(rng.integers(0, 20)), dtype=v.dtype)
        elif k.endswith("running_var"):
            state[k] = rng.uniform(0.5, 2.0, v.shape)
        elif k.endswith(("running_mean", "beta")) or (k.endswith("bias") and f"{k[:-4]}running_mean" in state):
            state[k] = rng.normal(0.0, 0.3, v.shape)
        elif k in ("alpha", "gamma") or (k.endswith("weight") and f"{k[:-6]}running_mean" in state):
            state[k] = rng.uniform(0.5, 1.5, v.shape)
    block.load_state_dict(state)


def zero_gradient_keys(block, training):
    """Parameters whose gradient is 0 in exact arithmetic: in training, a bias followed by
    BatchNorm (it only shifts the batch mean); iAFF's global_att2 when shared."""
    state = block.state_dict()
    keys = set()
    for k in block.parameter_names():
        if type(block).__name__ == "iAFF" and block.share_global_att and k.startswith("global_att2."):
            keys.add(k)
        parts = k.split(".")
        if training and parts[-1] == "bias" and parts[-2].isdigit():
            following_bn = ".".join(parts[:-2] + [str(int(parts[-2]) + 1), "running_mean"])
            if following_bn in state:
                keys.add(k)
    return keys


def rel_err(a, b, floor):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), floor)) if b.size else 0.0


def one_step(block, module, xs, training, rng):
    """Runs both, returns the worst relative error over output, gradients and buffers."""
    y, cache = block.forward(*xs, training=training)
    dy = rng.standard_normal(y.shape)
    input_grads, param_grads = block.backward(dy, cache)

    module.train(training)
    for p in module.parameters():
        p.grad = None
    txs = [torch.from_numpy(x.copy()).requires_grad_(True) for x in xs]
    ty = module(*txs)
    ty.backward(torch.from_numpy(dy))

    errs = {"output": rel_err(y, ty.detach().numpy(), 1e-300)}
    tparams = dict(module.named_parameters())
    assert set(param_grads) == set(tparams) == set(block.parameter_names())
    for i, (g, t) in enumerate(zip(input_grads, txs)):
        errs[f"grad.input.{i}"] = rel_err(g, t.grad.numpy(), 1e-300)
    # a gradient that is 0 in exact arithmetic is rounding on both sides: it must be
    # tiny on the scale of the block's gradients, on both sides
    zero = zero_gradient_keys(block, training)
    scale = max(float(np.max(np.abs(g))) for g in list(param_grads.values()) + list(input_grads))
    for k, g in param_grads.items():
        tg = np.zeros_like(g) if tparams[k].grad is None else tparams[k].grad.numpy()
        if k in zero:
            size = max(float(np.max(np.abs(g))), float(np.max(np.abs(tg)))) / scale
            assert size < ZERO_TOL, f"{k}: gradient should be 0, npattn {np.max(np.abs(g)):.3e}, torch {np.max(np.abs(tg)):.3e}"
        else:
            errs[f"grad.{k}"] = rel_err(g, tg, 1e-300)
    tstate = module.state_dict()
    nstate = block.state_dict()
    assert list(nstate) == list(tstate)
    for k, v in tstate.items():
        if "num_batches_tracked" in k:
            assert int(nstate[k]) == int(v), k
        elif "running" in k:
            errs[k] = rel_err(nstate[k], v.numpy(), 1e-300)
    return errs


@pytest.mark.parametrize("name", list(CASES))
def test_block_matches_torch_over_train_train_eval(name):
    make, n_inputs, shape = CASES[name]
    rng = np.random.default_rng(0)
    block = make(rng)
    randomize(block, rng)
    module = make_torch_block(block)
    assert list(module.state_dict()) == list(block.state_dict())
    for k, v in module.state_dict().items():
        assert tuple(v.shape) == block.state_dict()[k].shape, k
    worst = {}
    for step, training in enumerate((True, True, False)):
        xs = [rng.standard_normal(shape) + rng.normal(0, 1, shape[:2] + (1, 1)) for _ in range(n_inputs)]
        errs = one_step(block, module, xs, training, rng)
        for k, e in errs.items():
            worst[k] = max(worst.get(k, 0.0), e)
    bad = {k: e for k, e in worst.items() if not e < TOL}
    assert not bad, f"{name}: relative errors above {TOL}: {bad}"
    print(f"{name}: worst relative error {max(worst.values()):.2e} ({max(worst, key=worst.get)})")


@pytest.mark.parametrize("name", ["SE_bias", "GCT_l1", "AFF", "iAFF", "SK"])
def test_torch_state_dict_saved_to_npz_loads_into_npattn(name):
    """A user's workflow: torch state_dict -> np.savez -> np.load -> load_state_dict."""
    make, n_inputs, shape = CASES[name]
    rng = np.random.default_rng(1)
    block = make(rng)
    module = make_torch_block(block)
    torch.manual_seed(0)
    with torch.no_grad():  # a torch-side state npattn has never seen
        for k, t in module.state_dict().items():
            if t.is_floating_point():
                t.copy_(torch.rand_like(t) + 0.5 if "var" in k else torch.randn_like(t) * 0.5)
    buf = io.BytesIO()
    np.savez(buf, **{k: v.numpy() for k, v in module.state_dict().items()})
    buf.seek(0)
    with np.load(buf, allow_pickle=False) as arrays:
        block.load_state_dict(dict(arrays))
    xs = [rng.standard_normal(shape) for _ in range(n_inputs)]
    y, _ = block.forward(*xs)
    ty = module.eval()(*[torch.from_numpy(x) for x in xs]).detach().numpy()
    assert rel_err(y, ty, 1e-300) < TOL


@pytest.mark.parametrize("name", ["MS_CAM", "SK", "GCT_l2"])
def test_float32_agrees_with_torch_float32(name):
    make, n_inputs, shape = CASES[name]
    rng = np.random.default_rng(2)
    block = make(rng)
    randomize(block, rng)
    module = make_torch_block(block, dtype=torch.float32).train()
    block.to(np.float32)
    xs = [rng.standard_normal(shape).astype(np.float32) for _ in range(n_inputs)]
    y, cache = block.forward(*xs, training=True)
    (dx, *_), _ = block.backward(np.ones_like(y), cache)
    tx = [torch.from_numpy(x.copy()).requires_grad_(True) for x in xs]
    ty = module(*tx)
    ty.backward(torch.ones_like(ty))
    assert y.dtype == np.float32
    assert rel_err(y, ty.detach().numpy(), 1e-30) < 1e-5
    assert rel_err(dx, tx[0].grad.numpy(), 1e-30) < 1e-4
