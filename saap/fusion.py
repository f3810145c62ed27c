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

Two scales are registered in :data:`SCALES`. ``mean`` is the one above. ``rank``
replaces each metric (and each of its replicates) by its rank among the groups,
``(rank + 1/2) / n``, so ``sigma_m`` measures how stable the metric's ranking is
over calibration windows rather than its values: a heavy-tailed score (FLAP's
fluctuation, whose few outlier channels move with the windows) keeps its weight
when its ordering is stable. Any monotone transform of a metric leaves the
rank-scale fusion unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch

EPS = 1e-12
# the smallest sigma fused: a metric with no spread at all gets a finite weight
SIGMA_FLOOR = 1e-6


def mean_scale(values: torch.Tensor) -> torch.Tensor:
    """Scores over the last dimension in units of their mean."""
    values = values.double()
    return values / values.mean(-1, keepdim=True).clamp_min(EPS)


def rank_scale(values: torch.Tensor) -> torch.Tensor:
    """Scores over the last dimension replaced by ``(rank + 1/2) / n`` in (0, 1)."""
    count = values.shape[-1]
    ranks = values.double().argsort(dim=-1, stable=True).argsort(dim=-1, stable=True)
    return (ranks.double() + 0.5) / count


SCALES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "mean": mean_scale,
    "rank": rank_scale,
}


def _scale(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    if name not in SCALES:
        raise ValueError(f"unknown fusion scale {name!r}; known: {sorted(SCALES)}")
    return SCALES[name]


def jackknife_sigma(replicates: torch.Tensor, scale: str = "mean") -> float:
    """Jackknife standard error of a metric's scores on the fusion's scale.

    ``replicates`` ``(N, n)``: the metric's ``n`` group scores computed with each
    of ``N`` calibration windows left out in turn. Each replicate is put on the
    ``scale`` (divided by its mean over groups, or ranked); the jackknife variance
    ``(N-1)/N sum_i (r_i - r_bar)^2`` of every group is averaged over groups;
    sigma is its square root.
    """
    count = replicates.shape[0]
    if count < 2:
        raise ValueError(
            "the jackknife needs scores with at least 2 calibration windows left "
            f"out, got {count}; raise calibration.num_samples"
        )
    normalised = _scale(scale)(replicates)
    spread = (normalised - normalised.mean(0, keepdim=True)).square().sum(0)
    return math.sqrt(float((count - 1) / count * spread.mean()))


def fuse(
    scores: Mapping[str, torch.Tensor],
    sigmas: Mapping[str, float],
    scale: str = "mean",
) -> torch.Tensor:
    """Fused importance of ``n`` groups from per-metric scores ``(n,)`` and sigmas
    (each sigma measured on the same ``scale``)."""
    to_scale = _scale(scale)
    fused = torch.zeros_like(next(iter(scores.values())), dtype=torch.float64)
    for name, values in scores.items():
        sigma = max(sigmas[name], SIGMA_FLOOR)
        normalised = to_scale(values)
        fused += normalised / (2 * sigma**2) + math.log(sigma)
    return fused.float()
