"""A golden case as an ONNX node test: ``npattn export CASE DIR --format onnx``.

The directory gets the layout of ONNX's own backend node tests (``onnx/backend/test/data/
node/*``), so any ONNX backend can be checked with ONNX's test runner or a few lines of
code::

    DIR/model.onnx                      one DeformConv node (opset 19)
    DIR/test_data_set_0/input_0.pb ...  the node's inputs in order (TensorProto)
    DIR/test_data_set_0/output_0.pb     npattn's output (the fixture's "output")

Which cases: those whose forward is exactly one ONNX DeformConv, i.e. the
``deform_conv2d`` function cases (inputs X = input, W = weight, offset, B = bias, mask)
and the ``DeformConv2d`` block cases (W and B from the state_dict). ONNX's DeformConv has
torchvision's layout and numbers; the offset-gradient convention (``border_grad``) does
not enter (ONNX runs the forward only). Other cases raise :class:`npattn.golden.GoldenError`
saying why (mmcv's packs are a convolution followed by DeformConv, the seed's
ConvOffset2D samples with border clamping, which no ONNX operator does).

``onnx`` is imported only when this module's functions run; without it they raise
``GoldenError`` with the install command.
"""

from __future__ import annotations

import pathlib

import numpy as np

from . import golden

__all__ = ["OPSET", "build_node_test", "export_onnx"]

OPSET = 19  # DeformConv's first version
IR_VERSION = 9  # the IR of opset 19


def _onnx():
    try:
        import onnx
    except ImportError as exc:
        raise golden.GoldenError(
            "ONNX export needs the onnx package (pip install 'npattn[onnx]' or pip install onnx)"
        ) from exc
    return onnx


def _pairs(value):
    return (int(value), int(value)) if isinstance(value, (int, np.integer)) else (int(value[0]), int(value[1]))


def node_arrays(case: golden.Case):
    """``(ordered {ONNX input name: array}, attributes)`` of a case's DeformConv node."""
    meta = case.meta
    cfg = meta["config"]
    if meta["block"] == "deform_conv2d" and meta["kind"] == "function":
        a = case.inputs()
        stride, padding, dilation = (_pairs(cfg.get(k, d)) for k, d in (("stride", 1), ("padding", 0), ("dilation", 1)))
        data = {"X": a["input"], "W": a["weight"], "offset": a["offset"], "B": a.get("bias"), "mask": a.get("mask")}
    elif meta["block"] == "DeformConv2d" and meta["kind"] == "block":
        a, state = case.inputs(), case.state_dict()
        stride, padding, dilation = (_pairs(cfg.get(k, d)) for k, d in (("stride", 1), ("padding", 0), ("dilation", 1)))
        data = {"X": a["x"], "W": state["weight"], "offset": a["offset"], "B": state.get("bias"), "mask": a.get("mask")}
    else:
        why = {
            "ModulatedDeformConv2dPack": "mmcv's layer is a Conv, a Sigmoid and a DeformConv, not one DeformConv node",
            "DeformConv2dPack": "mmcv's layer is a Conv followed by a DeformConv, not one DeformConv node",
            "ConvOffset2D": "the seed's layer samples with border clamping (per-channel offsets), which no ONNX operator does",
            "batch_map_offsets": "the seed's clamped sampling has no ONNX operator",
        }.get(meta["block"], "it is not a deformable convolution")
        raise golden.GoldenError(
            f"case '{case.case_id}' cannot be exported as an ONNX node test: {why}; "
            "the deform_conv2d and DeformConv2d cases can"
        )
    weight, offset = data["W"], data["offset"]
    kh, kw = weight.shape[2:]
    attributes = {
        "kernel_shape": [kh, kw],
        "strides": list(stride),
        "pads": [padding[0], padding[1], padding[0], padding[1]],  # (begin_h, begin_w, end_h, end_w)
        "dilations": list(dilation),
        "group": int(data["X"].shape[1] // weight.shape[1]),
        "offset_group": int(offset.shape[1] // (2 * kh * kw)),
    }
    return data, attributes


def build_node_test(data: dict, attributes: dict, output: np.ndarray, name: str = "npattn_deform_conv"):
    """The ModelProto of one DeformConv node over ``data`` (ONNX input name -> array or
    None for an absent optional input) and the TensorProtos of its inputs and output:
    ``(model, [input TensorProto ...], output TensorProto)``."""
    onnx = _onnx()
    from onnx import helper, numpy_helper

    elem = helper.np_dtype_to_tensor_dtype(np.dtype(output.dtype))
    node_inputs, graph_inputs, tensors = [], [], []
    last = max(i for i, k in enumerate(data) if data[k] is not None)
    for i, (key, value) in enumerate(data.items()):
        if i > last:
            break
        if value is None:
            node_inputs.append("")  # an absent optional input before a present one
            continue
        node_inputs.append(key)
        graph_inputs.append(helper.make_tensor_value_info(key, elem, list(value.shape)))
        tensors.append(numpy_helper.from_array(np.ascontiguousarray(value), key))
    node = helper.make_node("DeformConv", node_inputs, ["Y"], **attributes)
    graph = helper.make_graph([node], name, graph_inputs, [helper.make_tensor_value_info("Y", elem, list(output.shape))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="npattn", ir_version=IR_VERSION)
    onnx.checker.check_model(model, full_check=True)
    return model, tensors, numpy_helper.from_array(np.ascontiguousarray(output), "Y")


def export_onnx(case_id: str, out_dir, golden_dir=None, *, force=False) -> list:
    """Write ``model.onnx`` and ``test_data_set_0/{input_*.pb, output_0.pb}`` for a case;
    returns the paths written. Raises :class:`npattn.golden.GoldenError` when the case is
    not one DeformConv node, onnx is not installed, or (unless ``force``) one of the files
    is already there."""
    _onnx()  # the install hint before anything else
    case = golden.load(case_id, golden_dir)
    data, attributes = node_arrays(case)
    model, inputs, output = build_node_test(data, attributes, case.arrays["output"], name=case_id.replace("/", "_"))
    out_dir = pathlib.Path(out_dir)
    data_dir = out_dir / "test_data_set_0"
    golden.refuse_overwrite(
        [out_dir / "model.onnx", data_dir / "output_0.pb"] + [data_dir / f"input_{i}.pb" for i in range(len(inputs))], force
    )
    data_dir.mkdir(parents=True, exist_ok=True)
    written = [out_dir / "model.onnx"]
    written[0].write_bytes(model.SerializeToString())
    for i, tensor in enumerate(inputs):
        p = data_dir / f"input_{i}.pb"
        p.write_bytes(tensor.SerializeToString())
        written.append(p)
    p = data_dir / "output_0.pb"
    p.write_bytes(output.SerializeToString())
    written.append(p)
    return written
