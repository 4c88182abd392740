"""dvc.yaml's code dependencies cannot drift from the code: every module a stage script imports,
directly or through others, lies in one of the stage's ``deps`` (package ``__init__`` files
only re-export; the stage shell is listed below). A missing one would let DVC skip a stage
whose code changed."""

from __future__ import annotations

import ast
from pathlib import Path

import grimp
import pytest

from visrec.workflows.pipeline import covers, read_stages

REPO = Path(__file__).resolve().parents[1]
STAGES = read_stages(REPO)
# The shell every stage runs in: it turns params.yaml into a Config (whose values DVC tracks as
# `params`), logs and tracks the run. Listing it would rerun the whole pipeline for a log line.
SHELL = {"visrec", "visrec.config", "visrec.config.loading", "visrec.config.model_schema", "visrec.config.schema",
         "visrec.config.validation", "visrec.tracking", "visrec.utils", "visrec.utils.logs", "visrec.workflows",
         "visrec.workflows.stage_runner"}


def _module_file(module: str) -> str:
    base = REPO / "src" / Path(*module.split("."))
    path = base / "__init__.py" if base.is_dir() else base.with_suffix(".py")
    return str(path.relative_to(REPO))


def _imported_visrec_modules(script: Path) -> set[str]:
    modules = set()
    for node in ast.walk(ast.parse(script.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "visrec":
            modules.add(node.module)
        elif isinstance(node, ast.Import):
            modules |= {a.name for a in node.names if a.name.split(".")[0] == "visrec"}
    return modules


def import_closure(graph, roots: set[str]) -> set[str]:
    """Every visrec module that runs when ``roots`` are imported: their imports, transitively,
    and the packages (``__init__``) each one sits in."""
    seen: set[str] = set()
    todo = list(roots)
    while todo:
        module = todo.pop()
        if module in seen or not module.startswith("visrec"):
            continue
        seen.add(module)
        todo.extend(graph.find_modules_directly_imported_by(module))
        if "." in module:
            todo.append(module.rsplit(".", 1)[0])
    return seen


@pytest.fixture(scope="module")
def graph():
    return grimp.build_graph("visrec", cache_dir=None)


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_stage_deps_cover_its_code(stage, graph):
    script = REPO / "stages" / f"{stage}.py"
    deps = STAGES[stage]["deps"]
    assert covers(deps, str(script.relative_to(REPO))), f"dvc.yaml: stage {stage} does not depend on {script}"
    modules = import_closure(graph, _imported_visrec_modules(script)) - SHELL
    missing = sorted(f for f in map(_module_file, modules) if not covers(deps, f) and not f.endswith("__init__.py"))
    assert not missing, f"dvc.yaml: stage {stage} imports code it does not list in deps: {missing}"


def test_a_missing_dependency_is_found(graph):
    closure = import_closure(graph, {"visrec.workflows.build_index"})
    assert {"visrec.evaluation.system_eval", "visrec.imaging", "visrec", "visrec.workflows"} <= closure
    files = {_module_file(m) for m in closure}
    assert not covers(["src/visrec/index"], "src/visrec/imaging.py") and "src/visrec/imaging.py" in files
