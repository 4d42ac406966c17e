"""The package's layering: no import cycles among cpet's modules (imports anywhere in a file count), and
cpet's own imports at module top, so a cycle cannot hide inside a function. The CLI is the one exception:
it is a dispatcher that imports a verb's modules when the verb runs (``cpet --help`` in 0.1 s, not the
seconds torch and transformers take)."""

import ast
from pathlib import Path

import cpet

ROOT = Path(cpet.__file__).resolve().parent
LAZY_OK = {"cpet.cli"}


def _modules() -> dict[str, Path]:
    mods = {}
    for path in ROOT.rglob("*.py"):
        parts = ("cpet",) + path.relative_to(ROOT).with_suffix("").parts
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return mods


def _imports(path: Path, mods: dict[str, Path]) -> list[tuple[str, bool]]:
    """(cpet module imported, whether the import sits at module top) for every import in the file."""
    tree = ast.parse(path.read_text())
    top = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names
                                       if f"{node.module}.{a.name}" in mods]  # from cpet import recovery
        for t in targets:
            if t.split(".")[0] == "cpet" and t in mods:
                found.append((t, id(node) in top))
    return found


def test_no_import_cycles_and_cpet_imports_at_module_top():
    mods = _modules()
    graph = {m: {t for t, _ in _imports(p, mods) if t != m} for m, p in mods.items()}
    inner = sorted(f"{m} imports {t} inside a function" for m, p in mods.items() if m not in LAZY_OK
                   for t, at_top in _imports(p, mods) if not at_top)
    assert not inner, inner

    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for t in sorted(graph.get(m, ())):
            if state.get(t) == 1:
                cycles.append(path[path.index(t):] + [t])
            elif t not in state:
                visit(t, path + [t])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, cycles[:3]
