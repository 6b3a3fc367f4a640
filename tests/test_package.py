"""The wheel, installed outside the checkout, runs the pipeline from any directory.

The wheel is built from a copy of the repository without build isolation (offline), and
installed with ``--no-deps`` into a fresh virtual environment that sees this
environment's third-party packages through a ``.pth`` line (so nothing is downloaded and
TensorFlow is not installed twice). That line adds the directory only: the ``.pth`` files
inside it, among them this checkout's editable install, are not processed, so
``import edgeqat`` there can only find the wheel.
"""

import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tests.conftest import ROOT

_SKIP = shutil.ignore_patterns(".git", ".venv", "runs", "build", "*.egg-info", "__pycache__",
                               ".pytest_cache", ".ruff_cache", ".cache")


# The cheapest run that still goes through every stage: an MLP on the digits.
SMALLEST_PIPELINE = """
name = "smallest"
[data]
name = "digits"
calibration_samples = 32
eval_samples = 60
[model]
builder = "mlp"
epochs = 2
[qat]
epochs = 1
[diagnostics]
enabled = false
[validate]
latency_runs = 2
warmup_runs = 1
max_accuracy_drop = 1.0
"""


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(python of a fresh venv with only the wheel's edgeqat, a directory outside the repo)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=_SKIP)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-index",
                    "--no-build-isolation", "-w", str(tmp / "dist"), str(src)], check=True)
    (wheel,) = (tmp / "dist").glob("edgeqat-*.whl")
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    # The fresh venv's own pip: this environment's pip with --prefix would first uninstall
    # the edgeqat installed here (the editable checkout).
    subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-index",
                    str(wheel)], check=True)
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                          capture_output=True, text=True, check=True).stdout.strip()
    (Path(site) / "edgeqat_test_deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    elsewhere = tmp / "elsewhere"
    elsewhere.mkdir()
    return python, elsewhere


def _run(python, cwd, *args):
    return subprocess.run([str(python), *args], capture_output=True, text=True, cwd=cwd,
                          timeout=600)


def test_wheel_ships_the_reference_files(installed):
    python, cwd = installed
    p = _run(python, cwd, "-c", "\n".join([
        "import edgeqat, edgeqat.config as c",
        "from edgeqat.pipeline import resolve_configs",
        "cfg, dev = resolve_configs('mnist1d_lsq_int4', 'rpi4_emulated')",
        "print(edgeqat.__file__); print(c.PIPELINES_DIR); print(c.DEVICES_DIR)",
        "print(cfg.name, dev.name)",
    ]))
    assert p.returncode == 0, p.stderr
    module, pipelines, devices, names = p.stdout.split("\n")[:4]
    venv = str(python.parent.parent)
    assert module.startswith(venv) and pipelines.startswith(venv) and devices.startswith(venv)
    assert names == "mnist1d_lsq_int4 rpi4_emulated"
    shipped = Path(pipelines).parent
    for folder in ("pipelines", "devices"):
        ours = sorted(p.name for p in (ROOT / folder).glob("*.toml"))
        assert sorted(p.name for p in (shipped / folder).glob("*.toml")) == ours
        for name in ours:
            assert (shipped / folder / name).read_bytes() == (ROOT / folder / name).read_bytes()


def test_wheel_cli_help_and_errors(installed):
    python, cwd = installed
    p = _run(python, cwd, "-m", "edgeqat.pipeline", "--help")
    assert "--pipeline: Pipeline TOML file" in p.stdout, p.stdout + p.stderr  # absl: exit 1
    p = _run(python, cwd, "-m", "edgeqat.pipeline", "--pipeline", "no_such_pipeline")
    assert p.returncode == 2 and "edgeqat: error:" in p.stderr, p.stderr


@pytest.mark.slow
def test_wheel_runs_a_pipeline_from_elsewhere(installed):
    """A small pipeline file in a directory outside the repository, on the shipped
    ``local_cpu`` profile named by name, through the wheel's runner."""
    python, cwd = installed
    (cwd / "tiny.toml").write_text(SMALLEST_PIPELINE)
    p = _run(python, cwd, "-m", "edgeqat.pipeline", "--pipeline", "tiny.toml",
             "--device", "local_cpu", "--output_dir", "out")
    assert p.returncode == 0, p.stderr[-3000:]
    assert (cwd / "out" / "qat_int8.tflite").is_file(), p.stderr[-3000:]
    assert 'name = "local_cpu"' in (cwd / "out" / "device.toml").read_text()
