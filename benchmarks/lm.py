"""The language-model table: float, dynamic int8, PTQ and QAT at W8A8, W8A16 (16x8) and
W4A8, one run.

    python benchmarks/lm.py [--pipeline tinylm] [--pi]

Pre-trains the float model of ``pipelines/tinylm.toml`` once (the same seed, so the same
model as the pipeline's), then PTQ and QAT at each precision from it; runs every
flatbuffer on the local CPU through the harness (teacher-forced perplexity on the test
windows, top-1 agreement and KL against the float model, prefill and decode tokens/s at
1 and 2 threads, a greedy sample); with ``--pi`` also the QAT models on the emulated
Raspberry Pi 4 (``devices/rpi4_emulated.toml``), compared token for token with this
machine. Writes ``benchmarks/results/lm.json`` and ``lm.md`` (quoted in the README).
Speed ratios are from the same run; the machine is shared, so compare ratios, not
absolute tokens/s.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edgeqat import latency  # noqa: E402
from edgeqat.config import DEVICES_DIR, PIPELINES_DIR, DeviceConfig, load_device, load_pipeline  # noqa: E402
from edgeqat.lm import evaluate, flow, text  # noqa: E402

PRECISIONS = ({"weight_bits": 8}, {"weight_bits": 8, "activation_bits": 16}, {"weight_bits": 4})
SHIPPED = ("qat_w8a8", "qat_w8a16", "qat_w4a8")
ROUNDS = 3  # runs of every model on the local CPU; speed is the median of the rounds


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pipeline", default="tinylm")
    p.add_argument("--pi", action="store_true", help="also run the QAT models on the "
                   "emulated Raspberry Pi 4")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "lm"))
    args = p.parse_args(argv)
    cfg = load_pipeline(PIPELINES_DIR / f"{args.pipeline}.toml")
    started = time.perf_counter()
    seconds = {}

    from edgeqat.harness.device import run_lm_on_device
    from edgeqat.keras import keras
    from edgeqat.lm.model import LmPrecision

    keras.utils.set_random_seed(cfg.seed)
    data = text.load_text(cfg.data.path, cfg.lm.context)
    t = time.perf_counter()
    float_model, _ = flow.pretrain_float(cfg, data, None)
    seconds["float pre-training"] = time.perf_counter() - t
    tflites = flow.baselines(float_model)
    test = data.test[: cfg.lm.eval_windows]
    ctx = cfg.lm.context
    host = {"float": flow.keras_logits(float_model, test, ctx)}
    fidelity = {}
    pi_keras = {}
    for changes in PRECISIONS:
        precision = LmPrecision(**changes, head_bits=cfg.lm.head_bits,
                                score_margin=cfg.lm.score_margin, score_cap=cfg.lm.score_cap,
                                logit_span=cfg.lm.logit_span)
        t = time.perf_counter()
        ptq = flow.quantize_post_training(float_model, data, precision)
        tflites[ptq.ptq_name] = ptq.ptq_tflite
        q = flow.quantize_aware(ptq, float_model, data, cfg)
        tflites[q.name] = q.tflite
        host[q.name] = flow.keras_logits(q.model, test, ctx)
        if args.pi:  # the Keras model rounding as the Pi's kernels do
            pi_keras[q.name] = flow.keras_logits(q.model, test[:8], ctx, arch="aarch64")
        seconds[f"PTQ + QAT {precision.name}"] = time.perf_counter() - t
    prompt = text.encode(cfg.lm.prompt)
    with tempfile.TemporaryDirectory() as tmp:
        paths = {}
        for n, content in tflites.items():
            paths[n] = Path(tmp) / f"{n}.tflite"
            paths[n].write_bytes(content)
        t = time.perf_counter()
        rounds = [run_lm_on_device(DeviceConfig(), paths, test, prompt,
                                   decode_windows=cfg.lm.decode_windows if i == 0 else 0,
                                   max_new_tokens=cfg.lm.generate_tokens)
                  for i in range(ROUNDS)]
        runs = rounds[0]
        seconds["local CPU runs"] = time.perf_counter() - t
        pi = None
        if args.pi:
            t = time.perf_counter()
            shipped = {n: paths[n] for n in paths if n.startswith("qat_")}
            pi = run_lm_on_device(load_device(DEVICES_DIR / "rpi4_emulated.toml"), shipped,
                                  test[:8], prompt, decode_windows=1, threads=(1,), runs=8,
                                  max_new_tokens=cfg.lm.generate_tokens)
            seconds["emulated Pi runs"] = time.perf_counter() - t
    rows = flow.score_rows(runs, tflites, test[:, 1:ctx + 1], host["float"])
    for row in rows:  # speed: the median over the rounds, with the spread
        for th, sp in row["speed"].items():
            for key in list(sp):
                values = [r[row["name"]].info["speed"][th][key] for r in rounds]
                sp[key] = float(np.median(values))
                sp[key + "_spread"] = [float(min(values)), float(max(values))]
    for n, logits in host.items():
        if n.startswith("qat_"):
            fidelity[n] = flow.keras_vs_tflite(logits, runs[n])
    result = {"pipeline": cfg.name, "model": {**vars(flow.shape_for(cfg)),
                                              "parameters": float_model.parameter_count()},
              "data": data.summary(), "rows": rows, "keras_vs_tflite": fidelity,
              "samples": {"prompt": cfg.lm.prompt,
                          **{n: text.decode(r.info["generated"]) for n, r in runs.items()}},
              "cpu": runs["float"].info.get("cpu"), "host_cpu": latency.host_cpu(),
              "seconds": {k: round(v, 1) for k, v in seconds.items()},
              "total_s": round(time.perf_counter() - started, 1)}
    if pi is not None:
        result["rpi4_emulated"] = {
            n: {"same_generated_tokens": r.info["generated"] == runs[n].info["generated"],
                "prefill_identical": evaluate.step_agreement(r.outputs, runs[n].outputs[:8],
                                                             steps=0)["logits_within"],
                "keras_vs_tflite": flow.keras_vs_tflite(pi_keras[n], r),
                "generated": text.decode(r.info["generated"]),
                "runtime": f"{r.info['runtime']} {r.info['runtime_version']}",
                "cpu": r.info.get("cpu")}
            for n, r in pi.items()}
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    out.with_suffix(".md").write_text(to_markdown(result))
    print(to_markdown(result))
    return 0


def _steps(name: str, steps: int) -> str:
    """Output steps of the model's logits grid; an int16 grid's also as int8 steps of the
    same range (65534 / 254 int16 steps each)."""
    if not name.endswith("a16"):
        return f"{steps} steps"
    return f"{steps} int16 steps, {steps * 254 / 65534:.3f} of an int8 step"


def to_markdown(r: dict) -> str:
    from edgeqat.lm.report import table_rows

    m = r["model"]
    by = {row["name"]: row for row in r["rows"]}
    lines = ["### Language model: float, dynamic int8, PTQ and QAT (benchmarks/lm.py)", "",
             f"`pipelines/{r['pipeline']}.toml`: {m['layers']} layers, dim {m['dim']}, "
             f"context {m['context']}, {m['parameters']:,} parameters, byte tokens; "
             f"{r['rows'][0]['tokens']:,} test tokens of the built-in corpus "
             f"({r['data']['bytes']:,} bytes, sha256 `{r['data']['sha256'][:12]}…`). "
             f"Local CPU, {os.cpu_count()} core(s) of {r.get('host_cpu', 'an unnamed CPU')} "
             "(LiteRT, XNNPACK); all rows from one run; tokens/s are medians of "
             f"{ROUNDS} rounds.", "",
             *table_rows({"rows": r["rows"]}), ""]
    for n, f in r["keras_vs_tflite"].items():
        dv = by[n].get("decode_vs_prefill") or {}
        lines.append(f"- `{n}`: Keras QAT vs TFLite top-1 {100 * f['top1_agreement']:.2f}%, "
                     f"logits within 2 steps {100 * f['logits_within']:.2f}% (largest "
                     f"{_steps(n, f['max_steps'])}); decode vs prefill within 2 steps on "
                     f"{100 * dv.get('positions_within', 0):.2f}% of positions (largest "
                     f"{_steps(n, dv.get('max_steps', 0))}).")
    f8 = by.get("float", {}).get("speed", {}).get("1", {})
    for n in SHIPPED:
        if n in by and f8:
            sp = by[n]["speed"]["1"]
            lo = sp["decode_tokens_per_s_spread"][0] / f8["decode_tokens_per_s_spread"][1]
            hi = sp["decode_tokens_per_s_spread"][1] / f8["decode_tokens_per_s_spread"][0]
            ratio = sp["decode_tokens_per_s"] / f8["decode_tokens_per_s"]
            lines.append(f"- `{n}` decode speed at 1 thread: {ratio:.2f}x float's (medians of "
                         f"{ROUNDS} rounds; {lo:.2f}-{hi:.2f}x from the rounds' extremes).")
    for n, pi in (r.get("rpi4_emulated") or {}).items():
        lines.append(f"- Emulated Pi 4 (`{pi['runtime']}`), `{n}`: prefill logits identical "
                     f"to this machine's {100 * pi['prefill_identical']:.2f}%, generated "
                     f"tokens {'identical' if pi['same_generated_tokens'] else 'DIFFERENT'}"
                     + (f"; Keras QAT (rounding as the Pi's kernels) vs the Pi: top-1 "
                        f"{100 * pi['keras_vs_tflite']['top1_agreement']:.2f}%, logits within "
                        f"2 steps {100 * pi['keras_vs_tflite']['logits_within']:.2f}%"
                        if "keras_vs_tflite" in pi else "") + ".")
    lines += ["", "Greedy samples from the prompt `" + r["samples"]["prompt"] + "`:", ""]
    for n in ("float", *SHIPPED):
        if n in r["samples"]:
            lines += [f"`{n}`:", "```", r["samples"]["prompt"] + r["samples"][n], "```"]
    lines += ["", "Seconds: " + ", ".join(f"{k} {v}" for k, v in r["seconds"].items())
              + f"; total {r['total_s']}."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
