"""Speed and memory of deform_conv2d: npattn (numba and numpy backends) next to
torchvision.ops.deform_conv2d on the CPU, in one process, side by side.

Shapes (float32, DCNv2: with mask, 3x3 kernel, stride 1, padding 1, 1 offset group)::

    a   N=8, 64 -> 64 channels, 56x56
    b   N=2, 16 -> 16 channels, 32x32

npattn's numba backend runs its kernels and its matrix products on Numba's threads (the
products as fixed tiles, one single-threaded BLAS call each) with every OpenBLAS set to
one thread meanwhile (``npattn.sampling.blas_context``), so no BLAS worker spins against
the kernels; the thread-configuration table below shows the alternatives.

For each shape and implementation: the forward and the forward+backward time (best and
median of ``--repeat`` interleaved runs after one warm-up, so a slow spell of a shared
machine hits all of them alike) and the peak memory of one forward+backward (the growth
of the process's resident set: Linux's VmHWM, reset through /proc/self/clear_refs before
the call, minus the resident set at the start; where that is unavailable, a thread
samples the resident set every millisecond). For npattn the peak of NumPy's allocations
(tracemalloc) is printed as well.

Then, for the numba backend on shape (a): where the time goes (each kernel and the
matrix products alone), the first call of a fresh process (the kernels come from the
on-disk cache: no JIT compilation), and the thread configurations (each in a process of
its own: Numba's OpenMP or workqueue layer or one Numba thread, with OpenBLAS's threads
left free during the kernels, against npattn's default of one BLAS thread there).

With ``--scaling`` the script prints only the scaling table instead: npattn numba
forward and forward+backward on shape (a) with 1, 2, 4, ... Numba threads up to the
machine's cores (``numba.set_num_threads``; npattn sets every OpenBLAS to one thread
while it runs, each product tile on the Numba thread that issues it), beside
torchvision with the same ``torch.set_num_threads``, all in this process.
``--quick`` takes 3 rounds instead of ``--repeat`` (a 16-core machine runs
``--scaling --quick`` in about a minute).

    python tools/bench.py [--repeat 5] [--shapes a,b] [--skip-threads] [--skip-cold]
                          [--column-budget-mib M] [--json FILE]
    python tools/bench.py --scaling [--quick] [--threads 1,2,4] [--skip-torch] [--json FILE]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import pathlib
import platform
import re
import subprocess
import sys
import threading
import time
import tracemalloc

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPES = {
    # name: (N, C_in, C_out, H, W)
    "a": (8, 64, 64, 56, 56),
    "b": (2, 16, 16, 32, 32),
}
KERNEL = (3, 3)


# ---- inputs ---------------------------------------------------------------------------


def make_inputs(shape, seed=0):
    n, c_in, c_out, h, w = shape
    kh, kw = KERNEL
    rng = np.random.default_rng(seed)
    f32 = np.float32
    return {
        "x": rng.standard_normal((n, c_in, h, w)).astype(f32),
        "offset": (0.5 * rng.standard_normal((n, 2 * kh * kw, h, w))).astype(f32),
        "mask": rng.uniform(0.0, 1.0, (n, kh * kw, h, w)).astype(f32),
        "weight": (rng.standard_normal((c_out, c_in, kh, kw)) / np.sqrt(c_in * kh * kw)).astype(f32),
        "bias": (0.1 * rng.standard_normal(c_out)).astype(f32),
        "grad_out": rng.standard_normal((n, c_out, h, w)).astype(f32),
    }


COLUMN_BUDGET = {}  # {"column_budget_bytes": n} when --column-budget-mib is given


def npattn_fns(arrays, backend):
    from npattn.functional.deform import deform_conv2d_backward, deform_conv2d_forward

    a = arrays

    def forward():
        return deform_conv2d_forward(a["x"], a["offset"], a["weight"], a["bias"], 1, 1, 1, a["mask"], backend=backend,
                                     **COLUMN_BUDGET)

    def forward_backward():
        out, cache = forward()
        return out, deform_conv2d_backward(a["grad_out"], cache)

    return forward, forward_backward


def torchvision_fns(arrays):
    import torch
    import torchvision

    t = {k: torch.from_numpy(v.copy()) for k, v in arrays.items()}
    leaves = [t[k].requires_grad_(True) for k in ("x", "offset", "mask", "weight", "bias")]

    def forward():
        with torch.no_grad():
            return torchvision.ops.deform_conv2d(t["x"], t["offset"], t["weight"], t["bias"], 1, 1, 1, t["mask"])

    def forward_backward():
        for leaf in leaves:
            leaf.grad = None
        out = torchvision.ops.deform_conv2d(t["x"], t["offset"], t["weight"], t["bias"], 1, 1, 1, t["mask"])
        out.backward(t["grad_out"])
        return out

    return forward, forward_backward


# ---- measurement ----------------------------------------------------------------------


def timings(fns, repeat):
    """{name: (best, median)} seconds; one warm-up each, then ``repeat`` interleaved rounds."""
    for fn in fns.values():
        fn()
    runs = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            runs[name].append(time.perf_counter() - t0)
    return {name: (min(v), float(np.median(v))) for name, v in runs.items()}


_LIBC = None


def _libc():
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.mallopt(-3, 256 * 1024)  # M_MMAP_THRESHOLD fixed: big arrays go back to the OS when freed
        except OSError:
            _LIBC = False
    return _LIBC


def _status_kib(field):
    with open("/proc/self/status") as f:
        m = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M)
    return int(m.group(1)) if m else None


def _hwm_resettable():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status_kib("VmHWM") is not None
    except OSError:
        return False


def peak_rss_mib(fn):
    """Growth of the resident set during ``fn()`` (MiB), and the method used."""
    libc = _libc()
    if libc:
        libc.malloc_trim(0)
    if _hwm_resettable():
        base = _status_kib("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS
        result = fn()
        peak = _status_kib("VmHWM")
        del result
        return (peak - base) / 1024, "VmHWM"
    # fallback: sample the resident set in a thread
    base = _status_kib("VmRSS") or 0
    peak = [base]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], _status_kib("VmRSS") or 0)
            time.sleep(0.001)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    result = fn()
    stop.set()
    th.join()
    del result
    return (peak[0] - base) / 1024, "sampled RSS"


def traced_peak_mib(fn):
    """Peak of the allocations tracemalloc sees (NumPy arrays) during ``fn()`` (MiB)."""
    tracemalloc.start()
    tracemalloc.reset_peak()
    result = fn()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    del result
    return peak / 2**20


# ---- sections -------------------------------------------------------------------------


def environment():
    import numba

    from npattn.sampling import cpu

    info = {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "numba": numba.__version__,
        "cpus": os.cpu_count(),
        "numba_threading": {k: v for k, v in cpu.threading_info().items() if k != "threadpoolctl"},
    }
    try:
        import torch
        import torchvision

        info.update(torch=torch.__version__, torchvision=torchvision.__version__, torch_threads=torch.get_num_threads())
    except ImportError:
        info["torch"] = None
    return info


def speed_and_memory(shape_name, repeat, have_torch):
    arrays = make_inputs(SHAPES[shape_name])
    impls = {"npattn numba": npattn_fns(arrays, "numba"), "npattn numpy": npattn_fns(arrays, "numpy")}
    if have_torch:
        impls["torchvision"] = torchvision_fns(arrays)
    fwd = timings({k: v[0] for k, v in impls.items()}, repeat)
    fwdbwd = timings({k: v[1] for k, v in impls.items()}, repeat)
    rows = {}
    for name, (_, fb) in impls.items():
        mem, method = peak_rss_mib(fb)
        rows[name] = {
            "forward_best_ms": fwd[name][0] * 1e3,
            "forward_median_ms": fwd[name][1] * 1e3,
            "fwdbwd_best_ms": fwdbwd[name][0] * 1e3,
            "fwdbwd_median_ms": fwdbwd[name][1] * 1e3,
            "peak_rss_mib": mem,
            "peak_method": method,
        }
        if name != "torchvision":
            rows[name]["numpy_traced_peak_mib"] = traced_peak_mib(fb)
    return rows


def breakdown(repeat, only_npattn=False):
    """Each piece of npattn's numba forward+backward on shape (a), alone (with
    ``only_npattn``, without the np.matmul comparisons), in ms."""
    from npattn.sampling import cpu

    n, c_in, c_out, h, w = SHAPES["a"]
    a = make_inputs(SHAPES["a"])
    geo = (KERNEL, (1, 1), (1, 1), (1, 1))
    k = KERNEL[0] * KERNEL[1]
    cols = cpu.deform_im2col(a["x"], a["offset"], a["mask"], *geo, (h, w), 1)
    w2 = a["weight"].reshape(c_out, c_in * k)
    d_cols = np.matmul(w2.T[None], a["grad_out"].reshape(n, c_out, h * w)).reshape(cols.shape)
    pieces = {
        "im2col (forward)": lambda: cpu.deform_im2col(a["x"], a["offset"], a["mask"], *geo, (h, w), 1),
        "product tiles W @ cols (forward, npattn)": lambda: cpu.products_forward(
            w2[None], cols.reshape(n, 1, c_in * k, h * w), np.empty((n, 1, c_out, h * w), np.float32)),
        "product tiles W^T @ dY (d_cols, npattn)": lambda: cpu.products_d_cols(
            w2[None], a["grad_out"].reshape(n, 1, c_out, h * w), np.empty((n, 1, c_in * k, h * w), np.float32)),
        "product tiles dY @ cols^T (d_weight, npattn)": lambda: cpu.products_d_weight(
            a["grad_out"].reshape(n, 1, c_out, h * w), cols.reshape(n, 1, c_in * k, h * w),
            np.zeros((1, c_out, c_in * k), np.float32)),
        "np.matmul W @ cols (forward, before)": lambda: np.matmul(w2[None], cols.reshape(n, c_in * k, h * w)),
        "np.matmul W^T @ dY (d_cols, before)": lambda: np.matmul(w2.T[None], a["grad_out"].reshape(n, c_out, h * w)),
        "np.matmul dY @ cols^T (d_weight, before)": lambda: np.matmul(
            a["grad_out"].reshape(n, c_out, h * w), cols.reshape(n, c_in * k, h * w).transpose(0, 2, 1)).sum(0),
        "col2im (d_input)": lambda: cpu.deform_col2im(d_cols, a["offset"], a["mask"], a["x"].shape, *geo, 1),
        "coord (d_offset, d_mask)": lambda: cpu.deform_col2im_coord(d_cols, a["x"], a["offset"], a["mask"], *geo, 1),
        "coord + columns for d_weight (backward)": lambda: cpu.deform_col2im_coord(
            d_cols, a["x"], a["offset"], a["mask"], *geo, 1, cols_out=np.empty_like(cols)),
    }
    if only_npattn:
        pieces = {name: f for name, f in pieces.items() if not name.startswith("np.matmul")}
    from npattn import sampling

    with sampling.blas_context("numba"):  # as inside deform_conv2d
        return {name: best * 1e3 for name, (best, _) in timings(pieces, repeat).items()}


_COLD = r"""
import json, sys, time
t0 = time.perf_counter()
sys.path.insert(0, {root!r})
sys.path.insert(0, {tools!r})
from bench import make_inputs, npattn_fns, SHAPES
a = make_inputs(SHAPES["b"])
_, fb = npattn_fns(a, "numba")
t1 = time.perf_counter(); fb(); t2 = time.perf_counter(); fb(); t3 = time.perf_counter()
print(json.dumps({{"import_s": t1 - t0, "first_call_s": t2 - t1, "second_call_s": t3 - t2}}))
"""


def cold_start():
    """A fresh process's first forward+backward (shape b), twice: the first process may
    compile (an empty cache), the second must load the kernels from the cache."""
    code = _COLD.format(root=str(ROOT), tools=str(ROOT / "tools"))
    out = []
    for _ in range(2):
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
        if r.returncode:
            raise RuntimeError(r.stderr)
        out.append(json.loads(r.stdout.strip().splitlines()[-1]))
    return out


THREAD_CONFIGS = {
    # name: (environment, keep deform_conv2d's single-threaded BLAS around its kernels)
    "omp layer, BLAS threads free": ({"NUMBA_THREADING_LAYER": "omp"}, False),
    "workqueue, BLAS threads free": ({"NUMBA_THREADING_LAYER": "workqueue"}, False),
    "1 numba thread, BLAS threads free": ({"NUMBA_NUM_THREADS": "1"}, False),
    "workqueue + 1-thr BLAS": ({"NUMBA_THREADING_LAYER": "workqueue"}, True),
    "npattn's default (numba's layer + 1-thr BLAS)": ({}, True),
}

_THREADS = r"""
import contextlib, json, sys
sys.path.insert(0, {root!r})
sys.path.insert(0, {tools!r})
from bench import make_inputs, npattn_fns, timings, SHAPES
from npattn import sampling
from npattn.sampling import cpu
if not {wrap}:  # undo npattn's default: OpenBLAS keeps its threads during the kernels
    sampling.blas_context = lambda name: contextlib.nullcontext()
out = {{}}
for shape in ("a", "b"):
    f, fb = npattn_fns(make_inputs(SHAPES[shape]), "numba")
    t = timings({{"fwd": f, "fwdbwd": fb}}, {repeat})
    out[shape] = {{"fwd": t["fwd"][0], "fwdbwd": t["fwdbwd"][0]}}
out["threading"] = cpu.threading_info()
print(json.dumps(out))
"""


def thread_configs(repeat, rounds=2):
    """npattn numba forward and forward+backward on shapes (a) and (b) under each
    configuration, each in a process of its own, ``rounds`` rounds interleaved; best of all."""
    best = {}
    for _ in range(rounds):
        for name, (env_add, wrap) in THREAD_CONFIGS.items():
            code = _THREADS.format(root=str(ROOT), tools=str(ROOT / "tools"), repeat=repeat, wrap=wrap)
            env = {k: v for k, v in os.environ.items()
                   if k not in ("NUMBA_THREADING_LAYER", "NUMBA_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
            env.update(env_add)
            r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
            if r.returncode:
                best[name] = {"error": r.stderr.strip().splitlines()[-1] if r.stderr else "failed"}
                continue
            res = json.loads(r.stdout.strip().splitlines()[-1])
            prev = best.get(name)
            if prev is None or "error" in prev:
                best[name] = res
                continue
            for shape in ("a", "b"):
                for key in ("fwd", "fwdbwd"):
                    prev[shape][key] = min(prev[shape][key], res[shape][key])
    return best


def thread_counts(limit=None):
    """1, 2, 4, ... up to the cores Numba may use, and that count itself."""
    import numba

    top = numba.config.NUMBA_NUM_THREADS if limit is None else limit
    counts, t = [], 1
    while t < top:
        counts.append(t)
        t *= 2
    return counts + [top]


def scaling(repeat, counts, have_torch):
    """{threads: {impl: {fwd/fwdbwd best/median ms}}} on shape (a), one process."""
    import numba

    from npattn import sampling

    arrays = make_inputs(SHAPES["a"])
    impls = {"npattn numba": npattn_fns(arrays, "numba")}
    if have_torch:
        import torch

        impls["torchvision"] = torchvision_fns(arrays)
        torch_saved = torch.get_num_threads()
    saved = numba.get_num_threads()
    table = {}
    try:
        for t in counts:
            numba.set_num_threads(t)
            if have_torch:
                torch.set_num_threads(t)
            fwd = timings({k: v[0] for k, v in impls.items()}, repeat)
            fwdbwd = timings({k: v[1] for k, v in impls.items()}, repeat)
            info = sampling.threading_info()
            row = {name: {"forward_best_ms": fwd[name][0] * 1e3, "forward_median_ms": fwd[name][1] * 1e3,
                          "fwdbwd_best_ms": fwdbwd[name][0] * 1e3, "fwdbwd_median_ms": fwdbwd[name][1] * 1e3}
                   for name in impls}
            row["numba_threads"] = info["num_threads"]
            row["numba_layer"] = info["active_layer"]
            row["blas_threads_in_kernels"] = info["blas_threads_in_kernels"]
            if have_torch:
                row["torch_threads"] = torch.get_num_threads()
            row["kernels_best_ms"] = breakdown(repeat, only_npattn=True)  # which piece stops scaling
            table[t] = row
    finally:
        numba.set_num_threads(saved)
        if have_torch:
            torch.set_num_threads(torch_saved)
    return table


def print_scaling(table, repeat):
    n, c_in, c_out, h, w = SHAPES["a"]
    print(f"\nscaling, shape (a): N={n}, {c_in}->{c_out}, {h}x{w}, 3x3 DCNv2 float32; best (median) of {repeat}, ms")
    tv = any("torchvision" in r for r in table.values())
    head = f"{'threads':>7} {'npattn fwd':>18} {'npattn f+b':>18}"
    if tv:
        head += f" {'torchvision fwd':>18} {'torchvision f+b':>20} {'f+b x':>6}"
    print(head + "   (numba layer, BLAS threads per product tile)")
    first = None
    for t, r in table.items():
        a = r["npattn numba"]
        first = first or a["fwdbwd_best_ms"]
        line = (f"{t:7d} {a['forward_best_ms']:8.1f} ({a['forward_median_ms']:7.1f}) "
                f"{a['fwdbwd_best_ms']:8.1f} ({a['fwdbwd_median_ms']:7.1f})")
        if tv:
            b = r["torchvision"]
            line += (f" {b['forward_best_ms']:8.1f} ({b['forward_median_ms']:7.1f}) "
                     f"{b['fwdbwd_best_ms']:10.1f} ({b['fwdbwd_median_ms']:7.1f})"
                     f" {b['fwdbwd_best_ms'] / a['fwdbwd_best_ms']:6.1f}")
        print(line + f"   ({r['numba_layer']}, {r['blas_threads_in_kernels']}); "
                     f"npattn f+b speed-up over 1 thread {first / a['fwdbwd_best_ms']:.2f}")
    if tv:
        print("  (f+b x: torchvision's best forward+backward / npattn's, same thread count)")
    names = list(next(iter(table.values()))["kernels_best_ms"])
    print(f"\neach piece alone on all {n} images (best of {repeat}, ms; speed-up over 1 thread in brackets)")
    print(f"{'threads':>7} " + " ".join(f"{i + 1:>14}" for i in range(len(names))))
    base = None
    for t, r in table.items():
        ks = r["kernels_best_ms"]
        base = base or ks
        print(f"{t:7d} " + " ".join(f"{ks[k]:7.1f} ({base[k] / ks[k]:4.1f})" for k in names))
    for i, k in enumerate(names):
        print(f"  {i + 1}: {k}")


# ---- report ---------------------------------------------------------------------------


def print_table(shape_name, rows):
    n, c_in, c_out, h, w = SHAPES[shape_name]
    print(f"\nshape ({shape_name}): N={n}, {c_in}->{c_out}, {h}x{w}, 3x3, stride 1, padding 1, mask, float32")
    tv = rows.get("torchvision")
    head = f"{'':17} {'forward ms':>18} {'fwd+bwd ms':>18} {'peak MiB':>9} {'np-traced MiB':>13}"
    if tv:
        head += f" {'fwd x':>6} {'f+b x':>6}"
    print(head)
    print(f"{'':17} {'best (median)':>18} {'best (median)':>18}")
    for name, r in rows.items():
        line = (f"{name:17} {r['forward_best_ms']:8.1f} ({r['forward_median_ms']:7.1f}) "
                f"{r['fwdbwd_best_ms']:8.1f} ({r['fwdbwd_median_ms']:7.1f}) {r['peak_rss_mib']:9.1f} "
                f"{r.get('numpy_traced_peak_mib', float('nan')):13.1f}")
        if tv:
            line += (f" {tv['forward_best_ms'] / r['forward_best_ms']:6.2f}"
                     f" {tv['fwdbwd_best_ms'] / r['fwdbwd_best_ms']:6.2f}")
        print(line)
    if tv:
        print("  (x: torchvision's best time / this row's best time; above 1 is faster than torchvision)")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--shapes", default="a,b")
    p.add_argument("--skip-threads", action="store_true")
    p.add_argument("--skip-cold", action="store_true")
    p.add_argument("--column-budget-mib", type=float,
                   help="npattn's column_budget_bytes (default: deform_conv2d's own default)")
    p.add_argument("--json", help="also write every figure to this file")
    p.add_argument("--scaling", action="store_true",
                   help="only the scaling table: 1, 2, 4, ... threads, npattn numba beside torchvision")
    p.add_argument("--quick", action="store_true", help="3 rounds instead of --repeat")
    p.add_argument("--threads", help="thread counts of the scaling table, e.g. 1,2,4 (default: 1, 2, 4, ... cores)")
    p.add_argument("--skip-torch", action="store_true", help="leave torchvision out")
    args = p.parse_args(argv)
    if args.quick:
        args.repeat = 3
    if args.column_budget_mib:
        COLUMN_BUDGET["column_budget_bytes"] = int(args.column_budget_mib * 2**20)

    try:
        import torch  # noqa: F401
        import torchvision  # noqa: F401

        have_torch = not args.skip_torch
    except ImportError:
        have_torch = False

    report = {"environment": environment(), "column_budget": COLUMN_BUDGET or "deform_conv2d's default"}
    print(json.dumps(report["environment"]))
    if args.scaling:
        counts = [int(t) for t in args.threads.split(",")] if args.threads else thread_counts()
        report["scaling"] = scaling(args.repeat, counts, have_torch)
        print_scaling(report["scaling"], args.repeat)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(report, f, indent=2)
        return
    for s in args.shapes.split(","):
        rows = speed_and_memory(s, args.repeat, have_torch)
        report[f"shape_{s}"] = rows
        print_table(s, rows)

    report["breakdown_ms"] = breakdown(args.repeat)
    print("\nnpattn numba, shape (a): each piece alone, best ms")
    for name, ms in report["breakdown_ms"].items():
        print(f"  {name:52} {ms:8.1f}")

    if not args.skip_cold:
        report["cold_start"] = cold_start()
        print("\nfresh process, npattn numba forward+backward on shape (b):")
        for i, c in enumerate(report["cold_start"], 1):
            print(f"  process {i}: import {c['import_s']:.2f} s, first call {c['first_call_s']:.3f} s, "
                  f"second call {c['second_call_s']:.3f} s")

    if not args.skip_threads:
        report["threads"] = thread_configs(args.repeat)
        print("\nthread configurations, npattn numba, best ms (each in a process of its own):")
        print(f"  {'':46} {'(a) fwd':>8} {'(a) f+b':>8} {'(b) fwd':>8} {'(b) f+b':>8}")
        for name, r in report["threads"].items():
            if "error" in r:
                print(f"  {name:46} error: {r['error']}")
                continue
            print(f"  {name:46} {r['a']['fwd'] * 1e3:8.1f} {r['a']['fwdbwd'] * 1e3:8.1f} "
                  f"{r['b']['fwd'] * 1e3:8.1f} {r['b']['fwdbwd'] * 1e3:8.1f}   "
                  f"({r['threading']['active_layer']}, {r['threading']['num_threads']} threads)")

    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
