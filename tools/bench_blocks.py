"""Speed of npattn's attention blocks next to PyTorch CPU eager, in one run.

Times, in float32 and training mode, the forward and the forward+backward of each block
on the shapes of issue 3:

    SE, GCT             8x256x28x28   (SE r=16)
    MS_CAM, AFF, iAFF   8x64x56x56    (r=4)
    SK                  8x64x56x56    64 -> 64, groups 32
    SEModule, CBAM, ECA, CoordAttn, GC (attention pooling, scale and add), SimAM
                        8x256x28x28   timm's default widths, against timm 1.0.31's modules
    ViTAttn, MHA        8x197x768     ViT-B attention: 12 heads (MHA batch_first, self-attention,
                                    attention weights returned as torch's default)
    NonLocal            8x256x28x28   C' = 32, 784 positions

PyTorch runs timm's NonLocalAttn and Attention (timm 1.0.31) and torch.nn.MultiheadAttention
for the self-attention rows (tools/torch_ref_attention.py).

PyTorch runs the transcriptions of tools/torch_ref_blocks.py or timm's modules (eager mode, autograd on,
its default thread count) with the same parameters and inputs. The four timings of a
block run interleaved; the table gives the best of ``--repeat`` runs after one warm-up,
and the ratio npattn / PyTorch (below 1: npattn is faster). Without torch only npattn's columns are printed.

    python tools/bench_blocks.py [--repeat 5] [--blocks SE,SK,...]
"""

from __future__ import annotations

import argparse
import os
import pathlib
import platform
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

import npattn  # noqa: E402

try:
    import torch
except ImportError:  # npattn alone
    torch = None

CASES = {
    # name: (constructor, number of inputs (negative: one array passed that many times), input shape)
    "SE": (lambda rng: npattn.SEBlock(256, 16, rng=rng), 1, (8, 256, 28, 28)),
    "GCT": (lambda rng: npattn.GCT(256), 1, (8, 256, 28, 28)),
    "MS_CAM": (lambda rng: npattn.MS_CAM(64, 4, rng=rng), 1, (8, 64, 56, 56)),
    "AFF": (lambda rng: npattn.AFF(64, 4, rng=rng), 2, (8, 64, 56, 56)),
    "iAFF": (lambda rng: npattn.iAFF(64, 4, rng=rng), 2, (8, 64, 56, 56)),
    "SK": (lambda rng: npattn.SKConv(64, 64, groups=32, rng=rng), 1, (8, 64, 56, 56)),
    # timm's layout, against timm's own modules (SimAM: the transcription in tools/torch_ref_timm.py)
    "SEModule": (lambda rng: npattn.SEModule(256, rng=rng), 1, (8, 256, 28, 28)),
    "CBAM": (lambda rng: npattn.CBAM(256, rng=rng), 1, (8, 256, 28, 28)),
    "ECA": (lambda rng: npattn.ECA(256, rng=rng), 1, (8, 256, 28, 28)),
    "CoordAttn": (lambda rng: npattn.CoordAttn(256, rng=rng), 1, (8, 256, 28, 28)),
    "GC": (lambda rng: npattn.GlobalContext(256, fuse_add=True, rng=rng), 1, (8, 256, 28, 28)),
    "SimAM": (lambda rng: npattn.SimAM(), 1, (8, 256, 28, 28)),
    # self-attention; MHA gets one array three times (query, key, value)
    "ViTAttn": (lambda rng: npattn.ViTAttention(768, 12, qkv_bias=True, rng=rng), 1, (8, 197, 768)),
    "MHA": (lambda rng: npattn.MultiheadAttention(768, 12, batch_first=True, rng=rng), -3, (8, 197, 768)),
    "NonLocal": (lambda rng: npattn.NonLocalAttn(256, rng=rng), 1, (8, 256, 28, 28)),
}


def best_times(fns, repeat):
    """Best of ``repeat`` runs of each function, after one warm-up each; the functions
    run interleaved, so a slow spell of a shared machine hits all of them alike."""
    for fn in fns:
        fn()
    best = [float("inf")] * len(fns)
    for _ in range(repeat):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - t0)
    return best


def npattn_fns(block, xs, dy):
    def fwd():
        block.forward(*xs, training=True)

    def fwd_bwd():
        _, cache = block.forward(*xs, training=True)
        block.backward(dy, cache)

    return [fwd, fwd_bwd]


def torch_fns(block, xs, dy):
    import torch_ref_timm
    from torch_ref_blocks import make_torch_block

    if type(block).__name__ in torch_ref_timm.TIMM_BLOCKS:
        make_torch_block = torch_ref_timm.make_torch_block  # noqa: F811 (timm's own module)
    try:
        module = make_torch_block(block, dtype=torch.float32).train()
    except (KeyError, TypeError):  # the self-attention blocks' reference modules
        import torch_ref_attention

        module = torch_ref_attention.make_torch_block(block, dtype=torch.float32).train()
    leaves = {}  # one tensor per distinct array: self-attention gets one shared tensor, as in a model
    txs = [leaves.setdefault(id(x), torch.from_numpy(x).requires_grad_(True)) for x in xs]
    tdy = torch.from_numpy(dy)

    def fwd():
        module(*txs)

    def fwd_bwd():
        for p in module.parameters():
            p.grad = None
        for t in txs:
            t.grad = None
        module(*txs).backward(tdy)

    return [fwd, fwd_bwd]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--blocks", default=",".join(CASES), help="comma-separated subset of " + ",".join(CASES))
    args = ap.parse_args(argv)
    names = [n for n in args.blocks.split(",") if n]
    for n in names:
        if n not in CASES:
            ap.error(f"unknown block {n!r}; choose from {', '.join(CASES)}")

    print(f"npattn {npattn.__version__}, numpy {np.__version__}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs" + (f", torch {torch.__version__} ({torch.get_num_threads()} threads)" if torch else ""))
    print("float32, training mode, best of %d runs, milliseconds" % args.repeat)
    head = f"{'block':<10} {'shape':<16} {'npattn fwd':>11} {'npattn f+b':>11}"
    if torch is not None:
        head += f" {'torch fwd':>10} {'torch f+b':>10} {'ratio fwd':>10} {'ratio f+b':>10}"
    print(head)
    print("-" * len(head))
    for name in names:
        make, n_inputs, shape = CASES[name]
        rng = np.random.default_rng(0)
        block = make(rng)
        xs = [rng.standard_normal(shape, dtype=np.float32) for _ in range(abs(n_inputs))]
        if n_inputs < 0:  # one array used for every input (self-attention)
            xs = xs[:1] * abs(n_inputs)
        y, _ = block.forward(*xs)
        dy = rng.standard_normal(y.shape, dtype=np.float32)
        fns = npattn_fns(block, xs, dy)
        if torch is not None:
            fns += torch_fns(block, xs, dy)
        times = best_times(fns, args.repeat)
        line = f"{name:<10} {'x'.join(map(str, shape)):<16} {times[0] * 1e3:11.1f} {times[1] * 1e3:11.1f}"
        if torch is not None:
            f, fb, tf, tfb = times
            line += f" {tf * 1e3:10.1f} {tfb * 1e3:10.1f} {f / tf:10.2f} {fb / tfb:10.2f}"
        print(line, flush=True)


if __name__ == "__main__":
    main()
