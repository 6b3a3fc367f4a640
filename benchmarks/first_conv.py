"""int8 against float on the small reference models, layer by layer and by input channels.

    python benchmarks/first_conv.py [--rounds 15] [--runs 200]

Two measurements, each a set of .tflite models timed side by side on this machine with
``edgeqat.latency.interleaved`` (XNNPACK, batch 1; a ratio is the median of per-round
ratios, with their range):

* the first convolution of each reference model alone, float against int8 (PTQ), with
  1, 2, 4, 8, 16 and 32 input channels: digits_dscnn's 3x3 Conv2D (8x8, 32 filters) and
  mnist1d_cnn's kernel-5 stride-2 Conv1D (length 40, 64 filters), at 1 and 2 threads;
* every convolution, pooling and dense layer of the two reference models alone (its
  activation, which TFLite fuses, left out), the whole model, and a one-op model
  (Dense 1 -> 1, the fixed cost of an invoke), float against int8, at 1 thread.

The models have their builders' initial weights (speed does not depend on their values);
each int8 model is calibrated on the float model's inputs to that layer for real samples
of its dataset. Writes benchmarks/results/first_conv.md and .json.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
from absl import app, flags

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

flags.DEFINE_integer("rounds", 15, "Interleaved timing rounds.")
flags.DEFINE_integer("runs", 200, "Invokes per model per round.")
flags.DEFINE_string("out", str(Path(__file__).parent / "results" / "first_conv"),
                    "Output path without extension.")
FLAGS = flags.FLAGS

CHANNELS = (1, 2, 4, 8, 16, 32)
THREADS = (1, 2)
MODELS = (("digits_dscnn", "dscnn", "digits"), ("mnist1d_cnn", "mnist1d_cnn", "mnist1d"))
TIMED = ("Conv1D", "Conv2D", "DepthwiseConv2D", "GlobalAveragePooling2D", "Dense")


def _first_conv(model_name: str, channels: int):
    from edgeqat.keras import keras

    layers = keras.layers
    if model_name == "digits_dscnn":
        x = inputs = keras.Input((8, 8, channels))
        x = layers.Conv2D(32, 3, padding="same")(x)
    else:
        x = inputs = keras.Input((40, channels))
        x = layers.Conv1D(64, 5, strides=2, padding="same")(x)
    return keras.Model(inputs, x)


def _pair(model, x_calib: np.ndarray) -> tuple[bytes, bytes]:
    from edgeqat import convert

    return (convert.to_tflite(model, "float"),
            convert.to_tflite(model, "int8", calibration=x_calib))


def _speed(t: dict, name: str, threads: int) -> dict:
    """int8's speed relative to float (above 1: int8 is faster), with float and int8 us."""
    from edgeqat import latency

    f, q = t[f"{name}/float"][threads], t[f"{name}/int8"][threads]
    return {"float_us": f.median_us, "int8_us": q.median_us, **latency.ratio(f, q)}


def sweep() -> list[dict]:
    """The first convolution alone at each input channel count, float against int8."""
    from edgeqat import latency

    rng = np.random.default_rng(0)
    models = {}
    for name, _, _ in MODELS:
        for c in CHANNELS:
            m = _first_conv(name, c)
            x = rng.standard_normal((64, *m.input_shape[1:])).astype(np.float32)
            models[f"{name}:{c}/float"], models[f"{name}:{c}/int8"] = _pair(m, x)
    t = latency.interleaved(models, threads=THREADS, rounds=FLAGS.rounds, runs=FLAGS.runs)
    return [{"model": name, "input_channels": c,
             "threads": {str(n): _speed(t, f"{name}:{c}", n) for n in THREADS}}
            for name, _, _ in MODELS for c in CHANNELS]


def per_layer() -> list[dict]:
    """Each compute layer of the reference models alone, the whole model and a one-op
    model, float against int8, at 1 thread."""
    from edgeqat import latency, models
    from edgeqat.config import DataConfig, ModelConfig
    from edgeqat.data import load_dataset
    from edgeqat.keras import keras

    flats, rows = {}, []
    tiny = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
    flats["one-op/float"], flats["one-op/int8"] = _pair(
        tiny, np.linspace(-1, 1, 64, dtype=np.float32)[:, None])
    rows.append({"model": "-", "layer": "one-op", "op": "Dense 1 -> 1", "shape": "1 -> 1"})
    for name, builder, data_name in MODELS:
        data = load_dataset(DataConfig(name=data_name, calibration_samples=64), seed=0)
        model = models.build_model(ModelConfig(builder=builder), data.input_shape,
                                   data.num_classes)
        for layer in model.layers:
            kind = type(layer).__name__
            if kind not in TIMED:
                continue
            alone = keras.Sequential([keras.Input(layer.input_shape[1:]),
                                      type(layer).from_config(layer.get_config())])
            x = keras.Model(model.input, layer.input).predict(data.x_calib, verbose=0)
            key = f"{name}.{layer.name}"
            flats[f"{key}/float"], flats[f"{key}/int8"] = _pair(alone, x)
            shape = " -> ".join("x".join(map(str, s[1:])) for s in
                                (layer.input_shape, layer.output_shape))
            rows.append({"model": name, "layer": layer.name, "op": kind, "shape": shape})
        flats[f"{name}.whole/float"], flats[f"{name}.whole/int8"] = _pair(model, data.x_calib)
        rows.append({"model": name, "layer": "whole", "op": "model",
                     "shape": "x".join(map(str, data.input_shape)) + f" -> {data.num_classes}"})
    t = latency.interleaved(flats, threads=(1,), rounds=FLAGS.rounds, runs=FLAGS.runs)
    for r in rows:
        key = r["layer"] if r["model"] == "-" else f"{r['model']}.{r['layer']}"
        r.update(_speed(t, key, 1))
    return rows


def _cell(r: dict) -> str:
    return f"{r['median']:.2f}x ({r['min']:.2f}-{r['max']:.2f})"


def reading(sweep_rows: list[dict], layer_rows: list[dict]) -> str:
    """The tables in words, from their own numbers (rerunning keeps it true)."""
    parts = []
    for name, _, _ in MODELS:
        one = [r for r in sweep_rows if r["model"] == name]
        even = next((r["input_channels"] for r in one if r["threads"]["1"]["median"] >= 1),
                    None)
        layer_rows_m = [r for r in layer_rows if r["model"] == name]
        first, whole = layer_rows_m[0], layer_rows_m[-1]
        lost = whole["int8_us"] - whole["float_us"]
        first_lost = first["int8_us"] - first["float_us"]
        layers_lost = sum(r["int8_us"] - r["float_us"] for r in layer_rows_m[:-1])
        share = (f"its int8 version is {lost:.2f} us slower than float; {first.get('layer')} "
                 f"alone accounts for {first_lost:+.2f} us, all its layers alone for "
                 f"{layers_lost:+.2f} us" if lost > 0 else
                 f"its int8 version is {-lost:.2f} us faster than float")
        parts.append(
            f"{name}: the first convolution with 1 input channel runs in int8 at "
            f"{one[0]['threads']['1']['median']:.2f}x the float speed (1 thread), "
            + (f"break-even or better from {even} input channels"
               if even else "slower at every channel count measured")
            + f", {one[-1]['threads']['1']['median']:.2f}x at {one[-1]['input_channels']}; "
            f"the whole model takes {whole['float_us']:.2f} us in float, "
            f"{whole['int8_us']:.2f} us in int8, and {share}")
    tiny = layer_rows[0]
    return ("Reading (written by the script): " + ". ".join(parts) + f". A one-op model "
            f"costs {tiny['float_us']:.2f} us (float) and {tiny['int8_us']:.2f} us (int8) per "
            "invoke: the fixed cost of an invoke is the same for both.")


def main(argv):
    del argv
    from edgeqat import report
    from edgeqat.latency import host_cpu

    sweep_rows, layer_rows = sweep(), per_layer()
    lines = [
        "##### int8 against float on the small reference models, layer by layer",
        "",
        f"Measured by `benchmarks/first_conv.py` on {os.cpu_count()} core(s) of "
        f"{host_cpu()}: "
        f"{FLAGS.rounds} interleaved rounds of {FLAGS.runs} invokes per model "
        "(`edgeqat.latency`, XNNPACK, batch 1), random initial weights, int8 by PTQ. A speed "
        "cell is int8's speed relative to float (above 1x: int8 is faster), the median of "
        "per-round ratios with their range; us are medians of per-round medians.",
        "",
        "First convolution alone, by input channels:",
        "",
        "| first layer | input channels | float us (1 thread) | int8 us (1 thread) | "
        "int8 speed, 1 thread | int8 speed, 2 threads |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in sweep_rows:
        one, two = r["threads"]["1"], r["threads"]["2"]
        op = "Conv2D 3x3, 8x8, 32 filters" if r["model"] == "digits_dscnn" else \
            "Conv1D k5 s2, length 40, 64 filters"
        lines.append(f"| {r['model']} ({op}) | {r['input_channels']} | {one['float_us']:.2f} "
                     f"| {one['int8_us']:.2f} | {_cell(one)} | {_cell(two)} |")
    lines += ["", "Each layer alone, the whole model, and a one-op model (1 thread):", "",
              "| model | layer | op | shape | float us | int8 us | int8 speed |",
              "|---|---|---|---|---:|---:|---:|"]
    for r in layer_rows:
        lines.append(f"| {r['model']} | {r['layer']} | {r['op']} | {r['shape']} | "
                     f"{r['float_us']:.2f} | {r['int8_us']:.2f} | {_cell(r)} |")
    lines += ["", reading(sweep_rows, layer_rows)]
    report.write_results(Path(FLAGS.out), {"first_conv": sweep_rows, "layers": layer_rows},
                         "\n".join(lines) + "\n", indent=2)
    print("\n".join(lines))


if __name__ == "__main__":
    app.run(main)
