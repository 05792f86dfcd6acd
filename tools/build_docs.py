"""Build the documentation site: ``python tools/build_docs.py --out DIR``.

The site is MkDocs Material, viewable with no network access:

- the block pages are generated here from the blocks' module docstrings (the single
  source of each derivation), their class docstrings, their row of docs/blocks.md, their
  fixtures in golden/manifest.json and their source;
- the functional-ops page from the docstrings of ``npattn.functional``'s modules;
- the other pages are docs/*.md as they are;
- the figures are drawn by tools/figures.py;
- MathJax 3 is taken from the npm registry (``npm pack mathjax@3``) into the built site,
  and the theme's web fonts are off, so nothing is loaded from a CDN;
- ``mkdocs build --strict`` (never ``-q``, which would hide the warnings from the strict
  count): any warning, a broken link or anchor included, fails the build.

Needs the ``docs`` extra (``pip install -e ".[docs]"``) and npm. The conversion functions
(``docstring_to_markdown``, ``ascii_to_latex``) need neither and are tested in
tests/test_docs_build.py.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]

# every block npattn exports: name -> (module under npattn.blocks, golden block name)
BLOCKS = {
    "SEBlock": "se",
    "SEModule": "se",
    "SKConv": "sk",
    "DAF": "aff",
    "AFF": "aff",
    "iAFF": "aff",
    "MS_CAM": "aff",
    "GCT": "gct",
    "ConvOffset2D": "deform",
    "DeformConv2d": "deform",
    "DeformConv2dPack": "deform",
    "ModulatedDeformConv2dPack": "deform",
    "CBAM": "cbam",
    "ECA": "eca",
    "CoordAttn": "coord_attn",
    "GlobalContext": "global_context",
    "SimAM": "simam",
    "NonLocalAttn": "non_local",
    "ViTAttention": "attention",
    "MultiheadAttention": "attention",
}

# the figures each page shows: page -> [(file, caption)]
FIGURES = {
    "deform": [
        ("bilinear_cell.svg", "The bilinear cell: a sample at p blends the four corners with the weights hy hx, hy lx, ly hx, ly lx."),
        ("offset_layout.svg", "The offset channels: torchvision's (off_y, off_x) pairs per tap and group, beside the seed's `.view` reinterpretation."),
        ("border_p_minus_1.svg", "The two border conventions at p = -1 (the `border_grad` argument)."),
    ],
    "attention": [("multihead_split.svg", "The multi-head split and one head's attention map P on a seeded input.")],
    "sk": [("sk_paths.svg", "SKConv's two paths, fused, squeezed and selected by a softmax over the paths.")],
    "aff": [("aff_fusion.svg", "AFF's fusion: MS_CAM's gate w weighs x against the residual.")],
}

# where the rest of a block's math lives: page -> [(title, link from blocks/)]
SEE_ALSO = {
    "deform": [("the functional op `deform_conv2d` and the sampling, derived", "../functional.md#npattnfunctionaldeformpy")],
    "attention": [("scaled dot-product attention, derived", "../functional.md#npattnfunctionalattentionpy"),
                  ("the attention variants and their conventions", "../attention.md")],
}

# ---------------------------------------------------------------------------------------------
# docstring (reST-flavoured, as the modules write them) -> Markdown

_INLINE = re.compile(
    r"(?P<math2>\$\$.+?\$\$)"
    r"|(?P<math1>(?<![\\$])\$[^$\s](?:[^$]*?[^$\s])?\$)"
    r"|(?P<paren>\\\(.+?\\\))"
    r"|(?P<code2>``.+?``)"
    r"|(?P<role>:[a-z]+:`[^`]+`)"
    r"|(?P<code1>`[^`]+`)"
)
_MD_SPECIAL = re.compile(r"([\\*_\[\]<>#|~])")


def _escape_text(text: str) -> str:
    return _MD_SPECIAL.sub(lambda m: "&lt;" if m.group(1) == "<" else "&gt;" if m.group(1) == ">" else "\\" + m.group(1), text)


def _code_span(body: str) -> str:
    fence = "``" if "`" in body else "`"
    pad = " " if body.startswith("`") or body.endswith("`") else ""
    return f"{fence}{pad}{body}{pad}{fence}"


def inline_markdown(text: str) -> str:
    """reST inline markup to Markdown: ``code`` and :role:`x` become code spans, $..$ and
    \\(..\\) math stays as it is, everything else is escaped so Markdown reads it as text."""
    out, pos = [], 0
    for m in _INLINE.finditer(text):
        out.append(_escape_text(text[pos:m.start()]))
        kind, s = m.lastgroup, m.group(0)
        if kind in ("math2", "math1", "paren"):
            out.append(s)
        elif kind == "code2":
            out.append(_code_span(s[2:-2]))
        elif kind == "role":
            out.append(_code_span(s[s.index("`") + 1:-1]))
        else:
            out.append(_code_span(s[1:-1]))
        pos = m.end()
    out.append(_escape_text(text[pos:]))
    return "".join(out)


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def docstring_to_markdown(doc: str, heading_level: int = 3, math_tables: bool = True) -> str:
    """Convert a module or class docstring to Markdown.

    - paragraphs: inline markup converted (``inline_markdown``), indentation removed;
    - a paragraph ending in ``::`` introduces a literal block (the indented lines after
      it): a fenced ``text`` block, verbatim, and below it, with ``math_tables``, a table
      of the lines that read as equations, typeset by ``ascii_to_latex``;
    - a line followed by a more indented one (a reST definition term) becomes bold;
    - a numpydoc section title (a line underlined with dashes) becomes a heading;
    - display math between ``$$`` lines, or ``\\[``..``\\]``, passes through with blank
      lines around it, inline ``$..$`` stays in the text.
    """
    lines = inspect.cleandoc(doc or "").splitlines()
    out: list[str] = []
    para: list[str] = []

    def flush():
        # join each paragraph (or list item) into one line first: a code span may run
        # over a line break
        items: list[str] = []
        for l in para:
            if re.match(r"(?:[-*+]|\d+\.) ", l) or not items:
                items.append(l)
            else:
                items[-1] += " " + l
        was_item = False
        for it in items:
            m = re.match(r"((?:[-*+]|\d+\.) +)(.*)", it)
            if m and not was_item and out and out[-1]:
                out.append("")
            out.append(m.group(1) + inline_markdown(m.group(2)) if m else inline_markdown(it))
            was_item = bool(m)
        if items:
            out.append("")
        para.clear()

    i = 0
    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        if not stripped:
            flush()
            i += 1
            continue
        # display math
        if stripped in ("$$", "\\[") or (stripped.startswith("$$") and not stripped.endswith("$$")):
            flush()
            close = "$$" if stripped.startswith("$$") else "\\]"
            block = [stripped]
            i += 1
            while i < len(lines) and not lines[i].strip().endswith(close):
                block.append(lines[i].strip())
                i += 1
            if i < len(lines):
                block.append(lines[i].strip())
                i += 1
            out.extend(["", *block, ""])
            continue
        if stripped.startswith("$$") and stripped.endswith("$$") and len(stripped) > 4:
            flush()
            out.extend(["", "$$", stripped[2:-2].strip(), "$$", ""])
            i += 1
            continue
        # numpydoc section title
        if i + 1 < len(lines) and re.fullmatch(r"-{3,}", lines[i + 1].strip()) and len(lines[i + 1].strip()) >= len(stripped) - 1:
            flush()
            out.extend(["#" * heading_level + " " + _escape_text(stripped), ""])
            i += 2
            continue
        base = _indent(line)
        # a reST definition term: the next non-blank line is more indented
        nxt = next((l for l in lines[i + 1:] if l.strip()), None)
        if (not para and not stripped.endswith("::") and nxt is not None and i + 1 < len(lines)
                and lines[i + 1].strip() and _indent(lines[i + 1]) > base and not re.match(r"[-*+] |\d+\. ", stripped)):
            flush()
            out.extend(["**" + inline_markdown(stripped) + "**", ""])
            i += 1
            continue
        if stripped == ".. math::":  # a reST math directive: display math
            flush()
            i += 1
            body = []
            while i < len(lines) and (not lines[i].strip() or _indent(lines[i]) > base):
                body.append(lines[i].strip())
                i += 1
            out.extend(["", "$$", *[b for b in body if b], "$$", ""])
            continue
        if stripped.endswith("::"):
            text = stripped[:-2].rstrip()
            text = text + ":" if text and not stripped.endswith(" ::") else text
            if text:
                para.append(text)
            flush()
            # the literal block: indented more than the paragraph, blank lines inside
            i += 1
            body: list[str] = []
            while i < len(lines) and (not lines[i].strip() or _indent(lines[i]) > base):
                body.append(lines[i])
                i += 1
            while body and not body[-1].strip():
                body.pop()
            while body and not body[0].strip():
                body.pop(0)
            if body:
                cut = min(_indent(l) for l in body if l.strip())
                body = [l[cut:].rstrip() for l in body]
                out.extend(["```text", *body, "```", ""])
                if math_tables:
                    table = derivation_table(body)
                    if table:
                        out.extend([*table, ""])
            continue
        para.append(stripped)
        i += 1
    flush()
    while out and not out[-1]:
        out.pop()
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------------------------
# derivation lines -> LaTeX

_GREEK = {
    "alpha", "beta", "gamma", "delta", "epsilon", "lambda", "mu", "sigma", "tau", "theta",
    "phi", "psi", "omega", "Phi", "Sigma", "Delta", "rho", "eta", "kappa", "pi",
}
_BIG = {"sum": r"\sum", "prod": r"\prod"}
_FUNCS = {"exp": r"\exp", "log": r"\log", "tanh": r"\tanh", "max": r"\max", "min": r"\min", "sigmoid": r"\sigma",
          "sqrt": r"\sqrt"}
_NAME = r"[A-Za-z][A-Za-z0-9]*'*(?:_(?:\{[A-Za-z0-9, ]+\}|[A-Za-z0-9]+)'*)?"
_TOKEN = re.compile(rf"\s+|\d+(?:\.\d+)?(?:e-?\d+)?|{_NAME}|\^T\b|\*\*|[-+*/=(),\[\]<>^|]")


def _base(name: str, called: bool) -> str | None:
    if name == "eps":
        return r"\epsilon"
    if name in _GREEK:
        return "\\" + name
    if name in _BIG:
        return _BIG[name]
    if name in _FUNCS:
        return _FUNCS[name] if name != "sqrt" else r"\operatorname{sqrt}"
    m = re.fullmatch(r"([A-Za-z])(\d+)", name)
    if m:
        return f"{m.group(1)}_{{{m.group(2)}}}"
    m = re.fullmatch(r"d([A-Za-z])(\d*)", name)  # a gradient: d<symbol>
    if m and not called:
        sub = f"_{{{m.group(2)}}}" if m.group(2) else ""
        return rf"\mathrm{{d}}{m.group(1)}{sub}"
    m = re.fullmatch(r"d([A-Za-z]{2,}[A-Za-z0-9]*)", name)  # d<name>: the gradient of a named array
    if m and not called:
        inner = _base(m.group(1), False)
        return rf"\mathrm{{d}}{inner}" if inner else None
    if len(name) == 1:
        return name
    return rf"\operatorname{{{name}}}" if called else rf"\mathit{{{name}}}"


def _ident(tok: str, called: bool) -> str | None:
    m = re.fullmatch(r"([A-Za-z][A-Za-z0-9]*)('*)(?:_(?:\{([A-Za-z0-9, ]+)\}|([A-Za-z0-9]+))('*))?", tok)
    if not m:
        return None
    name, p1, sub_braced, sub, p2 = m.groups()
    if sub is not None and len(sub) > 1 and not p1 and name not in _BIG and name not in ("mean", "max", "min", "softmax"):
        # an underscored name (deform_conv2d, conv_offset), not a symbol with a subscript
        word = (name + "_" + sub).replace("_", r"\_")
        return (rf"\operatorname{{{word}}}" if called else rf"\mathit{{{word}}}") + p2
    base = _base(name, called)
    if base is None:
        return None
    sub = sub_braced if sub_braced is not None else sub
    if sub is not None and base.startswith("\\mathit{"):
        base = "\\operatorname{" + base[len("\\mathit{"):]  # mean_{h, w}: an operator with a subscript
    if sub is not None:
        if base.endswith("}") and "_{" in base and not base.startswith(("\\operatorname", "\\mathit", "\\mathrm{d}\\")):
            return None  # W1_i: two subscripts
        sub = sub.replace(" ", "")
        sub = r"\mathrm{" + sub + "}" if len(sub) > 1 and sub.isalpha() and "," not in sub else sub
        return f"{base}{p1}_{{{sub}}}{p2}"
    return base + p1


def ascii_to_latex(expr: str) -> str | None:
    """Typeset one equation of a derivation (``dW2 = dz^T a``) in LaTeX, or None when it
    holds anything this small grammar does not know (then the page shows the code only).

    Single letters with digits get subscripts (``W1`` -> ``W_{1}``), ``_i`` and ``_{h, w}``
    are subscripts, ``d<symbol>`` is a gradient (``\\mathrm{d}W_{2}``), ``^T`` a
    transpose, ``*`` the elementwise product, ``|x|`` an absolute value, ``sum`` a sum,
    ``sigmoid`` sigma, Greek names their letters; a slice, an attribute, a keyword
    argument or a string is left to the code block."""
    expr = expr.strip()
    if not expr or "=" not in expr:
        return None
    if re.search(r"[:;\"`!@#$%&\\~?]|\.[A-Za-z]|\w=\w", expr.replace("+=", " += ").replace("-=", " -= ")):
        return None
    toks = _TOKEN.findall(expr)
    if "".join(toks) != expr:
        return None  # a character the grammar does not know
    toks = [t for t in toks if not t.isspace()]
    out: list[str] = []
    depth = 0
    bars = 0
    for i, t in enumerate(toks):
        nxt = toks[i + 1] if i + 1 < len(toks) else ""
        prev = toks[i - 1] if i else ""
        if t[0].isalpha():
            s = _ident(t, called=nxt == "(")
            if s is None:
                return None
            out.append(s + " ")
        elif t == "^T":
            out.append(r"^{\top}")
        elif t == "^":
            if not re.fullmatch(r"\d+|[A-Za-z]", nxt):
                return None
            out.append("^")
        elif t == "**":
            return None
        elif t == "*":
            out.append(r"\odot ")
        elif t in "([":
            depth += 1
            out.append(t)
        elif t in ")]":
            depth -= 1
            if depth < 0:
                return None
            out.append(t)
        elif t == "|":
            # an opening bar follows an operator, a bracket or the start
            opening = not prev or prev in "=+-*/([,^" or prev == "+=" or bars == 0
            bars += 1 if opening else -1
            out.append(r"\lvert " if opening else r"\rvert ")
        else:
            out.append(t)
    if depth != 0 or bars != 0:
        return None
    if any(re.fullmatch(r"\\mathit\{(\w+)\} ", o) and o[8:-2] in _PROSE for o in out):
        return None  # words of a sentence, not symbols
    return "".join(out).strip().replace("+=", r"\mathrel{+}=").replace("-=", r"\mathrel{-}=")


_PROSE = {"and", "or", "with", "as", "of", "the", "over", "for", "else", "if", "otherwise", "backward", "by",
          "each", "to", "in", "is", "from", "at", "on", "not", "where", "then", "per", "maps", "all"}


_LABEL = re.compile(r"^(?:[A-Za-z][A-Za-z0-9_ ]*|\"\w+\"):\s+(?=\S)")
_SHAPE = re.compile(r"\((?:[\w' .*+/-]*,)+[\w' .*+/-]*\)(?:,\s*\((?:[\w' .*+/-]*,)+[\w' .*+/-]*\))*")  # (N, C), (C,)
_LHS = re.compile(rf"^(?:{_NAME})(?:\s*,\s*{_NAME})*\s*[-+]?=(?!=)")


def derivation_row(line: str) -> tuple[str, str, str] | None:
    """One line ``[label:] lhs = rhs[,  lhs2 = rhs2]   (shape)   reason`` as (LaTeX,
    shape, reason), or None when it is not an equation the grammar typesets."""
    text = line.strip()
    label = ""
    m = _LABEL.match(text)
    if m:
        label, text = m.group(0).strip(), text[m.end():]
    text, _, comment = text.partition("#")  # a code-style comment: "dW2 = dz^T a   # (C, D) reason"
    text = text.rstrip()
    comment = comment.strip()
    m = re.match(r"(\((?:[\w' .*+/-]*,)+[\w' .*+/-]*\))\s*(.*)", comment)
    if m:
        comment = m.group(1) + "  " + m.group(2)
    if comment:
        text = text + "  " + comment
    text = re.sub(r";\s+", "  ", text)  # equations separated by semicolons
    # rejoin an aligned "lhs    = rhs"
    text = re.sub(r"^([A-Za-z][A-Za-z0-9_']*)\s{2,}([-+]?=)", r"\1 \2", text)
    if not _LHS.match(text):
        return None
    cols = re.split(r"\s{2,}", text)
    eqs, rest = [], []
    for c in cols:
        if not rest and (not eqs or _LHS.match(c)):
            eqs.append(c.rstrip(","))
        else:
            rest.append(c)
    shape = rest[0] if rest and _SHAPE.fullmatch(rest[0]) else ""
    why = " ".join(rest[1:] if shape else rest)
    texs = []
    for e in eqs:
        t = ascii_to_latex(e)
        if t is None:
            return None
        texs.append(t)
    tex = r",\quad ".join(texs)
    if label:
        why = (label + " " + why).strip()
    return tex, shape, why


def derivation_table(body: list[str]) -> list[str]:
    """The lines of a literal block that read as equations, typeset, in a table (LaTeX,
    shape, reason); [] when fewer than two lines do."""
    rows = []
    for line in body:
        if not line.strip():
            continue
        r = derivation_row(line)
        if r is None:
            continue
        tex, shape, why = r
        rows.append(f"| ${tex}$ | {_code_span(shape) if shape else ''} | {inline_markdown(why)} |")
    if len(rows) < 2:
        return []
    return ["| line | shape | why |", "|---|---|---|", *rows]


# ---------------------------------------------------------------------------------------------
# pages

def _block_rows() -> dict[str, list[str]]:
    """The rows of the overview table in docs/blocks.md, by block name."""
    rows = {}
    for line in (ROOT / "docs" / "blocks.md").read_text().splitlines():
        m = re.match(r"\| `(\w+)\(", line)
        if m:
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
            rows[m.group(1)] = cells
    return rows


def _fixture_table(block: str, manifest: dict) -> list[str]:
    cases = {cid: c for cid, c in manifest["cases"].items() if c.get("block") == block}
    if not cases:
        return ["No fixture holds this block."]
    out = [
        f"{len(cases)} cases in `golden/manifest.json`; each can be exported with `npattn export CASE DIR`"
        " and checked with `npattn check CASE RESULTS.npz` ([how](../validating.md)).",
        "",
        "| case | mode | dtype | configuration | input shapes | cross-checked against | max rel. error |",
        "|---|---|---|---|---|---|---|",
    ]
    for cid, c in sorted(cases.items()):
        cfg = ", ".join(f"{k}={v!r}" for k, v in (c.get("config") or {}).items())
        shapes = ", ".join(f"{k} {tuple(c['shapes'][k])}" for k in c.get("inputs", []) if k in c.get("shapes", {}))
        xc = c.get("cross_checked") or {}
        ref = " ".join(str(xc.get(k, "")) for k in ("reference", "library")).strip()
        err = xc.get("max_rel_err", "")
        out.append("| " + " | ".join([
            _code_span(cid), c.get("mode", ""), c.get("dtype", ""), _code_span(cfg) if cfg else "",
            inline_markdown(shapes), inline_markdown(ref) or "-", f"{err:.2g}" if isinstance(err, float) else str(err),
        ]) + " |")
    return out


def block_page(name: str, manifest: dict, rows: dict) -> str:
    modname = BLOCKS[name]
    mod = importlib.import_module(f"npattn.blocks.{modname}")
    cls = getattr(mod, name)
    path = f"npattn/blocks/{modname}.py"
    out = [f"# {name}", ""]
    row = rows.get(name)
    if row:
        out += [row[0], "", f"*{row[1]}*" if row[1] else "", ""]
    out += [
        f"The derivation below is the module docstring of `{path}`, the single source of the"
        f" math: the code follows it line by line, and `npattn explain {name}` walks it on a"
        " small seeded input. The notation is the [glossary](../glossary.md)'s.", "",
        "## Derivation", "",
    ]
    for fig, caption in FIGURES.get(modname, []):
        out += [f"![{caption}](../figures/{fig})", "", f"*{inline_markdown(caption)}*", ""]
    out += [docstring_to_markdown(mod.__doc__ or "", heading_level=3), ""]
    for title, target in SEE_ALSO.get(modname, []):
        out += [f"See also: [{title}]({target}).", ""]
    out += [f"## The class `{name}`", "", docstring_to_markdown(cls.__doc__ or "", heading_level=3), ""]
    if row:
        # the row's links are relative to docs/blocks.md; this page is one folder down
        row = [re.sub(r"\]\((?!https?:)([^)]*)\)",
                      lambda m: "](../" + ("blocks.md" + m.group(1) if m.group(1).startswith("#") else m.group(1)) + ")", c)
               for c in row]
        out += [
            "## Conventions", "",
            "| state_dict keys | notes |", "|---|---|",
            f"| {row[2]} | {row[3]} |", "",
            "The [overview of the blocks](../blocks.md) states the conventions shared by several"
            " blocks (the deformable sampling and its `border_grad`, the masks of attention).", "",
        ]
    out += ["## Fixtures", "", *_fixture_table(name, manifest), ""]
    src = (ROOT / path).read_text()
    out += [
        "## The code", "",
        f"`{path}`, the whole module ({len(src.splitlines())} lines):", "",
        '??? note "Source"', "",
        "    ```python",
        *[("    " + l) if l.strip() else "" for l in src.splitlines()],
        "    ```", "",
    ]
    return "\n".join(out)


def functional_page() -> str:
    intro = (ROOT / "docs" / "_functional_intro.md").read_text()
    import npattn.functional as F
    out = [intro.rstrip(), "", "## The ops, module by module", ""]
    for p in sorted(pathlib.Path(F.__file__).parent.glob("*.py")):
        if p.name.startswith("_"):
            continue
        mod = importlib.import_module(f"npattn.functional.{p.stem}")
        pairs = sorted(n[:-len("_forward")] for n in dir(mod) if n.endswith("_forward") and callable(getattr(mod, n))
                       and getattr(getattr(mod, n), "__module__", "") == mod.__name__)
        out += [f"### `npattn/functional/{p.name}`", ""]
        if pairs:
            out += ["Pairs: " + ", ".join(f"`{n}_forward` / `{n}_backward`" for n in pairs) + ".", ""]
        out += [docstring_to_markdown(mod.__doc__ or "", heading_level=4, math_tables=True), ""]
    return "\n".join(out)


def nav(extra: list[str]) -> list:
    blocks = [{name: f"blocks/{name}.md"} for name in BLOCKS]
    return [
        {"Home": "index.md"},
        {"Validating your framework": "validating.md"},
        {"Conformance": "conformance.md"},
        {"Porting the official code": "porting.md"},
        {"Blocks": [{"Overview": "blocks.md"}, *blocks]},
        {"Functional ops": "functional.md"},
        {"Attention variants": "attention.md"},
        {"Notation": "glossary.md"},
        {"Backends and performance": "backends.md"},
        {"Development": "development.md"},
        *[{p[:-3].replace("_", " ").capitalize(): p} for p in extra],
    ]


KNOWN = {"index.md", "validating.md", "porting.md", "blocks.md", "attention.md", "glossary.md",
         "backends.md", "development.md", "conformance.md"}

MATHJAX_CONFIG = """window.MathJax = {
  tex: {inlineMath: [["\\\\(", "\\\\)"]], displayMath: [["\\\\[", "\\\\]"]], processEscapes: true, processEnvironments: true},
  options: {ignoreHtmlClass: ".*|", processHtmlClass: "arithmatex"}
};
"""


def fetch_mathjax(dest: pathlib.Path, work: pathlib.Path) -> str:
    """``npm pack mathjax@3`` into work, the ES5 build's combined file, its output fonts
    and its TeX extensions copied to dest; returns the version."""
    subprocess.run(["npm", "pack", "--silent", "mathjax@3"], cwd=work, check=True, stdout=subprocess.PIPE)
    tgz = next(work.glob("mathjax-*.tgz"))
    with tarfile.open(tgz) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith("package/es5/")
                   and (m.name == "package/es5/tex-mml-chtml.js" or m.name.startswith(("package/es5/output/", "package/es5/input/tex/extensions/")))]
        tar.extractall(work, members=members, filter="data")
    shutil.copytree(work / "package" / "es5", dest)
    return tgz.name[len("mathjax-"):-len(".tgz")]


def assemble(docs: pathlib.Path) -> list[str]:
    """Write every page of the site into docs (a fresh folder); returns the extra pages."""
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "tools"))
    import figures

    docs.mkdir(parents=True, exist_ok=True)
    extra = []
    for p in sorted((ROOT / "docs").glob("*.md")):
        if p.name.startswith("_"):
            continue
        shutil.copy(p, docs / p.name)
        if p.name not in KNOWN:
            extra.append(p.name)
    manifest = json.loads((ROOT / "golden" / "manifest.json").read_text())
    rows = _block_rows()
    (docs / "blocks").mkdir()
    for name in BLOCKS:
        (docs / "blocks" / f"{name}.md").write_text(block_page(name, manifest, rows))
    (docs / "functional.md").write_text(functional_page())
    figures.draw_all(docs / "figures")
    (docs / "javascripts").mkdir()
    (docs / "javascripts" / "mathjax-config.js").write_text(MATHJAX_CONFIG)
    (docs / "stylesheets").mkdir()
    # derivation lines are long: a wider page, and no wrapping inside a typeset line
    (docs / "stylesheets" / "extra.css").write_text(
        ".md-grid { max-width: 1600px; }\n.md-typeset table:not([class]) td:first-child { white-space: nowrap; }\n")
    return extra


def mkdocs_config(docs: pathlib.Path, out: pathlib.Path, extra: list[str]) -> dict:
    return {
        "site_name": "npattn",
        "site_description": "NumPy reference implementation of CNN attention blocks",
        "docs_dir": str(docs),
        "site_dir": str(out),
        "use_directory_urls": False,  # pages open from the file system too
        "theme": {"name": "material", "font": False, "features": ["navigation.sections", "content.code.copy"]},
        "plugins": ["search"],
        "markdown_extensions": [
            "admonition", "attr_list", "tables", "pymdownx.details",
            {"toc": {"permalink": True}},
            {"pymdownx.highlight": {"use_pygments": True}},
            "pymdownx.superfences",
            {"pymdownx.arithmatex": {"generic": True}},
        ],
        "extra_javascript": ["javascripts/mathjax-config.js", "mathjax/tex-mml-chtml.js"],
        "extra_css": ["stylesheets/extra.css"],
        "validation": {
            "nav": {"omitted_files": "warn", "not_found": "warn", "absolute_links": "warn"},
            "links": {"not_found": "warn", "absolute_links": "warn", "unrecognized_links": "warn", "anchors": "warn"},
        },
        "nav": nav(extra),
    }


def run_mkdocs(docs: pathlib.Path, out: pathlib.Path, extra: list[str], cfg: pathlib.Path) -> None:
    """``mkdocs build --strict`` on the assembled pages; CalledProcessError on any warning."""
    cfg.write_text(json.dumps(mkdocs_config(docs, out, extra), indent=1))  # JSON is YAML
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--clean", "-f", str(cfg)], check=True, env=env)


def build(out: pathlib.Path) -> None:
    t0 = time.perf_counter()
    out = out.resolve()
    with tempfile.TemporaryDirectory(prefix="npattn-docs-") as tmp:
        tmp = pathlib.Path(tmp)
        docs = tmp / "docs"
        extra = assemble(docs)
        (tmp / "npm").mkdir()
        version = fetch_mathjax(docs / "mathjax", tmp / "npm")
        t1 = time.perf_counter()
        run_mkdocs(docs, out, extra, tmp / "mkdocs.yml")
    pages = len(list(out.rglob("*.html")))
    print(f"built {pages} pages into {out} (MathJax {version}; assembling {t1 - t0:.1f} s, mkdocs {time.perf_counter() - t1:.1f} s)")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=pathlib.Path, help="the folder to write the site into")
    args = ap.parse_args(argv)
    try:
        build(args.out)
    except subprocess.CalledProcessError as e:
        print(f"build_docs: {' '.join(map(str, e.cmd))} failed with exit status {e.returncode}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
