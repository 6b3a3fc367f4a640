"""Which TFLite runtime version can load each builtin op version, checked before shipping.

``TABLE`` is TensorFlow's ``FindMinimumRuntimeVersionForOp`` map, copied from
``tensorflow/lite/tools/versioning/runtime_version.cc`` in tensorflow/tensorflow at commit
f3ddd831d6e108d9a79f7bc37ce9439f91b58d7b (Apache 2.0), whose newest entry is 2.13.0:
one line per op, ``VERSION:MIN_RUNTIME`` pairs. An op version the table does not list is
newer than that commit; TensorFlow's converter also writes the whole model's minimum into
the flatbuffer's ``min_runtime_version`` metadata, which is checked too.

``require_loadable`` refuses, before anything runs on the device, a model that a device
profile's ``runtime_version`` cannot load, naming each op, its version and the runtime
version it needs: an old tflite-runtime would otherwise fail on the device with
"Didn't find op for builtin opcode ... version ...".
"""

from __future__ import annotations

from dataclasses import dataclass

from edgeqat.errors import UserError

TABLE_SOURCE = ("tensorflow/lite/tools/versioning/runtime_version.cc at tensorflow commit "
                "f3ddd831d6e1")
TABLE_NEWEST = "2.13.0"
_TABLE_TEXT = """
AVERAGE_POOL_2D 1:1.5.0 2:1.14.0 3:2.3.0
BATCH_MATMUL 1:2.3.0 2:2.3.0 3:2.4.0 4:2.5.0
BROADCAST_TO 2:2.5.0 3:2.5.0
CONV_2D 1:1.5.0 2:1.14.0 3:1.14.0 4:2.3.0 5:2.4.0 6:2.9.0 7:2.11.0
DEPTHWISE_CONV_2D 1:1.5.0 2:1.12.0 3:1.14.0 4:2.2.0 5:2.3.0 6:2.3.0 7:2.11.0
ADD 1:1.5.0 2:1.14.0 3:2.4.0 4:2.6.0
ADD_N 1:1.14.0
SPACE_TO_BATCH_ND 1:1.6.0 2:1.14.0 3:2.3.0
SUB 1:1.6.0 2:1.14.0 3:2.3.0 4:2.4.0 5:2.4.0
DENSIFY 1:2.2.0
DIV 1:1.6.0 2:2.3.0
BATCH_TO_SPACE_ND 1:1.6.0 2:1.14.0 3:2.3.0
CAST 1:1.5.0 2:2.7.0 3:2.8.0 4:2.9.0 5:2.12.0
CONCATENATION 1:1.5.0 2:1.14.0 3:2.3.0
DEPTH_TO_SPACE 1:2.1.0 2:2.5.0
EMBEDDING_LOOKUP 1:1.13.0 2:1.14.0 3:1.14.0
EMBEDDING_LOOKUP_SPARSE 1:1.5.0
FAKE_QUANT 1:1.5.0 2:1.10.0
FULLY_CONNECTED 1:1.5.0 2:1.10.0 3:1.14.0 4:1.14.0 5:2.0.0 6:2.1.0 7:2.3.0 8:2.3.0 9:2.3.0 10:2.11.0
GATHER 1:1.6.0 2:1.14.0 3:1.15.0 4:2.4.0 5:2.5.0
GATHER_ND 1:1.14.0 2:2.3.0 3:2.5.0
HASHTABLE_LOOKUP 1:1.5.0
SVDF 1:1.5.0 2:1.14.0 3:2.2.0 4:2.3.0
L2_NORMALIZATION 1:1.5.0 2:1.14.0
L2_POOL_2D 1:1.5.0
LOCAL_RESPONSE_NORMALIZATION 1:1.5.0
MAX_POOL_2D 1:1.5.0 2:1.14.0 3:2.3.0
MAXIMUM 1:1.14.0 2:1.14.0 3:2.3.0 4:2.3.0
MINIMUM 1:1.14.0 2:1.14.0 3:2.3.0 4:2.3.0
MUL 1:1.5.0 2:1.14.0 3:1.15.0 4:2.3.0 5:2.6.0 6:2.11.0
NON_MAX_SUPPRESSION_V4 1:2.1.0
NON_MAX_SUPPRESSION_V5 1:2.1.0
PAD 1:1.5.0 2:1.14.0 3:2.4.0 4:2.6.0
TILE 1:1.10.1 2:2.2.0 3:2.8.0 4:2.12.0
PADV2 1:1.9.0 2:1.14.0 3:2.4.0 4:2.6.0
RESHAPE 1:1.5.0
SOFTMAX 1:1.5.0 2:1.14.0 3:2.3.0
SPACE_TO_DEPTH 1:1.5.0 2:1.14.0
TRANSPOSE 1:1.6.0 2:1.14.0 3:1.15.0 4:2.3.0 5:2.4.0 6:2.12.0
LSTM 1:1.7.0 2:1.10.0 3:1.14.0 4:2.3.0
UNIDIRECTIONAL_SEQUENCE_LSTM 1:1.13.1 2:1.14.0 3:2.3.0 4:2.12.0
BIDIRECTIONAL_SEQUENCE_LSTM 1:1.14.0 2:1.14.0 3:1.14.0
BIDIRECTIONAL_SEQUENCE_RNN 1:1.14.0 2:1.14.0 3:2.3.0
MEAN 1:1.6.0 2:1.14.0 3:2.4.0
SUM 1:1.10.0 2:1.15.0
REDUCE_MAX 1:1.11.0 2:1.14.0 3:2.5.0
REDUCE_MIN 1:1.11.0 2:1.14.0 3:2.5.0
REDUCE_PROD 1:1.11.0 2:2.6.0
REDUCE_ANY 1:1.11.0
RELU6 1:1.5.0 2:1.14.0 3:2.5.0
RESIZE_BILINEAR 1:1.7.0 2:1.14.0 3:2.2.0 4:2.5.0
RESIZE_NEAREST_NEIGHBOR 1:1.13.1 2:1.14.0 3:2.3.0 4:2.4.0
RNN 1:1.5.0 2:1.14.0 3:2.3.0
SKIP_GRAM 1:1.5.0
SQUEEZE 1:1.6.0 2:2.5.0
SPLIT 1:1.5.0 2:1.14.0 3:1.14.0 4:2.3.0
SPLIT_V 1:1.13.1 2:2.3.0
STRIDED_SLICE 1:1.6.0 2:1.14.0 3:2.1.0 4:2.2.0 5:2.5.0 6:2.6.0
TOPK_V2 1:1.7.0 2:1.14.0
ARG_MAX 1:1.9.0 2:1.14.0 3:2.9.0
ARG_MIN 1:1.9.0 2:1.14.0 3:2.9.0
TRANSPOSE_CONV 1:1.9.0 2:2.2.0 3:2.3.0 4:2.13.0
SPARSE_TO_DENSE 1:1.9.0 2:1.14.0 3:1.15.0
EXPAND_DIMS 1:1.10.0
PACK 1:1.11.0 2:1.14.0 3:2.3.0
SHAPE 1:1.10.0
SLICE 1:1.14.0 2:1.14.0 3:1.14.0 4:2.4.0 5:2.5.0
TANH 1:1.14.0 2:1.14.0 3:2.3.0
ONE_HOT 1:1.11.0
UNPACK 1:1.11.0 2:1.14.0 3:2.2.0 4:2.3.0
LEAKY_RELU 1:1.13.1 2:2.3.0
LOGISTIC 1:1.14.0 2:1.14.0 3:2.3.0
LOG_SOFTMAX 1:1.14.0 2:1.14.0
LSH_PROJECTION 1:1.5.0
SQUARED_DIFFERENCE 1:1.13.1 2:2.5.0
MIRROR_PAD 1:1.13.1 2:2.3.0 3:2.12.0
UNIQUE 1:1.14.0
UNIDIRECTIONAL_SEQUENCE_RNN 1:1.14.0 2:1.14.0 3:2.3.0
WHERE 1:1.14.0 2:2.8.0
DEQUANTIZE 1:1.13.1 2:1.14.0 3:1.15.0 4:2.2.0 5:2.7.0
REVERSE_SEQUENCE 1:1.14.0
EQUAL 1:1.14.0 2:1.14.0 3:2.3.0
NOT_EQUAL 1:1.14.0 2:1.14.0 3:2.3.0
GREATER 1:1.14.0 2:1.14.0
GREATER_EQUAL 1:1.14.0 2:1.14.0
LESS 1:1.14.0 2:1.14.0
LESS_EQUAL 1:1.14.0 2:1.14.0
SCATTER_ND 1:2.1.0
SEGMENT_SUM 1:2.2.0
SELECT 1:1.14.0 2:1.14.0 3:2.12.0
SELECT_V2 1:2.2.0
IF 1:1.15.0
FLOOR_DIV 1:1.14.0 2:1.14.0
FLOOR 1:1.9.0
CEIL 1:1.14.0
MATRIX_DIAG 1:1.14.0
MATRIX_SET_DIAG 1:1.14.0
ELU 1:1.14.0
QUANTIZE 1:1.14.0 2:1.15.0 3:2.7.0
ROUND 1:1.14.0
RELU 1:1.5.0 2:2.1.0 3:2.5.0
RELU_N1_TO_1 1:1.5.0
RELU_0_TO_1 1:2.10.0
PRELU 1:1.8.0
EXP 1:1.7.0
COS 1:1.14.0
NEG 1:1.9.0
POW 1:1.10.0
LOGICAL_OR 1:1.11.0
LOGICAL_AND 1:1.11.0
LOGICAL_NOT 1:1.11.0
FLOOR_MOD 1:1.13.0
RANGE 1:1.13.0
SIN 1:1.9.0
LOG 1:1.14.0
SQRT 1:1.10.0
RSQRT 1:1.10.0 2:2.5.0
SQUARE 1:1.12.0
ZEROS_LIKE 1:1.12.0
ABS 1:1.13.0 2:2.4.0 3:2.5.0 4:2.6.0 5:2.12.0
HARD_SWISH 1:1.15.0
FILL 1:1.13.0 2:2.3.0 3:2.5.0 4:2.12.0
REVERSE_V2 1:1.14.0 2:2.2.0 3:2.5.0
RANK 1:1.14.0
WHILE 1:1.15.0
CUMSUM 1:2.4.0
CALL_ONCE 1:2.5.0
RFFT2D 1:2.5.0
CONV_3D 1:2.5.0
IMAG 1:2.5.0
REAL 1:2.5.0
COMPLEX_ABS 1:2.5.0
HASHTABLE 1:2.5.0
HASHTABLE_FIND 1:2.5.0
HASHTABLE_IMPORT 1:2.5.0
HASHTABLE_SIZE 1:2.5.0
REDUCE_ALL 1:2.6.0
CONV_3D_TRANSPOSE 1:2.6.0
VAR_HANDLE 1:2.6.0
READ_VARIABLE 1:2.6.0
ASSIGN_VARIABLE 1:2.6.0
BROADCAST_ARGS 1:2.6.0
RANDOM_STANDARD_NORMAL 1:2.8.0
BUCKETIZE 1:2.8.0
RANDOM_UNIFORM 1:2.8.0
MULTINOMIAL 1:2.8.0
GELU 1:2.9.0 2:2.9.0
DYNAMIC_UPDATE_SLICE 1:2.9.0
UNSORTED_SEGMENT_PROD 1:2.10.0
UNSORTED_SEGMENT_MAX 1:2.10.0
UNSORTED_SEGMENT_MIN 1:2.11.0
UNSORTED_SEGMENT_SUM 1:2.10.0
ATAN2 1:2.10.0
SIGN 1:2.11.0 2:2.12.0
"""
TABLE: dict[tuple[str, int], str] = {
    (op, int(pair.split(":")[0])): pair.split(":")[1]
    for op, *pairs in (line.split() for line in _TABLE_TEXT.strip().splitlines())
    for pair in pairs
}


def parse_version(text: str) -> tuple[int, ...]:
    """"2.14.0" -> (2, 14, 0); compared the way runtime_version.cc compares them."""
    return tuple(int(p) for p in text.strip().split(".") if p.isdigit())


@dataclass(frozen=True)
class OpNeed:
    """One operator code of a model and the runtime version it needs (None: unknown)."""

    op: str
    version: int
    needs: str | None

    def describe(self) -> str:
        if self.needs is not None:
            return f"{self.op} version {self.version} needs runtime >= {self.needs}"
        return (f"{self.op} version {self.version} is newer than edgeqat's table "
                f"(from TensorFlow {TABLE_NEWEST}): needs a runtime newer than {TABLE_NEWEST}")


def op_needs(model: bytes) -> tuple[list[OpNeed], str | None]:
    """Every builtin operator code of ``model`` with the runtime version it needs, and the
    model's own ``min_runtime_version`` metadata (None when absent)."""
    from tensorflow.lite.python import schema_py_generated as schema

    from edgeqat.inspect import schema_names

    names = schema_names(schema.BuiltinOperator)
    model_t = schema.ModelT.InitFromPackedBuf(bytearray(model), 0)
    needs = []
    for code in model_t.operatorCodes:
        op = names.get(max(code.builtinCode, code.deprecatedBuiltinCode), "?")
        if op == "CUSTOM":
            continue  # a custom op's registration is the device's business, not a version
        needs.append(OpNeed(op, int(code.version), TABLE.get((op, int(code.version)))))
    recorded = None
    for m in model_t.metadata or []:
        name = m.name.decode() if isinstance(m.name, bytes) else m.name
        if name == "min_runtime_version":
            raw = bytes(bytearray(model_t.buffers[m.buffer].data)).split(b"\0")[0]
            recorded = raw.decode() or None
    return needs, recorded


def unloadable(model: bytes, runtime_version: str) -> list[str]:
    """Why ``runtime_version`` cannot load ``model``: one entry per op (empty: it can)."""
    have = parse_version(runtime_version)
    needs, recorded = op_needs(model)
    out = [n.describe() for n in needs
           if n.needs is None or parse_version(n.needs) > have]
    if recorded and parse_version(recorded) > have and not out:
        out.append(f"the converter recorded min_runtime_version {recorded}")
    return out


def require_loadable(tflites: dict[str, bytes], device) -> None:
    """Raises when the device profile's runtime version cannot load one of ``tflites``.

    Nothing is checked when the profile gives no ``runtime_version``.

    Raises:
      UserError: naming the model, each op and version, and the runtime version needed.
    """
    if not device.runtime_version:
        return
    for name, model in tflites.items():
        problems = unloadable(model, device.runtime_version)
        if problems:
            raise UserError(
                f"{name}.tflite cannot load on {device.source or device.name} "
                f"({device.runtime} {device.runtime_version}): {'; '.join(problems)}; "
                "use a device runtime at least that new, or a convert.mode whose ops it "
                "has (int8)")
