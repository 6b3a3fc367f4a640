"""Runs the shipped pipelines end to end and writes the results table the README quotes.

    python benchmarks/pipelines.py [--pipelines NAME,...]  (default: all four in pipelines/)

Writes benchmarks/results/pipelines.md and .json: float / PTQ / QAT accuracy on the same
evaluation set, sizes, Keras-vs-TFLite agreement, and speed ratios. After each run the
float, PTQ and QAT flatbuffers it made (the files the CLI writes as <name>.tflite) are
timed side by side on this machine with ``edgeqat.latency.interleaved`` at 1 and 2
threads; a ratio is the median of per-round ratios, with their range (absolute
microseconds depend on the machine). On an emulated device no speed is reported.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from absl import app, flags

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from edgeqat import latency, modes, report  # noqa: E402
from edgeqat.pipeline import resolve_configs, run  # noqa: E402

flags.DEFINE_list("pipelines", ["digits_dscnn", "mnist1d_cnn", "digits_dscnn_int16x8",
                                "mnist1d_lsq_int4"],
                  "Pipelines to run.")
flags.DEFINE_string("device", "local_cpu", "Device profile.")
flags.DEFINE_integer("rounds", 15, "Interleaved timing rounds per thread count.")
flags.DEFINE_integer("runs", 200, "Invokes per model per round.")
flags.DEFINE_string("out", str(Path(__file__).parent / "results" / "pipelines"),
                    "Output path without extension.")
FLAGS = flags.FLAGS
THREADS = (1, 2)
SPEED_COLUMNS = (("qat_over_float", "QAT/float speed"), ("qat_over_ptq", "QAT/PTQ speed"))


def speed_ratios(tflites: dict[str, bytes], row: modes.ModeSpec) -> dict:
    """QAT's speed relative to float and to PTQ (above 1: QAT is faster), per thread count.

    Returns:
      {"1": {"qat_over_float": {"median", "min", "max"}, "qat_over_ptq": ...}, "2": ...}.
    """
    t = latency.interleaved({"float": tflites[modes.FLOAT], "ptq": tflites[row.ptq_name],
                             "qat": tflites[row.qat_name]}, threads=THREADS,
                            rounds=FLAGS.rounds, runs=FLAGS.runs)
    return {str(n): {"qat_over_float": latency.ratio(t["float"][n], t["qat"][n]),
                     "qat_over_ptq": latency.ratio(t["ptq"][n], t["qat"][n]),
                     "qat_median_us": t["qat"][n].median_us}
            for n in THREADS}


def _ratio_cell(r: dict) -> str:
    return f"{r['median']:.2f}x ({r['min']:.2f}-{r['max']:.2f})"


def main(argv):
    del argv
    rows = []
    for name in FLAGS.pipelines:
        cfg, dev = resolve_configs(name, FLAGS.device)
        emulated = dev.connection.kind == "qemu"
        start = time.perf_counter()
        result = run(cfg, dev)
        wall_s = time.perf_counter() - start
        r = result.report
        mode = r["pipeline"]["mode"]
        row = modes.spec(mode)
        acc, size = r["accuracy"], r["size_bytes"]
        rows.append({
            "pipeline": name, "mode": mode, "data": r["data"]["name"],
            "eval_samples": r["data"]["test"],
            "float": acc["float_keras"], "ptq": acc[row.ptq_name], "qat": acc[row.qat_name],
            "qat_drop_points": 100 * r["budget"]["qat_drop_vs_float"],
            "agreement_top1": r["agreement"][row.qat_name]["top1"],
            "float_kib": size["float"] / 1024, "qat_kib": size[row.qat_name] / 1024,
            "size_ratio": size[row.qat_name] / size["float"],
            "full_integer": r["ops"]["full_integer"],
            "wall_s": wall_s,  # the pipeline run, without the timing below
        })
        if not emulated:  # what ships (row.qat_name) against float and PTQ, on this host
            rows[-1]["speed"] = speed_ratios(result.tflites, row)
        if r["device_vs_host"]:  # a remote or emulated device: its outputs against ours
            rows[-1]["device_vs_host"] = r["device_vs_host"]
    speed_heads = [] if emulated else [f"{text}, {n} thread{'s' if n > 1 else ''}"
                                        for _, text in SPEED_COLUMNS for n in THREADS]
    lines = [
        "| pipeline | data (eval n) | float | PTQ | QAT | QAT drop | Keras/TFLite top-1 "
        "| size QAT/float | " + "".join(f"{h} | " for h in speed_heads)
        + "full integer | wall |",
        "|---|---|---:|---:|---:|---:|---:|---:|" + "---:|" * len(speed_heads) + ":---:|---:|",
    ]
    for x in rows:
        speed = "" if emulated else "".join(
            f"{_ratio_cell(x['speed'][str(n)][key])} | " for key, _ in SPEED_COLUMNS
            for n in THREADS)
        lines.append(
            f"| {x['pipeline']} ({x['mode']}) | {x['data']} ({x['eval_samples']}) | "
            f"{100 * x['float']:.2f}% | {100 * x['ptq']:.2f}% | {100 * x['qat']:.2f}% | "
            f"{x['qat_drop_points']:+.2f} pt | {100 * x['agreement_top1']:.2f}% | "
            f"{x['size_ratio']:.2f} ({x['qat_kib']:.1f}/{x['float_kib']:.1f} KiB) | "
            f"{speed}{'yes' if x['full_integer'] else 'NO'} | {x['wall_s']:.0f} s |")
    speed_text = (
        "Speed: the run's float, PTQ and QAT flatbuffers timed on this machine in "
        f"{FLAGS.rounds} interleaved rounds of {FLAGS.runs} invokes each (`edgeqat.latency`, "
        "XNNPACK, batch 1); a cell is QAT's speed relative to float or PTQ (above 1x: QAT "
        "is faster), the median of the per-round ratios with their range. int8 against "
        "float layer by layer: `benchmarks/results/first_conv.md`. Timings need a machine "
        "doing nothing else: run beside another TensorFlow job, even these ratios move.")
    if emulated:
        speed_text = ("The device is emulated: accuracy and outputs are the device's; speed "
                      "under emulation says nothing about a real one, so none is reported.")
    device_lines = [
        f"- {x['pipeline']}, `{name}`: {100 * c['device_accuracy']:.2f}% on the device, "
        f"{100 * c['host_accuracy']:.2f}% on this host; top-1 agreement "
        f"{100 * c['top1_agreement']:.2f}%, " + (
            "outputs identical" if c["identical"] else
            f"{100 * c['mismatched_fraction']:.2f}% of outputs differ, by at most "
            f"{c['max_abs_steps']:.0f} step(s)") + f" ({c['samples']} samples)"
        for x in rows for name, c in x.get("device_vs_host", {}).items()]
    device_text = ("\n\nThe same flatbuffers on the device and on this host:\n\n"
                   + "\n".join(device_lines)) if device_lines else ""
    header = (f"Measured by `benchmarks/pipelines.py` on {os.cpu_count()} core(s) of "
              f"{latency.host_cpu()}, device "
              f"profile `{FLAGS.device}` ({dev.num_threads} thread"
              f"{'s' if dev.num_threads > 1 else ''}). {speed_text}\n\n")
    body = header + "\n".join(lines) + device_text + "\n"
    report.write_results(Path(FLAGS.out), rows, body, indent=2)
    print(body)


if __name__ == "__main__":
    app.run(main)
