"""npattn: a NumPy reference implementation of CNN attention blocks.

Every block has a pure NumPy forward and a hand-derived backward; see README.md.
"""

__version__ = "0.1.0"

from . import functional
from .gradcheck import gradcheck, gradcheck_block

# Blocks (one module per paper) ------------------------------------------------------
from .blocks.se import SEBlock
from .blocks.sk import SKConv
from .blocks.aff import AFF, DAF, MS_CAM, iAFF
from .blocks.gct import GCT
from .blocks.deform import ConvOffset2D, DeformConv2d, DeformConv2dPack, ModulatedDeformConv2dPack
from .blocks.se import SEModule
from .blocks.cbam import CBAM
from .blocks.eca import ECA
from .blocks.coord_attn import CoordAttn
from .blocks.global_context import GlobalContext
from .blocks.simam import SimAM
from .blocks.non_local import NonLocalAttn
from .blocks.attention import MultiheadAttention, ViTAttention

# Deformable sampling as functions -----------------------------------------------------
from .functional.deform import (
    batch_map_offsets,
    batch_map_offsets_backward,
    batch_map_offsets_forward,
    deform_conv2d,
    deform_conv2d_backward,
    deform_conv2d_forward,
)

# Scaled dot-product attention as functions (boolean mask: True = attend, as torch's function)
from .functional.attention import scaled_dot_product_attention_backward, scaled_dot_product_attention_forward
from .functional.attention import varlen_attention_backward, varlen_attention_forward
from .functional.rotary import rotary_embedding_backward, rotary_embedding_forward

__all__ = [
    "__version__", "functional", "gradcheck", "gradcheck_block",
    "SEBlock", "SKConv", "DAF", "AFF", "iAFF", "MS_CAM", "GCT",
    "DeformConv2d", "ModulatedDeformConv2dPack", "ConvOffset2D", "DeformConv2dPack",
    "deform_conv2d", "deform_conv2d_forward", "deform_conv2d_backward",
    "batch_map_offsets", "batch_map_offsets_forward", "batch_map_offsets_backward",
    "NonLocalAttn", "ViTAttention", "MultiheadAttention",
    "scaled_dot_product_attention_forward", "scaled_dot_product_attention_backward",
]
__all__ += ["SEModule", "CBAM", "ECA", "CoordAttn", "GlobalContext", "SimAM"]
__all__ += ["varlen_attention_forward", "varlen_attention_backward", "rotary_embedding_forward", "rotary_embedding_backward"]
