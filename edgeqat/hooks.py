"""The one seam that changes what a quantizer computes at run time.

A QAT model's quantizers sit in *slots* of tfmot's layers: a weight's and an
activation's in a ``QuantizeWrapper``, the output's, a ``QuantizeLayer``'s. A ``Hook``
takes a quantizer's place in its slot and decides how the quantizer is called; removing
the hook puts the quantizer back. Two hooks exist:

* QAT's schedule (``qat.ScheduleHook``): fake quantization off during the delay, range
  observers reading their stored range after the freeze. It reads the current
  ``qat.Phase`` from the ``qat.ScheduleHooks`` that installed it.
* kernel rounding (``requant.KernelRounding``): an output rounds as the TFLite kernel
  does, in inference mode.

``suspended(model)`` takes every hook out for its duration: the converter traces the bare
quantizers, so no flatbuffer ever sees a hook. Hooks are not saved with a model (a saved
config holds the quantize configs' own quantizers) and work on tfmot's quantizers as on
edgeqat's. Nothing else changes a quantizer's behaviour: no class swapping, no attribute
proxies, no module-level switch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

from edgeqat.graph import QuantizeLayer
from edgeqat.keras import keras, tfmot

_WRAPPER = tfmot.quantization.keras.QuantizeWrapper  # V2 subclasses it


class Hook:
    """Stands in a slot for ``quantizer`` and calls it; subclasses override ``call``.

    The quantizer's contract (``num_bits``, ``scale``, ``per_channel``, ``get_config``)
    is forwarded explicitly, so code that reads a slot sees the quantizer's facts.
    """

    def __init__(self, quantizer):
        self.quantizer = quantizer

    @property
    def num_bits(self) -> int:
        return self.quantizer.num_bits

    @property
    def per_channel(self) -> bool:
        return getattr(self.quantizer, "per_channel", False)

    def scale(self, weights, tensor=None):
        return self.quantizer.scale(weights, tensor)

    def get_config(self) -> dict:
        return self.quantizer.get_config()

    def __call__(self, inputs, training, weights, **kwargs):
        return self.call(inputs, training, weights, **kwargs)

    def call(self, inputs, training, weights, **kwargs):
        return self.quantizer(inputs, training, weights, **kwargs)

    def __repr__(self):
        return f"{type(self).__name__}({self.quantizer!r})"


def bare(quantizer):
    """The quantizer under any hooks stacked in a slot."""
    while isinstance(quantizer, Hook):
        quantizer = quantizer.quantizer
    return quantizer


@dataclass(frozen=True)
class Slot:
    """One place a tfmot layer holds a quantizer.

    ``kind``: ``weight``, ``activation`` (tfmot's activation wrappers), ``output`` or
    ``input`` (a ``QuantizeLayer``); ``index`` tells weights (and activations) apart.
    """

    layer: keras.layers.Layer
    kind: str
    index: int = 0

    def get(self):
        if self.kind == "weight":
            return self.layer._weight_vars[self.index][1]
        if self.kind == "activation":
            return self.layer._quantize_activations[self.index].quantizer
        if self.kind == "output":
            return self.layer._output_quantizers[0]
        return self.layer.quantizer

    def set(self, quantizer) -> None:
        if self.kind == "weight":
            # A new list: Keras tracks lists append-only, and a replaced element would
            # make the layer's checkpoint refuse to save.
            entries = list(self.layer._weight_vars)
            weight, _, qvars = entries[self.index]
            entries[self.index] = (weight, quantizer, qvars)
            self.layer._weight_vars = entries
        elif self.kind == "activation":
            self.layer._quantize_activations[self.index].quantizer = quantizer
        elif self.kind == "output":
            self.layer._output_quantizers = [quantizer]
        else:
            self.layer.quantizer = quantizer

    @property
    def variables(self) -> dict:
        """The variables the wrapper passes the quantizer (``weights`` in its call)."""
        if self.kind == "weight":
            return dict(self.layer._weight_vars[self.index][2])
        if self.kind == "activation":
            act = self.layer._quantize_activations[self.index]
            return {**getattr(act, "_pre_activation_vars", {}),
                    **getattr(act, "_post_activation_vars", {})}
        if self.kind == "output":
            return dict(self.layer._output_quantizer_vars)
        return dict(getattr(self.layer, "quantizer_vars", {}) or {})

    @property
    def tensor(self):
        """The weight a weight slot quantizes (None for the other kinds)."""
        return self.layer._weight_vars[self.index][0] if self.kind == "weight" else None


def slots(model: keras.Model) -> list[Slot]:
    """Every quantizer slot of a tfmot-annotated model, in layer order."""
    out = []
    for layer in model.layers:
        if isinstance(layer, _WRAPPER):
            out += [Slot(layer, "weight", i) for i in range(len(getattr(layer, "_weight_vars",
                                                                        [])))]
            out += [Slot(layer, "activation", i)
                    for i in range(len(getattr(layer, "_quantize_activations", [])))]
            if getattr(layer, "_output_quantizers", None):
                out.append(Slot(layer, "output"))
        elif isinstance(layer, QuantizeLayer) and layer.quantizer is not None:
            out.append(Slot(layer, "input"))
    return out


def install(slot: Slot, hook: Hook) -> None:
    """Puts ``hook`` (built around the slot's current quantizer) in ``slot``."""
    slot.set(hook)


def remove(model: keras.Model, hook_type: type[Hook] = Hook) -> None:
    """Takes every hook of ``hook_type`` (default: all) out of ``model``'s slots, in place."""
    for slot in slots(model):
        q = slot.get()
        if isinstance(q, Hook):
            slot.set(_without(q, hook_type))
    model.predict_function = None  # a cached predict graph would keep the hooks


def _without(q, hook_type):
    if not isinstance(q, Hook):
        return q
    inner = _without(q.quantizer, hook_type)
    if isinstance(q, hook_type):
        return inner
    q.quantizer = inner
    return q


@contextlib.contextmanager
def suspended(model: keras.Model) -> Iterator[None]:
    """Every hook out of ``model`` while active, back afterwards (what the converter
    traces is the bare quantizers)."""
    held = [(slot, slot.get()) for slot in slots(model)]
    held = [(slot, q) for slot, q in held if isinstance(q, Hook)]
    for slot, q in held:
        slot.set(bare(q))
    try:
        yield
    finally:
        for slot, q in held:
            slot.set(q)
