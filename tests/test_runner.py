"""The standalone runner, run as a separate process with the real LiteRT interpreter."""

import json
import subprocess
import sys

import numpy as np
import pytest

from edgeqat import convert
from edgeqat.config import DeviceConfig
from edgeqat.harness.device import RUNNER, DeviceError, run_on_device
from edgeqat.keras import keras


@pytest.fixture(scope="module")
def int8_model(tmp_path_factory):
    keras.utils.set_random_seed(0)
    m = keras.Sequential([keras.Input((6,)), keras.layers.Dense(8, activation="relu"),
                          keras.layers.Dense(3)])
    x = np.random.default_rng(0).random((40, 6), dtype=np.float32)
    y = m.predict(x, verbose=0).argmax(-1)  # labels = the float model's own predictions
    d = tmp_path_factory.mktemp("m")
    (d / "m.tflite").write_bytes(convert.to_tflite(m, "int8", calibration=x))
    (d / "f.tflite").write_bytes(convert.to_tflite(m, "float"))
    np.savez(d / "in.npz", x=x, y=y)
    return d, m, x, y


def _run(d, *extra):
    return subprocess.run([sys.executable, str(RUNNER), "--model", str(d / "m.tflite"),
                           "--inputs", str(d / "in.npz"), "--result", str(d / "r.json"),
                           "--runs", "5", *extra], capture_output=True, text=True)


def test_runner_reports_what_it_ran(int8_model):
    d, *_ = int8_model
    p = _run(d, "--outputs", str(d / "o.npz"))
    assert p.returncode == 0, p.stderr
    r = json.loads((d / "r.json").read_text())
    assert r["runtime"] == "ai_edge_litert"
    assert r["delegate_applied"] == "xnnpack"
    assert r["input"]["dtype"] == "int8" and r["outputs"][0]["dtype"] == "int8"
    assert r["latency"]["runs"] == 5
    assert r["latency"]["min_ms"] <= r["latency"]["median_ms"] <= r["latency"]["p90_ms"]
    assert len(r["model_sha256"]) == 64
    assert r["accuracy"] > 0.8  # int8 reproduces the float model's own labels
    with np.load(d / "o.npz") as o:
        assert o["raw"].dtype == np.int8 and o["outputs"].shape == (40, 3)


def test_runner_refuses_a_different_model(int8_model):
    d, *_ = int8_model
    p = _run(d, "--expect_sha256", "0" * 64)
    assert p.returncode == 2
    assert "refusing a corrupted or different model" in p.stderr


def test_runner_rejects_wrong_input_shape(int8_model, tmp_path):
    d, *_ = int8_model
    np.savez(tmp_path / "bad.npz", x=np.zeros((2, 5), np.float32))
    p = subprocess.run([sys.executable, str(RUNNER), "--model", str(d / "m.tflite"),
                        "--inputs", str(tmp_path / "bad.npz"), "--result",
                        str(tmp_path / "r.json")], capture_output=True, text=True)
    assert p.returncode == 2 and "the model expects [6]" in p.stderr


def test_runner_without_edgetpu_says_so(int8_model):
    d, *_ = int8_model
    p = _run(d, "--delegate", "edgetpu", "--device", "usb")
    assert p.returncode == 3
    assert "edgetpu delegate unavailable" in p.stderr and "libedgetpu" in p.stderr


def test_run_on_device_float_and_int8_agree(int8_model):
    d, m, x, y = int8_model
    runs = run_on_device(DeviceConfig(), {"float": d / "f.tflite", "int8": d / "m.tflite"},
                         x, y, warmup=1, runs=3)
    np.testing.assert_allclose(runs["float"].outputs, m.predict(x, verbose=0), atol=1e-5)
    assert runs["float"].info["accuracy"] == 1.0
    assert (runs["int8"].outputs.argmax(-1) == y).mean() > 0.8


def test_run_on_device_puts_runner_stderr_in_the_error(int8_model, tmp_path):
    d, _, x, y = int8_model
    broken = tmp_path / "broken.tflite"
    broken.write_bytes(b"not a flatbuffer")
    with pytest.raises(DeviceError, match="runner failed on broken"):
        run_on_device(DeviceConfig(), {"broken": broken}, x, y)
