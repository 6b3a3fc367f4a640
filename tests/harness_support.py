"""Shared pieces for the harness tests: a small int8 model, a real sshd, a fake adb.

Imported by tests/test_harness_*.py (pytest puts tests/ on sys.path).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from edgeqat.config import ConnectionConfig, DeviceConfig

SSHD = "/usr/sbin/sshd"
SSHD_INSTALL = "apt-get install -y --no-install-recommends openssh-server openssh-client"


def local_device(**conn) -> DeviceConfig:
    return DeviceConfig(name="test_local", connection=ConnectionConfig(kind="local", **conn))


@dataclasses.dataclass
class Int8Model:
    path: Path
    x: np.ndarray
    y: np.ndarray


_MODEL_CACHE: dict[str, Int8Model] = {}


def build_int8_model(directory: Path) -> Int8Model:
    """A small CNN trained for a few epochs on the 8x8 digits, PTQ to full int8.

    Built once per test process (the first caller's ``directory`` holds the file).
    """
    if "digits" in _MODEL_CACHE and _MODEL_CACHE["digits"].path.exists():
        return _MODEL_CACHE["digits"]
    _MODEL_CACHE["digits"] = _build_int8_model(directory)
    return _MODEL_CACHE["digits"]


def _build_int8_model(directory: Path) -> Int8Model:
    from edgeqat.config import DataConfig
    from edgeqat.convert import to_tflite
    from edgeqat.data import load_dataset
    from edgeqat.keras import keras, tf

    tf.random.set_seed(0)
    ds = load_dataset(DataConfig(name="digits", calibration_samples=200), seed=0)
    inp = keras.Input(ds.input_shape)
    h = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(inp)
    h = keras.layers.DepthwiseConv2D(3, padding="same", activation="relu")(h)
    h = keras.layers.MaxPooling2D()(h)
    h = keras.layers.Flatten()(h)
    out = keras.layers.Dense(ds.num_classes)(h)
    model = keras.Model(inp, out)
    model.compile(keras.optimizers.Adam(1e-2),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(ds.x_train, ds.y_train, epochs=4, batch_size=64, verbose=0)
    path = directory / "digits_int8.tflite"
    path.write_bytes(to_tflite(model, "int8", calibration=ds.x_calib))
    return Int8Model(path, ds.x_test, ds.y_test)


# ------------------------------------------------------------------------------ sshd


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalSshd:
    """A real OpenSSH server on 127.0.0.1:<free port>, keys and config in a temp dir.

    ``device(...)`` returns a profile that reaches it through an ssh config alias
    (``edgeqat-test``), with the server's host key pinned in a known_hosts file, so the
    client checks it like any real host.
    """

    def __init__(self, root: Path):
        self.root = root
        self.port = free_port()
        self.user = os.environ.get("USER") or subprocess.check_output(
            ["id", "-un"], text=True).strip()
        for name in ("host_key", "user_key"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", name,
                            "-f", str(root / name)], check=True)
        (root / "authorized_keys").write_text((root / "user_key.pub").read_text())
        host_pub = (root / "host_key.pub").read_text().split()
        (root / "known_hosts").write_text(f"[127.0.0.1]:{self.port} {host_pub[0]} "
                                          f"{host_pub[1]}\n")
        sftp = next((p for p in ("/usr/lib/openssh/sftp-server", "/usr/libexec/sftp-server",
                                 "/usr/lib/ssh/sftp-server") if Path(p).exists()),
                    "internal-sftp")
        (root / "sshd_config").write_text(textwrap.dedent(f"""\
            ListenAddress 127.0.0.1
            Port {self.port}
            HostKey {root}/host_key
            PidFile {root}/sshd.pid
            AuthorizedKeysFile {root}/authorized_keys
            StrictModes no
            UsePAM no
            PasswordAuthentication no
            KbdInteractiveAuthentication no
            PubkeyAuthentication yes
            PermitRootLogin prohibit-password
            Subsystem sftp {sftp}
            LogLevel ERROR
            """))
        (root / "ssh_config").write_text(textwrap.dedent(f"""\
            Host edgeqat-test
              HostName 127.0.0.1
              Port {self.port}
              User {self.user}
              IdentityFile {root}/user_key
              IdentitiesOnly yes
              UserKnownHostsFile {root}/known_hosts
              GlobalKnownHostsFile /dev/null
              LogLevel ERROR
            """))
        self.proc: subprocess.Popen | None = None
        Path("/run/sshd").mkdir(exist_ok=True) if os.geteuid() == 0 else None

    def start(self) -> None:
        self.proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(self.root / "sshd_config")],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sshd exited: {self.proc.stderr.read().decode()}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.05)
        raise RuntimeError("sshd did not start listening within 20 s")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def device(self, python: str = sys.executable, **conn) -> DeviceConfig:
        fields = dict(kind="ssh", host="edgeqat-test", ssh_config=str(self.root / "ssh_config"),
                      python=python, workdir=str(self.root / "remote"),
                      connect_timeout_s=5, retries=2, retry_backoff_s=0.05, timeout_s=120)
        fields.update(conn)
        return DeviceConfig(name="test_ssh", connection=ConnectionConfig(**fields))


def sshd_or_skip(root: Path) -> LocalSshd:
    if not Path(SSHD).exists():
        skip_or_fail(f"no {SSHD}; install it with: {SSHD_INSTALL}")
    if not shutil.which("ssh-keygen"):
        skip_or_fail(f"no ssh-keygen; install it with: {SSHD_INSTALL}")
    server = LocalSshd(root)
    server.start()
    return server


def dropping_python(root: Path, model_name: str, mode: str) -> tuple[Path, Path]:
    """A device-side "python" that drops the SSH connection when it runs ``model_name``.

    mode "session": kills its own per-connection sshd processes once (the listener stays
    up, so a retry gets through). mode "server": kills every sshd above it, the listener included
    (nothing can reconnect). Returns (wrapper, flag file); remove the flag to disarm.
    """
    flag = root / f"drop-{mode}"
    flag.write_text(mode)
    wrapper = root / f"python-drop-{mode}"
    wrapper.write_text(textwrap.dedent(f"""\
        #!{sys.executable}
        import os, sys, time
        flag = {str(flag)!r}
        if any(a.endswith({model_name + ".tflite"!r}) for a in sys.argv) and os.path.exists(flag):
            mode = open(flag).read().strip()
            os.remove(flag)
            victims, pid = [], os.getppid()
            while pid > 1:
                with open(f"/proc/{{pid}}/comm") as f:
                    comm = f.read().strip()
                with open(f"/proc/{{pid}}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                if comm == "sshd":
                    victims.append(pid)
                pid = ppid
            # session: the per-connection sshd processes; server: the listener as well
            for v in (victims[:-1] if mode == "session" else victims):
                os.kill(v, 9)
            time.sleep(60)
        os.execv(sys.executable, [sys.executable] + sys.argv[1:])
        """))
    wrapper.chmod(0o755)
    return wrapper, flag


# ------------------------------------------------------------------------------ adb

FAKE_ADB = '''#!{python}
"""A stand-in for adb: the "device" is this machine's filesystem; state from a file."""
import os, shutil, subprocess, sys

state_file = {state!r}
log = {log!r}
args = sys.argv[1:]
with open(log, "a") as f:
    f.write(" ".join(args) + "\\n")
if args[:1] == ["-s"]:
    serial, args = args[1], args[2:]
    if serial != "FAKE123":
        sys.exit(print(f"adb: device '{{serial}}' not found", file=sys.stderr) or 1)
state = open(state_file).read().strip() if os.path.exists(state_file) else "device"
if state != "device":
    sys.exit(print(f"adb: error: device {{state}}", file=sys.stderr) or 1)
cmd = args[0]
if cmd == "get-state":
    print("device")
elif cmd in ("push", "pull"):
    shutil.copyfile(args[1], args[2])
    print(f"{{args[1]}}: 1 file {{cmd}}ed.")
elif cmd == "shell":
    sys.exit(subprocess.run(["sh", "-c", " ".join(args[1:])]).returncode)
else:
    sys.exit(print(f"adb: unknown command {{cmd}}", file=sys.stderr) or 1)
'''


def fake_adb(bin_dir: Path, root: Path) -> tuple[Path, Path]:
    """Writes ``adb`` into ``bin_dir``; returns (state file, call log)."""
    state, log = root / "adb-state", root / "adb-log"
    adb = bin_dir / "adb"
    adb.write_text(FAKE_ADB.format(python=sys.executable, state=str(state), log=str(log)))
    adb.chmod(0o755)
    return state, log


# ------------------------------------------------------------------------------ skips

REQUIRE_ENV = "EDGEQAT_REQUIRE_DEVICE_TESTS"


def skip_or_fail(reason: str) -> None:
    """Skips with ``reason``; fails instead when CI sets EDGEQAT_REQUIRE_DEVICE_TESTS=1."""
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{reason} (and {REQUIRE_ENV}=1 forbids skipping)")
    pytest.skip(reason)


def emulated_sysroot() -> Path:
    """Builds (or reuses) the aarch64 sysroot; skips with the reason when it cannot."""
    from edgeqat.harness import qemu

    if not shutil.which(qemu.QEMU):
        skip_or_fail(f"{qemu.QEMU} not installed ({qemu.INSTALL_HINT})")
    try:
        return qemu.setup(log=lambda line: None)
    except qemu.QemuError as e:
        skip_or_fail(f"cannot set up the emulated Raspberry Pi: {e}")


def emulated_runtime_site(runtime: str) -> Path:
    """Builds (or reuses) the sysroot and ``runtime``'s own site directory (tflite-runtime
    2.14 with numpy 1.26); skips with the reason when it cannot."""
    from edgeqat.harness import qemu

    sysroot = emulated_sysroot()
    try:
        return qemu.setup_runtime(sysroot, runtime, log=lambda line: None)
    except qemu.QemuError as e:
        skip_or_fail(f"cannot set up {runtime} for the emulated Raspberry Pi: {e}")


def output_steps(keras_model, flat: bytes, x) -> tuple:
    """Per sample of ``x``: |TFLite - Keras| in the output's quantization steps (max over
    the output), and whether the two top-1 classes agree; int8 input and output as the
    flatbuffer declares them."""
    import numpy as np
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_content=flat)
    interp.allocate_tensors()
    inp, out = interp.get_input_details()[0], interp.get_output_details()[0]
    (s_in, z_in), (s_out, z_out) = inp["quantization"], out["quantization"]
    keras_out = keras_model.predict(x, batch_size=8, verbose=0)
    ref = np.round(keras_out / s_out + z_out)
    steps, same = [], []
    for i in range(len(x)):
        interp.set_tensor(inp["index"], np.clip(np.round(x[i:i + 1] / s_in + z_in), -128,
                                                127).astype(np.int8))
        interp.invoke()
        got = interp.get_tensor(out["index"]).astype(np.int32)
        steps.append(np.abs(got - ref[i]).max())
        same.append(int(got.argmax()) == int(keras_out[i].argmax()))
    return np.asarray(steps), np.asarray(same)
