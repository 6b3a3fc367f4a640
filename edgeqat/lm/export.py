"""TinyLm to TFLite with two signatures, ``prefill`` and ``decode``, the KV cache explicit.

- ``prefill``: ``tokens`` int32 [1, context] -> ``logits`` [1, context, vocab] and
  ``kv_cache_k_i`` / ``kv_cache_v_i`` [1, heads, context, head_dim] per layer.
- ``decode``: ``tokens`` int32 [1, 1], ``input_pos`` int32 [1] and the cache -> the logits
  at that position and the cache with it written (positions after it are ignored).

Full integer: every float input and output (logits and cache) is int8 and every op reads
and writes integer tensors, in both signatures (``inspect.require_full_integer`` checks
every subgraph). 4-bit kernels are stored packed INT4 (measured: the 6 projection
kernels of a 1-layer model are INT4 tensors in the flatbuffer).
Baselines from the same float model: ``float`` and ``dynamic`` (int8 weights, float
activations: what the PyTorch route to LiteRT gives LLMs).
"""

from __future__ import annotations

import tempfile

from edgeqat.convert import run_converter, widen_int16_biases
from edgeqat.keras import tf
from edgeqat.lm.model import TinyLm

MODES = ("float", "dynamic", "full_integer")


def signatures(model: TinyLm) -> dict:
    """Concrete ``prefill`` and ``decode`` functions of the model as it is now."""
    s = model.shape
    prefill = tf.function(lambda tokens: model.prefill(tokens)).get_concrete_function(
        tokens=tf.TensorSpec([1, s.context], tf.int32))
    decode = tf.function(lambda tokens, input_pos, **cache: model.decode(
        tokens, input_pos, **cache)).get_concrete_function(
        tokens=tf.TensorSpec([1, 1], tf.int32), input_pos=tf.TensorSpec([1], tf.int32),
        **model.cache_spec())
    return {"prefill": prefill, "decode": decode}


def _calibration(model: TinyLm, windows, samples: int = 4):
    """Prefill and decode inputs (for the converter's check of tensors QAT does not
    cover; with every tensor simulated it changes nothing)."""
    sig = signatures(model)

    def gen():
        for w in windows[:samples]:
            tokens = tf.constant(w[None, : model.shape.context])
            yield "prefill", {"tokens": tokens}
            cache = {k: v for k, v in sig["prefill"](tokens=tokens).items() if k != "logits"}
            pos = model.shape.context // 2
            cache = {k: v for k, v in cache.items() if k.startswith("kv")}
            yield "decode", {"tokens": tokens[:, pos:pos + 1],
                             "input_pos": tf.constant([pos], tf.int32), **cache}
    return gen


def to_tflite(model: TinyLm, mode: str, windows=None) -> bytes:
    """Converts ``model`` (quantized and frozen for ``full_integer``; float otherwise).

    Raises:
      ValueError: an unknown mode, or ``full_integer`` of a model that is not quantized.
    """
    if mode not in MODES:
        raise ValueError(f"mode {mode!r} is not one of {MODES}")
    if (mode == "full_integer") != model.quantized:
        need = "quantized" if mode == "full_integer" else "float"
        raise ValueError(f"mode {mode!r} needs a {need} TinyLm")
    with model.as_exported(), tempfile.TemporaryDirectory(prefix="edgeqat-lm-") as tmp:
        tf.saved_model.save(model, tmp, signatures=signatures(model))
        converter = tf.lite.TFLiteConverter.from_saved_model(
            tmp, signature_keys=["prefill", "decode"])
        if mode != "float":
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
        if mode == "full_integer" and model.precision.activation_bits == 16:
            # 16x8 from the trained ranges as they are: a representative dataset would
            # switch the converter to its 16x8 PTQ path, which rejects FakeQuant graphs
            # (edgeqat.convert.to_tflite says more).
            converter.target_spec.supported_ops = [
                tf.lite.OpsSet.EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8]
            converter.inference_input_type = converter.inference_output_type = tf.int16
            return widen_int16_biases(run_converter(converter))
        if mode == "full_integer":
            converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
            converter.inference_input_type = tf.int8
            converter.inference_output_type = tf.int8
            # 4-bit FakeQuant kernels are stored packed INT4 as they are; the
            # converter's low-bit QAT path would refuse the GATHERs ("params and
            # output must have same element type").
            converter.representative_dataset = _calibration(model, windows)
        return run_converter(converter)
