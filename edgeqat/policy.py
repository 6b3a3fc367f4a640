"""Policy: which quantization each layer gets, from ordered ``[[policy.rules]]``.

A rule matches a layer when its ``layers`` regex fully matches the layer's name and its
``classes`` regex fully matches the layer's class name (the names of the model as the
user built it: layers that annotation derives, such as a split-out activation, follow the
rule of the layer they came from). The first matching rule wins; a layer no rule matches
gets ``policy.default``. ``float = true`` leaves the matched layers unquantized, which
only a converter with calibration data can still turn into integer ops.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable

from edgeqat.config import PolicyConfig, RuleConfig
from edgeqat.errors import UserError


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """The resolved quantization of one layer."""

    rule: int | None  # index into policy.rules; None: policy.default
    float: bool
    weight_bits: int
    activation_bits: int
    weight_quantizer: str
    activation_quantizer: str
    lsq_init: str = "mse"

    @classmethod
    def from_rule(cls, rule: RuleConfig, index: int | None) -> LayerSpec:
        return cls(index, rule.float, rule.weight_bits, rule.activation_bits,
                   rule.weight_quantizer, rule.activation_quantizer, rule.lsq_init)


def resolve(policy: PolicyConfig, name: str, class_name: str, head: bool = False
            ) -> LayerSpec:
    """The spec of the first rule matching (``name``, ``class_name``), else the default;
    for the classifier ``head`` (an 8-bit Dense), ``per_channel`` weights as
    ``policy.head_weights`` says."""
    spec = next((LayerSpec.from_rule(rule, i) for i, rule in enumerate(policy.rules)
                 if re.fullmatch(rule.layers, name) and re.fullmatch(rule.classes, class_name)),
                LayerSpec.from_rule(policy.default, None))
    if head and class_name == "Dense" and spec.weight_quantizer == "per_channel" \
            and spec.weight_bits == 8:
        spec = dataclasses.replace(spec, weight_quantizer=policy.head_weights)
    return spec


def unmatched_rules(policy: PolicyConfig, layers: Iterable[tuple[str, str]]) -> list[str]:
    """One warning per rule that decides no layer (a typo in a regex, a renamed layer).

    Args:
      layers: (name, class name) of every layer of the model as the user built it.

    Returns:
      Messages naming the rule and its regexes: either it matches no layer, or every layer
      it matches is taken by an earlier rule (first match wins).
    """
    layers = list(layers)
    decided = {resolve(policy, name, cls).rule for name, cls in layers}
    out = []
    for i, rule in enumerate(policy.rules):
        if i in decided:
            continue
        matches = [n for n, c in layers if re.fullmatch(rule.layers, n)
                   and re.fullmatch(rule.classes, c)]
        what = (f"policy.rules[{i}] (layers = {rule.layers!r}, classes = {rule.classes!r})")
        if matches:
            out.append(f"{what} has no effect: every layer it matches ({', '.join(matches[:5])}"
                       f"{', ...' if len(matches) > 5 else ''}) is taken by an earlier rule")
        else:
            names = ", ".join(n for n, _ in layers[:8]) + (", ..." if len(layers) > 8 else "")
            out.append(f"{what} matches no layer; the model's layers are: {names}")
    return out


def report_unsupported(layers: Iterable[tuple[str, str, str]]) -> None:
    """Raises one UserError naming every layer annotation cannot quantize.

    Args:
      layers: (layer name, class name, why) for each unsupported layer.

    Raises:
      UserError: when ``layers`` is not empty.
    """
    layers = list(layers)
    if not layers:
        return
    listed = "; ".join(f"{name} ({cls}: {why})" for name, cls, why in layers)
    names = "|".join(re.escape(name) for name, _, _ in layers)
    raise UserError(
        f"{len(layers)} layer(s) cannot be quantized: {listed}. Replace them with supported "
        f"layers, or keep them in float (not full-integer; conversion then needs "
        f"calibration data) with a first rule: [[policy.rules]] layers = '^({names})$' "
        f"float = true")


def uniform(weight_bits: int = 8, activation_bits: int = 8,
            weight_quantizer: str = "per_channel",
            activation_quantizer: str = "moving_average", lsq_init: str = "mse",
            head_weights: str = "per_tensor") -> PolicyConfig:
    """A policy with no rules: every layer gets the same scheme."""
    return PolicyConfig(default=RuleConfig(
        weight_bits=weight_bits, activation_bits=activation_bits,
        weight_quantizer=weight_quantizer, activation_quantizer=activation_quantizer,
        lsq_init=lsq_init), head_weights=head_weights)


def mixed_precision(first: str, last: str, low_bits: int = 4,
                    base: PolicyConfig | None = None) -> PolicyConfig:
    """First and last layers at 8-bit weights, every other layer at ``low_bits`` weights.

    Args:
      first: name of the first weighted layer.
      last: name of the last weighted layer.
      low_bits: weight bits for the rest.
      base: supplies the quantizer kinds (default: ``uniform()``).
    """
    base = base or uniform()
    edge = dataclasses.replace(base.default, layers=f"^({re.escape(first)}|{re.escape(last)})$",
                               weight_bits=8)
    rest = dataclasses.replace(base.default, weight_bits=low_bits)
    return PolicyConfig(rules=(*base.rules, edge), default=rest,
                        head_weights=base.head_weights)
