"""The house rules that code review keeps missing, checked from the source alone (nothing of lora_gui is imported).

- Nothing outside `families/` names a base-model family: everything about one lives in its file (DESIGN.md).
- No import cycle between rooms (the top-level modules and packages of lora_gui), counting imports inside
  functions (not those for type hints alone, under `if TYPE_CHECKING:`): each room builds on the ones below it.
- Modules and functions stay readable: at most 600 lines a module, 60 a function.
- The UI layer never imports the machine-learning libraries as it is imported: it asks the engine.
"""

from __future__ import annotations

import ast
import re
from functools import cache
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

PACKAGE = Path(__file__).resolve().parents[1] / "lora_gui"
MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 60
ML_LIBRARIES = ("torch", "diffusers", "transformers", "peft", "accelerate")


@cache
def modules() -> dict[Path, ast.Module]:
    """Every module of lora_gui, parsed, by its path relative to the package."""
    return {path.relative_to(PACKAGE): ast.parse(path.read_text(encoding="utf-8")) for path in PACKAGE.rglob("*.py")}


def family_keys() -> set[str]:
    """The families' registry keys, as each family class in families/ sets its `name`."""
    keys = set()
    for path, tree in modules().items():
        if path.parts[0] != "families":
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                for statement in node.body:
                    if (
                        isinstance(statement, ast.Assign)
                        and [getattr(target, "id", None) for target in statement.targets] == ["name"]
                        and isinstance(statement.value, ast.Constant)
                        and isinstance(statement.value.value, str)
                    ):
                        keys.add(statement.value.value)
    return keys


def room_of(path: Path) -> str:
    """A module's room: its top-level module or package under lora_gui ("families" for families/flux.py)."""
    return path.parts[0].removesuffix(".py")


def imported_rooms(path: Path, tree: ast.Module) -> list[tuple[str, int]]:
    """The rooms a module imports, wherever the import is (inside functions too), with the line of each; imports for
    type hints alone don't count: they never run."""
    rooms = {room_of(other) for other in modules()}
    package = ["lora_gui", *path.parent.parts]  # what a relative import of this module starts from
    for_hints = {
        id(inner)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
        for inner in ast.walk(node)
    }
    found = []
    for node in ast.walk(tree):
        if id(node) in for_hints:
            continue
        if isinstance(node, ast.Import):
            targets = [alias.name.split(".") for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            base += node.module.split(".") if node.module else []
            # `from lora_gui import data`: the names may be rooms themselves.
            targets = [[*base, alias.name] for alias in node.names] if len(base) == 1 else [base]
        else:
            continue
        for target in targets:
            if target[0] == "lora_gui" and len(target) > 1 and target[1] in rooms:
                found.append((target[1], node.lineno))
    return found


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one room (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []

    def visit(room: str) -> None:
        index[room] = low[room] = len(index)
        stack.append(room)
        on_stack.add(room)
        for other in sorted(edges.get(room, ())):
            if other not in index:
                visit(other)
                low[room] = min(low[room], low[other])
            elif other in on_stack:
                low[room] = min(low[room], index[other])
        if low[room] == index[room]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == room:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for room in sorted(edges):
        if room not in index:
            visit(room)
    return components


def test_no_module_outside_families_names_a_family():
    keys = family_keys()
    assert keys, "no family `name` found in lora_gui/families/: this test reads them from there"
    found = sorted(
        (path, node.lineno, node.value)
        for path, tree in modules().items()
        if path.parts[0] != "families"
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in keys
    )
    offenders = [f"lora_gui/{path}:{line}: {value!r}" for path, line, value in found]
    assert not offenders, (
        "a family's key outside lora_gui/families/ (ask the family, or the registry, for what it says):\n"
        + "\n".join(offenders)
    )


def test_no_import_cycle_between_rooms():
    edges: dict[str, set[str]] = {}
    sites: dict[tuple[str, str], list[str]] = {}
    for path, tree in sorted(modules().items()):
        room = room_of(path)
        edges.setdefault(room, set())
        for other, line in imported_rooms(path, tree):
            if other != room:
                edges[room].add(other)
                sites.setdefault((room, other), []).append(f"lora_gui/{path}:{line}")
    found = cycles(edges)
    messages = []
    for component in found:
        inside = [
            f"  {room} -> {other}: {', '.join(sites[room, other])}"
            for room in component
            for other in sorted(edges[room] & set(component))
        ]
        messages.append(f"rooms {', '.join(component)} import each other:\n" + "\n".join(inside))
    assert not found, "import cycles between rooms (imports inside functions count):\n" + "\n".join(messages)


def test_modules_and_functions_stay_short():
    offenders = []
    for path, tree in sorted(modules().items()):
        lines = len((PACKAGE / path).read_text(encoding="utf-8").splitlines())
        if lines > MAX_MODULE_LINES:
            offenders.append(f"lora_gui/{path}: {lines} lines (at most {MAX_MODULE_LINES})")
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    offenders.append(
                        f"lora_gui/{path}:{node.lineno}: {node.name}() is {length} lines (at most {MAX_FUNCTION_LINES})"
                    )
    assert not offenders, "too long, split it:\n" + "\n".join(offenders)


def _imports_on_import(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """The imports that run when a module is imported: all but those in functions and `if TYPE_CHECKING:` blocks."""
    found, todo = [], [tree]
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            todo.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        todo.extend(ast.iter_child_nodes(node))
    return found


def test_the_ui_imports_no_machine_learning_library_at_module_level():
    offenders = []
    for path, tree in sorted(modules().items()):
        if path.parts[0] != "ui":
            continue
        for node in _imports_on_import(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif node.level:  # within lora_gui
                continue
            else:
                names = [node.module or ""]
            offenders += [
                f"lora_gui/{path}:{node.lineno}: {name}" for name in names if name.split(".")[0] in ML_LIBRARIES
            ]
    assert not offenders, "the UI imports a machine-learning library (ask the engine instead):\n" + "\n".join(offenders)


def mapped_modules() -> list[str]:
    """The modules and packages docs/ARCHITECTURE.md's module map names, as paths under lora_gui/."""
    text = (PACKAGE.parent / "docs" / "ARCHITECTURE.md").read_text(encoding="utf-8")
    section = text.split("## Module map", 1)[1].split("\n## ", 1)[0]
    first_cells = [line.split("|")[1] for line in section.splitlines() if line.startswith("| `")]
    return [name for cell in first_cells for name in re.findall(r"`([^`]+)`", cell)]


def test_the_architecture_map_names_every_module_and_only_those_that_exist():
    named = mapped_modules()
    missing = [name for name in named if not (PACKAGE / name).exists()]
    assert not missing, f"docs/ARCHITECTURE.md names modules that don't exist: {missing}"
    covered = {name.rstrip("/") for name in named}
    rooms = {path.parts[0] for path in modules() if path.parts[0] != "__init__.py"}
    # A package's row covers its files, but the app's: each file under ui/ has a row of its own.
    unnamed = sorted(
        f"lora_gui/{room}"
        for room in rooms | {f"ui/{path.name}" for path in modules() if path.parts[0] == "ui"}
        if room not in covered and room != "ui" and room != "ui/__init__.py"
    )
    assert not unnamed, f"modules missing from docs/ARCHITECTURE.md's module map: {unnamed}"
