"""Float model + policy -> quantization-aware (QAT) model.

Three passes, each a re-execution of the functional graph with a per-node rule:

1. ``flatten``: clone every layer (the user's model is never touched), inline nested
   models, and turn the ``TFOpLambda`` layers Keras records for ``x + y``, ``x * 3``,
   ``tf.nn.relu6(x)`` into ``Add``/``Multiply``/``ScalarOp``/``ReLU`` layers.
2. ``canonicalize`` (float, same function as the input model): fold a BatchNormalization
   into the convolution/Dense before it using its trained statistics ("fold + freeze":
   QAT then trains the folded weights and the BN statistics no longer move); turn
   Rescaling, Normalization and any other BN into an elementwise MUL and ADD
   (``ScalarOp``/``ChannelOp``; consecutive ones composed, identities dropped);
   write a last-axis LayerNormalization out as its integer steps (mean, subtract,
   square, mean, add epsilon, rsqrt, multiply, affine), each with its own range;
   express Conv1D and, where the policy asks for per-channel weights, Dense as Conv2D
   between reshapes (per-axis Dense does not convert); split SeparableConv into depthwise +
   pointwise; split activations TFLite cannot fuse (swish -> sigmoid * x).
3. ``quantize``: wrap every layer in tfmot's ``QuantizeWrapperV2`` with the
   ``LayerQuantizeConfig`` its policy rule asks for, and put a ``QuantizeLayer`` on each
   float input. Unsupported layers are collected and reported together (``UserError``).

tfmot's ``quantize_model``/``quantize_apply`` is not used: its layout transforms refuse
Conv1D, Rescaling, lone BN, TFOpLambda and nested models. The result holds only tfmot
wrappers and edgeqat's own serializable objects, so it saves and loads inside ``scope()``.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, replace

import numpy as np

from edgeqat import layer_kinds
from edgeqat import quantize_configs as qc
from edgeqat.config import PolicyConfig
from edgeqat.errors import UserError
from edgeqat.keras import keras, require_keras2, tf, tfmot
from edgeqat.layers import LAYERS, ChannelMean, ChannelOp, Rsqrt, ScalarOp
from edgeqat.policy import LayerSpec, report_unsupported, resolve
from edgeqat.quantizers import REGISTRY

L = keras.layers
KerasTensor = keras.src.engine.keras_tensor.KerasTensor
_QuantizeWrapper = tfmot.quantization.keras.QuantizeWrapperV2
from tensorflow_model_optimization.python.core.quantization.keras.quantize_layer import (  # noqa: E402
    QuantizeLayer as _QuantizeLayer,
)


def custom_objects() -> dict:
    """Every custom object an edgeqat QAT model may hold, by class name."""
    objs = dict(REGISTRY)
    objs.update({cls.__name__: cls for cls in qc.CONFIGS})
    objs.update({cls.__name__: cls for cls in LAYERS})
    return objs


def scope():
    """Context manager for loading a QAT model: tfmot's ``quantize_scope`` plus
    ``custom_objects()``. Nothing is registered globally."""
    return tfmot.quantization.keras.quantize_scope(custom_objects())


# ---------------------------------------------------------------------------- graph walking


def _is_kt(v) -> bool:
    return isinstance(v, KerasTensor)


def _walk(model: keras.Model, inputs: list, visit) -> list:
    """Re-runs ``model``'s graph on ``inputs``; ``visit(node, args, kwargs)`` makes each
    node's outputs. Returns the outputs matching ``model.outputs``."""
    tmap = {id(kt): t for kt, t in zip(model.inputs, inputs, strict=True)}
    for depth in sorted(model._nodes_by_depth, reverse=True):
        for node in model._nodes_by_depth[depth]:
            if node.is_input:
                continue
            if not all(id(k) in tmap for k in node.keras_inputs):
                continue
            args, kwargs = tf.nest.map_structure(
                lambda v: tmap[id(v)] if _is_kt(v) else v, (node.call_args, node.call_kwargs))
            outs = visit(node, args, kwargs)
            flat_kt = tf.nest.flatten(node.outputs)
            flat_out = tf.nest.flatten(outs)
            for kt, o in zip(flat_kt, flat_out, strict=True):
                tmap[id(kt)] = o
    return [tmap[id(kt)] for kt in model.outputs]


def _new_inputs(model: keras.Model) -> list:
    return [keras.Input(shape=kt.shape[1:], dtype=kt.dtype, name=kt.name.split(":")[0])
            for kt in model.inputs]


def _consumers(model: keras.Model) -> dict[int, list]:
    """id(KerasTensor) -> the layers that read it, in ``model``'s own graph."""
    out: dict[int, list] = {}
    for nodes in model._nodes_by_depth.values():
        for node in nodes:
            if node.is_input:
                continue
            for kt in node.keras_inputs:
                out.setdefault(id(kt), []).append(node.layer)
    for kt in model.outputs:
        out.setdefault(id(kt), []).append(None)  # a model output is a consumer too
    return out


class _Names:
    def __init__(self):
        self.used: set[str] = set()

    def __call__(self, name: str) -> str:
        new, i = name, 1
        while new in self.used:
            new = f"{name}_{i}"
            i += 1
        self.used.add(new)
        return new


def _clone(layer, name: str, **overrides):
    config = {**layer.get_config(), "name": name, **overrides}
    return type(layer).from_config(config)


# ---------------------------------------------------------------------------- pass 1


def _scalar(v):
    if isinstance(v, int | float) and not isinstance(v, bool):
        return float(v)
    if isinstance(v, np.ndarray | np.generic) and np.ndim(v) == 0:
        return float(v)
    return None


def _replace_oplambda(layer, args, kwargs, names, origin, org):
    """A TFOpLambda node as ordinary layers, or None when not a known op."""
    sym = layer.symbol
    operands = list(args) + [kwargs[k] for k in ("x", "y", "features") if k in kwargs]
    tensors = [o for o in operands if tf.is_tensor(o) or _is_kt(o)]
    consts = [_scalar(o) for o in operands if not (tf.is_tensor(o) or _is_kt(o))]
    op = sym.split(".")[-1]

    def make(new_layer, inputs):
        origin[new_layer.name] = org
        return new_layer(inputs)

    base = layer.name
    if op in ("relu6", "relu", "sigmoid", "tanh", "silu", "swish", "gelu") and \
            len(tensors) == 1 and not consts:
        if op == "relu6":
            return make(L.ReLU(6.0, name=names(base)), tensors[0])
        if op == "relu":
            return make(L.ReLU(name=names(base)), tensors[0])
        return make(L.Activation({"silu": "swish"}.get(op, op), name=names(base)), tensors[0])
    binary = {"add": L.Add, "multiply": L.Multiply, "subtract": L.Subtract, "mul": L.Multiply}
    if op in binary and len(tensors) == 2:
        return make(binary[op](name=names(base)), tensors)
    if len(tensors) == 1 and len(consts) == 1 and consts[0] is not None:
        c = consts[0]
        x = tensors[0]
        x_first = operands.index(x) == 0 if any(o is x for o in operands) else True
        if op == "add":
            return make(ScalarOp("add", c, name=names(base)), x)
        if op in ("multiply", "mul"):
            return make(ScalarOp("mul", c, name=names(base)), x)
        if op == "truediv" and x_first and c != 0:
            return make(ScalarOp("mul", 1.0 / c, name=names(base)), x)
        if op == "subtract":
            if x_first:
                return make(ScalarOp("add", -c, name=names(base)), x)
            neg = make(ScalarOp("mul", -1.0, name=names(base + "_neg")), x)
            return make(ScalarOp("add", c, name=names(base)), neg)
    return None


def classifier_heads(model: keras.Model) -> set[str]:
    """The Dense layers whose output is a model output, alone or through activations."""
    heads = set()
    for t in model.outputs:
        layer = t.node.layer
        while isinstance(layer, (L.Activation, L.Softmax)) and len(layer._inbound_nodes) == 1:
            layer = layer.input.node.layer
        if isinstance(layer, L.Dense):
            heads.add(layer.name)
    return heads


def flatten(model: keras.Model) -> tuple[keras.Model, dict[str, tuple[str, str]]]:
    """A flat functional copy of ``model`` (nested models inlined, TFOpLambda replaced).

    Returns:
      The copy, and the origin of each of its layers: name -> (original name, class).
    """
    names = _Names()
    origin: dict[str, tuple[str, str]] = {}
    clones: dict[int, keras.layers.Layer] = {}

    def visit(node, args, kwargs):
        layer = node.layer
        if isinstance(layer, keras.Model):
            flat_in = [a for a in tf.nest.flatten(args) if tf.is_tensor(a) or _is_kt(a)]
            outs = _walk(layer, flat_in, visit)
            return outs[0] if len(outs) == 1 else outs
        org = (layer.name, type(layer).__name__)
        if type(layer).__name__ in ("TFOpLambda", "SlicingOpLambda"):
            out = _replace_oplambda(layer, args, kwargs, names, origin, org)
            if out is not None:
                return out
            org = (layer.name, f"TFOpLambda {layer.symbol}")
        if id(layer) not in clones:
            try:
                clone = _clone(layer, names(layer.name))
            except Exception as e:  # noqa: BLE001 - reported as a user error
                raise UserError(f"layer {layer.name} ({type(layer).__name__}) cannot be "
                                f"copied from its config: {e}") from None
            clones[id(layer)] = clone
            origin[clone.name] = org
            out = clone(*args, **kwargs)
            clone.set_weights(layer.get_weights())
            return out
        return clones[id(layer)](*args, **kwargs)

    inputs = _new_inputs(model)
    for kt, inp in zip(model.inputs, inputs, strict=True):
        origin[inp.node.layer.name] = (kt.node.layer.name, "InputLayer")
        names(inp.node.layer.name)
    outputs = _walk(model, inputs, visit)
    return keras.Model(inputs, outputs, name=model.name), origin


# ---------------------------------------------------------------------------- pass 2


def _bn_factors(bn):
    """(scale, shift) with bn(x) = x * scale + shift, from the trained statistics."""
    w = dict(zip([v.name.split("/")[-1].split(":")[0] for v in bn.weights],
                 bn.get_weights(), strict=True))
    var, mean = w["moving_variance"], w["moving_mean"]
    gamma = w.get("gamma", np.ones_like(var))
    beta = w.get("beta", np.zeros_like(var))
    scale = gamma / np.sqrt(var + bn.epsilon)
    return scale.astype(np.float32), (beta - mean * scale).astype(np.float32)


def _bn_last_axis(bn) -> bool:
    axis = bn.axis if isinstance(bn.axis, list | tuple) else [bn.axis]
    rank = len(bn.input_shape)
    return len(axis) == 1 and axis[0] in (-1, rank - 1)


def _is_layer_scale(layer) -> bool:
    """ConvNeXt's ``LayerScale`` (x * gamma per channel; keras.applications.convnext)."""
    return type(layer).__name__ == "LayerScale" and hasattr(layer, "gamma") \
        and len(layer.get_weights()) == 1


def _scale_factors(layer):
    """(scale, shift) of a BatchNormalization's or LayerScale's per-channel affine map."""
    if _is_layer_scale(layer):
        gamma = layer.get_weights()[0].astype(np.float32)
        return gamma, np.zeros_like(gamma)
    return _bn_factors(layer)


def _fold_weights(layer, bn):
    """The layer's weights with ``bn`` (a BatchNormalization or LayerScale) folded in
    (kernel scaled per output channel)."""
    scale, shift = _scale_factors(bn)
    weights = layer.get_weights()
    row = layer_kinds.weighted(layer)
    kernel_index = row.kernel_index
    kernel = weights[kernel_index]
    if row.bn_fold == layer_kinds.BnFold.DEPTHWISE:
        kernel = kernel * scale.reshape(kernel.shape[-2], kernel.shape[-1])
    elif row.bn_fold == layer_kinds.BnFold.TRANSPOSE:
        kernel = kernel * scale.reshape(1, 1, -1, 1)
    else:
        kernel = kernel * scale
    bias = weights[kernel_index + 1] if layer.use_bias else np.zeros_like(scale)
    out = list(weights[:kernel_index]) + [kernel.astype(np.float32),
                                           (bias * scale + shift).astype(np.float32)]
    return out


class _Canon:
    """The state of one ``canonicalize`` pass, handed to every rewrite rule."""

    def __init__(self, flat: keras.Model, origin: dict, wants_per_channel):
        self.names = _Names()
        for layer in flat.layers:
            if isinstance(layer, L.InputLayer):
                self.names(layer.name)
        self.consumers = _consumers(flat)
        self.folded: set[int] = set()  # BNs folded into the layer before, ReLUs moved
        self.origin = dict(origin)
        self.wants_per_channel = wants_per_channel
        self.affines: dict[int, tuple] = {}  # id(output) -> (input, scale, offset) of _affine

    def derive(self, new_layer, source_name):
        self.origin[new_layer.name] = self.origin.get(source_name, (source_name, "?"))
        return new_layer

    def fold_target(self, layer, node):
        """The BatchNormalization or LayerScale that folds into ``layer`` (its lone
        consumer), if any."""
        row = layer_kinds.weighted(layer)
        if row is None or row.bn_fold is None or qc.activation_name(layer) != "linear":
            return None
        outs = tf.nest.flatten(node.outputs)
        users = self.consumers.get(id(outs[0]), [])
        if len(outs) == 1 and len(users) == 1 and users[0] is not None \
                and len(users[0]._inbound_nodes) == 1 and (
                (isinstance(users[0], L.BatchNormalization) and _bn_last_axis(users[0]))
                or _is_layer_scale(users[0])):
            return users[0]
        return None

    def relu_consumer(self, node, bn):
        """The lone ReLU that reads this layer's (or its folded BN's) output, if any."""
        src = bn._inbound_nodes[0] if bn is not None else node
        outs = tf.nest.flatten(src.outputs)
        users = self.consumers.get(id(outs[0]), [])
        if len(outs) == 1 and len(users) == 1 and qc.is_fusable_relu(users[0]) \
                and len(users[0]._inbound_nodes) == 1:
            return users[0]
        return None

    def activation_after(self, x, act, base, src):
        """Applies activation ``act`` as separate layers (swish as sigmoid * x)."""
        names, derive = self.names, self.derive
        if act in ("linear", None):
            return x
        if act == "swish":
            sig = derive(L.Activation("sigmoid", name=names(base + "_sigmoid")), src)(x)
            return derive(L.Multiply(name=names(base + "_swish")), src)([x, sig])
        if act == "relu6":
            return derive(L.ReLU(6.0, name=names(base + "_relu6")), src)(x)
        return derive(L.Activation(act, name=names(base + "_" + act)), src)(x)


@dataclass(frozen=True)
class _Node:
    """One node being canonicalized: the layer, its call, and what folding decided."""

    layer: object
    node: object
    args: tuple
    kwargs: dict
    bn: object  # the BatchNormalization folded into it, or None
    weights: list  # its weights, with ``bn`` folded in
    act: str | None  # its activation's name
    fusable: bool  # TFLite fuses ``act`` into its op, so it stays on the layer

    @property
    def x(self):
        return self.args[0] if self.args else None

    @property
    def name(self) -> str:
        return self.layer.name


# ---- rewrite rules: (canon, n) -> the node's new output, or None when the rule does not
# apply. Tried in ``REWRITES`` order; a node no rule takes is kept (``_keep``).


def _conv1d_as_conv2d(c: _Canon, n: _Node):
    """Conv1D / SeparableConv1D as their 2-D forms between reshapes; a ReLU after it goes
    before the reshape back, next to the convolution TFLite fuses it into."""
    layer, x, weights, name = n.layer, n.x, n.weights, n.name
    if not (isinstance(layer, L.Conv1D | L.SeparableConv1D)
            and layer.data_format == "channels_last" and getattr(layer, "groups", 1) == 1):
        return None
    names, derive = c.names, c.derive
    k, s, d = layer.kernel_size[0], layer.strides[0], layer.dilation_rate[0]
    h = derive(L.Reshape((1, -1, x.shape[-1]), name=names(name + "_to2d")), name)(x)
    padding = layer.padding
    if padding == "causal":
        h = derive(L.ZeroPadding2D(((0, 0), (d * (k - 1), 0)),
                                   name=names(name + "_causal")), name)(h)
        padding = "valid"
    if isinstance(layer, L.Conv1D):
        conv = derive(L.Conv2D(layer.filters, (1, k), (1, s), padding,
                               dilation_rate=(1, d), use_bias=layer.use_bias or
                               n.bn is not None, name=names(name)), name)
        h = conv(h)
        conv.set_weights([weights[0][None]] + weights[1:])
    else:
        h = _separable(h, layer, weights, (1, k), (1, s), padding, (1, d),
                       n.bn is not None, names, derive)
    # The activation goes before the reshape back (ReLU commutes with it), and so does a
    # ReLU layer that follows: next to the convolution TFLite fuses it (one CONV_2D, no
    # separately quantized pre-activation output, no RELU op).
    h = c.activation_after(h, n.act, name, name)
    relu = c.relu_consumer(n.node, n.bn) if n.act in ("linear", None) else None
    if relu is not None:
        h = derive(_clone(relu, names(relu.name)), relu.name)(h)
        c.folded.add(id(relu))
    return derive(L.Reshape((-1, layer.filters), name=names(name + "_to1d")), name)(h)


def _split_separable2d(c: _Canon, n: _Node):
    """SeparableConv2D as depthwise + pointwise."""
    layer = n.layer
    if not isinstance(layer, L.SeparableConv2D):
        return None
    h = _separable(n.x, layer, n.weights, layer.kernel_size, layer.strides, layer.padding,
                   layer.dilation_rate, n.bn is not None, c.names, c.derive)
    return c.activation_after(h, n.act, n.name, n.name)


def _per_channel_dense(c: _Canon, n: _Node):
    """A Dense asked for per-channel weights as a 1x1 Conv2D between reshapes (per-axis
    Dense does not convert)."""
    layer, x, name = n.layer, n.x, n.name
    if not (isinstance(layer, L.Dense) and c.wants_per_channel(name)
            and x.shape.rank in (2, 3, 4)):
        return None
    names, derive = c.names, c.derive
    units, depth = layer.units, x.shape[-1]
    h = x
    if x.shape.rank < 4:  # a Dense on (batch, h, w, c) already is a 1x1 convolution
        shape_in = (1, 1, depth) if x.shape.rank == 2 else (1, -1, depth)
        h = derive(L.Reshape(shape_in, name=names(name + "_to4d")), name)(x)
    conv = derive(L.Conv2D(units, 1, use_bias=layer.use_bias or n.bn is not None,
                           activation=n.act if n.fusable else None,
                           name=names(name)), name)
    h = conv(h)
    conv.set_weights([n.weights[0][None, None]] + n.weights[1:])
    if x.shape.rank < 4:
        shape_out = (units,) if x.shape.rank == 2 else (-1, units)
        h = derive(L.Reshape(shape_out, name=names(name + "_to2d")), name)(h)
    return h if n.fusable else c.activation_after(h, n.act, name, name)


def _affine(c: _Canon, n: _Node, scale, offset):
    """``n``'s output as ``x * scale + offset`` (per channel) in elementwise ops: a MUL
    unless every scale is 1, an ADD unless every offset is 0, scalar constants when all
    channels agree (none at all for an identity). An affine right after another one this
    pass made (its lone consumer) is composed with it into one MUL and one ADD."""
    x = n.x
    channels = int(x.shape[-1])
    scale = np.broadcast_to(np.asarray(scale, np.float64).reshape(-1), (channels,))
    offset = np.broadcast_to(np.asarray(offset, np.float64).reshape(-1), (channels,))
    source = n.node.keras_inputs[0]
    prev = c.affines.get(id(x))
    if prev is not None and len(c.consumers.get(id(source), [])) == 1:
        x, s0, o0 = prev
        scale, offset = s0 * scale, o0 * scale + offset
    out = x
    for op, values, neutral in (("mul", scale, 1.0), ("add", offset, 0.0)):
        if np.all(values == neutral):
            continue
        name = c.names(n.name if out is x else f"{n.name}_{op}")
        if np.all(values == values[0]):
            layer = ScalarOp(op, float(values[0]), name=name)
        else:
            layer = ChannelOp(op, values.astype(np.float32), name=name)
        out = c.derive(layer, n.name)(out)
    c.affines[id(out)] = (x, scale, offset)
    return out


def _rescaling_as_affine(c: _Canon, n: _Node):
    if not isinstance(n.layer, L.Rescaling):
        return None
    return _affine(c, n, n.layer.scale, n.layer.offset)


def _normalization_as_affine(c: _Canon, n: _Node):
    """A last-axis, non-inverting Normalization as an affine map."""
    layer, x = n.layer, n.x
    if not (isinstance(layer, L.Normalization) and len(layer.axis) == 1
            and layer.axis[0] in (-1, x.shape.rank - 1)) or layer.invert is not False:
        return None
    mean = np.asarray(layer.mean).reshape(-1)
    std = np.maximum(np.sqrt(np.asarray(layer.variance).reshape(-1)), keras.backend.epsilon())
    return _affine(c, n, 1.0 / std, -mean / std)


def _batchnorm_as_affine(c: _Canon, n: _Node):
    """A BatchNormalization that folded into nothing, as an affine map."""
    if not (isinstance(n.layer, L.BatchNormalization) and _bn_last_axis(n.layer)):
        return None
    scale, shift = _bn_factors(n.layer)
    return _affine(c, n, scale, shift)


def _layer_scale_as_affine(c: _Canon, n: _Node):
    """A LayerScale that folded into nothing, as a per-channel MUL."""
    if not _is_layer_scale(n.layer):
        return None
    return _affine(c, n, *_scale_factors(n.layer))


def _layer_norm_in_steps(c: _Canon, n: _Node):
    """A LayerNormalization over the last axis as the integer ops it lowers to, each a
    layer with its own trained range: ``m = mean(x)``, ``d = x - m``, ``v = mean(d * d)``,
    ``r = rsqrt(v + epsilon)``, ``d * r``, then gamma and beta as an affine map. Kept whole,
    the converter writes SQUARED_DIFFERENCE (no int8 kernel in XNNPACK: 6 ms on a
    56x56x96 tensor, 150x its float time) and ranges QAT never simulated inside it; in
    these steps every op is a cheap int8 MUL, SUB, MEAN, ADD or RSQRT on a one-channel
    tensor, and every tensor's range is trained."""
    layer, x = n.layer, n.x
    if not isinstance(layer, L.LayerNormalization) or x is None:
        return None
    rank = x.shape.rank
    if [a % rank for a in layer.axis] != [rank - 1]:
        return None
    names, derive, name = c.names, c.derive, n.name

    def step(new_layer, inputs):
        return derive(new_layer, name)(inputs)

    mean = step(ChannelMean(name=names(name + "_mean")), x)
    d = step(L.Subtract(name=names(name + "_center")), [x, mean])
    var = step(ChannelMean(name=names(name + "_var")),
               step(L.Multiply(name=names(name + "_square")), [d, d]))
    inv = step(Rsqrt(name=names(name + "_rsqrt")),
               step(ScalarOp("add", float(layer.epsilon), name=names(name + "_eps")), var))
    normed = step(L.Multiply(name=names(name + "_norm")), [d, inv])
    gamma = layer.gamma.numpy() if layer.scale else 1.0
    beta = layer.beta.numpy() if layer.center else 0.0
    return _affine(c, replace(n, args=(normed,)), gamma, beta)


def _drop_identity(c: _Canon, n: _Node):
    """``Activation('linear')`` (ConvNeXt's stochastic depth at rate 0) computes nothing:
    dropped, so no second range sits on its input's tensor."""
    if not (isinstance(n.layer, L.Activation) and n.act == "linear") or n.x is None:
        return None
    return n.x


def _swish_split(c: _Canon, n: _Node):
    if not (isinstance(n.layer, L.Activation) and n.act == "swish"):
        return None
    return c.activation_after(n.x, "swish", n.name, n.name)


def _relu6_as_relu_layer(c: _Canon, n: _Node):
    if not (isinstance(n.layer, L.Activation) and n.act == "relu6"):
        return None
    return c.derive(L.ReLU(6.0, name=c.names(n.name)), n.name)(n.x)


REWRITES = (_conv1d_as_conv2d, _split_separable2d, _per_channel_dense, _rescaling_as_affine,
            _normalization_as_affine, _batchnorm_as_affine, _layer_scale_as_affine,
            _layer_norm_in_steps, _drop_identity, _swish_split, _relu6_as_relu_layer)


def _keep(c: _Canon, n: _Node):
    """Any other layer: kept (cloned where a BN folded in or its activation is split)."""
    layer, name = n.layer, n.name
    has_act = hasattr(layer, "activation") and not isinstance(layer, L.Activation)
    overrides = {}
    if n.bn is not None:
        overrides["use_bias"] = True
    if has_act and not n.fusable:
        overrides["activation"] = "linear"
    if overrides or n.bn is not None or c.names.used & {name}:
        new = c.derive(_clone(layer, c.names(name), **overrides), name)
        out = new(*n.args, **n.kwargs)
        new.set_weights(n.weights)
    else:
        c.names(name)
        c.origin.setdefault(name, (name, type(layer).__name__))
        out = layer(*n.args, **n.kwargs)
    if has_act and not n.fusable:
        out = c.activation_after(out, n.act, name, name)
    return out


def canonicalize(flat: keras.Model, origin: dict, wants_per_channel) -> tuple[keras.Model, dict]:
    """The canonical float model (see the module docstring); same function as ``flat``.

    Each node goes to the first rule of ``REWRITES`` that takes it, else is kept.

    Args:
      flat: output of ``flatten``.
      origin: its origin map (extended here for derived layers).
      wants_per_channel: name -> whether per-channel weights are asked for (Dense route).
    """
    c = _Canon(flat, origin, wants_per_channel)

    def visit(node, args, kwargs):
        layer = node.layer
        if id(layer) in c.folded:  # a BN folded into the layer before, or a ReLU moved
            return args[0] if args else None
        bn = c.fold_target(layer, node)
        weights = _fold_weights(layer, bn) if bn is not None else layer.get_weights()
        if bn is not None:
            c.folded.add(id(bn))
        act = qc.activation_name(layer)
        # Only the ops TFLite fuses an activation into keep it; the others (TRANSPOSE_CONV)
        # get it split out, so their own output has a trained range.
        fusable = act in qc.FUSABLE_ACTIVATIONS and layer_kinds.fuses_activation(layer)
        n = _Node(layer, node, tuple(args), kwargs, bn, weights, act, fusable)
        for rule in REWRITES:
            out = rule(c, n)
            if out is not None:
                return out
        return _keep(c, n)

    inputs = _new_inputs(flat)
    for kt, inp in zip(flat.inputs, inputs, strict=True):
        c.origin[inp.node.layer.name] = c.origin.get(kt.node.layer.name,
                                                     (kt.node.layer.name, "InputLayer"))
        c.names(inp.node.layer.name)
    outputs = _walk(flat, inputs, visit)
    return keras.Model(inputs, outputs, name=flat.name), c.origin


def _separable(x, layer, weights, kernel, strides, padding, dilation, folded, names, derive):
    pw_strides = 1
    if strides[0] != strides[1] and padding == "valid":
        # TF's CPU depthwise kernel needs equal strides (a strided SeparableConv1D gives
        # (1, s)): with valid padding, striding the pointwise 1x1 instead is the same.
        strides, pw_strides = (1, 1), strides
    dw = derive(L.DepthwiseConv2D(kernel, strides, padding,
                                  depth_multiplier=layer.depth_multiplier,
                                  dilation_rate=dilation, use_bias=False,
                                  name=names(layer.name + "_depthwise")), layer.name)
    h = dw(x)
    dk = weights[0]
    dw.set_weights([dk[None] if dk.ndim == 3 else dk])
    pw = derive(L.Conv2D(layer.filters, 1, pw_strides, use_bias=layer.use_bias or folded,
                         name=names(layer.name)), layer.name)
    h = pw(h)
    pk = weights[1]
    pw.set_weights([pk[None] if pk.ndim == 3 else pk] + list(weights[2:]))
    return h


# ---------------------------------------------------------------------------- pass 3


def _fused_into_next(layer, node, consumers) -> bool:
    """The layer's output goes only to a ReLU that TFLite fuses into this layer's op."""
    if not layer_kinds.fuses_activation(layer) or qc.activation_name(layer) not in (
            None, "linear"):
        return False
    outs = tf.nest.flatten(node.outputs)
    users = consumers.get(id(outs[0]), [])
    return len(outs) == 1 and len(users) == 1 and qc.is_fusable_relu(users[0])


def _call_wrapped(wrapper, layer, args, kwargs):
    """Calls a QuantizeWrapper, passing positional arguments beyond the first by name."""
    if len(args) > 1:
        params = [p for p in inspect.signature(layer.call).parameters if p != "self"]
        kwargs = {**kwargs, **dict(zip(params[1:], args[1:], strict=False))}
    return wrapper(args[0], **kwargs)


def quantize(canon: keras.Model, spec_of) -> keras.Model:
    """Wraps the canonical model's layers following ``spec_of(name) -> LayerSpec``."""
    unsupported = []
    for layer in canon.layers:
        spec = spec_of(layer.name)
        if not spec.float and qc.layer_kind(layer) is None:
            unsupported.append(layer)
    if unsupported:
        raise _Unsupported(unsupported)
    consumers = _consumers(canon)
    wrappers: dict[int, object] = {}

    def visit(node, args, kwargs):
        layer = node.layer
        spec = spec_of(layer.name)
        if spec.float or qc.layer_kind(layer) == "passthrough":
            return layer(*args, **kwargs)
        if id(layer) not in wrappers:
            quantize_output = not _fused_into_next(layer, node, consumers)
            separate_output = isinstance(layer, L.MultiHeadAttention)
            config = qc.make_quantize_config(
                layer, weight_kind=spec.weight_quantizer, weight_bits=spec.weight_bits,
                activation_kind=spec.activation_quantizer,
                activation_bits=spec.activation_bits,
                quantize_output=quantize_output and not separate_output,
                lsq_init=spec.lsq_init)
            out_q = None
            if separate_output and quantize_output:
                # The wrapper builds its output quantizer from compute_output_shape(query),
                # which MultiHeadAttention cannot answer alone: quantize after it instead.
                out_q = qc.activation_quantizer(spec.activation_quantizer,
                                                spec.activation_bits, layer)
            # Wrap an unbuilt copy, as loading does, so the wrapper orders its weights
            # the same way in both cases (h5 restores by order); weights copied below.
            # MultiHeadAttention builds its sublayers only when called: wrap it as is.
            inner = layer if separate_output else _clone(
                layer, layer.name, **({"quantize_values": True}
                                      if isinstance(layer, ChannelOp) else {}))
            wrapper = _QuantizeWrapper(inner, config, name=f"quant_{layer.name}")
            if inner is not layer:
                wrapper.build(tf.nest.map_structure(lambda t: t.shape, args[0]))
                inner.set_weights(layer.get_weights())  # before the call swaps in FakeQuants
            wrappers[id(layer)] = (wrapper, out_q)
        wrapper, out_q = wrappers[id(layer)]
        out = _call_wrapped(wrapper, layer, args, kwargs)
        if out_q is not None:
            out = _QuantizeLayer(out_q, name=f"quant_{layer.name}_output")(out)
        return out

    inputs = _new_inputs(canon)
    starts = []
    for kt, inp in zip(canon.inputs, inputs, strict=True):
        spec = spec_of(kt.node.layer.name)
        if kt.dtype.is_floating and not spec.float:
            quant = qc.input_quantizer(spec.activation_quantizer, spec.activation_bits)
            starts.append(_QuantizeLayer(quant, name=f"quantize_{kt.node.layer.name}")(inp))
        else:
            starts.append(inp)
    outputs = _walk(canon, starts, visit)
    return keras.Model(inputs, outputs, name=canon.name)


class _Unsupported(Exception):
    def __init__(self, layers):
        super().__init__("unsupported layers")
        self.layers = layers


# ---------------------------------------------------------------------------- public API


def annotate_model(model: keras.Model, policy: PolicyConfig, *,
                   sample_x: np.ndarray | None = None) -> keras.Model:
    """Returns an uncompiled, trainable quantization-aware copy of ``model``.

    Args:
      model: a built tf_keras functional or Sequential model (nested models allowed); it
        is not modified.
      policy: the rules (``edgeqat.policy``); first match on the original layer names.
      sample_x: a batch of real inputs. When given, the model runs once on it in training
        mode so data-initialised state starts from data: LSQ steps (2 mean|x| / sqrt(Qp)),
        PACT clips, activation ranges. Otherwise the first training step does this.

    Returns:
      The QAT model (tfmot ``QuantizeWrapperV2``/``QuantizeLayer`` layers); load a saved
      copy inside ``scope()``.

    Raises:
      TypeError: ``model`` is a Keras 3 object (or not a model).
      UserError: a subclassed model, or layers the policy cannot quantize (all listed).
    """
    require_keras2(model)
    if not getattr(model, "_is_graph_network", False):
        raise UserError(f"model {model.name} is a subclassed Keras model; annotate_model "
                        "needs a functional or Sequential model (rebuild it with Input)")
    flat, origin = flatten(model)
    heads = {origin.get(n, (n, "?"))[0] for n in classifier_heads(flat)}

    def spec_of_origin(org) -> LayerSpec:
        return resolve(policy, org[0], org[1].removeprefix("TFOpLambda ").split()[0]
                       if not org[1].startswith("TFOpLambda") else "TFOpLambda",
                       head=org[0] in heads)

    def wants_per_channel(name):
        spec = spec_of_origin(origin.get(name, (name, "?")))
        return not spec.float and spec.weight_quantizer in ("per_channel", "lsq")

    canon, origin2 = canonicalize(flat, origin, wants_per_channel)

    def spec_of(name):
        return spec_of_origin(origin2.get(name, (name, "?")))

    try:
        qat = quantize(canon, spec_of)
    except _Unsupported as e:
        report_unsupported((origin2.get(layer.name, (layer.name, ""))[0],
                            origin2.get(layer.name, ("", type(layer).__name__))[1],
                            "no quantize config for this layer kind") for layer in e.layers)
        raise
    if sample_x is not None:
        qat(np.asarray(sample_x), training=True)
    return qat
