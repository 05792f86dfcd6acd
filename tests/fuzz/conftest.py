"""Property-based fuzzing of every public function and block of npattn (hypothesis).

Two profiles, chosen with the environment variable ``NPATTN_FUZZ``:

``ci`` (the default, part of ``python -m pytest``)
    derandomised (the same examples every run, from a hash of each test), no example
    database, 60 examples per unit (a test runs 1 to 12 units, ``fuzzlib.examples``):
    ``tests/fuzz`` takes 60 to 75 s on a 2-core machine, up to 4 minutes while another
    test run shares the cores.
``long`` (``NPATTN_FUZZ=long python -m pytest tests/fuzz``)
    random (a new seed every run), 400 examples per unit (about 14 minutes on 2
    cores), failing examples saved to the ``.hypothesis/`` database and replayed first
    on the next run.

Both have no deadline (a call's time on a shared machine says nothing about
correctness; hangs are caught by ``fuzzlib.call``'s watchdog instead) and print the
reproduction blob of a failure. The ``too_slow`` health check is suppressed: the first
call of a Numba backend loads its kernels from the on-disk cache (about 0.4 s), and
the example generation of a test is measured while the machine may be shared.
``NPATTN_FUZZ_EXAMPLES=<n>`` overrides the base number of examples of either profile.
"""

import os
import pathlib
import sys

from hypothesis import HealthCheck, settings

HERE = pathlib.Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))  # fuzzlib

_COMMON = dict(deadline=None, print_blob=True, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("ci", max_examples=60, derandomize=True, database=None, **_COMMON)
settings.register_profile("long", max_examples=400, derandomize=False, **_COMMON)

_profile = os.environ.get("NPATTN_FUZZ", "ci")
if _profile not in ("ci", "long"):
    raise ValueError(f"NPATTN_FUZZ must be 'ci' or 'long', got {_profile!r}")
if os.environ.get("NPATTN_FUZZ_EXAMPLES"):
    settings.register_profile(
        _profile + "-n", parent=settings.get_profile(_profile), max_examples=int(os.environ["NPATTN_FUZZ_EXAMPLES"])
    )
    _profile += "-n"
settings.load_profile(_profile)


def pytest_report_header(config):
    return f"npattn fuzz profile: {_profile} (max_examples={settings.default.max_examples}, derandomize={settings.default.derandomize})"
