"""Kernel-exact rounding (edgeqat.requant): golden integer cases, and on a real model the
Keras outputs equal the LiteRT int4 kernels' bit for bit while the flatbuffer is unchanged."""

import numpy as np
import pytest

from edgeqat import annotate, convert, diagnostics, export, inspect, policy, report, requant
from edgeqat.keras import keras, tf

L = keras.layers


def test_quantize_multiplier_matches_tflite():
    q, shift = requant.quantize_multiplier(np.array([0.5, 0.0816610014155542, 1.0, 0.75]))
    # 0.0816.. -> (1402925322, -3) was read from LiteRT's int4 CONV_2D of test_fidelity
    assert q.tolist() == [2**30, 1402925322, 2**30, 3 * 2**29]
    assert shift.tolist() == [0, -3, 1, 0]


def test_double_rounding_golden():
    # M = 0.75 * 2^-2 = 0.1875: exact values -0.5625, -0.375, 0.375, 0.5625, 0.75.
    # The Q31 product rounds half up (1.5 -> 2), then the shift rounds half up again, so
    # a fraction in [0.375, 0.5) goes up: 0.375 -> 1 and -0.5625 -> 0 (one rounding: 0, -1).
    acc = tf.constant([-3, -2, 2, 3, 4], tf.int64)
    out = requant.double_rounding(acc, np.int64(3 * 2**29), np.int64(-2))
    assert out.numpy().tolist() == [0, 0, 1, 1, 1]
    single = np.floor(np.array([-3, -2, 2, 3, 4]) * 0.1875 + 0.5)
    assert single.tolist() == [-1, 0, 0, 1, 1]


def test_multiplier_15bit_golden():
    # M = 1/3 (Q31 0x55555555, shift -1); the 16x8 kernels keep 15 bits of it (0x5555),
    # so 196608 * M gives 65535, not 65536, and 3 gives 1 (0.99998 + 0.5 floors to 1).
    out = requant.multiplier_15bit(tf.constant([196608.0, 3.0], tf.float64),
                                   np.int64(0x55555555), np.int64(-1))
    assert out.numpy().tolist() == [65535.0, 1.0]


def test_rules_per_mode_and_cpu():
    assert requant.rule_for("int4_weights", 4, "x86_64") == "double_rounding"
    assert requant.rule_for("int4_weights", 4, "AMD64") == "double_rounding"
    assert requant.rule_for("int4_weights", 4, "arm64", positions=64) == "single_rounding"
    assert requant.rule_for("int4_weights", 4, "aarch64", positions=1) == "double_rounding"
    assert requant.rule_for("int4_weights", 4, "aarch64") == "single_rounding"  # unknown
    assert requant.rule_for("int4_weights", 8, "x86_64") is None  # 8-bit layers: XNNPACK
    assert requant.rule_for("int4_weights", 4, "riscv64") is None  # not measured
    assert {requant.rule_for("int16x8", 8, a) for a in ("x86_64", "aarch64")} == {
        "multiplier_15bit"}
    assert requant.rule_for("int8", 8, "x86_64") is None


def test_single_rounding_golden():
    # M = 0.1875 (Q31 3*2^29, shift -2): 0.375 -> 0, 0.5625 -> 1, -0.5625 -> -1 (half up)
    out = requant.single_rounding(tf.constant([2, 3, -3, 8], tf.int64), np.int64(3 * 2**29),
                                  np.int64(-2))
    assert out.numpy().tolist() == [0, 1, -1, 2]


def _small_model():
    keras.utils.set_random_seed(3)
    inp = keras.Input((8, 8, 2))
    h = L.Conv2D(8, 3, padding="same", activation="relu")(inp)
    h = L.Conv2D(8, 1)(h)  # signed output: both rounding directions
    h = L.GlobalAveragePooling2D()(h)
    return keras.Model(inp, L.Dense(4)(h))


@pytest.mark.slow
def test_int4_keras_equals_litert_and_flatbuffer_unchanged():
    x = np.random.default_rng(0).normal(size=(64, 8, 8, 2)).astype(np.float32)
    pol = policy.uniform(weight_bits=4, weight_quantizer="per_channel")
    qat = annotate.annotate_model(_small_model(), pol, sample_x=x)
    qat(x, training=True)  # ranges from data
    export.prepare_for_export(qat, "int8")
    assert requant.install(qat, "int8") == []  # XNNPACK rounds once: nothing to emulate
    plain = qat.predict(x, verbose=0)
    flat = convert.to_tflite(qat, "int4_weights", qat=True)
    done = requant.install(qat, "int4_weights")  # this machine's CPU
    assert len(done) == 3  # both convolutions and the dense layer
    y_lite, step = diagnostics.run_tflite(flat, x), diagnostics.output_scale(flat)
    exact = qat.predict(x, verbose=0)
    assert np.max(np.abs(exact - y_lite)) / step < 1e-3  # bit-exact
    if requant.host_arch() == "x86_64":  # double rounding: float math differs somewhere
        assert np.max(np.abs(plain - y_lite)) / step >= 1
    assert convert.to_tflite(qat, "int4_weights", qat=True) == flat
    # The weights are stored packed: 4 bits a value (the report lists each constant).
    kernels = [c for c in inspect.storage(flat)["constants"] if c["type"] == "int4"]
    assert sorted(c["bytes"] for c in kernels) == [16, 32, 72]  # 8x4, 8x1x1x8, 8x3x3x2
    assert all(c["bytes"] * 2 == np.prod(c["shape"]) for c in kernels)
    md = "\n".join(report.storage_markdown("m.tflite", inspect.storage(flat)))
    assert "| int4 |" in md and "int32" in md
    requant.remove(qat)
    np.testing.assert_array_equal(qat.predict(x, verbose=0), plain)


@pytest.mark.slow
def test_int4_fully_connected_is_bit_exact_too():
    """A per-tensor Dense stays FULLY_CONNECTED; its int4 kernel rounds twice (measured on
    x86_64 and on the emulated Cortex-A72 alike), one output position: double rounding."""
    keras.utils.set_random_seed(3)
    inp = keras.Input((125,))
    x = np.random.default_rng(0).normal(size=(200, 125)).astype(np.float32)
    qat = annotate.annotate_model(keras.Model(inp, L.Dense(10)(inp)),
                                  policy.uniform(weight_bits=4, weight_quantizer="per_tensor"),
                                  sample_x=x)
    qat(x, training=True)
    export.prepare_for_export(qat, "int4_weights")
    flat = convert.to_tflite(qat, "int4_weights", qat=True)
    assert [op.name for op in inspect.list_ops(flat)] == ["FULLY_CONNECTED"]
    assert requant.rule_for("int4_weights", 4, "aarch64", positions=1) == "double_rounding"
    y_lite, step = diagnostics.run_tflite(flat, x), diagnostics.output_scale(flat)
    assert np.max(np.abs(qat.predict(x, verbose=0) - y_lite)) / step < 1e-3


@pytest.mark.slow
def test_activation_relu_layer_is_a_fused_site():
    """A conv followed by ``Activation("relu")`` (fused by TFLite like ``ReLU``): the
    kernel rounding goes on the activation's output quantizer, bit-exact."""
    keras.utils.set_random_seed(3)
    inp = keras.Input((8, 8, 2))
    h = L.Activation("relu")(L.Conv2D(8, 3, padding="same")(inp))
    x = np.random.default_rng(0).normal(size=(64, 8, 8, 2)).astype(np.float32)
    qat = annotate.annotate_model(keras.Model(inp, L.Conv2D(8, 1)(h)),
                                  policy.uniform(weight_bits=4, weight_quantizer="lsq"),
                                  sample_x=x)
    qat(x, training=True)
    done = requant.install(qat, "int4_weights", "x86_64")
    assert len(done) == 2
    if requant.host_arch() == "x86_64":
        flat = convert.to_tflite(qat, "int4_weights", qat=True)
        y_lite, step = diagnostics.run_tflite(flat, x), diagnostics.output_scale(flat)
        assert np.max(np.abs(qat.predict(x, verbose=0) - y_lite)) / step < 1e-3
