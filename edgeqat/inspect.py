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


def tensor_types(model: bytes) -> dict[str, int]:
    """How many tensors of each dtype the model holds."""
    interp = _interpreter(model)
    counts: dict[str, int] = {}
    for t in interp.get_tensor_details():
        name = np.dtype(t["dtype"]).name
        counts[name] = counts.get(name, 0) + 1
    return counts


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
