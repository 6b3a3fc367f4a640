"""A small decoder-only transformer whose QAT forward pass is what TFLite computes.

Built for integer deployment, every tensor the int8 flatbuffer holds has a quantization
point here (quantize, then dequantize, with the straight-through estimator), so the Keras
/ TensorFlow QAT model and the TFLite model agree to an output step or two:

    x0 = Q(Q(E[token]) + Q(P[position]))             (GATHER: each table stored
                                                        int8 at its output's scale)
    per block, pre-norm:
      n  = Q_norm(l2_normalize(x))                     (one L2_NORMALIZATION op; TFLite's
                                                        int8 output is fixed: step 1/128)
      q, k, v = Q(n @ Wq'), Q(n @ Wk'), Q(n @ Wv')     (gamma * sqrt(dim) and 1/sqrt(dh)
                                                        folded into W', per-channel int8/4)
      s  = Q_score(mask(q @ k^T))                      (BATCH_MATMUL; masked entries at
                                                        the range's low end, >= margin
                                                        below its top)
      p  = Q_softmax(mask(softmax(s)))                 (TFLite's fixed int8 output: 1/256;
                                                        masked weights exactly 0)
      x  = Q(x + Q(Q(p @ v) @ Wo))                     (residual add)
      n  = Q_norm(l2_normalize(x)); h = Q(relu(n @ Wup')); x = Q(x + Q(h @ Wdown))
    logits = Q(Q_norm(l2_normalize(x)) @ Whead')

RMSNorm is ``sqrt(dim) * gamma * x / ||x||``: the L2 normalisation is TFLite's one
integer op, and ``sqrt(dim) * gamma`` folds into the next projection, so the norm has a
single quantized tensor. Projections are 1x1 convolutions: TFLite's per-channel
FULLY_CONNECTED route refuses FakeQuant on the transposed kernel, CONV_2D takes it (and
int4 kernels, packed).

Ranges: weights per output channel, ``clip * max|W|`` (``clip`` trained, 1 at 8 bits, the
least-squares ratio at 4); activations observed (min/max calibration, then a moving
average during QAT, then frozen) or fixed where TFLite fixes them.

16-bit activations (``LmPrecision.activation_bits = 16``, W8A16, TFLite's 16x8 kernels):
every point is TFLite's int16 grid (symmetric, zero point 0), the softmax output 1/32768;
TFLite has no int16 L2_NORMALIZATION, so the norm is ``x * rsqrt(mean(x * x))`` (MUL,
MEAN, RSQRT, MUL, each output a point; ``sqrt(dim)`` is then in the norm, not in W').

What is left is how TFLite's kernels round: ``as_exported(arch)`` makes the attention
products (int8 BATCH_MATMUL: XNNPACK's float32 rounding or the builtin kernel's two
roundings, by the right operand's zero point) and the int4 projections round as they do
on that CPU (``edgeqat.requant``), in integers; training and the export keep the float
graph.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import numpy as np

from edgeqat import requant
from edgeqat.keras import tf
from edgeqat.modes import Mode

NORM_RANGE = (-1.0, 127.0 / 128.0)  # TFLite int8 L2_NORMALIZATION output: 1/128, zp 0
SOFTMAX_RANGE = (0.0, 255.0 / 256.0)  # TFLite int8 SOFTMAX output: 1/256, zp -128
SOFTMAX16_RANGE = (-1.0, 32767.0 / 32768.0)  # int16 SOFTMAX: 1/32768, zp 0
MASKED = -1e4  # what masked scores are set to before their quantization clips them


@dataclass(frozen=True)
class LmShape:
    """Sizes of the decoder. ``context`` is the longest sequence (and the KV cache)."""

    vocab: int = 256
    context: int = 128
    dim: int = 128
    layers: int = 2
    heads: int = 4
    mlp_ratio: int = 4

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads


@dataclass(frozen=True)
class LmPrecision:
    """Bits per kind of tensor.

    ``activation_bits``: 8 (int8 kernels) or 16 (TFLite's 16x8 kernels: int16
    activations, symmetric with zero point 0, and 8-bit weights; W8A16).
    """

    weight_bits: int = 8  # Q/K/V/O and MLP projections: 8 or 4
    head_bits: int = 8  # the output projection
    activation_bits: int = 8
    score_margin: float = 16.0  # masked attention scores sit >= this far below the top
    score_cap: float = 8.0  # scores beyond +-cap are penalised in training
    logit_span: float = 16.0  # logits below top - span saturate (softmax weight < 1e-7)

    def __post_init__(self):
        if self.activation_bits not in (8, 16):
            raise ValueError(f"activation_bits must be 8 or 16, not {self.activation_bits}")
        if self.activation_bits == 16 and (self.weight_bits, self.head_bits) != (8, 8):
            raise ValueError("16-bit activations take 8-bit weights (TFLite's 16x8 kernels); "
                             f"got weight_bits={self.weight_bits}, head_bits={self.head_bits}")

    @property
    def name(self) -> str:
        return f"w{self.weight_bits}a{self.activation_bits}"


PROJECTIONS = ("wq", "wk", "wv", "wo", "wup", "wdown")


NORM_POINTS = ("sq", "ms", "rs")  # 16-bit norms: x*x, its mean, rsqrt of the mean


def norm_names(shape: LmShape) -> list[str]:
    return [f"{i}.n{j}" for i in range(shape.layers) for j in (1, 2)] + ["nf"]


def _point_names(shape: LmShape, precision: LmPrecision) -> list[str]:
    names = ["emb", "pos", "x0", "logits"]
    for i in range(shape.layers):
        names += [f"{i}.{p}" for p in ("q", "k", "v", "score", "attn", "o", "res1", "mlp",
                                       "down", "res2")]
    if precision.activation_bits == 16:  # the norms' own tensors (8 bits: one fixed grid)
        names += [f"{n}{p}" for n in norm_names(shape) for p in ("", *(
            "." + q for q in NORM_POINTS))]
    return names


def _fake_quant_pc(w, a, bits):
    return tf.quantization.fake_quant_with_min_max_vars_per_channel(
        w, -a, a, num_bits=bits, narrow_range=True)


CLIP_RATIOS = np.linspace(0.3, 1.0, 36)


def least_squares_clip(w: np.ndarray, bits: int, ratios=CLIP_RATIOS):
    """Per output channel (last axis): the ratio of max|w| whose symmetric grid has the
    least squared error (round to nearest)."""
    w = w.reshape(-1, w.shape[-1])
    top = np.maximum(np.abs(w).max(0), 1e-8)
    levels = 2 ** (bits - 1) - 1
    best = np.ones_like(top)
    best_err = np.full_like(top, np.inf)
    for r in ratios:
        s = r * top / levels
        err = ((np.clip(np.round(w / s), -levels, levels) * s - w) ** 2).sum(0)
        better = err < best_err
        best[better], best_err[better] = r, err[better]
    return best.astype(np.float32)


class TinyLm(tf.Module):
    """The decoder: float parameters, weight clips and activation ranges as variables.

    ``quantized`` (a Python flag, so each setting traces its own graph) turns the
    quantization points on (``frozen``: ranges read as constants, for export);
    ``observe`` (a variable) says how ranges follow the data:
    0 frozen, 1 min/max calibration, 2 moving average.
    """

    def __init__(self, shape: LmShape, precision: LmPrecision = LmPrecision(), seed: int = 0):
        super().__init__(name="tiny_lm")
        self.shape = shape
        self.precision = precision
        rng = np.random.default_rng(seed)
        d, f = shape.dim, shape.dim * shape.mlp_ratio

        def normal(std, *dims):
            return rng.normal(0.0, std, dims).astype(np.float32)

        params = {"emb": normal(0.5, shape.vocab, d), "pos": normal(0.1, shape.context, d),
                  "gf": np.ones(d, np.float32), "head": normal(d ** -0.5, d, shape.vocab)}
        out_std = (2 * shape.layers * d) ** -0.5
        for i in range(shape.layers):
            params.update({
                f"{i}.g1": np.ones(d, np.float32), f"{i}.g2": np.ones(d, np.float32),
                f"{i}.wq": normal(d ** -0.5, d, d), f"{i}.wk": normal(d ** -0.5, d, d),
                f"{i}.wv": normal(d ** -0.5, d, d), f"{i}.wo": normal(out_std, d, d),
                f"{i}.wup": normal(d ** -0.5, d, f), f"{i}.wdown": normal(out_std, f, d)})
        self.params = {k: tf.Variable(v, name=k.replace(".", "_")) for k, v in params.items()}
        self.clips = {k: tf.Variable(np.ones(v.shape[-1], np.float32),
                                     name="clip_" + k.replace(".", "_"))
                      for k, v in params.items() if k.split(".")[-1] in PROJECTIONS
                      or k == "head"}
        self.ranges = {n: tf.Variable([0.0, 0.0], trainable=False,
                                      name="range_" + n.replace(".", "_"))
                       for n in _point_names(shape, precision)}
        self.observe = tf.Variable(0, trainable=False, name="observe")
        self.momentum = tf.Variable(0.99, trainable=False, name="momentum")
        self.quantized = False
        self.penalties: list = []  # the score penalties of the last call (training)
        self.frozen = None  # name -> (lo, hi) while tracing the export signatures
        self.arch = None  # ``as_exported(arch)``: round as TFLite's kernels there
        self.int_kernels = {}  # int4 projection -> (integer kernel [in, out], its scales)

    # ------------------------------------------------------------------ parameters

    @property
    def weights(self) -> list:
        return list(self.params.values())

    @property
    def trainable(self) -> list:
        """What QAT trains: the float parameters and the weight clips."""
        return self.weights + list(self.clips.values())

    def get_state(self) -> dict[str, np.ndarray]:
        state = {f"param/{k}": v.numpy() for k, v in self.params.items()}
        state.update({f"clip/{k}": v.numpy() for k, v in self.clips.items()})
        state.update({f"range/{k}": v.numpy() for k, v in self.ranges.items()})
        return state

    def set_state(self, state: dict[str, np.ndarray]) -> None:
        for group, table in (("param", self.params), ("clip", self.clips),
                             ("range", self.ranges)):
            for k, v in table.items():
                key = f"{group}/{k}"
                if key in state:
                    v.assign(state[key])

    def folded(self, name: str):
        """The projection as the flatbuffer stores it (before quantization): the norm's
        gain (and ``sqrt(dim)`` at 8 bits) folded into its rows, ``1/sqrt(head_dim)``
        into Wq."""
        w = self.params[name]
        layer, _, kind = name.rpartition(".")
        # 8 bits: the norm is L2_NORMALIZATION (x / ||x||), so sqrt(dim) folds here; 16
        # bits: x * rsqrt(mean(x*x)) already carries it.
        root = math.sqrt(self.shape.dim) if self.precision.activation_bits == 8 else 1.0
        if kind in ("wq", "wk", "wv"):
            w = (root * self.params[f"{layer}.g1"])[:, None] * w
        elif kind == "wup":
            w = (root * self.params[f"{layer}.g2"])[:, None] * w
        elif name == "head":
            w = (root * self.params["gf"])[:, None] * w
        if kind == "wq":
            w = w / math.sqrt(self.shape.head_dim)
        return w

    def bits(self, name: str) -> int:
        return self.precision.head_bits if name == "head" else self.precision.weight_bits

    def init_clips(self) -> None:
        """Clip ratios for the precision: 1 at 8 bits, least squares below."""
        for name, clip in self.clips.items():
            bits = self.bits(name)
            clip.assign(np.ones(clip.shape, np.float32) if bits == 8
                        else least_squares_clip(self.folded(name).numpy(), bits))

    def quantized_weight(self, name: str):
        """The 1x1-convolution kernel (1, 1, in, out), fake-quantized when quantized."""
        w = self.folded(name)
        w = tf.reshape(w, [1, 1, *w.shape])
        if not self.quantized:
            return w
        return _fake_quant_pc(w, self.weight_range(name, w), self.bits(name))

    def weight_range(self, name: str, w):
        """Per output channel (last axis of ``w``, the folded kernel): the symmetric range
        ``clip * max|W|`` its weights are quantized to (the clip trains, the max does not)."""
        axes = list(range(len(w.shape) - 1))
        return self.clips[name] * tf.stop_gradient(
            tf.maximum(tf.reduce_max(tf.abs(w), axis=axes), 1e-8))

    # ---------------------------------------------------------------- quantization

    def freeze(self) -> dict:
        """The ranges as Python numbers, for ``frozen``."""
        return {k: tuple(float(x) for x in v.numpy()) for k, v in self.ranges.items()}

    @contextlib.contextmanager
    def as_exported(self, arch: str | None = None):
        """Ranges frozen as the export freezes them (Python numbers: no variable updates
        in the graph); with ``arch`` (``x86_64``, ``aarch64``), the attention products
        and the int4 projections also round as TFLite's kernels on that CPU do
        (``requant``), so the model computes what the flatbuffer computes there. The
        export itself traces without ``arch``: the flatbuffer holds the float graph."""
        was = self.frozen, self.arch, self.int_kernels
        self.frozen = self.freeze()
        self.arch = requant.normalize_arch(arch) if arch else None
        self.int_kernels = self._int_kernels() if arch else {}
        try:
            yield self
        finally:
            self.frozen, self.arch, self.int_kernels = was

    def _int_kernels(self) -> dict:
        """The 4-bit projections as the flatbuffer stores them: integer kernels and the
        converter's per-channel scales (narrow range: ``2 * clip * max|W| / 14``)."""
        out = {}
        for name in self.clips:
            if self.bits(name) != 4:
                continue
            w = self.quantized_weight(name).numpy()[0, 0].astype(np.float64)
            a = self.weight_range(name, self.folded(name)).numpy()
            scale = np.float32(2.0 * a.astype(np.float64) / 14.0)
            out[name] = (np.round(w / scale), scale)
        return out

    def bounds(self, name: str) -> tuple[float, float]:
        """The range the frozen point ``name`` quantizes to (its learned range with the
        score margin and logit span applied)."""
        lo, hi = self.frozen[name]
        if name.endswith("score"):
            lo = min(lo, hi - self.precision.score_margin)
        if name == "logits":
            lo = min(max(lo, hi - self.precision.logit_span), 0.0)
        return lo, max(hi, lo + 1e-3)

    def q(self, name: str, x, observed=None):
        """The activation quantization point ``name``; ``observed`` is what its range
        follows (default ``x``; attention scores pass their unmasked values)."""
        if not self.quantized:
            return x
        r = self.ranges[name]
        if self.frozen:  # export: constants, no variable updates in the graph
            return self._fake_quant(x, *self.bounds(name))
        seen = x if observed is None else observed
        lo_b = tf.minimum(tf.reduce_min(seen), 0.0)
        hi_b = tf.maximum(tf.reduce_max(seen), 0.0)
        mode = self.observe
        m = self.momentum
        new = tf.case([(tf.equal(mode, 1), lambda: tf.stack([tf.minimum(r[0], lo_b),
                                                              tf.maximum(r[1], hi_b)])),
                       (tf.equal(mode, 2), lambda: m * r + (1 - m) * tf.stack([lo_b, hi_b]))],
                      default=lambda: tf.identity(r))
        with tf.control_dependencies([r.assign(new)]):
            lo, hi = tf.identity(r[0]), tf.identity(r[1])
        if name.endswith("score"):
            lo = tf.minimum(lo, hi - self.precision.score_margin)
        if name == "logits":
            lo = tf.minimum(tf.maximum(lo, hi - self.precision.logit_span), 0.0)
        hi = tf.maximum(hi, lo + 1e-3)
        return self._fake_quant(x, lo, hi)

    def _fake_quant(self, x, lo, hi):
        """8 bits: the asymmetric int8 grid of [lo, hi]; 16 bits: TFLite's int16 grid,
        symmetric with zero point 0, covering both ends."""
        if self.precision.activation_bits == 8:
            return tf.quantization.fake_quant_with_min_max_vars(x, lo, hi, num_bits=8)
        a = tf.maximum(-lo, hi) if tf.is_tensor(lo) or tf.is_tensor(hi) else max(-lo, hi)
        return tf.quantization.fake_quant_with_min_max_vars(x, -a, a, num_bits=16,
                                                            narrow_range=True)

    def _grid(self, point):
        """The int8 (scale, zero point) of a frozen quantization point or fixed range."""
        return requant.int8_grid(*(self.bounds(point) if isinstance(point, str) else point))

    def _matmul(self, a, b, points, transpose_b=False):
        """``a @ b``; under ``as_exported(arch)``, rounded as the int8 BATCH_MATMUL kernel
        on ``arch`` rounds it. ``points``: the quantization points (or fixed ranges) of
        ``a``, ``b`` and the output."""
        grids = ([self._grid(p) for p in points]
                 if self.arch and self.precision.activation_bits == 8 else None)
        rule = requant.batch_matmul_rule(self.arch, grids[1][1]) if grids else None
        if not rule:
            return tf.matmul(a, b, transpose_b=transpose_b)
        return requant.integer_matmul(a, b, grids, rule, transpose_b)

    def q_fixed(self, x, bounds):
        """A grid TFLite fixes: the int8 SOFTMAX (1/256) and L2_NORMALIZATION (1/128)
        outputs; int16 SOFTMAX's is 1/32768 with zero point 0."""
        if not self.quantized:
            return x
        bits = 16 if bounds == SOFTMAX16_RANGE else 8
        return tf.quantization.fake_quant_with_min_max_vars(x, *bounds, num_bits=bits)

    # --------------------------------------------------------------------- forward

    def _linear(self, x, name, src=None, dst=None):
        """``x @ W`` as a 1x1 convolution; under ``as_exported(arch)`` an int4 projection
        rounds as the int4 CONV_2D kernel on ``arch`` does (``requant.rule_for``).
        ``src``/``dst``: the quantization points (or fixed ranges) of ``x`` and the
        output."""
        rule = (requant.rule_for(Mode.INT4_WEIGHTS, self.bits(name), self.arch, x.shape[1])
                if self.arch and name in self.int_kernels else None)
        if rule:
            kernel, scale = self.int_kernels[name]
            (s_in, _), out = self._grid(src), self._grid(dst)
            acc = tf.tensordot(requant.centred(x, s_in), tf.constant(kernel), 1)  # exact
            return requant.requantize(tf.cast(acc, tf.int64), requant.widened(s_in) *
                                      requant.widened(scale), out, rule)
        w = self.quantized_weight(name)
        lead = tf.shape(x)[:-1]
        y = tf.nn.conv2d(tf.reshape(x, [1, 1, -1, w.shape[2]]), w, 1, "VALID")
        return tf.reshape(y, tf.concat([lead, [w.shape[3]]], 0))

    def _norm(self, x, name):
        """RMSNorm without its gain (folded into the next projection). 8 bits: one
        L2_NORMALIZATION op on TFLite's fixed int8 grid. 16 bits (TFLite has no int16
        L2_NORMALIZATION): ``x * rsqrt(mean(x * x))``, MUL, MEAN, RSQRT and MUL, each
        output a quantization point ``name.sq``, ``.ms``, ``.rs`` and ``name``."""
        if self.precision.activation_bits == 8:
            n = tf.math.l2_normalize(x, axis=-1)
            return self.q_fixed(n, NORM_RANGE) if self.quantized else n
        ms = self.q(f"{name}.ms", tf.reduce_mean(self.q(f"{name}.sq", x * x), -1,
                                                 keepdims=True))
        return self.q(name, x * self.q(f"{name}.rs", tf.math.rsqrt(ms)))

    def norm_point(self, name):
        """What the norm's output is quantized to (for ``_linear``'s ``src``)."""
        return NORM_RANGE if self.precision.activation_bits == 8 else name

    def _heads(self, x):
        s = self.shape
        return tf.transpose(tf.reshape(x, [-1, tf.shape(x)[1], s.heads, s.head_dim]),
                            [0, 2, 1, 3])

    def embed(self, tokens, positions):
        if self.frozen:  # export: each table quantized, then gathered (the same values)
            x = (tf.gather(self.q("emb", self.params["emb"]), tokens)
                 + tf.gather(self.q("pos", self.params["pos"]), positions))
        else:
            x = (self.q("emb", tf.gather(self.params["emb"], tokens))
                 + self.q("pos", tf.gather(self.params["pos"], positions)))
        return self.q("x0", x)

    def qkv(self, i, x):
        n = self._norm(x, f"{i}.n1")
        return [self._heads(self.q(f"{i}.{p}", self._linear(n, f"{i}.w{p}",
                                                            self.norm_point(f"{i}.n1"),
                                                            f"{i}.{p}")))
                for p in ("q", "k", "v")]

    def attend(self, i, x, q, k, v, mask):
        """The rest of block ``i``: attention of ``q`` over ``k``/``v`` where ``mask``
        (broadcast to [B, H, Tq, Tk]) is true, then the MLP."""
        s = self._matmul(q, k, (f"{i}.q", f"{i}.k", f"{i}.score"), transpose_b=True)
        # Scores beyond +-score_cap cost a penalty in training (``score_penalty``): sharp
        # attention needs a wide int8 score grid, and one step of a wide grid moves a
        # softmax output by many of its steps.
        over = tf.nn.relu(tf.abs(tf.where(mask, s, 0.0)) - self.precision.score_cap)
        self.penalties.append(tf.reduce_mean(tf.square(over)))
        s = self.q(f"{i}.score", tf.where(mask, s, MASKED), observed=tf.where(mask, s, 0.0))
        # Masked scores sit at the range's low end, which can be within a few steps of a
        # row's only unmasked scores (early positions): SOFTMAX then gives them weight,
        # and prefill would attend to later tokens, decode to whatever its cache holds.
        # Their weights are set to exactly 0 (SELECT_V2 on the softmax grid).
        p = self.q_fixed(tf.where(mask, tf.nn.softmax(s, axis=-1), 0.0),
                         SOFTMAX_RANGE if self.precision.activation_bits == 8
                         else SOFTMAX16_RANGE)
        a = self.q(f"{i}.attn", self._matmul(p, v, (SOFTMAX_RANGE, f"{i}.v", f"{i}.attn")))
        a = tf.reshape(tf.transpose(a, [0, 2, 1, 3]), [-1, tf.shape(a)[2], self.shape.dim])
        o = self._linear(a, f"{i}.wo", f"{i}.attn", f"{i}.o")
        x = self.q(f"{i}.res1", x + self.q(f"{i}.o", o))
        up = self._linear(self._norm(x, f"{i}.n2"), f"{i}.wup", self.norm_point(f"{i}.n2"),
                          f"{i}.mlp")
        h = self.q(f"{i}.mlp", tf.nn.relu(up))  # the ReLU fuses into the convolution
        down = self._linear(h, f"{i}.wdown", f"{i}.mlp", f"{i}.down")
        return self.q(f"{i}.res2", x + self.q(f"{i}.down", down))

    def head(self, x):
        return self.q("logits", self._linear(self._norm(x, "nf"), "head",
                                             self.norm_point("nf"), "logits"))

    def __call__(self, tokens):
        """Teacher-forced logits [B, T, vocab] for tokens [B, T] (T <= context)."""
        self.penalties = []
        t = tf.shape(tokens)[1]
        x = self.embed(tokens, tf.range(t)[None])
        mask = tf.range(t)[None, :] <= tf.range(t)[:, None]
        for i in range(self.shape.layers):
            q, k, v = self.qkv(i, x)
            x = self.attend(i, x, q, k, v, mask)
        return self.head(x)

    # --------------------------------------------------------- export signatures

    def prefill(self, tokens):
        """tokens [1, context] -> logits [1, context, vocab] and the KV cache."""
        t = self.shape.context
        x = self.embed(tokens, tf.range(t)[None])
        mask = tf.range(t)[None, :] <= tf.range(t)[:, None]
        out = {}
        for i in range(self.shape.layers):
            q, k, v = self.qkv(i, x)
            out[f"kv_cache_k_{i}"], out[f"kv_cache_v_{i}"] = k, v
            x = self.attend(i, x, q, k, v, mask)
        out["logits"] = self.head(x)
        return out

    def decode(self, tokens, input_pos, **cache):
        """One token [1, 1] at ``input_pos`` [1] with the cache -> logits [1, 1, vocab]
        and the cache with that position written."""
        t = self.shape.context
        x = self.embed(tokens, input_pos[None])
        here = (tf.range(t) == input_pos[0])[None, None, :, None]
        mask = (tf.range(t) <= input_pos[0])[None, None, None, :]
        out = {}
        for i in range(self.shape.layers):
            q, k, v = self.qkv(i, x)
            kc = self.q(f"{i}.k", tf.where(here, k, self.q(f"{i}.k", cache[f"kv_cache_k_{i}"])))
            vc = self.q(f"{i}.v", tf.where(here, v, self.q(f"{i}.v", cache[f"kv_cache_v_{i}"])))
            out[f"kv_cache_k_{i}"], out[f"kv_cache_v_{i}"] = kc, vc
            x = self.attend(i, x, q, kc, vc, mask)
        out["logits"] = self.head(x)
        return out

    def cache_spec(self) -> dict:
        s = self.shape
        return {f"kv_cache_{c}_{i}": tf.TensorSpec([1, s.heads, s.context, s.head_dim],
                                                   tf.float32)
                for i in range(s.layers) for c in "kv"}

    def parameter_count(self) -> int:
        return int(sum(np.prod(v.shape) for v in self.params.values()))
