"""Every device profile in devices/ loads, and the loader rejects bad device files."""

from pathlib import Path

import pytest

from edgeqat.config import DEVICES_DIR, load_device
from edgeqat.errors import ConfigError

PROFILES = sorted(DEVICES_DIR.glob("*.toml"))


def test_the_documented_profiles_exist():
    names = {p.stem for p in PROFILES}
    assert {"local_cpu", "rpi4", "rpi4_emulated", "coral_usb", "android"} <= names


@pytest.mark.parametrize("path", PROFILES, ids=[p.stem for p in PROFILES])
def test_profile_loads(path: Path):
    device = load_device(path)
    assert device.name == path.stem
    assert device.source == str(path)
    assert device.num_threads >= 1
    assert device.description and device.hardware
    if device.connection.kind == "ssh":
        assert device.connection.host
    if device.delegate == "edgetpu":
        assert device.delegate_device


def test_profiles_say_what_the_issue_asks():
    rpi4 = load_device(DEVICES_DIR / "rpi4.toml")
    assert (rpi4.connection.kind, rpi4.num_threads) == ("ssh", 4)
    assert rpi4.runtime in ("auto", "tflite_runtime", "ai_edge_litert")
    emu = load_device(DEVICES_DIR / "rpi4_emulated.toml")
    assert (emu.connection.kind, emu.connection.cpu) == ("qemu", "cortex-a72")
    coral = load_device(DEVICES_DIR / "coral_usb.toml")
    assert (coral.delegate, coral.delegate_device) == ("edgetpu", "usb")
    assert load_device(DEVICES_DIR / "android.toml").connection.kind == "adb"
    local = load_device()
    assert (local.name, local.delegate, local.num_threads) == ("local_cpu", "xnnpack", 1)


@pytest.mark.parametrize("text, message", [
    ('name = "x"\n[connection]\nkind = "ssh"\n', "connection.host is required"),
    ('name = "x"\n[connection]\nkind = "serial"\n', "is not one of"),
    ('name = "x"\nthreads = 2\n', "unknown key 'threads'"),
    ('name = "x"\n[connection]\nssh_options = ["-oFoo"]\n', "Key=Value"),
    ('name = "x"\ndelegate = "xnnpack"\ndelegate_device = "usb"\n', "delegate_device"),
    ('name = "x"\n[connection]\nretries = -1\n', "retries"),
])
def test_bad_device_files_are_refused(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_device(path)


def test_relative_key_paths_are_relative_to_the_file(tmp_path):
    path = tmp_path / "pi.toml"
    path.write_text('name = "pi"\n[connection]\nkind = "ssh"\nhost = "pi"\n'
                    'identity_file = "keys/id"\nssh_config = "~/.ssh/config"\n')
    conn = load_device(path).connection
    assert conn.identity_file == str(tmp_path / "keys" / "id")
    assert conn.ssh_config == str(Path("~/.ssh/config").expanduser())


def test_target_arch_per_profile():
    """The CPU whose kernel rounding the Keras reference follows (edgeqat.requant)."""
    from edgeqat.requant import host_arch
    from edgeqat.validate import target_arch

    arch = {p.stem: target_arch(load_device(p)) for p in PROFILES}
    assert arch["rpi4"] == arch["android"] == arch["rpi4_emulated"] == "aarch64"
    assert arch["local_cpu"] == arch["coral_usb"] == host_arch()  # local: this machine
