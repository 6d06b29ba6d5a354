"""The house's import rules, read from the sources (every import counts: module level, inside functions and under
TYPE_CHECKING alike):
- no circles between the engine's modules;
- the ground floor (nanoslg/) never imports the process packages (scheduler_proc, tokenizer_proc, gpu_workers):
  it starts them as processes and talks to them through nanoslg/protocol.py;
- entry points (nanoslg/entrypoints/, nanoslg/__main__.py) use the core and the server, never the reverse, and the
  core never imports the server;
- the process packages never import the server or the entry points."""
from __future__ import annotations

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("nanoslg", "tokenizer_proc", "scheduler_proc", "gpu_workers")
PROCESSES = ("scheduler_proc", "tokenizer_proc", "gpu_workers")


def _modules(root: str) -> dict[str, str]:
    out = {}
    for package in PACKAGES:
        for folder, _, files in os.walk(os.path.join(root, package)):
            for name in files:
                if name.endswith(".py"):
                    path = os.path.join(folder, name)
                    module = os.path.relpath(path, root)[:-3].replace(os.sep, ".")
                    out[module.removesuffix(".__init__")] = path
    return out


def import_graph(root: str = ROOT) -> dict[str, set[str]]:
    """module -> the engine's modules it imports."""
    modules = _modules(root)
    graph = {}
    for module, path in modules.items():
        with open(path) as f:
            tree = ast.parse(f.read())
        package = module.split(".") if path.endswith("__init__.py") else module.split(".")[:-1]
        names = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package[:len(package) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                for a in node.names:  # `from pkg import module` imports the module
                    names.add(f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base)
        targets = set()
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name and name != module:
                targets.add(name)
        graph[module] = targets
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
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
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def _floor(module: str) -> int:
    """0 the core, 1 the HTTP server, 2 the entry points."""
    if module.startswith("nanoslg.entrypoints") or module == "nanoslg.__main__":
        return 2
    return 1 if module.startswith("nanoslg.server") else 0


def wrong_way_imports(graph: dict[str, set[str]]) -> list[str]:
    out = []
    for module, targets in sorted(graph.items()):
        for target in sorted(targets):
            if module.startswith("nanoslg"):
                if target.startswith(PROCESSES):
                    out.append(f"{module} -> {target} (the ground floor imports a process package)")
                elif target.startswith("nanoslg") and _floor(target) > _floor(module):
                    out.append(f"{module} -> {target} (runs back up)")
            elif target.startswith(("nanoslg.server", "nanoslg.entrypoints")):
                out.append(f"{module} -> {target} (a process package imports the server or an entry point)")
    return out


def test_the_engine_has_no_import_circles():
    assert circles(import_graph()) == []


def test_imports_run_one_way():
    assert wrong_way_imports(import_graph()) == []


def test_the_checks_see_what_they_look_for(tmp_path):
    """A circle through a TYPE_CHECKING import and a function-level import, and an upward import, are found."""
    for package, files in {"nanoslg": {"a.py": "from nanoslg import b\n",
                                       "b.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                               "    from nanoslg.a import x\n",
                                       "c.py": "def f():\n    from scheduler_proc.s import y\n"},
                           "scheduler_proc": {"s.py": "from .t import z\n", "t.py": "from . import s\n"}}.items():
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("")
        for name, text in files.items():
            (tmp_path / package / name).write_text(text)
    graph = import_graph(str(tmp_path))
    assert sorted(circles(graph)) == [["nanoslg.a", "nanoslg.b"], ["scheduler_proc.s", "scheduler_proc.t"]]
    assert wrong_way_imports(graph) == ["nanoslg.c -> scheduler_proc.s (the ground floor imports a process package)"]
