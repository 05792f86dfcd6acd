"""Apache TVM's ``topi.nn.deformable_conv2d_nchw`` on npattn's deform fixtures.

    python tools/conformance/tvm.py [--out build/conformance]

TVM's op is DCNv1 in torchvision's layouts (NCHW, offset channels (dy, dx) per tap) with
no mask (a bias is added with ``topi.add``); its compute asserts for more than one weight
group, so the cases it can express are v1 with groups 1. It is a tensor expression, compiled for the
CPU (llvm) in the case's dtype; there is no gradient. TVM's sampler zeroes every sample
with -1 < p < 0 (tools/conformance/repro_tvm_negative_p.py), so random offsets mismatch.
"""

from __future__ import annotations

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import conformance_lib as C  # noqa: E402

C.drop_own_dir(__file__)


def versions():
    import tvm

    return {"apache-tvm": tvm.__version__}


def deform(case):
    import numpy as np
    import tvm
    from tvm import te, topi

    x, offset, weight, bias, _, geo = C.deform_arrays(case)
    dtype = str(x.dtype)
    data = te.placeholder(x.shape, dtype, name="data")
    off = te.placeholder(offset.shape, dtype, name="offset")
    kernel = te.placeholder(weight.shape, dtype, name="kernel")
    args, values = [data, off, kernel], [x, offset, weight]
    # the framework call
    y = topi.nn.deformable_conv2d_nchw(
        data, off, kernel, list(geo["stride"]), list(geo["padding"]), list(geo["dilation"]),
        geo["offset_groups"], geo["groups"], dtype,
    )
    if bias is not None:
        b = te.placeholder((1, bias.shape[0], 1, 1), dtype, name="bias")
        y = topi.add(y, b)
        args.append(b)
        values.append(bias.reshape(1, -1, 1, 1))
    fn = tvm.compile(te.create_prim_func(args + [y]), target="llvm")
    dev = tvm.cpu()
    out = tvm.runtime.tensor(np.zeros([int(s) for s in y.shape], dtype=dtype), dev)
    fn(*(tvm.runtime.tensor(v, dev) for v in values), out)
    return {"output": out.numpy()}


def cases(runner):
    for case_id, case in runner.cases("deform_conv2d", "deform_conv2d_block"):
        x, offset, weight, bias, mask, geo = C.deform_arrays(case)
        if mask is not None:
            runner.skip(case_id, "a mask (DCNv2): topi.nn.deformable_conv2d_nchw has none")
            continue
        if geo["groups"] != 1:
            runner.skip(case_id, f"{geo['groups']} weight groups: topi.nn.deformable_conv2d_nchw asserts groups == 1")
            continue
        runner.run(case_id, lambda: deform(case), note="forward only")
    for case_id, case in runner.cases("deform_conv2d_pack", "modulated_deform_conv2d_pack"):
        if case.meta["block"] == "ModulatedDeformConv2dPack":
            runner.skip(case_id, "a mask (DCNv2): topi.nn.deformable_conv2d_nchw has none")
        else:
            runner.skip(case_id, f"{case.meta['config'].get('groups', 1)} weight groups: topi.nn.deformable_conv2d_nchw asserts groups == 1")


if __name__ == "__main__":
    sys.exit(C.main("tvm", versions, cases))
