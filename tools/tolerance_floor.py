"""How large a tolerance floor each implementation needs on the stored golden cases.

    python tools/tolerance_floor.py [--only PREFIX ...]

For every case and implementation, the smallest ``floor`` for which every tensor passes
the tolerance policy (``npattn/golden.py``) with the policy's rtol and atol:

    |actual - expected| <= atol * max(max|expected|, floor * case_scale) + rtol * |expected|

(0 when the tensor's own scale suffices). Implementations: PyTorch in float64 on the
float64 cases (the project's PyTorch versions, ``tools/torch_crosscheck.py``), PyTorch in
float32 on the float32 twins of the block cases (``tools/torch_check.py``'s modules), and
npattn itself in float32 on the twins. Needs torch and torchvision. The figures in docs/validating.md
for the float64 and float32 floors come from this script.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from npattn import golden  # noqa: E402


def floor_needed(actual: dict, expected: dict, tol: dict, scale: float) -> float:
    """Smallest floor (in units of the case scale) that makes every tensor pass."""
    need = 0.0
    for key, e in expected.items():
        if e.dtype.kind != "f" or not e.size:
            continue
        e64 = e.astype(np.float64)
        a64 = np.asarray(actual[key], dtype=np.float64)
        with np.errstate(invalid="ignore"):  # an lse of -inf on both sides is an exact match
            excess = np.where(a64 == e64, 0.0, np.abs(a64 - e64) - tol["rtol"] * np.abs(e64))
        excess = np.where(np.isnan(excess), np.inf, excess)  # a non-finite disagreement: no floor helps
        worst = float(np.max(excess))
        own = float(np.max(np.abs(e64[np.isfinite(e64)]), initial=0.0))
        if worst > tol["atol"] * own:  # the tensor's own scale is not enough
            need = max(need, worst / (tol["atol"] * scale))
    return need


def torch_float32(case):
    """PyTorch in float32 on a block case (None for function cases)."""
    import torch
    import torch_check

    meta = case.meta
    if meta["kind"] != "block":
        return None
    module = torch_check.build_module(meta, torch.float32)
    module.load_state_dict({k: torch.from_numpy(v) for k, v in case.state_dict().items()}, strict=True)
    module.train(meta["mode"] == "train")
    inputs = [torch.from_numpy(case.arrays[f"input.{n}"]).requires_grad_(True) for n in meta["inputs"]]
    y = module(*inputs)
    y.backward(torch.from_numpy(case.arrays["grad_output"]))
    out = {"output": y.detach().numpy()}
    out.update({f"grad.input.{n}": t.grad.numpy() for n, t in zip(meta["inputs"], inputs)})
    params = dict(module.named_parameters())
    for k, p in params.items():
        out[f"grad.param.{k}"] = p.grad.numpy() if p.grad is not None else np.zeros(tuple(p.shape), np.float32)
    if meta["mode"] == "train":
        out.update({f"buffer_after.{k}": v.numpy() for k, v in module.state_dict().items() if k not in params})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", default=None, help="case id prefixes")
    args = ap.parse_args(argv)
    import torch_crosscheck

    worst = {}
    print(f"{'case':<50} {'implementation':<16} floor needed")
    for cid in sorted(golden.list_cases(ROOT / "golden")):
        if args.only and not any(cid.startswith(p) for p in args.only):
            continue
        case = golden.load(cid, ROOT / "golden")
        expected = case.expected()
        scale = golden.case_scale(expected)
        runs = {}
        if case.meta["dtype"] == "float64":
            runs["pytorch float64"] = (torch_crosscheck.run_case(case.meta, case.arrays)[0], "float64")
        else:
            runs["npattn float32"] = (golden.run(case.meta, case.arrays, np.float32), "float32")
            try:
                t32 = torch_float32(case)
            except SystemExit:  # no PyTorch module for this block in torch_check.py
                t32 = None
            if t32 is not None:
                runs["pytorch float32"] = (t32, "float32")
        for name, (actual, dt) in runs.items():
            f = floor_needed(actual, expected, golden.TOLERANCES[dt], scale)
            worst[name] = max(worst.get(name, 0.0), f)
            print(f"{cid:<50} {name:<16} {f:.2e}")
    print()
    for name, f in sorted(worst.items()):
        dt = name.split()[-1]
        print(f"largest floor needed by {name:<16} {f:.2e}   (policy: {golden.TOLERANCES[dt]['floor']:g})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
