"""OpenVINO's DeformableConvolution-8 with its default bilinear_interpolation_pad=False
treats the two borders differently.

    python tools/conformance/repro_openvino_pad_false.py      (needs openvino)

One channel, one row [1, 2, 3], a 1x1 kernel of weight 1, no padding; the offsets put
the samples at p_x = -0.5 (left of the image) and p_x = 2.5 (right of it). torchvision,
ONNX and npattn sample bilinearly with zero outside, which gives 0.5 * x[0] = 0.5 and
0.5 * x[2] = 1.5. With pad=False OpenVINO gives 0 on the left and clamps to x[2] = 3 on
the right; with bilinear_interpolation_pad=True it gives torchvision's numbers.
"""

import pathlib
import sys

# this folder's runners (tvm.py, openvino.py, keras.py, jax.py) would shadow the packages
sys.path[:] = [p for p in sys.path if pathlib.Path(p or ".").resolve() != pathlib.Path(__file__).resolve().parent]

import numpy as np
import openvino as ov
import openvino.opset8 as ops

x = np.array([[[[1.0, 2.0, 3.0]]]], dtype=np.float32)
weight = np.ones((1, 1, 1, 1), dtype=np.float32)
offset = np.zeros((1, 2, 1, 3), dtype=np.float32)
offset[0, 1, 0, :] = [-0.5, 0.0, 0.5]                     # p_x = -0.5, 1.0, 2.5
expected = np.array([0.5, 2.0, 1.5])                      # bilinear with zero outside


def run(pad):
    data = ops.parameter(x.shape, np.float32)
    off = ops.parameter(offset.shape, np.float32)
    y = ops.deformable_convolution(data, off, ops.constant(weight), [1, 1], [0, 0], [0, 0], [1, 1],
                                   bilinear_interpolation_pad=pad)
    return ov.Core().compile_model(ov.Model([y], [data, off]), "CPU")([x, offset])[0][0, 0, 0]


print(f"openvino {ov.__version__.split('-')[0]}")
print(f"{'p_x':>6} {'torchvision':>12} {'pad=False':>10} {'pad=True':>9}")
for p, e, a, b in zip([-0.5, 1.0, 2.5], expected, run(False), run(True)):
    print(f"{p:6.2f} {e:12.3f} {a:10.3f} {b:9.3f}")
