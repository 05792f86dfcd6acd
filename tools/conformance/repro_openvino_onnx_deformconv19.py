"""OpenVINO's ONNX importer cannot read a DeformConv-19 node; the workaround builds the
same node with OpenVINO's opset API.

    python tools/conformance/repro_openvino_onnx_deformconv19.py      (needs openvino, onnx)

npattn exports a deform case as one ONNX DeformConv node (``npattn export CASE DIR
--format onnx``). ``openvino.Core().read_model`` refuses it ("No conversion rule found
for operations: DeformConv-19"). OpenVINO's own ONNX-domain deformable op fixes
bilinear_interpolation_pad=False, the asymmetric border of
repro_openvino_pad_false.py, so torchvision's semantics cannot go through ONNX to
OpenVINO at all. The workaround reads the node's attributes and inputs with ``onnx``
and builds ``opset8.deformable_convolution(..., bilinear_interpolation_pad=True)``
(plus the bias) directly; its output matches the exported expected output.
"""

import pathlib
import sys

# this folder's runners (openvino.py) would shadow the packages
sys.path[:] = [p for p in sys.path if pathlib.Path(p or ".").resolve() != pathlib.Path(__file__).resolve().parent]
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))  # npattn from this checkout

import tempfile  # noqa: E402

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import openvino as ov  # noqa: E402
import openvino.opset8 as ops  # noqa: E402
from onnx import numpy_helper  # noqa: E402

from npattn.onnx_export import export_onnx  # noqa: E402

CASE = "deform_conv2d/v2_groups2_offgroups2_eval_f32"
print(f"openvino {ov.__version__.split('-')[0]}, onnx {onnx.__version__}, case {CASE}")
with tempfile.TemporaryDirectory() as tmp:
    export_onnx(CASE, tmp)
    model_path = pathlib.Path(tmp) / "model.onnx"
    try:
        ov.Core().read_model(str(model_path))
        print("read_model: read the DeformConv-19 model (the importer has learnt it)")
    except Exception as exc:  # noqa: BLE001 - the message is the finding
        first = next((line for line in str(exc).splitlines() if "DeformConv" in line), str(exc).splitlines()[0])
        print(f"read_model: {type(exc).__name__}: {first.strip()}")

    # the workaround: the ONNX node through the opset API
    model = onnx.load(str(model_path))
    node = model.graph.node[0]
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    data_dir = pathlib.Path(tmp) / "test_data_set_0"
    arrays = [numpy_helper.to_array(onnx.load_tensor(str(p))) for p in sorted(data_dir.glob("input_*.pb"))]
    named = dict(zip([n for n in node.input if n], arrays))            # X, W, offset, B, mask
    expected = numpy_helper.to_array(onnx.load_tensor(str(data_dir / "output_0.pb")))
    kh, kw = attrs["kernel_shape"]
    pads = attrs.get("pads", [0, 0, 0, 0])
    params = [ops.parameter(named[n].shape, named[n].dtype, name=n) for n in ("X", "offset", "mask") if n in named]
    by_name = {p.get_friendly_name(): p for p in params}
    y = ops.deformable_convolution(
        by_name["X"], by_name["offset"], ops.constant(named["W"]), attrs.get("strides", [1, 1]), pads[:2], pads[2:],
        attrs.get("dilations", [1, 1]), mask=by_name.get("mask"), group=attrs.get("group", 1),
        deformable_group=attrs.get("offset_group", 1), bilinear_interpolation_pad=True,
    )
    if "B" in named:
        y = ops.add(y, ops.constant(named["B"].reshape(1, -1, 1, 1)))
    compiled = ov.Core().compile_model(ov.Model([y], params), "CPU")
    got = compiled([named[p.get_friendly_name()] for p in params])[0]
    err = float(np.max(np.abs(got - expected)) / np.max(np.abs(expected)))
    print(f"workaround (opset8.deformable_convolution, bilinear_interpolation_pad=True): rel err {err:.2e} against the exported output")

# OpenVINO's own ONNX-domain op (org.openvinotoolkit DeformableConv2D) reads, but samples
# with pad=False: on the row [1, 2, 3] with p_x = -0.5, 1.0, 2.5 torchvision gives 0.5, 2, 1.5
x = np.array([[[[1.0, 2.0, 3.0]]]], dtype=np.float32)
w = np.ones((1, 1, 1, 1), dtype=np.float32)
off = np.zeros((1, 2, 1, 3), dtype=np.float32)
off[0, 1, 0, :] = [-0.5, 0.0, 0.5]
h = onnx.helper
node = h.make_node("DeformableConv2D", ["X", "offset", "W"], ["Y"], domain="org.openvinotoolkit",
                   strides=[1, 1], pads=[0, 0, 0, 0], dilations=[1, 1], group=1, deformable_groups=1)
graph = h.make_graph([node], "ov_domain", [h.make_tensor_value_info(n, onnx.TensorProto.FLOAT, list(a.shape)) for n, a in
                                           (("X", x), ("offset", off), ("W", w))],
                     [h.make_tensor_value_info("Y", onnx.TensorProto.FLOAT, [1, 1, 1, 3])])
ov_model = h.make_model(graph, opset_imports=[h.make_opsetid("", 19), h.make_opsetid("org.openvinotoolkit", 1)])
with tempfile.TemporaryDirectory() as tmp:
    onnx.save(ov_model, str(pathlib.Path(tmp) / "ov.onnx"))
    got = ov.Core().compile_model(ov.Core().read_model(str(pathlib.Path(tmp) / "ov.onnx")), "CPU")([x, off, w])[0]
print(f"org.openvinotoolkit DeformableConv2D at p_x = -0.5, 1.0, 2.5: {got[0, 0, 0].tolist()} (torchvision: [0.5, 2.0, 1.5])")
