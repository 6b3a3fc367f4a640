"""Per-layer diagnostics, sensitivity and the PTQ improvements, on tiny untrained models."""

import numpy as np
import pytest

from edgeqat import diagnostics, inspect, ptq
from edgeqat.config import PtqConfig, load_pipeline
from edgeqat.errors import ConfigError
from edgeqat.keras import keras

L = keras.layers


def badly_scaled_model() -> keras.Model:
    """conv_a -> conv_bad -> conv_c -> pool -> logits; conv_bad has one outlier channel.

    conv_bad's channel 0 carries a bias of 300 (its other channels are ~1), so the per-tensor
    int8 range of its output is ~[0, 300] and every other channel rounds to 0 or 1 step.
    conv_c ignores channel 0, so the model's function depends on exactly what is lost.
    """
    x = inputs = keras.Input((8, 8, 1), name="input")
    x = L.Conv2D(8, 3, padding="same", activation="relu", name="conv_a")(x)
    x = L.Conv2D(8, 3, padding="same", activation="relu", name="conv_bad")(x)
    x = L.Conv2D(8, 3, padding="same", activation="relu", name="conv_c")(x)
    x = L.GlobalAveragePooling2D(name="pool")(x)
    model = keras.Model(inputs, L.Dense(10, name="logits")(x))
    w, b = model.get_layer("conv_bad").get_weights()
    b[0] = 300.0
    model.get_layer("conv_bad").set_weights([w, b])
    w, b = model.get_layer("conv_c").get_weights()
    w[:, :, 0, :] = 0.0
    model.get_layer("conv_c").set_weights([w, b])
    return model


@pytest.fixture(scope="module")
def bad():
    keras.utils.set_random_seed(0)
    model = badly_scaled_model()
    x = np.random.default_rng(0).random((48, 8, 8, 1)).astype(np.float32)
    return model, x, ptq.calibrate(model, x)


def test_debugger_names_the_badly_scaled_layer_worst(bad):
    model, x, cal = bad
    d = diagnostics.ptq_layer_errors(cal, model, x[:24])
    assert d.method == "quantization_debugger"
    assert {e.layer for e in d.layers} == {"conv_a", "conv_bad", "conv_c", "pool", "logits"}
    assert d.worst(1)[0].layer == "conv_bad"
    by = {e.layer: e for e in d.layers}
    # healthy layers sit near the int8 noise floor (~40 dB, RMSE ~0.29 steps) ...
    assert by["conv_a"].score_db > 30 and 0.2 < by["conv_a"].rmse_steps < 0.4
    # ... while the outlier channel hides the damage from the whole-tensor SQNR
    assert by["conv_bad"].sqnr_db > 40 and by["conv_bad"].channel_sqnr_db < 15
    assert d.to_dict()["worst"][0] == "conv_bad"


def test_direct_comparison_sees_the_damage_start_at_the_bad_layer(bad):
    model, x, cal = bad
    d = diagnostics.direct_layer_errors(ptq.quantize(cal), model, x[:24], name="ptq_int8",
                                        reference="float model")
    order = [e.layer for e in d.layers]
    assert order[:2] == ["conv_a", "conv_bad"] and "logits" in order
    first_bad = next(e.layer for e in d.layers if e.score_db < 20)
    assert first_bad == "conv_bad"
    # errors accumulate here: the model output lost its signal too
    assert {e.layer: e for e in d.layers}["logits"].score_db < 20


def test_sensitivity_quantizing_only_the_bad_layer_costs_most(bad):
    model, x, cal = bad
    y = model.predict(x, verbose=0).argmax(-1)
    s = diagnostics.sensitivity(cal, model, x, y, how="only", layers="conv_.*")
    assert [e.layer for e in s.layers][0] == "conv_bad"
    assert s.layers[0].delta < 0 and s.baseline_accuracy == 1.0
    by = {e.layer: e for e in s.layers}
    assert by["conv_bad"].output_rmse > 10 * by["conv_a"].output_rmse


def test_selective_quantization_leaves_the_named_layer_float(bad):
    _, _, cal = bad
    node = next(n for n in cal.nodes() if "conv_bad" in n)
    ops = inspect.list_ops(ptq.quantize(cal, float_nodes=[node]))
    assert [op.name for op in ops if not op.is_integer] == ["DEQUANTIZE", "CONV_2D", "QUANTIZE"]
    assert inspect.float_ops(ptq.quantize(cal)) == []
    with pytest.raises(ValueError, match="16x8"):
        ptq.quantize(cal, activations="int16")


def test_int8_via_calibration_matches_the_converter(bad):
    from edgeqat import convert

    model, x, cal = bad
    ours = diagnostics.run_tflite(ptq.quantize(cal), x)
    theirs = diagnostics.run_tflite(convert.to_tflite(model, "int8", calibration=x), x)
    np.testing.assert_allclose(ours, theirs, atol=1e-6)


def test_activation_ranges_clip_outliers():
    v = np.concatenate([np.linspace(0, 1, 10_000), [1000.0]]).astype(np.float32)
    assert ptq.activation_range(v, "minmax") == (0.0, 1000.0)
    lo, hi = ptq.activation_range(v, "percentile", 99.9)
    assert lo == 0.0 and 0.99 < hi < 1.01
    # one huge outlier: clipping it costs more squared error than the coarse step does
    assert ptq.activation_range(v, "mse") == (0.0, 1000.0)
    heavy = np.random.default_rng(0).laplace(size=50_000).astype(np.float32)
    lo, hi = ptq.activation_range(heavy, "mse")
    # at 8 bits the MSE-optimal clip of a Laplace tail is a modest shrink (ACIQ: ~10 b)
    assert 0.6 * heavy.max() < hi < 0.99 * heavy.max() and heavy.min() < lo < 0
    neg = np.array([-2.0, -1.0, 3.0], np.float32)
    assert ptq.activation_range(neg, "minmax") == (-2.0, 3.0)
    assert ptq.activation_range(np.array([1.0, 2.0]), "minmax")[0] == 0.0  # zero in range


def test_percentile_calibration_repairs_the_outlier_layer(bad):
    model, x, _ = bad
    # channel 0 is 1/8 of conv_bad's values: an 85th percentile clips it
    cfg = PtqConfig(calibration="percentile", percentile=85.0)
    d = diagnostics.ptq_layer_errors(ptq.calibrate(model, x, cfg), model, x[:24])
    minmax = diagnostics.ptq_layer_errors(bad[2], model, x[:24])
    new = {e.layer: e for e in d.layers}["conv_bad"]
    old = {e.layer: e for e in minmax.layers}["conv_bad"]
    assert new.scale < old.scale / 10  # channel 0 clips instead of swamping the range
    assert new.channel_sqnr_db > old.channel_sqnr_db


def test_adaround_lands_on_the_grid_and_beats_nearest_rounding():
    keras.utils.set_random_seed(1)
    layer = L.Conv2D(6, 3, padding="same", use_bias=False)
    layer.build((None, 6, 6, 4))
    x = np.random.default_rng(1).normal(size=(64, 6, 6, 4)).astype(np.float32)
    w = layer.kernel.numpy()
    wq = ptq.adaround_kernel(layer, x, iterations=300)
    s = ptq.channel_scale(layer, w)
    n = wq / s
    np.testing.assert_allclose(n, np.round(n), atol=1e-3)
    assert np.all(np.abs(n - w / s) < 1.0 + 1e-3)  # rounded up or down, never further
    np.testing.assert_allclose(np.abs(n).max(axis=(0, 1, 2)), 127, atol=1e-3)

    def err(k):
        return float(np.mean((ptq.kernel_op(layer, x, k) - ptq.kernel_op(layer, x, w)) ** 2))

    assert err(wq) < err(s * np.round(w / s))


def test_adaround_model_converts_with_its_rounding_kept(bad):
    model, x, _ = bad
    rounded = ptq.adaround(model, x[:16], iterations=20)
    for name in ("conv_a", "conv_bad"):
        layer = rounded.get_layer(name)
        k = layer.kernel.numpy()
        n = k / ptq.channel_scale(layer, k)
        np.testing.assert_allclose(n, np.round(n), atol=1e-3)
    assert inspect.float_ops(ptq.quantize(ptq.calibrate(rounded, x))) == []


def test_pipeline_toml_keys(write_toml):
    cfg = load_pipeline(write_toml("""
        mode = "auto"
        [ptq]
        calibration = "mse"
        adaround = true
        adaround_iterations = 50
        [auto]
        qat = false
        float_layers = 2
        decide_on = "validation"
        [diagnostics]
        sensitivity = true
        worst = 5
    """))
    assert cfg.mode == "auto" and cfg.ptq.calibration == "mse" and cfg.ptq.adaround
    assert cfg.auto.float_layers == 2 and not cfg.auto.qat and cfg.diagnostics.worst == 5
    for bad_toml, fragment in [("mode = 'fast'", "mode = 'fast' is not one of: qat, auto"),
                               ("[ptq]\ncalibration = 'kl'", "ptq.calibration"),
                               ("[ptq]\npercentile = 20.0", "ptq.percentile"),
                               ("[auto]\nfloat_layers = -1", "auto.float_layers"),
                               ("[auto]\nbudget = 0.1", "unknown key 'auto.budget'")]:
        with pytest.raises(ConfigError, match=fragment):
            load_pipeline(write_toml(bad_toml))


def test_round_weights_puts_kernels_on_a_per_channel_grid():
    from edgeqat.ptq import round_weights

    keras.utils.set_random_seed(0)
    inp = keras.Input((6,))
    model = keras.Model(inp, keras.layers.Dense(3, name="out")(
        keras.layers.Dense(5, name="hidden")(inp)))
    rounded = round_weights(model, 4, keep=("out",))
    k = rounded.get_layer("hidden").kernel.numpy()
    step = np.abs(model.get_layer("hidden").kernel.numpy()).max(0) / 7  # max/Qp per column
    np.testing.assert_allclose(k / step, np.round(k / step), atol=1e-5)  # on the grid
    assert np.abs(k / step).max() <= 7 + 1e-5
    np.testing.assert_array_equal(rounded.get_layer("out").kernel.numpy(),
                                  model.get_layer("out").kernel.numpy())  # kept
    assert model.get_layer("hidden").kernel is not rounded.get_layer("hidden").kernel


def test_layer_names_holding_a_slash_map_to_their_tensors():
    names = {"block/depthwise": 0, "block/depthwise_relu": 1, "conv": 2}
    tensor = "m/block/depthwise/BiasAdd;m/block/depthwise_relu/Relu6;m/conv/Conv2D"
    assert inspect.layers_named(tensor, names) == [
        "block/depthwise", "block/depthwise_relu", "conv"]


def test_op_agreement_isolates_the_one_op_keras_gets_wrong():
    """A QAT model agrees with its flatbuffer op by op within 1 step; scale one layer's
    Keras weights afterwards and only that op disagrees (nothing accumulates downstream,
    unlike ``direct_layer_errors``)."""
    from edgeqat import annotate, convert, export, policy

    keras.utils.set_random_seed(0)
    x = inputs = keras.Input((8, 8, 1))
    x = L.Conv2D(8, 3, padding="same", activation="relu", name="conv_a")(x)
    x = L.DepthwiseConv2D(3, padding="same", activation="relu", name="dw")(x)
    x = L.Add(name="add")([x, L.Conv2D(8, 1, name="conv_b")(x)])
    x = L.GlobalAveragePooling2D(name="pool")(x)
    model = keras.Model(inputs, L.Dense(10, name="logits")(x))
    x = np.random.default_rng(0).random((16, 8, 8, 1)).astype(np.float32)
    qat = export.prepare_for_export(annotate.annotate_model(model, policy.uniform(),
                                                            sample_x=x))
    flat = convert.to_tflite(qat, "int8", calibration=x[:4], qat=True)
    ops = inspect.list_ops(flat)
    before = diagnostics.op_agreement(flat, qat, x[:4])
    weighted = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")
    assert sorted(a.op for a in before if a.op in weighted) == \
        sorted(o.name for o in ops if o.name in weighted)
    assert {a.op for a in before} >= {"ADD", "MEAN"}
    assert max(a.max_steps for a in before) <= 1 + 1e-3
    conv_a = next(lay for lay in qat.layers if lay.name.endswith("conv_a"))
    kernel = next(w for w in conv_a.trainable_weights if "kernel" in w.name)
    kernel.assign(kernel * 2.0)
    after = {a.layer: a for a in diagnostics.op_agreement(flat, qat, x[:4])}
    assert after[conv_a.name].max_steps > 2
    assert all(a.max_steps <= 1 + 1e-3 for name, a in after.items() if name != conv_a.name)
