"""The house's floors: no module imports one on a floor above its own.

A shared contract lives below all of its users. When a module needs something that
lives in the room of a peer or of a user above it, the thing belongs lower down
(the window value went to `core/` for that reason). This test reads every module's
imports (static: `import` statements anywhere in the file, including inside
functions) and names each import that runs back up.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Bottom to top. A module may import its own floor and any floor below; a module of
# pure logic (floor 1) imports only the ground floor and its own package: what two
# rooms of pure logic share is a contract, and contracts live on the ground floor.
FLOORS: list[tuple[str, set[str]]] = [
    ("ground: settings and the shapes every stage shares", {"config", "core"}),
    (
        "pure logic: windows, parsing, parts, the merge, offsets (no Kafka, no clock)",
        {
            "aggregator",
            "ingest.parsing",
            "ingest.poll_turns",
            "merging.parts",
            "merging.merge",
        },
    ),
    ("talking to Kafka, and the running processor's telemetry", {"broker", "telemetry"}),
    ("the stages", {"ingest", "merging"}),
    (
        "programs and operators' tools",
        {"kafka_processor", "monitor_aggregated_data", "data_generator", "local_stack", "ops"},
    ),
]


def _floor_of(module: str) -> int:
    """The floor of the most specific entry naming the module or a package above it."""
    best, best_length = None, -1
    for level, (_, names) in enumerate(FLOORS):
        for name in names:
            if (module == name or module.startswith(name + ".")) and len(name) > best_length:
                best, best_length = level, len(name)
    if best is None:
        raise AssertionError(f"{module} is on no floor: add it to FLOORS")
    return best


def _package(module: str) -> str:
    return module.rsplit(".", 1)[0] if "." in module else module


def _project_modules() -> dict[str, Path]:
    modules = {}
    for path in ROOT.rglob("*.py"):
        relative = path.relative_to(ROOT)
        if relative.parts[0] in {"tests", "testkit", "benchmarks", "native", ".venv", "build"} or relative.parts[
            0
        ].startswith("."):
            continue
        name = ".".join(relative.with_suffix("").parts)
        modules[name.removesuffix(".__init__")] = path
    return modules


def _imports(path: Path, known: set[str]) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        found.update(name for name in names if name in known)
    return found


def test_every_module_is_on_a_floor():
    for module in _project_modules():
        _floor_of(module)


def test_no_import_runs_back_up_a_floor():
    modules = _project_modules()
    upward = []
    for module, path in sorted(modules.items()):
        own = _floor_of(module)
        for imported in sorted(_imports(path, set(modules))):
            theirs = _floor_of(imported)
            if theirs > own:
                upward.append(f"{module} (floor {own}) imports {imported} (floor {theirs})")
            elif own == theirs == 1 and _package(imported) != _package(module):
                upward.append(f"{module} imports {imported}: a contract in a peer's room")
    assert not upward, "imports that run back up a floor:\n" + "\n".join(upward)


def test_pure_logic_has_no_kafka_in_it():
    modules = _project_modules()
    pure = {name for name in modules if _floor_of(name) <= 1}
    with_kafka = [name for name in sorted(pure) if "confluent_kafka" in modules[name].read_text()]
    assert not with_kafka, f"pure modules that mention the Kafka client: {with_kafka}"


@pytest.mark.parametrize(
    ("module", "floor"), [("core.window_value", 0), ("aggregator", 1), ("broker.kafka_io", 2), ("ops.recompute", 4)]
)
def test_the_floor_map_reads_as_written(module, floor):
    assert _floor_of(module) == floor
