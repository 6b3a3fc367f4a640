"""The QAT recipe: each schedule element acting, distillation, LR, precision, determinism.

Every test trains a tiny model on a few hundred 8x8 digits for a few dozen steps; a
Keras callback looks at the model after each step.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from edgeqat.config import ConfigError, DataConfig, PolicyConfig, PrecisionStep, QatConfig
from edgeqat.keras import keras, tf, tfmot

L = keras.layers
BATCH = 32
N_TRAIN = 320  # 10 steps per epoch


@pytest.fixture(scope="module")
def data():
    from edgeqat.data import load_dataset

    d = load_dataset(DataConfig(name="digits", calibration_samples=64), 0)
    return dataclasses.replace(d, x_train=d.x_train[:N_TRAIN], y_train=d.y_train[:N_TRAIN],
                               x_val=d.x_val[:64], y_val=d.y_val[:64],
                               x_test=d.x_test[:128], y_test=d.y_test[:128])


def _mlp(data, seed=0):
    keras.utils.set_random_seed(seed)
    i = keras.Input(data.input_shape)
    x = L.Flatten()(i)
    x = L.Dense(16, activation="relu")(x)
    return keras.Model(i, L.Dense(data.num_classes)(x))


def _conv_bn(data, seed=0):
    keras.utils.set_random_seed(seed)
    i = keras.Input(data.input_shape)
    x = L.Conv2D(8, 3, padding="same")(i)
    x = L.BatchNormalization(momentum=0.5)(x)
    x = L.ReLU()(x)
    x = L.GlobalAveragePooling2D()(x)
    return keras.Model(i, L.Dense(data.num_classes)(x))


def _train(model, data, epochs=3):
    model.compile(keras.optimizers.Adam(1e-2),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(data.x_train, data.y_train, batch_size=BATCH, epochs=epochs, verbose=0)
    return model


@pytest.fixture(scope="module")
def float_mlp(data):
    return _train(_mlp(data), data)


def _annotate(model, data, which: str, weight_bits: int = 8):
    if which == "tfmot":
        return tfmot.quantization.keras.quantize_model(model)
    from edgeqat import annotate
    from edgeqat.config import RuleConfig

    policy = PolicyConfig(default=RuleConfig(weight_bits=weight_bits))
    return annotate.annotate_model(model, policy, sample_x=data.x_calib)


def _cfg(**kw) -> QatConfig:
    base = dict(epochs=2, batch_size=BATCH, learning_rate=1e-3, quant_delay=0.0,
                observer_freeze=1.0, bn_freeze=1.0)
    return QatConfig(**{**base, **kw})


class _Probe(keras.callbacks.Callback):
    """Calls ``fn(model, logs)`` after every step and keeps what it returns."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn
        self.seen = []

    def on_train_batch_end(self, batch, logs=None):
        self.seen.append((batch, dict(logs), self.fn(self.model, logs)))


# ---------------------------------------------------------------------------- schedule


def test_schedule_thresholds_follow_the_fractions():
    from edgeqat.qat import Schedule

    cfg = QatConfig(epochs=4, quant_delay=0.25, observer_freeze=0.5, bn_freeze=0.75,
                    precision=(PrecisionStep(0, 8), PrecisionStep(2, 4)))
    plan = Schedule.from_config(cfg, steps_per_epoch=10)
    assert (plan.quant_start, plan.observer_freeze_at, plan.bn_freeze_at) == (10, 20, 30)
    assert not plan.phase(9).quantize and plan.phase(10).quantize
    assert not plan.phase(19).ranges_frozen and plan.phase(20).ranges_frozen
    assert not plan.phase(29).bn_frozen and plan.phase(30).bn_frozen
    assert [plan.phase(s).weight_bits for s in (0, 19, 20, 39)] == [8, 8, 4, 4]
    never = Schedule.from_config(QatConfig(epochs=2, observer_freeze=1.0, bn_freeze=1.0), 5)
    assert not never.phase(9).ranges_frozen and not never.phase(9).bn_frozen


@pytest.mark.parametrize("which", ["edgeqat", "tfmot"])
def test_quantizers_pass_through_before_the_delay_and_quantize_after(data, float_mlp, which):
    from edgeqat import qat

    model = _annotate(float_mlp, data, which)
    probe_x = data.x_test[:32]
    float_out = float_mlp(probe_x, training=False).numpy()

    def gap(m, logs):  # max |QAT model - float model| in inference mode
        return float(np.abs(m(probe_x, training=False).numpy() - float_out).max())

    probe = _Probe(gap)
    # A negligible learning rate keeps the weights at the float model's, 4-bit weights
    # make quantization visible: the outputs match the float model only while delayed.
    cfg = _cfg(learning_rate=1e-12, quant_delay=0.5,
               precision=(PrecisionStep(0, 4),))
    result = qat.fine_tune(model, data, cfg, callbacks=[probe])
    before = [g for step, logs, g in probe.seen if not logs["quantize"]]
    after = [g for step, logs, g in probe.seen if logs["quantize"]]
    assert len(before) == len(after) == 10  # 2 epochs x 10 steps, delay = half
    assert max(before) < 1e-4
    assert min(after) > 1e-2
    assert result.events[0][0] == 0 and result.events[1][0] == 10
    assert "delay" in result.events[0][1] and "fake quant on" in result.events[1][1]


def _observer_ranges(model):
    from edgeqat.qat import quantizer_sites

    return np.array([float(v.numpy()) for s in quantizer_sites(model) if s.is_observer
                     for k, v in sorted(s.variables.items()) if "min" in k or "max" in k])


@pytest.mark.parametrize("which", ["edgeqat", "tfmot"])
def test_activation_ranges_stop_moving_after_the_observer_freeze(data, float_mlp, which):
    from edgeqat import qat

    model = _annotate(float_mlp, data, which)
    assert len(_observer_ranges(model)) >= 4
    probe = _Probe(lambda m, logs: _observer_ranges(m))
    qat.fine_tune(model, data, _cfg(observer_freeze=0.5), callbacks=[probe])
    tracking = [r for _, logs, r in probe.seen if not logs["ranges_frozen"]]
    frozen = [r for _, logs, r in probe.seen if logs["ranges_frozen"]]
    assert len(tracking) == len(frozen) == 10
    assert any(not np.array_equal(a, b) for a, b in zip(tracking, tracking[1:], strict=False))
    for r in frozen:
        np.testing.assert_array_equal(r, tracking[-1])


def test_batchnorm_statistics_stop_moving_after_the_bn_freeze(data):
    from edgeqat import qat

    float_model = _train(_conv_bn(data), data, epochs=1)
    model = tfmot.quantization.keras.quantize_model(float_model)  # keeps the BN layer
    bns = qat.batchnorm_layers(model)
    assert len(bns) == 1

    def stats(m, logs):
        bn = qat.batchnorm_layers(m)[0]
        return np.concatenate([bn.moving_mean.numpy(), bn.moving_variance.numpy()])

    probe = _Probe(stats)
    qat.fine_tune(model, data, _cfg(bn_freeze=0.5), callbacks=[probe])
    moving = [s for _, logs, s in probe.seen if not logs["bn_frozen"]]
    frozen = [s for _, logs, s in probe.seen if logs["bn_frozen"]]
    assert len(moving) == len(frozen) == 10
    assert all(not np.array_equal(a, b) for a, b in zip(moving, moving[1:], strict=False))
    for s in frozen:
        np.testing.assert_array_equal(s, moving[-1])
    assert bns[0].trainable  # given back as it came


def test_edgeqat_annotate_folds_batchnorm_so_there_is_none_to_freeze(data):
    from edgeqat import qat

    model = _annotate(_conv_bn(data), data, "edgeqat")
    assert qat.batchnorm_layers(model) == []


def test_learning_rate_is_a_tenth_of_the_float_rate_with_warmup_and_cosine(data, float_mlp):
    from edgeqat import qat

    model = _annotate(float_mlp, data, "edgeqat")
    probe = _Probe(lambda m, logs: None)
    cfg = _cfg(learning_rate=None, warmup_fraction=0.2)
    qat.fine_tune(model, data, cfg, float_learning_rate=3e-3, callbacks=[probe])
    rates = np.array([logs["learning_rate"] for _, logs, _ in probe.seen])
    total, warm, peak = 20, 4, 3e-4
    expected = [peak * (s + 1) / warm if s < warm else
                peak * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * (s - warm) / (total - warm))))
                for s in range(total)]
    np.testing.assert_allclose(rates, expected, rtol=1e-5)
    assert rates.max() == pytest.approx(peak) and rates[-1] < 0.05 * peak


def test_weight_bits_change_at_the_named_epochs(data, float_mlp):
    from edgeqat import qat

    model = _annotate(float_mlp, data, "edgeqat")
    cfg = _cfg(epochs=3, precision=(PrecisionStep(0, 8), PrecisionStep(1, 6),
                                    PrecisionStep(2, 4)))

    def bits(m, logs):
        return sorted({s.quantizer.num_bits for s in qat.quantizer_sites(m)
                       if s.kind == "weight"})

    probe = _Probe(bits)
    result = qat.fine_tune(model, data, cfg, callbacks=[probe])
    per_epoch = [probe.seen[e * 10 + 9][2] for e in range(3)]
    assert per_epoch == [[8], [6], [4]]
    assert [h["weight_bits"] for h in result.history] == [8, 6, 4]
    # The returned model keeps 4 bits: its weights lie on a 15-level grid per channel.
    for site in qat.quantizer_sites(result.model):
        if site.kind != "weight":
            continue
        assert type(site.quantizer).__name__ == "PerChannelWeightQuantizer"  # hook removed
        layer = result.model.get_layer(site.layer)
        for weight, quantizer, qvars in layer._weight_vars:
            w = quantizer(weight, False, qvars).numpy().reshape(-1, weight.shape[-1])
            assert max(len(np.unique(w[:, c])) for c in range(w.shape[1])) <= 15


# ---------------------------------------------------------------------------- distillation


def test_distillation_loss_formula():
    from edgeqat.qat import distillation_loss

    y = tf.constant([0, 2])
    s = tf.constant([[2.0, 0.5, -1.0], [0.1, 0.2, 3.0]])
    t = tf.constant([[1.0, 1.5, -1.0], [0.0, 0.0, 1.0]])
    ce = keras.losses.sparse_categorical_crossentropy(y, s, from_logits=True).numpy()
    np.testing.assert_allclose(distillation_loss(y, s, t, 1.0, 4.0).numpy(), ce, rtol=1e-6)
    np.testing.assert_allclose(distillation_loss(y, s, s, 0.0, 4.0).numpy(), 0.0, atol=1e-6)
    temp = 2.0
    pt = tf.nn.softmax(t / temp).numpy()
    ps = tf.nn.softmax(s / temp).numpy()
    kl = (pt * np.log(pt / ps)).sum(-1)
    np.testing.assert_allclose(distillation_loss(y, s, t, 0.3, temp).numpy(),
                               0.3 * ce + 0.7 * temp**2 * kl, rtol=1e-5)


def test_distillation_trains_toward_the_teacher(data, float_mlp):
    from edgeqat import qat
    from edgeqat.errors import UserError

    model = _annotate(float_mlp, data, "edgeqat")
    with pytest.raises(UserError, match="teacher"):
        qat.fine_tune(model, data, _cfg(distill=True))
    result = qat.fine_tune(model, data, _cfg(distill=True, distill_alpha=0.0), teacher=float_mlp)
    teacher = float_mlp.predict(data.x_test, verbose=0).argmax(-1)
    student = result.model.predict(data.x_test, verbose=0).argmax(-1)
    assert (teacher == student).mean() > 0.8
    assert all(h["loss"] is not None and np.isfinite(h["loss"]) for h in result.history)


# ---------------------------------------------------------------------------- determinism


def test_same_seed_same_weights(data, float_mlp):
    from edgeqat import qat

    tf.config.experimental.enable_op_determinism()
    runs = []
    for _ in range(2):
        keras.utils.set_random_seed(5)
        model = _annotate(float_mlp, data, "edgeqat")
        result = qat.fine_tune(model, data, _cfg(quant_delay=0.2, observer_freeze=0.6), seed=5)
        runs.append(result.model.get_weights())
    for a, b in zip(*runs, strict=True):
        np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------------------- config


def test_qat_toml_keys(write_toml):
    from edgeqat.config import load_pipeline

    path = write_toml("""
        [qat]
        epochs = 6
        quant_delay = 0.2
        observer_freeze = 0.6
        bn_freeze = 0.5
        distill = true
        distill_alpha = 0.3
        distill_temperature = 2
        strategy = "mirrored"
        [[qat.precision]]
        epoch = 0
        weight_bits = 8
        [[qat.precision]]
        epoch = 3
        weight_bits = 4
        """)
    q = load_pipeline(path).qat
    assert q.precision == (PrecisionStep(0, 8), PrecisionStep(3, 4))
    assert (q.quant_delay, q.distill, q.distill_temperature, q.strategy) == \
        (0.2, True, 2.0, "mirrored")
    assert q.learning_rate is None and q.learning_rate_fraction == 0.1


@pytest.mark.parametrize("text, match", [
    ("quant_delay = 1.5", "quant_delay"),
    ('strategy = "tpu"', "strategy"),
    ("distill_temperature = 0", "distill_temperature"),
    ("[[qat.precision]]\nepoch = 2\n[[qat.precision]]\nepoch = 1", "increasing"),
    ("[[qat.precision]]\nweight_bits = 9", "weight_bits"),
])
def test_bad_qat_values_are_rejected(write_toml, text, match):
    from edgeqat.config import load_pipeline

    with pytest.raises(ConfigError, match=match):
        load_pipeline(write_toml("[qat]\n" + text + "\n"))
