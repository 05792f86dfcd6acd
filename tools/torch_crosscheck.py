"""Run a golden case through the project's PyTorch versions of the blocks (float64,
autograd for the gradients) and return the results under the fixture's key names.

Used by ``tools/make_golden.py`` to record each fixture's agreement with PyTorch, and by
the cross-check tests. Needs torch (and torchvision for the deformable convolutions).
"""

from __future__ import annotations

import numpy as np
import torch

from npattn import golden


def _t(a, grad=True):
    return torch.from_numpy(np.array(a, dtype=np.float64)).requires_grad_(grad)


def _torch_module(np_block):
    if type(np_block).__name__ == "DeformConv2dPack" or getattr(np_block, "border_grad", "torchvision") == "mmcv":
        import mmcv_ref_deform  # mmcv's layers: torch composition around mmcv's kernel logic or torchvision's op

        kernel = "mmcv's kernel logic" if np_block.border_grad == "mmcv" else "torchvision.ops.deform_conv2d"
        return mmcv_ref_deform.make_torch_block(np_block), f"tools/mmcv_ref_deform.py (torch composition, {kernel})"
    import torch_ref_blocks
    import torch_ref_timm

    if type(np_block).__name__ in torch_ref_timm.TIMM_BLOCKS:  # timm's own modules (SimAM: the paper's formula)
        # (a block with options timm lacks raises KeyError; a case for the official code names it in "official")
        return torch_ref_timm.make_torch_block(np_block), torch_ref_timm.reference_name(np_block)
    try:
        return torch_ref_blocks.make_torch_block(np_block), "tools/torch_ref_blocks.py (seed transcription)"
    except (TypeError, KeyError):
        import torch_ref_deform

        try:
            return torch_ref_deform.make_torch_block(np_block), "tools/torch_ref_deform.py (seed / torchvision composition)"
        except (TypeError, KeyError):
            import torch_ref_attention

            return torch_ref_attention.make_torch_block(np_block), torch_ref_attention.describe(np_block)


def _inputs(meta, arrays):
    """name -> tensor: floating inputs as float64 leaves (requiring a gradient unless the
    case lists them in no_grad_inputs), boolean masks as boolean tensors."""
    skip = set(meta.get("no_grad_inputs", ()))
    return {
        n: _t(arrays[f"input.{n}"], n not in skip) if arrays[f"input.{n}"].dtype.kind == "f" else torch.from_numpy(arrays[f"input.{n}"])
        for n in meta["inputs"]
    }


def run_case(meta: dict, arrays: dict):
    """(results, reference description) for one case, in float64."""
    arrays = {k: (v.astype(np.float64) if v.dtype.kind == "f" else v) for k, v in arrays.items()}
    names = meta["inputs"]
    dy = torch.from_numpy(arrays["grad_output"])
    out = {}
    grad_names = golden.grad_inputs(meta)
    if meta["kind"] == "function" and meta["block"] in _ATTENTION_FUNCTIONS:
        return _attention_function(meta, arrays, _inputs(meta, arrays), dy)
    if meta["kind"] == "function":
        tin = _inputs(meta, arrays)
        cfg = meta["config"]
        if meta["block"] == "deform_conv2d" and cfg.get("border_grad") == "mmcv":
            import mmcv_ref_deform

            a = {n: arrays[f"input.{n}"] for n in names}
            geo = (cfg.get("stride", 1), cfg.get("padding", 0), cfg.get("dilation", 1))
            out["output"] = mmcv_ref_deform.deform_conv2d(a["input"], a["offset"], a["weight"], a.get("bias"), *geo, a.get("mask"))
            g = mmcv_ref_deform.deform_conv2d_backward(arrays["grad_output"], a["input"], a["offset"], a["weight"],
                                                       a.get("bias"), *geo, a.get("mask"))
            out.update({f"grad.input.{n}": g[n] for n in names})
            return out, "tools/mmcv_ref_deform.py (mmcv's kernel logic, float64 loops)"
        if meta["block"] == "deform_conv2d":
            import torchvision

            y = torchvision.ops.deform_conv2d(
                tin["input"], tin["offset"], tin["weight"], tin.get("bias"),
                stride=tuple(cfg.get("stride", 1)) if not isinstance(cfg.get("stride", 1), int) else cfg.get("stride", 1),
                padding=tuple(cfg.get("padding", 0)) if not isinstance(cfg.get("padding", 0), int) else cfg.get("padding", 0),
                dilation=tuple(cfg.get("dilation", 1)) if not isinstance(cfg.get("dilation", 1), int) else cfg.get("dilation", 1),
                mask=tin.get("mask"),
            )
            reference = "torchvision.ops.deform_conv2d"
        elif meta["block"] == "batch_map_offsets":
            import torch_ref_deform

            # the seed returns (B, H*W); npattn gives the same values as (B, H, W)
            y = torch_ref_deform.th_batch_map_offsets(tin["input"], tin["offsets"]).reshape(dy.shape)
            reference = "tools/torch_ref_deform.py th_batch_map_offsets (seed transcription)"
        elif meta["block"] == "scaled_dot_product_attention":
            y = torch.nn.functional.scaled_dot_product_attention(
                tin["q"], tin["k"], tin["v"], attn_mask=tin.get("attn_mask"), scale=cfg.get("scale")
            )
            reference = "torch.nn.functional.scaled_dot_product_attention"
        else:
            raise KeyError(meta["block"])
        y.backward(dy)
        out["output"] = y.detach().numpy()
        for n in grad_names:
            out[f"grad.input.{n}"] = tin[n].grad.numpy()
        return out, reference

    if meta.get("official"):  # a transcription of the paper's official module, through its key map
        import torch_ref_official_b

        return torch_ref_official_b.run_case(meta, arrays)
    np_block = golden.build_block(meta, np.float64)
    state = {k.split(".", 1)[1]: v for k, v in arrays.items() if k.startswith(("param.", "buffer."))}
    np_block.load_state_dict(state)
    module, reference = _torch_module(np_block)
    module.train(meta["mode"] == "train")
    tin = _inputs(meta, arrays)
    y = module(*(tin[n] for n in names))
    y.backward(dy)
    out["output"] = y.detach().numpy()
    for n in grad_names:
        out[f"grad.input.{n}"] = tin[n].grad.numpy()
    for k, p in module.named_parameters():
        out[f"grad.param.{k}"] = p.grad.numpy() if p.grad is not None else np.zeros(tuple(p.shape))
    if meta["mode"] == "train":
        params = dict(module.named_parameters())
        for k, v in module.state_dict().items():
            if k not in params:
                out[f"buffer_after.{k}"] = v.numpy()
    return out, reference


_ATTENTION_FUNCTIONS = ("scaled_dot_product_attention", "varlen_attention", "rotary_embedding")
_REF = "tools/torch_ref_attention_variants.py"


def _attention_function(meta, arrays, tin, dy):
    """The attention functions (and rotary embeddings): torch's own
    scaled_dot_product_attention for the output and gradients where it has every keyword of
    the case, the torch transcription of the pipeline otherwise and for output.lse (and
    the gradients of a case with grad_output.lse)."""
    import torch_ref_attention_variants as ref

    block, cfg = meta["block"], dict(meta["config"])
    out = {}
    if block == "rotary_embedding":
        y = ref.rotary_ref(tin["x"], tin["positions"], cfg.get("base", 10000.0), interleaved=cfg.get("interleaved", False))
        y.backward(dy)
        out["output"], out["grad.input.x"] = y.detach().numpy(), tin["x"].grad.numpy()
        return out, f"{_REF} rotary_ref (Hugging Face's rotate-half formula, Meta's complex form)"
    if cfg.get("window") is not None:
        cfg["window"] = tuple(cfg["window"])
    keywords = {n: tin[n] for n in meta["inputs"] if n not in ("q", "k", "v", "cu_seqlens_q", "cu_seqlens_k")}
    if block == "varlen_attention":
        y, lse = ref.varlen_ref(tin["q"], tin["k"], tin["v"], arrays["input.cu_seqlens_q"], arrays["input.cu_seqlens_k"],
                                **keywords, **cfg)
        reference = f"{_REF} varlen_ref (torch transcription of the pipeline, per sequence, autograd)"
    else:
        y, lse = ref.attention_ref(tin["q"], tin["k"], tin["v"], **keywords, **cfg)
        reference = f"{_REF} attention_ref (torch transcription of the pipeline, autograd)"
    out["output.lse"] = lse.detach().numpy()
    grad_names = golden.grad_inputs(meta)
    if "grad_output.lse" not in arrays and block == "scaled_dot_product_attention" and ref.torch_sdpa_supports(cfg, keywords):
        leaves = {n: tin[n].detach().clone().requires_grad_(True) for n in ("q", "k", "v")}
        y_torch = ref.torch_sdpa(leaves["q"], leaves["k"], leaves["v"], attn_mask=keywords.get("attn_mask"), **cfg)
        gap = float((y_torch - y).abs().max().detach()) / max(float(y_torch.abs().max().detach()), 1e-300) if y.numel() else 0.0
        if not gap <= 1e-12:  # the transcription that gives the lse must compute torch's function
            raise AssertionError(f"{_REF} attention_ref differs from torch's function by {gap:.3e}")
        y_torch.backward(dy)
        out["output"] = y_torch.detach().numpy()
        out.update({f"grad.input.{n}": leaves[n].grad.numpy() for n in grad_names})
        return out, ("torch.nn.functional.scaled_dot_product_attention (output, gradients; "
                     f"causal_lower_right for the bottom-right diagonal); output.lse: {_REF} attention_ref")
    if "grad_output.lse" in arrays:
        torch.autograd.backward([y, lse], [dy, torch.from_numpy(arrays["grad_output.lse"])])
    else:
        y.backward(dy)
    out["output"] = y.detach().numpy()
    out.update({f"grad.input.{n}": tin[n].grad.numpy() for n in grad_names})
    return out, reference
