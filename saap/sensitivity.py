"""Measured layer sensitivity: the method's "rank the modules to meet a
performance requirement" by measurement instead of a proxy.

Each prunable layer in turn has its lowest-scoring MLP channels removed at a few
candidate fractions, every other layer intact, and the mean next-token loss on
held-back calibration windows is measured. Removing channels ``R`` of a layer is
exactly zeroing the inputs ``R`` of its down_proj (gate and up rows then feed
nothing), so no model is rebuilt: a forward pre-hook masks them. The table of
loss increases feeds the ``sensitivity`` allocation (saap/allocation.py), which
removes channels where the predicted total increase is smallest.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from saap.evaluation.perplexity import window_nll
from saap.model import decoder_layers


@dataclass
class Sensitivity:
    """Loss increase ``table[l, k]`` of layer ``l`` alone losing ``fractions[k]``
    of its MLP channels (zero rows for layers not measured)."""

    fractions: list[float]
    table: torch.Tensor  # (layers, fractions) float64
    base_loss: float

    def to_json(self) -> dict:
        return {
            "fractions": self.fractions,
            "base_loss": self.base_loss,
            "loss_increase": [[round(float(v), 6) for v in row] for row in self.table],
        }


@torch.no_grad()
def measure_sensitivity(
    model: nn.Module,
    scores: list[dict[str, torch.Tensor]],
    layers: list[int],
    windows: torch.Tensor,
    fractions: tuple[float, ...] = (0.25, 0.5, 0.75),
    batch_size: int = 8,
) -> Sensitivity:
    """Measure the loss increase of each of ``layers`` losing each fraction of its
    lowest-scoring MLP channels (``scores[l]["mlp"]``) on ``windows``."""
    model.eval()
    base = float(window_nll(model, windows, batch_size).mean())
    blocks = decoder_layers(model)
    table = torch.zeros(len(blocks), len(fractions), dtype=torch.float64)
    for index in layers:
        order = scores[index]["mlp"].argsort(stable=True)
        width = order.numel()
        down = blocks[index].mlp.down_proj
        for k, fraction in enumerate(fractions):
            mask = torch.ones(width, dtype=down.weight.dtype)
            mask[order[: int(fraction * width)]] = 0
            handle = down.register_forward_pre_hook(
                lambda _m, args, mask=mask: (args[0] * mask,)
            )
            try:
                loss = float(window_nll(model, windows, batch_size).mean())
            finally:
                handle.remove()
            table[index, k] = loss - base
    return Sensitivity(list(fractions), table, base)
