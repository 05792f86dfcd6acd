"""Walk a block's derivation on real numbers: ``npattn explain BLOCK``.

A block's module docstring is the single source of its math. ``explain`` reads the
derivation there, runs the block on a small seeded float64 input, records the local
variables of the block's ``forward`` and ``backward`` (and of the helper functions
defined in the block's module, or in the shared modules its :class:`Example` names), and
checks the code against the derivation line by line.

The derivation format
---------------------

A short example (SE's first lines, ``npattn/blocks/se.py`` has them all)::

    Forward::

        W1 = fc.0.weight            (D, C)        fc.0's weight         [param("fc.0.weight")]
        s = mean_{H, W} x           (N, C)        squeeze               [mean(x, (2, 3))]
        h = s W1^T                  (N, D)        fc.0                  [linear(s, W1)]
        ...
        y = x * g[:, :, None, None] (N, C, H, W)  excitation            [x * g[:, :, None, None]]

    Backward, for dy = dL/dy::

        dg = sum_{H, W} dy * x      (N, C)        y is bilinear in (x, g)
        ...
        dW1 = dh^T s                (D, C)        h is linear in W1
        dx = dy * g + ds / (H W)    (N, C, H, W)  both paths from x to y

Two literal blocks of the module docstring, introduced by a line that is ``Forward::``
(or begins ``Forward,`` and ends with ``::``, as ``Forward, for x of shape (N, C, H, W)::``)
and one that is ``Backward::`` (or ``Backward, ...::``). The first of each is walked;
other literal blocks of the docstring (options, variants) are prose. Inside a block every
line that starts with ``SYM =`` defines one symbol; any other line (blank, indented
text, a ``+=`` remark) continues the previous line's reason and is shown as text. A line
has up to four fields, separated by runs of two or more spaces (one space inside a
field)::

    SYM = math-form            (shape)        reason                 [tag]

- ``SYM``: a Python identifier. The same name is the code's local variable that holds
  the value, in the block's ``forward`` (Forward lines) or ``backward`` (Backward lines),
  or in a helper function they call (of the block's module, or of a shared module named
  in the block's :attr:`Example.helpers`).
- ``math-form``: the formula as a reader writes it (free text, one space between terms).
- ``(shape)``: required (on the next line when the formula fills its line); the
  value's shape in named sizes, e.g. ``(N, C, H, W)``,
  ``(D, C)``, ``(C,)``, ``()``. A name is bound the first time it is met (in the order
  of the lines) and checked after; an entry may be an integer or an expression over
  names met before (``(N, 2*C)``).
- ``reason``: free text (for a Backward line, the chain-rule step).
- ``[tag]``: Forward lines must end with one: a Python expression over earlier symbols,
  the forward's arguments and ``training``, evaluated with the op vocabulary below. A
  Backward line may end with one (then it is evaluated and compared with the code's
  value); without it the code's value is walked and checked by the local check.

Kinds of Forward line:

- inputs are the forward's arguments (``x``); they need no line;
- a parameter binding: ``W1 = fc.0.weight   (D, C)   fc.0   [param("fc.0.weight")]``
  binds a symbol to a state_dict key. The tag may take a view of it that keeps its
  size, ``[param("fc1.weight")[:, :, 0, 0]]`` (a 1x1 conv read as a matrix); the
  gradient of the symbol is then the gradient of the key, viewed the same way;
- a buffer, not differentiated: ``rm = bn.running_mean   (D,)   [buffer("bn.running_mean")]``;
- a constant of the block's configuration: ``lam = e_lambda   ()   [attr("e_lambda")]``;
- every other line computes its symbol from earlier ones, ``[linear(s, W1, b1)]``.

The last Forward line defines ``y``, the block's output.

Backward lines define ``dSYM``, the gradient of the loss with respect to the Forward
symbol ``SYM``, for the upstream gradient ``dy`` (which needs no line). The gradient of a
parameter symbol may be a local of the code or, when the code adds it into the
gradient dict, the gradient the block returns for the bound key; the gradient of an
input is the one the block returns when the code has no such local.

Op vocabulary of the tags (``npattn.functional``'s forward functions, value only):
``mean(x, axis, keepdims=False)``, ``sum``, ``amax(x, axis, keepdims=False)``,
``linear(x, W, b=None)``, ``conv1d(x, W, b=None, **kw)``, ``conv2d(...)``,
``relu``, ``sigmoid``, ``tanh``, ``silu``, ``gelu``, ``hardswish``, ``hard_sigmoid``,
``abs``, ``sqrt``, ``exp``, ``log``, ``sign``, ``softmax(x, axis)``,
``l2_norm(x, axis, keepdims=False)``, ``layer_norm2d(x, gamma, beta, eps)`` (over axis 1),
``logsumexp(x, axis, keepdims=False)``, ``max_pool2d(x, k)`` (stride k, floor),
``batch_norm(x, gamma, beta, running_mean, running_var, training, eps=1e-5)``,
``concat([a, b], axis)``, ``einsum``, ``np``, ``param(key)``, ``buffer(key)``, ``attr(name)``;
for attention: ``layer_norm(x, gamma, beta, eps)`` (over the last axis), ``matmul(a, b)``
(``np.matmul``: batched over the leading axes), ``split_heads(a, Nh)`` ((N, T, E) ->
(N, Nh, T, E / Nh), head i owning channels i E / Nh ... (i + 1) E / Nh - 1) and
``merge_heads(a)`` (its inverse, the heads side by side);
for deformable convolution ``sample_positions(offset, kernel_hw, stride, padding, dilation)``,
``bilinear_sample(x, py, px)``, ``map_coordinates_clamped(maps, coords)`` (the seed's sampling;
all three from ``npattn.sampling.numpy``) and ``conv_cols(Wd, cols, b, out_hw)``.

What is checked
---------------

- Forward: each tag is evaluated (on the code's values of the symbols it reads) and
  compared with the code's value of the symbol, when the code has one; each shape is
  checked.
- Backward, the local check: for ``dS``, every Forward line whose tag reads ``S`` is
  differentiated alone, by central differences in ``S`` (every other symbol fixed), along
  a few random directions v; the sum over those lines of ``<dLHS, J v>`` must equal
  ``<dS, v>``. So each backward line is checked against the one forward step it undoes,
  with the code's own upstream values; a wrong line fails at that line.
- End to end: the block's returned output and gradients are compared with the walked
  ``y`` and the walked gradients of the inputs and parameters, and a float64 gradcheck
  of the whole block is run.

Notation (one across the package)
---------------------------------

- sizes are capitals: N batch, C channels, H and W height and width, D a hidden width,
  k a kernel size; never ``h``/``w`` for sizes;
- attention: L queries and Lk keys (T tokens in self-attention), E channels in Nh heads of
  width E_h = E / Nh, ``Q, K, V`` the queries, keys and values split into heads, ``S`` the
  logits, ``P = softmax(S)`` the attention weights (``dS``, ``dP`` their gradients),
  ``mask`` the additive mask (-inf where a key is not allowed), ``c`` the scale;
- ``x`` the input, ``y`` the output, ``dy = dL/dy`` the upstream gradient;
- ``dSYM`` is always the gradient of ``SYM``, and a ``d`` prefix means nothing else (a
  width is ``D``; a symbol may still be ``d`` itself, SimAM's squared distance, whose
  gradient is ``dd``);
- ``W1, b1, W2, b2`` the weights and biases of a two-layer MLP, ``Ws`` a spatial conv's
  kernel, ``gamma, beta`` a normalisation's scale and shift, ``rm, rv`` its running mean
  and variance, ``eps`` its epsilon;
- ``s`` a pooled (squeezed) vector, ``h`` a hidden pre-activation, ``a = act(h)``,
  ``z`` a gate's pre-activation, ``g = sigmoid(z)`` a gate;
- one value per pool, branch or head is ``SYM_t`` (``v_avg``, ``v_max``).
- bilinear sampling (``npattn/blocks/deform.py``): positions ``py, px``, offset components
  ``delta_y, delta_x`` (never ``dy, dx``), the corners (y0, x0), (y0, x1), (y1, x0),
  (y1, x1) with values ``v00, v01, v10, v11`` and weights ``w00 .. w11``, the fractions
  ``ly, lx`` and ``hy = 1 - ly, hx = 1 - lx``; ``jy, jx`` the sample's derivatives in
  the position.

Where the code's values are found
---------------------------------

The walk records every function of the block's module file as it returns (``forward``,
``backward``, helpers such as a ``_mlp``), keeping its ndarray locals (and dicts of
ndarrays), and likewise every function of the modules in the block's
:attr:`Example.helpers`: shared code several blocks call, so that it is written once
(``npattn.functional.attention``'s ``attention`` and ``attention_backward``, whose locals
are S, P, O and dV, dP, dS, dQ, dK, for MultiheadAttention, ViTAttention and NonLocalAttn;
``npattn.functional.deform`` and ``npattn.sampling.numpy`` for the deformable blocks).
``SYM`` is looked up in this order: the local ``SYM`` of ``forward`` (``backward`` for
``dSYM``); else of a helper of the block's module (the first to return that has it); else
of a function of the helper modules (the same rule, in the order they are named). A
symbol ``base_key`` may also be the entry ``key`` of a local dict ``base`` (``v_avg`` is
``v["avg"]``: one line per pool of a loop), in the same order. So in the code:

- one value, one name: a symbol is assigned once (``dx += ...`` on the same array is
  fine; a name rebound to another value shows only its last value);
- sizes are capitals, ``N, C, H, W = x.shape``, never ``h, w`` (``h`` is a hidden layer);
- gradients are ``d`` + the symbol with no underscore (``dz``, ``dW1``; ``dy`` upstream);
- a helper called more than once (a sub-block's ``forward`` run twice) shows the values
  of its first call: give each call's result its own name in the caller, or a dict, or
  give the helper a ``str`` argument ``suffix``: its locals ``SYM`` are then the symbols
  ``SYM + suffix`` (SKConv's ``_path(..., suffix="_0")`` defines ``q_0``, ``f_0``, ...).
- a shared helper's locals are named as the symbols of the blocks that read them; a
  caller's own local of the same name wins (ViTAttention's ``Q`` is its ``Q``, not the
  ``Qn`` it passes to ``attention`` as ``Q``).

Adding a block
--------------

Write its derivation in the format above, name the code's locals as the symbols (the
change must leave every output and gradient bit-identical), and add an :class:`Example`
to :data:`EXAMPLES` (a small float64 block, input shapes, the mode, and which golden
cases' configurations the derivation describes, for ``npattn exercise check``; and, in
:attr:`Example.helpers`, the shared modules whose functions hold some of its symbols).
``tests/test_explain.py`` then walks it. Two blocks in one module share the lines: the
second one's :attr:`Example.override` is text of the line (ending in ``::``) that
introduces a literal block whose lines replace those of the same symbols (SEModule's
bindings in ``npattn/blocks/se.py``); the same serves an option's variant lines. A second
block with a derivation of its own in the same module names, in :attr:`Example.section`,
text of a docstring line after which its ``Forward::`` and ``Backward::`` blocks come
(``ViTAttention`` in ``npattn/blocks/attention.py``). A block
whose derivation shares nothing with the module's first one names its own two blocks in
:attr:`Example.markers` (``DAF forward::`` in ``npattn/blocks/aff.py``). A parameter that
no Forward line reads (a key the module keeps and never uses) has the gradient 0; its
Backward line passes when the code's value is exactly 0. ConvOffset2D and
DeformConv2dPack in ``npattn/blocks/deform.py`` use :attr:`Example.section` too.
"""

from __future__ import annotations

import ast
import functools
import importlib
import inspect
import re
import sys
from dataclasses import dataclass, field

import numpy as np

__all__ = ["Example", "EXAMPLES", "Line", "Derivation", "parse_derivation", "derivation_for", "walk", "find_example",
           "explain", "op_vocabulary", "local_check", "bindings_of"]

TOL = 1e-6  # local check and tag comparison, relative to a Cauchy-Schwarz scale (float64)


# ---- the registry ---------------------------------------------------------------------


@dataclass(frozen=True)
class Example:
    """A block to walk: ``build(rng)`` returns a float64 block, ``inputs`` gives the forward
    arguments' shapes; ``training`` picks the mode (True for blocks with BatchNorm)."""

    name: str  # the block's class name
    module: str  # the module whose docstring holds the derivation
    build: object  # callable rng -> block (float64)
    inputs: dict  # argument name -> shape, in the forward's order
    training: bool = False
    override: str | None = None  # heading of a literal block replacing lines (parse_derivation)
    section: str | None = None  # text of a docstring line after which its own Forward/Backward are (parse_derivation)
    fixtures: object = None  # callable config -> bool: the golden cases the derivation describes
    forward_kwargs: dict = field(default_factory=dict)  # extra keyword arguments of forward (backend="numpy")
    markers: tuple = ("Forward::", "Backward::")  # the lines introducing its two literal blocks (DAF's own)
    helpers: tuple = ()  # modules of shared functions whose locals are recorded too, after the block's module


def _se(rng):
    from .blocks.se import SEBlock

    return SEBlock(8, reduction=4, bias=True, rng=rng, dtype=np.float64)


def _se_module(rng):
    from .blocks.se import SEModule

    return SEModule(8, rd_channels=3, rng=rng, dtype=np.float64)


def _simam(rng):
    from .blocks.simam import SimAM

    return SimAM(1e-4, dtype=np.float64)


def _gct(rng):
    from .blocks.gct import GCT

    return GCT(6, dtype=np.float64)


def _eca(rng):
    from .blocks.eca import ECA

    return ECA(9, rng=rng, dtype=np.float64)  # the adaptive k of C = 9 is 3


def _cbam(rng):
    from .blocks.cbam import CBAM

    return CBAM(8, rd_channels=3, spatial_kernel_size=3, rng=rng, dtype=np.float64)


def _coord_attn(rng):
    from .blocks.coord_attn import CoordAttn

    return CoordAttn(6, rd_channels=3, bias=True, rng=rng, dtype=np.float64)


def _global_context(rng):
    from .blocks.global_context import GlobalContext

    return GlobalContext(8, rd_channels=3, rng=rng, dtype=np.float64)


def _non_local(rng):
    from .blocks.non_local import NonLocalAttn

    return NonLocalAttn(8, rd_channels=3, rng=rng, dtype=np.float64)


def _mha(rng):
    from .blocks.attention import MultiheadAttention

    return MultiheadAttention(6, 2, rng=rng, dtype=np.float64)


def _vit(rng, **options):
    from .blocks.attention import ViTAttention

    return ViTAttention(6, 2, rng=rng, dtype=np.float64, **options)


def _vit_default(config):
    return not any(config.get(k) for k in ("qkv_bias", "qk_norm", "scale_norm", "gated", "attn_head_dim", "dim_out")) \
        and config.get("proj_bias", True) and config.get("norm_eps", 1e-6) == 1e-6


def _sk(rng):
    from .blocks.sk import SKConv

    return SKConv(4, 4, groups=2, paths=2, rng=rng, dtype=np.float64)  # D = max(4 // 16, 32) = 32


def _ms_cam(rng):
    from .blocks.aff import MS_CAM

    return MS_CAM(6, r=2, rng=rng, dtype=np.float64)


def _aff(rng):
    from .blocks.aff import AFF

    return AFF(6, r=2, rng=rng, dtype=np.float64)


def _iaff(rng):
    from .blocks.aff import iAFF

    return iAFF(6, r=2, rng=rng, dtype=np.float64)  # share_global_att=True, the published code's


def _daf(rng):
    from .blocks.aff import DAF

    return DAF(dtype=np.float64)


def _deform_conv(rng):
    from .blocks.deform import DeformConv2d

    # uneven on purpose: stride (2, 1), padding (1, 0), dilation (1, 2), kernel (3, 2), 2 weight groups
    return DeformConv2d(4, 6, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2), groups=2, rng=rng,
                        dtype=np.float64, backend="numpy")


def _modulated_deform(rng):
    from .blocks.deform import ModulatedDeformConv2dPack

    return ModulatedDeformConv2dPack(4, 6, (3, 2), stride=(1, 2), padding=(1, 0), dilation=(2, 1), deform_groups=2,
                                     rng=rng, dtype=np.float64, backend="numpy")


def _deform_pack(rng):
    from .blocks.deform import DeformConv2dPack

    return DeformConv2dPack(4, 6, (3, 2), stride=(1, 2), padding=(1, 0), dilation=(1, 2), groups=2, deform_groups=2,
                            rng=rng, dtype=np.float64, backend="numpy")


def _conv_offset(rng):
    from .blocks.deform import ConvOffset2D

    return ConvOffset2D(3, rng=rng, dtype=np.float64, backend="numpy")


_DEFORM = ("npattn.sampling.numpy", "npattn.functional.deform")  # the sampling first: its 5-D cols, not the op's reshaped view
_ATTENTION = ("npattn.functional.attention",)  # attention, attention_backward: S, P, O; dV, dP, dS, dQ, dK

EXAMPLES = [
    Example("SEBlock", "npattn.blocks.se", _se, {"x": (2, 8, 5, 3)}, fixtures=lambda c: c.get("bias", False)),
    Example("SEModule", "npattn.blocks.se", _se_module, {"x": (2, 8, 5, 3)}, override="``npattn explain SEModule`` walks",
            fixtures=lambda c: c.get("bias", True) and not c.get("add_maxpool") and not c.get("norm")
            and c.get("act", "relu") == "relu" and c.get("gate", "sigmoid") == "sigmoid"),
    Example("SimAM", "npattn.blocks.simam", _simam, {"x": (2, 3, 5, 4)}, fixtures=lambda c: True),
    Example("GCT", "npattn.blocks.gct", _gct, {"x": (2, 6, 5, 3)}, fixtures=lambda c: c.get("mode", "l2") == "l2"),
    Example("ECA", "npattn.blocks.eca", _eca, {"x": (2, 9, 4, 3)},
            fixtures=lambda c: c.get("shared", True) and not c.get("use_mlp")),
    Example("CBAM", "npattn.blocks.cbam", _cbam, {"x": (2, 8, 5, 4)}, training=True,
            fixtures=lambda c: not c.get("mlp_bias") and tuple(c.get("pool_types", ("avg", "max"))) == ("avg", "max")
            and not c.get("no_spatial") and c.get("spatial_order", "avg_max") == "avg_max"
            and c.get("max_grad", "split") == "split"),
    Example("CoordAttn", "npattn.blocks.coord_attn", _coord_attn, {"x": (2, 6, 5, 3)}, training=True,
            fixtures=lambda c: c.get("bias", False) and not c.get("has_skip")),
    Example("GlobalContext", "npattn.blocks.global_context", _global_context, {"x": (2, 8, 5, 3)},
            fixtures=lambda c: c.get("use_attn", True) and c.get("fuse_scale", True) and not c.get("fuse_add")),
    Example("NonLocalAttn", "npattn.blocks.non_local", _non_local, {"x": (2, 8, 5, 3)}, training=True,
            fixtures=lambda c: c.get("mode", "embedded_gaussian") == "embedded_gaussian"
            and not c.get("sub_sample") and c.get("norm", True), helpers=_ATTENTION),
    # torch's default configuration without a mask: the golden case that states bias=True (the masked ones do not)
    Example("MultiheadAttention", "npattn.blocks.attention", _mha, {"query": (4, 2, 6), "key": (5, 2, 6), "value": (5, 2, 6)},
            fixtures=lambda c: c.get("bias") is True and not c.get("batch_first") and c.get("kdim") is None
            and c.get("vdim") is None, helpers=_ATTENTION),
    Example("ViTAttention", "npattn.blocks.attention", _vit, {"x": (2, 5, 6)}, section="``ViTAttention`` (timm",
            fixtures=_vit_default, helpers=_ATTENTION),
    Example("ViTAttention_qk_norm", "npattn.blocks.attention", functools.partial(_vit, qk_norm=True), {"x": (2, 5, 6)},
            section="``ViTAttention`` (timm", override="the lines of ``qk_norm=True``",
            fixtures=lambda c: c.get("qk_norm") and _vit_default(dict(c, qk_norm=False)), helpers=_ATTENTION),
    Example("SKConv", "npattn.blocks.sk", _sk, {"x": (3, 4, 5, 3)}, training=True,
            fixtures=lambda c: c.get("paths", 2) == 2 and c.get("bias", True)),
    Example("MS_CAM", "npattn.blocks.aff", _ms_cam, {"x": (3, 6, 5, 3)}, training=True, fixtures=lambda c: True),
    Example("AFF", "npattn.blocks.aff", _aff, {"x": (3, 6, 3, 5), "residual": (3, 6, 3, 5)}, training=True,
            override="``npattn explain AFF`` walks", fixtures=lambda c: True),
    Example("iAFF", "npattn.blocks.aff", _iaff, {"x": (3, 6, 4, 3), "residual": (3, 6, 4, 3)}, training=True,
            override="``npattn explain iAFF`` walks", fixtures=lambda c: c.get("share_global_att", True)),
    Example("DAF", "npattn.blocks.aff", _daf, {"x": (2, 3, 4, 5), "residual": (2, 3, 4, 5)},
            markers=("DAF forward::", "DAF backward::"), fixtures=lambda c: True),
    # the offset groups G = 2 come from the offset's channels: 2 G kh kw = 24
    Example("DeformConv2d", "npattn.blocks.deform", _deform_conv, {"x": (2, 4, 6, 7), "offset": (2, 24, 3, 5),
            "mask": (2, 12, 3, 5)}, helpers=_DEFORM,
            fixtures=lambda c: c.get("bias", True) and c.get("border_grad", "torchvision") == "torchvision"),
    Example("ModulatedDeformConv2dPack", "npattn.blocks.deform", _modulated_deform, {"x": (2, 4, 7, 6)},
            override="``npattn explain ModulatedDeformConv2dPack`` walks", helpers=_DEFORM,
            fixtures=lambda c: c.get("bias", True) and c.get("border_grad", "mmcv") == "torchvision"),
    Example("DeformConv2dPack", "npattn.blocks.deform", _deform_pack, {"x": (2, 4, 6, 7)}, helpers=_DEFORM,
            section="DeformConv2dPack, line by line", fixtures=lambda c: c.get("border_grad", "mmcv") == "torchvision"),
    Example("ConvOffset2D", "npattn.blocks.deform", _conv_offset, {"x": (2, 3, 5, 4)}, helpers=_DEFORM,
            section="ConvOffset2D", fixtures=lambda c: True),
]


def find_example(name: str) -> Example:
    for ex in EXAMPLES:
        if ex.name.lower() == name.lower():
            return ex
    known = ", ".join(ex.name for ex in EXAMPLES)
    raise KeyError(f"no walkthrough for block {name!r}; blocks with one: {known}")


# ---- parsing ---------------------------------------------------------------------------

_SYM = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)\s*=(?!=)\s*(.*)$")
_SHAPE = re.compile(r"^\([\w\s,+\-*/]*\)$")


@dataclass
class Line:
    """One derivation line."""

    sym: str
    math: str
    shape: str  # "(N, C)"
    reason: str
    tag: str | None  # the executable expression, None when absent
    lineno: int  # within the docstring
    text: list = field(default_factory=list)  # continuation lines

    def reads(self) -> set:
        """Names the tag reads."""
        if not self.tag:
            return set()
        tree = ast.parse(self.tag, mode="eval")
        sized = {id(n.value) for n in ast.walk(tree)  # x.shape, x.ndim: sizes, not values
                 if isinstance(n, ast.Attribute) and n.attr in ("shape", "ndim", "dtype", "size")}
        return {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and id(n) not in sized}


@dataclass
class Derivation:
    forward: list
    backward: list

    def forward_line(self, sym):
        return next((ln for ln in self.forward if ln.sym == sym), None)


class DerivationError(ValueError):
    pass


def _split_tag(rest):
    """(body, tag) where tag is the trailing ``[...]`` after two or more spaces."""
    s = rest.rstrip()
    if not s.endswith("]"):
        return s, None
    for m in re.finditer(r"\s{2,}\[", s):
        cand = s[m.end() - 1:]
        depth = 0
        ok = True
        for i, ch in enumerate(cand):
            depth += ch == "["
            depth -= ch == "]"
            if depth == 0 and i != len(cand) - 1:
                ok = False
                break
        if ok and depth == 0:
            return s[: m.start()], cand[1:-1].strip()
    return s, None


def _parse_line(sym, rest, lineno, where):
    body, tag = _split_tag(rest)
    parts = re.split(r"\s{2,}", body.strip())
    for i, part in enumerate(parts):
        if i > 0 and _SHAPE.match(part):
            return Line(sym, "  ".join(parts[:i]), part, "  ".join(parts[i + 1:]), tag, lineno)
    raise DerivationError(f"{where}, line {lineno}: '{sym} = ...' has no (shape) field after its formula "
                          f"(fields are separated by two or more spaces)")


def _parse_block(rows, where):
    """Lines of one literal block: ``SYM = ...`` starts a line, other text continues it. A
    formula too long for its line may put its (shape) and the rest on the next line."""
    raw = []  # [sym, rest, lineno, [continuation]]
    for lineno, t in rows:
        m = _SYM.match(t.strip())
        if m:
            raw.append([m.group(1), m.group(2), lineno, []])
        elif t.strip() and raw:
            raw[-1][3].append(t.strip())
    parsed = []
    for sym, rest, lineno, text in raw:
        try:
            ln = _parse_line(sym, rest, lineno, where)
        except DerivationError:
            if not text:
                raise
            ln = _parse_line(sym, rest + "  " + text[0], lineno, where)
            text = text[1:]
        ln.text = text
        parsed.append(ln)
    return parsed


def _literal_block(lines, marker, where, exact=False):
    """[(lineno, line)] of the literal block after the line ``marker`` (or ``Word, ...::``)."""
    word = marker[:-2]
    for i, ln in enumerate(lines):
        t = ln.strip()
        if t == marker or (not exact and t.endswith("::") and (t.startswith(word + ",") or t.startswith(word + " "))):
            indent = len(ln) - len(ln.lstrip())
            out = []
            for j in range(i + 1, len(lines)):
                t = lines[j]
                if t.strip() and len(t) - len(t.lstrip()) <= indent:
                    break
                out.append((j + 1, t))
            return out
    raise DerivationError(f"{where}: the module docstring has no line '{marker}' (or '{word}, ...::')")


def _apply_override(lines, heading, fwd, bwd, where):
    """Replace lines of ``fwd``/``bwd`` by those of the literal block under ``heading``."""
    found = None
    for i, ln in enumerate(lines):
        t = ln.strip()
        if heading in t and t.endswith("::"):
            found = t
            break
    if found is None:
        raise DerivationError(f"{where}: no literal block under a line containing {heading!r} and ending '::'")
    new = _parse_block(_literal_block(lines, found, where, exact=True), where)
    pending = []
    for ln in new:
        for section in (fwd, bwd):
            idx = next((i for i, old in enumerate(section) if old.sym == ln.sym), None)
            if idx is not None:
                section[idx] = ln
                section[idx:idx] = pending
                pending = []
                break
        else:
            pending.append(ln)
    if pending:
        raise DerivationError(f"{where}: the lines of {found!r} defining {', '.join(p.sym for p in pending)} "
                              f"replace no line and come before none that does")


def parse_derivation(doc: str, where="docstring", override=None, section=None,
                     markers=("Forward::", "Backward::")) -> Derivation:
    """The Forward and Backward lines of a module docstring (format: this module's docstring).

    ``override``: text of a line ending in ``::`` whose literal block replaces
    lines of the same symbols (a second block of the module, an option); a line with a
    new symbol is inserted before the next line of that block that replaces one.
    ``section``: text of a line after which the Forward and Backward blocks are looked for
    (a second block of the module with a derivation of its own).
    ``markers``: the lines introducing the two blocks, for a block of a module whose
    derivation shares nothing with the module's first one (``"DAF forward::"``)."""
    lines = doc.splitlines()
    if section:
        start = next((i for i, ln in enumerate(lines) if ln.strip() == section), None)  # a title line
        if start is None:
            start = next((i for i, ln in enumerate(lines) if section in ln), None)
        if start is None:
            raise DerivationError(f"{where}: no line containing {section!r}")
        lines = [""] * (start + 1) + lines[start + 1:]  # line numbers kept
    result = []
    for marker in markers:
        parsed = _parse_block(_literal_block(lines, marker, where), where)
        if not parsed:
            raise DerivationError(f"{where}: the '{marker}' block defines no symbol")
        result.append(parsed)
    fwd, bwd = result
    if override:
        _apply_override(lines, override, fwd, bwd, where)
    for ln in fwd:
        if not ln.tag:
            raise DerivationError(f"{where}, line {ln.lineno}: Forward line '{ln.sym}' has no [tag]")
    for ln in bwd:
        if not ln.sym.startswith("d") or len(ln.sym) < 2:
            raise DerivationError(f"{where}, line {ln.lineno}: Backward symbol '{ln.sym}' must be d + a Forward symbol")
    if fwd[-1].sym != "y":
        raise DerivationError(f"{where}: the last Forward line must define y (the output), got '{fwd[-1].sym}'")
    return Derivation(fwd, bwd)


def derivation_of(module_name: str, override=None, section=None, markers=("Forward::", "Backward::")) -> Derivation:
    mod = importlib.import_module(module_name)
    return parse_derivation(mod.__doc__ or "", module_name, override, section, markers)


def derivation_for(example: "Example") -> Derivation:
    """The derivation an example walks (its module's, with its override applied)."""
    return derivation_of(example.module, example.override, example.section, example.markers)


# ---- the op vocabulary -------------------------------------------------------------------


def op_vocabulary() -> dict:
    """The names a tag may use (a fresh dict): the ops of this module's docstring."""
    return _vocabulary()


def _vocabulary():
    from . import functional as F

    def v(fn):
        return lambda *a, **k: fn(*a, **k)[0]

    def batch_norm(x, gamma, beta, running_mean, running_var, training, eps=1e-5, momentum=0.1):
        return F.batch_norm_forward(x, gamma, beta, running_mean, running_var, training=training,
                                    momentum=momentum, eps=eps)[0]

    return {
        "np": np,
        "mean": lambda x, axis, keepdims=False: np.mean(x, axis=axis, keepdims=keepdims),
        "sum": lambda x, axis, keepdims=False: np.sum(x, axis=axis, keepdims=keepdims),
        "amax": lambda x, axis, keepdims=False, max_grad="split": F.amax_forward(x, axis, keepdims=keepdims,
                                                                                 max_grad=max_grad)[0],
        "linear": v(F.linear_forward),
        "conv1d": v(F.conv1d_forward),
        "conv2d": v(F.conv2d_forward),
        "relu": v(F.relu_forward),
        "sigmoid": v(F.sigmoid_forward),
        "tanh": v(F.tanh_forward),
        "silu": v(F.silu_forward),
        "gelu": v(F.gelu_forward),
        "hardswish": v(F.hardswish_forward),
        "hard_sigmoid": v(F.hard_sigmoid_forward),
        "abs": v(F.abs_forward),
        "softmax": v(F.softmax_forward),
        "l2_norm": lambda x, axis, keepdims=False: F.l2_norm_forward(x, axis, keepdims=keepdims)[0],
        "layer_norm2d": lambda x, gamma, beta, eps: F.layer_norm2d_forward(x, gamma, beta, eps=float(eps))[0],
        "logsumexp": lambda x, axis, keepdims=False: F.logsumexp_forward(x, axis, keepdims=keepdims)[0],
        "max_pool2d": v(F.max_pool2d_forward),
        "batch_norm": batch_norm,
        "sqrt": np.sqrt,
        "exp": np.exp,
        "log": np.log,
        "sign": np.sign,
        "concat": lambda arrays, axis: np.concatenate(arrays, axis=axis),
        "einsum": np.einsum,
        # attention (alphabetical)
        "layer_norm": lambda x, gamma, beta, eps: F.layer_norm_forward(x, gamma, beta, float(eps))[0],
        "matmul": np.matmul,
        "merge_heads": _merge_heads,
        "split_heads": _split_heads,
        # deformable convolution (npattn.blocks.deform), on the readable NumPy sampling
        "bilinear_sample": _deform_ops()["bilinear_sample"],
        "conv_cols": _deform_ops()["conv_cols"],
        "map_coordinates_clamped": _deform_ops()["map_coordinates_clamped"],
        "sample_positions": _deform_ops()["sample_positions"],
        "None": None,
        "True": True,
        "False": False,
    }


def _split_heads(a, heads):
    """(N, T, E) -> (N, heads, T, E / heads): head i owns channels i E / heads ... """
    N, T, E = a.shape
    heads = int(heads)
    return a.reshape(N, T, heads, E // heads).transpose(0, 2, 1, 3)


def _merge_heads(a):
    """(N, Nh, T, E_h) -> (N, T, Nh E_h), the inverse of :func:`_split_heads`."""
    N, Nh, T, E_h = a.shape
    return a.transpose(0, 2, 1, 3).reshape(N, T, Nh * E_h)


def _deform_ops():
    """The deformable convolution's steps: ``sample_positions(offset, kernel_hw, stride, padding,
    dilation)`` -> (py, px), ``bilinear_sample(x, py, px)`` -> xs (npattn.sampling.numpy), and
    ``conv_cols(Wd, cols, b, out_hw)``, the convolution as a product with the columns."""
    from .sampling import numpy as S

    def conv_cols(Wd, cols, b, out_hw):
        N = cols.shape[0]
        C_out, Cw = Wd.shape[:2]
        Gw = cols.shape[1] * cols.shape[2] // Cw  # weight groups
        X = cols.reshape(N, Gw, -1, cols.shape[-1])  # (N, Gw, Cw K, L): im2col's matrix per group
        y = np.einsum("gok,ngkl->ngol", Wd.reshape(Gw, C_out // Gw, -1), X).reshape((N, C_out) + tuple(out_hw))
        return y if b is None else y + b[None, :, None, None]

    return {"bilinear_sample": S.bilinear_sample, "conv_cols": conv_cols,
            "map_coordinates_clamped": S.map_coordinates_clamped, "sample_positions": S.sample_positions}


def _eval(tag, env):
    return eval(compile(tag, "<tag>", "eval"), {"__builtins__": {"range": range, "len": len, "float": float, "int": int}}, env)


# ---- capturing the code's locals -----------------------------------------------------------


class _Recorder:
    """Records, at each return, the locals of the frames of functions defined in some files:
    the block's module first, then shared modules (:attr:`Example.helpers`)."""

    def __init__(self, filenames):
        self.filenames = list(filenames)  # lookup order: the block's module, then the helpers
        self.frames = []  # (rank of the file, function name, {name: value}) in the order the calls returned

    def _local(self, frame, event, arg):
        if event == "return":
            snap = {}
            for k, val in frame.f_locals.items():
                if isinstance(val, np.ndarray):
                    snap[k] = np.array(val, copy=True)
                elif isinstance(val, dict):
                    snap[k] = {kk: np.array(vv, copy=True) for kk, vv in val.items() if isinstance(vv, np.ndarray)}
            sfx = frame.f_locals.get("suffix")  # a helper's call named by its caller: SYM + suffix
            if isinstance(sfx, str) and sfx:
                snap = {k + sfx: val for k, val in snap.items()}
            self.frames.append((self.filenames.index(frame.f_code.co_filename), frame.f_code.co_name, snap))
        return self._local

    def _global(self, frame, event, arg):
        if event == "call" and frame.f_code.co_filename in self.filenames:
            return self._local
        return None

    def run(self, fn, *args, **kwargs):
        old = sys.gettrace()
        self.frames = []
        sys.settrace(self._global)
        try:
            return fn(*args, **kwargs)
        finally:
            sys.settrace(old)

    def lookup(self, sym):
        """The value of ``sym``: a local of the outermost call (it returns last), else of a
        helper frame of the block's module (the first to return that has it), else of a
        frame of the helper modules (by their order, then the first to return), else an
        entry ``key`` of a local dict ``base`` for ``sym = base_key`` (the same order)."""
        rest = sorted(self.frames[:-1], key=lambda f: f[0])  # stable: the order of return within a file
        frames = [snap for _, _, snap in self.frames[-1:] + rest]
        for snap in frames:
            if isinstance(snap.get(sym), np.ndarray):
                return snap[sym]
        if "_" in sym:
            for snap in frames:
                for i in range(len(sym) - 1, 0, -1):
                    if sym[i] == "_" and isinstance(snap.get(sym[:i]), dict) and sym[i + 1:] in snap[sym[:i]]:
                        return snap[sym[:i]][sym[i + 1:]]
        return None


# ---- the walk ---------------------------------------------------------------------------------


@dataclass
class Step:
    """What the walk found for one line."""

    line: Line
    kind: str  # "forward" or "backward"
    value: np.ndarray | None
    source: str  # "code", "tag", "returned gradient", "missing"
    verdicts: list = field(default_factory=list)  # (ok, message)

    @property
    def ok(self):
        return self.value is not None and all(ok for ok, _ in self.verdicts)


@dataclass
class Walk:
    example: Example
    derivation: Derivation
    steps: list
    summary: list  # (ok, message)
    values: dict  # forward symbols (inputs included) -> value

    @property
    def ok(self):
        return all(s.ok for s in self.steps) and all(ok for ok, _ in self.summary)

    def shown(self) -> set:
        """The symbols whose values the walk shows."""
        return {s.line.sym for s in self.steps if s.value is not None}


def _shape_check(line, value, dims):
    """(ok, message) comparing value.shape with the line's symbolic shape; binds new names."""
    want = line.shape[1:-1].strip()
    entries = [e.strip() for e in want.split(",") if e.strip()] if want else []
    got = tuple(np.shape(value))
    if len(entries) != len(got):
        return False, f"shape {got} does not match {line.shape}"
    for e, n in zip(entries, got):
        if re.fullmatch(r"[A-Za-z_]\w*", e) and e not in dims:
            dims[e] = n
            continue
        try:
            expect = eval(e, {"__builtins__": {}}, dict(dims))
        except Exception:
            return False, f"shape entry {e!r} of {line.shape} names a size not met before"
        if expect != n:
            return False, f"shape {got} does not match {line.shape} ({e} = {expect})"
    return True, ""


def _close(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        return False, np.inf
    scale = max(np.max(np.abs(a), initial=0.0), np.max(np.abs(b), initial=0.0), 1e-300)
    err = float(np.max(np.abs(a - b), initial=0.0) / scale)
    return err <= 1e-12, err


def _random_state(block, rng):
    """Random parameters (the default initialisations are often degenerate: GCT's zeros) and
    BatchNorm statistics away from their defaults."""
    state = block.state_dict()
    for k, v in state.items():
        if v.dtype.kind != "f":
            continue
        if k.endswith("running_var"):
            state[k] = rng.uniform(0.5, 1.5, v.shape)
        elif k.endswith("running_mean"):
            state[k] = 0.1 * rng.standard_normal(v.shape)
        else:
            state[k] = 0.5 * rng.standard_normal(v.shape)
    block.load_state_dict(state)


def bindings_of(deriv: Derivation) -> dict:
    """Forward symbols bound to the block (tags calling ``param`` or ``attr``): sym -> Line."""
    return {ln.sym: ln for ln in deriv.forward if re.search(r"\b(param|buffer|attr)\s*\(", ln.tag)}


def local_check(deriv, sym, dsym_value, values, grads, rng, n_dirs=3):
    """The local check of the line ``d<sym>`` (module docstring): a list of (ok, message).
    ``values``: the forward symbols; ``grads``: the gradients walked so far (``dy`` included)."""
    return _local_check(deriv, sym, dsym_value, values, grads, rng, n_dirs)


def _local_check(deriv, sym, dsym_value, values, grads, rng, n_dirs=3):
    """Verdicts for ``d<sym>``: ``sum_L <dLHS_L, J_L v>`` against ``<dsym, v>``."""
    users = [ln for ln in deriv.forward if sym in ln.reads()]
    if not users:  # y does not depend on sym (iAFF's unused global_att2): its gradient must be exactly 0
        d = np.asarray(dsym_value)
        if sym in values and d.shape == np.shape(values[sym]) and not np.any(d):
            return [(True, f"local check through no line: no Forward tag reads {sym}, and d{sym} is exactly 0")]
        return [(False, f"no Forward tag reads {sym}: d{sym} has nothing to undo and is not exactly 0")]
    missing = [ln.sym for ln in users if grads.get("d" + ln.sym) is None]
    if missing:
        return [(False, f"d{sym} needs " + ", ".join("d" + m for m in missing) + ", not walked before it")]
    vocab = _vocabulary()
    x0 = np.asarray(values[sym], dtype=np.float64)
    eps = 1e-6 * max(1.0, float(np.max(np.abs(x0), initial=0.0)))
    out = []
    for _ in range(n_dirs):
        v = rng.standard_normal(x0.shape)
        lhs, scale_l = 0.0, 0.0
        for ln in users:
            env = dict(vocab, **values)
            try:  # a symbol the forward walk could not compute leaves the line unevaluable
                env[sym] = x0 + eps * v
                plus = np.asarray(_eval(ln.tag, env), dtype=np.float64)
                env[sym] = x0 - eps * v
                minus = np.asarray(_eval(ln.tag, env), dtype=np.float64)
            except Exception as exc:
                return [(False, f"the line of {ln.sym} cannot be evaluated: {type(exc).__name__}: {exc}")]
            jv = (plus - minus) / (2 * eps)
            g = np.asarray(grads["d" + ln.sym], dtype=np.float64)
            if g.shape != jv.shape:
                return [(False, f"d{ln.sym} has shape {g.shape}, its line's value {jv.shape}")]
            lhs += float(np.sum(g * jv))
            scale_l += float(np.linalg.norm(g) * np.linalg.norm(jv))
        d = np.asarray(dsym_value, dtype=np.float64)
        if d.shape != x0.shape:
            return [(False, f"d{sym} has shape {d.shape}, {sym} has {x0.shape}")]
        rhs = float(np.sum(d * v))
        scale = max(scale_l, float(np.linalg.norm(d) * np.linalg.norm(v)), 1e-300)
        err = abs(lhs - rhs) / scale
        out.append((err <= TOL, err, rhs, lhs))
    worst = max(out, key=lambda t: t[1])
    _, err, rhs, lhs = worst
    users_s = ", ".join(ln.sym for ln in users)
    msg = (f"local check through {users_s}, {n_dirs} directions: <d{sym}, v> = {rhs:+.10e}, "
           f"central differences {lhs:+.10e}, worst rel err {err:.1e}")
    return [(all(t[0] for t in out), msg)]


def walk(example: Example, seed: int = 0, *, n_dirs: int = 3) -> Walk:
    """Run ``example``'s block and walk its derivation (see the module docstring)."""
    from .gradcheck import gradcheck_block

    deriv = derivation_for(example)
    rng = np.random.default_rng(seed)
    block = example.build(rng)
    _random_state(block, rng)
    state0 = block.state_dict()
    inputs = {k: rng.standard_normal(shape) for k, shape in example.inputs.items()}
    mod = importlib.import_module(type(block).__module__)
    helpers = [inspect.getsourcefile(importlib.import_module(name)) for name in example.helpers]
    rec = _Recorder([inspect.getsourcefile(mod)] + helpers)

    if example.forward_kwargs:  # e.g. backend="numpy": the readable path
        block.forward = functools.partial(type(block).forward, block, **example.forward_kwargs)
    y_code, cache = rec.run(block.forward, **{k: v.copy() for k, v in inputs.items()}, training=example.training)
    fwd_frames = list(rec.frames)
    dy = rng.standard_normal(np.shape(y_code))
    input_grads, param_grads = rec.run(block.backward, dy.copy(), cache)
    bwd_frames = list(rec.frames)

    vocab = _vocabulary()
    dims = {}
    values = dict(inputs)
    values["training"] = example.training
    bindings = {}  # symbol -> (key, tag) for parameters
    steps = []

    def param(key):
        return state0[key]

    def attr(name):
        return getattr(block, name)

    rec.frames = fwd_frames
    for ln in deriv.forward:
        step = Step(ln, "forward", None, "missing")
        env = dict(vocab, **values, param=param, buffer=param, attr=attr)
        try:
            tagged = _eval(ln.tag, env)
        except Exception as exc:  # a tag that does not run is a failed line
            step.verdicts.append((False, f"tag [{ln.tag}] raised {type(exc).__name__}: {exc}"))
            steps.append(step)
            continue
        keys = re.findall(r"param\(\s*[\"']([^\"']+)[\"']\s*\)", ln.tag)
        if keys:
            bindings[ln.sym] = (keys[0], ln.tag)
        code = rec.lookup(ln.sym)
        if code is not None:
            ok, err = _close(tagged, code)
            step.verdicts.append((ok, f"tag equals the code's {ln.sym}" if ok
                                  else f"tag differs from the code's {ln.sym}: rel err {err:.1e}"))
            step.value, step.source = code, "code"
        else:
            bound = re.search(r"\b(buffer|attr)\s*\(", ln.tag)
            step.value = np.asarray(tagged)
            step.source = "parameter" if keys else (f"the block's {bound.group(1)}" if bound else "tag")
        ok, msg = _shape_check(ln, step.value, dims)
        if not ok:
            step.verdicts.append((False, msg))
        values[ln.sym] = step.value
        steps.append(step)

    rec.frames = bwd_frames
    grads = {"dy": dy}
    names_in = list(example.inputs)
    for ln in deriv.backward:
        sym = ln.sym[1:]
        step = Step(ln, "backward", None, "missing")
        code = rec.lookup(ln.sym)
        if code is not None:
            step.value, step.source = code, "code"
        elif sym in bindings:
            key, tag = bindings[sym]
            step.value = np.asarray(_eval(tag, dict(vocab, param=lambda k: param_grads[k], attr=attr)))
            step.source = f"returned gradient of {key}"
        elif sym in names_in:
            step.value, step.source = input_grads[names_in.index(sym)], "returned input gradient"
        if ln.tag:
            env = dict(vocab, **values, **grads, param=param, buffer=param, attr=attr)
            try:
                tagged = _eval(ln.tag, env)
                if step.value is None:
                    step.value, step.source = np.asarray(tagged), "tag"
                else:
                    ok, err = _close(tagged, step.value)
                    step.verdicts.append((ok, "tag equals the code's value" if ok else f"tag differs: rel err {err:.1e}"))
            except Exception as exc:
                step.verdicts.append((False, f"tag [{ln.tag}] raised {type(exc).__name__}: {exc}"))
        if step.value is None:
            step.verdicts.append((False, f"the code has no {ln.sym} and {sym} is no parameter or input"))
            steps.append(step)
            continue
        if sym not in values:
            step.verdicts.append((False, f"{sym} is not a Forward symbol"))
        else:
            ok, msg = _shape_check(ln, step.value, dims)
            if not ok:
                step.verdicts.append((False, msg))
            step.verdicts += _local_check(deriv, sym, step.value, values, grads, rng, n_dirs)
        grads[ln.sym] = step.value
        steps.append(step)

    summary = []
    ok, err = _close(y_code, values.get("y"))
    summary.append((ok, f"the block's output equals the walked y (rel err {err:.1e})"))
    for i, name in enumerate(names_in):
        if "d" + name in grads:
            ok, err = _close(input_grads[i], grads["d" + name])
            summary.append((ok, f"the block's gradient of input {name} equals the walked d{name} (rel err {err:.1e})"))
        else:
            summary.append((False, f"the derivation has no d{name}"))
    for sym, (key, tag) in bindings.items():
        if "d" + sym in grads:
            back = np.asarray(_eval(tag, dict(vocab, param=lambda k: param_grads[k], attr=attr)))
            ok, err = _close(back, grads["d" + sym])
            summary.append((ok, f"the block's gradient of {key} equals the walked d{sym} (rel err {err:.1e})"))
        else:
            summary.append((False, f"the derivation has no d{sym} (parameter {key})"))
    covered = {k for k, _ in bindings.values()}
    for key in block.parameter_names():
        if key not in covered:
            summary.append((False, f"parameter {key} is bound to no symbol"))
    block.load_state_dict(state0)
    rep = gradcheck_block(block, [inputs[k] for k in names_in], training=example.training, raise_on_failure=False,
                          structural=False)
    summary.append((rep.ok, f"float64 gradcheck of the whole block: max rel err {rep.max_rel_err:.1e}"))
    return Walk(example, deriv, steps, summary, values)


# ---- printing -------------------------------------------------------------------------------------


def _few(value, n):
    flat = np.ravel(np.asarray(value, dtype=np.float64))
    shown = " ".join(f"{v:+.4f}" for v in flat[:n])
    return f"[{shown}{' ...' if flat.size > n else ''}]"


def report(w: Walk, n_values: int = 4, stream=None) -> None:
    out = stream or sys.stdout
    p = lambda s="": print(s, file=out)  # noqa: E731
    ex = w.example
    shapes = ", ".join(f"{k} {tuple(v)}" for k, v in ex.inputs.items())
    p(f"{ex.name}: the derivation of {ex.module}, walked on float64 {shapes}, "
      f"{'training' if ex.training else 'eval'} mode")
    for kind in ("forward", "backward"):
        p()
        p("Forward (each tag evaluated and compared with the code):" if kind == "forward" else
          "Backward (each line checked alone against central differences of the forward lines it undoes):")
        for s in (s for s in w.steps if s.kind == kind):
            ln = s.line
            shape = "-" if s.value is None else str(tuple(np.shape(s.value)))
            p(f"  {ln.sym} = {ln.math}")
            p(f"      {shape:<16} {ln.shape:<14} {ln.reason}")
            for t in ln.text:
                p(f"      {t}")
            if s.value is not None:
                p(f"      value ({s.source}): {_few(s.value, n_values)}")
            if not s.verdicts and s.value is not None:
                p("      ok")
            for ok, msg in s.verdicts:
                p(f"      {'ok  ' if ok else 'FAIL'} {msg}")
    p()
    p("Summary:")
    n_f = sum(1 for s in w.steps if s.kind == "forward")
    n_b = sum(1 for s in w.steps if s.kind == "backward")
    bad = [s.line.sym for s in w.steps if not s.ok]
    p(f"  {n_f} forward lines, {n_b} backward lines; "
      + ("every line passed" if not bad else f"FAILED lines: {', '.join(bad)}"))
    for ok, msg in w.summary:
        p(f"  {'ok  ' if ok else 'FAIL'} {msg}")
    p(f"\n{ex.name}: {'all checks passed' if w.ok else 'some checks FAILED'}")


def explain(name: str, seed: int = 0, n_values: int = 4, stream=None) -> bool:
    """Walk the block ``name`` (case-insensitive) and print the walk; True when all passed."""
    w = walk(find_example(name), seed)
    report(w, n_values, stream)
    return w.ok
