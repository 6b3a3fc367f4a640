"""The op-version check: a model a device's runtime version cannot load is refused
before it ships, naming the op, its version and the runtime version it needs."""

import dataclasses

import numpy as np
import pytest

from edgeqat import convert, op_versions
from edgeqat.config import DEVICES_DIR, load_device
from edgeqat.errors import UserError
from edgeqat.keras import keras


@pytest.fixture(scope="module")
def int8_model():
    keras.utils.set_random_seed(0)
    m = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Conv2D(4, 3, activation="relu"),
                          keras.layers.Flatten(), keras.layers.Dense(5)])
    x = np.random.default_rng(0).random((16, 8, 8, 1), dtype=np.float32)
    return convert.to_tflite(m, "int8", calibration=x)


def _with_op_version(model: bytes, op: str, version: int) -> bytes:
    import flatbuffers
    from tensorflow.lite.python import schema_py_generated as schema

    model_t = schema.ModelT.InitFromPackedBuf(bytearray(model), 0)
    for code in model_t.operatorCodes:
        if max(code.builtinCode, code.deprecatedBuiltinCode) == getattr(
                schema.BuiltinOperator, op):
            code.version = version
    b = flatbuffers.Builder(len(model) + 1024)
    b.Finish(model_t.Pack(b), file_identifier=b"TFL3")
    return bytes(b.Output())


def test_table_matches_its_source():
    table = op_versions.TABLE
    assert table[("CONV_2D", 7)] == "2.11.0"  # the int4 convolution
    assert table[("FULLY_CONNECTED", 10)] == "2.11.0"
    assert max(table.values(), key=op_versions.parse_version) == op_versions.TABLE_NEWEST
    assert op_versions.parse_version("2.14.0") > op_versions.parse_version("2.9.0")


def test_int8_model_loads_in_2_14(int8_model):
    needs, recorded = op_versions.op_needs(int8_model)
    assert {n.op for n in needs} >= {"CONV_2D", "FULLY_CONNECTED"}
    assert all(n.needs is not None for n in needs)
    assert recorded is not None  # the converter's own min_runtime_version
    assert op_versions.unloadable(int8_model, "2.14.0") == []
    op_versions.require_loadable({"qat_int8": int8_model},
                                 load_device(DEVICES_DIR / "rpi4_emulated_tflite_runtime.toml"))


def test_too_old_runtime_is_refused_naming_op_and_version(int8_model):
    int4_like = _with_op_version(int8_model, "CONV_2D", 7)
    device = dataclasses.replace(
        load_device(DEVICES_DIR / "rpi4_emulated_tflite_runtime.toml"), runtime_version="2.10.0")
    with pytest.raises(UserError) as e:
        op_versions.require_loadable({"qat_int4_weights": int4_like}, device)
    msg = str(e.value)
    assert "qat_int4_weights.tflite cannot load on" in msg
    assert "(tflite_runtime 2.10.0): CONV_2D version 7 needs runtime >= 2.11.0" in msg


def test_op_version_newer_than_the_table(int8_model):
    newer = _with_op_version(int8_model, "FULLY_CONNECTED", 99)
    problems = op_versions.unloadable(newer, "2.14.0")
    assert problems == ["FULLY_CONNECTED version 99 is newer than edgeqat's table (from "
                        "TensorFlow 2.13.0): needs a runtime newer than 2.13.0"]


def test_no_runtime_version_no_check(int8_model):
    newer = _with_op_version(int8_model, "FULLY_CONNECTED", 99)
    op_versions.require_loadable({"m": newer}, load_device(DEVICES_DIR / "local_cpu.toml"))
