"""What every block shares: arrays under PyTorch state_dict keys, strict loading, and
small helpers that run a conv / linear / batch-norm sub-layer stored under a key prefix.

A block keeps its configuration and its arrays, nothing else: ``forward`` returns the
cache that ``backward`` needs, so forward may run twice before one backward. In training
mode ``forward`` updates the block's BatchNorm buffers as PyTorch does (running
statistics with momentum 0.1, ``num_batches_tracked`` += 1); arrays are replaced, never
written in place, so a cache taken earlier stays valid.
"""

from __future__ import annotations

import math

import numpy as np

from .. import functional as F
from .._checks import FLOAT_DTYPES
from .._xp import array_module, namespace


def make_rng(rng):
    """``None`` -> fresh ``default_rng()``; int -> seeded generator; Generator -> itself."""
    if isinstance(rng, np.random.Generator):
        return rng
    return np.random.default_rng(rng)


def inv_area(dtype, h, w):
    """1 / (H W), the weight of a spatial mean in its backward; 0 for an empty image (H or
    W = 0), whose input gradient is empty anyway (the forward's mean is NaN there, as
    PyTorch's, and so are the parameter gradients behind it)."""
    return dtype.type(1.0 / (h * w) if h * w else 0.0)


def kaiming_uniform(rng, shape, fan_in, dtype):
    """PyTorch's default Conv/Linear init: ``kaiming_uniform_(a=sqrt(5))``, i.e.
    U(-1/sqrt(fan_in), 1/sqrt(fan_in)); the default bias init has the same bound."""
    bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
    return rng.uniform(-bound, bound, size=shape).astype(dtype)


def bias_grad_is_zero(next_bn) -> bool:
    """True when a bias feeds a BatchNorm in training mode (``next_bn`` is that
    BatchNorm's cache), where its gradient is identically zero.

    A per-channel bias b adds the same constant to every value the BatchNorm normalises
    together: the batch mean moves by b, the deviations ``c - mean(c)`` and hence the batch
    variance and the output do not change at all. So ``dL/db = 0`` exactly. Computed as
    ``sum_{n,h,w} dc`` it would be the rounding noise of a sum that cancels (of the order of
    the unit roundoff times the gradient's scale), which differs from machine to machine;
    the blocks return exact zeros instead. The conv's weight gradient is not zero: only a
    constant is removed by the normalisation. In eval mode the running statistics are
    constants and the bias gradient is the usual ``sum dc``.
    """
    return next_bn is not None and bool(next_bn.training)


class Block:
    """Base class: an ordered mapping of state_dict key -> ndarray.

    Parameters are trainable (they get gradients); buffers are not (BatchNorm running
    statistics and ``num_batches_tracked``).
    """

    def __init__(self, dtype=np.float32):
        dtype = np.dtype(dtype)
        if dtype not in FLOAT_DTYPES:
            raise TypeError(f"{type(self).__name__}: dtype must be float32 or float64, got {dtype}")
        self.dtype = dtype
        self._state = {}  # key -> ndarray, in PyTorch's registration order
        self._param_keys = []  # keys of trainable parameters, in order
        # BatchNorm settings of every BatchNorm sub-layer (PyTorch's defaults); a block
        # with BatchNorms takes them as ``bn_momentum`` / ``bn_eps`` (``_set_bn``)
        self.bn_momentum = 0.1
        self.bn_eps = 1e-5

    def _set_bn(self, bn_momentum, bn_eps):
        """Check and keep the BatchNorm settings (momentum of the running-statistics
        update, eps added to the variance) shared by the block's BatchNorm layers."""
        name = type(self).__name__
        for arg, value in (("bn_momentum", bn_momentum), ("bn_eps", bn_eps)):
            if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
                raise TypeError(f"{name}: {arg} must be a real number, got {type(value).__name__}")
        if not 0.0 <= float(bn_momentum) <= 1.0:
            raise ValueError(f"{name}: bn_momentum must lie in [0, 1], got {bn_momentum}")
        if not float(bn_eps) > 0.0:
            raise ValueError(f"{name}: bn_eps must be positive, got {bn_eps}")
        self.bn_momentum = float(bn_momentum)
        self.bn_eps = float(bn_eps)

    # ---- registration -------------------------------------------------------------
    def _add_param(self, key, value):
        self._state[key] = np.asarray(value, dtype=self.dtype)
        self._param_keys.append(key)

    def _add_buffer(self, key, value):
        self._state[key] = np.asarray(value)

    def _add_conv(self, prefix, rng, in_channels, out_channels, kernel_size, groups=1, bias=True):
        kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else kernel_size
        fan_in = in_channels // groups * kh * kw
        self._add_param(f"{prefix}weight", kaiming_uniform(rng, (out_channels, in_channels // groups, kh, kw), fan_in, self.dtype))
        if bias:
            self._add_param(f"{prefix}bias", kaiming_uniform(rng, (out_channels,), fan_in, self.dtype))

    def _add_linear(self, prefix, rng, in_features, out_features, bias=True):
        self._add_param(f"{prefix}weight", kaiming_uniform(rng, (out_features, in_features), in_features, self.dtype))
        if bias:
            self._add_param(f"{prefix}bias", kaiming_uniform(rng, (out_features,), in_features, self.dtype))

    def _add_batch_norm(self, prefix, num_features):
        self._add_param(f"{prefix}weight", np.ones(num_features))
        self._add_param(f"{prefix}bias", np.zeros(num_features))
        self._add_buffer(f"{prefix}running_mean", np.zeros(num_features, dtype=self.dtype))
        self._add_buffer(f"{prefix}running_var", np.ones(num_features, dtype=self.dtype))
        self._add_buffer(f"{prefix}num_batches_tracked", np.array(0, dtype=np.int64))

    # ---- state_dict ---------------------------------------------------------------
    def parameter_names(self):
        """Keys of the trainable parameters, in PyTorch's order."""
        return list(self._param_keys)

    def buffer_names(self):
        return [k for k in self._state if k not in self._param_keys]

    def state_dict(self):
        """A dict key -> copy of the array, PyTorch's keys and order."""
        return {k: v.copy() for k, v in self._state.items()}

    def load_state_dict(self, state):
        """Load arrays (e.g. a PyTorch state_dict saved with numpy). Strict: missing,
        unexpected or mis-shaped keys raise ``KeyError``/``ValueError`` naming them.
        Floating arrays are converted to the block's dtype (as ``torch`` copies into the
        existing tensors); nothing is written in place.
        """
        name = type(self).__name__
        missing = [k for k in self._state if k not in state]
        unexpected = [k for k in state if k not in self._state]
        if missing or unexpected:
            raise KeyError(
                f"{name}.load_state_dict: missing keys {missing}, unexpected keys {unexpected}"
            )
        new = {}
        for k, old in self._state.items():
            v = np.asarray(state[k])
            if v.shape != old.shape:
                raise ValueError(
                    f"{name}.load_state_dict: '{k}' must have shape {tuple(old.shape)}, got {tuple(v.shape)}"
                )
            if old.dtype.kind == "f":
                if v.dtype.kind not in "fiu":
                    raise TypeError(f"{name}.load_state_dict: '{k}' must be a float array, got dtype {v.dtype}")
                new[k] = np.array(v, dtype=self.dtype, copy=True)
            else:
                if v.dtype.kind not in "iu":
                    raise TypeError(f"{name}.load_state_dict: '{k}' must be an integer array, got dtype {v.dtype}")
                new[k] = np.array(v, dtype=old.dtype, copy=True)
        self._state = new

    def to(self, dtype):
        """Convert every floating array to ``dtype`` (float32 or float64); returns self."""
        dtype = np.dtype(dtype)
        if dtype not in FLOAT_DTYPES:
            raise TypeError(f"{type(self).__name__}.to: dtype must be float32 or float64, got {dtype}")
        self.dtype = dtype
        self._state = {k: (v.astype(dtype) if v.dtype.kind == "f" else v) for k, v in self._state.items()}
        return self

    def __getitem__(self, key):
        return self._state[key]

    def zero_grads(self, xp=np):
        """A gradient dict with zeros for every parameter (the starting point of backward),
        arrays of the module ``xp`` (NumPy, or CuPy for a forward that ran on the device)."""
        return {k: xp.zeros(self._state[k].shape, dtype=self._state[k].dtype) for k in self._param_keys}

    def _param(self, key, xp=np):
        """The array under ``key`` (None when absent) as an array of ``xp``: itself for NumPy,
        a device copy for CuPy (the block's state stays NumPy)."""
        a = self._state.get(key)
        return a if (a is None or xp is np) else xp.asarray(a)

    # ---- input checks -------------------------------------------------------------
    def _check_input(self, name, x, ndim=4, channels=None, *, xp=np):
        op = type(self).__name__
        if not isinstance(x, xp.ndarray):
            raise TypeError(f"{op}: {name} must be a {xp.__name__}.ndarray, got {type(x).__name__}")
        if x.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{op}: {name} must have dtype float32 or float64, got {x.dtype}")
        if x.dtype != self.dtype:
            raise TypeError(
                f"{op}: {name} has dtype {x.dtype} but the block's parameters are {self.dtype}; "
                f"convert one of them (block.to({x.dtype.name}))"
            )
        if x.ndim != ndim:
            raise ValueError(f"{op}: {name} must have {ndim} dimensions (N, C, H, W), got shape {tuple(x.shape)}")
        if channels is not None and x.shape[1] != channels:
            raise ValueError(f"{op}: {name} must have {channels} channels, got shape {tuple(x.shape)}")
        return x

    def _placed_input(self, name, x, ndim=4, channels=None):
        """``(xp, x)``: ``x`` checked by :meth:`_check_input`, a NumPy array (``xp`` NumPy) or
        a CUDA array (``__cuda_array_interface__``), viewed as a CuPy array (``xp`` CuPy)."""
        xp, arrays = namespace(type(self).__name__, {name: x})
        return xp, self._check_input(name, arrays[name], ndim, channels, xp=xp)

    def _check_image(self, name, x, why):
        """An empty image (H or W = 0) refused with a ValueError naming ``name``; ``why``:
        what PyTorch's module does there (e.g. its 1x1 convolution refuses it)."""
        if x.shape[2] == 0 or x.shape[3] == 0:
            raise ValueError(f"{type(self).__name__}: {name} must have H >= 1 and W >= 1 ({why}), got shape {tuple(x.shape)}")

    # ---- sub-layers stored under a prefix -----------------------------------------
    def _conv(self, prefix, x, **conv_args):
        """A conv sub-layer on ``x``; for a CUDA ``x`` its parameters are copied to the device."""
        xp = array_module(x)
        return F.conv2d_forward(x, self._param(f"{prefix}weight", xp), self._param(f"{prefix}bias", xp), **conv_args)

    def _conv_backward(self, prefix, dy, cache, param_grads, next_bn=None):
        """Backward of a conv sub-layer. ``next_bn``: the cache of the BatchNorm that
        consumes this layer's output, if any (see :func:`bias_grad_is_zero`)."""
        g = F.conv2d_backward(dy, cache)
        param_grads[f"{prefix}weight"] += g["weight"]
        if "bias" in g and not bias_grad_is_zero(next_bn):
            param_grads[f"{prefix}bias"] += g["bias"]
        return g["x"]

    def _linear(self, prefix, x):
        s = self._state
        return F.linear_forward(x, s[f"{prefix}weight"], s.get(f"{prefix}bias"))

    def _linear_backward(self, prefix, dy, cache, param_grads, next_bn=None):
        """Backward of a linear sub-layer; ``next_bn`` as in :meth:`_conv_backward`."""
        g = F.linear_backward(dy, cache)
        param_grads[f"{prefix}weight"] += g["weight"]
        if "bias" in g and not bias_grad_is_zero(next_bn):
            param_grads[f"{prefix}bias"] += g["bias"]
        return g["x"]

    def _batch_norm(self, prefix, x, training):
        """BatchNorm sub-layer; in training updates its running statistics and
        ``num_batches_tracked`` (new arrays, as PyTorch's momentum update)."""
        s = self._state
        y, cache = F.batch_norm_forward(
            x,
            s[f"{prefix}weight"],
            s[f"{prefix}bias"],
            s[f"{prefix}running_mean"],
            s[f"{prefix}running_var"],
            training=training,
            momentum=self.bn_momentum,
            eps=self.bn_eps,
        )
        if training:
            s[f"{prefix}running_mean"] = cache.running_mean
            s[f"{prefix}running_var"] = cache.running_var
            s[f"{prefix}num_batches_tracked"] = s[f"{prefix}num_batches_tracked"] + 1
        return y, cache

    def _batch_norm_backward(self, prefix, dy, cache, param_grads):
        g = F.batch_norm_backward(dy, cache)
        param_grads[f"{prefix}weight"] += g["weight"]
        param_grads[f"{prefix}bias"] += g["bias"]
        return g["x"]
