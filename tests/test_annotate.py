"""Annotation: canonical rewrite keeps the function, errors, save/load round-trip."""

import numpy as np
import pytest

from edgeqat import annotate, export, policy
from edgeqat.errors import UserError
from edgeqat.keras import keras, tf

L = keras.layers
RNG = np.random.default_rng(0)


def _trained_bn(bn, channels):
    bn.set_weights([RNG.uniform(0.5, 2, channels), RNG.normal(size=channels),
                    RNG.normal(size=channels), RNG.uniform(0.5, 2, channels)])


def zoo() -> keras.Model:
    """Every rewrite at once: nesting, BN folds, lone BN, Conv1D, separable, TFOpLambda."""
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
    x = L.GlobalAveragePooling1D()(x)
    out = L.Dense(3, activation="softmax")(x)
    model = keras.Model(inp, out)
    for layer in model.layers + inner.layers:
        if isinstance(layer, L.BatchNormalization):
            _trained_bn(layer, layer.weights[0].shape[0])
    return model


def test_canonical_float_model_has_the_same_function():
    model = zoo()
    flat, origin = annotate.flatten(model)
    canon, _ = annotate.canonicalize(flat, origin, lambda name: True)
    classes = {type(layer).__name__ for layer in canon.layers}
    assert not classes & {"BatchNormalization", "Conv1D", "SeparableConv2D", "TFOpLambda",
                          "Functional", "Rescaling", "Dense"}
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
    assert ops.count("CONV_2D") == 4 and "RELU" not in ops
