"""Shared pytest set-up: ``tools/`` is importable (the PyTorch transcriptions used by the
cross-check tests live there, next to the golden tooling that uses them too)."""

import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT / "tools") not in sys.path:
    sys.path.insert(0, str(ROOT / "tools"))

# With NPATTN_SKIPPED_LOG=FILE, the node id of every skipped test (and of every module
# skipped at collection, e.g. by importorskip) is appended to FILE, one per line: CI runs
# the README's test command on the README's install first, then runs exactly these again
# with every optional extra installed (pytest @FILE).
import os  # noqa: E402

_SKIPPED_LOG = os.environ.get("NPATTN_SKIPPED_LOG")


def _log_skip(report):
    if _SKIPPED_LOG and report.skipped and report.nodeid:
        with open(_SKIPPED_LOG, "a", encoding="utf-8") as f:
            f.write(report.nodeid + "\n")


def pytest_collectreport(report):
    _log_skip(report)


def pytest_runtest_logreport(report):
    if report.when == "setup" or report.when == "call":
        _log_skip(report)
