"""One checkpoint's evaluation metrics as a JSON-ready dict (schema saap.eval/v1).

Schema::

    {
      "schema": "saap.eval/v1",
      "variant": "pruned", "checkpoint": "models/pruned", "params": 107611776,
      "dtype": "bfloat16",
      "perplexity": {"ptb": 190.2, "wiki": 30.1, "c4": 40.5},
      "perplexity_windows": {"ptb": 300, ...}, "ppl_seq_len": 128,
      "zero_shot": {"piqa": {"acc": 0.61, "acc_norm": 0.6, "n": 100}, ...},
      "mean_acc": 0.45,
      "limit": 100,
      "generations": [{"prompt": "...", "output": "..."}],
      "seconds": {"perplexity": 20.1, "zero_shot": 140.2, "generation": 3.0}
    }
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from saap.data import evaluation_documents
from saap.evaluation.generation import generate_samples
from saap.evaluation.perplexity import perplexity, windows_of
from saap.evaluation.zeroshot import evaluate_zero_shot
from saap.model import count_params
from saap.params import EvaluateParams

log = logging.getLogger(__name__)

SCHEMA = "saap.eval/v1"


def corpus_windows(tokenizer, text_dir: Path, corpus: str, seq_len: int, max_windows):
    """Non-overlapping windows of the evaluation text of ``corpus``."""
    text = "\n\n".join(evaluation_documents(text_dir, corpus))
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return windows_of(ids, seq_len, max_windows)


def evaluate_model(
    model,
    tokenizer,
    text_dir: Path,
    eval_dir: Path,
    params: EvaluateParams,
    variant: str,
    checkpoint: str,
) -> dict:
    """Perplexity, zero-shot accuracy and generations of an in-memory model."""
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    ppl, counts = {}, {}
    for corpus in params.ppl_corpora:
        windows = corpus_windows(
            tokenizer, text_dir, corpus, params.ppl_seq_len, params.ppl_max_windows
        )
        ppl[corpus] = perplexity(model, windows, progress=True, desc=f"ppl {corpus}")
        counts[corpus] = int(windows.shape[0])
        log.info("%s perplexity on %s: %.2f", variant, corpus, ppl[corpus])
    seconds["perplexity"] = time.perf_counter() - started

    started = time.perf_counter()
    zero_shot = (
        evaluate_zero_shot(
            model,
            tokenizer,
            eval_dir,
            list(params.tasks),
            params.limit,
            params.batch_size,
        )
        if params.tasks
        else {}
    )
    seconds["zero_shot"] = time.perf_counter() - started

    started = time.perf_counter()
    generations = generate_samples(
        model, tokenizer, params.prompts, params.max_new_tokens
    )
    seconds["generation"] = time.perf_counter() - started
    accs = [scores["acc"] for scores in zero_shot.values()]
    return {
        "schema": SCHEMA,
        "variant": variant,
        "checkpoint": checkpoint,
        "params": count_params(model),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "perplexity": ppl,
        "perplexity_windows": counts,
        "ppl_seq_len": params.ppl_seq_len,
        "zero_shot": zero_shot,
        "mean_acc": sum(accs) / len(accs) if accs else None,
        "limit": params.limit,
        "generations": generations,
        "seconds": {k: round(v, 2) for k, v in seconds.items()},
    }


def torch_dtype(name: str) -> torch.dtype:
    return {"bfloat16": torch.bfloat16, "float32": torch.float32}[name]
