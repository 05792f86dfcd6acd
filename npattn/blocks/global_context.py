"""Global context block (Cao, Xu, Lin, Wei, Hu: "GCNet: Non-local Networks Meet
Squeeze-Excitation Networks and Beyond", ICCV workshops 2019), in timm's layout
(``timm.layers.global_context.GlobalContext``).

One context vector per image, from softmax attention pooling (``use_attn``) or the mean,
transformed by one or two MLPs with LayerNorm over their D hidden channels, fused into
the map by a sigmoid gate (``fuse_scale``) and/or by addition (``fuse_add``). For x of
shape (N, C, H, W), L = H W and x_l its columns::

    attention pooling (use_attn; conv_attn: weight w (1, C, 1, 1), bias b (1,)):
    l[n, i]   = sum_c w[c] x[n, c, i] + b                   (N, L)
    p         = softmax_i(l)                                (N, L)
    ctx[n, c] = sum_i x[n, c, i] p[n, i]                    (N, C)
    otherwise ctx = mean_{h, w} x                           (N, C)

    MLP "mlp_scale" / "mlp_add" (timm's ConvMlp: 1x1 convs with bias, LayerNorm2d eps
    ``ln_eps``: 1e-6 as timm, 1e-5 as the official GCNet code's nn.LayerNorm):
    h  = fc1(ctx)                                           (N, D)
    hn = LN(h)   = gamma (h - mean_d h) / sqrt(var_d h + ln_eps) + beta
    o  = fc2(relu(hn))                                      (N, C)

    y  = x                                                  (N, C, H, W)
    y  = y * sigmoid(o_scale)          (fuse_scale)         gate broadcast over (H, W)
    y  = y + o_add                     (fuse_add)           shift broadcast over (H, W)

Backward, for dy = dL/dy::

    fuse_scale:  dg = sum_{h, w} dy * x;  do_scale = dg g (1 - g);   dx = dy * g   (else dx = dy)
    fuse_add:    do_add = sum_{h, w} dy
    each MLP:    fc2, relu (relu'(0) = 0), LN, fc1 backward -> dctx (summed over the MLPs)
                 LN: dh = r (dhn' - mean_d dhn' - hn_hat mean_d(dhn' hn_hat)), dhn' = dhn gamma
    use_attn:    dx[n, c, i] += dctx[n, c] p[n, i]
                 dp[n, i]  = sum_c dctx[n, c] x[n, c, i]
                 dl        = p (dp - sum_i p dp)                      (softmax)
                 dw[c]     = sum_{n, i} dl[n, i] x[n, c, i]
                 dx[n, c, i] += w[c] dl[n, i]
    mean:        dx += dctx / (H W)

Exact zeros:
- ``conv_attn.bias``: softmax is unchanged by adding a constant to all its inputs, so
  the bias does not change y; in exact arithmetic ``db = sum_i dl = sum p dp - (sum p)
  (sum p dp) = 0``. The block returns exact zeros.
- With ``fuse_scale=False`` and ``fuse_add=False`` there is no MLP and y = x; timm
  still builds ``conv_attn``, which is then unused: its gradients are exact zeros.

Initialisation (``init="timm"``, the default) as timm's: ``conv_attn.weight`` from
N(0, 2 / C) (kaiming normal, fan_in), ``mlp_add.fc2.weight`` zeros (so a fresh block adds
nothing; timm 1.0.31 does this whatever ``init_last_zero`` says: the argument is stored
and has no effect, here too), LayerNorm weight 1 and bias 0, the other convolutions
PyTorch's default. ``init="gcnet"`` is the official code's (xvjiarui/GCNet
``ContextBlock.reset_parameters``): ``conv_attn`` kaiming normal (fan_in) with bias 0,
and the last conv of BOTH MLPs zeroed, weight and bias (``last_zero_init``): a fresh
block adds nothing and gates by sigmoid(0) = 1/2.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .. import functional as F
from .._checks import float_array, positive_int, same_dtype, shape_is
from ._timm import check_bool, check_real, pointwise, pointwise_backward, reduced_channels
from .base import Block, inv_area, make_rng

__all__ = ["GlobalContext"]

LAYER_NORM_EPS = 1e-6  # timm's LayerNorm2d default


@dataclass(frozen=True)
class GlobalContextCache:
    x: np.ndarray  # (N, C, H, W) the input
    attn: np.ndarray  # (N, L) softmax weights p (None without use_attn)
    softmax: object  # SoftmaxCache of p (None without use_attn)
    mlp_scale: tuple  # (fc1, norm, relu, fc2) caches on (N, D) / (N, C) vectors (None without fuse_scale)
    gate: np.ndarray  # (N, C, 1, 1) sigmoid(o_scale) (None without fuse_scale)
    mlp_add: tuple  # (fc1, norm, relu, fc2) caches (None without fuse_add)


class GlobalContext(Block):
    """Global context block in timm's layout (module docstring).

    Parameters
    ----------
    channels : int
    use_attn : bool, default True
        Softmax attention pooling through ``conv_attn`` (else the spatial mean).
    fuse_add : bool, default False
        Add ``mlp_add(ctx)``.
    fuse_scale : bool, default True
        Multiply by ``sigmoid(mlp_scale(ctx))``.
    init_last_zero : bool, default False
        Accepted and stored; no effect (as in timm 1.0.31, which zero-initialises
        ``mlp_add.fc2.weight`` in every case).
    rd_ratio : float, default 1/8
    rd_channels : int or None, default None
        Hidden width D; None computes ``make_divisible(channels * rd_ratio, rd_divisor,
        round_limit=0)``. (timm tests ``is None`` here, so 0 is not "compute"; npattn
        refuses 0.)
    rd_divisor : int, default 1
    ln_eps : float, default 1e-6
        eps of the MLPs' LayerNorms: timm's 1e-6, or 1e-5 as the official GCNet code
        (``nn.LayerNorm([planes, 1, 1])``).
    init : {"timm", "gcnet"}, default "timm"
        The initialisation (module docstring): timm's, or the official code's, which
        zeroes the weight and the bias of the last conv of both MLPs.
    rng : None, int or numpy.random.Generator
    dtype : float32 (default) or float64

    State_dict keys (timm's order): ``conv_attn.{weight (1, C, 1, 1), bias (1,)}`` with
    ``use_attn``, then ``mlp_add.*`` with ``fuse_add``, then ``mlp_scale.*`` with
    ``fuse_scale``, each MLP ``fc1.{weight (D, C, 1, 1), bias (D,)}``, ``norm.{weight,
    bias}`` (D,), ``fc2.{weight (C, D, 1, 1), bias (C,)}``. No batch statistics: training
    and eval compute the same.
    """

    def __init__(self, channels, use_attn=True, fuse_add=False, fuse_scale=True, init_last_zero=False,
                 rd_ratio=1.0 / 8, rd_channels=None, rd_divisor=1, *, ln_eps=LAYER_NORM_EPS, init="timm", rng=None,
                 dtype=np.float32):
        super().__init__(dtype)
        op = "GlobalContext"
        self.config = dict(channels=channels, use_attn=use_attn, fuse_add=fuse_add, fuse_scale=fuse_scale,
                           init_last_zero=init_last_zero, rd_ratio=rd_ratio, rd_channels=rd_channels,
                           rd_divisor=rd_divisor)
        self.channels = positive_int(op, "channels", channels)
        self.use_attn = check_bool(op, "use_attn", use_attn)
        self.fuse_add = check_bool(op, "fuse_add", fuse_add)
        self.fuse_scale = check_bool(op, "fuse_scale", fuse_scale)
        self.init_last_zero = check_bool(op, "init_last_zero", init_last_zero)
        self.rd_channels = reduced_channels(op, self.channels, rd_ratio, rd_channels, rd_divisor, zero_is_none=False)
        self.ln_eps = check_real(op, "ln_eps", ln_eps)
        if init not in ("timm", "gcnet"):
            raise ValueError(f"{op}: init must be 'timm' or 'gcnet', got {init!r}")
        self.init = init
        rng = make_rng(rng)
        c, d = self.channels, self.rd_channels
        if self.use_attn:
            self._add_conv("conv_attn.", rng, c, 1, 1)
            self._state["conv_attn.weight"] = (rng.standard_normal((1, c, 1, 1)) * math.sqrt(2.0 / c)).astype(self.dtype)
        for name, used in (("mlp_add.", self.fuse_add), ("mlp_scale.", self.fuse_scale)):
            if used:
                self._add_conv(f"{name}fc1.", rng, c, d, 1)
                self._add_param(f"{name}norm.weight", np.ones(d))
                self._add_param(f"{name}norm.bias", np.zeros(d))
                self._add_conv(f"{name}fc2.", rng, d, c, 1)
        if self.fuse_add:
            self._state["mlp_add.fc2.weight"] = np.zeros((c, d, 1, 1), dtype=self.dtype)
        if self.init == "gcnet":  # the official last_zero_init on both MLPs, conv_mask's bias 0
            for k in ("conv_attn.bias", "mlp_add.fc2.weight", "mlp_add.fc2.bias", "mlp_scale.fc2.weight",
                      "mlp_scale.fc2.bias"):
                if k in self._state:
                    self._state[k] = np.zeros_like(self._state[k])

    def _mlp(self, prefix, v):
        s = self._state
        h, k1 = pointwise(self, f"{prefix}fc1.", v)  # (N, D)
        hn, kn = F.layer_norm2d_forward(h, s[f"{prefix}norm.weight"], s[f"{prefix}norm.bias"], eps=self.ln_eps)
        a, kr = F.relu_forward(hn)  # (N, D)
        o, k2 = pointwise(self, f"{prefix}fc2.", a)  # (N, C)
        return o, (k1, kn, kr, k2)

    def _mlp_backward(self, prefix, d_o, caches, grads):
        k1, kn, kr, k2 = caches
        d_a = pointwise_backward(self, f"{prefix}fc2.", d_o, k2, grads)  # (N, D)
        d_hn = F.relu_backward(d_a, kr)["x"]  # (N, D)
        g = F.layer_norm2d_backward(d_hn, kn)
        grads[f"{prefix}norm.weight"] += g["weight"]
        grads[f"{prefix}norm.bias"] += g["bias"]
        return pointwise_backward(self, f"{prefix}fc1.", g["x"], k1, grads)  # (N, C)

    def forward(self, x, training=False):
        """Returns ``(y, cache)``; both modes compute the same (no batch statistics)."""
        x = self._check_input("x", x, 4, self.channels)
        if self.use_attn:
            self._check_image("x", x, "a softmax over no positions; timm's 1x1 conv_attn refuses an empty image")
        n, c, h, w = x.shape
        if not (self.fuse_scale or self.fuse_add):
            return x.copy(), GlobalContextCache(x, None, None, None, None, None)
        xr = x.reshape(n, c, h * w)  # (N, C, L)
        p = k_soft = None
        if self.use_attn:
            s = self._state
            logits = np.einsum("c,ncl->nl", s["conv_attn.weight"].reshape(c), xr) + s["conv_attn.bias"]  # (N, L)
            p, k_soft = F.softmax_forward(logits, axis=-1)  # (N, L)
            ctx = np.einsum("ncl,nl->nc", xr, p)  # (N, C)
        else:
            ctx = x.mean(axis=(2, 3))  # (N, C)
        y = x
        k_scale = k_add = gate = None
        if self.fuse_scale:
            o_scale, k_scale = self._mlp("mlp_scale.", ctx)  # (N, C)
            gate = F.sigmoid(o_scale).reshape(n, c, 1, 1)  # (N, C, 1, 1)
            y = y * gate  # (N, C, H, W)
        if self.fuse_add:
            o_add, k_add = self._mlp("mlp_add.", ctx)  # (N, C)
            y = y + o_add.reshape(n, c, 1, 1)  # (N, C, H, W)
        return y, GlobalContextCache(x, p, k_soft, k_scale, gate, k_add)

    def backward(self, grad_out, cache: GlobalContextCache):
        """Returns ``((dx,), grads)`` with a gradient for every parameter key
        (``conv_attn.bias`` exactly zero, see the module docstring)."""
        op = "GlobalContext.backward"
        x = cache.x
        dy = float_array(op, "grad_out", grad_out, 4, "(N, C, H, W)")
        shape_is(op, "grad_out", dy, x.shape)
        same_dtype(op, "x", x, grad_out=dy)
        n, c, h, w = x.shape
        grads = self.zero_grads()
        if not (self.fuse_scale or self.fuse_add):
            return (dy.copy(),), grads  # y = x; conv_attn unused: zero gradients
        xr = x.reshape(n, c, h * w)  # (N, C, L)
        d_ctx = np.zeros((n, c), dtype=x.dtype)  # (N, C)
        if self.fuse_scale:
            g = cache.gate
            d_g = np.einsum("ncl,ncl->nc", dy.reshape(n, c, h * w), xr)  # (N, C)
            d_o = d_g * (g * (1 - g)).reshape(n, c)  # (N, C)
            d_ctx += self._mlp_backward("mlp_scale.", d_o, cache.mlp_scale, grads)
            d_x = dy * g  # (N, C, H, W)
        else:
            d_x = dy.copy()  # (N, C, H, W)
        if self.fuse_add:
            d_o = dy.sum(axis=(2, 3))  # (N, C)
            d_ctx += self._mlp_backward("mlp_add.", d_o, cache.mlp_add, grads)
        if self.use_attn:
            p = cache.attn  # (N, L)
            d_xr = d_x.reshape(n, c, h * w)  # (N, C, L) a view: updates d_x
            d_xr += d_ctx[:, :, None] * p[:, None, :]  # through ctx = sum_i x p
            d_p = np.einsum("nc,ncl->nl", d_ctx, xr)  # (N, L)
            d_l = F.softmax_backward(d_p, cache.softmax)["x"]  # (N, L)
            w_attn = self._state["conv_attn.weight"].reshape(c)  # (C,)
            grads["conv_attn.weight"] = np.einsum("nl,ncl->c", d_l, xr).reshape(1, c, 1, 1)  # (1, C, 1, 1)
            # conv_attn.bias: 0 exactly (softmax ignores a common shift), left as zeros
            d_xr += w_attn[None, :, None] * d_l[:, None, :]  # through the logits
        else:
            d_x += (d_ctx * inv_area(x.dtype, h, w)).reshape(n, c, 1, 1)
        return (d_x,), grads
