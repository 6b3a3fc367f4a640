"""TFLite model metadata on the shipped flatbuffer, in tflite-support's schema.

What Android's Task Library and tflite-support's ``MetadataDisplayer`` read: a
``ModelMetadata`` flatbuffer (file identifier ``M001``) in a model buffer named
``TFLITE_METADATA``, and the class labels as an associated file, ``labels.txt``, stored
uncompressed in a zip archive appended to the flatbuffer (the layout tflite-support's
``MetadataPopulator`` writes). The metadata records the model's name and description,
each input's and output's tensor name, the input normalisation ``(raw - mean) / std``
and the int8 quantization that follows it, the input's representable range, and the
labels when the data has them.

tflite-support itself is not a dependency: its wheel pins protobuf<4, which TensorFlow
2.21 cannot share. The schema's generated Python code is vendored
(``edgeqat/metadata_schema_py_generated.py``) and both writes and reads the metadata here.
The model's ops, tensors and buffers are untouched, so it loads and computes the same.
"""

from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass

import flatbuffers

from edgeqat import metadata_schema_py_generated as meta

METADATA_BUFFER_NAME = "TFLITE_METADATA"
METADATA_FILE_IDENTIFIER = b"M001"
MODEL_FILE_IDENTIFIER = b"TFL3"
LABEL_FILE = "labels.txt"
# The oldest metadata parser that reads every field written here (all are schema 1.0.0:
# names, descriptions, NormalizationOptions, Stats, TENSOR_AXIS_LABELS files).
MIN_PARSER_VERSION = "1.0.0"


@dataclass(frozen=True)
class ModelDescription:
    """What the metadata says about a model, independent of the flatbuffer."""

    name: str
    description: str
    version: str = ""
    author: str = "edgeqat"
    mean: float = 0.0  # input normalisation: x = (raw - mean) / std
    std: float = 1.0
    labels: tuple[str, ...] = ()


def _tensor_facts(model_t, index: int) -> dict:
    from edgeqat.inspect import tensor_type_names

    t = model_t.subgraphs[0].tensors[index]
    name = t.name.decode() if isinstance(t.name, bytes) else str(t.name)
    facts = {"name": name, "type": tensor_type_names().get(t.type, str(t.type))}
    q = t.quantization
    if q is not None and q.scale is not None and len(q.scale) == 1:
        facts["scale"] = float(q.scale[0])
        facts["zero_point"] = int(q.zeroPoint[0])
    return facts


def _input_metadata(facts: dict, desc: ModelDescription) -> meta.TensorMetadataT:
    t = meta.TensorMetadataT()
    t.name = facts["name"]
    text = f"{facts['type']} input; float x = (raw - {desc.mean:g}) / {desc.std:g}"
    norm = meta.NormalizationOptionsT()
    norm.mean, norm.std = [float(desc.mean)], [float(desc.std)]
    unit = meta.ProcessUnitT()
    unit.optionsType = meta.ProcessUnitOptions.NormalizationOptions
    unit.options = norm
    t.processUnits = [unit]
    if "scale" in facts:
        s, z = facts["scale"], facts["zero_point"]
        text += f", then q = round(x / {s:.9g}) + {z} (int8 scale {s:.9g}, zero point {z})"
        stats = meta.StatsT()  # the float range the int8 input can represent
        stats.min, stats.max = [(-128 - z) * s], [(127 - z) * s]
        t.stats = stats
    t.description = text
    content = meta.ContentT()
    content.contentPropertiesType = meta.ContentProperties.FeatureProperties
    content.contentProperties = meta.FeaturePropertiesT()
    t.content = content
    return t


def _output_metadata(facts: dict, desc: ModelDescription) -> meta.TensorMetadataT:
    t = meta.TensorMetadataT()
    t.name = facts["name"]
    text = f"{facts['type']} logits, one per class"
    if "scale" in facts:
        text += f" (int8 scale {facts['scale']:.9g}, zero point {facts['zero_point']})"
    t.description = text
    content = meta.ContentT()
    content.contentPropertiesType = meta.ContentProperties.FeatureProperties
    content.contentProperties = meta.FeaturePropertiesT()
    t.content = content
    if desc.labels:
        f = meta.AssociatedFileT()
        f.name = LABEL_FILE
        f.description = "Class labels, one per line, in output order"
        f.type = meta.AssociatedFileType.TENSOR_AXIS_LABELS
        t.associatedFiles = [f]
    return t


def _metadata_bytes(model_t, desc: ModelDescription) -> bytes:
    graph = model_t.subgraphs[0]
    sub = meta.SubGraphMetadataT()
    sub.name = "main"
    sub.inputTensorMetadata = [_input_metadata(_tensor_facts(model_t, i), desc)
                               for i in graph.inputs]
    sub.outputTensorMetadata = [_output_metadata(_tensor_facts(model_t, i), desc)
                                for i in graph.outputs]
    m = meta.ModelMetadataT()
    m.name, m.description, m.author = desc.name, desc.description, desc.author
    if desc.version:
        m.version = desc.version
    m.subgraphMetadata = [sub]
    m.minParserVersion = MIN_PARSER_VERSION
    b = flatbuffers.Builder(1024)
    b.Finish(m.Pack(b), file_identifier=METADATA_FILE_IDENTIFIER)
    return bytes(b.Output())


def attach_metadata(model: bytes, desc: ModelDescription) -> bytes:
    """``model`` with ``desc`` as its TFLite metadata (replacing any already there).

    Args:
      model: a TFLite flatbuffer (with or without metadata).
      desc: what to record; ``labels``, when given, must be one per output class.

    Returns:
      The flatbuffer with a ``TFLITE_METADATA`` buffer, followed by a zip holding
      ``labels.txt`` when there are labels.

    Raises:
      ValueError: the number of labels differs from the output's last dimension.
    """
    from tensorflow.lite.python import schema_py_generated as schema

    model_t = schema.ModelT.InitFromPackedBuf(bytearray(model), 0)
    if desc.labels:
        out = model_t.subgraphs[0].tensors[model_t.subgraphs[0].outputs[0]]
        if int(out.shape[-1]) != len(desc.labels):
            raise ValueError(f"{len(desc.labels)} labels for an output of {out.shape[-1]} "
                             "classes")
    kept = [m for m in (model_t.metadata or [])
            if (m.name.decode() if isinstance(m.name, bytes) else m.name)
            != METADATA_BUFFER_NAME]
    buffer = schema.BufferT()
    buffer.data = list(_metadata_bytes(model_t, desc))
    model_t.buffers.append(buffer)
    entry = schema.MetadataT()
    entry.name = METADATA_BUFFER_NAME
    entry.buffer = len(model_t.buffers) - 1
    model_t.metadata = [*kept, entry]
    b = flatbuffers.Builder(len(model) + 4096)
    b.Finish(model_t.Pack(b), file_identifier=MODEL_FILE_IDENTIFIER)
    out = bytes(b.Output())
    if not desc.labels:
        return out
    # Appended the way tflite-support's populator does it: zipfile's append mode on a
    # file that is not a zip adds an archive at its end, offsets counted from the start.
    model_file = io.BytesIO(out)
    with zipfile.ZipFile(model_file, "a", compression=zipfile.ZIP_STORED) as zf:
        zf.writestr(LABEL_FILE, "".join(f"{label}\n" for label in desc.labels))
    return model_file.getvalue()


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else (value or "")


def read_metadata(model: bytes) -> dict | None:
    """The model's TFLite metadata as a plain dict, parsed with the metadata schema, and
    its associated files (name -> text); None when the model has none."""
    from tensorflow.lite.python import schema_py_generated as schema

    model_t = schema.ModelT.InitFromPackedBuf(bytearray(model), 0)
    buffers = [m.buffer for m in (model_t.metadata or [])
               if _text(m.name) == METADATA_BUFFER_NAME]
    if not buffers:
        return None
    raw = bytes(bytearray(model_t.buffers[buffers[0]].data))
    if not meta.ModelMetadata.ModelMetadataBufferHasIdentifier(raw, 0):
        raise ValueError(f"{METADATA_BUFFER_NAME} buffer lacks the M001 identifier")
    m = meta.ModelMetadataT.InitFromPackedBuf(bytearray(raw), 0)

    def tensor(t) -> dict:
        d = {"name": _text(t.name), "description": _text(t.description)}
        for unit in t.processUnits or []:
            if unit.optionsType == meta.ProcessUnitOptions.NormalizationOptions:
                d["mean"] = [float(v) for v in unit.options.mean]
                d["std"] = [float(v) for v in unit.options.std]
        if t.stats is not None and t.stats.min is not None:
            d["min"] = [float(v) for v in t.stats.min]
            d["max"] = [float(v) for v in t.stats.max]
        d["associated_files"] = [{"name": _text(f.name), "type": int(f.type)}
                                 for f in t.associatedFiles or []]
        return d

    sub = m.subgraphMetadata[0]
    files = {}
    try:
        with zipfile.ZipFile(io.BytesIO(model)) as zf:
            files = {n: zf.read(n).decode() for n in zf.namelist()}
    except zipfile.BadZipFile:
        pass
    return {
        "name": _text(m.name),
        "description": _text(m.description),
        "version": _text(m.version),
        "author": _text(m.author),
        "min_parser_version": _text(m.minParserVersion),
        "inputs": [tensor(t) for t in sub.inputTensorMetadata or []],
        "outputs": [tensor(t) for t in sub.outputTensorMetadata or []],
        "files": files,
    }


def with_pipeline_metadata(tflites: dict[str, bytes], cfg, data) -> dict[str, bytes]:
    """Every model of a pipeline run (``float``, ``ptq_int8``, ``qat_int8``, ...) with its
    metadata: named ``<pipeline>_<model>``, described by what made it."""
    from edgeqat import __version__

    mean, std = data.normalization
    out = {}
    for key, model in tflites.items():
        desc = ModelDescription(
            name=f"{cfg.name}_{key}",
            description=(f"{key} model of edgeqat pipeline {cfg.name!r} (convert.mode "
                         f"{cfg.convert.mode}, data {data.name}, {data.num_classes} classes, "
                         f"input shape {list(data.input_shape)})"),
            version=f"edgeqat {__version__}", mean=mean, std=std,
            labels=data.class_names if len(data.class_names) == data.num_classes else ())
        out[key] = attach_metadata(model, desc)
    return out
