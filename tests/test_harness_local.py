"""run_on_device on this machine: results, delegates, and the faults the harness reports."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from edgeqat.config import DEVICES_DIR, load_device
from edgeqat.errors import UserError
from edgeqat.harness import transports
from edgeqat.harness.compare import compare_runs
from edgeqat.harness.device import (
    RUNNER,
    DeviceError,
    DeviceUnreachable,
    run_on_device,
    runner_failure,
)
from tests.harness_support import build_int8_model, local_device


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return build_int8_model(tmp_path_factory.mktemp("model"))


def _host_accuracy(model) -> float:
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_path=str(model.path))
    interp.allocate_tensors()
    inp, out = interp.get_input_details()[0], interp.get_output_details()[0]
    scale, zero = inp["quantization"]
    hits = 0
    for xi, yi in zip(model.x, model.y, strict=True):
        q = np.clip(np.round(xi / scale + zero), -128, 127).astype(np.int8)[None]
        interp.set_tensor(inp["index"], q)
        interp.invoke()
        hits += int(interp.get_tensor(out["index"]).argmax() == yi)
    return hits / len(model.y)


def test_local_cpu_profile_runs_and_reports(model):
    runs = run_on_device(load_device(DEVICES_DIR / "local_cpu.toml"), {"m": model.path},
                         model.x, model.y, warmup=1, runs=3)
    info = runs["m"].info
    assert info["runtime"] == "ai_edge_litert" and info["delegate_applied"] == "xnnpack"
    assert info["model_sha256"] and info["cpu"]["machine"]
    assert set(info["latency"]) >= {"min_ms", "median_ms", "p90_ms"}
    assert runs["m"].accuracy == pytest.approx(_host_accuracy(model))
    assert runs["m"].accuracy > 0.5  # the model learned something
    assert runs["m"].raw.dtype == np.int8 and len(runs["m"].raw) == len(model.x)


def test_two_runs_of_the_same_model_agree_exactly(model):
    runs = run_on_device(local_device(), {"a": model.path, "b": model.path}, model.x[:50],
                         warmup=0, runs=1)
    cmp = compare_runs(runs["a"], runs["b"])
    assert cmp.identical and cmp.top1_agreement == 1.0


def test_coral_usb_without_a_tpu_fails_with_one_line(model):
    device = load_device(DEVICES_DIR / "coral_usb.toml")
    with pytest.raises(DeviceError) as err:
        run_on_device(device, {"m": model.path}, model.x[:4], warmup=0, runs=1)
    message = str(err.value)
    assert "\n" not in message
    assert "coral_usb" in message
    assert "delegate library libedgetpu.so.1 or the Edge TPU device 'usb' is missing" in message
    assert "edgetpu delegate unavailable" in message


def test_coral_usb_with_cpu_fallback_runs_and_records_it(model):
    device = dataclasses.replace(load_device(DEVICES_DIR / "coral_usb.toml"),
                                 allow_cpu_fallback=True)
    runs = run_on_device(device, {"m": model.path}, model.x[:8], model.y[:8], warmup=0, runs=1)
    info = runs["m"].info
    assert info["delegate_requested"] == "edgetpu" and info["delegate_applied"] == "xnnpack"
    assert "fell back to the CPU" in info["delegate_note"]
    assert "not compiled for the Edge TPU" in info["host_note"]


def test_gpu_delegate_missing_is_one_line_or_recorded_fallback(model):
    gpu = dataclasses.replace(local_device(), delegate="gpu")
    with pytest.raises(DeviceError, match="gpu delegate unavailable") as err:
        run_on_device(gpu, {"m": model.path}, model.x[:4], warmup=0, runs=1)
    assert "\n" not in str(err.value)
    runs = run_on_device(dataclasses.replace(gpu, allow_cpu_fallback=True), {"m": model.path},
                         model.x[:4], warmup=0, runs=1)
    assert runs["m"].delegate_applied == "xnnpack"
    assert "gpu delegate unavailable" in runs["m"].info["delegate_note"]


def test_no_delegate_and_thread_count_reach_the_runner(model):
    device = dataclasses.replace(local_device(), delegate="none", num_threads=2)
    info = run_on_device(device, {"m": model.path}, model.x[:4], warmup=0, runs=1)["m"].info
    assert (info["delegate_applied"], info["num_threads"]) == ("none", 2)


def test_edgetpu_compiler_is_used_when_on_path(model, tmp_path, monkeypatch):
    """A stand-in compiler (no real one exists here) proves the call and its output path."""
    from edgeqat import edgetpu

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "edgetpu_compiler"
    fake.write_text(textwrap.dedent(f"""\
        #!{sys.executable}
        import shutil, sys, pathlib
        args = sys.argv[1:]
        out = pathlib.Path(args[args.index("-o") + 1])
        src = pathlib.Path(args[-1])
        shutil.copyfile(src, out / (src.stem + "_edgetpu.tflite"))
        print("Edge TPU Compiler version fake")
        """))
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{__import__('os').environ['PATH']}")
    out = edgetpu.compile_model(model.path, tmp_path / "out")
    assert out.name == "digits_int8_edgetpu.tflite" and out.read_bytes() == \
        model.path.read_bytes()
    device = dataclasses.replace(load_device(DEVICES_DIR / "coral_usb.toml"),
                                 allow_cpu_fallback=True)
    runs = run_on_device(device, {"m": model.path}, model.x[:4], warmup=0, runs=1)
    assert runs["m"].info["host_note"] == "compiled with edgetpu_compiler"


def _python_script(path: Path, body: str) -> str:
    path.write_text(f"#!{sys.executable}\n" + textwrap.dedent(body))
    path.chmod(0o755)
    return str(path)


def test_runner_crash_puts_its_stderr_in_the_error(model, tmp_path):
    crashing = _python_script(tmp_path / "python", """\
        import os, sys
        if "--model" in sys.argv:
            def load_model():
                raise MemoryError("simulated: cannot map the model on this device")
            load_model()
        os.execv(sys.executable, [sys.executable] + sys.argv[1:])
        """)
    with pytest.raises(DeviceError) as err:
        run_on_device(local_device(python=crashing), {"m": model.path}, model.x[:4],
                      warmup=0, runs=1)
    message = str(err.value)
    assert "runner crashed" in message and "on m" in message
    assert "MemoryError: simulated: cannot map the model on this device" in message


def test_sha256_mismatch_on_the_device_is_refused(model, monkeypatch):
    class CorruptingTransport(transports.LocalTransport):
        def put(self, local, name):
            dest = super().put(local, name)
            if name.endswith(".tflite"):
                data = bytearray(Path(dest).read_bytes())
                data[len(data) // 2] ^= 0xFF
                Path(dest).write_bytes(bytes(data))
            return dest

    monkeypatch.setitem(transports.TRANSPORTS, "local", CorruptingTransport)
    with pytest.raises(DeviceError, match="refusing a corrupted or different model"):
        run_on_device(local_device(), {"m": model.path}, model.x[:4], warmup=0, runs=1)


def test_failures_after_a_success_keep_the_finished_runs(model, tmp_path):
    bad = tmp_path / "bad.tflite"
    bad.write_bytes(b"not a flatbuffer")
    with pytest.raises(DeviceError) as err:
        run_on_device(local_device(), {"good": model.path, "bad": bad}, model.x[:4],
                      warmup=0, runs=1)
    assert list(err.value.partial) == ["good"]
    assert "kept results for: good" in str(err.value)


def test_transport_errors_are_retried_with_back_off_then_reported(model, monkeypatch):
    calls = []

    class FlakyTransport(transports.LocalTransport):
        def run(self, argv, timeout_s):
            calls.append(argv)
            if "--model" in argv:
                raise transports.TransportError("connection reset by peer")
            return super().run(argv, timeout_s)

    monkeypatch.setitem(transports.TRANSPORTS, "local", FlakyTransport)
    sleeps = []
    device = local_device(retries=3, retry_backoff_s=0.5)
    with pytest.raises(DeviceUnreachable, match="after 4 attempt") as err:
        run_on_device(device, {"m": model.path}, model.x[:4], sleep=sleeps.append)
    assert sleeps == [0.5, 1.0, 2.0]
    assert "connection reset by peer" in str(err.value) and "\n" not in str(err.value)


def test_runner_failure_lines():
    assert runner_failure("noise\nrunner: bad model\n", 2) == "bad model"
    crash = "Traceback (most recent call last):\n  File x\nZeroDivisionError: division by zero"
    assert "ZeroDivisionError: division by zero" in runner_failure(crash, 1)
    assert runner_failure("", -9) == "killed by signal 9"


def test_runner_cli_is_compatible(model, tmp_path):
    np.savez(tmp_path / "in.npz", x=model.x[:3], y=model.y[:3])
    subprocess.run([sys.executable, str(RUNNER), "--model", str(model.path), "--inputs",
                    str(tmp_path / "in.npz"), "--result", str(tmp_path / "r.json"),
                    "--runs", "2", "--warmup", "0"], check=True)
    assert json.loads((tmp_path / "r.json").read_text())["samples"] == 3
    probe = subprocess.run([sys.executable, str(RUNNER), "--probe"], capture_output=True,
                           text=True, check=True)
    assert json.loads(probe.stdout)["runtime"] == "ai_edge_litert"


def test_unknown_transport_kind_is_a_user_error():
    """Refused where the profile is made, before any transport is looked up."""
    with pytest.raises(UserError, match="kind = 'serial' is not one of: local, ssh"):
        dataclasses.replace(local_device().connection, kind="serial")
    assert set(transports.TRANSPORTS) == {"local", "ssh", "adb", "qemu"}
