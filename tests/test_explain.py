"""``npattn explain``: the derivation in each converted block's docstring and the code stay in step.

Every block in ``npattn.explain.EXAMPLES`` is walked: every forward tag equals the code's
value, every backward symbol is shown with its shape and passes its local check (the line
alone against central differences of the forward lines it undoes). A deliberately wrong
backward line must fail its check.
"""

from __future__ import annotations

import contextlib
import io
import re
import types

import numpy as np
import pytest

from npattn import explain
from npattn.cli import main

NAMES = [ex.name for ex in explain.EXAMPLES]
_WALKS = {}


def walked(name):
    if name not in _WALKS:
        _WALKS[name] = explain.walk(explain.find_example(name), seed=0)
    return _WALKS[name]


def run_cli(*argv):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(list(argv))
    return rc, out.getvalue()


@pytest.mark.parametrize("name", NAMES)
def test_explain_cli_passes_and_shows_every_backward_symbol(name):
    rc, text = run_cli("explain", name.upper(), "--values", "3")
    assert rc == 0, text
    assert f"{name}: all checks passed" in text
    deriv = explain.derivation_for(explain.find_example(name))
    blocks = re.split(r"\n  (?=\S)", text)
    for ln in deriv.backward:
        entry = next((b for b in blocks if b.startswith(f"{ln.sym} = ")), None)
        assert entry is not None, f"{ln.sym} not shown"
        assert ln.shape in entry  # the derivation's symbolic shape, beside the value's
        assert "value (" in entry
        assert "ok   local check through" in entry, entry
        assert "FAIL" not in entry


@pytest.mark.parametrize("name", NAMES)
def test_every_backward_symbol_is_a_variable_the_walk_shows(name):
    w = walked(name)
    lhs = {ln.sym for ln in w.derivation.backward}
    assert lhs <= w.shown(), sorted(lhs - w.shown())
    for step in w.steps:
        assert step.value is not None, step.line.sym
        if step.kind == "backward":
            assert np.shape(step.value) == np.shape(w.values[step.line.sym[1:]])
            assert any("local check" in msg for ok, msg in step.verdicts)
        assert step.ok, (step.line.sym, step.verdicts)
    assert w.ok, w.summary


@pytest.mark.parametrize("name", NAMES)
def test_every_parameter_is_bound_and_every_forward_symbol_the_code_has_is_compared(name):
    w = walked(name)
    params = [k for k in explain.find_example(name).build(np.random.default_rng(0)).parameter_names()]
    msgs = " ".join(m for _, m in w.summary)
    for key in params:
        assert f"gradient of {key} equals" in msgs
    compared = [s for s in w.steps if s.kind == "forward" and s.source == "code"]
    assert compared and all(any("tag equals" in m for _, m in s.verdicts) for s in compared)


class _Skewed:
    """numpy with one op made wrong: stands for a mistaken backward line."""

    def __init__(self, name, factor):
        self._name, self._factor = name, factor

    def __getattr__(self, attr):
        fn = getattr(np, attr)
        if attr != self._name:
            return fn
        return lambda *a, **k: self._factor * fn(*a, **k)


def test_a_wrong_backward_line_fails_its_local_check(monkeypatch):
    from npattn.blocks import se

    monkeypatch.setattr(se, "np", _Skewed("einsum", 1.5))  # dg = 1.5 sum dy * x: wrong
    w = explain.walk(explain.find_example("SEBlock"), seed=0)
    by_sym = {s.line.sym: s for s in w.steps if s.kind == "backward"}
    assert not by_sym["dg"].ok
    assert any(not ok and "local check" in msg for ok, msg in by_sym["dg"].verdicts)
    # the lines after it undo their own step correctly, on the wrong upstream value
    assert by_sym["dz"].ok and by_sym["dW2"].ok
    assert not w.ok
    _WALKS.clear()
    rc, text = run_cli("explain", "SEBlock")
    assert rc == 1 and "FAIL" in text and "some checks FAILED" in text


def test_a_wrong_forward_tag_and_a_symbol_the_code_lacks_fail(monkeypatch):
    from npattn.blocks import se

    doc = se.__doc__
    assert doc.count("[relu(h)]") == 1 and doc.count("    da = dz W2 ") == 1
    wrong = doc.replace("[relu(h)]", "[relu(h) * 2]").replace("    da = dz W2 ", "    dq = dz W2 ")
    monkeypatch.setattr(se, "__doc__", wrong)
    w = explain.walk(explain.find_example("SEBlock"), seed=0)
    steps = {s.line.sym: s for s in w.steps}
    assert not steps["a"].ok and "tag differs from the code's a" in steps["a"].verdicts[0][1]
    assert not steps["dq"].ok and "the code has no dq" in steps["dq"].verdicts[0][1]
    assert not steps["dh"].ok  # its local check needs da, which no line walked
    assert steps["h"].ok and steps["dz"].ok and not w.ok


def test_parse_fields():
    doc = """x.

Forward::

    s = mean x            (N, C)     squeeze        [mean(x, (2, 3)) * 2]
    y = x * s             (N, C, H, W)              [x * s[:, :, None, None]]

Backward::

    ds = sum dy x         (N, C)     a reason with [brackets] inside
    dx = a formula long enough to wrap
                          (N, C, H, W)  its reason
                                        continued
"""
    d = explain.parse_derivation(doc)
    assert [ln.sym for ln in d.forward] == ["s", "y"] and d.forward[0].tag == "mean(x, (2, 3)) * 2"
    assert d.forward[1].tag == "x * s[:, :, None, None]" and d.forward[0].reason == "squeeze"
    assert d.backward[0].tag is None and d.backward[0].reason == "a reason with [brackets] inside"
    assert d.backward[1].shape == "(N, C, H, W)" and d.backward[1].reason == "its reason"
    assert d.backward[1].text == ["continued"]


@pytest.mark.parametrize("doc, match", [
    ("Forward::\n\n    s = mean x   [mean(x, 2)]\n\nBackward::\n\n    ds = 1   (N,)\n", "no \\(shape\\)"),
    ("Forward::\n\n    y = x   (N,)\n\nBackward::\n\n    dy = 1   (N,)\n", "has no \\[tag\\]"),
    ("Forward::\n\n    y = x   (N,)   [x]\n", "no line 'Backward::'"),
    ("Forward::\n\n    s = x   (N,)   [x]\n\nBackward::\n\n    ds = 1   (N,)\n", "must define y"),
])
def test_malformed_derivations_are_refused(doc, match):
    with pytest.raises(explain.DerivationError, match=match):
        explain.parse_derivation(doc)


def test_unknown_block_is_a_user_error(capsys):
    assert main(["explain", "NoSuchBlock"]) == 2
    assert "blocks with one: " in capsys.readouterr().err


# ---- exercises -------------------------------------------------------------------------------

SE_SOLUTION = '''    x, g, a, h, s, W1, W2 = (cache[k] for k in ("x", "g", "a", "h", "s", "W1", "W2"))
    H, W = x.shape[2:]
    dg = (dy * x).sum(axis=(2, 3))
    dz = dg * g * (1 - g)
    dW2 = dz.T @ a
    db2 = dz.sum(axis=0)
    da = dz @ W2
    dh = da * (h > 0)
    dW1 = dh.T @ s
    db1 = dh.sum(axis=0)
    ds = dh @ W1
    dx = dy * g[:, :, None, None] + ds[:, :, None, None] / (H * W)
    return dict(dg=dg, dz=dz, dW2=dW2, db2=db2, da=da, dh=dh, dW1=dW1, db1=db1, ds=ds, dx=dx)
'''
STUB = '    raise NotImplementedError("write the backward, one gradient a line")\n'


def _solve(path, body):
    src = path.read_text()
    assert src.count(STUB) == 1
    path.write_text(src.replace(STUB, body))


@pytest.mark.parametrize("name", NAMES)
def test_exercise_stub_fails(name, tmp_path):
    rc, text = run_cli("exercise", name, str(tmp_path))
    assert rc == 0
    path = tmp_path / f"{name.lower()}_exercise.py"
    assert text.strip() == str(path) and path.is_file()
    src = path.read_text()
    for ln in explain.derivation_for(explain.find_example(name)).backward:
        assert f"# {ln.sym} = {ln.math}" in src  # the derivation, as comments
    rc, text = run_cli("exercise", "check", str(tmp_path))
    assert rc == 1 and "backward is not written yet" in text and "FAILED" not in text.split("not written")[0]


@pytest.mark.parametrize("name", ["SEBlock", "SEModule"])
def test_exercise_reference_solution_passes_and_a_wrong_line_is_named(name, tmp_path):
    assert run_cli("exercise", name, str(tmp_path))[0] == 0
    path = tmp_path / f"{name.lower()}_exercise.py"
    _solve(path, SE_SOLUTION)
    rc, text = run_cli("exercise", "check", str(tmp_path))
    assert rc == 0, text
    assert "line by line: all 10 gradients right" in text and "PASSED" in text
    n_golden = text.count("  golden ")
    assert n_golden >= 2 and text.count(" ok (worst rel err") == n_golden  # f32 and f64 fixtures
    # a mistake in one line: the grader names that line, not the ones after it
    path.write_text(path.read_text().replace("    da = dz @ W2\n", "    da = dz @ W2 * 1.01\n"))
    rc, text = run_cli("exercise", "check", str(tmp_path))
    assert rc == 1
    assert "FAIL first wrong gradient: da = dz W2" in text
    assert "WRONG" in text and "golden" in text and "FAIL (wrong:" in text


def test_exercise_refuses_to_overwrite(tmp_path):
    assert run_cli("exercise", "SimAM", str(tmp_path))[0] == 0
    path = tmp_path / "simam_exercise.py"
    path.write_text("# my work\n")
    out = io.StringIO()
    with contextlib.redirect_stderr(out):
        assert main(["exercise", "SimAM", str(tmp_path)]) == 2
    assert "exists; pass --force" in out.getvalue() and path.read_text() == "# my work\n"
    assert run_cli("exercise", "SimAM", str(tmp_path), "--force")[0] == 0
    assert "def backward(dy, cache)" in path.read_text()


CBAM_SOLUTION = '''    from npattn import functional as F

    x, x1, gc, gs, p, q = (cache[k] for k in ("x", "x1", "gc", "gs", "p", "q"))
    W1, W2, Ws, gamma, eps = (cache[k] for k in ("W1", "W2", "Ws", "gamma", "eps"))
    N, C, H, W = x.shape
    dgs = (dy * x1).sum(axis=1, keepdims=True)
    dr = dgs * gs * (1 - gs)
    if cache["training"]:
        mu, var = q.mean(axis=(0, 2, 3), keepdims=True), q.var(axis=(0, 2, 3), keepdims=True)
    else:
        mu, var = cache["rm"].reshape(1, 1, 1, 1), cache["rv"].reshape(1, 1, 1, 1)
    inv = 1 / np.sqrt(var + eps)
    q_hat = (q - mu) * inv
    dgamma = (dr * q_hat).sum(axis=(0, 2, 3))
    dbeta = dr.sum(axis=(0, 2, 3))
    dq_hat = dr * gamma.reshape(1, 1, 1, 1)
    if cache["training"]:
        dq = inv * (dq_hat - dq_hat.mean(axis=(0, 2, 3), keepdims=True)
                    - q_hat * (dq_hat * q_hat).mean(axis=(0, 2, 3), keepdims=True))
    else:
        dq = dq_hat * inv
    _, k_conv = F.conv2d_forward(p, Ws, None, padding=(Ws.shape[2] - 1) // 2)
    g_conv = F.conv2d_backward(dq, k_conv)
    dp, dWs = g_conv["x"], g_conv["weight"]
    ties_c = x1 == x1.max(axis=1, keepdims=True)
    dx1 = dy * gs + dp[:, 0:1] / C + dp[:, 1:2] * (ties_c / ties_c.sum(axis=1, keepdims=True)).astype(x.dtype)
    dgc = (dx1 * x).sum(axis=(2, 3))
    dzc = dgc * gc * (1 - gc)
    out = dict(dgs=dgs, dr=dr, dq=dq, dgamma=dgamma, dbeta=dbeta, dp=dp, dWs=dWs, dx1=dx1, dgc=dgc, dzc=dzc,
               dz_avg=dzc, dz_max=dzc)
    dW1, dW2 = 0, 0
    for t in ("avg", "max"):
        v = cache["v_" + t]
        h = v @ W1.T
        dW2 = dW2 + dzc.T @ np.maximum(h, 0)
        dh = (dzc @ W2) * (h > 0)
        dW1 = dW1 + dh.T @ v
        out["dv_" + t] = dh @ W1
    ties_hw = x == x.max(axis=(2, 3), keepdims=True)
    dx = (dx1 * gc[:, :, None, None] + out["dv_avg"][:, :, None, None] / (H * W)
          + out["dv_max"][:, :, None, None] * (ties_hw / ties_hw.sum(axis=(2, 3), keepdims=True)).astype(x.dtype))
    out.update(dW1=dW1, dW2=dW2, dx=dx)
    return out
'''


def test_cbam_exercise_solution_passes_in_training_and_eval_fixtures(tmp_path):
    assert run_cli("exercise", "CBAM", str(tmp_path))[0] == 0
    _solve(tmp_path / "cbam_exercise.py", CBAM_SOLUTION)
    rc, text = run_cli("exercise", "check", str(tmp_path))
    assert rc == 0, text
    assert "line by line: all 17 gradients right" in text
    assert "_train_f64" in text and "_eval_f32" in text and "FAIL" not in text
    assert text.count("  golden cbam/") == 12


SOLUTIONS = {
    "SimAM": '''    x, s, q, d, xc = (cache[k] for k in ("x", "s", "q", "d", "xc"))
    H, W = x.shape[2:]
    ds = dy * x
    de = ds * s * (1 - s)
    dq = -(de * d).sum(axis=(2, 3), keepdims=True) / q**2
    dv = 4 * dq
    dd = de / q + dv / (H * W - 1)
    dxc = 2 * xc * dd
    dmu = -dxc.sum(axis=(2, 3), keepdims=True)
    dx = dy * s + dxc + dmu / (H * W)
    return dict(ds=ds, de=de, dq=dq, dv=dv, dd=dd, dxc=dxc, dmu=dmu, dx=dx)
''',
    "GCT": '''    x, t, emb, norm, r, l, gate, alpha, gamma = (cache[k] for k in
                                                 ("x", "t", "emb", "norm", "r", "l", "gate", "alpha", "gamma"))
    C = x.shape[1]
    dgate = (dy * x).sum(axis=(2, 3), keepdims=True)
    dt = dgate
    du = dt * (1 - t * t)
    dbeta = du.sum(axis=0, keepdims=True)
    dnorm = du * emb
    dgamma = (dnorm / r).sum(axis=0, keepdims=True)
    dr = -(dnorm * gamma).sum(axis=1, keepdims=True) / r**2
    demb = du * norm + dr * emb / (C * r)
    dalpha = (demb * l).sum(axis=0, keepdims=True)
    dl = demb * alpha
    dx = dy * gate + dl / l * x
    return dict(dgate=dgate, dt=dt, du=du, dbeta=dbeta, dnorm=dnorm, dgamma=dgamma, dr=dr, demb=demb,
                dalpha=dalpha, dl=dl, dx=dx)
''',
    "ECA": '''    x, g, s, w = (cache[k] for k in ("x", "g", "s", "w"))
    N, C, H, W = x.shape
    k = w.shape[2]
    pad = (k - 1) // 2
    dg = (dy * x).sum(axis=(2, 3))[:, None, :]
    dz = dg * g * (1 - g)
    s_pad = np.pad(s, ((0, 0), (0, 0), (pad, pad)))
    dw = np.array([[[np.sum(dz[:, 0] * s_pad[:, 0, j:j + C]) for j in range(k)]]], dtype=x.dtype)
    ds_pad = np.zeros_like(s_pad)
    for j in range(k):
        ds_pad[:, 0, j:j + C] += w[0, 0, j] * dz[:, 0]
    ds = ds_pad[:, :, pad:pad + C]
    dx = dy * g[:, 0, :, None, None] + ds[:, 0, :, None, None] / (H * W)
    return dict(dg=dg, dz=dz, dw=dw, ds=ds, dx=dx)
''',
    # written from the derivation alone, in plain NumPy (np.add.at for col2im), no npattn sampling code
    "DeformConv2d": '''    x, offset, mask, Wd, py, px, xs, cols = (cache[k] for k in
                                             ("x", "offset", "mask", "Wd", "py", "px", "xs", "cols"))
    N, C, H, W = x.shape
    Co, Cw = Wd.shape[:2]
    _, G, Cg, K, L = xs.shape
    Gw = C // Cw
    dy_g = dy.reshape(N, Gw, Co // Gw, L)
    db = dy.sum(axis=(0, 2, 3))
    dWd = np.einsum("ngol,ngkl->gok", dy_g, cols.reshape(N, Gw, Cw * K, L)).reshape(Wd.shape)
    dcols = np.einsum("gok,ngol->ngkl", Wd.reshape(Gw, Co // Gw, Cw * K), dy_g).reshape(xs.shape)
    dmask = (dcols * xs).sum(axis=2).reshape(mask.shape)
    dxs = mask.reshape(N, G, 1, K, L) * dcols
    y0, x0 = np.floor(py), np.floor(px)
    ly, lx = py - y0, px - x0
    hy, hx = 1 - ly, 1 - lx
    grad_support = (py >= -1) & (py < H) & (px >= -1) & (px < W)  # torchvision's, for the offset gradient
    sample_support = grad_support & (py > -1) & (px > -1)  # where xs is not 0
    xg = x.reshape(N, G, Cg, H, W)
    n_, g_, c_ = (np.arange(N)[:, None, None, None, None], np.arange(G)[None, :, None, None, None],
                  np.arange(Cg)[None, None, :, None, None])
    dx = np.zeros((N, G, Cg, H, W), dtype=x.dtype)
    v = {}
    for a, b, w in ((0, 0, hy * hx), (0, 1, hy * lx), (1, 0, ly * hx), (1, 1, ly * lx)):
        ya, xb = (y0 + a).astype(int), (x0 + b).astype(int)
        ok = grad_support & (ya >= 0) & (ya < H) & (xb >= 0) & (xb < W)  # (N, G, K, L)
        at = (n_, g_, c_, np.clip(ya, 0, H - 1)[:, :, None], np.clip(xb, 0, W - 1)[:, :, None])
        v[a, b] = np.where(ok[:, :, None], xg[at], 0)  # the corner's value, 0 outside the image
        np.add.at(dx, at, np.where((ok & sample_support)[:, :, None], w[:, :, None] * dxs, 0))  # col2im
    jy = hx[:, :, None] * (v[1, 0] - v[0, 0]) + lx[:, :, None] * (v[1, 1] - v[0, 1])
    jx = hy[:, :, None] * (v[0, 1] - v[0, 0]) + ly[:, :, None] * (v[1, 1] - v[1, 0])
    dpy = (dxs * jy).sum(axis=2)
    dpx = (dxs * jx).sum(axis=2)
    doffset = np.stack([dpy, dpx], axis=3).reshape(offset.shape)
    return dict(db=db, dWd=dWd, dcols=dcols, dmask=dmask, dxs=dxs, dpy=dpy, dpx=dpx, doffset=doffset,
                dx=dx.reshape(x.shape))
''',
}


def test_deform_exercise_names_a_wrong_offset_line(tmp_path):
    assert run_cli("exercise", "DeformConv2d", str(tmp_path))[0] == 0
    wrong = SOLUTIONS["DeformConv2d"].replace("dpx = (dxs * jx).sum(axis=2)", "dpx = (dxs * jy).sum(axis=2)")
    assert wrong != SOLUTIONS["DeformConv2d"]
    _solve(tmp_path / "deformconv2d_exercise.py", wrong)
    rc, text = run_cli("exercise", "check", str(tmp_path))
    assert rc == 1 and "FAIL first wrong gradient: dpx = sum_c dxs * jx" in text
    assert "gradcheck doffset" in text and "WRONG" in text and "grad.input.offset" in text


def test_a_section_that_is_not_there_is_refused():
    from npattn.blocks import deform

    assert [ln.sym for ln in explain.parse_derivation(deform.__doc__, section="ConvOffset2D").forward][-1] == "y"
    with pytest.raises(explain.DerivationError, match="no line 'NoSuchSection'"):
        explain.parse_derivation(deform.__doc__, section="NoSuchSection")


@pytest.mark.parametrize("name", sorted(SOLUTIONS))
def test_exercise_solutions_pass_their_fixtures(name, tmp_path):
    assert run_cli("exercise", name, str(tmp_path))[0] == 0
    _solve(tmp_path / f"{name.lower()}_exercise.py", SOLUTIONS[name])
    rc, text = run_cli("exercise", "check", str(tmp_path))
    assert rc == 0, text
    assert "gradients right" in text and text.count(" ok (worst rel err") >= 2 and "FAIL" not in text
