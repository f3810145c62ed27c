"""The local lm-eval tasks render exactly as lm-eval's built-in tasks."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import datasets
import pytest
from lm_eval.tasks._yaml_loader import load_yaml
from lm_eval.utils import apply_template

from saap.errors import DataError
from saap.evaluation.zeroshot import BUILTIN_TASKS, lm_eval_tasks_dir, task_objects

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[3]


def normalised(value):
    """lm-eval turns digit strings into indices; compare on that footing."""
    return int(value) if isinstance(value, str) and value.strip().isdigit() else value


def render_builtin(config: dict, doc: dict) -> tuple:
    """Context, choices and target of ``doc`` under a built-in config, computed
    independently of lm-eval's Task classes."""

    def field(spec, as_list=False):
        if callable(spec):
            return spec(doc)
        if isinstance(spec, list):
            return spec
        if isinstance(spec, str) and spec in doc:
            return doc[spec]
        rendered = apply_template(spec, doc)
        return ast.literal_eval(rendered) if as_list else rendered

    target = field(config["doc_to_target"])
    choices = field(config["doc_to_choice"], as_list=True)
    return field(config["doc_to_text"]), list(choices), normalised(target)


def builtin_docs(config: dict, records: list[dict]) -> list[dict]:
    """Apply the built-in's own process_docs, if it has one, to the documents."""
    if "process_docs" in config:
        return list(config["process_docs"](datasets.Dataset.from_list(records)))
    return records


def compare_task(eval_dir: Path, task: str, tmp_path: Path, count: int) -> None:
    local = task_objects(eval_dir, [task], tmp_path)[task]
    config = load_yaml(lm_eval_tasks_dir() / BUILTIN_TASKS[task])
    records = [
        json.loads(x) for x in (eval_dir / f"{task}.jsonl").read_text().splitlines()
    ]
    if task == "boolq":  # the one documented field mapping: SuperGLUE's label
        for record in records:
            record["label"] = int(record["answer"])
    expected_docs = builtin_docs(config, records)[:count]
    local_docs = list(local.validation_docs())[:count]
    assert len(local_docs) == count
    for local_doc, doc in zip(local_docs, expected_docs, strict=True):
        text, choices, target = render_builtin(config, doc)
        assert local.doc_to_text(local_doc) == text
        assert list(local.doc_to_choice(local_doc)) == choices
        assert normalised(local.doc_to_target(local_doc)) == target
    metrics = {m["metric"] for m in local.config.metric_list}
    assert metrics == {m["metric"] for m in config["metric_list"]}
    assert local.config.output_type == config["output_type"] == "multiple_choice"


@pytest.mark.parametrize("task", list(BUILTIN_TASKS))
def test_local_task_renders_as_builtin(eval_dir, task, tmp_path):
    compare_task(eval_dir, task, tmp_path, count=6)


@pytest.mark.slow
@pytest.mark.parametrize("task", list(BUILTIN_TASKS))
def test_local_task_renders_as_builtin_on_real_data(real_assets, task, tmp_path):
    compare_task(real_assets / "data/eval", task, tmp_path, count=20)


def test_unknown_task_lists_known(eval_dir, tmp_path):
    with pytest.raises(DataError, match="unknown task.*'mmlu'.*known tasks"):
        task_objects(eval_dir, ["mmlu"], tmp_path)


def test_missing_data_file_names_the_stage(tmp_path):
    with pytest.raises(DataError, match="assets stage writes it"):
        task_objects(tmp_path / "no_eval", ["piqa"], tmp_path)
