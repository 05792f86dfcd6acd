"""npattn: a NumPy reference implementation of CNN attention blocks.

Every block has a pure NumPy forward and a hand-derived backward; see README.md.
"""

__version__ = "0.1.0"

from . import functional
from .gradcheck import gradcheck, gradcheck_block

# Blocks (one module per paper) ------------------------------------------------------

__all__ = ["__version__", "functional", "gradcheck", "gradcheck_block"]
from .blocks.aff import AFF, DAF, MS_CAM, iAFF
from .blocks.gct import GCT
from .blocks.se import SEBlock
from .blocks.sk import SKConv
__all__ += ["SEBlock", "SKConv", "DAF", "AFF", "iAFF", "MS_CAM", "GCT"]
from .blocks.deform import ConvOffset2D, DeformConv2d, ModulatedDeformConv2dPack
from .functional.deform import batch_map_offsets, deform_conv2d
__all__ += ["DeformConv2d", "ModulatedDeformConv2dPack", "ConvOffset2D", "deform_conv2d", "batch_map_offsets"]
