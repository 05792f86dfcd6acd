"""MindSpore's ``ops.deformable_conv2d`` on npattn's deform fixtures.

    python tools/conformance/mindspore.py [--out build/conformance]

MindSpore packs the offsets and the mask into one tensor, [all x | all y | all masks],
group-major (``npattn.layouts.mindspore_pack_offset_mask``); the op is always modulated,
so a DCNv1 case runs with a mask of ones (and its mask gradient is not compared). Its
gradient with respect to the packed tensor unpacks to the offset's and the mask's with
``npattn.layouts.mindspore_unpack_offset_mask``. Gradients: ``mindspore.grad`` of
``sum(y * grad_output)``. MindSpore's op takes float16 and float32 only.
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

    x, offset, weight, bias, mask, geo, _ = C.deform_arrays(case)
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


def cases(runner):
    for case_id, case in runner.cases("deform_conv2d", "deform_conv2d_block"):
        if case.meta["dtype"] != "float32":
            runner.skip(case_id, "float64: MindSpore's DeformableOffsets takes float16 or float32 only (TypeError for float64)")
            continue
        runner.run(case_id, lambda: deform(case))
    for case_id, _ in runner.cases("deform_conv2d_pack", "modulated_deform_conv2d_pack"):
        runner.skip(case_id, "a layer with its own offset convolution: not composed by this runner (the deform op is covered by the cases above)", "not run")


if __name__ == "__main__":
    sys.exit(C.main("mindspore", versions, cases))
