"""Float model + policy -> QAT model (placeholder until the quantizer library lands)."""

from edgeqat.keras import keras, tfmot


def annotate_model(model: keras.Model, policy, *, sample_x=None) -> keras.Model:
    """Returns a quantization-aware copy of ``model`` following ``policy``."""
    del policy, sample_x
    return tfmot.quantization.keras.quantize_model(model)


def scope():
    """Custom objects needed to load a QAT model."""
    return tfmot.quantization.keras.quantize_scope()
