"""Apache TVM's deformable_conv2d_nchw zeroes every sample with -1 < p < 0.

    python tools/conformance/repro_tvm_negative_p.py      (needs apache-tvm)

One channel, one row [1, 2, 3], a 1x1 kernel of weight 1, no padding, and one offset per
output column: dx = -0.5 at column 0 puts the sample at p_x = -0.5, between the outside
corner x = -1 (which counts as 0) and x = 0. Bilinear sampling as torchvision, ONNX and
npattn do it gives 0.5 * x[0] = 0.5; TVM gives 0, because its sampler treats a position
as outside when ``h < 0 || w < 0`` rather than ``h <= -1 || w <= -1``. Integer offsets
and positions >= 0 agree.
"""

import pathlib
import sys

# this folder's runners (tvm.py, openvino.py, keras.py, jax.py) would shadow the packages
sys.path[:] = [p for p in sys.path if pathlib.Path(p or ".").resolve() != pathlib.Path(__file__).resolve().parent]

import numpy as np
import tvm
from tvm import te, topi

x = np.array([[[[1.0, 2.0, 3.0]]]])                      # (N, C, H, W) = (1, 1, 1, 3)
weight = np.ones((1, 1, 1, 1))
offset = np.zeros((1, 2, 1, 3))                           # channel 0: dy, channel 1: dx
offset[0, 1, 0, :] = [-0.5, 0.5, -1.0]                    # p_x = -0.5, 1.5, 1.0
expected = np.array([0.5 * 1.0, 0.5 * 2.0 + 0.5 * 3.0, 2.0])  # bilinear by hand

data = te.placeholder(x.shape, "float64")
off = te.placeholder(offset.shape, "float64")
kernel = te.placeholder(weight.shape, "float64")
y = topi.nn.deformable_conv2d_nchw(data, off, kernel, [1, 1], [0, 0], [1, 1], 1, 1, "float64")
fn = tvm.compile(te.create_prim_func([data, off, kernel, y]), target="llvm")
out = tvm.runtime.tensor(np.zeros((1, 1, 1, 3)), tvm.cpu())
fn(*(tvm.runtime.tensor(a, tvm.cpu()) for a in (x, offset, weight)), out)
got = out.numpy()[0, 0, 0]
print(f"apache-tvm {tvm.__version__}")
for p, e, g in zip([-0.5, 1.5, 1.0], expected, got):
    print(f"p_x = {p:5.2f}   bilinear (torchvision) {e:.3f}   TVM {g:.3f}   {'agrees' if np.isclose(e, g) else 'DIFFERS'}")
