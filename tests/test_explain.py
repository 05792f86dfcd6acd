"""``npattn explain``: the derivation in each converted block's docstring and the code stay in step.

Every block in ``npattn.explain.EXAMPLES`` is walked: every forward tag equals the code's
value, every backward symbol is shown with its shape and passes its local check (the line
alone against central differences of the forward lines it undoes). A deliberately wrong
backward line must fail its check.
"""

from __future__ import annotations

import contextlib
import dataclasses
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


def test_a_helper_call_named_by_its_suffix_shows_its_own_values():
    """SKConv's _path(i) and iAFF's second gate (suffix "_2") run the same helper twice:
    each call's locals are their own symbols, taken from the code, forward and backward."""
    sk = {s.line.sym: s for s in walked("SKConv").steps}
    for sym in ("q_0", "q_1", "f_0", "f_1", "dq_0", "dq_1", "dr_1"):
        assert sk[sym].source == "code", sym
    assert not np.allclose(sk["q_0"].value, sk["q_1"].value)
    iaff = {s.line.sym: s for s in walked("iAFF").steps}
    for sym in ("l0", "l0_2", "t5", "t5_2", "z_2", "dt5", "dt5_2", "dl0", "dl0_2"):
        assert iaff[sym].source == "code", sym
    assert not np.allclose(iaff["dl0"].value, iaff["dl0_2"].value)


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


def test_parse_section_finds_a_second_derivation_after_its_heading():
    doc = """x.

Forward::

    y = x + 1             (N,)       first block        [x + 1]

Backward::

    dx = dy               (N,)

The second block
----------------

Forward, for x (N,)::

    y = 2 * x             (N,)       second block       [2 * x]

Backward, for dy::

    dx = 2 dy             (N,)
"""
    first = explain.parse_derivation(doc)
    second = explain.parse_derivation(doc, section="The second block")
    assert first.forward[0].tag == "x + 1" and first.backward[0].math == "dy"
    assert second.forward[0].tag == "2 * x" and second.backward[0].math == "2 dy"
    assert second.forward[0].lineno == 16  # line numbers of the whole docstring
    with pytest.raises(explain.DerivationError, match="no line containing"):
        explain.parse_derivation(doc, section="no such heading")


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
    "ViTAttention": '''    x, Wp, Wqkv, c, Nh, Q, K, V, P, Om = (cache[k] for k in ("x", "Wp", "Wqkv", "c", "Nh", "Q", "K", "V", "P", "Om"))
    N, T, E = Om.shape
    Nh = int(Nh)
    dOm = dy @ Wp
    dWp = np.einsum("ntc,nte->ce", dy, Om)
    dbp = dy.sum(axis=(0, 1))
    dO = dOm.reshape(N, T, Nh, E // Nh).transpose(0, 2, 1, 3)
    dV = np.swapaxes(P, -1, -2) @ dO
    dP = dO @ np.swapaxes(V, -1, -2)
    dS = P * (dP - (dP * P).sum(axis=-1, keepdims=True))
    dQ = c * (dS @ K)
    dK = c * (np.swapaxes(dS, -1, -2) @ Q)
    dQKV = np.concatenate([a.transpose(0, 2, 1, 3).reshape(N, T, E) for a in (dQ, dK, dV)], axis=-1)
    dWqkv = np.einsum("ntf,ntc->fc", dQKV, x)
    dx = dQKV @ Wqkv
    return dict(dOm=dOm, dWp=dWp, dbp=dbp, dO=dO, dV=dV, dP=dP, dS=dS, dQ=dQ, dK=dK, dQKV=dQKV, dWqkv=dWqkv, dx=dx)
''',
    "MultiheadAttention": '''    Xq, Xk, Xv, Wq, Wk, Wv, Wo = (cache[k] for k in ("Xq", "Xk", "Xv", "Wq", "Wk", "Wv", "Wo"))
    c, Nh, Q, K, V, P, Om = (cache[k] for k in ("c", "Nh", "Q", "K", "V", "P", "Om"))
    N, L, E = Om.shape
    Nh = int(Nh)

    def merge(a):
        return a.transpose(0, 2, 1, 3).reshape(a.shape[0], a.shape[2], E)

    dY = dy.transpose(1, 0, 2)
    dOm = dY @ Wo
    dWo = np.einsum("nlo,nle->oe", dY, Om)
    dbo = dY.sum(axis=(0, 1))
    dO = dOm.reshape(N, L, Nh, E // Nh).transpose(0, 2, 1, 3)
    dV = np.swapaxes(P, -1, -2) @ dO
    dP = dO @ np.swapaxes(V, -1, -2)
    dS = P * (dP - (dP * P).sum(axis=-1, keepdims=True))
    dQ = c * (dS @ K)
    dK = c * (np.swapaxes(dS, -1, -2) @ Q)
    dQp, dKp, dVp = merge(dQ), merge(dK), merge(dV)
    out = dict(dY=dY, dOm=dOm, dWo=dWo, dbo=dbo, dO=dO, dV=dV, dP=dP, dS=dS, dQ=dQ, dK=dK, dQp=dQp, dKp=dKp, dVp=dVp)
    for t, X, Wt, dT in (("q", Xq, Wq, dQp), ("k", Xk, Wk, dKp), ("v", Xv, Wv, dVp)):
        out["dW" + t] = np.einsum("nle,nlf->ef", dT, X)
        out["db" + t] = dT.sum(axis=(0, 1)) if t != "k" else np.zeros(E)
        out["dX" + t] = dT @ Wt
    out.update(dquery=out["dXq"].transpose(1, 0, 2), dkey=out["dXk"].transpose(1, 0, 2),
               dvalue=out["dXv"].transpose(1, 0, 2))
    return out
''',
    "ViTAttention_qk_norm": '''    x, Wp, Wqkv, c, Nh, Q, K, V, P, Om = (cache[k] for k in ("x", "Wp", "Wqkv", "c", "Nh", "Q", "K", "V", "P", "Om"))
    Qn, Kn, gamma_q, gamma_k, eps = (cache[k] for k in ("Qn", "Kn", "gamma_q", "gamma_k", "eps"))
    N, T, E = Om.shape
    Nh = int(Nh)

    def ln_backward(g, Z, gamma):  # LN over the last axis: (Z_hat, dZ)
        r = 1 / np.sqrt(Z.var(axis=-1, keepdims=True) + eps)
        Z_hat = (Z - Z.mean(axis=-1, keepdims=True)) * r
        gg = g * gamma
        dZ = r * (gg - gg.mean(axis=-1, keepdims=True) - Z_hat * (gg * Z_hat).mean(axis=-1, keepdims=True))
        return Z_hat, dZ

    dOm = dy @ Wp
    dWp = np.einsum("ntc,nte->ce", dy, Om)
    dbp = dy.sum(axis=(0, 1))
    dO = dOm.reshape(N, T, Nh, E // Nh).transpose(0, 2, 1, 3)
    dV = np.swapaxes(P, -1, -2) @ dO
    dP = dO @ np.swapaxes(V, -1, -2)
    dS = P * (dP - (dP * P).sum(axis=-1, keepdims=True))
    dQn = c * (dS @ Kn)
    dKn = c * (np.swapaxes(dS, -1, -2) @ Qn)
    Q_hat, dQ = ln_backward(dQn, Q, gamma_q)
    K_hat, dK = ln_backward(dKn, K, gamma_k)
    dgamma_q = (dQn * Q_hat).sum(axis=(0, 1, 2))
    dbeta_q = dQn.sum(axis=(0, 1, 2))
    dgamma_k = (dKn * K_hat).sum(axis=(0, 1, 2))
    dbeta_k = np.zeros_like(dgamma_k)
    dQKV = np.concatenate([a.transpose(0, 2, 1, 3).reshape(N, T, E) for a in (dQ, dK, dV)], axis=-1)
    dWqkv = np.einsum("ntf,ntc->fc", dQKV, x)
    dx = dQKV @ Wqkv
    return dict(dOm=dOm, dWp=dWp, dbp=dbp, dO=dO, dV=dV, dP=dP, dS=dS, dQn=dQn, dKn=dKn, dgamma_q=dgamma_q,
                dbeta_q=dbeta_q, dQ=dQ, dgamma_k=dgamma_k, dbeta_k=dbeta_k, dK=dK, dQKV=dQKV, dWqkv=dWqkv, dx=dx)
''',
}


# CoordAttn, GlobalContext, NonLocalAttn: BatchNorm in both modes (CoordAttn, NonLocalAttn), LayerNorm, softmaxes
SOLUTIONS.update({
    "CoordAttn": '''    x, u, h, hn, a_h, a_w, g_h, g_w = (cache[k] for k in ("x", "u", "h", "hn", "a_h", "a_w", "g_h", "g_w"))
    W1, W_h, W_w, gamma, eps = (cache[k] for k in ("W1", "W_h", "W_w", "gamma", "eps"))
    N, C, H, W = x.shape
    axes = (0, 2, 3)
    dg_h = (dy * x * g_w).sum(axis=3, keepdims=True)
    dg_w = (dy * x * g_h).sum(axis=2, keepdims=True)
    dz_h = dg_h * g_h * (1 - g_h)
    dz_w = dg_w * g_w * (1 - g_w)
    dW_h = np.einsum("nchw,ndhw->cd", dz_h, a_h)
    db_h = dz_h.sum(axis=axes)
    da_h = np.einsum("cd,nchw->ndhw", W_h, dz_h)
    dW_w = np.einsum("nchw,ndhw->cd", dz_w, a_w)
    db_w = dz_w.sum(axis=axes)
    da_w = np.einsum("cd,nchw->ndhw", W_w, dz_w)
    da = np.concatenate([da_h, da_w.transpose(0, 1, 3, 2)], axis=2)
    dhn = da * np.where(hn <= -3, 0.0, np.where(hn < 3, hn / 3 + 0.5, 1.0))
    if cache["training"]:
        mu, var = h.mean(axis=axes, keepdims=True), h.var(axis=axes, keepdims=True)
    else:
        mu, var = cache["rm"].reshape(1, -1, 1, 1), cache["rv"].reshape(1, -1, 1, 1)
    inv = 1 / np.sqrt(var + eps)
    hn_hat = (h - mu) * inv
    dgamma = (dhn * hn_hat).sum(axis=axes)
    dbeta = dhn.sum(axis=axes)
    dh_hat = dhn * gamma.reshape(1, -1, 1, 1)
    if cache["training"]:
        dh = inv * (dh_hat - dh_hat.mean(axis=axes, keepdims=True)
                    - hn_hat * (dh_hat * hn_hat).mean(axis=axes, keepdims=True))
    else:
        dh = dh_hat * inv
    dW1 = np.einsum("ndpq,ncpq->dc", dh, u)
    db1 = dh.sum(axis=axes)
    du = np.einsum("dc,ndpq->ncpq", W1, dh)
    ds_h = du[:, :, :H]
    ds_w = du[:, :, H:].transpose(0, 1, 3, 2)
    dx = dy * g_w * g_h + ds_h / W + ds_w / H
    return dict(dg_h=dg_h, dg_w=dg_w, dz_h=dz_h, dz_w=dz_w, dW_h=dW_h, db_h=db_h, da_h=da_h, dW_w=dW_w, db_w=db_w,
                da_w=da_w, da=da, dhn=dhn, dgamma=dgamma, dbeta=dbeta, dh=dh, dW1=dW1, db1=db1, du=du,
                ds_h=ds_h, ds_w=ds_w, dx=dx)
''',
    "GlobalContext": '''    x, e, p, s, h, hn, a, g = (cache[k] for k in ("x", "e", "p", "s", "h", "hn", "a", "g"))
    Wa, W1, W2, gamma, eps = (cache[k] for k in ("Wa", "W1", "W2", "gamma", "eps"))
    N, C, H, W = x.shape
    xl = x.reshape(N, C, H * W)
    dg = (dy * x).sum(axis=(2, 3))
    dz = dg * g * (1 - g)
    dW2 = dz.T @ a
    db2 = dz.sum(axis=0)
    da = dz @ W2
    dhn = da * (hn > 0)
    r = 1 / np.sqrt(h.var(axis=1, keepdims=True) + eps)
    h_hat = (h - h.mean(axis=1, keepdims=True)) * r
    dgamma = (dhn * h_hat).sum(axis=0)
    dbeta = dhn.sum(axis=0)
    g_hat = dhn * gamma
    dh = r * (g_hat - g_hat.mean(axis=1, keepdims=True) - h_hat * (g_hat * h_hat).mean(axis=1, keepdims=True))
    dW1 = dh.T @ s
    db1 = dh.sum(axis=0)
    ds = dh @ W1
    dp = np.einsum("nc,ncl->nl", ds, xl)
    de = p * (dp - (p * dp).sum(axis=1, keepdims=True))
    dWa = np.einsum("nl,ncl->c", de, xl)[None, :]
    dba = de.sum(axis=(0, 1))[None]  # 0 up to rounding: a softmax ignores a common shift
    dxl = (dy * g[:, :, None, None]).reshape(N, C, H * W) + ds[:, :, None] * p[:, None, :] + Wa[0][None, :, None] * de[:, None, :]
    dx = dxl.reshape(x.shape)
    return dict(dg=dg, dz=dz, dW2=dW2, db2=db2, da=da, dhn=dhn, dgamma=dgamma, dbeta=dbeta, dh=dh, dW1=dW1,
                db1=db1, ds=ds, dp=dp, de=de, dWa=dWa, dba=dba, dx=dx)
''',
    "NonLocalAttn": '''    x, Q, K, V, P, U, o = (cache[k] for k in ("x", "Q", "K", "V", "P", "U", "o"))
    Wt, Wp, Wg, Wz, gamma, eps, c = (cache[k] for k in ("Wt", "Wp", "Wg", "Wz", "gamma", "eps", "c"))
    N, C, H, W = x.shape
    D = Wz.shape[1]
    axes = (0, 2, 3)
    dr = dy
    if cache["training"]:
        mu, var = o.mean(axis=axes, keepdims=True), o.var(axis=axes, keepdims=True)
    else:
        mu, var = cache["rm"].reshape(1, C, 1, 1), cache["rv"].reshape(1, C, 1, 1)
    inv = 1 / np.sqrt(var + eps)
    o_hat = (o - mu) * inv
    dgamma = (dr * o_hat).sum(axis=axes)
    dbeta = dr.sum(axis=axes)
    do_hat = dr * gamma.reshape(1, C, 1, 1)
    if cache["training"]:
        do = inv * (do_hat - do_hat.mean(axis=axes, keepdims=True)
                    - o_hat * (do_hat * o_hat).mean(axis=axes, keepdims=True))
    else:
        do = do_hat * inv
    dWz = np.einsum("nchw,ndhw->cd", do, U)
    dbz = do.sum(axis=axes)
    dU = np.einsum("cd,nchw->ndhw", Wz, do)
    dY = dU.reshape(N, D, H * W).transpose(0, 2, 1)
    dV = P.transpose(0, 2, 1) @ dY
    dP = dY @ V.transpose(0, 2, 1)
    dS = P * (dP - (dP * P).sum(axis=2, keepdims=True))
    dQ = c * dS @ K
    dK = c * dS.transpose(0, 2, 1) @ Q
    xl = x.reshape(N, C, H * W)
    dWt = np.einsum("nld,ncl->dc", dQ, xl)
    dbt = dQ.sum(axis=(0, 1))
    dWp = np.einsum("nld,ncl->dc", dK, xl)
    dbp = dK.sum(axis=(0, 1))
    dWg = np.einsum("nld,ncl->dc", dV, xl)
    dbg = dV.sum(axis=(0, 1))
    dx = dy + (np.einsum("dc,nld->ncl", Wt, dQ) + np.einsum("dc,nld->ncl", Wp, dK)
               + np.einsum("dc,nld->ncl", Wg, dV)).reshape(x.shape)
    return dict(dr=dr, dgamma=dgamma, dbeta=dbeta, do=do, dWz=dWz, dbz=dbz, dU=dU, dY=dY, dV=dV, dP=dP, dS=dS,
                dQ=dQ, dK=dK, dWt=dWt, dbt=dbt, dWp=dWp, dbp=dbp, dWg=dWg, dbg=dbg, dx=dx)
''',
})


_AFF_GATE = '''    c = cache
    train = c["training"]
    N, C, H, W = dy.shape

    def bn_back(dout, q, gamma, rm, rv):  # BatchNorm2d over (N, H, W) per channel
        axes = (0, 2, 3)
        if train:
            mu, var = q.mean(axis=axes, keepdims=True), q.var(axis=axes, keepdims=True)
        else:
            mu, var = rm.reshape(1, -1, 1, 1), rv.reshape(1, -1, 1, 1)
        inv = 1 / np.sqrt(var + c["eps"])
        qhat = (q - mu) * inv
        dqhat = dout * gamma.reshape(1, -1, 1, 1)
        if train:
            dq = inv * (dqhat - dqhat.mean(axis=axes, keepdims=True)
                        - qhat * (dqhat * qhat).mean(axis=axes, keepdims=True))
        else:
            dq = dqhat * inv
        return dq, (dout * qhat).sum(axis=axes), dout.sum(axis=axes)

    def conv_back(dout, inp, weight):  # 1x1 conv: out = weight inp + bias at every pixel
        dinp = np.einsum("nohw,oi->nihw", dout, weight[:, :, 0, 0])
        dweight = np.einsum("nohw,nihw->oi", dout, inp)[:, :, None, None]
        dbias = np.zeros(dout.shape[1], dout.dtype) if train else dout.sum(axis=(0, 2, 3))  # 0: a BN follows
        return dinp, dweight, dbias

    def gate_back(dz, xin, s, sg):  # s: the gate's suffix, sg: its global branch's parameters
        d = {}
        d["dt5" + s] = dt5 = dz.sum(axis=(2, 3), keepdims=True)
        dt4, d["dgamma_t5" + s], d["dbeta_t5" + s] = bn_back(dt5, c["t4" + s], c["gamma_t5" + sg], c["rm_t5" + sg],
                                                             c["rv_t5" + sg])
        dt3, d["dWt4" + s], d["dbt4" + s] = conv_back(dt4, c["t3" + s], c["Wt4" + sg])
        dt2 = dt3 * (c["t2" + s] > 0)
        dt1, d["dgamma_t2" + s], d["dbeta_t2" + s] = bn_back(dt2, c["t1" + s], c["gamma_t2" + sg], c["rm_t2" + sg],
                                                             c["rv_t2" + sg])
        dt0, d["dWt1" + s], d["dbt1" + s] = conv_back(dt1, c["t0" + s], c["Wt1" + sg])
        d.update({"dt4" + s: dt4, "dt3" + s: dt3, "dt2" + s: dt2, "dt1" + s: dt1, "dt0" + s: dt0, "dl4" + s: dz})
        dl3, d["dgamma_l4" + s], d["dbeta_l4" + s] = bn_back(dz, c["l3" + s], c["gamma_l4" + s], c["rm_l4" + s],
                                                             c["rv_l4" + s])
        dl2, d["dWl3" + s], d["dbl3" + s] = conv_back(dl3, c["l2" + s], c["Wl3" + s])
        dl1 = dl2 * (c["l1" + s] > 0)
        dl0, d["dgamma_l1" + s], d["dbeta_l1" + s] = bn_back(dl1, c["l0" + s], c["gamma_l1" + s], c["rm_l1" + s],
                                                             c["rv_l1" + s])
        dxin, d["dWl0" + s], d["dbl0" + s] = conv_back(dl0, xin, c["Wl0" + s])
        d.update({"dl3" + s: dl3, "dl2" + s: dl2, "dl1" + s: dl1, "dl0" + s: dl0})
        return dxin + dt0 / (H * W), d
'''

SOLUTIONS["MS_CAM"] = _AFF_GATE + '''    g = c["g"]
    dg = dy * c["x"]
    dz = dg * g * (1 - g)
    dxin, out = gate_back(dz, c["x"], "", "")
    out.update(dg=dg, dz=dz, dx=dy * g + dxin)
    return out
'''
SOLUTIONS["AFF"] = _AFF_GATE + '''    g, e = c["g"], c["e"]
    dg = 2 * dy * e
    dz = dg * g * (1 - g)
    dxa, out = gate_back(dz, c["xa"], "", "")
    de = 2 * dy * g
    out.update(dg=dg, dz=dz, dxa=dxa, de=de, dresidual=2 * dy - de + dxa, dx=de + dxa)
    return out
'''
SOLUTIONS["iAFF"] = _AFF_GATE + '''    g, g_2, e = c["g"], c["g_2"], c["e"]
    dg_2 = dy * e
    dz_2 = dg_2 * g_2 * (1 - g_2)
    dxi, out2 = gate_back(dz_2, c["xi"], "_2", "")  # share_global_att=True: global_att again
    dg = dxi * e
    dz = dg * g * (1 - g)
    dxa, out = gate_back(dz, c["xa"], "", "")
    for k in ("dgamma_t5", "dbeta_t5", "dWt4", "dbt4", "dgamma_t2", "dbeta_t2", "dWt1", "dbt1"):
        out[k] = out[k] + out2.pop(k + "_2")  # global_att's two shares
        out[k + "_2"] = np.zeros_like(out[k])  # global_att2 is never read
    out.update(out2)
    de = dy * g_2 + dxi * g
    out.update(dg_2=dg_2, dz_2=dz_2, dxi=dxi, dg=dg, dz=dz, dxa=dxa, de=de, dresidual=dy + dxi - de + dxa,
               dx=de + dxa)
    return out
'''
SOLUTIONS["DAF"] = '''    return dict(dresidual=dy.copy(), dx=dy.copy())
'''

SOLUTIONS["SKConv"] = '''    from npattn import functional as F

    c = cache
    train = c["training"]
    x, g, a, hb, s = c["x"], c["g"], c["a"], c["hb"], c["s"]
    N, C, H, W = dy.shape

    def bn_back(dout, q, gamma, rm, rv, axes):  # BatchNorm over the axes, per channel (axis 1)
        shape = [1] * q.ndim
        shape[1] = -1
        if train:
            mu, var = q.mean(axis=axes, keepdims=True), q.var(axis=axes, keepdims=True)
        else:
            mu, var = rm.reshape(shape), rv.reshape(shape)
        inv = 1 / np.sqrt(var + c["eps"])
        qhat = (q - mu) * inv
        dqhat = dout * gamma.reshape(shape)
        if train:
            dq = inv * (dqhat - dqhat.mean(axis=axes, keepdims=True)
                        - qhat * (dqhat * qhat).mean(axis=axes, keepdims=True))
        else:
            dq = dqhat * inv
        return dq, (dout * qhat).sum(axis=axes), dout.sum(axis=axes)

    out = {}
    dg = np.stack([(dy * c[f"f_{i}"]).sum(axis=(2, 3)) for i in range(2)], axis=1)
    dz = g * (dg - (dg * g).sum(axis=1, keepdims=True))
    da = 0
    for i in range(2):
        out[f"dz_{i}"] = dz[:, i]
        out[f"dW2_{i}"] = dz[:, i].T @ a
        out[f"db2_{i}"] = dz[:, i].sum(axis=0)
        da = da + dz[:, i] @ c[f"W2_{i}"]
    dhb = da * (hb > 0)
    dh, dgamma, dbeta = bn_back(dhb, c["h"], c["gamma"], c["rm"], c["rv"], (0,))
    dW1 = dh.T @ s
    db1 = np.zeros_like(dbeta) if train else dh.sum(axis=0)  # b1 feeds the BatchNorm: 0 in training
    ds = dh @ c["W1"]
    out.update(dg=dg, dz=dz, da=da, dhb=dhb, dgamma=dgamma, dbeta=dbeta, dh=dh, dW1=dW1, db1=db1, ds=ds)
    dx = 0
    for i in range(2):
        df = dy * g[:, i, :, None, None] + ds[:, :, None, None] / (H * W)
        dr = df * (c[f"r_{i}"] > 0)
        dq, out[f"dgamma_{i}"], out[f"dbeta_{i}"] = bn_back(dr, c[f"q_{i}"], c[f"gamma_{i}"], c[f"rm_{i}"],
                                                            c[f"rv_{i}"], (0, 2, 3))
        _, k_conv = F.conv2d_forward(x, c[f"Ws_{i}"], None, padding=1 + i, dilation=1 + i, groups=int(c["G"]))
        g_conv = F.conv2d_backward(dq, k_conv)
        out[f"dWs_{i}"] = g_conv["weight"]
        out[f"dbs_{i}"] = np.zeros_like(out[f"dbeta_{i}"]) if train else dq.sum(axis=(0, 2, 3))
        out.update({f"df_{i}": df, f"dr_{i}": dr, f"dq_{i}": dq})
        dx = dx + g_conv["x"]
    out["dx"] = dx
    return out
'''


# DeformConv2d
SOLUTIONS.update({
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
})


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
    with pytest.raises(explain.DerivationError, match="no line containing 'NoSuchSection'"):
        explain.parse_derivation(deform.__doc__, section="NoSuchSection")


@pytest.mark.parametrize("name", sorted(SOLUTIONS))
def test_exercise_solutions_pass_their_fixtures(name, tmp_path):
    assert run_cli("exercise", name, str(tmp_path))[0] == 0
    _solve(tmp_path / f"{name.lower()}_exercise.py", SOLUTIONS[name])
    rc, text = run_cli("exercise", "check", str(tmp_path))
    assert rc == 0, text
    assert "gradients right" in text and text.count(" ok (worst rel err") >= 2 and "FAIL" not in text


@pytest.mark.parametrize("name", ["MultiheadAttention", "NonLocalAttn"])
def test_attention_symbols_are_found_in_the_shared_helper(name):
    """S, P, dP, dS are locals of npattn.functional.attention's ``attention`` and
    ``attention_backward`` (one implementation for the attention blocks): the walk finds
    them through ``Example.helpers``; without it the code has no dP and dS."""
    ex = explain.find_example(name)
    assert ex.helpers == ("npattn.functional.attention",)
    w = explain.walk(ex, seed=0)
    steps = {s.line.sym: s for s in w.steps}
    assert [steps[k].source for k in ("S", "P", "dP", "dS")] == ["code"] * 4 and w.ok
    bare = explain.walk(dataclasses.replace(ex, helpers=()), seed=0)
    steps = {s.line.sym: s for s in bare.steps}
    assert steps["S"].source == "tag" and steps["dP"].source == "missing" and steps["dS"].source == "missing"
    assert not bare.ok


def test_non_local_sub_sample_lines_walk():
    """NonLocalAttn's key and value lines with sub_sample=True (the override block of its
    docstring): the pooled keys and values, walked and checked line by line."""
    from npattn.blocks.non_local import NonLocalAttn

    ex = explain.Example("NonLocalAttn", "npattn.blocks.non_local",
                         lambda rng: NonLocalAttn(8, rd_channels=3, sub_sample=True, rng=rng, dtype=np.float64),
                         {"x": (2, 8, 5, 4)}, training=True, override="``tests/test_explain.py`` walks them",
                         helpers=("npattn.functional.attention",))
    w = explain.walk(ex, seed=0)
    steps = {s.line.sym: s for s in w.steps}
    assert steps["K"].line.math.startswith("pool(") and steps["V"].line.math.startswith("pool(")
    assert np.shape(steps["K"].value) == (2, 2 * 2, 3) and np.shape(steps["Q"].value) == (2, 5 * 4, 3)  # Lk = 2 * 2
    assert all(step.ok for step in w.steps), [(s.line.sym, s.verdicts) for s in w.steps if not s.ok]
    assert w.ok, w.summary


def test_non_local_exercise_names_a_wrong_softmax_line(tmp_path):
    assert run_cli("exercise", "NonLocalAttn", str(tmp_path))[0] == 0
    body = SOLUTIONS["NonLocalAttn"]
    wrong = "    dS = P * (dP - (dP * P).sum(axis=2, keepdims=True))\n"
    assert body.count(wrong) == 1
    _solve(tmp_path / "nonlocalattn_exercise.py", body.replace(wrong, "    dS = P * dP\n"))  # the row sum forgotten
    rc, text = run_cli("exercise", "check", str(tmp_path))
    assert rc == 1 and "FAIL first wrong gradient: dS = P * (dP - rowsum(dP * P))" in text, text


def test_a_forward_tag_that_raises_fails_its_line_and_the_walk_goes_on(monkeypatch):
    """A Forward tag that cannot run fails its own line; a backward line that needs it
    fails with a message, not a traceback."""
    from npattn import explain

    ex = explain.find_example("SEBlock")
    deriv = explain.derivation_for(ex)
    bad = next(ln for ln in deriv.forward if ln.sym == "z")
    monkeypatch.setattr(bad, "tag", "no_such_op(a)")
    monkeypatch.setattr(explain, "derivation_for", lambda example: deriv)
    w = explain.walk(ex)
    failed = {s.line.sym: [m for ok, m in s.verdicts if not ok] for s in w.steps if any(not ok for ok, *_ in s.verdicts)}
    assert any("raised NameError" in m for m in failed["z"])
    assert any("cannot be evaluated" in m or "not a Forward symbol" in m for k, ms in failed.items() if k != "z" for m in ms)


def test_a_never_read_parameter_passes_with_exact_zeros_only():
    doc = """Forward::

    u = p                (N,)   kept, never read   [param("p")]
    y = x * 2            (N,)                      [x * 2]

Backward::

    dx = 2 dy            (N,)
"""
    d = explain.parse_derivation(doc)
    rng = np.random.default_rng(0)
    values, grads = {"x": rng.standard_normal(3), "u": rng.standard_normal(3)}, {"dy": rng.standard_normal(3)}
    [(ok, msg)] = explain.local_check(d, "u", np.zeros(3), values, grads, rng)
    assert ok and "exactly 0" in msg
    [(ok, msg)] = explain.local_check(d, "u", np.full(3, 1e-18), values, grads, rng)
    assert not ok and "not exactly 0" in msg


def test_daf_walks_its_own_blocks():
    d = explain.derivation_for(explain.find_example("DAF"))
    assert [ln.sym for ln in d.forward] == ["y"] and [ln.sym for ln in d.backward] == ["dresidual", "dx"]
    assert explain.derivation_for(explain.find_example("MS_CAM")).forward[0].sym == "Wl0"
