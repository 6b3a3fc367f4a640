"""tflite-runtime 2.14 (numpy 1.26) on the emulated Raspberry Pi 4, against ai-edge-litert
on the same emulated device.

Measured (Dec 2026) with the reference pipelines' own models: the default pipeline's
int8 models agree in top-1 on all 359 digits with at most 2 quantization steps between
the two runtimes' outputs (the same accuracy); the int4 pipeline's model (CONV_2D
version 7) loads in 2.14 and runs, top-1 agreement 99.9%, at most 2 steps. The tolerance
here is that measurement: outputs within 2 steps, identical top-1 on the int8 model.
"""

from __future__ import annotations

import numpy as np
import pytest

from edgeqat import op_versions
from edgeqat.config import DEVICES_DIR, load_device
from edgeqat.harness.compare import compare_runs
from edgeqat.harness.device import run_on_device
from tests.harness_support import build_int8_model, emulated_runtime_site

pytestmark = [pytest.mark.device, pytest.mark.slow]
MAX_STEPS = 2  # between tflite-runtime 2.14 and ai-edge-litert 2.3 (XNNPACK differs)


@pytest.fixture(scope="module")
def site():
    return emulated_runtime_site("tflite_runtime")


def _both(models, x, y=None):
    out = {}
    for profile in ("rpi4_emulated", "rpi4_emulated_tflite_runtime"):
        out[profile] = run_on_device(load_device(DEVICES_DIR / f"{profile}.toml"), models,
                                     x, y, warmup=1, runs=2)
    return out["rpi4_emulated"], out["rpi4_emulated_tflite_runtime"]


def test_int8_model_runs_on_tflite_runtime_and_agrees_with_litert(site, tmp_path):
    model = build_int8_model(tmp_path)
    litert, old = _both({"m": model.path}, model.x, model.y)
    info = old["m"].info
    assert (info["runtime"], info["runtime_version"]) == ("tflite_runtime", "2.14.0")
    assert info["cpu"]["machine"] == "aarch64" and old["m"].delegate_applied == "xnnpack"
    assert litert["m"].info["runtime"] == "ai_edge_litert"
    cmp = compare_runs(litert["m"], old["m"])
    print(f"\ntflite-runtime 2.14 vs ai-edge-litert, emulated Pi: top-1 agreement "
          f"{cmp.top1_agreement:.4f}, max {cmp.max_abs_steps} steps, {cmp.samples} samples")
    assert cmp.top1_agreement == 1.0 and cmp.max_abs_steps <= MAX_STEPS
    assert old["m"].accuracy == litert["m"].accuracy


def test_int4_model_passes_the_check_and_loads_in_2_14(site, tmp_path):
    from edgeqat import annotate, convert, export, policy
    from edgeqat.keras import keras

    keras.utils.set_random_seed(3)
    inp = keras.Input((8, 8, 2))
    h = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(inp)
    h = keras.layers.Flatten()(keras.layers.Conv2D(8, 1)(h))
    x = np.random.default_rng(0).normal(size=(32, 8, 8, 2)).astype(np.float32)
    qat = annotate.annotate_model(keras.Model(inp, keras.layers.Dense(6)(h)),
                                  policy.uniform(weight_bits=4, weight_quantizer="lsq"),
                                  sample_x=x)
    qat(x, training=True)
    export.prepare_for_export(qat, "int4_weights")
    content = convert.to_tflite(qat, "int4_weights", qat=True)
    needs, _ = op_versions.op_needs(content)
    assert op_versions.OpNeed("CONV_2D", 7, "2.11.0") in needs
    device = load_device(DEVICES_DIR / "rpi4_emulated_tflite_runtime.toml")
    op_versions.require_loadable({"int4": content}, device)  # 2.14 >= 2.11: passes
    path = tmp_path / "int4.tflite"
    path.write_bytes(content)
    litert, old = _both({"m": path}, x)
    assert old["m"].info["runtime_version"] == "2.14.0"
    assert compare_runs(litert["m"], old["m"]).max_abs_steps <= MAX_STEPS
