#!/usr/bin/env bash
# The documentation site in CI: a fresh venv with the `docs` extra, Debian's chromium, the
# README's build command verbatim (mkdocs --strict: a warning or a broken link fails it),
# the tests of the build pieces, then the formulas checked in headless Chromium.
# Needs npm (MathJax is taken from the npm registry at build time) and, for chromium, apt
# as root (skipped when chromium is already installed).
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
stamp() { echo "== docs [$(( $(date +%s) - start )) s] $*"; }
venv=$(mktemp -d)
trap 'rm -rf "$venv"' EXIT

stamp "the docs extra in a fresh venv"
python3 -m venv "$venv"
# shellcheck disable=SC1091
. "$venv/bin/activate"
python -m pip install -q --upgrade pip
pip install -e ".[docs]"
python -m pip install -q -e ".[test]"

if ! command -v chromium >/dev/null; then
  stamp "Debian's chromium"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null
fi
chromium --version

stamp "the site, built as the README says"
rm -rf site
python tools/build_docs.py --out site

stamp "the build pieces' tests (the docstring conversion, the figures, the README)"
NUMBA_NUM_THREADS=1 python -m pytest -q tests/test_docs_build.py tests/test_readme.py

stamp "formulas rendered in headless Chromium"
python tools/check_docs_browser.py site --page blocks/SEBlock.html --page blocks/DeformConv2d.html --page blocks/MultiheadAttention.html

stamp "docs finished"
