"""Graded exercises, CS231n style: ``npattn exercise BLOCK DIR`` and ``npattn exercise check DIR``.

``write`` puts ``DIR/<block>_exercise.py``: the block's forward, given, written line for
line from the Forward tags of its derivation (``npattn.explain``), and a ``backward``
stub to fill in, with the Backward lines of the derivation as comments. The backward
returns every gradient of the derivation in a dict (``{"dg": ..., "dz": ..., "dx": ...}``),
so the grader can say which line is wrong.

``check_dir`` grades every ``*_exercise.py`` in DIR:

1. a float64 gradcheck (``npattn.gradcheck``) of the student's forward and backward, for
   every input and parameter;
2. line by line, in the derivation's order, the local check of ``npattn explain`` on the
   student's own values: the first line that fails is the first wrong gradient (a line
   computed correctly from a wrong upstream value passes, so the first failure is where
   the mistake is);
3. the golden fixtures of the block whose configuration the derivation describes
   (``npattn.golden.check``), run through the student's forward and backward.
"""

from __future__ import annotations

import importlib.util
import pathlib
import re
import sys

import numpy as np

from . import explain as E

__all__ = ["ExerciseError", "write", "check_file", "check_dir", "exercise_path"]


class ExerciseError(ValueError):
    pass


def exercise_path(block_name: str, out_dir) -> pathlib.Path:
    return pathlib.Path(out_dir) / f"{block_name.lower()}_exercise.py"


def _comment_lines(lines, width=18):
    out = []
    for ln in lines:
        out.append(f"    # {ln.sym} = {ln.math}")
        out.append(f"    #     {ln.shape:<{width}} {ln.reason}".rstrip())
        out += [f"    #     {t}" for t in ln.text]
    return out


def _source(ex: E.Example, out_dir=".") -> str:
    deriv = E.derivation_for(ex)
    binds = E.bindings_of(deriv)
    args = list(ex.inputs) + list(binds)
    computed = [ln for ln in deriv.forward if ln.sym not in binds]
    body = []
    for ln in computed:
        body.append(f"    {ln.sym} = {ln.tag}  # {ln.shape} {ln.math}".rstrip())
    cache_names = list(ex.inputs) + list(binds) + [ln.sym for ln in computed if ln.sym != "y"]
    bind_doc = [f"    {ln.sym:<8} {ln.shape:<14} {ln.math}" for ln in binds.values()]
    dsyms = ", ".join(f'"{ln.sym}"' for ln in deriv.backward)
    text = f'''"""Exercise: the backward pass of {ex.name}, line by line.

Write ``backward`` below: one gradient a line, as the derivation in the comments says,
and return them all in a dict. Grade it with

    npattn exercise check {out_dir}

which runs a float64 gradient check, names the first wrong line, then compares your
results with the golden fixtures of {ex.name}. The forward is given; it follows the
Forward lines of the derivation in ``{ex.module}`` (``npattn explain {ex.name}`` walks it
on numbers with the reference code).

The forward takes the input(s) {", ".join(ex.inputs)} and the block's arrays and constants:

''' + "\n".join(bind_doc) + f'''
"""

import numpy as np

from npattn.explain import op_vocabulary

globals().update(op_vocabulary())  # mean, sum, linear, relu, sigmoid, tanh, conv1d, batch_norm, ...

BLOCK = "{ex.name}"
GRADIENTS = ({dsyms},)  # what backward returns, in the derivation's order


def forward({", ".join(args)}, training={ex.training}):
    """The forward pass (given). Returns ``(y, cache)``, cache a dict of every symbol."""
''' + "\n".join(body) + f'''
    cache = dict({", ".join(f"{n}={n}" for n in cache_names)}, training=training)
    return y, cache


def backward(dy, cache):
    """Return a dict with every gradient of GRADIENTS, e.g. {{"{deriv.backward[0].sym}": ..., ...}}.

    ``dy`` is dL/dy; ``cache`` holds the forward's symbols (``cache["x"]``, ...) and
    ``cache["training"]``.
    The derivation, in the order to compute it (``dy`` first):
    """
''' + "\n".join(_comment_lines(deriv.backward)) + '''
    raise NotImplementedError("write the backward, one gradient a line")
'''
    return text


def write(block_name: str, out_dir, *, force=False) -> pathlib.Path:
    """Write the exercise of ``block_name`` into ``out_dir``; an existing file is refused
    unless ``force``. Returns its path."""
    ex = E.find_example(block_name)
    path = exercise_path(ex.name, out_dir)
    if path.exists() and not force:
        raise FileExistsError(f"{path} exists; pass --force to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(_source(ex, out_dir))
    return path


# ---- grading ----------------------------------------------------------------------------


def _load(path):
    stem = re.sub(r"\W", "_", pathlib.Path(path).stem)
    name = f"_npattn_exercise_{stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _bound(deriv, block, state, dtype=None):
    """Values of the bound symbols for ``block`` with arrays ``state``."""
    vocab = E.op_vocabulary()
    out = {}
    for sym, ln in E.bindings_of(deriv).items():
        v = E._eval(ln.tag, dict(vocab, param=lambda k: state[k], buffer=lambda k: state[k],
                                 attr=lambda a: getattr(block, a)))
        out[sym] = v if dtype is None or not isinstance(v, np.ndarray) else v.astype(dtype)
    return out


def _params(deriv):
    """The symbols bound to parameters (differentiated), in the derivation's order."""
    return [sym for sym, ln in E.bindings_of(deriv).items() if re.search(r"\bparam\s*\(", ln.tag)]


def _param_grads(deriv, grads, state):
    """State_dict key -> gradient, from the gradients of the bound symbols. A symbol bound
    to a view of a key (a third of MultiheadAttention's ``in_proj_weight``) fills that part."""
    out = {}
    vocab = E.op_vocabulary()
    for sym, ln in E.bindings_of(deriv).items():
        m = re.search(r"param\(\s*[\"']([^\"']+)[\"']\s*\)", ln.tag)
        if m and f"d{sym}" in grads:
            key, g = m.group(1), np.asarray(grads[f"d{sym}"])
            if key not in out:
                out[key] = np.zeros(np.shape(state[key]), dtype=g.dtype)
            view = E._eval(ln.tag, dict(vocab, param=lambda k: out[k]))  # the tag's view of the key
            if not np.shares_memory(view, out[key]):
                raise ValueError(f"the tag of {sym} [{ln.tag}] is no view of {key}")
            view[...] = g.reshape(np.shape(view))
    return out


def check_file(path, *, stream=None, seed=0, golden_dir=None) -> bool:
    """Grade one exercise file; prints the report; True when everything passed."""
    from . import golden
    from .gradcheck import gradcheck

    out = stream or sys.stdout
    p = lambda s="": print(s, file=out)  # noqa: E731
    try:
        mod = _load(path)
        ex = E.find_example(getattr(mod, "BLOCK"))
    except Exception as exc:  # the student's file may not import
        p(f"{path}: FAIL, the file does not load: {type(exc).__name__}: {exc}")
        return False
    deriv = E.derivation_for(ex)
    p(f"{path}: {ex.name}")
    rng = np.random.default_rng(seed)
    block = ex.build(rng)
    E._random_state(block, rng)
    state = block.state_dict()
    inputs = {k: rng.standard_normal(shape) for k, shape in ex.inputs.items()}
    bound = _bound(deriv, block, state)
    arrays = dict(inputs, **{k: v for k, v in bound.items() if k in _params(deriv)})
    consts = {k: v for k, v in bound.items() if k not in _params(deriv)}  # constants and buffers

    def fwd(**a):
        return mod.forward(**a, **consts, training=ex.training)

    try:
        y, cache = fwd(**{k: v.copy() for k, v in arrays.items()})
        dy = rng.standard_normal(np.shape(y))
        grads = dict(mod.backward(dy.copy(), cache))
    except NotImplementedError:
        p("  FAIL backward is not written yet (it raises NotImplementedError)")
        return False
    except Exception as exc:
        p(f"  FAIL backward raised {type(exc).__name__}: {exc}")
        return False
    ok = True

    # 1. gradcheck of the inputs and parameters
    names = list(arrays)
    missing = [f"d{n}" for n in names if f"d{n}" not in grads]
    if missing:
        p(f"  FAIL backward returns no {', '.join(missing)}")
        return False
    rep = gradcheck(fwd, lambda d, c: {n: mod.backward(d, c)[f"d{n}"] for n in names}, arrays,
                    raise_on_failure=False, seed=seed)
    for t in rep.tensors:
        # a gradient that is zero everywhere has no relative error: its absolute error is what was judged
        err = f"rel err {t.rel_err:.1e}" if t.rel_err == t.rel_err else f"abs err {t.max_abs_err:.1e} (a zero gradient)"
        p(f"  gradcheck d{t.name:<10} {err}  {'ok' if t.passed else 'WRONG'}")
    for prob in rep.problems:
        p(f"  gradcheck problem: {prob}")
    ok &= rep.ok

    # 2. line by line: the first line whose local check fails
    vocab = E.op_vocabulary()
    values = dict(arrays, **consts, training=ex.training)
    for ln in deriv.forward:
        if ln.sym not in values:
            values[ln.sym] = E._eval(ln.tag, dict(vocab, **values))
    walked = {"dy": dy}
    first_wrong = None
    for ln in deriv.backward:
        sym = ln.sym[1:]
        if ln.sym not in grads:
            first_wrong = first_wrong or (ln, "not returned")
            break
        got = np.asarray(grads[ln.sym], dtype=np.float64)
        if got.shape != np.shape(values.get(sym)):
            first_wrong = (ln, f"shape {got.shape}, {sym} has {np.shape(values.get(sym))} {ln.shape}")
            break
        verdicts = E.local_check(deriv, sym, got, values, walked, rng)
        if not all(v for v, _ in verdicts):
            first_wrong = (ln, "; ".join(m for _, m in verdicts))
            break
        walked[ln.sym] = got
    if first_wrong is None:
        p(f"  line by line: all {len(deriv.backward)} gradients right")
    else:
        ln, why = first_wrong
        p(f"  FAIL first wrong gradient: {ln.sym} = {ln.math}   {ln.shape}")
        p(f"       {why}")
        ok = False

    # 3. the golden fixtures the derivation describes
    try:
        cases = golden.list_cases(golden_dir)
    except golden.GoldenError as exc:
        p(f"  golden fixtures not found: {exc}")
        return False
    selected = [c for c, m in cases.items() if m.get("block") == type(block).__name__ and ex.fixtures is not None
                and ex.fixtures(m.get("config", {}))]
    if not selected:
        p("  FAIL no golden case of this block matches the derivation's configuration")
        ok = False
    for cid in selected:
        case = golden.load(cid, golden_dir)
        meta = case.meta
        dtype = np.dtype(meta.get("dtype", "float64"))
        cblock = golden.build_block(meta, dtype)
        cstate = case.state_dict()
        cb = _bound(deriv, cblock, cstate)
        cinputs = case.inputs()
        carr = dict(cinputs, **{k: v for k, v in cb.items() if k in _params(deriv)})
        cconst = {k: v for k, v in cb.items() if k not in _params(deriv)}
        try:
            yc, cc = mod.forward(**carr, **cconst, training=meta.get("mode") == "train")
            gc = mod.backward(case.arrays["grad_output"], cc)
            res = {"output": yc}
            res.update({f"grad.input.{n}": gc[f"d{n}"] for n in cinputs})
            res.update({f"grad.param.{k}": v for k, v in _param_grads(deriv, gc, cstate).items()})
            report = golden.check(cid, res, golden_dir)
            passed = report.ok
            worst = max((t.max_rel_err for t in report.tensors), default=0.0)
            wrong = [f"{t.key} ({t.status}, rel err {t.max_rel_err:.1e})" for t in report.tensors if not t.passed]
            detail = f"worst rel err {worst:.1e}" if passed else "wrong: " + ", ".join(wrong)
        except Exception as exc:
            passed, detail = False, f"{type(exc).__name__}: {exc}"
        p(f"  golden {cid:<40} {'ok' if passed else 'FAIL'} ({detail})")
        ok &= passed
    p(f"  {'PASSED' if ok else 'FAILED'}")
    return bool(ok)


def check_dir(directory, *, stream=None) -> bool:
    """Grade every ``*_exercise.py`` in ``directory``."""
    files = sorted(pathlib.Path(directory).glob("*_exercise.py"))
    if not files:
        raise ExerciseError(f"no *_exercise.py in {directory} (npattn exercise BLOCK {directory} writes one)")
    results = [check_file(f, stream=stream) for f in files]
    return all(results)
