"""keras.applications at deployed sizes: float, converter PTQ, plain tfmot QAT, edgeqat QAT.

    python benchmarks/applications.py [--models MobileNetV2_035_96,...] [--rounds 5]

For each model (random weights; BatchNorm statistics re-estimated on the calibration
batch first, since untouched statistics shrink deep activations to ~1e-9 and change which
kernels XNNPACK takes; biases drawn small and non-zero, as a trained model's are: the
converter drops an all-zero bias, which one QAT step makes non-zero, so zero biases would
compare a bias-free PTQ file with a biased QAT one) it builds four flatbuffers from the
same float model:

* ``float``: the converter's float model;
* ``ptq``: the converter's full-integer post-training quantization (int8 in and out);
* ``tfmot``: ``tfmot.quantization.keras.quantize_model``, one training step, converted
  (or the reason tfmot refused the model);
* ``edgeqat``: ``annotate_model`` with the uniform int8 policy, one training step,
  ``prepare_for_export``, converted and proven fully integer.

It reports bytes, op counts, QUANTIZE/DEQUANTIZE ops, the Keras-QAT vs TFLite agreement
of edgeqat's model on 16 inputs (end to end, and the worst op fed its own TFLite inputs,
``diagnostics.op_agreement``: random weights amplify rounding ties end to end), and
latency at 1 and 2 threads from one interleaved run (``edgeqat.latency``: per-round
medians; ratios are medians of per-round ratios with their range). Writes
benchmarks/results/applications.json and .md (quoted in the README).
Random weights say nothing about accuracy; they are what latency and size need.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edgeqat import (  # noqa: E402
    annotate,
    convert,
    diagnostics,
    export,
    inspect,
    latency,
    policy,
    report,
    train,
    validate,
)
from edgeqat.keras import keras, tf, tfmot  # noqa: E402

APPS = keras.applications
# name -> (builder, input size, inputs in pixel units [0, 255] (the model has its own
# preprocessing layers) or already normalized to [-1, 1])
MODELS = {
    "MobileNetV2_035_96": (lambda: APPS.MobileNetV2((96, 96, 3), alpha=0.35, weights=None),
                           96, False),
    "MobileNetV2_100_224": (lambda: APPS.MobileNetV2((224, 224, 3), weights=None), 224, False),
    "MobileNetV3Small": (lambda: APPS.MobileNetV3Small((224, 224, 3), weights=None), 224, True),
    "MobileNetV3Large": (lambda: APPS.MobileNetV3Large((224, 224, 3), weights=None), 224, True),
    "EfficientNetB0": (lambda: APPS.EfficientNetB0(weights=None), 224, True),
    "EfficientNetV2B0": (lambda: APPS.EfficientNetV2B0(weights=None), 224, True),
    "ResNet50": (lambda: APPS.ResNet50(weights=None), 224, False),
    "DenseNet121": (lambda: APPS.DenseNet121(weights=None), 224, False),
    "ConvNeXtTiny": (lambda: APPS.ConvNeXtTiny(weights=None), 224, True),
}
VARIANTS = ("float", "ptq", "tfmot", "edgeqat")


def calibration(size: int, pixels: bool, n: int, seed: int) -> np.ndarray:
    """Smooth random images (noise upsampled 8x), in pixels or in [-1, 1]."""
    rng = np.random.default_rng(seed)
    low = rng.uniform(-1, 1, (n, max(size // 8, 1), max(size // 8, 1), 3)).astype(np.float32)
    x = tf.image.resize(low, (size, size)).numpy()
    x = np.clip(x + 0.1 * rng.standard_normal(x.shape).astype(np.float32), -1, 1)
    return (x + 1) * 127.5 if pixels else x


def one_step(model: keras.Model, x: np.ndarray) -> float:
    classes = int(model.outputs[0].shape[-1])
    model.compile(keras.optimizers.SGD(1e-4),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=False))
    y = np.random.default_rng(1).integers(0, classes, len(x))
    return float(model.train_on_batch(x, y))


def op_counts(flat: bytes) -> dict:
    ops = Counter(op.name for op in inspect.list_ops(flat))
    return {"ops": int(sum(ops.values())), "quantize": ops.get("QUANTIZE", 0),
            "dequantize": ops.get("DEQUANTIZE", 0), "by_op": dict(sorted(ops.items()))}


def agreement(qat_model: keras.Model, flat: bytes, x: np.ndarray) -> dict:
    """edgeqat's Keras QAT model vs its flatbuffer on ``x`` (``validate.agreement``)."""
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_content=flat)
    interp.allocate_tensors()
    inp, out = interp.get_input_details()[0], interp.get_output_details()[0]
    (s_in, z_in), (s_out, z_out) = inp["quantization"], out["quantization"]
    outputs = []
    for i in range(len(x)):
        interp.set_tensor(inp["index"], np.clip(np.round(x[i:i + 1] / s_in + z_in), -128,
                                                127).astype(np.int8))
        interp.invoke()
        outputs.append((interp.get_tensor(out["index"]).astype(np.float32) - z_out) * s_out)
    keras_out = qat_model.predict(x, batch_size=8, verbose=0)
    whole = validate.agreement(keras_out, np.concatenate(outputs), s_out).to_dict()
    # Op by op (each op fed its own TFLite inputs): what the simulation gets right, apart
    # from how far a random-weight network amplifies rounding ties end to end.
    local = diagnostics.op_agreement(flat, qat_model, x[:2])
    return {**whole, "op_max_steps": max(a.max_steps for a in local), "ops_checked": len(local)}


def trained_biases(model: keras.Model, seed: int = 0) -> None:
    """Small non-zero biases (N(0, 0.01)) where the random initialisation left zeros."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        bias = getattr(layer, "bias", None)
        if bias is not None and not np.any(bias.numpy()):
            bias.assign(0.01 * rng.standard_normal(bias.shape).astype(np.float32))


def build(name: str, n_calib: int) -> tuple[dict, dict, dict]:
    """The four flatbuffers of ``name``, notes (tfmot's refusal, stage seconds) and the
    agreement of edgeqat's Keras QAT model with its flatbuffer."""
    builder, size, pixels = MODELS[name]
    keras.utils.set_random_seed(0)
    model = builder()
    trained_biases(model)
    x = calibration(size, pixels, n_calib, seed=0)
    train.reestimate_batchnorm(model, x)
    flats, seconds = {}, {}
    notes = {"seconds": seconds}
    t = time.perf_counter()
    flats["float"] = convert.to_tflite(model, "float")
    flats["ptq"] = convert.to_tflite(model, "int8", calibration=x, qat=False)
    seconds["float+ptq"] = time.perf_counter() - t

    t = time.perf_counter()
    try:
        tq = tfmot.quantization.keras.quantize_model(model)
    except Exception as e:  # noqa: BLE001 - the reason goes into the table
        notes["tfmot"] = f"refused: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
    else:
        one_step(tq, x[:4])
        flats["tfmot"] = convert.to_tflite(tq, "int8", calibration=x, qat=True)
    seconds["tfmot"] = time.perf_counter() - t

    t = time.perf_counter()
    qat = annotate.annotate_model(model, policy.uniform(), sample_x=x)
    one_step(qat, x[:4])
    qat = export.prepare_for_export(qat)
    flats["edgeqat"] = convert.to_tflite(qat, "int8", calibration=x, qat=True)
    inspect.require_full_integer(flats["edgeqat"], f"{name} edgeqat int8")
    seconds["edgeqat"] = time.perf_counter() - t
    return flats, notes, agreement(qat, flats["edgeqat"], calibration(size, pixels, 16, 7))


def fmt_ratio(r: dict) -> str:
    return f"{r['median']:.2f} ({r['min']:.2f}-{r['max']:.2f})"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--runs", type=int, default=10, help="invokes per model per round")
    p.add_argument("--calibration", type=int, default=16, help="calibration images")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "applications"))
    p.add_argument("--update", action="store_true",
                   help="re-measure only --models and keep the other rows of --out (each "
                        "row's ratios come from its own interleaved run); the header "
                        "names the rows measured later")
    args = p.parse_args(argv)
    names = args.models.split(",")
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        raise SystemExit(f"--models: unknown {unknown}; known: {', '.join(MODELS)}")
    rows = []
    for name in names:
        t0 = time.perf_counter()
        flats, notes, agree = build(name, args.calibration)
        times = latency.interleaved(flats, threads=(1, 2), rounds=args.rounds, runs=args.runs)
        row = {"model": name, "notes": notes, "agreement": agree, "variants": {}}
        for v, flat in flats.items():
            row["variants"][v] = {
                "bytes": len(flat), **op_counts(flat),
                "latency_us": {t: times[v][t].median_us for t in (1, 2)},
                "spread": {t: times[v][t].spread for t in (1, 2)}}
        ratios = {}
        for t in (1, 2):
            e = times["edgeqat"][t]
            ratios[t] = {"vs_float": latency.ratio(e, times["float"][t]),
                         "vs_ptq": latency.ratio(e, times["ptq"][t])}
            if "tfmot" in times:
                ratios[t]["vs_tfmot"] = latency.ratio(e, times["tfmot"][t])
        row["edgeqat_time_ratio"] = ratios
        row["wall_s"] = time.perf_counter() - t0
        rows.append(row)
        print(name, notes["seconds"], {v: (x["bytes"], x["quantize"], x["latency_us"])
                     for v, x in row["variants"].items()}, ratios[1], flush=True)

    rows = json.loads(json.dumps(rows))  # as stored: thread counts are string keys
    later = []
    if args.update:
        kept = json.loads(Path(args.out).with_suffix(".json").read_text())
        fresh = {r["model"]: r for r in rows}
        later = [r["model"] for r in rows]
        rows = [fresh.get(r["model"], r) for r in kept] + \
            [r for r in rows if r["model"] not in {k["model"] for k in kept}]
        for r in rows:
            r["later_run"] = r["model"] in later or r.get("later_run", False)
        later = [r["model"] for r in rows if r["later_run"]]
    lines = [
        "| model | float ms (1t) | edgeqat/float time 1t | 2t | edgeqat/PTQ 1t | 2t "
        "| edgeqat/tfmot 1t | 2t | bytes edgeqat / PTQ / tfmot | ops edgeqat / PTQ "
        "| QUANTIZE+DEQUANTIZE edgeqat / PTQ / tfmot | Keras/TFLite top-1, max steps "
        "| worst op, steps (ops checked) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        v, q = r["variants"], r["edgeqat_time_ratio"]
        tf_ = v.get("tfmot")

        def qd(x):
            return "-" if x is None else str(x["quantize"] + x["dequantize"])

        lines.append(
            f"| {r['model']} | {v['float']['latency_us']['1'] / 1e3:.2f} | "
            f"{fmt_ratio(q['1']['vs_float'])} | {fmt_ratio(q['2']['vs_float'])} | "
            f"{fmt_ratio(q['1']['vs_ptq'])} | {fmt_ratio(q['2']['vs_ptq'])} | "
            + (f"{fmt_ratio(q['1']['vs_tfmot'])} | {fmt_ratio(q['2']['vs_tfmot'])} | "
               if tf_ else "refused | refused | ")
            + f"{v['edgeqat']['bytes']:,} / {v['ptq']['bytes']:,} / "
            f"{format(tf_['bytes'], ',') if tf_ else '-'} | "
            f"{v['edgeqat']['ops']} / {v['ptq']['ops']} | "
            f"{qd(v['edgeqat'])} / {qd(v['ptq'])} / {qd(tf_)} | "
            f"{100 * r['agreement']['top1']:.0f}%, {r['agreement']['max_abs_steps']:.1f} | "
            f"{r['agreement']['op_max_steps']:.1f} ({r['agreement']['ops_checked']}) |")
    header = (
        f"Measured by `benchmarks/applications.py` on {os.cpu_count()} core(s) of "
        f"{latency.host_cpu()}: LiteRT "
        "(XNNPACK), batch 1, random weights with BatchNorm statistics re-estimated on the "
        f"calibration images; {args.rounds} interleaved rounds of {args.runs} invokes per "
        "model and thread count. Time ratios below 1 mean edgeqat's int8 file is faster; "
        "each is the median of the per-round ratios, with their range in brackets."
        + (f" Re-measured in a later run on the same machine (`--update`): "
           f"{', '.join(later)}." if later else "") + "\n\n")
    refusals = [f"- {r['model']}: tfmot {r['notes']['tfmot']}" for r in rows
                if "tfmot" in r["notes"]]
    body = header + "\n".join(lines) + "\n" + ("\n" + "\n".join(refusals) + "\n"
                                                if refusals else "")
    report.write_results(Path(args.out), rows, body, indent=1)
    print(body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
