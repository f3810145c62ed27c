"""SAAP's adaptive importance fusion under homoscedastic uncertainty.

Observations of the same quantity, the importance of every group by several
metrics (by default the vector-wise and the element-wise Taylor importance), are
fused as in Kendall et al. (2018):

    I = sum_m  I~_m / (2 sigma_m^2)  +  log sigma_m

where ``I~_m = I_m / mean(I_m)`` is metric ``m`` in units of its own mean (over
all groups of one kind in the model), and ``sigma_m`` is the uncertainty of that
very estimator: the jackknife standard error over calibration windows of the
normalised score (each leave-one-window-out replicate normalised by its own
mean), averaged in variance over the groups. A metric whose scores move with the
calibration sample gets less weight; one computed on identical windows has
sigma 0. Because both the normalisation and ``sigma_m`` are scale-free,
multiplying a metric by a constant leaves the fused ranking unchanged, which a
plain sum ``I_1 + I_2`` does not.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

EPS = 1e-12
# the smallest sigma fused: a metric with no spread at all gets a finite weight
SIGMA_FLOOR = 1e-6


def jackknife_sigma(replicates: torch.Tensor) -> float:
    """Jackknife standard error of a metric's mean-normalised scores.

    ``replicates`` ``(N, n)``: the metric's ``n`` group scores computed with each
    of ``N`` calibration windows left out in turn. Each replicate is divided by
    its mean over groups; the jackknife variance ``(N-1)/N sum_i (r_i - r_bar)^2``
    of every group is averaged over groups; sigma is its square root.
    """
    count = replicates.shape[0]
    if count < 2:
        raise ValueError(
            "the jackknife needs scores with at least 2 calibration windows left "
            f"out, got {count}; raise calibration.num_samples"
        )
    replicates = replicates.double()
    normalised = replicates / replicates.mean(1, keepdim=True).clamp_min(EPS)
    spread = (normalised - normalised.mean(0, keepdim=True)).square().sum(0)
    return math.sqrt(float((count - 1) / count * spread.mean()))


def fuse(
    scores: Mapping[str, torch.Tensor], sigmas: Mapping[str, float]
) -> torch.Tensor:
    """Fused importance of ``n`` groups from per-metric scores ``(n,)`` and sigmas."""
    fused = torch.zeros_like(next(iter(scores.values())), dtype=torch.float64)
    for name, values in scores.items():
        sigma = max(sigmas[name], SIGMA_FLOOR)
        normalised = values.double() / values.double().mean().clamp_min(EPS)
        fused += normalised / (2 * sigma**2) + math.log(sigma)
    return fused.float()
