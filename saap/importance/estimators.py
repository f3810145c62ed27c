"""The registry of importance estimators (:data:`ESTIMATORS`).

A *base* estimator maps one decoder layer's weights and calibration statistics to
group scores ``{"q_head": (H,), "kv_group": (KV,), "mlp": (I,)}``; higher means
more important. A *derived* estimator (SAAP's fusion) is computed from the
scores of other estimators over all layers. Adding one is a function decorated
with :func:`estimator` or :func:`derived` (here or in any module imported by
``saap.importance``) plus its test; ``importance.estimators`` and
``prune.importance`` in params.yaml accept its name from then on.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from saap.fusion import fuse, metric_sigma
from saap.importance.stats import CalibrationStats
from saap.importance.taylor import (
    groups_from_atoms,
    reduce_groups,
    taylor_element1_salience,
    taylor_element2_salience,
    taylor_vector_salience,
)
from saap.registry import Registry

UnitScores = dict[str, torch.Tensor]
Estimator = Callable[[CalibrationStats, int, torch.Generator], UnitScores]
KINDS = ("q_head", "kv_group", "mlp")


@dataclass(frozen=True)
class EstimatorSpec:
    """One registered estimator.

    ``score`` is ``(stats, layer index, generator) -> UnitScores`` for a base
    estimator, ``(scores) -> (per-layer UnitScores, details)`` for a derived one,
    where ``scores`` is a :class:`saap.scores.ImportanceScores` holding every
    estimator in ``inputs`` and the per-batch scores of ``batch_inputs``.
    """

    name: str
    score: Callable
    needs_fisher: bool = False
    inputs: tuple[str, ...] = ()
    batch_inputs: tuple[str, ...] = ()

    @property
    def derived(self) -> bool:
        return bool(self.inputs)


ESTIMATORS: Registry[EstimatorSpec] = Registry(
    "estimator", "saap/importance/estimators.py registers them"
)
# per-batch scores exist for these (CalibrationStats.batch_scores)
BATCH_METRICS = ("taylor_vector", "taylor_element1")


def estimator(name: str, *, needs_fisher: bool = False):
    """Register a base estimator under ``name``."""

    def add(fn: Estimator) -> Estimator:
        ESTIMATORS.add(name, EstimatorSpec(name, fn, needs_fisher=needs_fisher))
        return fn

    return add


def derived(name: str, inputs: tuple[str, ...], batch_inputs: tuple[str, ...] = ()):
    """Register an estimator computed from the scores of ``inputs``."""
    bad = [m for m in batch_inputs if m not in BATCH_METRICS]
    if bad:
        raise ValueError(f"per-batch scores exist only for {BATCH_METRICS}, not {bad}")

    def add(fn):
        ESTIMATORS.add(
            name, EstimatorSpec(name, fn, inputs=inputs, batch_inputs=batch_inputs)
        )
        return fn

    return add


def _shape(stats: CalibrationStats, index: int):
    return stats.layers[index].shape


@estimator("taylor_vector")
def taylor_vector(
    stats: CalibrationStats, index: int, _: torch.Generator
) -> UnitScores:
    """Vector-wise first-order Taylor: ``|sum_group W * dL/dW|`` (LLM-Pruner)."""
    shape = _shape(stats, index)
    salience = taylor_vector_salience(stats.weights[index], stats.grads[index])
    return reduce_groups(salience, shape.num_kv_heads, shape.head_dim, torch.abs)


@estimator("taylor_element1")
def taylor_element1(
    stats: CalibrationStats, index: int, _: torch.Generator
) -> UnitScores:
    """Element-wise first-order Taylor: ``sum_group |W * dL/dW|``."""
    shape = _shape(stats, index)
    salience = taylor_element1_salience(stats.weights[index], stats.grads[index])
    return reduce_groups(salience, shape.num_kv_heads, shape.head_dim)


@estimator("taylor_element2", needs_fisher=True)
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


@estimator("flap")
def flap(stats: CalibrationStats, index: int, _: torch.Generator) -> UnitScores:
    """FLAP fluctuation: input variance x squared column norm (An et al. 2024)."""
    weights = stats.weights[index]
    channel_o = stats.input_variance(index, "o") * weights["o"].square().sum(0)
    channel_down = stats.input_variance(index, "down") * weights["down"].square().sum(0)
    return _output_side(stats, index, channel_o, channel_down)


@estimator("wanda_sp")
def wanda_sp(stats: CalibrationStats, index: int, _: torch.Generator) -> UnitScores:
    """Wanda-sp: ``sum_i |W_ij| * ||X_j||`` over each input channel ``j``."""
    weights = stats.weights[index]
    channel_o = weights["o"].abs().sum(0) * stats.input_norm(index, "o")
    channel_down = weights["down"].abs().sum(0) * stats.input_norm(index, "down")
    return _output_side(stats, index, channel_o, channel_down)


@estimator("magnitude")
def magnitude(stats: CalibrationStats, index: int, _: torch.Generator) -> UnitScores:
    """Weight magnitude: ``sum_group |W|`` (data-free)."""
    shape = _shape(stats, index)
    salience = {name: w.abs() for name, w in stats.weights[index].items()}
    return reduce_groups(salience, shape.num_kv_heads, shape.head_dim)


@estimator("random")
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


SAAP_METRICS = ("taylor_vector", "taylor_element1")


@derived("saap", inputs=SAAP_METRICS, batch_inputs=SAAP_METRICS)
def saap_fusion(scores) -> tuple[list[UnitScores], dict]:
    """SAAP: the metrics fused under homoscedastic uncertainty (saap/fusion.py),
    per kind over all layers; details: the sigma of each metric per kind."""
    sigmas: dict[str, dict[str, float]] = {}
    fused_layers: list[UnitScores] = [{} for _ in range(scores.num_layers)]
    for kind in KINDS:
        sigmas[kind] = {
            metric: metric_sigma(
                torch.cat([layer[kind] for layer in scores.batch_scores[metric]], 1)
            )
            for metric in SAAP_METRICS
        }
        sizes = [layer[kind].numel() for layer in scores.scores[SAAP_METRICS[0]]]
        observed = {
            m: torch.cat([layer[kind] for layer in scores.scores[m]])
            for m in SAAP_METRICS
        }
        for index, part in enumerate(torch.split(fuse(observed, sigmas[kind]), sizes)):
            fused_layers[index][kind] = part
    return fused_layers, {"sigmas": sigmas}


def base_names() -> list[str]:
    return [n for n, spec in ESTIMATORS.items() if not spec.derived]


def estimate(
    stats: CalibrationStats, names: list[str], seed: int = 0
) -> dict[str, list[UnitScores]]:
    """Scores of every layer for each base estimator in ``names``."""
    unknown = [n for n in names if n not in base_names()]
    if unknown:
        raise ValueError(f"unknown base estimator(s) {unknown}; known: {base_names()}")
    generator = torch.Generator().manual_seed(seed)
    return {
        name: [
            ESTIMATORS[name].score(stats, i, generator)
            for i in range(len(stats.layers))
        ]
        for name in names
    }
