"""Keras 3 .keras files in: rebuilt as tf_keras, same outputs, through the whole pipeline.

The fixtures are real Keras 3 files made by ``tests/fixtures/keras3/make_fixtures.py``
(versions in ``versions.json``), with Keras 3's own outputs stored beside them.
"""

import json
import shutil
import zipfile

import numpy as np
import pytest

from edgeqat import keras3_import, models
from edgeqat.errors import UserError
from edgeqat.keras import keras
from tests.conftest import ROOT

FIXTURES = ROOT / "tests" / "fixtures" / "keras3"
KINDS = {"cnn_bn": "digits", "conv1d": "mnist1d", "rescaling": "digits"}
TOLERANCE = 1e-5  # max abs difference from Keras 3's stored outputs (float32 logits)


def test_fixtures_record_their_keras_version():
    versions = json.loads((FIXTURES / "versions.json").read_text())
    for kind in KINDS:
        assert keras3_import.keras3_version(FIXTURES / f"{kind}.keras") == versions["keras"]


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_import_reproduces_keras3_outputs(kind):
    imported = keras3_import.import_keras3(FIXTURES / f"{kind}.keras")
    assert isinstance(imported.model, keras.Model)  # tf_keras, not Keras 3
    stored = np.load(FIXTURES / f"{kind}.npz")
    got = imported.model.predict(stored["x"], verbose=0)
    diff = float(np.abs(got - stored["y"]).max())
    print(f"{kind}: max abs difference from Keras 3 {diff:.3g}")
    assert diff <= TOLERANCE, f"{kind}: max abs difference {diff:.3g} > {TOLERANCE}"
    config = json.loads(zipfile.ZipFile(FIXTURES / f"{kind}.keras").read("config.json"))
    names = [s["config"]["name"] for s in config["config"]["layers"]
             if s["class_name"] != "InputLayer"]
    assert [layer.name for layer in imported.model.layers
            if not isinstance(layer, keras.layers.InputLayer)] == names


def test_load_model_routes_keras3_files():
    model = models.load_model(FIXTURES / "conv1d.keras")
    assert isinstance(model, keras.Model) and model.output_shape == (None, 10)


def _edited(tmp_path, kind, edit):
    """A copy of a fixture whose config.json went through ``edit``."""
    src = zipfile.ZipFile(FIXTURES / f"{kind}.keras")
    out = tmp_path / f"edited_{kind}.keras"
    with zipfile.ZipFile(out, "w") as dst:
        for name in src.namelist():
            data = src.read(name)
            if name == "config.json":
                config = json.loads(data)
                edit(config["config"]["layers"])
                data = json.dumps(config)
            dst.writestr(name, data)
    return out


def test_untranslatable_layers_are_each_named(tmp_path):
    def edit(layers):
        by_name = {s["config"]["name"]: s for s in layers}
        by_name["conv_1_relu"]["class_name"] = "LSTM"
        by_name["flatten"]["module"] = "my_package.layers"
        by_name["flatten"]["registered_name"] = "Custom>Flatten"

    path = _edited(tmp_path, "conv1d", edit)
    with pytest.raises(UserError) as e:
        keras3_import.import_keras3(path)
    msg = str(e.value)
    assert "2 layer(s) edgeqat cannot translate" in msg
    assert "'conv_1_relu' (LSTM): no tf_keras translation" in msg
    assert "'flatten' (Flatten): a custom layer (module 'my_package.layers')" in msg


def test_keras3_option_without_tf_keras_equivalent(tmp_path):
    def edit(layers):
        next(s for s in layers if s["config"]["name"] == "logits")["config"]["lora_rank"] = 4

    with pytest.raises(UserError, match="'logits' \\(Dense\\) cannot be translated to "
                                        "tf_keras: Keras 3 option lora_rank = 4"):
        keras3_import.import_keras3(_edited(tmp_path, "conv1d", edit))


def test_tf_keras_files_are_not_keras3(tmp_path):
    m = models.mlp((4,), 3)
    m.save(tmp_path / "m.keras")
    assert keras3_import.keras3_version(tmp_path / "m.keras") is None
    assert keras3_import.keras3_version(FIXTURES / "make_fixtures.py") is None


@pytest.mark.slow
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_keras3_file_runs_the_whole_pipeline(kind, write_toml, tmp_path):
    from edgeqat.config import DEFAULT_DEVICE, load_device, load_pipeline
    from edgeqat.pipeline import run

    shutil.copy(FIXTURES / f"{kind}.keras", tmp_path / "model.keras")
    cfg = load_pipeline(write_toml(f"""
        name = "k3_{kind}"
        seed = 0
        [data]
        name = "{KINDS[kind]}"
        calibration_samples = 64
        eval_samples = 100
        [model]
        path = "model.keras"
        epochs = 0
        [qat]
        epochs = 1
        [diagnostics]
        enabled = false
        [validate]
        latency_runs = 2
        warmup_runs = 1
        max_accuracy_drop = 1.0
        """))
    result = run(cfg, load_device(DEFAULT_DEVICE))
    r = result.report
    assert r["ops"]["full_integer"] is True
    assert r["model"]["imported_from"] == "Keras " + json.loads(
        (FIXTURES / "versions.json").read_text())["keras"]
    assert r["accuracy"]["float_keras"] > 0.3  # trained Keras 3 weights (chance: 0.1)
    assert r["accuracy"][f"qat_{cfg.convert.mode}"] > 0.3
    from edgeqat.report import to_markdown

    assert "imported from Keras 3." in to_markdown(r)
