"""The one flow every caller runs: quantize -> fine-tune -> export -> verify, then finish.

``quantize_aware`` takes a trained float model to a proven fully-integer flatbuffer at one
precision mode; the pipeline (``pipeline.run``), auto mode (``auto.choose``) and the
benchmarks call it, so they cannot drift apart. ``finish`` validates the flatbuffers on
the device and builds the report, the same sections whichever mode produced it.
"""

from __future__ import annotations

import dataclasses
from contextlib import nullcontext
from dataclasses import dataclass, field

from edgeqat import annotate, export, inspect, metadata, modes, op_versions, qat, report, requant
from edgeqat.config import DeviceConfig, PipelineConfig, PolicyConfig, QatConfig, to_toml
from edgeqat.convert import to_tflite
from edgeqat.data import Dataset
from edgeqat.edgetpu import EdgeTpuReport, edgetpu_report
from edgeqat.train import TrainedModel
from edgeqat.validate import target_arch, validate_on


def untimed(name: str):
    """A stand-in for the pipeline's stage timer (``stage("qat")``) that times nothing."""
    return nullcontext()


@dataclass(frozen=True)
class PipelineResult:
    """Everything a pipeline run produced, in memory; ``write_outputs`` puts it on disk."""

    config: PipelineConfig
    device: DeviceConfig
    data: dict
    float_model: object = field(repr=False)
    qat_model: object = field(repr=False)  # None when auto mode stopped before QAT
    tflites: dict = field(repr=False)
    report: dict = field(repr=False)
    files: dict = field(default_factory=dict, repr=False)  # more artifacts: name -> bytes


@dataclass(frozen=True)
class Quantized:
    """One precision mode's QAT result: the fine-tuned model and its proven flatbuffer.

    ``tuned.model`` is prepared for export (biases on the int32 grid, this machine's
    kernel rounding): its inference mode computes what ``tflite`` computes.
    """

    mode: str
    tuned: qat.QatResult = field(repr=False)
    tflite: bytes = field(repr=False)
    ops: tuple = ()

    @property
    def name(self) -> str:
        return modes.spec(self.mode).qat_name


def resume_context(cfg: PipelineConfig) -> str:
    """What a QAT checkpoint of this pipeline must match besides the QAT inputs: the
    whole configuration after overrides, without the checkpoint directory itself."""
    return to_toml(dataclasses.replace(cfg, qat=dataclasses.replace(cfg.qat,
                                                                     checkpoint_dir="")))


def quantize_aware(trained: TrainedModel, data: Dataset, mode: str, policy: PolicyConfig,
                   qat_cfg: QatConfig, *, seed: int = 0, float_learning_rate: float | None,
                   stage=untimed, context: str = "",
                   calibrate: bool = True) -> Quantized:
    """Annotates, fine-tunes, exports and proves one QAT model at precision ``mode``.

    Args:
      trained: the float model (it is not changed) and its accuracy.
      data: the dataset; ``x_calib`` seeds the activation ranges and fills, at
        conversion, ranges training did not simulate.
      mode: a precision mode (``edgeqat.modes.Mode``).
      policy, qat_cfg: the quantization policy and the fine-tuning recipe.
      seed, float_learning_rate: as ``qat.fine_tune`` takes them.
      stage: the pipeline's stage timer (times ``annotate``, ``qat`` and ``convert``), or
        ``untimed``.
      context: ``resume_context(cfg)`` when QAT checkpoints are on.
      calibrate: hand ``x_calib`` to the converter (the pipeline does; off reproduces the
        converter's QAT path on trained ranges alone).

    Returns:
      A ``Quantized``; its ``ops`` are proven integer (``inspect.require_full_integer``).
    """
    with stage("annotate"), qat.strategy_scope(qat_cfg.strategy):
        model = annotate.annotate_model(trained.model, policy, sample_x=data.x_calib[:256])
    with stage("qat"):
        tuned = qat.fine_tune(model, data, qat_cfg, teacher=trained.model, seed=seed,
                              float_learning_rate=float_learning_rate, resume_context=context)
    with stage("convert"):
        flat = to_tflite(export.prepare_for_export(tuned.model, mode), mode, qat=True,
                         calibration=data.x_calib if calibrate else None)
        ops = inspect.require_full_integer(flat, f"{modes.spec(mode).qat_name}.tflite")
    return Quantized(mode, tuned, flat, tuple(ops))


def finish(cfg: PipelineConfig, device: DeviceConfig, data: Dataset, trained: TrainedModel,
           tflites: dict[str, bytes], shipped: str, quantized: Quantized | None,
           stage, *, diagnostics=(), auto=None, warnings=()) -> PipelineResult:
    """Validates every flatbuffer on ``device`` and builds the report.

    The Keras QAT model is compared with its flatbuffer as it ships: its kernel rounding
    is that of the device's CPU (``requant.install``), and the report's Keras QAT
    accuracy comes from the same logits as the agreement.

    Args:
      tflites: name -> flatbuffer, ``float`` first; each gets the pipeline's TFLite
        metadata, is checked against what the device's runtime version can load, and
        runs on the device.
      shipped: the name of the one that ships (its ops, Edge TPU pre-check and storage
        table go into the report).
      quantized: the QAT result behind ``tflites[quantized.name]``, if any.
    """
    tflites = metadata.with_pipeline_metadata(tflites, cfg, data)  # what ships, validated
    op_versions.require_loadable(tflites, device)  # before the device sees a model
    references = {}
    tuned = None
    with stage("validate"):
        if quantized is not None:
            tuned = quantized.tuned
            requant.install(tuned.model, quantized.mode, target_arch(device))
            logits = tuned.model.predict(data.x_test, batch_size=256, verbose=0)
            tuned = dataclasses.replace(tuned, accuracy=float(
                (logits.argmax(-1) == data.y_test).mean()))
            references[quantized.name] = logits
        validation = validate_on(device, tflites, data.x_test, data.y_test,
                                 references=references, warmup=cfg.validate.warmup_runs,
                                 runs=cfg.validate.latency_runs)
    flat = tflites[shipped]
    ops = quantized.ops if quantized is not None and shipped == quantized.name \
        else inspect.list_ops(flat)
    edgetpu: EdgeTpuReport = edgetpu_report(flat)
    summary = report.build_report(cfg, device, data.summary(), trained, tuned, validation,
                                  list(ops), getattr(stage, "seconds", {}),
                                  diagnostics=diagnostics, auto=auto, edgetpu=edgetpu,
                                  storage=inspect.storage(flat))
    summary["warnings"] = list(warnings)
    return PipelineResult(cfg, device, data.summary(), trained.model,
                          tuned.model if tuned is not None else None, tflites, summary)
