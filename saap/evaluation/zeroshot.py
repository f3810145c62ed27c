"""Zero-shot accuracy with lm-eval on the seven tasks, read from ``data/eval``.

Each local task *includes* lm-eval's own built-in YAML of the same name (so its
prompt, choices, target and metrics are lm-eval's, not a copy) and overrides only
where the documents come from: a local JSONL file instead of the Hub. BoolQ is
the one field mapping: lm-eval's task reads SuperGLUE's ``label`` (0/1), the
local file has the original BoolQ ``answer`` (bool), so ``label = int(answer)``
is added to a derived copy of the records.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from pathlib import Path

import numpy as np

from saap.errors import DataError

log = logging.getLogger(__name__)

# local task -> lm-eval built-in YAML (relative to lm_eval/tasks)
BUILTIN_TASKS = {
    "boolq": "super_glue/boolq/default.yaml",
    "piqa": "piqa/piqa.yaml",
    "hellaswag": "hellaswag/hellaswag.yaml",
    "winogrande": "winogrande/default.yaml",
    "arc_easy": "arc/arc_easy.yaml",
    "arc_challenge": "arc/arc_challenge.yaml",
    "openbookqa": "openbookqa/openbookqa.yaml",
}
TASK_PREFIX = "saap_"


def lm_eval_tasks_dir() -> Path:
    import lm_eval

    return Path(lm_eval.__file__).parent / "tasks"


def check_tasks(tasks: list[str]) -> None:
    unknown = [t for t in tasks if t not in BUILTIN_TASKS]
    if unknown:
        raise DataError(
            f"unknown task(s) {unknown}; known tasks: {sorted(BUILTIN_TASKS)}"
        )


def local_records(eval_dir: Path, task: str) -> list[dict]:
    """The task's records from ``data/eval``, mapped to lm-eval's field names."""
    path = Path(eval_dir) / f"{task}.jsonl"
    if not path.is_file():
        raise DataError(
            f"{path} is missing; the assets stage writes it (dvc repro assets)"
        )
    records = [json.loads(line) for line in path.read_text().splitlines() if line]
    if task == "boolq":
        for record in records:
            record["label"] = int(record["answer"])
    return records


def write_task_configs(eval_dir: Path, tasks: list[str], out_dir: Path) -> list[str]:
    """Write one YAML per task (and derived data where needed); return task names."""
    check_tasks(tasks)
    builtin = lm_eval_tasks_dir()
    names = []
    for task in tasks:
        records = local_records(eval_dir, task)
        data_file = out_dir / f"{task}.jsonl"
        with data_file.open("w") as handle:
            for record in records:
                handle.write(json.dumps(record) + "\n")
        name = TASK_PREFIX + task
        config = {
            "include": str(builtin / BUILTIN_TASKS[task]),
            "task": name,
            "tag": [],
            "dataset_path": "json",
            "dataset_name": None,
            "dataset_kwargs": {"data_files": {"validation": str(data_file)}},
            "training_split": None,
            "validation_split": "validation",
            "test_split": None,
        }
        (out_dir / f"{name}.yaml").write_text(json.dumps(config, indent=1))
        names.append(name)
    return names


def task_objects(eval_dir: Path, tasks: list[str], work_dir: Path) -> dict:
    """lm-eval Task objects of the local tasks, keyed by local task name."""
    from lm_eval.tasks import TaskManager

    names = write_task_configs(eval_dir, tasks, work_dir)
    manager = TaskManager(include_path=str(work_dir), include_defaults=False)
    loaded = manager.load(names)["tasks"]
    return {name.removeprefix(TASK_PREFIX): loaded[name] for name in names}


def evaluate_zero_shot(
    model,
    tokenizer,
    eval_dir: Path,
    tasks: list[str],
    limit: int | None | dict[str, int | None],
    batch_size: int = 8,
) -> tuple[dict[str, dict], dict[str, dict[str, list]]]:
    """Per task: lm-eval's acc (and acc_norm where the task defines it) with the
    standard error, and the per-document results ``{task: {"doc_id": [...],
    "acc": [0/1...], "acc_norm": [...]}}`` that paired comparisons resample.

    ``limit`` is the first N documents of every task, or a per-task mapping."""
    limits = limit if isinstance(limit, dict) else {task: limit for task in tasks}
    scores: dict[str, dict] = {}
    documents: dict[str, dict[str, list]] = {}
    # lm-eval takes one limit per call: one call per distinct limit
    for value in dict.fromkeys(limits[task] for task in tasks):
        group = [task for task in tasks if limits[task] == value]
        group_scores, group_docs = _evaluate_group(
            model, tokenizer, eval_dir, group, value, batch_size
        )
        scores |= group_scores
        documents |= group_docs
    return {t: scores[t] for t in tasks}, {t: documents[t] for t in tasks}


def _evaluate_group(
    model, tokenizer, eval_dir: Path, tasks: list[str], limit, batch_size: int
) -> tuple[dict[str, dict], dict[str, dict[str, list]]]:
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    check_tasks(tasks)
    lm = HFLM(
        pretrained=model, tokenizer=tokenizer, batch_size=batch_size, backend="causal"
    )
    with tempfile.TemporaryDirectory(prefix="saap-tasks-") as tmp:
        loaded = task_objects(eval_dir, tasks, Path(tmp))
        names = [TASK_PREFIX + task for task in loaded]
        output = simple_evaluate(
            model=lm,
            tasks=list(loaded.values()),
            limit=limit,
            num_fewshot=0,
            log_samples=True,
            bootstrap_iters=0,
            random_seed=0,
            numpy_random_seed=0,
            torch_random_seed=0,
            fewshot_random_seed=0,
        )
    scores: dict[str, dict] = {}
    documents: dict[str, dict[str, list]] = {}
    for name in names:
        task = name.removeprefix(TASK_PREFIX)
        samples = sorted(output["samples"][name], key=lambda s: s["doc_id"])
        metrics = [m for m in ("acc", "acc_norm") if m in samples[0]]
        documents[task] = {"doc_id": [int(s["doc_id"]) for s in samples]} | {
            m: [float(s[m]) for s in samples] for m in metrics
        }
        scores[task] = task_scores(documents[task])
    return scores, documents


def task_scores(documents: dict[str, list]) -> dict:
    """acc / acc_norm of one task with standard errors, from per-document results;
    ``metric`` names the one the mean uses (acc_norm where the task has it, as
    the pruning papers and public leaderboards report)."""
    n = len(documents["doc_id"])
    scores: dict = {"n": n}
    for metric in ("acc", "acc_norm"):
        if metric in documents:
            values = np.asarray(documents[metric], dtype=np.float64)
            scores[metric] = float(values.mean())
            # standard error of the mean (sample std), as lm-eval reports it
            spread = float(values.std(ddof=1)) if n > 1 else 0.0
            scores[f"{metric}_stderr"] = spread / math.sqrt(n)
    scores["metric"] = "acc_norm" if "acc_norm" in documents else "acc"
    return scores


def mean_score(scores: dict[str, dict]) -> float | None:
    """Macro mean over tasks of each task's reported metric (acc_norm or acc)."""
    if not scores:
        return None
    return sum(s[s["metric"]] for s in scores.values()) / len(scores)
