"""The adb transport against a stand-in ``adb`` on PATH (no phone exists here)."""

from __future__ import annotations

import os
import sys

import pytest

from edgeqat.config import ConnectionConfig, DeviceConfig
from edgeqat.harness.device import DeviceUnreachable, run_on_device
from tests.harness_support import build_int8_model, fake_adb


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return build_int8_model(tmp_path_factory.mktemp("model"))


@pytest.fixture
def adb(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    state, log = fake_adb(bin_dir, tmp_path)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return state, log


def _phone(tmp_path, serial="FAKE123", **conn) -> DeviceConfig:
    return DeviceConfig(name="phone", runtime="ai_edge_litert", num_threads=2,
                        connection=ConnectionConfig(
                            kind="adb", serial=serial, python=sys.executable,
                            workdir=str(tmp_path / "data-local-tmp"), retries=1,
                            retry_backoff_s=0.01, **conn))


def test_push_shell_pull(adb, tmp_path, model):
    _, log = adb
    runs = run_on_device(_phone(tmp_path), {"m": model.path}, model.x[:16], model.y[:16],
                         warmup=0, runs=2)
    assert runs["m"].info["num_threads"] == 2 and runs["m"].accuracy is not None
    calls = log.read_text().splitlines()
    assert all(c.startswith("-s FAKE123 ") for c in calls)
    verbs = [c.split()[2] for c in calls]
    assert verbs[0] == "get-state"
    assert {"push", "shell", "pull"} <= set(verbs)
    assert verbs.count("pull") == 2  # the result JSON and the outputs


def test_offline_device_is_retried_then_reported(adb, tmp_path, model):
    state, _ = adb
    state.write_text("offline")
    sleeps = []
    with pytest.raises(DeviceUnreachable, match="device offline") as err:
        run_on_device(_phone(tmp_path), {"m": model.path}, model.x[:4], sleep=sleeps.append)
    assert sleeps == [0.01] and "\n" not in str(err.value)


def test_wrong_serial_is_reported(adb, tmp_path, model):
    with pytest.raises(DeviceUnreachable, match="device 'NOPE' not found"):
        run_on_device(_phone(tmp_path, serial="NOPE"), {"m": model.path}, model.x[:4],
                      sleep=lambda s: None)
