"""The shape of the package: the config is a leaf, no module imports itself through others, registries
cover exactly the names the job spec accepts."""

from __future__ import annotations

import ast
import subprocess
import sys
import typing
from pathlib import Path

from jobhelpers import REPO

PACKAGE = REPO / "fiddler_batch"
HEAVY = ("torch", "transformers", "pyarrow", "tqdm")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in PACKAGE.rglob("*.py")}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imported(path: Path, known: dict[str, Path]) -> set[str]:
    """Project modules `path` imports anywhere (functions included), except under `if TYPE_CHECKING:`."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skipped = {
        id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and _is_type_checking(node) for n in ast.walk(node)
    }
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name in known}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module in known:
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                found.add(submodule if submodule in known else node.module)
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module, or a module importing itself (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in graph.get(node, ()):
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_import_graph_has_no_cycles() -> None:
    known = modules()
    graph = {name: imported(path, known) for name, path in known.items()}
    assert sum(len(targets) for targets in graph.values()) > 50  # the walk sees the project's imports
    assert cycles(graph) == []


def test_the_cycle_finder_finds_cycles() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"a"}}) == [["a"]] and cycles({"a": {"b"}, "b": set()}) == []


def test_the_job_spec_and_validate_import_no_torch_transformers_or_pyarrow() -> None:
    code = (
        "import sys\n"
        "from fiddler_batch.cli import main\n"
        "import fiddler_batch.spec, fiddler_batch.jobfile, fiddler_batch.wording, fiddler_batch.io.files\n"
        "try:\n"
        "    main(['validate', 'jobs/eval.yaml'], standalone_mode=False)\n"
        "finally:\n"
        f"    print('LOADED', sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "model:\n  path: demo:tiny-mixtral" in done.stdout
    assert done.stdout.strip().splitlines()[-1] == "LOADED []"


def test_every_strategy_name_has_a_behaviour() -> None:
    from fiddler_batch.engine.planner import STRATEGIES
    from fiddler_batch.spec import StrategyName

    assert set(STRATEGIES) == set(typing.get_args(StrategyName))
    assert all(name == strategy.name for name, strategy in STRATEGIES.items())


def test_every_input_format_has_a_reader_and_every_suffix_a_format() -> None:
    from fiddler_batch.io.readers import READERS
    from fiddler_batch.io.writers import WRITERS
    from fiddler_batch.spec import INPUT_SUFFIXES, OUTPUT_SUFFIXES, InputFormatName, OutputFormatName

    assert set(READERS) == set(typing.get_args(InputFormatName)) >= set(INPUT_SUFFIXES.values())
    assert set(WRITERS) == set(typing.get_args(OutputFormatName)) >= set(OUTPUT_SUFFIXES.values())
    assert all(name == reader.name for name, reader in READERS.items())


def test_benchmark_baselines_are_records_the_suite_can_place() -> None:
    from fiddler_batch.bench.settings import BASELINE_TABLE, BASELINES, OURS
    from fiddler_batch.engine.planner import STRATEGIES

    assert BASELINES == tuple(BASELINE_TABLE) and OURS in BASELINES
    for baseline in BASELINE_TABLE.values():
        assert baseline.placement in ("accelerate", "engine")
        assert baseline.strategy is None or baseline.strategy in STRATEGIES


def test_the_tree_is_clean_under_the_configured_linter_and_formatter() -> None:
    ruff = Path(sys.executable).with_name("ruff")
    checked = subprocess.run(
        [str(ruff), "check", "--quiet", "."], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    formatted = subprocess.run(
        [str(ruff), "format", "--check", "."], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert formatted.returncode == 0, formatted.stdout + formatted.stderr
