"""The SSH transport end to end against a real sshd on 127.0.0.1, dropped links included."""

from __future__ import annotations

import dataclasses

import pytest

from edgeqat.harness.device import DeviceUnreachable, run_on_device
from edgeqat.harness.transports import SshTransport
from tests.harness_support import build_int8_model, dropping_python, free_port, sshd_or_skip

pytestmark = [pytest.mark.device]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return build_int8_model(tmp_path_factory.mktemp("model"))


@pytest.fixture
def sshd(tmp_path):
    server = sshd_or_skip(tmp_path)
    yield server
    server.stop()


def test_ssh_run_matches_local_run(sshd, model):
    local = run_on_device(dataclasses.replace(sshd.device(), connection=dataclasses.replace(
        sshd.device().connection, kind="local")), {"m": model.path}, model.x, model.y,
        warmup=0, runs=2)
    remote = run_on_device(sshd.device(), {"m": model.path, "n": model.path}, model.x,
                           model.y, warmup=0, runs=2)
    assert list(remote) == ["m", "n"]
    assert remote["m"].accuracy == local["m"].accuracy
    assert (remote["m"].raw == local["m"].raw).all()
    assert remote["m"].info["model_sha256"] == local["m"].info["model_sha256"]
    assert not list((sshd.root / "remote").glob("run-*")), "the remote workdir is cleaned up"


def test_transport_verbs(sshd, tmp_path):
    t = SshTransport(sshd.device())
    try:
        src = tmp_path / "a.bin"
        src.write_bytes(bytes(range(256)) * 100)
        remote = t.put(src, "a.bin")
        assert remote.startswith(t.workdir)
        done = t.run(["-c", "import sys; print(open(sys.argv[1], 'rb').read()[:3].hex()); "
                            "sys.exit(7)", remote], 30)
        assert (done.returncode, done.stdout.strip()) == (7, "000102")
        t.get(remote, tmp_path / "b.bin")
        assert (tmp_path / "b.bin").read_bytes() == src.read_bytes()
    finally:
        t.close()


def test_an_unknown_host_key_is_refused(sshd, model):
    (sshd.root / "known_hosts").write_text("")  # the server's key is no longer known
    sleeps = []
    with pytest.raises(DeviceUnreachable, match="Host key verification failed") as err:
        run_on_device(sshd.device(), {"m": model.path}, model.x[:4], sleep=sleeps.append)
    assert "\n" not in str(err.value)
    assert sleeps == [], "a host-key failure is not retried"


def test_unreachable_device_retries_with_back_off_then_fails(tmp_path, model):
    from edgeqat.config import ConnectionConfig, DeviceConfig

    port = free_port()  # nothing listens here
    device = DeviceConfig(name="gone", connection=ConnectionConfig(
        kind="ssh", host="127.0.0.1", port=port, connect_timeout_s=2, retries=3,
        retry_backoff_s=0.01, ssh_options=("UserKnownHostsFile=/dev/null",)))
    sleeps = []
    with pytest.raises(DeviceUnreachable) as err:
        run_on_device(device, {"m": model.path}, model.x[:4], sleep=sleeps.append)
    assert sleeps == [0.01, 0.02, 0.04]
    message = str(err.value)
    assert "device 'gone'" in message and "after 4 attempt(s)" in message
    assert "Connection refused" in message and "\n" not in message


def test_session_dropped_mid_run_is_retried_and_completes(sshd, model):
    python, flag = dropping_python(sshd.root, "second", "session")
    sleeps = []
    runs = run_on_device(sshd.device(python=str(python)),
                         {"first": model.path, "second": model.path, "third": model.path},
                         model.x[:20], model.y[:20], warmup=0, runs=1, sleep=sleeps.append)
    assert not flag.exists(), "the connection was really dropped during 'second'"
    assert list(runs) == ["first", "second", "third"]
    assert sleeps == [0.05]  # one drop, one back-off, then success
    assert runs["second"].accuracy == runs["first"].accuracy


def test_server_killed_mid_run_fails_clearly_and_keeps_partial_results(sshd, model):
    python, flag = dropping_python(sshd.root, "second", "server")
    sleeps = []
    with pytest.raises(DeviceUnreachable) as err:
        run_on_device(sshd.device(python=str(python)),
                      {"first": model.path, "second": model.path, "third": model.path},
                      model.x[:20], model.y[:20], warmup=0, runs=1, sleep=sleeps.append)
    assert not flag.exists() and sshd.proc.poll() is not None, "sshd was killed mid-run"
    e = err.value
    assert list(e.partial) == ["first"]
    assert e.partial["first"].accuracy is not None
    assert sleeps == [0.05, 0.1]
    message = str(e)
    assert "running second failed after 3 attempt(s)" in message
    assert "kept results for: first" in message and "\n" not in message
