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
    from lm_eval.tasks import TaskManager

    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    check_tasks(tasks)
    lm = continuation_lm(HFLM)(
        pretrained=model, tokenizer=tokenizer, batch_size=batch_size, backend="causal"
    )
    with tempfile.TemporaryDirectory(prefix="saap-tasks-") as tmp:
        loaded = task_objects(eval_dir, tasks, Path(tmp))
        names = [TASK_PREFIX + task for task in loaded]
        output = simple_evaluate(
            model=lm,
            tasks=list(loaded.values()),
            # the tasks are built already; without a manager of its own,
            # simple_evaluate indexes lm-eval's ~14,000 task YAML files (9 s)
            task_manager=TaskManager(include_path=tmp, include_defaults=False),
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


def continuation_lm(hflm: type) -> type:
    """lm-eval's ``HFLM`` scoring only the rows it reads.

    lm-eval's own loglikelihood forms the logits and their log-softmax at every
    position of every padded request (``(B, T, 49,152)`` for SmolLM2) and then
    keeps the few continuation rows. This subclass runs the decoder once per
    batch and projects only the continuation rows' final hidden states, where
    the model's logits are exactly that projection (:func:`decoder_and_head`);
    the requests, their order, batches, truncation, the one-token cache, the
    log-softmax dtype and the (log-likelihood, greedy) answers are lm-eval's.
    Any other model, backend or an ``auto`` batch size takes lm-eval's path."""
    import torch.nn.functional as F
    from lm_eval.models.utils import Collator

    from saap.model import decoder_and_head

    class ContinuationLM(hflm):
        def _loglikelihood_tokens(
            self, requests, disable_tqdm: bool = False, override_bs=None
        ):
            parts = decoder_and_head(self.model)
            if (
                parts is None
                or self.backend != "causal"
                or self.batch_size == "auto"
                or override_bs is not None
            ):
                return super()._loglikelihood_tokens(
                    requests, disable_tqdm=disable_tqdm, override_bs=override_bs
                )
            return self._continuation_rows(requests, *parts)

        def _continuation_rows(self, requests, decoder, head):
            import torch

            # lm-eval's order and grouping (HFLM._loglikelihood_tokens)
            re_ord = Collator(
                requests,
                sort_fn=lambda r: (-len(r[1] + r[2]), tuple(r[1] + r[2])),
                group_by="contexts" if self.logits_cache else None,
                group_fn=lambda r: r[-2] + r[-1][:-1],
            )
            res = []
            for chunk in re_ord.get_batched(n=self.batch_size):
                inps = []
                for _, context, continuation in chunk:
                    if not context or not continuation:
                        raise ValueError("an empty context or continuation")
                    inps.append((context + continuation)[-(self.max_length + 1) :][:-1])
                width = max(len(inp) for inp in inps)
                batch = torch.zeros(len(inps), width, dtype=torch.long)
                for row, inp in enumerate(inps):
                    batch[row, : len(inp)] = torch.tensor(inp, dtype=torch.long)
                spans = [
                    (len(inp) - len(cont), len(inp))
                    for inp, (_, _, cont) in zip(inps, chunk, strict=True)
                ]
                with (
                    torch.no_grad(),
                    torch.autocast(
                        device_type=self.device.type,
                        dtype=self.mixed_precision_dtype,
                        enabled=self.mixed_precision_dtype is not None,
                    ),
                ):
                    hidden = decoder(input_ids=batch.to(self.device)).last_hidden_state
                    rows = torch.cat(
                        [hidden[b, lo:hi] for b, (lo, hi) in enumerate(spans)]
                    )
                    logits = head(rows)
                logprobs = F.log_softmax(logits, dim=-1, dtype=self.softmax_dtype)
                start = 0
                for (request_str, context, cont), (lo, hi) in zip(
                    chunk, spans, strict=True
                ):
                    selected = logprobs[start : start + hi - lo].unsqueeze(0)
                    start += hi - lo
                    greedy = selected.argmax(dim=-1)
                    # as lm-eval: one answer per request sharing this row
                    for request_str_, cont_toks, cached in re_ord.get_cache(
                        req_str=request_str,
                        cxt_toks=context,
                        cont_toks=cont,
                        logits=selected,
                    ):
                        target = torch.tensor(
                            cont_toks, dtype=torch.long, device=cached.device
                        ).unsqueeze(0)
                        max_equal = (greedy[:, -target.shape[1] :] == target).all()
                        picked = torch.gather(cached, 2, target.unsqueeze(-1))
                        answer = (float(picked.squeeze(-1).sum()), bool(max_equal))
                        res.append(answer)
                        if request_str_ is not None:
                            self.cache_hook.add_partial(
                                "loglikelihood", request_str_, answer
                            )
            return re_ord.get_original(res)

    ContinuationLM.__name__ = ContinuationLM.__qualname__ = "ContinuationLM"
    return ContinuationLM


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
