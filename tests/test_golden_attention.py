"""The attention-variant fixtures: every variant keyword has a case in both dtypes, every
attention case stores the log-sum-exp as ``output.lse`` (-inf for a query with no key)
and ``npattn check`` compares it; a case with ``grad_output.lse`` has gradients that
include it (recomputed here from the npattn functions, and by central differences)."""

import pathlib
import subprocess
import sys

import numpy as np
import pytest

from npattn import functional as F
from npattn import golden

ROOT = pathlib.Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "golden"
ATTENTION = ("scaled_dot_product_attention", "varlen_attention")


@pytest.fixture(scope="module")
def cases():
    return golden.list_cases(GOLDEN)


def test_every_keyword_has_a_fixture_in_both_dtypes(cases):
    seen = set()
    for cid, meta in cases.items():
        if meta["block"] not in ATTENTION + ("rotary_embedding",):
            continue
        assert cid[:-3] + ("f32" if cid.endswith("f64") else "f64") in cases
        cfg = meta["config"]
        seen |= {k for k, v in cfg.items() if v not in (None, False, 0.0)}
        seen |= {f"alignment={cfg.get('alignment', 'top_left')}"} if cfg.get("is_causal") or cfg.get("window") else set()
        seen |= set(meta["inputs"]) - {"q", "k", "v", "x"}
        seen |= {meta["block"]}
    assert {"is_causal", "alignment=top_left", "alignment=bottom_right", "window", "alibi_slopes", "softcap", "enable_gqa",
            "dropout_mask", "dropout_p", "attn_mask", "scale", "cu_seqlens_q", "interleaved", "positions",
            "varlen_attention", "rotary_embedding"} <= seen, seen
    with_dlse = [cid for cid in cases if cases[cid]["block"] in ATTENTION
                 and "grad_output.lse" in golden.read_npz(GOLDEN / cases[cid]["file"])]
    assert {cases[c]["block"] for c in with_dlse} == set(ATTENTION)
    # the two cases another issue needs: Ev == E, and a fully masked query row
    assert "scaled_dot_product_attention/ev_equals_e_eval_f64" in cases
    ev = cases["scaled_dot_product_attention/ev_equals_e_eval_f64"]["shapes"]
    assert ev["v"][-1] == ev["q"][-1]
    rows = golden.load("scaled_dot_product_attention/fully_masked_rows_eval_f64", GOLDEN)
    empty = ~rows.arrays["input.attn_mask"].any(axis=-1)
    assert empty.any() and np.all(np.isneginf(rows.arrays["output.lse"][empty]))
    assert not rows.arrays["output"][empty].any() and not rows.arrays["grad.input.q"][empty].any()


def test_attention_fixtures_hold_the_lse_and_their_gradients_include_dlse(cases):
    for cid, meta in cases.items():
        if meta["block"] not in ATTENTION or meta["dtype"] != "float64":
            continue
        case = golden.load(cid, GOLDEN)
        a = case.arrays
        assert "output.lse" in case.expected()
        inputs = {n: a[f"input.{n}"] for n in meta["inputs"]}
        fwd, bwd = ((F.scaled_dot_product_attention_forward, F.scaled_dot_product_attention_backward)
                    if meta["block"] == ATTENTION[0] else (F.varlen_attention_forward, F.varlen_attention_backward))
        out, cache = fwd(**inputs, **{k: (tuple(v) if isinstance(v, list) else v) for k, v in meta["config"].items()})
        np.testing.assert_array_equal(np.isneginf(cache.lse), np.isneginf(a["output.lse"]))
        g = bwd(a["grad_output"], cache, dlse=a.get("grad_output.lse"))
        for n in ("q", "k", "v"):
            scale = max(float(np.max(np.abs(a[f"grad.input.{n}"]))), 1e-300)
            assert np.max(np.abs(g[n] - a[f"grad.input.{n}"])) <= 1e-13 * scale, (cid, n)
        if "grad_output.lse" in a:  # the lse term matters: without it the gradients differ
            g0 = bwd(a["grad_output"], cache)
            assert np.max(np.abs(g0["q"] - a["grad.input.q"])) > 1e-3 * np.max(np.abs(a["grad.input.q"]))
            report = golden.spot_check_gradients(meta, a)
            assert report.ok and report.max_rel_err < 1e-6, str(report)


def test_check_compares_the_lse(tmp_path, cases):
    cid = "scaled_dot_product_attention/causal_bottom_right_l5_s3_empty_rows_eval_f64"
    case = golden.load(cid, GOLDEN)
    expected = case.expected()
    assert np.isneginf(expected["output.lse"]).any()
    assert golden.check(cid, dict(expected), GOLDEN).ok  # -inf against -inf: no error
    report = golden.check(cid, {"output": expected["output"]}, GOLDEN)
    assert report.ok and [t.status for t in report.tensors if t.key == "output.lse"] == ["not provided"]
    wrong = dict(expected)
    wrong["output.lse"] = expected["output.lse"].copy()
    finite = np.argwhere(np.isfinite(wrong["output.lse"]))[0]
    wrong["output.lse"][tuple(finite)] *= 1 + 1e-5
    bad = golden.check(cid, wrong, GOLDEN)
    assert not bad.ok and [t.status for t in bad.tensors if t.key == "output.lse"] == ["mismatch"]
    wrong["output.lse"] = np.where(np.isneginf(expected["output.lse"]), 0.0, expected["output.lse"])  # 0 for -inf
    assert not golden.check(cid, wrong, GOLDEN).ok
    # the command line: an npz of the results, output.lse included
    path = tmp_path / "theirs.npz"
    np.savez(path, **{k: v for k, v in wrong.items()})
    r = subprocess.run([sys.executable, "-m", "npattn", "check", cid, str(path)], capture_output=True, text=True,
                       timeout=300, cwd=ROOT)
    assert r.returncode == 1 and any(x.startswith("output.lse") and "mismatch" in x for x in r.stdout.splitlines()), r.stdout
    np.savez(path, **expected)
    r = subprocess.run([sys.executable, "-m", "npattn", "check", cid, str(path)], capture_output=True, text=True,
                       timeout=300, cwd=ROOT)
    assert r.returncode == 0 and "output.lse" in r.stdout, r.stdout
