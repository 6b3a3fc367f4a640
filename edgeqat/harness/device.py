"""Run TFLite models on a device through the standalone runner."""

from __future__ import annotations

import hashlib
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgeqat.config import DeviceConfig
from edgeqat.errors import UserError
from edgeqat.harness.transports import open_transport

RUNNER = Path(__file__).with_name("runner.py")


class DeviceError(UserError):
    """The device, its runtime or its delegate failed; the message says which."""


@dataclass(frozen=True)
class DeviceRun:
    """One model's run on a device: the runner's JSON and the model outputs."""

    name: str
    info: dict
    outputs: np.ndarray = field(repr=False)
    raw: np.ndarray = field(repr=False)

    @property
    def latency(self) -> dict:
        return self.info["latency"]


def run_on_device(device: DeviceConfig, models: dict[str, Path], x: np.ndarray,
                  y: np.ndarray | None = None, *, warmup: int = 5, runs: int = 50,
                  ) -> dict[str, DeviceRun]:
    """Runs each ``.tflite`` in ``models`` on ``device`` with the same inputs.

    Args:
      device: the device profile.
      models: name -> local .tflite path.
      x: float inputs, batch first; ``y`` optional labels.
      warmup, runs: latency measurement (invokes on single samples).

    Returns:
      name -> DeviceRun, in the order given.

    Raises:
      DeviceError: the runner failed on the device (its stderr is in the message).
    """
    transport = open_transport(device)
    results: dict[str, DeviceRun] = {}
    try:
        with tempfile.TemporaryDirectory(prefix="edgeqat-run-") as tmp:
            tmp = Path(tmp)
            arrays = {"x": x} if y is None else {"x": x, "y": y}
            np.savez(tmp / "inputs.npz", **arrays)
            runner = transport.put(RUNNER, "runner.py")
            inputs = transport.put(tmp / "inputs.npz", "inputs.npz")
            for name, path in models.items():
                sha = hashlib.sha256(Path(path).read_bytes()).hexdigest()
                remote_model = transport.put(Path(path), f"{name}.tflite")
                remote_result = f"{transport.workdir}/{name}.json"
                remote_out = f"{transport.workdir}/{name}.npz"
                argv = [runner, "--model", remote_model, "--inputs", inputs,
                        "--result", remote_result, "--outputs", remote_out,
                        "--runtime", device.runtime, "--delegate", device.delegate,
                        "--num_threads", str(device.num_threads), "--warmup", str(warmup),
                        "--runs", str(runs), "--expect_sha256", sha]
                if device.allow_cpu_fallback:
                    argv.append("--allow_cpu_fallback")
                done = transport.run(argv, device.connection.timeout_s)
                if done.returncode != 0:
                    err = done.stderr.strip().splitlines()
                    tail = err[-1] if err else f"exit status {done.returncode}"
                    raise DeviceError(f"device '{device.name}': runner failed on {name}: {tail}")
                transport.get(remote_result, tmp / f"{name}.json")
                transport.get(remote_out, tmp / f"{name}.npz")
                info = json.loads((tmp / f"{name}.json").read_text())
                with np.load(tmp / f"{name}.npz") as f:
                    results[name] = DeviceRun(name, info, f["outputs"], f["raw"])
    finally:
        transport.close()
    return results
