"""Helpers of the flow tests: a copy of the project with tiny settings."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def set_params(project: Path, **sections) -> None:
    """Update sections of the project's params.yaml."""
    path = project / "params.yaml"
    params = yaml.safe_load(path.read_text())
    for section, values in sections.items():
        params[section].update(values)
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def copy_project(
    root: Path, tiny_model_dir: Path, text_dir: Path, eval_dir: Path, extra=()
) -> None:
    """The pipeline's code, dvc.yaml and params.yaml under ``root``, reading the
    tiny model and fixture data (no downloads)."""
    for name in ("saap", "stages", "flows", *extra):
        shutil.copytree(
            ROOT / name, root / name, ignore=shutil.ignore_patterns("__pycache__")
        )
    for name in ("dvc.yaml", "params.yaml", ".gitignore"):
        shutil.copy(ROOT / name, root / name)
    data = root.parent / f"{root.name}-data"
    shutil.copytree(eval_dir, data / "eval")
    shutil.copytree(text_dir, data / "text")
    alpaca = data / "alpaca.json"
    alpaca.write_text(
        json.dumps([{"instruction": "say hi", "input": "", "output": "hi"}] * 8)
    )
    set_params(
        root,
        assets={
            "model_source": f"dir:{tiny_model_dir}",
            "data_source": f"dir:{data}",
            "instruct_source": f"file:{alpaca}",
        },
    )
