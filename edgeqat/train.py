"""Float training: the model every quantized variant is compared against."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field

import numpy as np
from absl import logging

from edgeqat.config import ModelConfig
from edgeqat.data import Dataset
from edgeqat.keras import keras


@dataclass(frozen=True)
class TrainedModel:
    """A trained Keras model and its accuracy on the evaluation (test) split."""

    model: keras.Model = field(repr=False)
    accuracy: float
    epochs: int
    seconds: float


def verbosity() -> int:
    """Keras progress bars on an interactive terminal, quiet otherwise."""
    return 1 if sys.stdout.isatty() else 0


def accuracy(model: keras.Model, x: np.ndarray, y: np.ndarray, batch_size: int = 256) -> float:
    """Top-1 accuracy of a logits model in inference mode."""
    logits = model.predict(x, batch_size=batch_size, verbose=0)
    return float((logits.argmax(-1) == y).mean())


def compile_classifier(model: keras.Model, learning_rate) -> None:
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )


def train_float(model: keras.Model, data: Dataset, cfg: ModelConfig) -> TrainedModel:
    """Trains ``model`` in float with Adam and cosine decay; returns it with its accuracy."""
    start = time.perf_counter()
    if cfg.epochs:
        steps = cfg.epochs * int(np.ceil(len(data.x_train) / cfg.batch_size))
        schedule = keras.optimizers.schedules.CosineDecay(cfg.learning_rate, steps, alpha=0.01)
        compile_classifier(model, schedule)
        logging.info("float training: %d epochs of %d steps", cfg.epochs,
                     steps // cfg.epochs)
        model.fit(data.x_train, data.y_train, batch_size=cfg.batch_size, epochs=cfg.epochs,
                  validation_data=(data.x_val, data.y_val) if len(data.x_val) else None,
                  verbose=verbosity())
    return TrainedModel(model, accuracy(model, data.x_test, data.y_test), cfg.epochs,
                        time.perf_counter() - start)


def reestimate_batchnorm(model: keras.Model, x: np.ndarray) -> None:
    """Sets every BatchNormalization's moving statistics to those of ``x``, each layer
    seeing what inference will feed it (one pass in training mode, momentum 0).

    For models with random or transplanted weights: untouched statistics (mean 0,
    variance 1) shrink deep activations towards ~1e-9, which changes which kernels
    XNNPACK takes and makes latency and agreement figures meaningless. Also for a model
    trained for fewer steps than its moving averages need (keras.applications use
    momentum 0.99-0.999): a MobileNetV2 trained 270 steps on digits scored 9% with the
    statistics it had, 90% with these. Changes ``model`` in place; its weights are not
    trained.
    """
    bns = [layer for layer in model.submodules
           if isinstance(layer, keras.layers.BatchNormalization)]
    saved = [bn.momentum for bn in bns]
    for bn in bns:
        bn.momentum = 0.0
    try:
        model(x, training=True)
    finally:
        for bn, m in zip(bns, saved, strict=True):
            bn.momentum = m
