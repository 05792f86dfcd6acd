"""MindSpore's ``ops.deformable_conv2d`` on npattn's deform fixtures, and
``nn.MultiheadAttention`` (torch's API, keys and masks: no adapter) on the
MultiheadAttention fixtures, in float32 and float64.

    python tools/conformance/mindspore.py [--out build/conformance]

MindSpore packs the offsets and the mask into one tensor, [all x | all y | all masks],
group-major (``npattn.layouts.mindspore_pack_offset_mask``); the op is always modulated,
so a DCNv1 case runs with a mask of ones (and its mask gradient is not compared). Its
gradient with respect to the packed tensor unpacks to the offset's and the mask's with
``npattn.layouts.mindspore_unpack_offset_mask``. Gradients: ``mindspore.grad`` of
``sum(y * grad_output)``. MindSpore's op takes float16 and float32 only. mmcv's layers with
their own offset convolution (``*_pack``) are composed from ``ops.conv2d``, ``ops.sigmoid``
and the deformable convolution.
"""

from __future__ import annotations

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import conformance_lib as C  # noqa: E402

C.drop_own_dir(__file__)

from npattn import layouts  # noqa: E402


def versions():
    import mindspore

    return {"mindspore": mindspore.__version__}


def deform(case):
    import mindspore as ms
    import numpy as np
    from mindspore import ops

    x, offset, weight, bias, mask, geo = C.deform_arrays(case)
    taps = weight.shape[2] * weight.shape[3]
    packed = layouts.mindspore_pack_offset_mask(offset, mask, taps=taps)
    (sh, sw), (ph, pw), (dh, dw) = geo["stride"], geo["padding"], geo["dilation"]
    dy = ms.Tensor(case.arrays["grad_output"])

    def f(x, w, p, *b):
        # the framework call
        return ops.deformable_conv2d(
            x, w, p, tuple(weight.shape[2:]), (1, 1, sh, sw), (ph, ph, pw, pw), bias=b[0] if b else None,
            dilations=(1, 1, dh, dw), groups=geo["groups"], deformable_groups=geo["offset_groups"], modulated=True,
        )

    args = [ms.Tensor(v) for v in (x, weight, packed, bias) if v is not None]
    y = f(*args)
    grads = ms.grad(lambda *a: (f(*a) * dy).sum(), grad_position=tuple(range(len(args))))(*args)
    d_offset, d_mask = layouts.mindspore_unpack_offset_mask(grads[2].asnumpy(), taps=taps)
    keys = C.deform_result_keys(case)
    out = {"output": y.asnumpy(), keys["input"]: grads[0].asnumpy(), keys["weight"]: grads[1].asnumpy(), keys["offset"]: d_offset}
    if mask is not None:
        out[keys["mask"]] = d_mask
    if bias is not None:
        out[keys["bias"]] = grads[3].asnumpy()
    return {k: np.asarray(v) for k, v in out.items()}


def pack(case):
    """mmcv's DeformConv2dPack / ModulatedDeformConv2dPack: the offset convolution
    (``ops.conv2d``), offset = its first 2 G K channels and (modulated) mask = sigmoid of
    the last G K, packed for the deformable convolution; DeformConv2dPack, which has no
    mask, runs with a mask of ones."""
    import mindspore as ms
    import numpy as np
    from mindspore import ops

    cfg, a = case.meta["config"], case.arrays
    state = case.state_dict()
    names = list(state)
    modulated = case.meta["block"] == "ModulatedDeformConv2dPack"
    kh, kw = state["weight"].shape[2:]
    g = cfg.get("deform_groups", 1)
    gk = g * kh * kw

    def pair(name, default):
        v = cfg.get(name, default)
        return (v, v) if isinstance(v, int) else tuple(v)

    (sh, sw), (ph, pw), (dh, dw) = pair("stride", 1), pair("padding", 0), pair("dilation", 1)
    # torchvision's offset channel order (dy, dx per tap) -> MindSpore's packed [x | y | mask]
    # is a fixed permutation: the packing adapter applied to channel indices gives it
    index = np.arange(3 * gk, dtype=np.float64).reshape(1, 3 * gk, 1, 1)
    order = layouts.mindspore_pack_offset_mask(index[:, : 2 * gk], index[:, 2 * gk :], taps=kh * kw)[0, :, 0, 0].astype(np.int64)
    order = ms.Tensor(order)

    def f(x, *params):
        p = dict(zip(names, params))
        t = ops.conv2d(x, p["conv_offset.weight"], p["conv_offset.bias"], stride=(sh, sw), pad_mode="pad",
                       padding=(ph, pw), dilation=(dh, dw))
        if modulated:
            t = ops.concat([t[:, : 2 * gk], ops.sigmoid(t[:, 2 * gk :])], axis=1)
        else:
            t = ops.concat([t, ops.ones_like(t[:, :gk])], axis=1)
        packed = ops.gather(t, order, 1)
        # the framework call
        return ops.deformable_conv2d(
            x, p["weight"], packed, (kh, kw), (1, 1, sh, sw), (ph, ph, pw, pw), bias=p.get("bias"),
            dilations=(1, 1, dh, dw), groups=cfg.get("groups", 1), deformable_groups=g, modulated=True,
        )

    args = [ms.Tensor(a["input.x"])] + [ms.Tensor(state[k]) for k in names]
    dy = ms.Tensor(a["grad_output"])
    y = f(*args)
    grads = ms.grad(lambda *t: (f(*t) * dy).sum(), grad_position=tuple(range(len(args))))(*args)
    return {"output": y.asnumpy(), "grad.input.x": grads[0].asnumpy()} | {f"grad.param.{k}": gr.asnumpy() for k, gr in zip(names, grads[1:])}


def mha(case):
    """``mindspore.nn.MultiheadAttention``: torch's API, state_dict keys and masks, so the
    fixture's arrays go in as they are."""
    import mindspore as ms
    import numpy as np

    cfg, a, state = case.meta["config"], case.arrays, case.state_dict()
    dtype = ms.float64 if a["input.query"].dtype == np.float64 else ms.float32
    layer = ms.nn.MultiheadAttention(cfg["embed_dim"], cfg["num_heads"], has_bias=cfg.get("bias", True), kdim=cfg.get("kdim"),
                                     vdim=cfg.get("vdim"), batch_first=cfg.get("batch_first", False), dtype=dtype)
    params = {n: p for n, p in layer.parameters_and_names()}
    for n, p in params.items():
        p.set_data(ms.Tensor(state[n]))
    masks = {n: ms.Tensor(a[f"input.{n}"]) for n in ("key_padding_mask", "attn_mask") if f"input.{n}" in a}
    qkv = [ms.Tensor(a[f"input.{n}"]) for n in ("query", "key", "value")]
    dy = ms.Tensor(a["grad_output"])

    def f(q, k, v):
        # the framework call
        return layer(q, k, v, need_weights=False, **masks)[0]

    y = f(*qkv)
    d_in, d_w = ms.grad(lambda *t: (f(*t) * dy).sum(), grad_position=(0, 1, 2), weights=list(params.values()))(*qkv)
    out = {"output": y.asnumpy()} | {f"grad.input.{n}": g.asnumpy() for n, g in zip(("query", "key", "value"), d_in)}
    return out | {f"grad.param.{n}": g.asnumpy() for n, g in zip(params, d_w)}


def cases(runner):
    for case_id, case in runner.cases("deform_conv2d", "deform_conv2d_block"):
        if case.meta["dtype"] != "float32":
            runner.skip(case_id, "float64: MindSpore's DeformableOffsets takes float16 or float32 only (TypeError for float64)")
            continue
        runner.run(case_id, lambda: deform(case))
    for case_id, case in runner.cases("deform_conv2d_pack", "modulated_deform_conv2d_pack"):
        if case.meta["dtype"] != "float32":
            runner.skip(case_id, "float64: MindSpore's DeformableOffsets takes float16 or float32 only (TypeError for float64)")
            continue
        runner.run(case_id, lambda: pack(case), note="offset convolution with ops.conv2d")
    for case_id, case in runner.cases("multihead_attention"):
        runner.run(case_id, lambda: mha(case), note="mindspore.nn.MultiheadAttention")


if __name__ == "__main__":
    sys.exit(C.main("mindspore", versions, cases))
