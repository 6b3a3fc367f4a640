"""Precision modes: one enum, and per mode one row of facts every stage reads.

A mode is what ``[convert] mode`` names: how the shipped flatbuffer stores weights and
activations. Its row says how the converter is set for it, which PTQ route makes its
baseline, which kernel-rounding rule its integer kernels follow (``edgeqat.requant``),
which activation widths its kernels take, and what its artifacts are called. Adding a
mode is a row here (plus, where its kernels round differently, a rule in ``requant``).

No TensorFlow import: ``edgeqat.config`` reads the allowed names from here. Converter
settings are named as strings (``tf.lite.OpsSet`` members, dtypes) that
``edgeqat.convert`` resolves.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

FLOAT = "float"  # the float reference flatbuffer's name; not a precision mode


class Mode(enum.StrEnum):
    """The precision modes a pipeline can ship (``[convert] mode``)."""

    INT8 = "int8"
    INT16X8 = "int16x8"
    INT4_WEIGHTS = "int4_weights"


class PtqRoute(enum.StrEnum):
    """How the PTQ baseline of a mode is made (``ptq.post_training``)."""

    CALIBRATE_QUANTIZE = "calibrate_quantize"  # ptq.calibrate + ptq.quantize: percentile,
    #                     MSE and AdaRound apply; the calibration serves diagnostics
    CONVERTER = "converter"  # convert.to_tflite with calibration data, min/max ranges


@dataclass(frozen=True)
class ModeSpec:
    """One precision mode's facts.

    Attributes:
      mode: the mode.
      title: how prose names it (``16x8``).
      ops: the ``tf.lite.OpsSet`` member the converter is restricted to.
      ops_need_calibration: name ``ops`` only when a representative dataset is given
        (a QAT model converted on its trained ranges alone keeps the converter's default
        op set, and the proof of full integer comes from ``inspect``).
      io_type: the flatbuffer's input/output dtype (``tf`` attribute name).
      low_bit_qat: turn on the converter's low-bit QAT path (packed INT4 weights).
      activation_bits: (lo, hi) bit widths of the activation quantizers a QAT model of
        this mode may have (its kernels' activations; QAT trains the ranges that ship).
      qat_calibration: a QAT model's conversion uses calibration data (16x8: no; a
        representative dataset switches the converter to its 16x8 PTQ path).
      widen_qat_biases: a QAT model's int32 biases are stored as the int64 its kernels
        read (``convert.widen_int16_biases``).
      ptq_route: how its PTQ baseline is made.
      kernel_rounding: the ``requant.KERNEL_ROUNDING`` entry its integer kernels follow
        (None: they round as the float graph does).
    """

    mode: Mode
    title: str
    ops: str
    ops_need_calibration: bool
    io_type: str
    low_bit_qat: bool
    activation_bits: tuple[int, int]
    qat_calibration: bool
    widen_qat_biases: bool
    ptq_route: PtqRoute
    kernel_rounding: str | None

    def __post_init__(self):
        lo, hi = self.activation_bits
        if not 2 <= lo <= hi <= 16:
            raise ValueError(f"activation_bits must be (lo, hi) within 2..16. Received: "
                             f"activation_bits={self.activation_bits}")
        if self.widen_qat_biases and self.io_type != "int16":
            raise ValueError(f"only int16 activations read int64 biases. Received: "
                             f"io_type={self.io_type!r} with widen_qat_biases=True")

    @property
    def ptq_name(self) -> str:
        """The PTQ baseline's artifact name (``ptq_int8``; its file adds ``.tflite``)."""
        return f"ptq_{self.mode}"

    @property
    def qat_name(self) -> str:
        """The QAT model's artifact name (``qat_int8``; its file adds ``.tflite``)."""
        return f"qat_{self.mode}"

    @property
    def activation_bits_text(self) -> str:
        lo, hi = self.activation_bits
        return str(lo) if lo == hi else f"{lo}..{hi}"


MODES: dict[Mode, ModeSpec] = {
    Mode.INT8: ModeSpec(
        Mode.INT8, "int8", ops="TFLITE_BUILTINS_INT8", ops_need_calibration=True,
        io_type="int8", low_bit_qat=False, activation_bits=(2, 8), qat_calibration=True,
        widen_qat_biases=False, ptq_route=PtqRoute.CALIBRATE_QUANTIZE,
        kernel_rounding="int8_kernels"),
    Mode.INT16X8: ModeSpec(
        Mode.INT16X8, "16x8", ops="EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8",
        ops_need_calibration=False, io_type="int16", low_bit_qat=False,
        activation_bits=(16, 16), qat_calibration=False, widen_qat_biases=True,
        ptq_route=PtqRoute.CONVERTER, kernel_rounding="multiplier_15bit"),
    Mode.INT4_WEIGHTS: ModeSpec(
        Mode.INT4_WEIGHTS, "int4 weights", ops="TFLITE_BUILTINS_INT8",
        ops_need_calibration=True, io_type="int8", low_bit_qat=True, activation_bits=(2, 8),
        qat_calibration=True, widen_qat_biases=False, ptq_route=PtqRoute.CONVERTER,
        kernel_rounding="int4_kernels"),
}

NAMES: tuple[str, ...] = tuple(m.value for m in MODES)  # what ``[convert] mode`` allows


def spec(mode: str) -> ModeSpec:
    """The row of ``mode`` (a ``Mode`` or its name).

    Raises:
      ValueError: ``mode`` is not a precision mode.
    """
    try:
        return MODES[Mode(mode)]
    except ValueError:
        raise ValueError(f"mode must be one of {', '.join(NAMES)}. Received: "
                         f"mode={mode!r}") from None


def mode_of(artifact: str) -> Mode | None:
    """The mode of an artifact name (``ptq_int16x8`` -> int16x8), None if it has none
    (``float``, auto mode's ``mixed_float_N``)."""
    for row in MODES.values():
        if artifact in (row.ptq_name, row.qat_name):
            return row.mode
    return None
