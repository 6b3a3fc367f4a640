"""Facts about a TFLite flatbuffer: ops, tensor types, and the full-integer check."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgeqat.errors import UserError

FLOAT_TYPES = ("float32", "float16", "float64")


@dataclass(frozen=True)
class OpFacts:
    index: int
    name: str
    input_types: tuple[str, ...]
    output_types: tuple[str, ...]

    @property
    def is_integer(self) -> bool:
        return not any(t in FLOAT_TYPES for t in self.input_types + self.output_types)


def _interpreter(model: bytes):
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    return Interpreter(model_content=model,
                       experimental_op_resolver_type=OpResolverType.BUILTIN_REF)


def list_ops(model: bytes) -> list[OpFacts]:
    """Every op in the main subgraph with its input and output tensor types."""
    interp = _interpreter(model)
    tensors = {t["index"]: np.dtype(t["dtype"]).name for t in interp.get_tensor_details()}
    ops = []
    for op in interp._get_ops_details():
        ins = tuple(tensors[i] for i in op["inputs"] if i >= 0)
        outs = tuple(tensors[i] for i in op["outputs"] if i >= 0)
        ops.append(OpFacts(op["index"], op["op_name"], ins, outs))
    return ops


def subgraph_ops(model: bytes) -> dict[str, list[OpFacts]]:
    """Every op of every subgraph (one per signature), read from the flatbuffer itself, so
    it also sees kernels the reference resolver cannot load (packed int4). Keys are the
    signature names (the subgraph's name when it has no signature)."""
    from tensorflow.lite.python import schema_py_generated as schema

    m = schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(model, 0))
    ops_names = schema_names(schema.BuiltinOperator)
    types = tensor_type_names()
    names = {sig.subgraphIndex: sig.signatureKey.decode() for sig in (m.signatureDefs or [])}
    out = {}
    for g, sub in enumerate(m.subgraphs):
        facts = []
        for i, op in enumerate(sub.operators or []):
            ins = tuple(types[sub.tensors[t].type] for t in op.inputs if t >= 0)
            outs = tuple(types[sub.tensors[t].type] for t in op.outputs if t >= 0)
            facts.append(OpFacts(i, ops_names.get(builtin_code(m, op), "CUSTOM"), ins, outs))
        key = names.get(g) or (sub.name.decode() if sub.name else f"subgraph {g}")
        out[key] = facts
    return out


def require_full_integer_everywhere(model: bytes, what: str = "model") -> dict:
    """``require_full_integer`` over every subgraph (each signature of the model).

    Returns:
      signature -> its op list.
    """
    found = subgraph_ops(model)
    for sig, ops in found.items():
        bad = [op for op in ops if not op.is_integer]
        if bad:
            listed = ", ".join(f"#{op.index} {op.name} ({'/'.join(op.input_types)} -> "
                               f"{'/'.join(op.output_types)})" for op in bad)
            raise UserError(f"{what} signature {sig!r} is not fully integer: {len(bad)} float "
                            f"op(s): {listed}")
    return found


def schema_names(enum) -> dict[int, str]:
    """A flatbuffer schema enum (``BuiltinOperator``, ``TensorType``) as value -> name."""
    return {v: k for k, v in vars(enum).items() if not k.startswith("_") and isinstance(v, int)}


def builtin_code(model_t, op) -> int:
    """The builtin operator code of ``op`` in an unpacked ``ModelT`` (newer files keep it
    in ``builtinCode``, older ones in ``deprecatedBuiltinCode``)."""
    code = model_t.operatorCodes[op.opcodeIndex]
    return max(code.builtinCode, code.deprecatedBuiltinCode)


def tensor_type_names() -> dict[int, str]:
    """The flatbuffer's ``TensorType`` values as lower-case names (``int4``, ``int8``)."""
    from tensorflow.lite.python import schema_py_generated as schema

    return {v: k.lower() for v, k in schema_names(schema.TensorType).items()}


def tensors(model: bytes) -> list[dict]:
    """Each tensor of the main subgraph as stored: name, type, shape, and the bytes of its
    constant data (0 for an activation).

    Read from the flatbuffer itself, not the interpreter: the interpreter reports a
    packed ``int4`` weight tensor as ``int8``, and its reference kernels cannot load the
    int4 ops (CONV_2D v7) at all. A packed int4 tensor takes half a byte per value.
    """
    from tensorflow.lite.python import schema_py_generated as schema

    names = tensor_type_names()
    model_t = schema.ModelT.InitFromPackedBuf(bytearray(model), 0)
    out = []
    for t in model_t.subgraphs[0].tensors:
        data = model_t.buffers[t.buffer].data if t.buffer < len(model_t.buffers) else None
        out.append({"name": t.name.decode() if isinstance(t.name, bytes) else str(t.name),
                    "type": names.get(t.type, str(t.type)),
                    "shape": [int(d) for d in (t.shape if t.shape is not None else [])],
                    "bytes": 0 if data is None else int(len(data))})
    return out


def _count_types(facts: list[dict]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for t in facts:
        counts[t["type"]] = counts.get(t["type"], 0) + 1
    return counts


def tensor_types(model: bytes) -> dict[str, int]:
    """How many tensors of each stored type the flatbuffer holds (main subgraph)."""
    return _count_types(tensors(model))


def storage(model: bytes) -> dict:
    """What the shipped file stores: its bytes, its tensors by stored type, and each
    constant tensor (weights, biases) with its stored type, shape and bytes."""
    facts = tensors(model)
    consts = [t for t in facts if t["bytes"]]
    by_type: dict[str, int] = {}
    for c in consts:
        by_type[c["type"]] = by_type.get(c["type"], 0) + c["bytes"]
    return {"bytes": len(model), "tensor_types": _count_types(facts),
            "constant_bytes": by_type, "constants": consts}


def float_ops(model: bytes) -> list[OpFacts]:
    """Ops that read or write a float tensor (empty for a fully-integer model)."""
    return [op for op in list_ops(model) if not op.is_integer]


def require_full_integer(model: bytes, what: str = "model") -> list[OpFacts]:
    """Returns the op list, or raises naming every op that is not integer.

    Raises:
      UserError: some op reads or writes a float tensor.
    """
    ops = list_ops(model)
    bad = [op for op in ops if not op.is_integer]
    if bad:
        listed = ", ".join(f"#{op.index} {op.name} ({'/'.join(op.input_types)} -> "
                           f"{'/'.join(op.output_types)})" for op in bad)
        raise UserError(f"{what} is not fully integer: {len(bad)} float op(s): {listed}; "
                        "quantize those layers (policy rules) or keep them off the device")
    return ops


def layers_named(tensor: str, names) -> list[str]:
    """The layer names in a TFLite tensor name, in order. A Keras layer name may itself
    hold ``/`` (MobileNetV3's ``expanded_conv/depthwise``): a name counts where it fills
    whole ``/``-separated segments of one ``;``-separated part."""
    found = []
    for part in tensor.split(";"):
        segs, i = part.split("/"), 0
        while i < len(segs):
            j = next((j for j in range(len(segs), i, -1)  # the longest name from i
                      if "/".join(segs[i:j]) in names), i + 1)
            if "/".join(segs[i:j]) in names:
                found.append("/".join(segs[i:j]))
            i = j
    return found
