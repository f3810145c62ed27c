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
        logits = model(input_ids=batch).logits[:, first:-1].float()  # (B, T-1-f, V)
        targets = batch[:, first + 1 :]
        nll = nn.functional.cross_entropy(
            logits.transpose(1, 2), targets, reduction="none"
        )  # (B, T-1)
        out.append(nll.mean(dim=1).double())
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
        ref = torch.log_softmax(reference(input_ids=batch).logits.float(), -1)
        cand = torch.log_softmax(model(input_ids=batch).logits.float(), -1)
        # (B, T, V) -> (B, T): KL(p || q) = sum p (log p - log q)
        kl = (ref.exp() * (ref - cand)).sum(-1).clamp_min(0.0)
        agree = (ref.argmax(-1) == cand.argmax(-1)).double()
        kl_out.append(kl.mean(dim=1).double())
        agree_out.append(agree.mean(dim=1))
    return torch.cat(kl_out), torch.cat(agree_out)
