import dataclasses
import tomllib
from pathlib import Path

import pytest

from edgeqat import config
from edgeqat.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("path", sorted((ROOT / "pipelines").glob("*.toml")), ids=str)
def test_every_shipped_pipeline_loads(path):
    cfg = config.load_pipeline(path)
    assert cfg.name == path.stem
    assert cfg.source == str(path)


@pytest.mark.parametrize("path", sorted((ROOT / "devices").glob("*.toml")), ids=str)
def test_every_shipped_device_loads(path):
    dev = config.load_device(path)
    assert dev.name == path.stem


def test_defaults_exist():
    assert config.DEFAULT_PIPELINE.is_file()
    assert config.DEFAULT_DEVICE.is_file()


@pytest.mark.parametrize(
    "text, message",
    [
        ("[data]\nnme = 'digits'\n", "unknown key 'data.nme'; allowed here: calibration_samples"),
        ("[data]\nname = 'imagenet'\n",
         "data.name = 'imagenet' is not one of: digits, mnist1d, npz"),
        ("seed = 'one'\n", "seed = 'one' must be an integer"),
        ("[qat]\nepochs = 1.5\n", "qat.epochs = 1.5 must be an integer"),
        ("[qat]\nepochs = -1\n", "qat.epochs = -1 must be 0 or more"),
        ("data = 3\n", "[data] must be a table"),
        ("[data]\nname = 'npz'\n", "data.path is required when data.name = 'npz'"),
        ("[[policy.rules]]\nlayers = '('\n", "policy.rules[0].layers is not a valid regex"),
        ("[convert]\nmode = 'int2'\n", "convert.mode = 'int2' is not one of: int8, int16x8"),
        ("[convert]\nmode = 'int16x8'\n",
         "policy.default.activation_bits = 8 but convert.mode = 'int16x8'"),
        ("name = \n", "malformed TOML"),
        ("[model]\nbatch_size = true\n", "model.batch_size = True must be an integer"),
        ("mode = 'auto'\n[convert]\nmode = 'int4_weights'\n",
         "convert.mode = 'int4_weights' but mode = 'auto' starts from int8"),
    ],
)
def test_bad_pipeline_names_file_and_key(write_toml, text, message):
    path = write_toml(text)
    with pytest.raises(ConfigError) as e:
        config.load_pipeline(path)
    assert str(e.value).startswith(str(path))
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_missing_file():
    with pytest.raises(ConfigError, match="nope.toml: pipeline file not found"):
        config.load_pipeline("nope.toml")


def test_int_accepted_for_float(write_toml):
    cfg = config.load_pipeline(write_toml("[qat]\nlearning_rate = 1\n"))
    assert cfg.qat.learning_rate == 1.0 and isinstance(cfg.qat.learning_rate, float)


def test_relative_paths_resolve_against_the_file(write_toml, tmp_path):
    cfg = config.load_pipeline(write_toml("[data]\nname = 'npz'\npath = 'd.npz'\n"))
    assert cfg.data.path == str(tmp_path / "d.npz")


def test_configs_are_frozen():
    cfg = config.PipelineConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.seed = 3


@pytest.mark.parametrize("path", sorted((ROOT / "pipelines").glob("*.toml")), ids=str)
def test_to_toml_round_trips(path):
    cfg = config.load_pipeline(path)
    again = config.from_table(config.PipelineConfig, tomllib.loads(config.to_toml(cfg)), "",
                               "x")
    assert dataclasses.replace(again, source=cfg.source) == cfg


def test_device_ssh_needs_host(write_toml):
    path = write_toml("[connection]\nkind = 'ssh'\n", "d.toml")
    with pytest.raises(ConfigError, match="connection.host is required"):
        config.load_device(path)
