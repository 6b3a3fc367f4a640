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


def test_dense_weights_are_per_tensor_unless_asked():
    """An 8-bit Dense under a per_channel rule stores per-tensor weights (a
    FULLY_CONNECTED, as tfmot) unless ``dense_weights = "per_channel"``; other classes,
    LSQ and lower bit widths keep theirs."""
    default = policy.uniform()
    assert policy.resolve(default, "logits", "Dense").weight_quantizer == "per_tensor"
    assert policy.resolve(default, "conv", "Conv2D").weight_quantizer == "per_channel"
    assert policy.resolve(default, "dw", "DepthwiseConv2D").weight_quantizer == "per_channel"
    assert policy.resolve(policy.uniform(weight_quantizer="lsq"), "logits",
                          "Dense").weight_quantizer == "lsq"
    assert policy.resolve(policy.uniform(weight_bits=4), "logits",
                          "Dense").weight_quantizer == "per_channel"  # 4 bits: per channel
    asked = policy.uniform(dense_weights="per_channel")
    assert policy.resolve(asked, "logits", "Dense").weight_quantizer == "per_channel"
    mixed = policy.mixed_precision("conv_0", "logits", base=asked)
    assert policy.resolve(mixed, "logits", "Dense").weight_quantizer == "per_channel"


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
dense_weights = "per_channel"
[policy.default]
activation_quantizer = "percentile"
"""))
    assert cfg.policy.dense_weights == "per_channel"
    assert len(cfg.policy.rules) == 2
    assert cfg.policy.rules[1].weight_quantizer == "lsq"
    assert cfg.policy.default.activation_quantizer == "percentile"


@pytest.mark.parametrize("body,match", [
    ("[[policy.rules]]\nweight_quantizer = 'log2'", "not one of"),
    ("[[policy.rules]]\nlayers = '('", "not a valid regex"),
    ("[[policy.rules]]\nweight_bits = 12", "2..8"),
    ("[policy.default]\nactivation_bits = 1", "2..16"),
    ("[[policy.rules]]\nbits = 4", "unknown key"),
    ("[policy]\ndense_weights = 'per_row'", "not one of"),
])
def test_toml_rule_errors(tmp_path, body, match):
    with pytest.raises(ConfigError, match=match):
        load_pipeline(write(tmp_path, body))
