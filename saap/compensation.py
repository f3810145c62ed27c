"""Compensation for removed input channels of o_proj and down_proj.

Removing input channels of a projection ``y = W x + b`` changes its output. Two
compensations, both from calibration inputs of the dense model:

- ``bias`` (FLAP): the removed channels' mean contribution moves into the bias,
  ``b += W[:, removed] @ mean(x[removed])``;
- ``least_squares``: the kept columns and the bias are refitted together so that
  the pruned projection reproduces the dense one on the calibration inputs,

      min_{W', b'}  sum_x || W' x_K + b' - (W x + b) ||^2 + lambda || W' - W_K ||^2

  a ridge regression with one linear solve per projection, from the Gram matrix
  ``sum x x^T``, the sum ``sum x`` and the token count. ``lambda`` is ``ridge``
  times the mean diagonal of the kept channels' Gram block, so the penalty does
  not depend on the scale of the activations. Without the ridge term and with all
  channels kept the refit returns ``W`` and ``b`` unchanged; with the bias alone
  free it is FLAP's compensation, so its reconstruction error is never above
  bias-only compensation on the same inputs (tested).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from saap.model import decoder_layers


@dataclass
class InputGram:
    """Second moments of one projection's inputs over calibration tokens."""

    gram: torch.Tensor  # (C, C) float64, sum x x^T
    total: torch.Tensor  # (C,) float64, sum x
    tokens: int

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).double()
        self.gram += x.T @ x
        self.total += x.sum(0)
        self.tokens += x.shape[0]


@torch.no_grad()
def input_grams(
    model: nn.Module, windows: torch.Tensor, layers: list[int], batch_size: int = 4
) -> dict[int, dict[str, InputGram]]:
    """Gram matrices of the inputs of o_proj (``o``) and down_proj (``down``) of
    the decoder ``layers``, from one forward pass of ``model`` over ``windows``.
    Memory: ``C^2`` float64 per projection and layer."""
    grams: dict[int, dict[str, InputGram]] = {}
    handles = []
    blocks = decoder_layers(model)
    for index in layers:
        attn, mlp = blocks[index].self_attn, blocks[index].mlp
        entry = {}
        for which, linear in (("o", attn.o_proj), ("down", mlp.down_proj)):
            size = linear.weight.shape[1]
            gram = InputGram(
                torch.zeros(size, size, dtype=torch.float64),
                torch.zeros(size, dtype=torch.float64),
                0,
            )
            entry[which] = gram
            handles.append(
                linear.register_forward_pre_hook(
                    lambda _m, args, g=gram: g.add(args[0])
                )
            )
        grams[index] = entry
    try:
        for batch in windows.split(batch_size):
            model(input_ids=batch)
    finally:
        for handle in handles:
            handle.remove()
    return grams


def least_squares_refit(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    kept: torch.Tensor,
    stats: InputGram,
    ridge: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Refitted ``(W', b')`` of a projection keeping input channels ``kept``.

    Normal equations of the ridge problem above, in the augmented inputs
    ``[x_K; 1]`` (the bias is not penalised)."""
    w = weight.detach().double()
    b = (
        bias.detach().double()
        if bias is not None
        else torch.zeros(w.shape[0], dtype=torch.float64)
    )
    g, s, n = stats.gram, stats.total, float(stats.tokens)
    k = len(kept)
    g_kk = g[kept][:, kept]
    lam = ridge * float(g_kk.diagonal().mean().clamp_min(1e-12))
    system = torch.empty(k + 1, k + 1, dtype=torch.float64)
    system[:k, :k] = g_kk + lam * torch.eye(k, dtype=torch.float64)
    system[:k, k] = s[kept]
    system[k, :k] = s[kept]
    system[k, k] = n
    # right-hand side: sum (W x + b) [x_K; 1]^T + [lambda W_K, 0]
    rhs = torch.empty(w.shape[0], k + 1, dtype=torch.float64)
    rhs[:, :k] = w @ g[:, kept] + torch.outer(b, s[kept]) + lam * w[:, kept]
    rhs[:, k] = w @ s + n * b
    solution = torch.linalg.solve(system, rhs.T).T
    return (
        solution[:, :k].to(weight.dtype).contiguous(),
        solution[:, k].to(weight.dtype).contiguous(),
    )


def plan_grams(
    model: nn.Module, plan, windows: torch.Tensor, batch_size: int = 4
) -> dict[int, dict[str, InputGram]]:
    """Input Gram matrices of the layers whose o_proj or down_proj lose input
    channels under ``plan`` (what :func:`saap.prune.prune_model` refits)."""
    layers = [
        entry.index for entry in plan.layers if not entry.removed and entry.ratio > 0
    ]
    return input_grams(model, windows, layers, batch_size)
