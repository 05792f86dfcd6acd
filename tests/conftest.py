"""Shared pytest set-up: ``tools/`` is importable (the PyTorch transcriptions used by the
cross-check tests live there, next to the golden tooling that uses them too)."""

import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT / "tools") not in sys.path:
    sys.path.insert(0, str(ROOT / "tools"))
