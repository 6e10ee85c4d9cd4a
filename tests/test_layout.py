"""The package layout rules, checked on the source: imports between the core's modules point one
way (no cycles, counting imports inside functions too, not those only for type checkers), and no
module imports another module's private (underscore) names."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CORE = ROOT / "semidyn_rag"
INTEGRATIONS = ROOT / "integrations"


def _module_name(path: Path, base: Path) -> str:
    parts = list(path.relative_to(base).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _runtime_nodes(tree: ast.AST) -> list[ast.AST]:
    """Every node except those under ``if TYPE_CHECKING:`` (annotations only, never imported)."""
    out, todo = [], [tree]
    while todo:
        node = todo.pop()
        out.append(node)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            todo += node.orelse
            continue
        todo += ast.iter_child_nodes(node)
    return out


def _imports(path: Path, base: Path) -> list[tuple[str, list[str]]]:
    """``(module, names)`` for every import in ``path`` (relative ones resolved), any depth."""
    name = _module_name(path, base)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in _runtime_nodes(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join([*anchor, node.module] if node.module else anchor)
            else:
                module = node.module or ""
            out.append((module, [alias.name for alias in node.names]))
    return out


def _sources() -> list[tuple[Path, Path]]:
    found = [(p, ROOT) for p in CORE.rglob("*.py")]
    for package in INTEGRATIONS.glob("*/"):
        found += [
            (p, package)
            for p in package.rglob("*.py")
            if "tests" not in p.relative_to(package).parts and "egg-info" not in str(p)
        ]
    return found


def _owner(module: str, known: set[str]) -> str | None:
    """The longest known module that ``module`` is or lies in."""
    while module:
        if module in known:
            return module
        module = module.rpartition(".")[0]
    return None


def test_no_private_names_cross_modules():
    sources = _sources()
    known = {_module_name(p, base) for p, base in sources}
    offenders = []
    for path, base in sources:
        here = _module_name(path, base)
        for module, names in _imports(path, base):
            target = _owner(module, known)
            if target is None or target == here:
                continue
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            if private or any(part.startswith("_") for part in module.split(".")[-1:]):
                # a package's own private module (e.g. langchain_semidyn._issued) is fine inside it
                if module.startswith(here.rpartition(".")[0] + ".") and not private:
                    continue
                offenders.append(f"{path.relative_to(ROOT)}: from {module} import {names}")
    assert not offenders, "\n".join(offenders)


def _core_graph() -> dict[str, set[str]]:
    sources = [(p, ROOT) for p in CORE.rglob("*.py")]
    known = {_module_name(p, ROOT) for p, _ in sources}
    graph: dict[str, set[str]] = {m: set() for m in known}
    for path, base in sources:
        here = _module_name(path, base)
        for module, names in _imports(path, base):
            targets = {_owner(module, known)}
            # `from . import pooling` names modules, not attributes
            targets |= {_owner(f"{module}.{n}", known) for n in names}
            for target in targets - {None, here}:
                # a package's __init__ re-exporting its modules is not a dependency edge back
                if (
                    here == "semidyn_rag"
                    or target.startswith(here + ".")
                    or here.startswith(target + ".")
                ):
                    continue
                graph[here].add(target)
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_core_imports_point_one_way():
    cycle = _cycle(_core_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


@pytest.mark.parametrize(
    ("graph", "has_cycle"),
    [({"a": {"b"}, "b": {"c"}, "c": set()}, False), ({"a": {"b"}, "b": {"a"}}, True)],
)
def test_the_cycle_check_can_fail(graph, has_cycle):
    assert (_cycle(graph) is not None) == has_cycle
