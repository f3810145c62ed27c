"""Every DVC stage lists, as deps, the project code it runs: the stage module and
every saap/stages module it imports, directly or through others (function-level
imports included), so a code change re-runs exactly the stages it affects."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("saap", "stages")


def module_file(module: str) -> Path | None:
    """The source file of a project module, or None for a third-party one."""
    if module.split(".")[0] not in PACKAGES:
        return None
    base = ROOT / Path(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported_modules(path: Path) -> set[str]:
    """Modules named by every import statement of a file (any nesting level)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
            # `from saap.importance import stats` names a module too
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def code_closure(module: str) -> set[Path]:
    """The project files ``module`` runs: itself and what it imports, transitively
    (a package's ``__init__`` runs when one of its modules is imported)."""
    seen: set[Path] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        parts = name.split(".")
        for depth in range(1, len(parts) + 1):
            path = module_file(".".join(parts[:depth]))
            if path is None or path in seen:
                continue
            seen.add(path)
            todo.extend(imported_modules(path))
    return {p.relative_to(ROOT) for p in seen if not docstring_only(p)}


def docstring_only(path: Path) -> bool:
    """A package ``__init__`` holding nothing but its docstring runs no code."""
    body = ast.parse(path.read_text()).body
    return all(
        isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
        for node in body
    )


def pipeline_stages() -> dict[str, dict]:
    stages = {}
    for dvc_file in (ROOT / "dvc.yaml", ROOT / "compare" / "dvc.yaml"):
        for name, body in yaml.safe_load(dvc_file.read_text())["stages"].items():
            stages[f"{dvc_file.relative_to(ROOT)}:{name}"] = body.get("do", body)
    return stages


def covered(path: Path, deps: list[str]) -> bool:
    text = path.as_posix()
    return any(text == dep or text.startswith(dep.rstrip("/") + "/") for dep in deps)


@pytest.mark.parametrize("stage", sorted(pipeline_stages()))
def test_stage_deps_cover_the_code_it_runs(stage):
    body = pipeline_stages()[stage]
    module = re.search(r"python -m (stages\.\w+)", body["cmd"])
    assert module, f"{stage}: its cmd does not run a stages module"
    missing = sorted(
        str(path)
        for path in code_closure(module.group(1))
        if not covered(path, body.get("deps", []))
    )
    assert not missing, f"{stage} runs {missing} but dvc.yaml does not list them"


def test_closure_follows_function_level_imports():
    # stages.compare imports stages.importance inside a function
    assert Path("stages/importance.py") in code_closure("stages.compare")
    assert Path("saap/params.py") in code_closure("stages.assets")


def test_bench_stages_depend_on_every_bench_setting_but_the_variant_list():
    """The bench stages list their params key by key, leaving out only
    ``bench.variants``: benchmarking one more variant does not re-run the
    others, and any other bench setting does."""
    from saap.params import BenchParams

    listed = set(pipeline_stages()["dvc.yaml:bench"]["params"])
    expected = {f"bench.{key}" for key in BenchParams.model_fields} - {"bench.variants"}
    assert listed == expected


def test_the_dense_bench_record_comes_from_the_gated_variants_bench():
    """bench-dense times nothing: it reads the dense rounds of the gated
    variant's bench record, so it depends on that record (and through it on
    every bench setting) and re-runs when the gated variant changes."""
    body = pipeline_stages()["dvc.yaml:bench-dense"]
    record = "metrics/bench/${gates.variant}.json"  # DVC fills in params.yaml's
    assert f"--from-interleaved {record}" in body["cmd"]
    assert record in body["deps"]
    assert "gates.variant" in body["params"]
    assert not any(
        p.startswith("bench.") and p != "bench.threads" for p in body["params"]
    )


def test_bench_stage_runs_the_variants_of_params_yaml():
    body = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["bench"]
    assert body["foreach"] == "${bench.variants}"
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    gated = params["gates"]["variant"]
    assert gated in params["bench"]["variants"]


@pytest.mark.parametrize("stage", ["dvc.yaml:evaluate-dense", "dvc.yaml:evaluate"])
def test_evaluate_stages_depend_on_every_evaluate_setting_but_the_variant_list(stage):
    """As for bench: evaluating one more variant re-runs no other evaluation;
    any other evaluate setting (the profile included) re-runs them all."""
    from saap.params import EvaluateParams

    listed = set(pipeline_stages()[stage]["params"])
    expected = {f"evaluate.{key}" for key in EvaluateParams.model_fields}
    assert listed == expected - {"evaluate.variants"}


def test_evaluate_stage_runs_the_variants_of_params_yaml():
    body = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["evaluate"]
    assert body["foreach"] == "${evaluate.variants}"
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert params["gates"]["variant"] in params["evaluate"]["variants"]


def test_bytecode_caches_do_not_make_stages_stale(tmp_path):
    """In a real DVC repository with this project's .dvcignore: a stage whose
    dep is a code folder stays up to date when an import writes a bytecode cache
    into that folder."""
    import shutil
    import subprocess
    import sys

    dvc = [sys.executable, "-m", "dvc"]
    repo = tmp_path / "repo"
    (repo / "pkg").mkdir(parents=True)
    (repo / "pkg" / "mod.py").write_text("VALUE = 1\n")
    shutil.copy(ROOT / ".dvcignore", repo / ".dvcignore")

    def run(*args: str) -> str:
        done = subprocess.run(
            args, cwd=repo, capture_output=True, text=True, check=True
        )
        return done.stdout

    run("git", "init", "-q")
    run(*dvc, "init", "-q")
    run(*dvc, "stage", "add", "-q", "-n", "s", "-d", "pkg", "-o", "out.txt",
        "cp pkg/mod.py out.txt")  # fmt: skip
    run(*dvc, "repro", "-q")
    (repo / "pkg" / "__pycache__").mkdir()
    (repo / "pkg" / "__pycache__" / "mod.cpython-311.pyc").write_bytes(b"\x00" * 16)
    (repo / "pkg" / "stray.pyc").write_bytes(b"\x00" * 16)
    assert "up to date" in run(*dvc, "status")
    # a source change still makes the stage stale
    (repo / "pkg" / "mod.py").write_text("VALUE = 2\n")
    assert "modified:" in run(*dvc, "status") and "pkg" in run(*dvc, "status")
