"""Keras model -> TFLite flatbuffer: float, PTQ and QAT full-integer, with proof.

``to_tflite`` converts; ``require_full_integer`` (from ``edgeqat.inspect``) proves that no
float op is left and names the offenders otherwise.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import numpy as np

from edgeqat import requant
from edgeqat.graph import activation_bits, has_quantizers
from edgeqat.keras import keras, quiet_stderr, tf

# The MLIR quantizer prints its settings to stderr on every conversion.
CONVERTER_NOISE = re.compile(r"^fully_quantize: \d")

MODES = ("float", "int8", "int16x8", "int4_weights")


# op -> the index of its bias input
_BIAS_INPUT = {"CONV_2D": 2, "DEPTHWISE_CONV_2D": 2, "FULLY_CONNECTED": 2, "TRANSPOSE_CONV": 3}


def widen_int16_biases(flat: bytes) -> bytes:
    """Stores the int32 biases of int16-input ops as int64, the type their kernels read.

    TFLite's 16x8 convolution kernels read an int64 bias ("depthwise_conv.cc: bias->type
    != kTfLiteInt64" otherwise). The converter's PTQ path writes int64, but its QAT path
    (FakeQuant ranges) writes int32 and refuses the bias-type option. The values and
    their scale (``s_in * s_w``, zero point 0) are already right: only the storage
    widens, so the model computes exactly what the converter quantized.
    """
    from tensorflow.lite.python import schema_py_generated as schema
    from tensorflow.lite.tools import flatbuffer_utils

    from edgeqat.inspect import builtin_code, schema_names

    model = flatbuffer_utils.read_model_from_bytearray(bytearray(flat))
    names = schema_names(schema.BuiltinOperator)
    changed = 0
    for graph in model.subgraphs:
        for op in graph.operators:
            name = names.get(builtin_code(model, op))
            at = _BIAS_INPUT.get(name)
            if at is None or len(op.inputs) <= at or op.inputs[at] < 0:
                continue
            data = graph.tensors[op.inputs[2 if name == "TRANSPOSE_CONV" else 0]]
            bias = graph.tensors[op.inputs[at]]
            if data.type != schema.TensorType.INT16 or bias.type != schema.TensorType.INT32:
                continue
            buf = model.buffers[bias.buffer]
            values = np.frombuffer(bytes(bytearray(buf.data)), np.int32)
            buf.data = np.frombuffer(values.astype(np.int64).tobytes(), np.uint8)
            bias.type = schema.TensorType.INT64
            changed += 1
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model)) if changed else flat


def run_converter(converter) -> bytes:
    """``converter.convert()`` without the MLIR quantizer's settings line on stderr."""
    with quiet_stderr(CONVERTER_NOISE):
        return converter.convert()


def representative_dataset(x_calib: np.ndarray):
    def gen() -> Iterable[list[np.ndarray]]:
        for i in range(len(x_calib)):
            x = x_calib[i : i + 1]
            yield [x if x.dtype.kind in "iu" else x.astype(np.float32)]  # token ids stay int

    return gen


def concrete_function(model: keras.Model):
    """A batch-1 signature, so the flatbuffer has static shapes (Edge TPU needs them)."""
    spec = [tf.TensorSpec([1, *inp.shape[1:]], inp.dtype, name=inp.name.split(":")[0])
            for inp in model.inputs]
    fn = tf.function(lambda *args: model(list(args) if len(args) > 1 else args[0],
                                         training=False))
    return fn.get_concrete_function(*spec)


def to_tflite(model: keras.Model, mode: str = "int8", *,
              calibration: np.ndarray | None = None, qat: bool = False) -> bytes:
    """Converts ``model`` to a TFLite flatbuffer.

    Args:
      model: a float or QAT (quantize-applied) tf_keras model.
      mode: ``float``; ``int8`` (int8 weights and activations, int8 input/output);
        ``int16x8`` (int16 activations, int8 weights, int16 input/output);
        ``int4_weights`` (int8 activations, 4-bit weights: the converter's low-bit QAT
        path stores them as packed INT4 tensors, ops CONV_2D/DEPTHWISE_CONV_2D v7).

        ``int16x8`` of a QAT model: annotate with ``activation_bits=16``. edgeqat's
        16-bit activation quantizers are symmetric narrow-range FakeQuants (zero point
        0, TFLite's int16 scheme), so the converter's QAT path takes every trained range
        as it is and no calibration is used (``calibration`` is ignored): a
        representative dataset would switch the converter to its 16x8 PTQ path, which
        recalibrates activations and rejects FakeQuant graphs ("Quantization to 16x8-bit
        not yet supported for op: DEQUANTIZE" with 8-bit FakeQuants; asymmetric 16-bit
        FakeQuants give int16 zero points the kernels refuse). A QAT model with 8-bit
        activation quantizers cannot become a faithful 16x8 model: its Keras function
        rounds activations to 8 bits. The QAT path writes int32 biases; they are
        widened to the int64 the 16x8 kernels read (``widen_int16_biases``).
      calibration: representative float inputs; required for a float model (PTQ) in
        integer modes. For a QAT model, whose ranges were learned, it only fills ranges
        of tensors training did not simulate; without it, full integer is proven
        afterwards by ``inspect.require_full_integer``.
      qat: ``model`` carries fake-quant ops (its ranges come from training).

    Returns:
      The flatbuffer bytes.

    Raises:
      ValueError: a bad mode, PTQ without calibration data, or an int16x8 QAT model whose
        activation quantizers are not 16-bit.
    """
    if mode not in MODES:
        raise ValueError(f"mode {mode!r} is not one of {', '.join(MODES)}")
    is_qat = qat or has_quantizers(model)
    if mode == "int16x8" and is_qat:
        low = sorted(activation_bits(model) - {16})
        if low:
            raise ValueError(f"int16x8 conversion of a QAT model needs 16-bit activation "
                             f"quantizers (found {low}-bit ones): annotate with "
                             f"activation_bits=16")
        calibration = None  # the trained 16-bit ranges are used as they are
    with requant.exporting():  # the flatbuffer rounds for itself
        fn = concrete_function(model)
    converter = tf.lite.TFLiteConverter.from_concrete_functions([fn], model)
    if mode == "float":
        return run_converter(converter)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if mode == "int16x8":
        converter.target_spec.supported_ops = [
            tf.lite.OpsSet.EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8
        ]
        converter.inference_input_type = converter.inference_output_type = tf.int16
    else:
        if calibration is not None:
            # Named INT8 op set: the converter must fail rather than leave a float op.
            converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = converter.inference_output_type = tf.int8
    if mode == "int4_weights":
        converter._experimental_low_bit_qat = True
    if calibration is not None:
        # For a QAT model the trained FakeQuant ranges win; calibration only fills the
        # tensors training did not simulate (inside LayerNormalization, attention).
        converter.representative_dataset = representative_dataset(calibration)
    elif not is_qat:
        raise ValueError(f"{mode} conversion of a float model needs calibration data")
    flat = run_converter(converter)
    return widen_int16_biases(flat) if mode == "int16x8" and is_qat else flat
