"""The README's two set-up lines and its quoted results stay true to the repository."""

import importlib.util
import re

from tests.conftest import ROOT

_spec = importlib.util.spec_from_file_location("readme", ROOT / "benchmarks" / "readme.py")
_readme = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_readme)
splice = _readme.splice

README = (ROOT / "README.md").read_text()


def test_two_setup_lines_run_the_pipeline_and_the_tests():
    blocks = re.findall(r"```sh\n(.*?)\n```", README, flags=re.S)
    assert "pip install -e . && python -m edgeqat.pipeline" in blocks[0]
    assert "pip install -e '.[dev]' && python -m pytest -q" in blocks[1]
    ci = (ROOT / ".ci" / "run").read_text()
    assert blocks[1].split("&& ", 1)[1] in ci  # CI runs the README's test line


def test_results_quoted_are_the_benchmark_files():
    assert splice(README, ROOT / "benchmarks" / "results") == README, \
        "README results differ from benchmarks/results: run python benchmarks/readme.py"


def test_linked_docs_exist():
    for link in re.findall(r"\]\(((?:docs|benchmarks)/[^)#]+)\)", README):
        assert (ROOT / link).is_file(), link
