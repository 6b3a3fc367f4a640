"""QAT under MultiWorkerMirroredStrategy: two worker processes on 127.0.0.1 (TF_CONFIG),
compared with a single-process run of the same QAT.

The single process trains the float model and saves it; both workers load it, annotate
it inside the strategy's scope, fine-tune it for one QAT epoch with the same global batch
and data order, and convert it to full integer. Synchronous data parallelism computes
the same mean gradient over the same global batches, so the converted models agree up
to float summation order: TOLERANCE says how far apart their int8 outputs may be.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from tests.conftest import ROOT
from tests.harness_support import free_port

# Measured (Dec 2026, 2 CPU cores): the same top-1 on all 359 test digits and the same
# accuracy; the int8 outputs at most 2 quantization steps apart (the workers' moving
# averages of the activation ranges average per-shard statistics, the single process
# sees whole batches). The two workers' models are identical.
TOLERANCE = {"top1_agreement": 0.98, "max_steps": 3}

SCRIPT = textwrap.dedent("""
    import dataclasses, json, os, sys
    mode, out, shared = sys.argv[1], sys.argv[2], sys.argv[3]
    from edgeqat.keras import keras, tf
    from edgeqat import qat
    strategy = "multi_worker_mirrored" if mode == "worker" else "default"
    qat.make_strategy(strategy)  # before TensorFlow initialises its devices
    import numpy as np
    from edgeqat import annotate, convert, inspect
    from edgeqat.config import DataConfig, PolicyConfig, QatConfig
    from edgeqat.data import load_dataset

    keras.utils.set_random_seed(0)
    tf.config.experimental.enable_op_determinism()
    d = load_dataset(DataConfig(name="digits", calibration_samples=64), 0)
    d = dataclasses.replace(d, x_train=d.x_train[:512], y_train=d.y_train[:512])
    if mode == "single":
        L = keras.layers
        i = keras.Input(d.input_shape)
        x = L.ReLU()(L.Conv2D(8, 3, strides=2, padding="same")(i))
        model = keras.Model(i, L.Dense(10)(L.Flatten()(x)))
        model.compile(keras.optimizers.Adam(1e-2),
                      keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        model.fit(d.x_train, d.y_train, batch_size=32, epochs=3, verbose=0)
        model.save(os.path.join(shared, "float.keras"))
    model = keras.models.load_model(os.path.join(shared, "float.keras"), compile=False)
    with qat.strategy_scope(strategy):
        qat_model = annotate.annotate_model(model, PolicyConfig(), sample_x=d.x_calib)
    cfg = QatConfig(epochs=1, batch_size=64, learning_rate=1e-3, strategy=strategy,
                    checkpoint_dir=os.path.join(shared, f"ckpt_{mode}"))
    r = qat.fine_tune(qat_model, d, cfg, seed=0)
    flat = convert.to_tflite(r.model, "int8", qat=True, calibration=d.x_calib)
    inspect.require_full_integer(flat, "qat_int8.tflite")
    from ai_edge_litert.interpreter import Interpreter
    interp = Interpreter(model_content=flat)
    interp.allocate_tensors()
    inp, outp = interp.get_input_details()[0], interp.get_output_details()[0]
    s, z = inp["quantization"]
    raw = []
    for sample in d.x_test:
        interp.set_tensor(inp["index"], np.clip(np.round(sample / s) + z, -128, 127)
                          .astype(np.int8)[None])
        interp.invoke()
        raw.append(interp.get_tensor(outp["index"])[0].astype(np.int32))
    np.save(out + ".npy", np.stack(raw))
    trainable = {id(v) for v in r.model.trainable_weights}
    np.savez(out + ".vars.npz", *[v.numpy() for v in r.model.weights])
    names = [(v.name, id(v) in trainable) for v in r.model.weights]
    json.dump({"replicas": r.replicas, "accuracy": r.accuracy, "vars": names,
               "loss": [h["loss"] for h in r.history]}, open(out, "w"))
""")


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
    return {**env, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3",
            "OMP_NUM_THREADS": "1", **extra}


@pytest.mark.slow
def test_two_workers_match_a_single_process(tmp_path):
    script = tmp_path / "mw.py"
    script.write_text(SCRIPT)
    single = subprocess.run([sys.executable, str(script), "single", str(tmp_path / "single"),
                             str(tmp_path)], capture_output=True, text=True, env=_env(),
                            timeout=300)
    assert single.returncode == 0, single.stderr[-4000:]
    workers = [f"127.0.0.1:{free_port()}" for _ in range(2)]
    procs = []
    for index in range(2):
        tf_config = json.dumps({"cluster": {"worker": workers},
                                "task": {"type": "worker", "index": index}})
        procs.append(subprocess.Popen(
            [sys.executable, str(script), "worker", str(tmp_path / f"worker{index}"),
             str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env=_env(TF_CONFIG=tf_config)))
    try:
        results = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (_, err) in zip(procs, results, strict=True):
        assert p.returncode == 0, err[-4000:]
    ref = json.loads((tmp_path / "single").read_text())
    out = [json.loads((tmp_path / f"worker{i}").read_text()) for i in range(2)]
    assert ref["replicas"] == 1 and [o["replicas"] for o in out] == [2, 2]
    a = np.load(tmp_path / "single.npy")
    b0, b1 = (np.load(tmp_path / f"worker{i}.npy") for i in range(2))
    top1 = float((a.argmax(-1) == b0.argmax(-1)).mean())
    steps = int(np.abs(a - b0).max())
    between = int(np.abs(b0 - b1).max())
    print(f"\nmulti-worker x2 vs single process: top-1 agreement {top1:.4f}, max "
          f"{steps} int8 steps (between the workers: {between}), QAT accuracy "
          f"{out[0]['accuracy']:.4f} vs {ref['accuracy']:.4f}, loss {out[0]['loss']} vs "
          f"{ref['loss']}", file=sys.stderr)
    v0, v1 = (np.load(tmp_path / f"worker{i}.vars.npz") for i in range(2))
    differ = [(name, trainable, float(np.abs(v0[f"arr_{k}"] - v1[f"arr_{k}"]).max()))
              for k, (name, trainable) in enumerate(out[0]["vars"])
              if not np.array_equal(v0[f"arr_{k}"], v1[f"arr_{k}"])]
    assert differ == [], f"variables that differ between the workers: {differ}"
    np.testing.assert_array_equal(b0, b1)  # the workers hold one model
    assert top1 >= TOLERANCE["top1_agreement"] and steps <= TOLERANCE["max_steps"], \
        (top1, steps)
