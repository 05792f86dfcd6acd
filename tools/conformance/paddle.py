"""PaddlePaddle's ``paddle.vision.ops.deform_conv2d`` on npattn's deform fixtures.

    python tools/conformance/paddle.py [--out build/conformance]

Paddle takes torchvision's layouts (NCHW, offset channels (dy, dx) per tap, mask per
tap) and states groups and deformable groups as arguments, read from the case. mmcv's
layers with their own offset convolution (``*_pack``) are composed from
``paddle.nn.functional.conv2d`` and the deformable convolution. Float64
runs in float64 on the CPU. Gradients: ``paddle.grad`` of ``sum(y * grad_output)``.
"""

from __future__ import annotations

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import conformance_lib as C  # noqa: E402

C.drop_own_dir(__file__)


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


def cases(runner):
    for case_id, case in runner.cases("deform_conv2d", "deform_conv2d_block"):
        runner.run(case_id, lambda: deform(case))
    for case_id, case in runner.cases("deform_conv2d_pack", "modulated_deform_conv2d_pack"):
        runner.run(case_id, lambda: pack(case), note="offset convolution with paddle.nn.functional.conv2d")


if __name__ == "__main__":
    sys.exit(C.main("paddle", versions, cases))
