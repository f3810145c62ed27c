"""SAAP's adaptive importance fusion under homoscedastic uncertainty.

Two observations of the same quantity, the vector-wise and the element-wise
Taylor importance of every group, are fused as in Kendall et al. (2018):

    I = sum_m  I~_m / (2 sigma_m^2)  +  log sigma_m

where ``I~_m = I_m / mean(I_m)`` is metric ``m`` in units of its own mean (over
all groups of one kind in the model), and ``sigma_m^2`` is the variance of that
normalised score across calibration batches, averaged over the groups: a metric
whose ranking is noisy from batch to batch gets less weight. Because both the
normalisation and ``sigma_m`` are scale-free, multiplying a metric by a constant
leaves the fused ranking unchanged, which a plain sum ``I_1 + I_2`` does not.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

EPS = 1e-12


def metric_sigma(batch_scores: torch.Tensor) -> float:
    """Uncertainty of one metric from its per-batch scores ``(B, n)``.

    Each batch's scores are divided by their mean over groups; sigma^2 is the
    variance over batches of those normalised scores, averaged over groups.
    """
    if batch_scores.shape[0] < 2:
        raise ValueError(
            "the uncertainty of a metric needs scores from at least 2 calibration "
            f"batches, got {batch_scores.shape[0]}; use more samples or a smaller "
            "batch_size"
        )
    normalised = batch_scores / batch_scores.mean(1, keepdim=True).clamp_min(EPS)
    return math.sqrt(float(normalised.var(0).mean()) + EPS)


def fuse(
    scores: Mapping[str, torch.Tensor], sigmas: Mapping[str, float]
) -> torch.Tensor:
    """Fused importance of ``n`` groups from per-metric scores ``(n,)`` and sigmas."""
    fused = torch.zeros_like(next(iter(scores.values())), dtype=torch.float64)
    for name, values in scores.items():
        sigma = sigmas[name]
        normalised = values.double() / values.double().mean().clamp_min(EPS)
        fused += normalised / (2 * sigma**2) + math.log(sigma)
    return fused.float()
