"""The layering holds in the source: imports go solver ← compressor ← service ← workers (bench/
above them all), inside compressor/ its sub-packages go quant ← runtime ← checkpoint ← artifact ←
pipeline ← research ← the front door (compressor.api), and no module-level import cycle exists
among our modules (read from the AST, so a cycle hidden behind a function-level import still
counts: every import in the file is an edge). No module is over 400 lines."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("solver", "compressor", "service", "workers", "bench")
LAYER = {name: i for i, name in enumerate(PACKAGES)}
# compressor's sub-packages, lowest first; compressor.api (the front door) stands above them all
SUBPACKAGES = ("quant", "runtime", "checkpoint", "artifact", "pipeline", "research", "api")
SUBLAYER = {name: i for i, name in enumerate(SUBPACKAGES)}
MAX_LINES = 400


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    modules = {_module_name(p): p for pkg in PACKAGES if (REPO / pkg).is_dir()
               for p in (REPO / pkg).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            for t in targets:
                while t and t not in modules:
                    t = t.rpartition(".")[0]
                if t and t != name and t.split(".")[0] in LAYER:
                    edges.add(t)
        graph[name] = edges
    return graph


def _against(order: dict[str, int], graph: dict[str, set[str]], level) -> list[tuple[str, str]]:
    """Every arrow m -> t whose target stands above its source in `order`."""
    return sorted((m, t) for m, ts in graph.items() for t in ts
                  if level(m) is not None and level(t) is not None
                  and order[level(t)] > order[level(m)])


def _top(module: str) -> str:
    return module.split(".")[0]


def _sub(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "compressor" and len(parts) > 1 else None


def test_imports_go_one_way():
    assert _against(LAYER, _imports(), _top) == []


def test_compressor_subpackages_go_one_way():
    assert _against(SUBLAYER, _imports(), _sub) == []


def test_the_order_check_catches_an_arrow_against_it():
    graph = {"compressor.quant.grids": {"compressor.runtime.packed"},
             "compressor.pipeline.profile": {"compressor.quant.grids"}}
    assert _against(SUBLAYER, graph, _sub) == [("compressor.quant.grids",
                                               "compressor.runtime.packed")]


def test_every_compressor_module_has_a_room():
    """A module lives in one of the sub-packages (or is the front door); each package's
    __init__ is one docstring line saying what it holds, and imports nothing."""
    loose = [p.name for p in (REPO / "compressor").glob("*.py")
             if p.name not in ("__init__.py", "api.py")]
    assert loose == []
    for pkg in SUBPACKAGES[:-1]:
        init = ast.parse((REPO / "compressor" / pkg / "__init__.py").read_text())
        doc = ast.get_docstring(init)
        assert doc and "\n" not in doc.strip(), pkg
        assert [n for n in init.body if not isinstance(n, ast.Expr)] == [], pkg


def test_no_module_over_the_line_limit():
    long = {str(p.relative_to(REPO)): n for pkg in PACKAGES + ("tests",)
            for p in (REPO / pkg).rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on.add(root)
        while work:
            node, it = work[-1]
            nxt = next(it, None)
            if nxt is not None:
                if nxt not in index:
                    index[nxt] = low[nxt] = counter
                    counter += 1
                    stack.append(nxt)
                    on.add(nxt)
                    work.append((nxt, iter(sorted(graph.get(nxt, ())))))
                elif nxt in on:
                    low[node] = min(low[node], index[nxt])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp = []
                while True:
                    m = stack.pop()
                    on.discard(m)
                    comp.append(m)
                    if m == node:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def test_no_import_cycles():
    # a package's __init__ re-exporting its submodules is not a cycle of behaviour
    graph = {m: {t for t in ts if not m.startswith(t + ".")} for m, ts in _imports().items()}
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_cycles():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
