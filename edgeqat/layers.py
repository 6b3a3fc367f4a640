"""Small Keras layers that annotation puts in place of constructs TFLite cannot quantize.

Each one lowers to a single integer TFLite op (plus shape-only reshapes), so its output is
the only tensor that needs a quantization range.
"""

from __future__ import annotations

import numpy as np

from edgeqat.keras import keras, tf


class ChannelAffine(keras.layers.Layer):
    """y = x * kernel + bias per channel (last axis), as one 1x1 depthwise convolution.

    What annotation made of ``Rescaling``, ``Normalization`` and a lone BatchNormalization
    before ``ChannelOp`` (which is up to 20x cheaper in XNNPACK); kept so QAT models saved
    then still load. Inputs of rank 2 and 3 are reshaped to rank 4 and back.

    Args:
      scale: per-channel (or scalar) multiplier, used to initialise ``kernel``.
      offset: per-channel (or scalar) addend, used to initialise ``bias``.
    """

    def __init__(self, scale=1.0, offset=0.0, **kwargs):
        super().__init__(**kwargs)
        self.scale = np.asarray(scale, np.float32).tolist()
        self.offset = np.asarray(offset, np.float32).tolist()

    def build(self, input_shape):
        channels = int(input_shape[-1])
        scale = np.broadcast_to(np.asarray(self.scale, np.float32), (channels,))
        offset = np.broadcast_to(np.asarray(self.offset, np.float32), (channels,))
        # Depthwise layout (1, 1, C, 1): the converter's axis for depthwise weights.
        self.kernel = self.add_weight(
            "kernel", shape=(1, 1, channels, 1),
            initializer=keras.initializers.Constant(scale.reshape(1, 1, channels, 1)))
        self.bias = self.add_weight("bias", shape=(channels,),
                                    initializer=keras.initializers.Constant(offset))
        super().build(input_shape)

    def call(self, inputs):
        rank = inputs.shape.rank
        x = inputs
        if rank == 2:
            x = x[:, None, None, :]
        elif rank == 3:
            x = x[:, None, :, :]
        elif rank != 4:
            raise ValueError(f"ChannelAffine takes rank 2..4 inputs, got rank {rank}")
        y = tf.nn.depthwise_conv2d(x, self.kernel, strides=(1, 1, 1, 1), padding="VALID")
        y = tf.nn.bias_add(y, self.bias)
        if rank == 2:
            y = y[:, 0, 0, :]
        elif rank == 3:
            y = y[:, 0, :, :]
        return y

    def get_config(self):
        return {**super().get_config(), "scale": self.scale, "offset": self.offset}


class ScalarOp(keras.layers.Layer):
    """``x + value`` or ``x * value`` with a Python scalar: what Keras records as a
    ``TFOpLambda`` for ``x + 3.0`` (MobileNetV3's hard-sigmoid) becomes this layer.

    Args:
      op: ``"add"`` or ``"mul"``.
      value: the scalar constant.
    """

    def __init__(self, op: str = "add", value: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        if op not in ("add", "mul"):
            raise ValueError(f"ScalarOp op = {op!r} must be 'add' or 'mul'")
        self.op = op
        self.value = float(value)

    def call(self, inputs):
        if self.op == "add":
            return inputs + self.value
        return inputs * self.value

    def get_config(self):
        return {**super().get_config(), "op": self.op, "value": self.value}


class ChannelOp(keras.layers.Layer):
    """``x * values`` or ``x + values`` with one constant per channel (last axis): what
    annotation makes of ``Rescaling``, ``Normalization`` and a lone BatchNormalization
    (MUL and/or ADD, each an elementwise int8 op with its own trained output range).

    Elementwise ops are the cheap integer form: on a 224x224x3 input an int8 MUL+ADD takes
    about 12 us, the 1x1 depthwise convolution ``ChannelAffine`` lowers to 224-256 us.

    Args:
      op: ``"add"`` or ``"mul"``.
      values: one constant per channel (or a single one, broadcast).
      quantize_values: use the constants as the int8 model stores them: the converter
        quantizes a constant operand per tensor, asymmetric, over [min(0, v), max(0, v)]
        (annotation's quantize pass turns this on; off, the layer is the exact float map).
    """

    def __init__(self, op: str = "mul", values=1.0, quantize_values: bool = False,
                 **kwargs):
        super().__init__(**kwargs)
        if op not in ("add", "mul"):
            raise ValueError(f"ChannelOp op = {op!r} must be 'add' or 'mul'")
        self.op = op
        self.values = np.asarray(values, np.float32).reshape(-1).tolist()
        self.quantize_values = bool(quantize_values)

    def constant(self) -> tf.Tensor:
        v = np.asarray(self.values, np.float32)
        lo, hi = min(0.0, float(v.min())), max(0.0, float(v.max()))
        c = tf.constant(v)
        if self.quantize_values and hi > lo:
            c = tf.quantization.fake_quant_with_min_max_vars(c, lo, hi, num_bits=8)
        return c

    def call(self, inputs):
        c = self.constant()
        if self.op == "add":
            return inputs + c
        return inputs * c

    def get_config(self):
        return {**super().get_config(), "op": self.op, "values": self.values,
                "quantize_values": self.quantize_values}


class ChannelMean(keras.layers.Layer):
    """The mean over the last axis, kept: ``reduce_mean(x, -1, keepdims=True)``, one MEAN
    op. A step of ``LayerNormalization`` as annotation writes it out (``annotate``)."""

    def call(self, inputs):
        return tf.reduce_mean(inputs, axis=-1, keepdims=True)


@tf.custom_gradient
def _rsqrt(x):
    y = tf.math.rsqrt(x)

    def grad(dy):
        # d/dx x^-1/2 = -y^3 / 2; zero where the int8 grid rounded x to 0 (y = inf), where
        # the output's fake quant saturates anyway: never a NaN into training.
        return tf.where(tf.math.is_finite(y), dy * -0.5 * y * y * y, tf.zeros_like(dy))

    return y, grad


class Rsqrt(keras.layers.Layer):
    """``1 / sqrt(x)``, one RSQRT op: a step of ``LayerNormalization`` as annotation writes
    it out. Forward: ``rsqrt(x)`` (``inf`` at 0, which the output's quantizer saturates to
    the top of its range, as TFLite's int8 kernel does). Backward: ``-rsqrt(x)^3 / 2``,
    zero where the forward was ``inf``."""

    def call(self, inputs):
        return _rsqrt(inputs)


LAYERS = (ChannelAffine, ScalarOp, ChannelOp, ChannelMean, Rsqrt)
