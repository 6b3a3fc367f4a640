"""Fidelity acceptance: the QAT Keras model and its TFLite model agree, per quantizer/mode.

A small CNN is trained on sklearn digits, annotated with each quantizer kind, fine-tuned
one epoch, converted, and run with ai_edge_litert on the held-out images: top-1 must
agree on >= 99.5% of samples and >= 99% of output elements must be within 2 output
quantization steps.
"""

import numpy as np
import pytest

from edgeqat import annotate, convert, diagnostics, export, policy
from edgeqat.keras import keras, tf

L = keras.layers


@pytest.fixture(scope="module")
def trained():
    from sklearn.datasets import load_digits

    keras.utils.set_random_seed(0)
    tf.config.experimental.enable_op_determinism()
    d = load_digits()
    x = (d.images.astype(np.float32) / 16.0)[..., None]
    y = d.target.astype(np.int32)
    order = np.random.default_rng(0).permutation(len(x))
    x, y = x[order], y[order]
    inp = keras.Input((8, 8, 1))
    h = L.Conv2D(16, 3, padding="same", use_bias=False)(inp)
    h = L.ReLU(6.0)(L.BatchNormalization(momentum=0.9)(h))
    h = L.DepthwiseConv2D(3, padding="same", use_bias=False)(h)
    h = L.ReLU()(L.BatchNormalization(momentum=0.9)(h))
    h = L.Add()([h, L.Conv2D(16, 1)(h)])
    h = L.MaxPooling2D()(h)
    h = L.Conv2D(24, 3, padding="same", activation="relu")(h)
    h = L.GlobalAveragePooling2D()(h)
    model = keras.Model(inp, L.Dense(10)(h))
    model.compile(keras.optimizers.Adam(3e-3),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    model.fit(x[360:], y[360:], epochs=12, batch_size=64, verbose=0)
    acc = np.mean(model.predict(x[:360], verbose=0).argmax(1) == y[:360])
    assert acc >= 0.95, f"the float model is not trained (inference-mode accuracy {acc:.3f})"
    return model, x[360:], y[360:], x[:360], y[:360]


CASES = [  # (weight quantizer, activation quantizer, weight bits, mode)
    ("per_channel", "moving_average", 8, "int8"),
    ("per_tensor", "moving_average", 8, "int8"),
    ("per_channel", "relu6", 8, "int8"),
    ("per_channel", "pact", 8, "int8"),
    ("lsq", "lsq", 8, "int8"),
    ("per_channel", "percentile", 8, "int8"),
    ("per_channel", "mse", 8, "int8"),
    ("per_channel", "moving_average", 4, "int4_weights"),
    ("lsq", "lsq", 4, "int4_weights"),
    ("per_channel", "moving_average", 8, "int16x8"),
]


@pytest.mark.slow
@pytest.mark.parametrize("wq,aq,bits,mode", CASES)
def test_keras_and_tflite_agree(trained, wq, aq, bits, mode, record_property):
    model, x_train, y_train, x_test, y_test = trained
    act_bits = 16 if mode == "int16x8" else 8  # 16x8 needs 16-bit (symmetric) activations
    pol = policy.uniform(weight_bits=bits, activation_bits=act_bits, weight_quantizer=wq,
                         activation_quantizer=aq)
    keras.utils.set_random_seed(1)  # the same QAT run every time: results are reproducible
    qat = annotate.annotate_model(model, pol, sample_x=x_train[:256])
    qat.compile(keras.optimizers.Adam(2e-4),
                keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    qat.fit(x_train, y_train, epochs=1, batch_size=64, verbose=0)
    # In place: biases onto TFLite's int32 grid, and where the mode's kernels round
    # differently from float math (int4 weights, 16x8), Keras rounds as they do.
    export.prepare_for_export(qat, mode)
    flat = convert.to_tflite(qat, mode, calibration=x_train[:32], qat=True)
    y_lite, step = diagnostics.run_tflite(flat, x_test), diagnostics.output_scale(flat)
    y_keras = qat.predict(x_test, verbose=0)
    top1 = np.mean(y_lite.argmax(1) == y_keras.argmax(1))
    close = np.mean(np.abs(y_lite - y_keras) <= 2 * step + 1e-6)
    acc_keras, acc_lite = (np.mean(y.argmax(1) == y_test) for y in (y_keras, y_lite))
    record_property("top1_agreement", float(top1))
    record_property("within_2_steps", float(close))
    print(f"{wq}/{aq}/{bits}/{mode}: top1 {top1:.4f} within2 {close:.4f} bytes {len(flat)} "
          f"accuracy keras {acc_keras:.4f} tflite {acc_lite:.4f}")
    assert top1 >= 0.995
    assert close >= 0.99
