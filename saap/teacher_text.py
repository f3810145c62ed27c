"""Teacher-written distillation text: samples of the dense model itself.

Distillation needs text the teacher has a distribution over, not labels, and
no evaluation set may be in it. Text the dense model writes from nothing (each
sample starts at the document separator, temperature sampling, no
top-k/top-p) is both: it follows the teacher's own distribution, and the
recovery's 13-gram decontamination still cuts whatever it shares with
evaluation text (saap/distill.py), as for every distillation corpus. It is
made once per base model and settings (DVC stage ``teacher-text``) and read as
the distillation corpus ``teacher`` (``finetune.kd_corpora``).

Each sample is ``params.length`` tokens long: end-of-text is suppressed, so
every row fills its window. Batch ``k`` is sampled with the seed
``seed * 1_000_003 + k``: a run asking for more tokens begins with exactly the
samples of a shorter one.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch

from saap.atomic import write_json, write_jsonl
from saap.errors import DataError

log = logging.getLogger(__name__)

TEACHER_FILE = "teacher.jsonl"
META_FILE = "meta.json"
SCHEMA = "saap.teacher_text/v1"


def batch_seed(seed: int, batch: int) -> int:
    """The sampling seed of batch ``batch`` (prefix-stable over ``tokens``)."""
    return seed * 1_000_003 + batch


# the document separator of GPT-2-style vocabularies (SmolLM2, Qwen, GPT-2):
# what a base model saw before every training document
DOCUMENT_SEPARATOR = "<|endoftext|>"


def start_token(tokenizer, start: str | None = None) -> int:
    """The token every sample starts from: ``start`` (a token of the
    vocabulary) if given, else ``<|endoftext|>`` where the vocabulary has it,
    else the beginning-of-text token, else end-of-text. SmolLM2 as the assets
    stage converts it calls ``<|im_start|>`` its beginning-of-text token; its
    pretraining documents are separated by ``<|endoftext|>`` (id 0), and
    samples started there distil better (docs/bench_recovery_teacher_80k.md)."""
    vocab = tokenizer.get_vocab()
    if start is not None:
        if start not in vocab:
            raise DataError(
                f"teacher_text.start {start!r} is not a token of the vocabulary; "
                f"name one (e.g. {DOCUMENT_SEPARATOR!r} or the tokenizer's "
                f"{tokenizer.bos_token!r}) or null for the default"
            )
        return int(vocab[start])
    if DOCUMENT_SEPARATOR in vocab:
        return int(vocab[DOCUMENT_SEPARATOR])
    for token in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if token is not None:
            return int(token)
    raise DataError(
        "the tokenizer has no <|endoftext|>, beginning- or end-of-text token to "
        "start samples from; set teacher_text.start to a token of its vocabulary"
    )


def settings(params, tokenizer, model_sha256: str | None) -> dict:
    """What decides the samples: two runs with equal settings write the same
    batch ``k`` (on one machine kind), whatever their token counts."""
    return {
        "length": params.length,
        "batch_size": params.batch_size,
        "temperature": params.temperature,
        "seed": params.seed,
        "start_token": start_token(tokenizer, params.start),
        "dtype": params.dtype,
        "model_sha256": model_sha256,
    }


def batch_rows(samples: int, batch_size: int) -> list[int]:
    """Rows of each batch: whole batches, then the remainder."""
    return [min(batch_size, samples - first) for first in range(0, samples, batch_size)]


@torch.inference_mode()
def generate_teacher_text(
    model,
    tokenizer,
    params,
    done: list[list[str]] | None = None,
    on_batch: Callable[[list[str]], None] | None = None,
) -> tuple[list[str], int]:
    """Sample ``ceil(params.tokens / params.length)`` texts of ``params.length``
    tokens from ``model`` (batches of ``params.batch_size``, batch ``k`` seeded
    with :func:`batch_seed`). ``done[k]``, where it holds as many texts as batch
    ``k`` has rows, is taken as batch ``k`` instead of sampling it again (the
    same settings sample the same batch); ``on_batch(texts)`` is called after
    each sampled batch with every text so far (whole batches). Returns the
    texts and the number of tokens sampled here."""
    samples = math.ceil(params.tokens / params.length)
    start = start_token(tokenizer, params.start)
    eos = tokenizer.eos_token_id
    done = done or []
    documents: list[str] = []
    sampled = 0
    began = time.perf_counter()
    for k, rows in enumerate(batch_rows(samples, params.batch_size)):
        if k < len(done) and len(done[k]) == rows:
            documents += done[k]
            continue
        torch.manual_seed(batch_seed(params.seed, k))
        ids = torch.full((rows, 1), start, dtype=torch.long)
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=True,
            temperature=params.temperature,
            top_k=0,
            top_p=1.0,
            max_new_tokens=params.length,
            # no early end-of-text: every row fills its window
            min_new_tokens=params.length,
            pad_token_id=eos if eos is not None else start,
        )  # (rows, 1 + length)
        texts = tokenizer.batch_decode(out[:, 1:], skip_special_tokens=True)
        documents += texts
        sampled += rows * params.length
        if on_batch is not None:
            on_batch(documents)
        log.info(
            "teacher text: %d of %d samples, %.0f tokens/s",
            len(documents),
            samples,
            sampled / (time.perf_counter() - began),
        )
    return documents, sampled


def read_batches(folder: Path, wanted: dict) -> list[list[str]]:
    """The batches of an earlier output (``teacher.jsonl`` + ``meta.json``)
    made with the settings ``wanted``; none where the settings differ or the
    folder holds no complete output."""
    meta_path, text_path = Path(folder) / META_FILE, Path(folder) / TEACHER_FILE
    if not (meta_path.is_file() and text_path.is_file()):
        return []
    try:
        meta = json.loads(meta_path.read_text())
        texts = [
            json.loads(line)["text"]
            for line in text_path.read_text().splitlines()
            if line.strip()
        ]
    except (json.JSONDecodeError, KeyError):
        return []
    if meta.get("settings") != wanted or len(texts) != meta.get("samples"):
        return []
    batches, at = [], 0
    for rows in batch_rows(len(texts), wanted["batch_size"]):
        batches.append(texts[at : at + rows])
        at += rows
    return batches


def save_teacher_text(documents: list[str], meta: dict, out_dir: Path) -> None:
    """Write ``teacher.jsonl`` (one ``{"text": ...}`` a line) and ``meta.json``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(out_dir / TEACHER_FILE, [{"text": text} for text in documents])
    write_json(out_dir / META_FILE, meta)


def teacher_documents(teacher_text_dir: Path | None) -> list[str]:
    """The samples of a ``teacher-text`` stage output (``data/teacher_text``)."""
    if teacher_text_dir is None:
        raise DataError(
            "distillation corpus 'teacher' needs the teacher-text folder "
            "(--teacher-text data/teacher_text, written by `dvc repro teacher-text`)"
        )
    path = Path(teacher_text_dir) / TEACHER_FILE
    if not path.is_file():
        raise DataError(
            f"{path} is missing; the teacher-text stage writes it "
            "(dvc repro teacher-text)"
        )
    documents = [
        json.loads(line)["text"]
        for line in path.read_text().splitlines()
        if line.strip()
    ]
    if not documents:
        raise DataError(
            f"{path} holds no samples (teacher_text.tokens is 0 in the active "
            "run profile): set teacher_text.tokens (e.g. 98304), or "
            "teacher_text.profiles.<profile>.tokens for the profile of "
            "evaluate.profile, and run `dvc repro teacher-text`, or leave "
            "teacher out of finetune.kd_corpora (or of that profile's)"
        )
    return documents
