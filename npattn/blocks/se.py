"""Squeeze-and-excitation (Hu, Shen, Sun: "Squeeze-and-Excitation Networks", CVPR 2018).

The layout is the common PyTorch one, ``fc = Sequential(Linear(C, C//r), ReLU,
Linear(C//r, C), Sigmoid)`` with state_dict keys ``fc.0.weight`` and ``fc.2.weight``
(plus ``fc.0.bias`` and ``fc.2.bias`` with ``bias=True``, as in the original Caffe model).

For x of shape (N, C, H, W) and D = C // r (H and W are sizes; h is the hidden layer).
The format of the two blocks below (one symbol a line, its shape, its reason, and for
the forward an executable tag) is described in ``npattn.explain``; ``npattn explain
SEBlock`` walks them on numbers.

Forward::

    W1 = fc.0.weight                   (D, C)        fc.0's weight                     [param("fc.0.weight")]
    b1 = fc.0.bias                     (D,)          fc.0's bias (bias=True)           [param("fc.0.bias")]
    W2 = fc.2.weight                   (C, D)        fc.2's weight                     [param("fc.2.weight")]
    b2 = fc.2.bias                     (C,)          fc.2's bias (bias=True)           [param("fc.2.bias")]
    s = mean_{H, W} x                  (N, C)        squeeze                           [mean(x, (2, 3))]
    h = s W1^T + b1                    (N, D)        fc.0                              [linear(s, W1, b1)]
    a = relu(h)                        (N, D)        fc.1                              [relu(h)]
    z = a W2^T + b2                    (N, C)        fc.2                              [linear(a, W2, b2)]
    g = sigmoid(z)                     (N, C)        fc.3, the channel gate            [sigmoid(z)]
    y = x * g[:, :, None, None]        (N, C, H, W)  excitation                        [x * g[:, :, None, None]]

Backward, for dy = dL/dy, in the order the code computes it::

    dg = sum_{H, W} dy * x             (N, C)        y is bilinear in (x, g): dy/dg is x
    dz = dg * g * (1 - g)              (N, C)        sigmoid' = g (1 - g)
    dW2 = dz^T a                       (C, D)        z is linear in W2, row n adds dz[n] a[n]^T
    db2 = sum_n dz                     (C,)          b2 is added to every row
    da = dz W2                         (N, D)        z is linear in a
    dh = da * [h > 0]                  (N, D)        relu' = [h > 0]; relu'(0) = 0, as PyTorch
    dW1 = dh^T s                       (D, C)        h is linear in W1
    db1 = sum_n dh                     (D,)          b1 is added to every row
    ds = dh W1                         (N, C)        h is linear in s
    dx = dy * g + ds / (H W)           (N, C, H, W)  both paths from x to y: the gate's factor, and
                                                     the squeeze, whose mean spreads ds evenly

(without bias, b1 = b2 = 0 and their lines drop out.)

``SEModule`` is the same computation in timm's layout (``timm.layers.SEModule``, the SE
of timm's ResNets and EfficientNets): the two layers are 1x1 convolutions ``fc1`` (D, C,
1, 1) and ``fc2`` (C, D, 1, 1) with biases by default, and the hidden width is timm's
``D = make_divisible(C * rd_ratio, rd_divisor, round_limit=0)`` unless ``rd_channels``
is given. On the pooled (N, C, 1, 1) map a 1x1 convolution is the linear layer above
with W1 = fc1.weight[:, :, 0, 0], so the forward and backward are the lines above, with
these bindings (``npattn explain SEModule`` walks them)::

    W1 = fc1.weight[:, :, 0, 0]        (D, C)        fc1's 1x1 kernel as a matrix      [param("fc1.weight")[:, :, 0, 0]]
    b1 = fc1.bias                      (D,)          fc1's bias                        [param("fc1.bias")]
    W2 = fc2.weight[:, :, 0, 0]        (C, D)        fc2's 1x1 kernel as a matrix      [param("fc2.weight")[:, :, 0, 0]]
    b2 = fc2.bias                      (C,)          fc2's bias                        [param("fc2.bias")]

timm's options of ``SEModule`` change single lines (timm's semantics and keys)::

    add_maxpool:  s = 0.5 mean_{h, w} x + 0.5 max_{h, w} x          ds reaches x through both pools,
                  dx += 0.5 ds / (H W) + 0.5 ds * [x == max] / t   (ties split evenly, as torch.amax)
    norm:         h = BN(s W1^T + b1), keys bn.* (D,)              dh through BatchNorm's backward;
                  in training b1's gradient is exactly 0 (a constant shift the batch mean removes)
    act:          a = act(h): "relu" (default), "silu" x sigmoid(x), "hardswish" x relu6(x + 3) / 6,
                  "gelu" x Phi(x) (exact erf)                      dh = da * act'(h)
    gate:         g = sigmoid(z) (default) or "hard_sigmoid" relu6(z + 3) / 6
                                                                    dz = dg * gate'(z)

each activation's derivative and its choice at kinks are in ``npattn.functional``
(``silu_forward``, ``gelu_forward``, ``hardswish_forward``, ``hard_sigmoid_forward``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import functional as F
from .._checks import float_array, positive_int, same_dtype, shape_is
from ._timm import check_bool, pointwise, pointwise_backward, reduced_channels
from .base import Block, bias_grad_is_zero, inv_area, make_rng

__all__ = ["SEBlock", "SEModule"]

SE_ACTS = {  # name -> (forward, backward), timm's act_layer names
    "relu": (F.relu_forward, F.relu_backward),
    "silu": (F.silu_forward, F.silu_backward),
    "hardswish": (F.hardswish_forward, F.hardswish_backward),
    "gelu": (F.gelu_forward, F.gelu_backward),
}
SE_GATES = {  # name -> (forward, backward), timm's gate_layer names
    "sigmoid": (F.sigmoid_forward, F.sigmoid_backward),
    "hard_sigmoid": (F.hard_sigmoid_forward, F.hard_sigmoid_backward),
}


@dataclass(frozen=True)
class SECache:
    x: np.ndarray  # (N, C, H, W) the input
    fc0: object  # LinearCache of fc.0: s (N, C), W1 (D, C)
    relu: object  # ReluCache: h > 0, (N, D)
    fc2: object  # LinearCache of fc.2: a (N, D), W2 (C, D)
    g: np.ndarray  # (N, C) the gate sigmoid(z)


class SEBlock(Block):
    """Squeeze-and-excitation block: ``y = x * sigmoid(fc2(relu(fc1(mean_hw x))))``.

    Parameters
    ----------
    channels : int
        C, the channels of the input.
    reduction : int, default 16
        r; the hidden width is ``D = channels // reduction`` (at least 1).
    bias : bool, default False
        Whether the two linear layers have biases (keys ``fc.0.bias``, ``fc.2.bias``).
    rng : None, int or numpy.random.Generator
        Source of the PyTorch-default initialisation U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    dtype : float32 (default, as PyTorch) or float64

    The math, forward and backward, is in the module docstring.
    """

    def __init__(self, channels, reduction=16, bias=False, *, rng=None, dtype=np.float32):
        super().__init__(dtype)
        op = "SEBlock"
        self.channels = positive_int(op, "channels", channels)
        self.reduction = positive_int(op, "reduction", reduction)
        if not isinstance(bias, (bool, np.bool_)):
            raise TypeError(f"{op}: bias must be a bool, got {bias!r}")
        self.bias = bool(bias)
        self.hidden = self.channels // self.reduction
        if self.hidden < 1:
            raise ValueError(
                f"{op}: reduction must be at most channels so that channels // reduction >= 1, "
                f"got channels={self.channels}, reduction={self.reduction}"
            )
        rng = make_rng(rng)
        self._add_linear("fc.0.", rng, self.channels, self.hidden, bias=self.bias)
        self._add_linear("fc.2.", rng, self.hidden, self.channels, bias=self.bias)

    def forward(self, x, training=False):
        """``y = x * g`` with the channel gate ``g`` of the module docstring.

        ``training`` is accepted for a uniform block API; SE has no batch statistics, so
        both modes compute the same thing. Returns ``(y, cache)``, y of shape and dtype of x.
        """
        x = self._check_input("x", x, 4, self.channels)
        s = x.mean(axis=(2, 3))  # (N, C) squeeze
        h, fc0 = self._linear("fc.0.", s)  # (N, D)
        a, relu = F.relu_forward(h)  # (N, D)
        z, fc2 = self._linear("fc.2.", a)  # (N, C)
        g = F.sigmoid(z)  # (N, C)
        y = x * g[:, :, None, None]  # (N, C, H, W)
        return y, SECache(x, fc0, relu, fc2, g)

    def backward(self, grad_out, cache: SECache):
        """Returns ``((dx,), {"fc.0.weight": ..., "fc.2.weight": ..., [biases]})``."""
        op = "SEBlock.backward"
        x, g = cache.x, cache.g
        dy = float_array(op, "grad_out", grad_out, 4, "(N, C, H, W)")
        shape_is(op, "grad_out", dy, x.shape)
        same_dtype(op, "x", x, grad_out=dy)
        N, C, H, W = x.shape
        grads = self.zero_grads()  # dW1, db1 (fc.0.*) and dW2, db2 (fc.2.*) are added into it
        dg = np.einsum("ncl,ncl->nc", dy.reshape(N, C, H * W), x.reshape(N, C, H * W))  # (N, C)
        dz = dg * (g * (1 - g))  # (N, C)
        da = self._linear_backward("fc.2.", dz, cache.fc2, grads)  # (N, D); dW2, db2
        dh = F.relu_backward(da, cache.relu)["x"]  # (N, D)
        ds = self._linear_backward("fc.0.", dh, cache.fc0, grads)  # (N, C); dW1, db1
        dx = dy * g[:, :, None, None]  # (N, C, H, W) through the gate's factor
        dx += (ds * inv_area(x.dtype, H, W))[:, :, None, None]  # through the squeeze
        return (dx,), grads


@dataclass(frozen=True)
class SEModuleCache:
    x: np.ndarray  # (N, C, H, W) the input
    fc1: object  # LinearCache of fc1 on the pooled vector: s (N, C), W1 (D, C)
    relu: object  # cache of the activation on h (N, D) (ReluCache for "relu")
    fc2: object  # LinearCache of fc2: a (N, D), W2 (C, D)
    g: np.ndarray  # (N, C) the gate g = gate(z)
    max_hw: object = None  # add_maxpool: AmaxCache of max over (H, W) of x
    bn: object = None  # norm: BatchNormCache of bn on fc1's output (N, D)
    gate_cache: object = None  # the gate's cache on z (N, C)


class SEModule(Block):
    """Squeeze-and-excitation in timm's layout (``timm.layers.SEModule``):
    ``y = x * gate(fc2(act(bn(fc1(pool_hw x)))))`` with 1x1 convolutions; by default
    ``y = x * sigmoid(fc2(relu(fc1(mean_hw x))))``.

    Parameters
    ----------
    channels : int
        C, the channels of the input.
    rd_ratio : float, default 1/16
    rd_channels : int or None, default None
        The hidden width D; None (or 0, as timm) computes
        ``D = make_divisible(channels * rd_ratio, rd_divisor, round_limit=0)``.
    rd_divisor : int, default 8
    add_maxpool : bool, default False
        The squeeze is ``0.5 mean + 0.5 max`` over H W (timm's experiment).
    bias : bool, default True
        Biases of ``fc1`` and ``fc2``.
    norm : bool, default False
        A BatchNorm after fc1 (timm's ``norm_layer=nn.BatchNorm2d``), keys ``bn.*``, with
        ``bn_momentum`` (default 0.1) and ``bn_eps`` (default 1e-5).
    act : "relu" (default), "silu", "hardswish" or "gelu"
        The hidden activation (timm's ``act_layer``; "gelu" is the exact erf GELU).
    gate : "sigmoid" (default) or "hard_sigmoid"
        The gate (timm's ``gate_layer``; MobileNetV3's SE uses the hard sigmoid).
    rng : None, int or numpy.random.Generator
        Source of PyTorch's default Conv2d initialisation U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    dtype : float32 (default) or float64

    State_dict keys (timm's): ``fc1.weight`` (D, C, 1, 1), ``fc1.bias`` (D,),
    [``bn.weight``, ``bn.bias``, ``bn.running_mean``, ``bn.running_var`` (D,),
    ``bn.num_batches_tracked``], ``fc2.weight`` (C, D, 1, 1), ``fc2.bias`` (C,). The math
    is in the module docstring.
    """

    def __init__(self, channels, rd_ratio=1.0 / 16, rd_channels=None, rd_divisor=8, add_maxpool=False, bias=True, *,
                 norm=False, act="relu", gate="sigmoid", bn_momentum=0.1, bn_eps=1e-5, rng=None, dtype=np.float32):
        super().__init__(dtype)
        op = "SEModule"
        self.config = dict(channels=channels, rd_ratio=rd_ratio, rd_channels=rd_channels, rd_divisor=rd_divisor,
                           add_maxpool=add_maxpool, bias=bias, norm=norm, act=act, gate=gate,
                           bn_momentum=bn_momentum, bn_eps=bn_eps)
        self.channels = positive_int(op, "channels", channels)
        self.bias = check_bool(op, "bias", bias)
        self.add_maxpool = check_bool(op, "add_maxpool", add_maxpool)
        self.norm = check_bool(op, "norm", norm)
        for name, value, allowed in (("act", act, SE_ACTS), ("gate", gate, SE_GATES)):
            if not isinstance(value, str) or value not in allowed:
                raise ValueError(f"{op}: {name} must be one of {tuple(allowed)}, got {value!r}")
        self.act, self.gate = act, gate
        self._set_bn(bn_momentum, bn_eps)
        self.rd_channels = reduced_channels(op, self.channels, rd_ratio, rd_channels, rd_divisor)
        rng = make_rng(rng)
        self._add_conv("fc1.", rng, self.channels, self.rd_channels, 1, bias=self.bias)
        if self.norm:
            self._add_batch_norm("bn.", self.rd_channels)
        self._add_conv("fc2.", rng, self.rd_channels, self.channels, 1, bias=self.bias)

    def forward(self, x, training=False):
        """``y = x * g``; with ``norm`` the BatchNorm uses batch statistics in training (and
        updates its running statistics), otherwise both modes compute the same."""
        x = self._check_input("x", x, 4, self.channels)
        n = x.shape[0]
        if self.add_maxpool:
            self._check_image("x", x, "the maximum over H W of an empty image does not exist; timm's amax refuses it")
        s = x.mean(axis=(2, 3))  # (N, C) squeeze
        k_max = None
        if self.add_maxpool:
            m, k_max = F.amax_forward(x, (2, 3), keepdims=False)  # (N, C)
            half = x.dtype.type(0.5)
            s = half * s + half * m  # (N, C)
        h, fc1 = pointwise(self, "fc1.", s)  # (N, D)
        k_bn = None
        if self.norm:
            if training and n == 1:
                raise ValueError(
                    f"Expected more than 1 value per channel when training, got input size {(1, self.rd_channels, 1, 1)}"
                )
            h, k_bn = self._batch_norm("bn.", h, training)  # (N, D)
        a, k_act = SE_ACTS[self.act][0](h)  # (N, D)
        z, fc2 = pointwise(self, "fc2.", a)  # (N, C)
        g, k_gate = SE_GATES[self.gate][0](z)  # (N, C)
        y = x * g[:, :, None, None]  # (N, C, H, W)
        return y, SEModuleCache(x, fc1, k_act, fc2, g, k_max, k_bn, k_gate)

    def backward(self, grad_out, cache: SEModuleCache):
        """Returns ``((dx,), grads)`` with a gradient for every parameter key."""
        op = "SEModule.backward"
        x, g = cache.x, cache.g
        dy = float_array(op, "grad_out", grad_out, 4, "(N, C, H, W)")
        shape_is(op, "grad_out", dy, x.shape)
        same_dtype(op, "x", x, grad_out=dy)
        N, C, H, W = x.shape
        grads = self.zero_grads()  # dW1, db1 (fc1.*), dW2, db2 (fc2.*) and bn.* are added into it
        dg = np.einsum("ncl,ncl->nc", dy.reshape(N, C, H * W), x.reshape(N, C, H * W))  # (N, C)
        if self.gate == "sigmoid":
            dz = dg * (g * (1 - g))  # (N, C)
        else:
            dz = SE_GATES[self.gate][1](dg, cache.gate_cache)["x"]  # (N, C)
        da = pointwise_backward(self, "fc2.", dz, cache.fc2, grads)  # (N, D); dW2, db2
        dh = SE_ACTS[self.act][1](da, cache.relu)["x"]  # (N, D)
        if self.norm:
            dh = self._batch_norm_backward("bn.", dh, cache.bn, grads)  # (N, D) before the BatchNorm
        ds = self._fc1_backward(dh, cache, grads)  # (N, C); dW1, db1
        dx = dy * g[:, :, None, None]  # (N, C, H, W) through the gate's factor
        if self.add_maxpool:
            half = x.dtype.type(0.5)
            dx += (ds * (half * inv_area(x.dtype, H, W)))[:, :, None, None]  # through the mean
            dx += F.amax_backward(half * ds, cache.max_hw)["x"]  # through the max
        else:
            dx += (ds * inv_area(x.dtype, H, W))[:, :, None, None]  # through the squeeze
        return (dx,), grads

    def _fc1_backward(self, d_h, cache, grads):
        """fc1's backward; its bias gradient is exactly 0 when a training BatchNorm follows."""
        fc1 = F.linear_backward(d_h, cache.fc1)
        grads["fc1.weight"] += fc1["weight"].reshape(grads["fc1.weight"].shape)
        if "bias" in fc1 and not bias_grad_is_zero(cache.bn):
            grads["fc1.bias"] += fc1["bias"]
        return fc1["x"]  # (N, C)
