"""OpenVINO's DeformableConvolution-8 (Python opset API) on npattn's deform fixtures, and
its ScaledDotProductAttention-13 on the SDPA fixtures.

    python tools/conformance/openvino.py [--out build/conformance]

OpenVINO takes torchvision's layouts (NCHW, offset channels (dy, dx) per tap, mask per
tap), with ``group`` and ``deformable_group`` attributes read from the case; mmcv's
layers with their own offset convolution (``*_pack``) are composed from the opset's
convolution, split and sigmoid. It has no
training graph, so only the output is compared. Every case runs twice:

- ``openvino`` with ``bilinear_interpolation_pad=True``: torchvision's sampling;
- ``openvino_pad_false`` with the default ``bilinear_interpolation_pad=False``, which is
  asymmetric (samples at -1 < p < 0 give 0, samples at W - 1 < p < W are clamped to
  x[W - 1]; see tools/conformance/repro_openvino_pad_false.py).

Float64 models are built in float64 and run by the CPU plugin in float32. Every model is
compiled with ``INFERENCE_PRECISION_HINT=f32``: on a CPU with bfloat16 support the CPU
plugin's default is bf16, and the offset convolution of the ``*_pack`` layers then errs by
about 5e-3 (the runner records the default hint in its versions).
"""

from __future__ import annotations

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import conformance_lib as C  # noqa: E402

C.drop_own_dir(__file__)


F32 = {"INFERENCE_PRECISION_HINT": "f32"}


def versions():
    import openvino

    default = openvino.Core().get_property("CPU", "INFERENCE_PRECISION_HINT")
    return {"openvino": openvino.__version__.split("-")[0],
            "inference precision": f"f32 (the CPU plugin's default here: {default.get_type_name()})"}


def deform(case, pad):
    import numpy as np
    import openvino as ov
    import openvino.opset8 as ops

    x, offset, weight, bias, mask, geo = C.deform_arrays(case)
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
    compiled = ov.Core().compile_model(model, "CPU", F32)
    out = compiled([inputs[k] for k in params])[0]
    return {"output": np.asarray(out)}


def pack(case, pad):
    """mmcv's DeformConv2dPack / ModulatedDeformConv2dPack: the offset convolution
    (``opset8.convolution`` plus its bias), then for the modulated layer offset = the
    first 2 G K channels and mask = sigmoid(the last G K), then the deformable convolution."""
    import numpy as np
    import openvino as ov
    import openvino.opset8 as ops

    cfg, state, x = case.meta["config"], case.state_dict(), case.arrays["input.x"]

    def pair(name, default):
        v = cfg.get(name, default)
        return [v, v] if isinstance(v, int) else list(v)

    stride, pad_hw, dilation = pair("stride", 1), pair("padding", 0), pair("dilation", 1)
    data = ops.parameter(x.shape, x.dtype, name="x")
    t = ops.convolution(data, ops.constant(state["conv_offset.weight"]), stride, pad_hw, pad_hw, dilation)
    t = ops.add(t, ops.constant(state["conv_offset.bias"].reshape(1, -1, 1, 1)))
    gk = cfg.get("deform_groups", 1) * state["weight"].shape[2] * state["weight"].shape[3]
    mask = None
    offset = t
    if case.meta["block"] == "ModulatedDeformConv2dPack":
        parts = ops.variadic_split(t, ops.constant(np.int64(1)), ops.constant(np.array([2 * gk, gk], dtype=np.int64)))
        offset, mask = parts.output(0), ops.sigmoid(parts.output(1))
    # the framework call
    y = ops.deformable_convolution(
        data, offset, ops.constant(state["weight"]), stride, pad_hw, pad_hw, dilation, mask=mask,
        group=cfg.get("groups", 1), deformable_group=cfg.get("deform_groups", 1), bilinear_interpolation_pad=pad,
    )
    if "bias" in state:
        y = ops.add(y, ops.constant(state["bias"].reshape(1, -1, 1, 1)))
    compiled = ov.Core().compile_model(ov.Model([y], [data]), "CPU", F32)
    return {"output": np.asarray(compiled([x])[0])}


def sdpa(case):
    """``opset13.scaled_dot_product_attention`` (torch's semantics: boolean mask True =
    attend, float mask added, optional scale), inputs as given."""
    import numpy as np
    import openvino as ov
    import openvino.opset13 as ops13

    a, cfg = case.arrays, case.meta["config"]
    names = [n for n in ("q", "k", "v", "attn_mask") if f"input.{n}" in a]
    params = [ops13.parameter(a[f"input.{n}"].shape, a[f"input.{n}"].dtype, name=n) for n in names]
    scale = ops13.constant(np.array(cfg["scale"], dtype=a["input.q"].dtype)) if "scale" in cfg else None
    mask = params[3] if len(params) > 3 else None
    if mask is None and scale is not None:  # the scale is the fifth input: an explicit zero mask before it
        mask = ops13.constant(np.array(0, dtype=a["input.q"].dtype))
    # the framework call
    y = ops13.scaled_dot_product_attention(params[0], params[1], params[2], mask, scale)
    compiled = ov.Core().compile_model(ov.Model([y], params), "CPU", F32)
    return {"output": np.asarray(compiled([a[f"input.{n}"] for n in names])[0])}


def cases(runner):
    default = C.Runner("openvino_pad_false", runner.versions, runner.out, runner.golden_dir)
    for case_id, case in runner.cases("deform_conv2d", "deform_conv2d_block"):
        runner.run(case_id, lambda: deform(case, True), note="bilinear_interpolation_pad=True; forward only")
        default.run(case_id, lambda: deform(case, False), note="bilinear_interpolation_pad=False (default); forward only")
    for case_id, case in runner.cases("deform_conv2d_pack", "modulated_deform_conv2d_pack"):
        runner.run(case_id, lambda: pack(case, True), note="offset convolution with opset8.convolution; pad=True; forward only")
        default.run(case_id, lambda: pack(case, False), note="offset convolution with opset8.convolution; pad=False; forward only")
    for case_id, case in runner.cases("scaled_dot_product_attention"):
        variant = C.sdpa_variant(case)
        if variant:
            runner.skip(case_id, f"uses {variant}: this runner composes only a mask and a scale", status="not run")
            continue
        runner.run(case_id, lambda: sdpa(case), note="opset13.scaled_dot_product_attention; forward only")
    if default.finish():
        runner.crashed.append("openvino_pad_false")


if __name__ == "__main__":
    sys.exit(C.main("openvino", versions, cases))
