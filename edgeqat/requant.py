"""Kernel-exact inference: the Keras QAT model rounds where the TFLite kernels round.

A QAT model computes a convolution in float and rounds its output once, ``round(acc * M)``
with ``M = s_in * s_w / s_out``. TFLite's integer kernels requantize in integer arithmetic,
and some do not round once. Measured with LiteRT 2.3 (docs/int4.md, docs/int16x8.md),
single-layer models run on this x86_64 machine and on an emulated Cortex-A72 (aarch64):

* ``int4_weights`` on x86_64: the int4 ``CONV_2D``/``DEPTHWISE_CONV_2D`` (v7) kernels
  (not delegated to XNNPACK) multiply by a 31-bit multiplier and round, then shift right
  and round again. An output whose exact fraction lies in ``[0.5 - 2^-(shift+1), 0.5)``
  goes up one step; 4-bit weight steps make ``M`` large, so ~5% of outputs move.
  On aarch64 they round once (as the float graph does, but in integers, so near-ties
  round as on the device), except where the output has one spatial position, which
  rounds twice as on x86_64 (``rule_for``).
* ``int16x8``, both: the 16-bit kernels multiply by the multiplier cut to 15 bits
  (``MultiplyByQuantizedMultiplier(int64_t, ...)``), off by up to 2^-16 relative: up to
  half a step at the top of the int16 range.
* ``int8``: XNNPACK requantizes with one rounding, ``float32(acc) * float32 scale``
  rounded half to even (``xnnpack_fp32``). The float graph rounds once too, but its
  float32 convolution lands a few values in a million on the other side of a near-tie,
  and a deep network amplifies them (ResNet50 at 32 px, trained: 13-39 softmax steps on
  a few of 64 inputs). Emulated in integers on x86_64, it is bit-exact there (0 steps);
  so are its MUL and MEAN (the latter adds the output zero point before rounding).
  AVERAGE_POOL_2D (builtin kernel) rounds its raw sum half away from zero
  (``PoolRounding``). Not emulated: ADD (XNNPACK's 20-bit fixed-point multipliers). The int8
  ``BATCH_MATMUL`` (attention in ``edgeqat.lm``) is XNNPACK's only when its right
  operand's zero point is 0 (``xnnpack_fp32``); the builtin kernel rounds twice, ties
  away from zero (``gemmlowp_rounding``), on both: ``batch_matmul_rule``,
  ``TinyLm.as_exported``.

``install(model, mode, arch)`` puts, on the output quantizer that receives each affected
layer's result (its own, or that of the ReLU TFLite fuses into it), a step that rounds as
the kernel on ``arch`` does; the output quantizer then sees an on-grid value and leaves
it. The step is a ``hooks.Hook`` in the output quantizer's slot: it runs only in inference
mode, and ``edgeqat.convert`` traces the model with its hooks suspended
(``hooks.suspended``), so training and the flatbuffer are unchanged. It is not saved
with the model: call ``export.prepare_for_export(model, mode)`` again after loading.
"""

from __future__ import annotations

import platform

import numpy as np

from edgeqat import hooks, layer_kinds, modes
from edgeqat import quantize_configs as qc
from edgeqat.graph import input_quantizers, input_scale, wrapper_classes
from edgeqat.keras import keras, tf
from edgeqat.quantizers import Quantizer


def quantize_multiplier(m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """TFLite's ``QuantizeMultiplier``: ``m = q * 2^shift`` with ``q`` a Q31 int in
    [2^30, 2^31). Elementwise; ``m`` > 0."""
    frac, shift = np.frexp(np.asarray(m, np.float64))
    q = np.round(frac * 2.0**31).astype(np.int64)
    top = q == 2**31
    q = np.where(top, q // 2, q)
    shift = np.where(top, shift + 1, shift).astype(np.int64)
    tiny = shift < -31
    return np.where(tiny, 0, q), np.where(tiny, 0, shift)


def widened(x) -> np.ndarray:
    """The float32 value TFLite stores, widened back (its kernels compute M in double)."""
    return np.asarray(x, np.float32).astype(np.float64)


def double_rounding(acc, q, shift):
    """The int4 kernels' requantization, in exact int64 ops: ``acc * q`` rounded half up
    to a Q31 integer, then shifted right by ``-shift`` rounding half up again
    (``floor((floor((acc*q + 2^30) / 2^31) + 2^(r-1)) / 2^r)``). Measured: reproduces
    every output of the int4 ``CONV_2D``/``DEPTHWISE_CONV_2D`` kernels, both signs."""
    left = np.maximum(shift, 0)
    right = np.maximum(-shift, 0)
    ab = acc * tf.constant(2**left, tf.int64) * tf.constant(q, tf.int64)
    high = tf.math.floordiv(ab + 2**30, tf.constant(2**31, tf.int64))
    p = 2**right
    return tf.math.floordiv(high + tf.constant(p // 2, tf.int64), tf.constant(p, tf.int64))


def single_rounding(acc, q, shift):
    """One rounding, half up, with the Q31 multiplier: ``floor((acc*q + 2^(t-1)) / 2^t)``,
    ``t = 31 - shift`` (TFLite's single-rounding ``MultiplyByQuantizedMultiplier``).
    Measured: the int4 kernels on aarch64. The float graph rounds the same way but in
    float32, so an exact value within ~1e-6 of a half step can land on the other side."""
    total = 31 - np.asarray(shift, np.int64)
    num = acc * tf.constant(q, tf.int64) + tf.constant(2 ** (total - 1), tf.int64)
    return tf.math.floordiv(num, tf.constant(2**total, tf.int64))


def multiplier_15bit(acc, q, shift):
    """``MultiplyByQuantizedMultiplier(int64 acc, q, shift)`` of the 16x8 kernels: the
    multiplier rounded to 15 bits, one rounding (half up). ``acc`` is float64 here: a
    float32 convolution cannot give a 16x8 accumulator exactly."""
    reduced = np.where(q < 0x7FFF0000, (q + 2**15) >> 16, 0x7FFF).astype(np.float64)
    return tf.floor(acc * tf.constant(reduced * 2.0 ** (shift - 15)) + 0.5)


def gemmlowp_rounding(acc, q, shift):
    """TFLite's default ``MultiplyByQuantizedMultiplier(int32 acc, q, shift)``, gemmlowp's
    two steps in exact int64 ops: ``SaturatingRoundingDoublingHighMul`` (``acc * q`` to
    Q31, ties away from zero), then ``RoundingDivideByPOT`` by ``2^-shift`` (ties away
    from zero again). Measured: reproduces every output of the int8 ``BATCH_MATMUL``
    kernel (LiteRT 2.3) on x86_64 and on an emulated Cortex-A72."""
    shift = np.asarray(shift, np.int64)  # one per tensor or per output channel
    left, right = np.maximum(shift, 0), np.maximum(-shift, 0)
    ab = acc * tf.constant(2**left * np.asarray(q, np.int64), tf.int64)
    x = ab + tf.where(ab >= 0, tf.constant(2**30, tf.int64), tf.constant(1 - 2**30, tf.int64))
    high = tf.where(x >= 0, x // 2**31, -((-x) // 2**31))  # division toward zero
    mask = 2**right - 1
    threshold = tf.constant(mask >> 1, tf.int64) + tf.cast(high < 0, tf.int64)
    down = tf.bitwise.right_shift(high, tf.constant(right, tf.int64))
    rest = tf.bitwise.bitwise_and(high, tf.constant(mask, tf.int64))
    return down + tf.cast(rest > threshold, tf.int64)


def xnnpack_fp32(acc, scale: np.float32, zero_point: int = 0):
    """XNNPACK's int8 requantization ("fp32"): ``float32(acc) * scale`` in float32 (the
    scale ``s_a * s_b / s_out`` computed in float32), rounded half to even. Measured:
    every output of an XNNPACK-delegated int8 BATCH_MATMUL, x86_64 and emulated
    Cortex-A72. Its MEAN adds the output zero point in float32 before rounding (a tie
    then breaks by the sum's parity): ``zero_point``; returned less it."""
    scaled = tf.cast(acc, tf.float32) * scale
    if zero_point:
        return tf.cast(tf.round(scaled + np.float32(zero_point)), tf.int64) - zero_point
    return tf.cast(tf.round(scaled), tf.int64)


def int8_grid(lo: float, hi: float) -> tuple[np.float32, int]:
    """The int8 scale and zero point the converter gives a FakeQuant range ``[lo, hi]``
    (``lo <= 0 <= hi``): its nudging (``getNudgedScaleAndZeroPoint``) in double, the scale
    stored as float32."""
    scale = (float(hi) - float(lo)) / 255.0
    zero = min(max(-float(lo) / scale, 0.0), 255.0)
    return np.float32(scale), int(np.floor(zero + 0.5)) - 128


def requantize(acc, grid, out_grid, rule: str):
    """An int64 accumulator on step ``grid`` (``s_in * s_w``: a number, or one per
    last-axis channel) rounded by ``RULES[rule]`` onto the int8 ``out_grid`` (scale, zero
    point), clamped as the kernel clamps, and returned dequantized (float32)."""
    so, zo = out_grid
    if rule == "xnnpack_fp32":
        rounded = xnnpack_fp32(acc, np.float32(np.float32(grid) / np.float32(so)))
    else:
        q, shift = quantize_multiplier(np.asarray(grid, np.float64) / widened(so))
        rounded = RULES[rule](acc, q, shift)
    out = tf.clip_by_value(rounded + zo, -128, 127) - zo
    return tf.cast(tf.cast(out, tf.float64) * float(so), tf.float32)


def centred(x, scale):
    """A fake-quantized tensor as the integers it holds, less the zero point (float64,
    exact)."""
    return tf.round(tf.cast(x, tf.float64) / float(scale))


def integer_matmul(a, b, grids, rule: str, transpose_b: bool = False):
    """``a @ b`` of two fake-quantized tensors as TFLite's int8 ``BATCH_MATMUL`` computes
    it: the exact integer accumulation, requantized by ``RULES[rule]``. ``grids``: the
    (scale, zero point) of ``a``, ``b`` and the output (``int8_grid``)."""
    (sa, _), (sb, _), out = grids
    acc = tf.matmul(centred(a, sa), centred(b, sb), transpose_b=transpose_b)  # < 2^53
    return requantize(tf.cast(acc, tf.int64), widened(sa) * widened(sb), out, rule)


RULES = {"double_rounding": double_rounding, "single_rounding": single_rounding,
         "multiplier_15bit": multiplier_15bit, "gemmlowp_rounding": gemmlowp_rounding}

# Where an int8 BATCH_MATMUL runs, as measured with LiteRT 2.3 and its default XNNPACK
# delegate (one-op models over every zero-point case, and a TinyLm's attention, on
# x86_64 and an emulated Cortex-A72, bit for bit): XNNPACK takes it when the right-hand
# operand's zero point is 0 (its int8 batch matmul wants a symmetric right operand) and
# rounds once in float32; otherwise the builtin kernel rounds twice (gemmlowp).
BATCH_MATMUL_ARCHS = ("x86_64", "aarch64")


def batch_matmul_rule(arch: str | None, rhs_zero_point: int, xnnpack: bool = True
                      ) -> str | None:
    """How the int8 ``BATCH_MATMUL`` with that right-hand zero point rounds on ``arch``
    (default: this machine), with LiteRT's default XNNPACK delegate or without:
    ``xnnpack_fp32`` or a ``RULES`` entry; None where not measured (the float graph's
    single rounding)."""
    if normalize_arch(arch or host_arch()) not in BATCH_MATMUL_ARCHS:
        return None
    return "xnnpack_fp32" if xnnpack and rhs_zero_point == 0 else "gemmlowp_rounding"


class KernelRounding(hooks.Hook):
    """An output quantizer's hook that first rounds its input as a TFLite kernel does.

    ``grid`` is the accumulator step ``s_in * s_w`` (per output channel or scalar),
    ``scale`` the output step; the quantizer then sees an on-grid value. Inference mode
    only.
    """

    def __init__(self, quantizer, rule: str, grid, scale, fp32_scale=None, zero_point=0):
        super().__init__(quantizer)
        self.rule = rule
        self.grid = np.asarray(grid, np.float64)
        self.out_scale = float(scale)
        m = self.grid / widened(scale)  # TFLite: double(s_in) * double(s_w) / double(s_out)
        self.q, self.shift = quantize_multiplier(m)
        # XNNPACK: float(s_in) * float(s_w) / float(s_out), all in float32 (the product of
        # two float32 values is exact in float64, so rounding it once is float32's).
        self.fp32_scale = np.asarray(self.grid, np.float32) / np.float32(scale) \
            if fp32_scale is None else np.float32(fp32_scale)
        self.zero_point = int(zero_point)  # added before rounding (``xnnpack_fp32``)

    def call(self, inputs, training, weights, **kwargs):
        if not training:
            acc = tf.cast(inputs, tf.float64) / tf.constant(self.grid)
            if self.rule != "multiplier_15bit":
                acc = tf.cast(tf.round(acc), tf.int64)  # exact: Keras adds on-grid values
            if self.rule == "xnnpack_fp32":
                out = xnnpack_fp32(acc, self.fp32_scale, self.zero_point)
            else:
                out = RULES[self.rule](acc, self.q, self.shift)
            inputs = tf.cast(tf.cast(out, tf.float64) * self.out_scale, inputs.dtype)
        return self.quantizer(inputs, training, weights, **kwargs)


def _int8_site(wrapper, model: keras.Model, inputs: int):
    """``(input owners, output quantizer)`` of ``wrapper`` when it has ``inputs`` inputs
    and an output, each quantized by an 8-bit edgeqat ``Quantizer`` (an input's producer
    may already round as its kernel does: its hook is looked through); else None."""
    owners = input_quantizers(wrapper, model)
    if len(owners) != inputs or any(o is None for o in owners) or \
            not getattr(wrapper, "_output_quantizers", None):
        return None
    oq = wrapper._output_quantizers[0]
    if not all(isinstance(hooks.bare(q), Quantizer) and q.num_bits == 8
               for q in (oq, *(q for q, _ in owners))):
        return None
    return owners, oq


def _install_product(wrapper, model: keras.Model, mode: str, arch: str) -> bool:
    """An 8-bit ``Multiply`` of two quantized inputs (squeeze-excite, swish's
    ``x * sigmoid(x)``) is TFLite's MUL: ``(a - za) * (b - zb)`` exactly, requantized by
    ``s_a * s_b / s_out``; where XNNPACK's rounding is emulated (``xnnpack_fp32``) the
    product rounds as its MUL does. Returns whether a hook was installed."""
    site = _int8_site(wrapper, model, 2)
    if site is None or rule_for(mode, 8, arch) != "xnnpack_fp32":
        return False
    ((qa, va), (qb, vb)), oq = site
    grid = widened(qa.scale(va)) * widened(qb.scale(vb))
    hooks.install(hooks.Slot(wrapper, "output"),
                  KernelRounding(oq, "xnnpack_fp32", grid,
                                 oq.scale(wrapper._output_quantizer_vars)))
    return True


def _install_mean(wrapper, model: keras.Model, mode: str, arch: str) -> bool:
    """An 8-bit global average pooling over ``n`` > 1 positions is XNNPACK's int8 MEAN:
    the exact sum of ``q - z_in`` requantized by ``s_in / (s_out * n)`` in float32, half
    to even after adding the output zero point in float32 (measured on x86_64: every
    output of 512 samples; the builtin kernel differs on 8%). Returns whether a hook was
    installed."""
    site = _int8_site(wrapper, model, 1)
    spatial = tuple(wrapper.input_shape)[1:-1]
    if site is None or wrapper.layer.data_format == "channels_first" or len(spatial) > 2 \
            or any(d is None for d in spatial) or rule_for(mode, 8, arch) != "xnnpack_fp32":
        return False  # (a 3-D pooling's MEAN was not measured)
    ((q_in, v_in),), oq = site
    n = int(np.prod(spatial))
    if n < 2:
        return False
    v_out = wrapper._output_quantizer_vars
    if not {"min", "max"} <= set(v_out):
        return False
    s_in, s_out = q_in.scale(v_in), oq.scale(v_out)
    fp32 = np.float32(s_in) / (np.float32(s_out) * np.float32(n))
    _, zero = int8_grid(float(v_out["min"].numpy()), float(v_out["max"].numpy()))
    hooks.install(hooks.Slot(wrapper, "output"),
                  KernelRounding(oq, "xnnpack_fp32", widened(s_in) / n, s_out, fp32, zero))
    return True


class PoolRounding(hooks.Hook):
    """An average pooling's output quantizer hook that first rounds as TFLite's int8
    AVERAGE_POOL_2D does: the sum of the window's raw int8 values (zero point included)
    divided by the window size, half away from zero, on the input's grid (which is the
    output's). Keras's exact mean lands half a step off on a tie, the kernel's rounding
    direction (the quantizer's rounding is half up, of values offset by the range's
    minimum). Inference mode only."""

    def __init__(self, quantizer, grid: tuple[float, int], count: int):
        super().__init__(quantizer)
        self.grid, self.count = (float(grid[0]), int(grid[1])), int(count)

    def call(self, inputs, training, weights, **kwargs):
        if not training:
            (scale, zero), n = self.grid, self.count
            total = tf.round((tf.cast(inputs, tf.float64) / scale + zero) * n)  # exact
            half = float(n // 2)
            raw = tf.where(total >= 0, tf.math.floordiv(total + half, n),
                           -tf.math.floordiv(half - total, n))
            inputs = tf.cast((raw - zero) * scale, inputs.dtype)
        return self.quantizer(inputs, training, weights, **kwargs)


def _install_pool(wrapper, model: keras.Model, mode: str, arch: str) -> bool:
    """An 8-bit average pooling with valid padding whose output range is its input's
    (``export.share_scale_ranges``): every window holds ``prod(pool_size)`` values, and
    the output rounds as the int8 kernel's (the builtin one; measured on x86_64, the same
    integer code on every CPU, so ``mode`` and ``arch`` do not matter). Returns whether a
    hook was installed."""
    site = _int8_site(wrapper, model, 1)
    if site is None or wrapper.layer.padding != "valid":
        return False
    ((q_in, v_in),), oq = site
    v_out = wrapper._output_quantizer_vars
    if not ({"min", "max"} <= set(v_in) and {"min", "max"} <= set(v_out)):
        return False
    grid_in, grid_out = ([int8_grid(float(v["min"].numpy()), float(v["max"].numpy()))
                          for v in (v_in, v_out)])
    if grid_in != grid_out:
        return False
    hooks.install(hooks.Slot(wrapper, "output"),
                  PoolRounding(oq, grid_out, int(np.prod(wrapper.layer.pool_size))))
    return True


# Unweighted layers whose int8 op's rounding is emulated: (Keras classes, installer).
_UNWEIGHTED_SITES = ((keras.layers.Multiply, _install_product),
                     (layer_kinds.GLOBAL_AVERAGE_POOLS, _install_mean),
                     (layer_kinds.AVERAGE_POOLS, _install_pool))


def _output_site(wrapper):
    """The wrapper whose output quantizer receives ``wrapper``'s result in TFLite: its
    own, or that of a lone ReLU consumer (fused into the kernel)."""
    wrapper_cls, _ = wrapper_classes()
    if getattr(wrapper, "_output_quantizers", None):
        return wrapper
    consumers = [n.outbound_layer for n in wrapper._outbound_nodes]
    if len(consumers) == 1 and isinstance(consumers[0], wrapper_cls) \
            and qc.is_fusable_relu(consumers[0].layer) and consumers[0]._output_quantizers:
        return consumers[0]
    return None


_ARCH_NAMES = {"amd64": "x86_64", "x64": "x86_64", "arm64": "aarch64", "armv8": "aarch64"}


def normalize_arch(machine: str) -> str:
    """``platform.machine()`` spellings to one name: ``x86_64``, ``aarch64``, ..."""
    m = machine.strip().lower()
    return _ARCH_NAMES.get(m, m)


def host_arch() -> str:
    return normalize_arch(platform.machine())


# Where XNNPACK's int8 CONV_2D, DEPTHWISE_CONV_2D and FULLY_CONNECTED (per-channel and
# per-tensor weights) were measured to round as ``xnnpack_fp32``, bit for bit: a trained
# ResNet50 at 32 px end to end, 0 steps on 64 inputs (13-39 steps with the float graph's
# rounding, from a few near-ties in a million values amplified over 50 layers). Not yet
# on aarch64, whose per-tensor kernels may requantize otherwise ("rndnu").
XNNPACK_FP32_ARCHS = ("x86_64",)


def _int8_kernels(weight_bits: int, arch: str, positions: int | None) -> str | None:
    """8-bit weights: XNNPACK's single float32 rounding where measured, else None."""
    return "xnnpack_fp32" if weight_bits == 8 and arch in XNNPACK_FP32_ARCHS else None


def _int4_kernels(weight_bits: int, arch: str, positions: int | None) -> str | None:
    """int4 on x86_64: two roundings, whatever the shape; on aarch64: one rounding, except
    where the output has a single position (a matrix-vector product: a dense layer as a
    1x1 convolution, a convolution whose output is 1x1), which rounds twice as on x86_64.
    Both emulated in int64, so near-ties round as on the device. 8-bit layers: XNNPACK's
    single rounding (``_int8_kernels``)."""
    if weight_bits > 4:
        return _int8_kernels(weight_bits, arch, positions)
    if arch == "x86_64" or (arch == "aarch64" and positions == 1):
        return "double_rounding"
    return "single_rounding" if arch == "aarch64" else None


def _multiplier_15bit(weight_bits: int, arch: str, positions: int | None) -> str:
    """16x8 on both architectures: the 15-bit multiplier."""
    return "multiplier_15bit"


# A mode's ``kernel_rounding`` (``modes.ModeSpec``) -> (weight bits, arch, positions) ->
# the ``RULES`` entry its kernels follow there, or None (the float graph's rounding).
KERNEL_ROUNDING = {"int8_kernels": _int8_kernels, "int4_kernels": _int4_kernels,
                   "multiplier_15bit": _multiplier_15bit}


def rule_for(mode: str, weight_bits: int, arch: str, positions: int | None = None) -> str | None:
    """The kernel rounding of a ``weight_bits`` layer in ``mode`` on ``arch`` (None: the
    float graph's), for a layer with ``positions`` output positions per sample (its
    spatial size; None: unknown, taken as several). Only what was measured (LiteRT 2.3):
    the mode's row names the rule family (``KERNEL_ROUNDING``)."""
    family = modes.spec(mode).kernel_rounding
    if family is None:
        return None
    return KERNEL_ROUNDING[family](weight_bits, normalize_arch(arch), positions)


def _positions(wrapper) -> int | None:
    """Output positions per sample: the product of the spatial output dimensions."""
    shape = tuple(wrapper.output_shape)[1:-1]
    if any(d is None for d in shape):
        return None
    return int(np.prod(shape)) if shape else 1


def remove(model: keras.Model) -> None:
    """Takes installed kernel rounding off ``model`` (in place)."""
    hooks.remove(model, (KernelRounding, PoolRounding))


def install(model: keras.Model, mode: str, arch: str | None = None) -> list[str]:
    """Makes ``model``'s inference rounding that of ``mode``'s TFLite kernels on ``arch``
    (default: this machine's), in place. Replaces what an earlier call installed.

    Returns:
      The names of the layers whose output rounding now follows the kernel.
    """
    remove(model)
    arch = arch or host_arch()
    wrapper_cls, _ = wrapper_classes()
    done = []
    for layer in model.layers:
        inner = layer.layer if isinstance(layer, wrapper_cls) else None
        site = next((f for kinds, f in _UNWEIGHTED_SITES if isinstance(inner, kinds)), None)
        if site is not None:
            if site(layer, model, mode, arch):
                done.append(layer.name)
            continue
        row = layer_kinds.weighted(inner) if inner is not None else None
        if row is None or not row.kernel_rounding or not layer._weight_vars:
            continue
        kernel, wq, wvars = layer._weight_vars[0]
        rule = rule_for(mode, getattr(wq, "num_bits", 8), arch, _positions(layer))
        site = _output_site(layer) if rule and isinstance(wq, Quantizer) else None
        s_in = input_scale(layer, model) if site is not None else None
        if s_in is None:
            continue
        oq = site._output_quantizers[0]
        s_w = np.asarray(wq.scale(wvars, kernel), np.float64).reshape(-1)
        grid = widened(s_in) * widened(s_w)
        s_out = oq.scale(site._output_quantizer_vars)
        hooks.install(hooks.Slot(site, "output"),
                      KernelRounding(oq, rule, grid if grid.size > 1 else grid[0], s_out))
        done.append(layer.name)
    model.predict_function = None
    return done
