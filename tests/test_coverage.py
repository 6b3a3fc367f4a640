"""Coverage acceptance: real architectures annotate, train, convert fully integer, and
(keras.applications, trained on digits) agree with their TFLite models end to end.

Conversion passes calibration samples because TF 2.21's converter refuses full-integer
conversion without a representative dataset even for QAT models (its parameter check
runs before it looks for FakeQuant ops); the FakeQuant ranges are kept as trained, and
calibration only fills tensors inside composite layers (LayerNormalization,
MultiHeadAttention) that carry no FakeQuant.
"""

import numpy as np
import pytest

from edgeqat import (
    annotate,
    convert,
    diagnostics,
    export,
    inspect,
    models,
    policy,
    train,
    validate,
)
from edgeqat.keras import keras, tf

L = keras.layers
RNG = np.random.default_rng(0)


def transformer_block():
    inp = keras.Input((16,), dtype="int32")
    x = L.Embedding(50, 32)(inp)
    a = L.MultiHeadAttention(num_heads=2, key_dim=16)(x, x)
    x = L.LayerNormalization()(L.Add()([x, a]))
    h = L.Dense(64, activation="gelu")(x)
    h = L.Dense(32)(h)
    x = L.LayerNormalization()(L.Add()([x, h]))
    x = L.GlobalAveragePooling1D()(x)
    return keras.Model(inp, L.Dense(4)(x))


APPS = keras.applications
# Every architecture benchmarks/applications.py measures, at small input sizes.
MODELS = {
    "MobileNetV2": lambda: APPS.MobileNetV2((32, 32, 3), alpha=0.35, weights=None, classes=10),
    "MobileNetV3Small": lambda: APPS.MobileNetV3Small((32, 32, 3), alpha=0.75, weights=None,
                                                      classes=10),
    "MobileNetV3Large": lambda: APPS.MobileNetV3Large((32, 32, 3), alpha=0.75, weights=None,
                                                      classes=10),
    "EfficientNetB0": lambda: APPS.EfficientNetB0(weights=None, input_shape=(32, 32, 3),
                                                  classes=10),
    "EfficientNetV2B0": lambda: APPS.EfficientNetV2B0(weights=None, input_shape=(32, 32, 3),
                                                      classes=10),
    "ResNet50": lambda: APPS.ResNet50(weights=None, input_shape=(32, 32, 3), classes=10),
    "DenseNet121": lambda: APPS.DenseNet121(weights=None, input_shape=(32, 32, 3),
                                            classes=10),
    "ConvNeXtTiny": lambda: APPS.ConvNeXtTiny(weights=None, input_shape=(32, 32, 3),
                                              classes=10),
    "Conv1D": lambda: models.mnist1d_cnn((40, 1), 10),
    "Transformer": transformer_block,
}
IMAGE_MODELS = [n for n in MODELS if n not in ("Conv1D", "Transformer")]


def inputs_for(model, n):
    shape = (n, *model.inputs[0].shape[1:])
    if model.inputs[0].dtype.is_integer:
        return RNG.integers(0, 50, shape).astype(np.int32)
    return RNG.uniform(0, 1, shape).astype(np.float32) * (255 if shape[-1] == 3 else 1)


def _convert(name):
    keras.utils.set_random_seed(0)
    model = MODELS[name]()
    x = inputs_for(model, 8)
    qat = annotate.annotate_model(model, policy.uniform(), sample_x=x)
    qat.compile(keras.optimizers.SGD(1e-3),
                keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    assert np.isfinite(qat.train_on_batch(x, RNG.integers(0, 4, 8)))
    qat = export.prepare_for_export(qat)
    flat = convert.to_tflite(qat, "int8", calibration=inputs_for(model, 4), qat=True)
    return model, qat, flat


def check_full_integer(name: str, flat: bytes, qat, x: np.ndarray) -> None:
    """``flat`` is fully integer (int8 out; int8 in, or the token ids), and op by op
    ``qat`` computes what it computes on the inputs ``x``."""
    ops = inspect.require_full_integer(flat, name)  # raises naming any float op
    assert ops
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_content=flat)
    out = interp.get_output_details()[0]
    assert out["dtype"] == np.int8
    inp = interp.get_input_details()[0]
    assert inp["dtype"] == (np.int32 if name == "Transformer" else np.int8)
    names = [op.name for op in ops]
    if name in IMAGE_MODELS:
        # No requantizing op anywhere: concatenations share one range, average pooling
        # keeps its input's, preprocessing is folded into elementwise ops.
        assert "QUANTIZE" not in names and "DEQUANTIZE" not in names, names
    if name != "Transformer":  # (attention's internals are no Keras layers of their own)
        # Op by op, the Keras QAT model computes what the flatbuffer computes: each op
        # fed its own TFLite inputs is within one step (a rounding tie) of Keras.
        local = diagnostics.op_agreement(flat, qat, x)
        weighted = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")
        assert sorted(a.op for a in local if a.op in weighted) == \
            sorted(n for n in names if n in weighted)  # every weighted op is checked
        worst = max(local, key=lambda a: a.max_steps)
        assert worst.max_steps <= 1 + 1e-3, worst


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in MODELS if n not in IMAGE_MODELS])
def test_annotate_train_convert_full_integer(name):
    """Random weights, one training step; the image models are trained below."""
    model, qat, flat = _convert(name)
    check_full_integer(name, flat, qat, inputs_for(model, 4))


def digits_images(pixels: bool) -> tuple[np.ndarray, np.ndarray]:
    """sklearn's 8x8 digits (bundled: offline) as 32x32 RGB images, each pixel a 4x4
    block, in a fixed shuffled order: values 0..255 for a model that preprocesses its
    input itself, else [-1, 1] (MobileNetV2's preprocessing)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = np.kron(d.images / 16.0, np.ones((4, 4)))[..., None].repeat(3, axis=-1)
    x = (x * 255.0 if pixels else x * 2.0 - 1.0).astype(np.float32)
    order = np.random.default_rng(0).permutation(len(x))
    return x[order], d.target[order].astype(np.int32)


# (float, QAT) training steps on digits (batch 32; Adam, cosine decay from 3e-3, then Adam
# 1e-4): well above chance on held-out images. ConvNeXtTiny's steps cost 5x the others'.
# TFLite's int8 ADD (XNNPACK: 20-bit fixed-point multipliers) is not emulated: after
# (100, 10) EfficientNetV2B0 had 6 of 39,168 ADD outputs a step off (block5c_add), which
# one image of these 16, near a decision boundary, amplified to 40 output steps; trained
# to (200, 20) the model is surer, 0 steps on 64 images.
STEPS = {"ConvNeXtTiny": (30, 10), "EfficientNetV2B0": (200, 20)}


@pytest.mark.slow
@pytest.mark.parametrize("name", IMAGE_MODELS)
def test_trained_application_agrees_with_its_tflite_model(name, record_property):
    """Each keras.applications architecture, trained on digits, annotated, fine-tuned and
    converted: fully integer, no QUANTIZE/DEQUANTIZE, op by op within a rounding tie, and
    end to end its int8 outputs (softmax, as the model ships) on 16 held-out images are
    within 2 steps of the Keras QAT model's, with the same top-1.

    End to end holds because the Keras model rounds where the int8 kernels round
    (``requant.install``: XNNPACK's ``float32(acc) * scale`` half to even on every 8-bit
    CONV_2D, DEPTHWISE_CONV_2D, FULLY_CONNECTED and MUL; AVERAGE_POOL_2D's raw sum half
    away from zero). With the float graph's rounding a few near-ties in a million values,
    amplified over 50 layers, moved single images by 6-39 steps (EfficientNetB0,
    ResNet50), where XNNPACK and TFLite's builtin kernels differ by 13-108 steps from each
    other; DenseNet121's unrounded average pooling by 3-11.
    """
    keras.utils.set_random_seed(0)
    model = MODELS[name]()
    pixels = any(isinstance(layer, (L.Rescaling, L.Normalization))
                 for layer in model.submodules)
    x, y = digits_images(pixels)
    x_test, y_test, x_train, y_train = x[:360], y[:360], x[360:], y[360:]
    batches = tf.data.Dataset.from_tensor_slices((x_train, y_train)).shuffle(
        len(x_train), seed=0).repeat().batch(32)
    steps, qat_steps = STEPS.get(name, (100, 10))
    schedule = keras.optimizers.schedules.CosineDecay(3e-3, steps, alpha=0.01)
    model.compile(keras.optimizers.Adam(schedule), keras.losses.SparseCategoricalCrossentropy())
    model.fit(batches, steps_per_epoch=steps, verbose=0)
    # The BN moving averages (momentum 0.99-0.999) lag far behind so few steps.
    train.reestimate_batchnorm(model, x_train[:256])
    accuracy = float(np.mean(np.argmax(model(x_test, training=False), -1) == y_test))
    record_property("float_accuracy", accuracy)
    assert accuracy >= 0.5, f"{name} is not trained: held-out accuracy {accuracy:.3f}"

    qat = annotate.annotate_model(model, policy.uniform(), sample_x=x_train[:64])
    qat.compile(keras.optimizers.Adam(1e-4), keras.losses.SparseCategoricalCrossentropy())
    qat.fit(batches, steps_per_epoch=qat_steps, verbose=0)
    export.prepare_for_export(qat)
    flat = convert.to_tflite(qat, "int8", calibration=x_train[:8], qat=True)
    check_full_integer(name, flat, qat, x_test[:2])

    x16 = x_test[:16]
    agree = validate.agreement(np.asarray(qat(x16, training=False)),
                               diagnostics.run_tflite(flat, x16), diagnostics.output_scale(flat))
    record_property("agreement", str(agree))
    print(f"{name}: float accuracy {accuracy:.3f}, {agree}")
    assert agree.top1 == 1.0 and agree.max_abs_steps <= 2 + 1e-3, agree


@pytest.mark.slow
@pytest.mark.parametrize("name", ["MobileNetV3Small", "EfficientNetB0"])
def test_plain_tfmot_quantize_model_refuses(name):
    """Why edgeqat exists: tfmot's own quantize_model cannot wrap these (hard-swish's
    TFOpLambda, Rescaling/Normalization, lone BN)."""
    from edgeqat.keras import tfmot

    with pytest.raises((ValueError, RuntimeError, TypeError, AttributeError)):
        tfmot.quantization.keras.quantize_model(MODELS[name]())

