"""OpenVINO's DeformableConvolution-8 (Python opset API) on npattn's deform fixtures.

    python tools/conformance/openvino.py [--out build/conformance]

OpenVINO takes torchvision's layouts (NCHW, offset channels (dy, dx) per tap, mask per
tap), with ``group`` and ``deformable_group`` attributes read from the case. It has no
training graph, so only the output is compared. Every case runs twice:

- ``openvino`` with ``bilinear_interpolation_pad=True``: torchvision's sampling;
- ``openvino_pad_false`` with the default ``bilinear_interpolation_pad=False``, which is
  asymmetric (samples at -1 < p < 0 give 0, samples at W - 1 < p < W are clamped to
  x[W - 1]; see tools/conformance/repro_openvino_pad_false.py).

Float64 models are built in float64 and run by the CPU plugin in float32.
"""

from __future__ import annotations

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import conformance_lib as C  # noqa: E402

C.drop_own_dir(__file__)


def versions():
    import openvino

    return {"openvino": openvino.__version__.split("-")[0]}


def deform(case, pad):
    import numpy as np
    import openvino as ov
    import openvino.opset8 as ops

    x, offset, weight, bias, mask, geo, _ = C.deform_arrays(case)
    inputs = {"input": x, "offset": offset} | ({"mask": mask} if mask is not None else {})
    params = {k: ops.parameter(v.shape, v.dtype, name=k) for k, v in inputs.items()}
    (sh, sw), (ph, pw), (dh, dw) = geo["stride"], geo["padding"], geo["dilation"]
    # the framework call
    y = ops.deformable_convolution(
        params["input"], params["offset"], ops.constant(weight), [sh, sw], [ph, pw], [ph, pw], [dh, dw],
        mask=params.get("mask"), group=geo["groups"], deformable_group=geo["offset_groups"],
        bilinear_interpolation_pad=pad,
    )
    if bias is not None:
        y = ops.add(y, ops.constant(bias.reshape(1, -1, 1, 1)))
    model = ov.Model([y], list(params.values()))
    compiled = ov.Core().compile_model(model, "CPU")
    out = compiled([inputs[k] for k in params])[0]
    return {"output": np.asarray(out)}


def cases(runner):
    default = C.Runner("openvino_pad_false", runner.versions, runner.out, runner.golden_dir)
    for case_id, case in runner.cases("deform_conv2d", "deform_conv2d_block"):
        runner.run(case_id, lambda: deform(case, True), note="bilinear_interpolation_pad=True; forward only")
        default.run(case_id, lambda: deform(case, False), note="bilinear_interpolation_pad=False (default); forward only")
    for case_id, _ in runner.cases("deform_conv2d_pack", "modulated_deform_conv2d_pack"):
        for r in (runner, default):
            r.skip(case_id, "a layer with its own offset convolution: not composed by this runner (the deform op is covered by the cases above)", "not run")
    if default.finish():
        runner.crashed.append("openvino_pad_false")


if __name__ == "__main__":
    sys.exit(C.main("openvino", versions, cases))
