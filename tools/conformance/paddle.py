"""PaddlePaddle's ``paddle.vision.ops.deform_conv2d`` on npattn's deform fixtures, and
``paddle.nn.MultiHeadAttention`` on the MultiheadAttention fixtures.

    python tools/conformance/paddle.py [--out build/conformance]

Paddle takes torchvision's layouts (NCHW, offset channels (dy, dx) per tap, mask per
tap) and states groups and deformable groups as arguments, read from the case. mmcv's
layers with their own offset convolution (``*_pack``) are composed from
``paddle.nn.functional.conv2d`` and the deformable convolution. MultiHeadAttention: see
``mha``; Paddle adds a boolean mask as (mask - 1) * 1e9 and a float one as it is. Float64
runs in float64 on the CPU. Gradients: ``paddle.grad`` of ``sum(y * grad_output)``.
"""

from __future__ import annotations

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import conformance_lib as C  # noqa: E402

C.drop_own_dir(__file__)

from npattn import layouts  # noqa: E402


def versions():
    import paddle

    return {"paddlepaddle": paddle.__version__}


def deform(case):
    import paddle

    x, offset, weight, bias, mask, geo = C.deform_arrays(case)
    named = {"input": x, "offset": offset, "weight": weight, "bias": bias, "mask": mask}
    t = {k: paddle.to_tensor(v, stop_gradient=False) for k, v in named.items() if v is not None}
    # the framework call
    y = paddle.vision.ops.deform_conv2d(
        t["input"], t["offset"], t["weight"], t.get("bias"), stride=geo["stride"], padding=geo["padding"],
        dilation=geo["dilation"], deformable_groups=geo["offset_groups"], groups=geo["groups"], mask=t.get("mask"),
    )
    dy = paddle.to_tensor(case.arrays["grad_output"])
    grads = paddle.grad([(y * dy).sum()], list(t.values()))
    keys = C.deform_result_keys(case)
    return {"output": y.numpy()} | {keys[n]: g.numpy() for n, g in zip(t, grads)}


def pack(case):
    """mmcv's DeformConv2dPack / ModulatedDeformConv2dPack: the offset convolution
    (``paddle.nn.functional.conv2d``), then for the modulated layer offset = the first
    2 G K channels and mask = sigmoid(the last G K), then the deformable convolution."""
    import paddle

    cfg, a = case.meta["config"], case.arrays
    modulated = case.meta["block"] == "ModulatedDeformConv2dPack"
    state = {k: paddle.to_tensor(v, stop_gradient=False) for k, v in case.state_dict().items()}
    x = paddle.to_tensor(a["input.x"], stop_gradient=False)
    geo = {k: cfg.get(k, d) for k, d in (("stride", 1), ("padding", 0), ("dilation", 1))}
    t = paddle.nn.functional.conv2d(x, state["conv_offset.weight"], state["conv_offset.bias"], **geo)
    gk = cfg.get("deform_groups", 1) * state["weight"].shape[2] * state["weight"].shape[3]
    offset, mask = (t[:, : 2 * gk], paddle.nn.functional.sigmoid(t[:, 2 * gk :])) if modulated else (t, None)
    # the framework call
    y = paddle.vision.ops.deform_conv2d(
        x, offset, state["weight"], state.get("bias"), deformable_groups=cfg.get("deform_groups", 1),
        groups=cfg.get("groups", 1), mask=mask, **geo,
    )
    grads = paddle.grad([(y * paddle.to_tensor(a["grad_output"])).sum()], [x] + list(state.values()))
    return {"output": y.numpy(), "grad.input.x": grads[0].numpy()} | {f"grad.param.{k}": g.numpy() for k, g in zip(state, grads[1:])}


def mha(case):
    """torch MultiheadAttention as ``paddle.nn.MultiHeadAttention``: batch-first tokens
    (``layouts.seq_first_to_batch_first``), Linear weights as Paddle's (in, out) kernels
    (``layouts.linear_to_dense``), torch's two masks as one (B, H, L, S) mask
    (``layouts.torch_mha_mask_to_bhls``)."""
    import numpy as np
    import paddle

    cfg, a, state = case.meta["config"], case.arrays, case.state_dict()
    heads, e = cfg["num_heads"], cfg["embed_dim"]
    seq_first = not cfg.get("batch_first", False)
    to_b = layouts.seq_first_to_batch_first if seq_first else (lambda t: t)
    from_b = layouts.batch_first_to_seq_first if seq_first else (lambda t: t)
    q, k, v = (to_b(a[f"input.{n}"]) for n in ("query", "key", "value"))
    mask = layouts.torch_mha_mask_to_bhls(a.get("input.key_padding_mask"), a.get("input.attn_mask"), batch=q.shape[0],
                                          num_heads=heads, tgt_len=q.shape[1], src_len=k.shape[1])
    separate = "in_proj_weight" not in state
    w = [state[f"{n}_proj_weight"] for n in "qkv"] if separate else np.split(state["in_proj_weight"], 3)
    bias = "in_proj_bias" in state
    b = np.split(state["in_proj_bias"], 3) if bias else [None] * 3
    paddle.set_default_dtype(str(q.dtype))
    layer = paddle.nn.MultiHeadAttention(e, heads, kdim=k.shape[-1], vdim=v.shape[-1], bias_attr=None if bias else False)
    values = {"q_proj.weight": layouts.linear_to_dense(w[0]), "k_proj.weight": layouts.linear_to_dense(w[1]),
              "v_proj.weight": layouts.linear_to_dense(w[2]), "out_proj.weight": layouts.linear_to_dense(state["out_proj.weight"])}
    if bias:
        values |= {"q_proj.bias": b[0], "k_proj.bias": b[1], "v_proj.bias": b[2], "out_proj.bias": state["out_proj.bias"]}
    layer.set_state_dict({n: paddle.to_tensor(values[n]) for n, _ in layer.named_parameters()})
    tq, tk, tv = (paddle.to_tensor(t, stop_gradient=False) for t in (q, k, v))
    # the framework call
    y = layer(tq, tk, tv, attn_mask=None if mask is None else paddle.to_tensor(mask))
    params = dict(layer.named_parameters())
    grads = paddle.grad([(y * paddle.to_tensor(to_b(a["grad_output"]))).sum()], [tq, tk, tv] + list(params.values()))
    g = {n: layouts.dense_to_linear(t.numpy()) if n.endswith("weight") else t.numpy() for n, t in zip(params, grads[3:])}
    out = {"output": from_b(y.numpy())}
    out |= {f"grad.input.{n}": from_b(t.numpy()) for n, t in zip(("query", "key", "value"), grads[:3])}
    dw = [g["q_proj.weight"], g["k_proj.weight"], g["v_proj.weight"]]
    if separate:
        out |= {f"grad.param.{n}_proj_weight": d for n, d in zip("qkv", dw)}
    else:
        out["grad.param.in_proj_weight"] = np.concatenate(dw)
    if bias:
        out["grad.param.in_proj_bias"] = np.concatenate([g["q_proj.bias"], g["k_proj.bias"], g["v_proj.bias"]])
        out["grad.param.out_proj.bias"] = g["out_proj.bias"]
    out["grad.param.out_proj.weight"] = g["out_proj.weight"]
    return out


def cases(runner):
    for case_id, case in runner.cases("deform_conv2d", "deform_conv2d_block"):
        runner.run(case_id, lambda: deform(case))
    for case_id, case in runner.cases("deform_conv2d_pack", "modulated_deform_conv2d_pack"):
        runner.run(case_id, lambda: pack(case), note="offset convolution with paddle.nn.functional.conv2d")
    for case_id, case in runner.cases("multihead_attention"):
        runner.run(case_id, lambda: mha(case), note="paddle.nn.MultiHeadAttention")


if __name__ == "__main__":
    sys.exit(C.main("paddle", versions, cases))
