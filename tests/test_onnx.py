"""``npattn export CASE DIR --format onnx``: the ONNX node test of a case, run through
ONNX's reference implementation (onnx.reference) and ONNX Runtime, and compared with the
fixture under npattn's tolerance policy; cases that are not one DeformConv node and a
missing onnx package give clear errors."""

import pathlib
import subprocess
import sys

import numpy as np
import pytest

import npattn
from npattn import golden

onnx = pytest.importorskip("onnx", reason="onnx not installed (pip install 'npattn[onnx]'): ONNX export tests skipped")
from onnx import numpy_helper  # noqa: E402
from onnx.reference import ReferenceEvaluator  # noqa: E402

from npattn.onnx_export import build_node_test, export_onnx  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "golden"
CASES = golden.list_cases(GOLDEN)
EXPORTABLE = sorted(c for c, m in CASES.items() if m["block"] in ("deform_conv2d", "DeformConv2d"))


def _load_node_test(directory):
    model = onnx.load(str(directory / "model.onnx"))
    names = [i.name for i in model.graph.input]
    feeds = {}
    for i, name in enumerate(names):
        t = onnx.load_tensor(str(directory / "test_data_set_0" / f"input_{i}.pb"))
        assert t.name == name
        feeds[name] = numpy_helper.to_array(t)
    expected = numpy_helper.to_array(onnx.load_tensor(str(directory / "test_data_set_0" / "output_0.pb")))
    return model, feeds, expected


def _run_ort(model, feeds):
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime not installed (pip install 'npattn[onnx]'): skipped")
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


def test_the_exportable_cases_cover_both_dtypes_masks_and_blocks():
    assert len(EXPORTABLE) >= 10
    assert {CASES[c]["dtype"] for c in EXPORTABLE} == {"float32", "float64"}
    assert {CASES[c]["block"] for c in EXPORTABLE} == {"deform_conv2d", "DeformConv2d"}
    assert any("mask" in CASES[c]["inputs"] for c in EXPORTABLE) and any("mask" not in CASES[c]["inputs"] for c in EXPORTABLE)


@pytest.mark.parametrize("case_id", EXPORTABLE)
def test_node_test_round_trips_through_onnx_reference_and_onnxruntime(case_id, tmp_path):
    paths = export_onnx(case_id, tmp_path, GOLDEN)
    assert paths[0] == tmp_path / "model.onnx" and paths[-1].name == "output_0.pb"
    model, feeds, expected = _load_node_test(tmp_path)
    assert [n.op_type for n in model.graph.node] == ["DeformConv"]
    assert model.opset_import[0].version == 19
    case = golden.load(case_id, GOLDEN)
    np.testing.assert_array_equal(expected, case.arrays["output"])
    assert expected.dtype == np.dtype(CASES[case_id]["dtype"])
    for name, value in feeds.items():  # the node's inputs are the case's arrays
        assert value.dtype == expected.dtype, name
    # onnx.reference builds DeformConv on its GridSample, whose coordinates are
    # denormalised into a float32 array (onnx 1.23, op_grid_sample.py), so even its
    # float64 results are float32-accurate (measured: 2e-7 relative): held to the float32
    # tolerances. ONNX Runtime is held to the tolerances of the case's dtype.
    got = ReferenceEvaluator(model).run(None, feeds)[0]
    assert got.dtype == expected.dtype
    report = golden.check(case_id, {"output": got.astype(np.float32)}, GOLDEN)
    assert report.ok, f"onnx.reference:\n{report}"
    got = _run_ort(model, feeds)
    assert got.dtype == expected.dtype
    report = golden.check(case_id, {"output": got}, GOLDEN)
    assert report.ok, f"onnxruntime:\n{report}"


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_mask_without_bias_leaves_an_empty_input_name(dtype):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((1, 4, 5, 4)).astype(dtype)
    w = rng.standard_normal((2, 2, 2, 3)).astype(dtype)  # groups 2
    offset = rng.uniform(-2, 2, (1, 2 * 2 * 6, 4, 4)).astype(dtype)  # offset groups 2, out (4, 4) with padding (0, 1)
    mask = rng.uniform(0, 1, (1, 2 * 6, 4, 4)).astype(dtype)
    y = npattn.deform_conv2d(x, offset, w, None, 1, (0, 1), 1, mask)
    attrs = {"kernel_shape": [2, 3], "strides": [1, 1], "pads": [0, 1, 0, 1], "dilations": [1, 1], "group": 2, "offset_group": 2}
    model, tensors, _ = build_node_test({"X": x, "W": w, "offset": offset, "B": None, "mask": mask}, attrs, y)
    assert list(model.graph.node[0].input) == ["X", "W", "offset", "", "mask"]
    feeds = {t.name: numpy_helper.to_array(t) for t in tensors}
    tol = 1e-12 if dtype == np.float64 else 1e-5
    got = _run_ort(model, feeds)
    assert np.max(np.abs(got - y)) <= tol * np.max(np.abs(y))
    got = ReferenceEvaluator(model).run(None, feeds)[0]  # float32 coordinates (see above)
    assert np.max(np.abs(got - y)) <= 1e-5 * np.max(np.abs(y))


def test_cases_that_are_not_one_deformconv_node_say_why(tmp_path):
    for case_id, why in (("conv_offset2d/filters3_eval_f64", "border clamping"),
                         ("modulated_deform_conv2d_pack/k3_dg2_eval_f64", "not one DeformConv node"),
                         ("se/bias_eval_f64", "not a deformable convolution")):
        with pytest.raises(golden.GoldenError, match=f"cannot be exported as an ONNX node test: .*{why}"):
            export_onnx(case_id, tmp_path / "x", GOLDEN)
    r = subprocess.run([sys.executable, "-m", "npattn", "export", "conv_offset2d/filters3_eval_f64", str(tmp_path / "y"),
                        "--format", "onnx", "--golden", str(GOLDEN)], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 2 and "cannot be exported as an ONNX node test" in r.stderr
    assert not (tmp_path / "y" / "model.onnx").exists()


def test_cli_writes_the_node_test(tmp_path):
    r = subprocess.run([sys.executable, "-m", "npattn", "export", "deform_conv2d/v1_groups2_offgroups2_eval_f64",
                        str(tmp_path), "--format", "onnx", "--golden", str(GOLDEN)],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    files = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())
    assert files == ["model.onnx"] + [f"test_data_set_0/input_{i}.pb" for i in range(4)] + ["test_data_set_0/output_0.pb"]


def test_without_onnx_the_export_says_how_to_install_and_npattn_never_imports_it():
    code = (
        "import sys\n"
        "sys.modules['onnx'] = None\n"
        "import npattn, npattn.cli, npattn.golden, npattn.testing\n"
        "from npattn.onnx_export import export_onnx\n"
        "from npattn.golden import GoldenError\n"
        "try:\n"
        "    export_onnx('deform_conv2d/v1_groups2_offgroups2_eval_f64', 'unused')\n"
        "except GoldenError as e:\n"
        "    print(e)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "ONNX export needs the onnx package (pip install 'npattn[onnx]'" in r.stdout
    r = subprocess.run([sys.executable, "-c", "import sys, npattn, npattn.golden, npattn.cli\n"
                        "assert 'onnx' not in sys.modules and 'onnxruntime' not in sys.modules\nprint('ok')"],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.stdout.strip() == "ok", r.stderr


def test_onnxruntime_check_tool_agrees_on_every_configuration():
    pytest.importorskip("onnxruntime", reason="onnxruntime not installed (pip install 'npattn[onnx]'): skipped")
    import io

    sys.path.insert(0, str(ROOT / "tools"))
    import onnxruntime_check

    out = io.StringIO()
    rows = onnxruntime_check.run(0, stream=out)
    assert len(rows) == 2 * len(onnxruntime_check.CONFIGS)
    assert all(ok for *_, ok in rows), out.getvalue()
    assert {dtype for _, dtype, *_ in rows} == {"float32", "float64"}
