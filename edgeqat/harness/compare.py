"""Device vs host: do two runs of the same integer model agree?

For an int8 model the natural unit is the quantization step of the output tensor: a
difference of 1 means one least-significant bit. ``compare_outputs`` takes the raw
(integer) outputs of both runs, or dequantized float outputs plus the output scale.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class OutputComparison:
    """How far the device's outputs are from the host's, in quantization steps."""

    samples: int
    max_abs_steps: float  # largest |device - host| over all output elements
    mean_abs_steps: float  # mean |device - host| over all output elements
    mismatched_fraction: float  # share of output elements that differ at all
    top1_agreement: float  # share of samples whose argmax is the same on both

    @property
    def identical(self) -> bool:
        return self.max_abs_steps == 0

    def to_dict(self) -> dict:
        return asdict(self) | {"identical": self.identical}


def compare_outputs(host: np.ndarray, device: np.ndarray, *,
                    scale: float | None = None) -> OutputComparison:
    """Compares host and device outputs of the same model on the same inputs.

    Args:
      host, device: outputs with the batch first, same shape. Integer arrays are taken as
        raw quantized values (differences are already in steps); float arrays are
        dequantized values and need ``scale``.
      scale: the output tensor's quantization scale (float outputs only).

    Returns:
      An ``OutputComparison``.

    Raises:
      ValueError: the shapes differ, or float outputs come without a positive ``scale``.
    """
    host, device = np.asarray(host), np.asarray(device)
    if host.shape != device.shape:
        raise ValueError(f"host outputs have shape {host.shape}, device outputs {device.shape}")
    if host.ndim == 0 or host.shape[0] == 0:
        raise ValueError("need at least one sample (batch first)")
    integer = np.issubdtype(host.dtype, np.integer) and np.issubdtype(device.dtype, np.integer)
    diff = host.astype(np.float64) - device.astype(np.float64)
    if not integer:
        if not scale or scale <= 0:
            raise ValueError("float outputs need the output scale to count quantization steps")
        diff = diff / scale
    steps = np.abs(diff)
    n = host.shape[0]
    top1 = host.reshape(n, -1).argmax(-1) == device.reshape(n, -1).argmax(-1)
    return OutputComparison(
        samples=int(n), max_abs_steps=float(steps.max()), mean_abs_steps=float(steps.mean()),
        mismatched_fraction=float((steps > (0 if integer else 1e-3)).mean()),
        top1_agreement=float(top1.mean()))


def compare_runs(host_run, device_run) -> OutputComparison:
    """``compare_outputs`` for two ``DeviceRun`` objects (raw outputs, same model)."""
    return compare_outputs(host_run.raw, device_run.raw)
