"""Adapters between npattn's (PyTorch's) layouts and other frameworks', in pure NumPy.

npattn stores every array the way PyTorch does: images NCHW, convolution weights OIHW,
``Linear`` weights (out, in), ``MultiheadAttention``'s packed projections, masks with
torch's meaning of True. Other frameworks keep the same numbers in other shapes. Each
pair of functions here maps one layout to the other and back; no function imports a
framework, so a user's own test can do::

    from npattn import golden, layouts
    case = golden.load("multihead_attention/batch_first_bool_masks_eval_f64")
    weights = layouts.torch_mha_to_keras(case.state_dict(), num_heads=2)
    ...  # set them on keras.layers.MultiHeadAttention, run it, take its gradients
    grads = layouts.keras_mha_to_torch(keras_grads, like=case.state_dict())
    report = golden.check(case.case_id, {"output": y, **{f"grad.param.{k}": v for k, v in grads.items()}})

Every adapter is a permutation or a reshape (or, for masks, a negation and a
broadcast), never arithmetic on the values, so float64 stays float64 and a round trip
gives back the very same array. A gradient has the shape of the tensor it belongs to,
so the adapter of a tensor is also the adapter of its gradient: the gradient of a
packed MindSpore offset unpacks with :func:`mindspore_unpack_offset_mask`, a Keras
kernel's gradient goes back with :func:`keras_mha_to_torch`.

The pairs (each documented with the exact index map):

========================================  ==========================================
images, outputs, gradients                :func:`nchw_to_nhwc`, :func:`nhwc_to_nchw`
convolution weights                       :func:`oihw_to_hwio`, :func:`hwio_to_oihw`
linear weights                            :func:`linear_to_dense`, :func:`dense_to_linear`
tokens                                    :func:`seq_first_to_batch_first`,
                                          :func:`batch_first_to_seq_first`
attention heads                           :func:`bhtd_to_bthd`, :func:`bthd_to_bhtd`
MultiheadAttention weights and gradients  :func:`torch_mha_to_keras`, :func:`keras_mha_to_torch`
masks                                     :func:`torch_mha_mask_to_keras`,
                                          :func:`keras_mask_to_torch_mha`,
                                          :func:`attend_to_masked`, :func:`masked_to_attend`,
                                          :func:`additive_to_attend`, :func:`attend_to_additive`,
                                          :func:`torch_mha_mask_to_bhls`,
                                          :func:`bhls_mask_to_torch_mha`
deformable offsets and mask               :func:`mindspore_pack_offset_mask`,
                                          :func:`mindspore_unpack_offset_mask`
========================================  ==========================================
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "nchw_to_nhwc", "nhwc_to_nchw", "oihw_to_hwio", "hwio_to_oihw", "linear_to_dense", "dense_to_linear",
    "seq_first_to_batch_first", "batch_first_to_seq_first", "bhtd_to_bthd", "bthd_to_bhtd",
    "torch_mha_to_keras", "keras_mha_to_torch", "KERAS_MHA_ORDER",
    "attend_to_masked", "masked_to_attend", "additive_to_attend", "attend_to_additive",
    "torch_mha_mask_to_keras", "keras_mask_to_torch_mha", "torch_mha_mask_to_bhls", "bhls_mask_to_torch_mha",
    "mindspore_pack_offset_mask", "mindspore_unpack_offset_mask",
]


def _array(op, name, a, ndim=None, what=""):
    if a is None or isinstance(a, (str, bytes, dict)):
        raise TypeError(f"{op}: {name} must be an array, got {type(a).__name__}")
    a = np.asarray(a)
    if ndim is not None and a.ndim != ndim:
        raise ValueError(f"{op}: {name} must be {ndim}-D {what}, got shape {tuple(a.shape)}")
    return a


# ---------------------------------------------------------------------------- images

def nchw_to_nhwc(a):
    """Channels first to channels last: ``out[n, h, w, c] = a[n, c, h, w]``.

    For inputs, outputs and their gradients alike; any rank >= 3 (N, C, *spatial) works
    (the channel axis moves to the end). Returns a C-contiguous copy.
    Inverse: :func:`nhwc_to_nchw`.
    """
    a = _array("nchw_to_nhwc", "a", a)
    if a.ndim < 3:
        raise ValueError(f"nchw_to_nhwc: a must have at least 3 dimensions (N, C, *spatial), got shape {a.shape}")
    return np.ascontiguousarray(np.moveaxis(a, 1, -1))


def nhwc_to_nchw(a):
    """Channels last to channels first: ``out[n, c, h, w] = a[n, h, w, c]``.

    Inverse of :func:`nchw_to_nhwc`; any rank >= 3 (N, *spatial, C).
    """
    a = _array("nhwc_to_nchw", "a", a)
    if a.ndim < 3:
        raise ValueError(f"nhwc_to_nchw: a must have at least 3 dimensions (N, *spatial, C), got shape {a.shape}")
    return np.ascontiguousarray(np.moveaxis(a, -1, 1))


def oihw_to_hwio(w):
    """Convolution weight (C_out, C_in / groups, kh, kw) to (kh, kw, C_in / groups, C_out):
    ``out[i, j, c, o] = w[o, c, i, j]`` (TensorFlow, Keras, JAX's ``lax.conv`` with
    ``("NHWC", "HWIO", "NHWC")``). The grouped case keeps torch's group order on both
    axes. The weight's gradient maps the same way. Inverse: :func:`hwio_to_oihw`.
    """
    w = _array("oihw_to_hwio", "w", w, 4, "(C_out, C_in / groups, kh, kw)")
    return np.ascontiguousarray(w.transpose(2, 3, 1, 0))


def hwio_to_oihw(w):
    """(kh, kw, C_in / groups, C_out) to (C_out, C_in / groups, kh, kw):
    ``out[o, c, i, j] = w[i, j, c, o]``. Inverse of :func:`oihw_to_hwio`."""
    w = _array("hwio_to_oihw", "w", w, 4, "(kh, kw, C_in / groups, C_out)")
    return np.ascontiguousarray(w.transpose(3, 2, 0, 1))


def linear_to_dense(w):
    """torch ``Linear.weight`` (out, in) to a Dense kernel (in, out): ``y = x W^T + b``
    becomes ``y = x K + b`` with ``K = W^T``. The bias is the same array. Inverse:
    :func:`dense_to_linear`."""
    w = _array("linear_to_dense", "w", w, 2, "(out_features, in_features)")
    return np.ascontiguousarray(w.T)


def dense_to_linear(k):
    """A Dense kernel (in, out) to torch ``Linear.weight`` (out, in); inverse of
    :func:`linear_to_dense`."""
    k = _array("dense_to_linear", "k", k, 2, "(in_features, out_features)")
    return np.ascontiguousarray(k.T)


# ---------------------------------------------------------------------------- tokens, heads

def seq_first_to_batch_first(a):
    """(T, B, ...) to (B, T, ...): torch ``MultiheadAttention(batch_first=False)`` (its
    default) to Keras's and JAX's batch-major tokens. Inverse:
    :func:`batch_first_to_seq_first`."""
    a = _array("seq_first_to_batch_first", "a", a)
    if a.ndim < 2:
        raise ValueError(f"seq_first_to_batch_first: a must have at least 2 dimensions (T, B, ...), got shape {a.shape}")
    return np.ascontiguousarray(np.swapaxes(a, 0, 1))


def batch_first_to_seq_first(a):
    """(B, T, ...) to (T, B, ...); inverse of :func:`seq_first_to_batch_first`."""
    a = _array("batch_first_to_seq_first", "a", a)
    if a.ndim < 2:
        raise ValueError(f"batch_first_to_seq_first: a must have at least 2 dimensions (B, T, ...), got shape {a.shape}")
    return np.ascontiguousarray(np.swapaxes(a, 0, 1))


def bhtd_to_bthd(a):
    """Attention heads (B, H, T, D) (torch's ``scaled_dot_product_attention``, npattn's)
    to (B, T, H, D) (``jax.nn.dot_product_attention``, flash-attn, Paddle):
    ``out[b, t, h, d] = a[b, h, t, d]``. Inverse: :func:`bthd_to_bhtd`."""
    a = _array("bhtd_to_bthd", "a", a, 4, "(B, H, T, D)")
    return np.ascontiguousarray(a.transpose(0, 2, 1, 3))


def bthd_to_bhtd(a):
    """(B, T, H, D) to (B, H, T, D); inverse of :func:`bhtd_to_bthd`."""
    a = _array("bthd_to_bhtd", "a", a, 4, "(B, T, H, D)")
    return np.ascontiguousarray(a.transpose(0, 2, 1, 3))


# ---------------------------------------------------------------------------- MultiheadAttention

# keras.layers.MultiHeadAttention's weights in the order of ``layer.get_weights()`` /
# ``layer.set_weights()`` (with use_bias=False the biases are absent)
KERAS_MHA_ORDER = (
    "query.kernel", "query.bias", "key.kernel", "key.bias", "value.kernel", "value.bias",
    "attention_output.kernel", "attention_output.bias",
)


def _torch_projections(op, state):
    """(W_q, W_k, W_v), (b_q, b_k, b_v) or None, W_o, b_o or None from a torch state_dict."""
    if "in_proj_weight" in state:
        w = _array(op, "state['in_proj_weight']", state["in_proj_weight"], 2, "(3 E, E)")
        if w.shape[0] != 3 * w.shape[1]:
            raise ValueError(f"{op}: state['in_proj_weight'] must have shape (3 E, E), got {w.shape}")
        ws = tuple(np.split(w, 3))
    else:
        missing = [k for k in ("q_proj_weight", "k_proj_weight", "v_proj_weight") if k not in state]
        if missing:
            raise ValueError(f"{op}: state must hold 'in_proj_weight' or the three separate projections; missing {missing}")
        ws = tuple(_array(op, f"state[{k!r}]", state[k], 2, "(E, width)") for k in ("q_proj_weight", "k_proj_weight", "v_proj_weight"))
    e = ws[0].shape[0]
    if "out_proj.weight" not in state:
        raise ValueError(f"{op}: state lacks 'out_proj.weight'")
    w_o = _array(op, "state['out_proj.weight']", state["out_proj.weight"], 2, "(E, E)")
    has_in_bias, has_out_bias = "in_proj_bias" in state, "out_proj.bias" in state
    if has_in_bias != has_out_bias:
        raise ValueError(f"{op}: state has only one of 'in_proj_bias' and 'out_proj.bias'; torch (bias=True/False) has both or neither")
    bs = tuple(np.split(_array(op, "state['in_proj_bias']", state["in_proj_bias"], 1, "(3 E,)"), 3)) if has_in_bias else None
    b_o = _array(op, "state['out_proj.bias']", state["out_proj.bias"], 1, "(E,)") if has_out_bias else None
    if w_o.shape != (e, e):
        raise ValueError(f"{op}: state['out_proj.weight'] must have shape ({e}, {e}), got {w_o.shape}")
    return ws, bs, w_o, b_o


def torch_mha_to_keras(state, num_heads):
    """torch ``nn.MultiheadAttention`` state_dict (or its gradients, same keys) to the
    EinsumDense kernels and biases of ``keras.layers.MultiHeadAttention(num_heads,
    key_dim=E // num_heads)``.

    Parameters
    ----------
    state : mapping with ``in_proj_weight`` (3E, E) or ``q_proj_weight`` (E, E),
        ``k_proj_weight`` (E, kdim), ``v_proj_weight`` (E, vdim); ``out_proj.weight``
        (E, E); with bias, ``in_proj_bias`` (3E,) and ``out_proj.bias`` (E,)
    num_heads : int, dividing E

    Returns
    -------
    dict keyed by :data:`KERAS_MHA_ORDER` (without the biases when the state has none);
    ``[out[k] for k in KERAS_MHA_ORDER if k in out]`` is the list for ``set_weights``.

    Notes
    -----
    torch projects ``q = x W_q^T + b_q`` and splits head h as channels ``h D ... h D + D
    - 1``; Keras computes ``q[.., h, d] = sum_e x[.., e] K_q[e, h, d] + B_q[h, d]`` and
    after attention ``y[.., e] = sum_{h, d} o[.., h, d] K_o[h, d, e] + b_o[e]``. So::

        K_q[e, h, d] = W_q[h D + d, e]      (E, H, D)    likewise K_k (kdim, H, D), K_v (vdim, H, D)
        B_q[h, d]    = b_q[h D + d]         (H, D)
        K_o[h, d, e] = W_o[e, h D + d]      (H, D, E)
        b_o          = out_proj.bias        (E,)

    Both scale the query by 1 / sqrt(D). The map is linear in the weights, so gradients
    map the same way. Inverse: :func:`keras_mha_to_torch`.
    """
    op = "torch_mha_to_keras"
    ws, bs, w_o, b_o = _torch_projections(op, state)
    e = ws[0].shape[0]
    if not isinstance(num_heads, (int, np.integer)) or isinstance(num_heads, bool) or num_heads < 1 or e % num_heads:
        raise ValueError(f"{op}: num_heads must be a positive int dividing E = {e}, got {num_heads!r}")
    h, d = int(num_heads), e // int(num_heads)
    out = {}
    for name, w, i in zip(("query", "key", "value"), ws, range(3)):
        out[f"{name}.kernel"] = np.ascontiguousarray(w.T.reshape(w.shape[1], h, d))
        if bs is not None:
            out[f"{name}.bias"] = np.ascontiguousarray(bs[i].reshape(h, d))
    out["attention_output.kernel"] = np.ascontiguousarray(w_o.T.reshape(h, d, e))
    if b_o is not None:
        out["attention_output.bias"] = np.ascontiguousarray(b_o)
    return {k: out[k] for k in KERAS_MHA_ORDER if k in out}


def keras_mha_to_torch(weights, *, separate_proj=None):
    """The inverse of :func:`torch_mha_to_keras`: Keras MultiHeadAttention weights (or
    their gradients) keyed by :data:`KERAS_MHA_ORDER`, or a list in that order, to a
    torch ``MultiheadAttention`` state_dict::

        W_q[h D + d, e] = K_q[e, h, d]          in_proj_weight = [W_q; W_k; W_v]  (3E, E)
        b_q[h D + d]    = B_q[h, d]             in_proj_bias   = [b_q; b_k; b_v]  (3E,)
        W_o[e, h D + d] = K_o[h, d, e]          out_proj.weight (E, E), out_proj.bias (E,)

    ``separate_proj``: None (default) packs ``in_proj_weight`` when the key and value
    widths equal E, as torch does (``_qkv_same_embed_dim``), else gives ``q_proj_weight``,
    ``k_proj_weight``, ``v_proj_weight``; True or False forces one form (False needs
    kdim = vdim = E). Keras layers without biases (use_bias=False) give no bias keys, as
    torch's ``bias=False``.
    """
    op = "keras_mha_to_torch"
    if isinstance(weights, (list, tuple)):
        names = KERAS_MHA_ORDER if len(weights) == 8 else KERAS_MHA_ORDER[0::2]
        if len(weights) not in (4, 8):
            raise ValueError(f"{op}: a weight list must have 8 arrays (with biases) or 4 (without), got {len(weights)}")
        weights = dict(zip(names, weights))
    kernels = {}
    for name in ("query", "key", "value"):
        k = weights.get(f"{name}.kernel")
        if k is None:
            raise ValueError(f"{op}: weights lack '{name}.kernel'")
        kernels[name] = _array(op, f"weights['{name}.kernel']", k, 3, "(width, H, D)")
    k_o = _array(op, "weights['attention_output.kernel']", weights.get("attention_output.kernel"), 3, "(H, D, E)")
    h, d, e = k_o.shape
    for name, k in kernels.items():
        if k.shape[1:] != (h, d):
            raise ValueError(f"{op}: weights['{name}.kernel'] must have shape (width, {h}, {d}) like the output kernel (H, D, E) = {k_o.shape}; got {k.shape}")
    if h * d != e or kernels["query"].shape[0] != e:
        raise ValueError(
            f"{op}: torch's MultiheadAttention needs H * D = E = query width; got output kernel {k_o.shape} "
            f"and query kernel {kernels['query'].shape}"
        )
    ws = [np.ascontiguousarray(k.reshape(k.shape[0], h * d).T) for k in kernels.values()]  # (E, width)
    same = ws[1].shape[1] == e and ws[2].shape[1] == e
    separate = (not same) if separate_proj is None else bool(separate_proj)
    if not separate and not same:
        raise ValueError(f"{op}: separate_proj=False needs key and value widths equal to E = {e}, got {ws[1].shape[1]} and {ws[2].shape[1]}")
    state = {}
    if separate:
        state["q_proj_weight"], state["k_proj_weight"], state["v_proj_weight"] = ws
    else:
        state["in_proj_weight"] = np.concatenate(ws)
    bias_names = [f"{n}.bias" for n in ("query", "key", "value")] + ["attention_output.bias"]
    present = [n in weights and weights[n] is not None for n in bias_names]
    if any(present) and not all(present):
        raise ValueError(f"{op}: weights have some biases and not others ({[n for n, p in zip(bias_names, present) if p]}); torch has all or none")
    if all(present):
        state["in_proj_bias"] = np.concatenate([_array(op, f"weights['{n}']", weights[n], 2, "(H, D)").reshape(h * d) for n in bias_names[:3]])
        state["out_proj.bias"] = np.ascontiguousarray(_array(op, "weights['attention_output.bias']", weights["attention_output.bias"], 1, "(E,)"))
    state["out_proj.weight"] = np.ascontiguousarray(k_o.reshape(h * d, e).T)
    order = ["in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias"]
    return {k: state[k] for k in order if k in state}


# ---------------------------------------------------------------------------- masks

def attend_to_masked(mask):
    """A boolean mask with True = may attend (torch's ``scaled_dot_product_attention``,
    Keras, JAX) to True = masked out (torch's ``MultiheadAttention`` ``attn_mask`` and
    ``key_padding_mask``): logical not. Its own inverse (:func:`masked_to_attend`)."""
    mask = _array("attend_to_masked", "mask", mask)
    if mask.dtype != np.bool_:
        raise TypeError(f"attend_to_masked: mask must be boolean, got dtype {mask.dtype}")
    return ~mask


def masked_to_attend(mask):
    """True = masked out to True = may attend: logical not (see :func:`attend_to_masked`)."""
    mask = _array("masked_to_attend", "mask", mask)
    if mask.dtype != np.bool_:
        raise TypeError(f"masked_to_attend: mask must be boolean, got dtype {mask.dtype}")
    return ~mask


def attend_to_additive(mask, dtype=np.float64):
    """True = may attend to torch's additive float mask: 0 where True, -inf where False.
    Inverse: :func:`additive_to_attend`."""
    mask = _array("attend_to_additive", "mask", mask)
    if mask.dtype != np.bool_:
        raise TypeError(f"attend_to_additive: mask must be boolean, got dtype {mask.dtype}")
    return np.where(mask, 0.0, -np.inf).astype(dtype)


def additive_to_attend(mask):
    """An additive float mask made only of 0 (attend) and -inf (masked) to a boolean mask,
    True = may attend. A float mask with any other value carries weights that no boolean
    mask can say (Keras's ``attention_mask`` has no additive form): ValueError."""
    mask = _array("additive_to_attend", "mask", mask)
    if mask.dtype == np.bool_:
        raise TypeError("additive_to_attend: mask is already boolean; use masked_to_attend or take it as is")
    if not np.all((mask == 0) | (mask == -np.inf)):
        other = mask[(mask != 0) & (mask != -np.inf)]
        raise ValueError(
            f"additive_to_attend: only an additive mask of 0 and -inf has a boolean form; got {other.size} "
            f"other values (e.g. {other.flat[0]!r}): a framework without additive masks cannot run this case"
        )
    return mask == 0


def _as_attend(op, name, mask):
    """torch MultiheadAttention mask (bool True = masked, or additive 0/-inf) to True = attend."""
    mask = _array(op, name, mask)
    if mask.dtype == np.bool_:
        return ~mask
    try:
        return additive_to_attend(mask)
    except ValueError as exc:
        raise ValueError(f"{op}: {name}: {exc}") from None


def torch_mha_mask_to_keras(key_padding_mask=None, attn_mask=None, *, batch, num_heads, tgt_len, src_len):
    """torch ``MultiheadAttention`` masks to Keras's ``attention_mask`` (B, L, S), boolean,
    True = may attend.

    torch combines ``key_padding_mask`` (B, S) and ``attn_mask`` (L, S) or (B num_heads,
    L, S), each boolean with True = masked out, or additive floats. A query position may
    attend to key s exactly when neither mask excludes it::

        attend[b, l, s] = not kpm[b, s] and not attn_mask[l, s]      (or attn_mask[b H + h, l, s])

    Additive masks convert when they hold only 0 and -inf (:func:`additive_to_attend`).
    A 3-D ``attn_mask`` whose heads differ has no Keras form (Keras broadcasts one mask
    over the heads): ValueError. None for both gives None (no mask). Inverse, up to
    torch's choice of mask split: :func:`keras_mask_to_torch_mha`.
    """
    op = "torch_mha_mask_to_keras"
    if key_padding_mask is None and attn_mask is None:
        return None
    attend = np.ones((batch, tgt_len, src_len), dtype=bool)
    if key_padding_mask is not None:
        kpm = _as_attend(op, "key_padding_mask", key_padding_mask)
        if kpm.shape != (batch, src_len):
            raise ValueError(f"{op}: key_padding_mask must have shape ({batch}, {src_len}), got {kpm.shape}")
        attend &= kpm[:, None, :]
    if attn_mask is not None:
        am = _as_attend(op, "attn_mask", attn_mask)
        if am.shape == (tgt_len, src_len):
            attend &= am[None]
        elif am.shape == (batch * num_heads, tgt_len, src_len):
            per_head = am.reshape(batch, num_heads, tgt_len, src_len)
            if not np.all(per_head == per_head[:, :1]):
                raise ValueError(f"{op}: attn_mask differs between heads; Keras applies one mask to every head")
            attend &= per_head[:, 0]
        else:
            raise ValueError(
                f"{op}: attn_mask must have shape ({tgt_len}, {src_len}) or ({batch * num_heads}, {tgt_len}, {src_len}), got {am.shape}"
            )
    return attend


def keras_mask_to_torch_mha(attention_mask, num_heads):
    """Keras's ``attention_mask`` (B, L, S), True = may attend, to torch
    ``MultiheadAttention``'s ``attn_mask`` (B num_heads, L, S), True = masked out::

        attn_mask[b H + h, l, s] = not attention_mask[b, l, s]

    (torch has no per-batch 2-D mask besides ``key_padding_mask``, so the batch goes into
    the 3-D form, repeated for each head in torch's batch-major order). Inverse:
    :func:`torch_mha_mask_to_keras` with this as ``attn_mask``.
    """
    m = _array("keras_mask_to_torch_mha", "attention_mask", attention_mask, 3, "(B, L, S)")
    if m.dtype != np.bool_:
        raise TypeError(f"keras_mask_to_torch_mha: attention_mask must be boolean, got dtype {m.dtype}")
    b, l, s = m.shape
    return np.ascontiguousarray(np.broadcast_to(~m[:, None], (b, num_heads, l, s)).reshape(b * num_heads, l, s))


def torch_mha_mask_to_bhls(key_padding_mask=None, attn_mask=None, *, batch, num_heads, tgt_len, src_len):
    """torch ``MultiheadAttention``'s two masks as one (B, H, L, S) mask, the form of
    Paddle's ``MultiHeadAttention`` ``attn_mask`` and of the fused attention functions:

    - both boolean (True = masked out): boolean, True = may attend::

          attend[b, h, l, s] = not kpm[b, s] and not attn_mask[l, s]   (or attn_mask[b H + h, l, s])

    - either one floating: additive float, the sum of the two (a boolean part counts as
      -inf where True, 0 elsewhere), as torch adds them.

    ``attn_mask`` is (L, S) or (B H, L, S) in torch's batch-major head order; None for
    both gives None. Inverse: :func:`bhls_mask_to_torch_mha` (to the 3-D ``attn_mask``).
    """
    op = "torch_mha_mask_to_bhls"
    if key_padding_mask is None and attn_mask is None:
        return None
    shape = (batch, num_heads, tgt_len, src_len)
    parts = []
    if key_padding_mask is not None:
        kpm = _array(op, "key_padding_mask", key_padding_mask)
        if kpm.shape != (batch, src_len):
            raise ValueError(f"{op}: key_padding_mask must have shape ({batch}, {src_len}), got {kpm.shape}")
        parts.append(kpm[:, None, None, :])
    if attn_mask is not None:
        am = _array(op, "attn_mask", attn_mask)
        if am.shape == (tgt_len, src_len):
            parts.append(am[None, None])
        elif am.shape == (batch * num_heads, tgt_len, src_len):
            parts.append(am.reshape(shape))
        else:
            raise ValueError(
                f"{op}: attn_mask must have shape ({tgt_len}, {src_len}) or ({batch * num_heads}, {tgt_len}, {src_len}), got {am.shape}"
            )
    if all(p.dtype == np.bool_ for p in parts):
        attend = np.ones(shape, dtype=bool)
        for p in parts:
            attend &= ~p
        return attend
    dtype = np.result_type(*(p.dtype for p in parts if p.dtype != np.bool_))
    added = np.zeros(shape, dtype=dtype)
    for p in parts:
        added = added + (np.where(p, -np.inf, 0.0).astype(dtype) if p.dtype == np.bool_ else p)
    return added


def bhls_mask_to_torch_mha(mask):
    """A (B, H, L, S) mask (boolean True = may attend, or additive float) to torch
    ``MultiheadAttention``'s 3-D ``attn_mask`` (B H, L, S): a boolean mask is negated
    (torch's True = masked out), a float one kept::

        attn_mask[b H + h, l, s] = not mask[b, h, l, s]      (boolean)
        attn_mask[b H + h, l, s] = mask[b, h, l, s]          (float)

    Inverse of :func:`torch_mha_mask_to_bhls` given this as ``attn_mask``."""
    m = _array("bhls_mask_to_torch_mha", "mask", mask, 4, "(B, H, L, S)")
    b, h, l, s = m.shape
    return np.ascontiguousarray((~m if m.dtype == np.bool_ else m).reshape(b * h, l, s))


# ---------------------------------------------------------------------------- deformable offsets

def _offset_geometry(op, offset, mask, taps):
    offset = _array(op, "offset", offset, 4, "(N, 2 * offset_groups * kh * kw, out_h, out_w)")
    if not isinstance(taps, (int, np.integer)) or isinstance(taps, bool) or taps < 1:
        raise ValueError(f"{op}: taps must be a positive int (kh * kw), got {taps!r}")
    if offset.shape[1] % (2 * taps):
        raise ValueError(f"{op}: offset must have a multiple of 2 * taps = {2 * taps} channels, got shape {offset.shape}")
    gk = offset.shape[1] // 2
    if mask is not None:
        mask = _array(op, "mask", mask, 4, "(N, offset_groups * kh * kw, out_h, out_w)")
        expected = (offset.shape[0], gk) + offset.shape[2:]
        if mask.shape != expected:
            raise ValueError(f"{op}: mask must have shape {expected} to go with offset {offset.shape}, got {mask.shape}")
    return offset, mask, gk


def mindspore_pack_offset_mask(offset, mask=None, *, taps):
    """torchvision's ``offset`` and ``mask`` to MindSpore's one packed ``offsets`` tensor
    (``mindspore.ops.deformable_conv2d``, which is always modulated).

    torchvision: offset (N, 2 G K, oh, ow) with channel ``2 (g K + k)`` = dy and ``2 (g K
    + k) + 1`` = dx, mask (N, G K, oh, ow) with channel ``g K + k`` (K = kh kw taps, G
    offset groups). MindSpore: (N, 3 G K, oh, ow), three blocks, all x, then all y, then
    all masks, each group-major::

        packed[:, g K + k]          = offset[:, 2 (g K + k) + 1]     dx
        packed[:, G K + g K + k]    = offset[:, 2 (g K + k)]         dy
        packed[:, 2 G K + g K + k]  = mask[:, g K + k]

    ``mask=None`` (DCNv1) packs ones, which is the unmodulated convolution. ``taps`` is
    kh * kw (the checks need it). The gradient of ``packed`` unpacks to the offset's and
    the mask's with :func:`mindspore_unpack_offset_mask` (a permutation).
    """
    op = "mindspore_pack_offset_mask"
    offset, mask, gk = _offset_geometry(op, offset, mask, taps)
    pairs = offset.reshape(offset.shape[0], gk, 2, *offset.shape[2:])
    if mask is None:
        mask = np.ones((offset.shape[0], gk) + offset.shape[2:], dtype=offset.dtype)
    return np.ascontiguousarray(np.concatenate([pairs[:, :, 1], pairs[:, :, 0], mask], axis=1))


def mindspore_unpack_offset_mask(packed, *, taps):
    """MindSpore's packed ``offsets`` (N, 3 G K, oh, ow) (or its gradient) to torchvision's
    ``(offset, mask)``, (N, 2 G K, oh, ow) and (N, G K, oh, ow); inverse of
    :func:`mindspore_pack_offset_mask` (see there for the index map)."""
    op = "mindspore_unpack_offset_mask"
    packed = _array(op, "packed", packed, 4, "(N, 3 * offset_groups * kh * kw, out_h, out_w)")
    if not isinstance(taps, (int, np.integer)) or isinstance(taps, bool) or taps < 1:
        raise ValueError(f"{op}: taps must be a positive int (kh * kw), got {taps!r}")
    if packed.shape[1] % (3 * taps):
        raise ValueError(f"{op}: packed must have a multiple of 3 * taps = {3 * taps} channels, got shape {packed.shape}")
    gk = packed.shape[1] // 3
    dx, dy, mask = packed[:, :gk], packed[:, gk : 2 * gk], packed[:, 2 * gk :]
    offset = np.stack([dy, dx], axis=2).reshape(packed.shape[0], 2 * gk, *packed.shape[2:])
    return np.ascontiguousarray(offset), np.ascontiguousarray(mask)
