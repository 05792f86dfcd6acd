"""Keras's MultiHeadAttention (JAX backend) in float64 has float32 precision on its
default path: jax.nn.dot_product_attention computes the logits in float32.

    KERAS_BACKEND=jax python tools/conformance/repro_keras_jax_float32_logits.py   (needs keras, jax)

float64 q, k, v; the reference is softmax(q k^T / sqrt(d)) v in float64 NumPy. The
error of jax.nn.dot_product_attention is of the order of float32's rounding (about
1e-7), that of the same formula in jnp about 1e-16. Keras's layer on its default path
goes through the former; asking for the attention scores
(return_attention_scores=True) takes its einsum path, which stays in float64.
"""

import pathlib
import sys

# this folder's runners (tvm.py, openvino.py, keras.py, jax.py) would shadow the packages
sys.path[:] = [p for p in sys.path if pathlib.Path(p or ".").resolve() != pathlib.Path(__file__).resolve().parent]

import os

os.environ.setdefault("KERAS_BACKEND", "jax")
import jax

jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402

rng = np.random.default_rng(0)
q, k, v = (rng.standard_normal((2, 5, 3, 8)) for _ in range(3))  # (B, T, N, H)
s = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(8)
p = np.exp(s - s.max(-1, keepdims=True))
ref = np.einsum("bnts,bsnh->btnh", p / p.sum(-1, keepdims=True), v)


def rel(a):
    return float(np.max(np.abs(np.asarray(a) - ref)) / np.max(np.abs(ref)))


fused = jax.nn.dot_product_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v))
plain = jnp.einsum("bnts,bsnh->btnh", jax.nn.softmax(jnp.einsum("btnh,bsnh->bnts", q, k) / jnp.sqrt(8.0), axis=-1), v)
print(f"jax {jax.__version__}, keras {keras.__version__}")
print(f"jax.nn.dot_product_attention  float64 in, {fused.dtype} out: rel err {rel(fused):.2e}")
print(f"softmax(q k^T / sqrt(d)) v in jnp, float64:          rel err {rel(plain):.2e}")

x = rng.standard_normal((2, 5, 24))
layer = keras.layers.MultiHeadAttention(3, 8, dtype="float64")
y_default = layer(x, x)
y_scores, _ = layer(x, x, return_attention_scores=True)
print(f"keras MultiHeadAttention float64: default path vs einsum path differ by "
      f"{float(np.max(np.abs(np.asarray(y_default) - np.asarray(y_scores))) / np.max(np.abs(np.asarray(y_scores)))):.2e}")

# a query row whose every key is masked: jax.nn.dot_product_attention gives the mean of v
allowed = np.ones((2, 3, 5, 5), dtype=bool)
allowed[:, :, 1, :] = False
row = np.asarray(jax.nn.dot_product_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), mask=allowed))[:, 1]
print(f"fully masked query row: max |output - mean of v| = {float(np.max(np.abs(row - v.mean(axis=1)))):.1e}")
