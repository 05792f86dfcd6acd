"""Keras 3 (JAX backend): ``keras.layers.MultiHeadAttention`` on npattn's
MultiheadAttention fixtures.

    python tools/conformance/keras.py [--out build/conformance]

The torch state_dict goes to Keras's EinsumDense kernels and biases, and the kernels'
gradients come back, through ``npattn.layouts.torch_mha_to_keras`` /
``keras_mha_to_torch``; sequence-first cases are made batch-first
(``seq_first_to_batch_first``); torch's masks (True = masked, key_padding_mask and
attn_mask) become Keras's one ``attention_mask`` (B, L, S), True = attend
(``torch_mha_mask_to_keras``). Keras has no additive float mask, so cases with one are
not expressible. Keras calls (query, value, key). Gradients: ``layer.stateless_call``
under ``jax.vjp``. Float64 cases run with ``jax_enable_x64`` and a float64 layer.

Two rows: ``keras`` is the layer's default path, which goes through
``jax.nn.dot_product_attention`` (its logits are computed in float32, even for float64
inputs: tools/conformance/repro_keras_jax_float32_logits.py); ``keras_unfused`` asks for
the attention scores (``return_attention_scores=True``), which takes Keras's own einsum
path.
"""

from __future__ import annotations

import os
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import conformance_lib as C  # noqa: E402

C.drop_own_dir(__file__)
os.environ.setdefault("KERAS_BACKEND", "jax")

from npattn import layouts  # noqa: E402


def versions():
    import jax

    jax.config.update("jax_enable_x64", True)
    import keras

    return {"keras": keras.__version__, "jax": jax.__version__, "backend": keras.backend.backend()}


def mha(case, unfused):
    import jax
    import jax.numpy as jnp
    import keras
    import numpy as np

    cfg, a = case.meta["config"], case.arrays
    heads, e = cfg["num_heads"], cfg["embed_dim"]
    seq_first = not cfg.get("batch_first", False)
    to_b = layouts.seq_first_to_batch_first if seq_first else (lambda t: t)
    from_b = layouts.batch_first_to_seq_first if seq_first else (lambda t: t)
    q, k, v = (to_b(a[f"input.{n}"]) for n in ("query", "key", "value"))
    attend = layouts.torch_mha_mask_to_keras(
        a.get("input.key_padding_mask"), a.get("input.attn_mask"),
        batch=q.shape[0], num_heads=heads, tgt_len=q.shape[1], src_len=k.shape[1],
    )
    layer = keras.layers.MultiHeadAttention(heads, e // heads, use_bias=cfg.get("bias", True), dtype=str(q.dtype))
    layer.build(q.shape, v.shape, k.shape)
    weights = layouts.torch_mha_to_keras(case.state_dict(), heads)
    names = [".".join(var.path.split("/")[-2:]) for var in layer.trainable_variables]  # "query.kernel", ...
    trainable = [jnp.asarray(weights[n]) for n in names]

    def f(tv, q, k, v):
        # the framework call (Keras's order: query, value, key)
        out, _ = layer.stateless_call(tv, [], q, v, key=k, attention_mask=attend, return_attention_scores=unfused)
        return out[0] if unfused else out

    y, vjp = jax.vjp(f, trainable, jnp.asarray(q), jnp.asarray(k), jnp.asarray(v))
    d_tv, dq, dk, dv = vjp(jnp.asarray(to_b(a["grad_output"])))
    torch_grads = layouts.keras_mha_to_torch(dict(zip(names, (np.asarray(g) for g in d_tv))),
                                             separate_proj="in_proj_weight" not in case.state_dict())
    out = {"output": from_b(np.asarray(y))}
    out |= {f"grad.input.{n}": from_b(np.asarray(g)) for n, g in (("query", dq), ("key", dk), ("value", dv))}
    out |= {f"grad.param.{key}": g for key, g in torch_grads.items()}
    return out


def expressible(case):
    for name in ("key_padding_mask", "attn_mask"):
        m = case.arrays.get(f"input.{name}")
        if m is not None and m.dtype.kind == "f":
            try:
                layouts.additive_to_attend(m)
            except ValueError:
                return f"an additive float {name}: Keras's attention_mask is boolean only"
    return None


def cases(runner):
    unfused = C.Runner("keras_unfused", runner.versions, runner.out, runner.golden_dir)
    for case_id, case in runner.cases("multihead_attention"):
        why = expressible(case)
        for r, flag in ((runner, False), (unfused, True)):
            if why:
                r.skip(case_id, why)
            else:
                r.run(case_id, lambda: mha(case, flag),
                      note="return_attention_scores=True (Keras's einsum path)" if flag else "default path (dot_product_attention)")
    if unfused.finish():
        runner.crashed.append("keras_unfused")


if __name__ == "__main__":
    sys.exit(C.main("keras", versions, cases))
