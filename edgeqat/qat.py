"""Quantization-aware fine-tuning of an annotated model."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np

from edgeqat.config import QatConfig
from edgeqat.data import Dataset
from edgeqat.keras import keras, tf
from edgeqat.train import accuracy, compile_classifier, verbosity


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
    """The fine-tuned QAT model and its (fake-quantized) Keras accuracy."""

    model: keras.Model = field(repr=False)
    accuracy: float
    epochs: int
    seconds: float


def fine_tune(qat_model: keras.Model, data: Dataset, cfg: QatConfig) -> QatResult:
    """Fine-tunes a quantize-applied model with a warm-up + cosine learning rate."""
    start = time.perf_counter()
    if cfg.epochs:
        steps = cfg.epochs * int(np.ceil(len(data.x_train) / cfg.batch_size))
        schedule = WarmupCosine(cfg.learning_rate, steps, int(cfg.warmup_fraction * steps))
        compile_classifier(qat_model, schedule)
        qat_model.fit(data.x_train, data.y_train, batch_size=cfg.batch_size, epochs=cfg.epochs,
                      validation_data=(data.x_val, data.y_val) if len(data.x_val) else None,
                      verbose=verbosity())
    return QatResult(qat_model, accuracy(qat_model, data.x_test, data.y_test), cfg.epochs,
                     time.perf_counter() - start)
