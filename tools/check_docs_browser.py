"""Open a built page in headless Chromium and check that MathJax rendered its formulas.

    python tools/check_docs_browser.py SITE_DIR [--page blocks/SEBlock.html] [--chromium chromium]

Runs Debian's ``chromium`` with ``--dump-dom`` (the DOM after the page's scripts ran) on
the page opened from the file system, with no network, in a fresh profile, and asserts:

- the page has MathJax output: at least ``--min-formulas`` ``<mjx-container>`` elements,
  and as many as the page has formulas (``arithmatex`` elements);
- no formula is left as source: no ``$$``, ``\\[`` or ``\\(`` in the text of the DOM
  outside code listings, and no MathJax error (``data-mjx-error``, ``merror``);
- the page loaded nothing from the network (every ``src`` and ``href`` of a script, a
  style sheet or an image is relative, or a data/file URL).

Exit status 0 when every assertion holds, 1 with the reasons otherwise.
"""

from __future__ import annotations

import argparse
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import time

FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-extensions",
    "--allow-file-access-from-files", "--virtual-time-budget=20000", "--run-all-compositor-stages-before-draw",
]


def dump_dom(chromium: str, page: pathlib.Path, timeout: float = 120.0) -> str:
    with tempfile.TemporaryDirectory(prefix="npattn-chromium-") as profile:
        cmd = [chromium, *FLAGS, f"--user-data-dir={profile}", "--dump-dom", page.resolve().as_uri()]
        r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=timeout)
    if r.returncode != 0 or not r.stdout.strip():
        raise RuntimeError(f"{' '.join(cmd)} exited with {r.returncode}; stderr:\n{r.stderr[-2000:]}")
    return r.stdout


def problems(dom: str, min_formulas: int = 1) -> list[str]:
    """What is wrong with the DOM of a rendered page; [] when the math rendered."""
    out = []
    n_mjx = len(re.findall(r"<mjx-container\b", dom))
    n_src = len(re.findall(r"""class="[^"]*\barithmatex\b""", dom))
    if n_mjx < min_formulas:
        out.append(f"{n_mjx} <mjx-container> elements, expected at least {min_formulas}")
    if n_mjx < n_src:
        out.append(f"{n_src} formulas on the page but only {n_mjx} rendered")
    if "data-mjx-error" in dom or "<mjx-merror" in dom:
        errs = re.findall(r'data-mjx-error="([^"]*)"', dom)
        out.append(f"MathJax errors: {sorted(set(errs))[:5]}")
    # the text outside code listings and MathJax's own output
    text = re.sub(r"<(pre|code|script|style|mjx-container|mjx-assistive-mml)\b.*?</\1>", " ", dom, flags=re.S)
    text = re.sub(r"<[^>]+>", " ", text)
    for raw in ("$$", "\\[", "\\("):
        if raw in text:
            i = text.index(raw)
            out.append(f"raw {raw!r} left in the page: ...{' '.join(text[max(0, i - 60):i + 60].split())}...")
    remote = [u for u in re.findall(r"""<(?:script|link|img)\b[^>]*?(?:src|href)="([^"]+)\"""", dom)
              if re.match(r"(?i)(https?:)?//", u)]
    if remote:
        out.append(f"the page loads from the network: {remote[:5]}")
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("site", type=pathlib.Path)
    ap.add_argument("--page", action="append", help="pages to check, relative to SITE (default blocks/SEBlock.html)")
    ap.add_argument("--chromium", default=shutil.which("chromium") or "chromium")
    ap.add_argument("--min-formulas", type=int, default=5)
    args = ap.parse_args(argv)
    bad = False
    for rel in args.page or ["blocks/SEBlock.html"]:
        page = args.site / rel
        if not page.is_file():
            print(f"{page}: no such page", file=sys.stderr)
            return 1
        t0 = time.perf_counter()
        dom = dump_dom(args.chromium, page)
        errs = problems(dom, args.min_formulas)
        n = len(re.findall(r"<mjx-container\b", dom))
        verdict = "FAIL" if errs else "ok"
        print(f"{verdict}: {rel}: {n} formulas rendered by MathJax in headless Chromium ({time.perf_counter() - t0:.1f} s)")
        for e in errs:
            print("  " + e)
        bad |= bool(errs)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
