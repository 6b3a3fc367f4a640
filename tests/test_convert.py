import numpy as np
import pytest

from edgeqat import convert, inspect
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


def test_ptq_without_calibration_is_refused(small_model):
    with pytest.raises(ValueError, match="needs calibration data"):
        convert.to_tflite(small_model[0], "int8")
