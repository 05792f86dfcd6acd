"""What every conformance runner (tools/conformance/<framework>.py) shares: choosing the
fixture cases, storing a framework's results under the fixture's key names, judging them
with ``npattn.golden.check``, and the exit status.

A runner gives, per case, either the framework's results (a dict keyed like the fixture:
``output``, ``grad.input.<name>``, ``grad.param.<key>``) or the reason the framework's
public API cannot express the case. Results go to ``<out>/<framework>/<case>.npz``
(``golden.write_npz``) and a summary to ``<out>/<framework>.json``; the matrix
(``tools/conformance.py``) is built from those files. A case that the runner meant to
run and that raised is a crash: the runner exits 1 (a framework whose results differ
from the fixture is a finding, exit 0).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time
import traceback

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from npattn import golden  # noqa: E402


def drop_own_dir(file):
    """Take a runner's folder off ``sys.path``: tools/conformance/paddle.py run as a script
    would otherwise shadow the ``paddle`` package it imports."""
    here = pathlib.Path(file).resolve().parent
    sys.path[:] = [p for p in sys.path if pathlib.Path(p or ".").resolve() != here]


def family(case_id: str) -> str:
    """The fixture family of a case: its folder (``deform_conv2d``, ``multihead_attention``)."""
    return case_id.split("/", 1)[0]


class Runner:
    """Collects one framework's results; ``main`` runs a runner's ``cases`` function."""

    def __init__(self, framework: str, versions: dict, out_dir, golden_dir=None):
        self.framework = framework
        self.versions = versions
        self.out = pathlib.Path(out_dir)
        self.golden_dir = golden_dir
        self.manifest = golden.list_cases(golden_dir)
        self.records = {}
        self.crashed = []

    def cases(self, *families):
        """(case id, Case) for every stored case of the given families, in manifest order."""
        for case_id in sorted(self.manifest):
            if family(case_id) in families:
                yield case_id, golden.load(case_id, self.golden_dir)

    def skip(self, case_id: str, reason: str, status: str = "not expressible"):
        """The framework's public API cannot express this case (or, with status "not
        run", this runner does not compose it): say why."""
        self.records[case_id] = {"status": status, "reason": reason}
        print(f"{case_id:<56} {status}: {reason}")

    def run(self, case_id: str, fn, note: str = ""):
        """Call ``fn()`` (the framework's computation, returning results under fixture
        keys), store and judge them. An exception is recorded as a crash."""
        start = time.perf_counter()
        try:
            results = {k: np.asarray(v) for k, v in fn().items()}
        except Exception as exc:  # noqa: BLE001 - recorded, and the runner exits 1
            self.crashed.append(case_id)
            self.records[case_id] = {"status": "crashed", "reason": f"{type(exc).__name__}: {exc}"}
            print(f"{case_id:<56} CRASHED: {type(exc).__name__}: {exc}")
            traceback.print_exc()
            return None
        seconds = time.perf_counter() - start
        path = self.out / self.framework / f"{case_id.replace('/', '__')}.npz"
        golden.write_npz(path, results)
        report = golden.check(case_id, results, self.golden_dir)
        worst = max(report.tensors, key=lambda t: t.max_rel_err, default=None)
        self.records[case_id] = {
            "status": "run",
            "results": str(path.relative_to(self.out)),
            "dtype": str(results["output"].dtype),
            "keys": sorted(results),
            "ok": bool(report.ok),
            "max_rel_err": float(worst.max_rel_err) if worst else 0.0,
            "worst_tensor": worst.key if worst else "",
            "note": note,
            "seconds": round(seconds, 3),
        }
        print(f"{case_id:<56} {'pass' if report.ok else 'MISMATCH'}  max rel err {self.records[case_id]['max_rel_err']:.2e}"
              f" ({self.records[case_id]['worst_tensor']})" + (f"  [{note}]" if note else ""))
        return report

    def finish(self) -> int:
        self.out.mkdir(parents=True, exist_ok=True)
        summary = {"framework": self.framework, "versions": self.versions, "cases": self.records, "crashed": self.crashed}
        (self.out / f"{self.framework}.json").write_text(json.dumps(summary, indent=1, sort_keys=True) + "\n")
        if self.crashed:
            print(f"{self.framework}: {len(self.crashed)} case(s) crashed: {self.crashed}", file=sys.stderr)
            return 1
        return 0


def main(framework: str, versions_fn, cases_fn, argv=None) -> int:
    """Command line of every runner: ``--out DIR`` (default build/conformance), ``--golden DIR``."""
    ap = argparse.ArgumentParser(description=f"Run {framework} on npattn's fixtures")
    ap.add_argument("--out", default=str(ROOT / "build" / "conformance"))
    ap.add_argument("--golden", default=None)
    args = ap.parse_args(argv)
    try:
        versions = versions_fn()
    except ImportError as exc:
        print(f"{framework} is not installed: {exc}", file=sys.stderr)
        return 2
    runner = Runner(framework, versions, args.out, args.golden)
    print(f"{framework}: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    try:
        cases_fn(runner)
    except Exception:  # noqa: BLE001 - a runner that fails outside a case crashed
        traceback.print_exc()
        runner.crashed.append("<runner>")
    return runner.finish()


# ---------------------------------------------------------------------------- helpers for several runners

# scaled_dot_product_attention keywords beyond a mask and a scale (issue 21's variants)
SDPA_VARIANTS = ("is_causal", "alignment", "window", "softcap", "enable_gqa", "dropout_p")


def sdpa_variant(case):
    """Why a scaled_dot_product_attention case is more than q, k, v, a mask and a scale
    (None when it is not): the runners here compose only those, so such a case is "not
    run" (its fixtures hold the variant's output and gradients)."""
    cfg = case.meta.get("config") or {}
    used = [k for k in SDPA_VARIANTS if cfg.get(k) not in (None, False, 0, 0.0, "top_left")]
    used += [n for n in ("alibi_slopes", "dropout_mask") if f"input.{n}" in case.arrays]
    if "grad_output.lse" in case.arrays:
        used.append("an upstream gradient of the lse")
    return ", ".join(used) or None


def deform_arrays(case):
    """The deform_conv2d arguments of a function case or a DeformConv2d block case, in
    torchvision's layout: input, offset, weight, bias (or None), mask (or None), and the
    geometry (stride, padding, dilation as pairs, groups and offset groups as the manifest
    states them, border_grad)."""
    a, cfg = case.arrays, case.meta["config"]
    if case.meta["kind"] == "function":
        x, offset, weight = a["input.input"], a["input.offset"], a["input.weight"]
        bias, mask = a.get("input.bias"), a.get("input.mask")
    else:
        x, offset, weight = a["input.x"], a["input.offset"], a["param.weight"]
        bias, mask = a.get("param.bias"), a.get("input.mask")

    def pair(v, default):
        v = cfg.get(v, default)
        return (v, v) if isinstance(v, int) else tuple(v)

    kh, kw = weight.shape[2:]
    # the manifest states both groups (the frameworks take them as arguments); the shapes agree
    groups = cfg.get("groups", x.shape[1] // weight.shape[1])
    offset_groups = cfg.get("offset_groups", offset.shape[1] // (2 * kh * kw))
    if (groups, offset_groups) != (x.shape[1] // weight.shape[1], offset.shape[1] // (2 * kh * kw)):
        raise ValueError(f"{case.case_id}: the manifest's groups {groups} / offset_groups {offset_groups} disagree with the shapes")
    geometry = {
        "stride": pair("stride", 1), "padding": pair("padding", 0), "dilation": pair("dilation", 1),
        "groups": groups, "offset_groups": offset_groups, "border_grad": cfg.get("border_grad", "torchvision"),
    }
    return x, offset, weight, bias, mask, geometry


def deform_result_keys(case):
    """Fixture keys of the deform results: grad of input, offset, weight, bias, mask."""
    if case.meta["kind"] == "function":
        return {n: f"grad.input.{n}" for n in ("input", "offset", "weight", "bias", "mask")}
    return {"input": "grad.input.x", "offset": "grad.input.offset", "weight": "grad.param.weight",
            "bias": "grad.param.bias", "mask": "grad.input.mask"}
