"""The Bazel BUILD file parses as Starlark and names every source, test and benchmark.

Bazel cannot fetch rules_python offline here, so the file is evaluated with stand-ins for
Bazel's built-ins: the same syntax check Bazel's loader does, plus a coverage check.
"""

import ast
from pathlib import Path

from tests.conftest import ROOT

FORBIDDEN = (ast.FunctionDef, ast.ClassDef, ast.While, ast.Import, ast.ImportFrom,
             ast.Try, ast.Lambda, ast.With, ast.Global)


def _glob(patterns, exclude=(), allow_empty=False):
    found = set()
    for pattern in patterns:
        found |= {str(p.relative_to(ROOT)) for p in ROOT.glob(pattern) if p.is_file()}
    for pattern in exclude:
        found -= {str(p.relative_to(ROOT)) for p in ROOT.glob(pattern)}
    assert found or allow_empty, f"glob({patterns}) matched nothing"
    return sorted(found)


def _evaluate_build():
    text = (ROOT / "BUILD").read_text()
    tree = ast.parse(text, "BUILD")
    bad = [type(n).__name__ for n in ast.walk(tree) if isinstance(n, FORBIDDEN)]
    assert not bad, f"BUILD uses constructs Starlark BUILD files forbid: {bad}"
    targets = {}

    def rule(kind):
        def make(name, **kwargs):
            assert name not in targets, f"duplicate target {name}"
            targets[name] = (kind, kwargs)
        return make

    env = {
        "load": lambda label, *symbols: None,
        "package": lambda **kw: None,
        "glob": _glob,
        "requirement": lambda name: f"@pip//{name}",
        "py_library": rule("py_library"),
        "py_binary": rule("py_binary"),
        "py_test": rule("py_test"),
        "__builtins__": {"len": len, "str": str},
    }
    exec(compile(tree, "BUILD", "exec"), env)  # noqa: S102 - our own checked-in file
    return targets


def test_build_names_every_python_file():
    targets = _evaluate_build()
    named = {src for _, kw in targets.values() for src in kw.get("srcs", [])}
    files = {str(p.relative_to(ROOT)) for folder in ("edgeqat", "tests", "benchmarks")
             for p in (ROOT / folder).rglob("*.py")}
    assert files - named == set(), "files no BUILD target names"
    assert named - files == set(), "BUILD names files that do not exist"


def test_each_test_file_has_its_own_py_test():
    targets = _evaluate_build()
    tests = {kw["srcs"][0] for kind, kw in targets.values() if kind == "py_test"}
    for path in (ROOT / "tests").rglob("test_*.py"):
        assert str(path.relative_to(ROOT)) in tests
    assert all(len(kw["srcs"]) == 1 for kind, kw in targets.values() if kind == "py_test")


def test_cli_and_runner_binaries():
    targets = _evaluate_build()
    assert targets["pipeline"][1]["main"] == "edgeqat/pipeline.py"
    assert targets["runner"][1]["main"] == "edgeqat/harness/runner.py"


def test_module_and_requirements_agree():
    reqs = {line.split("==")[0] for line in (ROOT / "requirements.txt").read_text().splitlines()
            if line and not line.startswith("#")}
    build = (ROOT / "BUILD").read_text()
    for name in reqs - {"pytest"}:
        assert f'requirement("{name}")' in build, name
    assert 'requirements_lock = "//:requirements.txt"' in Path(ROOT / "MODULE.bazel").read_text()
