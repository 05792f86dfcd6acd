"""tools/conformance.py's judgement of a framework's results, on results built here from
the fixtures (no framework needed): a mmcv-convention result for a torchvision case, a
float32 computation of a float64 case, a plain failure, and a pass."""

import importlib.util
import pathlib

import numpy as np
import pytest

from npattn import golden

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tool():
    spec = importlib.util.spec_from_file_location("conformance_tool", ROOT / "tools" / "conformance.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def manifest():
    return golden.list_cases()


def test_mmcv_results_for_the_torchvision_case_are_a_convention(tool, manifest):
    # what Paddle does: the mmcv twin's offset gradient (the inputs of the twins are the same)
    case = "deform_conv2d/zero_offsets_pad1_torchvision_eval_f64"
    twin = golden.load("deform_conv2d/zero_offsets_pad1_mmcv_eval_f64").expected()
    assert not golden.check(case, twin).ok
    judged = tool.classify(case, twin, manifest)
    assert judged["kind"] == "convention"
    assert "mmcv" in judged["text"] and "zero_offsets_pad1_mmcv_eval_f64" in judged["text"]


def test_float32_arithmetic_in_a_float64_case(tool, manifest):
    case = "multihead_attention/batch_first_bool_masks_eval_f64"
    c = golden.load(case)
    # npattn's own float32 computation of the case, returned as float64 (as OpenVINO does)
    results = {k: v.astype(np.float64) for k, v in golden.run(c.meta, c.arrays, np.float32).items()}
    assert not golden.check(case, results).ok
    judged = tool.classify(case, results, manifest)
    assert judged["kind"] == "float32", judged
    assert 1e-9 < judged["rel_err"] < 1e-5
    # float32 results given as float32 are held to float64's tolerance too, and say their dtype
    as32 = {k: v.astype(np.float32) for k, v in results.items()}
    judged32 = tool.classify(case, as32, manifest)
    assert judged32["kind"] == "float32" and "results in float32" in judged32["text"]
    assert tool.classify(case, c.expected(), manifest)["kind"] == "pass"


def test_a_wrong_result_fails_with_its_figure(tool, manifest):
    case = "deform_conv2d/v1_groups1_offgroups1_nobias_eval_f64"
    results = golden.load(case).expected()
    results = dict(results, output=results["output"] * 1.01)
    judged = tool.classify(case, results, manifest)
    assert judged["kind"] == "fails" and judged["tensor"] == "output"
    assert judged["rel_err"] == pytest.approx(0.01, rel=1e-6)


def test_cells_count_outcomes(tool):
    records = [
        ("a/x_f64", {"status": "run", "judged": {"kind": "pass", "rel_err": 1e-16}}),
        ("a/x_f32", {"status": "run", "judged": {"kind": "pass", "rel_err": 2e-7}}),
        ("a/y_f64", {"status": "run", "judged": {"kind": "convention", "convention": "mmcv", "rel_err": 0.4}}),
        ("a/z_f64", {"status": "not expressible", "reason": "no mask"}),
    ]
    text = tool.cell(records)
    assert "**pass** 2 (f64 ≤ 1.0e-16, f32 ≤ 2.0e-07)" in text and "**differs by convention** 1: mmcv" in text and "not expressible 1" in text
    assert tool.cell([]) == "—"
