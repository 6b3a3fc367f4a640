"""The command line as a user meets it: bad input is one line, exit 2, nothing written."""

import subprocess
import sys

import pytest

from tests.conftest import ROOT


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "edgeqat.pipeline", *args],
                          capture_output=True, text=True, cwd=cwd or ROOT)


def _assert_one_line_error(p, *fragments):
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr
    errors = [line for line in p.stderr.splitlines() if line.startswith("edgeqat: error:")]
    assert len(errors) == 1, p.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


@pytest.mark.parametrize("toml, fragments", [
    (None, ("missing.toml: pipeline file not found",)),
    ("name = [\n", ("p.toml: malformed TOML",)),
    ("[qat]\nepochz = 3\n", ("p.toml: unknown key 'qat.epochz'", "allowed here: batch_size")),
    ("[data]\nname = 'cifar'\n", ("data.name = 'cifar' is not one of: digits, mnist1d, npz",)),
])
def test_bad_pipeline_file(write_toml, tmp_path, toml, fragments):
    path = write_toml(toml) if toml is not None else tmp_path / "missing.toml"
    out = tmp_path / "out"
    p = run_cli("--pipeline", str(path), "--output_dir", str(out))
    _assert_one_line_error(p, *fragments)
    assert not out.exists()


@pytest.mark.slow
@pytest.mark.parametrize("toml, fragments", [
    ("[model]\nbuilder = 'resnet9000'\n", ("model.builder = 'resnet9000' is unknown",)),
    ("[model]\npath = 'weights.h5'\n", ("weights.h5: not a loadable Keras model",)),
])
def test_bad_model(write_toml, tmp_path, toml, fragments):
    (tmp_path / "weights.h5").write_text("this is not HDF5")
    out = tmp_path / "out"
    p = run_cli("--pipeline", str(write_toml(toml)), "--output_dir", str(out))
    _assert_one_line_error(p, *fragments)
    assert not out.exists()
    assert list(tmp_path.glob(".out*")) == []


def test_bad_device_and_flags(tmp_path, write_toml):
    dev = write_toml("runtime = 'onnx'\n", "dev.toml")
    p = run_cli("--device", str(dev), "--output_dir", str(tmp_path / "o"))
    _assert_one_line_error(p, "dev.toml: runtime = 'onnx' is not one of: auto, ai_edge_litert")
    _assert_one_line_error(run_cli("--epoch", "3"), "Unknown command line flag 'epoch'")
    _assert_one_line_error(run_cli("stray"), "unexpected argument 'stray'")
