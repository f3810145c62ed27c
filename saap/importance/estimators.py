"""The registry of importance estimators: ``name -> scores(layer statistics)``.

Every estimator maps one decoder layer's weights and calibration statistics to
group scores ``{"q_head": (H,), "kv_group": (KV,), "mlp": (I,)}``; higher means
more important. New estimators are added to :data:`ESTIMATORS`, nothing else.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from saap.importance.stats import CalibrationStats
from saap.importance.taylor import (
    groups_from_atoms,
    reduce_groups,
    taylor_element1_salience,
    taylor_element2_salience,
    taylor_vector_salience,
)

UnitScores = dict[str, torch.Tensor]
Estimator = Callable[[CalibrationStats, int, torch.Generator], UnitScores]


def _shape(stats: CalibrationStats, index: int):
    return stats.layers[index].shape


def taylor_vector(
    stats: CalibrationStats, index: int, _: torch.Generator
) -> UnitScores:
    """Vector-wise first-order Taylor: ``|sum_group W * dL/dW|`` (LLM-Pruner)."""
    shape = _shape(stats, index)
    salience = taylor_vector_salience(stats.weights[index], stats.grads[index])
    return reduce_groups(salience, shape.num_kv_heads, shape.head_dim, torch.abs)


def taylor_element1(
    stats: CalibrationStats, index: int, _: torch.Generator
) -> UnitScores:
    """Element-wise first-order Taylor: ``sum_group |W * dL/dW|``."""
    shape = _shape(stats, index)
    salience = taylor_element1_salience(stats.weights[index], stats.grads[index])
    return reduce_groups(salience, shape.num_kv_heads, shape.head_dim)


def taylor_element2(
    stats: CalibrationStats, index: int, _: torch.Generator
) -> UnitScores:
    """Element-wise second-order Taylor with the Fisher diagonal as Hessian."""
    shape = _shape(stats, index)
    fisher = stats.layers[index].fisher
    if not fisher:
        raise ValueError(
            "taylor_element2 needs statistics collected with want_fisher=True"
        )
    salience = taylor_element2_salience(
        stats.weights[index], stats.grads[index], fisher
    )
    return reduce_groups(salience, shape.num_kv_heads, shape.head_dim)


def _output_side(
    stats: CalibrationStats,
    index: int,
    channel_o: torch.Tensor,
    channel_down: torch.Tensor,
) -> UnitScores:
    """Group scores from per-input-channel scores of o_proj and down_proj."""
    shape = _shape(stats, index)
    q_head = channel_o.reshape(shape.num_heads, shape.head_dim).sum(1)
    atoms = {
        "q_head": q_head,
        "kv_head": torch.zeros(shape.num_kv_heads),
        "mlp": channel_down,
    }
    return groups_from_atoms(atoms, shape.num_kv_heads)


def flap(stats: CalibrationStats, index: int, _: torch.Generator) -> UnitScores:
    """FLAP fluctuation: input variance x squared column norm (An et al. 2024)."""
    weights = stats.weights[index]
    channel_o = stats.input_variance(index, "o") * weights["o"].square().sum(0)
    channel_down = stats.input_variance(index, "down") * weights["down"].square().sum(0)
    return _output_side(stats, index, channel_o, channel_down)


def wanda_sp(stats: CalibrationStats, index: int, _: torch.Generator) -> UnitScores:
    """Wanda-sp: ``sum_i |W_ij| * ||X_j||`` over each input channel ``j``."""
    weights = stats.weights[index]
    channel_o = weights["o"].abs().sum(0) * stats.input_norm(index, "o")
    channel_down = weights["down"].abs().sum(0) * stats.input_norm(index, "down")
    return _output_side(stats, index, channel_o, channel_down)


def magnitude(stats: CalibrationStats, index: int, _: torch.Generator) -> UnitScores:
    """Weight magnitude: ``sum_group |W|`` (data-free)."""
    shape = _shape(stats, index)
    salience = {name: w.abs() for name, w in stats.weights[index].items()}
    return reduce_groups(salience, shape.num_kv_heads, shape.head_dim)


def random(
    stats: CalibrationStats, index: int, generator: torch.Generator
) -> UnitScores:
    """Uniform random scores (seeded): the floor every method must beat."""
    shape = _shape(stats, index)
    return {
        "q_head": torch.rand(shape.num_heads, generator=generator),
        "kv_group": torch.rand(shape.num_kv_heads, generator=generator),
        "mlp": torch.rand(shape.intermediate_size, generator=generator),
    }


ESTIMATORS: dict[str, Estimator] = {
    "taylor_vector": taylor_vector,
    "taylor_element1": taylor_element1,
    "taylor_element2": taylor_element2,
    "flap": flap,
    "wanda_sp": wanda_sp,
    "magnitude": magnitude,
    "random": random,
}


def estimate(
    stats: CalibrationStats, names: list[str], seed: int = 0
) -> dict[str, list[UnitScores]]:
    """Scores of every layer for each estimator in ``names``."""
    unknown = [n for n in names if n not in ESTIMATORS]
    if unknown:
        raise ValueError(f"unknown estimator(s) {unknown}; known: {sorted(ESTIMATORS)}")
    generator = torch.Generator().manual_seed(seed)
    return {
        name: [ESTIMATORS[name](stats, i, generator) for i in range(len(stats.layers))]
        for name in names
    }
