"""deform_conv2d on the GPU: npattn on CUDA arrays beside torchvision's CUDA op, in one
process, side by side.

Shapes (DCNv2: with mask, 3x3 kernel, stride 1, padding 1, 1 offset group)::

    a   N=8,  64 ->  64 channels, 56x56
    c   N=32, 128 -> 128 channels, 64x64

For each shape and dtype (float32, float64): forward and forward+backward wall time
(best and median of ``--repeat`` runs after two warm-ups, each run synchronised), the
peak device memory of one forward+backward (npattn: CuPy's memory pool; torchvision:
``torch.cuda.max_memory_allocated``), the agreement of npattn's outputs and gradients
with torchvision's (max |difference| / max |torchvision|), then npattn's kernels alone
by CUDA events: device time per kernel and the bandwidth the sampling kernels reach
(the bytes they must move at the least: the columns written or read, offsets and mask
read, the input read once).

    python tools/bench_gpu.py [--repeat 10] [--shapes a,c] [--dtypes float32,float64] [--json FILE]

Says plainly, and exits 0, when there is no GPU, no CuPy or no PyTorch with CUDA.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPES = {"a": (8, 64, 64, 56, 56), "c": (32, 128, 128, 64, 64)}  # N, C_in, C_out, H, W
K = 3


def make(shape, dtype, seed=0):
    n, c_in, c_out, h, w = shape
    rng = np.random.default_rng(seed)
    return {
        "input": rng.standard_normal((n, c_in, h, w)).astype(dtype),
        "offset": (0.5 * rng.standard_normal((n, 2 * K * K, h, w))).astype(dtype),
        "weight": (rng.standard_normal((c_out, c_in, K, K)) / np.sqrt(c_in * K * K)).astype(dtype),
        "bias": rng.standard_normal(c_out).astype(dtype),
        "mask": rng.uniform(0, 1, (n, K * K, h, w)).astype(dtype),
        "grad": rng.standard_normal((n, c_out, h, w)).astype(dtype),
    }


def timed(fn, sync, repeat):
    for _ in range(2):
        fn()
    sync()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return min(times) * 1e3, float(np.median(times)) * 1e3


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--shapes", default="a,c")
    ap.add_argument("--dtypes", default="float32,float64")
    ap.add_argument("--json")
    args = ap.parse_args(argv)

    from npattn._xp import cupy_or_reason

    cp, why = cupy_or_reason()
    if cp is None:
        print(f"no GPU benchmark: {why}")
        return 0
    try:
        import torch
        import torchvision

        has_torch = torch.cuda.is_available()
    except ImportError:
        has_torch = False
    if not has_torch:
        print("PyTorch with CUDA (and torchvision) is not available: npattn's figures only")

    from npattn import functional as F
    from npattn.sampling import cuda as cu

    dev = cp.cuda.Device()
    props = cp.cuda.runtime.getDeviceProperties(dev.id)
    print(f"device: {props['name'].decode()}, CuPy {cp.__version__}"
          + (f", torch {torch.__version__}, torchvision {torchvision.__version__}" if has_torch else ""))
    pool = cp.get_default_memory_pool()
    results = {}
    for sname in args.shapes.split(","):
        shape = SHAPES[sname]
        for dname in args.dtypes.split(","):
            dtype = np.dtype(dname)
            h = make(shape, dtype)
            d = {k: cp.asarray(v) for k, v in h.items()}
            row = {}

            def np_fwd():
                return F.deform_conv2d_forward(d["input"], d["offset"], d["weight"], d["bias"], 1, 1, 1, d["mask"])

            def np_fb():
                out, cache = np_fwd()
                return out, F.deform_conv2d_backward(d["grad"], cache)

            row["npattn fwd"] = timed(np_fwd, cp.cuda.Device().synchronize, args.repeat)
            row["npattn f+b"] = timed(np_fb, cp.cuda.Device().synchronize, args.repeat)
            pool.free_all_blocks()
            base = pool.used_bytes()
            hook_peak = _pool_peak(cp, pool, np_fb)
            row["npattn peak MiB"] = (hook_peak - base) / 2**20
            if has_torch:
                t = {k: torch.as_tensor(v, device="cuda") for k, v in h.items()}
                for k in ("input", "offset", "weight", "bias", "mask"):
                    t[k].requires_grad_(True)

                def tv_fwd():
                    with torch.no_grad():
                        return torchvision.ops.deform_conv2d(t["input"], t["offset"], t["weight"], t["bias"], 1, 1, 1, t["mask"])

                def tv_fb():
                    for k in ("input", "offset", "weight", "bias", "mask"):
                        t[k].grad = None
                    y = torchvision.ops.deform_conv2d(t["input"], t["offset"], t["weight"], t["bias"], 1, 1, 1, t["mask"])
                    y.backward(t["grad"])
                    return y

                row["torchvision fwd"] = timed(tv_fwd, torch.cuda.synchronize, args.repeat)
                row["torchvision f+b"] = timed(tv_fb, torch.cuda.synchronize, args.repeat)
                torch.cuda.reset_peak_memory_stats()
                m0 = torch.cuda.memory_allocated()
                tv_fb()
                torch.cuda.synchronize()
                row["torchvision peak MiB"] = (torch.cuda.max_memory_allocated() - m0) / 2**20
                y = tv_fb()
                out, grads = np_fb()
                agree = {"output": _rel(out, y.detach())}
                for k in ("input", "offset", "weight", "bias", "mask"):
                    agree[k] = _rel(grads[k], t[k].grad)
                row["agreement"] = agree
            row["kernels"] = _kernels(cp, cu, d, shape, dtype, args.repeat)
            results[f"{sname} {dname}"] = row
            _print_row(sname, dname, row)
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


def _rel(a, b):
    import cupy as cp

    a = cp.asnumpy(a).astype(np.float64)
    b = b.detach().cpu().double().numpy()
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


def _pool_peak(cp, pool, fn):
    """Peak bytes held by CuPy's pool during ``fn`` (sampled after each of its allocations
    through a pool hook would be exact; CuPy's MemoryHook gives that)."""
    from cupy.cuda import memory_hook

    class Peak(memory_hook.MemoryHook):
        name = "npattn_peak"

        def __init__(self):
            self.peak = pool.used_bytes()

        def malloc_postprocess(self, **kw):
            self.peak = max(self.peak, pool.used_bytes())

    hook = Peak()
    with hook:
        fn()
        cp.cuda.Device().synchronize()
    return hook.peak


def _kernels(cp, cu, d, shape, dtype, repeat):
    """Device time (CUDA events) of each sampling kernel on the whole batch, and the
    bandwidth of its least traffic."""
    n, c_in, c_out, h, w = shape
    item = np.dtype(dtype).itemsize
    geo = ((K, K), (1, 1), (1, 1), (1, 1))
    cols = cu.deform_im2col(d["input"], d["offset"], d["mask"], *geo, (h, w), 1)
    d_cols = cp.ones_like(cols)
    cols_out = cp.empty_like(cols)
    col_bytes = cols.size * item
    side = (d["offset"].size + d["mask"].size) * item
    x_bytes = d["input"].size * item
    calls = {
        "im2col": (lambda: cu.deform_im2col(d["input"], d["offset"], d["mask"], *geo, (h, w), 1), col_bytes + side + x_bytes),
        "col2im": (lambda: cu.deform_col2im(d_cols, d["offset"], d["mask"], d["input"].shape, *geo, 1),
                   col_bytes + side + x_bytes * (8 // item + 1)),  # float64 accumulator written, rounded copy
        "coord+cols": (lambda: cu.deform_col2im_coord(d_cols, d["input"], d["offset"], d["mask"], *geo, 1, cols_out=cols_out),
                       2 * col_bytes + 2 * side + x_bytes),
    }
    out = {}
    for name, (fn, nbytes) in calls.items():
        fn()
        start, stop = cp.cuda.Event(), cp.cuda.Event()
        best = np.inf
        for _ in range(repeat):
            start.record()
            fn()
            stop.record()
            stop.synchronize()
            best = min(best, cp.cuda.get_elapsed_time(start, stop))
        t0 = time.perf_counter()
        for _ in range(repeat):
            fn()
        host = (time.perf_counter() - t0) / repeat * 1e3
        cp.cuda.Device().synchronize()
        out[name] = {"device ms": best, "GB/s": nbytes / (best * 1e-3) / 1e9, "host ms per call (no sync)": host}
    return out


def _print_row(sname, dname, row):
    print(f"\nshape {sname} {SHAPES[sname]}, {dname}")
    for impl in ("npattn", "torchvision"):
        if f"{impl} fwd" not in row:
            continue
        f, fb = row[f"{impl} fwd"], row[f"{impl} f+b"]
        print(f"  {impl:<12} forward {f[0]:8.3f} ms (median {f[1]:.3f})   forward+backward {fb[0]:8.3f} ms "
              f"(median {fb[1]:.3f})   peak {row[f'{impl} peak MiB']:.0f} MiB")
    if "torchvision fwd" in row:
        print(f"  torchvision / npattn: forward {row['torchvision fwd'][0] / row['npattn fwd'][0]:.2f}x, "
              f"forward+backward {row['torchvision f+b'][0] / row['npattn f+b'][0]:.2f}x (above 1: npattn faster)")
        print("  agreement with torchvision (max |diff| / max |torchvision|): "
              + ", ".join(f"{k} {v:.1e}" for k, v in row["agreement"].items()))
    for k, v in row["kernels"].items():
        print(f"  kernel {k:<11} {v['device ms']:.3f} ms device, {v['GB/s']:.0f} GB/s, "
              f"{v['host ms per call (no sync)']:.3f} ms per call on the host")


if __name__ == "__main__":
    sys.exit(main())
