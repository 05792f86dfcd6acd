"""Golden fixtures and the command line: verify, check, export, list (as subprocesses,
exit codes included), damaged fixtures, and byte-identical regeneration."""

import json
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

from npattn import golden

ROOT = pathlib.Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "golden"


def npattn_cli(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "npattn", *args], capture_output=True, text=True, timeout=600, cwd=cwd or ROOT
    )


@pytest.fixture(scope="module")
def manifest():
    return golden.read_manifest(GOLDEN)


@pytest.fixture()
def golden_copy(tmp_path):
    dst = tmp_path / "golden"
    shutil.copytree(GOLDEN, dst)
    return dst


def some_case(manifest, block="AFF", mode="train", dtype="float64"):
    for cid, meta in manifest["cases"].items():
        if meta["block"] == block and meta["mode"] == mode and meta["dtype"] == dtype:
            return cid
    raise AssertionError(f"no {block} {mode} {dtype} case")


# ------------------------------------------------------------------ contents

EXPECTED_BLOCKS = {
    "SEBlock", "SKConv", "DAF", "AFF", "iAFF", "MS_CAM", "GCT", "ConvOffset2D", "batch_map_offsets",
    "deform_conv2d", "DeformConv2d", "ModulatedDeformConv2dPack", "DeformConv2dPack",
    "scaled_dot_product_attention", "NonLocalAttn", "ViTAttention", "MultiheadAttention",
}
EXPECTED_BLOCKS |= {"SEModule", "CBAM", "ECA", "CoordAttn", "GlobalContext", "SimAM"}
EXPECTED_BLOCKS |= {"varlen_attention", "rotary_embedding"}


def test_manifest_covers_every_block_in_both_dtypes_and_modes(manifest):
    cases = manifest["cases"]
    assert manifest["format"] == 1
    assert {m["block"] for m in cases.values()} == EXPECTED_BLOCKS
    for cid, meta in cases.items():
        twin = cid[:-3] + ("f32" if cid.endswith("f64") else "f64")
        assert twin in cases, f"{cid} has no float twin"
        for field in ("file", "block", "config", "mode", "dtype", "seed", "shapes", "sha256", "tolerances", "npattn_version", "cross_checked"):
            assert field in meta, (cid, field)
        assert set(meta["tolerances"]) == {"float32", "float64"}
    for block in ("SKConv", "AFF", "iAFF", "MS_CAM", "CBAM", "CoordAttn"):
        assert {m["mode"] for m in cases.values() if m["block"] == block} == {"train", "eval"}
    iaff = [m["config"]["share_global_att"] for m in cases.values() if m["block"] == "iAFF"]
    assert set(iaff) == {True, False}
    gct = {(m["config"]["mode"], m["config"].get("after_relu", False)) for m in cases.values() if m["block"] == "GCT"}
    assert gct == {("l2", False), ("l1", False), ("l1", True)}
    dcn = [m for m in cases.values() if m["block"] == "deform_conv2d"]
    assert any("mask" in m["inputs"] for m in dcn) and any("mask" not in m["inputs"] for m in dcn)
    # the offset-gradient convention is recorded for every deformable convolution, and
    # both conventions have an initial-state case (zero offsets, taps on p = -1)
    deform = [m for m in cases.values() if m["block"] in ("deform_conv2d", "DeformConv2d", "ModulatedDeformConv2dPack", "DeformConv2dPack")]
    assert all(m["config"]["border_grad"] in ("torchvision", "mmcv") for m in deform)
    for block in ("deform_conv2d", "ModulatedDeformConv2dPack", "DeformConv2dPack"):
        assert {m["config"]["border_grad"] for m in deform if m["block"] == block and m.get("fd_skip")} == {"torchvision", "mmcv"}


def test_every_case_was_cross_checked_against_pytorch(manifest):
    for cid, meta in manifest["cases"].items():
        record = meta["cross_checked"]
        assert record is not None, f"{cid} was not cross-checked"
        assert "torch" in record["library"]
        limit = 1e-10 if meta["dtype"] == "float64" else 2.0**-22
        assert record["max_rel_err"] <= limit, (cid, record)


def test_golden_is_small():
    total = sum(p.stat().st_size for p in GOLDEN.rglob("*") if p.is_file())
    assert total < 10 * 2**20, f"golden/ holds {total / 2**20:.1f} MiB"


def test_fixture_keys_follow_the_format(manifest):
    cid = some_case(manifest, "AFF", "train")
    case = golden.load(cid, GOLDEN)
    keys = set(case.arrays)
    assert {"input.x", "input.residual", "grad_output", "output", "grad.input.x", "grad.input.residual"} <= keys
    assert "param.local_att.0.weight" in keys and "grad.param.local_att.0.weight" in keys
    assert "buffer.local_att.1.running_mean" in keys and "buffer_after.local_att.1.running_mean" in keys
    assert case.arrays["buffer_after.local_att.1.num_batches_tracked"] == case.arrays["buffer.local_att.1.num_batches_tracked"] + 1


def test_float32_twin_holds_the_rounded_float64_inputs(manifest):
    cid = some_case(manifest, "SKConv", "train", "float64")
    c64 = golden.load(cid, GOLDEN)
    c32 = golden.load(cid[:-3] + "f32", GOLDEN)
    assert c32.arrays["input.x"].dtype == np.float32
    np.testing.assert_array_equal(c32.arrays["input.x"], c64.arrays["input.x"].astype(np.float32))
    np.testing.assert_array_equal(c32.arrays["param.convs.0.0.weight"], c64.arrays["param.convs.0.0.weight"].astype(np.float32))


# ------------------------------------------------------------------ verify

def test_verify_passes_on_the_stored_fixtures():
    r = npattn_cli("verify")
    assert r.returncode == 0, r.stdout + r.stderr
    n = len(golden.list_cases(GOLDEN))
    assert f"{n} of {n} cases verified, 0 failed" in r.stdout
    assert r.stdout.count(" ok ") == n


def _rewrite(path, key, change):
    arrays = golden.read_npz(path)
    arrays[key] = change(arrays[key].copy())
    return golden.write_npz(path, arrays)


def test_verify_fails_on_one_changed_value_even_with_a_matching_sha(manifest, golden_copy):
    cid = some_case(manifest, "iAFF", "train")
    meta = manifest["cases"][cid]

    def bump(a):
        a.flat[3] += 1e-6 * max(1.0, abs(float(a.flat[3])))
        return a

    sha = _rewrite(golden_copy / meta["file"], "output", bump)
    m = json.loads((golden_copy / "manifest.json").read_text())
    m["cases"][cid]["sha256"] = sha
    (golden_copy / "manifest.json").write_text(json.dumps(m))
    r = npattn_cli("verify", "--golden", str(golden_copy), cid[:-8], "--no-fd")
    assert r.returncode == 1
    assert f"{cid}" in r.stdout and "FAIL 'output' differs from npattn's result" in r.stdout


def test_verify_fails_on_a_wrong_sha_a_missing_file_and_a_truncated_file(manifest, golden_copy):
    cases = list(manifest["cases"])
    m = json.loads((golden_copy / "manifest.json").read_text())
    wrong, missing, truncated = cases[0], cases[1], cases[2]
    m["cases"][wrong]["sha256"] = "0" * 64
    (golden_copy / "manifest.json").write_text(json.dumps(m))
    (golden_copy / m["cases"][missing]["file"]).unlink()
    p = golden_copy / m["cases"][truncated]["file"]
    p.write_bytes(p.read_bytes()[:100])
    r = npattn_cli("verify", "--golden", str(golden_copy), "--no-fd")
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    lines = {line.split()[1]: line for line in r.stdout.splitlines() if line.startswith("[")}
    assert "FAIL" in lines[wrong] and "sha256" in lines[wrong]
    assert "FAIL" in lines[missing] and "missing" in lines[missing]
    assert "FAIL" in lines[truncated] and "sha256" in lines[truncated]
    assert f"{len(cases) - 3} of {len(cases)} cases verified, 3 failed" in r.stdout


def test_a_pickled_array_is_refused(tmp_path):
    path = tmp_path / "evil.npz"
    np.savez(path, output=np.array([{"a": 1}], dtype=object))
    with pytest.raises(golden.GoldenError, match="cannot be read"):
        golden.read_npz(path)


# ------------------------------------------------------------------ check

def _expected_npz(tmp_path, cid, change=None, drop=(), dtype=None):
    exp = golden.load(cid, GOLDEN).expected()
    if dtype is not None:
        exp = {k: (v.astype(dtype) if v.dtype.kind == "f" else v) for k, v in exp.items()}
    for k in drop:
        exp.pop(k)
    if change:
        change(exp)
    path = tmp_path / "theirs.npz"
    np.savez(path, **exp)
    return path


def test_check_accepts_the_stored_outputs(manifest, tmp_path):
    cid = some_case(manifest, "SKConv", "train")
    r = npattn_cli("check", cid, str(_expected_npz(tmp_path, cid)))
    assert r.returncode == 0, r.stdout
    assert "PASS" in r.stdout and "grad.param.compress.0.weight" in r.stdout


def test_check_rejects_one_element_perturbed_by_1e_4_relative(manifest, tmp_path):
    cid = some_case(manifest, "AFF", "train")

    def perturb(exp):
        g = exp["grad.input.residual"]
        g[1, 2, 3, 1] *= 1 + 1e-4

    r = npattn_cli("check", cid, str(_expected_npz(tmp_path, cid, perturb)))
    assert r.returncode == 1
    line = [x for x in r.stdout.splitlines() if x.startswith("grad.input.residual")][0]
    assert "mismatch" in line and "1/" in line and "(1, 2, 3, 1)" in line
    assert "FAIL" in r.stdout


def test_check_reports_missing_output_and_shape_mismatch(manifest, tmp_path):
    cid = some_case(manifest, "GCT", "eval")
    r = npattn_cli("check", cid, str(_expected_npz(tmp_path, cid, drop=("output",))))
    assert r.returncode == 1
    assert [x for x in r.stdout.splitlines() if x.startswith("output ")][0].split()[1] == "missing"

    def reshape(exp):
        exp["grad.param.alpha"] = exp["grad.param.alpha"].reshape(-1)

    path = _expected_npz(tmp_path, cid, reshape)
    r = npattn_cli("check", cid, str(path))
    # a tensor of the wrong shape is a malformed results file (exit 2), not a mismatch
    assert r.returncode == 2, r.stdout
    assert r.stderr.strip() == f"error: results file {path}: grad.param.alpha: expected shape (1, 6, 1, 1), got (6,)"


def test_check_uses_float32_tolerances_for_float32_results(manifest, tmp_path):
    cid = some_case(manifest, "SKConv", "train", "float64")
    # the float64 answer rounded to float32 is a perfect float32 implementation
    r = npattn_cli("check", cid, str(_expected_npz(tmp_path, cid, dtype=np.float32)))
    assert r.returncode == 0, r.stdout
    assert "comparing float32 results with rtol 0.0001" in r.stdout


def test_check_python_api_and_unknown_keys(manifest):
    cid = some_case(manifest, "SEBlock", "eval")
    exp = golden.load(cid, GOLDEN).expected()
    report = golden.check(cid, {"output": exp["output"]}, GOLDEN)
    assert report.ok
    assert any(t.status == "not provided" for t in report.tensors)
    # a key the case does not have was not compared: the check fails and names the nearest key
    report = golden.check(cid, {"output": exp["output"], "grad.input.y": exp["output"]}, GOLDEN)
    assert not report.ok
    assert report.unknown == {"grad.input.y": "grad.input.x"}
    assert "grad.input.y: not a key of this case; did you mean grad.input.x?" in str(report)
    with pytest.raises(golden.GoldenError, match="unknown case"):
        golden.check("no/such_case", {}, GOLDEN)


# ------------------------------------------------------------------ export, list

def test_export_writes_a_loadable_state_dict(manifest, tmp_path):
    cid = some_case(manifest, "SKConv", "train")
    r = npattn_cli("export", cid, str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr
    with np.load(tmp_path / "out" / "state_dict.npz", allow_pickle=False) as z:
        keys = set(z.files)
        assert z["convs.0.1.num_batches_tracked"].dtype == np.int64
    import npattn

    meta = manifest["cases"][cid]
    blk = npattn.SKConv(**meta["config"], dtype=np.float64)
    assert keys == set(blk.state_dict())
    with np.load(tmp_path / "out" / "inputs.npz", allow_pickle=False) as z:
        assert set(z.files) == {"x"}
    assert np.load(tmp_path / "out" / "grad_output.npy", allow_pickle=False).shape == tuple(meta["shapes"]["output"])
    assert json.loads((tmp_path / "out" / "case.json").read_text())["case"] == cid


def test_list_shows_every_case(manifest):
    r = npattn_cli("list")
    assert r.returncode == 0
    for cid in manifest["cases"]:
        assert cid in r.stdout
    assert f"{len(manifest['cases'])} cases" in r.stdout
    r = npattn_cli("check", "no/such_case", "x.npz")
    assert r.returncode == 2 and "error:" in r.stderr


# ------------------------------------------------------------------ regeneration
#
# Regeneration on this machine is deterministic (identical bytes twice). Against the stored
# fixtures, which another machine may have written, only a rounding bound can be promised:
# the products and reductions go through the CPU's BLAS kernels, whose summation order
# differs between CPUs (AMD and Intel measured at up to 7e-16 of the case scale).

REGEN_F64 = 1e-13  # |regenerated - stored| <= REGEN_F64 * case scale, float64 arrays


def regenerate(out, *extra):
    r = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "make_golden.py"), "--out", str(out), "--no-crosscheck", *extra],
        capture_output=True, text=True, timeout=900,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    return out


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory):
    return regenerate(tmp_path_factory.mktemp("regen") / "golden")


def regeneration_differences(stored: dict, new: dict) -> list:
    """What differs between a stored fixture and its regeneration beyond the rounding
    bound: float64 arrays within REGEN_F64 of the case scale, float32 arrays (the twins:
    float64 results rounded once) within one float32 ulp of the value plus that bound,
    integer arrays exactly. Returns "key: figure" strings."""
    problems = []
    if set(stored) != set(new):
        return [f"keys differ: only stored {sorted(set(stored) - set(new))}, only regenerated {sorted(set(new) - set(stored))}"]
    expected = {k: v for k, v in stored.items() if k == "output" or k.startswith(("grad.input.", "grad.param.", "buffer_after."))}
    scale = golden.case_scale(expected)
    for key in sorted(stored):
        a, b = stored[key], new[key]
        if a.shape != b.shape or a.dtype != b.dtype:
            problems.append(f"{key}: stored {a.dtype}{a.shape}, regenerated {b.dtype}{b.shape}")
        elif a.dtype.kind != "f":
            if not np.array_equal(a, b):
                problems.append(f"{key}: integer values differ")
        elif a.size:
            same = (a == b) | (np.isnan(a) & np.isnan(b))  # equal, infinities (masks) and NaNs included
            with np.errstate(invalid="ignore"):  # inf - inf where both are -inf: masked by `same`
                diff = np.where(same, 0.0, np.abs(a.astype(np.float64) - b.astype(np.float64)))
            diff = np.where(np.isnan(diff), np.inf, diff)  # a NaN or an infinity on one side only
            bound = REGEN_F64 * scale
            if a.dtype == np.float32:
                big = np.maximum(np.abs(a), np.abs(b))
                bound = bound + np.where(np.isfinite(big), np.spacing(np.where(np.isfinite(big), big, 0)), 0).astype(np.float64)
            if not np.all(diff <= bound):
                worst = int(np.argmax(diff - bound))
                problems.append(
                    f"{key}: max |difference| {diff.max():.3e} = {diff.max() / max(scale, 1e-300):.2e} of the case "
                    f"scale {scale:.3e}; at flat index {worst}: stored {a.flat[worst]!r}, regenerated {b.flat[worst]!r}"
                )
    return problems


def test_regeneration_agrees_with_the_stored_fixtures_to_rounding(regenerated, manifest):
    failures = []
    for cid, meta in manifest["cases"].items():
        problems = regeneration_differences(golden.read_npz(GOLDEN / meta["file"]), golden.read_npz(regenerated / meta["file"]))
        failures += [f"{cid}: {p}" for p in problems]
    assert not failures, "regenerated fixtures differ beyond rounding:\n" + "\n".join(failures)


def test_regeneration_bound_catches_a_change_above_rounding(manifest):
    cid = some_case(manifest, "AFF", "train", "float64")
    stored = golden.read_npz(GOLDEN / manifest["cases"][cid]["file"])
    assert regeneration_differences(stored, dict(stored)) == []
    scale = golden.case_scale({k: v for k, v in stored.items() if k.startswith("grad.")} | {"output": stored["output"]})
    tweaked = dict(stored, **{"grad.input.x": stored["grad.input.x"].copy()})
    tweaked["grad.input.x"].flat[3] += 1e-12 * scale
    problems = regeneration_differences(stored, tweaked)
    assert len(problems) == 1 and problems[0].startswith("grad.input.x: max |difference|"), problems
    c32 = some_case(manifest, "AFF", "train", "float32")
    s32 = golden.read_npz(GOLDEN / manifest["cases"][c32]["file"])
    one_ulp = dict(s32, output=np.nextafter(s32["output"], np.float32(np.inf)))
    assert regeneration_differences(s32, one_ulp) == []  # one float32 ulp: a different rounding
    two_ulp = dict(s32, output=np.nextafter(one_ulp["output"], np.float32(np.inf)))
    problems = regeneration_differences(s32, two_ulp)
    assert len(problems) == 1 and problems[0].startswith("output:"), problems


def test_regeneration_is_byte_identical_on_the_same_machine(regenerated, tmp_path, manifest):
    again = regenerate(tmp_path / "again")
    for cid, meta in manifest["cases"].items():
        assert (again / meta["file"]).read_bytes() == (regenerated / meta["file"]).read_bytes(), cid
