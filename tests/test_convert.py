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
    qat = annotate.annotate_model(m, policy.uniform(activation_bits=16), sample_x=x)
    qat(x, training=True)
    content = convert.to_tflite(export.prepare_for_export(qat), "int16x8", qat=True)
    types = inspect.tensor_types(content)
    assert types.get("int64") == 2 and inspect.float_ops(content) == []  # conv, dense biases
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
