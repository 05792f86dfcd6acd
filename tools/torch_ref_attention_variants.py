"""PyTorch references for the attention variants, differentiated by torch's autograd:

- ``torch_sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` itself where it has
  the feature (``is_causal`` for the top-left diagonal, ``causal_lower_right`` for the
  bottom-right one, ``enable_gqa``, ``scale``, boolean and float masks);
- ``attention_ref``: a transcription of the masking pipeline in torch operations (the
  way flash-attn's tests write ``attention_ref``) for what torch's function lacks:
  windows, ALiBi, softcap, given dropout masks, the log-sum-exp; ``varlen_ref`` applies it
  to each sequence of a packed batch;
- ``rotary_ref``: rotate-half as Hugging Face's ``apply_rotary_pos_emb`` computes it
  (``x cos + rotate_half(x) sin``), interleaved as Meta's Llama does (complex
  multiplication with ``torch.polar``).

Everything runs in the dtype of its tensors (float64 for the cross-checks).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as TF

__all__ = ["attention_ref", "torch_sdpa", "torch_sdpa_supports", "varlen_ref", "rotary_ref"]


def torch_sdpa_supports(cfg: dict, inputs: dict) -> bool:
    """Whether ``torch.nn.functional.scaled_dot_product_attention`` computes this case
    (the keywords it has; bottom-right causal through ``causal_lower_right``, which it
    does not combine with another mask)."""
    if any(cfg.get(n) is not None for n in ("window", "softcap")) or cfg.get("dropout_p", 0.0):
        return False
    if any(inputs.get(n) is not None for n in ("alibi_slopes", "dropout_mask")):
        return False
    if cfg.get("is_causal") and cfg.get("alignment", "top_left") == "bottom_right":
        return inputs.get("attn_mask") is None
    if cfg.get("is_causal") and inputs.get("attn_mask") is not None:
        return False  # torch refuses attn_mask together with is_causal
    return True


def torch_sdpa(q, k, v, attn_mask=None, scale=None, *, is_causal=False, alignment="top_left", enable_gqa=False):
    """torch's own function, with the bottom-right diagonal through ``causal_lower_right``."""
    if is_causal and alignment == "bottom_right":
        import warnings

        from torch.nn.attention.bias import causal_lower_right

        with warnings.catch_warnings():  # "will produce NaNs ... when seq_len_q > seq_len_kv": on the CPU it gives 0
            warnings.filterwarnings("ignore", "Lower right causal bias")
            bias = causal_lower_right(q.shape[-2], k.shape[-2])
        return TF.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale, enable_gqa=enable_gqa)
    return TF.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale,
                                           enable_gqa=enable_gqa)


def attention_ref(q, k, v, attn_mask=None, scale=None, *, is_causal=False, alignment="top_left", window=None,
                  alibi_slopes=None, softcap=None, enable_gqa=False, dropout_mask=None, dropout_p=0.0):
    """(out, lse) in torch operations: scores, softcap, float mask, ALiBi, boolean masks
    (-inf), softmax, dropout. A query with no key gets lse = -inf and output 0."""
    L, S = q.shape[-2], k.shape[-2]
    if enable_gqa:
        rep = q.shape[-3] // k.shape[-3]
        k = k.repeat_interleave(rep, dim=-3)
        v = v.repeat_interleave(rep, dim=-3)
    c = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = c * (q @ k.transpose(-1, -2))
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    if attn_mask is not None and attn_mask.dtype != torch.bool:
        s = s + attn_mask
    row = torch.arange(L).unsqueeze(1)
    col = torch.arange(S).unsqueeze(0)
    diag = row + (S - L if alignment == "bottom_right" else 0)
    if alibi_slopes is not None:
        s = s - alibi_slopes.unsqueeze(-1).unsqueeze(-1) * (diag - col).abs().to(s.dtype)
    keep = torch.ones(L, S, dtype=torch.bool)
    if is_causal:
        keep = keep & (col <= diag)
    if window is not None:
        left, right = window
        if left >= 0:
            keep = keep & (col >= diag - left)
        if right >= 0:
            keep = keep & (col <= diag + right)
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        keep = keep & attn_mask
    s = s.masked_fill(~keep, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    safe = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)  # exp(-inf - 0) = 0 on an empty row
    p = torch.exp(s - safe.unsqueeze(-1))
    if dropout_mask is not None:
        p = p * dropout_mask / (1.0 - dropout_p)
    return p @ v, lse


def varlen_ref(q, k, v, cu_seqlens_q, cu_seqlens_k, scale=None, *, attn_mask=None, alibi_slopes=None,
               dropout_mask=None, **kw):
    """(out (total_q, Hq, Ev), lse (Hq, total_q)): :func:`attention_ref` on each sequence."""
    outs, lses = [], []
    hq = q.shape[1]

    def block(m, r, c):
        if m is None:
            return None
        return m.expand(hq, q.shape[0], k.shape[0])[:, r, c].unsqueeze(0)

    for b in range(len(cu_seqlens_q) - 1):
        r = slice(int(cu_seqlens_q[b]), int(cu_seqlens_q[b + 1]))
        c = slice(int(cu_seqlens_k[b]), int(cu_seqlens_k[b + 1]))
        slopes = None if alibi_slopes is None else (alibi_slopes if alibi_slopes.dim() == 1 else alibi_slopes[b])
        o, lse = attention_ref(q[r].transpose(0, 1).unsqueeze(0), k[c].transpose(0, 1).unsqueeze(0),
                               v[c].transpose(0, 1).unsqueeze(0), block(attn_mask, r, c), scale,
                               alibi_slopes=slopes, dropout_mask=block(dropout_mask, r, c), **kw)
        outs.append(o[0].transpose(0, 1))
        lses.append(lse[0])
    return torch.cat(outs, dim=0), torch.cat(lses, dim=1)


def rotary_ref(x, positions, base=10000.0, *, interleaved=False):
    d = x.shape[-1]
    inv_freq = 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    freqs = positions.to(torch.float64).unsqueeze(-1) * inv_freq  # (T, D/2)
    if interleaved:  # Meta's Llama: pairs (2i, 2i + 1) as complex numbers
        xc = torch.view_as_complex(x.reshape(x.shape[:-1] + (d // 2, 2)).contiguous())
        return torch.view_as_real(xc * torch.polar(torch.ones_like(freqs), freqs)).flatten(-2)
    emb = torch.cat((freqs, freqs), dim=-1)  # Hugging Face: pairs (i, i + D/2)
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return x * emb.cos() + torch.cat((-x2, x1), dim=-1) * emb.sin()
