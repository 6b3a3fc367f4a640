"""Layer kinds: one table of what every stage knows about a Keras layer class.

Annotation, quantize configs, kernel rounding, PTQ (AdaRound), diagnostics and
conversion all ask the same questions about a layer: which of its weights are quantized
and whether per channel, what a following BatchNormalization folds into, whether its
TFLite kernel's rounding is emulated, and where its TFLite op reads its bias. The answers
live here, keyed by the exact Keras class (a subclass, e.g. ``Conv2DTranspose`` of
``Conv2D``, has its own row). Adding a weighted layer kind is a row in ``WEIGHTED``.

Three groups, tried in this order by ``quantize_configs.layer_kind``:

* ``PASSTHROUGH`` layers only move or select values (reshape, max-pool, padding,
  dropout...): TFLite keeps the input's scale, so they are not wrapped at all.
* ``WEIGHTED`` layers quantize the listed weights (dotted paths reach sublayers, as in
  MultiHeadAttention) and their output.
* ``OUTPUT_ONLY`` layers quantize their output (elementwise, pooling, activations,
  LayerNormalization).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from edgeqat.keras import keras
from edgeqat.layers import ChannelAffine, ChannelMean, ChannelOp, Rsqrt, ScalarOp

L = keras.layers


class BnFold(enum.StrEnum):
    """How a following BatchNormalization's per-channel scale multiplies the kernel."""

    LAST_AXIS = "last_axis"  # kernel[..., out] (Conv, Dense, the pointwise of a separable)
    DEPTHWISE = "depthwise"  # kernel[h, w, in, multiplier]: scale as (in, multiplier)
    TRANSPOSE = "transpose"  # kernel[h, w, out, in]: scale on axis 2


@dataclass(frozen=True)
class WeightedKind:
    """What edgeqat knows about one weighted Keras layer class.

    Attributes:
      weights: attribute paths of the weights QAT quantizes (``_query_dense.kernel``
        reaches a sublayer).
      per_channel: the weights may be quantized per output channel and still convert.
        Conv kernels yes (last axis); depthwise kernels yes, over their last two axes (in
        x multiplier, TFLite's output channels; LSQ, which learns steps on the last axis,
        keeps them per tensor); Dense no ('tfl.transpose' mismatched quantized axes:
        annotate rewrites a per-channel Dense as a 1x1 Conv2D instead); transposed-conv
        kernels have an input-channel last axis: per tensor.
      bn_fold: how a BatchNormalization right after it folds into its kernel (None: it
        does not fold; the BN becomes an elementwise MUL and ADD).
      kernel_index: the folded kernel's index in ``get_weights()`` (the bias follows it).
      kernel_rounding: ``requant.install`` emulates its TFLite kernel's requantization
        (measured for CONV_2D, DEPTHWISE_CONV_2D and FULLY_CONNECTED; TRANSPOSE_CONV
        takes the CONV_2D rule, as it always has).
      adaround: PTQ's AdaRound fits its kernel, and diagnostics names it as the weighted
        layer of a fused group.
    """

    weights: tuple[str, ...]
    per_channel: bool
    bn_fold: BnFold | None = None
    kernel_index: int = 0
    kernel_rounding: bool = False
    adaround: bool = False


WEIGHTED: dict[type, WeightedKind] = {
    L.Conv2D: WeightedKind(("kernel",), True, BnFold.LAST_AXIS, kernel_rounding=True,
                           adaround=True),
    L.Conv1D: WeightedKind(("kernel",), True, BnFold.LAST_AXIS, adaround=True),
    L.DepthwiseConv2D: WeightedKind(("depthwise_kernel",), True, BnFold.DEPTHWISE,
                                    kernel_rounding=True, adaround=True),
    L.SeparableConv2D: WeightedKind(("depthwise_kernel", "pointwise_kernel"), False,
                                    BnFold.LAST_AXIS, kernel_index=1),
    L.SeparableConv1D: WeightedKind(("depthwise_kernel", "pointwise_kernel"), False,
                                    BnFold.LAST_AXIS, kernel_index=1),
    L.Conv2DTranspose: WeightedKind(("kernel",), False, BnFold.TRANSPOSE,
                                    kernel_rounding=True),
    L.Dense: WeightedKind(("kernel",), False, BnFold.LAST_AXIS, kernel_rounding=True,
                          adaround=True),
    L.EinsumDense: WeightedKind(("kernel",), False),
    L.Embedding: WeightedKind(("embeddings",), False),
    L.MultiHeadAttention: WeightedKind(("_query_dense.kernel", "_key_dense.kernel",
                                        "_value_dense.kernel", "_output_dense.kernel"), False),
    ChannelAffine: WeightedKind(("kernel",), False),  # QAT models saved before ChannelOp
}

PASSTHROUGH = (
    L.InputLayer, L.Reshape, L.Flatten, L.MaxPooling1D, L.MaxPooling2D, L.MaxPooling3D,
    L.GlobalMaxPooling1D, L.GlobalMaxPooling2D, L.Dropout, L.SpatialDropout1D,
    L.SpatialDropout2D, L.GaussianNoise, L.GaussianDropout, L.AlphaDropout,
    L.ZeroPadding1D, L.ZeroPadding2D, L.Cropping1D, L.Cropping2D, L.Permute,
    L.UpSampling1D, L.RepeatVector, L.ActivityRegularization,
)

# AVERAGE_POOL_2D's int8 kernel requires its output scale to equal its input's (the
# converter refuses a separately trained range: DenseNet's transitions) and rounds the mean
# onto that grid: its output is quantized, on its input's range at export
# (``export.share_scale_ranges``), rounded as the kernel rounds (``requant.install``).
AVERAGE_POOLS = (L.AveragePooling1D, L.AveragePooling2D)
GLOBAL_AVERAGE_POOLS = (L.GlobalAveragePooling1D, L.GlobalAveragePooling2D,
                        L.GlobalAveragePooling3D)

OUTPUT_ONLY = (
    L.Add, L.Subtract, L.Multiply, L.Average, L.Maximum, L.Minimum, L.Concatenate,
    *AVERAGE_POOLS, L.GlobalAveragePooling1D,
    L.GlobalAveragePooling2D, L.ReLU, L.LeakyReLU, L.Softmax, L.Activation,
    L.LayerNormalization, ScalarOp, ChannelOp, ChannelMean, Rsqrt, L.UpSampling2D,
)

# Layers whose TFLite op (CONV_2D, DEPTHWISE_CONV_2D, FULLY_CONNECTED, ADD, MUL by a
# constant) fuses a following ReLU/ReLU6: no range is needed between the op and it. Not
# TRANSPOSE_CONV.
FUSING_LAYERS = (L.Conv2D, L.DepthwiseConv2D, L.Dense, L.Add, ScalarOp, ChannelOp)


def weighted(layer) -> WeightedKind | None:
    """The row of ``layer``'s exact class, or None when it is no weighted kind."""
    return WEIGHTED.get(type(layer))


def fuses_activation(layer) -> bool:
    """Whether TFLite fuses a following ReLU/ReLU6 into this layer's op. Not TRANSPOSE_CONV
    (Conv2DTranspose subclasses Conv2D): its own output needs a trained range."""
    return isinstance(layer, FUSING_LAYERS) and not isinstance(layer, L.Conv2DTranspose)


@dataclass(frozen=True)
class OpInputs:
    """Where a TFLite op reads its activation (data) input and its bias."""

    data: int
    bias: int


# TFLite op -> its inputs (convert.widen_int16_biases widens the bias of int16-input ops)
TFLITE_OP_INPUTS = {
    "CONV_2D": OpInputs(0, 2), "DEPTHWISE_CONV_2D": OpInputs(0, 2),
    "FULLY_CONNECTED": OpInputs(0, 2), "TRANSPOSE_CONV": OpInputs(2, 3),
}
