"""python -m edgeqat.pipeline: data -> float -> PTQ / QAT -> full integer -> device -> report.

With no arguments it runs ``pipelines/digits_dscnn.toml`` on the local CPU and writes
``runs/digits_dscnn/``. Bad input exits with status 2 and one line naming the culprit.
"""

from __future__ import annotations

import dataclasses
import logging as std_logging
import os
import sys
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from absl import app, flags, logging

from edgeqat import modes
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
from edgeqat.outputs import OutputDir, claim_checkpoint, is_disk_full, remove_checkpoint

if TYPE_CHECKING:
    from edgeqat.flow import PipelineResult

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


def run(cfg: PipelineConfig, device: DeviceConfig) -> PipelineResult:
    """Runs the whole flow. Touches no output directory: see ``write_outputs``."""
    from edgeqat.data import load_dataset
    from edgeqat.harness.device import preflight

    stage = _Stages()
    if cfg.data.name == "text":  # the language-model pipeline: the same stages, for text
        from edgeqat.lm import flow as lm_flow

        return lm_flow.run(cfg, device, stage)
    # What can be checked is checked before any training, and before TensorFlow loads:
    # the data, then the device (its tools, the connection, runtime and delegate).
    with stage("data"):
        data = load_dataset(cfg.data, cfg.seed)
    with stage("device"):
        preflight(device)

    from edgeqat import convert, diagnostics, inspect, models, ptq, train
    from edgeqat.flow import finish, quantize_aware, resume_context
    from edgeqat.keras import keras, tf
    from edgeqat.policy import unmatched_rules

    keras.utils.set_random_seed(cfg.seed)
    tf.config.experimental.enable_op_determinism()
    with stage("float"):
        if cfg.model.path:
            model = models.load_model(cfg.model.path)
            what = f"model.path {cfg.model.path}"
        else:
            model = models.build_model(cfg.model, data.input_shape, data.num_classes)
            what = f"model.builder {cfg.model.builder!r}"
        data.check_fits(model.input_shape[1:], model.output_shape[-1], what)
        warnings = unmatched_rules(cfg.policy, [(layer.name, type(layer).__name__)
                                                for layer in model.layers])
        for w in warnings:
            logging.warning("%s", w)
        trained = train.train_float(model, data, cfg.model)
    if cfg.mode == "auto":  # PTQ, then QAT, then more precision, until within budget
        from edgeqat.auto import run_auto

        return run_auto(cfg, device, data, trained, stage, warnings)
    mode = modes.spec(cfg.convert.mode)
    with stage("ptq"):
        float_tflite = convert.to_tflite(trained.model, modes.FLOAT)
        ptq_tflite, calibration = ptq.post_training(trained.model, data.x_calib, mode.mode,
                                                    cfg.ptq)
        inspect.require_full_integer(ptq_tflite, f"{mode.ptq_name}.tflite")
    quantized = quantize_aware(trained, data, mode.mode, cfg.policy, cfg.qat, seed=cfg.seed,
                               float_learning_rate=cfg.model.learning_rate, stage=stage,
                               context=resume_context(cfg))
    tflites = {modes.FLOAT: float_tflite, mode.ptq_name: ptq_tflite,
               quantized.name: quantized.tflite}
    diag = []
    with stage("diagnose"):
        if cfg.diagnostics.enabled:
            x_diag = data.x_calib[: cfg.diagnostics.samples]
            if calibration is not None:  # the calibrate-then-quantize route's
                diag.append(diagnostics.ptq_layer_errors(calibration, trained.model, x_diag,
                                                         mode.ptq_name))
            diag.append(diagnostics.direct_layer_errors(quantized.tflite,
                                                        quantized.tuned.model, x_diag,
                                                        quantized.name))
    return finish(cfg, device, data, trained, tflites, quantized.name, quantized, stage,
                  diagnostics=diag, warnings=warnings)


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


@contextmanager
def _quiet_absl():
    level = logging.get_verbosity()
    logging.set_verbosity(logging.WARNING)
    try:
        yield
    finally:
        logging.set_verbosity(level)


def write_outputs(result: PipelineResult, output_dir: Path | OutputDir) -> Path:
    """Writes all artifacts into ``output_dir`` atomically (a sibling temp dir, renamed).

    ``output_dir`` is replaced only if edgeqat made it (see ``edgeqat.outputs``); a path
    that is not yet claimed is claimed here.
    """
    from edgeqat import annotate, report
    from edgeqat.config import to_toml

    def fill(tmp: Path) -> None:
        for name, content in result.tflites.items():
            (tmp / f"{name}.tflite").write_bytes(content)
        if result.qat_model is not None:  # auto mode may ship without QAT
            # A SavedModel directory: the one format the QAT wrappers round-trip in.
            with annotate.scope(), _quiet_absl():  # the saver logs every asset it writes
                result.qat_model.save(tmp / "qat_model", save_format="tf")
        if result.float_model is not None:
            result.float_model.save(tmp / "float_model.keras")
        for name, content in result.files.items():
            (tmp / name).write_bytes(content)
        (tmp / "pipeline.toml").write_text(to_toml(result.config))
        (tmp / "device.toml").write_text(to_toml(result.device))
        report.write_report(result.report, tmp, renderer=_renderer(result.report))

    out = output_dir if isinstance(output_dir, OutputDir) else OutputDir(output_dir)
    claimed_here = not isinstance(output_dir, OutputDir)
    if claimed_here:
        out.claim()
    try:
        return out.write(fill, {"tool": "edgeqat", "pipeline": result.config.name,
                                "written": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    finally:
        if claimed_here:
            out.release()


def _renderer(r: dict):
    """The report module for this kind of report (None: the CNN report)."""
    if r.get("task") == "language_model":
        from edgeqat.lm import report as lm_report

        return lm_report
    return None


def _find(value: str, folder: Path, what: str) -> Path:
    """A path as given, or the name of a TOML file in ``folder``."""
    p = Path(value)
    if p.is_dir():
        raise UserError(f"{p}: is a directory; pass a {what} .toml file (or the name of one "
                        f"in {folder})")
    if p.exists() or p.suffix == ".toml" or "/" in value:
        return p
    return folder / f"{value}.toml"


OVERRIDES = {"epochs": "qat.epochs", "float_epochs": "model.epochs", "seed": "seed"}


def resolve_configs(pipeline: str, device: str, **overrides: int | None,
                    ) -> tuple[PipelineConfig, DeviceConfig]:
    """Loads the pipeline and device files and applies command-line overrides.

    ``overrides`` are the flags of ``OVERRIDES`` (``epochs``, ``float_epochs``,
    ``seed``); each passes the same checks as the key it sets in the file.
    """
    unknown = set(overrides) - set(OVERRIDES)
    if unknown:
        raise TypeError(f"unknown override(s): {', '.join(sorted(unknown))}")
    keys = {OVERRIDES[k]: v for k, v in overrides.items() if v is not None}
    cfg = load_pipeline(_find(pipeline, PIPELINES_DIR, "pipeline"), overrides=keys)
    dev = load_device(_find(device, DEVICES_DIR, "device"))
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
    claimed: list = []  # locks to release
    ckpt, fresh_ckpt = None, False
    try:
        cfg, dev = resolve_configs(FLAGS.pipeline, FLAGS.device, epochs=FLAGS.epochs,
                                   float_epochs=FLAGS.float_epochs, seed=FLAGS.seed)
        # Everything that can be checked without training, before training: the output
        # path (edgeqat's own, writable, not in use), then data, model and device (run()).
        out = OutputDir(FLAGS.output_dir or Path("runs") / Path(cfg.source).stem)
        out.claim()
        claimed.append(out)
        cfg = _with_checkpoint_dir(cfg, out.path)
        ckpt = cfg.qat.checkpoint_dir
        lock, resumable = claim_checkpoint(ckpt)
        claimed.append(lock)
        fresh_ckpt = not resumable
        result = run(cfg, dev)
        write_outputs(result, out)
        remove_checkpoint(ckpt)  # finished: nothing to resume
    except KeyboardInterrupt:
        kept = ckpt and (Path(ckpt) / "state.json").is_file()
        if ckpt and fresh_ckpt and not kept:
            remove_checkpoint(ckpt)  # interrupted before QAT saved anything
        print("edgeqat: interrupted" + (f"; QAT checkpoint kept in {ckpt}: run the same "
                                        "command again to resume" if kept else ""),
              file=sys.stderr)
        return 130
    except BaseException as e:
        if ckpt and fresh_ckpt:
            remove_checkpoint(ckpt)  # a failed run leaves nothing behind
        if isinstance(e, UserError):
            print(f"edgeqat: error: {e}", file=sys.stderr)
            return 2
        if is_disk_full(e):
            where = getattr(e, "filename", None) or ckpt or "the output directory"
            print(f"edgeqat: error: {where}: no space left on the device; free some space "
                  "or choose another --output_dir", file=sys.stderr)
            return 2
        raise
    finally:
        for c in reversed(claimed):
            c.release()
    from edgeqat import report

    print((_renderer(result.report) or report).headline(result.report, out.path))
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
