"""Keras model -> TFLite flatbuffer: float, PTQ and QAT full-integer, with proof.

``to_tflite`` converts; ``require_full_integer`` (from ``edgeqat.inspect``) proves that no
float op is left and names the offenders otherwise.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import numpy as np

from edgeqat import hooks, layer_kinds, modes
from edgeqat.graph import activation_bits, has_quantizers
from edgeqat.keras import keras, quiet_stderr, tf

# The MLIR quantizer prints its settings to stderr on every conversion.
CONVERTER_NOISE = re.compile(r"^fully_quantize: \d")

MODES = (modes.FLOAT, *modes.NAMES)  # what to_tflite converts to


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
    widened = set()  # buffers (signatures' subgraphs share constant buffers)
    for graph in model.subgraphs:
        for op in graph.operators:
            name = names.get(builtin_code(model, op))
            inputs = layer_kinds.TFLITE_OP_INPUTS.get(name)
            at = inputs.bias if inputs is not None else None
            if at is None or len(op.inputs) <= at or op.inputs[at] < 0:
                continue
            data = graph.tensors[op.inputs[inputs.data]]
            bias = graph.tensors[op.inputs[at]]
            if data.type != schema.TensorType.INT16 or bias.type != schema.TensorType.INT32:
                continue
            if bias.buffer not in widened:
                buf = model.buffers[bias.buffer]
                values = np.frombuffer(bytes(bytearray(buf.data)), np.int32)
                buf.data = np.frombuffer(values.astype(np.int64).tobytes(), np.uint8)
                widened.add(bias.buffer)
            bias.type = schema.TensorType.INT64
            changed += 1
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model)) if changed else flat


def name_tensors_by_layer(flat: bytes, model: keras.Model) -> bytes:
    """Names each tensor of a QAT flatbuffer once per Keras layer fused into it.

    The converter names a fused tensor after every graph op folded into it, and a QAT
    graph folds many: ``m/quant_conv_relu/Relu6;m/quant_conv/BiasAdd;m/quant_conv/Conv2D;
    m/quant_conv/BiasAdd/ReadVariableOp``, weights ``m/quant_conv/Conv2D;m/quant_conv/
    FakeQuantWithMinMaxVarsPerChannel``. Those names are the training wrappers' insides,
    and on MobileNetV2 they are a third of the names' bytes more than a PTQ file of the
    same model carries. Kept: the first part that names each layer, in order
    (``m/quant_conv_relu/Relu6;m/quant_conv/BiasAdd``), so every layer a tensor came from
    is still named (``inspect.layers_named`` reads the same layers from it); parts
    that name no layer stay where no part does; the subgraphs' inputs and outputs keep
    their names; a name made equal to an earlier one gets a number, as the converter's do.
    """
    from tensorflow.lite.tools import flatbuffer_utils

    from edgeqat.inspect import layers_named

    layers = {layer.name for layer in model.layers}
    m = flatbuffer_utils.read_model_from_bytearray(bytearray(flat))
    changed = False
    for graph in m.subgraphs:
        keep = {int(i) for i in [*graph.inputs, *graph.outputs]}
        taken = {_text(t.name) for i, t in enumerate(graph.tensors) if i in keep}
        for i, t in enumerate(graph.tensors):
            if i in keep or t.name is None:
                continue
            old = _text(t.name)
            parts, seen = [], set()
            for part in old.split(";"):
                named = set(layers_named(part, layers))
                if named and not named <= seen:
                    parts.append(part)
                seen |= named
            name = ";".join(parts) if parts else old
            base, n = name, 0
            while name in taken:
                n += 1
                name = f"{base}{n}"
            taken.add(name)
            if name != old:
                t.name, changed = name, True
    return bytes(flatbuffer_utils.convert_object_to_bytearray(m)) if changed else flat


def _text(name) -> str:
    return name.decode() if isinstance(name, bytes) else str(name)


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


def converter_for(fn) -> tf.lite.TFLiteConverter:
    """A TFLite converter for the concrete function ``fn`` (``concrete_function``).

    The converter lowers ``fn`` to a SavedModel of the object it is handed beside it.
    Handed the Keras model, it also serializes every layer's own call functions, tracing
    each: most of a conversion's time (QAT models at 32 px: MobileNetV3Small 53 s,
    DenseNet121 96 s). A bare ``tf.Module`` holding only the variables ``fn`` reads gives
    the same flatbuffer, byte for byte, in 15 s and 18 s.
    """
    holder = tf.Module()
    holder.captured = list(fn.variables)  # also keeps them alive while converting
    return tf.lite.TFLiteConverter.from_concrete_functions([fn], holder)


def to_tflite(model: keras.Model, mode: str = modes.Mode.INT8, *,
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
      The flatbuffer bytes; a QAT model's tensors are named by layer
      (``name_tensors_by_layer``).

    Raises:
      ValueError: a bad mode, PTQ without calibration data, or an int16x8 QAT model whose
        activation quantizers are not 16-bit.
    """
    if mode not in MODES:
        raise ValueError(f"mode {mode!r} is not one of {', '.join(MODES)}")
    is_qat = qat or has_quantizers(model)
    row = modes.spec(mode) if mode != modes.FLOAT else None
    if row is not None and is_qat and not row.qat_calibration:
        lo, hi = row.activation_bits
        off = sorted(b for b in activation_bits(model) if not lo <= b <= hi)
        if off:
            raise ValueError(f"{mode} conversion of a QAT model needs "
                             f"{row.activation_bits_text}-bit activation quantizers (found "
                             f"{off}-bit ones): annotate with activation_bits={hi}")
        calibration = None  # the trained ranges are used as they are
    with hooks.suspended(model):  # the flatbuffer rounds for itself: no kernel rounding
        fn = concrete_function(model)
    converter = converter_for(fn)
    if row is None:
        return run_converter(converter)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if calibration is not None or not row.ops_need_calibration:
        # A named op set: the converter must fail rather than leave a float op.
        converter.target_spec.supported_ops = [getattr(tf.lite.OpsSet, row.ops)]
    converter.inference_input_type = converter.inference_output_type = getattr(tf, row.io_type)
    if row.low_bit_qat:
        converter._experimental_low_bit_qat = True
    if calibration is not None:
        # For a QAT model the trained FakeQuant ranges win; calibration only fills the
        # tensors training did not simulate (inside MultiHeadAttention).
        converter.representative_dataset = representative_dataset(calibration)
    elif not is_qat:
        raise ValueError(f"{mode} conversion of a float model needs calibration data")
    flat = run_converter(converter)
    if is_qat:
        flat = name_tensors_by_layer(flat, model)
    return widen_int16_biases(flat) if row.widen_qat_biases and is_qat else flat
