"""Annotation: canonical rewrite keeps the function, errors, save/load round-trip."""

import numpy as np
import pytest

from edgeqat import annotate, export, policy
from edgeqat.errors import UserError
from edgeqat.keras import keras, tf
from tests.harness_support import output_steps

L = keras.layers
RNG = np.random.default_rng(0)


def _trained_bn(bn, channels):
    bn.set_weights([RNG.uniform(0.5, 2, channels), RNG.normal(size=channels),
                    RNG.normal(size=channels), RNG.uniform(0.5, 2, channels)])


def zoo() -> keras.Model:
    """Every rewrite at once: nesting, BN folds, lone BN, Conv1D, separable, TFOpLambda,
    LayerNormalization."""
    inner_in = keras.Input((8, 8, 4))
    t = L.SeparableConv2D(6, 3, padding="same", use_bias=False)(inner_in)
    t = L.BatchNormalization()(t)
    inner = keras.Model(inner_in, L.Activation("swish")(t), name="inner")

    inp = keras.Input((8, 8, 3))
    x = L.Rescaling(1 / 127.5, offset=-1.0)(inp)
    x = L.Conv2D(4, 3, padding="same", use_bias=False)(x)
    x = L.BatchNormalization()(x)
    x = tf.nn.relu6(x + 3.0) * (1.0 / 6.0)
    x = inner(x)
    x = L.DepthwiseConv2D(3, padding="same")(x)
    x = L.BatchNormalization()(x)
    y = L.Conv2D(6, 1, activation="relu")(x)
    x = x + y
    x = L.BatchNormalization()(x)  # after an Add: a lone BN
    x = L.Reshape((64, 6))(x)
    x = L.Conv1D(5, 3, padding="causal", activation="tanh")(x)
    x = L.LayerNormalization(epsilon=1e-3)(x)
    x = L.GlobalAveragePooling1D()(x)
    out = L.Dense(3, activation="softmax")(x)
    model = keras.Model(inp, out)
    for layer in model.layers + inner.layers:
        if isinstance(layer, L.BatchNormalization):
            _trained_bn(layer, layer.weights[0].shape[0])
        if isinstance(layer, L.LayerNormalization):
            layer.set_weights([RNG.uniform(0.5, 2, 5), RNG.normal(size=5)])
    return model


def test_canonical_float_model_has_the_same_function():
    model = zoo()
    flat, origin = annotate.flatten(model)
    canon, _ = annotate.canonicalize(flat, origin, lambda name: True)
    classes = {type(layer).__name__ for layer in canon.layers}
    assert not classes & {"BatchNormalization", "Conv1D", "SeparableConv2D", "TFOpLambda",
                          "Functional", "Rescaling", "Dense", "LayerNormalization"}
    x = RNG.uniform(0, 255, (4, 8, 8, 3)).astype(np.float32)
    np.testing.assert_allclose(canon(x), model(x), atol=2e-5)


def test_annotate_does_not_touch_the_user_model():
    model = zoo()
    before = [w.copy() for w in model.get_weights()]
    annotate.annotate_model(model, policy.uniform())
    for a, b in zip(before, model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    assert len(model.layers[2]._inbound_nodes) == 1


@pytest.mark.parametrize("act", ["moving_average", "lsq", "pact", "percentile", "mse", "relu6"])
def test_annotated_model_trains_and_tracks_float(act):
    model = zoo()
    x = RNG.uniform(0, 255, (32, 8, 8, 3)).astype(np.float32)
    qat = annotate.annotate_model(model, policy.uniform(activation_quantizer=act), sample_x=x)
    assert any("quant_" in layer.name for layer in qat.layers)
    qat.compile("adam", "sparse_categorical_crossentropy")
    loss = qat.train_on_batch(x, np.zeros(32))
    assert np.isfinite(loss)


def test_unsupported_layers_are_all_listed():
    inp = keras.Input((10,))
    x = L.Lambda(lambda t: t * 2, name="double")(inp)
    x = L.Dense(4)(x)
    x = L.UnitNormalization(name="unit")(x)
    with pytest.raises(UserError, match=r"2 layer\(s\).*double \(Lambda.*unit "
                                        r"\(UnitNormalization"):
        annotate.annotate_model(keras.Model(inp, x), policy.uniform())


def test_float_rule_leaves_a_layer_out():
    inp = keras.Input((10,))
    x = L.Lambda(lambda t: t * 2, name="double")(inp)
    x = L.Dense(4, name="head")(x)
    pol = policy.PolicyConfig(rules=(policy.RuleConfig(layers="double", float=True),))
    qat = annotate.annotate_model(keras.Model(inp, x), pol)
    assert "double" in [layer.name for layer in qat.layers]
    assert "quant_head" in [layer.name for layer in qat.layers]


def test_keras3_model_is_refused():
    class Fake:
        pass

    Fake.__module__ = "keras.src.models.functional"
    with pytest.raises(TypeError, match="Keras 3"):
        annotate.annotate_model(Fake(), policy.uniform())


def test_custom_objects_and_scope_register_nothing_globally():
    objs = annotate.custom_objects()
    assert {"LsqQuantizer", "PactQuantizer", "LayerQuantizeConfig", "ChannelAffine"} <= set(objs)
    assert keras.utils.get_registered_object("LsqQuantizer") is None
    with annotate.scope():
        assert keras.utils.get_registered_object("LsqQuantizer") is objs["LsqQuantizer"]


@pytest.mark.parametrize("suffix", ["_savedmodel"])
def test_saved_qat_model_reloads_with_identical_outputs(tmp_path, suffix):
    model = zoo()
    x = RNG.uniform(0, 255, (16, 8, 8, 3)).astype(np.float32)
    pol = policy.PolicyConfig(rules=(
        policy.RuleConfig(classes="Conv2D", weight_quantizer="lsq", activation_quantizer="lsq"),
        policy.RuleConfig(classes="DepthwiseConv2D", activation_quantizer="pact")))
    qat = annotate.annotate_model(model, pol, sample_x=x)
    qat.compile("adam", "sparse_categorical_crossentropy")
    qat.train_on_batch(x, np.zeros(16))
    path = str(tmp_path / f"qat{suffix}")
    qat.save(path, save_format="tf")
    with annotate.scope():
        again = keras.models.load_model(path)
    np.testing.assert_array_equal(qat.predict(x, verbose=0), again.predict(x, verbose=0))


@pytest.mark.slow
def test_conv1d_then_relu_becomes_one_fused_conv():
    """Conv1D -> ReLU: the ReLU moves before the reshape back to 1-D, so TFLite fuses it
    into the CONV_2D (was: a separately quantized conv output, then a RELU op)."""
    from edgeqat import convert, inspect, models

    x = np.random.default_rng(0).normal(size=(64, 40, 1)).astype(np.float32)
    qat = annotate.annotate_model(models.mnist1d_cnn((40, 1), 10), policy.uniform(),
                                  sample_x=x)
    relus = [w for w in qat.layers if isinstance(getattr(w, "layer", None), L.ReLU)]
    assert [w.layer.name for w in relus] == ["conv_0_relu", "conv_1_relu", "conv_2_relu"]
    ops = [op.name for op in inspect.list_ops(convert.to_tflite(
        export.prepare_for_export(qat), "int8", qat=True, calibration=x[:8]))]
    # three convolutions, and the 10-class head as a per-tensor FULLY_CONNECTED
    assert ops.count("CONV_2D") == 3 and ops[-1] == "FULLY_CONNECTED" and "RELU" not in ops


def _affine_model() -> keras.Model:
    """EfficientNet's stem (Rescaling, per-channel Normalization, padding, strided conv)
    and a DenseNet-style lone BN after a concatenation."""
    inp = keras.Input((32, 32, 3))
    x = L.Rescaling(1 / 255.0)(inp)
    x = L.Normalization(mean=[0.485, 0.456, 0.406], variance=[0.229**2, 0.224**2, 0.225**2])(x)
    x = L.Normalization(mean=0.0, variance=1.0)(x)  # an identity: dropped
    x = L.ZeroPadding2D(1)(x)
    x = L.Conv2D(8, 3, strides=2, use_bias=False)(x)
    x = L.BatchNormalization()(x)
    x = L.ReLU()(x)
    x = L.BatchNormalization()(L.Concatenate()([x, x]))
    x = L.ReLU()(x)
    x = L.GlobalAveragePooling2D()(L.Conv2D(8, 1)(x))
    model = keras.Model(inp, L.Dense(4)(x))
    for layer in model.layers:
        if isinstance(layer, L.BatchNormalization):
            _trained_bn(layer, layer.weights[0].shape[0])
        if isinstance(layer, L.LayerNormalization):
            layer.set_weights([RNG.uniform(0.5, 2, 5), RNG.normal(size=5)])
    return model


@pytest.mark.slow
def test_affine_preprocessing_costs_one_elementwise_mul_and_add():
    """Rescaling then Normalization compose into one MUL and one ADD on the input (was one
    1x1 DEPTHWISE_CONV_2D each: 224-256 us at 224x224x3 against ~12 us); a lone BN is a
    MUL and an ADD with the ReLU fused; the Keras model computes what TFLite computes."""
    from edgeqat import convert, inspect

    model = _affine_model()
    x = RNG.uniform(0, 255, (16, 32, 32, 3)).astype(np.float32)
    flat_model, origin = annotate.flatten(model)
    canon, _ = annotate.canonicalize(flat_model, origin, lambda name: True)
    np.testing.assert_allclose(canon(x), model(x), atol=1e-4)
    qat = export.prepare_for_export(annotate.annotate_model(model, policy.uniform(),
                                                            sample_x=x))
    flat = convert.to_tflite(qat, "int8", calibration=x, qat=True)
    ops = [op.name for op in inspect.require_full_integer(flat)]
    assert ops[:3] == ["MUL", "ADD", "PAD"], ops
    assert ops.count("MUL") == 2 and ops.count("ADD") == 2
    assert "DEPTHWISE_CONV_2D" not in ops and "RELU" not in ops
    assert output_steps(qat, flat, x)[0].max() <= 2


@pytest.mark.slow
@pytest.mark.parametrize("weights", ["per_channel", "per_tensor"])
def test_depthwise_weights_per_channel_by_default(weights):
    """Depthwise kernels get one scale per output channel (in x multiplier), as TFLite
    stores them, unless the policy asks for per tensor; Keras and TFLite agree exactly."""
    from ai_edge_litert.interpreter import Interpreter

    from edgeqat import convert

    inp = keras.Input((12, 12, 6))
    x = L.DepthwiseConv2D(3, padding="same", depth_multiplier=2)(inp)
    x = L.GlobalAveragePooling2D()(L.ReLU()(x))
    model = keras.Model(inp, L.Dense(4)(x))
    dw = model.layers[1]
    k = dw.get_weights()
    dw.set_weights([k[0] * RNG.uniform(0.01, 3, (1, 1, 6, 2)), k[1]])  # channels differ
    x = RNG.normal(size=(16, 12, 12, 6)).astype(np.float32)
    qat = export.prepare_for_export(annotate.annotate_model(
        model, policy.uniform(weight_quantizer=weights), sample_x=x))
    flat = convert.to_tflite(qat, "int8", calibration=x, qat=True)
    interp = Interpreter(model_content=flat)
    dw_op = next(op for op in interp._get_ops_details() if op["op_name"] == "DEPTHWISE_CONV_2D")
    scales = interp._get_tensor_details(dw_op["inputs"][1], 0)["quantization_parameters"][
        "scales"]
    wrapper = next(w for w in qat.layers if isinstance(getattr(w, "layer", None),
                                                       L.DepthwiseConv2D))
    kernel, quantizer, qvars = wrapper._weight_vars[0]
    np.testing.assert_allclose(scales, np.reshape(quantizer.scale(qvars, kernel), -1),
                               rtol=1e-6)
    assert len(scales) == (12 if weights == "per_channel" else 1)
    assert output_steps(qat, flat, x)[0].max() <= 1


@pytest.mark.slow
def test_layer_norm_becomes_cheap_int8_steps_each_simulated():
    """A LayerNormalization (ConvNeXt's, on image channels and on pooled features) is
    written out as MEAN, SUB, MUL, MEAN, ADD, RSQRT, MUL and its affine: no
    SQUARED_DIFFERENCE (no int8 kernel in XNNPACK; 150x its float time), every internal
    tensor trained and each op within one step of Keras; the float function is kept."""
    from edgeqat import convert, diagnostics, inspect

    inp = keras.Input((8, 8, 3))
    x = L.Conv2D(16, 3, padding="same")(inp)
    x = L.LayerNormalization(epsilon=1e-6)(x)
    x = L.Dense(32, activation="gelu")(x)
    x = L.LayerNormalization()(L.GlobalAveragePooling2D()(x))
    model = keras.Model(inp, L.Dense(4)(x))
    for layer in model.layers:
        if isinstance(layer, L.LayerNormalization):
            n = layer.gamma.shape[0]
            layer.set_weights([RNG.uniform(0.5, 2, n), RNG.normal(0, 0.3, n)])
    x = RNG.normal(size=(32, 8, 8, 3)).astype(np.float32)
    flat_model, origin = annotate.flatten(model)
    canon, _ = annotate.canonicalize(flat_model, origin, lambda name: True)
    assert not any(isinstance(layer, L.LayerNormalization) for layer in canon.layers)
    np.testing.assert_allclose(canon(x), model(x), atol=1e-4)

    qat = annotate.annotate_model(model, policy.uniform(), sample_x=x)
    qat.compile(keras.optimizers.Adam(1e-3), keras.losses.MeanSquaredError())
    assert np.isfinite(qat.fit(x, RNG.normal(size=(32, 4)), epochs=2, verbose=0)
                       .history["loss"]).all()
    qat = export.prepare_for_export(qat)
    flat = convert.to_tflite(qat, "int8", calibration=x, qat=True)
    ops = [op.name for op in inspect.require_full_integer(flat)]
    assert "SQUARED_DIFFERENCE" not in ops and "QUANTIZE" not in ops, ops
    assert ops.count("RSQRT") == 2 and ops.count("MEAN") == 5, ops  # 2 per norm + pooling
    local = diagnostics.op_agreement(flat, qat, x[:4])
    checked = {a.op for a in local}
    assert {"MEAN", "SUB", "MUL", "ADD", "RSQRT"} <= checked, checked
    worst = max(local, key=lambda a: a.max_steps)
    assert worst.max_steps <= 1 + 1e-3, worst


@pytest.mark.slow
@pytest.mark.parametrize("act", ["moving_average", "lsq", "pact", "percentile", "mse"])
def test_layer_norm_of_a_flat_pixel_saturates_as_tflite_does(act):
    """A pixel whose channels are all equal has variance 0: ``rsqrt`` of it is ``inf`` in
    Keras and the top of the output range in TFLite's int8 kernel. Every observer learns
    its range from the finite values, training stays finite, and Keras and TFLite agree
    on those pixels too."""
    from edgeqat import convert, diagnostics

    inp = keras.Input((4, 4, 8))
    x = L.LayerNormalization(epsilon=1e-6)(L.Conv2D(8, 1)(inp))
    model = keras.Model(inp, L.Dense(4)(x))
    x = RNG.normal(size=(16, 4, 4, 8)).astype(np.float32)
    x[:, :2] = 0.0  # half the pixels flat: the 1x1 conv maps them to its bias
    model.layers[1].set_weights([model.layers[1].get_weights()[0],
                                 np.full(8, 0.5, np.float32)])
    qat = annotate.annotate_model(model, policy.uniform(activation_quantizer=act),
                                  sample_x=x)
    qat.compile(keras.optimizers.Adam(1e-3), keras.losses.MeanSquaredError())
    history = qat.fit(x, RNG.normal(size=(16, 4, 4, 4)), epochs=3, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    assert all(np.isfinite(w).all() for w in qat.get_weights())
    qat = export.prepare_for_export(qat)
    flat = convert.to_tflite(qat, "int8", calibration=x, qat=True)
    local = diagnostics.op_agreement(flat, qat, x[:4])
    assert "RSQRT" in {a.op for a in local}
    worst = max(local, key=lambda a: a.max_steps)
    assert worst.max_steps <= 1 + 1e-3, worst


@pytest.mark.slow
def test_tiny_kernels_are_quantized_on_the_grid_the_converter_stores():
    """ConvNeXt's LayerScale (1e-6 at initialisation) folded into the convolution before it
    leaves kernels of ~1e-7: the converter widens a per-channel range under 1e-6 to
    [-5e-7, 5e-7], so the Keras model quantizes to that grid too (it used its own and
    was up to 4 steps off on ConvNeXtTiny at 224 px)."""
    from ai_edge_litert.interpreter import Interpreter

    from edgeqat import convert

    inp = keras.Input((6, 6, 16))
    x = L.Conv2D(8, 1)(inp)
    model = keras.Model(inp, L.Conv2D(8, 1)(x))
    conv = model.layers[-1]
    k, b = conv.get_weights()
    scale = np.geomspace(1e-7, 1e-5, 8).astype(np.float32)  # channels either side
    conv.set_weights([k * scale, b + 1e-6 * RNG.normal(size=8)])
    x = RNG.normal(size=(16, 6, 6, 16)).astype(np.float32)
    qat = export.prepare_for_export(annotate.annotate_model(model, policy.uniform(),
                                                            sample_x=x))
    flat = convert.to_tflite(qat, "int8", calibration=x, qat=True)
    interp = Interpreter(model_content=flat)
    last = [op for op in interp._get_ops_details() if op["op_name"] == "CONV_2D"][-1]
    stored = interp._get_tensor_details(last["inputs"][1], 0)["quantization_parameters"][
        "scales"]
    wrapper = qat.layers[-1]
    kernel, quantizer, qvars = wrapper._weight_vars[0]
    np.testing.assert_allclose(stored, quantizer.scale(qvars, kernel), rtol=1e-6)
    assert stored.min() == pytest.approx(5e-7 / 127, rel=1e-6)  # widened channels
    assert output_steps(qat, flat, x)[0].max() <= 1
