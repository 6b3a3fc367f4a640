"""A tiny pipeline, end to end, through the real converter and the real LiteRT runner."""

import json
import tomllib

import pytest

from edgeqat import inspect, metadata
from tests.test_cli import run_cli


@pytest.mark.slow
def test_tiny_pipeline_end_to_end(tiny_pipeline, tmp_path):
    out = tmp_path / "run"
    p = run_cli("--pipeline", str(tiny_pipeline), "--output_dir", str(out), "--seed", "2")
    assert p.returncode == 0, p.stderr[-3000:]
    for stage in ("data", "float", "ptq", "annotate", "qat", "convert", "validate"):
        assert f"stage {stage} done in" in p.stderr
    # the stage log is edgeqat's: no TensorFlow saver INFO, converter settings or
    # warnings about what edgeqat does on purpose
    for noise in ("functional_saver", "fingerprint", "fully_quantize:", "deprecated",
                  "experimental_preserve_all_tensors", "Traceback"):
        assert noise not in p.stderr, noise
    names = {f.name for f in out.iterdir()}
    assert {"report.json", "report.md", "float.tflite", "ptq_int8.tflite", "qat_int8.tflite",
            "qat_model", "float_model.keras", "pipeline.toml", "device.toml"} <= names
    r = json.loads((out / "report.json").read_text())
    acc = r["accuracy"]
    assert set(acc) == {"float_keras", "float_tflite", "ptq_int8", "qat_keras", "qat_int8"}
    assert all(0.0 <= v <= 1.0 for v in acc.values())
    assert acc["float_keras"] > 0.5  # 6 epochs on digits learn something
    assert abs(acc["float_tflite"] - acc["float_keras"]) <= 1 / 120 + 1e-9
    assert r["data"]["test"] == 120
    assert r["ops"]["full_integer"] is True
    qat = (out / "qat_int8.tflite").read_bytes()
    assert inspect.float_ops(qat) == []
    assert r["size_bytes"]["qat_int8"] == len(qat)
    # The shipped model carries its metadata (the validated bytes: the sizes match).
    meta = metadata.read_metadata(qat)
    assert meta["name"] == "tiny_qat_int8" and meta["inputs"][0]["std"] == [16.0]
    assert meta["files"]["labels.txt"].split() == [str(i) for i in range(10)]
    assert r["size_bytes"]["qat_int8"] < r["size_bytes"]["float"]
    assert r["agreement"]["qat_int8"]["top1"] >= 0.95
    # The Keras QAT accuracy comes from the logits the agreement compares: they can
    # differ by no more than the share of samples whose top-1 differs.
    disagree = 1.0 - r["agreement"]["qat_int8"]["top1"]
    assert abs(acc["qat_keras"] - acc["qat_int8"]) <= disagree + 1e-9
    for name in ("float", "ptq_int8", "qat_int8"):
        lat = r["latency"][name]
        assert lat["runs"] == 5 and 0 < lat["median_ms"] <= lat["p90_ms"]
    assert r["pipeline"]["seed"] == 2
    # the copied pipeline reproduces the run, overrides included
    assert tomllib.loads((out / "pipeline.toml").read_text())["seed"] == 2
    md = (out / "report.md").read_text()
    assert "| QAT int8 |" in md and "fully integer" in md
    assert not list(tmp_path.glob(".run*"))


@pytest.mark.slow
@pytest.mark.device
def test_tiny_pipeline_on_emulated_raspberry_pi(tiny_pipeline, tmp_path):
    from tests.harness_support import emulated_sysroot

    emulated_sysroot()  # builds the cached aarch64 userland, or skips saying why
    out = tmp_path / "run"
    p = run_cli("--pipeline", str(tiny_pipeline), "--device", "rpi4_emulated",
                "--output_dir", str(out))
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads((out / "report.json").read_text())
    assert r["device"]["cpu"]["machine"] == "aarch64"
    assert r["device"]["connection"] == "qemu"
    for name in ("ptq_int8", "qat_int8"):
        c = r["device_vs_host"][name]
        assert c["device_accuracy"] == c["host_accuracy"] == r["accuracy"][name]
        # XNNPACK's int8 kernels requantize in their own way per architecture: with
        # per-channel depthwise weights, 1 of the QAT model's 1,200 outputs is measured
        # 1 step apart between aarch64 and x86 (per-tensor depthwise: identical).
        assert c["max_abs_steps"] <= 1 and c["mismatched_fraction"] <= 0.01, c
        assert c["top1_agreement"] == 1.0, c
    assert "Device vs host, `qat_int8.tflite`" in (out / "report.md").read_text()
