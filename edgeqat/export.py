"""Export preparation: make a QAT model compute exactly what its flatbuffer computes.

``prepare_for_export(model, mode, arch)`` gives concatenated tensors one range, settles
zero points that are rounding ties, snaps biases onto TFLite's int32 grid and installs
the kernel rounding of ``mode`` on ``arch`` (``edgeqat.requant``). Call it on the
fine-tuned model before ``convert.to_tflite`` and before comparing the two.
"""

from __future__ import annotations

import numpy as np

from edgeqat import requant
from edgeqat.graph import input_quantizers, input_scale, wrapper_classes
from edgeqat.keras import keras
from edgeqat.layer_kinds import AVERAGE_POOLS, GLOBAL_AVERAGE_POOLS
from edgeqat.modes import Mode
from edgeqat.quantizers import NEAR_ZERO, Quantizer


def prepare_for_export(qat_model: keras.Model, mode: str = Mode.INT8,
                       arch: str | None = None) -> keras.Model:
    """Returns the model to hand to the converter for ``mode``: ``qat_model``, made to
    compute what the ``mode`` flatbuffer computes on ``arch`` (default: this machine's
    CPU), in place.

    No swap is needed: every edgeqat quantizer's inference-mode graph (the one the
    converter traces with ``training=False``) is a bare FakeQuantWithMinMaxVars[PerChannel]
    on the learned range; LSQ's custom gradient exists only in training mode. Three things
    make the Keras model's inference mode equal the kernels':

    * an observed range whose zero point is a rounding tie (inputs in exactly
      ``[-1, 1]``) is stored as the converter rounds it (``whole_zero_points``);
    * biases are put on the int32 grid TFLite stores them on (``snap_biases``);
    * where ``mode``'s kernels round differently from the float graph (int4 weights,
      16x8), the affected outputs round as the kernel does (``requant.install``; left out
      of the converted graph, and not saved with the model).

    The flatbuffer is the same either way.
    """
    share_scale_ranges(qat_model)
    identity_pool_ranges(qat_model)
    whole_zero_points(qat_model)
    snap_biases(qat_model)
    requant.install(qat_model, mode, arch)
    return qat_model


def share_scale_ranges(qat_model: keras.Model) -> int:
    """Gives a concatenation's or an average pooling's output and every input one range
    (the union of theirs).

    TFLite's int8 CONCATENATION needs its inputs on its output's scale; the converter
    inserts a requantizing QUANTIZE op before each input whose range differs (DenseNet's
    dense blocks, Inception's mixed blocks). AVERAGE_POOL_2D needs its output on its
    input's scale, and the converter refuses a model where they differ (DenseNet's
    transitions). Ranges linked through such layers (the input of one is the output of
    another, as in DenseNet) form one group. Only observed
    ranges (``observes_range``: min/max trackers) are widened; a group holding a learned
    or fixed range is left as it is. Changes ``qat_model`` in place.

    Returns:
      How many ranges were changed.
    """
    wrapper_cls, _ = wrapper_classes()
    parent: dict[int, int] = {}
    members: dict[int, tuple] = {}

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def add(owner):
        key = id(owner[1])
        parent.setdefault(key, key)
        members[key] = owner
        return key

    for layer in qat_model.layers:
        if not (isinstance(layer, wrapper_cls)
                and isinstance(layer.layer, (keras.layers.Concatenate, *AVERAGE_POOLS))):
            continue
        if not getattr(layer, "_output_quantizers", None):
            continue
        out = add((layer._output_quantizers[0], layer._output_quantizer_vars))
        for owner in input_quantizers(layer, qat_model):
            if owner is not None:
                parent[find(add(owner))] = find(out)
    groups: dict[int, list] = {}
    for key in members:
        groups.setdefault(find(key), []).append(members[key])
    changed = 0
    for group in groups.values():
        if len(group) < 2 or not all(q.observes_range and {"min", "max"} <= set(v)
                                     for q, v in group):
            continue
        lo = min(float(v["min"].numpy()) for _, v in group)
        hi = max(float(v["max"].numpy()) for _, v in group)
        for _, v in group:
            changed += int(float(v["min"].numpy()) != lo or float(v["max"].numpy()) != hi)
            v["min"].assign(lo)
            v["max"].assign(hi)
    return changed


def identity_pool_ranges(qat_model: keras.Model) -> int:
    """Gives a global average pooling over a single position its input's range.

    Such a pooling is an identity (at 32 px: the squeeze-excite blocks of MobileNetV3's
    last stages, its head), and where it keeps the dimensions the converter drops its
    MEAN with the pooling's FakeQuant: the next op reads the input's tensor, on the
    input's grid. The Keras model still rounded the values onto the pooling's own range,
    observed on the same values but averaged over other batches, a little off the
    input's (MobileNetV3Small: a step 0.05% wider), so a value moved by up to half a step
    and the convolution after it by up to one. With the input's range that FakeQuant
    keeps every value; a MEAN the converter keeps (without keepdims) then requantizes
    onto the same grid, an identity too. Only an observed output range
    (``observes_range``) fed by an observed range is set. Changes ``qat_model`` in
    place.

    Returns:
      How many ranges were changed.
    """
    wrapper_cls, _ = wrapper_classes()
    changed = 0
    for layer in qat_model.layers:
        if not (isinstance(layer, wrapper_cls)
                and isinstance(layer.layer, GLOBAL_AVERAGE_POOLS)
                and getattr(layer, "_output_quantizers", None)):
            continue
        shape = tuple(layer.input_shape)
        positions = shape[2:] if layer.layer.data_format == "channels_first" else shape[1:-1]
        if any(d != 1 for d in positions):
            continue
        owners = input_quantizers(layer, qat_model)
        if len(owners) != 1 or owners[0] is None:
            continue
        (q_in, v_in), q_out, v_out = (owners[0], layer._output_quantizers[0],
                                      layer._output_quantizer_vars)
        if not (q_in.observes_range and q_out.observes_range and q_in.num_bits == q_out.num_bits
                and {"min", "max"} <= set(v_in) and {"min", "max"} <= set(v_out)):
            continue
        same = all(float(v_out[k].numpy()) == float(v_in[k].numpy()) for k in ("min", "max"))
        for k in ("min", "max"):
            v_out[k].assign(v_in[k].numpy())
        changed += int(not same)
    return changed


def range_owners(qat_model: keras.Model) -> list[tuple]:
    """Every (activation quantizer, its variables) of ``qat_model``: the input
    ``QuantizeLayer``s' and the wrappers' output quantizers."""
    wrapper_cls, quantize_layer_cls = wrapper_classes()
    owners = []
    for layer in qat_model.layers:
        if isinstance(layer, quantize_layer_cls) and layer.quantizer is not None:
            owners.append((layer.quantizer, layer.quantizer_vars))
        elif isinstance(layer, wrapper_cls) and getattr(layer, "_output_quantizers", None):
            owners.append((layer._output_quantizers[0], layer._output_quantizer_vars))
    return owners


# How close to a half a zero point must be for TensorFlow's FakeQuant kernel and the
# converter to possibly round it differently: both compute it as -min / step, in float32
# and in double, whose errors at |zero point| <= 2^15 stay far below this.
ZERO_POINT_TIE = 1e-3


def whole_zero_points(qat_model: keras.Model) -> int:
    """Moves each observed range whose zero point is a rounding tie onto the grid with
    the zero point the converter chooses.

    FakeQuant puts zero on its grid by rounding the zero point ``-min / step`` (``step =
    (max - min) / (2^b - 1)``). A range symmetric about zero, such as that of inputs
    normalized to exactly ``[-1, 1]``, makes it ``127.5``: TensorFlow's kernel, in
    float32, rounds it to 127 (``[-1, 1]`` becomes ``[-127, 128]`` steps, so 1.0 is kept)
    and the converter, in double, to 128 (``[-128, 127]``: the int8 input clips 1.0 to
    127 steps), one step apart on every input pixel at 1.0. Such a range is stored as
    ``[-z, 2^b - 1 - z]`` steps with ``z`` the tie rounded up, which both then keep
    (the step is unchanged). Only observed ranges (``observes_range``) below 16 bits are
    touched: learned and fixed ranges are whole-step multiples already, and 16-bit ranges
    are symmetric with zero point 0. Changes ``qat_model`` in place.

    Returns:
      How many ranges were moved.
    """
    moved = 0
    for quantizer, v in range_owners(qat_model):
        if not (quantizer.observes_range and {"min", "max"} <= set(v)
                and quantizer.num_bits < 16):
            continue
        lo = min(float(v["min"].numpy()), 0.0)  # what the quantizer hands FakeQuant
        hi = max(float(v["max"].numpy()), 0.0)
        if hi - lo <= NEAR_ZERO:  # the converter widens it (quantizers.converter_range)
            continue
        levels = 2**quantizer.num_bits - 1
        step = (hi - lo) / levels
        zero = -lo / step
        if abs(zero - np.floor(zero) - 0.5) > ZERO_POINT_TIE:
            continue
        z = np.floor(zero) + 1.0
        v["min"].assign(-z * step)
        v["max"].assign((levels - z) * step)
        moved += 1
    return moved


def snap_biases(qat_model: keras.Model) -> float:
    """Puts every quantized layer's bias on the int32 grid TFLite stores it on.

    TFLite quantizes a convolution's or dense layer's bias to int32 with step
    ``s_in * s_w`` (input step times weight step, per channel); the Keras QAT graph adds
    the float bias. When ``s_in * s_w`` is not small against the output step (coarse LSQ
    input steps, 4-bit weights) that rounding moves outputs by a step and flips top-1 on
    near ties. Snapping the Keras bias to ``round(b / (s_in s_w)) * s_in s_w`` makes the
    Keras model compute exactly what ships; the flatbuffer is unchanged by it (the
    converter rounds to the same integers). Changes ``qat_model`` in place.

    Returns:
      The largest change made to a bias, in units of its grid step (<= 0.5).
    """
    wrapper_cls, _ = wrapper_classes()
    worst = 0.0
    for layer in qat_model.layers:
        if not isinstance(layer, wrapper_cls) or not layer._weight_vars:
            continue
        inner = layer.layer
        bias = getattr(inner, "bias", None)
        if bias is None or not getattr(inner, "use_bias", True):
            continue
        kernel, quantizer, qvars = layer._weight_vars[0]
        if not isinstance(quantizer, Quantizer):
            continue  # tfmot's own quantizers declare no step
        s_in = input_scale(layer, qat_model)
        if s_in is None:
            continue
        s_w = quantizer.scale(qvars, kernel)
        grid = np.asarray(s_in, np.float64) * np.asarray(s_w, np.float64)
        b = bias.numpy().astype(np.float64)
        if isinstance(inner, keras.layers.DepthwiseConv2D) and np.size(grid) > 1:
            grid = grid.reshape(-1)
        snapped = np.round(b / grid) * grid
        worst = max(worst, float(np.max(np.abs(snapped - b) / grid)) if b.size else 0.0)
        bias.assign(snapped.astype(np.float32))
    return worst
