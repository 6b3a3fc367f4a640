"""Checkpoint and resume: a QAT run killed halfway and started again ends where an
uninterrupted run ends, losing at most one epoch; SIGINT saves a checkpoint first.

Each run is a subprocess of the same small script (same arguments, same seed): float
training on digits, edgeqat annotation, then ``fine_tune`` with a checkpoint directory.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EPOCHS, STEPS_PER_EPOCH = 8, 10

SCRIPT = textwrap.dedent(f"""
    import dataclasses, json, sys
    from edgeqat.keras import keras, tf
    from edgeqat import annotate, qat
    from edgeqat.config import DataConfig, PolicyConfig, QatConfig
    from edgeqat.data import load_dataset

    ckpt_dir, out = sys.argv[1], sys.argv[2]
    keras.utils.set_random_seed(3)
    tf.config.experimental.enable_op_determinism()
    d = load_dataset(DataConfig(name="digits", calibration_samples=64), 3)
    d = dataclasses.replace(d, x_train=d.x_train[:320], y_train=d.y_train[:320])
    L = keras.layers
    i = keras.Input(d.input_shape)
    x = L.Conv2D(8, 3, strides=2, padding="same", activation="relu")(i)
    x = L.Flatten()(x)
    model = keras.Model(i, L.Dense(10)(x))
    model.compile(keras.optimizers.Adam(1e-2),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(d.x_train, d.y_train, batch_size=32, epochs=4, verbose=0)
    qat_model = annotate.annotate_model(model, PolicyConfig(), sample_x=d.x_calib)

    class Progress(keras.callbacks.Callback):
        def on_train_batch_end(self, step, logs=None):
            print("step", step + 1, flush=True)
            time.sleep(0.02)  # leaves the test time to strike mid-run

    import time
    cfg = QatConfig(epochs={EPOCHS}, batch_size=32, learning_rate=2e-3, quant_delay=0.1,
                    observer_freeze=0.6, checkpoint_dir=ckpt_dir)
    r = qat.fine_tune(qat_model, d, cfg, seed=3, callbacks=[Progress()])
    json.dump({{"accuracy": r.accuracy, "resumed_from": r.resumed_from,
               "history": r.history}}, open(out, "w"))
    print("done", flush=True)
""")


def _cmd(tmp_path: Path, name: str) -> list[str]:
    script = tmp_path / "qat_run.py"
    script.write_text(SCRIPT)
    return [sys.executable, str(script), str(tmp_path / f"{name}.ckpt"),
            str(tmp_path / f"{name}.json")]


def _env():
    return {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"}


def _run(cmd):
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(Path(cmd[-1]).read_text())


def _interrupt_at(cmd, sig, at_step: int) -> tuple[int, int]:
    """Starts ``cmd``, sends ``sig`` once it reports ``at_step``; returns (last step it
    reported, its exit status)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_env())
    last = 0
    try:
        for line in proc.stdout:
            if line.startswith("step "):
                last = int(line.split()[1])
                if last >= at_step:
                    proc.send_signal(sig)
                    break
        rest, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    for line in rest.splitlines():
        if line.startswith("step "):
            last = int(line.split()[1])
    assert "done" not in rest, "the run finished before the signal"
    return last, proc.returncode


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("whole")
    return _run(_cmd(tmp, "whole"))


@pytest.mark.slow
def test_sigkill_halfway_then_rerun_matches_an_uninterrupted_run(tmp_path, uninterrupted):
    cmd = _cmd(tmp_path, "killed")
    half = EPOCHS * STEPS_PER_EPOCH // 2 + 3  # mid-epoch, past the last checkpoint
    last, status = _interrupt_at(cmd, signal.SIGKILL, half)
    assert status == -signal.SIGKILL
    state = json.loads((tmp_path / "killed.ckpt" / "state.json").read_text())
    assert last - state["step"] <= STEPS_PER_EPOCH  # at most one epoch of work lost

    resumed = _run(cmd)  # the same command again
    assert resumed["resumed_from"] == state["step"] > 0
    assert abs(resumed["accuracy"] - uninterrupted["accuracy"]) <= 0.005
    assert len(resumed["history"]) == EPOCHS
    print(f"\nSIGKILL at step {last}, resumed from {state['step']}: accuracy "
          f"{resumed['accuracy']:.4f} vs uninterrupted {uninterrupted['accuracy']:.4f}")
    for a, b in zip(resumed["history"], uninterrupted["history"], strict=True):
        assert a["val_accuracy"] == pytest.approx(b["val_accuracy"], abs=0.02)


@pytest.mark.slow
def test_sigint_saves_a_checkpoint_at_the_current_step(tmp_path, uninterrupted):
    cmd = _cmd(tmp_path, "ctrl_c")
    last, status = _interrupt_at(cmd, signal.SIGINT, 25)
    assert status != 0
    state = json.loads((tmp_path / "ctrl_c.ckpt" / "state.json").read_text())
    assert state["step"] == last  # saved where it stopped: nothing lost
    assert state["step"] % STEPS_PER_EPOCH != 0  # a mid-epoch checkpoint
    resumed = _run(cmd)
    assert resumed["resumed_from"] == last
    assert abs(resumed["accuracy"] - uninterrupted["accuracy"]) <= 0.005


def test_a_foreign_directory_is_refused_a_stale_checkpoint_says_what_changed(tmp_path):
    from edgeqat.errors import UserError
    from edgeqat.keras import tf
    from edgeqat.outputs import CHECKPOINT_MARKER
    from edgeqat.qat import Checkpoints

    state = {"fingerprint": {"data": "old", "pipeline config": "same"}, "step": 10,
             "checkpoint": "qat-10", "history": []}
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "state.json").write_text(json.dumps(state))
    with pytest.raises(UserError, match="holds files that are not an edgeqat checkpoint"):
        Checkpoints(str(foreign), {}, tf.Variable(0.0), tf.Variable(1.0), chief=True)
    assert (foreign / "state.json").is_file()

    ours = tmp_path / "ours"
    ours.mkdir()
    (ours / CHECKPOINT_MARKER).touch()
    (ours / "state.json").write_text(json.dumps(state))
    (ours / "qat-10.index").write_text("x")
    ckpt = Checkpoints(str(ours), {"data": "new", "pipeline config": "same"},
                        tf.Variable(0.0), tf.Variable(1.0), chief=True)
    assert ckpt.stale() == ["data"]
    ckpt.discard()
    assert sorted(p.name for p in ours.iterdir()) == [CHECKPOINT_MARKER]
    assert ckpt.restore() == (0, [])
