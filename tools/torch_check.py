"""The validation workflow end to end, as a PyTorch user runs it against npattn's fixtures.

    python tools/torch_check.py [CASE] [--float32]

1. ``npattn export CASE DIR``: inputs.npz, state_dict.npz, grad_output.npy, case.json;
2. build the PyTorch module (here: the project's transcriptions of the seed code in
   tools/torch_ref_blocks.py and tools/torch_ref_deform.py, or, for a case named for a
   paper's official code (case.json's "official"), the transcription of that code in
   tools/torch_ref_official_b.py; in your project: your module), load the state_dict
   with ``torch.from_numpy`` (through the key map for an official module);
3. run forward and backward with the exported grad_output;
4. save ``output``, ``grad.input.<name>``, ``grad.param.<key>`` and (training cases)
   ``buffer_after.<key>`` to an .npz;
5. ``npattn check CASE outputs.npz``: per-tensor errors and a verdict (exit code 0 / 1).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import tempfile

import numpy as np
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's npattn
sys.path.insert(0, str(ROOT / "tools"))


def build_module(info, dtype):
    """Your PyTorch module goes here; these are the project's transcriptions of the seed."""
    import torch_ref_blocks
    import torch_ref_deform

    # border_grad is npattn's name for the offset-gradient convention at p = -1; these
    # modules run torchvision's kernel (its convention), which agrees elsewhere
    config = {k: v for k, v in info["config"].items() if k != "border_grad"}
    for mod in (torch_ref_blocks, torch_ref_deform):
        cls = getattr(mod, "TORCH_CLASSES", {}).get(info["block"])
        if cls is not None:
            return cls(**config).to(dtype)
    raise SystemExit(f"no PyTorch module for {info['block']} in this example")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("case", nargs="?", default="iaff/shared_global_att_train_f64")
    ap.add_argument("--float32", action="store_true", help="run PyTorch in float32 (checked with float32 tolerances)")
    args = ap.parse_args(argv)
    dtype = torch.float32 if args.float32 else torch.float64
    work = pathlib.Path(tempfile.mkdtemp(prefix="npattn-check-"))

    # 1. export the case
    subprocess.run([sys.executable, "-m", "npattn", "export", args.case, str(work)], check=True, cwd=ROOT)
    info = json.loads((work / "case.json").read_text())
    if info["kind"] != "block":
        raise SystemExit(f"{args.case} is a function case; this example runs blocks")

    # 2. the module, with the exported state_dict
    mapping = None
    if info.get("official"):  # the official module: npattn's keys renamed through the key map
        import torch_ref_official_b

        from npattn import golden

        blk = golden.build_block(info, np.float64)
        with np.load(work / "state_dict.npz", allow_pickle=False) as z:
            blk.load_state_dict({k: z[k] for k in z.files})
        module, mapping, _ = torch_ref_official_b.make_official(info["official"], blk, dtype)
    else:
        module = build_module(info, dtype)
        with np.load(work / "state_dict.npz", allow_pickle=False) as z:
            state = {k: torch.from_numpy(z[k]) for k in z.files}
        module.load_state_dict(state, strict=True)
    module.train(info["mode"] == "train")

    # 3. forward and backward
    with np.load(work / "inputs.npz", allow_pickle=False) as z:
        inputs = [torch.from_numpy(z[n]).to(dtype).requires_grad_(True) for n in info["inputs"]]
    y = module(*inputs)
    y.backward(torch.from_numpy(np.load(work / "grad_output.npy", allow_pickle=False)).to(dtype))

    # 4. save under the fixture's key names
    results = {"output": y.detach().numpy()}
    for n, t in zip(info["inputs"], inputs):
        results[f"grad.input.{n}"] = t.grad.numpy()
    grads = {k: p.grad.numpy() if p.grad is not None else np.zeros(tuple(p.shape), dtype=y.detach().numpy().dtype)
             for k, p in module.named_parameters()}
    params = dict(module.named_parameters())
    buffers = {k: v.numpy() for k, v in module.state_dict().items() if k not in params}
    if mapping is not None:  # back under npattn's keys (the fixture's)
        grads = torch_ref_official_b.from_official(grads, mapping, {k: blk[k].shape for k in blk.parameter_names()})
        buffers = torch_ref_official_b.from_official(buffers, mapping, {k: blk[k].shape for k in blk.buffer_names()})
    results.update({f"grad.param.{k}": g for k, g in grads.items()})
    if info["mode"] == "train":
        results.update({f"buffer_after.{k}": v for k, v in buffers.items()})
    np.savez(work / "outputs.npz", **results)

    # 5. the verdict
    return subprocess.run([sys.executable, "-m", "npattn", "check", args.case, str(work / "outputs.npz")], cwd=ROOT).returncode


if __name__ == "__main__":
    sys.exit(main())
