"""QAT recipes on MNIST-1D with 4-bit weights, against float and PTQ, in one run.

    python benchmarks/qat_recipes.py [--seeds 3] [--qat_epochs 5]

One float model (pipelines/mnist1d_cnn.toml, its seed and float training), then:

* float: the Keras model and its float TFLite;
* PTQ int8: post-training quantization, 8-bit weights (the pipeline's baseline);
* PTQ w4: weights rounded per channel to 4 bits (symmetric max-abs, narrow range), then
  the same int8 PTQ (round-to-nearest 4-bit PTQ);
* QAT recipes, all with 4-bit per-channel weights and 8-bit activations, each run with
  ``--seeds`` QAT seeds (data order) from the same float model:
  plain (no delay, no freezes), delay + freezes (quant delay 10%, observers frozen at 75%,
  BN frozen at 50%), delay + freezes + gradual precision (8 -> 6 -> 4 bits), and
  distillation (plain + KD from the float model, alpha 0.5, T 4).

Accuracy is top-1 on the MNIST-1D test split (1,000 signals) of the fully-integer TFLite
model run by ai-edge-litert; the Keras fake-quant accuracy is given beside it. Writes
benchmarks/results/qat_recipes.md and .json.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

import numpy as np
from absl import app, flags

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

flags.DEFINE_integer("seeds", 3, "QAT seeds per recipe.")
flags.DEFINE_integer("qat_epochs", 5, "QAT epochs (the pipeline's value).")
flags.DEFINE_string("out", str(Path(__file__).parent / "results" / "qat_recipes"),
                    "Output path without extension.")
FLAGS = flags.FLAGS


def reading(rows: list[dict]) -> str:
    """The table in words, from its own numbers (rerunning keeps it true)."""
    by = {r["recipe"]: r for r in rows}
    ptq4 = next(r for r in rows if r["recipe"].startswith("PTQ w4"))
    plain = by["QAT plain"]
    parts = []
    for r in rows:
        if not r["recipe"].startswith("QAT") or r is plain:
            continue
        d = 100 * (r["mean"] - plain["mean"])
        noise = 100 * 2 * max(r["std"], plain["std"], 0.0025)
        verdict = "a tie within seed noise" if abs(d) <= noise else (
            "better" if d > 0 else "worse")
        parts.append(f"{r['recipe'][4:]} {r['mean']:.3f} ({d:+.1f} pt: {verdict})")
    return (f"Reading (written by the script): plain QAT recovers {plain['mean']:.3f} of the "
            f"{rows[0]['mean']:.3f} float accuracy from {ptq4['mean']:.3f} after 4-bit "
            f"round-to-nearest PTQ. Against plain QAT: " + "; ".join(parts) + ". A tie means "
            "within twice the larger seed std (at least 0.5 pt); one float model, "
            f"{len(plain['tflite_accuracy'])} QAT seeds. The float row's s/run is its float "
            "training time.")


def main(argv):
    del argv
    from edgeqat import convert, inspect, models, ptq, report, train
    from edgeqat.config import PrecisionStep, RuleConfig
    from edgeqat.data import load_dataset
    from edgeqat.diagnostics import tflite_accuracy
    from edgeqat.flow import quantize_aware
    from edgeqat.keras import keras, tf
    from edgeqat.pipeline import resolve_configs

    cfg, _ = resolve_configs("mnist1d_cnn", "local_cpu", epochs=FLAGS.qat_epochs)
    keras.utils.set_random_seed(cfg.seed)
    tf.config.experimental.enable_op_determinism()
    data = load_dataset(cfg.data, cfg.seed)
    start = time.perf_counter()
    trained = train.train_float(models.build_model(cfg.model, data.input_shape,
                                                   data.num_classes), data, cfg.model)
    float_seconds = time.perf_counter() - start
    xt, yt = data.x_test, data.y_test
    rows = [{"recipe": "float", "tflite_accuracy": [tflite_accuracy(
        convert.to_tflite(trained.model, "float"), xt, yt)],
        "keras_accuracy": [trained.accuracy], "seconds": [round(float_seconds, 1)]}]
    for name, model in (("PTQ int8 (8-bit weights)", trained.model),
                        ("PTQ w4 (4-bit RTN weights)", ptq.round_weights(trained.model, 4))):
        flat = convert.to_tflite(model, "int8", calibration=data.x_calib)
        inspect.require_full_integer(flat, name)
        rows.append({"recipe": name, "tflite_accuracy": [tflite_accuracy(flat, xt, yt)],
                     "keras_accuracy": [train.accuracy(model, xt, yt)], "seconds": [0.0]})

    policy = dataclasses.replace(cfg.policy, rules=(), default=RuleConfig(weight_bits=4))
    base = dataclasses.replace(cfg.qat, quant_delay=0.0, observer_freeze=1.0, bn_freeze=1.0,
                               checkpoint_dir="")
    recipes = {
        "QAT plain": base,
        "QAT delay + freezes": dataclasses.replace(base, quant_delay=0.1,
                                                   observer_freeze=0.75, bn_freeze=0.5),
        "QAT delay + freezes + 8/6/4 bits": dataclasses.replace(
            base, quant_delay=0.1, observer_freeze=0.75, bn_freeze=0.5,
            precision=(PrecisionStep(0, 8), PrecisionStep(1, 6), PrecisionStep(3, 4))),
        "QAT distillation": dataclasses.replace(base, distill=True, distill_alpha=0.5,
                                                distill_temperature=4.0),
    }
    for name, qcfg in recipes.items():
        row = {"recipe": name, "tflite_accuracy": [], "keras_accuracy": [], "seconds": []}
        for seed in range(FLAGS.seeds):
            keras.utils.set_random_seed(seed)
            # The pipeline's flow (annotate, fine-tune, export, prove), converting on the
            # trained ranges alone.
            quantized = quantize_aware(trained, data, "int8", policy, qcfg, seed=seed,
                                       float_learning_rate=cfg.model.learning_rate,
                                       calibrate=False)
            tuned, flat = quantized.tuned, quantized.tflite
            row["tflite_accuracy"].append(tflite_accuracy(flat, xt, yt))
            row["keras_accuracy"].append(tuned.accuracy)
            row["seconds"].append(round(tuned.seconds, 1))
            print(name, seed, row["tflite_accuracy"][-1], flush=True)
        rows.append(row)

    for r in rows:
        a = np.array(r["tflite_accuracy"])
        r["mean"], r["std"] = float(a.mean()), float(a.std())
    result = {"pipeline": cfg.source and Path(cfg.source).name, "seeds": FLAGS.seeds,
              "qat_epochs": FLAGS.qat_epochs, "weight_bits": 4, "activation_bits": 8,
              "test_samples": int(len(yt)), "rows": rows,
              "note": "mnist1d_cnn has no BatchNormalization, so bn_freeze has nothing to act "
                      "on here; TFLite accuracy of the fully-integer model."}
    lines = ["# QAT recipes: MNIST-1D CNN, 4-bit weights / 8-bit activations", "",
             f"Float model from `pipelines/mnist1d_cnn.toml`; {FLAGS.qat_epochs} QAT epochs; "
             f"QAT rows are mean ± std over {FLAGS.seeds} QAT seeds (data order) from the "
             f"same float model; accuracy on the {len(yt)} test signals of the fully-integer "
             "TFLite model (ai-edge-litert), Keras fake-quant accuracy beside it.", "",
             "| recipe | TFLite accuracy | per seed | Keras accuracy | QAT s/run |",
             "|---|---|---|---|---|"]
    for r in rows:
        seeds = ", ".join(f"{v:.3f}" for v in r["tflite_accuracy"])
        keras_acc = np.mean(r["keras_accuracy"])
        lines.append(f"| {r['recipe']} | {r['mean']:.3f} ± {r['std']:.3f} | {seeds} | "
                     f"{keras_acc:.3f} | {np.mean(r['seconds']):.1f} |")
    lines += ["", result["note"], "", reading(rows), ""]
    report.write_results(Path(FLAGS.out), result, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    app.run(main)
