"""The architecture test: floors that only point down (docs/architecture.md).

Every module's imports are parsed with `ast` (top-level and inside functions, not `if TYPE_CHECKING:` blocks).
- The core (everything outside distthink/tasks/ and distthink/commands/) never imports a task. The one way a core
  module may name a task is distthink._deprecated.moved(...), the old import paths kept for one release; the
  task registry is read by name in distthink/engine/task.py.
- No import cycle between modules.
- distthink/ops/ stays standalone (Liger-Kernel style): it imports only the base utilities.
Each rule is shown to fire on a deliberately broken copy of the package."""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "distthink"
TASK_PREFIX = "distthink.tasks"
OPS_MAY_IMPORT = ("distthink.errors", "distthink.logging_utils", "distthink.optional", "distthink.zero3",
                  "distthink.data.types", "distthink.ops")
# string literals naming a task package that the core may hold: the registry module's name
REGISTRY_LITERAL = {("distthink.engine.task", "distthink.tasks")}


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_nodes(tree: ast.AST):
    """Import statements, skipping `if TYPE_CHECKING:` bodies (annotations only, never executed)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                stack.extend(child.orelse)
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                yield child
            stack.append(child)


def imports_of(root: Path) -> dict[str, set[str]]:
    """module -> the distthink modules it imports (a `from pkg import sub` names the submodule itself)."""
    files = {module_name(root, p): p for p in root.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for mod, path in files.items():
        is_pkg = path.name == "__init__.py"
        deps: set[str] = set()
        for node in _import_nodes(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name.split(".")[0] == root.name)
                continue
            base = node.module or ""
            if node.level:  # relative import
                anchor = mod.split(".") if is_pkg else mod.split(".")[:-1]
                anchor = anchor[:len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            if base.split(".")[0] != root.name:
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                deps.add(sub if sub in files else base)
        graph[mod] = deps - {mod}
    return graph


def is_core(mod: str) -> bool:
    return not mod.startswith((TASK_PREFIX, "distthink.commands")) and mod != "distthink.tasks"


def core_to_task_violations(root: Path) -> list[str]:
    out = []
    for mod, deps in imports_of(root).items():
        if is_core(mod):
            out += [f"{mod} imports {d}" for d in sorted(deps) if d == TASK_PREFIX or d.startswith(TASK_PREFIX + ".")]
    for path in root.rglob("*.py"):
        mod = module_name(root, path)
        if not is_core(mod):
            continue
        tree = ast.parse(path.read_text())
        allowed = set()
        for node in ast.walk(tree):  # literals inside moved(...) calls are the deprecated aliases
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "moved":
                allowed.update(id(c) for c in ast.walk(node) if isinstance(c, ast.Constant))
        for node in ast.walk(tree):
            if (isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in allowed
                    and node.value.startswith(TASK_PREFIX) and (mod, node.value) not in REGISTRY_LITERAL):
                out.append(f"{mod} names {node.value!r} outside distthink._deprecated.moved(...)")
    return out


def cycles(root: Path) -> list[list[str]]:
    """Every strongly connected component with more than one module (Tarjan), each a list of modules."""
    graph = imports_of(root)
    index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
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
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def ops_violations(root: Path) -> list[str]:
    return [f"{mod} imports {d}" for mod, deps in imports_of(root).items() if mod.startswith("distthink.ops")
            for d in sorted(deps) if not d.startswith(OPS_MAY_IMPORT)]


def test_the_core_never_imports_a_task():
    assert core_to_task_violations(PACKAGE) == []


def test_no_import_cycles():
    assert cycles(PACKAGE) == []


def test_ops_import_only_the_base():
    assert ops_violations(PACKAGE) == []


@pytest.fixture
def broken_copy(tmp_path):
    root = tmp_path / "distthink"
    shutil.copytree(PACKAGE, root, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "assets", "templates"))
    return root


def _append(path: Path, line: str) -> None:
    path.write_text(path.read_text() + "\n" + line + "\n")


def test_a_core_import_of_a_task_is_caught(broken_copy):
    _append(broken_copy / "engine" / "batching.py", "from distthink.tasks.thinkrec import prompts")
    _append(broken_copy / "models" / "load.py", "def f():\n    import distthink.tasks.molecule.graphs")
    _append(broken_copy / "data" / "chat.py", "TASK = 'distthink.tasks.thinkrec.task:ThinkRecTask'")
    found = core_to_task_violations(broken_copy)
    assert "distthink.engine.batching imports distthink.tasks.thinkrec.prompts" in found
    assert "distthink.models.load imports distthink.tasks.molecule.graphs" in found
    assert any(v.startswith("distthink.data.chat names 'distthink.tasks.thinkrec.task") for v in found)


def test_a_cycle_is_caught(broken_copy):
    _append(broken_copy / "data" / "types.py", "from distthink.data import packing")
    assert ["distthink.data.packing", "distthink.data.types"] in cycles(broken_copy)


def test_ops_reaching_up_is_caught(broken_copy):
    _append(broken_copy / "ops" / "flce.py", "def f():\n    from distthink.engine.lm_loss import LMHeadLoss")
    assert ops_violations(broken_copy) == ["distthink.ops.flce imports distthink.engine.lm_loss"]


def test_type_checking_imports_do_not_count(broken_copy):
    _append(broken_copy / "data" / "types.py", "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                               "    from distthink.data import packing")
    assert cycles(broken_copy) == []
