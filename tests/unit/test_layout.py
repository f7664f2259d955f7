"""The house rules of docs/design.md, checked from the source: no import circles in
proxy/ or scheduler/, scheduler/ never imports proxy/, no module far past the size rule.

Imports are read with ``ast`` from every module, including those inside functions
(a deferred import still ties two modules together) and those under
``if TYPE_CHECKING:`` (a circle the type checker sees is still a circle a reader
must untangle).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("proxy", "scheduler")
# The rule in docs/design.md is ~500 lines; past this a module must be split.
MAX_LINES = 560


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((REPO / pkg).rglob("*.py"))}


def _resolve(name: str, known: set[str]) -> str | None:
    """The module an imported dotted name lives in (``proxy.calls.upstream.call`` ->
    ``proxy.calls.upstream``), or None for anything outside proxy/ and scheduler/."""
    while name:
        if name in known:
            return name
        name = name.rpartition(".")[0]
    return None


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for mod, path in modules.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")
                    anchor = anchor[: len(anchor) - (node.level - 1)]
                    base = ".".join([*anchor, base] if base else anchor)
                # `from pkg import mod` names a module; `from mod import name` a name in it.
                targets = [f"{base}.{a.name}" for a in node.names] + [base]
            for t in targets:
                dep = _resolve(t, known)
                if dep is not None and dep != mod and not mod.startswith(dep + "."):
                    graph[mod].add(dep)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
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
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    m = stack.pop()
                    on_stack.discard(m)
                    component.append(m)
                    if m == node:
                        break
                if len(component) > 1:
                    out.append(sorted(component))
    return out


def test_no_import_circles() -> None:
    assert _cycles(import_graph()) == []


def test_scheduler_never_imports_proxy() -> None:
    upward = {
        (mod, dep)
        for mod, deps in import_graph().items()
        if mod.startswith("scheduler")
        for dep in deps
        if dep.split(".")[0] == "proxy"
    }
    assert upward == set()


def test_scheduler_never_imports_aiohttp_web() -> None:
    found = []
    for mod, path in _modules().items():
        if not mod.startswith("scheduler"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "aiohttp":
                found += [mod for a in node.names if a.name == "web"]
            elif isinstance(node, ast.ImportFrom | ast.Import):
                names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [
                    a.name for a in node.names]
                found += [mod for n in names if n == "aiohttp.web"]
    assert found == []


def test_modules_keep_to_the_size_rule() -> None:
    sizes = {m: len(p.read_text().splitlines()) for m, p in _modules().items()}
    big = {m: n for m, n in sizes.items() if n > MAX_LINES}
    assert big == {}


def test_top_levels_are_few() -> None:
    """`ls proxy scheduler` names the concerns: a handful of modules at the top, the
    rest in one folder per concern."""
    for pkg in PACKAGES:
        top = [p.name for p in (REPO / pkg).glob("*.py") if p.name != "__init__.py"]
        assert len(top) <= 4, (pkg, top)


# The checker itself must be able to fail: a planted circle and an upward import.
def test_the_checker_finds_a_planted_circle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("proxy.calls.upstream.call", "proxy.calls.upstream"),
        ("proxy.calls", "proxy.calls"),
        ("aiohttp.web", None),
    ],
)
def test_resolve(name: str, expected: str | None) -> None:
    assert _resolve(name, set(_modules())) == expected


def test_design_md_maps_every_module() -> None:
    """docs/design.md's layout section is the map of the tree: one line per module."""
    text = (REPO / "docs" / "design.md").read_text()
    section = text.split("## Layout", 1)[1].split("\n## ", 1)[0]
    missing = [
        str(p.relative_to(REPO))
        for pkg in PACKAGES
        for p in (REPO / pkg).rglob("*.py")
        if p.name != "__init__.py" and p.name not in section
    ]
    folders = [
        str(p.relative_to(REPO))
        for pkg in PACKAGES
        for p in (REPO / pkg).iterdir()
        if p.is_dir() and p.name != "__pycache__" and f"{p.name}/" not in section
    ]
    assert (missing, folders) == ([], [])
