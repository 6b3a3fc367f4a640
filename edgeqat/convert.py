"""Keras model -> TFLite flatbuffer: float, PTQ and QAT full-integer, with proof.

``to_tflite`` converts; ``require_full_integer`` (from ``edgeqat.inspect``) proves that no
float op is left and names the offenders otherwise.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from edgeqat.keras import keras, tf

MODES = ("float", "int8", "int16x8", "int4_weights")


def _representative(x_calib: np.ndarray):
    def gen() -> Iterable[list[np.ndarray]]:
        for i in range(len(x_calib)):
            x = x_calib[i : i + 1]
            yield [x if x.dtype.kind in "iu" else x.astype(np.float32)]  # token ids stay int

    return gen


def _concrete_function(model: keras.Model):
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
        ``int4_weights`` (int8 activations, weights on a 4-bit grid).
      calibration: representative float inputs; required for a float model (PTQ) in
        integer modes. For a QAT model, whose ranges were learned, it only fills ranges
        of tensors training did not simulate; without it, full integer is proven
        afterwards by ``inspect.require_full_integer``.
      qat: ``model`` carries fake-quant ops (its ranges come from training).

    Returns:
      The flatbuffer bytes.

    Raises:
      ValueError: a bad mode, or PTQ without calibration data.
    """
    if mode not in MODES:
        raise ValueError(f"mode {mode!r} is not one of {', '.join(MODES)}")
    fn = _concrete_function(model)
    converter = tf.lite.TFLiteConverter.from_concrete_functions([fn], model)
    if mode == "float":
        return converter.convert()
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
        converter.representative_dataset = _representative(calibration)
    elif not qat or mode == "int16x8":
        raise ValueError(f"{mode} conversion of a float model needs calibration data")
    return converter.convert()
