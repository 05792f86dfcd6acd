"""Run the other frameworks on npattn's fixtures and write the conformance matrix.

    python tools/conformance.py --all [--venvs DIR] [--results DIR] [--doc docs/conformance.md]
    python tools/conformance.py --frameworks paddle tvm ...      (some runners, then the doc)
    python tools/conformance.py --doc-only                        (the doc from stored results)

Each framework has a runner, ``tools/conformance/<framework>.py``, run with the Python
of its own virtual environment, ``<venvs>/<framework>/bin/python`` (``--venvs``, default
``$NPATTN_CONFORMANCE_VENVS`` or ``.conformance-venvs``; tools/ci_conformance.sh creates
them). A runner writes its results in the fixture key layout to ``<results>/<row>/`` and a
summary ``<results>/<row>.json``. This script then judges every result again with
``npattn.golden.check`` (results are compared in the case's dtype, so float32 results for
a float64 case are held to float64's tolerance) and classifies each case:

- pass;
- differs by convention: ``npattn check``'s diagnosis (the results match the twin case of
  the other border convention, ``_torchvision`` / ``_mmcv``);
- float32 arithmetic in a float64 case: ``npattn check``'s diagnosis (misses float64's
  tolerance, meets float32's);
- fails, with the figure (worst normwise relative error and the tensor);
- not expressible through the framework's public API (the runner says why).

It runs the minimal reproductions (``tools/conformance/repro_*.py``) too and writes the
matrix, the reproductions' output and the per-case figures to ``docs/conformance.md``.
Exit status 1 when a runner crashed or could not start (a framework that does not conform
is a result, not an error).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import subprocess
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from npattn import golden  # noqa: E402

# runner -> the virtual environment it runs in (Keras's backend is JAX: one environment)
VENV_OF = {"paddle": "paddle", "openvino": "openvino", "keras": "jax-keras", "jax": "jax-keras", "mindspore": "mindspore", "tvm": "tvm"}
# runner -> the rows it writes (a framework run two ways has two rows)
RUNNERS = {
    "paddle": ["paddle"],
    "openvino": ["openvino", "openvino_pad_false"],
    "keras": ["keras", "keras_unfused"],
    "jax": ["jax", "jax_dot_product_attention"],
    "mindspore": ["mindspore"],
    "tvm": ["tvm"],
}
ROWS = {
    "paddle": "PaddlePaddle `paddle.vision.ops.deform_conv2d`, `paddle.nn.MultiHeadAttention`",
    "openvino": "OpenVINO DeformableConvolution-8 (`bilinear_interpolation_pad=True`), ScaledDotProductAttention-13",
    "openvino_pad_false": "OpenVINO DeformableConvolution-8, default `bilinear_interpolation_pad=False`",
    "keras": "Keras 3 (JAX) `MultiHeadAttention`, default path",
    "keras_unfused": "Keras 3 (JAX) `MultiHeadAttention`, `return_attention_scores=True`",
    "jax": "JAX: SDPA in `jnp`, SE channels-last",
    "jax_dot_product_attention": "JAX `jax.nn.dot_product_attention`",
    "mindspore": "MindSpore `ops.deformable_conv2d`, `nn.MultiheadAttention`",
    "tvm": "Apache TVM `topi.nn.deformable_conv2d_nchw`",
}
# (title, script, runner whose venv runs it, {row: outcome it explains})
REPROS = [
    ("Apache TVM: every sample with -1 < p < 0 is zero", "repro_tvm_negative_p.py", "tvm", {"tvm": "fails"}),
    ("Keras and JAX: float64 logits computed in float32", "repro_keras_jax_float32_logits.py", "keras",
     {"keras": "float32", "jax_dot_product_attention": "float32"}),
    ("OpenVINO: the default bilinear_interpolation_pad=False is asymmetric", "repro_openvino_pad_false.py", "openvino",
     {"openvino_pad_false": "fails"}),
    ("OpenVINO: its ONNX importer cannot read DeformConv-19 (and the workaround)", "repro_openvino_onnx_deformconv19.py",
     "openvino", {}),
]
REPRO_TEXT = {
    "repro_tvm_negative_p.py": (
        "TVM's sampler tests `h < 0 || w < 0` for outside, so a sample between the outside corner -1 and the "
        "first pixel is dropped instead of weighted: a single tap at dx = -0.5 gives 0 where torchvision, ONNX "
        "and npattn give 0.5 x[0]. Integer offsets agree, random ones do not. Its compute also asserts for more "
        "than one weight group, so only the groups-1 fixtures run."
    ),
    "repro_keras_jax_float32_logits.py": (
        "`jax.nn.dot_product_attention` (which Keras's layer calls on its default path) computes the logits in "
        "float32 whatever the input dtype, so a float64 layer has float32 precision (about 1e-7). Asking the "
        "layer for the attention scores takes Keras's einsum path, which stays in float64. "
        "`jax.nn.dot_product_attention` also needs the value width equal to the query width (Ev == E), its "
        "layout is (B, T, N, H) (`npattn.layouts.bhtd_to_bthd`), and a fully masked query row gives the mean of v."
    ),
    "repro_openvino_pad_false.py": (
        "With the default `bilinear_interpolation_pad=False`, samples at -1 < p < 0 give 0 while samples at "
        "W - 1 < p < W are clamped to x[W - 1]. `bilinear_interpolation_pad=True` gives torchvision's bilinear "
        "sampling with zero outside: use it."
    ),
    "repro_openvino_onnx_deformconv19.py": (
        "`npattn export CASE DIR --format onnx` writes one standard DeformConv node (opset 19); "
        "`openvino.Core().read_model` refuses it. OpenVINO's own ONNX-domain op (`org.openvinotoolkit` "
        "DeformableConv2D) reads, but samples with pad=False, so torchvision's semantics cannot reach OpenVINO "
        "through ONNX. Workaround: read the node's attributes and tensors with `onnx` and build "
        "`openvino.opset8.deformable_convolution(..., bilinear_interpolation_pad=True)` (plus the bias) directly."
    ),
}


def default_venvs() -> pathlib.Path:
    return pathlib.Path(os.environ.get("NPATTN_CONFORMANCE_VENVS", ROOT / ".conformance-venvs"))


# ---------------------------------------------------------------------------- judging

def classify(case_id: str, results: dict, manifest: dict, golden_dir=None) -> dict:
    """Judge one case's results: {"kind": pass|convention|float32|fails, "text", "rel_err", "tensor"}."""
    meta = manifest[case_id]
    case_dtype = np.dtype(meta["dtype"])
    given = str(results["output"].dtype)
    # compare in the case's dtype: float32 results for a float64 case meet float64's tolerance or not
    cast = {k: (v.astype(case_dtype) if v.dtype.kind == "f" else v) for k, v in results.items()}
    report = golden.check(case_id, cast, golden_dir)
    judged = [t for t in report.tensors if t.status in ("ok", "mismatch")]
    worst = max(judged, key=lambda t: t.max_rel_err, default=None)
    rel, tensor = (worst.max_rel_err, worst.key) if worst else (0.0, "")
    dtype_note = f" (results in {given})" if given != case_dtype.name else ""
    if report.ok:
        return {"kind": "pass", "text": f"pass{dtype_note}", "rel_err": rel, "tensor": tensor}
    bad = [t for t in report.tensors if not t.passed]
    # npattn check's own diagnoses name the other border convention and float32 arithmetic
    for d in report.diagnoses:
        if "convention" in d:
            conv = "mmcv" if "follow the mmcv" in d else "torchvision"
            return {"kind": "convention", "text": d, "rel_err": rel, "tensor": tensor, "convention": conv}
    for d in report.diagnoses:
        if "float32" in d:
            return {"kind": "float32", "text": d + dtype_note, "rel_err": rel, "tensor": tensor}
    what = "; ".join(f"{t.key}: {t.status}" + (f" {t.n_mismatch}/{t.size}" if t.status == "mismatch" else f" {t.detail}") for t in bad)
    return {"kind": "fails", "text": f"fails: max rel err {rel:.2g} on {tensor} ({what}){dtype_note}", "rel_err": rel, "tensor": tensor}


def judge_row(results_dir: pathlib.Path, row: str, manifest: dict, golden_dir=None):
    """The summary of one row with every run case classified; None when absent."""
    path = results_dir / f"{row}.json"
    if not path.is_file():
        return None
    summary = json.loads(path.read_text())
    for case_id, rec in summary["cases"].items():
        if rec["status"] == "run":
            results = golden.read_npz(results_dir / rec["results"])
            rec["judged"] = classify(case_id, results, manifest, golden_dir)
    return summary


# ---------------------------------------------------------------------------- the document

def _family(case_id):
    return case_id.split("/", 1)[0]


def cell(records: list) -> str:
    """One matrix cell from the records of one row and one family."""
    if not records:
        return "—"
    groups = {}
    for case_id, rec in records:
        if rec["status"] == "run":
            j = rec["judged"]
            key = (j["kind"], j.get("convention"))
        else:
            key = (rec["status"], None)
        groups.setdefault(key, []).append((case_id, rec))
    parts = []
    order = ["pass", "convention", "float32", "fails", "crashed", "not run", "not expressible"]
    for (kind, conv), items in sorted(groups.items(), key=lambda kv: order.index(kv[0][0])):
        n = len(items)
        if kind == "pass":
            figures = []
            for suffix in ("_f64", "_f32"):
                errs = [r["judged"]["rel_err"] for c, r in items if c.endswith(suffix)]
                if errs:
                    figures.append(f"{suffix[1:]} ≤ {max(errs):.1e}")
            parts.append(f"**pass** {n} ({', '.join(figures)})")
        elif kind == "convention":
            which = conv or "another"
            parts.append(f"**differs by convention** {n}: {which} at p = -1")
        elif kind == "float32":
            worst = max(r["judged"]["rel_err"] for _, r in items)
            parts.append(f"**float32 arithmetic in a float64 case** {n} ({worst:.1e})")
        elif kind == "fails":
            worst = max(items, key=lambda it: it[1]["judged"]["rel_err"])[1]["judged"]
            parts.append(f"**fails** {n} (up to {worst['rel_err']:.2g} on {worst['tensor']})")
        elif kind == "crashed":
            parts.append(f"**crashed** {n}")
        elif kind == "not run":
            parts.append(f"not run {n}")
        else:
            parts.append(f"not expressible {n}")
    return "; ".join(parts)


def write_doc(doc: pathlib.Path, results_dir: pathlib.Path, summaries: dict, repro_out: dict, timings: dict, golden_dir=None):
    families = sorted({_family(c) for s in summaries.values() if s for c in s["cases"]})
    lines = [
        "# Conformance of other frameworks",
        "",
        "<!-- generated by `python tools/conformance.py --all`; do not edit by hand -->",
        "",
        "Each framework that ships one of npattn's ops was run on npattn's golden fixtures by its runner,",
        "`tools/conformance/<framework>.py`, through the layout adapters of `npattn.layouts` (NHWC, Keras's",
        "EinsumDense kernels, torch's and Keras's masks, MindSpore's packed offsets, (B, T, H, D) heads); each",
        "result was judged with `npattn.golden.check` under the tolerances of the case's dtype. Gradients are",
        "compared where the framework computes them (OpenVINO and TVM have no training graph: output only).",
        "",
        f"Generated {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC on {platform.machine()} "
        f"Linux, Python {platform.python_version()}, npattn {__import__('npattn').__version__}.",
        "",
        "## Versions",
        "",
        "| row | framework | versions | runner wall time |",
        "|---|---|---|---|",
    ]
    for runner, rows in RUNNERS.items():
        for row in rows:
            s = summaries.get(row)
            if not s:
                lines.append(f"| `{row}` | {ROWS[row]} | not run | |")
                continue
            v = ", ".join(f"{k} {val}" for k, val in s["versions"].items())
            t = timings.get(runner)
            lines.append(f"| `{row}` | {ROWS[row]} | {v} | {f'{t:.0f} s' if t is not None and row == rows[0] else ''} |")
    lines += [
        "",
        "## Matrix",
        "",
        "Rows: framework (and the way it was called); columns: fixture family (`golden/<family>/`). A cell counts",
        "the family's cases (float64 and float32 twins) by outcome: **pass** (with the worst normwise relative",
        "error of the float64 and of the float32 cases), **differs by convention** (which), **float32",
        "arithmetic in a float64 case** (misses float64's tolerance, meets float32's), **fails** (with the",
        "figure), not expressible through the framework's public API, or not run (an expressible layer this",
        "runner does not compose); reasons under [Not expressible](#not-expressible). —: the runner takes no",
        "case of the family (the framework has no such op, or it is not run here). Families no runner takes",
        "are left out.",
        "",
        "| | " + " | ".join(f"`{f}`" for f in families) + " |",
        "|---|" + "---|" * len(families),
    ]
    for runner, rows in RUNNERS.items():
        for row in rows:
            s = summaries.get(row)
            if not s:
                lines.append(f"| `{row}` | " + " | ".join("runner did not run" for _ in families) + " |")
                continue
            cells = [cell([(c, r) for c, r in sorted(s["cases"].items()) if _family(c) == f]) for f in families]
            lines.append(f"| `{row}` | " + " | ".join(cells) + " |")
    lines += ["", "## Discrepancies", ""]
    for title, script, runner, explains in REPROS:
        lines += [f"### {title}", "", REPRO_TEXT[script], "",
                  f"Reproduction: `tools/conformance/{script}` (run in the `{VENV_OF[runner]}` environment). Its output in this run:", ""]
        out = repro_out.get(script)
        lines += ["```", (out or "(not run)").rstrip(), "```", ""]
        affected = []
        for row, kind in explains.items():
            s = summaries.get(row) or {"cases": {}}
            for c, r in sorted(s["cases"].items()):
                if r["status"] == "run" and r["judged"]["kind"] == kind:
                    affected.append(f"- `{row}` `{c}`: {r['judged']['text']}")
        if affected:
            lines += ["Cases of this run where it shows:", ""] + affected + [""]
    f32 = [(c, r) for c, r in sorted((summaries.get("openvino") or {"cases": {}})["cases"].items())
           if r["status"] == "run" and r["judged"]["kind"] == "float32"]
    lines += ["### OpenVINO: float64 models run in float32, and by default in bfloat16 where the CPU has it", "",
              "A model built from float64 parameters and constants returns float64 arrays, but the CPU plugin",
              "computes in float32 at best, so the float64 cases meet float32's tolerance and not float64's. On a CPU",
              "with bfloat16 instructions (AVX512-BF16, AMX) the plugin's default `INFERENCE_PRECISION_HINT` is bf16:",
              "the offset convolution of the `*_pack` layers then errs by about 5e-3 (the deformable convolution",
              "itself stayed in float32 here). The runner compiles every model with `INFERENCE_PRECISION_HINT=f32`;",
              f"this run: {(summaries.get('openvino') or {}).get('versions', {}).get('inference precision', 'not run')}. Float64 cases of this run:", ""]
    lines += [f"- `openvino` `{c}`: {r['judged']['text']} (max rel err {r['judged']['rel_err']:.1e})" for c, r in f32] or ["- none"]
    lines.append("")
    conv = [(row, c, r) for row, s in summaries.items() if s for c, r in sorted(s["cases"].items())
            if r["status"] == "run" and r["judged"]["kind"] == "convention"]
    lines += ["### Offset-gradient conventions at p = -1", "",
              "Where a sample sits exactly on p = -1 (zero offsets with padding: a layer's initial state), torchvision",
              "and mmcv give different offset gradients (`border_grad` in the manifest; see",
              "`npattn.functional.deform_conv2d_forward`). The fixtures hold both conventions as twin cases",
              "(`zero_offsets_pad1_torchvision` and `zero_offsets_pad1_mmcv`); a framework that matches one twin",
              "and not the other follows that convention. This run:", ""]
    lines += [f"- `{row}` `{c}`: {r['judged']['text']}" for row, c, r in conv] or ["- none"]
    lines += ["", "### Not expressible", ""]
    for row, s in summaries.items():
        if not s:
            continue
        reasons = {}
        for c, r in sorted(s["cases"].items()):
            if r["status"] in ("not expressible", "not run"):
                reasons.setdefault((r["status"], r["reason"]), []).append(c)
        for (status, reason), cs in reasons.items():
            fams = sorted({_family(c) for c in cs})
            lines.append(f"- `{row}`, {status} ({len(cs)} cases of {', '.join(f'`{f}`' for f in fams)}): {reason}")
    lines += ["", "## Every case", "",
              "Worst normwise relative error (max |theirs - fixture| / max(max |fixture|, floor)) over the compared",
              "tensors, and the tensor it is on.", ""]
    for row, s in summaries.items():
        if not s:
            continue
        run = [(c, r) for c, r in sorted(s["cases"].items()) if r["status"] in ("run", "crashed")]
        if not run:
            continue
        lines += [f"### `{row}`", "", "| case | outcome | rel err | tensor | compared | note |", "|---|---|---|---|---|---|"]
        for c, r in run:
            if r["status"] == "crashed":
                lines.append(f"| `{c}` | crashed: {r['reason']} | | | | |")
                continue
            j = r["judged"]
            compared = "output only" if r["keys"] == ["output"] else f"{len(r['keys'])} tensors"
            lines.append(f"| `{c}` | {j['text']} | {j['rel_err']:.2e} | {j['tensor']} | {compared} | {r.get('note', '')} |")
        lines.append("")
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text("\n".join(lines).rstrip() + "\n")


# ---------------------------------------------------------------------------- running

def run_runner(name: str, venvs: pathlib.Path, results: pathlib.Path, golden_dir=None):
    """Run one runner in its venv; returns (exit status, seconds)."""
    python = venvs / VENV_OF[name] / "bin" / "python"
    if not python.exists():
        print(f"== {name}: no environment at {python.parent.parent} (tools/ci_conformance.sh creates it)", file=sys.stderr)
        return 2, 0.0
    cmd = [str(python), str(ROOT / "tools" / "conformance" / f"{name}.py"), "--out", str(results)]
    if golden_dir:
        cmd += ["--golden", str(golden_dir)]
    env = dict(os.environ, PYTHONPATH=str(ROOT), KERAS_BACKEND="jax")
    start = time.perf_counter()
    results.mkdir(parents=True, exist_ok=True)
    with open(results / f"{name}.log", "w") as log:
        rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    seconds = time.perf_counter() - start
    print(f"== {name}: exit {rc} in {seconds:.1f} s (log: {results / f'{name}.log'})")
    if rc:
        print((results / f"{name}.log").read_text()[-3000:], file=sys.stderr)
    return rc, seconds


def run_repro(script: str, runner: str, venvs: pathlib.Path) -> str:
    python = venvs / VENV_OF[runner] / "bin" / "python"
    if not python.exists():
        return f"(not run: no {VENV_OF[runner]} environment)"
    env = dict(os.environ, PYTHONPATH=str(ROOT), KERAS_BACKEND="jax")
    proc = subprocess.run([str(python), str(ROOT / "tools" / "conformance" / script)], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=600)
    out = proc.stdout
    if proc.returncode:
        out += f"\n(exit {proc.returncode})\n" + proc.stderr[-2000:]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--all", action="store_true", help="run every runner and reproduction, then write the doc")
    ap.add_argument("--frameworks", nargs="*", choices=sorted(RUNNERS), default=None, help="run only these runners")
    ap.add_argument("--doc-only", action="store_true", help="write the doc from the stored results")
    ap.add_argument("--venvs", default=None, help="folder of the per-framework venvs (default $NPATTN_CONFORMANCE_VENVS or .conformance-venvs)")
    ap.add_argument("--results", default=str(ROOT / "build" / "conformance"))
    ap.add_argument("--doc", default=str(ROOT / "docs" / "conformance.md"))
    ap.add_argument("--golden", default=None)
    args = ap.parse_args(argv)
    venvs = pathlib.Path(args.venvs) if args.venvs else default_venvs()
    results = pathlib.Path(args.results)
    chosen = list(RUNNERS) if args.all else (args.frameworks or [])
    if not chosen and not args.doc_only:
        ap.error("give --all, --frameworks NAME ..., or --doc-only")
    failed = []
    timings_path = results / "timings.json"
    timings = json.loads(timings_path.read_text()) if timings_path.is_file() else {}
    repro_path = results / "repros.json"
    repro_out = json.loads(repro_path.read_text()) if repro_path.is_file() else {}
    for name in chosen:
        for row in RUNNERS[name]:  # no stale results of a row
            (results / f"{row}.json").unlink(missing_ok=True)
        rc, seconds = run_runner(name, venvs, results, args.golden)
        timings[name] = seconds
        if rc:
            failed.append(name)
    for _, script, runner, _ in REPROS:
        if runner in chosen:
            repro_out[script] = run_repro(script, runner, venvs)
    if chosen:
        results.mkdir(parents=True, exist_ok=True)
        timings_path.write_text(json.dumps(timings, indent=1, sort_keys=True) + "\n")
        repro_path.write_text(json.dumps(repro_out, indent=1, sort_keys=True) + "\n")
    manifest = golden.list_cases(args.golden)
    summaries = {row: judge_row(results, row, manifest, args.golden) for rows in RUNNERS.values() for row in rows}
    write_doc(pathlib.Path(args.doc), results, summaries, repro_out, timings, args.golden)
    print(f"wrote {args.doc}")
    for row, s in summaries.items():
        if s:
            kinds = {}
            for r in s["cases"].values():
                k = r["judged"]["kind"] if r["status"] == "run" else r["status"]
                kinds[k] = kinds.get(k, 0) + 1
            print(f"  {row:<28} " + ", ".join(f"{k} {n}" for k, n in sorted(kinds.items())))
    if failed:
        print(f"runners that crashed or could not start: {failed}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
