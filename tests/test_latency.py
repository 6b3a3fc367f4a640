"""edgeqat.latency: interleaved rounds over real LiteRT interpreters."""

import numpy as np
import pytest

from edgeqat import convert, latency
from edgeqat.keras import keras


@pytest.fixture(scope="module")
def two_models():
    inp = keras.Input((8, 8, 1))
    out = keras.layers.Conv2D(4, 3)(inp)
    model = keras.Model(inp, keras.layers.Flatten()(out))
    x = np.random.default_rng(0).uniform(size=(4, 8, 8, 1)).astype(np.float32)
    return {"float": convert.to_tflite(model, "float"),
            "int8": convert.to_tflite(model, "int8", calibration=x, qat=False)}


def test_interleaved_times_every_model_in_every_round(two_models):
    t = latency.interleaved(two_models, threads=(1, 2), rounds=3, runs=2, warmup=1)
    assert set(t) == {"float", "int8"}
    for per_thread in t.values():
        assert set(per_thread) == {1, 2}
        for timing in per_thread.values():
            assert len(timing.rounds_us) == 3
            assert timing.median_us > 0 and timing.spread >= 0
    r = latency.ratio(t["int8"][1], t["float"][1])
    assert r["min"] <= r["median"] <= r["max"]


def test_rounds_must_be_positive(two_models):
    with pytest.raises(ValueError, match="rounds"):
        latency.interleaved(two_models, rounds=0)
