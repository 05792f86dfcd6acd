"""docs/attention.md: every mask grid is what npattn's own mask code prints for the call
above it, the Python example runs, and the names table lists every keyword."""

import inspect
import pathlib
import re

import numpy as np
import pytest

from npattn.functional import alibi_distance, position_mask, scaled_dot_product_attention_forward

DOC = pathlib.Path(__file__).resolve().parents[1] / "docs" / "attention.md"
TEXT = DOC.read_text()
BLOCKS = re.findall(r"```(\w*)\n(.*?)```", TEXT, flags=re.S)
GRIDS = [body for lang, body in BLOCKS if lang == "text" and body.startswith(("position_mask(", "alibi_distance("))]


def render(a):
    if a.dtype == bool:
        return "\n".join(" ".join("x" if e else "." for e in row) for row in a)
    return "\n".join(" ".join(str(int(e)) for e in row) for row in a)


@pytest.mark.parametrize("body", GRIDS, ids=[g.splitlines()[0] for g in GRIDS])
def test_each_grid_is_what_npattn_computes(body):
    call, *rows = body.strip().splitlines()
    name, args = re.fullmatch(r"(position_mask|alibi_distance)\((.*)\)", call).groups()
    fn = {"position_mask": position_mask, "alibi_distance": alibi_distance}[name]
    a = eval(f"f({args})", {"__builtins__": {}}, {"f": fn})  # the call as printed, nothing else in scope
    assert "\n".join(rows) == render(a)


def test_the_doc_shows_every_convention():
    assert len(GRIDS) >= 7
    calls = " ".join(g.splitlines()[0] for g in GRIDS)
    for part in ('alignment="top_left"', 'alignment="bottom_right"', "window=", "alibi_distance("):
        assert part in calls
    # a grid with L != S both ways
    shapes = [tuple(int(x) for x in re.match(r"\w+\((\d+), (\d+)", g).groups()) for g in GRIDS]
    assert any(L < S for L, S in shapes) and any(L > S for L, S in shapes)


def test_the_python_example_runs():
    code = [body for lang, body in BLOCKS if lang == "python"]
    assert code
    for body in code:
        exec(compile(body, str(DOC), "exec"), {})


def test_names_table_lists_every_keyword():
    table = TEXT[TEXT.index("## Names across libraries"):]
    keywords = [p for p in inspect.signature(scaled_dot_product_attention_forward).parameters if p not in ("q", "k", "v")]
    for kw in keywords:
        assert f"`{kw}" in table or f"{kw}=" in table, kw
    for name in ("lse", "dlse", "cu_seqlens_q", "cu_seqlens_k", "varlen_attention_forward"):
        assert re.search(rf"\b{name}\b", table), name
    for lib in ("torch", "flash-attn", "jax.nn.dot_product_attention"):
        assert lib in table.splitlines()[2]
