"""Keras 3 ``.keras`` files rebuilt as tf_keras models, without Keras 3 installed.

A Keras 3 ``.keras`` file is a zip of ``metadata.json`` (``keras_version`` 3.x),
``config.json`` and ``model.weights.h5``. tf_keras cannot load it: the layer configs
carry ``module`` / ``registered_name``, the dtype is a ``DTypePolicy`` dict, the
InputLayer has ``batch_shape``, a Functional model's ``inbound_nodes`` are
``{"args": [...__keras_tensor__...], "kwargs": {}}``, and the weights file addresses
layers by container position (``layers/<snake_case class>[_<n>]/vars/<i>``), not by name.

``import_keras3`` reads the zip with ``zipfile``, ``json`` and ``h5py`` only, translates
each layer of a Sequential or Functional model into its tf_keras layer (``LAYERS``: the
kinds edgeqat quantizes), wires them as the file says, and assigns each layer's weights
in Keras 3's order, checking every shape. A layer it cannot translate (another class, a
custom or nested model, a Keras 3 option tf_keras lacks) is named in one UserError,
together with every other such layer.
"""

from __future__ import annotations

import inspect
import io
import json
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

from edgeqat.errors import UserError

# Keras 3 class name -> tf_keras class name: the layer kinds edgeqat quantizes (or passes
# through) whose configs and weight order match once translated.
LAYERS = {name: name for name in (
    "Conv1D", "Conv2D", "DepthwiseConv2D", "SeparableConv2D", "Dense",
    "BatchNormalization", "ReLU", "Activation", "Rescaling", "Flatten", "Reshape",
    "GlobalAveragePooling1D", "GlobalAveragePooling2D", "MaxPooling1D", "MaxPooling2D",
    "AveragePooling1D", "AveragePooling2D", "ZeroPadding1D", "ZeroPadding2D", "Dropout",
    "Add", "Concatenate", "Softmax",
)}
# Layer arguments every tf_keras layer takes through ``**kwargs``.
BASE_ARGS = {"name", "trainable", "dtype", "input_shape", "batch_input_shape", "batch_size",
             "activity_regularizer", "autocast", "input_dim", "dynamic"}
# Keras 3 arguments tf_keras lacks that are dropped when unset (None / False / 0).
UNSET = (None, False)


@dataclass(frozen=True)
class ImportedModel:
    """A tf_keras model rebuilt from a Keras 3 file, and the Keras version that saved it."""

    model: object
    keras_version: str


def keras3_version(path: str | Path) -> str | None:
    """The ``keras_version`` of a Keras 3 ``.keras`` file; None for anything else
    (tf_keras files, .h5, SavedModel directories, files that are not zips)."""
    p = Path(path)
    if not p.is_file() or not zipfile.is_zipfile(p):
        return None
    try:
        with zipfile.ZipFile(p) as zf:
            meta = json.loads(zf.read("metadata.json"))
    except (KeyError, ValueError, zipfile.BadZipFile):
        return None
    version = str(meta.get("keras_version", ""))
    return version if version.split(".")[0].isdigit() and int(version.split(".")[0]) >= 3 \
        else None


def to_snake_case(name: str) -> str:
    """Keras 3's ``naming.to_snake_case``: how it names a layer's group in the weights file."""
    name = re.sub(r"\W+", "", name)
    name = re.sub("(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub("([a-z])([A-Z])", r"\1_\2", name).lower()


def _weight_paths(specs: list[dict]) -> list[str]:
    """``layers/<name>`` for each layer spec, numbered as Keras 3's saver numbers them."""
    used: dict[str, int] = {}
    out = []
    for spec in specs:
        name = to_snake_case(spec["class_name"])
        if name in used:
            used[name] += 1
            name = f"{name}_{used[name]}"
        else:
            used[name] = 0
        out.append(f"layers/{name}")
    return out


def _dtype(value) -> str | None:
    if isinstance(value, dict):  # {"class_name": "DTypePolicy", "config": {"name": ...}}
        return value.get("config", {}).get("name")
    return value


def _serialized(value):
    """A Keras 3 serialized object (initializer, regularizer, constraint) for tf_keras."""
    if isinstance(value, dict) and "class_name" in value:
        return {"class_name": value["class_name"], "config": value.get("config", {})}
    return value


def _layer_label(spec: dict) -> str:
    name = spec.get("config", {}).get("name") or spec.get("name") or "?"
    return f"{name!r} ({spec.get('class_name')})"


def _problem(spec: dict) -> str | None:
    """Why ``spec`` cannot be translated, or None."""
    cls = spec.get("class_name")
    module = spec.get("module") or ""
    if cls in ("Functional", "Sequential", "Model"):
        return "a nested model (save the inner model's layers in the outer model)"
    if cls not in LAYERS and cls != "InputLayer":
        return "no tf_keras translation for this layer kind"
    if not module.startswith("keras") or spec.get("registered_name") not in (None, cls):
        return f"a custom layer (module {module!r})"
    return None


def _build_layer(spec: dict, keras):
    """The tf_keras layer for one Keras 3 layer spec (raises ValueError with the reason)."""
    cls = getattr(keras.layers, LAYERS[spec["class_name"]])
    accepted = set(BASE_ARGS)  # arguments of the class and of the bases its **kwargs reach
    for klass in cls.__mro__:
        if "__init__" in vars(klass):
            accepted |= {name for name, prm in inspect.signature(klass.__init__).parameters
                         .items() if prm.kind is not prm.VAR_KEYWORD}
    cfg = {}
    for key, value in spec["config"].items():
        if key == "dtype":
            value = _dtype(value)
        elif key.endswith("_initializer"):
            continue  # every weight is assigned from the file
        else:
            value = _serialized(value)
        if key not in accepted:
            if value in UNSET:
                continue
            raise ValueError(f"Keras 3 option {key} = {value!r} has no tf_keras equivalent")
        cfg[key] = value
    return cls.from_config(cfg)


def _input(spec: dict, keras):
    cfg = spec["config"]
    if cfg.get("sparse") or cfg.get("ragged"):
        raise ValueError("sparse or ragged inputs are not supported")
    shape = cfg.get("batch_shape") or cfg.get("batch_input_shape")
    return keras.Input(shape=tuple(shape[1:]), batch_size=shape[0], dtype=_dtype(cfg["dtype"]),
                       name=cfg.get("name"))


def _layer_specs(config: dict) -> list[dict]:
    return list(config["config"]["layers"])


def _refuse_untranslatable(p: Path, specs: list[dict]) -> None:
    problems = [f"{_layer_label(s)}: {why}" for s in specs if (why := _problem(s))]
    if problems:
        raise UserError(f"{p}: Keras 3 model with {len(problems)} layer(s) edgeqat cannot "
                        f"translate to tf_keras: {'; '.join(problems)}; use the layer kinds "
                        f"{', '.join(sorted(LAYERS))}, or save the model from tf_keras")


def _history_refs(value):
    """Every (layer, node, tensor) a node's args or kwargs refer to."""
    if isinstance(value, dict):
        if value.get("class_name") == "__keras_tensor__":
            return [tuple(value["config"]["keras_history"])]
        return [r for v in value.values() for r in _history_refs(v)]
    if isinstance(value, list | tuple):
        return [r for v in value for r in _history_refs(v)]
    return []


def _resolve(value, outputs: dict):
    if isinstance(value, dict):
        if value.get("class_name") == "__keras_tensor__":
            name, node, index = value["config"]["keras_history"]
            return outputs[(name, node)][index]
        return {k: _resolve(v, outputs) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_resolve(v, outputs) for v in value]
    return value


def _endpoints(value) -> list[tuple]:
    """``input_layers`` / ``output_layers``: one [name, node, tensor] or a list of them."""
    if value and isinstance(value[0], str):
        return [tuple(value)]
    return [tuple(v) for v in value]


def _functional(p: Path, config: dict, specs: list[dict], keras):
    layers, outputs = {}, {}
    pending = list(specs)
    while pending:
        progressed = False
        for spec in list(pending):
            name = spec.get("name") or spec["config"]["name"]
            nodes = spec.get("inbound_nodes", [])
            if any((ref[0], ref[1]) not in outputs for node in nodes
                   for ref in _history_refs(node)):
                continue
            try:
                if spec["class_name"] == "InputLayer":
                    outputs[(name, 0)] = [_input(spec, keras)]
                else:
                    layers[name] = layer = _build_layer(spec, keras)
                    for i, node in enumerate(nodes):
                        args = _resolve(node.get("args", []), outputs)
                        kwargs = _resolve(node.get("kwargs", {}), outputs)
                        out = layer(*args, **kwargs)
                        outputs[(name, i)] = list(out) if isinstance(out, list | tuple) \
                            else [out]
            except (ValueError, TypeError) as e:
                raise UserError(f"{p}: Keras 3 layer {_layer_label(spec)} cannot be "
                                f"translated to tf_keras: {e}") from None
            pending.remove(spec)
            progressed = True
        if not progressed:
            raise UserError(f"{p}: Keras 3 model graph refers to layers it does not "
                            f"define: {', '.join(_layer_label(s) for s in pending)}")
    cfg = config["config"]
    ins = [outputs[(n, k)][t] for n, k, t in _endpoints(cfg["input_layers"])]
    outs = [outputs[(n, k)][t] for n, k, t in _endpoints(cfg["output_layers"])]
    model = keras.Model(ins[0] if len(ins) == 1 else ins, outs[0] if len(outs) == 1 else outs,
                        name=cfg.get("name"))
    return model, [layers.get(s.get("name") or s["config"]["name"]) for s in specs]


def _sequential(p: Path, config: dict, specs: list[dict], keras):
    body = [s for s in specs if s["class_name"] != "InputLayer"]
    head = [s for s in specs if s["class_name"] == "InputLayer"]
    try:
        if head:
            inputs = _input(head[0], keras)
        else:
            shape = config["config"].get("build_input_shape") or \
                body[0].get("build_config", {}).get("input_shape")
            if not shape:
                raise ValueError("the file records no input shape")
            inputs = keras.Input(tuple(shape[1:]))
    except (ValueError, TypeError, KeyError) as e:
        raise UserError(f"{p}: Keras 3 Sequential input cannot be translated: {e}") from None
    built = []
    for spec in body:
        try:
            built.append(_build_layer(spec, keras))
        except (ValueError, TypeError) as e:
            raise UserError(f"{p}: Keras 3 layer {_layer_label(spec)} cannot be translated "
                            f"to tf_keras: {e}") from None
    model = keras.Sequential([inputs, *built], name=config["config"].get("name"))
    return model, built, body  # the weights file numbers the layers without the InputLayer


def _assign_weights(p: Path, h5file, specs: list[dict], layers: list) -> None:
    for spec, path, layer in zip(specs, _weight_paths(specs), layers, strict=True):
        if layer is None:  # an InputLayer of a Functional model
            continue
        group = h5file.get(f"{path}/vars")
        stored = [] if group is None else [group[k][()] for k in sorted(group, key=int)]
        expected = [tuple(w.shape) for w in layer.weights]
        if [tuple(a.shape) for a in stored] != expected:
            raise UserError(f"{p}: Keras 3 layer {_layer_label(spec)}: the weights file has "
                            f"{[tuple(a.shape) for a in stored]} at {path}, tf_keras expects "
                            f"{expected}")
        if stored:
            layer.set_weights(stored)


def import_keras3(path: str | Path) -> ImportedModel:
    """Rebuilds the Keras 3 ``.keras`` file at ``path`` as a tf_keras model.

    Args:
      path: a ``.keras`` file whose ``metadata.json`` says ``keras_version`` 3.x.

    Returns:
      The tf_keras model (same layer names, weights assigned) and the Keras version.

    Raises:
      UserError: not a Keras 3 file, a model kind other than Sequential / Functional, or
        layers that cannot be translated (every one named), or weights that do not fit.
    """
    import h5py

    from edgeqat.keras import keras

    p = Path(path)
    version = keras3_version(p)
    if version is None:
        raise UserError(f"{p}: not a Keras 3 .keras file (no metadata.json keras_version 3.x)")
    try:
        with zipfile.ZipFile(p) as zf:
            config = json.loads(zf.read("config.json"))
            weights = zf.read("model.weights.h5")
    except (KeyError, ValueError, zipfile.BadZipFile) as e:
        raise UserError(f"{p}: unreadable Keras 3 file ({e})") from None
    kind = config.get("class_name")
    if kind not in ("Sequential", "Functional", "Model") or "layers" not in config.get(
            "config", {}):
        raise UserError(f"{p}: a Keras 3 {kind} model; edgeqat imports Sequential and "
                        "Functional models only (a subclassed model has no config to "
                        "translate): save it from tf_keras instead")
    specs = _layer_specs(config)
    _refuse_untranslatable(p, specs)
    if kind == "Sequential":
        model, layers, specs = _sequential(p, config, specs, keras)
    else:
        model, layers = _functional(p, config, specs, keras)
    with h5py.File(io.BytesIO(weights), "r") as h5file:
        _assign_weights(p, h5file, specs, layers)
    return ImportedModel(model, version)
