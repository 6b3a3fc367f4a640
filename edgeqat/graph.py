"""Look-ups in an annotated (QAT) Keras graph: wrappers, nodes, the step a layer reads.

Shared by annotation, export preparation, kernel rounding, conversion and diagnostics;
depends on Keras and tfmot only.
"""

from __future__ import annotations

from tensorflow_model_optimization.python.core.quantization.keras.quantize_layer import (
    QuantizeLayer,
)

from edgeqat.keras import keras, tf, tfmot

QuantizeWrapper = tfmot.quantization.keras.QuantizeWrapperV2


def wrapper_classes() -> tuple[type, type]:
    """(tfmot's QuantizeWrapperV2, its QuantizeLayer): the layers that carry quantizers."""
    return QuantizeWrapper, QuantizeLayer


def node_in(model: keras.Model, layer):
    """``layer``'s call in ``model``'s own graph, or None.

    A layer reused from another model (annotation shares unwrapped pass-through layers,
    pooling and reshape, between the float, canonical and QAT graphs) has its node for
    ``model`` later in ``_inbound_nodes``; ``layer._inbound_nodes[0]`` belongs to the
    first model that called it.
    """
    for index, node in enumerate(layer._inbound_nodes):
        if f"{layer.name}_ib-{index}" in model._network_nodes:
            return node
    return None


def activation_bits(model) -> set[int]:
    """The bit widths of the model's activation (output and input) quantizers."""
    wrapper_cls, quantize_layer_cls = wrapper_classes()
    bits = set()
    for layer in model.layers:
        if isinstance(layer, quantize_layer_cls):
            bits.add(layer.quantizer.num_bits)
        elif isinstance(layer, wrapper_cls):
            for q in getattr(layer, "_output_quantizers", None) or []:
                bits.add(q.num_bits)
    return bits


def has_quantizers(model) -> bool:
    return any(isinstance(layer, wrapper_classes()) for layer in model.layers)


def input_quantizers(layer, model) -> list:
    """For each input of ``layer``'s call in ``model``: the (quantizer, its variables) that
    set that input's range, or None.

    Walks back through unwrapped pass-through layers (pooling, reshape), which keep
    their input's scale in TFLite.
    """
    wrapper_cls, quantize_layer_cls = wrapper_classes()
    node = node_in(model, layer)
    if node is None:
        return []
    found = []
    for prod in tf.nest.flatten(node.inbound_layers):
        owner = None
        while prod is not None:
            if isinstance(prod, quantize_layer_cls):
                owner = (prod.quantizer, prod.quantizer_vars)
                break
            if isinstance(prod, wrapper_cls):
                if getattr(prod, "_output_quantizers", None):
                    owner = (prod._output_quantizers[0], prod._output_quantizer_vars)
                break
            if isinstance(prod, keras.layers.InputLayer):
                break
            up = node_in(model, prod)
            producers = tf.nest.flatten(up.inbound_layers) if up is not None else []
            prod = producers[0] if len(producers) == 1 else None
        found.append(owner)
    return found


def input_scale(layer, model):
    """The step of the quantizer that produced ``layer``'s (first) input in ``model``, or
    None (see ``input_quantizers``)."""
    owners = input_quantizers(layer, model)
    if len(owners) != 1 or owners[0] is None:
        return None
    quantizer, qvars = owners[0]
    return quantizer.scale(qvars)
