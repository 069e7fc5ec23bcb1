"""The package's import structure (docs/architecture.md, "Layers"): no module of tga/ imports one that (directly or
through others) imports it back, no module imports a higher layer, and nothing in tga/ imports research/. Every
import statement counts, the ones inside functions too: a lazy import is still a dependency."""

from __future__ import annotations

import ast
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# bottom to top; a module may import its own layer (no cycle) and the layers below
LAYERS = [
    {"tga.errors", "tga.options", "tga.records_io", "tga.image_io", "tga.image_jobs", "tga.ranks", "tga.running_means",
     "tga.export_layouts", "tga.export_transformers4", "tga.tiny",
     "tga.align.batch"},  # the guide's part of a batch: plain data the collator fills (a layer is found bottom-up)
    {"tga.data"},
    {"tga.model"},
    {"tga.align", "tga.inference", "tga.config", "tga.retrieval", "tga.caption"},
    {"tga.train", "tga.safety"},
    {"tga.unlearn", "tga.defense", "tga.bench", "tga.export"},
    {"tga.serve", "tga.demo"},
    {"tga.cli"},
]
# Upward imports still there, each with why: remove an entry when its import goes.
KNOWN_UPWARD = {
    ("tga.data.dataset", "tga.align.request_guide"): "the request form's spans (a not-adopted form, leaves tga/)",
    ("tga.demo.phase_commands", "tga.cli"): "the demo runs real `tga` command lines in-process",
}


def module_imports() -> dict[str, set[str]]:
    """tga module -> the tga and research modules it imports (a package import counts as its `__init__`)."""
    modules = {}
    for folder, _, files in os.walk(os.path.join(REPO, "tga")):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                module = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".").removesuffix(".__init__")
                modules[module] = path
    graph = {}
    for module, path in modules.items():
        with open(path, encoding="utf-8") as handle:
            tree = ast.parse(handle.read())
        found = set()
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            found |= {n for n in names if n in modules or n.split(".")[0] == "research"}
        graph[module] = found - {module}
    return graph


def layer_of(module: str) -> int:
    for level, members in enumerate(LAYERS):
        if any(module == m or module.startswith(m + ".") for m in members):
            return level
    raise AssertionError(f"{module} is in no layer of tests/test_layers.py (and docs/architecture.md): place it")


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index, low, on_stack, stack, found, counter = {}, {}, set(), [], [], 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next((c for c in children if c in graph), None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
            elif child not in index:
                index[child] = low[child] = counter
                counter += 1
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(sorted(graph[child]))))
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    return found


def test_no_import_circles_in_tga():
    assert cycles(module_imports()) == []


def test_the_cycle_finder_finds_a_planted_circle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]


def test_no_module_imports_a_higher_layer_or_research():
    upward = sorted((module, target) for module, targets in module_imports().items() for target in targets
                    if target.split(".")[0] == "research" or layer_of(target) > layer_of(module))
    assert [pair for pair in upward if pair not in KNOWN_UPWARD] == []
    assert [pair for pair in KNOWN_UPWARD if pair not in upward] == [], "an upward import went: remove its entry"
