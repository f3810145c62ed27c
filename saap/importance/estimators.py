"""The registry of importance estimators (:data:`ESTIMATORS`).

A *base* estimator maps one decoder layer's weights and calibration statistics to
group scores ``{"q_head": (H,), "kv_group": (KV,), "mlp": (I,)}``; higher means
more important. A *derived* estimator (SAAP's fusion) is computed from the
scores of other estimators over all layers. Adding one is a function decorated
with :func:`estimator`, :func:`gradient_estimator`, :func:`activation_estimator`
or :func:`derived` (here or in any module imported by ``saap.importance``) plus
its test; ``importance.estimators``, ``prune.importance`` and
``prune.saap_metrics`` in params.yaml accept its name from then on.

Gradient and activation estimators also give their *jackknife replicates*: the
same score computed with each calibration window left out in turn, from which
SAAP's fusion takes each metric's uncertainty.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from saap.fusion import fuse, jackknife_sigma
from saap.importance.stats import (
    CalibrationStats,
    InputMoments,
    collect_statistics,
)
from saap.importance.taylor import (
    IndexFn,
    element1_index,
    gradient_atoms,
    groups_from_atoms,
    index_values,
    reduce_groups,
    taylor_element2_salience,
)
from saap.registry import Registry

UnitScores = dict[str, torch.Tensor]
Estimator = Callable[[CalibrationStats, int, torch.Generator], UnitScores]
KINDS = ("q_head", "kv_group", "mlp")


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


@dataclass(frozen=True)
class EstimatorSpec:
    """One registered estimator.

    ``score`` is ``(stats, layer index, generator) -> UnitScores`` for a base
    estimator, ``(scores, metrics) -> (per-layer UnitScores, details)`` for a
    derived one, where ``scores`` is a :class:`saap.scores.ImportanceScores`
    holding the jackknife replicates of every metric fused (``inputs`` by
    default). ``jackknife(stats, layer index) -> {kind: (windows, n)}`` gives a
    base estimator's leave-one-window-out scores; ``index_fn`` is a gradient
    estimator's per-row salience, which the per-window pass evaluates.
    """

    name: str
    score: Callable
    needs_fisher: bool = False
    inputs: tuple[str, ...] = ()
    jackknife: Callable[[CalibrationStats, int], UnitScores] | None = None
    index_fn: IndexFn | None = None

    @property
    def derived(self) -> bool:
        return bool(self.inputs)


ESTIMATORS: Registry[EstimatorSpec] = Registry(
    "estimator", "saap/importance/estimators.py registers them"
)


def estimator(name: str, *, needs_fisher: bool = False):
    """Register a base estimator ``(stats, layer index, generator) -> UnitScores``
    (no jackknife replicates: it cannot be fused)."""

    def add(fn: Estimator) -> Estimator:
        ESTIMATORS.add(name, EstimatorSpec(name, fn, needs_fisher=needs_fisher))
        return fn

    return add


def gradient_estimator(name: str, finish: Callable = _identity):
    """Register a first-order estimator from its per-row salience
    ``(projection name, W, g) -> (rows,)`` (columns for o_proj and down_proj):
    group scores are ``finish`` of the salience summed over each group, with
    ``g`` the mean gradient; the jackknife uses the leave-one-out gradients."""

    def add(index_fn: IndexFn) -> IndexFn:
        def score(stats: CalibrationStats, index: int, _: torch.Generator):
            shape = stats.layers[index].shape
            atoms = gradient_atoms(
                index_fn, stats.weights[index], stats.grads[index], shape.head_dim
            )
            return groups_from_atoms(atoms, shape.num_kv_heads, finish)

        def jackknife(stats: CalibrationStats, index: int):
            return stats.loo_scores(index, name, finish)

        ESTIMATORS.add(
            name, EstimatorSpec(name, score, jackknife=jackknife, index_fn=index_fn)
        )
        return index_fn

    return add


ChannelFn = Callable[
    [dict[str, torch.Tensor], InputMoments, InputMoments],
    tuple[torch.Tensor, torch.Tensor],
]


def activation_estimator(name: str):
    """Register an output-side estimator from per-input-channel scores of o_proj
    and down_proj: ``(weights, o moments, down moments) -> (channel_o,
    channel_down)``, elementwise in the moments (so leave-one-out moments of
    shape (windows, channels) give the jackknife replicates)."""

    def add(channel_fn: ChannelFn) -> ChannelFn:
        def score(stats: CalibrationStats, index: int, _: torch.Generator):
            channels = channel_fn(
                stats.weights[index],
                stats.moments(index, "o"),
                stats.moments(index, "down"),
            )
            return _output_side(stats, index, *channels)

        def jackknife(stats: CalibrationStats, index: int):
            channels = channel_fn(
                stats.weights[index],
                stats.loo_moments(index, "o"),
                stats.loo_moments(index, "down"),
            )
            return _output_side(stats, index, *channels)

        ESTIMATORS.add(name, EstimatorSpec(name, score, jackknife=jackknife))
        return channel_fn

    return add


def derived(name: str, inputs: tuple[str, ...]):
    """Register an estimator computed from the jackknife replicates and scores of
    other estimators (``inputs``: the metrics used unless params name others)."""

    def add(fn):
        ESTIMATORS.add(name, EstimatorSpec(name, fn, inputs=inputs))
        return fn

    return add


def jackknifed(name: str) -> bool:
    """Whether estimator ``name`` gives jackknife replicates (can be fused)."""
    return name in ESTIMATORS and ESTIMATORS[name].jackknife is not None


@gradient_estimator("taylor_vector")
def taylor_vector(name: str, weight: torch.Tensor, grad: torch.Tensor):
    """Vector-wise first-order Taylor as LLM-Pruner's code computes it
    (TaylorImportance, ``vectorize``): ``|sum W * dL/dW|`` over each row of each
    projection (column of o_proj/down_proj), summed over the group."""
    return index_values(name, weight * grad).abs()


@gradient_estimator("taylor_vector_group", finish=torch.abs)
def taylor_vector_group(name: str, weight: torch.Tensor, grad: torch.Tensor):
    """Vector-wise first-order Taylor over the whole group: ``|sum_group W * g|``
    (the form of LLM-Pruner's paper, Eq. 4, with the group as one vector)."""
    return index_values(name, weight * grad)


gradient_estimator("taylor_element1")(element1_index)  # sum_group |W * dL/dW|


@estimator("taylor_element2", needs_fisher=True)
def taylor_element2(
    stats: CalibrationStats, index: int, _: torch.Generator
) -> UnitScores:
    """Element-wise second-order Taylor with the Fisher diagonal (mean of squared
    per-window gradients) as Hessian."""
    shape = stats.layers[index].shape
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
    """Group scores from per-input-channel scores of o_proj and down_proj
    (leading dimensions, e.g. jackknife replicates, are kept)."""
    shape = stats.layers[index].shape
    lead = channel_o.shape[:-1]
    q_head = channel_o.reshape(*lead, shape.num_heads, shape.head_dim).sum(-1)
    atoms = {
        "q_head": q_head,
        "kv_head": torch.zeros(*lead, shape.num_kv_heads),
        "mlp": channel_down,
    }
    return groups_from_atoms(atoms, shape.num_kv_heads)


@activation_estimator("flap")
def flap(weights, o: InputMoments, down: InputMoments):
    """FLAP fluctuation: input variance x squared column norm (An et al. 2024)."""
    return (
        o.variance * weights["o"].square().sum(0),
        down.variance * weights["down"].square().sum(0),
    )


@activation_estimator("wanda_sp")
def wanda_sp(weights, o: InputMoments, down: InputMoments):
    """Wanda-sp: ``sum_i |W_ij| * ||X_j||`` over each input channel ``j``."""
    return (
        weights["o"].abs().sum(0) * o.norm,
        weights["down"].abs().sum(0) * down.norm,
    )


@estimator("magnitude")
def magnitude(stats: CalibrationStats, index: int, _: torch.Generator) -> UnitScores:
    """Weight magnitude: ``sum_group |W|`` (data-free)."""
    shape = stats.layers[index].shape
    salience = {name: w.abs() for name, w in stats.weights[index].items()}
    return reduce_groups(salience, shape.num_kv_heads, shape.head_dim)


@estimator("random")
def random(
    stats: CalibrationStats, index: int, generator: torch.Generator
) -> UnitScores:
    """Uniform random scores (seeded): the floor every method must beat."""
    shape = stats.layers[index].shape
    return {
        "q_head": torch.rand(shape.num_heads, generator=generator),
        "kv_group": torch.rand(shape.num_kv_heads, generator=generator),
        "mlp": torch.rand(shape.intermediate_size, generator=generator),
    }


# what SAAP fuses by default (params.yaml prune.saap_metrics): one gradient and
# one activation family, element1 and FLAP's fluctuation, measured best on the
# rank scale over 6-9 calibration seeds (docs/results.md, "The new default
# against the goals")
SAAP_METRICS = ("taylor_element1", "flap")


def _fused(scores, metrics: tuple[str, ...], scale: str):
    sigmas: dict[str, dict[str, float]] = {}
    fused_layers: list[UnitScores] = [{} for _ in range(scores.num_layers)]
    for kind in KINDS:
        sigmas[kind] = {
            metric: jackknife_sigma(
                torch.cat([layer[kind] for layer in scores.replicates[metric]], 1),
                scale,
            )
            for metric in metrics
        }
        sizes = [layer[kind].numel() for layer in scores.scores[metrics[0]]]
        observed = {
            m: torch.cat([layer[kind] for layer in scores.scores[m]]) for m in metrics
        }
        fused = fuse(observed, sigmas[kind], scale)
        for index, part in enumerate(torch.split(fused, sizes)):
            fused_layers[index][kind] = part
    return fused_layers, {"sigmas": sigmas, "scale": scale}


@derived("saap", inputs=SAAP_METRICS)
def saap_fusion(scores, metrics: tuple[str, ...] = SAAP_METRICS):
    """SAAP: the metrics fused under homoscedastic uncertainty (saap/fusion.py),
    per kind over all layers, each metric's sigma the jackknife standard error of
    its mean-normalised scores; details: the sigma of each metric per kind."""
    return _fused(scores, metrics, "mean")


@derived("saap_rank", inputs=SAAP_METRICS)
def saap_rank_fusion(scores, metrics: tuple[str, ...] = SAAP_METRICS):
    """SAAP's fusion on the rank scale (saap/fusion.py): each metric replaced by
    its rank among the groups of a kind, its sigma the jackknife standard error of
    those ranks (how stable its ordering is over calibration windows)."""
    return _fused(scores, metrics, "rank")


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


def with_fusion_inputs(names: list[str]) -> list[str]:
    """``names`` and the default inputs of every derived estimator (always
    computed, so ``prune.importance: saap`` works with any estimator list)."""
    inputs = [m for spec in ESTIMATORS.values() if spec.derived for m in spec.inputs]
    return list(dict.fromkeys([*inputs, *names]))


def jackknife_functions(names: list[str]) -> dict[str, IndexFn]:
    """The per-row saliences the per-window pass evaluates, for the gradient
    estimators among ``names``."""
    return {
        n: ESTIMATORS[n].index_fn
        for n in names
        if n in ESTIMATORS and ESTIMATORS[n].index_fn is not None
    }


def jackknife_replicates(
    stats: CalibrationStats, names: list[str]
) -> dict[str, list[UnitScores]]:
    """Leave-one-window-out scores ``{kind: (windows, n)}`` per layer for every
    estimator in ``names`` whose replicates the per-window pass collected."""
    first = stats.layers[0]

    def collected(name: str) -> bool:
        if not jackknifed(name):
            return False
        if ESTIMATORS[name].index_fn is not None:
            return name in first.loo_atoms
        return bool(first.sample_inputs)

    return {
        name: [ESTIMATORS[name].jackknife(stats, i) for i in range(len(stats.layers))]
        for name in names
        if collected(name)
    }


def collect_for(
    model,
    windows: torch.Tensor,
    batch_size: int,
    names: list[str],
    progress=True,
    per_window: str = "stored",
    jackknife: list[str] | None = None,
) -> CalibrationStats:
    """Calibration statistics with what the estimators ``names`` need: the
    per-window Fisher diagonal, and the jackknife of every one that gives it
    (derived estimators' default inputs included), or only of those in
    ``jackknife`` when given (``importance.jackknife``: what SAAP may fuse);
    ``per_window`` as in :func:`~saap.importance.stats.collect_statistics`."""
    names = with_fusion_inputs(names)
    replicated = jackknife_names(names, jackknife)
    return collect_statistics(
        model,
        windows,
        batch_size,
        want_fisher=any(ESTIMATORS[n].needs_fisher for n in names),
        progress=progress,
        jackknife=(
            jackknife_functions(replicated)
            if any(jackknifed(n) for n in replicated)
            else None
        ),
        per_window=per_window,
    )


def jackknife_names(names: list[str], jackknife: list[str] | None) -> list[str]:
    """The estimators among ``names`` whose jackknife replicates are computed:
    those in ``jackknife`` (all of ``names`` when it is None)."""
    if jackknife is None:
        return list(names)
    return [n for n in names if n in jackknife]
