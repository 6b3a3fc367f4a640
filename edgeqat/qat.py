"""Quantization-aware fine-tuning: the QAT recipe.

``fine_tune`` is a custom training loop (one ``tf.function`` step run under a
``tf.distribute`` strategy) that applies a schedule over the QAT steps:

* quantization delay: for the first ``quant_delay`` share of steps every quantizer passes
  its input through unchanged (float training), while activation range observers keep
  observing, so their ranges are warm when fake quantization starts;
* observer freeze: after ``observer_freeze``, activation range observers (quantizers whose
  state is non-trainable ``*min*``/``*max*`` variables: tfmot's ``MovingAverageQuantizer``,
  edgeqat's moving-average / percentile / MSE trackers) run in inference mode, i.e. they
  read their stored range and no longer update it; learned ranges (PACT, LSQ) keep learning;
* BatchNorm freeze: after ``bn_freeze``, every BatchNormalization left in the QAT model
  (tfmot's default scheme keeps them; edgeqat's annotate folds them into the convolution,
  in which case there is nothing to freeze) runs on its moving statistics, which stop moving;
* learning rate: ``WarmupCosine`` peaking at ``learning_rate`` (default: one tenth of the
  float rate);
* gradual precision: ``[[qat.precision]]`` entries set the weight (and optionally
  activation) bits of every quantizer from a named epoch on.

The schedule acts on the quantizers held by tfmot's ``QuantizeWrapper`` /
``QuantizeLayer`` (any ``Quantizer`` subclass, tfmot's or edgeqat's) through the one hook
seam (``edgeqat.hooks``): each gets a ``ScheduleHook`` in its slot for the duration of
``fine_tune``, taken out afterwards, so the returned model, its saved config and its
converted graph are exactly the annotated ones.
The switches are Python values read when the step function is traced; the step is
retraced at each phase change (a handful per run).

Also: knowledge distillation from the float model (off by default), a checkpoint every
epoch (and on SIGINT) with automatic resume, and deterministic data order per epoch (a
resumed run sees the same batches as an uninterrupted one).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import signal
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from absl import logging

from edgeqat import hooks
from edgeqat.config import QatConfig, to_toml
from edgeqat.data import Dataset
from edgeqat.errors import UserError
from edgeqat.keras import keras, tf, tfmot
from edgeqat.outputs import CHECKPOINT_MARKER, require_checkpoint_dir
from edgeqat.quantizers import Quantizer
from edgeqat.train import accuracy

_QuantizeWrapper = tfmot.quantization.keras.QuantizeWrapper


class WarmupCosine(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up from 0 to ``peak`` over ``warmup_steps``, then cosine decay to 1%."""

    def __init__(self, peak: float, total_steps: int, warmup_steps: int):
        self.peak = float(peak)
        self.total_steps = int(total_steps)
        self.warmup_steps = int(warmup_steps)

    def __call__(self, step):
        step = tf.cast(step, tf.float32)
        warm = self.peak * (step + 1.0) / max(self.warmup_steps, 1)
        progress = (step - self.warmup_steps) / max(self.total_steps - self.warmup_steps, 1)
        progress = tf.clip_by_value(progress, 0.0, 1.0)
        cosine = self.peak * (0.01 + 0.99 * 0.5 * (1.0 + tf.cos(math.pi * progress)))
        return tf.where(step < self.warmup_steps, warm, cosine)

    def get_config(self) -> dict:
        return {"peak": self.peak, "total_steps": self.total_steps,
                "warmup_steps": self.warmup_steps}


@dataclass(frozen=True)
class QatResult:
    """The fine-tuned QAT model, its (fake-quantized) Keras accuracy and the run's log.

    ``history`` has one dict per epoch (loss, val_accuracy, learning rate, the schedule's
    switches); ``events`` lists (step, what) for every schedule change; ``resumed_from``
    is the step a checkpoint restored (0: a fresh run).
    """

    model: keras.Model = field(repr=False)
    accuracy: float
    epochs: int
    seconds: float
    history: tuple = ()
    events: tuple = ()
    replicas: int = 1
    resumed_from: int = 0


# ---------------------------------------------------------------------------- schedule


@dataclass(frozen=True)
class Phase:
    """The schedule's switches at one step."""

    quantize: bool = True
    ranges_frozen: bool = False
    bn_frozen: bool = False
    weight_bits: int = 0  # 0: as annotated
    activation_bits: int = 0  # 0: as annotated


@dataclass(frozen=True)
class Schedule:
    """Step thresholds derived from a ``QatConfig`` and the number of steps."""

    total_steps: int
    steps_per_epoch: int
    quant_start: int
    observer_freeze_at: int
    bn_freeze_at: int
    precision: tuple = ()  # (epoch, weight_bits, activation_bits), increasing epochs

    @classmethod
    def from_config(cls, cfg: QatConfig, steps_per_epoch: int) -> Schedule:
        total = cfg.epochs * steps_per_epoch

        def at(fraction: float) -> int:
            return total + 1 if fraction >= 1.0 else int(round(fraction * total))

        return cls(total, steps_per_epoch, int(round(cfg.quant_delay * total)),
                   at(cfg.observer_freeze), at(cfg.bn_freeze),
                   tuple((p.epoch, p.weight_bits, p.activation_bits) for p in cfg.precision))

    def phase(self, step: int) -> Phase:
        epoch = step // max(self.steps_per_epoch, 1)
        wbits = abits = 0
        for e, w, a in self.precision:
            if e <= epoch:
                wbits, abits = w, a
        return Phase(quantize=step >= self.quant_start,
                     ranges_frozen=step >= self.observer_freeze_at,
                     bn_frozen=step >= self.bn_freeze_at,
                     weight_bits=wbits, activation_bits=abits)


# ---------------------------------------------------------------------------- quantizer hooks


@dataclass
class QuantizerSite:
    """One quantizer in a QAT model: the object, what it quantizes and its variables.

    ``quantizer`` is the bare quantizer (under any hook in its slot); ``slot`` is where
    the layer holds it (``hooks.Slot``).
    """

    layer: str
    kind: str  # "weight" | "activation"
    quantizer: object
    variables: dict
    slot: hooks.Slot | None = field(default=None, repr=False, compare=False)

    @property
    def is_observer(self) -> bool:
        """A range tracker: state updated from the data it sees, frozen by the schedule.

        edgeqat quantizers say so (``Quantizer.observes_range``). tfmot's own (its
        default scheme's ``MovingAverageQuantizer``, ``AllValuesQuantizer``) keep the
        range in non-trainable ``min``/``max`` variables, which is what identifies them.
        """
        if self.kind != "activation":
            return False
        if isinstance(self.quantizer, Quantizer):
            return self.quantizer.observes_range
        names = [k.lower() for k in self.variables]
        return (bool(self.variables)
                and any("min" in n for n in names) and any("max" in n for n in names)
                and not any(getattr(v, "trainable", False) for v in self.variables.values()))


def quantizer_sites(model: keras.Model) -> list[QuantizerSite]:
    """Every quantizer of a tfmot-annotated model (tfmot's own or custom ones)."""
    return [QuantizerSite(slot.layer.name, "weight" if slot.kind == "weight" else "activation",
                          hooks.bare(slot.get()), slot.variables, slot)
            for slot in hooks.slots(model)]


def batchnorm_layers(model: keras.Model) -> list:
    """BatchNormalization layers of a QAT model, bare or inside a QuantizeWrapper."""
    out = []
    for layer in model.layers:
        inner = layer.layer if isinstance(layer, _QuantizeWrapper) else layer
        if isinstance(inner, keras.layers.BatchNormalization):
            out.append(inner)
    return out


class ScheduleHook(hooks.Hook):
    """A quantizer under the schedule (``hooks.Hook``): reads its owner's ``phase`` when
    the step function is traced.

    Fake quantization off (the delay): the input passes through unchanged, while the
    quantizer still runs, so an observer keeps observing. Ranges frozen: an observer runs
    in inference mode (reads its stored range, does not update it).
    """

    def __init__(self, quantizer, owner: ScheduleHooks, observer: bool):
        super().__init__(quantizer)
        self.owner = owner
        self.observer = observer

    def call(self, inputs, training, weights, **kwargs):
        phase = self.owner.phase
        q_training = False if phase.ranges_frozen and self.observer else training
        out = self.quantizer(inputs, q_training, weights, **kwargs)
        if not phase.quantize:
            return tf.identity(inputs)  # the quantizer above still ran and observed
        return out


class ScheduleHooks:
    """Puts the schedule on a QAT model's quantizers and BatchNorms; ``remove`` undoes.

    One ``ScheduleHook`` per quantizer object (in every slot that holds it); ``apply``
    sets the phase they read, the BatchNorms' trainability and the bit widths.
    """

    def __init__(self, model: keras.Model):
        self.model = model
        self.phase = Phase()
        self.sites = quantizer_sites(model)
        self.bns = batchnorm_layers(model)
        self._bn_trainable = [bn.trainable for bn in self.bns]
        self._bits0 = initial_bits(self.sites)
        observer: dict[int, bool] = {}
        for site in self.sites:
            observer[id(site.slot.get())] = observer.get(id(site.slot.get()), True) \
                and site.is_observer
        made: dict[int, ScheduleHook] = {}
        for site in self.sites:
            q = site.slot.get()
            if id(q) not in made:
                made[id(q)] = ScheduleHook(q, self, observer[id(q)])
            hooks.install(site.slot, made[id(q)])

    def apply(self, phase: Phase) -> None:
        self.phase = phase
        for bn, was in zip(self.bns, self._bn_trainable, strict=True):
            bn.trainable = was and not phase.bn_frozen
        apply_bits(self.sites, phase, self._bits0)

    def remove(self) -> None:
        hooks.remove(self.model, ScheduleHook)
        for bn, was in zip(self.bns, self._bn_trainable, strict=True):
            bn.trainable = was


def initial_bits(sites: list[QuantizerSite]) -> dict[int, int | None]:
    """Each quantizer's bit width as annotated (what a phase's 0 bits means)."""
    return {id(s.quantizer): getattr(s.quantizer, "num_bits", None) for s in sites}


def apply_bits(sites: list[QuantizerSite], phase: Phase, bits0: dict[int, int | None]) -> None:
    """Sets every quantizer's bit width to ``phase``'s (0: as annotated)."""
    for site in sites:
        bits = phase.weight_bits if site.kind == "weight" else phase.activation_bits
        set_bits(site, bits or bits0[id(site.quantizer)])


def set_bits(site: QuantizerSite, bits: int | None) -> None:
    """Sets a quantizer's bit width: ``Quantizer.set_bits`` for edgeqat's (LSQ keeps its
    clipping range by rescaling its step), ``num_bits`` for tfmot's own."""
    q = site.quantizer
    if not bits or getattr(q, "num_bits", None) in (None, bits):
        return
    if isinstance(q, Quantizer):
        q.set_bits(bits, site.variables)
    else:
        q.num_bits = int(bits)


# ---------------------------------------------------------------------------- distribution


_STRATEGIES: dict[str, tf.distribute.Strategy] = {}


def make_strategy(name: str = "default") -> tf.distribute.Strategy:
    """The ``tf.distribute`` strategy named in ``qat.strategy`` (created once per process).

    ``mirrored`` uses every local GPU, or every logical CPU when there is no GPU (tests make
    two with ``tf.config.set_logical_device_configuration``). ``multi_worker_mirrored``
    reads the cluster from ``TF_CONFIG``; create it at program start (the CLI does) since
    TensorFlow must configure collective ops before it initialises its devices.
    """
    if name == "default":
        return tf.distribute.get_strategy()
    if name not in _STRATEGIES:
        if name == "mirrored":
            devices = [d.name for d in tf.config.list_logical_devices("GPU")]
            devices = devices or [d.name for d in tf.config.list_logical_devices("CPU")]
            _STRATEGIES[name] = tf.distribute.MirroredStrategy(devices=devices)
        elif name == "multi_worker_mirrored":
            _STRATEGIES[name] = tf.distribute.MultiWorkerMirroredStrategy()
        else:
            raise UserError(f"qat.strategy = {name!r} is unknown; use default, mirrored or "
                            "multi_worker_mirrored")
    return _STRATEGIES[name]


def _is_chief(strategy) -> bool:
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return True
    spec = resolver.cluster_spec().as_dict()
    if "chief" in spec:
        return resolver.task_type == "chief"
    return resolver.task_type == "worker" and resolver.task_id == 0


def strategy_scope(name: str = "default"):
    """The scope to annotate (create) a QAT model in, so that ``fine_tune`` trains it as is
    under the strategy named in ``qat.strategy`` (the default strategy: a no-op scope)."""
    return make_strategy(name).scope()


def _replica_model(qat_model: keras.Model, strategy) -> keras.Model:
    """The model to train: ``qat_model`` itself, or a copy built in the strategy's scope.

    A model created inside ``strategy_scope`` is used as it is. Otherwise it is rebuilt from
    its config inside the scope; that fails where a layer builds its variables twice when
    rebuilt (tfmot's ``QuantizeLayer`` does), and the error says to use the scope instead.
    """
    if strategy is tf.distribute.get_strategy() or all(
            strategy.extended.variable_created_in_scope(v) for v in qat_model.weights):
        return qat_model
    from edgeqat import annotate

    with strategy.scope(), annotate.scope():
        copy = qat_model.__class__.from_config(qat_model.get_config())
    try:
        copy.set_weights(qat_model.get_weights())
    except ValueError:
        raise UserError(
            f"the QAT model cannot be copied into the {type(strategy).__name__} scope; "
            "annotate it inside edgeqat.qat.strategy_scope(cfg.qat.strategy)") from None
    return copy


# ---------------------------------------------------------------------------- checkpoints


class Checkpoints:
    """``model`` + ``optimizer`` (its step is the schedule position) every epoch.

    ``state.json`` names the newest complete checkpoint, the fingerprint of the run it
    belongs to (a hash per input that changes the QAT result) and the epoch history; it is
    replaced atomically after the checkpoint is written, so a kill at any moment leaves a
    consistent pair. The directory holds ``CHECKPOINT_MARKER``: only such a directory is
    ever cleared.
    """

    def __init__(self, directory: str, fingerprint: dict, model, optimizer, chief: bool):
        self.directory = Path(directory)
        require_checkpoint_dir(self.directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        (self.directory / CHECKPOINT_MARKER).touch()
        self.fingerprint = fingerprint
        self.chief = chief
        self.write_dir = self.directory if chief else Path(tempfile.mkdtemp(prefix="qat-w"))
        self.checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer)
        self.manager = tf.train.CheckpointManager(self.checkpoint, str(self.write_dir),
                                                  max_to_keep=3, checkpoint_name="qat")

    def _state(self) -> dict | None:
        state_file = self.directory / "state.json"
        return json.loads(state_file.read_text()) if state_file.is_file() else None

    def stale(self) -> list[str]:
        """What differs between this run and the checkpoint's (empty: it may resume)."""
        state = self._state()
        if state is None:
            return []
        theirs = state.get("fingerprint")
        if not isinstance(theirs, dict):
            return ["fingerprint format"]
        return [k for k in sorted(set(theirs) | set(self.fingerprint))
                if theirs.get(k) != self.fingerprint.get(k)]

    def discard(self) -> None:
        """Empties the directory (it is edgeqat's: it holds the marker) for a fresh start."""
        for entry in self.directory.iterdir():
            if entry.name != CHECKPOINT_MARKER:
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()

    def peek_step(self) -> int:
        state = self._state()
        return int(state.get("step", 0)) if state else 0

    def restore(self) -> tuple[int, list]:
        state = self._state()
        if state is None:
            return 0, []
        self.checkpoint.restore(str(self.directory / state["checkpoint"])).expect_partial()
        return int(state["step"]), list(state["history"])

    def save(self, step: int, history: list) -> None:
        path = self.manager.save(checkpoint_number=step)
        if not self.chief:
            shutil.rmtree(self.write_dir, ignore_errors=True)
            return
        state = {"fingerprint": self.fingerprint, "step": step,
                 "checkpoint": Path(path).name, "history": history}
        tmp = self.directory / f".state.json.tmp-{os.getpid()}"
        tmp.write_text(json.dumps(state, indent=1))
        os.replace(tmp, self.directory / "state.json")


def _digest(*chunks: bytes | str) -> str:
    h = hashlib.sha256()
    for c in chunks:
        h.update(c.encode() if isinstance(c, str) else c)
        h.update(b"\0")
    return h.hexdigest()[:16]


def fingerprint(cfg: QatConfig, seed: int, data: Dataset, model: keras.Model, peak: float,
                context: str = "") -> dict[str, str]:
    """One hash per input that changes what QAT produces; a checkpoint resumes only when
    every one matches.

    Args:
      cfg, seed, peak: the QAT settings (the checkpoint directory itself excluded).
      data: every split QAT reads (train, validation, test).
      model: the model QAT starts from; its weights carry the float training's result.
      context: what else the caller knows changes the result (the pipeline passes its
        whole configuration after command-line overrides).
    """
    from importlib.metadata import PackageNotFoundError, version

    try:
        own = version("edgeqat")
    except PackageNotFoundError:
        own = "source"
    weights = model.get_weights()
    return {
        "pipeline config": _digest(context),
        "qat config and seed": _digest(to_toml(dataclasses.replace(cfg, checkpoint_dir="")),
                                       str(seed), repr(peak)),
        "starting weights": _digest(*(str(w.shape) + str(w.dtype) for w in weights),
                                    *(np.ascontiguousarray(w).tobytes() for w in weights)),
        "data": _digest(*(np.ascontiguousarray(a).tobytes() for a in (
            data.x_train, data.y_train, data.x_val, data.y_val, data.x_test, data.y_test))),
        "library versions": _digest(tf.__version__, getattr(tfmot, "__version__", ""),
                                    np.__version__, own),
    }


class _Interrupt:
    """Turns SIGINT into a flag the loop checks after each step (main thread only)."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.requested = True
        logging.warning("interrupt: saving a checkpoint after this step (Ctrl-C again to quit)")

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
        return False


# ---------------------------------------------------------------------------- training


def _peak_rate(cfg: QatConfig, float_learning_rate: float | None) -> float:
    if cfg.learning_rate is not None:
        return float(cfg.learning_rate)
    if float_learning_rate is None:
        from edgeqat.config import ModelConfig

        float_learning_rate = ModelConfig().learning_rate
    return cfg.learning_rate_fraction * float(float_learning_rate)


def distillation_loss(y, logits, teacher_logits, alpha: float, temperature: float):
    """Per-example alpha * CE(y, student) + (1 - alpha) * T^2 * KL(teacher_T || student_T)."""
    task = keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True)
    t = float(temperature)
    p_teacher = tf.nn.softmax(teacher_logits / t)
    kl = tf.reduce_sum(p_teacher * (tf.nn.log_softmax(teacher_logits / t)
                                    - tf.nn.log_softmax(logits / t)), axis=-1)
    return alpha * task + (1.0 - alpha) * t * t * kl


@dataclass(frozen=True)
class TrainingPlan:
    """The step arithmetic of one ``fine_tune`` run: batch, schedule and learning rate."""

    batch: int  # global batch (a multiple of the replica count where it can be)
    steps_per_epoch: int
    schedule: Schedule
    peak: float  # the peak learning rate
    learning_rate: WarmupCosine

    @classmethod
    def make(cls, cfg: QatConfig, n: int, replicas: int,
             float_learning_rate: float | None) -> TrainingPlan:
        batch = min(cfg.batch_size, n)
        batch -= batch % replicas if batch >= replicas else 0
        spe = max(n // batch, 1)
        schedule = Schedule.from_config(cfg, spe)
        peak = _peak_rate(cfg, float_learning_rate)
        lr = WarmupCosine(peak, schedule.total_steps,
                          int(cfg.warmup_fraction * schedule.total_steps))
        return cls(batch, spe, schedule, peak, lr)


def _open_checkpoints(cfg: QatConfig, fingerprint_now: dict, model, optimizer,
                      strategy) -> Checkpoints | None:
    """The run's checkpoints (None when ``cfg.checkpoint_dir`` is unset); one from a
    different run is discarded with a warning saying what changed."""
    if not cfg.checkpoint_dir:
        return None
    ckpt = Checkpoints(cfg.checkpoint_dir, fingerprint_now, model, optimizer,
                        _is_chief(strategy))
    changed = ckpt.stale()
    if changed:
        logging.warning("QAT checkpoint in %s is from a different run (changed: %s); "
                        "starting QAT from the beginning", cfg.checkpoint_dir,
                        ", ".join(changed))
        ckpt.discard()
    return ckpt


def _resume(scheduled: ScheduleHooks, schedule: Schedule, ckpt: Checkpoints | None,
            where: str) -> tuple[int, list]:
    """Restores the newest checkpoint, if any: (its step, its epoch history)."""
    scheduled.apply(schedule.phase(0))
    if ckpt is None:
        return 0, []
    scheduled.apply(schedule.phase(ckpt.peek_step()))  # bits before restore (LSQ steps)
    step0, history = ckpt.restore()
    if step0:
        logging.info("QAT resumes at step %d (epoch %d) from %s", step0,
                     step0 // schedule.steps_per_epoch, where)
    return step0, history


class _Loop:
    """The training loop's parts: the step and evaluation functions (rebuilt, so retraced,
    at each phase change) and the per-epoch data."""

    def __init__(self, model, optimizer, strategy, data: Dataset, plan: TrainingPlan,
                 cfg: QatConfig, seed: int, teacher_logits: np.ndarray):
        self.model, self.optimizer, self.strategy = model, optimizer, strategy
        self.data, self.plan, self.seed = data, plan, seed
        self.teacher_logits = teacher_logits
        self.distill = bool(cfg.distill)
        self.alpha, self.temperature = float(cfg.distill_alpha), float(cfg.distill_temperature)
        self.options = tf.data.Options()
        self.options.experimental_distribute.auto_shard_policy = \
            tf.data.experimental.AutoShardPolicy.DATA
        self.options.deterministic = True

    def make_step(self):
        model, optimizer, strategy = self.model, self.optimizer, self.strategy
        distill, alpha, temp, batch = self.distill, self.alpha, self.temperature, \
            self.plan.batch

        def replica_step(x, y, t):
            with tf.GradientTape() as tape:
                logits = model(x, training=True)
                if distill:
                    per_example = distillation_loss(y, logits, t, alpha, temp)
                else:
                    per_example = keras.losses.sparse_categorical_crossentropy(
                        y, logits, from_logits=True)
                loss = tf.nn.compute_average_loss(per_example, global_batch_size=batch)
                if model.losses:
                    loss += tf.nn.scale_regularization_loss(tf.add_n(model.losses))
            variables = model.trainable_variables
            grads = tape.gradient(loss, variables)
            optimizer.apply_gradients([(g, v) for g, v in zip(grads, variables, strict=True)
                                       if g is not None])
            return loss

        @tf.function
        def step(x, y, t):
            losses = strategy.run(replica_step, args=(x, y, t))
            return strategy.reduce(tf.distribute.ReduceOp.SUM, losses, axis=None)

        return step

    def make_eval(self):
        model = self.model

        @tf.function
        def logits_of(x):
            return model(x, training=False)

        return logits_of

    def val_accuracy(self, logits_of) -> float | None:
        x_val, y_val = self.data.x_val, self.data.y_val
        if not len(x_val):
            return None
        preds = [logits_of(tf.constant(x_val[i:i + 512])).numpy().argmax(-1)
                 for i in range(0, len(x_val), 512)]
        return float((np.concatenate(preds) == y_val).mean())

    def epoch_batches(self, epoch: int, step: int):
        """Epoch ``epoch``'s batches from global step ``step`` on (a resumed run skips
        what it already trained), distributed."""
        spe, batch, data = self.plan.steps_per_epoch, self.plan.batch, self.data
        order = np.random.default_rng([self.seed, epoch]).permutation(len(data.x_train))
        order = order[: spe * batch]
        ds = tf.data.Dataset.from_tensor_slices(
            (data.x_train[order], data.y_train[order], self.teacher_logits[order]))
        ds = ds.batch(batch, drop_remainder=True).skip(step - epoch * spe)
        return self.strategy.experimental_distribute_dataset(ds.with_options(self.options))


def _train(loop: _Loop, scheduled: ScheduleHooks, ckpt: Checkpoints | None, cb,
           cfg: QatConfig, step0: int, history: list, events: list) -> Phase:
    """Runs the epochs from global step ``step0``; appends to ``history`` and ``events``.

    Returns:
      The phase the run ended in.
    """
    plan, schedule, optimizer = loop.plan, loop.plan.schedule, loop.optimizer
    phase = schedule.phase(step0)
    scheduled.apply(phase)
    train_step, logits_of = loop.make_step(), loop.make_eval()
    events.append((step0, _describe(phase)))
    cb.on_train_begin()
    step = step0
    with _Interrupt() as interrupt:
        for epoch in range(step0 // plan.steps_per_epoch, cfg.epochs):
            losses = []
            cb.on_epoch_begin(epoch)
            for x, y, t in loop.epoch_batches(epoch, step):
                new = schedule.phase(step)
                if new != phase:
                    phase = new
                    scheduled.apply(phase)
                    train_step, logits_of = loop.make_step(), loop.make_eval()
                    events.append((step, _describe(phase)))
                    logging.info("QAT step %d: %s", step, _describe(phase))
                cb.on_train_batch_begin(step)
                loss = float(train_step(x, y, t))
                rate = float(tf.convert_to_tensor(optimizer.learning_rate))  # as applied
                losses.append(loss)
                step += 1
                cb.on_train_batch_end(step - 1, {"loss": loss, "learning_rate": rate,
                                                 **dataclasses.asdict(phase)})
                if interrupt.requested and step < schedule.total_steps:
                    if ckpt is not None:
                        ckpt.save(step, history)
                        logging.warning("QAT interrupted at step %d; checkpoint in %s; "
                                        "run the same command again to resume", step,
                                        cfg.checkpoint_dir)
                    raise KeyboardInterrupt
            summary = {"epoch": epoch, "step": step,
                       "loss": float(np.mean(losses)) if losses else None,
                       "val_accuracy": loop.val_accuracy(logits_of),
                       "learning_rate": float(plan.learning_rate(step - 1)),
                       **dataclasses.asdict(phase)}
            history.append(summary)
            logging.info("QAT epoch %d (step %d): loss %s, val accuracy %s, lr %.3g",
                         epoch, step, _fmt(summary["loss"]),
                         _fmt(summary["val_accuracy"]), summary["learning_rate"])
            cb.on_epoch_end(epoch, dict(summary))
            if ckpt is not None:
                ckpt.save(step, history)
    cb.on_train_end()
    return phase


def fine_tune(qat_model: keras.Model, data: Dataset, cfg: QatConfig, *,
              teacher: keras.Model | None = None, seed: int = 0,
              float_learning_rate: float | None = None,
              callbacks: list | tuple = (), resume_context: str = "") -> QatResult:
    """Fine-tunes a quantize-applied model following the QAT recipe in ``cfg``.

    The parts: ``TrainingPlan`` (batch, schedule, learning rate), ``ScheduleHooks`` (the
    schedule on the quantizers), ``_open_checkpoints`` / ``_resume`` (checkpointing) and
    ``_train`` (the loop).

    Args:
      qat_model: an annotated (tfmot-wrapped) model; trained in place and returned.
      data: the dataset; training order per epoch depends only on ``seed`` and the epoch.
      cfg: the ``[qat]`` table (schedule, distillation, checkpoint dir, strategy).
      teacher: the float model, used when ``cfg.distill`` is on.
      seed: the pipeline seed.
      float_learning_rate: the float training rate; the peak QAT rate is
        ``cfg.learning_rate_fraction`` of it unless ``cfg.learning_rate`` is set.
      callbacks: Keras callbacks; ``on_train_batch_end`` gets the step's loss, learning
        rate and schedule switches, ``on_epoch_end`` the epoch's summary.
      resume_context: text covering whatever else changes the result (the pipeline's
        whole config); a checkpoint resumes only if it, the QAT settings, the starting
        weights, the data and the library versions all match (see ``fingerprint``), and
        is otherwise discarded with a warning saying what changed.

    Returns:
      A ``QatResult``; ``model`` is ``qat_model`` with its own quantizers (no hooks left).

    Raises:
      UserError: the checkpoint directory holds files that are not an edgeqat
        checkpoint, or distillation is on without a teacher.
      KeyboardInterrupt: after SIGINT, once a checkpoint is saved (when a dir is set).
    """
    start = time.perf_counter()
    if cfg.distill and teacher is None:
        raise UserError("qat.distill = true needs the float model as teacher")
    if not cfg.epochs:
        return QatResult(qat_model, accuracy(qat_model, data.x_test, data.y_test), 0,
                         time.perf_counter() - start)
    strategy = make_strategy(cfg.strategy)
    replicas = strategy.num_replicas_in_sync
    n = len(data.x_train)
    plan = TrainingPlan.make(cfg, n, replicas, float_learning_rate)
    if cfg.distill:
        t_logits = teacher.predict(data.x_train, batch_size=256, verbose=0).astype(np.float32)
    else:
        t_logits = np.zeros((n, 1), np.float32)

    model = _replica_model(qat_model, strategy)
    with strategy.scope():
        optimizer = keras.optimizers.Adam(plan.learning_rate)
        optimizer.build(model.trainable_variables)
    scheduled = ScheduleHooks(model)
    ckpt = _open_checkpoints(cfg, fingerprint(cfg, seed, data, model, plan.peak,
                                              resume_context) if cfg.checkpoint_dir else {},
                             model, optimizer, strategy)
    cb = keras.callbacks.CallbackList(list(callbacks), model=model)
    loop = _Loop(model, optimizer, strategy, data, plan, cfg, seed, t_logits)
    events: list = []
    step0, phase = 0, plan.schedule.phase(0)
    try:
        step0, history = _resume(scheduled, plan.schedule, ckpt, cfg.checkpoint_dir)
        phase = _train(loop, scheduled, ckpt, cb, cfg, step0, history, events)
    finally:
        scheduled.remove()
    if model is not qat_model:  # distributed: copy back into the caller's model
        sites = quantizer_sites(qat_model)
        apply_bits(sites, phase, initial_bits(sites))  # the bit widths the schedule ended with
        qat_model.set_weights(model.get_weights())
    return QatResult(qat_model, accuracy(qat_model, data.x_test, data.y_test), cfg.epochs,
                     time.perf_counter() - start, tuple(history), tuple(events), replicas,
                     step0)


def _describe(phase: Phase) -> str:
    bits = f", weight bits {phase.weight_bits}" if phase.weight_bits else ""
    bits += f", activation bits {phase.activation_bits}" if phase.activation_bits else ""
    return (f"fake quant {'on' if phase.quantize else 'off (delay)'}, ranges "
            f"{'frozen' if phase.ranges_frozen else 'tracking'}, BatchNorm "
            f"{'frozen' if phase.bn_frozen else 'training'}{bits}")


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4g}"
