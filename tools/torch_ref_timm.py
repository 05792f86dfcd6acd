"""timm's own modules for npattn's blocks in timm's layout, and a PyTorch transcription of
SimAM (which timm does not ship), for the cross-checks, the golden fixtures and the speed
benchmark.

``make_torch_block(np_block)`` builds the timm 1.0.31 module with the npattn block's
constructor settings, loads the block's state_dict (BatchNorm buffers included) without
renaming any key, and returns it in float64, eval mode:

    SEModule      -> timm.layers.squeeze_excite.SEModule
    CBAM          -> timm.layers.cbam.CbamModule
    ECA           -> timm.layers.eca.EcaModule
    CoordAttn     -> timm.layers.coord_attn.CoordAttn
    GlobalContext -> timm.layers.global_context.GlobalContext
    SimAM         -> SimAM below (the paper's formula, PyTorch autograd)
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

__all__ = ["SimAM", "TIMM_BLOCKS", "make_torch_block", "reference_name", "timm_version"]


class SimAM(nn.Module):
    """The paper's equation, in PyTorch: per channel, with n = H W - 1,
    ``e = (x - mean)^2 / (4 (sum (x - mean)^2 / n + lambda)) + 0.5``, ``y = x sigmoid(e)``."""

    def __init__(self, e_lambda=1e-4):
        super().__init__()
        self.e_lambda = e_lambda

    def forward(self, x):
        n = x.shape[2] * x.shape[3] - 1
        sq = (x - x.mean(dim=(2, 3), keepdim=True)).pow(2)
        energy_inv = sq / (4 * (sq.sum(dim=(2, 3), keepdim=True) / n + self.e_lambda)) + 0.5
        return x * torch.sigmoid(energy_inv)


def _timm_class(name):
    if name == "SEModule":
        from timm.layers.squeeze_excite import SEModule as cls
    elif name == "CBAM":
        from timm.layers.cbam import CbamModule as cls
    elif name == "ECA":
        from timm.layers.eca import EcaModule as cls
    elif name == "CoordAttn":
        from timm.layers.coord_attn import CoordAttn as cls
    elif name == "GlobalContext":
        from timm.layers.global_context import GlobalContext as cls
    elif name == "SimAM":
        cls = SimAM
    else:
        raise KeyError(name)
    return cls


# npattn options timm's module does not have, with the value that means "as timm": a block
# with another value there is no timm module (KeyError; tools/torch_ref_official.py covers
# the official code's settings)
_NOT_TIMM = {
    "CBAM": {"pool_types": ("avg", "max"), "no_spatial": False, "spatial_order": "avg_max", "max_grad": "split"},
    "ECA": {"shared": True},
}


def _timm_kwargs(np_block):
    """timm's constructor arguments for the npattn block (``config`` uses timm's names,
    except for the options translated here)."""
    import functools

    name = type(np_block).__name__
    kwargs = dict(np_block.config)
    for key, timm_value in _NOT_TIMM.get(name, {}).items():
        value = kwargs.pop(key, timm_value)
        if (tuple(value) if isinstance(value, list) else value) != timm_value:
            raise KeyError(f"{name}({key}={value!r}) has no timm counterpart")
    bn = {"momentum": kwargs.pop("bn_momentum", 0.1), "eps": kwargs.pop("bn_eps", 1e-5)}
    if name == "CBAM" and bn != {"momentum": 0.1, "eps": 1e-5}:
        raise KeyError(f"CBAM(bn_momentum, bn_eps) = {bn} has no timm counterpart (ConvNormAct's BatchNorm2d defaults)")
    if name == "SEModule":
        if kwargs.pop("norm", False):
            kwargs["norm_layer"] = functools.partial(nn.BatchNorm2d, **bn)
        kwargs["act_layer"] = kwargs.pop("act", "relu")
        kwargs["gate_layer"] = kwargs.pop("gate", "sigmoid")
    if name == "ECA" and not kwargs.get("use_mlp", False):
        for key in ("use_mlp", "rd_ratio", "rd_channels", "rd_divisor"):
            kwargs.pop(key, None)
    return kwargs


def _timm_module(np_block):
    """timm's module built from the npattn block's constructor arguments (``config``: the
    same names as timm's, but for :func:`_timm_kwargs`'s translations), so the channel
    arithmetic is timm's own."""
    return _timm_class(type(np_block).__name__)(**_timm_kwargs(np_block))


TIMM_BLOCKS = ("SEModule", "CBAM", "ECA", "CoordAttn", "GlobalContext", "SimAM")


def timm_version():
    import timm

    return timm.__version__


def reference_name(np_block):
    cls = _timm_class(type(np_block).__name__)
    if cls is SimAM:
        return "tools/torch_ref_timm.py SimAM (the paper's formula)"
    return f"timm {timm_version()} {cls.__module__}.{cls.__name__}"


def make_torch_block(np_block, dtype=torch.float64):
    """The timm module (or SimAM transcription) matching ``np_block`` in ``dtype``, with the
    npattn block's state_dict loaded strictly, in eval mode. Raises KeyError for a block
    this module does not cover."""
    module = _timm_module(np_block).to(dtype)
    from torch_ref_blocks import set_batch_norm

    set_batch_norm(module, np_block)  # npattn's bn_momentum / bn_eps (not timm arguments)
    if hasattr(np_block, "ln_eps"):  # GlobalContext's LayerNorm eps (timm's is 1e-6)
        for m in module.modules():
            if isinstance(m, nn.LayerNorm):
                m.eps = np_block.ln_eps
    state = {k: torch.from_numpy(np.array(v)) for k, v in np_block.state_dict().items()}
    state = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in state.items()}
    module.load_state_dict(state, strict=True)
    return module.eval()
