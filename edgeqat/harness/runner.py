#!/usr/bin/env python3
"""Standalone TFLite runner: copy this one file to a device and run it there.

Needs only numpy plus one of ai_edge_litert, tflite_runtime or tensorflow. It never
imports edgeqat.

    python3 runner.py --model m.tflite --inputs in.npz --result result.json \
        [--outputs out.npz] [--runtime auto] [--delegate xnnpack] [--num_threads 1] \
        [--warmup 5] [--runs 50] [--device usb] [--expect_sha256 HEX] [--allow_cpu_fallback]
    python3 runner.py --probe [--runtime auto] [--delegate edgetpu] [--device usb]
    python3 runner.py --lm --model lm.tflite --inputs windows.npz --result result.json \
        [--outputs out.npz] [--decode_windows 2] [--threads 1,2] [--max_new_tokens 64]
    python3 runner.py --generate "def " --model lm.tflite [--max_new_tokens 64]

Language models (``--lm``, ``--generate``) are byte-level decoders with ``prefill`` and
``decode`` signatures (edgeqat's tinylm export). ``--lm`` runs teacher-forced prefill on
every window of ``windows`` (int32, [N, context + 1]) and, for the first
``--decode_windows``, the decode loop over the same tokens; times prefill and decode
tokens per second at each thread count; greedily continues ``prompt`` (int32 tokens) for
``--max_new_tokens``. ``out.npz`` holds ``prefill`` and ``decode`` (raw logits) and
``generated``. ``--generate`` prints the continuation of a text prompt.

``in.npz`` holds ``x`` (float samples, batch first) and optionally ``y`` (labels).
Float inputs are quantized with the model's input scale and zero point; outputs are
dequantized. ``result.json`` holds the runtime and its version, the delegate actually
applied, the CPU, the model's sha256 as read here, latency (min / median / p90 over
``--runs`` invokes after ``--warmup``), and accuracy when labels are given. ``out.npz``
holds ``outputs`` (dequantized float) and ``raw`` (as the model produced them).
``--probe`` only imports the runtime and loads the delegate, and prints JSON to stdout.
Exit status: 0 ok, 2 bad input (including a sha256 mismatch), 3 runtime or delegate
missing; a crash exits 1 with a traceback on stderr.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import time

import numpy as np

RUNTIMES = ("ai_edge_litert", "tflite_runtime", "tensorflow")
DELEGATES = ("xnnpack", "none", "edgetpu", "gpu")
EDGETPU_LIBS = {"Linux": "libedgetpu.so.1", "Darwin": "libedgetpu.1.dylib",
                "Windows": "edgetpu.dll"}
GPU_LIBS = ("libtensorflowlite_gpu_delegate.so",)


class RunnerError(Exception):
    def __init__(self, message: str, code: int = 2):
        super().__init__(message)
        self.code = code


def _import_runtime(name: str):
    """Returns (module with Interpreter/load_delegate, runtime name, version)."""
    names = RUNTIMES if name == "auto" else (name,)
    errors = []
    for n in names:
        try:
            if n == "ai_edge_litert":
                import ai_edge_litert as pkg
                from ai_edge_litert import interpreter as mod

                version = getattr(pkg, "__version__", None) or _dist_version("ai-edge-litert")
            elif n == "tflite_runtime":
                import tflite_runtime as pkg
                from tflite_runtime import interpreter as mod

                version = getattr(pkg, "__version__", None) or _dist_version("tflite-runtime")
            else:
                import tensorflow as tf

                mod, version = tf.lite, tf.__version__
                if not hasattr(mod, "experimental"):
                    raise ImportError("tensorflow has no tf.lite")
            return mod, n, version
        except Exception as e:  # an ImportError, or numpy ABI errors (tflite_runtime)
            errors.append(f"{n}: {type(e).__name__}: {e}")
    raise RunnerError("no TFLite runtime could be imported (" + "; ".join(errors) + ")", 3)


def _dist_version(dist: str) -> str:
    try:
        from importlib.metadata import version

        return version(dist)
    except Exception:
        return "unknown"


def _cpu() -> dict:
    info = {"machine": platform.machine(), "system": platform.system(),
            "python": platform.python_version(), "cores": os.cpu_count()}
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
        for key in ("model name", "Hardware", "Model", "CPU part"):
            for line in text.splitlines():
                if line.split(":")[0].strip() == key:
                    info[key.lower().replace(" ", "_")] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return info


def _delegate_missing(delegate: str, lib_errors: list[str], device: str | None) -> str:
    detail = "; ".join(lib_errors)
    if delegate == "edgetpu":
        return (f"edgetpu delegate unavailable: the Edge TPU delegate library "
                f"{EDGETPU_LIBS.get(platform.system(), 'libedgetpu.so.1')} or the Edge TPU "
                f"device{' ' + repr(device) if device else ''} is missing ({detail}); install "
                "libedgetpu1-std and plug in the accelerator, or allow CPU fallback")
    return (f"gpu delegate unavailable: no GPU delegate library ({', '.join(GPU_LIBS)}) could "
            f"be loaded by this runtime ({detail}); use a runtime build with the GPU "
            "delegate, or allow CPU fallback")


def _load_delegate(mod, runtime: str, delegate: str, device: str | None):
    """Loads the Edge TPU or GPU delegate; raises RunnerError (code 3) if it cannot."""
    load_delegate = mod.experimental.load_delegate if runtime == "tensorflow" else \
        mod.load_delegate
    if delegate == "edgetpu":
        libs = [EDGETPU_LIBS.get(platform.system(), "libedgetpu.so.1")]
        options = {"device": device} if device else {}
    else:
        libs, options = list(GPU_LIBS), {}
    errors = []
    for lib in libs:
        try:
            return load_delegate(lib, options)
        except (ValueError, OSError, RuntimeError) as e:
            errors.append(f"{lib}: {str(e).strip().splitlines()[0] if str(e).strip() else e}")
    raise RunnerError(_delegate_missing(delegate, errors, device), 3)


def _make_interpreter(mod, runtime: str, model: bytes, delegate: str, threads: int,
                      device: str | None, allow_fallback: bool):
    """Builds an interpreter with the requested delegate; returns (interp, applied, note)."""
    if runtime == "tensorflow":
        Interpreter = mod.Interpreter
        resolver = mod.experimental.OpResolverType
    else:
        Interpreter = mod.Interpreter
        resolver = mod.OpResolverType
    kwargs = {"model_content": model, "num_threads": threads}
    note = ""
    if delegate in ("edgetpu", "gpu"):
        try:
            d = _load_delegate(mod, runtime, delegate, device)
            return Interpreter(experimental_delegates=[d], **kwargs), delegate, note
        except RunnerError as e:
            if not allow_fallback:
                raise
            note = f"{e}; fell back to the CPU (XNNPACK)"
            delegate = "xnnpack"
    if delegate == "none":
        kwargs["experimental_op_resolver_type"] = resolver.BUILTIN_WITHOUT_DEFAULT_DELEGATES
        return Interpreter(**kwargs), "none", note
    return Interpreter(**kwargs), "xnnpack", note


def probe(args: argparse.Namespace) -> dict:
    """Checks the runtime and delegate without a model (a cheap pre-flight)."""
    mod, runtime, version = _import_runtime(args.runtime)
    applied, note = args.delegate, ""
    if args.delegate in ("edgetpu", "gpu"):
        try:
            _load_delegate(mod, runtime, args.delegate, args.device)
        except RunnerError as e:
            if not args.allow_cpu_fallback:
                raise
            applied, note = "xnnpack", f"{e}; fell back to the CPU (XNNPACK)"
    return {"runtime": runtime, "runtime_version": version, "delegate_requested": args.delegate,
            "delegate_applied": applied, "delegate_note": note, "cpu": _cpu()}


def _quantize(x: np.ndarray, detail: dict) -> np.ndarray:
    dtype = detail["dtype"]
    if np.issubdtype(dtype, np.floating):
        return x.astype(dtype)
    scale, zero = detail["quantization"]
    if scale == 0:
        return x.astype(dtype)
    info = np.iinfo(dtype)
    return np.clip(np.round(x / scale + zero), info.min, info.max).astype(dtype)


def _dequantize(y: np.ndarray, detail: dict) -> np.ndarray:
    scale, zero = detail["quantization"]
    if np.issubdtype(y.dtype, np.floating) or scale == 0:
        return y.astype(np.float32)
    return ((y.astype(np.float32) - zero) * scale).astype(np.float32)


def _percentiles(times: list[float]) -> dict:
    t = np.asarray(times) * 1e3
    return {"min_ms": float(t.min()), "median_ms": float(np.median(t)),
            "p90_ms": float(np.percentile(t, 90)), "mean_ms": float(t.mean()),
            "runs": len(times)}


def run(args: argparse.Namespace) -> dict:
    try:
        with open(args.model, "rb") as f:
            model = f.read()
    except OSError as e:
        raise RunnerError(f"{args.model}: cannot read model ({e.strerror})") from None
    sha = hashlib.sha256(model).hexdigest()
    if args.expect_sha256 and args.expect_sha256 != sha:
        raise RunnerError(f"{args.model}: sha256 on the device is {sha}, host sent "
                          f"{args.expect_sha256}; refusing a corrupted or different model")
    try:
        with np.load(args.inputs, allow_pickle=False) as f:
            x = f["x"]
            y = f["y"] if "y" in f.files else None
    except (OSError, KeyError, ValueError) as e:
        raise RunnerError(f"{args.inputs}: needs an .npz with array 'x' ({e})") from None

    mod, runtime, version = _import_runtime(args.runtime)
    try:
        interp, applied, note = _make_interpreter(
            mod, runtime, model, args.delegate, args.num_threads, args.device,
            args.allow_cpu_fallback)
        interp.allocate_tensors()
    except RunnerError:
        raise
    except (ValueError, RuntimeError) as e:
        raise RunnerError(f"{args.model}: the interpreter refused the model: {e}", 3) from None
    inp = interp.get_input_details()[0]
    outs = interp.get_output_details()
    if tuple(inp["shape"][1:]) != tuple(x.shape[1:]):
        raise RunnerError(f"{args.inputs}: samples have shape {list(x.shape[1:])}, the model "
                          f"expects {[int(s) for s in inp['shape'][1:]]}")

    def invoke(sample: np.ndarray) -> list[np.ndarray]:
        interp.set_tensor(inp["index"], sample)
        interp.invoke()
        return [interp.get_tensor(o["index"]) for o in outs]

    xq = _quantize(x, inp)
    per_sample = [invoke(xq[i:i + 1]) for i in range(len(xq))]
    raw = [np.concatenate(r) for r in zip(*per_sample)]  # noqa: B905 (runs on Python 3.9)
    outputs = [_dequantize(r, o) for r, o in zip(raw, outs)]  # noqa: B905

    for i in range(args.warmup):
        invoke(xq[i % len(xq): i % len(xq) + 1])
    times = []
    for i in range(args.runs):
        s = xq[i % len(xq): i % len(xq) + 1]
        t0 = time.perf_counter()
        invoke(s)
        times.append(time.perf_counter() - t0)

    result = {
        "model": os.path.basename(args.model),
        "model_sha256": sha,
        "model_bytes": len(model),
        "runtime": runtime,
        "runtime_version": version,
        "delegate_requested": args.delegate,
        "delegate_applied": applied,
        "delegate_note": note,
        "num_threads": args.num_threads,
        "cpu": _cpu(),
        "samples": int(len(x)),
        "input": {"dtype": np.dtype(inp["dtype"]).name,
                  "shape": [int(s) for s in inp["shape"]],
                  "scale": float(inp["quantization"][0]),
                  "zero_point": int(inp["quantization"][1])},
        "outputs": [{"dtype": np.dtype(o["dtype"]).name, "shape": [int(s) for s in o["shape"]],
                     "scale": float(o["quantization"][0]),
                     "zero_point": int(o["quantization"][1])} for o in outs],
        "latency": _percentiles(times),
    }
    if y is not None:
        pred = outputs[0].reshape(len(x), -1).argmax(-1)
        result["accuracy"] = float((pred == y.reshape(-1)).mean())
    if args.outputs:
        tmp = args.outputs + ".tmp.npz"
        np.savez(tmp, outputs=outputs[0], raw=raw[0])
        os.replace(tmp, args.outputs)
    return result


# ---------------------------------------------------------------- language models

def _lm_signatures(interp):
    sigs = interp.get_signature_list()
    if "prefill" not in sigs or "decode" not in sigs:
        raise RunnerError(f"the model has signatures {sorted(sigs)}; a language model needs "
                          "'prefill' and 'decode'")
    return interp.get_signature_runner("prefill"), interp.get_signature_runner("decode")


def empty_cache(decode) -> dict:
    """The decode signature's cache inputs, all holding zero (their zero point)."""
    cache = {}
    for name, d in decode.get_input_details().items():
        if name.startswith("kv_cache"):
            cache[name] = _quantize(np.zeros(d["shape"], np.float32), d)
    return cache


def decode_step(decode, token: int, pos: int, cache: dict):
    """One decode call: returns (raw logits [vocab], the updated cache)."""
    out = decode(tokens=np.array([[token]], np.int32), input_pos=np.array([pos], np.int32),
                 **cache)
    return out["logits"].reshape(-1), {k: out[k] for k in cache}


def generate(decode, prompt, max_new_tokens: int, context: int) -> list:
    """Greedy continuation of ``prompt`` (token ids) with the decode signature only.

    The prompt is fed one token at a time (positions 0..P-1), then each argmax is fed
    back, until ``max_new_tokens`` or the end of the context (the KV cache's length).
    """
    prompt = [int(t) for t in prompt]
    if not prompt:
        raise RunnerError("the prompt has no tokens; give at least one character")
    if len(prompt) >= context:
        raise RunnerError(f"the prompt has {len(prompt)} tokens, the model's context is "
                          f"{context}; shorten it")
    cache = empty_cache(decode)
    logits = None
    for pos, tok in enumerate(prompt):
        logits, cache = decode_step(decode, tok, pos, cache)
    out = []
    for pos in range(len(prompt), min(context, len(prompt) + max_new_tokens)):
        tok = int(np.argmax(logits))
        out.append(tok)
        logits, cache = decode_step(decode, tok, pos, cache)
    return out


def _lm_context(prefill) -> int:
    return int(prefill.get_input_details()["tokens"]["shape"][1])


def _open_lm(args, threads: int):
    with open(args.model, "rb") as f:
        model = f.read()
    mod, runtime, version = _import_runtime(args.runtime)
    try:
        interp, applied, note = _make_interpreter(mod, runtime, model, args.delegate, threads,
                                                  args.device, args.allow_cpu_fallback)
    except (ValueError, RuntimeError) as e:
        raise RunnerError(f"{args.model}: the interpreter refused the model: {e}", 3) from None
    return model, runtime, version, interp, applied, note


def run_lm(args: argparse.Namespace) -> dict:
    """Teacher-forced logits, decode-loop logits, speed and a generated sample."""
    threads = [int(t) for t in str(args.threads).split(",") if t.strip()]
    model, runtime, version, interp, applied, note = _open_lm(args, threads[0])
    sha = hashlib.sha256(model).hexdigest()
    if args.expect_sha256 and args.expect_sha256 != sha:
        raise RunnerError(f"{args.model}: sha256 on the device is {sha}, host sent "
                          f"{args.expect_sha256}; refusing a corrupted or different model")
    with np.load(args.inputs, allow_pickle=False) as f:
        windows = f["windows"].astype(np.int32)
        prompt = f["prompt"].astype(np.int32) if "prompt" in f.files else windows[0, :8]
    prefill, decode = _lm_signatures(interp)
    ctx = _lm_context(prefill)
    if windows.shape[1] < ctx:
        raise RunnerError(f"{args.inputs}: windows of {windows.shape[1]} tokens, the model's "
                          f"context is {ctx}")
    pre = np.stack([prefill(tokens=w[None, :ctx])["logits"][0] for w in windows])
    dec = []
    for w in windows[: args.decode_windows]:
        cache, rows = empty_cache(decode), []
        for pos in range(ctx):
            logits, cache = decode_step(decode, int(w[pos]), pos, cache)
            rows.append(logits)
        dec.append(np.stack(rows))
    dec = np.stack(dec) if dec else np.zeros((0,) + pre.shape[1:], pre.dtype)
    generated = generate(decode, prompt, args.max_new_tokens, ctx)
    logits_detail = prefill.get_output_details()["logits"]
    speed = {}
    for t in threads:
        if t == threads[0]:
            p_run, d_run = prefill, decode
        else:
            p_run, d_run = _lm_signatures(_open_lm(args, t)[3])
        for _ in range(args.warmup):
            p_run(tokens=windows[:1, :ctx])
        times, dtimes = [], []
        for _ in range(3):  # interleaved passes: load changes hit prefill and decode alike
            for i in range(max(3, args.runs // 10)):
                t0 = time.perf_counter()
                p_run(tokens=windows[i % len(windows)][None, :ctx])
                times.append(time.perf_counter() - t0)
            cache = empty_cache(d_run)
            for pos in range(min(ctx, max(8, args.runs))):
                t0 = time.perf_counter()
                _, cache = decode_step(d_run, int(windows[0, pos]), pos, cache)
                dtimes.append(time.perf_counter() - t0)
        speed[str(t)] = {"prefill_tokens_per_s": ctx / float(np.median(times)),
                         "decode_tokens_per_s": 1.0 / float(np.median(dtimes)),
                         "prefill_ms": _percentiles(times), "decode_ms": _percentiles(dtimes)}
    if args.outputs:
        tmp = args.outputs + ".tmp.npz"
        np.savez(tmp, prefill=pre, decode=dec, generated=np.asarray(generated, np.int32))
        os.replace(tmp, args.outputs)
    return {"model": os.path.basename(args.model), "model_sha256": sha,
            "model_bytes": len(model), "runtime": runtime, "runtime_version": version,
            "delegate_requested": args.delegate, "delegate_applied": applied,
            "delegate_note": note, "cpu": _cpu(), "context": ctx,
            "windows": int(len(windows)), "decode_windows": int(len(dec)),
            "logits": {"dtype": np.dtype(logits_detail["dtype"]).name,
                       "scale": float(logits_detail["quantization"][0]),
                       "zero_point": int(logits_detail["quantization"][1])},
            "speed": speed, "generated": [int(t) for t in generated]}


def generate_text(args: argparse.Namespace) -> str:
    """``--generate``: the continuation of a UTF-8 prompt, as text."""
    interp = _open_lm(args, args.num_threads)[3]
    prefill, decode = _lm_signatures(interp)
    tokens = generate(decode, list(args.generate.encode("utf-8")), args.max_new_tokens,
                      _lm_context(prefill))
    return bytes(tokens).decode("utf-8", errors="replace")


def _quiet_failed_delegates() -> None:
    """A failed load_delegate leaves a half-built Delegate whose __del__ raises
    AttributeError (ai_edge_litert 2.3, tflite_runtime 2.14); keep stderr to real errors."""
    default = sys.unraisablehook

    def hook(u):
        if isinstance(u.exc_value, AttributeError) and "_library" in str(u.exc_value):
            return
        default(u)

    sys.unraisablehook = hook


def main(argv: list[str] | None = None) -> int:
    _quiet_failed_delegates()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model")
    p.add_argument("--inputs")
    p.add_argument("--result", help="JSON file to write")
    p.add_argument("--outputs", help="optional .npz of model outputs")
    p.add_argument("--runtime", default="auto", choices=("auto",) + RUNTIMES)
    p.add_argument("--delegate", default="xnnpack", choices=DELEGATES)
    p.add_argument("--device", default=None, help="Edge TPU device, e.g. usb or pci:0")
    p.add_argument("--num_threads", type=int, default=1)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--runs", type=int, default=50)
    p.add_argument("--expect_sha256", default=None)
    p.add_argument("--allow_cpu_fallback", action="store_true")
    p.add_argument("--probe", action="store_true",
                   help="only check runtime and delegate; print JSON to stdout")
    p.add_argument("--lm", action="store_true", help="a language model (see above)")
    p.add_argument("--decode_windows", type=int, default=2)
    p.add_argument("--threads", default="1", help="LM speed at each count, e.g. 1,2")
    p.add_argument("--max_new_tokens", type=int, default=64)
    p.add_argument("--generate", default=None, metavar="PROMPT",
                   help="print the model's greedy continuation of PROMPT")
    args = p.parse_args(argv)
    if args.generate is not None and not args.model:
        p.error("--generate needs --model")
    if not args.probe and args.generate is None and not (args.model and args.inputs
                                                         and args.result):
        p.error("--model, --inputs and --result are required (unless --probe or --generate)")
    try:
        if args.probe:
            print(json.dumps(probe(args)))
            return 0
        if args.generate is not None:
            print(args.generate + generate_text(args))
            return 0
        result = run_lm(args) if args.lm else run(args)
    except RunnerError as e:
        print(f"runner: {e}", file=sys.stderr)
        return e.code
    tmp = args.result + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1)
    os.replace(tmp, args.result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
