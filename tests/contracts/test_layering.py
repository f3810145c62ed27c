"""The layers of shared/DESIGN.md: saap/ (the library) imports neither stages/
nor flows/ nor the CLI; stages/ does not import flows/. Every import statement
counts, at any nesting level (a function-level import is still a dependency)."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
# layer -> the top-level packages it must not import
FORBIDDEN = {
    "saap": ("stages", "flows", "saap_cli"),
    "stages": ("flows", "saap_cli"),
    "flows": ("saap_cli",),
}


def imports(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.append((node.lineno, node.module))
    return found


def violations(layer: str) -> list[str]:
    bad = []
    for path in sorted((ROOT / layer).rglob("*.py")):
        for line, module in imports(path):
            if module.split(".")[0] in FORBIDDEN[layer]:
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    return bad


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layer_imports_only_the_layers_below(layer):
    assert not violations(layer)


def test_the_check_sees_function_level_imports(tmp_path, monkeypatch):
    package = tmp_path / "saap"
    package.mkdir()
    (package / "bad.py").write_text("def f():\n    from flows import compress\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert violations("saap") == ["saap/bad.py:2 imports flows"]
