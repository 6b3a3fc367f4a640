"""QAT training-step time relative to the float step, per quantizer kind, in one run.

    python benchmarks/qat_overhead.py [--steps 40] [--batch 64]

Model: the project's depthwise-separable CNN (``edgeqat.models.dscnn``, width 32) on
32x32x3 inputs, 10 classes. Variants, all trained with the same compiled Keras step
(``train_on_batch``, Adam, sparse cross-entropy):

* float: the float model itself (BatchNormalization in training mode);
* tfmot default: ``tfmot.quantization.keras.quantize_model`` (its default 8-bit scheme:
  per-channel weights, moving-average activations, BN folded by tfmot's transforms);
* edgeqat: ``annotate_model`` with one weight quantizer kind (``per_channel``,
  ``per_tensor``, ``lsq``; activations ``moving_average``) or one activation quantizer kind
  (``moving_average``, ``relu6``, ``pact``, ``lsq``, ``percentile``, ``mse``; weights
  ``per_channel``), 8 bits.

Each variant is warmed up, then the steps are timed interleaved: in each of ``--steps``
rounds every variant takes one step, in a shuffled order, so machine load drifts hit all
variants alike. Reported: median step time per variant and its ratio to the float median
(the only numbers to compare). Writes benchmarks/results/qat_overhead.md and .json.
"""

from __future__ import annotations

import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
from absl import app, flags

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

flags.DEFINE_integer("steps", 40, "Timed steps per variant (interleaved rounds).")
flags.DEFINE_integer("warmup", 3, "Untimed steps per variant first.")
flags.DEFINE_integer("batch", 64, "Batch size.")
flags.DEFINE_string("out", str(Path(__file__).parent / "results" / "qat_overhead"),
                    "Output path without extension.")
FLAGS = flags.FLAGS


def reading(rows: list[dict]) -> str:
    """The table in words, from its own numbers (rerunning keeps it true)."""
    ratio = {r["variant"]: r["ratio_to_float"] for r in rows}
    ours = {k: v for k, v in ratio.items() if k.startswith("edgeqat")}
    lo, hi = min(ours, key=ours.get), max(ours, key=ours.get)
    spread = [r for r in rows if r["iqr_ms"][1] > 1.5 * r["iqr_ms"][0]]
    return (f"Reading (written by the script): tfmot's default scheme costs "
            f"{ratio['tfmot default (quantize_model)']:.2f}x the float step; edgeqat's "
            f"variants {ours[lo]:.2f}x ({lo.removeprefix('edgeqat ')}) to {ours[hi]:.2f}x "
            f"({hi.removeprefix('edgeqat ')}). A ratio below 1 is real: annotate folds "
            f"BatchNormalization into the convolutions, while the float model (and tfmot, "
            f"which adds its own folding graph) still computes batch statistics. "
            "Activation ranges learned or searched on every batch: " + ", ".join(
                f"{k} {ratio[f'edgeqat weights=per_channel, act={k}']:.2f}x"
                for k in ("lsq", "percentile", "mse")) + ". "
            f"{len(spread)} of {len(rows)} variants have an IQR wider than 1.5x its lower "
            f"end (a shared, noisy machine shows two modes), so read differences under ~10% "
            f"as ties.")


def main(argv):
    del argv
    from edgeqat import annotate, models, policy, report
    from edgeqat.keras import keras, tf, tfmot

    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    shape, classes = (32, 32, 3), 10
    x = rng.uniform(-1, 1, (FLAGS.batch, *shape)).astype(np.float32)
    y = rng.integers(0, classes, FLAGS.batch)
    base = models.dscnn(shape, classes)
    variants = {"float": base,
                "tfmot default (quantize_model)": tfmot.quantization.keras.quantize_model(
                    keras.models.clone_model(base))}
    for kind in ("per_channel", "per_tensor", "lsq"):
        variants[f"edgeqat weights={kind}, act=moving_average"] = annotate.annotate_model(
            base, policy.uniform(weight_quantizer=kind), sample_x=x)
    for kind in ("relu6", "pact", "lsq", "percentile", "mse"):
        variants[f"edgeqat weights=per_channel, act={kind}"] = annotate.annotate_model(
            base, policy.uniform(activation_quantizer=kind), sample_x=x)
    for model in variants.values():
        model.compile(keras.optimizers.Adam(1e-4),
                      keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        for _ in range(FLAGS.warmup):
            model.train_on_batch(x, y)
    times = {name: [] for name in variants}
    names = list(variants)
    for _ in range(FLAGS.steps):
        for i in rng.permutation(len(names)):
            name = names[i]
            start = time.perf_counter()
            variants[name].train_on_batch(x, y)
            times[name].append(time.perf_counter() - start)
    ref = float(np.median(times["float"]))
    rows = [{"variant": n, "median_ms": round(1e3 * float(np.median(t)), 2),
             "ratio_to_float": round(float(np.median(t)) / ref, 2),
             "iqr_ms": [round(1e3 * float(v), 2) for v in np.percentile(t, [25, 75])]}
            for n, t in times.items()]
    result = {"model": "dscnn(32x32x3, width 32, 10 classes)", "batch": FLAGS.batch,
              "steps": FLAGS.steps, "warmup": FLAGS.warmup,
              "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, "
                         f"TensorFlow {tf.__version__}", "rows": rows}
    lines = ["# QAT training-step overhead vs float", "",
             f"{result['model']}, batch {FLAGS.batch}, Adam, `train_on_batch`; median of "
             f"{FLAGS.steps} steps per variant, interleaved in shuffled order each round, "
             f"after {FLAGS.warmup} warm-up steps; {result['machine']}. Compare the ratios "
             "only (absolute times depend on the machine and its load).", "",
             "| variant | median step (ms) | IQR (ms) | ratio to float |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['median_ms']:.1f} | {r['iqr_ms'][0]:.1f}–"
                     f"{r['iqr_ms'][1]:.1f} | {r['ratio_to_float']:.2f} |")
    lines += ["", reading(rows), ""]
    report.write_results(Path(FLAGS.out), result, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    app.run(main)
