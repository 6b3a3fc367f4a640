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


def test_gemmlowp_rounding_golden():
    # TFLite's default MultiplyByQuantizedMultiplier at M = 0.25 (q = 2^30, shift -1):
    # -0.5 -> -1 and -1.5 -> -2 (ties away from zero), and 0.25 -> 1 (0.25 * 2 rounds to
    # 1, then 1 / 2 rounds up), where one half-up rounding gives 0, -1 and 0.
    acc = tf.constant([-6, -2, -1, 1, 2, 6, 7], tf.int64)
    assert requant.gemmlowp_rounding(acc, 2**30, -1).numpy().tolist() == [-2, -1, 0, 1, 1, 2, 2]
    assert requant.single_rounding(acc, 2**30, -1).numpy().tolist() == [-1, 0, 0, 0, 1, 2, 2]
    # XNNPACK's float32 rounding: ties to even.
    assert requant.xnnpack_fp32(tf.constant([-6, -2, 2, 6], tf.int64),
                                np.float32(0.25)).numpy().tolist() == [-2, 0, 0, 2]


T, K = 48, 32


def one_batch_matmul(rhs_range: tuple[float, float], transpose_b: bool) -> bytes:
    """A full-integer model of one BATCH_MATMUL between two int8 inputs, the right one
    quantized to ``rhs_range``."""
    shapes = ([1, 2, T, K], [1, 2, T, K]) if transpose_b else ([1, 2, T, T], [1, 2, T, K])

    @tf.function(input_signature=[tf.TensorSpec(s) for s in shapes])
    def f(a, b):
        a = tf.quantization.fake_quant_with_min_max_vars(a, -0.7, 1.3)
        b = tf.quantization.fake_quant_with_min_max_vars(b, *rhs_range)
        return tf.quantization.fake_quant_with_min_max_vars(
            tf.matmul(a, b, transpose_b=transpose_b), -3.0, 4.0)

    rng = np.random.default_rng(0)
    c = tf.lite.TFLiteConverter.from_concrete_functions([f.get_concrete_function()], f)
    c.optimizations = [tf.lite.Optimize.DEFAULT]
    c.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    c.inference_input_type = c.inference_output_type = tf.int8
    c.representative_dataset = lambda: ([rng.uniform(-1, 1, s).astype(np.float32)
                                         for s in shapes] for _ in range(2))
    return c.convert()


BATCH_MATMUL_CASES = [(rhs, tb) for rhs in ((-1.0, 127 / 128), (-0.7, 1.3)) for tb in (True, False)]


def batch_matmul_inputs(flat: bytes, seed: int = 0) -> list[np.ndarray]:
    from ai_edge_litert.interpreter import Interpreter

    rng = np.random.default_rng(seed)
    ins = Interpreter(model_content=flat).get_input_details()
    return [rng.integers(-128, 128, d["shape"]).astype(np.int8) for d in ins]


def expected_batch_matmul(flat: bytes, inputs, transpose_b: bool, arch, xnnpack=True):
    """What ``requant`` says the kernel outputs (int8) for those int8 inputs."""
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_content=flat)
    grids = [tuple(d["quantization"]) for d in (*it.get_input_details(),
                                                it.get_output_details()[0])]
    grids = [(np.float32(s), int(z)) for s, z in grids]
    a, b = ((x.astype(np.float64) - z) * s for x, (s, z) in zip(inputs, grids, strict=False))
    rule = requant.batch_matmul_rule(arch, grids[1][1], xnnpack=xnnpack)
    out = requant.integer_matmul(a, b, grids, rule, transpose_b).numpy()
    return np.round(out / grids[2][0]).astype(np.int64) + grids[2][1], grids[1][1]


def test_int8_batch_matmul_is_bit_exact():
    """The right operand's zero point decides the kernel: 0 -> XNNPACK (one float32
    rounding), else the builtin one (gemmlowp's two); without the default delegates always
    the builtin one. ``integer_matmul`` reproduces each bit for bit, where the float
    graph's single rounding is a step off on some outputs."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    moved = {}
    for rhs_range, transpose_b in BATCH_MATMUL_CASES:
        flat = one_batch_matmul(rhs_range, transpose_b)
        for resolver in (OpResolverType.AUTO,
                         OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES):
            it = Interpreter(model_content=flat, experimental_op_resolver_type=resolver)
            it.allocate_tensors()
            (s_a, z_a), (s_b, z_b) = (d["quantization"] for d in it.get_input_details())
            s_o, z_o = it.get_output_details()[0]["quantization"]
            assert (z_b == 0) == (rhs_range[0] == -1.0)
            xnnpack = resolver == OpResolverType.AUTO
            rule = requant.batch_matmul_rule(requant.host_arch(), z_b, xnnpack=xnnpack)
            for seed in range(4):
                inputs = batch_matmul_inputs(flat, seed)
                for d, x in zip(it.get_input_details(), inputs, strict=True):
                    it.set_tensor(d["index"], x)
                it.invoke()
                got = it.get_tensor(it.get_output_details()[0]["index"]).astype(np.int64)
                want, _ = expected_batch_matmul(flat, inputs, transpose_b,
                                                requant.host_arch(), xnnpack=xnnpack)
                np.testing.assert_array_equal(want, got, err_msg=f"{rhs_range} {rule}")
                a, b = inputs[0].astype(np.int64) - z_a, inputs[1].astype(np.int64) - z_b
                acc = a @ (np.swapaxes(b, -1, -2) if transpose_b else b)
                once = np.floor(acc * (np.float64(s_a) * s_b / s_o) + 0.5) + z_o
                moved[rule] = moved.get(rule, 0) + int((np.clip(once, -128, 127) != got).sum())
    assert set(moved) == {"xnnpack_fp32", "gemmlowp_rounding"}
    assert moved["gemmlowp_rounding"] > 0, moved


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
    assert requant.rule_for("int4_weights", 8, "x86_64") == "xnnpack_fp32"  # 8-bit layers
    assert requant.rule_for("int4_weights", 4, "riscv64") is None  # not measured
    assert {requant.rule_for("int16x8", 8, a) for a in ("x86_64", "aarch64")} == {
        "multiplier_15bit"}
    assert requant.rule_for("int8", 8, "x86_64") == "xnnpack_fp32"
    assert requant.rule_for("int8", 8, "aarch64") is None  # not measured there yet


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
    # 4-bit layers in an int8 model: XNNPACK's rounding where it is emulated (8-bit
    # weights are what XNNPACK's int8 kernels take; a 4-bit grid is still 8-bit storage).
    requant.remove(qat)
    plain = qat.predict(x, verbose=0)
    flat = convert.to_tflite(qat, "int4_weights", qat=True)
    done = requant.install(qat, "int4_weights")  # this machine's CPU
    # both convolutions and the dense layer; on x86_64 the 8-bit MEAN too
    assert len(done) == 3 + (requant.host_arch() in requant.XNNPACK_FP32_ARCHS)
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


def _product_model():
    """Swish (``x * sigmoid(x)``: LOGISTIC and MUL) and a squeeze-excite MUL between
    convolutions, a per-tensor dense head: every op kind XNNPACK requantizes."""
    keras.utils.set_random_seed(5)
    inp = keras.Input((8, 8, 3))
    h = L.Activation("swish")(L.Conv2D(16, 3, padding="same")(inp))
    s = L.Conv2D(16, 1, activation="sigmoid")(L.GlobalAveragePooling2D(keepdims=True)(h))
    h = L.Conv2D(8, 1)(L.Multiply()([h, s]))
    return keras.Model(inp, L.Dense(4)(L.GlobalAveragePooling2D()(h)))


@pytest.mark.slow
@pytest.mark.skipif(requant.host_arch() not in requant.XNNPACK_FP32_ARCHS,
                    reason="XNNPACK's int8 rounding is emulated on x86_64 only")
def test_int8_keras_rounds_as_xnnpack_op_by_op():
    """int8: every CONV_2D, FULLY_CONNECTED, MUL and MEAN output of the Keras QAT model
    fed the op's own inputs equals XNNPACK's exactly (0 steps), not just within a rounding
    tie (without: MUL and MEAN 1 step off on a few values); LOGISTIC is exact anyway."""
    x = np.random.default_rng(0).normal(size=(256, 8, 8, 3)).astype(np.float32)
    qat = annotate.annotate_model(_product_model(), policy.uniform(), sample_x=x)
    qat(x, training=True)
    export.prepare_for_export(qat, "int8")
    flat = convert.to_tflite(qat, "int8", calibration=x[:16], qat=True)
    done = requant.install(qat, "int8")
    kinds = sorted(type(qat.get_layer(n).layer).__name__ for n in done)
    assert kinds == ["Conv2D"] * 3 + ["Dense"] + ["GlobalAveragePooling2D"] * 2 + \
        ["Multiply"] * 2, kinds
    local = diagnostics.op_agreement(flat, qat, x)
    emulated = [a for a in local if a.op in ("CONV_2D", "MUL", "MEAN", "FULLY_CONNECTED")]
    assert sorted(a.op for a in emulated) == ["CONV_2D"] * 3 + ["FULLY_CONNECTED"] + \
        ["MEAN"] * 2 + ["MUL"] * 2
    assert max(a.max_steps for a in local) < 1e-3, max(local, key=lambda a: a.max_steps)


@pytest.mark.slow
def test_average_pooling_rounds_as_its_int8_kernel():
    """AVERAGE_POOL_2D (DenseNet's transitions) keeps its input's grid and rounds the
    window's raw sum half away from zero: the pooling's output is quantized on its input's
    range at export and rounds so in Keras, exactly. (Passed through unquantized, as
    before, the exact mean was half a step off on ties: a quarter of 2x2 windows.) No
    requantizing op."""
    keras.utils.set_random_seed(4)
    inp = keras.Input((8, 8, 3))
    h = L.AveragePooling2D()(L.Conv2D(8, 3, padding="same")(inp))  # signed: both ways
    h = L.AveragePooling2D()(L.Conv2D(8, 1)(h))
    model = keras.Model(inp, L.Dense(4)(L.Flatten()(h)))
    x = np.random.default_rng(0).normal(size=(128, 8, 8, 3)).astype(np.float32)
    qat = annotate.annotate_model(model, policy.uniform(), sample_x=x)
    qat(x, training=True)
    export.prepare_for_export(qat, "int8")
    pools = [layer for layer in qat.layers
             if isinstance(getattr(layer, "layer", None), L.AveragePooling2D)]
    assert len(pools) == 2 and all(isinstance(p._output_quantizers[0], requant.PoolRounding)
                                   for p in pools)
    flat = convert.to_tflite(qat, "int8", calibration=x[:16], qat=True)
    names = [op.name for op in inspect.list_ops(flat)]
    assert names.count("AVERAGE_POOL_2D") == 2 and "QUANTIZE" not in names, names
    local = diagnostics.op_agreement(flat, qat, x)
    pooled = [a for a in local if a.op == "AVERAGE_POOL_2D"]
    assert len(pooled) == 2 and max(a.max_steps for a in pooled) < 1e-3, pooled
    requant.remove(qat)  # the quantizer alone rounds negative ties up: a step off
    assert max(a.max_steps for a in diagnostics.op_agreement(flat, qat, x)
               if a.op == "AVERAGE_POOL_2D") >= 1 - 1e-3
