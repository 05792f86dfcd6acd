"""ONNX Runtime's DeformConv against npattn on uneven configurations.

    python tools/onnxruntime_check.py [--seed 0]

For every configuration (offset groups, weight groups, masks, strides, paddings,
dilations, far-out and non-finite-free offsets, positions exactly on integers and on -1)
and both float32 and float64, one DeformConv node (opset 19, built by
``npattn.onnx_export.build_node_test``) runs in ONNX Runtime's CPU provider on the same
arrays as ``npattn.deform_conv2d``; the script prints per case the max absolute error and
the normwise relative error (max |ort - npattn| / max |npattn|) and exits non-zero when a
float64 case exceeds 1e-12 or a float32 case 1e-5 relative. Needs onnx and onnxruntime
(``pip install 'npattn[onnx]'``).
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import npattn  # noqa: E402
from npattn.onnx_export import build_node_test  # noqa: E402

LIMITS = {np.float64: 1e-12, np.float32: 1e-5}

# name: (N, C_in, H, W, C_out, kernel, stride, padding, dilation, weight groups, offset groups,
#        mask, bias, offsets) with offsets "spread" (uniform in [-3, 3], a third rounded to
#        integers, one tap on p = -1), "far" (some offsets of +-1e3 and +-1e6: far outside)
CONFIGS = {
    "v1_uneven_stride_pad_dil": (2, 6, 7, 6, 4, (3, 2), (2, 1), (1, 0), (2, 1), 2, 3, False, True, "spread"),
    "v2_offset_groups_2": (2, 4, 5, 6, 6, (3, 3), (1, 1), (1, 1), (1, 1), 1, 2, True, True, "spread"),
    "v2_weight_groups_offset_groups_4": (1, 8, 6, 5, 4, (2, 3), (1, 2), (0, 1), (1, 2), 4, 4, True, False, "spread"),
    "v2_mask_no_bias_1x1": (3, 3, 4, 4, 5, (1, 1), (1, 1), (0, 0), (1, 1), 1, 3, True, False, "spread"),
    "v2_far_out_offsets": (2, 4, 5, 5, 4, (3, 3), (1, 1), (1, 1), (1, 1), 2, 2, True, True, "far"),
    "v1_zero_offsets_pad2": (1, 4, 5, 6, 4, (3, 3), (1, 1), (2, 2), (1, 1), 2, 1, False, True, "zero"),
    "v2_H1_W_wide": (2, 2, 1, 9, 2, (1, 3), (1, 2), (0, 1), (1, 1), 1, 1, True, True, "spread"),
}


def out_size(size, k, s, p, d):
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def make_case(rng, cfg):
    n, c_in, h, w, c_out, (kh, kw), stride, padding, dilation, g_w, g_off, with_mask, with_bias, kind = cfg
    oh, ow = out_size(h, kh, stride[0], padding[0], dilation[0]), out_size(w, kw, stride[1], padding[1], dilation[1])
    x = rng.standard_normal((n, c_in, h, w))
    offset = rng.uniform(-3, 3, (n, 2 * g_off * kh * kw, oh, ow))
    if kind == "zero":
        offset[:] = 0
    else:
        offset[:, ::3] = np.round(offset[:, ::3])
        offset[0, 0, 0, 0] = -1.0 + padding[0]  # tap (0, 0) of output (0, 0): p_y = -1 exactly
    if kind == "far":
        offset[:, 1::4] = rng.choice([-1e6, -1e3, 1e3, 1e6], size=offset[:, 1::4].shape)
    weight = rng.standard_normal((c_out, c_in // g_w, kh, kw))
    bias = rng.standard_normal(c_out) if with_bias else None
    mask = rng.uniform(-0.5, 1.5, (n, g_off * kh * kw, oh, ow)) if with_mask else None
    attrs = {"kernel_shape": [kh, kw], "strides": list(stride), "pads": [padding[0], padding[1], padding[0], padding[1]],
             "dilations": list(dilation), "group": g_w, "offset_group": g_off}
    return x, offset, weight, bias, mask, (stride, padding, dilation), attrs


def run(seed=0, stream=sys.stdout):
    """Print the table; return the list of (name, dtype, max abs err, rel err, ok)."""
    import onnxruntime as ort

    rows = []
    print(f"onnxruntime {ort.__version__}, npattn {npattn.__version__}, DeformConv opset 19, CPUExecutionProvider",
          file=stream)
    print(f"{'configuration':<34} {'dtype':<8} {'max abs err':>12} {'rel err':>10}  ok", file=stream)
    for name, cfg in CONFIGS.items():
        for dtype in (np.float32, np.float64):
            rng = np.random.default_rng([seed, list(CONFIGS).index(name)])
            x, offset, weight, bias, mask, geo, attrs = make_case(rng, cfg)
            cast = [None if a is None else a.astype(dtype) for a in (x, offset, weight, bias, mask)]
            x, offset, weight, bias, mask = cast
            y = npattn.deform_conv2d(x, offset, weight, bias, *geo, mask)
            model, tensors, _ = build_node_test({"X": x, "W": weight, "offset": offset, "B": bias, "mask": mask}, attrs, y)
            session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
            feeds = {t.name: a for t, a in zip(tensors, [a for a in (x, weight, offset, bias, mask) if a is not None])}
            got = session.run(None, feeds)[0]
            abs_err = float(np.max(np.abs(got.astype(np.float64) - y.astype(np.float64))))
            rel_err = abs_err / float(np.max(np.abs(y)))
            ok = got.dtype == y.dtype and got.shape == y.shape and rel_err <= LIMITS[dtype]
            rows.append((name, np.dtype(dtype).name, abs_err, rel_err, ok))
            print(f"{name:<34} {np.dtype(dtype).name:<8} {abs_err:12.3e} {rel_err:10.3e}  {'yes' if ok else 'NO'}",
                  file=stream)
    bad = [r for r in rows if not r[4]]
    print(f"{len(rows) - len(bad)} of {len(rows)} within the limits (float64 {LIMITS[np.float64]:g}, "
          f"float32 {LIMITS[np.float32]:g} relative)", file=stream)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as exc:
        print(f"error: this check needs onnx and onnxruntime (pip install 'npattn[onnx]'): {exc}", file=sys.stderr)
        return 2
    rows = run(args.seed)
    return 0 if all(r[4] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
