"""tfmot ``QuantizeConfig``s: which tensors of a layer are quantized, and by what.

Annotation (``edgeqat.annotate``) first rewrites a model into a canonical float form in
which every layer is one of the kinds of ``edgeqat.layer_kinds`` (nested models inlined,
BN folded, Conv1D and per-channel Dense expressed as Conv2D, SeparableConv split,
Rescaling/Normalization, standalone BN and LayerScale as ``ScalarOp``/``ChannelOp``
MUL and ADD, TFOpLambda as
``Add``/``Multiply``/``ScalarOp``/``ReLU``, non-fusable activations split out). This
module then makes, per layer, the quantizers its kind calls for (``layer_kind``,
``make_quantize_config``).

A layer of none of these kinds is unsupported: the policy reports it, it is never left in
float silently.
"""

from __future__ import annotations

import copy
import functools

from edgeqat import quantizers as q
from edgeqat.config import ACTIVATION_QUANTIZERS, WEIGHT_QUANTIZERS
from edgeqat.keras import keras, tfmot
from edgeqat.layer_kinds import OUTPUT_ONLY, PASSTHROUGH, BnFold, weighted
from edgeqat.layers import ScalarOp

L = keras.layers

# Activations TFLite fuses into the op before it (``layer_kinds.FUSING_LAYERS``).
FUSABLE_ACTIVATIONS = ("linear", "relu", "relu6")

# Element-wise activations with an integer TFLite kernel.
ACTIVATIONS = ("linear", "relu", "relu6", "sigmoid", "tanh", "softmax", "gelu",
               "hard_sigmoid", "elu")

NONNEGATIVE_ACTIVATIONS = ("relu", "relu6", "sigmoid", "softmax", "hard_sigmoid")

# TFLite's int8 LOGISTIC, SOFTMAX and TANH kernels have a fixed output scale and zero
# point (1/256 and -128; 1/128 and 0). Any other range on their output makes the converter
# add a requantize op after them and, at a model output, a DEQUANTIZE -> QUANTIZE pair (a
# float tensor) when the two scales differ in the last float bit. FakeQuant ranges that
# give exactly those parameters at 8 bits:
FIXED_OUTPUT_RANGES = {"sigmoid": (0.0, 255.0 / 256.0), "softmax": (0.0, 255.0 / 256.0),
                       "tanh": (-1.0, 127.0 / 128.0)}


def activation_name(layer) -> str | None:
    """The name of a layer's activation function, or None when it has none."""
    act = getattr(layer, "activation", None)
    if act is None:
        return None
    name = getattr(act, "__name__", str(act))
    return {"silu": "swish"}.get(name, name)


def relu_bound(layer) -> float | None:
    """The upper bound of a ReLU-like layer's output (inf for plain ReLU), else None."""
    if isinstance(layer, L.ReLU):
        if float(layer.negative_slope) != 0.0 or float(layer.threshold) != 0.0:
            return None
        return float("inf") if layer.max_value is None else float(layer.max_value)
    act = activation_name(layer)
    if isinstance(layer, L.Activation | ScalarOp) or act is None:
        return {"relu": float("inf"), "relu6": 6.0}.get(act)
    return {"relu": float("inf"), "relu6": 6.0}.get(act)


def is_fusable_relu(layer) -> bool:
    """A stand-alone ReLU / ReLU6 layer: TFLite fuses it into the op before it."""
    return isinstance(layer, L.ReLU | L.Activation) and relu_bound(layer) is not None


def fixed_output_range(layer) -> tuple[float, float] | None:
    """The (min, max) TFLite's int8 kernel fixes for this layer's output, if it fixes one."""
    if isinstance(layer, L.Softmax):
        return FIXED_OUTPUT_RANGES["softmax"]
    if isinstance(layer, L.Activation):
        return FIXED_OUTPUT_RANGES.get(activation_name(layer))
    return None


def is_nonnegative(layer) -> bool:
    """Whether the layer's output can never be negative (unsigned activation grid)."""
    if relu_bound(layer) is not None:
        return True
    return activation_name(layer) in NONNEGATIVE_ACTIVATIONS or isinstance(layer, L.Softmax)


def layer_kind(layer) -> str | None:
    """``passthrough``, ``weights``, ``output``, or None (unsupported)."""
    if isinstance(layer, L.Activation) and activation_name(layer) == "linear":
        return "passthrough"
    if isinstance(layer, PASSTHROUGH):
        return "passthrough"
    if weighted(layer) is not None:
        return "weights"
    if isinstance(layer, L.Activation):
        return "output" if activation_name(layer) in ACTIVATIONS else None
    if isinstance(layer, OUTPUT_ONLY):
        return "output"
    return None


def _get(obj, path: str):
    return functools.reduce(getattr, path.split("."), obj)


def _set(obj, path: str, value) -> None:
    *parents, leaf = path.split(".")
    setattr(functools.reduce(getattr, parents, obj), leaf, value)


def _serialize(quantizer):
    if quantizer is None:
        return None
    return {"class_name": type(quantizer).__name__, "config": quantizer.get_config()}


def _deserialize(config):
    if config is None:
        return None
    if config["class_name"] not in q.REGISTRY:
        raise ValueError(f"unknown edgeqat quantizer {config['class_name']!r}")
    return q.REGISTRY[config["class_name"]].from_config(config["config"])


class LayerQuantizeConfig(tfmot.quantization.keras.QuantizeConfig):
    """Quantizes a layer's named weights with one quantizer and its output with another.

    Args:
      weight_attrs: attribute paths of the weights to quantize (``"kernel"``,
        ``"_query_dense.kernel"``); each is read before the layer's call and replaced by
        its fake-quantized value, as tfmot's own configs do.
      weight_quantizer: the quantizer for every listed weight (None: no weights).
      output_quantizer: the quantizer for the layer's output (None: the output is left
        for the next op, e.g. a ReLU that TFLite fuses into this layer).
    """

    def __init__(self, weight_attrs=(), weight_quantizer=None, output_quantizer=None):
        self.weight_attrs = tuple(weight_attrs)
        self.weight_quantizer = weight_quantizer
        self.output_quantizer = output_quantizer
        # One quantizer object per weight, so each owns its variables (several weights
        # may share a name, as MultiHeadAttention's four kernels do).
        self._weight_quantizers = [copy.deepcopy(weight_quantizer) for _ in self.weight_attrs]

    def get_weights_and_quantizers(self, layer):
        return [(_get(layer, a), wq)
                for a, wq in zip(self.weight_attrs, self._weight_quantizers, strict=True)]

    def set_quantize_weights(self, layer, quantize_weights):
        if len(quantize_weights) != len(self.weight_attrs):
            raise ValueError(f"{layer.name}: expected {len(self.weight_attrs)} weights, "
                             f"got {len(quantize_weights)}")
        for attr, weight in zip(self.weight_attrs, quantize_weights, strict=True):
            _set(layer, attr, weight)

    def get_activations_and_quantizers(self, layer):
        return []

    def set_quantize_activations(self, layer, quantize_activations):
        pass

    def get_output_quantizers(self, layer):
        return [self.output_quantizer] if self.output_quantizer is not None else []

    def get_config(self):
        return {"weight_attrs": list(self.weight_attrs),
                "weight_quantizer": _serialize(self.weight_quantizer),
                "output_quantizer": _serialize(self.output_quantizer)}

    @classmethod
    def from_config(cls, config):
        return cls(config["weight_attrs"], _deserialize(config["weight_quantizer"]),
                   _deserialize(config["output_quantizer"]))

    def __eq__(self, other):
        return type(self) is type(other) and self.get_config() == other.get_config()

    def __ne__(self, other):
        return not self.__eq__(other)

    def __repr__(self):
        return (f"LayerQuantizeConfig({list(self.weight_attrs)}, {self.weight_quantizer!r}, "
                f"{self.output_quantizer!r})")


def weight_quantizer(kind: str, bits: int, per_channel_ok: bool, lsq_init: str = "mse",
                     depthwise: bool = False):
    """A weight quantizer of ``kind`` (a policy name, ``config.WEIGHT_QUANTIZERS``); per
    channel only where the layer converts that way (``depthwise``: the kernel's channels
    are its last two axes)."""
    if kind not in WEIGHT_QUANTIZERS:
        raise ValueError(f"weight quantizer {kind!r} is not one of "
                         f"{', '.join(WEIGHT_QUANTIZERS)}")
    if kind == "lsq":
        # LSQ learns its steps on the last axis; a depthwise kernel's is the multiplier.
        return q.LsqQuantizer(bits, per_channel=per_channel_ok and not depthwise, signed=True,
                              narrow_range=True, init=lsq_init)
    return q.PerChannelWeightQuantizer(bits, per_channel=kind == "per_channel" and
                                       per_channel_ok, depthwise=depthwise)


def activation_quantizer(kind: str, bits: int, layer=None):
    """An output quantizer of ``kind`` (a policy name, ``config.ACTIVATION_QUANTIZERS``)
    suited to ``layer``'s output sign and bound.

    ``relu6`` gives the fixed [0, 6] quantizer to layers whose output is ReLU6-bounded
    and the moving-average one to the rest of the layers the rule matches; ``pact`` and
    ``lsq`` use an unsigned grid where the output is provably non-negative.
    """
    if kind not in ACTIVATION_QUANTIZERS:
        raise ValueError(f"activation quantizer {kind!r} is not one of "
                         f"{', '.join(ACTIVATION_QUANTIZERS)}")
    nonneg = layer is not None and is_nonnegative(layer)
    fixed = fixed_output_range(layer) if layer is not None and bits == 8 else None
    if fixed is not None:
        return q.FixedRangeQuantizer(bits, *fixed)
    if kind == "relu6" and layer is not None and relu_bound(layer) == 6.0:
        return q.Relu6Quantizer(bits)
    if kind == "pact":
        return q.PactQuantizer(bits, signed=not nonneg)
    if kind == "lsq":
        return q.LsqQuantizer(bits, per_channel=False, signed=not nonneg)
    if kind == "percentile":
        return q.PercentileQuantizer(bits)
    if kind == "mse":
        return q.MseRangeQuantizer(bits)
    return q.MovingAverageRangeQuantizer(bits)  # moving_average, relu6 off ReLU6 outputs


def make_quantize_config(layer, *, weight_kind: str = "per_channel", weight_bits: int = 8,
                         activation_kind: str = "moving_average", activation_bits: int = 8,
                         quantize_output: bool = True,
                         lsq_init: str = "mse") -> LayerQuantizeConfig | None:
    """The config for one canonical layer, or None for a pass-through layer.

    Raises:
      ValueError: the layer kind is unsupported (the policy turns this into a UserError
        that lists every such layer).
    """
    kind = layer_kind(layer)
    if kind is None:
        raise ValueError(f"{layer.name} ({type(layer).__name__}) has no quantize config")
    if kind == "passthrough":
        return None
    out = activation_quantizer(activation_kind, activation_bits, layer) if quantize_output \
        else None
    if isinstance(layer, L.Embedding):
        out = None  # GATHER keeps the table's scale
    if kind == "weights":
        row = weighted(layer)
        return LayerQuantizeConfig(row.weights, weight_quantizer(
            weight_kind, weight_bits, row.per_channel, lsq_init,
            depthwise=row.bn_fold == BnFold.DEPTHWISE), out)
    return LayerQuantizeConfig((), None, out)


def input_quantizer(activation_kind: str = "moving_average", activation_bits: int = 8):
    """The quantizer for a model input (inputs are signed in general)."""
    if activation_kind == "relu6":
        activation_kind = "moving_average"
    return activation_quantizer(activation_kind, activation_bits, None)


CONFIGS = (LayerQuantizeConfig,)
