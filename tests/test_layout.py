"""The package layout rules, checked on the source.

* Imports point one way: no cycles among the core's and the integrations' modules (imports inside
  functions count, those only for type checkers do not; a name a package re-exports lazily through
  its ``_EXPORTS`` counts as an import of the module that defines it), and the distributions depend
  one way: integrations on the core, the LlamaIndex response synthesizer (the query-engine wiring)
  on the LlamaIndex postprocessor and LLM, never back; the postprocessor and the LLM on neither.
* No module uses another module's private (underscore) names: neither imports them nor reads them
  as attributes of an imported module or class (``store._decode``, ``Compressor._lock``). The
  examples and benchmarks are held to the same rule as the packages, with named exceptions.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CORE = ROOT / "semidyn_rag"
INTEGRATIONS = ROOT / "integrations"

# distribution -> top-level module names it ships
DISTRIBUTIONS = {
    "semidyn-rag": ("semidyn_rag",),
    "langchain-semidyn": ("langchain_semidyn",),
    "llama-index-llms-semidyn": ("llama_index.llms.semidyn",),
    "llama-index-postprocessor-semidyn": ("llama_index.postprocessor.semidyn",),
    "llama-index-response-synthesizers-semidyn": ("llama_index.response_synthesizers.semidyn",),
}
# which distribution may import which (besides itself)
ALLOWED = {
    "semidyn-rag": set(),
    "langchain-semidyn": {"semidyn-rag"},
    "llama-index-llms-semidyn": {"semidyn-rag"},
    "llama-index-postprocessor-semidyn": {"semidyn-rag"},
    "llama-index-response-synthesizers-semidyn": {
        "semidyn-rag",
        "llama-index-llms-semidyn",
        "llama-index-postprocessor-semidyn",
    },
}
# Private names that scripts outside the packages read on purpose, with the reason.
SCRIPT_EXCEPTIONS = {
    # measures what the checksum costs against the same rows decoded unverified: there is (on
    # purpose) no public way to read the store without verifying
    ("benchmarks/bench_store.py", "semidyn_rag.store", "_COLUMNS"),
    ("benchmarks/bench_store.py", "semidyn_rag.store", "_decode"),
}


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


def _resolve(node: ast.ImportFrom, name: str, path: Path) -> str:
    """The absolute module of a ``from ... import`` (relative ones resolved against ``name``)."""
    if not node.level:
        return node.module or ""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
    return ".".join([*anchor, node.module] if node.module else anchor)


def _imports(path: Path, base: Path) -> list[tuple[str, list[str]]]:
    """``(module, names)`` for every runtime import in ``path`` (relative ones resolved)."""
    name = _module_name(path, base)
    out = []
    for node in _runtime_nodes(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            out.append((_resolve(node, name, path), [alias.name for alias in node.names]))
    return out


def _package_sources() -> list[tuple[Path, Path]]:
    """``(file, import root)`` of every module the distributions ship."""
    found = [(p, ROOT) for p in CORE.rglob("*.py")]
    for package in INTEGRATIONS.glob("*/"):
        found += [
            (p, package)
            for p in package.rglob("*.py")
            if "tests" not in p.relative_to(package).parts and "egg-info" not in str(p)
        ]
    return found


def _script_sources() -> list[tuple[Path, Path]]:
    """Examples and benchmarks: code written the way a user of the packages writes it."""
    return [(p, p.parent) for d in ("examples", "benchmarks") for p in (ROOT / d).rglob("*.py")]


def _owner(module: str, known: set[str]) -> str | None:
    """The longest known module that ``module`` is or lies in."""
    while module:
        if module in known:
            return module
        module = module.rpartition(".")[0]
    return None


def _lazy_exports(sources: list[tuple[Path, Path]]) -> dict[str, dict[str, str]]:
    """Per package: the names its ``__init__`` re-exports lazily -> the module defining each."""
    out = {}
    for path, base in sources:
        if path.name != "__init__.py":
            continue
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == "_EXPORTS" for t in node.targets
            ):
                package = _module_name(path, base)
                exports = ast.literal_eval(node.value)
                out[package] = {k: f"{package}.{v}" for k, v in exports.items()}
    return out


def _targets(
    module: str, names: list[str], known: set[str], lazy: dict[str, dict[str, str]]
) -> set[str]:
    """The modules one import makes its file depend on."""
    if not names:  # import a.b.c
        return {_owner(module, known)} - {None}
    out = set()
    for n in names:
        if f"{module}.{n}" in known:  # from pkg import submodule
            out.add(f"{module}.{n}")
        elif n in lazy.get(module, {}):  # from pkg import Name, re-exported lazily
            out.add(lazy[module][n])
        elif (owner := _owner(module, known)) is not None:
            out.add(owner)
    return out


def _graph(sources: list[tuple[Path, Path]]) -> dict[str, set[str]]:
    known = {_module_name(p, base) for p, base in sources}
    lazy = _lazy_exports(sources)
    graph: dict[str, set[str]] = {m: set() for m in known}
    for path, base in sources:
        here = _module_name(path, base)
        for module, names in _imports(path, base):
            graph[here] |= _targets(module, names, known, lazy) - {here}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
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


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _private_uses(path: Path, base: Path, known: set[str]) -> list[tuple[str, str]]:
    """``(module, private name)`` this file takes from one of ``known`` that is not its own.

    Counted: ``from m import _x``; importing a private module ``m._y`` from outside its package;
    ``alias._x`` where ``alias`` is an imported module of ours, or a name imported from one
    (``Compressor._lock``). A package's private module used inside the package is its own.
    """
    here = _module_name(path, base)
    tree = ast.parse(path.read_text(encoding="utf-8"))
    bound: dict[str, str] = {}  # local name -> the module of ours it came from
    out = []

    def foreign(module: str | None) -> bool:
        return module is not None and module != here

    for node in _runtime_nodes(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                owner = _owner(alias.name, known)
                if alias.asname and foreign(owner):
                    bound[alias.asname] = owner
                last = alias.name.rpartition(".")[2]
                inside = here.startswith(alias.name.rpartition(".")[0] + ".")
                if foreign(owner) and _private(last) and not inside:
                    out.append((alias.name, last))
        elif isinstance(node, ast.ImportFrom):
            module = _resolve(node, here, path)
            owner = _owner(module, known)
            if not foreign(owner):
                continue
            last = module.rpartition(".")[2]
            if _private(last) and not here.startswith(module.rpartition(".")[0] + "."):
                out.append((module, last))
            for alias in node.names:
                if _private(alias.name):
                    out.append((module, alias.name))
                target = f"{module}.{alias.name}"
                bound[alias.asname or alias.name] = target if target in known else module
    for node in _runtime_nodes(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in bound
            and _private(node.attr)
        ):
            out.append((bound[node.value.id], node.attr))
    return out


def test_no_private_names_cross_modules():
    sources = _package_sources()
    known = {_module_name(p, base) for p, base in sources}
    offenders = [
        f"{path.relative_to(ROOT)}: {module} . {name}"
        for path, base in sources
        for module, name in _private_uses(path, base, known)
    ]
    assert not offenders, "\n".join(offenders)


def test_examples_and_benchmarks_use_public_names():
    known = {_module_name(p, base) for p, base in _package_sources()}
    offenders = []
    for path, base in _script_sources():
        rel = str(path.relative_to(ROOT))
        for module, name in _private_uses(path, base, known):
            if (rel, module, name) not in SCRIPT_EXCEPTIONS:
                offenders.append(f"{rel}: {module} . {name}")
    assert not offenders, "\n".join(offenders)


def test_imports_point_one_way():
    cycle = _cycle(_graph(_package_sources()))
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def _distribution(module: str) -> str | None:
    for dist, tops in DISTRIBUTIONS.items():
        if any(module == t or module.startswith(t + ".") for t in tops):
            return dist
    return None


def test_distributions_depend_one_way():
    """The core imports no integration; the LlamaIndex LLM and postprocessor not each other nor
    the synthesizer; LangChain and LlamaIndex packages not each other (also not in functions)."""
    offenders = []
    for path, base in _package_sources():
        mine = _distribution(_module_name(path, base))
        for module, names in _imports(path, base):
            for target in {module} | {f"{module}.{n}" for n in names}:
                theirs = _distribution(target)
                if theirs not in (None, mine) and theirs not in ALLOWED[mine]:
                    offenders.append(f"{path.relative_to(ROOT)} ({mine}) imports {target}")
    assert not offenders, "\n".join(offenders)


def _pyproject(dist: str) -> dict:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    path = ROOT if dist == "semidyn-rag" else INTEGRATIONS / dist
    return tomllib.loads((path / "pyproject.toml").read_text(encoding="utf-8"))


def test_every_integration_is_a_known_distribution():
    """A new package under integrations/ must be given its import rules above."""
    found = {p.parent.name for p in INTEGRATIONS.glob("*/pyproject.toml")}
    assert found == set(DISTRIBUTIONS) - {"semidyn-rag"}
    for dist in DISTRIBUTIONS:
        assert _pyproject(dist)["project"]["name"] == dist


@pytest.mark.parametrize("dist", sorted(DISTRIBUTIONS))
def test_every_distribution_ships_py_typed(dist):
    """PEP 561: each package has a ``py.typed`` marker, and package-data puts it in the wheel."""
    base = ROOT if dist == "semidyn-rag" else INTEGRATIONS / dist
    package_data = _pyproject(dist)["tool"]["setuptools"]["package-data"]
    for module in DISTRIBUTIONS[dist]:
        assert (base / module.replace(".", "/") / "py.typed").is_file(), module
        assert "py.typed" in package_data.get(module, []), f"{dist}: package-data of {module}"


# --------------------------------------------------------------- the checks themselves can fail


@pytest.mark.parametrize(
    ("graph", "has_cycle"),
    [({"a": {"b"}, "b": {"c"}, "c": set()}, False), ({"a": {"b"}, "b": {"a"}}, True)],
)
def test_the_cycle_check_can_fail(graph, has_cycle):
    assert (_cycle(graph) is not None) == has_cycle


def _package(tmp_path: Path, files: dict[str, str]) -> list[tuple[Path, Path]]:
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    return [(p, tmp_path) for p in tmp_path.rglob("*.py")]


def test_a_cycle_through_a_lazy_re_export_is_found(tmp_path):
    """``from pkg import Model`` inside ``pkg`` depends on the module defining ``Model``."""
    sources = _package(
        tmp_path,
        {
            "pkg/__init__.py": '_EXPORTS = {"Model": "model"}\n',
            "pkg/model.py": "def f():\n    from . import store\n",
            "pkg/store.py": "from pkg import Model\n",
        },
    )
    assert _cycle(_graph(sources)) is not None


def test_private_attributes_of_imported_modules_and_classes_are_found(tmp_path):
    sources = _package(
        tmp_path,
        {
            "pkg/__init__.py": "",
            "pkg/model.py": "class Model:\n    _lock = None\n",
            "pkg/store.py": "def _decode():\n    pass\n",
            "pkg/user.py": (
                "from pkg import store\nfrom pkg.model import Model\nimport pkg.store as s\n"
                "def f():\n    return store._decode, Model._lock, s._decode, Model.public\n"
            ),
        },
    )
    known = {_module_name(p, base) for p, base in sources}
    (user,) = [(p, b) for p, b in sources if p.name == "user.py"]
    assert sorted(_private_uses(*user, known)) == [
        ("pkg.model", "_lock"),
        ("pkg.store", "_decode"),
        ("pkg.store", "_decode"),
    ]
