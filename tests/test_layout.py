"""The package's shape (issue 10): what a reviewer would otherwise have to re-check by hand.

- no import cycles between fleetprobe's modules, and nothing inside the package imports
  ``fleetprobe/__init__`` back;
- only ``connectors/`` imports an SSH library (asyncssh, paramiko, fabric); only ``cli/`` and
  ``render/`` import rich; the core never imports the lab;
- no file over 700 lines, no function over 80 lines (complexity is ruff's C901 in scripts/test.sh);
- fewer than 10 function-local imports, each with its reason in a comment.

Module-level imports only count for cycles (a function-local import is lazy by design and listed).
"""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "fleetprobe"

#: Longest file and function allowed.
MAX_FILE_LINES = 700
MAX_FUNCTION_LINES = 80

#: Hot paths the issue allows to stay long (one function per line, with its reason).
LONG_FUNCTIONS_ALLOWED: dict[str, str] = {}

SSH_LIBRARIES = ("asyncssh", "paramiko", "fabric", "invoke")


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _top_level_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """Imports that run when the module is imported (module body, try/except, not TYPE_CHECKING)."""
    found: list[ast.Import | ast.ImportFrom] = []

    def walk(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                found.append(node)
            elif isinstance(node, ast.If) and not _is_type_checking(node):
                walk(node.body)
                walk(node.orelse)
            elif isinstance(node, ast.Try):
                walk(node.body)
                for h in node.handlers:
                    walk(h.body)
                walk(node.orelse)
                walk(node.finalbody)

    walk(tree.body)
    return found


def _resolve(module: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    is_pkg = MODULES[module].name == "__init__.py"
    base = module.split(".")
    base = base if is_pkg else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def _targets(module: str, node: ast.Import | ast.ImportFrom) -> list[str]:
    """Absolute module names an import statement loads."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    src = _resolve(module, node)
    subs = [f"{src}.{a.name}" for a in node.names if f"{src}.{a.name}" in MODULES]
    # ``from pkg import submodule`` inside pkg loads the submodule; pkg itself is the importer's own
    # parent, imported before the importer anyway (not an edge of the graph).
    own_parent = module.startswith(src + ".")
    if own_parent and len(subs) == len(node.names):
        return subs
    return [src, *subs]


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text(), str(path))
        deps: set[str] = set()
        for node in _top_level_imports(tree):
            for t in _targets(name, node):
                # importing a.b.c imports a and a.b first: only the modules of this package count.
                if t in MODULES and t != name:
                    deps.add(t)
        graph[name] = deps
    return graph


def _local_imports() -> list[tuple[str, int, str]]:
    """(file, line, source line) of every import inside a function body."""
    out = []
    for path in MODULES.values():
        text = path.read_text()
        lines = text.splitlines()
        for node in ast.walk(ast.parse(text, str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for sub in ast.walk(node):
                    if isinstance(sub, (ast.Import, ast.ImportFrom)):
                        out.append((str(path.relative_to(PKG.parent)), sub.lineno, lines[sub.lineno - 1]))
    return sorted(set(out))


def test_no_import_cycles_between_modules() -> None:
    graph = _graph()
    # Strongly connected components (Tarjan): any with more than one module is a cycle.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    cycles: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            # A package importing its own submodules (re-exports) is not a cycle of two jobs.
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_nothing_inside_the_package_imports_its_init() -> None:
    bad = []
    for name, path in MODULES.items():
        if name == "fleetprobe":
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and _resolve(name, node) == "fleetprobe":
                names = [a.name for a in node.names if f"fleetprobe.{a.name}" not in MODULES]
                if names:
                    bad.append(f"{name}: from fleetprobe import {', '.join(names)}")
            elif isinstance(node, ast.Import) and any(a.name == "fleetprobe" for a in node.names):
                bad.append(f"{name}: import fleetprobe")
    assert not bad, bad


def _runtime_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement that can run (anywhere, lazy ones too), not those under TYPE_CHECKING."""
    skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and _is_type_checking(node)
            for n in ast.walk(node)}
    return [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom)) and id(n) not in skip]


def _importers(prefixes: tuple[str, ...]) -> dict[str, set[str]]:
    """Modules that import (at run time) a top-level package of ``prefixes``."""
    out: dict[str, set[str]] = {}
    for name, path in MODULES.items():
        for node in _runtime_imports(ast.parse(path.read_text(), str(path))):
            for t in _targets(name, node) if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]:
                root = t.split(".")[0]
                if root in prefixes:
                    out.setdefault(name, set()).add(root)
    return out


def test_only_connectors_import_an_ssh_library() -> None:
    outside = {m: libs for m, libs in _importers(SSH_LIBRARIES).items()
               if not m.startswith("fleetprobe.connectors")}
    assert not outside, outside


def test_only_cli_and_render_import_rich() -> None:
    outside = {m: libs for m, libs in _importers(("rich",)).items()
               if not m.startswith(("fleetprobe.cli", "fleetprobe.render"))}
    assert not outside, outside


def test_the_core_never_imports_the_lab() -> None:
    graph = _graph()
    core = [m for m in graph if not m.startswith(("fleetprobe.lab", "fleetprobe.cli"))]
    bad = {m: sorted(d for d in graph[m] if d.startswith("fleetprobe.lab")) for m in core}
    assert not {m: d for m, d in bad.items() if d}, bad


def test_no_file_over_700_lines() -> None:
    long = {str(p.relative_to(PKG.parent)): n for p in MODULES.values()
            if (n := len(p.read_text().splitlines())) > MAX_FILE_LINES}
    assert not long, long


def test_no_function_over_80_lines_outside_the_listed_hot_paths() -> None:
    long = {}
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = (node.end_lineno or node.lineno) - node.lineno + 1
                key = f"{name}.{node.name}"
                if n > MAX_FUNCTION_LINES and key not in LONG_FUNCTIONS_ALLOWED:
                    long[key] = n
    assert not long, long


def test_fewer_than_ten_function_local_imports_each_with_its_reason() -> None:
    found = _local_imports()
    assert len(found) < 10, "\n".join(f"{f}:{n}: {src.strip()}" for f, n, src in found)
    unexplained = []
    for f, n, src in found:
        lines = (PKG.parent / f).read_text().splitlines()
        # The reason: a comment on the import's line, or just above it (or above the run of imports it is in).
        i = n - 2
        while i >= 0 and lines[i].strip().startswith(("import ", "from ")) and "#" not in lines[i]:
            i -= 1
        if "#" not in src and not (i >= 0 and lines[i].strip().startswith("#")) and "#" not in lines[i]:
            unexplained.append(f"{f}:{n}: {src.strip()}")
    assert not unexplained, unexplained
