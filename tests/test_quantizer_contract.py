"""The quantizer contract (``edgeqat.quantizers.Quantizer``), run over every registered
quantizer: config round-trip, an inference graph that is one bare FakeQuant of the
declared kind, ``scale()`` equal to the FakeQuant step, and a QAT model holding it that
saves and loads to identical outputs.

``EXAMPLES`` gives each registered class a role and constructor arguments; a quantizer
registered without an entry here fails ``test_every_registered_quantizer_is_covered``.
"""

from __future__ import annotations

import numpy as np
import pytest

from edgeqat import annotate
from edgeqat import quantizers as q
from edgeqat.keras import keras, tf, tfmot
from edgeqat.quantize_configs import LayerQuantizeConfig

EXAMPLES = {
    "PerChannelWeightQuantizer": [("weight", {"num_bits": 8}),
                                  ("weight", {"num_bits": 4, "per_channel": False})],
    "Relu6Quantizer": [("activation", {"num_bits": 8})],
    "FixedRangeQuantizer": [("activation", {"num_bits": 8, "min": 0.0, "max": 255 / 256})],
    "MovingAverageRangeQuantizer": [("activation", {"num_bits": 8})],
    "PercentileQuantizer": [("activation", {"num_bits": 8, "percentile": 99.0})],
    "MseRangeQuantizer": [("activation", {"num_bits": 6})],
    "PactQuantizer": [("activation", {"num_bits": 8}), ("activation", {"signed": True})],
    "LsqQuantizer": [("weight", {"num_bits": 4, "per_channel": True, "narrow_range": True}),
                     ("activation", {"num_bits": 8, "signed": False})],
}
CASES = [(name, role, kw) for name, cases in EXAMPLES.items() for role, kw in cases]
IDS = [f"{name}-{i}" for i, (name, _, _) in enumerate(CASES)]
# Ops an inference graph may hold besides its one FakeQuant: reading variables and
# computing the range it is handed (folded to constants by the converter), including the
# converter's own widening of a range under 1e-6 (LessEqual, SelectV2: q.converter_range).
RANGE_OPS = {"Placeholder", "ReadVariableOp", "Identity", "Const", "Abs", "Max", "Min",
             "Maximum", "Minimum", "Neg", "Mul", "AddV2", "Sub", "NoOp", "ZerosLike",
             "StopGradient", "LessEqual", "SelectV2"}


def _make(name: str, kw: dict) -> q.Quantizer:
    return q.REGISTRY[name](**kw)


def _data(role: str) -> np.ndarray:
    rng = np.random.default_rng(0)
    if role == "weight":
        return rng.normal(0, 0.3, (3, 3, 4, 5)).astype(np.float32)
    return rng.normal(0.5, 1.5, (16, 6)).astype(np.float32)


def _built(quant: q.Quantizer, x: np.ndarray):
    host = keras.layers.Layer(name="host")
    weights = quant.build(tf.TensorShape(x.shape), "t", host)
    quant(tf.constant(x), True, weights)  # ranges and steps see data first
    return weights


def test_every_registered_quantizer_is_covered():
    assert set(EXAMPLES) == set(q.REGISTRY), "give each registered quantizer an example"
    assert all(issubclass(cls, q.Quantizer) for cls in q.REGISTRY.values())


@pytest.mark.parametrize("name,role,kw", CASES, ids=IDS)
def test_config_round_trip(name, role, kw):
    quant = _make(name, kw)
    again = type(quant).from_config(quant.get_config())
    assert again == quant and hash(again) == hash(quant) and repr(again) == repr(quant)
    assert again is not quant


@pytest.mark.parametrize("name,role,kw", CASES, ids=IDS)
def test_inference_graph_is_one_bare_fake_quant(name, role, kw):
    quant = _make(name, kw)
    x = _data(role)
    weights = _built(quant, x)
    fn = tf.function(lambda t: quant(t, False, weights))
    concrete = fn.get_concrete_function(tf.TensorSpec(x.shape))
    graph_ops = concrete.graph.get_operations()
    ops = [op.type for op in graph_ops]
    fake = [op for op in graph_ops if op.type.startswith("FakeQuant")]
    assert [op.type for op in fake] == [quant.export_op], ops
    assert set(ops) - {quant.export_op} <= RANGE_OPS, sorted(set(ops) - RANGE_OPS)
    # Bare: it reads the input itself, and its output is the function's (via Identity).
    assert fake[0].inputs[0].op.type == "Placeholder"
    out = concrete.graph.outputs[0].op
    while out.type == "Identity":
        out = out.inputs[0].op
    assert out is fake[0]


@pytest.mark.parametrize("name,role,kw", CASES, ids=IDS)
def test_scale_is_the_fake_quant_step(name, role, kw):
    quant = _make(name, kw)
    x = _data(role)
    weights = _built(quant, x)
    y = quant(tf.constant(x), False, weights).numpy().astype(np.float64)
    step = np.asarray(quant.scale(weights, tf.constant(x)), np.float64)
    levels = y / step  # zero is on the grid, so every output is a whole number of steps
    np.testing.assert_allclose(levels, np.round(levels), atol=2e-3)
    span = (levels.max(axis=tuple(range(y.ndim - 1))) - levels.min(
        axis=tuple(range(y.ndim - 1)))) if step.ndim else levels.max() - levels.min()
    assert np.all(span <= 2**quant.num_bits - 1 + 1e-3)
    assert np.all(span >= 1)  # the step is not so large that everything collapses


@pytest.mark.parametrize("name,role,kw", CASES, ids=IDS)
def test_a_qat_model_holding_it_saves_and_loads(name, role, kw, tmp_path):
    quant = _make(name, kw)
    config = LayerQuantizeConfig(("kernel",), quant, None) if role == "weight" \
        else LayerQuantizeConfig((), None, quant)
    inp = keras.Input((6,))
    dense = keras.layers.Dense(5, name="dense")
    out = tfmot.quantization.keras.QuantizeWrapperV2(dense, config)(inp)
    model = keras.Model(inp, out)
    x = _data("activation")
    model(x, training=True)
    before = model.predict(x, verbose=0)
    with annotate.scope():
        model.save(tmp_path / "m", save_format="tf")
        loaded = keras.models.load_model(tmp_path / "m")
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), before)


def test_the_contract_is_enforced():
    """A quantizer without ``scale()`` cannot be made, nor registered if not one."""

    class NoScale(q.Quantizer):
        def build(self, tensor_shape, name, layer):
            return {}

        def __call__(self, inputs, training, weights, **kwargs):
            return inputs

        def get_config(self):
            return {}

    with pytest.raises(TypeError, match="scale"):
        NoScale()
    with pytest.raises(TypeError, match="only edgeqat Quantizer subclasses"):
        q.register(int)


@pytest.mark.parametrize("name,role,kw", [c for c in CASES if c[0] == "LsqQuantizer"])
def test_set_bits_keeps_the_clip_range(name, role, kw):
    quant = _make(name, kw)
    x = _data(role)
    weights = _built(quant, x)
    top = quant.levels[1] * weights["step"].numpy()
    quant.set_bits(3, weights)
    np.testing.assert_allclose(quant.levels[1] * weights["step"].numpy(), top, rtol=1e-6)
    with pytest.raises(ValueError, match="Received: num_bits=1"):
        quant.set_bits(1, weights)
