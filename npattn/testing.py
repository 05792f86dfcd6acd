"""Helpers for another project's test suite: compare your implementation with npattn's
golden fixtures under pytest (or any runner that reports ``AssertionError``).

::

    import pytest
    from npattn import golden
    from npattn.testing import assert_matches_golden, golden_cases

    @pytest.mark.parametrize("case_id", golden_cases("deform_conv2d/*"))
    def test_my_deform_conv(case_id):
        case = golden.load(case_id)
        a = case.inputs()
        out = my_deform_conv2d(**a, **case.meta["config"])   # your implementation
        assert_matches_golden(case_id, {"output": out})       # add gradients as you have them

:func:`assert_matches_golden` raises ``AssertionError`` whose message is
:func:`npattn.golden.check`'s report: per tensor the status, max absolute error,
normwise relative error, mismatched elements and worst index, under the tolerances of the
dtype of ``outputs["output"]``.
"""

from __future__ import annotations

import fnmatch

from . import golden

__all__ = ["assert_matches_golden", "golden_cases"]


def assert_matches_golden(case, outputs: dict, golden_dir=None):
    """Compare ``outputs`` with a golden case; raise ``AssertionError`` with the checker's
    report when it fails, return the :class:`npattn.golden.CheckReport` when it passes.

    Parameters
    ----------
    case : str or npattn.golden.Case
        A case id (``npattn list`` shows them) or a loaded case.
    outputs : dict
        ``output`` (required) and any of ``grad.input.<name>``, ``grad.param.<key>``,
        ``buffer_after.<key>`` (the fixture's key names); gradients you leave out are
        reported as "not provided" and not compared.
    golden_dir : fixture directory (default: ``npattn.golden.default_dir()``)
    """
    __tracebackhide__ = True  # pytest shows the caller's line, not this one
    case_id = case.case_id if isinstance(case, golden.Case) else case
    report = golden.check(case_id, outputs, golden_dir)
    if not report.ok:
        raise AssertionError("npattn golden check failed\n" + str(report))
    return report


def golden_cases(pattern: str = "*", golden_dir=None) -> list:
    """Case ids matching ``pattern`` (``fnmatch`` style: ``*``, ``?``, ``[...]``), sorted,
    for ``pytest.mark.parametrize``. E.g. ``golden_cases("aff/*_f64")``,
    ``golden_cases("*_eval_f32")``. A pattern that matches nothing raises ``ValueError``
    (an empty parametrisation would silently run no test)."""
    ids = sorted(c for c in golden.list_cases(golden_dir) if fnmatch.fnmatchcase(c, pattern))
    if not ids:
        raise ValueError(f"golden_cases: no golden case matches {pattern!r} (npattn list shows the cases)")
    return ids
