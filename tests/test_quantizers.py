"""Golden arithmetic, gradient rules and config round-trips for every quantizer."""

import math

import numpy as np
import pytest

from edgeqat import quantizers as q
from edgeqat.keras import keras, tf


def run(quantizer, x, training=False, shape=None, state=None):
    """Builds ``quantizer`` on a throwaway layer and applies it to ``x``."""
    host = keras.layers.Layer(name="host")
    x = tf.constant(np.asarray(x, np.float32))
    weights = quantizer.build(x.shape if shape is None else shape, "t", host)
    for key, value in (state or {}).items():
        weights[key].assign(value)
    return quantizer(x, training, weights), weights


GOLDEN = [
    # (quantizer, state, input, expected)
    (q.Relu6Quantizer(8), {}, [-1.0, 0.0, 0.01, 3.0, 6.0, 7.0],
     [0.0, 0.0, 0.0, 128 * 6 / 255, 6.0, 6.0]),
    (q.Relu6Quantizer(4), {}, [-1.0, 0.3, 2.9, 6.5], [0.0, 0.4, 2.8, 6.0]),
    (q.PerChannelWeightQuantizer(8, per_channel=False), {}, [-1.0, 0.5, 0.25, 1.0],
     [-1.0, 64 / 127, 32 / 127, 1.0]),
    (q.PerChannelWeightQuantizer(4, per_channel=False), {}, [-1.0, 0.5, 0.1, 1.0],
     [-1.0, 4 / 7, 1 / 7, 1.0]),
    (q.PerChannelWeightQuantizer(8, per_channel=True), {}, [[1.0, 0.1], [-0.5, 0.2]],
     [[1.0, 64 * 0.2 / 127], [-63 / 127, 0.2]]),  # -63.5 rounds half up
    (q.LsqQuantizer(8, signed=False), {"step": 0.1, "seen": 1.0},
     [[-0.5, 0.04, 0.06, 25.5, 30.0]], [[0.0, 0.0, 0.1, 25.5, 25.5]]),
    (q.LsqQuantizer(4, signed=True), {"step": 0.5, "seen": 1.0},
     [[-5.0, -3.9, 0.24, 3.4, 9.0]], [[-4.0, -4.0, 0.0, 3.5, 3.5]]),
    (q.LsqQuantizer(4, per_channel=True, signed=True, narrow_range=True),
     {"step": [0.5, 0.1], "seen": 1.0}, [[1.0, 1.0], [-9.0, 0.26]], [[1.0, 0.7], [-3.5, 0.3]]),
    (q.PactQuantizer(2, init_alpha=2.0), {"seen": 1.0}, [[-1.0, 0.3, 0.4, 1.5, 3.0]],
     [[0.0, 0.0, 2 / 3, 4 / 3, 2.0]]),
    (q.PactQuantizer(8, signed=True), {"alpha": 1.27, "seen": 1.0}, [[-2.0, 0.5, 2.0]],
     [[-1.27, 0.5, 1.27]]),
    (q.MovingAverageRangeQuantizer(8), {"min": -1.0, "max": 1.55, "seen": 1.0},
     [[-2.0, 0.0, 0.5, 3.0]], [[-1.0, 0.0, 0.5, 1.55]]),
]


@pytest.mark.parametrize("quantizer,state,x,expected", GOLDEN,
                         ids=[f"{type(g[0]).__name__}-{i}" for i, g in enumerate(GOLDEN)])
def test_golden(quantizer, state, x, expected):
    y, _ = run(quantizer, x, training=False, state=state)
    np.testing.assert_allclose(y.numpy(), expected, atol=1e-5)


def test_moving_average_first_batch_sets_range_then_blends():
    quant = q.MovingAverageRangeQuantizer(8, decay=0.5)
    host = keras.layers.Layer()
    w = quant.build(tf.TensorShape([None, 3]), "t", host)
    quant(tf.constant([[-1.0, 0.0, 3.0]]), True, w)
    assert (w["min"].numpy(), w["max"].numpy()) == (-1.0, 3.0)
    quant(tf.constant([[-3.0, 0.0, 5.0]]), True, w)
    np.testing.assert_allclose([w["min"].numpy(), w["max"].numpy()], [-2.0, 4.0])


def test_range_always_holds_zero():
    quant = q.MovingAverageRangeQuantizer(8)
    host = keras.layers.Layer()
    w = quant.build(tf.TensorShape([None, 2]), "t", host)
    y = quant(tf.constant([[2.0, 4.0]]), True, w)
    assert w["min"].numpy() == 0.0  # min forced <= 0 so zero is exact
    np.testing.assert_allclose(y.numpy(), [[2.0, 4.0]], atol=4 / 255)


def test_percentile_ignores_outliers():
    x = np.concatenate([np.linspace(-1, 1, 9999), [100.0]]).astype(np.float32)[None]
    quant = q.PercentileQuantizer(8, percentile=99.9)
    host = keras.layers.Layer()
    w = quant.build(tf.TensorShape([None, x.shape[1]]), "t", host)
    quant(tf.constant(x), True, w)
    assert 0.9 < w["max"].numpy() < 1.1 and -1.1 < w["min"].numpy() < -0.9


def test_mse_clips_a_lone_outlier():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(size=4095), [40.0]]).astype(np.float32)[None]
    quant = q.MseRangeQuantizer(4)
    host = keras.layers.Layer()
    w = quant.build(tf.TensorShape([None, x.shape[1]]), "t", host)
    quant(tf.constant(x), True, w)
    assert w["max"].numpy() < 40.0 * 0.8


def test_lsq_initialises_from_data():
    x = np.array([[1.0, -2.0, 3.0, -4.0]], np.float32)
    quant = q.LsqQuantizer(8, signed=True)
    _, w = run(quant, x, training=True)
    np.testing.assert_allclose(w["step"].numpy(), 2 * 2.5 / math.sqrt(127), rtol=1e-6)
    assert w["seen"].numpy() == 1.0


def test_lsq_weight_init_minimises_rounding_error():
    # 4-bit narrow weights, Qp = 7. Channel 0 is Gaussian: the error-minimising step is
    # below max/Qp (the tails are clipped) and well below the paper's 2 mean|x| / sqrt(Qp).
    # Channel 1 is a ramp on a 1/7 grid: max/Qp is exact (error 0), so the search keeps it.
    ch0 = np.random.default_rng(0).normal(size=256)
    ch1 = np.linspace(-1.0, 1.0, 15).repeat(18)[:256]
    x = np.stack([ch0, ch1], axis=1).astype(np.float32)  # [256, 2]: channels on axis -1
    quant = q.LsqQuantizer(4, per_channel=True, narrow_range=True)
    assert quant.init == "mse" and q.LsqQuantizer(4).init == "paper"
    _, w = run(quant, x, training=True)
    step = w["step"].numpy()

    def err(s, col):
        return np.sum((np.clip(np.round(col / s), -7, 7) * s - col) ** 2)

    top, paper = np.abs(ch0).max() / 7, 2 * np.abs(ch0).mean() / math.sqrt(7)
    brute = min(np.linspace(0.3, 1.0, 701) * top, key=lambda s: err(s, ch0))
    assert step[0] < top and step[0] < 0.7 * paper
    assert err(step[0], ch0) <= 1.01 * err(brute, ch0)
    assert err(step[0], ch0) < 0.8 * min(err(top, ch0), err(paper, ch0))
    np.testing.assert_allclose(step[1], 1.0 / 7, rtol=1e-6)
    _, wp = run(q.LsqQuantizer(4, per_channel=True, narrow_range=True, init="paper"), x,
                training=True)
    np.testing.assert_allclose(wp["step"].numpy(), 2 * np.abs(x).mean(0) / math.sqrt(7),
                               rtol=1e-5)
    with pytest.raises(ValueError, match="init"):
        q.LsqQuantizer(4, init="max")


def grads(quantizer, x, state, param):
    host = keras.layers.Layer()
    x = tf.Variable(np.asarray(x, np.float32))
    w = quantizer.build(x.shape, "t", host)
    for key, value in state.items():
        w[key].assign(value)
    with tf.GradientTape() as tape:
        y = quantizer(x, True, w)
        loss = tf.reduce_sum(y)
    gx, gp = tape.gradient(loss, [x, w[param]])
    return gx.numpy(), gp.numpy()


def test_lsq_gradient_is_the_papers():
    # s = 0.5, 4-bit signed: Qn = 8, Qp = 7; x/s = -10 (low), 0.6 (inside), 18 (high)
    gx, gs = grads(q.LsqQuantizer(4, signed=True), [[-5.0, 0.3, 9.0]],
                   {"step": 0.5, "seen": 1.0}, "step")
    np.testing.assert_array_equal(gx, [[0.0, 1.0, 0.0]])
    g = 1 / math.sqrt(3 * 7)
    np.testing.assert_allclose(gs, g * (-8 + (1 - 0.6) + 7), rtol=1e-5)


def test_lsq_per_channel_weight_gradient():
    x = [[0.3, 1.0], [-2.0, 0.05]]  # channel 0: s=0.5, channel 1: s=0.1; 4-bit narrow Qp=7
    gx, gs = grads(q.LsqQuantizer(4, per_channel=True, narrow_range=True),
                   x, {"step": [0.5, 0.1], "seen": 1.0}, "step")
    np.testing.assert_array_equal(gx, [[1.0, 0.0], [1.0, 1.0]])
    g = 1 / math.sqrt(2 * 7)
    expected = [g * ((1 - 0.6) + (-4 + 4)), g * (7 + (1 - 0.5))]
    np.testing.assert_allclose(gs, expected, rtol=1e-5)


def test_pact_gradient_is_the_papers():
    gx, ga = grads(q.PactQuantizer(8, init_alpha=2.0, alpha_decay=0.0),
                   [[-1.0, 0.5, 1.9, 2.5, 3.0]], {"seen": 1.0}, "alpha")
    np.testing.assert_array_equal(gx, [[0.0, 1.0, 1.0, 0.0, 0.0]])
    assert ga == pytest.approx(2.0)  # one per element clipped at alpha


def test_pact_signed_gradient():
    _, ga = grads(q.PactQuantizer(8, signed=True, init_alpha=1.0, alpha_decay=0.0),
                  [[-3.0, -2.0, 0.5, 2.0]], {"seen": 1.0}, "alpha")
    assert ga == pytest.approx(-2.0 + 1.0)  # d(-a)/da for the two below, +1 above


@pytest.mark.parametrize("quantizer", [q.Relu6Quantizer(8), q.MovingAverageRangeQuantizer(8),
                                       q.PerChannelWeightQuantizer(8, False)])
def test_straight_through_inside_range(quantizer):
    state = {"min": -1.0, "max": 1.0, "seen": 1.0} if "min" in str(
        quantizer.build.__qualname__) else {}
    host = keras.layers.Layer()
    x = tf.Variable([[0.1, 0.5, 0.9]])
    w = quantizer.build(x.shape, "t", host)
    for k, v in state.items():
        if k in w:
            w[k].assign(v)
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(quantizer(x, True, w))
    np.testing.assert_array_equal(tape.gradient(loss, x).numpy(), [[1.0, 1.0, 1.0]])


def test_inference_graph_is_a_bare_fake_quant():
    quant = q.LsqQuantizer(8, signed=False)
    host = keras.layers.Layer()
    w = quant.build(tf.TensorShape([None, 4]), "t", host)
    fn = tf.function(lambda x: quant(x, False, w))
    graph = fn.get_concrete_function(tf.TensorSpec([1, 4])).graph
    ops = {op.type for op in graph.get_operations()}
    assert "FakeQuantWithMinMaxVars" in ops
    assert not ops & {"IdentityN", "Round", "Floor"}  # no custom-gradient ops traced


ALL = [q.PerChannelWeightQuantizer(4, False), q.Relu6Quantizer(6),
       q.MovingAverageRangeQuantizer(8, 0.9), q.PercentileQuantizer(8, 0.99, 99.0),
       q.MseRangeQuantizer(4, 0.99, 10), q.PactQuantizer(4, True, 3.0, 0.0),
       q.LsqQuantizer(4, True, True, True)]


@pytest.mark.parametrize("quantizer", ALL, ids=lambda x: type(x).__name__)
def test_config_round_trip(quantizer):
    again = type(quantizer).from_config(quantizer.get_config())
    assert again == quantizer
    assert again != q.Relu6Quantizer(3)


def test_bad_bits_rejected():
    with pytest.raises(ValueError, match="num_bits"):
        q.Relu6Quantizer(1)
