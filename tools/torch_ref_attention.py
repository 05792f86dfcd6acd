"""The reference modules of npattn's self-attention blocks, built from an npattn block
with its state_dict loaded: timm's ``NonLocalAttn`` and vision-transformer ``Attention``
(timm 1.0.31, with the block's attn_head_dim, dim_out, proj_bias, qk_norm, scale_norm,
gated, and timm's ``LayerNorm`` with the block's norm_eps as norm_layer) and
``torch.nn.MultiheadAttention``. Nothing is transcribed: these are the libraries' own
modules.

``MultiheadAttentionOutput`` is ``torch.nn.MultiheadAttention`` whose forward takes the
masks positionally (npattn's argument order) and returns only the output (the golden and
benchmark tooling differentiate one tensor); ``need_weights`` stays True (torch's
default), which selects the path that averages the weights and gives NaN for a fully
masked query.

``make_torch_block(np_block)`` raises ``TypeError`` for a block it does not know, as
``torch_ref_blocks.make_torch_block`` does.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

__all__ = ["MultiheadAttentionOutput", "make_torch_block", "torch_config"]


class MultiheadAttentionOutput(nn.MultiheadAttention):
    def forward(self, query, key, value, key_padding_mask=None, attn_mask=None):
        return super().forward(query, key, value, key_padding_mask=key_padding_mask, attn_mask=attn_mask)[0]


def _timm_layers():
    import timm.layers
    from timm.layers.non_local_attn import NonLocalAttn

    return NonLocalAttn, timm.layers.Attention


def torch_config(np_block):
    """(module class, constructor arguments) matching an npattn block."""
    name = type(np_block).__name__
    if name == "NonLocalAttn":
        b = np_block
        if b.mode != "embedded_gaussian" or b.sub_sample or not b.norm or b.scale != (
                b.in_channels ** -0.5 if b.use_scale else 1.0):
            raise TypeError("make_torch_block: timm's NonLocalAttn has no mode, sub_sample, norm or scale option; "
                            "the official variants are in tools/torch_ref_official_b.py")
        return _timm_layers()[0], dict(in_channels=b.in_channels, use_scale=b.use_scale, rd_channels=b.rd_channels)
    if name == "ViTAttention":
        b = np_block
        cfg = dict(dim=b.dim, num_heads=b.num_heads, qkv_bias=b.qkv_bias, attn_head_dim=b.head_dim, dim_out=b.dim_out,
                   proj_bias=b.proj_bias, qk_norm=b.qk_norm, scale_norm=b.scale_norm, gated=b.gated)
        if b.qk_norm or b.scale_norm:  # timm's LayerNorm with the block's eps (VisionTransformer's norm_layer)
            import functools

            from timm.layers import LayerNorm

            cfg["norm_layer"] = functools.partial(LayerNorm, eps=b.norm_eps)
        return _timm_layers()[1], cfg
    if name == "MultiheadAttention":
        b = np_block
        return MultiheadAttentionOutput, dict(
            embed_dim=b.embed_dim, num_heads=b.num_heads, dropout=0.0, bias=b.bias,
            kdim=b.kdim, vdim=b.vdim, batch_first=b.batch_first,
        )
    raise TypeError(f"make_torch_block: no reference module for {name}")


def describe(np_block):
    """The reference's name and library version, for the golden manifest."""
    name = type(np_block).__name__
    if name == "MultiheadAttention":
        return "torch.nn.MultiheadAttention (need_weights=True path)"
    import timm

    where = "timm.layers.non_local_attn.NonLocalAttn" if name == "NonLocalAttn" else "timm vision_transformer Attention"
    return f"{where} (timm {timm.__version__})"


def make_torch_block(np_block, dtype=torch.float64):
    """The reference module for ``np_block`` in ``dtype``, npattn's arrays loaded, eval mode."""
    cls, cfg = torch_config(np_block)
    module = cls(**cfg).to(dtype)
    from torch_ref_blocks import set_batch_norm

    set_batch_norm(module, np_block)  # NonLocalAttn's bn_momentum / bn_eps
    module.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in np_block.state_dict().items()}, strict=True)
    return module.eval()
