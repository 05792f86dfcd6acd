"""The ``npattn`` command (also ``python -m npattn``)."""

from __future__ import annotations

import argparse
import sys


def _demo_cases():
    """(name, forward, backward, inputs) for every primitive op, on uneven shapes."""
    import numpy as np

    from . import functional as F

    r = np.random.default_rng(0)
    x = r.standard_normal((3, 4, 7, 5))
    away = np.sign(x) * (np.abs(x) + 0.1)  # away from the kinks of relu / abs
    rm, rv = r.standard_normal(4), r.random(4) + 0.5

    def conv(x, weight, bias):
        return F.conv2d_forward(x, weight, bias, stride=(2, 1), padding=(1, 0), dilation=(2, 1), groups=2)

    def bn_train(x, weight, bias):
        return F.batch_norm_forward(x, weight, bias, rm, rv, training=True)

    def bn_eval(x, weight, bias):
        return F.batch_norm_forward(x, weight, bias, rm, rv, training=False)

    bn_in = {"x": x, "weight": r.standard_normal(4), "bias": r.standard_normal(4)}
    allowed = r.random((4, 6)) < 0.7  # attention mask, True = attend; key 0 for every query
    allowed[:, 0] = True
    return [
        ("conv2d", conv, F.conv2d_backward, {"x": x, "weight": r.standard_normal((6, 2, 3, 2)), "bias": r.standard_normal(6)}),
        ("linear", F.linear_forward, F.linear_backward, {"x": r.standard_normal((3, 5)), "weight": r.standard_normal((4, 5)), "bias": r.standard_normal(4)}),
        ("batch_norm (training)", bn_train, F.batch_norm_backward, bn_in),
        ("batch_norm (eval)", bn_eval, F.batch_norm_backward, bn_in),
        ("relu", F.relu_forward, F.relu_backward, {"x": away}),
        ("sigmoid", F.sigmoid_forward, F.sigmoid_backward, {"x": x}),
        ("tanh", F.tanh_forward, F.tanh_backward, {"x": x}),
        ("abs", F.abs_forward, F.abs_backward, {"x": away}),
        ("softmax(axis=1)", lambda x: F.softmax_forward(x, 1), F.softmax_backward, {"x": x}),
        ("global_avg_pool2d", F.global_avg_pool2d_forward, F.global_avg_pool2d_backward, {"x": x}),
        ("spatial_sum", F.spatial_sum_forward, F.spatial_sum_backward, {"x": x}),
        ("conv1d", lambda x, weight: F.conv1d_forward(x, weight, padding=1), F.conv1d_backward,
         {"x": r.standard_normal((3, 1, 7)), "weight": r.standard_normal((1, 1, 3))}),
        ("mean(axis=(2, 3))", lambda x: F.mean_forward(x, (2, 3)), F.mean_backward, {"x": x}),
        ("amax(axis=(2, 3))", lambda x: F.amax_forward(x, (2, 3)), F.amax_backward, {"x": x}),
        ("layer_norm2d", F.layer_norm2d_forward, F.layer_norm2d_backward,
         {"x": x, "weight": r.uniform(0.5, 1.5, x.shape[1]), "bias": r.standard_normal(x.shape[1])}),
        ("layer_norm (last axis)", F.layer_norm_forward, F.layer_norm_backward,
         {"x": r.standard_normal((3, 4, 5)), "weight": r.uniform(0.5, 1.5, 5), "bias": r.standard_normal(5)}),
        ("hardswish", F.hardswish_forward, F.hardswish_backward, {"x": 2 * away}),
        ("amax first(axis=(2, 3))", lambda x: F.amax_forward(x, (2, 3), max_grad="first"), F.amax_backward, {"x": x}),
        ("l2_norm(axis=(2, 3))", lambda x: F.l2_norm_forward(x, (2, 3)), F.l2_norm_backward, {"x": x}),
        ("logsumexp(axis=(2, 3))", lambda x: F.logsumexp_forward(x, (2, 3)), F.logsumexp_backward, {"x": x}),
        ("silu", F.silu_forward, F.silu_backward, {"x": x}),
        ("gelu", F.gelu_forward, F.gelu_backward, {"x": x}),
        ("hard_sigmoid", F.hard_sigmoid_forward, F.hard_sigmoid_backward, {"x": 2 * away}),
        ("scaled_dot_product_attention", lambda q, k, v: F.scaled_dot_product_attention_forward(q, k, v, attn_mask=allowed),
         F.scaled_dot_product_attention_backward, {"q": r.standard_normal((2, 4, 3)), "k": r.standard_normal((2, 6, 3)), "v": r.standard_normal((2, 6, 2))}),
        ("sdpa variants (GQA, causal bottom-right, ALiBi, softcap)",
         lambda q, k, v: F.scaled_dot_product_attention_forward(
             q, k, v, is_causal=True, alignment="bottom_right", alibi_slopes=np.array([0.5, 0.25, 0.125, 0.0625]),
             softcap=4.0, enable_gqa=True),
         F.scaled_dot_product_attention_backward,
         {"q": r.standard_normal((2, 4, 3, 3)), "k": r.standard_normal((2, 2, 5, 3)), "v": r.standard_normal((2, 2, 5, 2))}),
        ("varlen_attention (causal, an empty sequence)",
         lambda q, k, v: F.varlen_attention_forward(q, k, v, np.array([0, 3, 3, 7]), np.array([0, 4, 4, 9]), is_causal=True,
                                                    alignment="bottom_right"),
         F.varlen_attention_backward,
         {"q": r.standard_normal((7, 2, 3)), "k": r.standard_normal((9, 2, 3)), "v": r.standard_normal((9, 2, 2))}),
        ("rotary_embedding (interleaved)",
         lambda x: F.rotary_embedding_forward(x, np.arange(5.0), interleaved=True), F.rotary_embedding_backward,
         {"x": r.standard_normal((2, 5, 6))}),
    ]


def cmd_demo(args) -> int:
    """Run every primitive op forward and backward and print its finite-difference errors."""
    from .gradcheck import gradcheck

    cases = _demo_cases()
    w = max(len(c[0]) for c in cases)
    print(f"{'op':<{w}} {'tensor':<8} {'max abs err':>12} {'rel err':>10}  ok")
    failures = 0
    for name, fwd, bwd, inputs in cases:
        report = gradcheck(fwd, bwd, inputs, raise_on_failure=False)
        failures += not report.ok
        for t in report.tensors:
            print(f"{name:<{w}} {t.name:<8} {t.max_abs_err:12.2e} {t.rel_err:10.2e}  {'yes' if t.passed else 'NO'}")
        for p in report.problems:
            print(f"{name:<{w}} problem: {p}")
    print(f"\n{'all ops passed' if not failures else f'{failures} op(s) FAILED'} (float64 central differences)")
    return 1 if failures else 0


def _progress(i, n, label, stream=sys.stderr):
    """A one-line progress display on a terminal (nothing when piped)."""
    if stream.isatty():
        width = 24
        done = int(width * i / n) if n else width
        stream.write(f"\r[{'#' * done}{'.' * (width - done)}] {i}/{n} {label[:40]:<40}")
        stream.flush()
        if i == n:
            stream.write("\r" + " " * (width + 50) + "\r")


def cmd_list(args) -> int:
    from . import golden

    try:
        cases = golden.list_cases(args.golden)
    except golden.GoldenError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    args.rc = 0
    print(f"{'case':<34} {'block':<26} {'mode':<6} {'dtype':<8} shapes")
    for cid, meta in cases.items():
        shapes = ", ".join(f"{k} {tuple(v)}" for k, v in meta.get("shapes", {}).items())
        print(f"{cid:<34} {meta.get('block', '?'):<26} {meta.get('mode', '?'):<6} {meta.get('dtype', '?'):<8} {shapes}")
    print(f"{len(cases)} cases")
    return 0


def cmd_verify(args) -> int:
    import time

    from . import golden

    try:
        cases = golden.list_cases(args.golden)
    except golden.GoldenError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    selected = [c for c in cases if not args.cases or any(c.startswith(p) for p in args.cases)]
    failures = 0
    t0 = time.perf_counter()
    for i, cid in enumerate(selected, 1):
        _progress(i - 1, len(selected), cid)
        t = time.perf_counter()
        res = golden.verify_case(cid, cases[cid], args.golden, fd_check=not args.no_fd)
        failures += not res.ok
        dt = time.perf_counter() - t
        if res.ok:
            fd = "" if args.no_fd else f", fd rel err {res.fd_rel_err:.1e}"
            print(f"[{i}/{len(selected)}] {cid:<34} ok   (recomputed rel err {res.max_rel_err:.1e}{fd}, {dt:.1f} s)")
        else:
            print(f"[{i}/{len(selected)}] {cid:<34} FAIL {res.message}")
    _progress(len(selected), len(selected), "")
    print(f"\n{len(selected) - failures} of {len(selected)} cases verified, {failures} failed ({time.perf_counter() - t0:.1f} s)")
    return 1 if failures or not selected else 0


def cmd_check(args) -> int:
    import json

    from . import golden

    try:
        outputs = golden.read_results(args.outputs)
        report = golden.check(args.case, outputs, args.golden)
    except golden.GoldenError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    # 0 pass, 1 mismatch, 2 results that do not follow the case's layout
    args.rc = 2 if report.malformed else (0 if report.ok else 1)
    if args.json:
        print(json.dumps(report.to_dict(), indent=1))
    elif report.malformed:
        for line in report.malformed:
            print(f"error: results file {args.outputs}: {line}", file=sys.stderr)
    else:
        print(report)
    return args.rc


def cmd_export(args) -> int:
    from . import golden

    try:
        if args.format == "onnx":
            from .onnx_export import export_onnx

            paths = export_onnx(args.case, args.dir, args.golden, force=args.force)
        else:
            paths = golden.export(args.case, args.dir, args.golden, force=args.force)
    except golden.GoldenError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    args.rc = 0
    for p in paths:
        print(p)
    return 0


def cmd_explain(args) -> int:
    from . import explain

    try:
        ex = explain.find_example(args.block)
    except KeyError as exc:
        print(f"error: {exc.args[0]}", file=sys.stderr)
        return 2
    w = explain.walk(ex, args.seed)
    explain.report(w, args.values)
    args.rc = 0 if w.ok else 1
    return args.rc


def cmd_exercise(args) -> int:
    from . import exercise

    try:
        if args.block == "check":
            ok = exercise.check_dir(args.dir)
            args.rc = 0 if ok else 1
            return args.rc
        path = exercise.write(args.block, args.dir, force=args.force)
    except (KeyError, FileExistsError, exercise.ExerciseError) as exc:
        print(f"error: {exc.args[0] if exc.args else exc}", file=sys.stderr)
        return 2
    args.rc = 0
    print(path)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="npattn", description="NumPy reference for CNN attention blocks: golden fixtures and checks.")
    sub = parser.add_subparsers(dest="command", required=True)

    def golden_arg(p):
        p.add_argument("--golden", metavar="DIR", default=None, help="fixture directory (default: $NPATTN_GOLDEN, ./golden, or the checkout's)")

    p = sub.add_parser("list", help="list the golden cases with block, mode, dtype and shapes")
    golden_arg(p)
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("verify", help="recompute every case with npattn and compare with the stored fixtures")
    golden_arg(p)
    p.add_argument("cases", nargs="*", help="only cases whose id starts with one of these")
    p.add_argument("--no-fd", action="store_true", help="skip the finite-difference spot check")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("check", help="compare another framework's results with a case")
    golden_arg(p)
    p.add_argument("case", help="case id (see npattn list)")
    p.add_argument("outputs", help=".npz with 'output' and optionally 'grad.input.<name>', 'grad.param.<key>', 'buffer_after.<key>'")
    p.add_argument("--json", action="store_true", help="print the report as JSON (per-tensor figures, diagnoses)")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("export", help="write a case's inputs, state_dict and grad_output for another framework")
    golden_arg(p)
    p.add_argument("case")
    p.add_argument("dir")
    p.add_argument("--format", choices=("npz", "onnx"), default="npz",
                   help="npz (default): inputs.npz, state_dict.npz, grad_output.npy, case.json; onnx: an ONNX node "
                        "test (model.onnx with one DeformConv node, test_data_set_0/*.pb) for deform_conv2d and "
                        "DeformConv2d cases (needs the onnx package)")
    p.add_argument("--force", action="store_true", help="replace files that already exist in DIR (default: refuse)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("demo", help="run every primitive op forward and backward; print finite-difference errors")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("explain", help="walk a block's derivation on a small input: every forward and backward line, "
                                       "its shape and values, each backward line checked alone")
    p.add_argument("block", help="block class name, case-insensitive (SEBlock, CBAM, ...)")
    p.add_argument("--seed", type=int, default=0, help="seed of the input, parameters and directions (default 0)")
    p.add_argument("--values", type=int, default=4, metavar="N", help="values shown per variable (default 4)")
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser("exercise", help="write a block's backward as an exercise (npattn exercise BLOCK DIR), "
                                        "or grade the exercises in DIR (npattn exercise check DIR)")
    p.add_argument("block", help="block class name, or 'check' to grade DIR")
    p.add_argument("dir")
    p.add_argument("--force", action="store_true", help="replace a file that already exists (default: refuse)")
    p.set_defaults(func=cmd_exercise)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except BrokenPipeError:
        # the reader went away (``npattn check ... | head``): end quietly, with the
        # command's own exit status when it was known before the output was cut
        import os

        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return getattr(args, "rc", 1)


if __name__ == "__main__":
    sys.exit(main())
