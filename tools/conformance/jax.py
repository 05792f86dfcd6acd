"""JAX on npattn's fixtures: scaled dot-product attention written in ``jax.numpy``,
``jax.nn.dot_product_attention``, and squeeze-and-excitation channels-last.

    python tools/conformance/jax.py [--out build/conformance]

Gradients are ``jax.vjp``'s; float64 cases run with ``jax_enable_x64``. Rows:

- ``jax``: SDPA as ``softmax(q k^T scale + mask) v`` in jnp (boolean mask True = attend,
  as the fixtures'; float masks added), and ``SEBlock`` / ``SEModule`` in NHWC: the
  input through ``npattn.layouts.nchw_to_nhwc``, the linear layers as Dense kernels
  (``linear_to_dense``), SEModule's 1x1 convolutions as ``lax.conv_general_dilated``
  with HWIO kernels (``oihw_to_hwio``), every result back through the inverse adapters.
- ``jax_dot_product_attention``: ``jax.nn.dot_product_attention`` on the SDPA cases, in
  its (B, T, N, H) layout (``layouts.bhtd_to_bthd``). It needs the value width equal to
  the query/key width (Ev == E); a case without that is not expressible.
"""

from __future__ import annotations

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import conformance_lib as C  # noqa: E402

C.drop_own_dir(__file__)

from npattn import layouts  # noqa: E402


def versions():
    import jax

    jax.config.update("jax_enable_x64", True)
    return {"jax": jax.__version__, "jaxlib": __import__("jaxlib").__version__}


def _vjp(f, primals, grad_output):
    import jax
    import jax.numpy as jnp
    import numpy as np

    primals = jax.tree_util.tree_map(jnp.asarray, primals)
    y, vjp = jax.vjp(f, *primals)
    return np.asarray(y), jax.tree_util.tree_map(np.asarray, vjp(jnp.asarray(grad_output)))


def sdpa_jnp(case):
    import jax
    import jax.numpy as jnp

    a, cfg = case.arrays, case.meta["config"]
    q, k, v, mask = a["input.q"], a["input.k"], a["input.v"], a.get("input.attn_mask")
    scale = cfg.get("scale", 1.0 / q.shape[-1] ** 0.5)

    def f(q, k, v):
        s = jnp.einsum("...le,...se->...ls", q, k) * scale
        if mask is not None:
            s = jnp.where(mask, s, -jnp.inf) if mask.dtype == bool else s + mask
        return jax.nn.softmax(s, axis=-1) @ v

    y, (dq, dk, dv) = _vjp(f, (q, k, v), a["grad_output"])
    return {"output": y, "grad.input.q": dq, "grad.input.k": dk, "grad.input.v": dv}


def sdpa_fused(case):
    import jax
    import numpy as np

    a, cfg = case.arrays, case.meta["config"]
    q, k, v, mask = a["input.q"], a["input.k"], a["input.v"], a.get("input.attn_mask")
    full = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])  # (B, H, L, S)
    kw = {"scale": cfg["scale"]} if "scale" in cfg else {}
    if mask is not None:
        m = np.broadcast_to(mask, full)
        kw["mask" if mask.dtype == bool else "bias"] = m

    def f(q, k, v):
        # the framework call, in its (B, T, N, H) layout
        return jax.nn.dot_product_attention(q, k, v, **kw)

    y, (dq, dk, dv) = _vjp(f, (layouts.bhtd_to_bthd(q), layouts.bhtd_to_bthd(k), layouts.bhtd_to_bthd(v)),
                           layouts.bhtd_to_bthd(a["grad_output"]))
    back = layouts.bthd_to_bhtd
    return {"output": back(y), "grad.input.q": back(dq), "grad.input.k": back(dk), "grad.input.v": back(dv)}


def se_nhwc(case):
    import jax
    import jax.numpy as jnp

    a, s = case.arrays, case.state_dict()
    x = layouts.nchw_to_nhwc(a["input.x"])
    conv = case.meta["block"] == "SEModule"
    names = ("fc1.", "fc2.") if conv else ("fc.0.", "fc.2.")
    # Dense kernels (C, D) / HWIO 1x1 kernels (1, 1, C, D)
    params = {n: (layouts.oihw_to_hwio(s[n + "weight"]) if conv else layouts.linear_to_dense(s[n + "weight"])) for n in names}
    biases = {n: s[n + "bias"] for n in names if n + "bias" in s}

    def layer(h, n, p, b):
        if conv:
            h = jax.lax.conv_general_dilated(h, p[n], (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        else:
            h = h @ p[n]
        return h + b[n] if n in b else h

    def f(x, p, b):
        pooled = x.mean(axis=(1, 2), keepdims=conv)  # (N, 1, 1, C) or (N, C)
        g = jax.nn.sigmoid(layer(jax.nn.relu(layer(pooled, names[0], p, b)), names[1], p, b))
        return x * (g if conv else g[:, None, None, :])

    y, (dx, dp, db) = _vjp(f, (x, params, biases), layouts.nchw_to_nhwc(a["grad_output"]))
    back = layouts.hwio_to_oihw if conv else layouts.dense_to_linear
    out = {"output": layouts.nhwc_to_nchw(y), "grad.input.x": layouts.nhwc_to_nchw(dx)}
    out |= {f"grad.param.{n}weight": back(dp[n]) for n in names}
    out |= {f"grad.param.{n}bias": db[n] for n in biases}
    return out


def cases(runner):
    import jax

    jax.config.update("jax_enable_x64", True)
    fused = C.Runner("jax_dot_product_attention", runner.versions, runner.out, runner.golden_dir)
    for case_id, case in runner.cases("scaled_dot_product_attention"):
        variant = C.sdpa_variant(case)
        if variant:
            why = f"uses {variant}: this runner composes only a mask and a scale"
            runner.skip(case_id, why, status="not run")
            fused.skip(case_id, why, status="not run")
            continue
        runner.run(case_id, lambda: sdpa_jnp(case), note="jnp expression")
        q, v = case.arrays["input.q"], case.arrays["input.v"]
        if q.ndim != 4:
            fused.skip(case_id, f"{q.ndim}-D inputs: jax.nn.dot_product_attention takes (B, T, N, H)")
        elif v.shape[-1] != q.shape[-1]:
            fused.skip(case_id, f"value width {v.shape[-1]} != query width {q.shape[-1]}: jax.nn.dot_product_attention needs Ev == E")
        else:
            fused.run(case_id, lambda: sdpa_fused(case))
    for case_id, case in runner.cases("se", "se_module"):
        cfg = case.meta.get("config") or {}
        options = {k: v for k, v in cfg.items() if (k, v) not in
                   (("act", "relu"), ("gate", "sigmoid"), ("add_maxpool", False), ("norm", False))
                   and k in ("act", "gate", "add_maxpool", "norm")}
        if options:
            runner.skip(case_id, f"uses {options}: this runner composes the ReLU/sigmoid SE only", status="not run")
            continue
        runner.run(case_id, lambda: se_nhwc(case), note="NHWC through npattn.layouts")
    if fused.finish():
        runner.crashed.append("jax_dot_product_attention")


if __name__ == "__main__":
    sys.exit(C.main("jax", versions, cases))
