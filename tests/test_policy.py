"""Policy rules: first match wins, default, mixed precision, TOML loading, errors."""

import pytest

from edgeqat import policy
from edgeqat.config import ConfigError, PolicyConfig, RuleConfig, load_pipeline
from edgeqat.errors import UserError

RULES = PolicyConfig(
    rules=(RuleConfig(layers="^conv_0$", weight_bits=8, activation_quantizer="relu6"),
           RuleConfig(classes="Dense", float=True),
           RuleConfig(layers="conv_.*", weight_bits=4, weight_quantizer="lsq")),
    default=RuleConfig(activation_quantizer="pact"))


@pytest.mark.parametrize("name,cls,rule,bits,act,is_float", [
    ("conv_0", "Conv2D", 0, 8, "relu6", False),
    ("conv_3", "Conv2D", 2, 4, "moving_average", False),
    ("head", "Dense", 1, 8, "moving_average", True),
    ("conv_9", "Dense", 1, 8, "moving_average", True),  # first match wins
    ("pool", "GlobalAveragePooling2D", None, 8, "pact", False),
])
def test_first_match_wins(name, cls, rule, bits, act, is_float):
    spec = policy.resolve(RULES, name, cls)
    assert (spec.rule, spec.weight_bits, spec.activation_quantizer, spec.float) == (
        rule, bits, act, is_float)


def test_regex_is_a_full_match():
    assert policy.resolve(RULES, "xconv_0", "Conv2D").rule is None  # no rule fully matches
    assert policy.resolve(RULES, "conv_0_bn", "Conv2D").rule == 2


def test_mixed_precision_first_and_last_8bit():
    p = policy.mixed_precision("conv_0", "logits", low_bits=4)
    assert policy.resolve(p, "conv_0", "Conv2D").weight_bits == 8
    assert policy.resolve(p, "logits", "Dense").weight_bits == 8
    assert policy.resolve(p, "conv_1", "Conv2D").weight_bits == 4


def test_the_classifier_head_is_per_tensor_unless_asked():
    """An 8-bit Dense head under a per_channel rule stores per-tensor weights (a
    FULLY_CONNECTED, as tfmot) unless ``head_weights = "per_channel"``; inner Dense
    layers (a transformer's MLP, ConvNeXt's pointwise convolutions with LayerScale folded
    in), other classes, LSQ and lower bit widths keep theirs."""
    default = policy.uniform()
    assert policy.resolve(default, "logits", "Dense", head=True).weight_quantizer == "per_tensor"
    assert policy.resolve(default, "mlp", "Dense").weight_quantizer == "per_channel"
    assert policy.resolve(default, "conv", "Conv2D", head=True).weight_quantizer == "per_channel"
    assert policy.resolve(policy.uniform(weight_quantizer="lsq"), "logits", "Dense",
                          head=True).weight_quantizer == "lsq"
    assert policy.resolve(policy.uniform(weight_bits=4), "logits", "Dense",
                          head=True).weight_quantizer == "per_channel"  # 4 bits
    asked = policy.uniform(head_weights="per_channel")
    assert policy.resolve(asked, "logits", "Dense", head=True).weight_quantizer == "per_channel"
    mixed = policy.mixed_precision("conv_0", "logits", base=asked)
    assert policy.resolve(mixed, "logits", "Dense", head=True).weight_quantizer == "per_channel"


def test_classifier_heads_are_found_through_activations():
    from edgeqat.annotate import classifier_heads
    from edgeqat.keras import keras

    inp = keras.Input((8,))
    h = keras.layers.Dense(4, name="inner")(inp)
    a = keras.layers.Dense(3, name="head_a")(h)
    b = keras.layers.Softmax(name="soft")(keras.layers.Dense(3, name="head_b")(h))
    c = keras.layers.Activation("relu", name="act")(keras.layers.Dense(2, name="head_c")(h))
    assert classifier_heads(keras.Model(inp, [a, b, c])) == {"head_a", "head_b", "head_c"}


def test_unsupported_lists_every_layer_and_the_rule():
    with pytest.raises(UserError) as e:
        policy.report_unsupported([("lstm", "LSTM", "no config"), ("f", "Lambda", "no config")])
    msg = str(e.value)
    assert "lstm (LSTM" in msg and "f (Lambda" in msg
    assert "layers = '^(lstm|f)$'" in msg and "float = true" in msg
    policy.report_unsupported([])  # nothing to report: no error


def write(tmp_path, text):
    p = tmp_path / "p.toml"
    p.write_text(text)
    return p


def test_toml_rules_load(tmp_path):
    cfg = load_pipeline(write(tmp_path, """
[[policy.rules]]
layers = '^conv_0$'
weight_bits = 8
[[policy.rules]]
layers = '.*'
weight_bits = 4
weight_quantizer = "lsq"
activation_quantizer = "lsq"
[policy]
head_weights = "per_channel"
[policy.default]
activation_quantizer = "percentile"
"""))
    assert cfg.policy.head_weights == "per_channel"
    assert len(cfg.policy.rules) == 2
    assert cfg.policy.rules[1].weight_quantizer == "lsq"
    assert cfg.policy.default.activation_quantizer == "percentile"


@pytest.mark.parametrize("body,match", [
    ("[[policy.rules]]\nweight_quantizer = 'log2'", "not one of"),
    ("[[policy.rules]]\nlayers = '('", "not a valid regex"),
    ("[[policy.rules]]\nweight_bits = 12", "2..8"),
    ("[policy.default]\nactivation_bits = 1", "2..16"),
    ("[[policy.rules]]\nbits = 4", "unknown key"),
    ("[policy]\nhead_weights = 'per_row'", "not one of"),
])
def test_toml_rule_errors(tmp_path, body, match):
    with pytest.raises(ConfigError, match=match):
        load_pipeline(write(tmp_path, body))
