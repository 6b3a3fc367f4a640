"""How the runner reaches a device: put files, run a command, get files back.

Every transport has the same three verbs, so ``run_on_device`` does not care whether the
device is this machine, a Pi over SSH, a phone over adb, or an emulated ARM CPU.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from edgeqat.config import DeviceConfig


class TransportError(Exception):
    """The device could not be reached or the command could not be started."""


@dataclass
class Completed:
    returncode: int
    stdout: str
    stderr: str


class LocalTransport:
    """Runs the runner in a subprocess on this machine, with this Python."""

    def __init__(self, device: DeviceConfig):
        self.device = device
        self._dir = Path(tempfile.mkdtemp(prefix="edgeqat-local-"))
        self.python = sys.executable if device.connection.python == "python3" else \
            device.connection.python

    @property
    def workdir(self) -> str:
        return str(self._dir)

    def put(self, local: Path, name: str) -> str:
        dest = self._dir / name
        shutil.copyfile(local, dest)
        return str(dest)

    def get(self, remote: str, local: Path) -> None:
        shutil.copyfile(remote, local)

    def run(self, argv: list[str], timeout_s: float) -> Completed:
        try:
            p = subprocess.run([self.python, *argv], capture_output=True, text=True,
                               timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise TransportError(f"runner timed out after {timeout_s:.0f} s") from None
        return Completed(p.returncode, p.stdout, p.stderr)

    def close(self) -> None:
        shutil.rmtree(self._dir, ignore_errors=True)


def open_transport(device: DeviceConfig):
    """Returns the transport named by the profile's ``connection.kind``."""
    kind = device.connection.kind
    if kind == "local":
        return LocalTransport(device)
    raise TransportError(f"{device.source or device.name}: connection.kind = '{kind}' "
                         "is not available in this build")
