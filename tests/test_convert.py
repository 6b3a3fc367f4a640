import numpy as np
import pytest

from edgeqat import convert, export, inspect
from edgeqat.errors import UserError
from edgeqat.keras import keras


@pytest.fixture(scope="module")
def small_model():
    keras.utils.set_random_seed(0)
    m = keras.Sequential([
        keras.Input((8, 8, 1)),
        keras.layers.Conv2D(4, 3, activation="relu"),
        keras.layers.Flatten(),
        keras.layers.Dense(5),
    ])
    x = np.random.default_rng(0).random((32, 8, 8, 1), dtype=np.float32)
    return m, x


def test_ptq_int8_is_full_integer_with_int8_io(small_model):
    m, x = small_model
    content = convert.to_tflite(m, "int8", calibration=x)
    ops = inspect.require_full_integer(content)
    assert [op.name for op in ops] == ["CONV_2D", "RESHAPE", "FULLY_CONNECTED"]
    assert all(op.is_integer for op in ops)


def test_float_model_fails_the_integer_check_naming_ops(small_model):
    m, _ = small_model
    content = convert.to_tflite(m, "float")
    with pytest.raises(UserError) as e:
        inspect.require_full_integer(content, "float.tflite")
    msg = str(e.value)
    assert "float.tflite is not fully integer: 3 float op(s)" in msg
    assert "CONV_2D (float32/float32/float32 -> float32)" in msg


def test_int16x8_ptq(small_model):
    m, x = small_model
    content = convert.to_tflite(m, "int16x8", calibration=x)
    assert inspect.float_ops(content) == []
    assert inspect.tensor_types(content).get("int16", 0) >= 2


def test_int16x8_qat_stores_int64_biases_and_runs(small_model):
    """The converter's QAT path writes int32 biases the 16x8 kernels refuse; edgeqat
    widens them, so the model allocates and matches the Keras QAT model."""
    from ai_edge_litert.interpreter import Interpreter

    from edgeqat import annotate, policy

    m, x = small_model
    dense = m.layers[-1]
    dense.bias.assign(np.linspace(-0.5, 0.5, dense.units))  # a zero bias is dropped
    qat = annotate.annotate_model(m, policy.uniform(activation_bits=16), sample_x=x)
    qat(x, training=True)
    content = convert.to_tflite(export.prepare_for_export(qat), "int16x8", qat=True)
    types = inspect.tensor_types(content)
    assert types.get("int64") == 2 and inspect.float_ops(content) == []  # conv, dense biases
    assert [op.name for op in inspect.list_ops(content)][-1] == "FULLY_CONNECTED"
    interp = Interpreter(model_content=content)
    interp.allocate_tensors()
    inp, out = interp.get_input_details()[0], interp.get_output_details()[0]
    assert inp["dtype"] == out["dtype"] == np.int16
    (s_in, _), (s_out, _) = inp["quantization"], out["quantization"]
    interp.set_tensor(inp["index"], np.round(x[:1] / s_in).astype(np.int16))
    interp.invoke()
    y = interp.get_tensor(out["index"]).astype(np.float64) * s_out
    np.testing.assert_allclose(y, qat.predict(x[:1], verbose=0), atol=8 * s_out)


def test_ptq_without_calibration_is_refused(small_model):
    with pytest.raises(ValueError, match="needs calibration data"):
        convert.to_tflite(small_model[0], "int8")


def test_qat_tensors_are_named_once_per_layer(monkeypatch):
    """A QAT file names each tensor by the layers fused into it, each once (the converter
    names a conv's output after its Conv2D, BiasAdd, ReadVariableOp and activation ops),
    in fewer name bytes than the converter's names, naming the same layers, and every
    weighted op still maps to its layer."""
    from edgeqat import annotate, diagnostics, policy

    keras.utils.set_random_seed(0)
    m = keras.Sequential([
        keras.Input((8, 8, 3)),
        keras.layers.Conv2D(8, 3, use_bias=False, name="conv_a"),
        keras.layers.BatchNormalization(name="bn_a"),
        keras.layers.ReLU(name="relu_a"),
        keras.layers.DepthwiseConv2D(3, name="dw_b"),
        keras.layers.ReLU(6.0, name="relu_b"),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(5, bias_initializer="ones", name="head"),
    ])
    x = np.random.default_rng(0).random((16, 8, 8, 3), dtype=np.float32)
    qat = annotate.annotate_model(m, policy.uniform(), sample_x=x)
    qat(x, training=True)
    qat = export.prepare_for_export(qat)
    flat = convert.to_tflite(qat, "int8", calibration=x, qat=True)
    names = [t["name"] for t in inspect.tensors(flat)]
    assert len(set(names)) == len(names)
    layers = {layer.name for layer in qat.layers}
    for n in names:
        found = inspect.layers_named(n, layers)
        assert len(found) == len(set(found)), n
    assert any(set(inspect.layers_named(n, layers)) == {"quant_relu_b", "quant_dw_b"}
               for n in names)
    monkeypatch.setattr(convert, "name_tensors_by_layer", lambda flat, model: flat)
    raw = [t["name"] for t in inspect.tensors(
        convert.to_tflite(qat, "int8", calibration=x, qat=True))]
    assert len(raw) == len(names) and sum(map(len, names)) < sum(map(len, raw))
    assert [set(inspect.layers_named(n, layers)) for n in names] == [
        set(inspect.layers_named(n, layers)) for n in raw]
    probed = {a.layer for a in diagnostics.op_agreement(flat, qat, x[:2])}
    assert {"quant_conv_a", "quant_dw_b", "quant_head"} <= probed


@pytest.mark.slow
def test_a_symmetric_input_range_keeps_the_converters_zero_point():
    """Inputs in exactly [-1, 1] (MobileNetV2's preprocessing) put FakeQuant's zero point
    at 127.5: TensorFlow's kernel rounded it to 127 and kept 1.0, the converter to 128 and
    clipped 1.0 a step lower, so every pixel at 1.0 differed (a trained MobileNetV2 on
    digits: 27 softmax steps end to end). ``prepare_for_export`` stores the range on the
    converter's grid, and Keras and TFLite agree exactly."""
    from ai_edge_litert.interpreter import Interpreter

    from edgeqat import annotate, policy
    from edgeqat.graph import wrapper_classes
    from tests.harness_support import output_steps

    inp = keras.Input((4, 4, 1))
    model = keras.Model(inp, keras.layers.ReLU()(inp))
    x = np.random.default_rng(0).choice([-1.0, -0.5, 0.0, 0.5, 1.0], (16, 4, 4, 1))
    x = x.astype(np.float32)
    x[0, 0, 0, 0], x[1, 0, 0, 0] = -1.0, 1.0  # the range is exactly [-1, 1]
    qat = annotate.annotate_model(model, policy.uniform(), sample_x=x)
    quantize_input = next(layer for layer in qat.layers
                          if isinstance(layer, wrapper_classes()[1]))

    def input_range():
        return [float(quantize_input.quantizer_vars[k].numpy()) for k in ("min", "max")]

    assert input_range() == [-1.0, 1.0]  # zero point -min / step = 127.5
    flat = convert.to_tflite(export.prepare_for_export(qat), "int8", calibration=x, qat=True)
    assert export.whole_zero_points(qat) == 0  # settled: nothing left to move
    scale, zero = Interpreter(model_content=flat).get_input_details()[0]["quantization"]
    np.testing.assert_allclose(np.array(input_range()) / scale, [-128 - zero, 127 - zero],
                               atol=1e-4)
    steps, same = output_steps(qat, flat, x)
    assert steps.max() == 0 and same.all()


@pytest.mark.slow
def test_pooling_over_one_position_keeps_its_input_range():
    """A global average pooling over one position (a 32 px network's last stage) is an
    identity the converter drops with its FakeQuant, so the next op reads the input's
    grid: ``prepare_for_export`` gives the pooling its input's range, and Keras no longer
    re-rounds the values onto the pooling's own (observed, slightly different) one."""
    from edgeqat import annotate, policy
    from tests.harness_support import output_steps

    keras.utils.set_random_seed(0)
    inp = keras.Input((2, 2, 3))
    x = keras.layers.Conv2D(16, 2)(inp)  # one position
    x = keras.layers.GlobalAveragePooling2D(keepdims=True)(x)  # as in squeeze-excite
    model = keras.Model(inp, keras.layers.Flatten()(keras.layers.Conv2D(8, 1)(x)))
    x = np.random.default_rng(0).normal(size=(64, 2, 2, 3)).astype(np.float32)
    qat = annotate.annotate_model(model, policy.uniform(), sample_x=x)
    pool = next(layer for layer in qat.layers
                if isinstance(getattr(layer, "layer", None), keras.layers.GlobalAveragePooling2D))
    conv = next(layer for layer in qat.layers  # the first: the pooling's input
                if isinstance(getattr(layer, "layer", None), keras.layers.Conv2D))

    def ranges(layer):
        return [float(layer._output_quantizer_vars[k].numpy()) for k in ("min", "max")]

    for v in pool._output_quantizer_vars["min"], pool._output_quantizer_vars["max"]:
        v.assign(v * 1.3)  # as if it had drifted from its input's over other batches
    flat = convert.to_tflite(export.prepare_for_export(qat), "int8", calibration=x, qat=True)
    assert ranges(pool) == ranges(conv)
    assert "MEAN" not in [op.name for op in inspect.list_ops(flat)]  # dropped: an identity
    steps, same = output_steps(qat, flat, x)
    assert steps.max() == 0 and same.all()
