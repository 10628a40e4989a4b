"""The layout rules of docs/ARCHITECTURE.md, checked on the source: one home per concept.

Each test reads the product's source files (not the tests), so a change that puts a model-name branch,
an environment read or an import circle back in the wrong place fails here with the file and line.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ENTRY_SCRIPTS = ("inference_e1_1_npu.py", "inference_npu.py", "gradio_demo_npu.py", "test_npu_setup.py")
PACKAGE = REPO / "hidream_edit"


def product_files() -> list[Path]:
    return [REPO / "device_utils.py", *(REPO / name for name in ENTRY_SCRIPTS), *sorted(PACKAGE.rglob("*.py"))]


def test_model_names_are_compared_only_in_spec() -> None:
    pattern = re.compile(r"""[!=]=\s*["'](e1\.1|e1-full)["']|["'](e1\.1|e1-full)["']\s*[!=]=""")
    found = [
        f"{path.relative_to(REPO)}:{number}: {line.strip()}"
        for path in product_files()
        if path.name != "spec.py"
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert found == []


def _environment_reads(path: Path) -> list[tuple[int, str]]:
    return [
        (number, line.strip())
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if "os.environ" in line or "os.getenv" in line
    ]


def _lines_of_function(path: Path, name: str) -> range:
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.FunctionDef) and node.name == name:
            return range(node.lineno, (node.end_lineno or node.lineno) + 1)
    return range(0)


def test_only_config_reads_the_environment() -> None:
    allowed_anywhere = {PACKAGE / "config.py"}
    found = []
    for path in product_files():
        if path in allowed_anywhere:
            continue
        for number, line in _environment_reads(path):
            if path.name in ENTRY_SCRIPTS and line.startswith('os.environ.setdefault("'):
                continue  # an entry script's first lines: switches that must be set before torch or gradio load
            if path.name == "device_utils.py" and ("LOCAL_RANK" in line or "TORCH_DEVICE_BACKEND_AUTOLOAD" in line):
                continue  # torchrun's contract and the autoload switch, documented in device_utils
            if path.name == "device_utils.py" and number in _lines_of_function(path, "main"):
                continue  # `python device_utils.py` is an entry script too: its main() honours PREFERRED_DEVICE
            found.append(f"{path.relative_to(REPO)}:{number}: {line}")
    assert found == []


def _imported_modules(path: Path) -> set[str]:
    """Project modules a file imports anywhere (top level, in functions, under TYPE_CHECKING)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("hidream_edit"):
            if node.module == "hidream_edit":
                names.update(f"hidream_edit.{alias.name}" for alias in node.names)
            else:
                names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names if alias.name.startswith("hidream_edit."))
    return names


def _module_name(path: Path) -> str:
    relative = path.relative_to(REPO).with_suffix("")
    parts = relative.parts[:-1] if relative.name == "__init__" else relative.parts
    return ".".join(parts)


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every import circle, as the path that closes it."""
    cycles: list[list[str]] = []

    def visit(module: str, trail: list[str]) -> None:
        for dep in sorted(graph.get(module, ())):
            if dep in trail:
                cycles.append([*trail[trail.index(dep) :], dep])
            else:
                visit(dep, [*trail, dep])

    for module in graph:
        visit(module, [module])
    return cycles


def test_no_import_circles_in_the_package() -> None:
    graph = {_module_name(path): _imported_modules(path) for path in sorted(PACKAGE.rglob("*.py"))}
    graph = {module: {dep for dep in deps if dep in graph and dep != module} for module, deps in graph.items()}
    assert find_cycles(graph) == []


def test_spec_is_a_leaf() -> None:
    assert _imported_modules(PACKAGE / "spec.py") == set()


def test_the_circle_check_sees_circles(tmp_path: Path) -> None:
    a = tmp_path / "a.py"
    a.write_text("from hidream_edit.b import x\n\ndef f():\n    from hidream_edit import c\n")
    assert _imported_modules(a) == {"hidream_edit.b", "hidream_edit.c"}
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []
    assert ["a", "b", "a"] in find_cycles({"a": {"b"}, "b": {"a"}})


def test_device_layer_knows_no_model() -> None:
    text = (REPO / "device_utils.py").read_text()
    assert [line for line in text.splitlines() if "hidream" in line.lower()] == []


# the dataclasses a run fills in as it goes; every other one is a frozen value (docs/ARCHITECTURE.md section 1)
MUTABLE_DATACLASSES = {
    "batch.ItemRecord", "batch.BatchProgress", "distributed.RankGroup", "distributed.CardGroup", "editor.EditResult",
    "full_size.StepsDone", "guidance_parallel.GuidanceGroup", "models.LoadedPipeline", "pipeline.EditOutput",
    "placement._Tally", "step_cache.StageRecord", "step_cache._Stage", "tensor_split.TensorParallelGroup",
    "service.EditOutcome", "service.BatchItem", "service.BatchOutcome",
}


def _dataclasses(path: Path) -> Iterator[tuple[str, bool]]:
    """(module.Class, frozen) for each class of `path` decorated with @dataclass or @dataclass(...)."""
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.ClassDef):
            continue
        for decorator in node.decorator_list:
            call = decorator if isinstance(decorator, ast.Call) else None
            target = call.func if call is not None else decorator
            if isinstance(target, ast.Name) and target.id == "dataclass":
                frozen = call is not None and any(
                    k.arg == "frozen" and isinstance(k.value, ast.Constant) and k.value.value is True
                    for k in call.keywords
                )
                yield f"{path.stem}.{node.name}", frozen


def test_dataclasses_are_frozen_unless_a_run_fills_them_in() -> None:
    found = {name: frozen for path in product_files() for name, frozen in _dataclasses(path)}
    assert len(found) > len(MUTABLE_DATACLASSES)
    assert {name for name, frozen in found.items() if not frozen} == MUTABLE_DATACLASSES
