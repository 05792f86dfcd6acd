"""Global context block (Cao, Xu, Lin, Wei, Hu: "GCNet: Non-local Networks Meet
Squeeze-Excitation Networks and Beyond", ICCV workshops 2019), in timm's layout
(``timm.layers.global_context.GlobalContext``).

One context vector per image, from softmax attention pooling (``use_attn``) or the mean,
transformed by one or two MLPs with LayerNorm over their D hidden channels, fused into
the map by a sigmoid gate (``fuse_scale``) and/or by addition (``fuse_add``). For x of
shape (N, C, H, W), L = H W positions and x_l the column of x at position l. The lines
below are timm's default configuration (``use_attn``, ``fuse_scale``, no ``fuse_add``),
in ``npattn.explain``'s format, with the 1x1 convolutions on the (N, C, 1, 1) context
written as matrices (``W1 = mlp_scale.fc1.weight[:, :, 0, 0]``); ``npattn explain
GlobalContext`` walks them. The MLP is timm's ConvMlp: 1x1 convs with bias, LayerNorm2d
of eps ``ln_eps`` (1e-6 as timm, 1e-5 as the official GCNet code's nn.LayerNorm).

Forward::

    Wa = conv_attn.weight              (1, C)        the attention logits' 1x1 conv     [param("conv_attn.weight")[:, :, 0, 0]]
    ba = conv_attn.bias                (1,)                                             [param("conv_attn.bias")]
    W1 = mlp_scale.fc1.weight          (D, C)        the MLP's first layer              [param("mlp_scale.fc1.weight")[:, :, 0, 0]]
    b1 = mlp_scale.fc1.bias            (D,)                                             [param("mlp_scale.fc1.bias")]
    gamma = mlp_scale.norm.weight      (D,)          the LayerNorm's scale              [param("mlp_scale.norm.weight")]
    beta = mlp_scale.norm.bias         (D,)          and shift                          [param("mlp_scale.norm.bias")]
    eps = ln_eps                       ()                                               [attr("ln_eps")]
    W2 = mlp_scale.fc2.weight          (C, D)        the MLP's second layer             [param("mlp_scale.fc2.weight")[:, :, 0, 0]]
    b2 = mlp_scale.fc2.bias            (C,)                                             [param("mlp_scale.fc2.bias")]
    e = Wa x_l + ba                    (N, L)        one logit per position             [(Wa @ x.reshape(x.shape[0], x.shape[1], -1))[:, 0] + ba]
    p = softmax_l(e)                   (N, L)        attention weights over the positions  [softmax(e, -1)]
    s = sum_l x_l p_l                  (N, C)        the context: attention pooling     [einsum("ncl,nl->nc", x.reshape(x.shape[0], x.shape[1], -1), p)]
    h = s W1^T + b1                    (N, D)        fc1                                [linear(s, W1, b1)]
    hn = LN(h)                         (N, D)        gamma (h - mean_D h) / sqrt(var_D h + eps) + beta  [layer_norm(h, gamma, beta, eps)]
    a = relu(hn)                       (N, D)                                           [relu(hn)]
    z = a W2^T + b2                    (N, C)        fc2                                [linear(a, W2, b2)]
    g = sigmoid(z)                     (N, C)        the channel gate                   [sigmoid(z)]
    y = x * g[:, :, None, None]        (N, C, H, W)  fuse_scale: gate broadcast over H W  [x * g[:, :, None, None]]

The options change single lines (names as in the constructor)::

    use_attn=False:  s = mean_{H, W} x, no conv_attn (e, p drop out)
    fuse_add=True:   a second MLP "mlp_add" with its own W1, b1, gamma, beta, W2, b2 gives
                     z_add from s, and y = (x * g) + z_add[:, :, None, None] (y = x + z_add
                     with fuse_scale=False)

Backward, for dy = dL/dy, in the order the code computes it::

    dg = sum_{H, W} dy * x             (N, C)        y is linear in g, broadcast over H W
    dz = dg * g (1 - g)                (N, C)        sigmoid' = g (1 - g)
    dW2 = dz^T a                       (C, D)        z is linear in W2, row n adds dz[n] a[n]^T
    db2 = sum_n dz                     (C,)          b2 is added to every row
    da = dz W2                         (N, D)        z is linear in a
    dhn = da * [hn > 0]                (N, D)        relu' = [hn > 0]; relu'(0) = 0, as PyTorch
    dgamma = sum_n dhn * h_hat         (D,)          hn = gamma h_hat + beta, h_hat = (h - mean_D h) r
    dbeta = sum_n dhn                  (D,)
    dh = r (dhn' - mean_D dhn' - h_hat mean_D(dhn' h_hat))
                                       (N, D)        LN's backward, dhn' = dhn gamma and r = 1 / sqrt(var_D h + eps):
                                                     the mean removes the average of dhn', the variance
                                                     its part along h_hat
    dW1 = dh^T s                       (D, C)        h is linear in W1
    db1 = sum_n dh                     (D,)
    ds = dh W1                         (N, C)        h is linear in s (with fuse_add: plus mlp_add's share)
    dp = sum_c ds * x                  (N, L)        s is linear in p: dp[n, l] = ds[n] . x_l
    de = p * (dp - sum_l p dp)         (N, L)        softmax's backward (its Jacobian diag(p) - p p^T)
    dWa = sum_{n, l} de x_l^T          (1, C)        e is linear in Wa
    dba = sum_{n, l} de                (1,)          0 exactly (below): the block returns zeros
    dx = dy * g + ds p + Wa^T de       (N, C, H, W)  three paths: the gate's factor, s = sum_l x_l p_l
                                                     (dx_l += ds p_l) and the logits (dx_l += Wa^T de_l)
                                                     (use_attn=False: dx = dy * g + ds / (H W))

Exact zeros:
- ``conv_attn.bias``: softmax is unchanged by adding a constant to all its inputs, so
  the bias does not change y; in exact arithmetic ``dba = sum_l de = sum p dp - (sum p)
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
    gate: np.ndarray  # (N, C, 1, 1) g = sigmoid(z) (None without fuse_scale)
    mlp_add: tuple  # (fc1, norm, relu, fc2) caches (None without fuse_add)


class GlobalContext(Block):
    """Global context block in timm's layout (module docstring).

    Parameters
    ----------
    channels : int
    use_attn : bool, default True
        Softmax attention pooling through ``conv_attn`` (else the spatial mean).
    fuse_add : bool, default False
        Add ``mlp_add(s)`` (s the context).
    fuse_scale : bool, default True
        Multiply by ``sigmoid(mlp_scale(s))``.
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

    def _mlp(self, prefix, s):
        """The MLP ``prefix`` on the context s (N, C): ``(z (N, C), caches)``."""
        st = self._state
        h, k1 = pointwise(self, f"{prefix}fc1.", s)  # (N, D)
        hn, kn = F.layer_norm2d_forward(h, st[f"{prefix}norm.weight"], st[f"{prefix}norm.bias"], eps=self.ln_eps)
        a, kr = F.relu_forward(hn)  # (N, D)
        z, k2 = pointwise(self, f"{prefix}fc2.", a)  # (N, C)
        return z, (k1, kn, kr, k2)

    def _mlp_backward(self, prefix, dz, caches, grads):
        """The MLP's backward: adds dW2, db2, dgamma, dbeta, dW1, db1 into ``grads``, returns ds (N, C)."""
        k1, kn, kr, k2 = caches
        da = pointwise_backward(self, f"{prefix}fc2.", dz, k2, grads)  # (N, D); dW2, db2
        dhn = F.relu_backward(da, kr)["x"]  # (N, D)
        g_norm = F.layer_norm2d_backward(dhn, kn)
        grads[f"{prefix}norm.weight"] += g_norm["weight"]  # dgamma
        grads[f"{prefix}norm.bias"] += g_norm["bias"]  # dbeta
        dh = g_norm["x"]  # (N, D)
        return pointwise_backward(self, f"{prefix}fc1.", dh, k1, grads)  # (N, C); dW1, db1

    def forward(self, x, training=False):
        """Returns ``(y, cache)``; both modes compute the same (no batch statistics)."""
        x = self._check_input("x", x, 4, self.channels)
        if self.use_attn:
            self._check_image("x", x, "a softmax over no positions; timm's 1x1 conv_attn refuses an empty image")
        N, C, H, W = x.shape
        if not (self.fuse_scale or self.fuse_add):
            return x.copy(), GlobalContextCache(x, None, None, None, None, None)
        xr = x.reshape(N, C, H * W)  # (N, C, L)
        p = k_soft = None
        if self.use_attn:
            st = self._state
            e = np.einsum("c,ncl->nl", st["conv_attn.weight"].reshape(C), xr) + st["conv_attn.bias"]  # (N, L)
            p, k_soft = F.softmax_forward(e, axis=-1)  # (N, L)
            s = np.einsum("ncl,nl->nc", xr, p)  # (N, C)
        else:
            s = x.mean(axis=(2, 3))  # (N, C)
        y = x
        k_scale = k_add = gate = None
        if self.fuse_scale:
            z, k_scale = self._mlp("mlp_scale.", s)  # (N, C)
            g = F.sigmoid(z)  # (N, C)
            gate = g.reshape(N, C, 1, 1)  # (N, C, 1, 1)
            y = y * gate  # (N, C, H, W)
        if self.fuse_add:
            z_add, k_add = self._mlp("mlp_add.", s)  # (N, C)
            y = y + z_add.reshape(N, C, 1, 1)  # (N, C, H, W)
        return y, GlobalContextCache(x, p, k_soft, k_scale, gate, k_add)

    def backward(self, grad_out, cache: GlobalContextCache):
        """Returns ``((dx,), grads)`` with a gradient for every parameter key
        (``conv_attn.bias`` exactly zero, see the module docstring)."""
        op = "GlobalContext.backward"
        x = cache.x
        dy = float_array(op, "grad_out", grad_out, 4, "(N, C, H, W)")
        shape_is(op, "grad_out", dy, x.shape)
        same_dtype(op, "x", x, grad_out=dy)
        N, C, H, W = x.shape
        grads = self.zero_grads()  # the MLPs' dW1, db1, dgamma, dbeta, dW2, db2 and dWa are added into it
        if not (self.fuse_scale or self.fuse_add):
            return (dy.copy(),), grads  # y = x; conv_attn unused: zero gradients
        xr = x.reshape(N, C, H * W)  # (N, C, L)
        ds = np.zeros((N, C), dtype=x.dtype)  # (N, C)
        if self.fuse_scale:
            gate = cache.gate  # (N, C, 1, 1)
            dg = np.einsum("ncl,ncl->nc", dy.reshape(N, C, H * W), xr)  # (N, C)
            dz = dg * (gate * (1 - gate)).reshape(N, C)  # (N, C)
            ds += self._mlp_backward("mlp_scale.", dz, cache.mlp_scale, grads)
            dx = dy * gate  # (N, C, H, W)
        else:
            dx = dy.copy()  # (N, C, H, W)
        if self.fuse_add:
            dz_add = dy.sum(axis=(2, 3))  # (N, C)
            ds += self._mlp_backward("mlp_add.", dz_add, cache.mlp_add, grads)
        if self.use_attn:
            p = cache.attn  # (N, L)
            dxr = dx.reshape(N, C, H * W)  # (N, C, L) a view: updates dx
            dxr += ds[:, :, None] * p[:, None, :]  # through s = sum_l x_l p_l
            dp = np.einsum("nc,ncl->nl", ds, xr)  # (N, L)
            de = F.softmax_backward(dp, cache.softmax)["x"]  # (N, L)
            w_attn = self._state["conv_attn.weight"].reshape(C)  # (C,)
            grads["conv_attn.weight"] = np.einsum("nl,ncl->c", de, xr).reshape(1, C, 1, 1)  # (1, C, 1, 1) dWa
            # conv_attn.bias: dba is 0 exactly (softmax ignores a common shift), left as zeros
            dxr += w_attn[None, :, None] * de[:, None, :]  # through the logits e
        else:
            dx += (ds * inv_area(x.dtype, H, W)).reshape(N, C, 1, 1)
        return (dx,), grads
