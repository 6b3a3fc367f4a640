"""Resume through the real CLI: right or restarted, never stale.

A run is killed (SIGKILL) during QAT, leaving its checkpoint. Rerunning it with the float
epochs, the data file or a QAT setting changed must not resume from that checkpoint (the
log says what changed and QAT starts over); the same command unchanged resumes and ships a
``.tflite`` byte-identical to an uninterrupted run's.
"""

from __future__ import annotations

import shutil
import signal
from pathlib import Path

import numpy as np
import pytest

from tests.test_bad_inputs import run_cli
from tests.test_outputs import _start, _wait_for

PIPE = """
name = "resume"
seed = 4
[data]
name = "npz"
path = "d.npz"
calibration_samples = 64
[model]
builder = "mlp"
epochs = 2
[qat]
epochs = 6
[validate]
latency_runs = 2
warmup_runs = 0
max_accuracy_drop = 1.0
[diagnostics]
enabled = false
"""


def _digits_npz(path: Path, nudge: bool = False) -> None:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[..., None]
    if nudge:
        x[0, 0, 0, 0] += 0.5  # one pixel of one training image
    np.savez(path, x_train=x[:1400], y_train=d.target[:1400], x_test=x[1400:],
             y_test=d.target[1400:])


def _run_until(work: Path, extra: list[str], marker: str) -> str:
    """Starts the run into ``k``, reads the log until ``marker``, kills it; returns the log."""
    proc = _start(["--pipeline", "p.toml", "--output_dir", "k", *extra], work)
    try:
        seen = _wait_for(proc, marker)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    return "".join(seen)


@pytest.mark.slow
def test_changed_inputs_never_resume_an_unchanged_rerun_does(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEQAT_LOCK_DIR", str(tmp_path / "locks"))
    work = tmp_path / "work"
    work.mkdir()
    (work / "p.toml").write_text(PIPE)
    _digits_npz(work / "d.npz")

    whole = run_cli(["--pipeline", "p.toml", "--output_dir", "u"], work)
    assert whole.returncode == 0, whole.stderr[-3000:]

    _run_until(work, [], "QAT epoch 1 ")  # two epoch checkpoints written, then killed
    ckpt = work / "k.ckpt"
    assert (ckpt / "state.json").is_file()
    pristine = tmp_path / "pristine.ckpt"
    shutil.copytree(ckpt, pristine)

    def restore_checkpoint():
        shutil.rmtree(ckpt)
        shutil.copytree(pristine, ckpt)

    changes = [
        (["--float_epochs", "3"], ("pipeline config", "starting weights")),
        (["--epochs", "7"], ("pipeline config", "qat config and seed")),
    ]
    for flags, named in changes:
        restore_checkpoint()
        log = _run_until(work, flags, "starting QAT from the beginning")
        assert "QAT resumes" not in log
        for what in named:
            assert what in log, log[-2000:]

    restore_checkpoint()
    _digits_npz(work / "d.npz", nudge=True)  # the same config, a changed data file
    log = _run_until(work, [], "starting QAT from the beginning")
    assert "data" in log.split("changed:")[1] and "pipeline config" not in log

    restore_checkpoint()
    _digits_npz(work / "d.npz")
    resumed = run_cli(["--pipeline", "p.toml", "--output_dir", "k"], work)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "QAT resumes at step" in resumed.stderr
    assert (work / "k" / "qat_int8.tflite").read_bytes() == \
        (work / "u" / "qat_int8.tflite").read_bytes()
    assert not ckpt.exists()  # finished: nothing to resume
