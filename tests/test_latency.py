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


def test_host_cpu_names_the_model_and_the_int8_extensions(tmp_path):
    x86 = tmp_path / "x86"
    x86.write_text("processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu avx2 fma sse4_2\n")
    assert latency.host_cpu(str(x86)) == (
        "AMD EPYC (avx2, fma; no avx512f, avx512_vnni, avx_vnni, amx_int8)")
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd asimddp crc32\nModel\t: Pi 4\n")
    assert latency.host_cpu(str(arm)) == "Pi 4 (asimd, asimddp; no i8mm)"
    assert latency.host_cpu(str(tmp_path / "missing"))  # the machine name, not an error
