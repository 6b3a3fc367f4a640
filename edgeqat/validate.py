"""Float and int8 models on a device, on the same data: accuracy, agreement, latency."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgeqat.config import DeviceConfig
from edgeqat.harness.compare import OutputComparison, compare_outputs
from edgeqat.harness.device import DeviceRun, run_on_device


@dataclass(frozen=True)
class ModelOnDevice:
    """One .tflite as the device ran it."""

    name: str
    accuracy: float | None
    size_bytes: int
    latency: dict
    outputs: np.ndarray = field(repr=False)
    output_scale: float = 0.0


@dataclass(frozen=True)
class Agreement:
    """How closely a TFLite model reproduces the Keras model it was converted from."""

    top1: float  # share of samples with the same argmax
    within_2_steps: float  # share of output elements within 2 output quantization steps
    max_abs_steps: float  # largest difference, in output quantization steps

    def to_dict(self) -> dict:
        return {"top1": self.top1, "within_2_steps": self.within_2_steps,
                "max_abs_steps": self.max_abs_steps}


@dataclass(frozen=True)
class ValidationResult:
    """What the device said about every model, plus Keras-vs-TFLite agreement."""

    device: dict
    models: dict[str, ModelOnDevice]
    agreement: dict[str, Agreement]
    host_accuracy: dict[str, float | None] = field(default_factory=dict)
    device_vs_host: dict[str, OutputComparison] = field(default_factory=dict)


def target_arch(device: DeviceConfig) -> str:
    """The CPU architecture ``device`` runs models on: its profile's ``arch``, else this
    machine's for a local device and aarch64 under qemu (the only emulation shipped)."""
    from edgeqat.requant import host_arch, normalize_arch

    if device.arch:
        return normalize_arch(device.arch)
    return "aarch64" if device.connection.kind == "qemu" else host_arch()


def agreement(reference: np.ndarray, outputs: np.ndarray, scale: float) -> Agreement:
    """Compares Keras logits with (dequantized) TFLite outputs of the same samples."""
    reference = reference.reshape(outputs.shape)
    top1 = float((reference.argmax(-1) == outputs.argmax(-1)).mean())
    step = scale if scale > 0 else 1.0
    steps = np.abs(reference - outputs) / step
    return Agreement(top1, float((steps <= 2.0 + 1e-6).mean()), float(steps.max()))


def validate_on(device: DeviceConfig, tflites: dict[str, bytes], x: np.ndarray,
                y: np.ndarray, *, references: dict[str, np.ndarray] | None = None,
                warmup: int = 5, runs: int = 50) -> ValidationResult:
    """Runs every model on ``device`` with the same inputs and compares the results.

    Args:
      device: the device profile.
      tflites: name -> flatbuffer bytes.
      x, y: evaluation inputs (float) and labels.
      references: name -> Keras logits the named TFLite model should reproduce.
      warmup, runs: latency measurement.
    """
    with tempfile.TemporaryDirectory(prefix="edgeqat-validate-") as tmp:
        paths = {}
        for name, content in tflites.items():
            paths[name] = Path(tmp) / f"{name}.tflite"
            paths[name].write_bytes(content)
        runs_ = run_on_device(device, paths, x, y, warmup=warmup, runs=runs)
        host_runs: dict[str, DeviceRun] = {}
        if device.connection.kind != "local":
            # The same integer models on this machine: kernels differ between x86 and ARM
            # and between delegates, so the device must reproduce the host, step for step.
            integer = {n: p for n, p in paths.items() if runs_[n].raw.dtype.kind in "iu"}
            host_runs = run_on_device(DeviceConfig(), integer, x, y, warmup=0, runs=1)
    models = {name: _on_device(name, r) for name, r in runs_.items()}
    first = next(iter(runs_.values())).info
    info = {"profile": device.name, "runtime": first["runtime"],
            "runtime_version": first["runtime_version"],
            "delegate": first["delegate_applied"], "delegate_note": first["delegate_note"],
            "num_threads": first["num_threads"], "cpu": first["cpu"],
            "connection": device.connection.kind}
    agree = {name: agreement(ref, models[name].outputs, models[name].output_scale)
             for name, ref in (references or {}).items()}
    return ValidationResult(
        info, models, agree,
        host_accuracy={n: r.info.get("accuracy") for n, r in host_runs.items()},
        device_vs_host={n: compare_outputs(r.raw, runs_[n].raw) for n, r in host_runs.items()},
    )


def _on_device(name: str, r: DeviceRun) -> ModelOnDevice:
    return ModelOnDevice(name, r.info.get("accuracy"), r.info["model_bytes"], r.latency,
                         r.outputs, r.info["outputs"][0]["scale"])
