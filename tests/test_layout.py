"""The package's rooms and the one direction imports run: __main__ → cli → serving → orchestrator → workers
→ training → method, data, storage (three peers that import none of each other) → home; and inside a
room, no two modules import each other, directly or around a circle (type-only imports included)."""

import ast
from pathlib import Path

import cbpo_orch

PACKAGE = Path(cbpo_orch.__file__).parent
RANK = {"__main__": 7, "cli": 6, "serving": 5, "orchestrator": 4, "workers": 3, "training": 2,
        "method": 1, "data": 1, "storage": 1, "home": 0}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, modules: set[str]) -> set[str]:
    """The cbpo_orch modules ``path`` imports anywhere in it (a ``from M import N`` of a
    submodule N counts as importing M.N)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
    own = module_name(path)
    return {m for m in found if m in modules and m != own and not own.startswith(m + ".")}


def import_circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        for other in graph[module]:
            if other not in index:
                visit(other)
                low[module] = min(low[module], low[other])
            elif other in stack:
                low[module] = min(low[module], index[other])
        if low[module] == index[module]:
            component = []
            while not component or component[-1] != module:
                component.append(stack.pop())
            if len(component) > 1:
                circles.append(sorted(component))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return circles


def imported_rooms(path: Path) -> set[str]:
    """The cbpo_orch rooms (top-level subpackage or module) that the file imports, at any depth."""
    rooms = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "cbpo_orch" and len(parts) > 1:
                rooms.add(parts[1])
    return rooms


def test_every_room_is_ranked():
    rooms = {p.stem if p.is_file() else p.name for p in PACKAGE.iterdir()
             if (p.suffix == ".py" and p.stem != "__init__") or (p / "__init__.py").exists()}
    assert rooms == set(RANK)


def test_no_import_runs_upward_or_across_peers():
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        room = path.relative_to(PACKAGE).parts[0].removesuffix(".py")
        for other in imported_rooms(path) - {room}:
            if RANK[other] >= RANK[room]:
                wrong.append(f"{path.relative_to(PACKAGE)} imports cbpo_orch.{other}")
    assert not wrong, wrong


def test_no_import_circle():
    paths = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph = {name: imported_modules(path, set(paths)) for name, path in paths.items()}
    assert import_circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]], "the check itself finds a circle"
    assert import_circles(graph) == []


def test_serving_uses_no_private_ray_serve_api_and_the_driver_and_scheduler_import_no_serving():
    for path in (PACKAGE / "serving").glob("*.py"):
        assert "serve.context" not in path.read_text() and "_serve_request_context" not in path.read_text(), path.name
    for module in ("driver", "scheduler"):
        assert "serving" not in imported_rooms(PACKAGE / "orchestrator" / f"{module}.py"), module
    modules = {module_name(path) for path in PACKAGE.rglob("*.py")}
    for path in (PACKAGE / "serving").glob("*.py"):
        found = imported_modules(path, modules)
        assert not found & {"cbpo_orch.orchestrator.driver", "cbpo_orch.orchestrator.scheduler"}, f"{path.name} imports the driver or the scheduler"


def test_the_method_is_the_math_only():
    """method/ holds losses, reference, prior, configs and selection: no model, tokenizer or index."""
    heavy = {"transformers", "peft", "faiss", "sentence_transformers", "ray", "sqlalchemy"}
    for path in (PACKAGE / "method").glob("*.py"):
        tree = ast.parse(path.read_text())
        tops = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        tops |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
        assert not tops & heavy, (path.name, tops & heavy)


def test_the_ray_heavy_group_names_modules_that_exist():
    from tests.conftest import RAY_HEAVY_MODULES

    tests = Path(__file__).parent
    assert all((tests / f"{module}.py").is_file() for module in RAY_HEAVY_MODULES), RAY_HEAVY_MODULES


def test_no_test_module_imports_another():
    """Shared helpers live in tests/helpers.py and fixtures in tests/conftest.py."""
    tests = Path(__file__).parent
    wrong = []
    for path in sorted(tests.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module] if isinstance(node, ast.ImportFrom) and node.module else [a.name for a in node.names] if isinstance(node, ast.Import) else []
            wrong += [f"{path.name} imports {name}" for name in names if name.startswith("tests.test_")]
    assert not wrong, wrong
