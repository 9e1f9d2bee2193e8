"""No import cycles inside llmhost: the arrows point one way (routes -> registry
-> loading -> engine), so a module can be read, tested and changed without
first loading the ones that use it. The graph is built from the source with
ast, function-level imports included (a lazy import is still a dependency)."""
from __future__ import annotations

import ast
import os

import pytest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "llmhost")


def _modules() -> dict[str, str]:
    """{dotted module name: file path} for every module of the package."""
    out = {}
    for folder, _, files in os.walk(ROOT):
        for name in files:
            if not name.endswith(".py"):
                continue
            rel = os.path.relpath(os.path.join(folder, name), os.path.dirname(ROOT))
            parts = rel[:-3].split(os.sep)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = os.path.join(folder, name)
    return out


def _resolve(module: str, is_package: bool, level: int, target: str | None) -> str:
    base = module.split(".")
    if not is_package:
        base = base[:-1]
    if level > 1:
        base = base[:len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        with open(path, encoding="utf-8") as fh:
            tree = ast.parse(fh.read(), path)
        is_package = path.endswith("__init__.py")
        for node in ast.walk(tree):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = (_resolve(name, is_package, node.level, node.module) if node.level
                        else node.module or "")
                for alias in node.names:  # `from . import x` imports the submodule x
                    sub = f"{base}.{alias.name}"
                    targets.append(sub if sub in modules else base)
            for target in targets:
                while target and target not in modules:  # a name inside a module
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component with more than one module
    (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


def test_the_graph_sees_function_level_imports():
    graph = import_graph()
    assert "llmhost.models.registry" in graph["llmhost.api.models"]
    assert "llmhost.api" in graph["llmhost"]  # imported inside create_app


def test_a_cycle_is_found():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles_in_llmhost():
    assert find_cycles(import_graph()) == []


# -- the layer arrows ---------------------------------------------------------------
# api/serving.py (running a Plan) and api/access.py (which model a caller may
# use) are helpers the routes share; every other module under api/ is a route.
API_HELPERS = {"llmhost.api", "llmhost.api.serving", "llmhost.api.access", "llmhost.api.chatpath",
               "llmhost.api.loads", "llmhost.api.vectors"}


def _inside(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def _imports_of(package: str) -> dict[str, set[str]]:
    return {name: targets for name, targets in import_graph().items() if _inside(name, package)}


def _route_imports(graph: dict[str, set[str]]) -> dict[str, list[str]]:
    """{route module: the route modules it imports}, for those that import any."""
    out = {}
    for name, targets in graph.items():
        if _inside(name, "llmhost.api") and name not in API_HELPERS:
            routes = sorted(t for t in targets if _inside(t, "llmhost.api") and t not in API_HELPERS)
            if routes:
                out[name] = routes
    return out


def test_routes_never_import_routes():
    """A route module under api/ imports no other route module: what two routes
    share lives below them (generation/plan.py) or in the api helpers."""
    assert _route_imports(import_graph()) == {}


def test_a_route_importing_a_route_is_caught():
    graph = {"llmhost.api.tokenize": {"llmhost.api.chat", "llmhost.api.serving"},
             "llmhost.api.serving": {"llmhost.api.access"}}
    assert _route_imports(graph) == {"llmhost.api.tokenize": ["llmhost.api.chat"]}


def _outside(package: str, allowed: tuple[str, ...]) -> dict[str, list[str]]:
    """{module of `package`: the llmhost modules it imports outside `package`
    and `allowed`}, for the modules that have any."""
    out = {}
    for name, targets in _imports_of(package).items():
        bad = sorted(t for t in targets if not _inside(t, package)
                     and not any(_inside(t, a) for a in allowed))
        if bad:
            out[name] = bad
    return out


def test_the_engine_imports_nothing_above_it():
    """engine/ imports only engine/, llmhost.config and llmhost.version: it
    speaks domain errors and knows no request, route or HTTP."""
    assert _outside("llmhost.engine", ("llmhost.config", "llmhost.version")) == {}


def test_generation_imports_only_downward():
    """generation/ (typed request -> Plan -> run) imports only engine/,
    models/, llmhost.config and llmhost.version: never api/, http/ (Flask),
    schemas/, store/ or server/."""
    assert _outside("llmhost.generation", ("llmhost.engine", "llmhost.models", "llmhost.config",
                                           "llmhost.version")) == {}



def test_models_and_store_speak_domain_errors():
    """models/ (registry, loading, memory policy) imports only engine/ and
    llmhost.config; store/ imports only engine/ and llmhost.config: both raise
    engine/errors.py's domain errors, never http/'s APIError."""
    assert _outside("llmhost.models", ("llmhost.engine", "llmhost.config")) == {}
    assert _outside("llmhost.store", ("llmhost.engine", "llmhost.config")) == {}


@pytest.mark.parametrize("given, expected", [(None, "0"), ("1", "1")])
def test_hub_kernels_are_off_unless_the_operator_turns_them_on(given, expected):
    """transformers 5 swaps layers of CUDA models for kernels fetched from the Hub
    (USE_HUB_KERNELS, on by default): every offline CUDA load failed. Importing
    llmhost turns it off, unless the variable was set."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "USE_HUB_KERNELS"}
    if given is not None:
        env["USE_HUB_KERNELS"] = given
    out = subprocess.run([sys.executable, "-c", "import os, llmhost; print(os.environ['USE_HUB_KERNELS'])"],
                         env=env, cwd=os.path.dirname(ROOT), capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == expected, out.stderr
