"""Regenerate every golden fixture from fixed seeds (byte-identical on every run).

    python tools/make_golden.py [--out golden] [--only PREFIX ...]

For each case: build the block (or op) in float64 from its seed, give every parameter and
buffer a non-trivial value (BatchNorm statistics, GCT's gamma = 0 init, the zero-initialised
offset conv of ModulatedDeformConv2dPack would otherwise hide whole gradients), draw
inputs and the upstream gradient, run npattn forward and backward, run a finite-difference
spot check, and, when torch / torchvision are installed, run the project's PyTorch version
of the block on the same arrays and record the agreement. A case whose cross-check or
spot check fails is not written (the script exits non-zero).

The float32 twin of each case stores the float32-rounded inputs and parameters; its
expected arrays are computed in float64 from exactly those values, then rounded once.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

import npattn  # noqa: E402
from npattn import golden  # noqa: E402

# --------------------------------------------------------------------------- the cases
# (case id stem, block or op, kind, config, input shapes {name: shape}, modes, seed)

CASES = [
    ("se/nobias", "SEBlock", "block", {"channels": 16, "reduction": 4, "bias": False}, {"x": (2, 16, 5, 3)}, ["eval"], 101),
    ("se/bias", "SEBlock", "block", {"channels": 16, "reduction": 4, "bias": True}, {"x": (3, 16, 4, 6)}, ["eval"], 102),
    ("sk/paths2_groups2", "SKConv", "block", {"in_channels": 4, "out_channels": 8, "groups": 2, "ratio": 16, "paths": 2}, {"x": (3, 4, 6, 5)}, ["train", "eval"], 201),
    ("sk/paths3_groups4", "SKConv", "block", {"in_channels": 4, "out_channels": 8, "groups": 4, "ratio": 16, "paths": 3}, {"x": (3, 4, 7, 5)}, ["train", "eval"], 202),
    ("daf/default", "DAF", "block", {}, {"x": (2, 4, 5, 3), "residual": (2, 4, 5, 3)}, ["eval"], 301),
    ("aff/c8_r4", "AFF", "block", {"channels": 8, "r": 4}, {"x": (3, 8, 5, 4), "residual": (3, 8, 5, 4)}, ["train", "eval"], 302),
    ("iaff/shared_global_att", "iAFF", "block", {"channels": 8, "r": 4, "share_global_att": True}, {"x": (3, 8, 4, 5), "residual": (3, 8, 4, 5)}, ["train", "eval"], 303),
    ("iaff/paper_global_att2", "iAFF", "block", {"channels": 8, "r": 4, "share_global_att": False}, {"x": (3, 8, 4, 5), "residual": (3, 8, 4, 5)}, ["train", "eval"], 304),
    ("ms_cam/c8_r4", "MS_CAM", "block", {"channels": 8, "r": 4}, {"x": (3, 8, 6, 3)}, ["train", "eval"], 305),
    ("gct/l2", "GCT", "block", {"num_channels": 6, "mode": "l2"}, {"x": (2, 6, 5, 4)}, ["eval"], 401),
    ("gct/l1", "GCT", "block", {"num_channels": 6, "mode": "l1"}, {"x": (2, 6, 5, 4)}, ["eval"], 402),
    ("gct/l1_after_relu", "GCT", "block", {"num_channels": 6, "mode": "l1", "after_relu": True}, {"x": (3, 6, 4, 5)}, ["eval"], 403),
    ("conv_offset2d/filters3", "ConvOffset2D", "block", {"filters": 3}, {"x": (2, 3, 6, 5)}, ["eval"], 501),
    ("batch_map_offsets/b3", "batch_map_offsets", "function", {}, {"input": (3, 5, 4), "offsets": (3, 5, 4, 2)}, ["eval"], 502),
    ("deform_conv2d/v1_groups2_offgroups2", "deform_conv2d", "function",
     {"stride": (2, 1), "padding": (1, 0), "dilation": (2, 1), "border_grad": "torchvision", "groups": 2, "offset_groups": 2},
     {"input": (2, 4, 7, 6), "offset": (2, 2 * 2 * 3 * 2, 3, 5), "weight": (6, 2, 3, 2), "bias": (6,)}, ["eval"], 601),
    ("deform_conv2d/v2_groups2_offgroups2", "deform_conv2d", "function",
     {"stride": (2, 1), "padding": (1, 0), "dilation": (2, 1), "border_grad": "torchvision", "groups": 2, "offset_groups": 2},
     {"input": (2, 4, 7, 6), "offset": (2, 2 * 2 * 3 * 2, 3, 5), "weight": (6, 2, 3, 2), "bias": (6,), "mask": (2, 2 * 3 * 2, 3, 5)}, ["eval"], 602),
    ("deform_conv2d_block/k3_groups2", "DeformConv2d", "block",
     {"in_channels": 4, "out_channels": 6, "kernel_size": 3, "stride": 1, "padding": 1, "groups": 2, "offset_groups": 1, "border_grad": "torchvision"},
     {"x": (2, 4, 5, 6), "offset": (2, 18, 5, 6), "mask": (2, 9, 5, 6)}, ["eval"], 603),
    ("modulated_deform_conv2d_pack/k3_dg2", "ModulatedDeformConv2dPack", "block",
     {"in_channels": 4, "out_channels": 6, "kernel_size": 3, "stride": 1, "padding": 1, "groups": 1, "deform_groups": 2, "border_grad": "mmcv"},
     {"x": (2, 4, 5, 6)}, ["eval"], 604),
    # channel and spatial attention in timm's layout (cross-checked against timm's modules)
    ("se_module/default", "SEModule", "block", {"channels": 16}, {"x": (3, 16, 4, 5)}, ["eval"], 701),
    ("se_module/rd4_nobias", "SEModule", "block", {"channels": 16, "rd_channels": 4, "bias": False}, {"x": (1, 16, 5, 3)}, ["eval"], 702),
    ("se_module/ratio_divisor", "SEModule", "block", {"channels": 12, "rd_ratio": 0.25, "rd_divisor": 2}, {"x": (2, 12, 3, 4)}, ["eval"], 703),
    ("cbam/c16_r4_k7", "CBAM", "block", {"channels": 16, "rd_ratio": 0.25, "spatial_kernel_size": 7}, {"x": (3, 16, 5, 4)}, ["train", "eval"], 711),
    ("cbam/rd3_k3", "CBAM", "block", {"channels": 12, "rd_channels": 3, "spatial_kernel_size": 3}, {"x": (1, 12, 4, 6)}, ["train", "eval"], 712),
    ("cbam/divisor4_k5", "CBAM", "block", {"channels": 20, "rd_ratio": 0.25, "rd_divisor": 4, "spatial_kernel_size": 5}, {"x": (2, 20, 3, 5)}, ["train", "eval"], 713),
    ("eca/k3", "ECA", "block", {}, {"x": (3, 10, 4, 5)}, ["eval"], 721),
    ("eca/k5", "ECA", "block", {"kernel_size": 5}, {"x": (1, 7, 3, 2)}, ["eval"], 722),
    ("eca/adaptive_c256", "ECA", "block", {"channels": 256}, {"x": (2, 256, 2, 3)}, ["eval"], 723),
    ("eca/adaptive_c16_gamma1_beta2", "ECA", "block", {"channels": 16, "gamma": 1, "beta": 2}, {"x": (2, 16, 3, 3)}, ["eval"], 724),
    ("coord_attn/default", "CoordAttn", "block", {"channels": 16}, {"x": (3, 16, 5, 4)}, ["train", "eval"], 731),
    ("coord_attn/rd4_bias", "CoordAttn", "block", {"channels": 16, "rd_channels": 4, "bias": True}, {"x": (1, 16, 4, 6)}, ["train", "eval"], 732),
    ("coord_attn/ratio_divisor_factor", "CoordAttn", "block", {"channels": 24, "rd_ratio": 0.25, "rd_divisor": 2, "se_factor": 0.5, "bias": True}, {"x": (2, 24, 3, 5)}, ["train", "eval"], 733),
    ("global_context/attn_scale", "GlobalContext", "block", {"channels": 16, "rd_channels": 4}, {"x": (3, 16, 4, 5)}, ["eval"], 741),
    ("global_context/attn_add", "GlobalContext", "block", {"channels": 16, "fuse_add": True, "fuse_scale": False, "rd_ratio": 0.25}, {"x": (2, 16, 3, 4)}, ["eval"], 742),
    ("global_context/mean_add_scale", "GlobalContext", "block", {"channels": 16, "use_attn": False, "fuse_add": True, "rd_channels": 5}, {"x": (1, 16, 5, 3)}, ["eval"], 743),
    ("global_context/attn_add_scale_divisor", "GlobalContext", "block", {"channels": 12, "fuse_add": True, "init_last_zero": True, "rd_ratio": 0.5, "rd_divisor": 2}, {"x": (3, 12, 3, 3)}, ["eval"], 744),
    ("simam/default", "SimAM", "block", {}, {"x": (3, 8, 4, 5)}, ["eval"], 751),
    ("simam/lambda0.25", "SimAM", "block", {"e_lambda": 0.25}, {"x": (1, 5, 2, 7)}, ["eval"], 752),
]

# ---- the papers' official code (tools/torch_ref_official.py): npattn configured as each
# official module, cross-checked against its transcription ("official" in the manifest)
_JONGCHAN = {"mlp_bias": True, "spatial_order": "max_avg", "max_grad": "first", "bn_momentum": 0.01}
CASES += [
    ("cbam/jongchan_c32_r16", "CBAM", "block", dict(_JONGCHAN, channels=32, rd_channels=2), {"x": (3, 32, 7, 5)}, ["train", "eval"], 761),
    ("cbam/jongchan_c16_r4_all_pools", "CBAM", "block", dict(_JONGCHAN, channels=16, rd_channels=4, pool_types=["avg", "max", "lp", "lse"]),
     {"x": (2, 16, 5, 6)}, ["train", "eval"], 762),
    ("cbam/jongchan_c16_r8_no_spatial", "CBAM", "block", dict(_JONGCHAN, channels=16, rd_channels=2, no_spatial=True),
     {"x": (2, 16, 4, 3)}, ["eval"], 763),
    ("eca/bangguwu_k3", "ECA", "block", {"kernel_size": 3}, {"x": (3, 32, 7, 5)}, ["eval"], 771),
    ("eca/bangguwu_k5", "ECA", "block", {"kernel_size": 5}, {"x": (2, 24, 4, 3)}, ["eval"], 772),
    ("eca/bangguwu_ns_c32_k3", "ECA", "block", {"channels": 32, "kernel_size": 3, "shared": False}, {"x": (3, 32, 7, 5)}, ["eval"], 773),
    ("se/moskomule_c32_r16", "SEBlock", "block", {"channels": 32, "reduction": 16}, {"x": (3, 32, 7, 5)}, ["eval"], 781),
]
# timm's options (cross-checked against timm's own modules; no hard_sigmoid gate here: torch's
# CPU kernel differentiates it with a float32 1/6, see npattn.functional.hard_sigmoid_forward)
CASES += [
    ("se_module/silu_rd4", "SEModule", "block", {"channels": 16, "rd_channels": 4, "act": "silu"}, {"x": (3, 16, 4, 5)}, ["eval"], 791),
    ("se_module/maxpool_norm_gelu", "SEModule", "block", {"channels": 12, "rd_channels": 5, "add_maxpool": True, "norm": True, "act": "gelu"},
     {"x": (3, 12, 3, 4)}, ["train", "eval"], 792),
    ("eca/mlp_c16", "ECA", "block", {"channels": 16, "use_mlp": True}, {"x": (2, 16, 3, 5)}, ["eval"], 793),
    ("cbam/mlp_bias_rd4", "CBAM", "block", {"channels": 16, "rd_channels": 4, "mlp_bias": True}, {"x": (2, 16, 4, 5)}, ["train", "eval"], 794),
]
OFFICIAL = {
    "cbam/jongchan_c32_r16": "jongchan_cbam",
    "cbam/jongchan_c16_r4_all_pools": "jongchan_cbam",
    "cbam/jongchan_c16_r8_no_spatial": "jongchan_cbam",
    "eca/bangguwu_k3": "bangguwu_eca",
    "eca/bangguwu_k5": "bangguwu_eca",
    "eca/bangguwu_ns_c32_k3": "bangguwu_eca_ns",
    "se/moskomule_c32_r16": "moskomule_se",
}

# ---- the two border_grad conventions (torchvision / mmcv) and mmcv's DCNv1 layer ----------
_ZERO_OFFSET_SHAPES = {"input": (2, 4, 5, 6), "offset": (2, 2 * 2 * 9, 5, 8), "weight": (6, 2, 3, 3), "bias": (6,), "mask": (2, 2 * 9, 5, 8)}
_PACK = {"in_channels": 4, "out_channels": 6, "kernel_size": 3, "stride": 1, "padding": 1, "deform_groups": 2}
CASES += [
    ("deform_conv2d/zero_offsets_pad1_torchvision", "deform_conv2d", "function",
     {"padding": (1, 2), "border_grad": "torchvision", "groups": 2, "offset_groups": 2}, _ZERO_OFFSET_SHAPES, ["eval"], 605),
    ("deform_conv2d/zero_offsets_pad1_mmcv", "deform_conv2d", "function",
     {"padding": (1, 2), "border_grad": "mmcv", "groups": 2, "offset_groups": 2}, _ZERO_OFFSET_SHAPES, ["eval"], 605),
    ("modulated_deform_conv2d_pack/init_torchvision", "ModulatedDeformConv2dPack", "block",
     dict(_PACK, groups=1, border_grad="torchvision"), {"x": (2, 4, 5, 6)}, ["eval"], 606),
    ("modulated_deform_conv2d_pack/init_mmcv", "ModulatedDeformConv2dPack", "block",
     dict(_PACK, groups=1, border_grad="mmcv"), {"x": (2, 4, 5, 6)}, ["eval"], 606),
    ("deform_conv2d_pack/k3_groups2_dg2", "DeformConv2dPack", "block",
     dict(_PACK, groups=2, border_grad="mmcv"), {"x": (2, 4, 5, 6)}, ["eval"], 607),
    ("deform_conv2d_pack/init_torchvision", "DeformConv2dPack", "block",
     dict(_PACK, groups=2, border_grad="torchvision"), {"x": (2, 4, 5, 6)}, ["eval"], 608),
    ("deform_conv2d_pack/init_mmcv", "DeformConv2dPack", "block",
     dict(_PACK, groups=2, border_grad="mmcv"), {"x": (2, 4, 5, 6)}, ["eval"], 608),
]

# What the other frameworks can run (docs/conformance.md): one weight group and one offset
# group (Apache TVM asserts on more), DCNv1 without a bias (TVM's op has neither mask nor
# bias), DCNv2 with one group of each (MindSpore's packed offsets; every runner).
CASES += [
    ("deform_conv2d/v1_groups1_offgroups1_nobias", "deform_conv2d", "function",
     {"stride": (1, 2), "padding": (1, 1), "dilation": (1, 1), "border_grad": "torchvision", "groups": 1, "offset_groups": 1},
     {"input": (2, 3, 6, 7), "offset": (2, 2 * 3 * 3, 6, 4), "weight": (4, 3, 3, 3)}, ["eval"], 611),
    ("deform_conv2d/v2_groups1_offgroups1", "deform_conv2d", "function",
     {"stride": (1, 1), "padding": (1, 0), "dilation": (2, 1), "border_grad": "torchvision", "groups": 1, "offset_groups": 1},
     {"input": (2, 3, 7, 5), "offset": (2, 2 * 3 * 2, 5, 4), "weight": (5, 3, 3, 2), "bias": (5,), "mask": (2, 3 * 2, 5, 4)},
     ["eval"], 612),
]

# Cases in a layer's initial state: zero offsets (and, for the layers, a zero offset conv),
# so every sample sits on an integer position and, with padding, the border taps exactly
# on p = -1, where the border_grad conventions differ. The forward is not differentiable
# in the offsets there (the offset gradient is one-sided by convention), so the
# finite-difference spot check skips the tensors that move the offsets; the cross-check
# (torchvision, or the transcription of mmcv's kernels) covers them.
_ON_GRID = "zero offsets: every sample on an integer position, where the offset gradient is one-sided by convention"
INITIAL_STATE = {
    "deform_conv2d/zero_offsets_pad1_torchvision": {"input.offset": _ON_GRID},
    "deform_conv2d/zero_offsets_pad1_mmcv": {"input.offset": _ON_GRID},
    "modulated_deform_conv2d_pack/init_torchvision": {"param.conv_offset.weight": _ON_GRID, "param.conv_offset.bias": _ON_GRID},
    "modulated_deform_conv2d_pack/init_mmcv": {"param.conv_offset.weight": _ON_GRID, "param.conv_offset.bias": _ON_GRID},
    "deform_conv2d_pack/init_torchvision": {"param.conv_offset.weight": _ON_GRID, "param.conv_offset.bias": _ON_GRID},
    "deform_conv2d_pack/init_mmcv": {"param.conv_offset.weight": _ON_GRID, "param.conv_offset.bias": _ON_GRID},
}

# Self-attention. A mask input is given as (kind, shape): "bool_attend" (True = attend,
# scaled_dot_product_attention's convention), "bool_masked" (True = not allowed,
# MultiheadAttention's), or "float" (added; about 20% of the entries -inf). One random key
# is never masked, so no query loses every key. Masks are constants: no gradient.
CASES += [
    ("scaled_dot_product_attention/bool_mask", "scaled_dot_product_attention", "function", {},
     {"q": (2, 3, 4, 5), "k": (2, 3, 6, 5), "v": (2, 3, 6, 3), "attn_mask": ("bool_attend", (4, 6))}, ["eval"], 701),
    ("scaled_dot_product_attention/float_mask_scale", "scaled_dot_product_attention", "function", {"scale": 0.3},
     {"q": (3, 5, 2), "k": (3, 4, 2), "v": (3, 4, 4), "attn_mask": ("float", (3, 5, 4))}, ["eval"], 702),
    ("non_local_attn/c16", "NonLocalAttn", "block", {"in_channels": 16}, {"x": (3, 16, 4, 5)}, ["train", "eval"], 703),
    ("non_local_attn/no_scale_rd4", "NonLocalAttn", "block", {"in_channels": 8, "use_scale": False, "rd_channels": 4},
     {"x": (2, 8, 3, 4)}, ["eval"], 704),
    ("vit_attention/d12_h3_qkv_bias", "ViTAttention", "block", {"dim": 12, "num_heads": 3, "qkv_bias": True}, {"x": (2, 7, 12)}, ["eval"], 705),
    ("vit_attention/d8_h8", "ViTAttention", "block", {"dim": 8, "num_heads": 8}, {"x": (3, 4, 8)}, ["eval"], 706),
    # timm's Attention options (qk_norm, scale_norm, gate, head and output widths)
    ("vit_attention/timm_qk_norm_scale_norm", "ViTAttention", "block",
     {"dim": 12, "num_heads": 3, "qkv_bias": True, "qk_norm": True, "scale_norm": True}, {"x": (2, 7, 12)}, ["eval"], 7051),
    ("vit_attention/timm_gated_head_dim5_dim_out7", "ViTAttention", "block",
     {"dim": 10, "num_heads": 2, "attn_head_dim": 5, "dim_out": 7, "gated": True, "qkv_bias": True, "proj_bias": False},
     {"x": (3, 5, 10)}, ["eval"], 7052),
    ("vit_attention/timm_all_eps1e-5", "ViTAttention", "block",
     {"dim": 9, "num_heads": 3, "attn_head_dim": 2, "dim_out": 5, "qk_norm": True, "scale_norm": True, "gated": True,
      "norm_eps": 1e-5}, {"x": (2, 5, 9)}, ["eval"], 7053),
    # qk_norm alone: the lines ``npattn explain ViTAttention_qk_norm`` walks
    ("vit_attention/timm_qk_norm", "ViTAttention", "block", {"dim": 12, "num_heads": 3, "qk_norm": True},
     {"x": (2, 7, 12)}, ["eval"], 7054),
    ("multihead_attention/batch_first_bool_masks", "MultiheadAttention", "block", {"embed_dim": 8, "num_heads": 2, "batch_first": True},
     {"query": (3, 4, 8), "key": (3, 5, 8), "value": (3, 5, 8),
      "key_padding_mask": ("bool_masked", (3, 5)), "attn_mask": ("bool_masked", (4, 5))}, ["eval"], 707),
    ("multihead_attention/kdim_vdim_float_masks", "MultiheadAttention", "block", {"embed_dim": 6, "num_heads": 3, "kdim": 4, "vdim": 5},
     {"query": (4, 2, 6), "key": (3, 2, 4), "value": (3, 2, 5),
      "key_padding_mask": ("float", (2, 3)), "attn_mask": ("float", (6, 4, 3))}, ["eval"], 708),
    ("multihead_attention/no_bias_no_mask", "MultiheadAttention", "block", {"embed_dim": 4, "num_heads": 4, "bias": False},
     {"query": (3, 1, 4), "key": (2, 1, 4), "value": (2, 1, 4)}, ["eval"], 709),
    # sequence-first (batch_first=False, torch's default) with boolean masks: what Keras's
    # MultiHeadAttention runs once its inputs are made batch-first and its mask True = attend
    ("multihead_attention/seq_first_bool_masks", "MultiheadAttention", "block", {"embed_dim": 6, "num_heads": 2},
     {"query": (4, 3, 6), "key": (5, 3, 6), "value": (5, 3, 6),
      "key_padding_mask": ("bool_masked", (3, 5)), "attn_mask": ("bool_masked", (4, 5))}, ["eval"], 710),
    # torch's default configuration without a mask, the lines ``npattn explain MultiheadAttention``
    # walks; its exercise selects this case by the bias=True it states (the masked cases state
    # no bias)
    ("multihead_attention/seq_first_no_mask", "MultiheadAttention", "block", {"embed_dim": 6, "num_heads": 2, "bias": True},
     {"query": (4, 3, 6), "key": (5, 3, 6), "value": (5, 3, 6)}, ["eval"], 7110),
]

# Attention variants (the masking pipeline of npattn.functional.attention): the diagonal
# of either alignment, windows, ALiBi, softcap, grouped-query heads, given dropout masks,
# packed variable-length batches, and rotary embeddings. Every attention case stores the
# log-sum-exp as output.lse; the cases in DLSE_CASES also hold an upstream gradient of it,
# grad_output.lse, which their gradients include. Input kinds besides the masks above:
# ("slopes", shape) ALiBi slopes in [0.1, 1); ("keep", shape) a dropout keep mask (75%
# kept); ("bool_attend_empty_rows", shape) boolean True = attend with some queries left
# with no key; ("cu_seqlens", lengths) the offsets of packed sequences; ("positions",
# values) rotary positions. All are constants without a gradient.
_SDPA = "scaled_dot_product_attention"
CASES += [
    (f"{_SDPA}/ev_equals_e", _SDPA, "function", {},
     {"q": (2, 3, 4, 5), "k": (2, 3, 6, 5), "v": (2, 3, 6, 5)}, ["eval"], 711),
    (f"{_SDPA}/fully_masked_rows", _SDPA, "function", {},
     {"q": (2, 2, 4, 3), "k": (2, 2, 5, 3), "v": (2, 2, 5, 2), "attn_mask": ("bool_attend_empty_rows", (2, 2, 4, 5))}, ["eval"], 712),
    (f"{_SDPA}/causal_top_left_l6_s4", _SDPA, "function", {"is_causal": True},
     {"q": (2, 3, 6, 3), "k": (2, 3, 4, 3), "v": (2, 3, 4, 2)}, ["eval"], 713),
    (f"{_SDPA}/causal_bottom_right_l3_s6", _SDPA, "function", {"is_causal": True, "alignment": "bottom_right"},
     {"q": (2, 3, 3, 4), "k": (2, 3, 6, 4), "v": (2, 3, 6, 3)}, ["eval"], 714),
    (f"{_SDPA}/causal_bottom_right_l5_s3_empty_rows", _SDPA, "function", {"is_causal": True, "alignment": "bottom_right"},
     {"q": (1, 2, 5, 3), "k": (1, 2, 3, 3), "v": (1, 2, 3, 2)}, ["eval"], 715),
    (f"{_SDPA}/gqa_6_to_2_causal", _SDPA, "function", {"is_causal": True, "enable_gqa": True},
     {"q": (2, 6, 4, 3), "k": (2, 2, 5, 3), "v": (2, 2, 5, 4)}, ["eval"], 716),
    (f"{_SDPA}/window_2_1_bottom_right", _SDPA, "function", {"window": (2, 1), "alignment": "bottom_right"},
     {"q": (2, 2, 4, 3), "k": (2, 2, 7, 3), "v": (2, 2, 7, 2)}, ["eval"], 717),
    (f"{_SDPA}/window_0_0_top_left_scale", _SDPA, "function", {"window": (0, 0), "scale": 0.7},
     {"q": (1, 3, 5, 2), "k": (1, 3, 5, 2), "v": (1, 3, 5, 3)}, ["eval"], 718),
    (f"{_SDPA}/alibi_heads_causal_bottom_right", _SDPA, "function", {"is_causal": True, "alignment": "bottom_right"},
     {"q": (2, 3, 4, 3), "k": (2, 3, 6, 3), "v": (2, 3, 6, 2), "alibi_slopes": ("slopes", (3,))}, ["eval"], 719),
    (f"{_SDPA}/alibi_batch_heads_top_left", _SDPA, "function", {},
     {"q": (2, 2, 5, 3), "k": (2, 2, 4, 3), "v": (2, 2, 4, 3), "alibi_slopes": ("slopes", (2, 2))}, ["eval"], 720),
    (f"{_SDPA}/softcap_float_mask", _SDPA, "function", {"softcap": 0.9, "scale": 1.5},
     {"q": (2, 2, 4, 3), "k": (2, 2, 5, 3), "v": (2, 2, 5, 2), "attn_mask": ("float", (2, 4, 5))}, ["eval"], 721),
    (f"{_SDPA}/dropout_mask_p0.25", _SDPA, "function", {"dropout_p": 0.25},
     {"q": (2, 2, 4, 3), "k": (2, 2, 5, 3), "v": (2, 2, 5, 3), "dropout_mask": ("keep", (2, 2, 4, 5))}, ["eval"], 722),
    (f"{_SDPA}/dlse_gqa_window_alibi_softcap", _SDPA, "function",
     {"enable_gqa": True, "window": (1, -1), "is_causal": True, "alignment": "bottom_right", "softcap": 2.0},
     {"q": (2, 4, 3, 3), "k": (2, 2, 5, 3), "v": (2, 2, 5, 2), "alibi_slopes": ("slopes", (2, 4))}, ["eval"], 723),
    ("varlen_attention/causal_bottom_right_empty_sequences", "varlen_attention", "function",
     {"is_causal": True, "alignment": "bottom_right"},
     {"q": (8, 2, 3), "k": (10, 2, 3), "v": (10, 2, 2),
      "cu_seqlens_q": ("cu_seqlens", [3, 0, 4, 1]), "cu_seqlens_k": ("cu_seqlens", [5, 2, 0, 3])}, ["eval"], 731),
    ("varlen_attention/dlse_gqa_window_alibi_dropout", "varlen_attention", "function",
     {"enable_gqa": True, "window": (1, 2), "softcap": 1.5, "dropout_p": 0.2},
     {"q": (7, 4, 3), "k": (6, 2, 3), "v": (6, 2, 3),
      "cu_seqlens_q": ("cu_seqlens", [3, 4]), "cu_seqlens_k": ("cu_seqlens", [4, 2]),
      "alibi_slopes": ("slopes", (2, 4)), "dropout_mask": ("keep", (4, 7, 6))}, ["eval"], 732),
    ("rotary_embedding/rotate_half", "rotary_embedding", "function", {"base": 10000.0},
     {"x": (2, 3, 5, 8), "positions": ("positions", [0, 1, 2, 7, 30])}, ["eval"], 741),
    ("rotary_embedding/interleaved_base500", "rotary_embedding", "function", {"base": 500.0, "interleaved": True},
     {"x": (3, 4, 6), "positions": ("positions", [5, 0, 2, 11])}, ["eval"], 742),
]
DLSE_CASES = {f"{_SDPA}/dlse_gqa_window_alibi_softcap", "varlen_attention/dlse_gqa_window_alibi_dropout"}


def variant_input(kind, spec, rng):
    """An input of the attention-variant kinds above, or None for another kind."""
    if kind == "slopes":
        return rng.uniform(0.1, 1.0, size=spec)
    if kind == "keep":
        return rng.random(spec) < 0.75
    if kind == "bool_attend_empty_rows":
        attend = rng.random(spec) < 0.7
        attend[..., 0] = True
        attend[..., 1, :] = False  # the second query of every head has no key
        attend[0, 0, 0, :] = False
        return attend
    if kind == "cu_seqlens":
        return np.concatenate([[0], np.cumsum(spec)]).astype(np.int64)
    if kind == "positions":
        return np.asarray(spec, dtype=np.int64)
    return None


# The papers' official modules (tools/torch_ref_official_b.py): each case names its
# reference there ("official", kept in the manifest), and its cross-check runs that
# transcription through the key map instead of timm's or the seed's module.
_NL = {"in_channels": 8, "rd_channels": 4, "use_scale": False, "sub_sample": True}
_TT = ["train", "eval"]
OFFICIAL_CASES = [
    ("non_local_attn/alexhex7_embedded_gaussian", "alexhex7", "NonLocalAttn", dict(_NL), {"x": (2, 8, 5, 4)}, _TT, 801),
    ("non_local_attn/alexhex7_dot_product", "alexhex7", "NonLocalAttn", dict(_NL, mode="dot_product"), {"x": (2, 8, 4, 5)}, _TT, 802),
    ("non_local_attn/alexhex7_gaussian", "alexhex7", "NonLocalAttn", dict(_NL, mode="gaussian"), {"x": (3, 8, 4, 4)}, _TT, 803),
    ("non_local_attn/alexhex7_concatenation", "alexhex7", "NonLocalAttn", dict(_NL, mode="concatenation"), {"x": (2, 8, 5, 5)}, _TT, 804),
    ("non_local_attn/alexhex7_no_sub_sample_no_bn", "alexhex7", "NonLocalAttn",
     {"in_channels": 8, "rd_channels": 4, "use_scale": False, "norm": False}, {"x": (2, 8, 3, 4)}, ["eval"], 805),
    ("non_local_attn/caffe2_default", "caffe2", "NonLocalAttn",
     {"in_channels": 8, "rd_channels": 4, "sub_sample": True, "sub_sample_at": "before_conv", "scale": 0.5, "bn_eps": 1.0000001e-5},
     {"x": (2, 8, 5, 4)}, _TT, 806),
    ("global_context/gcnet_att_add", "gcnet", "GlobalContext",
     {"channels": 8, "fuse_add": True, "fuse_scale": False, "rd_channels": 2, "ln_eps": 1e-5, "init": "gcnet"}, {"x": (2, 8, 4, 5)}, ["eval"], 811),
    ("global_context/gcnet_att_add_mul", "gcnet", "GlobalContext",
     {"channels": 8, "fuse_add": True, "rd_channels": 2, "ln_eps": 1e-5, "init": "gcnet"}, {"x": (3, 8, 3, 4)}, ["eval"], 812),
    ("global_context/gcnet_avg_mul", "gcnet", "GlobalContext",
     {"channels": 8, "use_attn": False, "rd_channels": 2, "ln_eps": 1e-5, "init": "gcnet"}, {"x": (2, 8, 5, 3)}, ["eval"], 813),
    ("coord_attn/houqb_coordatt", "houqb_coordatt", "CoordAttn", {"channels": 16, "rd_channels": 8, "bias": True}, {"x": (2, 16, 5, 4)}, _TT, 821),
    ("coord_attn/houqb_mbv2_ca", "houqb_mbv2_ca", "CoordAttn", {"channels": 16, "rd_channels": 8, "bias": True}, {"x": (3, 16, 4, 3)}, _TT, 822),
    ("sk/sknet_caffe", "sknet_caffe", "SKConv", {"in_channels": 8, "out_channels": 8, "groups": 4, "bias": False, "bn_momentum": 0.05},
     {"x": (3, 8, 5, 4)}, _TT, 831),
    ("gct/zxyang_l2", "zxyang_gct", "GCT", {"num_channels": 6, "mode": "l2"}, {"x": (2, 6, 5, 4)}, ["eval"], 841),
    ("gct/zxyang_l1", "zxyang_gct", "GCT", {"num_channels": 6, "mode": "l1"}, {"x": (2, 6, 4, 5)}, ["eval"], 842),
    ("gct/zxyang_l1_after_relu", "zxyang_gct", "GCT", {"num_channels": 6, "mode": "l1", "after_relu": True}, {"x": (3, 6, 4, 3)}, ["eval"], 843),
    ("simam/zjjconan_default", "zjjconan_simam", "SimAM", {}, {"x": (2, 5, 4, 3)}, ["eval"], 851),
    ("ms_cam/yimiandai_ms_cam", "yimiandai_ms_cam", "MS_CAM", {"channels": 8, "r": 4}, {"x": (3, 8, 4, 5)}, _TT, 861),
    ("aff/yimiandai_aff", "yimiandai_aff", "AFF", {"channels": 8, "r": 4}, {"x": (3, 8, 5, 4), "residual": (3, 8, 5, 4)}, _TT, 862),
    ("iaff/yimiandai_iaff", "yimiandai_iaff", "iAFF", {"channels": 8, "r": 4, "share_global_att": True}, {"x": (3, 8, 4, 5), "residual": (3, 8, 4, 5)}, _TT, 863),
]
OFFICIAL = {stem: ref for stem, ref, *_ in OFFICIAL_CASES}
CASES += [(stem, block, "block", config, shapes, modes, seed) for stem, _, block, config, shapes, modes, seed in OFFICIAL_CASES]


def attention_mask(kind, shape, rng, free_key):
    """A mask input of the self-attention cases (see CASES); key ``free_key`` never masked."""
    if kind == "float":
        mask = rng.normal(0.0, 1.0, size=shape)
        mask[rng.random(shape) < 0.2] = -np.inf
        mask[..., free_key] = rng.normal(0.0, 1.0, size=shape[:-1])
        return mask
    masked = rng.random(shape) < 0.3
    masked[..., free_key] = False
    return ~masked if kind == "bool_attend" else masked


def away_from_integers(rng, shape, low=-1.5, high=1.5):
    """Offsets whose fractional part lies in [0.15, 0.85]: every sample position (integer
    grid + offset) stays clear of the kinks of bilinear sampling at integers."""
    whole = rng.integers(int(np.floor(low)), int(np.ceil(high)), size=shape)
    return whole + rng.uniform(0.15, 0.85, size=shape)


def make_inputs(shapes, rng):
    inputs = {}
    free_key = None
    for name, shape in shapes.items():
        if isinstance(shape[0], str) and variant_input(shape[0], shape[1], np.random.default_rng(0)) is not None:
            inputs[name] = variant_input(shape[0], shape[1], rng)
        elif isinstance(shape[0], str):  # an attention mask: (kind, shape)
            if free_key is None:
                free_key = int(rng.integers(0, shape[1][-1]))
            inputs[name] = attention_mask(*shape, rng, free_key)
        elif name in ("offset",):
            inputs[name] = away_from_integers(rng, shape)
        elif name == "offsets":  # seed sampling: keep positions inside and off integers
            inputs[name] = away_from_integers(rng, shape, -1, 1)
        elif name == "mask":
            inputs[name] = rng.uniform(0.2, 1.0, size=shape)
        elif name in ("weight", "bias"):
            inputs[name] = rng.standard_normal(shape) * 0.5
        else:
            inputs[name] = rng.standard_normal(shape)
    return inputs


def randomise_state(blk, rng):
    """Non-trivial values for every array, so that no gradient is zero by construction."""
    state = blk.state_dict()
    for key, value in state.items():
        if key.endswith("num_batches_tracked"):
            state[key] = np.array(3, dtype=np.int64)
        elif key.endswith("running_var"):
            state[key] = rng.uniform(0.5, 1.5, size=value.shape)
        elif key.endswith("running_mean"):
            state[key] = 0.1 * rng.standard_normal(value.shape)
        elif value.size and np.all(value == value.flat[0]):
            # constant initialisations: BatchNorm's 1/0, GCT's alpha/gamma/beta, zero offset conv
            scale = 0.3 if not key.startswith("conv_offset") else 0.2
            state[key] = value + scale * rng.standard_normal(value.shape)
    blk.load_state_dict(state)


def build_arrays(spec, mode):
    """The float64 arrays of one case (inputs, state, grad_output) and its metadata."""
    stem, name, kind, config, shapes, _modes, seed = spec
    rng = np.random.default_rng(seed)
    meta = {"block": name, "kind": kind, "config": config, "mode": mode, "seed": seed}
    if stem in OFFICIAL:
        meta["official"] = OFFICIAL[stem]
    arrays = {}
    if kind == "block":
        blk = getattr(npattn, name)(**config, rng=seed, dtype=np.float64)
        randomise_state(blk, rng)
        if stem in INITIAL_STATE:  # the offset conv stays zero-initialised
            blk.load_state_dict({k: (np.zeros_like(v) if k.startswith("conv_offset.") else v)
                                 for k, v in blk.state_dict().items()})
        params = set(blk.parameter_names())
        for k, v in blk.state_dict().items():
            arrays[("param." if k in params else "buffer.") + k] = v
    inputs = make_inputs(shapes, rng)
    if name == "GCT" and config.get("after_relu"):
        inputs["x"] = np.abs(inputs["x"])  # after_relu: the input is non-negative
    if stem in INITIAL_STATE:
        meta["fd_skip"] = INITIAL_STATE[stem]
        if "offset" in inputs:
            inputs["offset"] = np.zeros_like(inputs["offset"])
    for k, v in inputs.items():
        arrays[f"input.{k}"] = v
    meta["inputs"] = list(shapes)
    masks = [n for n, shape in shapes.items() if isinstance(shape[0], str)]
    if masks:
        meta["no_grad_inputs"] = masks
    return meta, arrays


def output_shape(meta, arrays, name="output"):
    """Shape of the case's output, or of its second output ``output.lse`` (one eval-mode forward)."""
    if meta["kind"] == "function":
        fwd, _ = golden._function_ops()[meta["block"]]
        y, cache = fwd(**{n: arrays[f"input.{n}"] for n in meta["inputs"]}, **meta["config"])
        return y.shape if name == "output" else getattr(cache, name.split(".", 1)[1]).shape
    blk = golden.build_block(meta, np.float64)
    blk.load_state_dict({k.split(".", 1)[1]: v for k, v in arrays.items() if k.startswith(("param.", "buffer."))})
    y, _ = blk.forward(*(arrays[f"input.{n}"] for n in meta["inputs"]), training=False)
    return y.shape


def finish(meta, arrays, dtype):
    """Compute the expected arrays (in float64 from the stored values) and round to dtype."""
    stored = {k: (v.astype(dtype) if v.dtype.kind == "f" else v) for k, v in arrays.items()}
    results = golden.run(meta, stored, np.float64)
    for k, v in results.items():
        stored[k] = v.astype(dtype) if v.dtype.kind == "f" else v
    return stored


# --------------------------------------------------------------------------- cross-check

def torch_versions():
    try:
        import torch
        import torchvision
    except ImportError:
        return None
    return f"torch {torch.__version__.split('+')[0]}, torchvision {torchvision.__version__.split('+')[0]}"


def cross_check(meta, arrays):
    """Max normwise relative error between the fixture and the project's PyTorch version."""
    import torch_crosscheck

    theirs, reference = torch_crosscheck.run_case(meta, arrays)
    expected = golden.Case("", meta, arrays, pathlib.Path()).expected()
    floor = golden.CROSSCHECK_SCALE_FLOOR * golden.case_scale(expected)
    worst = 0.0
    for key, value in theirs.items():
        if arrays[key].dtype.kind != "f" or not arrays[key].size:
            if not np.array_equal(value, arrays[key]):
                worst = np.inf
            continue
        e = arrays[key].astype(np.float64)
        value = np.asarray(value, dtype=np.float64)
        if not np.array_equal(np.isinf(value), np.isinf(e)) or np.any(value[np.isinf(e)] != e[np.isinf(e)]):
            worst = np.inf  # an lse of -inf (a query with no key) must be -inf on both sides
            continue
        finite = np.isfinite(e)
        err = float(np.max(np.abs(value[finite] - e[finite]), initial=0.0) / max(np.max(np.abs(e[finite]), initial=0.0), floor, 1e-300))
        worst = max(worst, err)
    missing = [k for k in expected if k not in theirs]
    return worst, reference, missing


# --------------------------------------------------------------------------- main

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "golden"))
    ap.add_argument("--only", nargs="*", default=None, help="case id prefixes to regenerate")
    ap.add_argument("--no-crosscheck", action="store_true", help="do not run PyTorch even when installed")
    args = ap.parse_args(argv)
    out = pathlib.Path(args.out)
    manifest_path = out / "manifest.json"
    old = json.loads(manifest_path.read_text())["cases"] if manifest_path.is_file() else {}
    versions = None if args.no_crosscheck else torch_versions()
    cases = {}
    failed = []
    for spec in CASES:
        for mode in spec[5]:
            meta0, arrays64 = build_arrays(spec, mode)
            stem = spec[0]
            for dtype in (np.float64, np.float32):
                dname = np.dtype(dtype).name
                case_id = f"{stem}_{mode}_{'f64' if dtype == np.float64 else 'f32'}"
                if args.only and not any(case_id.startswith(p) for p in args.only):
                    if case_id in old:
                        cases[case_id] = old[case_id]
                    continue
                meta = dict(meta0, dtype=dname)
                arrays = {k: (v.astype(dtype) if v.dtype.kind == "f" else v) for k, v in arrays64.items()}
                grad_rng = np.random.default_rng([spec[6], 7])
                arrays["grad_output"] = grad_rng.standard_normal(output_shape(meta, arrays64)).astype(dtype)
                if stem in DLSE_CASES:
                    arrays["grad_output.lse"] = grad_rng.standard_normal(output_shape(meta, arrays64, "output.lse")).astype(dtype)
                arrays = finish(meta, arrays, dtype)
                report = golden.spot_check_gradients(meta, arrays)
                if not report.ok:
                    failed.append(f"{case_id}: finite-difference spot check: {report.failure_message()}")
                    continue
                record = None
                if versions:
                    worst, reference, missing = cross_check(meta, arrays)
                    # float64: the agreement the blocks are held to; float32 twins: the
                    # expected arrays are float64 results rounded once to float32
                    limit = 1e-10 if dtype == np.float64 else 2.0**-22
                    if worst > limit or missing:
                        failed.append(f"{case_id}: cross-check against {reference} gives max rel err {worst:.3e} (limit {limit:g}); missing {missing}")
                        continue
                    record = {"library": versions, "reference": reference, "max_rel_err": float(f"{worst:.3e}")}
                elif case_id in old:
                    record = old[case_id].get("cross_checked")
                rel = f"{stem.split('/')[1]}_{mode}_{'f64' if dtype == np.float64 else 'f32'}.npz"
                file = f"{stem.split('/')[0]}/{rel}"
                sha = golden.write_npz(out / file, arrays)
                if record is not None and case_id in old and old[case_id].get("sha256") != sha and not versions:
                    record = None  # the stored cross-check was for different arrays
                cases[case_id] = {
                    "file": file,
                    "block": meta["block"],
                    "kind": meta["kind"],
                    "config": {k: list(v) if isinstance(v, tuple) else v for k, v in meta["config"].items()},
                    "inputs": meta["inputs"],
                    "mode": mode,
                    "dtype": dname,
                    "seed": meta["seed"],
                    "shapes": {k[len("input.") :]: list(v.shape) for k, v in arrays.items() if k.startswith("input.")}
                    | {"output": list(arrays["output"].shape)},
                    "sha256": sha,
                    "tolerances": golden.TOLERANCES,
                    "tolerance_rule": golden.TOLERANCE_RULE,
                    "npattn_version": npattn.__version__,
                    "cross_checked": record,
                    "fd_spot_check_rel_err": float(f"{report.max_rel_err:.2e}"),
                } | ({"no_grad_inputs": meta["no_grad_inputs"]} if "no_grad_inputs" in meta else {}) \
                  | ({"official": meta["official"]} if "official" in meta else {})
                if meta.get("fd_skip"):
                    cases[case_id]["fd_skip"] = meta["fd_skip"]
                if meta.get("official"):  # cross-checked against tools/torch_ref_official.py
                    cases[case_id]["official"] = meta["official"]
                print(f"{case_id:<48} written  fd {report.max_rel_err:.1e}  cross-check {record['max_rel_err'] if record else '-'}")
    manifest = {"format": golden.FORMAT, "cases": dict(sorted(cases.items()))}
    manifest_path.parent.mkdir(parents=True, exist_ok=True)
    manifest_path.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    for f in failed:
        print("NOT WRITTEN:", f, file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
