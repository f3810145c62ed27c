"""Perplexity in non-overlapping windows (LLM-Pruner's protocol: 128 tokens), and
fidelity to a reference model on the same windows.

Both keep one number per window, so two models evaluated on the same windows can
be compared pairwise with an interval (:mod:`saap.evaluation.intervals`).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from tqdm.auto import tqdm

from saap.errors import DataError
from saap.model import decoder_and_head


def windows_of(
    token_ids: list[int], seq_len: int, max_windows: int | None = None
) -> torch.Tensor:
    """Cut a token stream into non-overlapping ``(n, seq_len)`` windows."""
    n = len(token_ids) // seq_len
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise DataError(
            f"text of {len(token_ids)} tokens is shorter than one "
            f"{seq_len}-token window"
        )
    return torch.tensor(token_ids[: n * seq_len], dtype=torch.long).reshape(n, seq_len)


# rows of logits formed at once by :func:`logit_rows`: 128 x 49,152 float32 is
# 25 MB, under glibc's largest mmap threshold, so chunk buffers are reused from
# the heap rather than mapped and faulted in for every batch
LOGIT_ROWS = 128


def logit_rows(
    model: nn.Module, batch: torch.Tensor, first: int = 0, stop: int | None = -1
):
    """The float32 next-token logits of ``batch`` at positions ``first`` to
    ``stop`` (default: all but the last, whose next token is unknown; ``None``:
    all), ``LOGIT_ROWS`` rows at a time: yields ``(rows, logits)`` with
    ``rows`` a slice of the flattened ``(B, positions)``. The
    final hidden states are computed once and projected a chunk at a time (the
    whole ``(B, T, V)`` logits never exist); a model whose logits are more than
    that projection is run whole and sliced."""
    parts = decoder_and_head(model)
    if parts is None:
        logits = model(input_ids=batch).logits[:, first:stop]
        flat = logits.reshape(-1, logits.shape[-1])
        for start in range(0, flat.shape[0], LOGIT_ROWS):
            rows = slice(start, min(start + LOGIT_ROWS, flat.shape[0]))
            yield rows, flat[rows].float()
        return
    decoder, head = parts
    hidden = decoder(input_ids=batch).last_hidden_state[:, first:stop]
    hidden = hidden.reshape(-1, hidden.shape[-1])
    for start in range(0, hidden.shape[0], LOGIT_ROWS):
        rows = slice(start, min(start + LOGIT_ROWS, hidden.shape[0]))
        yield rows, head(hidden[rows]).float()


@torch.no_grad()
def window_nll(
    model: nn.Module,
    windows: torch.Tensor,
    batch_size: int = 16,
    progress: bool = False,
    desc: str = "perplexity",
    first: int = 0,
) -> torch.Tensor:
    """Mean next-token negative log-likelihood of each window: ``(n,)`` float64;
    with ``first``, only the predictions made from position ``first`` on count
    (llama.cpp's llama-perplexity scores the second half of each window)."""
    out = []
    for batch in tqdm(
        torch.split(windows, batch_size), desc=desc, disable=not progress
    ):
        targets = batch[:, first + 1 :].reshape(-1)
        nll = torch.empty(targets.shape[0], dtype=torch.float32)
        for rows, logits in logit_rows(model, batch, first):
            nll[rows] = nn.functional.cross_entropy(
                logits, targets[rows], reduction="none"
            )
        out.append(nll.view(batch.shape[0], -1).mean(dim=1).double())
    return torch.cat(out)


def perplexity(
    model: nn.Module,
    windows: torch.Tensor,
    batch_size: int = 16,
    progress: bool = False,
    desc: str = "perplexity",
) -> float:
    """exp(mean next-token negative log-likelihood) over all windows ``(n, T)``
    (windows have equal length, so the mean of window means is the token mean)."""
    nll = window_nll(model, windows, batch_size, progress, desc)
    return math.exp(float(nll.mean()))


def llamacpp_protocol_perplexity(
    model: nn.Module, token_ids: list[int], ctx: int, chunks: int, batch_size: int = 8
) -> float:
    """Perplexity as llama.cpp's ``llama-perplexity -c ctx --chunks chunks`` computes
    it on the same token stream (for a tokenizer that adds no BOS): consecutive
    ``ctx``-token windows, the second half of each scored."""
    windows = windows_of(token_ids, ctx, chunks)
    nll = window_nll(model, windows, batch_size, first=ctx // 2)
    return math.exp(float(nll.mean()))


@torch.no_grad()
def fidelity(
    reference: nn.Module,
    model: nn.Module,
    windows: torch.Tensor,
    batch_size: int = 4,
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per window: mean KL(reference || model) of next-token distributions (nats)
    and the fraction of positions whose top-1 token agrees. Needs no labels."""
    kl_out, agree_out = [], []
    for batch in tqdm(
        torch.split(windows, batch_size), desc="fidelity", disable=not progress
    ):
        positions = batch.shape[0] * batch.shape[1]
        kl = torch.empty(positions, dtype=torch.float64)
        agree = torch.empty(positions, dtype=torch.float64)
        for (rows, ref), (_, cand) in zip(
            logit_rows(reference, batch, stop=None),
            logit_rows(model, batch, stop=None),
            strict=True,
        ):
            ref = torch.log_softmax(ref, -1)
            cand = torch.log_softmax(cand, -1)
            # KL(p || q) = sum p (log p - log q)
            kl[rows] = (ref.exp() * (ref - cand)).sum(-1).clamp_min(0.0).double()
            agree[rows] = (ref.argmax(-1) == cand.argmax(-1)).double()
        kl_out.append(kl.view(batch.shape[0], -1).mean(dim=1))
        agree_out.append(agree.view(batch.shape[0], -1).mean(dim=1))
    return torch.cat(kl_out), torch.cat(agree_out)
