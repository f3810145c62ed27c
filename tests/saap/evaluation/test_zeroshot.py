"""The local lm-eval tasks render exactly as lm-eval's built-in tasks."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import datasets
import pytest
import torch
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


def _lms(model_dir):
    from lm_eval.models.huggingface import HFLM

    from saap.evaluation.zeroshot import continuation_lm
    from saap.model import load_model

    model, tokenizer = load_model(model_dir, dtype=torch.float32)
    kwargs = dict(pretrained=model, tokenizer=tokenizer, batch_size=3)
    return HFLM(**kwargs), continuation_lm(HFLM)(**kwargs)


def _requests(seed: int = 0):
    """(context, continuation) token requests of assorted lengths, with groups
    sharing a context and a one-token continuation (lm-eval's cached case)."""
    import random

    rng = random.Random(seed)
    requests = []
    for index in range(7):
        context = [rng.randrange(5, 200) for _ in range(rng.randrange(1, 30))]
        for _ in range(rng.randrange(1, 4)):
            continuation = [rng.randrange(5, 200) for _ in range(rng.randrange(1, 6))]
            requests.append(((f"c{index}", str(continuation)), context, continuation))
        # two one-token continuations of the same context
        requests.append(((f"c{index}", "a"), context, [7]))
        requests.append(((f"c{index}", "b"), context, [9]))
    return requests


def test_continuation_rows_score_as_lm_eval(tiny_model_dir):
    """Projecting only the continuation rows gives lm-eval's own answers: the
    same log-likelihoods (float32 tiny model) and greedy flags, in request order."""
    reference, rows = _lms(tiny_model_dir)
    requests = _requests()
    expected = reference._loglikelihood_tokens(requests, disable_tqdm=True)
    got = rows._loglikelihood_tokens(requests, disable_tqdm=True)
    assert len(got) == len(expected) == len(requests)
    for (ll, greedy), (ll_ref, greedy_ref) in zip(got, expected, strict=True):
        assert ll == pytest.approx(ll_ref, rel=1e-5, abs=1e-5)
        assert greedy == greedy_ref
    # the greedy case is exercised: a continuation that is the model's argmax
    context = requests[0][1]
    best = int(rows.model(torch.tensor([context])).logits[0, -1].argmax())
    ((_, greedy),) = rows._loglikelihood_tokens([(("x", "y"), context, [best])])
    assert greedy


def test_continuation_rows_fall_back_where_logits_are_more_than_a_projection(
    tiny_model_dir, monkeypatch
):
    """A model whose logits are not its head applied to the final hidden state
    (softcapping, logit scaling) is scored by lm-eval's own path."""
    reference, rows = _lms(tiny_model_dir)
    # a config that declares a logit transform (here inert: LLaMA applies none,
    # so lm-eval's answers stay the reference)
    monkeypatch.setattr(
        rows.model.config, "final_logit_softcapping", 30.0, raising=False
    )
    called = []
    monkeypatch.setattr(
        type(rows), "_continuation_rows", lambda *a: called.append(1) or []
    )
    requests = _requests(1)
    got = rows._loglikelihood_tokens(requests, disable_tqdm=True)
    assert not called
    assert got == reference._loglikelihood_tokens(requests, disable_tqdm=True)


def test_zero_shot_indexes_only_its_own_tasks(tiny_model_dir, eval_dir, monkeypatch):
    """evaluate_zero_shot hands simple_evaluate a manager of its local tasks:
    lm-eval's ~14,000 bundled task files (9 s of YAML parsing here) are never
    indexed; acc and acc_norm still come per document."""
    from lm_eval.tasks._index import TaskIndex

    from saap.evaluation.zeroshot import evaluate_zero_shot, lm_eval_tasks_dir
    from saap.model import load_model

    scanned = []
    build = TaskIndex.build

    def recording_build(paths, **kwargs):
        paths = list(paths)
        scanned.extend(Path(p).resolve() for p in paths)
        return build(paths, **kwargs)

    monkeypatch.setattr(TaskIndex, "build", staticmethod(recording_build))
    model, tokenizer = load_model(tiny_model_dir, dtype=torch.float32)
    scores, documents = evaluate_zero_shot(
        model, tokenizer, eval_dir, ["piqa", "boolq"], 3, batch_size=4
    )
    assert scanned, "no task index was built"
    builtin = lm_eval_tasks_dir().resolve()
    assert not [p for p in scanned if p == builtin or builtin in p.parents]
    assert documents["piqa"]["doc_id"] == [0, 1, 2]
    assert set(documents["piqa"]) == {"doc_id", "acc", "acc_norm"}
    assert set(documents["boolq"]) == {"doc_id", "acc"}
