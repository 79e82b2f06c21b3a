"""The layer rules of docs/ARCHITECTURE.md, read from the source (every import, including the
ones inside functions):

- variants import only core, registry and ops from the package;
- ops import only core and other ops (no variant, no registry);
- core imports nothing of the package (the files of the core/ package import only each other);
- nn imports only core and registry (a core is built by name, never a variant's module);
- train imports only core, nn, parallel, tasks and report (never a variant, an op or an experiment);
- the library never imports the sweeps or the experiments (sweeps may import the library);
- no import cycle between the package's modules.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "efficient_attn"


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Every efficient_attn module ``path`` imports (``from a import b`` counts a.b when a.b is a module)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    this = _module_name(path)
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = this.split(".")[: -node.level + (1 if path.name == "__init__.py" else 0) or None]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            names = [mod] + [f"{mod}.{a.name}" for a in node.names]
        else:
            continue
        found |= {n for n in names if n.startswith("efficient_attn")}
    return {n for n in found if n in MODULES}


MODULES = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
GRAPH = {name: _imports(path) for name, path in MODULES.items()}


def _layer(name: str) -> str:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _violations(rule) -> list[str]:
    return [f"{a} imports {b}" for a, deps in sorted(GRAPH.items()) for b in sorted(deps) if not rule(a, b)]


def test_the_graph_is_read():
    assert "efficient_attn.core" in GRAPH["efficient_attn.registry"]
    assert any(_layer(m) == "variants" for m in GRAPH) and any(_layer(m) == "ops" for m in GRAPH)
    assert "efficient_attn.core.mask" in GRAPH["efficient_attn.core.validation"]  # the packages' files are read
    assert "efficient_attn.nn.attention" in GRAPH["efficient_attn.nn.trunk"]
    assert "efficient_attn.train.steps" in GRAPH["efficient_attn.train.loop"]


@pytest.mark.parametrize(
    "layer, allowed",
    [
        ("variants", {"core", "registry", "ops", "variants"}),
        ("ops", {"core", "ops"}),
        ("core", {"core"}),
        ("nn", {"core", "registry", "nn"}),
        ("train", {"core", "nn", "parallel", "tasks", "report", "train"}),
    ],
)
def test_layer_imports(layer, allowed):
    bad = _violations(lambda a, b: _layer(a) != layer or _layer(b) in allowed or b == "efficient_attn")
    assert not bad, f"{layer} may import only {sorted(allowed)} of the package:\n" + "\n".join(bad)


def test_the_library_never_imports_the_sweeps():
    bad = _violations(lambda a, b: _layer(a) == "sweeps" or _layer(b) != "sweeps")
    assert not bad, "only sweeps/ may import sweeps/:\n" + "\n".join(bad)


def _find_cycles(graph: dict[str, set[str]]) -> list[str]:
    state: dict[str, int] = {}
    cycles = []

    def visit(node, stack):
        state[node] = 1
        for dep in sorted(graph[node]):
            if dep == node or dep in _ancestors(node):
                continue  # a module importing its own package (whose __init__ re-exports it) is no cycle
            if state.get(dep) == 1:
                cycles.append(" -> ".join(stack[stack.index(dep):] + [dep]))
            elif not state.get(dep):
                visit(dep, stack + [dep])
        state[node] = 2

    for node in sorted(graph):
        if not state.get(node):
            visit(node, [node])
    return cycles


def test_cycle_finder_finds_a_cycle():
    graph = {"p.a": {"p.b"}, "p.b": {"p.c"}, "p.c": {"p.a"}, "p.d": {"p"}, "p": {"p.d"}}
    assert _find_cycles(graph) == ["p.a -> p.b -> p.c -> p.a"]


def test_no_import_cycle():
    cycles = _find_cycles(GRAPH)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def _ancestors(name: str) -> set[str]:
    parts = name.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts))}
