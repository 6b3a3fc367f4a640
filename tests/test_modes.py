"""The precision-mode table, the layer-kind table and the hook seam: small unit checks."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from edgeqat import config, modes


def test_config_allows_exactly_the_table_modes():
    field = {f.name: f for f in dataclasses.fields(config.ConvertConfig)}["mode"]
    assert field.metadata["choices"] == modes.NAMES == tuple(m.value for m in modes.Mode)


def test_rows_name_their_artifacts_and_refuse_bad_modes():
    assert modes.spec("int16x8").ptq_name == "ptq_int16x8"
    assert modes.spec(modes.Mode.INT8).qat_name == "qat_int8"
    assert modes.mode_of("qat_int4_weights") is modes.Mode.INT4_WEIGHTS
    assert modes.mode_of("mixed_float_1") is None and modes.mode_of(modes.FLOAT) is None
    with pytest.raises(ValueError, match="Received: mode='int2'"):
        modes.spec("int2")
    row = modes.MODES[modes.Mode.INT8]
    with pytest.raises(ValueError, match="Received: activation_bits"):
        dataclasses.replace(row, activation_bits=(8, 2))
    with pytest.raises(ValueError, match="widen_qat_biases"):
        dataclasses.replace(row, widen_qat_biases=True)


def test_every_kernel_rounding_family_has_a_rule():
    from edgeqat import requant

    for row in modes.MODES.values():
        assert row.kernel_rounding is None or row.kernel_rounding in requant.KERNEL_ROUNDING


def test_layer_kind_rows_name_real_weights():
    from edgeqat import layer_kinds
    from edgeqat.keras import keras

    L = keras.layers
    for cls, make in ((L.Conv2D, lambda: L.Conv2D(2, 3)), (L.Dense, lambda: L.Dense(2)),
                      (L.DepthwiseConv2D, lambda: L.DepthwiseConv2D(3)),
                      (L.SeparableConv2D, lambda: L.SeparableConv2D(2, 3)),
                      (L.Conv2DTranspose, lambda: L.Conv2DTranspose(2, 3))):
        layer = make()
        layer.build((None, 6, 6, 4) if cls is not L.Dense else (None, 4))
        row = layer_kinds.weighted(layer)
        for attr in row.weights:
            assert any(getattr(layer, attr) is w for w in layer.weights), attr
        # The kernel a BatchNorm folds into is the last quantized weight (the pointwise one
        # of a separable convolution), at kernel_index of get_weights().
        assert layer.weights[row.kernel_index] is getattr(layer, row.weights[-1])
    assert layer_kinds.weighted(L.Conv1DTranspose(2, 3)) is None  # no row: no folding


def test_hooks_take_a_slot_and_give_it_back():
    from edgeqat import annotate, hooks, policy
    from edgeqat.keras import keras

    inp = keras.Input((4, 4, 2))
    out = keras.layers.Conv2D(3, 1)(inp)
    x = np.random.default_rng(0).normal(size=(8, 4, 4, 2)).astype(np.float32)
    qat = annotate.annotate_model(keras.Model(inp, out), policy.uniform(), sample_x=x)
    slots = hooks.slots(qat)
    bare = [s.get() for s in slots]
    assert {s.kind for s in slots} == {"input", "weight", "output"}
    for s in slots:
        hooks.install(s, hooks.Hook(s.get()))
    assert all(isinstance(s.get(), hooks.Hook) for s in slots)
    out_slot = next(s for s in slots if s.kind == "output")
    assert out_slot.get().num_bits == 8
    assert out_slot.get().scale(out_slot.variables) == bare[slots.index(out_slot)].scale(
        out_slot.variables)
    with hooks.suspended(qat):
        assert [s.get() for s in slots] == bare and all(
            a is b for a, b in zip((s.get() for s in slots), bare, strict=True))
    assert all(isinstance(s.get(), hooks.Hook) for s in slots)
    hooks.remove(qat)
    assert all(s.get() is b for s, b in zip(slots, bare, strict=True))
