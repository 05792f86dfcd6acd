"""npattn.testing used the way another project's test suite would use it: parametrised
over golden cases, running an implementation (here npattn itself, called through its
public API as a user calls theirs), and the assertion message of a failing comparison."""

import numpy as np
import pytest

import npattn
from npattn import golden
from npattn.testing import assert_matches_golden, golden_cases


@pytest.mark.parametrize("case_id", golden_cases("deform_conv2d/*"))
def test_deform_conv2d_function_matches_golden(case_id):
    case = golden.load(case_id)
    a = case.inputs()
    out, cache = npattn.deform_conv2d_forward(**a, **case.meta["config"])
    grads = npattn.deform_conv2d_backward(case.arrays["grad_output"], cache)
    outputs = {"output": out} | {f"grad.input.{k}": v for k, v in grads.items()}
    report = assert_matches_golden(case_id, outputs)
    assert [t.status for t in report.tensors] == ["ok"] * len(case.expected())


@pytest.mark.parametrize("case_id", golden_cases("*pack/*_f32"))
def test_mmcv_layers_in_float32_match_golden(case_id):
    """A float32 implementation against the float32 twins: the block built from the
    manifest's config, the state_dict loaded, forward and backward."""
    case = golden.load(case_id)
    blk = getattr(npattn, case.meta["block"])(**case.meta["config"], dtype=np.float32)
    blk.load_state_dict(case.state_dict())
    y, cache = blk.forward(*case.inputs().values())
    (d_x,), params = blk.backward(case.arrays["grad_output"], cache)
    assert_matches_golden(case, {"output": y, "grad.input.x": d_x} | {f"grad.param.{k}": v for k, v in params.items()})


def test_golden_cases_patterns():
    every = golden_cases()
    assert every == sorted(golden.list_cases()) and len(every) > 50
    f64 = golden_cases("aff/c8_*_f64")
    assert f64 == ["aff/c8_r4_eval_f64", "aff/c8_r4_train_f64"]
    assert all(c.endswith("_eval_f32") for c in golden_cases("*_eval_f32"))
    assert golden_cases("deform_conv2d_pack/init_[mt]*_f64") == ["deform_conv2d_pack/init_mmcv_eval_f64", "deform_conv2d_pack/init_torchvision_eval_f64"]
    with pytest.raises(ValueError, match=r"no golden case matches 'nothing/\*'"):
        golden_cases("nothing/*")


def test_a_wrong_result_fails_with_the_checkers_report():
    """mmcv's layer in its initial state with torchvision's border convention: the output
    and the input gradient match the mmcv case, the offset conv's gradients do not."""
    case_id = "modulated_deform_conv2d_pack/init_mmcv_eval_f64"
    case = golden.load(case_id)
    blk = npattn.ModulatedDeformConv2dPack(**{**case.meta["config"], "border_grad": "torchvision"}, dtype=np.float64)
    blk.load_state_dict(case.state_dict())
    y, cache = blk.forward(case.inputs()["x"])
    (d_x,), params = blk.backward(case.arrays["grad_output"], cache)
    outputs = {"output": y, "grad.input.x": d_x} | {f"grad.param.{k}": v for k, v in params.items()}
    with pytest.raises(AssertionError) as info:
        assert_matches_golden(case_id, outputs)
    message = str(info.value)
    assert message.startswith("npattn golden check failed\ncase modulated_deform_conv2d_pack/init_mmcv_eval_f64")
    lines = {line.split()[0]: line.split()[1] for line in message.splitlines()[3:] if len(line.split()) > 1}
    assert lines["output"] == "ok" and lines["grad.input.x"] == "ok" and lines["grad.param.weight"] == "ok"
    assert lines["grad.param.conv_offset.weight"] == "mismatch" and lines["grad.param.conv_offset.bias"] == "mismatch"
    assert message.rstrip().endswith("FAIL")
    # a missing output is reported as such
    with pytest.raises(AssertionError, match=r"output\s+missing\s+required"):
        assert_matches_golden(case_id, {"grad.input.x": d_x})
