"""Primitive ops, pure NumPy, each a ``*_forward(...) -> (out, cache)`` and
``*_backward(dout, cache) -> dict`` pair keyed by the forward's argument names."""

from .activations import (
    abs_backward,
    abs_forward,
    gelu_backward,
    gelu_forward,
    hard_sigmoid_backward,
    hard_sigmoid_forward,
    relu_backward,
    relu_forward,
    sigmoid,
    sigmoid_backward,
    sigmoid_forward,
    silu_backward,
    silu_forward,
    softmax_backward,
    softmax_forward,
    tanh_backward,
    tanh_forward,
)
from .conv import col2im, conv2d_backward, conv2d_forward, im2col
from .linear import linear_backward, linear_forward
from .norm import batch_norm_backward, batch_norm_forward
from .pooling import (
    global_avg_pool2d_backward,
    global_avg_pool2d_forward,
    max_pool2d_backward,
    max_pool2d_forward,
    spatial_sum_backward,
    spatial_sum_forward,
)

__all__ = [
    "abs_backward", "abs_forward", "batch_norm_backward", "batch_norm_forward", "col2im",
    "conv2d_backward", "conv2d_forward", "global_avg_pool2d_backward", "global_avg_pool2d_forward",
    "im2col", "linear_backward", "linear_forward", "max_pool2d_backward", "max_pool2d_forward", "relu_backward", "relu_forward", "sigmoid",
    "sigmoid_backward", "sigmoid_forward", "softmax_backward", "softmax_forward",
    "spatial_sum_backward", "spatial_sum_forward", "tanh_backward", "tanh_forward",
    "gelu_backward", "gelu_forward", "hard_sigmoid_backward", "hard_sigmoid_forward", "silu_backward", "silu_forward",
]

from .deform import (
    batch_map_offsets,
    batch_map_offsets_backward,
    batch_map_offsets_forward,
    deform_conv2d,
    deform_conv2d_backward,
    deform_conv2d_forward,
)

__all__ += [
    "batch_map_offsets", "batch_map_offsets_backward", "batch_map_offsets_forward",
    "deform_conv2d", "deform_conv2d_backward", "deform_conv2d_forward",
]

# channel and spatial attention (CBAM, ECA, CoordAttn, GlobalContext) -------------------
from .conv1d import conv1d_backward, conv1d_forward
from .hardswish import hardswish_backward, hardswish_forward
from .layer_norm import layer_norm2d_backward, layer_norm2d_forward, layer_norm_backward, layer_norm_forward
from .reduce import (
    amax_backward,
    amax_forward,
    l2_norm_backward,
    l2_norm_forward,
    logsumexp_backward,
    logsumexp_forward,
    mean_backward,
    mean_forward,
)

__all__ += [
    "amax_backward", "amax_forward", "conv1d_backward", "conv1d_forward", "hardswish_backward",
    "hardswish_forward", "layer_norm2d_backward", "layer_norm2d_forward", "layer_norm_backward",
    "layer_norm_forward", "mean_backward", "mean_forward",
    "l2_norm_backward", "l2_norm_forward", "logsumexp_backward", "logsumexp_forward",
]

from .attention import (
    alibi_distance,
    position_mask,
    scaled_dot_product_attention_backward,
    scaled_dot_product_attention_forward,
    varlen_attention_backward,
    varlen_attention_forward,
)
from .rotary import rotary_embedding_backward, rotary_embedding_forward

__all__ += [
    "alibi_distance", "position_mask", "rotary_embedding_backward", "rotary_embedding_forward",
    "scaled_dot_product_attention_backward", "scaled_dot_product_attention_forward",
    "varlen_attention_backward", "varlen_attention_forward",
]
