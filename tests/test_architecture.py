"""Rules of docs/architecture.md that code can check."""

from __future__ import annotations

import ast
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

from tests.conftest import REPO

SERVING = [
    "aidx",
    "aidx.cli",
    "aidx.config",
    "aidx.logs",
    "aidx.store.store",
    "dicom_node",
    "dicom_node.service",
    "inference",
    "inference.volume",
    "inference.series",
    "inference.findings",
    "inference.preprocess",
    "inference.runner",
    "inference.postprocess",
    "inference.sr",
    "inference.seg",
    "inference.pipeline",
    "inference.fhir_report",
    "dicom_node.fhir",
    "models.registry",
    "training.dataset",
    "training.converters",
    "training.froc",
    "training.evaluate",
    "training.derive",
    "training.converters_dicom",
    "aidx.store.jobs",
    "aidx.pipeline.worker",
    "aidx.pipeline.routing",
    "aidx.pipeline.metrics",
    "aidx.cli.pipeline",
    "aidx.cli.worker",
    "aidx.cli.status",
    "aidx.cli.users",
    "ui",
    "ui.accounts",
    "ui.audit",
    "ui.viewer",
    "ui.overlays",
    "ui.review",
    "ui.signoff",
    "ui.signed_sr",
    "ui.dashboard",
    "ui.i18n",
    "ui.viewer_session",
    "ui.app",
    "ui.web",
    "aidx.cli.ui",
    "aidx.cli.feedback",
    "training.feedback",
    "models",
]


def _python(code: str) -> subprocess.CompletedProcess[str]:
    """``code`` run in a fresh interpreter (nothing imported yet), in the repository."""
    return subprocess.run(
        [sys.executable, "-c", code],
        check=False,
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )


def test_serving_packages_and_the_phantom_do_not_load_torch_or_monai() -> None:
    code = (
        "import sys\n"
        + "".join(f"import {m}\n" for m in SERVING)
        + "import training.phantom\n"
        + "from training.phantom import make_plan, PhantomOptions\n"
        + "make_plan(PhantomOptions(slices=8, matrix=64, nodules=1, seed=1))\n"
        + "loaded = sorted(m for m in ('torch', 'monai') if m in sys.modules)\n"
        + "assert not loaded, loaded\n"
        + "print('ok')\n"
    )
    result = _python(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


# What `aidx --help` and every `aidx` process (each child of `aidx serve` is one) would otherwise
# load before it knows its command: DICOM (highdicom about 0.6 s), the store (SQLAlchemy), the
# configuration (pydantic, YAML), the model runtime and the review app. A command imports them
# when it runs.
NOT_FOR_EVERY_COMMAND = (
    "highdicom",
    "pydicom",
    "pynetdicom",
    "sqlalchemy",
    "pydantic",
    "yaml",
    "numpy",
    "onnxruntime",
    "gradio",
    "fastapi",
    "torch",
    "monai",
    "aidx.config",
    "aidx.store",
    "training",
)


@pytest.mark.parametrize("argv", [None, ["--help"], ["status", "--help"]])
def test_the_command_line_loads_no_heavy_package_before_it_knows_the_command(
    argv: list[str] | None,
) -> None:
    run = "" if argv is None else f"try:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
    code = (
        "import sys\n"
        "from aidx.cli import main\n"
        + run
        + f"print(sorted(m for m in {NOT_FOR_EVERY_COMMAND!r} if m in sys.modules))\n"
    )
    result = _python(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]", result.stdout


def test_training_config_loads() -> None:
    from training.train import TrainConfig

    config = TrainConfig.load(REPO / "configs" / "train" / "phantom.yaml")
    assert config.patch_size == (32, 64, 64)
    assert str(config.dataset) == "aidx-data/datasets/phantoms-train"


def test_torch_is_installed_so_the_check_above_means_something() -> None:
    result = subprocess.run(
        [sys.executable, "-c", "import torch, monai; print(torch.__version__)"],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, "the test environment must have the [train] extra"


# ------------------------------------------------------------------------------ import graph
PROJECT = ("aidx", "dicom_node", "inference", "models", "training", "ui")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@cache
def _modules() -> dict[str, Path]:
    """Every module of the project's packages, by dotted name (a package by its own name)."""
    return {
        _module_name(path): path
        for package in PROJECT
        for path in sorted((REPO / package).rglob("*.py"))
    }


def _project_module(name: str) -> str | None:
    """The project module that ``name`` is or lies in (``models.registry.Registry`` ->
    ``models.registry``), or None for a module from outside the project."""
    modules = _modules()
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str) -> set[str]:
    """The project modules that ``module`` imports: every ``import`` statement in it, at module
    level, in functions (run when the function runs, so they close cycles at run time all the
    same) and under ``if TYPE_CHECKING`` (a dependency too, if only for the type checker).
    ``from a import b`` is an import of the module ``a.b`` where that is one, else of ``a``.
    Only the named module counts, not the packages above it whose ``__init__`` Python runs
    first: a package may import its own modules without that making a cycle."""
    path = _modules()[module]
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")[: None if is_package else -1]
                base = base[: len(base) - node.level + 1]
                source = ".".join([*base, *([node.module] if node.module else [])])
            else:
                source = node.module or ""
            names = [
                f"{source}.{alias.name}" if f"{source}.{alias.name}" in _modules() else source
                for alias in node.names
            ]
        else:
            continue
        found.update(m for m in map(_project_module, names) if m is not None)
    found.discard(module)
    return found


@cache
def _graph() -> dict[str, frozenset[str]]:
    return {module: frozenset(_imports(module)) for module in _modules()}


def _cycles(graph: dict[str, frozenset[str]]) -> list[tuple[list[str], str]]:
    """Each group of modules that import one another (strongly connected components, Tarjan):
    one cycle in it (its modules in import order, the first again at the end) and all its
    modules."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = set()
            while True:
                w = stack.pop()
                group.add(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(group)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [(_cycle_in(graph, group), ", ".join(sorted(group))) for group in groups]


def _cycle_in(graph: dict[str, frozenset[str]], group: set[str]) -> list[str]:
    """A shortest way from the group's first module back to itself, inside the group."""
    start = min(group)
    paths = {start: [start]}
    queue = [start]
    while queue:
        v = queue.pop(0)
        for w in sorted(graph[v] & group):
            if w == start:
                return [*paths[v], start]
            if w not in paths:
                paths[w] = [*paths[v], w]
                queue.append(w)
    raise AssertionError(group)  # a strongly connected group always has one


def test_the_import_graph_is_read() -> None:
    """The checks below see the imports they are about (a parser that found nothing would make
    them pass)."""
    graph = _graph()
    assert {"aidx.cli.pipeline", "aidx.store.schema", "ui.web", "training.phantom"} <= set(graph)
    assert "aidx.pipeline.worker" in graph["aidx.cli.pipeline"]  # in a function
    assert "aidx.store.store" in graph["aidx.pipeline.metrics"]  # under TYPE_CHECKING
    assert "aidx.store.schema" in graph["aidx.store.jobs"]  # relative
    assert "aidx.cli.users" in graph["aidx.cli"]  # `from aidx.cli import users`
    assert "models.registry" in graph["aidx.pipeline.worker"]
    triangle = {"a": frozenset({"b"}), "b": frozenset({"c"}), "c": frozenset({"a", "d"})}
    assert _cycles({**triangle, "d": frozenset()}) == [(["a", "b", "c", "a"], "a, b, c")]


def test_no_import_cycles_between_project_modules() -> None:
    cycles = _cycles(_graph())
    assert not cycles, "import cycles:\n" + "\n".join(
        " -> ".join(cycle) + f"\n  (in a group of modules that import one another: {group})"
        for cycle, group in cycles
    )


# aidx's layers, highest first: a module imports modules of its own layer or lower ones only.
# The root modules (configuration, logs, permissions, deflate, the demo study) are the lowest.
LAYERS = ("aidx.cli", "aidx.pipeline", "aidx.store")


def _in_aidx(module: str) -> bool:
    return module.split(".", maxsplit=1)[0] == "aidx"


def _layer(module: str) -> int:
    """0 for aidx.cli, 1 for aidx.pipeline, 2 for aidx.store, 3 for the root of aidx."""
    for n, layer in enumerate(LAYERS):
        if module == layer or module.startswith(layer + "."):
            return n
    return len(LAYERS)


def test_aidx_imports_go_one_way_cli_pipeline_store_root() -> None:
    wrong = [
        f"{module} imports {target}"
        for module, targets in sorted(_graph().items())
        if _in_aidx(module) and module != "aidx.__main__"  # `python -m aidx` runs the cli
        for target in sorted(targets)
        if _in_aidx(target) and _layer(target) < _layer(module)
    ]
    assert not wrong, "\n".join(wrong)


# Imports from other packages into aidx's command line or pipeline that are known and still to
# be moved: training.detector takes two FROC-report helpers from the `aidx export` command.
KNOWN_UPWARD_IMPORTS: set[tuple[str, str]] = set()


def test_other_packages_import_only_the_store_and_the_root_of_aidx() -> None:
    """dicom_node, inference, models, training and ui sit beside aidx.pipeline: they may use the
    store and the root modules, never the pipeline or the command line."""
    upward = {
        (module, target)
        for module, targets in _graph().items()
        if not _in_aidx(module)
        for target in targets
        if _in_aidx(target) and _layer(target) < _layer("aidx.store")
    }
    assert upward - KNOWN_UPWARD_IMPORTS == set()
    assert upward >= KNOWN_UPWARD_IMPORTS, "fixed: remove it from KNOWN_UPWARD_IMPORTS"
