"""Helpers shared by the block tests: loop oracles written from the original PyTorch
code (independent of npattn.functional), state randomisation, and the gradient check
with the project's tolerance."""

from __future__ import annotations

import math

import numpy as np

from npattn.gradcheck import gradcheck_block

RTOL_GRAD = 1e-6  # required worst normwise relative error of every (non-zero) gradient
# Central differences carry an absolute rounding error of about u |L| / eps, the same for
# every tensor of a block; a tensor whose gradient is far smaller than the block's largest
# is therefore judged relative to this fraction of the largest (its absolute error is
# still bounded by gradcheck's own pass rule).
SCALE_FLOOR = 1e-2
ZERO_GRAD_ATOL = 1e-7  # a gradient that is identically 0: finite differences are pure rounding


# ---------------------------------------------------------------------------- state


def randomize_state(block, rng):
    """Non-trivial BatchNorm affine parameters and running statistics (at PyTorch's
    initial values eval mode would be close to the identity and check little)."""
    state = block.state_dict()
    for key, v in state.items():
        if key.endswith("running_mean"):
            state[key] = rng.normal(0.0, 0.3, v.shape)
        elif key.endswith("running_var"):
            state[key] = rng.uniform(0.5, 2.0, v.shape)
        elif key.endswith("num_batches_tracked"):
            state[key] = np.array(int(rng.integers(0, 50)), dtype=np.int64)
    # sorted: iterating a set of strings follows PYTHONHASHSEED, and the seeded draws must not
    for prefix in sorted({k[: -len("running_mean")] for k in state if k.endswith("running_mean")}):
        state[prefix + "weight"] = rng.uniform(0.5, 1.5, state[prefix + "weight"].shape)
        state[prefix + "bias"] = rng.normal(0.0, 0.2, state[prefix + "bias"].shape)
    block.load_state_dict(state)
    return block


def randomize_params(block, rng, scale=0.5):
    """Every trainable array non-trivial (biases are zero-initialised, NonLocalAttn's
    BatchNorm weight too); BatchNorm statistics as :func:`randomize_state`."""
    randomize_state(block, rng)
    state = block.state_dict()
    for k in block.parameter_names():
        if not k.startswith("norm."):
            state[k] = rng.normal(0.0, scale, state[k].shape)
    block.load_state_dict(state)
    return block


# ----------------------------------------------------------------------- gradients


def check_gradients(block, inputs, *, training, zero_keys=(), seed=0):
    """gradcheck_block with the defaults' pass rule, plus: every gradient's normwise
    relative error below RTOL_GRAD, and the parameters in ``zero_keys`` (gradient
    identically 0) analytically ~0 and numerically ~0. Returns the worst relative error."""
    report = gradcheck_block(block, inputs, training=training, raise_on_failure=False, seed=seed)
    assert report.ok, report.failure_message() + "\n" + str(report)
    zero_names = {f"param.{k}" for k in zero_keys}
    floor = SCALE_FLOOR * max(t.scale for t in report.tensors if t.name not in zero_names)
    worst = 0.0
    for t in report.tensors:
        if t.name in zero_names:
            assert t.max_abs_err < ZERO_GRAD_ATOL, f"{t.name}: expected a zero gradient\n{report}"
        else:
            # a gradient that happens to vanish (nan: all dead ReLUs, say) would check nothing
            assert not math.isnan(t.rel_err), f"{t.name}: the gradient is 0 here; choose other inputs\n{report}"
            rel = t.max_abs_err / max(t.scale, floor)
            assert rel < RTOL_GRAD, f"{t.name}: relative error {rel:.3e}\n{report}"
            worst = max(worst, rel)
    if zero_keys:
        state = block.state_dict()
        y, cache = block.forward(*inputs, training=training)
        _, grads = block.backward(np.random.default_rng(seed).standard_normal(y.shape), cache)
        block.load_state_dict(state)  # training moved the running statistics
        for k in zero_keys:
            # identically zero in exact arithmetic: the backward returns exact zeros, not
            # the rounding noise of a cancelling sum (which would differ between machines)
            assert np.all(grads[k] == 0), f"{k}: gradient should be exactly 0, got {grads[k]}"
    return worst


def zero_grad_keys_before_batch_norm(block, training):
    """In training a bias followed by BatchNorm only shifts the batch mean: its gradient
    is identically 0. The biases followed by a BatchNorm, by the blocks' layouts."""
    if not training:
        return ()
    keys = block.parameter_names()
    out = []
    for k in keys:
        if not k.endswith(".bias"):
            continue
        prefix = k[: -len("bias")]
        parts = prefix.rstrip(".").split(".")
        nxt = ".".join(parts[:-1] + [str(int(parts[-1]) + 1)]) + ".running_mean" if parts[-1].isdigit() else None
        if nxt is not None and nxt in block.state_dict():
            out.append(k)
    return tuple(out)


# ------------------------------------------------------------------ loop oracles


def sigmoid(v):
    return 1.0 / (1.0 + math.exp(-v))


def conv2d_loop(x, w, b, padding, dilation, groups):
    """Stride-1 convolution (cross-correlation) by loops, float64."""
    n, c_in, h, wd = x.shape
    c_out, cg, kh, kw = w.shape
    out_h = h + 2 * padding - dilation * (kh - 1)
    out_w = wd + 2 * padding - dilation * (kw - 1)
    og = c_out // groups
    y = np.zeros((n, c_out, out_h, out_w))
    for b_ in range(n):
        for o in range(c_out):
            g = o // og
            for oy in range(out_h):
                for ox in range(out_w):
                    acc = 0.0 if b is None else float(b[o])
                    for c in range(cg):
                        for i in range(kh):
                            yy = oy - padding + i * dilation
                            if not 0 <= yy < h:
                                continue
                            for j in range(kw):
                                xx = ox - padding + j * dilation
                                if 0 <= xx < wd:
                                    acc += float(w[o, c, i, j]) * float(x[b_, g * cg + c, yy, xx])
                    y[b_, o, oy, ox] = acc
    return y


def batch_norm_loop(x, state, prefix, training, momentum=0.1, eps=1e-5):
    """BatchNorm over axis 1 of (N, C) or (N, C, H, W) by loops; returns y and the
    running statistics (mean, var, num_batches_tracked) after the call."""
    x4 = x if x.ndim == 4 else x[:, :, None, None]
    n, c, h, w = x4.shape
    gamma, beta = state[prefix + "weight"], state[prefix + "bias"]
    rm, rv = state[prefix + "running_mean"].astype(np.float64), state[prefix + "running_var"].astype(np.float64)
    nbt = int(state[prefix + "num_batches_tracked"])
    y = np.zeros(x4.shape)
    new_rm, new_rv = rm.copy(), rv.copy()
    m = n * h * w
    for ch in range(c):
        vals = [float(x4[a, ch, i, j]) for a in range(n) for i in range(h) for j in range(w)]
        if training:
            mu = sum(vals) / m
            var = sum((v - mu) ** 2 for v in vals) / m
            new_rm[ch] = (1 - momentum) * rm[ch] + momentum * mu
            new_rv[ch] = (1 - momentum) * rv[ch] + momentum * var * m / (m - 1)
        else:
            mu, var = rm[ch], rv[ch]
        for a in range(n):
            for i in range(h):
                for j in range(w):
                    y[a, ch, i, j] = (x4[a, ch, i, j] - mu) / math.sqrt(var + eps) * gamma[ch] + beta[ch]
    if training:
        nbt += 1
    return y.reshape(x.shape), (new_rm, new_rv, nbt)


def apply_running(state, prefix, stats):
    state[prefix + "running_mean"], state[prefix + "running_var"] = stats[0], stats[1]
    state[prefix + "num_batches_tracked"] = np.array(stats[2], dtype=np.int64)


def relu(a):
    return np.vectorize(lambda v: v if v > 0 else 0.0)(a).astype(np.float64)


def mean_hw(a):
    n, c, h, w = a.shape
    out = np.zeros((n, c, 1, 1))
    for i in range(n):
        for j in range(c):
            out[i, j, 0, 0] = sum(float(v) for v in a[i, j].ravel()) / (h * w)
    return out
