"""TFLite metadata on the shipped model: parsed back identically, model unchanged."""

import io
import zipfile

import numpy as np
import pytest

from edgeqat import convert, metadata
from edgeqat.keras import keras

DESC = metadata.ModelDescription(
    name="tiny_int8", description="A tiny CNN, int8, made by edgeqat's test",
    version="abc123", mean=0.0, std=16.0, labels=tuple("abcde"))


@pytest.fixture(scope="module")
def int8_model():
    keras.utils.set_random_seed(0)
    m = keras.Sequential([
        keras.Input((8, 8, 1)),
        keras.layers.Conv2D(4, 3, activation="relu", name="conv"),
        keras.layers.Flatten(),
        keras.layers.Dense(5, name="logits"),
    ])
    x = np.random.default_rng(0).random((32, 8, 8, 1), dtype=np.float32)
    return convert.to_tflite(m, "int8", calibration=x), x


def _run(model: bytes, x: np.ndarray) -> np.ndarray:
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_content=model)
    interp.allocate_tensors()
    inp, out = interp.get_input_details()[0], interp.get_output_details()[0]
    s, z = inp["quantization"]
    outs = []
    for sample in x:
        q = np.clip(np.round(sample / s) + z, -128, 127).astype(np.int8)[None]
        interp.set_tensor(inp["index"], q)
        interp.invoke()
        outs.append(interp.get_tensor(out["index"]).copy())
    return np.concatenate(outs)


def test_metadata_round_trips(int8_model):
    model, _ = int8_model
    shipped = metadata.attach_metadata(model, DESC)
    got = metadata.read_metadata(shipped)
    assert (got["name"], got["description"], got["version"], got["author"]) == (
        DESC.name, DESC.description, DESC.version, "edgeqat")
    assert got["min_parser_version"] == metadata.MIN_PARSER_VERSION
    (inp,), (out,) = got["inputs"], got["outputs"]
    assert inp["mean"] == [0.0] and inp["std"] == [16.0]
    assert "int8 scale" in inp["description"] and "zero point" in inp["description"]
    assert inp["min"][0] < inp["max"][0]
    assert out["associated_files"] == [{"name": "labels.txt", "type": 2}]
    assert got["files"] == {"labels.txt": "a\nb\nc\nd\ne\n"}
    # Tensor names are the model's own.
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_content=shipped)
    assert inp["name"] == interp.get_input_details()[0]["name"]
    assert out["name"] == interp.get_output_details()[0]["name"]
    # Attaching again replaces, never stacks, and the zip's offsets hold for readers that
    # trust them (the archive's first entry starts where its local header says).
    again = metadata.attach_metadata(shipped[: shipped.index(b"PK\x03\x04")], DESC)
    assert metadata.read_metadata(again) == got
    with zipfile.ZipFile(io.BytesIO(shipped)) as zf:
        offset = zf.infolist()[0].header_offset
    assert shipped[offset:offset + 4] == b"PK\x03\x04"


def test_model_with_metadata_computes_the_same(int8_model):
    model, x = int8_model
    shipped = metadata.attach_metadata(model, DESC)
    assert len(shipped) > len(model)
    np.testing.assert_array_equal(_run(shipped, x), _run(model, x))
    assert metadata.read_metadata(model) is None


def test_labels_must_match_the_output():
    with pytest.raises(ValueError, match="3 labels for an output of 5"):
        metadata.attach_metadata(_tiny(), metadata.ModelDescription("m", "d", labels=("a",) * 3))


def _tiny():
    m = keras.Sequential([keras.Input((4,)), keras.layers.Dense(5)])
    return convert.to_tflite(m, "float")
