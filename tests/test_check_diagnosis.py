"""``npattn check`` explains the mismatches it can recognise: results that follow the
other border convention at p = -1 (as PaddlePaddle's deform_conv2d does on the
torchvision-convention cases), float64 results computed in float32, and results whose
dtype differs from the case's. The results are built here, without any framework: the
other convention's results are the twin case's fixture (cross-checked against mmcv's
kernels when it was made), float32 arithmetic is npattn run in float32."""

import json
import pathlib
import subprocess
import sys

import numpy as np

from npattn import golden

ROOT = pathlib.Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "golden"


def results_in_float32(case_id):
    """npattn's own float32 run of a float64 case, handed back as float64 arrays."""
    case = golden.load(case_id, GOLDEN)
    res = golden.run(case.meta, case.arrays, dtype=np.float32)
    return {k: (v.astype(np.float64) if v.dtype.kind == "f" else v) for k, v in res.items()}


def test_mmcv_convention_results_on_the_torchvision_case_are_named():
    tv, mm = "deform_conv2d/zero_offsets_pad1_torchvision_eval_f64", "deform_conv2d/zero_offsets_pad1_mmcv_eval_f64"
    theirs = golden.load(mm, GOLDEN).expected()
    report = golden.check(tv, theirs, GOLDEN)
    assert not report.ok
    failed = [t for t in report.tensors if not t.passed]
    assert [t.key for t in failed] == ["grad.input.offset"]
    n = failed[0].n_mismatch
    assert n > 0
    (d,) = report.diagnoses
    assert "follow the mmcv border convention" in d
    assert f"all {n} mismatched elements of grad.input.offset sit on taps at p = -1" in d
    assert f"the twin case {mm} matches" in d
    # and the other way round
    back = golden.check(mm, golden.load(tv, GOLDEN).expected(), GOLDEN)
    assert "follow the torchvision border convention" in back.diagnoses[0]


def test_a_wrong_offset_gradient_elsewhere_is_not_called_a_convention():
    tv, mm = "deform_conv2d/zero_offsets_pad1_torchvision_eval_f64", "deform_conv2d/zero_offsets_pad1_mmcv_eval_f64"
    theirs = golden.load(mm, GOLDEN).expected()
    theirs["grad.input.offset"] = theirs["grad.input.offset"] * 1.01  # wrong everywhere
    report = golden.check(tv, theirs, GOLDEN)
    assert not report.ok
    assert not any("convention" in d for d in report.diagnoses)


def test_pack_layer_results_in_the_other_convention_are_named():
    tv, mm = "modulated_deform_conv2d_pack/init_torchvision_eval_f64", "modulated_deform_conv2d_pack/init_mmcv_eval_f64"
    report = golden.check(tv, golden.load(mm, GOLDEN).expected(), GOLDEN)
    assert not report.ok
    assert {t.key for t in report.tensors if not t.passed} <= {"grad.param.conv_offset.weight", "grad.param.conv_offset.bias"}
    assert any("follow the mmcv border convention" in d and mm in d for d in report.diagnoses)


def test_float64_results_computed_in_float32_are_named():
    cid = "sk/paths2_groups2_train_f64"
    report = golden.check(cid, results_in_float32(cid), GOLDEN)
    assert not report.ok
    assert any("look computed in float32" in d for d in report.diagnoses), report.diagnoses
    # a real error of the same size in float64 is not called float32 arithmetic when it
    # misses the float32 tolerance too
    theirs = golden.load(cid, GOLDEN).expected()
    theirs["output"] = theirs["output"] * (1 + 1e-3)
    report = golden.check(cid, theirs, GOLDEN)
    assert not report.ok and not report.diagnoses


def test_cli_prints_the_diagnosis_and_json_carries_it(tmp_path):
    cid = "deform_conv2d/zero_offsets_pad1_torchvision_eval_f64"
    path = tmp_path / "paddle_like.npz"
    np.savez(path, **golden.load("deform_conv2d/zero_offsets_pad1_mmcv_eval_f64", GOLDEN).expected())
    args = [sys.executable, "-m", "npattn", "check", "--golden", str(GOLDEN), cid, str(path)]
    r = subprocess.run(args, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 1
    assert any(line.startswith("diagnosis: the results follow the mmcv border convention") for line in r.stdout.splitlines())
    r = subprocess.run(args + ["--json"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 1
    data = json.loads(r.stdout)
    assert data["ok"] is False and "mmcv border convention" in data["diagnoses"][0]


def test_the_header_says_when_the_results_dtype_differs_from_the_case():
    cid = "sk/paths2_groups2_train_f64"
    theirs = {k: (v.astype(np.float32) if v.dtype.kind == "f" else v) for k, v in golden.load(cid, GOLDEN).expected().items()}
    report = golden.check(cid, theirs, GOLDEN)
    assert report.ok  # the float64 answer rounded to float32 is the best float32 answer
    assert report.dtype == "float32" and report.case_dtype == "float64"
    assert "the results are float32 but the case is float64: the float32 tolerances apply" in str(report)
    same = golden.check(cid, golden.load(cid, GOLDEN).expected(), GOLDEN)
    assert "but the case is" not in str(same)
