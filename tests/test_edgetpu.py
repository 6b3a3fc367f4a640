"""Edge TPU compatibility report: per-op verdicts, the split point and the TPU MAC share."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edgeqat.edgetpu import edgetpu_report, is_compiled
from edgeqat.errors import UserError


def _model(middle=None):
    from edgeqat.keras import keras, tf

    tf.random.set_seed(0)
    inp = keras.Input((8, 8, 1))
    h = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(inp)
    if middle is not None:
        h = middle(h)
    h = keras.layers.DepthwiseConv2D(3, padding="same", activation="relu")(h)
    h = keras.layers.AveragePooling2D()(h)
    h = keras.layers.Flatten()(h)
    return keras.Model(inp, keras.layers.Dense(10)(h))


@pytest.fixture(scope="module")
def calib():
    return np.random.default_rng(0).random((32, 8, 8, 1), dtype=np.float32)


# MACs by hand: conv 8*8*8 outputs * 3*3*1; depthwise 8*8*8 * 3*3; dense 10 * 128 inputs.
CONV, DEPTHWISE, DENSE = 8 * 8 * 8 * 9, 8 * 8 * 8 * 9, 10 * 4 * 4 * 8


def test_fully_integer_model_maps_entirely(calib):
    from edgeqat.convert import to_tflite

    report = edgetpu_report(to_tflite(_model(), "int8", calibration=calib))
    assert report.split_index is None and report.fully_mapped
    assert [op.op for op in report.ops] == ["CONV_2D", "DEPTHWISE_CONV_2D", "AVERAGE_POOL_2D",
                                            "RESHAPE", "FULLY_CONNECTED"]
    assert all(op.supported and op.placement == "tpu" for op in report.ops)
    assert report.total_macs == CONV + DEPTHWISE + DENSE
    assert report.tpu_mac_share == 1.0
    assert "no split" in report.summary()


def test_unsupported_op_splits_the_graph(calib):
    """ELU has no Edge TPU kernel (and here no int8 one either: it stays float)."""
    from edgeqat.convert import to_tflite
    from edgeqat.keras import keras

    report = edgetpu_report(to_tflite(_model(keras.layers.ELU()), "int8", calibration=calib))
    by_name = {op.op: op for op in report.ops}
    assert "ELU" in by_name
    split = report.ops[report.split_index]
    assert split.placement == "cpu" and not split.supported
    assert report.ops[0].op == "CONV_2D" and report.ops[0].placement == "tpu"
    assert report.split_index == 1  # the first op after the conv (a DEQUANTIZE to float)
    assert any("not an Edge TPU operation" in r for r in by_name["ELU"].reasons)
    assert any("float32" in r for r in by_name["ELU"].reasons)
    after = report.ops[report.split_index + 1:]
    dw = by_name["DEPTHWISE_CONV_2D"]
    assert dw.supported and dw.placement == "cpu"  # supported, but after the split
    assert dw.reasons == (f"after the split at op #{report.split_index}",)
    assert all(op.placement == "cpu" for op in after)
    assert report.tpu_macs == CONV
    assert report.tpu_mac_share == pytest.approx(CONV / (CONV + DEPTHWISE + DENSE))
    assert f"split at op #{report.split_index}" in report.summary()
    d = report.to_dict()
    json.dumps(d)
    assert d["split_op"] == split.op and len(d["ops"]) == len(report.ops)
    assert not is_compiled(to_tflite(_model(), "float"))


def test_float_model_runs_nothing_on_the_tpu():
    from edgeqat.convert import to_tflite

    report = edgetpu_report(to_tflite(_model(), "float"))
    assert report.split_index == 0 and report.tpu_mac_share == 0.0
    assert any("float32" in r for r in report.ops[0].reasons)


def test_schema_level_limits():
    """Build flatbuffers directly with the schema's object API to hit specific limits."""
    import flatbuffers
    from ai_edge_litert import schema_py_generated as s

    def build(shape, dtype, signature=None, fused=0, op=s.BuiltinOperator.MAX_POOL_2D):
        m = s.ModelT()
        m.version = 3
        code = s.OperatorCodeT()
        code.builtinCode = op
        code.deprecatedBuiltinCode = min(op, 127)
        m.operatorCodes = [code]
        m.buffers = [s.BufferT(), s.BufferT(), s.BufferT()]
        tensors = []
        for i in range(2):
            t = s.TensorT()
            t.shape, t.type, t.buffer, t.name = list(shape), dtype, i + 1, f"t{i}"
            t.shapeSignature = signature
            tensors.append(t)
        o = s.OperatorT()
        o.opcodeIndex, o.inputs, o.outputs = 0, [0], [1]
        o.builtinOptionsType = s.BuiltinOptions.Pool2DOptions
        o.builtinOptions = s.Pool2DOptionsT()
        o.builtinOptions.fusedActivationFunction = fused
        g = s.SubGraphT()
        g.tensors, g.operators, g.inputs, g.outputs = tensors, [o], [0], [1]
        m.subgraphs = [g]
        b = flatbuffers.Builder(0)
        b.Finish(m.Pack(b), file_identifier=b"TFL3")
        return bytes(b.Output())

    ok = edgetpu_report(build([1, 4, 4, 2], s.TensorType.INT8))
    assert ok.fully_mapped
    cases = {
        "dynamic shape": build([1, 4, 4, 2], s.TensorType.INT8, signature=[-1, 4, 4, 2]),
        "rank 5": build([1, 1, 4, 4, 2], s.TensorType.INT8),
        "only the 3 innermost": build([2, 4, 4, 2], s.TensorType.INT8),
        "int16": build([1, 4, 4, 2], s.TensorType.INT16),
        "fused activation": build([1, 4, 4, 2], s.TensorType.UINT8, fused=1),
        "not an Edge TPU operation": build([1, 4, 4, 2], s.TensorType.INT8,
                                           op=s.BuiltinOperator.GELU),
    }
    for needle, model in cases.items():
        report = edgetpu_report(model)
        assert report.split_index == 0, needle
        assert any(needle in r for r in report.ops[0].reasons), (needle, report.ops[0])


def test_not_a_flatbuffer():
    with pytest.raises(UserError, match="not a TFLite flatbuffer"):
        edgetpu_report(b"\x00" * 64)
