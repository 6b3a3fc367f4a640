"""python -m edgeqat.pipeline: data -> float -> PTQ / QAT -> full integer -> device -> report.

With no arguments it runs ``pipelines/digits_dscnn.toml`` on the local CPU and writes
``runs/digits_dscnn/``. Bad input exits with status 2 and one line naming the culprit.
"""

from __future__ import annotations

import dataclasses
import logging as std_logging
import os
import shutil
import sys
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from absl import app, flags, logging

from edgeqat.config import (
    DEFAULT_DEVICE,
    DEFAULT_PIPELINE,
    DEVICES_DIR,
    PIPELINES_DIR,
    DeviceConfig,
    PipelineConfig,
    load_device,
    load_pipeline,
)
from edgeqat.errors import UserError

FLAGS = flags.FLAGS


def _define_flags() -> None:
    """CLI flags, defined when the CLI starts (not on import, so others can import run())."""
    flags.DEFINE_string("pipeline", str(DEFAULT_PIPELINE),
                        "Pipeline TOML file, or the name of one in pipelines/.")
    flags.DEFINE_string("device", str(DEFAULT_DEVICE),
                        "Device profile TOML file, or the name of one in devices/.")
    flags.DEFINE_string("output_dir", None,
                        "Where artifacts go (default runs/<pipeline name>).")
    flags.DEFINE_integer("epochs", None, "Override qat.epochs.")
    flags.DEFINE_integer("float_epochs", None, "Override model.epochs (float training).")
    flags.DEFINE_integer("seed", None, "Override the pipeline seed.")


@dataclass(frozen=True)
class PipelineResult:
    """Everything a pipeline run produced, in memory; ``write_outputs`` puts it on disk."""

    config: PipelineConfig
    device: DeviceConfig
    data: dict
    float_model: object = field(repr=False)
    qat_model: object = field(repr=False)  # None when auto mode stopped before QAT
    tflites: dict = field(repr=False)
    report: dict = field(repr=False)


class _Stages:
    """Times each stage and logs one line per stage."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        yield
        self.seconds[name] = round(time.perf_counter() - start, 2)
        logging.info("stage %s done in %.1f s", name, self.seconds[name])


def run(cfg: PipelineConfig, device: DeviceConfig) -> PipelineResult:
    """Runs the whole flow. Touches no output directory: see ``write_outputs``."""
    from edgeqat import (
        annotate,
        convert,
        diagnostics,
        inspect,
        metadata,
        models,
        op_versions,
        ptq,
        qat,
        report,
        requant,
        train,
    )
    from edgeqat.data import load_dataset
    from edgeqat.edgetpu import edgetpu_report
    from edgeqat.keras import keras, tf
    from edgeqat.validate import target_arch, validate_on

    stage = _Stages()
    keras.utils.set_random_seed(cfg.seed)
    tf.config.experimental.enable_op_determinism()

    with stage("data"):
        data = load_dataset(cfg.data, cfg.seed)
    with stage("float"):
        if cfg.model.path:
            model = models.load_model(cfg.model.path)
        else:
            model = models.build_model(cfg.model, data.input_shape, data.num_classes)
        trained = train.train_float(model, data, cfg.model)
    if cfg.mode == "auto":  # PTQ, then QAT, then more precision, until within budget
        from edgeqat.auto import run_auto

        return run_auto(cfg, device, data, trained, stage)
    with stage("ptq"):
        float_tflite = convert.to_tflite(trained.model, "float")
        ptq_tflite, calibration = ptq.post_training(trained.model, data.x_calib,
                                                    cfg.convert.mode, cfg.ptq)
    with stage("annotate"), qat.strategy_scope(cfg.qat.strategy):
        qat_model = annotate.annotate_model(trained.model, cfg.policy,
                                            sample_x=data.x_calib[:256])
    with stage("qat"):
        tuned = qat.fine_tune(qat_model, data, cfg.qat, teacher=trained.model, seed=cfg.seed,
                              float_learning_rate=cfg.model.learning_rate)
    with stage("convert"):
        qat_tflite = convert.to_tflite(annotate.prepare_for_export(tuned.model,
                                                                   cfg.convert.mode),
                                       cfg.convert.mode, qat=True,
                                       calibration=data.x_calib)
        ops = inspect.require_full_integer(qat_tflite, f"qat_{cfg.convert.mode}.tflite")
        inspect.require_full_integer(ptq_tflite, f"ptq_{cfg.convert.mode}.tflite")
        edgetpu = edgetpu_report(qat_tflite)
    mode = cfg.convert.mode
    tflites = {"float": float_tflite, f"ptq_{mode}": ptq_tflite, f"qat_{mode}": qat_tflite}
    diag = []
    with stage("diagnose"):
        if cfg.diagnostics.enabled:
            x_diag = data.x_calib[: cfg.diagnostics.samples]
            if calibration is not None and mode == "int8":
                diag.append(diagnostics.ptq_layer_errors(calibration, trained.model, x_diag,
                                                         f"ptq_{mode}"))
            diag.append(diagnostics.direct_layer_errors(qat_tflite, tuned.model, x_diag,
                                                        f"qat_{mode}"))
    tflites = metadata.with_pipeline_metadata(tflites, cfg, data)  # what ships, validated
    op_versions.require_loadable(tflites, device)  # before the device sees a model
    with stage("validate"):
        # The exported model (biases snapped, kernel rounding of the device's CPU, which
        # the diagnostics above took from this machine): what ships, so the report's
        # Keras QAT accuracy and the agreement come from the same logits.
        requant.install(tuned.model, mode, target_arch(device))
        qat_logits = tuned.model.predict(data.x_test, batch_size=256, verbose=0)
        tuned = dataclasses.replace(tuned, accuracy=float(
            (qat_logits.argmax(-1) == data.y_test).mean()))
        validation = validate_on(device, tflites, data.x_test, data.y_test,
                                 references={f"qat_{mode}": qat_logits},
                                 warmup=cfg.validate.warmup_runs,
                                 runs=cfg.validate.latency_runs)
    summary = report.build_report(cfg, device, data.summary(), trained, tuned, validation,
                                  ops, stage.seconds, diagnostics=diag, edgetpu=edgetpu,
                                  storage=inspect.storage(qat_tflite))
    return PipelineResult(cfg, device, data.summary(), trained.model, tuned.model, tflites,
                          summary)


@contextmanager
def _quiet_absl():
    level = logging.get_verbosity()
    logging.set_verbosity(logging.WARNING)
    try:
        yield
    finally:
        logging.set_verbosity(level)


def write_outputs(result: PipelineResult, output_dir: Path) -> Path:
    """Writes all artifacts into ``output_dir`` atomically (a sibling temp dir, renamed)."""
    from edgeqat import annotate, report
    from edgeqat.config import to_toml

    output_dir = Path(output_dir)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = output_dir.parent / f".{output_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        for name, content in result.tflites.items():
            (tmp / f"{name}.tflite").write_bytes(content)
        if result.qat_model is not None:  # auto mode may ship without QAT
            # A SavedModel directory: the one format the QAT wrappers round-trip in.
            with annotate.scope(), _quiet_absl():  # the saver logs every asset it writes
                result.qat_model.save(tmp / "qat_model", save_format="tf")
        result.float_model.save(tmp / "float_model.keras")
        (tmp / "pipeline.toml").write_text(to_toml(result.config))
        (tmp / "device.toml").write_text(to_toml(result.device))
        report.write_report(result.report, tmp)
        old = output_dir.parent / f".{output_dir.name}.old-{os.getpid()}"
        if output_dir.exists():
            os.replace(output_dir, old)
        os.replace(tmp, output_dir)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return output_dir


def _find(value: str, folder: Path) -> Path:
    """A path as given, or the name of a TOML file in ``folder``."""
    p = Path(value)
    if p.exists() or p.suffix == ".toml" or "/" in value:
        return p
    return folder / f"{value}.toml"


def resolve_configs(pipeline: str, device: str, *, epochs: int | None = None,
                    float_epochs: int | None = None, seed: int | None = None,
                    ) -> tuple[PipelineConfig, DeviceConfig]:
    """Loads the pipeline and device files and applies command-line overrides."""
    cfg = load_pipeline(_find(pipeline, PIPELINES_DIR))
    dev = load_device(_find(device, DEVICES_DIR))
    if epochs is not None:
        cfg = dataclasses.replace(cfg, qat=dataclasses.replace(cfg.qat, epochs=epochs))
    if float_epochs is not None:
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, epochs=float_epochs))
    if seed is not None:
        cfg = dataclasses.replace(cfg, seed=seed)
    return cfg, dev


def _with_checkpoint_dir(cfg: PipelineConfig, output_dir: Path) -> PipelineConfig:
    """QAT checkpoints go to ``qat.checkpoint_dir``, by default ``<output_dir>.ckpt``.

    A run killed during QAT and started again with the same command resumes from there;
    the directory is removed once the outputs are written. A multi-worker strategy is
    created here, before TensorFlow initialises its devices.
    """
    ckpt = cfg.qat.checkpoint_dir or f"{output_dir}.ckpt"
    if cfg.qat.strategy == "multi_worker_mirrored":
        from edgeqat.qat import make_strategy

        make_strategy(cfg.qat.strategy)
    return dataclasses.replace(cfg, qat=dataclasses.replace(cfg.qat, checkpoint_dir=ckpt))


class _OwnInfo(std_logging.Filter):
    """Passes warnings and errors from anywhere, INFO only from edgeqat's own modules."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        return (record.levelno >= std_logging.WARNING
                or f"{os.sep}edgeqat{os.sep}" in record.pathname)


def _quiet_third_party() -> None:
    """Keeps the stage log edgeqat's own: one line per stage.

    TensorFlow logs INFO lines through absl while it saves checkpoints and SavedModels
    (sharding, fingerprints, untraced functions), and two warnings concern what edgeqat
    does on purpose (the quantization debugger's tf.lite.Interpreter; intermediate
    tensors kept for per-layer error). Warnings and errors from anywhere still show.
    """
    absl_logger = std_logging.getLogger("absl")
    if not any(isinstance(f, _OwnInfo) for f in absl_logger.filters):  # main() may rerun
        absl_logger.addFilter(_OwnInfo())
    warnings.filterwarnings("ignore", message=r"\s*Warning: tf\.lite\.Interpreter is deprecated")
    warnings.filterwarnings("ignore", message=r".*`experimental_preserve_all_tensors`")


def main(argv: list[str]) -> int:
    _quiet_third_party()
    if len(argv) > 1:
        print(f"edgeqat: error: unexpected argument {argv[1]!r}; see --help", file=sys.stderr)
        return 2
    try:
        cfg, dev = resolve_configs(FLAGS.pipeline, FLAGS.device, epochs=FLAGS.epochs,
                                   float_epochs=FLAGS.float_epochs, seed=FLAGS.seed)
        output_dir = Path(FLAGS.output_dir or Path("runs") / Path(cfg.source).stem)
        cfg = _with_checkpoint_dir(cfg, output_dir)
        result = run(cfg, dev)
        write_outputs(result, output_dir)
        shutil.rmtree(cfg.qat.checkpoint_dir, ignore_errors=True)  # finished: nothing to resume
    except UserError as e:
        print(f"edgeqat: error: {e}", file=sys.stderr)
        return 2
    from edgeqat.report import headline

    print(headline(result.report, output_dir))
    return 0


def _parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing, but a bad flag is one line and exit status 2."""
    try:
        return FLAGS(argv)
    except flags.Error as e:
        print(f"edgeqat: error: {e}; see --help", file=sys.stderr)
        sys.exit(2)


def entry() -> None:
    _define_flags()
    app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
    entry()
