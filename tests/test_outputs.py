"""Output directories through the real CLI: edgeqat replaces only its own, one run at a
time, Ctrl-C and a full disk end in one line, a dead run's temp directory is cleaned.

Each test asserts the state of the disk afterwards.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.test_bad_inputs import assert_one_line_error, run_cli

FAST = """
name = "fast"
seed = 2
[data]
name = "digits"
calibration_samples = 64
eval_samples = 120
[model]
builder = "mlp"
epochs = {float_epochs}
batch_size = 64
[qat]
epochs = 2
[validate]
latency_runs = 2
warmup_runs = 0
max_accuracy_drop = 1.0
[diagnostics]
enabled = false
"""


def fast_pipeline(work: Path, float_epochs: int = 2, extra: str = "") -> Path:
    path = work / "p.toml"
    path.write_text(FAST.format(float_epochs=float_epochs) + extra)
    return path


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if "__pycache__" not in str(p)}


@pytest.fixture
def work(tmp_path, monkeypatch):
    w = tmp_path / "work"
    w.mkdir()
    monkeypatch.setenv("EDGEQAT_LOCK_DIR", str(tmp_path / "locks"))
    return w


def _default_sigint() -> None:
    """In the child before exec: SIGINT as a terminal delivers it. A suite started in the
    background by a non-interactive shell runs with SIGINT ignored, which every child
    inherits, and a Python started so never installs its KeyboardInterrupt handler: run A
    then ignored the test's Ctrl-C and trained on (the failures of 0bcb894-18bc051)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start(args: list[str], cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": f"{cwd}{os.pathsep}{ROOT}"}
    return subprocess.Popen([sys.executable, "-m", "edgeqat.pipeline", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_default_sigint)


def _wait_for(proc: subprocess.Popen, text: str, timeout: float = 180) -> list[str]:
    """Reads the process's stderr until a line contains ``text``; returns the lines read."""
    seen = []
    deadline = time.time() + timeout
    for line in proc.stderr:
        seen.append(line)
        if text in line:
            return seen
        assert time.time() < deadline, "".join(seen[-20:])
    raise AssertionError(f"{text!r} never appeared:\n" + "".join(seen[-20:]))


@pytest.mark.slow
def test_own_run_directory_is_replaced_a_user_file_in_it_is_not(work):
    """Two runs into one directory: the second replaces the first. A file the user put in
    the run directory makes the third refuse, before training, and stays. A rule that
    matches no layer is a warning in the log and the report."""
    fast_pipeline(work, extra='[[policy.rules]]\nlayers = "^conv_9$"\nweight_bits = 4\n')
    first = run_cli(["--pipeline", "p.toml", "--output_dir", "out"], work)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "policy.rules[0] (layers = '^conv_9$', classes = '.*') matches no layer" in \
        first.stderr
    report = json.loads((work / "out" / "report.json").read_text())
    assert any("matches no layer" in w for w in report["warnings"])
    assert "Warning: policy.rules[0]" in (work / "out" / "report.md").read_text()
    marker = json.loads((work / "out" / ".edgeqat-run").read_text())
    assert "qat_int8.tflite" in marker["files"]

    second = run_cli(["--pipeline", "p.toml", "--output_dir", "out"], work)
    assert second.returncode == 0, second.stderr[-3000:]
    assert (work / "out" / "report.json").stat().st_mtime_ns > 0
    assert _tree(work) == {"p.toml", *(f"out/{n}" for n in _tree(work / "out")), "out"}

    (work / "out" / "notes.txt").write_text("mine")
    started = time.time()
    third = run_cli(["--pipeline", "p.toml", "--output_dir", "out"], work)
    assert_one_line_error(third, "notes.txt in it is not edgeqat's")
    assert "stage float" not in third.stderr and time.time() - started < 60
    assert (work / "out" / "notes.txt").read_text() == "mine"
    assert (work / "out" / "qat_int8.tflite").is_file()


@pytest.mark.slow
def test_second_run_on_the_same_output_is_refused_and_ctrl_c_is_one_line(work):
    """Run A trains (long float training); run B with the same output directory is refused
    at once; Ctrl-C then ends A with one line and exit 130, leaving nothing behind."""
    # Far more epochs than the test waits: A must still be training when Ctrl-C comes.
    fast_pipeline(work, float_epochs=20000)
    a = _start(["--pipeline", "p.toml", "--output_dir", "out"], work)
    try:
        # TensorFlow is imported after the device stage; a Ctrl-C during that import
        # under the full suite's load once left A hung for 120 s: wait for training.
        _wait_for(a, "float training:")
        time.sleep(2)
        b = run_cli(["--pipeline", "p.toml", "--output_dir", "out"], work)
        assert_one_line_error(b, "out: the output directory is in use by another edgeqat run "
                                 f"(pid {a.pid})")
        a.send_signal(signal.SIGINT)
        _, err = a.communicate(timeout=120)
    finally:
        if a.poll() is None:
            a.kill()
    assert a.returncode == 130, err[-3000:]
    assert "Traceback" not in err
    assert [ln for ln in err.splitlines() if ln.startswith("edgeqat: ")] == \
        ["edgeqat: interrupted"]
    assert _tree(work) == {"p.toml"}


def test_temp_directory_of_a_dead_run_is_cleaned_others_are_kept(work):
    """A killed run leaves ``.out.tmp-PID`` (with edgeqat's marker): the next run of the
    same output removes it. A look-alike without the marker is the user's and stays."""
    fast_pipeline(work, extra="")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    orphan = work / f".out.tmp-{dead.pid}"
    orphan.mkdir()
    (orphan / ".edgeqat-run").write_text("{}")
    (orphan / "float.tflite").write_bytes(b"half")
    lookalike = work / ".out.tmp-1"
    lookalike.mkdir()
    (lookalike / "data.csv").write_text("user")
    # A run that fails at the data stage, after claiming the output path.
    (work / "p.toml").write_text((work / "p.toml").read_text().replace(
        'name = "digits"', 'name = "npz"\npath = "missing.npz"'))
    p = run_cli(["--pipeline", "p.toml", "--output_dir", "out"], work)
    assert_one_line_error(p, "missing.npz: data file not found")
    assert not orphan.exists()
    assert (lookalike / "data.csv").read_text() == "user"


@pytest.fixture
def tiny_disk(tmp_path):
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        if os.environ.get("EDGEQAT_REQUIRE_DEVICE_TESTS"):
            pytest.fail(f"cannot mount a small tmpfs: {done.stderr.strip()}")
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {done.stderr.strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=False)


@pytest.mark.slow
def test_full_disk_is_one_line_naming_the_path_and_leaves_nothing(work, tiny_disk):
    """A 256 KiB file system for the outputs: the run fails in one line naming where it was
    writing, and the partly written temp and checkpoint directories are removed."""
    fast_pipeline(work)
    p = run_cli(["--pipeline", "p.toml", "--output_dir", str(tiny_disk / "out")], work)
    line = assert_one_line_error(p, "no space left on the device")
    assert str(tiny_disk) in line
    assert os.listdir(tiny_disk) == []
