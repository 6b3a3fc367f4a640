"""Pipeline and device configuration: strict TOML into frozen dataclasses.

Every table in a TOML file maps to one dataclass below. Unknown keys, wrong types and
values outside a field's ``choices`` are errors naming the file, the dotted key and what is
allowed. No TensorFlow import happens here, so a bad file fails in milliseconds.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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


# ---------------------------------------------------------------------------- pipeline


@dataclass(frozen=True)
class DataConfig:
    """Where the training and evaluation data come from."""

    name: str = choice("digits", ("digits", "mnist1d", "npz"))
    path: str | None = None  # .npz with x_train, y_train, x_test, y_test (name = "npz")
    calibration_samples: int = 500  # representative samples for PTQ calibration
    eval_samples: int = 0  # 0: the whole test split
    validation_fraction: float = 0.1  # held out of x_train for early checks


@dataclass(frozen=True)
class ModelConfig:
    """The float model: a built-in builder, a ``module:function``, or a saved Keras file."""

    builder: str = "dscnn"
    path: str | None = None  # a saved tf_keras model (.keras, .h5 or SavedModel dir)
    epochs: int = 20  # float training epochs (0 with `path`: use the model as it is)
    batch_size: int = 64
    learning_rate: float = 2e-3


WEIGHT_QUANTIZERS = ("per_channel", "per_tensor", "lsq")
ACTIVATION_QUANTIZERS = ("moving_average", "relu6", "pact", "lsq", "percentile", "mse")


@dataclass(frozen=True)
class RuleConfig:
    """One policy rule: which layers it matches and how they are quantized.

    ``layers`` and ``classes`` are regexes that must fully match the layer name and its
    class name (both, when both are given). Rules are tried in order; the first match wins.
    """

    layers: str = ".*"
    classes: str = ".*"
    float: bool = False  # leave matched layers in float (conversion then needs calibration)
    weight_bits: int = 8  # 2..8 (4: int4_weights mode)
    activation_bits: int = 8  # 2..16 (16: int16x8 mode)
    weight_quantizer: str = choice("per_channel", WEIGHT_QUANTIZERS,
                                   "per_channel: symmetric last-value (per tensor where a "
                                   "layer cannot convert per channel); lsq: learned step")
    activation_quantizer: str = choice("moving_average", ACTIVATION_QUANTIZERS,
                                       "relu6: fixed [0, 6] on ReLU6 outputs, moving "
                                       "average elsewhere")


@dataclass(frozen=True)
class PolicyConfig:
    """Ordered rules (first match wins); layers no rule matches get ``default``."""

    rules: tuple[RuleConfig, ...] = ()
    default: RuleConfig = RuleConfig()


@dataclass(frozen=True)
class PrecisionStep:
    """One step of a gradual-precision schedule: from ``epoch`` (0-based) on, use these bits."""

    epoch: int = 0
    weight_bits: int = 8  # 2..8; every weight quantizer of the QAT model
    activation_bits: int = 0  # 2..16; 0: keep the bits the policy gave each activation


@dataclass(frozen=True)
class QatConfig:
    """Quantization-aware fine-tuning: schedule, distillation, checkpoints, distribution.

    Fractions (``quant_delay``, ``observer_freeze``, ``bn_freeze``, ``warmup_fraction``) are
    shares of all QAT steps; 1.0 means "never" for the freezes.
    """

    epochs: int = 4
    batch_size: int = 64  # global batch (split over the replicas of a distributed run)
    learning_rate: float | None = None  # peak rate; unset: learning_rate_fraction x float
    learning_rate_fraction: float = 0.1  # of model.learning_rate, when learning_rate unset
    warmup_fraction: float = 0.1  # linear learning-rate warm-up, then cosine decay to 1%
    quant_delay: float = 0.1  # float training (fake quant off) for this share of steps
    observer_freeze: float = 0.75  # activation ranges stop moving after this share
    bn_freeze: float = 0.5  # BatchNorm moving statistics frozen after this share
    precision: tuple[PrecisionStep, ...] = ()  # [[qat.precision]] epoch / weight_bits
    distill: bool = False  # knowledge distillation from the float model
    distill_alpha: float = 0.5  # loss = a*task + (1-a)*T^2*KL(teacher || student)
    distill_temperature: float = 4.0
    checkpoint_dir: str = ""  # "": the CLI uses <output_dir>.ckpt; resume is automatic
    strategy: str = choice("default", ("default", "mirrored", "multi_worker_mirrored"),
                           "mirrored: all local GPUs (or logical CPUs); "
                           "multi_worker_mirrored: a cluster described by TF_CONFIG")


@dataclass(frozen=True)
class ConvertConfig:
    """TFLite conversion."""

    mode: str = choice("int8", ("int8", "int16x8", "int4_weights"))


@dataclass(frozen=True)
class ValidateConfig:
    """Validation thresholds and latency measurement."""

    max_accuracy_drop: float = 0.005  # QAT int8 vs float, same evaluation set (fraction)
    latency_runs: int = 50
    warmup_runs: int = 5


@dataclass(frozen=True)
class PtqConfig:
    """Post-training quantization: activation calibration and weight rounding."""

    calibration: str = choice("minmax", ("minmax", "percentile", "mse"),
                              "activation ranges: observed extremes, a percentile, or the "
                              "clipping range with least quantization MSE")
    percentile: float = 99.99  # calibration = "percentile": clip outside [100-p, p]
    range_samples: int = 64  # samples whose activations percentile/MSE ranges look at
    adaround: bool = False  # learn weight rounding (Nagel et al. 2020) before conversion
    adaround_iterations: int = 300  # optimisation steps per layer
    adaround_samples: int = 128  # calibration samples AdaRound fits on


@dataclass(frozen=True)
class AutoConfig:
    """``mode = "auto"``: PTQ, then QAT, then higher precision, until within budget.

    The budget is ``validate.max_accuracy_drop`` (vs the float model).
    """

    qat: bool = True  # try QAT when PTQ int8 misses the budget
    int16_activations: bool = True  # then try 16x8 (int16 activations, still integer)
    float_layers: int = 0  # then leave up to this many most sensitive layers in float
    #                        (0: never; >0 gives up the fully-integer property)
    decide_on: str = choice("test", ("test", "validation"),
                            "split whose accuracy the decisions compare")


@dataclass(frozen=True)
class DiagnosticsConfig:
    """Per-layer quantization error and layer sensitivity in the report."""

    enabled: bool = True
    samples: int = 64  # calibration samples the per-layer comparison runs on
    worst: int = 3  # layers named in the report's summary
    sensitivity: bool = False  # rank layers by accuracy regained when left float (slower)


@dataclass(frozen=True)
class PipelineConfig:
    """A whole pipeline: data, model, policy, QAT, conversion, validation."""

    name: str = "pipeline"
    seed: int = 0
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
    source: str = ""  # the file it was read from (set by the loader)


# ---------------------------------------------------------------------------- device


@dataclass(frozen=True)
class ConnectionConfig:
    """How to reach the device, and how hard to try.

    ``ssh`` uses the system OpenSSH client (``ssh``/``scp``) with ``BatchMode=yes`` and the
    user's ``~/.ssh/config`` and ``known_hosts``: host keys are always checked. ``adb``
    uses the ``adb`` on PATH. ``qemu`` runs the runner in an emulated aarch64 userland on
    this machine (``python -m edgeqat.harness.qemu setup`` builds it).
    """

    kind: str = choice("local", ("local", "ssh", "adb", "qemu"))
    host: str | None = None  # ssh: [user@]host or an alias from ~/.ssh/config
    port: int | None = None  # ssh: overrides the ssh config's port
    identity_file: str | None = None  # ssh: -i; default: the ssh config / agent
    ssh_config: str | None = None  # ssh: -F FILE instead of ~/.ssh/config
    ssh_options: tuple[str, ...] = ()  # ssh: extra "-o Key=Value" options, as "Key=Value"
    connect_timeout_s: float = 10.0  # ssh: ConnectTimeout
    serial: str | None = None  # adb: device serial (-s)
    adb: str = "adb"  # adb: the adb executable
    python: str = "python3"  # interpreter on the device (local/qemu: see below)
    workdir: str = "/tmp/edgeqat"  # scratch directory on the device
    cpu: str = "cortex-a72"  # qemu: QEMU_CPU (cortex-a72: Pi 4, cortex-a76: Pi 5)
    sysroot: str | None = None  # qemu: default $EDGEQAT_SYSROOT or ~/.cache/edgeqat/...
    retries: int = 3  # extra attempts after a dropped or refused connection
    retry_backoff_s: float = 2.0  # first back-off; doubles each retry
    timeout_s: float = 600.0  # one runner invocation


@dataclass(frozen=True)
class DeviceConfig:
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
    num_threads: int = 1
    allow_cpu_fallback: bool = False  # a missing delegate falls back to CPU (and says so)
    connection: ConnectionConfig = ConnectionConfig()
    source: str = ""


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
        return _from_table(tp, value, where, file)
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


def _from_table(cls: type, table: dict, prefix: str, file: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "source"}
    kwargs = {}
    for key, value in table.items():
        where = f"{prefix}.{key}" if prefix else key
        if key not in fields:
            allowed = ", ".join(sorted(fields))
            raise ConfigError(f"{file}: unknown key '{where}'; allowed here: {allowed}")
        value = _convert(value, hints[key], where, file)
        choices = fields[key].metadata.get("choices")
        if choices and value not in choices:
            raise ConfigError(
                f"{file}: {where} = {value!r} is not one of: {', '.join(map(str, choices))}"
            )
        kwargs[key] = value
    return cls(**kwargs)


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


def load_pipeline(path: str | Path = DEFAULT_PIPELINE) -> PipelineConfig:
    """Reads a pipeline TOML file.

    Relative paths inside it (``data.path``, ``model.path``) are relative to the file.

    Raises:
      ConfigError: the file is missing, malformed, or has a bad key or value.
    """
    path, table = _read_toml(path, "pipeline")
    cfg = _from_table(PipelineConfig, table, "", str(path))
    _check_pipeline(cfg, str(path))
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
    cfg = _from_table(DeviceConfig, table, "", str(path))
    conn = cfg.connection
    if conn.kind in ("ssh",) and not conn.host:
        raise ConfigError(f"{path}: connection.host is required when connection.kind = 'ssh'")
    if cfg.num_threads < 1:
        raise ConfigError(f"{path}: num_threads = {cfg.num_threads} must be at least 1")
    if conn.retries < 0 or conn.retry_backoff_s < 0 or conn.timeout_s <= 0:
        raise ConfigError(f"{path}: connection.retries and retry_backoff_s must be >= 0, "
                          "timeout_s > 0")
    for opt in conn.ssh_options:
        if "=" not in opt or opt.startswith("-"):
            raise ConfigError(f"{path}: connection.ssh_options entry {opt!r} must look like "
                              "'Key=Value' (passed as -o Key=Value)")
    if cfg.delegate_device and cfg.delegate != "edgetpu":
        raise ConfigError(f"{path}: delegate_device applies only to delegate = 'edgetpu'")
    cfg = dataclasses.replace(cfg, connection=dataclasses.replace(
        conn, identity_file=_resolve_user(conn.identity_file, path),
        ssh_config=_resolve_user(conn.ssh_config, path),
        sysroot=_resolve_user(conn.sysroot, path)))
    return dataclasses.replace(cfg, source=str(path))


def _check_pipeline(cfg: PipelineConfig, file: str) -> None:
    positive = {
        "model.batch_size": cfg.model.batch_size,
        "qat.batch_size": cfg.qat.batch_size,
        "data.calibration_samples": cfg.data.calibration_samples,
        "validate.latency_runs": cfg.validate.latency_runs,
        "ptq.range_samples": cfg.ptq.range_samples,
        "ptq.adaround_iterations": cfg.ptq.adaround_iterations,
        "ptq.adaround_samples": cfg.ptq.adaround_samples,
        "diagnostics.samples": cfg.diagnostics.samples,
    }
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"{file}: {key} = {value} must be at least 1")
    for key, value in {"model.epochs": cfg.model.epochs, "qat.epochs": cfg.qat.epochs}.items():
        if value < 0:
            raise ConfigError(f"{file}: {key} = {value} must be 0 or more")
    if cfg.data.name == "npz" and not cfg.data.path:
        raise ConfigError(f"{file}: data.path is required when data.name = 'npz'")
    if not 0 <= cfg.validate.max_accuracy_drop <= 1:
        raise ConfigError(f"{file}: validate.max_accuracy_drop must be a fraction in [0, 1]")
    if not 50 < cfg.ptq.percentile <= 100:
        raise ConfigError(f"{file}: ptq.percentile = {cfg.ptq.percentile} must be in (50, 100]")
    if cfg.auto.float_layers < 0:
        raise ConfigError(f"{file}: auto.float_layers = {cfg.auto.float_layers} must be 0 or more")
    if not 0 <= cfg.data.validation_fraction < 1:
        raise ConfigError(f"{file}: data.validation_fraction must be in [0, 1)")
    rules = [(f"policy.rules[{i}]", r) for i, r in enumerate(cfg.policy.rules)]
    for where, rule in [*rules, ("policy.default", cfg.policy.default)]:
        _check_rule(rule, where, file)
        if cfg.convert.mode == "int16x8" and not rule.float and rule.activation_bits != 16:
            raise ConfigError(
                f"{file}: {where}.activation_bits = {rule.activation_bits} but convert.mode "
                "= 'int16x8' ships 16-bit activations: set activation_bits = 16 (QAT must "
                "train the ranges it ships)")
    _check_qat(cfg.qat, file)
    for i, p in enumerate(cfg.qat.precision):
        if cfg.convert.mode == "int16x8" and p.activation_bits not in (0, 16):
            raise ConfigError(f"{file}: qat.precision[{i}].activation_bits = "
                              f"{p.activation_bits} but convert.mode = 'int16x8': use 0 or 16")


def _check_qat(q: QatConfig, file: str) -> None:
    fractions = {"quant_delay": q.quant_delay, "observer_freeze": q.observer_freeze,
                 "bn_freeze": q.bn_freeze, "warmup_fraction": q.warmup_fraction,
                 "distill_alpha": q.distill_alpha}
    for key, value in fractions.items():
        if not 0 <= value <= 1:
            raise ConfigError(f"{file}: qat.{key} = {value} must be a fraction in [0, 1]")
    if q.learning_rate is not None and q.learning_rate <= 0:
        raise ConfigError(f"{file}: qat.learning_rate = {q.learning_rate} must be positive")
    if q.learning_rate_fraction <= 0:
        raise ConfigError(f"{file}: qat.learning_rate_fraction must be positive")
    if q.distill_temperature <= 0:
        raise ConfigError(f"{file}: qat.distill_temperature must be positive")
    epochs = [p.epoch for p in q.precision]
    if epochs != sorted(set(epochs)) or any(e < 0 for e in epochs):
        raise ConfigError(f"{file}: qat.precision epochs {epochs} must be distinct, "
                          "0 or more, in increasing order")
    for i, p in enumerate(q.precision):
        if not 2 <= p.weight_bits <= 8:
            raise ConfigError(f"{file}: qat.precision[{i}].weight_bits = {p.weight_bits} "
                              "must be 2..8")
        if p.activation_bits and not 2 <= p.activation_bits <= 16:
            raise ConfigError(f"{file}: qat.precision[{i}].activation_bits = "
                              f"{p.activation_bits} must be 0 (keep) or 2..16")


def _check_rule(rule: RuleConfig, where: str, file: str) -> None:
    for key in ("layers", "classes"):
        try:
            re.compile(getattr(rule, key))
        except re.error as e:
            raise ConfigError(f"{file}: {where}.{key} is not a valid regex: {e}") from None
    if not 2 <= rule.weight_bits <= 8:
        raise ConfigError(f"{file}: {where}.weight_bits = {rule.weight_bits} must be 2..8")
    if not 2 <= rule.activation_bits <= 16:
        raise ConfigError(
            f"{file}: {where}.activation_bits = {rule.activation_bits} must be 2..16")


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
