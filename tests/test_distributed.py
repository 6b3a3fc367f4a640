"""QAT under MirroredStrategy with two logical CPU devices, then full-integer conversion.

Logical devices must be configured before TensorFlow initialises its devices, so the run
happens in a fresh subprocess.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

SCRIPT = textwrap.dedent("""
    import dataclasses, json, sys
    from edgeqat.keras import keras, tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    from edgeqat import annotate, convert, inspect, qat
    from edgeqat.config import DataConfig, PolicyConfig, QatConfig
    from edgeqat.data import load_dataset

    keras.utils.set_random_seed(0)
    d = load_dataset(DataConfig(name="digits", calibration_samples=64), 0)
    d = dataclasses.replace(d, x_train=d.x_train[:640], y_train=d.y_train[:640])
    L = keras.layers
    i = keras.Input(d.input_shape)
    x = L.Conv2D(8, 3, strides=2, padding="same")(i)
    x = L.BatchNormalization()(x)
    x = L.ReLU()(x)
    model = keras.Model(i, L.Dense(10)(L.Flatten()(x)))
    model.compile(keras.optimizers.Adam(1e-2),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(d.x_train, d.y_train, batch_size=32, epochs=4, verbose=0)
    with qat.strategy_scope("mirrored"):
        qat_model = annotate.annotate_model(model, PolicyConfig(), sample_x=d.x_calib)
    cfg = QatConfig(epochs=2, batch_size=64, learning_rate=1e-3, strategy="mirrored",
                    distill=True, checkpoint_dir=sys.argv[2])
    r = qat.fine_tune(qat_model, d, cfg, teacher=model, seed=0)
    flat = convert.to_tflite(r.model, "int8", qat=True)
    ops = inspect.require_full_integer(flat, "qat_int8.tflite")
    json.dump({"replicas": r.replicas, "accuracy": r.accuracy,
               "float_accuracy": float((model.predict(d.x_test, verbose=0).argmax(-1)
                                         == d.y_test).mean()),
               "devices": [dv.name for dv in tf.config.list_logical_devices("CPU")],
               "ops": sorted({op.name for op in ops}), "tflite_bytes": len(flat),
               "history": r.history}, open(sys.argv[1], "w"))
""")


@pytest.mark.slow
def test_two_replicas_train_and_convert_to_full_integer(tmp_path):
    script = tmp_path / "dist.py"
    script.write_text(SCRIPT)
    out = tmp_path / "out.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"}
    proc = subprocess.run([sys.executable, str(script), str(out), str(tmp_path / "ckpt")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r = json.loads(out.read_text())
    assert len(r["devices"]) == 2
    assert r["replicas"] == 2
    assert len(r["history"]) == 2 and all(h["loss"] > 0 for h in r["history"])
    assert r["accuracy"] > 0.5, r  # it learned (float accuracy is in r)
    assert (tmp_path / "ckpt" / "state.json").is_file()  # checkpointed under the strategy
    assert r["tflite_bytes"] > 0 and "CONV_2D" in r["ops"]  # require_full_integer passed
    print(f"\nmirrored x2: QAT accuracy {r['accuracy']:.3f}, float {r['float_accuracy']:.3f}")
