"""The language-model pipeline (``data.name = "text"``), the same stages as the CNN path:

data -> float pre-training -> baselines (float, dynamic int8, PTQ) -> QAT -> full-integer
export with ``prefill`` / ``decode`` -> every model on the device -> report.

``pipeline.run`` hands a text pipeline to ``run`` here; ``write_outputs`` writes what it
returns like any other run (the ``.tflite`` files, the float and QAT states as ``.npz``,
the configuration and the report).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from edgeqat.config import DeviceConfig, PipelineConfig
from edgeqat.errors import UserError
from edgeqat.lm import evaluate, text
from edgeqat.validate import target_arch

SPEED_THREADS = (1, 2)


def precision_for(cfg: PipelineConfig):
    from edgeqat.lm.model import LmPrecision

    mode = cfg.convert.mode
    return LmPrecision(weight_bits=4 if mode == "int4_weights" else 8,
                       activation_bits=16 if mode == "int16x8" else 8,
                       head_bits=cfg.lm.head_bits, score_margin=cfg.lm.score_margin,
                       score_cap=cfg.lm.score_cap, logit_span=cfg.lm.logit_span)


def shape_for(cfg: PipelineConfig):
    from edgeqat.lm.model import LmShape

    lm = cfg.lm
    return LmShape(context=lm.context, dim=lm.dim, layers=lm.layers, heads=lm.heads,
                   mlp_ratio=lm.mlp_ratio)


def read_state(path: str) -> dict[str, np.ndarray]:
    """A TinyLm state saved by a run (``lm_float.npz``), checked before any training."""
    p = Path(path)
    try:
        with np.load(p, allow_pickle=False) as f:
            state = {k: f[k] for k in f.files}
    except (OSError, ValueError) as e:
        raise UserError(f"model.path {p}: cannot read a language-model state ({e}); give "
                        "the lm_float.npz a text pipeline wrote") from None
    if "param/emb" not in state or "param/pos" not in state:
        raise UserError(f"model.path {p}: no 'param/emb' / 'param/pos' arrays; give the "
                        "lm_float.npz a text pipeline wrote")
    return state


def check_state(state: dict, shape, path: str) -> None:
    """Raises UserError unless ``shape`` (an LmShape or the [lm] table) fits the state."""
    context, dim = state["param/pos"].shape
    if shape.context > context:
        raise UserError(f"model.path {path}: the model's context is {context} tokens; "
                        f"lm.context = {shape.context} is longer: set lm.context <= {context}")
    if dim != shape.dim or f"param/{shape.layers - 1}.wq" not in state \
            or f"param/{shape.layers}.wq" in state:
        layers = sum(1 for k in state if k.endswith(".wq"))
        raise UserError(f"model.path {path}: the model has dim {dim} and {layers} layer(s); "
                        f"set lm.dim = {dim} and lm.layers = {layers}")


def _npz_bytes(state: dict) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **state)
    return buf.getvalue()


def keras_logits(model, windows: np.ndarray, context: int, batch: int = 16,
                 arch: str | None = None) -> np.ndarray:
    """Teacher-forced logits of the TensorFlow model: a quantized one as exported and
    rounding as TFLite's kernels on ``arch`` do (default: this machine's;
    ``TinyLm.as_exported``)."""
    from edgeqat import requant
    from edgeqat.keras import tf

    with (model.as_exported(arch or requant.host_arch()) if model.quantized
          else contextlib.nullcontext()):
        fn = tf.function(lambda x: model(x))
        return np.concatenate([fn(tf.constant(windows[i:i + batch, :context])).numpy()
                               for i in range(0, len(windows), batch)])


@dataclass(frozen=True)
class LmQuantized:
    """One precision's PTQ (calibrated ranges, round-to-nearest weights) and, once
    fine-tuned, QAT models with their proven flatbuffers."""

    precision: object
    ptq_model: object = field(repr=False)
    ptq_tflite: bytes = field(repr=False)
    model: object = field(default=None, repr=False)  # the QAT model
    tflite: bytes = field(default=b"", repr=False)
    ops: dict = field(default_factory=dict, repr=False)
    losses: list = field(default_factory=list, repr=False)

    @property
    def ptq_name(self) -> str:
        return f"ptq_{self.precision.name}"

    @property
    def name(self) -> str:
        return f"qat_{self.precision.name}"


def baselines(float_model) -> dict[str, bytes]:
    """The float model as ``float`` and ``dynamic_int8`` (int8 weights, float
    activations) flatbuffers, both with prefill and decode."""
    from edgeqat.lm import export

    return {"float": export.to_tflite(float_model, "float"),
            "dynamic_int8": export.to_tflite(float_model, "dynamic")}


def quantize_post_training(float_model, data, precision) -> LmQuantized:
    from edgeqat import inspect
    from edgeqat.lm import export, train

    ptq_model = train.copy_of(float_model, precision=precision)
    train.calibrate(ptq_model, data.train)
    tflite = export.to_tflite(ptq_model, "full_integer", data.train)
    inspect.require_full_integer_everywhere(tflite, f"ptq_{precision.name}.tflite")
    return LmQuantized(precision, ptq_model, tflite)


def quantize_aware(ptq: LmQuantized, float_model, data, cfg: PipelineConfig) -> LmQuantized:
    """QAT from the PTQ model's ranges, distilling from ``float_model``; exported and
    proven fully integer in both signatures."""
    from edgeqat import inspect
    from edgeqat.lm import export, train

    lm = cfg.lm
    model = train.copy_of(ptq.ptq_model)
    losses = train.fine_tune(model, float_model, data.train,
                             train.Schedule(lm.qat_steps, lm.batch_size, lm.qat_learning_rate,
                                            warmup=min(50, lm.qat_steps // 10)),
                             cfg.seed + 1, lm.distill, score_penalty=lm.score_penalty)
    tflite = export.to_tflite(model, "full_integer", data.train)
    ops = inspect.require_full_integer_everywhere(tflite, f"{ptq.name}.tflite")
    return dataclasses.replace(ptq, model=model, tflite=tflite, ops=ops, losses=losses)


def pretrain_float(cfg: PipelineConfig, data, state: dict | None):
    """The float model: pre-trained here, or the state of ``model.path``."""
    from edgeqat.lm import train
    from edgeqat.lm.model import TinyLm

    shape = shape_for(cfg)
    model = TinyLm(shape, precision_for(cfg), seed=cfg.seed)  # (score_cap applies in float)
    if state is not None:
        model.set_state({k: (v[: shape.context] if k == "param/pos" else v)
                         for k, v in state.items()})
    steps = 0 if state is not None else cfg.lm.steps
    losses = train.pretrain(model, data.train,
                            train.Schedule(steps, cfg.lm.batch_size, cfg.lm.learning_rate,
                                           warmup=min(100, steps // 10)), cfg.seed,
                            score_penalty=cfg.lm.score_penalty)
    return model, losses


def run(cfg: PipelineConfig, device: DeviceConfig, stage):
    """Runs the language-model pipeline; returns a ``flow.PipelineResult``."""
    from edgeqat import op_versions
    from edgeqat.harness.device import preflight

    lm = cfg.lm
    with stage("data"):
        data = text.load_text(cfg.data.path, lm.context)
        state = read_state(cfg.model.path) if cfg.model.path else None
        if state is not None:
            check_state(state, lm, cfg.model.path)
    with stage("device"):
        preflight(device)
    from edgeqat.flow import PipelineResult
    from edgeqat.keras import keras, tf

    keras.utils.set_random_seed(cfg.seed)
    shape = shape_for(cfg)
    with stage("float"):
        float_model, losses = pretrain_float(cfg, data, state)
    with stage("ptq"):
        tflites = baselines(float_model)
        ptq = quantize_post_training(float_model, data, precision_for(cfg))
        tflites[ptq.ptq_name] = ptq.ptq_tflite
    with stage("qat"):
        q = quantize_aware(ptq, float_model, data, cfg)
        tflites[q.name] = q.tflite
    with stage("validate"):
        op_versions.require_loadable(tflites, device)  # before the device sees a model
        test = data.test[: lm.eval_windows]
        arch = target_arch(device)
        host = {"float": keras_logits(float_model, test, shape.context),
                ptq.ptq_name: keras_logits(ptq.ptq_model, test, shape.context, arch=arch),
                q.name: keras_logits(q.model, test, shape.context, arch=arch)}
        runs, host_runs = _run_models(device, tflites, test, lm, q.name)
        kernels = kernel_agreement(q.tflite, test, shape.context)
    tf.keras.backend.clear_session()
    report = build_report(cfg, device, data, float_model, tflites, runs, host_runs, host,
                          q, kernels, test, stage.seconds, {"float": losses, "qat": q.losses})
    files = {"lm_float.npz": _npz_bytes(float_model.get_state()),
             "lm_qat.npz": _npz_bytes(q.model.get_state())}
    return PipelineResult(config=cfg, device=device, data=data.summary(), float_model=None,
                          qat_model=None, tflites=tflites, report=report, files=files)


def kernel_agreement(tflite: bytes, windows: np.ndarray, context: int) -> dict:
    """The same flatbuffer on this machine with XNNPACK and with LiteRT's reference
    kernels, in output steps: how far two correct integer implementations of the model
    differ (the yardstick for Keras-vs-TFLite)."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    outs = []
    for resolver in (OpResolverType.AUTO, OpResolverType.BUILTIN_REF):
        prefill = Interpreter(model_content=tflite, experimental_op_resolver_type=resolver
                              ).get_signature_runner("prefill")
        outs.append(np.stack([prefill(tokens=w[None, :context].astype(np.int32))["logits"][0]
                              for w in windows]))
    return evaluate.step_agreement(*outs)


def _run_models(device: DeviceConfig, tflites: dict, test: np.ndarray, lm, shipped: str):
    from edgeqat.harness.device import run_lm_on_device

    prompt = text.encode(lm.prompt)
    with tempfile.TemporaryDirectory(prefix="edgeqat-lm-") as tmp:
        paths = {}
        for n, content in tflites.items():
            paths[n] = Path(tmp) / f"{n}.tflite"
            paths[n].write_bytes(content)
        kwargs = {"decode_windows": lm.decode_windows, "threads": SPEED_THREADS,
                  "max_new_tokens": lm.generate_tokens}
        runs = run_lm_on_device(device, paths, test, prompt, **kwargs)
        host_runs = None
        if device.connection.kind != "local":  # the same tokens on this machine?
            host_runs = run_lm_on_device(DeviceConfig(), {shipped: paths[shipped]}, test,
                                         prompt, **{**kwargs, "threads": (1,), "runs": 8})
    return runs, host_runs


LABELS = {"float": "float", "dynamic_int8": "dynamic int8 (weights only)"}


def label(name: str) -> str:
    if name in LABELS:
        return LABELS[name]
    kind, _, prec = name.partition("_")
    return f"{kind.upper()} {prec.upper()}"


def score_rows(runs: dict, tflites: dict, targets: np.ndarray, reference: np.ndarray
               ) -> list[dict]:
    """One row per model run on the device: teacher-forced figures against the float
    reference logits, bytes, speed per thread count, decode vs prefill, and for each
    ``qat_X`` the share of ``ptq_X``'s perplexity gap it recovered."""
    rows = []
    for n, r in runs.items():
        q = r.info["logits"]
        logits = evaluate.dequantize(r.outputs, q["scale"], q["zero_point"])
        row = {"name": n, "label": label(n), **evaluate.scores(logits, targets, reference),
               "bytes": len(tflites[n]),
               "speed": {t: {k: v for k, v in s.items() if k.endswith("per_s")}
                         for t, s in r.info["speed"].items()}}
        if len(r.raw):
            row["decode_vs_prefill"] = evaluate.step_agreement(r.raw, r.outputs[: len(r.raw)])
        rows.append(row)
    by = {r["name"]: r for r in rows}
    for n, row in by.items():
        ptq = by.get("ptq_" + n.partition("_")[2])
        if n.startswith("qat_") and ptq and "float" in by:
            row["gap_recovered"] = evaluate.gap_recovered(
                by["float"]["perplexity"], ptq["perplexity"], row["perplexity"])
    return rows


def keras_vs_tflite(keras_logits_: np.ndarray, run) -> dict:
    """A QAT model's TensorFlow logits vs its flatbuffer's on the device, in the
    flatbuffer's output steps."""
    q = run.info["logits"]
    return evaluate.step_agreement(evaluate.to_steps(keras_logits_, q["scale"],
                                                     q["zero_point"], q["dtype"]),
                                   run.outputs)


def build_report(cfg, device, data, float_model, tflites, runs, host_runs, host,
                 q: LmQuantized, kernels: dict, test, seconds, losses) -> dict:
    from edgeqat.report import versions

    ctx = cfg.lm.context
    targets = test[:, 1:ctx + 1]
    reference = host["float"]
    rows = score_rows(runs, tflites, targets, reference)
    by = {r["name"]: r for r in rows}
    shipped = q.name
    fidelity = {"keras_vs_tflite": keras_vs_tflite(host[shipped], runs[shipped]),
                "decode_vs_prefill": by[shipped].get("decode_vs_prefill"),
                "xnnpack_vs_reference_kernels": kernels}
    keras = {n: evaluate.scores(v, targets, reference) for n, v in host.items()}
    increase = by[shipped]["perplexity"] / by["float"]["perplexity"] - 1
    samples = {"prompt": cfg.lm.prompt,
               **{n: text.decode(r.info["generated"]) for n, r in runs.items()}}
    report = {
        "task": "language_model",
        "pipeline": {"name": cfg.name, "mode": cfg.convert.mode,
                     "precision": shipped.partition("_")[2],
                     "source": cfg.source, "seed": cfg.seed},
        "device": {"name": device.name, "connection": device.connection.kind,
                   "runtime": runs[shipped].info["runtime"],
                   "runtime_version": runs[shipped].info["runtime_version"],
                   "delegate": runs[shipped].info["delegate_applied"],
                   "cpu": runs[shipped].info.get("cpu")},
        "data": data.summary(),
        "model": {**asdict(float_model.shape), "parameters": float_model.parameter_count(),
                  "precision": asdict(precision_for(cfg)), "source": cfg.model.path
                  or "pre-trained here", "pretrain_steps": cfg.lm.steps if not cfg.model.path
                  else 0, "qat_steps": cfg.lm.qat_steps},
        "rows": rows,
        "keras": keras,
        "fidelity": fidelity,
        "full_integer": {sig: sorted({o.name for o in o_}) for sig, o_ in q.ops.items()},
        "signatures": sorted(q.ops),
        "samples": samples,
        "budget": {"max_perplexity_increase": cfg.lm.max_perplexity_increase,
                   "shipped": shipped, "perplexity_increase": increase,
                   "within_budget": increase <= cfg.lm.max_perplexity_increase},
        "losses": losses,
        "stages_s": dict(seconds),
        "versions": versions(),
    }
    if host_runs is not None:
        h = host_runs[shipped]
        d = runs[shipped]
        report["host_vs_device"] = {
            "prefill": evaluate.step_agreement(h.outputs, d.outputs, steps=0),
            "same_generated_tokens": h.info["generated"] == d.info["generated"],
            "host_generated": text.decode(h.info["generated"])}
    return report
