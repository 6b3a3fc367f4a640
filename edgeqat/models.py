"""Built-in reference models, user builders (``module:function``) and saved models.

Every model outputs logits (no softmax): argmax is the prediction, and the int8 output
keeps its resolution for the classes that matter.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from pathlib import Path

from edgeqat.config import ModelConfig
from edgeqat.errors import UserError
from edgeqat.keras import keras, require_keras2

layers = keras.layers


def dscnn(input_shape: tuple[int, ...], num_classes: int, width: int = 32) -> keras.Model:
    """A MobileNet-style depthwise-separable CNN: Conv-BN-ReLU6, then 3 DW/PW blocks.

    Args:
      input_shape: (height, width, channels).
      num_classes: number of output logits.
      width: channels of the first convolution; later blocks double it once.

    BatchNorm momentum is 0.9, not Keras' 0.99: on small datasets (a few hundred steps)
    the moving variance otherwise still carries its initial 1.0 when training ends, and
    inference-mode accuracy collapses to chance while training accuracy is 100%.
    """
    x = inputs = keras.Input(input_shape, name="input")
    x = layers.Conv2D(width, 3, padding="same", use_bias=False, name="conv_0")(x)
    x = layers.BatchNormalization(momentum=0.9, name="conv_0_bn")(x)
    x = layers.ReLU(6.0, name="conv_0_relu6")(x)
    for i, (filters, stride) in enumerate([(width, 1), (2 * width, 2), (2 * width, 1)], 1):
        x = layers.DepthwiseConv2D(3, stride, padding="same", use_bias=False,
                                   name=f"dw_{i}")(x)
        x = layers.BatchNormalization(momentum=0.9, name=f"dw_{i}_bn")(x)
        x = layers.ReLU(6.0, name=f"dw_{i}_relu6")(x)
        x = layers.Conv2D(filters, 1, use_bias=False, name=f"pw_{i}")(x)
        x = layers.BatchNormalization(momentum=0.9, name=f"pw_{i}_bn")(x)
        x = layers.ReLU(6.0, name=f"pw_{i}_relu6")(x)
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    outputs = layers.Dense(num_classes, name="logits")(x)
    return keras.Model(inputs, outputs, name="dscnn")


def mnist1d_cnn(input_shape: tuple[int, ...], num_classes: int, width: int = 64,
                ) -> keras.Model:
    """The MNIST-1D paper's small CNN (Greydanus 2020): three strided Conv1D + ReLU, linear.

    The paper's layers (kernels 5, 3, 3, stride 2, ReLU, flatten, one linear layer) with
    64 channels per convolution instead of its 25. The paper trains on all 4,000 training
    signals; edgeqat holds 400 out for validation, and trained on the remaining 3,600 as
    ``pipelines/mnist1d_cnn.toml`` does (Adam, lr 1e-2, cosine decay, 40 epochs) the
    25-channel model reached 89.0-91.5% validation accuracy over 3 seeds, the 64-channel
    one 92.8-94.8%. "same" padding gives lengths 20, 10, 5 where the paper's padding 1
    gives 19, 10, 5.

    Args:
      input_shape: (length, channels), e.g. (40, 1).
      num_classes: number of output logits.
      width: channels per convolution (64 here, 25 in the paper).
    """
    x = inputs = keras.Input(input_shape, name="input")
    for i, k in enumerate((5, 3, 3)):
        x = layers.Conv1D(width, k, strides=2, padding="same", name=f"conv_{i}")(x)
        x = layers.ReLU(name=f"conv_{i}_relu")(x)
    x = layers.Flatten(name="flatten")(x)
    outputs = layers.Dense(num_classes, name="logits")(x)
    return keras.Model(inputs, outputs, name="mnist1d_cnn")


def mlp(input_shape: tuple[int, ...], num_classes: int, width: int = 64) -> keras.Model:
    """Flatten, one hidden ReLU layer, logits. The smallest model that does anything."""
    x = inputs = keras.Input(input_shape, name="input")
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(width, activation="relu", name="hidden")(x)
    outputs = layers.Dense(num_classes, name="logits")(x)
    return keras.Model(inputs, outputs, name="mlp")


BUILDERS: dict[str, Callable[..., keras.Model]] = {
    "dscnn": dscnn,
    "mnist1d_cnn": mnist1d_cnn,
    "mlp": mlp,
}


def _resolve_builder(name: str) -> Callable[..., keras.Model]:
    if name in BUILDERS:
        return BUILDERS[name]
    if ":" not in name:
        raise UserError(f"model.builder = {name!r} is unknown; use one of "
                        f"{', '.join(sorted(BUILDERS))} or 'package.module:function'")
    module_name, func_name = name.split(":", 1)
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise UserError(f"model.builder = {name!r}: cannot import {module_name} ({e})") \
            from None
    fn = getattr(module, func_name, None)
    if not callable(fn):
        raise UserError(f"model.builder = {name!r}: {module_name} has no function {func_name}")
    return fn


def build_model(cfg: ModelConfig, input_shape: tuple[int, ...], num_classes: int,
                ) -> keras.Model:
    """Builds the float model named by ``cfg.builder``.

    A ``module:function`` builder is called as ``fn(input_shape, num_classes)`` and must
    return a tf_keras model.

    Raises:
      UserError: unknown builder, or it returned something that is not a tf_keras model.
    """
    fn = _resolve_builder(cfg.builder)
    try:
        inspect.signature(fn).bind(tuple(input_shape), num_classes)
    except TypeError:
        raise UserError(f"model.builder = {cfg.builder!r}: {fn.__name__}{_signature(fn)} "
                        "cannot be called as build(input_shape, num_classes); edgeqat calls "
                        "it with a shape tuple and the number of classes") from None
    except ValueError:  # no signature (a builtin): let the call decide
        pass
    try:
        model = fn(tuple(input_shape), num_classes)
    except Exception as e:  # the user's code: one line naming it and what it raised
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        raise UserError(f"model.builder = {cfg.builder!r} raised {type(e).__name__}"
                        + (f": {first}" if first else "")
                        + f" when called as build({tuple(input_shape)}, {num_classes})") \
            from None
    try:
        require_keras2(model, f"model.builder {cfg.builder!r} returned a model that")
    except TypeError as e:
        raise UserError(str(e)) from None
    return model


def _signature(fn: Callable) -> str:
    try:
        return str(inspect.signature(fn))
    except ValueError:
        return "(...)"


def load_model(path: str | Path) -> keras.Model:
    """Loads a saved tf_keras model (.keras, .h5 or a SavedModel directory), or a Keras 3
    ``.keras`` file, rebuilt as tf_keras by ``edgeqat.keras3_import``.

    Raises:
      UserError: the file is missing or is not a Keras model.
    """
    p = Path(path)
    if not p.exists():
        raise UserError(f"{p}: model file not found (model.path)")
    from edgeqat import keras3_import

    if keras3_import.keras3_version(p):  # a Keras 3 .keras file: rebuilt as tf_keras
        return keras3_import.import_keras3(p).model
    try:
        model = keras.models.load_model(p, compile=False)
    except Exception as e:  # Keras raises many types for a file that is not a model
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{p}: not a loadable Keras model ({first[:200]}); save it with "
                        "tf_keras model.save('model.keras') or '.h5'") from None
    if not isinstance(model, keras.Model):
        raise UserError(f"{p}: holds a {type(model).__name__}, not a Keras model")
    return model
