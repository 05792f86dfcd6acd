"""Finite-difference checking of hand-derived backward passes.

The analytic vector-Jacobian product returned by a backward is compared with central
differences of the scalar ``L(a) = sum(forward(a) * grad_output)``, in float64::

    dL/da[i] ~ (L(a + eps e_i) - L(a - eps e_i)) / (2 eps)        (full check, small arrays)
    <dL/da, v> ~ (L(a + eps v) - L(a - eps v)) / (2 eps)         (random unit directions v,
                                                                  for large arrays, as JAX's
                                                                  check_grads / PyTorch's
                                                                  fast gradcheck)

Besides the Jacobian it checks what PyTorch's gradcheck checks: gradient shapes and dtypes
equal their inputs', a zero upstream gradient gives zero gradients, backward run twice on
the same cache gives identical results, and neither forward nor backward modifies its
arguments.

Use it on your own ops::

    from npattn.gradcheck import gradcheck
    report = gradcheck(conv2d_forward, conv2d_backward, {"x": x, "weight": w, "bias": b})
    print(report)

and on blocks with :func:`gradcheck_block`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["GradcheckError", "GradcheckReport", "TensorReport", "gradcheck", "gradcheck_block"]


class GradcheckError(AssertionError):
    """Raised when a gradient check fails; the message names tensor, index and values."""


@dataclass
class TensorReport:
    name: str
    shape: tuple
    method: str  # "full" or "projection"
    max_abs_err: float  # max |numerical - analytic|
    rel_err: float  # max |numerical - analytic| / max |numerical| (normwise); nan for a zero gradient
    worst_index: tuple  # element index (full) or projection number
    numerical: float  # at the worst index
    analytic: float  # at the worst index
    passed: bool
    scale: float = 0.0  # max |numerical|


@dataclass
class GradcheckReport:
    tensors: list = field(default_factory=list)  # TensorReport per checked tensor
    problems: list = field(default_factory=list)  # messages from the structural checks

    @property
    def ok(self) -> bool:
        return not self.problems and all(t.passed for t in self.tensors)

    @property
    def max_rel_err(self) -> float:
        """Worst normwise relative error over the tensors whose gradient is not zero."""
        return max((t.rel_err for t in self.tensors if t.rel_err == t.rel_err), default=0.0)

    def __str__(self) -> str:
        lines = [f"{'tensor':<28} {'shape':<20} {'method':<10} {'max abs err':>12} {'rel err':>10}  ok"]
        for t in self.tensors:
            lines.append(
                f"{t.name:<28} {str(t.shape):<20} {t.method:<10} {t.max_abs_err:12.3e} {t.rel_err:10.3e}  "
                f"{'yes' if t.passed else 'NO'}"
            )
        lines += [f"problem: {p}" for p in self.problems]
        return "\n".join(lines)

    def failure_message(self) -> str:
        msgs = list(self.problems)
        for t in self.tensors:
            if not t.passed:
                where = f"index {t.worst_index}" if t.method == "full" else f"random direction #{t.worst_index}"
                msgs.append(
                    f"gradient of '{t.name}' is wrong at {where}: numerical {t.numerical:.10g}, "
                    f"analytic {t.analytic:.10g} (abs err {t.max_abs_err:.3e}, rel err {t.rel_err:.3e})"
                )
        return "; ".join(msgs)


def _as_float64(a):
    if isinstance(a, np.ndarray) and a.dtype.kind == "f":
        return np.array(a, dtype=np.float64, copy=True)
    return a


def gradcheck(
    forward,
    backward,
    inputs: dict,
    *,
    wrt=None,
    grad_output=None,
    eps: float = 1e-6,
    atol: float = 1e-5,
    rtol: float = 1e-3,
    max_full_size: int = 4096,
    n_projections: int = 6,
    seed: int = 0,
    raise_on_failure: bool = True,
    structural: bool = True,
) -> GradcheckReport:
    """Check ``backward`` against central differences of ``forward``.

    Parameters
    ----------
    forward : callable ``forward(**inputs) -> (out, cache)``
    backward : callable ``backward(grad_output, cache) -> dict`` keyed like ``inputs``
    inputs : dict name -> value. Floating arrays are copied to float64; other values
        (ints, tuples, None, ...) are passed through unchanged.
    wrt : names to check (default: every floating ndarray in ``inputs``)
    grad_output : upstream gradient (default: standard normal from ``seed``)
    eps, atol, rtol : step and tolerances; an element passes when
        ``|numerical - analytic| <= atol + rtol * |numerical|`` (PyTorch gradcheck's rule
        and defaults)
    max_full_size : arrays with more elements get ``n_projections`` random directions
    raise_on_failure : raise :class:`GradcheckError` (else only report)
    structural : also run the checks beyond the Jacobian (zero upstream, backward twice,
        no mutation of arguments); turn off only when ``backward`` returns precomputed
        gradients (as the golden spot check does)

    Returns
    -------
    GradcheckReport
    """
    # a stream of its own, so grad_output never equals an input drawn from the same seed
    rng = np.random.default_rng([seed, 0x6772616463])
    inputs = {k: _as_float64(v) for k, v in inputs.items()}
    if wrt is None:
        wrt = [k for k, v in inputs.items() if isinstance(v, np.ndarray) and v.dtype.kind == "f"]
    for name in wrt:
        if name not in inputs:
            raise ValueError(f"gradcheck: wrt names '{name}', which is not in inputs ({sorted(inputs)})")
    originals = {k: v.copy() for k, v in inputs.items() if isinstance(v, np.ndarray)}
    report = GradcheckReport()

    out, cache = forward(**inputs)
    out = np.asarray(out)
    for k, v in originals.items():
        if structural and not np.array_equal(inputs[k], v, equal_nan=True):
            report.problems.append(f"forward modified its argument '{k}'")
    if grad_output is None:
        grad_output = rng.standard_normal(out.shape)
    grad_output = np.asarray(grad_output, dtype=np.float64)
    if grad_output.shape != out.shape:
        raise ValueError(f"gradcheck: grad_output must have the output's shape {out.shape}, got {grad_output.shape}")
    dy_copy = grad_output.copy()

    grads = backward(grad_output, cache)
    if not np.array_equal(grad_output, dy_copy):
        report.problems.append("backward modified grad_output")
    if structural:
        grads_again = backward(grad_output.copy(), cache)
        zero_grads = backward(np.zeros_like(grad_output), cache)
    for name in wrt:
        a = inputs[name]
        g = grads.get(name)
        if g is None:
            report.problems.append(f"backward returned no gradient for '{name}'")
            continue
        g = np.asarray(g)
        if g.shape != a.shape:
            report.problems.append(f"gradient of '{name}' has shape {g.shape}, expected {a.shape}")
            continue
        if g.dtype != a.dtype:
            report.problems.append(f"gradient of '{name}' has dtype {g.dtype}, expected {a.dtype}")
        if not structural:
            continue
        if not np.array_equal(g, np.asarray(grads_again.get(name)), equal_nan=True):
            report.problems.append(f"backward run twice gives different gradients for '{name}'")
        z = zero_grads.get(name)
        if z is None or np.any(np.asarray(z) != 0):
            report.problems.append(f"a zero grad_output gives a nonzero gradient for '{name}'")

    def loss(name, value):
        args = dict(inputs)
        args[name] = value
        o, _ = forward(**args)
        return float(np.sum(np.asarray(o, dtype=np.float64) * grad_output))

    for name in wrt:
        a = inputs[name]
        g = grads.get(name)
        if g is None or np.shape(g) != a.shape:
            continue
        g = np.asarray(g, dtype=np.float64)
        if a.size <= max_full_size:
            method = "full"
            numerical = np.empty(a.size)
            flat = a.reshape(-1)
            for i in range(a.size):
                plus = flat.copy()
                plus[i] += eps
                minus = flat.copy()
                minus[i] -= eps
                numerical[i] = (loss(name, plus.reshape(a.shape)) - loss(name, minus.reshape(a.shape))) / (2 * eps)
            analytic = g.reshape(-1)
        else:
            method = "projection"
            numerical = np.empty(n_projections)
            analytic = np.empty(n_projections)
            for p in range(n_projections):
                v = rng.standard_normal(a.shape)
                v /= np.linalg.norm(v)
                numerical[p] = (loss(name, a + eps * v) - loss(name, a - eps * v)) / (2 * eps)
                analytic[p] = float(np.sum(g * v))
        err = np.abs(numerical - analytic)
        bad = err > atol + rtol * np.abs(numerical)
        worst = int(np.argmax(err)) if err.size else 0
        scale = float(np.max(np.abs(numerical))) if numerical.size else 0.0
        max_err = float(err[worst]) if err.size else 0.0
        index = np.unravel_index(worst, a.shape) if method == "full" and a.size else (worst,)
        report.tensors.append(
            TensorReport(
                name=name,
                shape=tuple(a.shape),
                method=method,
                max_abs_err=max_err,
                # a gradient that is zero (below atol everywhere) has no relative error:
                # it is judged by its absolute error alone
                rel_err=max_err / scale if scale > atol else float("nan"),
                worst_index=tuple(int(i) for i in index),
                numerical=float(numerical[worst]) if err.size else 0.0,
                analytic=float(analytic[worst]) if err.size else 0.0,
                # a NaN or infinite derivative on either side is a failure (NaN compares
                # False with every bound, so it must be caught here)
                passed=not bool(np.any(bad)) and bool(np.all(np.isfinite(analytic))) and bool(np.all(np.isfinite(numerical))),
                scale=scale,
            )
        )
    if raise_on_failure and not report.ok:
        raise GradcheckError(report.failure_message())
    return report


def gradcheck_block(block, inputs, *, training=False, wrt=None, **kwargs) -> GradcheckReport:
    """Gradient check of a block's ``forward(*inputs, training=)`` / ``backward``.

    Checks every input (named ``input.0``, ``input.1``, ...) and every trainable
    parameter (named ``param.<state_dict key>``). The block must hold float64 arrays
    (``block.to(np.float64)``); its state (running statistics included) is restored after
    every forward, so the check itself does not drift the buffers. Keyword arguments go
    to :func:`gradcheck`.
    """
    if np.dtype(block.dtype) != np.float64:
        raise TypeError(f"gradcheck_block: the block must hold float64 arrays, got {block.dtype}; call block.to(np.float64)")
    inputs = tuple(inputs)
    saved = block.state_dict()
    names_in = [f"input.{i}" for i in range(len(inputs))]
    names_p = [f"param.{k}" for k in block.parameter_names()]

    def forward(**arrays):
        state = dict(saved)
        state.update({k[len("param.") :]: v for k, v in arrays.items() if k.startswith("param.")})
        block.load_state_dict(state)
        try:
            return block.forward(*(arrays[n] for n in names_in), training=training)
        finally:
            block.load_state_dict(saved)

    def backward(dy, cache):
        input_grads, param_grads = block.backward(dy, cache)
        grads = {n: g for n, g in zip(names_in, input_grads)}
        grads.update({f"param.{k}": v for k, v in param_grads.items()})
        return grads

    arrays = {n: x for n, x in zip(names_in, inputs)}
    arrays.update({n: saved[n[len("param.") :]] for n in names_p})
    return gradcheck(forward, backward, arrays, wrt=wrt, **kwargs)
