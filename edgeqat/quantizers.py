"""tfmot ``Quantizer`` subclasses whose forward pass is a TFLite-convertible FakeQuant.

The TFLite converter recognises quantization only through
``tf.quantization.fake_quant_with_min_max_vars`` (per tensor) and
``fake_quant_with_min_max_vars_per_channel`` (last axis). Every quantizer here computes its
forward value with exactly one of those ops, fed with the range it learned or tracked; in
inference mode (``training=False``, the mode the converter traces) the graph holds nothing
else. Learned parameters whose paper gradient differs from FakeQuant's (LSQ) use a
``tf.custom_gradient`` only in training mode, so the exported graph is a plain FakeQuant.

Conventions (TFLite int8): weights symmetric, narrow range ``[-(2^(b-1)-1), 2^(b-1)-1]``;
activations asymmetric per tensor with zero exactly representable (FakeQuant nudges
``min``/``max`` so that it is; the range trackers below also force ``min <= 0 <= max``).

Variables are created on the layer that owns the quantizer (tfmot's contract); their names
are made unique per layer so a layer with several quantized tensors of one name
(MultiHeadAttention's four ``kernel``s) saves and loads.
"""

from __future__ import annotations

import abc
import math

import numpy as np

from edgeqat.keras import keras, tf, tfmot

_Quantizer = tfmot.quantization.keras.quantizers.Quantizer
_EPS = 1e-8
# The converter widens a range narrower than 1e-6 to at least [-5e-7, 5e-7]
# (``ExpandVerySmallRange``, kNearZeroTolerance in TensorFlow's MLIR quantizer), per channel
# for weights: a ConvNeXt kernel with LayerScale (1e-6) folded in is stored on that wider
# grid, so the Keras model quantizes to it too.
NEAR_ZERO = 1e-6
SMALLEST_HALF_RANGE = NEAR_ZERO / 2


def converter_range(lo, hi):
    """``[lo, hi]`` (tensors) as the converter stores it (``ExpandVerySmallRange``)."""
    small = hi - lo <= NEAR_ZERO
    return (tf.where(small, tf.minimum(lo, -SMALLEST_HALF_RANGE), lo),
            tf.where(small, tf.maximum(hi, SMALLEST_HALF_RANGE), hi))


def fake_quant(x, lo, hi, num_bits: int, narrow_range: bool = False, per_channel: bool = False):
    """The one forward op every quantizer emits (the converter's recognised pattern)."""
    if per_channel:
        return tf.quantization.fake_quant_with_min_max_vars_per_channel(
            x, lo, hi, num_bits=num_bits, narrow_range=narrow_range)
    return tf.quantization.fake_quant_with_min_max_vars(
        x, lo, hi, num_bits=num_bits, narrow_range=narrow_range)


def activation_fake_quant(x, lo, hi, num_bits: int, narrow_range: bool = False):
    """``fake_quant`` for an activation (per tensor).

    At 16 bits the range is made symmetric, ``[-a, a]`` with ``a = max(-lo, hi)`` on the
    narrow grid, whose zero point is 0: TFLite's int16 activations (16x8 mode) must have
    zero point 0, and with this grid the converter keeps the trained range exactly.
    """
    if num_bits == 16:
        a = tf.maximum(-lo, hi)
        return fake_quant(x, -a, a, 16, narrow_range=True)
    return fake_quant(x, lo, hi, num_bits, narrow_range)


def activation_scale(lo: float, hi: float, num_bits: int, narrow_range: bool = False):
    """The step ``activation_fake_quant`` uses for the range ``[lo, hi]``."""
    if num_bits == 16:
        return np.float64(max(-lo, hi) / (2**15 - 1))
    return np.float64((hi - lo) / (2**num_bits - (2 if narrow_range else 1)))


def observed(x):
    """What a range observer sees of ``x``: its finite values, the rest as 0 (inside
    every range). A saturating value (``rsqrt`` of a variance the int8 grid rounded to 0
    is ``inf``; TFLite's kernel writes the top of the output range) clips to the range
    the observer learns from the others, as in the int8 kernel, instead of widening it
    to infinity."""
    x = tf.stop_gradient(x)
    return tf.where(tf.math.is_finite(x), x, tf.zeros_like(x))


def _unique(layer, name: str) -> str:
    taken = {w.name.split("/")[-1].split(":")[0] for w in layer.weights}
    if name not in taken:
        return name
    i = 1
    while f"{name}_{i}" in taken:
        i += 1
    return f"{name}_{i}"


def _built_once(quantizer, layer, name, make):
    """Builds a quantizer's variables once per (layer, quantizer, name).

    tfmot's ``QuantizeLayer`` builds its quantizer again when a ``.keras`` file is loaded;
    returning the first set keeps the variable list the one that was saved.
    """
    cache = layer.__dict__.setdefault("_edgeqat_quantizer_vars", {})  # not tracked by Keras
    key = (name, id(quantizer))
    if key not in cache:
        cache[key] = make()
    return cache[key]


def check_bits(num_bits: int) -> None:
    """Raises ValueError unless ``num_bits`` is a width FakeQuant supports (2..16)."""
    if not 2 <= int(num_bits) <= 16:
        raise ValueError(f"num_bits must be 2..16 (FakeQuant's range). Received: "
                         f"num_bits={num_bits}")


REGISTRY: dict[str, type] = {}


def register(cls: type) -> type:
    """Adds an edgeqat quantizer class to ``REGISTRY`` (class name -> class).

    The registry is what a QAT model's configs serialize to and load from, what
    ``annotate.custom_objects()`` hands to Keras, and what the shared contract test
    (tests/test_quantizer_contract.py) runs over. Nothing is registered with Keras.
    """
    if not (isinstance(cls, type) and issubclass(cls, Quantizer)):
        raise TypeError(f"only edgeqat Quantizer subclasses register. Received: cls={cls!r}")
    REGISTRY[cls.__name__] = cls
    return cls


class Quantizer(_Quantizer):
    """The contract of every edgeqat quantizer, on top of tfmot's ``Quantizer``.

    tfmot's interface (``build(tensor_shape, name, layer) -> dict of variables``,
    ``__call__(inputs, training, weights)``, ``get_config``) says how a wrapper drives a
    quantizer. What the rest of edgeqat relies on is declared here, not found by
    ``hasattr`` or variable names:

    * ``num_bits`` (int): the bit width; change it with ``set_bits``.
    * ``per_channel`` (bool): per output channel (last axis) rather than per tensor.
    * ``observes_range`` (class attribute): the range is tracked from the data in
      non-trainable variables; QAT's observer freeze makes such a quantizer read its
      stored range instead of updating it. Learned (PACT, LSQ) and fixed ranges: False.
    * ``export_op``: the one op its inference-mode graph holds (what the converter reads).
    * ``scale(weights, tensor=None)``: the FakeQuant step for its current state, per
      channel or scalar; bias snapping and kernel rounding rely on it.
    * equality, hashing and ``repr`` by ``get_config``; ``from_config(get_config())``
      rebuilds an equal object.
    """

    observes_range: bool = False
    per_channel: bool = False
    num_bits: int = 8

    @property
    def export_op(self) -> str:
        return ("FakeQuantWithMinMaxVarsPerChannel" if self.per_channel
                else "FakeQuantWithMinMaxVars")

    @abc.abstractmethod
    def scale(self, weights, tensor=None):
        """The step of the FakeQuant it emits: ``(max - min) / (levels - 1)``.

        Args:
          weights: the variables ``build`` returned.
          tensor: the quantized tensor (weight quantizers read their range from it).
        """

    def set_bits(self, bits: int, weights: dict) -> None:
        """Changes the bit width (gradual precision), keeping the clipping range."""
        check_bits(bits)
        self.num_bits = int(bits)

    def __eq__(self, other):
        return type(self) is type(other) and self.get_config() == other.get_config()

    def __ne__(self, other):
        return not self.__eq__(other)

    def __hash__(self):
        return hash((type(self).__name__, tuple(sorted(self.get_config().items()))))

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({args})"

    @classmethod
    def from_config(cls, config):
        return cls(**config)


# ---------------------------------------------------------------------------- weights


@register
class PerChannelWeightQuantizer(Quantizer):
    """Symmetric, narrow-range weight quantizer, per output channel (last axis) or per tensor.

    Forward:  m = max|w| over every axis but the last (per channel) or over all (per tensor);
              q(w) = clip(round(w / s), -Qp, Qp) * s with s = m / Qp, Qp = 2^(b-1) - 1,
              emitted as FakeQuantWithMinMaxVars[PerChannel](w, -m, m, narrow_range=True).
    Backward: straight-through estimator: dq/dw = 1 (no value of w lies outside [-m, m]);
              m is recomputed from w each step and receives no gradient.
    Paper:    the TFLite int8 scheme, Jacob et al. 2018 (arXiv:1712.05877) and
              Krishnamoorthi 2018 (arXiv:1806.08342), per-channel weights.

    The range is read from the weights themselves in both modes ("last value"), so the
    converter folds it to a constant and a model never disagrees with its stored range.
    """

    def __init__(self, num_bits: int = 8, per_channel: bool = True, depthwise: bool = False):
        check_bits(num_bits)
        self.num_bits = int(num_bits)
        self.per_channel = bool(per_channel)
        self.depthwise = bool(depthwise)

    def build(self, tensor_shape, name, layer):
        return {}

    def _channels_last(self, shape):
        """A depthwise kernel (h, w, in, multiplier) has in * multiplier output channels,
        the last axis of TFLite's (1, h, w, in * multiplier) layout: the same memory order
        as (h, w, 1, in * multiplier)."""
        if self.depthwise and len(shape) == 4:
            return (shape[0], shape[1], 1, shape[2] * shape[3])
        return None

    def __call__(self, inputs, training, weights, **kwargs):
        x = inputs
        flat = self._channels_last(inputs.shape) if self.per_channel else None
        if flat is not None:
            x = tf.reshape(inputs, flat)
        if self.per_channel:
            axes = list(range(x.shape.rank - 1))
            m = tf.reduce_max(tf.abs(x), axis=axes)
        else:
            m = tf.reduce_max(tf.abs(x))
        # Symmetric [-m, m]: the converter's widening of a tiny range is m >= 5e-7.
        m = tf.maximum(tf.stop_gradient(m), SMALLEST_HALF_RANGE)
        y = fake_quant(x, -m, m, self.num_bits, narrow_range=True,
                       per_channel=self.per_channel)
        return tf.reshape(y, inputs.shape) if flat is not None else y

    def scale(self, weights, tensor):
        """The step TFLite stores for ``tensor`` (per channel or scalar): max|w| / Qp."""
        t = np.asarray(tensor)
        flat = self._channels_last(t.shape) if self.per_channel else None
        if flat is not None:
            t = t.reshape(flat)
        axes = tuple(range(t.ndim - 1)) if self.per_channel else None
        m = np.maximum(np.max(np.abs(t), axis=axes), SMALLEST_HALF_RANGE)
        return m / (2 ** (self.num_bits - 1) - 1)

    def get_config(self):
        return {"num_bits": self.num_bits, "per_channel": self.per_channel,
                "depthwise": self.depthwise}


# ---------------------------------------------------------------------------- fixed range


@register
class Relu6Quantizer(Quantizer):
    """Fixed-range [0, 6] activation quantizer for ReLU6 outputs; needs no calibration.

    Forward:  q(x) = clip(round(x / s), 0, 2^b - 1) * s with s = 6 / (2^b - 1)
              (6/255 at 8 bits), as FakeQuantWithMinMaxVars(x, 0, 6).
    Backward: straight-through inside [0, 6], zero outside (FakeQuant's gradient).
    Paper:    MobileNetV2 (Sandler et al. 2018, arXiv:1801.04381) uses ReLU6 for its
              robustness in low precision; fixed range as in Jacob et al. 2018.
    """

    def __init__(self, num_bits: int = 8):
        check_bits(num_bits)
        self.num_bits = int(num_bits)

    def build(self, tensor_shape, name, layer):
        return {}

    def __call__(self, inputs, training, weights, **kwargs):
        return activation_fake_quant(inputs, tf.constant(0.0), tf.constant(6.0), self.num_bits)

    def scale(self, weights, tensor=None):
        return activation_scale(0.0, 6.0, self.num_bits)

    def get_config(self):
        return {"num_bits": self.num_bits}


# ---------------------------------------------------------------------------- fixed range


@register
class FixedRangeQuantizer(Quantizer):
    """Activation quantizer with a constant range, for ops whose int8 output TFLite fixes.

    Forward:  q(x) = FakeQuantWithMinMaxVars(x, lo, hi): clip to [lo, hi], round to one of
              2^b levels (sigmoid/softmax: [0, 255/256], scale 1/256; tanh: [-1, 127/128],
              scale 1/128, the int8 kernels' own output grids).
    Backward: straight-through inside [lo, hi], zero outside (FakeQuant's gradient).
    Paper:    fixed output ranges of Jacob et al. 2018 (arXiv:1712.05877), as TFLite's
              int8 LOGISTIC/SOFTMAX/TANH kernels implement them.
    """

    def __init__(self, num_bits: int = 8, min: float = 0.0, max: float = 1.0):  # noqa: A002
        check_bits(num_bits)
        self.num_bits = int(num_bits)
        self.min = float(min)
        self.max = float(max)

    def build(self, tensor_shape, name, layer):
        return {}

    def __call__(self, inputs, training, weights, **kwargs):
        return fake_quant(inputs, tf.constant(self.min), tf.constant(self.max), self.num_bits)

    def scale(self, weights, tensor=None):
        """FakeQuant's step for the fixed range (what bias snapping needs downstream)."""
        return activation_scale(self.min, self.max, self.num_bits)

    def get_config(self):
        return {"num_bits": self.num_bits, "min": self.min, "max": self.max}


# ---------------------------------------------------------------------------- tracked ranges


class _RangeTracker(Quantizer):
    """Asymmetric per-tensor range kept in two non-trainable variables.

    Training: the batch statistic (``_batch_range``) is blended into the variables by an
    exponential moving average (the first batch sets them); inference reads them.
    """

    observes_range = True

    def __init__(self, num_bits: int = 8, decay: float = 0.99):
        check_bits(num_bits)
        self.num_bits = int(num_bits)
        self.decay = float(decay)

    def build(self, tensor_shape, name, layer):
        # MEAN aggregation: under a tf.distribute strategy every replica's update is
        # averaged, so all replicas (and all workers) keep one range; without it each
        # worker's range followed its own data shard and the workers' converted models
        # differed (tests/test_multi_worker.py). No effect without a strategy.
        def var(suffix, value):
            return layer.add_weight(_unique(layer, f"{name}_{suffix}"), shape=(),
                                    initializer=keras.initializers.Constant(value),
                                    trainable=False,
                                    aggregation=tf.VariableAggregation.MEAN)

        return _built_once(self, layer, name, lambda: {
            "min": var("min", -6.0), "max": var("max", 6.0), "seen": var("seen", 0.0)})

    def _batch_range(self, x):
        return tf.reduce_min(x), tf.reduce_max(x)

    def __call__(self, inputs, training, weights, **kwargs):
        lo_v, hi_v, seen = weights["min"], weights["max"], weights["seen"]
        if training:
            lo_b, hi_b = self._batch_range(observed(inputs))
            d = tf.where(seen > 0, self.decay, 0.0)
            lo = lo_v.assign(d * lo_v + (1.0 - d) * tf.minimum(lo_b, 0.0))
            hi = hi_v.assign(d * hi_v + (1.0 - d) * tf.maximum(hi_b, 0.0))
            with tf.control_dependencies([lo, hi]):
                seen_op = seen.assign(1.0)
            with tf.control_dependencies([seen_op]):
                lo, hi = tf.identity(lo), tf.identity(hi)
        else:
            lo, hi = lo_v, hi_v
        lo, hi = converter_range(tf.minimum(lo, 0.0), tf.maximum(hi, 0.0))
        return activation_fake_quant(inputs, lo, hi, self.num_bits)

    def scale(self, weights, tensor=None):
        """FakeQuant's step for the tracked range."""
        lo, hi = converter_range(tf.minimum(weights["min"], 0.0),
                                 tf.maximum(weights["max"], 0.0))
        return activation_scale(float(lo), float(hi), self.num_bits)

    def get_config(self):
        return {"num_bits": self.num_bits, "decay": self.decay}


@register
class MovingAverageRangeQuantizer(_RangeTracker):
    """Asymmetric activation quantizer with a moving-average min/max range.

    Forward:  q(x) = FakeQuantWithMinMaxVars(x, m, M), with m <= 0 <= M the exponential
              moving averages (decay d) of the batch min and max (the first batch sets them;
              FakeQuant nudges them so zero is exact).
    Backward: straight-through inside [m, M], zero outside; m, M get no gradient.
    Paper:    Jacob et al. 2018 (arXiv:1712.05877), section 3 ("EMA of activation ranges").
    """


@register
class PercentileQuantizer(_RangeTracker):
    """Asymmetric activation quantizer whose range ignores the extreme outliers.

    Forward:  m, M = EMA of the batch's (100 - p)th and pth percentiles (p = 99.99 by
              default, over at most 65536 evenly strided elements); q(x) =
              FakeQuantWithMinMaxVars(x, min(m, 0), max(M, 0)): values beyond are clipped.
    Backward: straight-through inside [m, M], zero outside; m, M get no gradient.
    Paper:    percentile calibration, Wu et al. 2020, "Integer Quantization for Deep
              Learning Inference" (arXiv:2004.09602), section 4.
    """

    def __init__(self, num_bits: int = 8, decay: float = 0.99, percentile: float = 99.99):
        super().__init__(num_bits, decay)
        if not 50.0 < float(percentile) <= 100.0:
            raise ValueError(f"percentile = {percentile} must be in (50, 100]")
        self.percentile = float(percentile)

    def _batch_range(self, x):
        flat = tf.reshape(x, [-1])
        n = tf.size(flat)
        stride = tf.maximum(n // 65536, 1)
        flat = tf.sort(flat[::stride])
        k = tf.cast(tf.size(flat) - 1, tf.float32)
        q = self.percentile / 100.0
        hi = tf.gather(flat, tf.cast(tf.round(k * q), tf.int32))
        lo = tf.gather(flat, tf.cast(tf.round(k * (1.0 - q)), tf.int32))
        return lo, hi

    def get_config(self):
        return {**super().get_config(), "percentile": self.percentile}


def least_error_ratio(x, quantize, ratios, axes=None, reduce=tf.reduce_mean):
    """The clip ratio in ``ratios`` (1-D) whose ``quantize(ratio)`` has the least squared
    error against ``x`` (``reduce``-d over ``axes``): one for the tensor (``axes=None``),
    or one per index left (per channel); the first of equal ones. The grid search of
    Nagel et al. 2021 (arXiv:2106.08295), section 3.5."""
    errors = tf.map_fn(lambda c: reduce(tf.square(quantize(c) - x), axis=axes), ratios)
    return tf.gather(ratios, tf.argmin(errors, axis=0))


@register
class MseRangeQuantizer(_RangeTracker):
    """Asymmetric activation quantizer whose range minimises the quantization MSE.

    Forward:  for c in a grid of clip ratios (0.3 .. 1.0), the batch range c * [min, max]
              with the smallest mean (q(x) - x)^2 is blended into an EMA; q(x) =
              FakeQuantWithMinMaxVars(x, m, M) with that range.
    Backward: straight-through inside [m, M], zero outside; m, M get no gradient.
    Paper:    MSE-optimal clipping, Banner et al. 2019 (arXiv:1810.05723) and
              Sung et al. 2015; the grid search form follows Nagel et al. 2021
              (arXiv:2106.08295), section 3.5.
    """

    def __init__(self, num_bits: int = 8, decay: float = 0.99, steps: int = 15):
        super().__init__(num_bits, decay)
        self.steps = int(steps)

    def _batch_range(self, x):
        lo0 = tf.minimum(tf.reduce_min(x), 0.0)
        hi0 = tf.maximum(tf.reduce_max(x), _EPS)
        best = least_error_ratio(x, lambda c: fake_quant(x, c * lo0, c * hi0, self.num_bits),
                                 tf.linspace(0.3, 1.0, self.steps))
        return best * lo0, best * hi0

    def get_config(self):
        return {**super().get_config(), "steps": self.steps}


# ---------------------------------------------------------------------------- learned ranges


@register
class PactQuantizer(Quantizer):
    """PACT: parameterized clipping activation (Choi et al. 2018, arXiv:1805.06085).

    Forward:  y = clip(x, 0, a), uniformly quantized on 2^b - 1 steps, or, when ``signed``,
              clip(x, -a, a) on 2^b - 2 steps (narrow range, zero exact):
              q = FakeQuantWithMinMaxVars(x, 0 or -a, a), with a trained.
    Backward: dq/dx = 1 inside the clip range, 0 outside (straight-through);
              dq/da = 1 where x >= a (and -1 where x <= -a when signed), 0 elsewhere; this
              is exactly FakeQuant's gradient for its max (min) input, so no custom
              gradient is needed. An L2 penalty ``alpha_decay * a^2`` (the paper's
              regulariser on a) is added through the variable's regulariser.
    Init:     a = ``init_alpha``; when data is seen before any training (annotate's
              calibration pass) a is set to the batch's max |x| instead.
    """

    def __init__(self, num_bits: int = 8, signed: bool = False, init_alpha: float = 6.0,
                 alpha_decay: float = 1e-4):
        check_bits(num_bits)
        self.num_bits = int(num_bits)
        self.signed = bool(signed)
        self.init_alpha = float(init_alpha)
        self.alpha_decay = float(alpha_decay)

    def build(self, tensor_shape, name, layer):
        return _built_once(self, layer, name, lambda: self._build(name, layer))

    def _build(self, name, layer):
        reg = keras.regularizers.l2(self.alpha_decay) if self.alpha_decay else None
        alpha = layer.add_weight(_unique(layer, f"{name}_alpha"), shape=(),
                                 initializer=keras.initializers.Constant(self.init_alpha),
                                 regularizer=reg, trainable=True)
        seen = layer.add_weight(_unique(layer, f"{name}_seen"), shape=(),
                                initializer=keras.initializers.Constant(0.0), trainable=False)
        return {"alpha": alpha, "seen": seen}

    def __call__(self, inputs, training, weights, **kwargs):
        alpha, seen = weights["alpha"], weights["seen"]
        if training:
            data = tf.reduce_max(tf.abs(observed(inputs)))
            init = alpha.assign(tf.where(seen > 0, alpha, tf.maximum(data, 1e-3)))
            with tf.control_dependencies([init]):
                mark = seen.assign(1.0)
            with tf.control_dependencies([mark]):
                a = tf.identity(alpha)
        else:
            a = tf.identity(alpha)
        a = tf.maximum(a, 1e-3)
        lo = -a if self.signed else tf.zeros_like(a)
        # Signed: narrow range (2^b - 2 steps) keeps the zero point an integer, so
        # FakeQuant's nudging does not shift the symmetric clip range.
        return activation_fake_quant(inputs, lo, a, self.num_bits, narrow_range=self.signed)

    def scale(self, weights, tensor=None):
        a = max(float(weights["alpha"].numpy()), 1e-3)
        return activation_scale(-a if self.signed else 0.0, a, self.num_bits, self.signed)

    def get_config(self):
        return {"num_bits": self.num_bits, "signed": self.signed,
                "init_alpha": self.init_alpha, "alpha_decay": self.alpha_decay}


def lsq_levels(num_bits: int, signed: bool, narrow_range: bool) -> tuple[int, int]:
    """LSQ's (Qn, Qp): the quantized range is [-Qn, Qp]."""
    if not signed:
        return 0, 2**num_bits - 1
    if narrow_range:
        return 2 ** (num_bits - 1) - 1, 2 ** (num_bits - 1) - 1
    return 2 ** (num_bits - 1), 2 ** (num_bits - 1) - 1


def lsq_fake_quant(x, s, qn: int, qp: int, grad_scale: float, num_bits: int,
                   narrow_range: bool, per_channel: bool):
    """LSQ forward as FakeQuant(x, -Qn*s, Qp*s) with the paper's gradients (training only).

    Returns y with dy/dx = 1 for -Qn < x/s < Qp else 0, and
    dy/ds = g * (-Qn | round(x/s) - x/s | Qp) on the (low | inside | high) region.
    """

    @tf.custom_gradient
    def _lsq(x, s):
        y = fake_quant(x, -qn * s, qp * s, num_bits, narrow_range, per_channel)

        def grad(dy):
            v = x / s
            low = v <= -qn
            high = v >= qp
            inside = tf.logical_not(tf.logical_or(low, high))
            dx = dy * tf.cast(inside, dy.dtype)
            rounded = tf.floor(v + 0.5)  # FakeQuant rounds half up
            ds_el = tf.where(low, -float(qn), tf.where(high, float(qp), rounded - v))
            ds_el = ds_el * dy * grad_scale
            if per_channel:
                ds = tf.reduce_sum(ds_el, axis=list(range(x.shape.rank - 1)))
            else:
                ds = tf.reduce_sum(ds_el)
            return dx, tf.reshape(ds, tf.shape(s))

        return y, grad

    return _lsq(x, s)


@register
class LsqQuantizer(Quantizer):
    """Learned Step Size Quantization (Esser et al. 2019, arXiv:1902.08153).

    Forward:  q(x) = clip(round(x / s), -Qn, Qp) * s with s a trained variable (one per
              output channel for per-channel weights), emitted as
              FakeQuantWithMinMaxVars[PerChannel](x, -Qn*s, Qp*s); weights: signed narrow
              (Qn = Qp = 2^(b-1) - 1), unsigned activations: Qn = 0, Qp = 2^b - 1, signed
              activations: Qn = 2^(b-1), Qp = 2^(b-1) - 1. With these bounds FakeQuant's
              step is exactly s and its zero point an integer, so nudging changes nothing.
    Backward: dq/dx = 1 for -Qn < x/s < Qp, else 0 (straight-through); dq/ds = -Qn below,
              Qp above, round(x/s) - x/s inside (paper eq. 3), times the gradient scale
              g = 1 / sqrt(N * Qp) with N the elements per step (weights per channel) or
              the features per sample (activations; ``narrow_range=True`` marks a weight
              quantizer). Training mode only; inference mode
              emits the bare FakeQuant, which is what the converter sees.
    Init:     from the first batch (weights: the first call; activations: annotate's
              calibration pass on ``sample_x``, else the first training step).
              ``init="paper"``: s = 2 * mean(|x|) / sqrt(Qp) (the paper's).
              ``init="mse"`` (weights' default): the step, per channel, that minimises
              the squared rounding error of the tensor, searched over
              ``f * max|x| / Qp`` for f in [0.3, 1]. At 4 bits the paper's step is about
              twice the error-minimising one and 10 QAT epochs do not learn it down:
              MNIST-1D, LSQ w4a8 on every layer, 0.840 (paper) vs 0.879 (mse), float
              0.887 (benchmarks/results/lowbit_accuracy.md).
    """

    INITS = ("paper", "mse")

    def __init__(self, num_bits: int = 8, per_channel: bool = False, signed: bool = True,
                 narrow_range: bool = False, init: str | None = None):
        check_bits(num_bits)
        self.num_bits = int(num_bits)
        self.per_channel = bool(per_channel)
        self.signed = bool(signed)
        self.narrow_range = bool(narrow_range)
        if self.narrow_range and not self.signed:
            raise ValueError("narrow_range applies to signed (weight) LSQ only")
        self.init = init or ("mse" if self.narrow_range else "paper")
        if self.init not in self.INITS:
            raise ValueError(f"LSQ init {init!r} is not one of {', '.join(self.INITS)}")

    @property
    def levels(self) -> tuple[int, int]:
        return lsq_levels(self.num_bits, self.signed, self.narrow_range)

    def build(self, tensor_shape, name, layer):
        return _built_once(self, layer, name, lambda: self._build(tensor_shape, name, layer))

    def _build(self, tensor_shape, name, layer):
        shape = (int(tensor_shape[-1]),) if self.per_channel else ()
        step = layer.add_weight(_unique(layer, f"{name}_step"), shape=shape,
                                initializer=keras.initializers.Constant(0.01), trainable=True)
        seen = layer.add_weight(_unique(layer, f"{name}_seen"), shape=(),
                                initializer=keras.initializers.Constant(0.0), trainable=False)
        return {"step": step, "seen": seen}

    def initial_step(self, x):
        """The initial step for ``x`` (per channel if per-channel), by ``self.init``."""
        qn, qp = self.levels
        axes = list(range(x.shape.rank - 1)) if self.per_channel else None
        if self.init == "paper":
            return tf.maximum(2.0 * tf.reduce_mean(tf.abs(x), axis=axes) / math.sqrt(qp), 1e-6)
        top = tf.maximum(tf.reduce_max(tf.abs(x), axis=axes), 1e-6) / qp
        best = least_error_ratio(
            x, lambda c: tf.clip_by_value(tf.round(x / (c * top)), -qn, qp) * (c * top),
            tf.constant(np.linspace(0.3, 1.0, 29), tf.float32), axes, tf.reduce_sum)
        return best * top

    def __call__(self, inputs, training, weights, **kwargs):
        step, seen = weights["step"], weights["seen"]
        qn, qp = self.levels
        if not training:
            s = tf.maximum(tf.identity(step), 1e-6)
            if not self.narrow_range:  # an activation
                return activation_fake_quant(inputs, -qn * s, qp * s, self.num_bits)
            return fake_quant(inputs, -qn * s, qp * s, self.num_bits, self.narrow_range,
                              self.per_channel)
        # tf.cond, not tf.where: the init (a 29-step search for "mse") runs once, not on
        # every training step.
        init = step.assign(tf.cond(seen > 0, lambda: tf.identity(step),
                                   lambda: self.initial_step(observed(inputs))))
        with tf.control_dependencies([init]):
            mark = seen.assign(1.0)
        with tf.control_dependencies([mark]):
            s = tf.identity(step)
        s = tf.maximum(s, 1e-6)
        shape = inputs.shape
        if self.narrow_range:  # a weight tensor: N counts the elements sharing one step
            n = math.prod(int(d) for d in (shape[:-1] if self.per_channel else shape))
        else:  # an activation: N is the number of features per sample
            n = math.prod(int(d) for d in shape[1:]) if shape.rank > 1 else 1
        g = 1.0 / math.sqrt(max(n, 1) * qp)
        return lsq_fake_quant(inputs, s, qn, qp, g, self.num_bits, self.narrow_range,
                              self.per_channel)

    def set_bits(self, bits: int, weights: dict) -> None:
        """Changes the bit width; the learned step is rescaled so the clip range stays."""
        old_qp = self.levels[1]
        super().set_bits(bits, weights)
        weights["step"].assign(weights["step"] * (old_qp / self.levels[1]))

    def scale(self, weights, tensor=None):
        """The step TFLite uses: s (per channel for per-channel weights)."""
        s = np.maximum(np.asarray(weights["step"].numpy(), np.float64), 1e-6)
        if self.narrow_range:
            return s
        qn, qp = self.levels
        return activation_scale(-qn * float(s), qp * float(s), self.num_bits)

    def get_config(self):
        return {"num_bits": self.num_bits, "per_channel": self.per_channel,
                "signed": self.signed, "narrow_range": self.narrow_range, "init": self.init}

