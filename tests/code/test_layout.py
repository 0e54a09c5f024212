"""The layout's rules, read from the imports (``ast``, every import, also those inside functions).

cars_ml/ is one package per stage. In each, ``run.py`` is the MLflow step (``run_<stage>(config)``)
and the other modules take and return plain values. The rules below say which package may import
what; docs/development.md states them in words.
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "cars_ml"
STAGES = (
    "tracking",
    "measure",
    "layers",
    "data",
    "modeling",
    "training",
    "tuning",
    "export",
    "promotion",
    "pipeline",
    "serving",
    "perf",
)
# The shared vocabulary every stage may import: the constants of cars_ml/__init__.py, the
# metric names of cars_ml/schema.py and the parameter declarations of cars_ml/params.py.
# Nothing else lives at the top level.
TOP_LEVEL = {"__init__.py", "schema.py", "params.py"}
# MLflow is imported only where runs, models and the registry are written.
MLFLOW_HOMES = (
    "cars_ml.tracking",
    "cars_ml.serving",
    "cars_ml.promotion.registry",
    "cars_ml.promotion.lock",
)
# Modules besides the run.py steps that talk to tracking, and why.
TRACKING_USERS = {
    "cars_ml.training.teacher": "downloads the registered teacher model",
    "cars_ml.tuning.objective": "each trial is a nested run",
    "cars_ml.tuning.storage": "closes the runs of dead workers; the default storage is beside the store",
    "cars_ml.pipeline.report": "logs the comparison table",
    "cars_ml.promotion.registry": "reads the registry (a quoted model name's filter)",
    "cars_ml.promotion.moves": "redacts the move's reason; the promote run's id",
    "cars_ml.serving.predict": "the predict step: loads the champion",
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


@cache
def imports_of(module: str) -> frozenset[str]:
    """Every module ``module`` imports (``from a import b`` counts ``a.b`` when it is a module)."""
    found = set()
    for node in ast.walk(ast.parse(MODULES[module].read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(
                f"{node.module}.{a.name}"
                for a in node.names
                if f"{node.module}.{a.name}" in MODULES
            )
    return frozenset(found)


def closure(module: str) -> set[str]:
    """``module`` and every cars_ml module it reaches through imports."""
    seen, todo = set(), [module]
    while todo:
        name = todo.pop()
        if name in seen or name not in MODULES:
            continue
        seen.add(name)
        todo.extend(i for i in imports_of(name) if i.startswith("cars_ml"))
    return seen


def within(name: str, *prefixes: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def test_every_module_is_in_a_stage_package():
    loose = sorted(p.name for p in PACKAGE.glob("*.py") if p.name not in TOP_LEVEL)
    assert not loose, f"put these into one of the stage packages {STAGES}: {loose}"
    packages = sorted(p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists())
    assert packages == sorted(STAGES)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_mlflow_is_imported_only_where_runs_and_the_registry_are_written(module):
    if within(module, *MLFLOW_HOMES):
        return
    assert not [i for i in imports_of(module) if within(i, "mlflow")], module


@pytest.mark.parametrize("module", sorted(MODULES))
def test_only_steps_and_the_listed_modules_talk_to_tracking(module):
    if within(module, "cars_ml.tracking") or module.endswith(".run") or module in TRACKING_USERS:
        return
    talks = [i for i in imports_of(module) if within(i, "cars_ml.tracking")]
    # Redaction is pure (text in, text out): anything may scrub a secret before showing it.
    assert not [i for i in talks if i != "cars_ml.tracking.redaction"], (
        f"{module} logs or reads runs: do it in its stage's run.py (or list it in TRACKING_USERS)"
    )


@pytest.mark.parametrize("package", ["cars_ml.data", "cars_ml.modeling", "cars_ml.export"])
def test_data_modeling_and_export_know_no_mlflow_optuna_or_stage_above(package):
    above = ("cars_ml.training", "cars_ml.tuning", "cars_ml.promotion", "cars_ml.pipeline")
    for module in [m for m in MODULES if within(m, package) and m != "cars_ml.data.run"]:
        for name in closure(module):
            bad = [i for i in imports_of(name) if within(i, "mlflow", "optuna", *above)]
            assert not bad, f"{module} reaches {bad} through {name}"
            assert not within(name, "cars_ml.tracking"), f"{module} reaches {name}"


def test_optuna_only_in_tuning_and_its_benchmark():
    for module in MODULES:
        if within(module, "cars_ml.tuning", "cars_ml.perf.tuning"):
            continue
        assert not [i for i in imports_of(module) if within(i, "optuna")], module


def test_serving_imports_no_training_code():
    """A serving container needs only what serving needs: no training, tuning or promotion."""
    forbidden = ("cars_ml.training", "cars_ml.tuning", "cars_ml.promotion", "cars_ml.pipeline")
    forbidden += ("cars_ml.data", "cars_ml.modeling", "tensorflow_datasets", "optuna")
    for module in [m for m in MODULES if within(m, "cars_ml.serving")]:
        reached = closure(module)
        bad = sorted(n for n in reached if within(n, *forbidden))
        bad += sorted(i for n in reached for i in imports_of(n) if within(i, "optuna"))
        assert not bad, f"{module} reaches {bad}"


def test_tracking_imports_no_stage():
    """The stages log through tracking; what a model consists of is theirs to say."""
    for module in [m for m in MODULES if within(m, "cars_ml.tracking")]:
        stages = {i for i in imports_of(module) if within(i, *(f"cars_ml.{s}" for s in STAGES))}
        assert {i for i in stages if not within(i, "cars_ml.tracking")} == set(), module


@pytest.mark.parametrize("package", ["cars_ml.measure", "cars_ml.layers"])
def test_the_bottom_layers_import_nothing_of_the_product(package):
    for module in [m for m in MODULES if within(m, package)]:
        product = {i for i in imports_of(module) if within(i, "cars_ml") and i != "cars_ml"}
        assert {i for i in product if not within(i, package)} == set(), module


def test_only_the_benchmark_step_imports_the_benchmark():
    """perf/ sits on top (it may import what it measures); the stages measure with measure/."""
    for module in [m for m in MODULES if not within(m, "cars_ml.perf")]:
        assert not [i for i in imports_of(module) if within(i, "cars_ml.perf")], module


def _package(name: str) -> str | None:
    parts = name.split(".")
    return parts[1] if parts[0] == "cars_ml" and len(parts) > 2 else None


def test_packages_import_each_other_one_way_lazy_imports_included():
    edges: dict[str, set[str]] = {}
    for module in MODULES:
        source = _package(module)
        for target in {_package(i) for i in imports_of(module) if i in MODULES} - {None, source}:
            edges.setdefault(source, set()).add(target)

    def reaches(start: str, goal: str) -> bool:
        seen, todo = set(), [start]
        while todo:
            here = todo.pop()
            if here == goal:
                return True
            if here not in seen:
                seen.add(here)
                todo.extend(edges.get(here, ()))
        return False

    cycles = sorted(f"{a} <-> {b}" for a in edges for b in edges[a] if reaches(b, a) and a < b)
    assert not cycles, f"packages that import each other: {cycles}"


def test_a_step_is_called_only_by_entry_points_the_pipeline_and_the_benchmark():
    """run.py modules are the steps; the pipeline composes them and perf/ benchmarks them."""
    for module in MODULES:
        steps = {i for i in imports_of(module) if i.endswith(".run") and i in MODULES}
        own = module.rsplit(".", 1)[0] + ".run"
        steps -= {own, module}
        if within(module, "cars_ml.pipeline", "cars_ml.perf"):
            continue
        assert not steps, f"{module} imports the steps {sorted(steps)}"


def test_no_entry_point_imports_another():
    scripts = {p.stem for p in (ROOT / "entrypoints").glob("*.py")}
    for path in (ROOT / "entrypoints").glob("*.py"):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module.split(".")[0])
        assert names & scripts <= {"_common"}, f"{path.name} imports {sorted(names & scripts)}"


def test_the_checker_sees_lazy_imports():
    """A rule that missed imports inside functions would pass on anything."""
    assert "cars_ml.tuning.storage" in imports_of("cars_ml.pipeline.pool")
    assert "cars_ml.training.run" in imports_of("cars_ml.pipeline.pool")


def test_every_function_fits_on_a_screen():
    """At most 60 lines a function in cars_ml/ and entrypoints/; the message lists the five
    longest, so the next to cut is in view."""
    lengths = []
    for path in sorted([*PACKAGE.rglob("*.py"), *(ROOT / "entrypoints").glob("*.py")]):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                where = f"{path.relative_to(ROOT)}:{node.lineno} {node.name}"
                lengths.append((node.end_lineno - node.lineno + 1, where))
    longest = sorted(lengths, reverse=True)[:5]
    assert longest[0][0] <= 60, f"functions over 60 lines (the longest five): {longest}"
