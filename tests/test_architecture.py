"""The shape of src/, checked: the import graph has no cycle, the layers import only
downwards, no module takes another package's private names, and what a plain node
does does not depend on what else the process imported.

The graph is read from the source with :mod:`ast` (nothing is imported to build it),
and every import counts: module level, inside functions, and under ``TYPE_CHECKING``
(a cycle that only the type checker sees still ties the two modules together for a
reader, and becomes a run-time cycle the day someone moves an import up)."""
from __future__ import annotations

import ast
import importlib
from dataclasses import dataclass
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src"
PACKAGES = ("engine", "transport", "sockend")

# Cycles tolerated while the work that removes them is under way: each entry the set of
# modules of one cycle, with a comment saying why and who removes it.  Empty: src/ has
# no cycle, and a new one fails test_no_import_cycles.  (The last two to go were
# engine.pool.job <-> engine.pool.process and transport.rpc.{client,handlers,server}.)
KNOWN_CYCLES: list[frozenset[str]] = []


@dataclass(frozen=True)
class Import:
    importer: str        # the module whose source holds the import
    target: str          # the module of src/ it imports
    names: tuple[str, ...]  # for ``from target import a, b``: the names that are not modules
    line: int


def _modules() -> dict[str, Path]:
    """Every module of src/ by dotted name; a package is its ``__init__``."""
    found: dict[str, Path] = {}
    for top in PACKAGES:
        for path in sorted((SRC / top).rglob("*.py")):
            parts = list(path.relative_to(SRC).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


MODULES = _modules()


def _is_package(module: str) -> bool:
    return MODULES[module].name == "__init__.py"


def _resolve(importer: str, level: int, module: str | None) -> str:
    if not level:
        return module or ""
    base = importer.split(".")
    if not _is_package(importer):
        base.pop()
    base = base[:len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def _known(name: str) -> str | None:
    """The deepest module of src/ that ``name`` is or lies in (None: not ours)."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in MODULES:
            return candidate
        parts.pop()
    return None


def imports_of(module: str, source: str | None = None) -> list[Import]:
    """The imports of src/ modules in ``module`` (its file, or ``source`` given as if it
    were that module's)."""
    if source is None:
        source = MODULES[module].read_text(encoding="utf-8")
    tree = ast.parse(source, str(MODULES[module]))
    found: list[Import] = []
    for node in ast.walk(tree):   # every import: module level, in functions, TYPE_CHECKING
        if isinstance(node, ast.Import):
            for alias in node.names:
                target = _known(alias.name)
                if target is not None:
                    found.append(Import(module, target, (), node.lineno))
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(module, node.level, node.module)
            plain: list[str] = []
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                if sub in MODULES:      # `from pkg import module`: that module
                    found.append(Import(module, sub, (), node.lineno))
                else:
                    plain.append(alias.name)
            target = _known(base)
            if plain and target is not None:
                found.append(Import(module, target, tuple(plain), node.lineno))
    return found


IMPORTS = [imp for module in MODULES for imp in imports_of(module)]


def graph() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {module: set() for module in MODULES}
    for imp in IMPORTS:
        if imp.target != imp.importer:
            edges[imp.importer].add(imp.target)
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (a path back to its start) per strongly connected component of
    more than one module (Tarjan, iterative: the graph is a few hundred nodes)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []
    counter = 0
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(component)
    return [_a_cycle(edges, component) for component in components]


def _a_cycle(edges: dict[str, set[str]], component: set[str]) -> list[str]:
    """A shortest path from the component's first module back to itself."""
    start = min(component)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        nxt = []
        for node in frontier:
            for child in sorted(edges[node] & component):
                if child == start:
                    return paths[node] + [start]
                if child not in paths:
                    paths[child] = paths[node] + [child]
                    nxt.append(child)
        frontier = nxt
    raise AssertionError(f"not a cycle: {sorted(component)}")  # pragma: no cover


def _in(module: str, *packages: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def _package_of(module: str) -> str:
    return module if _is_package(module) else module.rpartition(".")[0]


def _where(imp: Import) -> str:
    return f"{imp.importer} (line {imp.line}) imports {imp.target}"


# -- the graph itself -------------------------------------------------------------------------

def test_the_graph_reader_sees_every_kind_of_import():
    """The reader the other tests trust: module-level, function-level and TYPE_CHECKING
    imports; ``from pkg import module`` is that module, ``from module import name`` (or
    ``from pkg import name``) the module or package; relative imports resolve."""
    source = """
import trio, engine.pool.job
from typing import TYPE_CHECKING
from engine.cluster import service, balance as b
from engine.node.verbs import app_arg, _private
from engine.client import connect
from . import control
from .verbs import base_verbs
if TYPE_CHECKING:
    from engine.app import App
def later():
    import engine.cli.commands
"""
    found = {(imp.target, imp.names) for imp in imports_of("engine.node.node", source)}
    assert found == {
        ("engine.pool.job", ()), ("engine.cluster.service", ()), ("engine.cluster.balance", ()),
        ("engine.node.verbs", ("app_arg", "_private")), ("engine.client", ("connect",)),
        ("engine.node.control", ()), ("engine.node.verbs", ("base_verbs",)),
        ("engine.app", ("App",)), ("engine.cli.commands", ())}
    assert "engine" in MODULES and "engine.pool" in MODULES and "engine.pool.job" in MODULES
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": {"e"}, "e": {"d"}, "f": {"a"}}
    assert sorted(cycles(edges)) == [["a", "b", "c", "a"], ["d", "e", "d"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    found = cycles(graph())
    known = [c for c in found if frozenset(c) in KNOWN_CYCLES]
    unexpected = [" -> ".join(c) for c in found if c not in known]
    assert not unexpected, "import cycles in src/:\n" + "\n".join(unexpected)


def test_the_known_cycles_are_still_there():
    """An allow-listed cycle that is gone must leave the list (so it cannot come back)."""
    found = {frozenset(c) for c in cycles(graph())}
    stale = [sorted(c) for c in KNOWN_CYCLES if c not in found]
    assert not stale, f"these cycles are gone: remove them from KNOWN_CYCLES: {stale}"


# -- layers -----------------------------------------------------------------------------------

def _offenders(importers: tuple[str, ...], forbidden: tuple[str, ...],
               allowed_importers: tuple[str, ...] = ()) -> list[str]:
    return [_where(imp) for imp in IMPORTS
            if _in(imp.importer, *importers) and not _in(imp.importer, *allowed_importers)
            and _in(imp.target, *forbidden)]


def test_the_worker_never_imports_the_node_side():
    """A slave runs engine.worker; the pool, node, cluster and CLI live in the node, and
    so does the node's side of the slave protocol (the slave has its own session)."""
    assert not _offenders(("engine.worker",), ("engine.pool", "engine.node", "engine.cluster",
                                               "engine.cli", "engine.client.node_client",
                                               "engine.protocol.node_session"))


def test_transport_imports_neither_engine_nor_sockend():
    assert not _offenders(("transport",), ("engine", "sockend"))


def test_sockend_never_imports_engine():
    assert not _offenders(("sockend",), ("engine",))


def test_only_the_command_line_imports_the_cli():
    assert not _offenders(("engine", "transport", "sockend"), ("engine.cli",),
                          allowed_importers=("engine.cli", "engine.__main__"))


def test_no_private_names_taken_across_packages():
    """``from x import _y`` only between modules of one package (``_y`` not a module)."""
    wrong = [f"{_where(imp)}: {', '.join(n for n in imp.names if n.startswith('_'))}"
             for imp in IMPORTS
             if any(n.startswith("_") and not n.startswith("__") for n in imp.names)
             and _package_of(imp.importer) != _package_of(imp.target)]
    assert not wrong, "\n".join(wrong)


# -- no import changes another module's state ---------------------------------------------------

@pytest.fixture(scope="module")
def every_module_imported() -> None:
    """Every module of src/ imported (the programs, ``__main__``, aside).  Module-scoped,
    so before the e2e rule's guard: croniter's import runs ``file`` (through
    ``platform.architecture()``), which is not this test starting a process."""
    for module in MODULES:
        if module.rpartition(".")[2] == "__main__":
            continue
        try:
            importlib.import_module(module)
        except ImportError as exc:   # an optional dependency (e.g. inotify on macOS)
            if exc.name and exc.name.partition(".")[0] in PACKAGES:
                raise


def test_a_plain_nodes_verbs_do_not_depend_on_what_was_imported(every_module_imported):
    """The cluster adds its verbs to the nodes started in it, never by being imported;
    nor does setting up the command line add any."""
    from engine.cli.commands import build_parser
    from engine.node import verbs
    from engine.node.node import Node

    before = dict(Node(control=None).verbs)
    build_parser()                      # every command set up, as `python -m engine` does
    after = dict(Node(control=None).verbs)
    assert before == after == verbs.base_verbs()
    # Spelled out, so that a module that swapped one of them at import would show here.
    assert {name: f"{fn.__module__}.{fn.__name__}" for name, fn in after.items()} == {
        "list": "engine.node.verbs.list_apps", "info": "engine.node.verbs.info",
        "deploy": "engine.node.verbs.deploy", "undeploy": "engine.node.verbs.undeploy",
        "reload": "engine.node.verbs.reload",
        "mesh-publish": "engine.drivers.mesh_publisher.mesh_publish_verb",
        "crashlog": "engine.node.verbs.crashlog", "nodes": "engine.node.verbs.not_in_a_cluster",
        "schedule": "engine.drivers.scheduler.schedule_verb"}


def test_a_node_in_a_cluster_has_the_cluster_verbs_by_composition(tmp_path):
    from engine.cluster.service import ClusterOptions
    from engine.cluster.verbs import ClusterMember, in_cluster
    from engine.node import verbs
    from engine.node.node import Node

    node = Node(control=None, cluster=in_cluster(ClusterOptions(name="arch", insecure=True, state_dir=tmp_path)))
    assert isinstance(node.cluster, ClusterMember) and node.cluster.cluster.node is node
    assert set(node.verbs) == set(verbs.base_verbs()) | {
        "cluster.status", "cluster.catalog", "cluster.fetch", "cluster.deploy", "cluster.undeploy",
        "cluster.run"}
    assert node.verbs["list"] is verbs.list_apps
    for wrapped in ("deploy", "undeploy", "nodes", "reload"):  # reach every peer; describe the
        # cluster; refuse a reload (it would diverge from the catalog)
        assert node.verbs[wrapped] is not verbs.base_verbs()[wrapped]
    with pytest.raises(TypeError):
        node.verbs["list"] = verbs.deploy  # type: ignore[index]  (a node's table is fixed)
    plain = Node(control=None)
    assert plain.cluster is None and dict(plain.verbs) == verbs.base_verbs()
