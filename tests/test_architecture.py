"""The shape of the code, checked from its imports (every import, also those inside functions;
those under ``if TYPE_CHECKING:`` are for the type checker only and do not count):

* no import cycles between modules;
* the core (``kvframe``) imports no plugin package;
* no distribution touches another's private names (``_name`` modules or attributes).
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = {
    "kvframe": "kvframe",
    "kvframe_local": "backends/local/kvframe_local",
    "kvframe_device": "backends/device/kvframe_device",
    "kvframe_dist": "backends/dist/kvframe_dist",
    "kvframe_nccl": "backends/nccl/kvframe_nccl",
    "kvframe_compressors": "compressors/kvframe_compressors",
    "kvframe_optimizers": "optimizers/kvframe_optimizers",
    "kvframe_transports": "transports/kvframe_transports",
    "kvframe_launch": "launcher/kvframe_launch",
    "kvframe_torch": "integrations/torch/kvframe_torch",
}


def _modules() -> dict[str, Path]:
    mods = {}
    for pkg, folder in PACKAGES.items():
        for f in sorted((REPO / folder).rglob("*.py")):
            rel = f.relative_to(REPO / folder).with_suffix("")
            mods[".".join([pkg, *(p for p in rel.parts if p != "__init__")])] = f
    return mods


MODULES = _modules()


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module, names imported from it) for every absolute import outside TYPE_CHECKING blocks."""
    tree = ast.parse(path.read_text())
    typing_only = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            typing_only.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    found = []
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            found += [(a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.module, [a.name for a in node.names]))
    return found


def _edges() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = defaultdict(set)
    for mod, path in MODULES.items():
        for target, names in _imports(path):
            subs = [f"{target}.{n}" for n in names if f"{target}.{n}" in MODULES]
            # `from pkg import submodule` needs the submodule, not what pkg/__init__ defines
            for t in (subs if names and len(subs) == len(names) else [target, *subs]):
                if t in MODULES and t != mod:
                    edges[mod].add(t)
    return edges


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(set(edges) | {w for ws in edges.values() for w in ws}):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles():
    assert _cycles(_edges()) == []


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_core_imports_no_plugin():
    bad = [f"{mod} imports {target}" for mod, path in MODULES.items() if mod.split(".")[0] == "kvframe"
           for target, _ in _imports(path) if target.split(".")[0] in PACKAGES and target.split(".")[0] != "kvframe"]
    assert bad == []


@pytest.mark.parametrize("pkg", sorted(PACKAGES))
def test_no_private_names_of_another_distribution(pkg):
    bad = []
    for mod, path in MODULES.items():
        if mod.split(".")[0] != pkg:
            continue
        for target, names in _imports(path):
            owner = target.split(".")[0]
            if owner == pkg or owner not in PACKAGES:
                continue
            private = [p for p in target.split(".")[1:] if p.startswith("_")] + [n for n in names if n.startswith("_")]
            if private:
                bad.append(f"{mod} uses {target}: {private}")
    assert bad == []
