"""Auto mode: stops after PTQ when it meets the budget; otherwise QAT, then more precision."""

import dataclasses

import pytest

from edgeqat import auto, pipeline
from edgeqat.config import AutoConfig, PtqConfig, load_device, load_pipeline
from edgeqat.data import load_dataset
from edgeqat.keras import keras
from edgeqat.models import build_model
from edgeqat.train import train_float
from tests.conftest import TINY_PIPELINE

AUTO = TINY_PIPELINE.replace('seed = 1', 'seed = 1\nmode = "auto"')
# Clipping every activation at its 60th percentile wrecks PTQ (but not QAT): a pipeline
# whose PTQ misses any budget, without waiting for a model that happens to be fragile.
BROKEN_PTQ = PtqConfig(calibration="percentile", percentile=60.0)


@pytest.fixture(scope="module")
def trained():
    cfg = load_pipeline_text(AUTO)
    keras.utils.set_random_seed(cfg.seed)
    data = load_dataset(cfg.data, cfg.seed)
    model = build_model(cfg.model, data.input_shape, data.num_classes)
    return cfg, data, train_float(model, data, cfg.model)


def load_pipeline_text(text, tmp=[]):  # noqa: B006 - one temp dir per module is enough
    import tempfile
    from pathlib import Path

    if not tmp:
        tmp.append(Path(tempfile.mkdtemp(prefix="edgeqat-auto-")))
    path = tmp[0] / "auto.toml"
    path.write_text(text)
    return load_pipeline(path)


@pytest.mark.slow
def test_auto_stops_after_ptq_when_it_meets_the_budget(tmp_path):
    cfg = load_pipeline_text(AUTO.replace("max_accuracy_drop = 1.0", "max_accuracy_drop = 0.05"))
    result = pipeline.run(cfg, load_device())
    a = result.report["auto"]
    assert [d["step"] for d in a["decisions"]] == ["ptq_int8"]
    assert a["chosen"] == "ptq_int8" and a["within_budget"] and a["missed_by"] == 0.0
    d = a["decisions"][0]
    assert d["drop"] <= 0.05 and d["seconds"] > 0 and d["full_integer"]
    assert result.qat_model is None and "qat_int8" not in result.tflites
    assert result.report["budget"]["shipped"] == "ptq_int8"
    assert result.report["ops"]["full_integer"]
    out = pipeline.write_outputs(result, tmp_path / "run")
    names = {p.name for p in out.iterdir()}
    assert {"report.html", "report.md", "ptq_int8.tflite"} <= names
    assert "qat_model" not in names
    md = (out / "report.md").read_text()
    assert "## Auto mode" in md
    # The same report sections as a QAT-mode run: one flow produced both.
    assert result.report["edgetpu"]["summary"] and "Edge TPU pre-check" in md
    assert result.report["ops"]["storage"]["constants"]


@pytest.mark.slow
def test_auto_runs_qat_when_ptq_misses(trained):
    cfg, data, model = trained
    cfg = dataclasses.replace(cfg, ptq=BROKEN_PTQ,
                              validate=dataclasses.replace(cfg.validate,
                                                           max_accuracy_drop=0.02))
    r = auto.choose(cfg, data, model)
    steps = [d.step for d in r.decisions]
    assert steps[:2] == ["ptq_int8", "qat_int8"]
    assert not r.decisions[0].within_budget and r.decisions[0].drop > 0.02
    if r.decisions[1].within_budget:  # QAT recovers: it ships, nothing more is tried
        assert steps == ["ptq_int8", "qat_int8"] and r.chosen == "qat_int8"
        assert r.missed_by == 0.0
    else:
        assert r.missed_by > 0 or r.chosen != "qat_int8"


@pytest.mark.slow
def test_auto_tries_16x8_before_float_layers(trained):
    cfg, data, model = trained
    cfg = dataclasses.replace(cfg, ptq=BROKEN_PTQ, auto=AutoConfig(qat=False, float_layers=1),
                              validate=dataclasses.replace(cfg.validate,
                                                           max_accuracy_drop=0.05))
    r = auto.choose(cfg, data, model)
    steps = [d.step for d in r.decisions]
    assert steps[:2] == ["ptq_int8", "ptq_int16x8"]
    if r.decisions[1].within_budget:  # 16x8 uses the converter's min/max ranges
        assert steps == ["ptq_int8", "ptq_int16x8"] and r.chosen == "ptq_int16x8"


@pytest.mark.slow
def test_auto_raises_precision_then_says_how_much_it_missed(trained):
    cfg, data, model = trained
    cfg = dataclasses.replace(cfg, ptq=BROKEN_PTQ,
                              auto=AutoConfig(qat=False, int16_activations=False,
                                              float_layers=2),
                              validate=dataclasses.replace(cfg.validate,
                                                           max_accuracy_drop=0.0))
    r = auto.choose(cfg, data, model)
    steps = [d.step for d in r.decisions]
    assert steps[:3] == ["ptq_int8", "sensitivity", "mixed_float_1"]
    mixed = [d for d in r.decisions if d.step.startswith("mixed_float")]
    assert all(not d.full_integer for d in mixed)
    assert all(d.seconds >= 0 for d in r.decisions)
    ranked = r.sensitivity.layers
    assert len(ranked) >= 5 and "with " + ranked[0].layer + " in float" in mixed[0].action
    d = r.to_dict()
    if d["within_budget"]:
        assert r.decisions[-1].within_budget and r.chosen == steps[-1]
    else:  # out of options: the most accurate candidate ships, the miss is measured
        tried = [x for x in r.decisions if x.accuracy is not None]
        best = max(x.accuracy for x in tried)
        chosen = next(x for x in tried if x.step == r.chosen)
        assert chosen.accuracy == best
        assert d["missed_by"] == pytest.approx(chosen.drop - 0.0) and d["missed_by"] > 0
