"""PaddlePaddle's ``paddle.vision.ops.deform_conv2d`` on npattn's deform fixtures.

    python tools/conformance/paddle.py [--out build/conformance]

Paddle takes torchvision's layouts (NCHW, offset channels (dy, dx) per tap, mask per
tap) and states groups and deformable groups as arguments, read from the case. Float64
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

    x, offset, weight, bias, mask, geo, _ = C.deform_arrays(case)
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


def cases(runner):
    for case_id, case in runner.cases("deform_conv2d", "deform_conv2d_block"):
        runner.run(case_id, lambda: deform(case))
    for case_id, _ in runner.cases("deform_conv2d_pack", "modulated_deform_conv2d_pack"):
        runner.skip(case_id, "a layer with its own offset convolution: not composed by this runner (the deform op is covered by the cases above)")


if __name__ == "__main__":
    sys.exit(C.main("paddle", versions, cases))
