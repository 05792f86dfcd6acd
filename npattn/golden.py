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


RESULTS_LAYOUT = "an .npz of plain arrays keyed output, grad.input.<name>, grad.param.<key>, buffer_after.<key>"


def read_results(path) -> dict:
    """Another implementation's results for :func:`check`: an .npz of plain arrays.
    Anything else raises GoldenError with one line naming the file and what was expected
    (a missing file, a single .npy array, a file that is not a zip archive, a pickled
    object array)."""
    path = pathlib.Path(path)
    try:
        with open(path, "rb") as f:
            magic = f.read(6)
    except FileNotFoundError:
        raise GoldenError(f"results file {path} does not exist; expected {RESULTS_LAYOUT}") from None
    except OSError as exc:
        raise GoldenError(f"results file {path} cannot be read ({exc.strerror or exc}); expected {RESULTS_LAYOUT}") from None
    if magic.startswith(b"\x93NUMPY"):
        raise GoldenError(
            f"results file {path} is a single .npy array; expected {RESULTS_LAYOUT} "
            f"(np.savez(path, output=..., **grads))"
        )
    if not zipfile.is_zipfile(path):
        raise GoldenError(f"results file {path} is not an .npz (zip) archive; expected {RESULTS_LAYOUT}")
    out = {}
    try:
        with np.load(path, allow_pickle=False) as z:
            for key in z.files:
                try:
                    out[key] = z[key]
                except ValueError as exc:
                    if "allow_pickle" in str(exc) or "pickled" in str(exc):
                        raise GoldenError(
                            f"results file {path}: array '{key}' is a pickled object array; expected plain "
                            f"float32 or float64 arrays"
                        ) from None
                    raise
    except GoldenError:
        raise
    except Exception as exc:  # a damaged member, a truncated archive
        raise GoldenError(f"results file {path} cannot be read ({type(exc).__name__}: {exc}); expected {RESULTS_LAYOUT}") from None
    return out


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
    status: str  # "ok", "mismatch", "missing", "not provided", "shape", "dtype"
    detail: str = ""
    max_abs_err: float = 0.0  # over the elements where both are finite
    max_rel_err: float = 0.0  # max abs err / max(max|expected|, floor * case scale)
    n_mismatch: int = 0
    size: int = 0
    worst_index: tuple = ()
    worst_expected: float = 0.0  # the expected and actual values at worst_index
    worst_actual: float = 0.0
    nonfinite: dict = field(default_factory=dict)  # {"nan": n, "+inf": n, "-inf": n} where expected is finite

    @property
    def passed(self) -> bool:
        return self.status in ("ok", "not provided")

    @property
    def malformed(self) -> bool:
        """A tensor that cannot be compared (wrong shape or dtype): the results file does
        not follow the case's layout."""
        return self.status in ("shape", "dtype")

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in ("key", "status", "detail", "n_mismatch", "size")}
        d["worst_index"] = list(self.worst_index)
        for k in ("max_abs_err", "max_rel_err", "worst_expected", "worst_actual"):
            v = float(getattr(self, k))
            d[k] = v if np.isfinite(v) else str(v)  # JSON has no NaN or inf
        d["nonfinite"] = dict(self.nonfinite)
        return d


@dataclass
class CheckReport:
    case_id: str
    dtype: str  # the results' dtype (it picks the tolerances)
    tolerance: dict
    tensors: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    case_dtype: str = ""  # the dtype of the case's expected arrays
    unknown: dict = field(default_factory=dict)  # results key -> nearest fixture key (or "")
    diagnoses: list = field(default_factory=list)  # why the results differ, where it can be told

    @property
    def ok(self) -> bool:
        return (
            all(t.passed for t in self.tensors)
            and any(t.key == "output" and t.status == "ok" for t in self.tensors)
            and not self.unknown
        )

    @property
    def malformed(self) -> list:
        """One line per tensor that cannot be compared (wrong shape or dtype)."""
        return [f"{t.key}: {t.detail}" for t in self.tensors if t.malformed]

    def header(self) -> str:
        tol = self.tolerance
        line = (
            f"case {self.case_id}: comparing {self.dtype} results with rtol {tol['rtol']:g}, atol {tol['atol']:g}, "
            f"floor {tol.get('floor', 0.0):g} ({TOLERANCE_RULE})"
        )
        if self.case_dtype and self.case_dtype != self.dtype:
            line += (
                f"\nnote: the results are {self.dtype} but the case is {self.case_dtype}: the {self.dtype} "
                f"tolerances apply"
            )
        return line

    def __str__(self) -> str:
        w = max([34] + [len(t.key) for t in self.tensors])
        lines = [
            self.header(),
            f"{'tensor':<{w}} {'status':<12} {'max abs err':>12} {'rel err':>12} {'mismatched':>18}  worst index: expected, got",
        ]
        for t in self.tensors:
            if t.status in ("ok", "mismatch"):
                frac = t.n_mismatch / t.size if t.size else 0.0
                worst = f"{t.worst_index}: {t.worst_expected:.9g}, {t.worst_actual:.9g}" if t.size else ""
                lines.append(
                    f"{t.key:<{w}} {t.status:<12} {t.max_abs_err:12.3e} {t.max_rel_err:12.3e} "
                    f"{t.n_mismatch:>8}/{t.size:<6}({frac:5.1%})  {worst}"
                )
                if t.detail:
                    lines.append(f"{'':<{w}} {t.detail}")
            else:
                lines.append(f"{t.key:<{w}} {t.status:<12} {t.detail}")
        lines += [unknown_key_message(k, near) for k, near in self.unknown.items()]
        lines += [f"note: {n}" for n in self.notes]
        lines += [f"diagnosis: {d}" for d in self.diagnoses]
        lines.append("PASS" if self.ok else "FAIL")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """The report as plain data (``npattn check --json``)."""
        return {
            "case": self.case_id,
            "ok": self.ok,
            "dtype": self.dtype,
            "case_dtype": self.case_dtype,
            "tolerance": dict(self.tolerance),
            "tensors": [t.to_dict() for t in self.tensors],
            "unknown_keys": {k: (near or None) for k, near in self.unknown.items()},
            "notes": list(self.notes),
            "diagnoses": list(self.diagnoses),
        }


def unknown_key_message(key: str, nearest: str) -> str:
    hint = f"; did you mean {nearest}?" if nearest else ""
    return f"{key}: not a key of this case{hint}"


def _max_abs_finite(v) -> float:
    """Largest finite magnitude of ``v`` (an lse is -inf for a query with no key)."""
    finite = np.abs(v[np.isfinite(v)])
    return float(np.max(finite)) if finite.size else 0.0


def case_scale(expected: dict) -> float:
    """Largest finite magnitude over a case's expected floating tensors."""
    return max((_max_abs_finite(v) for v in expected.values() if v.dtype.kind == "f" and v.size), default=0.0)


def compare(key: str, actual, expected, tol: dict, floor: float = 0.0) -> TensorCheck:
    """Compare one tensor under the tolerance policy; ``floor`` is the tolerance's floor
    times the case's scale (see the module docstring). A NaN or infinity in ``actual``
    where ``expected`` is finite is a mismatched element, counted by kind in
    ``nonfinite``; one where ``expected`` holds the same value matches."""
    actual = np.asarray(actual)
    if actual.shape != expected.shape:
        return TensorCheck(key, "shape", f"expected shape {tuple(expected.shape)}, got {tuple(actual.shape)}")
    if expected.dtype.kind == "f" and actual.dtype.kind != "f":
        return TensorCheck(key, "dtype", f"expected a floating dtype, got {actual.dtype}")
    if expected.dtype.kind != "f":
        if actual.dtype.kind not in "iub":
            return TensorCheck(key, "dtype", f"expected an integer dtype ({expected.dtype}), got {actual.dtype}")
        neq = actual != expected
        worst = int(np.argmax(neq)) if expected.size else 0
        return TensorCheck(
            key, "mismatch" if neq.any() else "ok", size=int(expected.size), n_mismatch=int(neq.sum()),
            worst_index=tuple(int(i) for i in np.unravel_index(worst, expected.shape)) if expected.size else (),
            worst_expected=float(expected.flat[worst]) if expected.size else 0.0,
            worst_actual=float(actual.flat[worst]) if expected.size else 0.0,
        )
    a = actual.astype(np.float64)
    e = expected.astype(np.float64)
    if expected.size == 0:
        return TensorCheck(key, "ok", size=0)
    same_special = (np.isnan(a) & np.isnan(e)) | (np.isinf(a) & (a == e))
    both_finite = np.isfinite(a) & np.isfinite(e)
    with np.errstate(invalid="ignore"):
        diff = np.where(both_finite, np.abs(a - e), 0.0)
    scale = max(float(np.max(np.abs(e), where=np.isfinite(e), initial=0.0)), floor)
    bound = tol["atol"] * scale + tol["rtol"] * np.where(np.isfinite(e), np.abs(e), 0.0)
    bad = (diff > bound) | ~(both_finite | same_special)
    # the worst element: a non-finite disagreement first, else the largest difference
    badness = np.where(both_finite | same_special, diff, np.inf)
    worst = int(np.argmax(badness))
    max_abs = float(diff.max())
    check = TensorCheck(
        key,
        "mismatch" if bad.any() else "ok",
        max_abs_err=max_abs,
        # normwise: against the same scale as the absolute tolerance (an element-wise
        # ratio means nothing where the expected value is rounding noise around zero)
        max_rel_err=max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else np.inf),
        n_mismatch=int(bad.sum()),
        size=int(expected.size),
        worst_index=tuple(int(i) for i in np.unravel_index(worst, expected.shape)),
        worst_expected=float(e.flat[worst]),
        worst_actual=float(a.flat[worst]),
    )
    unexpected = ~same_special & ~np.isfinite(a)
    counts = {"nan": int(np.sum(unexpected & np.isnan(a))), "+inf": int(np.sum(unexpected & (a == np.inf))),
              "-inf": int(np.sum(unexpected & (a == -np.inf)))}
    check.nonfinite = {k: n for k, n in counts.items() if n}
    if check.nonfinite:
        check.detail = "non-finite results: " + ", ".join(f"{n} {k.replace('nan', 'NaN')}" for k, n in check.nonfinite.items())
    missing = int(np.sum(np.isfinite(a) & ~np.isfinite(e)))
    if missing:
        check.detail = (check.detail + "; " if check.detail else "") + f"{missing} finite where NaN or inf was expected"
    return check


def _results_dtype(case, outputs):
    """The dtype whose tolerances apply: that of ``outputs['output']`` when it is float32
    or float64, else the case's (with a note)."""
    out = outputs.get("output")
    dtype = np.asarray(out).dtype if out is not None else np.dtype(case.meta["dtype"])
    if dtype.name not in TOLERANCES:
        return np.dtype(case.meta["dtype"]), f"dtype {np.asarray(out).dtype}; expected float32 or float64"
    return dtype, None


def _compare_all(expected, outputs, dtype, tol, note=None) -> list:
    floor = tol.get("floor", 0.0) * case_scale(expected)
    tensors = []
    if note:
        tensors.append(TensorCheck("output", "dtype", note))
    for key in sorted(expected, key=lambda k: (k != "output", k)):
        if note and key == "output":
            continue
        if key not in outputs:
            status = "missing" if key == "output" else "not provided"
            tensors.append(TensorCheck(key, status, "required" if key == "output" else "optional, not compared"))
            continue
        tensors.append(compare(key, outputs[key], expected[key], tol, floor))
        actual_dtype = np.asarray(outputs[key]).dtype
        if expected[key].dtype.kind == "f" and actual_dtype != dtype and tensors[-1].status in ("ok", "mismatch"):
            tensors[-1].status = "dtype"
            tensors[-1].detail = f"dtype {actual_dtype}, but 'output' is {dtype.name}: give all tensors one dtype"
    return tensors


def check(case_id: str, outputs: dict, golden_dir=None, *, explain=True) -> CheckReport:
    """Compare another implementation's results (``output`` required; gradients and
    ``buffer_after.*`` optional, same key names as the fixture) with a case, under the
    tolerances for the dtype of ``outputs['output']``.

    A results key that is not a key of the case fails the check (it was not compared;
    ``report.unknown`` gives the nearest fixture key). Where the report fails, its
    ``diagnoses`` say why when that can be told (see :func:`diagnose`)."""
    import difflib

    case = load(case_id, golden_dir)
    expected = case.expected()
    dtype, note = _results_dtype(case, outputs)
    tol = case.meta.get("tolerances", TOLERANCES).get(dtype.name, TOLERANCES[dtype.name])
    report = CheckReport(case_id, dtype.name, tol, case_dtype=str(case.meta.get("dtype", "")))
    report.tensors = _compare_all(expected, outputs, dtype, tol, note)
    for key in sorted(set(outputs) - set(expected)):
        if key in case.arrays:
            report.notes.append(f"'{key}' is one of the case's inputs or parameters, not a result; ignored")
            continue
        near = difflib.get_close_matches(key, sorted(expected), n=1, cutoff=0.6)
        report.unknown[key] = near[0] if near else ""
    if explain and not report.ok:
        report.diagnoses = diagnose(case, outputs, report, golden_dir)
    return report


# ---------------------------------------------------------------------------- explaining a mismatch

_OFFSET_MOVERS = ("grad.input.offset", "grad.param.conv_offset.weight", "grad.param.conv_offset.bias")
_BORDER_TWINS = {"torchvision": "mmcv", "mmcv": "torchvision"}


def diagnose(case: Case, outputs: dict, report: CheckReport, golden_dir=None) -> list:
    """Reasons for a failed check that npattn can recognise:

    - the other border convention: every mismatched tensor moves the offsets (the offset
      gradient, or the offset conv's parameters), the case has a twin in the other
      ``border_grad`` convention (same inputs), and the results match that twin; where
      the case has the offsets as an input, it also says whether every mismatched
      offset-gradient element sits on a tap exactly at p = -1;
    - float32 arithmetic: float64 results that miss the float64 tolerances but meet the
      float32 ones.
    """
    found = []
    failed = [t for t in report.tensors if not t.passed]
    convention = (case.meta.get("config") or {}).get("border_grad")
    if failed and convention in _BORDER_TWINS and all(t.status == "mismatch" and t.key in _OFFSET_MOVERS for t in failed):
        other = _BORDER_TWINS[convention]
        twin_id = case.case_id.replace(f"_{convention}_", f"_{other}_")
        if twin_id != case.case_id and twin_id in list_cases(golden_dir):
            twin = check(twin_id, outputs, golden_dir, explain=False)
            if twin.ok:
                where = ""
                t_off = next((t for t in failed if t.key == "grad.input.offset"), None)
                if t_off is not None and "input.offset" in case.arrays:
                    on_edge = _taps_at_minus_one(case)
                    a = np.asarray(outputs["grad.input.offset"], dtype=np.float64)
                    e = case.arrays["grad.input.offset"].astype(np.float64)
                    tol = report.tolerance
                    bound = tol["atol"] * max(float(np.max(np.abs(e))), tol.get("floor", 0.0) * case_scale(case.expected())) + tol["rtol"] * np.abs(e)
                    bad = ~(np.abs(a - e) <= bound)
                    n_bad, n_edge = int(bad.sum()), int((bad & on_edge).sum())
                    where = (
                        f"; all {n_bad} mismatched elements of grad.input.offset sit on taps at p = -1"
                        if n_edge == n_bad
                        else f"; {n_edge} of the {n_bad} mismatched elements of grad.input.offset sit on taps at p = -1"
                    )
                found.append(
                    f"the results follow the {other} border convention (border_grad={other!r}: the offset gradient "
                    f"at a sample exactly on p = -1), not this case's {convention}{where}; the twin case {twin_id} "
                    f"matches them"
                )
    if report.dtype == "float64" and failed and all(t.status == "mismatch" for t in failed):
        relaxed = _compare_all(case.expected(), outputs, np.dtype(np.float64), TOLERANCES["float32"])
        if all(t.passed for t in relaxed):
            worst = max(t.max_rel_err for t in failed)
            found.append(
                f"the float64 results look computed in float32: they miss the float64 tolerances (worst rel err "
                f"{worst:.1e}) but meet the float32 ones (rtol {TOLERANCES['float32']['rtol']:g}, atol "
                f"{TOLERANCES['float32']['atol']:g}); float32 arithmetic (a cast, a float32 kernel) somewhere in the chain"
            )
    return found


def _taps_at_minus_one(case: Case) -> np.ndarray:
    """Boolean array shaped like the offset: True where the component's sample position
    (py for the delta_y channel, px for the delta_x channel) is exactly -1, from the case's
    inputs and configuration (torchvision's layout: pair (delta_y, delta_x) at channels
    2(g K + k), 2(g K + k) + 1, tap k = i kw + j)."""
    cfg = case.meta.get("config") or {}
    offset = case.arrays["input.offset"].astype(np.float64)
    if "input.weight" in case.arrays:
        kh, kw = case.arrays["input.weight"].shape[2:]
    else:
        kh, kw = case.arrays["param.weight"].shape[2:]

    def pair(v, default):
        v = cfg.get(v, default)
        return (v, v) if isinstance(v, int) else tuple(v)

    (sh, sw), (ph, pw), (dh, dw) = pair("stride", 1), pair("padding", 0), pair("dilation", 1)
    n, c2, oh, ow = offset.shape
    K = kh * kw
    off = offset.reshape(n, c2 // (2 * K), K, 2, oh, ow)
    i = (np.arange(K) // kw).reshape(1, 1, K, 1, 1)
    j = (np.arange(K) % kw).reshape(1, 1, K, 1, 1)
    oy = np.arange(oh).reshape(1, 1, 1, oh, 1)
    ox = np.arange(ow).reshape(1, 1, 1, 1, ow)
    py = oy * sh - ph + i * dh + off[:, :, :, 0]
    px = ox * sw - pw + j * dw + off[:, :, :, 1]
    edge = (py == -1) | (px == -1)  # the sample the convention is about, for both components
    return np.stack([edge, edge], axis=3).reshape(offset.shape)


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

def refuse_overwrite(paths, force=False) -> None:
    """Raise GoldenError naming the first of ``paths`` that exists, unless ``force``."""
    if force:
        return
    for p in paths:
        if pathlib.Path(p).exists():
            raise GoldenError(f"{p} already exists; not overwritten (pass --force to replace it)")


def export(case_id: str, out_dir, golden_dir=None, *, force=False) -> list:
    """Write a case's inputs (``inputs.npz``), state_dict (``state_dict.npz``, loadable
    with ``{k: torch.from_numpy(v) for k, v in np.load(...).items()}``), ``grad_output.npy``
    and ``case.json`` into ``out_dir``; returns the paths written. A file that is already
    there is never replaced (GoldenError naming it) unless ``force``."""
    case = load(case_id, golden_dir)
    out_dir = pathlib.Path(out_dir)
    seconds = sorted(k for k in case.arrays if k.startswith("grad_output."))  # grad_output.lse
    names = ["inputs.npz", "state_dict.npz", "grad_output.npy"] + [f"{k}.npy" for k in seconds] + ["case.json"]
    refuse_overwrite([out_dir / n for n in names], force)
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
    for key in seconds:
        p = out_dir / f"{key}.npy"
        np.save(p, case.arrays[key], allow_pickle=False)
        written.append(p)
    p = out_dir / "case.json"
    info = {"case": case_id, **{k: v for k, v in case.meta.items() if k != "sha256"}}
    p.write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    written.append(p)
    return written
