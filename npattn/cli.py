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
    ]


def cmd_demo(args) -> int:
    """Run every primitive op forward and backward and print its finite-difference errors."""
    from .gradcheck import gradcheck

    print(f"{'op':<24} {'tensor':<8} {'max abs err':>12} {'rel err':>10}  ok")
    failures = 0
    for name, fwd, bwd, inputs in _demo_cases():
        report = gradcheck(fwd, bwd, inputs, raise_on_failure=False)
        failures += not report.ok
        for t in report.tensors:
            print(f"{name:<24} {t.name:<8} {t.max_abs_err:12.2e} {t.rel_err:10.2e}  {'yes' if t.passed else 'NO'}")
        for p in report.problems:
            print(f"{name:<24} problem: {p}")
    print(f"\n{'all ops passed' if not failures else f'{failures} op(s) FAILED'} (float64 central differences)")
    return 1 if failures else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="npattn", description="NumPy reference for CNN attention blocks.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="run every primitive op forward and backward; print finite-difference errors")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
