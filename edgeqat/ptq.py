"""Post-training quantization with TensorFlow's calibrate-then-quantize route.

The TFLite converter quantizes in two steps: it *calibrates* (runs the float model on the
representative data and stores each activation tensor's min/max in the flatbuffer), then
*quantizes* that calibrated model (``mlir_quantize``). Keeping the calibrated model lets one
calibration serve several quantized variants, which is what diagnostics and ``auto`` mode
need:

* ``quantize(cal)``: full integer int8 (int8 input and output), the same as
  ``convert.to_tflite(model, Mode.INT8, calibration=...)``;
* ``quantize(cal, float_nodes=[...])``: selective quantization, the named op outputs stay
  float (TF's ``denylisted_nodes``; the model is then no longer fully integer);
* ``quantize(cal, debug=True)``: the NumericVerify-instrumented model that
  ``tf.lite.experimental.QuantizationDebugger`` reads.

Two PTQ improvements act on this route: percentile / MSE activation ranges (the calibrated
min/max are replaced before quantizing) and AdaRound weight rounding (on the float Keras
weights before calibration).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from edgeqat import layer_kinds, modes
from edgeqat.config import PtqConfig
from edgeqat.keras import keras, tf
from edgeqat.modes import Mode, PtqRoute


@dataclass(frozen=True)
class Calibrated:
    """A float flatbuffer carrying activation ranges, ready for ``quantize``."""

    model: bytes = field(repr=False)
    method: str = "minmax"
    layer_names: tuple[str, ...] = ()  # of the Keras model it came from, in graph order

    def nodes(self) -> list[str]:
        """Names of the quantized op outputs, as ``quantize(float_nodes=...)`` takes them.

        These are the names TF's QuantizationDebugger reports (the NumericVerify ops of
        the debug model), which are what the quantizer's ``denylisted_nodes`` matches.
        """
        from ai_edge_litert.interpreter import Interpreter

        interp = Interpreter(model_content=quantize(self, debug=True))
        tensors = {t["index"]: t["name"] for t in interp.get_tensor_details()}
        names = []
        for op in interp._get_ops_details():
            if op["op_name"] in ("NumericVerify", "NUMERIC_VERIFY"):
                names.append(verify_target(tensors[op["outputs"][0]]))
        return names


def verify_target(numeric_verify_name: str) -> str:
    """``NumericVerify/<node><digit>:<index>`` -> ``<node>`` (as TF's debugger parses it)."""
    name = numeric_verify_name.rsplit(":", 1)[0][len("NumericVerify/"):]
    return name[:-1] if name and name[-1].isdigit() else name


def calibrate(model: keras.Model, x_calib: np.ndarray, cfg: PtqConfig | None = None,
              ) -> Calibrated:
    """Runs the converter's calibration on ``x_calib``; applies percentile/MSE if asked.

    Args:
      model: a float tf_keras model.
      x_calib: representative inputs (float32, batch first).
      cfg: calibration method (``minmax``, ``percentile``, ``mse``) and AdaRound options;
        AdaRound, if on, is applied to a copy of ``model`` before calibrating.
    """
    from edgeqat.convert import (
        concrete_function,
        converter_for,
        representative_dataset,
        run_converter,
    )

    cfg = cfg or PtqConfig()
    if cfg.adaround:
        model = adaround(model, x_calib[: cfg.adaround_samples],
                         iterations=cfg.adaround_iterations)
    converter = converter_for(concrete_function(model))
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = representative_dataset(x_calib)
    converter.experimental_mlir_quantizer = True
    converter._experimental_calibrate_only = True
    calibrated = run_converter(converter)
    if cfg.calibration != "minmax":
        calibrated = _set_ranges(calibrated, x_calib[: cfg.range_samples], cfg)
    return Calibrated(calibrated, cfg.calibration, tuple(layer.name for layer in model.layers))


def quantize(cal: Calibrated, *, activations: str = Mode.INT8, float_nodes=(),
             debug: bool = False) -> bytes:
    """Quantizes a calibrated model.

    Args:
      cal: from ``calibrate``.
      activations: ``int8`` only (kept explicit: see the error for ``int16``).
      float_nodes: op output tensor names (``Calibrated.nodes()``) to leave in float.
      debug: instrument with NumericVerify ops (float input/output) for the debugger.

    Returns:
      The flatbuffer; integer input/output of the activation type unless ``debug``.
    """
    from tensorflow.compiler.mlir.lite import types_pb2
    from tensorflow.lite.python import convert as lite_convert

    if activations != Mode.INT8:
        raise ValueError("quantize() makes int8 models; for 16x8 use convert.to_tflite: "
                         "mlir_quantize's int16 path gives zero points the kernels reject")
    from edgeqat.convert import CONVERTER_NOISE
    from edgeqat.keras import quiet_stderr

    with quiet_stderr(CONVERTER_NOISE):
        return lite_convert.mlir_quantize(
            cal.model,
            fully_quantize=not debug,
            inference_type=types_pb2.QUANTIZED_INT8,
            input_data_type=tf.float32 if debug else tf.int8,
            output_data_type=tf.float32 if debug else tf.int8,
            enable_numeric_verify=debug,
            denylisted_nodes=list(float_nodes) or None,
        )


def post_training(model: keras.Model, x_calib: np.ndarray, mode: str,
                  cfg: PtqConfig | None = None) -> tuple[bytes, Calibrated | None]:
    """The PTQ baseline of ``mode`` by its route (``modes.ModeSpec.ptq_route``); returns
    the flatbuffer and, on the calibrate-then-quantize route, its calibration."""
    from edgeqat.convert import to_tflite

    if modes.spec(mode).ptq_route == PtqRoute.CONVERTER:  # min/max ranges
        return to_tflite(model, mode, calibration=x_calib), None
    cal = calibrate(model, x_calib, cfg)
    return quantize(cal), cal


# --------------------------------------------------------------- percentile / MSE ranges


def _activation_values(model: bytes, x: np.ndarray) -> dict[int, np.ndarray]:
    """Every float activation tensor of a float flatbuffer, over the samples ``x``."""
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_content=model, experimental_preserve_all_tensors=True)
    interp.allocate_tensors()
    inp = interp.get_input_details()[0]["index"]
    ids = sorted({i for op in interp._get_ops_details() for i in op["outputs"] if i >= 0})
    values: dict[int, list[np.ndarray]] = {i: [] for i in ids}
    for sample in x:
        interp.set_tensor(inp, sample[None].astype(np.float32))
        interp.invoke()
        for i in ids:
            values[i].append(interp.get_tensor(i).ravel().copy())
    return {i: np.concatenate(v) for i, v in values.items()}


def _qdq_error(v: np.ndarray, lo: float, hi: float, levels: int = 255) -> float:
    step = max(hi - lo, 1e-12) / levels
    q = np.clip(np.round((v - lo) / step), 0, levels) * step + lo
    return float(np.mean((v - q) ** 2))


def activation_range(v: np.ndarray, method: str, percentile: float = 99.99,
                     ) -> tuple[float, float]:
    """The (min, max) an activation tensor is quantized over.

    ``minmax``: the observed extremes. ``percentile``: the ``percentile`` and its mirror
    (e.g. 0.01 / 99.99), outliers clip. ``mse``: the clipping range, among shrunken min/max
    candidates, with the least int8 quantize-dequantize mean squared error on ``v``.
    The range always contains 0 (TFLite needs an exact zero point).
    """
    lo, hi = float(v.min()), float(v.max())
    if method == "percentile":
        lo, hi = (float(x) for x in np.percentile(v, [100 - percentile, percentile]))
    elif method == "mse":
        sample = v if v.size <= 200_000 else np.random.default_rng(0).choice(v, 200_000)
        best = (np.inf, lo, hi)
        for f in np.linspace(0.05, 1.0, 40):
            err = _qdq_error(sample, lo * f, hi * f)
            if err < best[0]:
                best = (err, lo * f, hi * f)
        _, lo, hi = best
    return min(lo, 0.0), max(hi, 0.0)


def _set_ranges(calibrated: bytes, x: np.ndarray, cfg: PtqConfig) -> bytes:
    """Replaces the calibrated min/max of intermediate activations (not input or output)."""
    from tensorflow.lite.tools import flatbuffer_utils

    values = _activation_values(calibrated, x)
    m = flatbuffer_utils.read_model_from_bytearray(bytearray(calibrated))
    sg = m.subgraphs[0]
    keep = set(sg.inputs) | set(sg.outputs)
    for i, v in values.items():
        q = sg.tensors[i].quantization
        if i in keep or q is None or q.min is None or v.size == 0:
            continue
        lo, hi = activation_range(v, cfg.calibration, cfg.percentile)
        q.min = np.array([lo], np.float32)
        q.max = np.array([hi], np.float32)
    return bytes(flatbuffer_utils.convert_object_to_bytearray(m))


# ---------------------------------------------------------------------------- round to nearest


def round_weights(model: keras.Model, bits: int, keep: tuple[str, ...] = ()) -> keras.Model:
    """A copy of ``model`` whose kernels (except layers named in ``keep``) are rounded to
    nearest on a ``bits`` grid per last kernel axis (symmetric max-abs, narrow range):
    round-to-nearest low-bit PTQ, the baseline QAT must beat. The converter has no
    low-bit PTQ route for full-integer models, so the rounded weights are then converted
    as int8 (their values stay on the ``bits`` grid)."""
    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    qp = 2 ** (bits - 1) - 1
    for layer in copy.layers:
        if hasattr(layer, "kernel") and layer.name not in keep:
            k = layer.kernel.numpy()
            s = np.maximum(np.abs(k).reshape(-1, k.shape[-1]).max(0), 1e-8) / qp
            layer.kernel.assign(np.clip(np.round(k / s), -qp, qp) * s)
    return copy


# ---------------------------------------------------------------------------- AdaRound

_ZETA, _GAMMA = 1.1, -0.1  # the rectified sigmoid's stretch (Louizos et al. 2018)


def kernel_op(layer, x, w):
    """The layer's linear op (no bias, no activation) with kernel ``w``."""
    kind = type(layer).__name__
    if kind == "Dense":
        return tf.tensordot(x, w, 1)
    if kind == "DepthwiseConv2D":
        return tf.nn.depthwise_conv2d(x, w, (1, *layer.strides, 1), layer.padding.upper(),
                                      dilations=layer.dilation_rate)
    return tf.nn.convolution(x, w, strides=layer.strides, padding=layer.padding.upper(),
                             dilations=layer.dilation_rate)


def channel_scale(layer, w: np.ndarray) -> np.ndarray:
    """Symmetric int8 scale per output channel, as TFLite's converter computes it."""
    axes = (0, 1) if type(layer).__name__ == "DepthwiseConv2D" else tuple(range(w.ndim - 1))
    return np.maximum(np.abs(w).max(axis=axes, keepdims=True), 1e-12) / 127.0


def _h(v):
    return tf.clip_by_value(tf.sigmoid(v) * (_ZETA - _GAMMA) + _GAMMA, 0.0, 1.0)


def adaround_kernel(layer, x: np.ndarray, iterations: int = 300, reg: float = 0.01,
                    batch: int = 32, seed: int = 0) -> np.ndarray:
    """AdaRound (Nagel et al. 2020, arXiv:2004.10568) of one layer's kernel.

    Learns, per weight, whether to round down or up on the int8 per-channel grid so that
    the layer's output on its (float) inputs ``x`` is reproduced: minimise
    ``||W x - W~ x||^2 + reg * sum(1 - |2 h(V) - 1|^beta)`` with
    ``W~ = s * clip(floor(W / s) + h(V), -127, 127)``, ``h`` the rectified sigmoid and
    ``beta`` annealed from 20 to 2. The largest weight of each channel keeps its nearest
    rounding so the converter recomputes the same scale (per-channel symmetric grids are
    unchanged by the BatchNorm folding that follows).

    Returns:
      The kernel on the grid (float32 values ``s * n``), same shape as the layer's kernel.
    """
    w = layer.kernel.numpy().astype(np.float32)
    s = channel_scale(layer, w)
    floor = np.floor(w / s)
    rest = np.clip(w / s - floor, 0.01, 0.99)
    v = tf.Variable(-np.log((_ZETA - _GAMMA) / (rest - _GAMMA) - 1.0), dtype=tf.float32)
    x = tf.constant(x, tf.float32)
    target = kernel_op(layer, x, tf.constant(w))
    opt = keras.optimizers.Adam(1e-2)
    rng = np.random.default_rng(seed)
    warm = int(0.2 * iterations)

    @tf.function
    def step(xb, yb, beta, use_reg):
        with tf.GradientTape() as tape:
            wq = s * tf.clip_by_value(floor + _h(v), -127.0, 127.0)
            rec = tf.reduce_mean(tf.square(kernel_op(layer, xb, wq) - yb))
            h = _h(v)
            r = tf.reduce_mean(1.0 - tf.pow(tf.abs(2.0 * h - 1.0), beta))
            loss = rec + use_reg * reg * r
        opt.apply_gradients([(tape.gradient(loss, v), v)])

    n = int(x.shape[0])
    for it in range(iterations):
        idx = rng.choice(n, min(batch, n), replace=False)
        progress = max(it - warm, 0) / max(iterations - warm, 1)
        beta = 20.0 + (2.0 - 20.0) * progress
        step(tf.gather(x, idx), tf.gather(target, idx), tf.constant(beta),
             tf.constant(0.0 if it < warm else 1.0))
    q = floor + (_h(v).numpy() >= 0.5)
    at_max = np.isclose(np.abs(w), s * 127.0)
    q = np.where(at_max, np.round(w / s), q)
    return (s * np.clip(q, -127, 127)).astype(np.float32)


def adaround_fits(layer) -> bool:
    """Whether AdaRound fits ``layer``'s kernel (``layer_kinds``: Conv1D/2D, depthwise,
    Dense)."""
    row = layer_kinds.weighted(layer)
    return row is not None and row.adaround


def adaround(model: keras.Model, x: np.ndarray, iterations: int = 300,
             layers: str = ".*") -> keras.Model:
    """A copy of ``model`` whose weighted layers' kernels are AdaRound-ed (see above).

    Each layer is fitted on its inputs in the float model (the compact variant: inputs are
    not re-quantized layer by layer).
    """
    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    targets = [layer for layer in model.layers
               if adaround_fits(layer) and re.fullmatch(layers, layer.name)]
    if not targets:
        return copy
    probe = keras.Model(model.inputs, [layer.input for layer in targets])
    inputs = probe.predict(x, batch_size=256, verbose=0)
    if len(targets) == 1:
        inputs = [inputs]
    for layer, xin in zip(targets, inputs, strict=True):
        copy.get_layer(layer.name).kernel.assign(adaround_kernel(layer, xin, iterations))
    return copy
