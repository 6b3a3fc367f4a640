"""How the runner reaches a device: put files, run a command, get files back.

Every transport has the same verbs (``put``, ``get``, ``run``, ``close`` and a
``workdir``), so ``run_on_device`` does not care whether the device is this machine, a Pi
over SSH, a phone over adb, or an emulated ARM CPU.

A transport raises ``TransportError`` when the *connection* fails (refused, dropped, timed
out, device offline): the caller may retry. A command that ran and failed is not a
transport error; its exit status and stderr come back in ``Completed``.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from edgeqat.config import DeviceConfig
from edgeqat.errors import UserError


class TransportError(UserError):
    """The device could not be reached, or the connection dropped.

    ``retryable`` is False when trying again cannot help (an unknown or changed host key,
    a refused login): the harness then fails at once instead of backing off.
    """

    def __init__(self, message: str, retryable: bool = True):
        super().__init__(message)
        self.retryable = retryable


# ssh's messages for failures that a retry cannot fix.
SSH_FATAL = ("Host key verification failed", "REMOTE HOST IDENTIFICATION HAS CHANGED",
             "Permission denied", "Could not resolve hostname", "Bad configuration option",
             "Too many authentication failures")


@dataclass
class Completed:
    returncode: int
    stdout: str
    stderr: str


def _last_line(text: str, default: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1].strip() if lines else default


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

    def _command(self, argv: list[str]) -> tuple[list[str], dict | None]:
        return [self.python, *argv], None

    def run(self, argv: list[str], timeout_s: float) -> Completed:
        cmd, env = self._command(argv)
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env)
        except subprocess.TimeoutExpired:
            raise TransportError(f"runner timed out after {timeout_s:.0f} s") from None
        except OSError as e:
            raise TransportError(f"cannot start {cmd[0]}: {e.strerror}") from None
        return Completed(p.returncode, p.stdout, p.stderr)

    def close(self) -> None:
        shutil.rmtree(self._dir, ignore_errors=True)


class QemuTransport(LocalTransport):
    """Runs the runner on an emulated aarch64 CPU (qemu-user-static + a Debian sysroot).

    Files stay on this machine: QEMU's ``-L`` looks a path up in the sysroot first and
    falls back to the host's, so the runner reads the host temp directory directly.
    """

    def __init__(self, device: DeviceConfig):
        from edgeqat.harness import qemu

        conn = device.connection
        self.sysroot = Path(conn.sysroot) if conn.sysroot else qemu.default_sysroot()
        qemu.qemu_binary()
        if not qemu.is_ready(self.sysroot):
            raise qemu.QemuError(
                f"{device.source or device.name}: no aarch64 sysroot at {self.sysroot}; "
                "build it with: python -m edgeqat.harness.qemu setup")
        if not qemu.is_runtime_ready(self.sysroot, device.runtime):
            raise qemu.QemuError(
                f"{device.source or device.name}: runtime = {device.runtime!r} needs its "
                f"own site directory at {qemu.runtime_site(self.sysroot, device.runtime)}; "
                f"build it with: python -m edgeqat.harness.qemu setup --runtime "
                f"{device.runtime}")
        self.site = qemu.runtime_site(self.sysroot, device.runtime)
        super().__init__(device)
        self._qemu = qemu

    def _command(self, argv: list[str]) -> tuple[list[str], dict | None]:
        return (self._qemu.command(self.sysroot, argv),
                self._qemu.environment(self.device.connection.cpu, self.site))


class SshTransport:
    """A remote device through the system OpenSSH client (``ssh`` and ``scp``).

    Honours ``~/.ssh/config`` (or ``connection.ssh_config``), the agent and known_hosts.
    Always ``BatchMode=yes`` (never prompts) and ``ConnectTimeout``; host keys are checked
    as the user's configuration says, never switched off here. ``ServerAlive*`` makes a
    silently dead link fail within seconds instead of hanging until the timeout. ssh's exit
    status 255 means the connection failed; anything else is the remote command's.
    """

    def __init__(self, device: DeviceConfig):
        self.device = device
        conn = device.connection
        for tool in ("ssh", "scp"):
            if not shutil.which(tool):
                raise UserError(f"{tool} not found on PATH; install the OpenSSH client "
                                "(apt-get install -y openssh-client)")
        self.host = conn.host
        opts = ["-o", "BatchMode=yes",
                "-o", f"ConnectTimeout={max(1, round(conn.connect_timeout_s))}",
                "-o", "ServerAliveInterval=5", "-o", "ServerAliveCountMax=3"]
        if conn.ssh_config:
            opts[:0] = ["-F", conn.ssh_config]
        if conn.identity_file:
            opts += ["-i", conn.identity_file]
        for opt in conn.ssh_options:
            opts += ["-o", opt]
        self._ssh = ["ssh", *opts] + (["-p", str(conn.port)] if conn.port else [])
        self._scp = ["scp", "-q", *opts] + (["-P", str(conn.port)] if conn.port else [])
        base = shlex.quote(conn.workdir)
        made = self._call(self._ssh + [self.host, "--",
                                       f"mkdir -p {base} && mktemp -d {base}/run-XXXXXX"],
                          conn.connect_timeout_s + 30, "open a session")
        if made.returncode != 0:
            raise TransportError(f"{self._where()}: cannot create {conn.workdir} on the "
                                 f"device: {_last_line(made.stderr, 'no message')}")
        self._workdir = made.stdout.strip().splitlines()[-1]

    @property
    def workdir(self) -> str:
        return self._workdir

    def _where(self) -> str:
        return f"device '{self.device.name}' (ssh {self.host})"

    def _call(self, cmd: list[str], timeout_s: float, what: str) -> Completed:
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s,
                               stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise TransportError(f"{self._where()}: {what} timed out after "
                                 f"{timeout_s:.0f} s") from None
        if p.returncode == 255:
            fatal = [m for m in SSH_FATAL if m in p.stderr]
            raise TransportError(f"{self._where()}: {what} failed: "
                                 f"{fatal[0] if fatal else _last_line(p.stderr, 'connection lost')}"
                                 + ("; fix the ssh setup (keys, known_hosts, ~/.ssh/config)"
                                    if fatal else ""), retryable=not fatal)
        return Completed(p.returncode, p.stdout, p.stderr)

    def _remote(self, path: str) -> str:
        return f"{self.host}:{path}"

    def put(self, local: Path, name: str) -> str:
        remote = f"{self._workdir}/{name}"
        done = self._call(self._scp + [str(local), self._remote(remote)],
                          self.device.connection.timeout_s, f"scp {Path(local).name}")
        if done.returncode != 0:
            raise TransportError(f"{self._where()}: scp {Path(local).name} failed: "
                                 f"{_last_line(done.stderr, 'no message')}")
        return remote

    def get(self, remote: str, local: Path) -> None:
        done = self._call(self._scp + [self._remote(remote), str(local)],
                          self.device.connection.timeout_s, f"scp {remote}")
        if done.returncode != 0:
            raise TransportError(f"{self._where()}: scp {remote} back failed: "
                                 f"{_last_line(done.stderr, 'no message')}")

    def run(self, argv: list[str], timeout_s: float) -> Completed:
        python = self.device.connection.python
        line = " ".join(shlex.quote(a) for a in [python, *argv])
        return self._call(self._ssh + [self.host, "--",
                                       f"cd {shlex.quote(self._workdir)} && {line}"],
                          timeout_s, "runner")

    def close(self) -> None:
        try:
            self._call(self._ssh + [self.host, "--", f"rm -rf {shlex.quote(self._workdir)}"],
                       self.device.connection.connect_timeout_s + 10, "clean up")
        except TransportError:
            pass  # the device is gone; its /tmp is its own business


class AdbTransport:
    """An Android device through ``adb push`` / ``adb shell`` / ``adb pull``.

    Needs a Python with numpy and a TFLite runtime on the device (``connection.python``).
    ``adb shell`` returns the remote exit status (adb >= 1.0.36). adb's own failures
    (no device, offline, unauthorized) are transport errors.
    """

    _ADB_FAILURES = ("no devices", "device offline", "not found", "unauthorized",
                     "device still", "closed", "protocol fault", "cannot connect",
                     "failed to connect", "more than one device")

    def __init__(self, device: DeviceConfig):
        self.device = device
        conn = device.connection
        self._adb = [conn.adb] + (["-s", conn.serial] if conn.serial else [])
        if not shutil.which(conn.adb):
            raise UserError(f"{conn.adb} not found on PATH; install it "
                            "(apt-get install -y adb) or set connection.adb")
        state = self._call(["get-state"], conn.connect_timeout_s + 10, "get-state")
        if state.returncode != 0 or state.stdout.strip() != "device":
            raise TransportError(f"{self._where()}: not ready: "
                                 f"{_last_line(state.stderr or state.stdout, 'no state')}")
        self._workdir = f"{conn.workdir.rstrip('/')}/run"
        made = self._shell(f"rm -rf {shlex.quote(self._workdir)} && "
                           f"mkdir -p {shlex.quote(self._workdir)}", conn.connect_timeout_s + 30)
        if made.returncode != 0:
            raise TransportError(f"{self._where()}: cannot create {self._workdir}: "
                                 f"{_last_line(made.stderr or made.stdout, 'no message')}")

    @property
    def workdir(self) -> str:
        return self._workdir

    def _where(self) -> str:
        serial = self.device.connection.serial
        return f"device '{self.device.name}' (adb{' -s ' + serial if serial else ''})"

    def _call(self, args: list[str], timeout_s: float, what: str) -> Completed:
        try:
            p = subprocess.run(self._adb + args, capture_output=True, text=True,
                               timeout=timeout_s, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise TransportError(f"{self._where()}: adb {what} timed out after "
                                 f"{timeout_s:.0f} s") from None
        err = p.stderr.lower()
        if p.returncode != 0 and ("adb: error" in err or "error: " in err) and \
                any(s in err for s in self._ADB_FAILURES):
            raise TransportError(f"{self._where()}: adb {what} failed: "
                                 f"{_last_line(p.stderr, 'no message')}")
        return Completed(p.returncode, p.stdout, p.stderr)

    def _shell(self, line: str, timeout_s: float) -> Completed:
        return self._call(["shell", line], timeout_s, "shell")

    def put(self, local: Path, name: str) -> str:
        remote = f"{self._workdir}/{name}"
        done = self._call(["push", str(local), remote], self.device.connection.timeout_s,
                          f"push {Path(local).name}")
        if done.returncode != 0:
            raise TransportError(f"{self._where()}: adb push {Path(local).name} failed: "
                                 f"{_last_line(done.stderr, 'no message')}")
        return remote

    def get(self, remote: str, local: Path) -> None:
        done = self._call(["pull", remote, str(local)], self.device.connection.timeout_s,
                          f"pull {remote}")
        if done.returncode != 0:
            raise TransportError(f"{self._where()}: adb pull {remote} failed: "
                                 f"{_last_line(done.stderr, 'no message')}")

    def run(self, argv: list[str], timeout_s: float) -> Completed:
        line = " ".join(shlex.quote(a) for a in [self.device.connection.python, *argv])
        return self._shell(f"cd {shlex.quote(self._workdir)} && {line}", timeout_s)

    def close(self) -> None:
        try:
            self._shell(f"rm -rf {shlex.quote(self._workdir)}",
                        self.device.connection.connect_timeout_s + 10)
        except TransportError:
            pass


TRANSPORTS = {"local": LocalTransport, "qemu": QemuTransport, "ssh": SshTransport,
              "adb": AdbTransport}


def open_transport(device: DeviceConfig):
    """Returns a connected transport for the profile's ``connection.kind``.

    Raises:
      TransportError: the device cannot be reached (the caller may retry).
      UserError: a tool (qemu, ssh, adb) or the emulated sysroot is missing.
    """
    kind = device.connection.kind
    if kind not in TRANSPORTS:
        raise TransportError(f"{device.source or device.name}: connection.kind = '{kind}' "
                             "is not available in this build")
    return TRANSPORTS[kind](device)
