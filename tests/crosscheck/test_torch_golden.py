"""Every golden fixture against the project's PyTorch versions of the blocks (and
torchvision's deform_conv2d), re-run here with the installed torch; and the end-to-end
PyTorch user workflow of tools/torch_check.py."""

import pathlib
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="PyTorch not installed: cross-check skipped")
pytest.importorskip("torchvision", reason="torchvision not installed: cross-check skipped")
pytestmark = pytest.mark.crosscheck

import torch_crosscheck  # noqa: E402  (tools/, on sys.path via conftest)

from npattn import golden  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[2]
CASES = golden.list_cases(ROOT / "golden")


@pytest.mark.parametrize("case_id", sorted(CASES))
def test_fixture_agrees_with_pytorch(case_id):
    case = golden.load(case_id, ROOT / "golden")
    theirs, _ = torch_crosscheck.run_case(case.meta, case.arrays)
    expected = case.expected()
    assert set(theirs) == set(expected)
    floor = golden.CROSSCHECK_SCALE_FLOOR * golden.case_scale(expected)
    limit = 1e-10 if case.meta["dtype"] == "float64" else 2.0**-22
    for key, value in theirs.items():
        e = expected[key]
        if e.dtype.kind != "f":
            np.testing.assert_array_equal(value, e, err_msg=key)
            continue
        e = e.astype(np.float64)
        inf = np.isinf(e)  # an lse of -inf (a query with no key): the same infinity on both sides
        np.testing.assert_array_equal(value[inf], e[inf], err_msg=key)
        err = np.max(np.abs(value[~inf] - e[~inf]), initial=0.0) / max(np.max(np.abs(e[~inf]), initial=0.0), floor)
        assert err < limit, (key, err)


@pytest.mark.parametrize(
    "case_id,flag",
    [("iaff/shared_global_att_train_f64", None), ("sk/paths2_groups2_train_f32", "--float32"), ("modulated_deform_conv2d_pack/k3_dg2_eval_f64", None),
     ("non_local_attn/caffe2_default_train_f64", None)],  # an official module, through its key map
)
def test_torch_user_workflow_end_to_end(case_id, flag):
    cmd = [sys.executable, str(ROOT / "tools" / "torch_check.py"), case_id] + ([flag] if flag else [])
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.rstrip().endswith("PASS")
