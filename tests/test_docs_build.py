"""The pieces of the documentation build that need no network: the docstring-to-Markdown
conversion, the typesetting of derivation lines, the generated pages, the figures.
(The full build, with MathJax from npm and mkdocs --strict, and the check in headless
Chromium run in tools/ci_docs.sh.)"""

import importlib.util
import inspect
import json
import pathlib
import re

import pytest

import npattn
from npattn.blocks.base import Block

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _load(name):
    spec = importlib.util.spec_from_file_location(f"_npattn_tools_{name}", ROOT / "tools" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


bd = _load("build_docs")
MANIFEST = json.loads((ROOT / "golden" / "manifest.json").read_text())


def test_every_exported_block_has_a_page():
    exported = {n for n in npattn.__all__ if inspect.isclass(getattr(npattn, n)) and issubclass(getattr(npattn, n), Block)}
    assert exported == set(bd.BLOCKS)
    for name, mod in bd.BLOCKS.items():
        assert getattr(importlib.import_module(f"npattn.blocks.{mod}"), name) is getattr(npattn, name)


def test_inline_markup():
    md = bd.inline_markdown("``x * g`` is :func:`npattn.f`, a_b * c [1] <x> and $a_b^2$ or \\(q k^T\\)")
    assert md == "`x * g` is `npattn.f`, a\\_b \\* c \\[1\\] &lt;x&gt; and $a_b^2$ or \\(q k^T\\)"
    assert bd.inline_markdown("``a`b``") == "``a`b``"


def test_docstring_conversion():
    doc = '''Title line.

    A code span ``fc = Seq(a,
    b)`` over a line break, and a list:

    - one
      continued
    - two

    Notes
    -----
    Forward::

        s = mean_{h, w} x            (N, C)     squeeze
        g = sigmoid(s)               (N, C)
        y = x * g[:, :, None, None]  (N, C, H, W)

    ``Term``
        its definition

    $$
    y = x \\odot g
    $$
    inline $a + b$ stays.
    '''
    md = bd.docstring_to_markdown(doc)
    assert "A code span `fc = Seq(a, b)` over a line break, and a list:" in md
    assert "\n\n- one continued\n- two\n" in md
    assert "### Notes" in md
    assert "```text\ns = mean_{h, w} x            (N, C)     squeeze\n" in md  # verbatim, dedented
    assert "| $s =\\operatorname{mean}_{h,w} x$ | `(N, C)` | squeeze |" in md
    assert "| $g =\\sigma (s )$ | `(N, C)` |  |" in md
    assert "g[:, :" not in md.split("```", 2)[2]  # the slice stays in the code block only
    assert "**`Term`**\n\nits definition" in md
    assert "\n\n$$\ny = x \\odot g\n$$\n\n" in md  # display math with blank lines around it
    assert "inline $a + b$ stays." in md


@pytest.mark.parametrize("line, tex", [
    ("dW2 = dz^T a", r"\mathrm{d}W_{2} =\mathrm{d}z ^{\top}a"),
    ("dz = dg * g * (1 - g)", r"\mathrm{d}z =\mathrm{d}g \odot g \odot (1-g )"),
    ("dh = da * [h > 0]", r"\mathrm{d}h =\mathrm{d}a \odot [h >0]"),
    ("l = sum_{h, w} |x|", r"l =\sum_{h,w} \lvert x \rvert"),
    ("r = sqrt(mean_c emb^2 + eps)", r"r =\operatorname{sqrt} (\operatorname{mean}_{c} \mathit{emb} ^2+\epsilon )"),
    ("demb += dr * emb", r"\mathrm{d}\mathit{emb} \mathrel{+}=\mathrm{d}r \odot \mathit{emb}"),
])
def test_ascii_to_latex(line, tex):
    assert bd.ascii_to_latex(line) == tex


@pytest.mark.parametrize("line", [
    "y = x * g[:, :, None, None]",  # a slice
    "w = cache.weight",  # an attribute
    "T = x and P = x, or pool(x) with sub_sample",  # a sentence
    "a = (b",  # unbalanced
    'mode = "l2"',  # a string
])
def test_ascii_to_latex_refuses(line):
    assert bd.ascii_to_latex(line) is None


def test_derivation_row_with_a_code_comment():
    assert bd.derivation_row("dW2 = dz^T a      # (C, D)  chain rule through z = a W2^T") == (
        r"\mathrm{d}W_{2} =\mathrm{d}z ^{\top}a", "(C, D)", "chain rule through z = a W2^T")


def test_math_directive():
    md = bd.docstring_to_markdown("Text.\n\n.. math::\n\n    y = x \\odot g\n\nAfter.")
    assert "\n\n$$\ny = x \\odot g\n$$\n\n" in md and md.endswith("After.\n")


def test_derivation_row():
    row = bd.derivation_row("dV   = A^T dY;  dA = dY V^T        (B, m, C'), (B, n, m)   both products")
    assert row == (r"\mathrm{d}V =A ^{\top}\mathrm{d}Y,\quad \mathrm{d}A =\mathrm{d}Y V ^{\top}", "(B, m, C'), (B, n, m)", "both products")
    assert bd.derivation_row("l2:  demb += dr * emb / (C r)      dr/demb_c = emb_c / (C r)")[2] == "l2: dr/demb_c = emb_c / (C r)"
    assert bd.derivation_row("the bias does not change y") is None


@pytest.mark.parametrize("name", list(bd.BLOCKS))
def test_block_page(name):
    page = bd.block_page(name, MANIFEST, bd._block_rows())
    mod = importlib.import_module(f"npattn.blocks.{bd.BLOCKS[name]}")
    assert page.startswith(f"# {name}\n")
    for section in ("## Derivation", "## Conventions", "## Fixtures", "## The code"):
        assert section in page, section
    # the derivation: every literal line of the module docstring is on the page, verbatim
    for line in inspect.cleandoc(mod.__doc__).splitlines():
        if line.startswith("    ") and line.strip():
            assert line.strip() in page, line
    # math: the page has typeset lines (what MathJax renders)
    assert len(re.findall(r"^\| \$.+\$ \|", page, flags=re.M)) >= 2
    # every fixture of the block, and the module's source
    n = sum(1 for c in MANIFEST["cases"].values() if c["block"] == name)
    assert n > 0 and len(re.findall(r"^\| `[\w/.+-]+` \| (train|eval) ", page, flags=re.M)) == n
    assert "    " + inspect.getsource(mod).splitlines()[0] in page


def test_functional_page():
    page = bd.functional_page()
    assert page.startswith("# Functional ops")
    for pair in ("conv2d_forward", "batch_norm_forward", "scaled_dot_product_attention_forward", "deform_conv2d_forward"):
        assert f"`{pair}`" in page, pair


def test_nav_holds_every_page():
    pages = [p.name for p in (ROOT / "docs").glob("*.md") if not p.name.startswith("_")]
    extra = [p for p in pages if p not in bd.KNOWN]
    listed = json.dumps(bd.nav(extra))
    for p in pages:
        assert f'"{p}"' in listed, p
    for name in bd.BLOCKS:
        assert f'"blocks/{name}.md"' in listed


def test_figures(tmp_path):
    pytest.importorskip("matplotlib", reason="the figures need the docs extra (matplotlib)")
    figures = _load("figures")
    paths = figures.draw_all(tmp_path)
    assert sorted(p.name for p in paths) == sorted(f"{n}.svg" for n in figures.NAMES)
    for p in paths:
        text = p.read_text()
        assert text.lstrip().startswith("<?xml") and "<svg" in text and len(text) > 2000, p
    # every figure a page refers to is drawn
    drawn = {p.name for p in paths}
    assert {f for figs in bd.FIGURES.values() for f, _ in figs} == drawn
    # the same figures again: the same bytes (no date, fixed ids)
    again = figures.draw_all(tmp_path / "again")
    assert [p.read_bytes() for p in paths] == [p.read_bytes() for p in again]


@pytest.mark.parametrize("name", ["ViTAttention", "MultiheadAttention", "SEBlock"])
def test_block_page_links_leave_the_blocks_folder(name):
    """A block page lives in blocks/: links to the other pages go up one folder (mkdocs
    --strict would fail the build on a broken one; this finds it without mkdocs)."""
    page = bd.block_page(name, MANIFEST, bd._block_rows())
    page = page[:page.index("## The code")]  # the source listing is code, not links
    for target in re.findall(r"\]\(([^)]+)\)", page):
        assert target.startswith(("../", "http")), target
        path = target[3:].split("#")[0]
        assert path.startswith("figures/") or (ROOT / "docs" / path).exists() or path == "functional.md", target


def test_browser_check_verdicts():
    """tools/check_docs_browser.py's reading of a DOM (the browser run is in tools/ci_docs.sh)."""
    cb = _load("check_docs_browser")
    rendered = '<p><span class="arithmatex"><mjx-container class="MathJax">x</mjx-container></span></p>'
    assert cb.problems(rendered * 5, min_formulas=5) == []
    raw = '<p><span class="arithmatex">\\(s = x\\)</span></p>'
    errs = cb.problems(raw, min_formulas=1)
    assert any("0 <mjx-container>" in e for e in errs) and any("raw '\\\\('" in e for e in errs)
    assert cb.problems("<p>$$ y $$</p>" + rendered, min_formulas=1)
    assert cb.problems(rendered + '<script src="https://cdn.example/mathjax.js"></script>', min_formulas=1)
    assert cb.problems(rendered.replace("x</mjx", '<mjx-merror data-mjx-error="Undefined">x</mjx-merror></mjx'), 1)
    assert cb.problems("<pre><code>$$ y $$</code></pre>" + rendered, min_formulas=1) == []


def test_strict_build_fails_on_a_broken_link(tmp_path):
    """The site's pages pass mkdocs --strict, and one broken link fails it (MathJax is left
    out here: it comes from npm in the full build, tools/ci_docs.sh)."""
    pytest.importorskip("mkdocs", reason="the strict build needs the docs extra (mkdocs)")
    pytest.importorskip("matplotlib", reason="the figures need the docs extra (matplotlib)")
    import subprocess

    docs = tmp_path / "docs"
    extra = bd.assemble(docs)
    bd.run_mkdocs(docs, tmp_path / "site", extra, tmp_path / "mkdocs.yml")
    assert (tmp_path / "site" / "blocks" / "SEBlock.html").is_file()
    (docs / "zz_broken.md").write_text("# Broken\n\n[a page that is not there](nowhere.md)\n")
    with pytest.raises(subprocess.CalledProcessError):
        bd.run_mkdocs(docs, tmp_path / "site2", extra + ["zz_broken.md"], tmp_path / "mkdocs.yml")
