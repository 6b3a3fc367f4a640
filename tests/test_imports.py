"""The package's dependencies point one way: no import cycle among edgeqat modules (at any
depth, function-level imports included) and no private name used across modules.

Read from the source with ``ast``; nothing is imported.
"""

from __future__ import annotations

import ast

from tests.conftest import ROOT

PACKAGE = ROOT / "edgeqat"


def _modules() -> dict[str, ast.Module]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = ast.parse(path.read_text(), str(path))
    return out


MODULES = _modules()


def _edges(name: str, tree: ast.Module) -> tuple[set[str], list[str]]:
    """(edgeqat modules ``name`` imports, private names it takes from other modules)."""
    deps, private, aliases = set(), [], {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and \
                node.module.split(".")[0] == "edgeqat":
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                if sub in MODULES:
                    deps.add(sub)
                    aliases[a.asname or a.name] = sub
                else:
                    deps.add(node.module)
                    if a.name.startswith("_") and not a.name.startswith("__"):
                        private.append(f"{name} imports {node.module}.{a.name}")
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name in MODULES:
                    deps.add(a.name)
                    aliases[a.asname or a.name] = a.name
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and \
                node.value.id in aliases and node.attr.startswith("_") and \
                not node.attr.startswith("__"):
            private.append(f"{name} uses {aliases[node.value.id]}.{node.attr}")
    deps.discard(name)
    deps.discard("edgeqat")
    return deps, private


GRAPH = {name: _edges(name, tree)[0] for name, tree in MODULES.items()}


def _cycle_from(start: str) -> list[str] | None:
    stack, seen = [(start, [start])], set()
    while stack:
        node, path = stack.pop()
        for dep in sorted(GRAPH.get(node, ())):
            if dep == start:
                return [*path, start]
            if dep not in seen:
                seen.add(dep)
                stack.append((dep, [*path, dep]))
    return None


def test_no_import_cycle():
    cycles = [c for c in (_cycle_from(m) for m in sorted(GRAPH)) if c]
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_no_private_name_crosses_a_module():
    private = [p for name, tree in MODULES.items() for p in _edges(name, tree)[1]]
    assert not private, private


def test_the_harness_depends_on_config_and_errors_only():
    """The device side (runner, transports) must not pull in TensorFlow-side modules."""
    allowed = {"edgeqat.config", "edgeqat.errors", "edgeqat.edgetpu"}
    for name, deps in GRAPH.items():
        if name.startswith("edgeqat.harness"):
            outside = {d for d in deps if not d.startswith("edgeqat.harness")} - allowed
            assert not outside, f"{name} imports {sorted(outside)}"


def test_the_checker_sees_a_cycle():
    GRAPH["edgeqat.errors"].add("edgeqat.config")  # config -> errors already
    try:
        assert _cycle_from("edgeqat.config") is not None
    finally:
        GRAPH["edgeqat.errors"].discard("edgeqat.config")


def test_tests_use_public_names_only():
    """The tests reach edgeqat through public names: a private one is free to change."""
    private = []
    for path in sorted((ROOT / "tests").rglob("*.py")):
        private += _edges(f"tests.{path.stem}", ast.parse(path.read_text(), str(path)))[1]
    assert not private, private
