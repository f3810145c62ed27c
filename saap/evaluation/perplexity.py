"""Perplexity in non-overlapping windows (LLM-Pruner's protocol: 128 tokens)."""

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
def perplexity(
    model: nn.Module,
    windows: torch.Tensor,
    batch_size: int = 16,
    progress: bool = False,
    desc: str = "perplexity",
) -> float:
    """exp(mean next-token negative log-likelihood) over all windows ``(n, T)``."""
    total_nll, total_tokens = 0.0, 0
    for batch in tqdm(
        torch.split(windows, batch_size), desc=desc, disable=not progress
    ):
        logits = model(input_ids=batch).logits[:, :-1].float()  # (B, T-1, V)
        targets = batch[:, 1:]
        nll = nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum"
        )
        total_nll += float(nll)
        total_tokens += targets.numel()
    return math.exp(total_nll / total_tokens)
