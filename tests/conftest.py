"""Shared fixtures: small pipeline files and the repository paths."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def write_toml(tmp_path):
    """Writes a TOML text (dedented) into tmp_path and returns its path."""

    def write(text: str, name: str = "p.toml") -> Path:
        path = tmp_path / name
        path.write_text(textwrap.dedent(text))
        return path

    return write


TINY_PIPELINE = """
name = "tiny"
seed = 1
[data]
name = "digits"
calibration_samples = 64
eval_samples = 120
[model]
builder = "dscnn"
epochs = 3
batch_size = 64
learning_rate = 5e-3
[qat]
epochs = 1
batch_size = 64
[validate]
latency_runs = 5
warmup_runs = 1
max_accuracy_drop = 1.0
"""


@pytest.fixture
def tiny_pipeline(write_toml) -> Path:
    return write_toml(TINY_PIPELINE, "tiny.toml")
