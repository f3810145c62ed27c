"""One checkpoint's evaluation as JSON-ready dicts (schema saap.eval/v2), and the
per-document / per-window results that paired comparisons resample.

Metrics schema (``metrics/eval/<variant>.json``)::

    {
      "schema": "saap.eval/v2",
      "variant": "pruned", "checkpoint": "models/pruned", "params": 107611776,
      "dtype": "bfloat16", "profile": "quick",
      "eval_config_hash": "3f2a...",       # settings + the data files read
      "settings": {...},                    # the resolved evaluation settings
      "perplexity": {"ptb": 190.2, "wiki": 30.1, "c4": 40.5},
      "perplexity_windows": {"ptb": 200, ...}, "ppl_seq_len": 128,
      "in_domain": [],                      # corpora the model trained on the
                                            # domain of (["ptb"]: ptb_train)
      "zero_shot": {"piqa": {"acc": 0.61, "acc_stderr": 0.02, "acc_norm": 0.6,
                             "acc_norm_stderr": 0.02, "n": 100,
                             "metric": "acc_norm"}, ...},
      "mean_acc": 0.45,                     # macro mean of each task's `metric`
      "mean_acc_metric": {"piqa": "acc_norm", "boolq": "acc", ...},
      "fidelity": {"corpus": "c4", "windows": 64, "tokens": 8128,
                   "kl": {"value", "lower", "upper", "half_width", ...},
                   "top1_agreement": {...}},          # null for the dense model
      "resamples": 2000, "seed": 0,
      "generations": [{"prompt": "...", "output": "..."}],
      "seconds": {"perplexity": 20.1, "zero_shot": 140.2, "fidelity": 3.1, ...}
    }

Documents schema (``metrics/eval/<variant>.documents.json``)::

    {
      "schema": "saap.eval-documents/v1", "eval_config_hash": "3f2a...",
      "zero_shot": {"piqa": {"doc_id": [0, 1, ...], "acc": [1.0, 0.0, ...],
                             "acc_norm": [...]}, ...},
      "perplexity": {"ptb": [4.91, 5.20, ...], ...},  # mean NLL of each window
      "fidelity": {"kl": [...], "top1_agreement": [...]}
    }
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

import torch

from saap.data import CORPUS_FILES, evaluation_documents
from saap.errors import DataError
from saap.evaluation.generation import generate_samples
from saap.evaluation.intervals import mean_interval
from saap.evaluation.perplexity import fidelity, window_nll, windows_of
from saap.evaluation.zeroshot import evaluate_zero_shot, mean_score
from saap.model import count_params
from saap.params import EvaluationSettings

log = logging.getLogger(__name__)

SCHEMA = "saap.eval/v2"
DOCUMENTS_SCHEMA = "saap.eval-documents/v1"


def corpus_windows(tokenizer, text_dir: Path, corpus: str, seq_len: int, max_windows):
    """Non-overlapping windows of the evaluation text of ``corpus``."""
    text = "\n\n".join(evaluation_documents(text_dir, corpus))
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return windows_of(ids, seq_len, max_windows)


def eval_config_hash(
    settings: EvaluationSettings,
    text_dir: Path,
    eval_dir: Path,
    dtype: str | None = None,
) -> str:
    """sha256 of the settings that decide the numbers (with the dtype the model
    actually ran in, where ``auto`` chose one) and of every data file the
    evaluation reads: two evaluations with equal hashes saw the same documents."""
    payload = settings.config_payload() | ({"dtype": dtype} if dtype else {})
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True).encode())
    files = [Path(eval_dir) / f"{task}.jsonl" for task in settings.tasks]
    corpora = {*settings.ppl_corpora, settings.fidelity_corpus}
    files += [Path(text_dir) / CORPUS_FILES[c] for c in sorted(corpora)]
    for path in files:
        if not path.is_file():
            raise DataError(
                f"{path} is missing; the assets stage writes it (dvc repro assets)"
            )
        digest.update(path.name.encode())
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()[:16]


def trained_in_domain(checkpoint_dir: Path) -> list[str]:
    """Evaluation corpora a checkpoint's recovery trained on the domain of, as
    its ``saap.json`` records them (the finetune stage writes ``in_domain``
    where the distillation text held e.g. PTB's train split); [] otherwise."""
    info = Path(checkpoint_dir) / "saap.json"
    if not info.is_file():
        return []
    record = json.loads(info.read_text()).get("finetune") or {}
    return sorted(record.get("in_domain") or [])


def evaluate_model(
    model,
    tokenizer,
    text_dir: Path,
    eval_dir: Path,
    settings: EvaluationSettings,
    variant: str,
    checkpoint: str,
    reference=None,
    in_domain: list[str] | None = None,
) -> tuple[dict, dict]:
    """Perplexity, zero-shot accuracy, fidelity to ``reference`` (the dense
    model; skipped when None) and generations of an in-memory model;
    ``in_domain`` names the corpora whose perplexity is in-domain for it
    (:func:`trained_in_domain`).

    Returns the metrics and the per-document results (schemas above)."""
    seconds: dict[str, float] = {}
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    config_hash = eval_config_hash(settings, text_dir, eval_dir, dtype)
    documents: dict = {"schema": DOCUMENTS_SCHEMA, "eval_config_hash": config_hash}

    started = time.perf_counter()
    ppl, counts, nll_of = {}, {}, {}
    for corpus in settings.ppl_corpora:
        windows = corpus_windows(
            tokenizer,
            text_dir,
            corpus,
            settings.ppl_seq_len,
            settings.windows_of(corpus),
        )
        nll = window_nll(model, windows, progress=True, desc=f"ppl {corpus}")
        ppl[corpus] = float(torch.exp(nll.mean()))
        counts[corpus] = int(windows.shape[0])
        nll_of[corpus] = [round(float(v), 6) for v in nll]
        log.info(
            "%s perplexity on %s: %.2f%s",
            variant,
            corpus,
            ppl[corpus],
            " (in-domain: trained on its domain)"
            if corpus in (in_domain or [])
            else "",
        )
    documents["perplexity"] = nll_of
    seconds["perplexity"] = time.perf_counter() - started

    started = time.perf_counter()
    fidelity_metrics = None
    if reference is not None:
        windows = corpus_windows(
            tokenizer,
            text_dir,
            settings.fidelity_corpus,
            settings.ppl_seq_len,
            settings.fidelity_windows,
        )
        kl, agreement = fidelity(reference, model, windows, progress=True)
        kl_interval = mean_interval(kl.numpy(), settings.resamples, settings.seed)
        top1 = mean_interval(agreement.numpy(), settings.resamples, settings.seed)
        fidelity_metrics = {
            "corpus": settings.fidelity_corpus,
            "windows": int(windows.shape[0]),
            "tokens": int(windows.shape[0] * windows.shape[1]),
            "kl": kl_interval.as_dict(),
            "top1_agreement": top1.as_dict(),
        }
        documents["fidelity"] = {
            "kl": [round(float(v), 6) for v in kl],
            "top1_agreement": [round(float(v), 6) for v in agreement],
        }
        log.info(
            "%s fidelity: KL %.4f [%.4f, %.4f], top-1 agreement %.3f",
            variant,
            kl_interval.value,
            kl_interval.lower,
            kl_interval.upper,
            top1.value,
        )
    seconds["fidelity"] = time.perf_counter() - started

    started = time.perf_counter()
    zero_shot, per_document = {}, {}
    if settings.tasks:
        zero_shot, per_document = evaluate_zero_shot(
            model,
            tokenizer,
            eval_dir,
            list(settings.tasks),
            {task: settings.limit_of(task) for task in settings.tasks},
            settings.batch_size,
        )
    documents["zero_shot"] = per_document
    seconds["zero_shot"] = time.perf_counter() - started

    started = time.perf_counter()
    generations = generate_samples(
        model, tokenizer, settings.prompts, settings.max_new_tokens
    )
    seconds["generation"] = time.perf_counter() - started
    metrics = {
        "schema": SCHEMA,
        "variant": variant,
        "checkpoint": checkpoint,
        "params": count_params(model),
        "dtype": dtype,
        "profile": settings.profile,
        "eval_config_hash": config_hash,
        "settings": settings.model_dump(),
        "perplexity": ppl,
        "perplexity_windows": counts,
        "ppl_seq_len": settings.ppl_seq_len,
        "in_domain": sorted(in_domain or []),
        "zero_shot": zero_shot,
        "mean_acc": mean_score(zero_shot),
        "mean_acc_metric": {task: s["metric"] for task, s in zero_shot.items()},
        "documents_evaluated": sum(s["n"] for s in zero_shot.values()),
        "limit": settings.limit,
        "fidelity": fidelity_metrics,
        "resamples": settings.resamples,
        "seed": settings.seed,
        "generations": generations,
        "seconds": {k: round(v, 2) for k, v in seconds.items()},
    }
    return metrics, documents
