"""Run TFLite models on a device through the standalone runner.

``run_on_device`` copies the runner, the inputs and each model to the device, runs them
one by one and brings back the result JSON and the outputs. A refused or dropped
connection is retried with exponential back-off (``connection.retries``,
``connection.retry_backoff_s``), reconnecting and re-sending what the new session needs;
when the retries are spent, ``DeviceUnreachable`` says so in one line and carries the runs
already finished in ``.partial``. A runner that fails says why (its ``runner:`` line, or
the tail of its traceback when it crashed); a model whose sha256 on the device differs
from the host's is refused by the runner.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import numpy as np

from edgeqat.config import DeviceConfig
from edgeqat.errors import UserError
from edgeqat.harness.transports import TransportError, open_transport

RUNNER = Path(__file__).with_name("runner.py")
T = TypeVar("T")


class DeviceError(UserError):
    """The device, its runtime or its delegate failed; the message says which.

    ``partial`` holds the runs finished before the failure (name -> DeviceRun).
    """

    def __init__(self, message: str, partial: dict | None = None):
        super().__init__(message)
        self.partial = dict(partial or {})


class DeviceUnreachable(DeviceError):
    """The connection was refused or dropped and the retries are spent."""


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

    @property
    def accuracy(self) -> float | None:
        return self.info.get("accuracy")

    @property
    def delegate_applied(self) -> str:
        return self.info["delegate_applied"]


def runner_failure(stderr: str, returncode: int) -> str:
    """One line saying why the runner failed: its own message, or the crash's last lines."""
    lines = [ln.rstrip() for ln in stderr.strip().splitlines() if ln.strip()]
    own = [ln for ln in lines if ln.startswith("runner: ")]
    if own:
        return own[-1][len("runner: "):]
    if any(ln.startswith("Traceback") for ln in lines):
        return f"runner crashed (exit {returncode}): " + " | ".join(ln.strip()
                                                                    for ln in lines[-3:])
    if lines:
        return f"exit status {returncode}: " + " | ".join(ln.strip() for ln in lines[-3:])
    if returncode < 0:
        return f"killed by signal {-returncode}"
    return f"exit status {returncode} and no message"


class _Session:
    """A transport plus the files every run needs, reopened after a dropped connection."""

    def __init__(self, device: DeviceConfig, inputs: Path | None,
                 sleep: Callable[[float], None]):
        self.device = device
        self.inputs = inputs
        self.sleep = sleep
        self.transport = None
        self.remote: dict[str, str] = {}

    def _open(self) -> None:
        self.transport = open_transport(self.device)
        self.remote = {"runner": self.transport.put(RUNNER, "runner.py")}
        if self.inputs is not None:
            self.remote["inputs"] = self.transport.put(self.inputs, "inputs.npz")

    def _drop(self) -> None:
        if self.transport is not None:
            try:
                self.transport.close()
            except Exception:  # noqa: BLE001 - a dead link may fail to clean up
                pass
        self.transport = None

    def attempt(self, fn: Callable[[], T], what: str) -> T:
        conn = self.device.connection
        attempts = conn.retries + 1
        last: TransportError | None = None
        for k in range(attempts):
            try:
                if self.transport is None:
                    self._open()
                return fn()
            except TransportError as e:
                last = e
                self._drop()
                if not e.retryable:
                    raise DeviceUnreachable(f"device '{self.device.name}': {what} failed: "
                                            f"{e}") from None
                if k + 1 < attempts:
                    self.sleep(conn.retry_backoff_s * 2**k)
        raise DeviceUnreachable(f"device '{self.device.name}': {what} failed after {attempts} "
                                f"attempt(s); last error: {last}")

    def close(self) -> None:
        self._drop()


def _base_argv(device: DeviceConfig, runner: str) -> list[str]:
    argv = [runner, "--runtime", device.runtime, "--delegate", device.delegate]
    if device.delegate_device:
        argv += ["--device", device.delegate_device]
    if device.allow_cpu_fallback:
        argv.append("--allow_cpu_fallback")
    return argv


def _prepare_model(device: DeviceConfig, name: str, path: Path, tmp: Path) -> tuple[Path, str]:
    """Compiles for the Edge TPU when needed and possible; returns (path to send, note)."""
    if device.delegate != "edgetpu":
        return path, ""
    from edgeqat import edgetpu

    data = path.read_bytes()
    if edgetpu.is_compiled(data):
        return path, ""
    if shutil.which("edgetpu_compiler"):
        compiled = edgetpu.compile_model(path, tmp / f"edgetpu-{name}")
        return compiled, "compiled with edgetpu_compiler"
    note = (f"model '{name}' is not compiled for the Edge TPU and edgetpu_compiler is not on "
            "PATH")
    if not device.allow_cpu_fallback:
        raise DeviceError(f"device '{device.name}': {note}; install edgetpu_compiler (Coral "
                          "apt repository, x86-64 only) or compile the model elsewhere")
    return path, note + "; every op runs on the CPU"


def run_on_device(device: DeviceConfig, models: dict[str, Path], x: np.ndarray,
                  y: np.ndarray | None = None, *, warmup: int = 5, runs: int = 50,
                  sleep: Callable[[float], None] = time.sleep) -> dict[str, DeviceRun]:
    """Runs each ``.tflite`` in ``models`` on ``device`` with the same inputs.

    Args:
      device: the device profile.
      models: name -> local .tflite path.
      x: float inputs, batch first; ``y`` optional labels.
      warmup, runs: latency measurement (invokes on single samples).
      sleep: how to wait between retries (tests pass a recorder).

    Returns:
      name -> DeviceRun, in the order given.

    Raises:
      DeviceUnreachable: the connection failed ``connection.retries + 1`` times; the runs
        finished before are in ``.partial``.
      DeviceError: the runtime or delegate is missing, the runner failed or crashed (its
        message or stderr tail is in the error), or the model arrived corrupted.
    """
    arrays = {"x": x} if y is None else {"x": x, "y": y}
    argv = ["--warmup", str(warmup), "--runs", str(runs),
            "--num_threads", str(device.num_threads)]
    return _run_all(device, models, arrays, argv, ("outputs", "raw"), sleep)


def run_lm_on_device(device: DeviceConfig, models: dict[str, Path], windows: np.ndarray,
                     prompt: np.ndarray, *, decode_windows: int = 2,
                     threads: tuple[int, ...] = (1, 2), max_new_tokens: int = 64,
                     runs: int = 50,
                     sleep: Callable[[float], None] = time.sleep) -> dict[str, DeviceRun]:
    """Runs language models (``prefill`` / ``decode`` signatures) through ``runner.py
    --lm``: teacher-forced logits on ``windows``, the decode loop on the first
    ``decode_windows``, speed at each thread count, and a greedy sample from ``prompt``.

    Returns:
      name -> DeviceRun whose ``outputs`` are the prefill logits and ``raw`` the decode
      logits, both as the model produced them; ``info["generated"]`` the sampled tokens.

    Raises:
      DeviceError, DeviceUnreachable: as ``run_on_device``.
    """
    argv = ["--lm", "--decode_windows", str(decode_windows),
            "--threads", ",".join(map(str, threads)), "--max_new_tokens", str(max_new_tokens),
            "--runs", str(runs), "--warmup", "2"]
    return _run_all(device, models, {"windows": windows, "prompt": prompt}, argv,
                    ("prefill", "decode"), sleep)


def _run_all(device: DeviceConfig, models: dict[str, Path], arrays: dict, argv: list[str],
             keys: tuple[str, str], sleep: Callable[[float], None]) -> dict[str, DeviceRun]:
    """Runs each model with the runner flags ``argv``; ``keys`` name the arrays of the
    runner's output .npz that become ``DeviceRun.outputs`` and ``.raw``."""
    results: dict[str, DeviceRun] = {}
    with tempfile.TemporaryDirectory(prefix="edgeqat-run-") as tmp_name:
        tmp = Path(tmp_name)
        np.savez(tmp / "inputs.npz", **arrays)
        session = _Session(device, tmp / "inputs.npz", sleep)
        try:
            _probe(device, session)
            for name, path in models.items():
                sent, note = _prepare_model(device, name, Path(path), tmp)
                results[name] = session.attempt(
                    lambda name=name, sent=sent, note=note: _run_one(
                        device, session, name, sent, note, tmp, argv, keys),
                    f"running {name}")
        except DeviceError as e:
            e.partial = dict(results)
            if results:
                e.args = (f"{e.args[0]}; kept results for: {', '.join(results)}",)
            raise
        finally:
            session.close()
    return results


def preflight(device: DeviceConfig, *, sleep: Callable[[float], None] = time.sleep) -> dict:
    """Checks, before any training, that the device can run models at all.

    Opens the transport (its tools exist: ssh/scp, adb, qemu and the emulated sysroot;
    the host answers), copies the runner and runs its ``--probe``: the runtime imports
    and the delegate loads. Retries as ``run_on_device`` does.

    Returns:
      The runner's probe JSON (runtime, version, delegate).

    Raises:
      DeviceError, UserError: as ``run_on_device``, in one line naming the device.
    """
    session = _Session(device, None, sleep)
    try:
        return _probe(device, session)
    finally:
        session.close()


def _probe(device: DeviceConfig, session: _Session) -> dict:
    """Pre-flight: the runtime imports and the delegate loads, before any model is sent."""

    def go() -> dict:
        argv = _base_argv(device, session.remote["runner"]) + ["--probe"]
        done = session.transport.run(argv, device.connection.timeout_s)
        if done.returncode != 0:
            raise DeviceError(f"device '{device.name}': "
                              f"{runner_failure(done.stderr, done.returncode)}")
        return json.loads(done.stdout.strip().splitlines()[-1])

    return session.attempt(go, "connecting")


def _run_one(device: DeviceConfig, session: _Session, name: str, path: Path, note: str,
             tmp: Path, extra: list[str], keys: tuple[str, str]) -> DeviceRun:
    transport = session.transport
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    remote_model = transport.put(path, f"{name}.tflite")
    remote_result = f"{transport.workdir}/{name}.json"
    remote_out = f"{transport.workdir}/{name}.npz"
    argv = _base_argv(device, session.remote["runner"]) + [
        "--model", remote_model, "--inputs", session.remote["inputs"],
        "--result", remote_result, "--outputs", remote_out, *extra, "--expect_sha256", sha]
    done = transport.run(argv, device.connection.timeout_s)
    if done.returncode != 0:
        raise DeviceError(f"device '{device.name}': runner failed on {name}: "
                          f"{runner_failure(done.stderr, done.returncode)}")
    transport.get(remote_result, tmp / f"{name}.json")
    transport.get(remote_out, tmp / f"{name}.npz")
    info = json.loads((tmp / f"{name}.json").read_text())
    info["device"] = device.name
    if note:
        info["host_note"] = note
    with np.load(tmp / f"{name}.npz") as f:
        return DeviceRun(name, info, f[keys[0]], f[keys[1]])
