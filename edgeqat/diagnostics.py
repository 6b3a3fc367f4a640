"""Per-layer quantization error and layer sensitivity of an integer TFLite model.

Two routes to the per-layer error, both reporting, for each quantized op output:
``rmse_steps`` (RMSE between float and dequantized values, divided by the tensor's
quantization step: about 0.29 is pure rounding noise), ``sqnr_db`` (signal-to-
quantization-noise ratio of the whole tensor, 10 log10(sum f^2 / sum (f - q)^2)) and
``channel_sqnr_db`` (the same per channel, averaged in dB over channels that carry
signal). Layers are ranked by the lower of the two SQNRs: one outlier channel that blows
up a per-tensor activation range keeps rmse_steps small (the step is huge) and even the
whole-tensor SQNR high (the outlier carries the energy), while every other channel is
rounded away, which the channel SQNR shows. Metrics are averaged over samples.

* ``ptq_layer_errors``: TensorFlow's ``tf.lite.experimental.QuantizationDebugger`` on the
  NumericVerify-instrumented PTQ model. Each op is checked layer by layer: the float and
  the quantized op see the same (quantized) input, so an error is the layer's own.
* ``direct_layer_errors``: for a model the debugger cannot instrument (a QAT model, whose
  ranges come from training): runs the TFLite model keeping every intermediate tensor and
  compares each with the Keras model's output of the same layer. Errors accumulate along
  the network here.

``sensitivity`` ranks layers by the accuracy regained when that one layer stays float
(or, ``how="only"``, lost when only that layer is quantized), using TF's selective
quantization (``denylisted_nodes``) on one calibration.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

import numpy as np

from edgeqat.graph import node_in
from edgeqat.inspect import layers_named
from edgeqat.keras import keras
from edgeqat.modes import MODES, Mode
from edgeqat.ptq import Calibrated, adaround_fits, quantize, verify_target


@dataclass(frozen=True)
class LayerError:
    """Quantization error of one op output (a Keras layer, or a fused group of them)."""

    layer: str  # the Keras layer the tensor belongs to (the weighted one of a fused group)
    tensor: str  # TFLite tensor name
    rmse_steps: float
    sqnr_db: float
    channel_sqnr_db: float
    scale: float
    elements: int

    @property
    def score_db(self) -> float:
        """What layers are ranked by (lower is worse)."""
        return min(self.sqnr_db, self.channel_sqnr_db)

    def to_dict(self) -> dict:
        return {"layer": self.layer, "tensor": self.tensor, "rmse_steps": self.rmse_steps,
                "sqnr_db": self.sqnr_db, "channel_sqnr_db": self.channel_sqnr_db,
                "score_db": self.score_db, "scale": self.scale, "elements": self.elements}


@dataclass(frozen=True)
class Diagnostics:
    """Per-layer errors of one TFLite model against a reference."""

    model: str  # which artifact, e.g. "ptq_int8"
    method: str  # "quantization_debugger" | "intermediate_tensors"
    reference: str  # what it is compared with
    samples: int
    layers: tuple[LayerError, ...]

    def worst(self, n: int = 3) -> list[LayerError]:
        """The ``n`` layers with the lowest SQNR (``score_db``), worst first."""
        return sorted(self.layers, key=lambda e: e.score_db)[:n]

    def to_dict(self, worst: int = 3) -> dict:
        return {"model": self.model, "method": self.method, "reference": self.reference,
                "samples": self.samples, "layers": [e.to_dict() for e in self.layers],
                "worst": [e.layer for e in self.worst(worst)]}


MAX_DB = 120.0  # reported when the quantized values are exact


def _sqnr(f: np.ndarray, q: np.ndarray) -> float:
    noise = float(np.sum((f - q) ** 2))
    signal = float(np.sum(f**2))
    if noise <= 0:
        return MAX_DB
    return float(min(10 * np.log10(max(signal, 1e-30) / noise), MAX_DB))


def _channel_sqnr(f: np.ndarray, q: np.ndarray) -> float:
    """Mean over channels (last axis) with signal of each channel's SQNR in dB."""
    c = f.shape[-1] if f.ndim else 1
    f2, d2 = f.reshape(-1, c), (f - q).reshape(-1, c)
    signal, noise = np.sum(f2**2, axis=0), np.sum(d2**2, axis=0)
    live = signal > 0
    if not live.any():
        return float("nan")
    db = 10 * np.log10(signal[live] / np.maximum(noise[live], 1e-30))
    return float(np.mean(np.minimum(db, MAX_DB)))


def layer_of(tensor: str, model: keras.Model) -> str | None:
    """The Keras layer a TFLite tensor name comes from (the weighted one of a fused op).

    TFLite names a fused op's output after all the ops fused into it, separated by ``;``
    (``m/conv_relu/Relu;m/conv_bn/FusedBatchNormV3;m/conv/Conv2D``).
    """
    names = {layer.name: layer for layer in model.layers}
    found = layers_named(tensor, names)
    if not found:
        return None
    weighted = [n for n in found if adaround_fits(names[n])
                or adaround_fits(getattr(names[n], "layer", None))]
    return weighted[0] if weighted else found[0]


def _last_layer_of(tensor: str, model: keras.Model) -> str | None:
    """The latest (in graph order) Keras layer named in a tensor name: its output matches."""
    order = {layer.name: i for i, layer in enumerate(model.layers)}
    found = layers_named(tensor, order)
    return max(found, key=order.get) if found else None


def _output_layer(model: keras.Model) -> str:
    return model.outputs[0].node.layer.name


def _source_layer(i: int, name: str, out_index: int, model: keras.Model) -> str | None:
    """The Keras layer whose output TFLite tensor ``i`` (named ``name``) holds: the model
    output is named after the signature, not the layer."""
    return _output_layer(model) if i == out_index else _last_layer_of(name, model)


def _quantized(d: dict | None) -> bool:
    return d is not None and d["quantization"][0] != 0 and d["dtype"] != np.float32


def _run_keeping(interp, inp: dict, details: dict, indices, x: np.ndarray
                 ) -> dict[int, np.ndarray]:
    """Tensors ``indices`` of a preserve-all-tensors interpreter, dequantized, for every
    sample of ``x`` (concatenated along the batch axis)."""
    values: dict[int, list[np.ndarray]] = {i: [] for i in indices}
    for sample in x:
        interp.set_tensor(inp["index"], _quantize_input(sample[None], inp))
        interp.invoke()
        for i in values:
            values[i].append(_dequantize(interp.get_tensor(i), details[i]))
    return {i: np.concatenate(v) for i, v in values.items()}


def ptq_layer_errors(cal: Calibrated, model: keras.Model, x: np.ndarray,
                     name: str = MODES[Mode.INT8].ptq_name) -> Diagnostics:
    """Per-layer error of the PTQ model of ``cal`` via TF's QuantizationDebugger.

    Args:
      cal: the calibration the PTQ model was quantized from.
      model: the float Keras model (for layer names).
      x: inputs to run (a few dozen calibration samples suffice).
      name: the artifact name to report.
    """
    import tensorflow as tf

    def direct(metric):
        def fn(f, q, scale, zero_point):
            return metric(f, (q.astype(np.float32) - zero_point) * scale, scale)

        return fn

    options = tf.lite.experimental.QuantizationDebugOptions(layer_direct_compare_metrics={
        "sqnr_db": direct(lambda f, q, s: _sqnr(f, q)),
        "channel_sqnr_db": direct(lambda f, q, s: _channel_sqnr(f, q)),
        "rmse_steps": direct(lambda f, q, s: float(np.sqrt(np.mean((f - q) ** 2)) / s)),
        "scale": direct(lambda f, q, s: float(s)),
    })

    def dataset():
        for i in range(len(x)):
            yield [x[i : i + 1].astype(np.float32)]

    debugger = tf.lite.experimental.QuantizationDebugger(
        quant_debug_model_content=quantize(cal, debug=True), debug_dataset=dataset,
        debug_options=options)
    debugger.run()
    out_layer = _output_layer(model)
    errors = []
    for verify_name, stats in debugger.layer_statistics.items():
        tensor = verify_target(verify_name)
        layer = layer_of(tensor, model)
        if layer is None:  # the model output is named after the signature, not the layer
            layer = out_layer
        errors.append(LayerError(layer, tensor, float(stats["rmse_steps"]),
                                 float(stats["sqnr_db"]), float(stats["channel_sqnr_db"]),
                                 float(stats["scale"]),
                                 int(stats["num_elements"])))
    return Diagnostics(name, "quantization_debugger", "float model, layer by layer", len(x),
                       tuple(errors))


def _interpreter(model: bytes, preserve: bool = False):
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_content=model, experimental_preserve_all_tensors=preserve)
    interp.allocate_tensors()
    return interp


def _quantize_input(x: np.ndarray, detail: dict) -> np.ndarray:
    scale, zp = detail["quantization"]
    if detail["dtype"] == np.float32 or scale == 0:  # float, or int token ids as they are
        return x.astype(detail["dtype"])
    info = np.iinfo(detail["dtype"])
    return np.clip(np.round(x / scale + zp), info.min, info.max).astype(detail["dtype"])


def _dequantize(v: np.ndarray, detail: dict) -> np.ndarray:
    scale, zp = detail["quantization"]
    if scale == 0:
        return v.astype(np.float32)
    return (v.astype(np.float32) - zp) * scale


def run_tflite(model: bytes, x: np.ndarray) -> np.ndarray:
    """Dequantized outputs of a (batch-1) TFLite model for each sample of ``x``."""
    interp = _interpreter(model)
    inp, out = interp.get_input_details()[0], interp.get_output_details()[0]
    outs = []
    for sample in x:
        interp.set_tensor(inp["index"], _quantize_input(sample[None], inp))
        interp.invoke()
        outs.append(_dequantize(interp.get_tensor(out["index"]), out)[0])
    return np.stack(outs)


def output_scale(model: bytes) -> float:
    """The output quantization step of a TFLite model (0.0 for a float output)."""
    return float(_interpreter(model).get_output_details()[0]["quantization"][0])


def tflite_accuracy(model: bytes, x: np.ndarray, y: np.ndarray) -> float:
    """Top-1 accuracy of a TFLite classifier, run here on the host (LiteRT)."""
    return float((run_tflite(model, x).argmax(-1) == y).mean())


def _output_in(model: keras.Model, layer) -> object:
    """The layer's output tensor in ``model``'s own graph (``graph.node_in``)."""

    node = node_in(model, layer)
    return node.outputs if node is not None else layer.output


def direct_layer_errors(tflite: bytes, model: keras.Model, x: np.ndarray,
                        name: str = MODES[Mode.INT8].qat_name,
                        reference: str = "QAT Keras model",
                        ) -> Diagnostics:
    """Per-layer error by comparing every quantized intermediate tensor with Keras.

    Args:
      tflite: an integer TFLite model converted from ``model`` (or from its float parent
        with the same layer names).
      model: the Keras model whose layer outputs are the reference.
      x: inputs.
      name, reference: labels for the report.
    """
    interp = _interpreter(tflite, preserve=True)
    inp = interp.get_input_details()[0]
    out_detail = interp.get_output_details()[0]
    details = {d["index"]: d for d in interp.get_tensor_details()}
    pairs = []  # (tensor index, tensor name, Keras layer for the values, layer to report)
    for op in interp._get_ops_details():
        for i in op["outputs"]:
            d = details.get(i)
            if not _quantized(d):
                continue
            src = _source_layer(i, d["name"], out_detail["index"], model)
            if src is None:
                continue
            layer = layer_of(d["name"], model) or src
            if any(p[3] == layer for p in pairs):  # one row per layer: its first tensor
                continue
            pairs.append((i, d["name"], src, layer))
    probe = keras.Model(model.inputs, [_output_in(model, model.get_layer(p[2]))
                                       for p in pairs])
    refs = probe.predict(x, batch_size=256, verbose=0)
    if len(pairs) == 1:
        refs = [refs]
    q_vals = _run_keeping(interp, inp, details, [p[0] for p in pairs], x)
    errors = []
    for k, (i, tensor, _src, layer) in enumerate(pairs):
        q = q_vals[i]
        f = np.asarray(refs[k], np.float32)
        if q.size != f.size:
            continue
        f = f.reshape(q.shape)
        scale = float(details[i]["quantization"][0])
        rmse = np.mean([np.sqrt(np.mean((a - b) ** 2)) for a, b in zip(f, q, strict=True)])
        errors.append(LayerError(
            layer, tensor, float(rmse / scale),
            float(np.nanmean([_sqnr(a, b) for a, b in zip(f, q, strict=True)])),
            float(np.nanmean([_channel_sqnr(a, b) for a, b in zip(f, q, strict=True)])),
            scale, int(q.size // len(x))))
    return Diagnostics(name, "intermediate_tensors", reference, len(x), tuple(errors))


@dataclass(frozen=True)
class LayerSensitivity:
    """Accuracy of the PTQ model with one layer's output left float (or alone quantized)."""

    layer: str
    tensor: str
    accuracy: float
    delta: float  # accuracy minus the all-int8 accuracy (how="float"), or minus float
    output_rmse: float  # logits RMSE vs the float Keras model (a tie-breaker)

    def to_dict(self) -> dict:
        return {"layer": self.layer, "tensor": self.tensor, "accuracy": self.accuracy,
                "delta": self.delta, "output_rmse": self.output_rmse}


@dataclass(frozen=True)
class Sensitivity:
    how: str  # "float": each layer left float alone; "only": each layer quantized alone
    baseline_accuracy: float
    layers: tuple[LayerSensitivity, ...]  # most sensitive first
    seconds: float

    def to_dict(self) -> dict:
        return {"how": self.how, "baseline_accuracy": self.baseline_accuracy,
                "layers": [s.to_dict() for s in self.layers], "seconds": self.seconds}


def sensitivity(cal: Calibrated, model: keras.Model, x: np.ndarray, y: np.ndarray,
                how: str = "float", layers: str = ".*") -> Sensitivity:
    """Ranks layers by how much quantizing them costs, one layer at a time.

    Args:
      cal: one calibration of ``model`` (every variant re-quantizes it, no re-calibration).
      model: the float Keras model (layer names; float logits for the tie-breaker).
      x, y: evaluation data.
      how: ``float`` leaves one layer float and measures the accuracy regained against
        all-int8; ``only`` quantizes one layer and measures the loss against float.
      layers: regex on Keras layer names to consider.

    Returns:
      Layers most sensitive first: the largest regain (``float``) or loss (``only``),
      ties broken by the logits error.
    """
    start = time.perf_counter()
    reference = model.predict(x, batch_size=256, verbose=0)
    nodes = [(layer_of(t, model) or _output_layer(model), t) for t in cal.nodes()]
    nodes = [(layer, t) for layer, t in nodes if re.fullmatch(layers, layer)]
    all_names = [t for _, t in nodes]
    if how == "float":
        base = tflite_accuracy(quantize(cal), x, y)
    else:
        base = float((reference.argmax(-1) == y).mean())
    out = []
    for layer, tensor in nodes:
        denied = [tensor] if how == "float" else [t for t in all_names if t != tensor]
        logits = run_tflite(quantize(cal, float_nodes=denied), x)
        acc = float((logits.argmax(-1) == y).mean())
        rmse = float(np.sqrt(np.mean((logits - reference) ** 2)))
        out.append(LayerSensitivity(layer, tensor, acc, acc - base, rmse))
    if how == "float":
        out.sort(key=lambda s: (-s.delta, s.output_rmse))
    else:
        out.sort(key=lambda s: (s.delta, -s.output_rmse))
    return Sensitivity(how, base, tuple(out), round(time.perf_counter() - start, 2))


@dataclass(frozen=True)
class OpAgreement:
    """How one TFLite op's output differs from its Keras layers fed the op's own inputs."""

    op: str  # the TFLite op (CONV_2D, ADD, ...)
    layer: str
    tensor: str
    max_steps: float
    over_1: float  # fraction of output values more than 1 step apart


def op_agreement(tflite: bytes, model: keras.Model, x: np.ndarray) -> list[OpAgreement]:
    """Op-local fidelity of ``model`` (the QAT Keras model) to its integer TFLite model.

    For every quantized op output that names a Keras layer, the Keras layers between the
    op's activation inputs and that output are run on the TFLite model's own (dequantized)
    input tensors and compared with the op's output, in its quantization steps. Unlike
    ``direct_layer_errors``, nothing accumulates: a difference is the op's own. In a deep
    network with random weights, the rare 1-step differences at rounding ties (XNNPACK's
    and the reference kernels' fixed-point differ from each other too) are amplified from
    layer to layer, so whole-model agreement measures the network's conditioning as much
    as the simulation; this measures the simulation.

    Ops whose inputs or output name no Keras tensor of ``model`` (inside composite layers
    such as MultiHeadAttention) are left out.
    """
    interp = _interpreter(tflite, preserve=True)
    inp = interp.get_input_details()[0]
    out_detail = interp.get_output_details()[0]
    details = {d["index"]: d for d in interp.get_tensor_details()}
    ops = interp._get_ops_details()
    produced = {i for op in ops for i in op["outputs"]}

    def keras_tensor(i):
        if i == inp["index"]:
            return model.inputs[0]
        src = _source_layer(i, details[i]["name"], out_detail["index"], model)
        return None if src is None else _output_in(model, model.get_layer(src))

    probes = []  # (op name, input tensor indices, output index, layer, sub-model)
    seen = set()
    for op in ops:
        for o in op["outputs"]:
            d = details.get(o)
            if o in seen or not _quantized(d):
                continue
            ins = list(dict.fromkeys(i for i in op["inputs"]
                                     if i >= 0 and (i in produced or i == inp["index"])))
            k_in = [keras_tensor(i) for i in ins]
            k_out = keras_tensor(o)
            if k_out is None or not ins or any(t is None for t in k_in) or \
                    len({id(t) for t in k_in}) < len(k_in) or any(t is k_out for t in k_in):
                continue
            try:
                sub = keras.Model(k_in, k_out)
            except (ValueError, KeyError, TypeError):  # not a self-contained path
                continue
            seen.add(o)
            layer = (layer_of(d["name"], model)  # the model output is named otherwise
                     or _source_layer(o, d["name"], out_detail["index"], model) or d["name"])
            probes.append((op["op_name"], ins, o, layer, sub))
    values = _run_keeping(interp, inp, details,
                          {i for _op, ins, o, *_ in probes for i in (*ins, o)}, x)
    result = []
    for op_name, ins, o, layer, sub in probes:
        feeds = [values[i] for i in ins]
        ref = np.asarray(sub(feeds if len(feeds) > 1 else feeds[0], training=False))
        got = values[o]
        if ref.size != got.size:
            continue
        steps = np.abs(ref.reshape(got.shape) - got) / float(details[o]["quantization"][0])
        result.append(OpAgreement(op_name, layer, details[o]["name"], float(steps.max()),
                                  float((steps > 1 + 1e-3).mean())))
    return result
