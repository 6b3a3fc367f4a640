"""Pipeline and device configuration: strict TOML into frozen dataclasses.

Every table in a TOML file maps to one dataclass below. Unknown keys, wrong types and
values outside a field's ``choices`` are errors naming the file, the dotted key and what is
allowed. No TensorFlow import happens here, so a bad file fails in milliseconds.
"""

from __future__ import annotations

import dataclasses
import math
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeqat import modes
from edgeqat.errors import ConfigError

PACKAGE_ROOT = Path(__file__).resolve().parent.parent
# An installed wheel carries copies of the checkout's pipelines/ and devices/ in
# edgeqat/shipped/ (setup.py puts them there at build time); a checkout, editable install
# included, reads the top-level folders users edit.
SHIPPED_DIR = Path(__file__).resolve().parent / "shipped"


def _reference_dir(name: str) -> Path:
    shipped = SHIPPED_DIR / name
    return shipped if shipped.is_dir() else PACKAGE_ROOT / name


PIPELINES_DIR = _reference_dir("pipelines")
DEVICES_DIR = _reference_dir("devices")
DEFAULT_PIPELINE = PIPELINES_DIR / "digits_dscnn.toml"
DEFAULT_DEVICE = DEVICES_DIR / "local_cpu.toml"


def choice(default: Any, choices: tuple, doc: str = "") -> Any:
    """A dataclass field whose value must be one of ``choices``."""
    return field(default=default, metadata={"choices": choices, "doc": doc})


@dataclass(frozen=True)
class Range:
    """The values a numeric field may take: ``lo <= v <= hi`` (``lo < v`` when open)."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    text: str = ""  # how the error says it, e.g. "must be at least 1"

    def holds(self, v: float) -> bool:
        if self.lo is not None and (v <= self.lo if self.lo_open else v < self.lo):
            return False
        return self.hi is None or v <= self.hi


AT_LEAST_0 = Range(0, text="must be 0 or more")
AT_LEAST_1 = Range(1, text="must be at least 1")
POSITIVE = Range(0, lo_open=True, text="must be positive")
FRACTION = Range(0, 1, text="must be a fraction in [0, 1]")
WEIGHT_BITS = Range(2, 8, text="must be 2..8")
ACTIVATION_BITS = Range(2, 16, text="must be 2..16")
SEED = Range(0, 2**32 - 1, text="must be 0..4294967295")
PORT = Range(1, 65535, text="must be 1..65535")


def bounded(default: Any, allowed: Range, doc: str = "") -> Any:
    """A numeric dataclass field whose value must lie in ``allowed`` (and be finite)."""
    return field(default=default, metadata={"range": allowed, "doc": doc})


_NO_VALUE = object()


class FieldError(ConfigError, ValueError):
    """A field of a config object holds a value it may not; ``key`` names the field.

    A ``ConfigError`` (so a ``UserError``: one line, exit status 2) wherever a config is
    made, by the loader, a command-line override or code.

    ``key`` is relative to the object that raised it (``"host"``, or ``"connection.host"``
    for a rule across tables); the loader prefixes the table and the file.
    """

    def __init__(self, key: str, value: Any, message: str):
        self.key, self.value, self.message = key, value, message
        super().__init__(self.describe(key))

    def describe(self, where: str) -> str:
        """``where = value must be ...``, with ``where`` the key as the reader knows it."""
        if self.value is _NO_VALUE:
            return f"{where} {self.message}"
        return f"{where} = {self.value!r} {self.message}"


class Checked:
    """Mixin for config dataclasses: every instance, however made, has legal values.

    ``__post_init__`` checks each field's ``choices``, ``range`` and, for numbers,
    finiteness, so a TOML file, a command-line override (``dataclasses.replace``) and code
    constructing a config all pass the same checks. Subclasses add cross-field rules in
    ``check()``. Raises ``FieldError``; the loader adds the file and the table prefix.
    """

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise FieldError(f.name, value, "must be a finite number")
            choices = f.metadata.get("choices")
            if choices and value not in choices:
                raise FieldError(f.name, value,
                                 f"is not one of: {', '.join(map(str, choices))}")
            allowed = f.metadata.get("range")
            if allowed and value is not None and not isinstance(value, bool) \
                    and isinstance(value, int | float) and not allowed.holds(value):
                raise FieldError(f.name, value, allowed.text)
        self.check()

    def check(self) -> None:
        """Cross-field rules; raise ``FieldError`` naming the field at fault."""


# ---------------------------------------------------------------------------- pipeline


@dataclass(frozen=True)
class DataConfig(Checked):
    """Where the training and evaluation data come from."""

    name: str = choice("digits", ("digits", "mnist1d", "npz", "text"),
                       "text: the language-model pipeline (see [lm])")
    path: str | None = None  # .npz with x_train, y_train, x_test, y_test (name = "npz");
    #                          a UTF-8 file or folder (name = "text"; none: built-in corpus)
    calibration_samples: int = bounded(500, AT_LEAST_1)  # samples for PTQ calibration
    eval_samples: int = bounded(0, AT_LEAST_0)  # 0: the whole test split
    validation_fraction: float = bounded(  # held out of x_train for early checks
        0.1, Range(0, 1, text="must be in [0, 1)"))

    def check(self) -> None:
        if self.validation_fraction >= 1:
            raise FieldError("validation_fraction", self.validation_fraction,
                             "must be in [0, 1)")
        if self.name == "npz" and not self.path:
            raise FieldError("path", _NO_VALUE, "is required when data.name = 'npz'")


@dataclass(frozen=True)
class ModelConfig(Checked):
    """The float model: a built-in builder, a ``module:function``, or a saved Keras file."""

    builder: str = "dscnn"
    path: str | None = None  # a saved tf_keras model (.keras, .h5 or SavedModel dir)
    epochs: int = bounded(20, AT_LEAST_0)  # float epochs (0 with `path`: use it as it is)
    batch_size: int = bounded(64, AT_LEAST_1)
    learning_rate: float = bounded(2e-3, POSITIVE)


WEIGHT_QUANTIZERS = ("per_channel", "per_tensor", "lsq")
ACTIVATION_QUANTIZERS = ("moving_average", "relu6", "pact", "lsq", "percentile", "mse")


@dataclass(frozen=True)
class RuleConfig(Checked):
    """One policy rule: which layers it matches and how they are quantized.

    ``layers`` and ``classes`` are regexes that must fully match the layer name and its
    class name (both, when both are given). Rules are tried in order; the first match wins.
    """

    layers: str = ".*"
    classes: str = ".*"
    float: bool = False  # leave matched layers in float (conversion then needs calibration)
    weight_bits: int = bounded(8, WEIGHT_BITS)  # 2..8 (4: the int4_weights mode)
    activation_bits: int = bounded(8, ACTIVATION_BITS)  # 2..16 (16: int16x8 mode)
    weight_quantizer: str = choice("per_channel", WEIGHT_QUANTIZERS,
                                   "per_channel: symmetric last-value (per tensor where a "
                                   "layer cannot convert per channel); lsq: learned step")
    activation_quantizer: str = choice("moving_average", ACTIVATION_QUANTIZERS,
                                       "relu6: fixed [0, 6] on ReLU6 outputs, moving "
                                       "average elsewhere")
    lsq_init: str = choice("mse", ("mse", "paper"),
                           "LSQ weight step init: mse, the per-channel step of least "
                           "rounding error; paper, 2 mean|w| / sqrt(Qp) (Esser et al.)")

    def check(self) -> None:
        for key in ("layers", "classes"):
            try:
                re.compile(getattr(self, key))
            except re.error as e:
                raise FieldError(key, _NO_VALUE, f"is not a valid regex "
                                 f"({getattr(self, key)!r}: {e})") from None


@dataclass(frozen=True)
class PolicyConfig(Checked):
    """Ordered rules (first match wins); layers no rule matches get ``default``.
    ``head_weights``: how the classifier head (an 8-bit Dense whose output is the model's,
    alone or through its activation) stores weights its rule says are ``per_channel``:
    per tensor as tfmot and TFLite's FULLY_CONNECTED do, or per channel."""

    rules: tuple[RuleConfig, ...] = ()
    default: RuleConfig = RuleConfig()
    head_weights: str = choice("per_tensor", ("per_tensor", "per_channel"),
                               "the 8-bit Dense classifier head under a per_channel rule: "
                               "per_tensor (a FULLY_CONNECTED, as tfmot; a per-channel "
                               "1000-class head stores 24 KB more scales and zero points) "
                               "or per_channel (a 1x1 convolution)")


@dataclass(frozen=True)
class PrecisionStep(Checked):
    """One step of a gradual-precision schedule: from ``epoch`` (0-based) on, use these bits."""

    epoch: int = bounded(0, AT_LEAST_0)
    weight_bits: int = bounded(8, WEIGHT_BITS)  # every weight quantizer of the QAT model
    activation_bits: int = 0  # 2..16; 0: keep the bits the policy gave each activation

    def check(self) -> None:
        if self.activation_bits and not 2 <= self.activation_bits <= 16:
            raise FieldError("activation_bits", self.activation_bits,
                             "must be 0 (keep) or 2..16")


@dataclass(frozen=True)
class QatConfig(Checked):
    """Quantization-aware fine-tuning: schedule, distillation, checkpoints, distribution.

    Fractions (``quant_delay``, ``observer_freeze``, ``bn_freeze``, ``warmup_fraction``) are
    shares of all QAT steps; 1.0 means "never" for the freezes.
    """

    epochs: int = bounded(4, AT_LEAST_0)
    batch_size: int = bounded(64, AT_LEAST_1)  # global batch (split over the replicas)
    learning_rate: float | None = bounded(None, POSITIVE)  # peak; unset: fraction x float
    learning_rate_fraction: float = bounded(0.1, POSITIVE)  # of model.learning_rate
    warmup_fraction: float = bounded(0.1, FRACTION)  # linear warm-up, cosine decay to 1%
    quant_delay: float = bounded(0.1, FRACTION)  # float training (fake quant off) first
    observer_freeze: float = bounded(0.75, FRACTION)  # ranges stop moving after this share
    bn_freeze: float = bounded(0.5, FRACTION)  # BatchNorm statistics frozen after this
    precision: tuple[PrecisionStep, ...] = ()  # [[qat.precision]] epoch / weight_bits
    distill: bool = False  # knowledge distillation from the float model
    distill_alpha: float = bounded(0.5, FRACTION)  # a*task + (1-a)*T^2*KL(teacher||student)
    distill_temperature: float = bounded(4.0, POSITIVE)
    checkpoint_dir: str = ""  # "": the CLI uses <output_dir>.ckpt; resume is automatic
    strategy: str = choice("default", ("default", "mirrored", "multi_worker_mirrored"),
                           "mirrored: all local GPUs (or logical CPUs); "
                           "multi_worker_mirrored: a cluster described by TF_CONFIG")

    def check(self) -> None:
        epochs = [p.epoch for p in self.precision]
        if epochs != sorted(set(epochs)):
            raise FieldError("precision", epochs,
                             "epochs must be distinct, 0 or more, in increasing order")


@dataclass(frozen=True)
class ConvertConfig(Checked):
    """TFLite conversion."""

    mode: str = choice(modes.Mode.INT8.value, modes.NAMES, "the precision mode (edgeqat.modes)")


@dataclass(frozen=True)
class ValidateConfig(Checked):
    """Validation thresholds and latency measurement."""

    max_accuracy_drop: float = bounded(0.005, FRACTION)  # QAT vs float, same eval set
    latency_runs: int = bounded(50, AT_LEAST_1)
    warmup_runs: int = bounded(5, AT_LEAST_0)


@dataclass(frozen=True)
class PtqConfig(Checked):
    """Post-training quantization: activation calibration and weight rounding."""

    calibration: str = choice("minmax", ("minmax", "percentile", "mse"),
                              "activation ranges: observed extremes, a percentile, or the "
                              "clipping range with least quantization MSE")
    percentile: float = bounded(  # calibration = "percentile": clip outside [100-p, p]
        99.99, Range(50, 100, lo_open=True, text="must be in (50, 100]"))
    range_samples: int = bounded(64, AT_LEAST_1)  # samples percentile/MSE ranges look at
    adaround: bool = False  # learn weight rounding (Nagel et al. 2020) before conversion
    adaround_iterations: int = bounded(300, AT_LEAST_1)  # optimisation steps per layer
    adaround_samples: int = bounded(128, AT_LEAST_1)  # calibration samples it fits on


@dataclass(frozen=True)
class AutoConfig(Checked):
    """``mode = "auto"``: PTQ, then QAT, then higher precision, until within budget.

    The budget is ``validate.max_accuracy_drop`` (vs the float model).
    """

    qat: bool = True  # try QAT when PTQ int8 misses the budget
    int16_activations: bool = True  # then try 16x8 (int16 activations, still integer)
    float_layers: int = bounded(0, AT_LEAST_0)  # then up to this many sensitive layers float
    #                        (0: never; >0 gives up the fully-integer property)
    decide_on: str = choice("test", ("test", "validation"),
                            "split whose accuracy the decisions compare")


@dataclass(frozen=True)
class DiagnosticsConfig(Checked):
    """Per-layer quantization error and layer sensitivity in the report."""

    enabled: bool = True
    samples: int = bounded(64, AT_LEAST_1)  # calibration samples the comparison runs on
    worst: int = bounded(3, AT_LEAST_0)  # layers named in the report's summary
    sensitivity: bool = False  # rank layers by accuracy regained when left float (slower)


@dataclass(frozen=True)
class LmConfig(Checked):
    """The language-model pipeline (``data.name = "text"``): a byte-level decoder-only
    transformer, pre-trained in float, then PTQ and QAT at ``convert.mode`` (int8: W8A8;
    int4_weights: W4A8; int16x8: W8A16), exported with ``prefill`` and KV-cache ``decode``
    signatures."""

    context: int = bounded(128, Range(8, 2048, text="must be 8..2048"))  # window and cache
    dim: int = bounded(128, Range(16, 1024, text="must be 16..1024"))
    layers: int = bounded(2, Range(1, 24, text="must be 1..24"))
    heads: int = bounded(4, Range(1, 32, text="must be 1..32"))
    mlp_ratio: int = bounded(4, Range(1, 8, text="must be 1..8"))
    steps: int = bounded(1500, AT_LEAST_0)  # float pre-training (0 with model.path)
    batch_size: int = bounded(32, AT_LEAST_1)
    learning_rate: float = bounded(3e-3, POSITIVE)
    qat_steps: int = bounded(300, AT_LEAST_0)
    qat_learning_rate: float = bounded(3e-4, POSITIVE)
    distill: float = bounded(0.5, FRACTION)  # weight of the KL to the float model
    head_bits: int = bounded(8, Range(4, 8, text="must be 4..8"))
    score_margin: float = bounded(16.0, POSITIVE)  # masked scores: this far below the top
    score_cap: float = bounded(8.0, POSITIVE)  # attention scores beyond +-cap are penalised
    score_penalty: float = bounded(0.01, AT_LEAST_0)  # ... with this weight (0: off)
    logit_span: float = bounded(16.0, POSITIVE)
    eval_windows: int = bounded(64, AT_LEAST_1)  # test windows every model is scored on
    decode_windows: int = bounded(2, AT_LEAST_0)  # of those, run through the decode loop
    prompt: str = "def "  # the fixed prompt of the generated samples
    generate_tokens: int = bounded(48, AT_LEAST_1)
    max_perplexity_increase: float = bounded(0.02, FRACTION)  # shipped vs float model

    def check(self) -> None:
        if self.dim % self.heads:
            raise FieldError("heads", self.heads, f"must divide lm.dim = {self.dim}")
        if not self.prompt.encode("utf-8"):
            raise FieldError("prompt", self.prompt, "has no tokens: give at least one "
                             "character")
        if len(self.prompt.encode("utf-8")) >= self.context:
            raise FieldError("prompt", self.prompt, f"has {len(self.prompt.encode())} tokens,"
                             f" not fewer than lm.context = {self.context}: shorten it")


@dataclass(frozen=True)
class PipelineConfig(Checked):
    """A whole pipeline: data, model, policy, QAT, conversion, validation."""

    name: str = "pipeline"
    seed: int = bounded(0, SEED)
    mode: str = choice("qat", ("qat", "auto"), "qat: always fine-tune; auto: see [auto]")
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    policy: PolicyConfig = PolicyConfig()
    qat: QatConfig = QatConfig()
    convert: ConvertConfig = ConvertConfig()
    validate: ValidateConfig = ValidateConfig()
    ptq: PtqConfig = PtqConfig()
    auto: AutoConfig = AutoConfig()
    diagnostics: DiagnosticsConfig = DiagnosticsConfig()
    lm: LmConfig = LmConfig()
    source: str = ""  # the file it was read from (set by the loader)

    def check(self) -> None:
        """Rules across tables: what the conversion mode's kernels can load and run."""
        mode = self.convert.mode
        if self.data.name == "text":
            if mode == modes.Mode.INT16X8 and self.lm.head_bits != 8:
                raise FieldError("lm.head_bits", self.lm.head_bits, "but convert.mode = "
                                 "'int16x8': TFLite's 16x8 kernels take 8-bit weights; set 8")
            if self.mode != "qat":
                raise FieldError("mode", self.mode, "but data.name = 'text': the language "
                                 "model runs PTQ and QAT always; use mode = 'qat'")
            return  # the rest is the CNN path's policy: [lm] sets the model's precision
        row = modes.spec(mode)
        lo, hi = row.activation_bits
        if self.mode == "auto" and mode != modes.Mode.INT8:
            raise FieldError("convert.mode", mode,
                             "but mode = 'auto' starts from int8 and moves to 16x8 itself "
                             "([auto] int16_activations): leave convert.mode = 'int8', or "
                             "use mode = 'qat'")
        rules = [(f"policy.rules[{i}]", r) for i, r in enumerate(self.policy.rules)]
        for where, rule in [*rules, ("policy.default", self.policy.default)]:
            if rule.float:
                continue
            if lo == hi and rule.activation_bits != lo:
                raise FieldError(f"{where}.activation_bits", rule.activation_bits,
                                 f"but convert.mode = {mode!r} ships {lo}-bit activations: "
                                 f"set activation_bits = {lo} (QAT must train the ranges "
                                 "it ships)")
            if not lo <= rule.activation_bits <= hi:
                wide = [m for m, r in modes.MODES.items()
                        if r.activation_bits[0] <= rule.activation_bits <= r.activation_bits[1]]
                raise FieldError(f"{where}.activation_bits", rule.activation_bits,
                                 f"but convert.mode = {mode!r} has {hi}-bit activation kernels: "
                                 f"use {row.activation_bits_text}"
                                 + "".join(f", or convert.mode = {m.value!r}" for m in wide))
            if rule.weight_bits < 4:
                raise FieldError(f"{where}.weight_bits", rule.weight_bits,
                                 f"but convert.mode = {mode!r} cannot ship fewer than 4-bit "
                                 "weights: the converter writes kernels LiteRT cannot load "
                                 "(DEPTHWISE_CONV_2D version 7 at 3 bits in int8; nonzero "
                                 "int4 zero points in int4_weights): use 4..8")
        for i, p in enumerate(self.qat.precision):
            if lo == hi and p.activation_bits not in (0, lo):
                raise FieldError(f"qat.precision[{i}].activation_bits", p.activation_bits,
                                 f"but convert.mode = {mode!r}: use 0 or {lo}")
            if p.weight_bits < 4:
                raise FieldError(f"qat.precision[{i}].weight_bits", p.weight_bits,
                                 f"but convert.mode = {mode!r} ships 4..8-bit weights only: "
                                 "use 4..8")


# ---------------------------------------------------------------------------- device


@dataclass(frozen=True)
class ConnectionConfig(Checked):
    """How to reach the device, and how hard to try.

    ``ssh`` uses the system OpenSSH client (``ssh``/``scp``) with ``BatchMode=yes`` and the
    user's ``~/.ssh/config`` and ``known_hosts``: host keys are always checked. ``adb``
    uses the ``adb`` on PATH. ``qemu`` runs the runner in an emulated aarch64 userland on
    this machine (``python -m edgeqat.harness.qemu setup`` builds it).
    """

    kind: str = choice("local", ("local", "ssh", "adb", "qemu"))
    host: str | None = None  # ssh: [user@]host or an alias from ~/.ssh/config
    port: int | None = bounded(None, PORT)  # ssh: overrides the ssh config's port
    identity_file: str | None = None  # ssh: -i; default: the ssh config / agent
    ssh_config: str | None = None  # ssh: -F FILE instead of ~/.ssh/config
    ssh_options: tuple[str, ...] = ()  # ssh: extra "-o Key=Value" options, as "Key=Value"
    connect_timeout_s: float = bounded(10.0, POSITIVE)  # ssh: ConnectTimeout
    serial: str | None = None  # adb: device serial (-s)
    adb: str = "adb"  # adb: the adb executable
    python: str = "python3"  # interpreter on the device (local/qemu: see below)
    workdir: str = "/tmp/edgeqat"  # scratch directory on the device
    cpu: str = "cortex-a72"  # qemu: QEMU_CPU (cortex-a72: Pi 4, cortex-a76: Pi 5)
    sysroot: str | None = None  # qemu: default $EDGEQAT_SYSROOT or ~/.cache/edgeqat/...
    retries: int = bounded(3, AT_LEAST_0)  # extra attempts after a dropped connection
    retry_backoff_s: float = bounded(2.0, AT_LEAST_0)  # first back-off; doubles each retry
    timeout_s: float = bounded(600.0, POSITIVE)  # one runner invocation

    def check(self) -> None:
        for opt in self.ssh_options:
            if "=" not in opt or opt.startswith("-"):
                raise FieldError("ssh_options", opt, "must look like 'Key=Value' (passed as "
                                 "-o Key=Value)")


@dataclass(frozen=True)
class DeviceConfig(Checked):
    """A device profile: hardware, runtime, delegate, threads, and how to reach it."""

    name: str = "local_cpu"
    description: str = ""
    hardware: str = ""  # free text for reports, e.g. "Raspberry Pi 4 Model B, 4 GB"
    # The CPU the runtime runs on ("aarch64", "x86_64"): the int4 kernels round
    # differently on each, and the Keras reference follows it (edgeqat.requant). Empty:
    # this machine's for a local device, aarch64 under qemu.
    arch: str = ""
    runtime: str = choice(
        "ai_edge_litert", ("auto", "ai_edge_litert", "tflite_runtime", "tensorflow"))
    # The runtime's version on the device, when known ("2.14.0"): before a model ships,
    # every op version in it is checked against what that version can load
    # (edgeqat.op_versions). Empty: not checked.
    runtime_version: str = ""
    delegate: str = choice("xnnpack", ("xnnpack", "edgetpu", "gpu", "none"))
    delegate_device: str | None = None  # edgetpu: "usb", "usb:0", "pci:0"
    num_threads: int = bounded(1, Range(1, 1024, text="must be 1..1024"))
    allow_cpu_fallback: bool = False  # a missing delegate falls back to CPU (and says so)
    connection: ConnectionConfig = ConnectionConfig()
    source: str = ""

    def check(self) -> None:
        if self.connection.kind == "ssh" and not self.connection.host:
            raise FieldError("connection.host", _NO_VALUE,
                             "is required when connection.kind = 'ssh'")
        if self.delegate_device and self.delegate != "edgetpu":
            raise FieldError("delegate_device", _NO_VALUE, "applies only to delegate = 'edgetpu'")


# ---------------------------------------------------------------------------- loading


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return {"str": "a string", "int": "an integer", "float": "a number",
                "bool": "true or false"}.get(tp.__name__, tp.__name__)
    return str(tp)


def _convert(value: Any, tp: Any, where: str, file: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _convert(value, args[0], where, file)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{file}: [{where}] must be a table")
        return from_table(tp, value, where, file)
    if origin is tuple:
        (item_tp, _) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{file}: {where} must be a list (array of tables: [[{where}]])")
        return tuple(_convert(v, item_tp, f"{where}[{i}]", file) for i, v in enumerate(value))
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is bool and not isinstance(value, bool):
        raise ConfigError(f"{file}: {where} = {value!r} must be true or false")
    if tp in (int, str, float) and (not isinstance(value, tp) or isinstance(value, bool)):
        raise ConfigError(f"{file}: {where} = {value!r} must be {_type_name(tp)}")
    return value


def from_table(cls: type, table: dict, prefix: str = "", file: str = "") -> Any:
    """A config dataclass ``cls`` from a parsed TOML ``table``, checked as a file is.

    Args:
      prefix: the dotted key of ``table`` (errors name ``prefix.key``).
      file: the file it came from, for error messages.

    Raises:
      ConfigError: an unknown key, a wrong type or a value outside a field's choices.
    """
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "source"}
    kwargs = {}
    for key, value in table.items():
        where = f"{prefix}.{key}" if prefix else key
        if key not in fields:
            allowed = ", ".join(sorted(fields))
            raise ConfigError(f"{file}: unknown key '{where}'; allowed here: {allowed}")
        kwargs[key] = _convert(value, hints[key], where, file)
    try:
        return cls(**kwargs)
    except FieldError as e:
        raise ConfigError(f"{file}: {e.describe(f'{prefix}.{e.key}' if prefix else e.key)}") \
            from None


def _read_toml(path: str | Path, what: str) -> tuple[Path, dict]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: {what} file not found; pass an existing .toml file")
    try:
        with path.open("rb") as f:
            return path, tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: malformed TOML: {e}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a UTF-8 TOML file") from None


def _resolve(path: str | None, base: Path) -> str | None:
    if path is None or Path(path).is_absolute():
        return path
    return str((base.parent / path).resolve())


def _resolve_user(path: str | None, base: Path) -> str | None:
    """``~`` expands to the home directory; other relative paths are relative to the file."""
    if path is None:
        return None
    return _resolve(str(Path(path).expanduser()), base)


def load_pipeline(path: str | Path = DEFAULT_PIPELINE,
                  overrides: dict[str, Any] | None = None) -> PipelineConfig:
    """Reads a pipeline TOML file, with ``overrides`` applied before any check.

    Relative paths inside it (``data.path``, ``model.path``) are relative to the file.

    Args:
      path: the TOML file.
      overrides: dotted key -> value (``{"qat.epochs": 6}``), as the command line sets
        them; they pass the same type and range checks as the file's own values, and an
        error about one says that the command line set it.

    Raises:
      ConfigError: the file is missing, malformed, or has a bad key or value.
    """
    path, table = _read_toml(path, "pipeline")
    for key, value in (overrides or {}).items():
        *tables, last = key.split(".")
        node = table
        for t in tables:
            node = node.setdefault(t, {})
        node[last] = value
    try:
        cfg = from_table(PipelineConfig, table, "", str(path))
    except ConfigError as e:
        hit = [k for k in (overrides or {}) if f" {k} " in f" {e} "]
        if hit:
            raise ConfigError(f"{e} (set on the command line)") from None
        raise
    return dataclasses.replace(
        cfg,
        source=str(path),
        data=dataclasses.replace(cfg.data, path=_resolve(cfg.data.path, path)),
        model=dataclasses.replace(cfg.model, path=_resolve(cfg.model.path, path)),
    )


def load_device(path: str | Path = DEFAULT_DEVICE) -> DeviceConfig:
    """Reads a device profile TOML file.

    Raises:
      ConfigError: the file is missing, malformed, or has a bad key or value.
    """
    path, table = _read_toml(path, "device")
    cfg = from_table(DeviceConfig, table, "", str(path))
    conn = cfg.connection
    cfg = dataclasses.replace(cfg, connection=dataclasses.replace(
        conn, identity_file=_resolve_user(conn.identity_file, path),
        ssh_config=_resolve_user(conn.ssh_config, path),
        sysroot=_resolve_user(conn.sysroot, path)))
    return dataclasses.replace(cfg, source=str(path))


def to_toml(cfg: Any) -> str:
    """Writes a config back as TOML (for the artifact directory and for reports)."""
    lines: list[str] = []

    def scalar(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        return repr(v)

    def emit(obj: Any, prefix: str, array: bool = False) -> None:
        plain = []
        nested = []
        for f in dataclasses.fields(obj):
            v = getattr(obj, f.name)
            if f.name == "source" or v is None:
                continue
            if dataclasses.is_dataclass(v) or (isinstance(v, tuple) and v and
                                              dataclasses.is_dataclass(v[0])):
                nested.append((f.name, v))
            elif isinstance(v, tuple):
                plain.append(f"{f.name} = [{', '.join(scalar(x) for x in v)}]")
            else:
                plain.append(f"{f.name} = {scalar(v)}")
        if prefix:
            lines.append(f"\n[[{prefix}]]" if array else f"\n[{prefix}]")
        lines.extend(plain)
        for name, v in nested:
            key = f"{prefix}.{name}" if prefix else name
            if isinstance(v, tuple):
                for item in v:
                    emit(item, key, array=True)
            else:
                emit(v, key)

    emit(cfg, "")
    return "\n".join(lines).lstrip() + "\n"
