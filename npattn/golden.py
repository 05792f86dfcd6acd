"""Golden fixtures: the file format, and reading, recomputing, verifying and comparing them.

A fixture is ``<golden>/<block>/<case>.npz`` (plain arrays, never pickles) with keys::

    input.<name>            the forward's inputs (for a block: x, residual, offset, mask)
    param.<key>             trainable parameters under their PyTorch state_dict keys
    buffer.<key>            buffers before the forward (running_mean, running_var,
                            num_batches_tracked)
    grad_output             the upstream gradient
    grad_output.<name>      the upstream gradient of a second result (attention: grad_output.lse)
    output                  the forward's result
    output.<name>           a second result of the forward (attention: output.lse, the
                            log-sum-exp of the logits, -inf for a query with no key)
    grad.input.<name>       gradient of every input
    grad.param.<key>        gradient of every parameter
    buffer_after.<key>      buffers after a training-mode forward (mode "train" only)

``<golden>/manifest.json`` is ``{"format": 1, "cases": {"<case id>": {...}}}`` with, per
case: file, block, kind ("block" or "function"), config (constructor or keyword
arguments; for the deformable convolutions ``border_grad``, the offset-gradient convention
at p = -1), inputs (names in call order), mode, dtype, seed, shapes, sha256,
tolerances, npattn version, the cross-check record; where a case sits on a point
where the forward is not differentiable, ``fd_skip`` (tensor name -> reason) for the
finite-difference spot check; and ``no_grad_inputs`` where some inputs are constants
without a gradient (attention masks: boolean arrays, or floating ones added to the
scores).

Float32 twins hold the float32-rounded inputs and parameters of their float64 case; their
expected outputs and gradients are computed in float64 from exactly those values and
rounded once to float32, so they are the best float32 answer, not one float32 run.

Tolerance policy. An element of ``actual`` matches ``expected`` when::

    |actual - expected| <= atol * scale + rtol * |expected|
    scale = max(max|expected|, floor * case_scale)

per tensor, where ``case_scale`` is the largest finite magnitude over all the case's
expected tensors. An infinity (the lse of a query with no key, -inf) must be matched
exactly. The absolute part scales with magnitudes, never with array sizes::

    float64 implementations: rtol 1e-7, atol 1e-7, floor 1e-4   (PyTorch assert_close's
                                                                  float64 rtol)
    float32 implementations: rtol 1e-4, atol 1e-5, floor 1.0

Where the math proves a gradient zero (a conv or linear bias in front of a training-mode
BatchNorm, a parameter the forward does not use) the fixtures hold exact zeros, but an
implementation that computes the cancelling sum gets its rounding noise there, of the
order of the unit roundoff times the case's largest gradient; the floor admits that noise
and nothing much larger. Measured with ``tools/tolerance_floor.py`` on the stored cases:
PyTorch in float64 needs a floor of at most 1.2e-7 (1e-4 leaves a factor of 800), PyTorch
in float32 up to 0.48 (BatchNorm over a handful of pooled values in float32, on top of
the cancelling sums), so the float32 floor stays at the whole case scale. ``npattn
verify`` checks that npattn itself, run in float32, meets the float32 tolerances.

Python use, e.g. inside another project's tests::

    from npattn import golden
    case = golden.load("aff/train_f64")
    report = golden.check("aff/train_f64", {"output": my_out, "grad.input.x": my_dx})
    assert report.ok, str(report)
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pathlib
import zipfile
from dataclasses import dataclass, field

import numpy as np

FORMAT = 1
TOLERANCES = {
    "float64": {"rtol": 1e-7, "atol": 1e-7, "floor": 1e-4},
    "float32": {"rtol": 1e-4, "atol": 1e-5, "floor": 1.0},
}
# The figure recorded for a cross-check (manifest "cross_checked.max_rel_err"): per tensor
# max|theirs - ours| / max(max|ours|, CROSSCHECK_SCALE_FLOOR * case scale), the worst over
# the case's tensors. A tensor far smaller than the case's largest (an exact-zero gradient,
# where the other implementation has its rounding noise) is measured against 1% of the
# case scale, so the figure states the agreement of the computation, not of its noise.
CROSSCHECK_SCALE_FLOOR = 0.01
TOLERANCE_RULE = (
    "|actual - expected| <= atol * scale + rtol * |expected|, "
    "scale = max(max|expected|, floor * largest magnitude in the case), per tensor"
)


class GoldenError(Exception):
    """A fixture or manifest that cannot be used; the message names the case and file."""


# ---------------------------------------------------------------------------- locating

def default_dir() -> pathlib.Path:
    """``$NPATTN_GOLDEN``, else ``./golden`` when it has a manifest, else the checkout's."""
    env = os.environ.get("NPATTN_GOLDEN")
    if env:
        return pathlib.Path(env)
    cwd = pathlib.Path.cwd() / "golden"
    if (cwd / "manifest.json").is_file():
        return cwd
    return pathlib.Path(__file__).resolve().parents[1] / "golden"


def _dir(golden_dir) -> pathlib.Path:
    return pathlib.Path(golden_dir) if golden_dir is not None else default_dir()


def read_manifest(golden_dir=None) -> dict:
    path = _dir(golden_dir) / "manifest.json"
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise GoldenError(f"no manifest at {path} (pass --golden DIR or set NPATTN_GOLDEN)") from exc
    except (OSError, ValueError) as exc:
        raise GoldenError(f"manifest {path} cannot be read: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or not isinstance(manifest.get("cases"), dict):
        raise GoldenError(f"manifest {path} is not an npattn format-{FORMAT} manifest")
    return manifest


def list_cases(golden_dir=None) -> dict:
    """case id -> manifest entry."""
    return read_manifest(golden_dir)["cases"]


# ---------------------------------------------------------------------------- files

def write_npz(path, arrays: dict) -> str:
    """Write ``arrays`` as an .npz that is byte-for-byte reproducible (fixed zip
    timestamps, sorted keys); returns its sha256."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for key in sorted(arrays):
            a = np.array(arrays[key], order="C", copy=True)  # (ascontiguousarray would make 0-d arrays 1-d)
            if a.dtype == object:
                raise GoldenError(f"refusing to write object array '{key}'")
            member = io.BytesIO()
            np.lib.format.write_array(member, a, allow_pickle=False)
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, member.getvalue())
    data = buf.getvalue()
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def sha256_of(path) -> str:
    return hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest()


def read_npz(path) -> dict:
    """Every array of an .npz, loaded without unpickling; a damaged file raises
    GoldenError naming it."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except FileNotFoundError as exc:
        raise GoldenError(f"fixture file {path} is missing") from exc
    except Exception as exc:  # zipfile.BadZipFile, ValueError (pickled object), EOFError ...
        raise GoldenError(f"fixture file {path} cannot be read: {type(exc).__name__}: {exc}") from exc


@dataclass
class Case:
    """A loaded fixture: its manifest entry and its arrays (keys as in the module docstring)."""

    case_id: str
    meta: dict
    arrays: dict
    path: pathlib.Path

    def inputs(self) -> dict:
        return {k[len("input.") :]: v for k, v in self.arrays.items() if k.startswith("input.")}

    def state_dict(self) -> dict:
        """Parameters and buffers (before the forward) under their state_dict keys."""
        out = {}
        for k, v in self.arrays.items():
            for prefix in ("param.", "buffer."):
                if k.startswith(prefix):
                    out[k[len(prefix) :]] = v
        return out

    def expected(self) -> dict:
        """What an implementation should produce: output, gradients, buffers after."""
        return {
            k: v
            for k, v in self.arrays.items()
            if k == "output" or k.startswith(("output.", "grad.input.", "grad.param.", "buffer_after."))
        }


def load(case_id: str, golden_dir=None, *, check_sha=True) -> Case:
    """Load one case; with ``check_sha`` the file must match the manifest's sha256."""
    cases = list_cases(golden_dir)
    if case_id not in cases:
        raise GoldenError(f"unknown case '{case_id}' (npattn list shows the {len(cases)} cases)")
    meta = cases[case_id]
    path = _dir(golden_dir) / meta["file"]
    if check_sha and path.is_file():
        digest = sha256_of(path)
        if digest != meta.get("sha256"):
            raise GoldenError(f"case '{case_id}': {path} has sha256 {digest[:12]}..., the manifest says {str(meta.get('sha256'))[:12]}...")
    return Case(case_id, meta, read_npz(path), path)


# ---------------------------------------------------------------------------- running npattn

def _function_ops():
    from . import functional as F

    return {
        "deform_conv2d": (F.deform_conv2d_forward, F.deform_conv2d_backward),
        "batch_map_offsets": (F.batch_map_offsets_forward, F.batch_map_offsets_backward),
        "scaled_dot_product_attention": (F.scaled_dot_product_attention_forward, F.scaled_dot_product_attention_backward),
        "varlen_attention": (F.varlen_attention_forward, F.varlen_attention_backward),
        "rotary_embedding": (F.rotary_embedding_forward, F.rotary_embedding_backward),
    }


# A function whose cache carries a second result stores it as ``output.<name>``; its
# upstream gradient, when the case has one, is ``grad_output.<name>``, passed to the
# backward as the keyword of the same meaning.
_SECOND_OUTPUTS = {"lse": "dlse"}


def grad_inputs(meta: dict) -> list:
    """The inputs that get a gradient: all but the manifest's ``no_grad_inputs`` (masks)."""
    skip = set(meta.get("no_grad_inputs", ()))
    return [n for n in meta["inputs"] if n not in skip]


def build_block(meta: dict, dtype):
    """The npattn block a manifest entry describes, with ``dtype`` arrays."""
    import npattn

    cls = getattr(npattn, meta["block"], None)
    if cls is None:
        raise GoldenError(f"npattn has no block named {meta['block']!r}")
    return cls(**meta["config"], rng=0, dtype=dtype)


def run(meta: dict, arrays: dict, dtype=np.float64) -> dict:
    """Recompute a case with npattn: returns output, gradients and buffers after, under
    the fixture's key names. Inputs and parameters are converted to ``dtype``."""
    def cast(a):
        return a.astype(dtype) if a.dtype.kind == "f" else a

    inputs = [cast(arrays[f"input.{n}"]) for n in meta["inputs"]]
    grad_output = cast(arrays["grad_output"])
    training = meta["mode"] == "train"
    out = {}
    if meta["kind"] == "function":
        fwd, bwd = _function_ops()[meta["block"]]
        y, cache = fwd(**dict(zip(meta["inputs"], inputs)), **meta["config"])
        second = {}
        for name, keyword in _SECOND_OUTPUTS.items():
            if hasattr(cache, name):
                out[f"output.{name}"] = getattr(cache, name)
                if f"grad_output.{name}" in arrays:
                    second[keyword] = cast(arrays[f"grad_output.{name}"])
        grads = bwd(grad_output, cache, **second)
        out["output"] = y
        for n in grad_inputs(meta):
            out[f"grad.input.{n}"] = grads[n]
        return out
    block = build_block(meta, dtype)
    state = {k[len("param.") :]: v for k, v in arrays.items() if k.startswith("param.")}
    state.update({k[len("buffer.") :]: v for k, v in arrays.items() if k.startswith("buffer.")})
    block.load_state_dict(state)
    y, cache = block.forward(*inputs, training=training)
    input_grads, param_grads = block.backward(grad_output, cache)
    out["output"] = y
    for n, g in zip(grad_inputs(meta), input_grads):
        out[f"grad.input.{n}"] = g
    for k, g in param_grads.items():
        out[f"grad.param.{k}"] = g
    if training:
        after = block.state_dict()
        for k in block.buffer_names():
            out[f"buffer_after.{k}"] = after[k]
    return out


def spot_check_gradients(meta: dict, arrays: dict, *, n_directions=2, seed=0):
    """Finite-difference spot check (float64, random directions) of every gradient of a
    case; returns the :class:`npattn.gradcheck.GradcheckReport`."""
    from .gradcheck import gradcheck

    arrays64 = {k: (v.astype(np.float64) if v.dtype.kind == "f" else v) for k, v in arrays.items()}
    names = [f"input.{n}" for n in grad_inputs(meta)] + sorted(k for k in arrays64 if k.startswith("param."))
    # a case may name tensors at a point where the forward is not differentiable (zero
    # offsets: every sample on an integer position), with the reason, in "fd_skip"
    names = [n for n in names if n not in (meta.get("fd_skip") or {})]
    base = dict(arrays64)

    seconds = sorted(k[len("grad_output.") :] for k in arrays64 if k.startswith("grad_output."))

    def forward(**perturbed):
        a = dict(base)
        a.update(perturbed)
        res = run(meta, a)
        if not seconds:
            return res["output"], res
        # the loss <grad_output, output> + <grad_output.<name>, output.<name>>; an lse of -inf
        # (a query with no key, a constant) counts as 0, so that the loss stays finite
        extra = [np.where(np.isneginf(res[f"output.{n}"]), 0.0, res[f"output.{n}"]).ravel() for n in seconds]
        return np.concatenate([res["output"].ravel()] + extra), res

    def backward(dy, res):
        # gradients were computed with the stored grad_output; rescale by linearity
        return {n: res[f"grad.{n}"] for n in names}

    dy = arrays64["grad_output"]
    if seconds:
        dy = np.concatenate([dy.ravel()] + [arrays64[f"grad_output.{n}"].ravel() for n in seconds])
    return gradcheck(
        forward, backward, {n: base[n] for n in names}, grad_output=dy, max_full_size=0,
        n_projections=n_directions, seed=seed, raise_on_failure=False, structural=False,
    )


# ---------------------------------------------------------------------------- comparing

@dataclass
class TensorCheck:
    key: str
    status: str  # "ok", "mismatch", "missing", "not provided", "shape", "dtype", "nonfinite"
    detail: str = ""
    max_abs_err: float = 0.0
    max_rel_err: float = 0.0  # max abs err / max(max|expected|, floor * case scale)
    n_mismatch: int = 0
    size: int = 0
    worst_index: tuple = ()

    @property
    def passed(self) -> bool:
        return self.status in ("ok", "not provided")


@dataclass
class CheckReport:
    case_id: str
    dtype: str
    tolerance: dict
    tensors: list = field(default_factory=list)
    notes: list = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(t.passed for t in self.tensors) and any(t.key == "output" and t.status == "ok" for t in self.tensors)

    def __str__(self) -> str:
        tol = self.tolerance
        lines = [
            f"case {self.case_id}: comparing {self.dtype} results with rtol {tol['rtol']:g}, atol {tol['atol']:g} "
            f"({TOLERANCE_RULE})",
            f"{'tensor':<34} {'status':<12} {'max abs err':>12} {'rel err':>12} {'mismatched':>18}  worst index",
        ]
        for t in self.tensors:
            if t.status in ("ok", "mismatch"):
                frac = t.n_mismatch / t.size if t.size else 0.0
                lines.append(
                    f"{t.key:<34} {t.status:<12} {t.max_abs_err:12.3e} {t.max_rel_err:12.3e} "
                    f"{t.n_mismatch:>8}/{t.size:<6}({frac:5.1%})  {t.worst_index}"
                )
            else:
                lines.append(f"{t.key:<34} {t.status:<12} {t.detail}")
        lines += [f"note: {n}" for n in self.notes]
        lines.append("PASS" if self.ok else "FAIL")
        return "\n".join(lines)


def _max_abs_finite(v) -> float:
    """Largest finite magnitude of ``v`` (an lse is -inf for a query with no key)."""
    finite = np.abs(v[np.isfinite(v)])
    return float(np.max(finite)) if finite.size else 0.0


def case_scale(expected: dict) -> float:
    """Largest finite magnitude over a case's expected floating tensors."""
    return max((_max_abs_finite(v) for v in expected.values() if v.dtype.kind == "f" and v.size), default=0.0)


def compare(key: str, actual, expected, tol: dict, floor: float = 0.0) -> TensorCheck:
    """Compare one tensor under the tolerance policy; ``floor`` is the tolerance's floor
    times the case's scale (see the module docstring)."""
    actual = np.asarray(actual)
    if actual.shape != expected.shape:
        return TensorCheck(key, "shape", f"expected shape {tuple(expected.shape)}, got {tuple(actual.shape)}")
    if expected.dtype.kind == "f" and actual.dtype.kind != "f":
        return TensorCheck(key, "dtype", f"expected a floating dtype, got {actual.dtype}")
    if expected.dtype.kind != "f":
        same = np.array_equal(actual, expected)
        return TensorCheck(key, "ok" if same else "mismatch", "" if same else f"expected {expected}, got {actual}", size=expected.size, n_mismatch=0 if same else expected.size)
    a = actual.astype(np.float64)
    e = expected.astype(np.float64)
    if expected.size == 0:
        return TensorCheck(key, "ok", size=0)
    with np.errstate(invalid="ignore"):  # inf - inf: equal infinities are matched by the next line
        diff = np.abs(a - e)
    diff = np.where((np.isnan(a) & np.isnan(e)) | (a == e), 0.0, diff)  # the same NaN or infinity: no error
    diff = np.where(np.isnan(diff), np.inf, diff)
    scale = max(_max_abs_finite(e), floor)
    bound = tol["atol"] * scale + tol["rtol"] * np.abs(np.where(np.isfinite(e), e, 0.0))  # an infinity: matched exactly
    bad = diff > bound
    worst = int(np.argmax(diff))
    check = TensorCheck(
        key,
        "mismatch" if bad.any() else "ok",
        max_abs_err=float(diff.max()),
        # normwise: against the same scale as the absolute tolerance (an element-wise
        # ratio means nothing where the expected value is rounding noise around zero)
        max_rel_err=float(diff.max()) / scale if scale > 0 else (0.0 if diff.max() == 0 else np.inf),
        n_mismatch=int(bad.sum()),
        size=int(expected.size),
        worst_index=tuple(int(i) for i in np.unravel_index(worst, expected.shape)),
    )
    if not np.all(np.isfinite(a)) and np.all(np.isfinite(e)):
        check.status = "mismatch"
        check.detail = "non-finite values"
    return check


def check(case_id: str, outputs: dict, golden_dir=None) -> CheckReport:
    """Compare another implementation's results (``output`` required; gradients and
    ``buffer_after.*`` optional, same key names as the fixture) with a case, under the
    tolerances for the dtype of ``outputs['output']``."""
    case = load(case_id, golden_dir)
    expected = case.expected()
    out = outputs.get("output")
    dtype = np.asarray(out).dtype if out is not None else np.dtype(case.meta["dtype"])
    if dtype.name not in TOLERANCES:
        dtype = np.dtype(case.meta["dtype"])
        note = f"'output' has dtype {np.asarray(out).dtype}; expected float32 or float64"
    else:
        note = None
    tol = case.meta.get("tolerances", TOLERANCES).get(dtype.name, TOLERANCES[dtype.name])
    report = CheckReport(case_id, dtype.name, tol)
    floor = tol.get("floor", 0.0) * case_scale(expected)
    if note:
        report.tensors.append(TensorCheck("output", "dtype", note))
    for key in sorted(expected, key=lambda k: (k != "output", k)):
        if note and key == "output":
            continue
        if key not in outputs:
            status = "missing" if key == "output" else "not provided"
            report.tensors.append(TensorCheck(key, status, "required" if key == "output" else "optional, not compared"))
            continue
        report.tensors.append(compare(key, outputs[key], expected[key], tol, floor))
        actual_dtype = np.asarray(outputs[key]).dtype
        if expected[key].dtype.kind == "f" and actual_dtype != dtype and report.tensors[-1].status in ("ok", "mismatch"):
            report.tensors[-1].status = "dtype"
            report.tensors[-1].detail = f"dtype {actual_dtype}, but 'output' is {dtype.name}: give all tensors one dtype"
    for key in sorted(set(outputs) - set(expected)):
        report.notes.append(f"'{key}' is not a key of this case; ignored")
    return report


# ---------------------------------------------------------------------------- verifying

@dataclass
class VerifyResult:
    case_id: str
    ok: bool
    message: str
    max_rel_err: float = 0.0
    fd_rel_err: float = 0.0


def verify_case(case_id: str, meta: dict, golden_dir=None, *, fd_check=True) -> VerifyResult:
    """Recompute a case and compare with its stored arrays, its sha256 and (optionally)
    finite differences. Never raises for a damaged fixture: the result says what is wrong."""
    try:
        case = load(case_id, golden_dir)
    except GoldenError as exc:
        return VerifyResult(case_id, False, str(exc))
    try:
        arrays = case.arrays
        missing = [k for k in ("grad_output", "output") if k not in arrays]
        missing += [f"input.{n}" for n in meta["inputs"] if f"input.{n}" not in arrays]
        if missing:
            return VerifyResult(case_id, False, f"{case.path} lacks keys {missing}")
        dtype = np.dtype(meta["dtype"])
        # the reference is computed in float64 (for float32 twins: from the float32 values)
        recomputed = run(meta, arrays, np.float64)
        expected = case.expected()
        floor = TOLERANCES["float64"]["floor"] * case_scale(expected)
        worst = 0.0
        for key, e in expected.items():
            if key not in recomputed:
                return VerifyResult(case_id, False, f"stored '{key}' is not produced by npattn's {meta['block']}")
            r = recomputed[key]
            if e.dtype.kind == "f":
                r = r.astype(dtype)
                # npattn against its own stored result: far inside the float64 policy, but
                # not at the level of rounding noise, which another BLAS may change
                tol = {"rtol": 1e-10, "atol": 1e-10} if dtype == np.float64 else {"rtol": 2**-22, "atol": 2**-22}
            else:
                tol = None
            c = compare(key, r, e, tol or {"rtol": 0, "atol": 0}, floor)
            if not c.passed:
                return VerifyResult(case_id, False, f"'{key}' differs from npattn's result: {c.status} {c.detail} max abs err {c.max_abs_err:.3e} at {c.worst_index}")
            if e.dtype.kind == "f" and e.size:
                worst = max(worst, c.max_abs_err / max(_max_abs_finite(e), floor, 1e-300))
        for key in recomputed:
            if key not in expected:
                return VerifyResult(case_id, False, f"fixture lacks '{key}'")
        if dtype == np.float32:
            # the float32 tolerances must be reachable: npattn itself, run in float32
            run32 = run(meta, arrays, np.float32)
            tol32 = meta.get("tolerances", TOLERANCES)["float32"]
            for key, e in expected.items():
                if e.dtype.kind != "f":
                    continue
                c = compare(key, run32[key], e, tol32, tol32.get("floor", 0.0) * case_scale(expected))
                if not c.passed:
                    return VerifyResult(case_id, False, f"npattn in float32 misses the float32 tolerance on '{key}': {c.n_mismatch} elements, max abs err {c.max_abs_err:.3e}", worst)
        fd = 0.0
        if fd_check:
            report = spot_check_gradients(meta, arrays)
            if not report.ok:
                return VerifyResult(case_id, False, f"finite-difference spot check failed: {report.failure_message()}", worst)
            fd = report.max_rel_err
        return VerifyResult(case_id, True, "ok", worst, fd)
    except GoldenError as exc:
        return VerifyResult(case_id, False, str(exc))
    except Exception as exc:  # a fixture that makes npattn raise is a failed case, not a crash
        return VerifyResult(case_id, False, f"{type(exc).__name__}: {exc}")


# ---------------------------------------------------------------------------- exporting

def export(case_id: str, out_dir, golden_dir=None) -> list:
    """Write a case's inputs (``inputs.npz``), state_dict (``state_dict.npz``, loadable
    with ``{k: torch.from_numpy(v) for k, v in np.load(...).items()}``), ``grad_output.npy``
    and ``case.json`` into ``out_dir``; returns the paths written."""
    case = load(case_id, golden_dir)
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    p = out_dir / "inputs.npz"
    write_npz(p, case.inputs())
    written.append(p)
    p = out_dir / "state_dict.npz"
    write_npz(p, case.state_dict())
    written.append(p)
    p = out_dir / "grad_output.npy"
    np.save(p, case.arrays["grad_output"], allow_pickle=False)
    written.append(p)
    for key in sorted(k for k in case.arrays if k.startswith("grad_output.")):  # grad_output.lse
        p = out_dir / f"{key}.npy"
        np.save(p, case.arrays[key], allow_pickle=False)
        written.append(p)
    p = out_dir / "case.json"
    info = {"case": case_id, **{k: v for k, v in case.meta.items() if k != "sha256"}}
    p.write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    written.append(p)
    return written
