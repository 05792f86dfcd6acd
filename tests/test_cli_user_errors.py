"""The command line as a user meets it: malformed results files, non-finite results,
misspelled keys, output piped into ``head``, and export into a folder that already holds
the files. Every test runs the CLI as a subprocess, exit status included (0 pass,
1 mismatch, 2 unusable input)."""

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from npattn import golden

ROOT = pathlib.Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "golden"
CASE = "aff/c8_r4_train_f64"


def cli(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "npattn", *args, "--golden", str(GOLDEN)] if args[0] in ("check", "export", "list")
        else [sys.executable, "-m", "npattn", *args],
        capture_output=True, text=True, timeout=300, cwd=cwd or ROOT,
    )


def expected(case=CASE):
    return {k: v.copy() for k, v in golden.load(case, GOLDEN).expected().items()}


def one_error_line(r):
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert "Traceback" not in r.stderr
    return lines[0]


# ------------------------------------------------------------------ malformed results files

def test_a_file_that_is_not_a_zip(tmp_path):
    path = tmp_path / "results.npz"
    path.write_text("output = [1, 2, 3]\n")
    r = cli("check", CASE, str(path))
    assert r.returncode == 2
    line = one_error_line(r)
    assert str(path) in line and "is not an .npz (zip) archive" in line and "keyed output, grad.input." in line
    assert "pickled" not in line and "fixture file" not in line


def test_a_single_npy_array(tmp_path):
    path = tmp_path / "out.npy"
    np.save(path, expected()["output"])
    r = cli("check", CASE, str(path))
    assert r.returncode == 2
    line = one_error_line(r)
    assert str(path) in line and "single .npy array" in line and "np.savez" in line
    assert "context manager" not in line


def test_a_pickled_object_array(tmp_path):
    path = tmp_path / "results.npz"
    np.savez(path, output=np.array([{"a": 1}], dtype=object))
    r = cli("check", CASE, str(path))
    assert r.returncode == 2
    line = one_error_line(r)
    assert str(path) in line and "'output' is a pickled object array" in line


def test_a_missing_file(tmp_path):
    r = cli("check", CASE, str(tmp_path / "nothing.npz"))
    assert r.returncode == 2
    assert "does not exist" in one_error_line(r)


@pytest.mark.parametrize("change, message", [
    (lambda e: e.__setitem__("grad.input.x", e["grad.input.x"][:, :4]), "grad.input.x: expected shape (3, 8, 5, 4), got (3, 4, 5, 4)"),
    (lambda e: e.__setitem__("output", e["output"].astype(np.int32)), "output: dtype int32; expected float32 or float64"),
    (lambda e: e.__setitem__("grad.input.x", e["grad.input.x"].astype(np.float32)),
     "grad.input.x: dtype float32, but 'output' is float64: give all tensors one dtype"),
], ids=["shape", "integer dtype", "mixed dtypes"])
def test_a_key_with_the_wrong_shape_or_dtype(tmp_path, change, message):
    e = expected()
    change(e)
    path = tmp_path / "results.npz"
    np.savez(path, **e)
    r = cli("check", CASE, str(path))
    assert r.returncode == 2, r.stdout
    assert one_error_line(r) == f"error: results file {path}: {message}"


# ------------------------------------------------------------------ what a readable report says

def test_nan_and_inf_are_reported_as_such_with_the_worst_values(tmp_path):
    e = expected()
    g = e["grad.input.x"]
    g[0, 1, 2, 3] = np.nan
    g[1, 0, 0, 0] = np.inf
    g[2, 7, 4, 3] = -np.inf
    path = tmp_path / "results.npz"
    np.savez(path, **e)
    r = cli("check", CASE, str(path))
    assert r.returncode == 1
    lines = r.stdout.splitlines()
    row = lines.index(next(x for x in lines if x.startswith("grad.input.x ")))
    assert "mismatch" in lines[row] and "3/480" in lines[row]
    assert lines[row + 1].split() == ["non-finite", "results:", "1", "NaN,", "1", "+inf,", "1", "-inf"]
    # the worst element is a non-finite one, printed with its expected value
    want = golden.load(CASE, GOLDEN).expected()["grad.input.x"][0, 1, 2, 3]
    assert f"(0, 1, 2, 3): {want:.9g}, nan" in lines[row]
    assert lines[-1] == "FAIL"
    report = json.loads(cli("check", CASE, str(path), "--json").stdout)
    x = next(t for t in report["tensors"] if t["key"] == "grad.input.x")
    assert x["nonfinite"] == {"nan": 1, "+inf": 1, "-inf": 1} and x["worst_actual"] == "nan"


def test_the_worst_element_is_printed_with_expected_and_actual(tmp_path):
    e = expected()
    e["output"][2, 3, 1, 0] += 0.5
    path = tmp_path / "results.npz"
    np.savez(path, **e)
    r = cli("check", CASE, str(path))
    assert r.returncode == 1
    row = next(x for x in r.stdout.splitlines() if x.startswith("output "))
    want = golden.load(CASE, GOLDEN).expected()["output"][2, 3, 1, 0]
    assert f"(2, 3, 1, 0): {want:.9g}, {want + 0.5:.9g}" in row


def test_a_misspelled_key_is_listed_with_the_nearest_fixture_key(tmp_path):
    e = expected()
    e["grad.input.residul"] = e.pop("grad.input.residual")
    path = tmp_path / "results.npz"
    np.savez(path, **e)
    r = cli("check", CASE, str(path))
    assert r.returncode == 1  # not compared: the check cannot pass
    assert "grad.input.residul: not a key of this case; did you mean grad.input.residual?" in r.stdout.splitlines()
    assert r.stdout.splitlines()[-1] == "FAIL"


def test_output_piped_into_head_ends_quietly(tmp_path):
    path = tmp_path / "results.npz"
    np.savez(path, **expected())
    cmd = f"{sys.executable} -m npattn check --golden {GOLDEN} {CASE} {path} | head -n 1"
    r = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.stdout.startswith(f"case {CASE}: comparing float64 results")
    assert r.stderr == "", r.stderr
    assert r.returncode == 0  # the check passed; the cut output does not change that


# ------------------------------------------------------------------ export never overwrites

def test_export_refuses_to_overwrite_a_file_unless_forced(tmp_path):
    out = tmp_path / "case"
    out.mkdir()
    mine = out / "case.json"
    mine.write_text("my notes\n")
    r = cli("export", CASE, str(out))
    assert r.returncode == 2
    assert one_error_line(r) == f"error: {mine} already exists; not overwritten (pass --force to replace it)"
    assert mine.read_text() == "my notes\n"
    assert not (out / "inputs.npz").exists()  # nothing written before the refusal
    r = cli("export", CASE, str(out), "--force")
    assert r.returncode == 0, r.stderr
    assert json.loads(mine.read_text())["case"] == CASE


def test_onnx_export_refuses_to_overwrite_a_file_unless_forced(tmp_path):
    pytest.importorskip("onnx", reason="the ONNX export needs the onnx extra: pip install -e '.[onnx]'")
    case = next(c for c in golden.list_cases(GOLDEN) if c.startswith("deform_conv2d/v2_") and c.endswith("_f64"))
    out = tmp_path / "node"
    (out / "test_data_set_0").mkdir(parents=True)
    theirs = out / "test_data_set_0" / "output_0.pb"
    theirs.write_bytes(b"not mine to replace")
    r = cli("export", case, str(out), "--format", "onnx")
    assert r.returncode == 2
    assert one_error_line(r) == f"error: {theirs} already exists; not overwritten (pass --force to replace it)"
    assert theirs.read_bytes() == b"not mine to replace" and not (out / "model.onnx").exists()
    r = cli("export", case, str(out), "--format", "onnx", "--force")
    assert r.returncode == 0, r.stderr
    assert theirs.read_bytes() != b"not mine to replace"


# ------------------------------------------------------------------ demo

def test_demo_gradient_checks_every_primitive():
    from npattn.cli import _demo_cases

    r = cli("demo")
    assert r.returncode == 0, r.stdout
    assert r.stdout.splitlines()[-1] == "all ops passed (float64 central differences)"
    for name, *_ in _demo_cases():
        assert any(line.startswith(name + " ") for line in r.stdout.splitlines()), name
    assert " NO" not in r.stdout
