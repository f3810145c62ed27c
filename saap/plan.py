"""The pruning plan: for every decoder layer, which query heads, key/value heads
and MLP channels are kept.

:func:`build_plan` takes group scores, asks the allocation strategy named by
``prune.allocation`` (saap/allocation.py) how many removal steps each layer
takes, and turns the steps into per-layer entries: the kept indices are the
highest-scoring groups. The result is a typed :class:`Plan`, written as
``plan.json`` by :meth:`Plan.to_json` and read back by :func:`load_plan`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch

from saap.allocation import (
    ALLOCATIONS,
    AllocationContext,
    layer_options,
    removed_params,
    round_widths,
)
from saap.errors import DataError, PruningError
from saap.model import LayerShape
from saap.params import PruneParams

log = logging.getLogger(__name__)

PLAN_VERSION = 1


@dataclass
class LayerPlan:
    """One decoder layer of the plan (``removed``: the layer is dropped whole)."""

    index: int
    prunable: bool
    attention_unit: str
    ratio: float
    kept_heads: list[int]
    kept_kv_heads: list[int]
    kept_channels: list[int]
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    head_scores: list[float]
    kv_group_scores: list[float]
    channel_scores: list[float]
    layer_importance: float | None = None
    fluctuation: float | None = None
    removed: bool = False

    def to_json(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        removed = out.pop("removed")
        if not removed:
            return out
        # a removed layer's entry says so right after ``prunable``
        items = list(out.items())
        return dict([*items[:2], ("removed", True), *items[2:]])

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LayerPlan:
        return cls(**data)


# optional plan fields written only when set (``sigmas`` is always written)
_OPTIONAL = (
    "holdout_ppl",
    "ppl_bound",
    "ppl_search",
    "base_model",
    "prune_attention",
    "bias_compensation",
    "least_squares",
    "ridge",
    "least_squares_inputs",
    "ridge_grid",
    "sensitivity",
    "seed",
    "steps",
)


@dataclass
class Plan:
    """The whole plan: target and achieved ratio, how it was chosen, the layers."""

    ratio_requested: float
    total_params: int
    target_removed: int
    removed_params: int
    achieved_ratio: float
    importance: str
    allocation: str
    attention_unit: str
    prunable_layers: list[int]
    removed_layers: list[int]
    layers: list[LayerPlan]
    version: int = PLAN_VERSION
    # details of a derived estimator (SAAP: the sigma of each metric per kind)
    sigmas: dict[str, dict[str, float]] | None = None
    # performance-bound search (prune.ppl_bound)
    holdout_ppl: float | None = None
    ppl_bound: float | None = None
    ppl_search: list[dict[str, float]] | None = None
    # provenance and settings the prune stage applies
    base_model: str | None = None
    prune_attention: bool | None = None
    bias_compensation: bool | None = None
    least_squares: bool | None = None
    ridge: float | None = None
    least_squares_inputs: str | None = None
    ridge_grid: list[float] | None = None
    # measured layer sensitivities (the sensitivity allocation)
    sensitivity: dict | None = None
    seed: int | None = None
    # steps the plan was made in, where more than one (saap.iterative)
    steps: int | None = None

    def kept_layers(self) -> list[LayerPlan]:
        """The layers left in the pruned model, in order (renumbered there)."""
        return [layer for layer in self.layers if not layer.removed]

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"version": self.version}
        for f in fields(self):
            if f.name == "version":
                continue
            value = getattr(self, f.name)
            if f.name in _OPTIONAL and value is None:
                continue
            out[f.name] = (
                [layer.to_json() for layer in value] if f.name == "layers" else value
            )
        return out

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=1) + "\n"

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Plan:
        data = dict(data)
        version = data.get("version")
        if version != PLAN_VERSION:
            raise DataError(
                f"plan version {version!r} is not {PLAN_VERSION}; re-run the ranking "
                "stage (dvc repro ranking)"
            )
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise DataError(
                f"plan holds unknown keys {unknown}; re-run the ranking stage"
            )
        data["layers"] = [LayerPlan.from_json(layer) for layer in data["layers"]]
        return cls(**data)


def load_plan(path: str | Path) -> Plan:
    """Read ``plan.json``; a missing or malformed file is a named error."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} is missing; the ranking stage writes it")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"{path} is not valid JSON: {exc}") from None
    return Plan.from_json(data)


def removed_layer_entry(index: int, scores: dict) -> LayerPlan:
    """Plan entry of a layer removed whole."""
    return LayerPlan(
        index=index,
        prunable=True,
        removed=True,
        attention_unit="layer",
        ratio=1.0,
        kept_heads=[],
        kept_kv_heads=[],
        kept_channels=[],
        num_heads=0,
        num_kv_heads=0,
        intermediate_size=0,
        head_scores=scores["q_head"].tolist(),
        kv_group_scores=scores["kv_group"].tolist(),
        channel_scores=scores["mlp"].tolist(),
    )


def layer_entry(
    index: int,
    option,
    steps: tuple[int, int],
    layer_scores: dict[str, torch.Tensor],
    prunable: bool,
    importance: float | None,
    fluctuation: float | None,
) -> LayerPlan:
    """Plan entry of a kept layer: the highest-scoring groups survive ``steps``."""
    attn_steps, mlp_steps = steps
    shape = option.shape
    if option.attn_unit == "query_head":
        keep_per_group = shape.group_size - attn_steps
        per_group = layer_scores["q_head"].reshape(shape.num_kv_heads, shape.group_size)
        top = per_group.topk(keep_per_group, dim=1).indices.sort(dim=1).values
        kept_heads = (
            top + torch.arange(shape.num_kv_heads)[:, None] * shape.group_size
        ).flatten()
        kept_kv = torch.arange(shape.num_kv_heads)
    else:
        kept_kv = (
            layer_scores["kv_group"]
            .topk(shape.num_kv_heads - attn_steps)
            .indices.sort()
            .values
        )
        kept_heads = (
            kept_kv[:, None] * shape.group_size + torch.arange(shape.group_size)
        ).flatten()
    kept_channels = option.mlp_order[mlp_steps:].sort().values
    layer_removed = attn_steps * option.attn_step_cost + mlp_steps * option.mlp_cost
    return LayerPlan(
        index=index,
        prunable=prunable,
        attention_unit=option.attn_unit,
        ratio=layer_removed / shape.num_params(),
        kept_heads=kept_heads.tolist(),
        kept_kv_heads=kept_kv.tolist(),
        kept_channels=kept_channels.tolist(),
        num_heads=int(kept_heads.numel()),
        num_kv_heads=int(kept_kv.numel()),
        intermediate_size=int(kept_channels.numel()),
        head_scores=layer_scores["q_head"].tolist(),
        kv_group_scores=layer_scores["kv_group"].tolist(),
        channel_scores=layer_scores["mlp"].tolist(),
        layer_importance=importance,
        fluctuation=fluctuation,
    )


def build_plan(
    shapes: list[LayerShape],
    scores: list[dict[str, torch.Tensor]],
    total_params: int,
    params: PruneParams,
    ratio: float,
    fluctuation: torch.Tensor | None = None,
    block_influence: torch.Tensor | None = None,
    sensitivity=None,
) -> Plan:
    """The plan that removes ``ratio`` of ``total_params``."""
    num_layers = len(shapes)
    prunable = [
        i
        for i in range(num_layers)
        if params.skip_first <= i < num_layers - params.skip_last
    ]
    if not prunable:
        raise PruningError(
            f"skip_first={params.skip_first} and skip_last={params.skip_last} leave no "
            f"prunable layer of {num_layers}; lower them"
        )
    options = [
        layer_options(s, scores[i], params, i in prunable) for i, s in enumerate(shapes)
    ]
    target = int(round(ratio * total_params))
    most = removed_params(
        options, [(o.max_attn_steps, o.max_mlp_steps) for o in options]
    )
    if target > most:
        raise PruningError(
            f"ratio {ratio} asks to remove {target:,} of {total_params:,} "
            f"parameters, but layers {prunable[0]}..{prunable[-1]} (max_layer_ratio "
            f"{params.max_layer_ratio}) allow at most {most:,} "
            f"({most / total_params:.3f}); "
            "lower the ratio, skip fewer layers or raise max_layer_ratio"
        )
    # nothing to remove: every strategy agrees with the uniform one
    strategy = ALLOCATIONS.get(params.allocation if ratio > 0 else "uniform")
    allocation = strategy(
        AllocationContext(
            options=options,
            scores=scores,
            prunable=prunable,
            target=target,
            params=params,
            fluctuation=(
                fluctuation if fluctuation is not None else torch.zeros(num_layers)
            ),
            block_influence=block_influence,
            sensitivity=sensitivity,
        )
    )
    removed_layers = allocation.removed_layers
    whole = sum(shapes[i].num_params() for i in removed_layers)
    # runtime-aware widths (a dropped layer keeps no channel to round)
    steps = round_widths(
        [
            replace(o, max_mlp_steps=0) if i in removed_layers else o
            for i, o in enumerate(options)
        ],
        allocation.steps,
        target - whole,
        params.width_multiple,
    )
    removed = removed_params(options, steps)
    removed += whole
    ranking = allocation.ranking
    layers = []
    for index, (option, layer_steps) in enumerate(zip(options, steps, strict=True)):
        if index in removed_layers:
            layers.append(removed_layer_entry(index, scores[index]))
            continue
        layers.append(
            layer_entry(
                index,
                option,
                layer_steps,
                scores[index],
                index in prunable,
                (
                    float(ranking[prunable.index(index)])
                    if ranking is not None and index in prunable
                    else None
                ),
                float(fluctuation[index]) if fluctuation is not None else None,
            )
        )
    return Plan(
        ratio_requested=ratio,
        total_params=total_params,
        target_removed=target,
        removed_params=removed,
        achieved_ratio=removed / total_params,
        importance=params.importance,
        allocation=params.allocation,
        attention_unit=params.attention_unit,
        prunable_layers=prunable,
        removed_layers=removed_layers,
        layers=layers,
    )


def plan_from_scores(
    scores,
    shapes: list[LayerShape],
    total_params: int,
    params: PruneParams,
    holdout_perplexity=None,
    measure_sensitivity=None,
) -> Plan:
    """The plan for ``params`` from an :class:`~saap.scores.ImportanceScores`.

    With ``params.ppl_bound`` set, ``holdout_perplexity(plan) -> float`` is called
    on candidate plans and the largest ratio (bisection, 1/64 resolution of
    ``params.ratio``) whose held-back perplexity stays under the bound is chosen.
    The ``sensitivity`` allocation calls ``measure_sensitivity(group scores,
    prunable layers) -> saap.sensitivity.Sensitivity`` once.
    """
    group_scores, details = scores.estimate(params.importance, params.saap_metrics)
    fluctuation = scores.fluctuation()
    sensitivity = None
    if params.allocation == "sensitivity":
        if measure_sensitivity is None:
            raise PruningError(
                "prune.allocation 'sensitivity' measures layers on held-back "
                "calibration windows; set calibration.holdout_samples > 0"
            )
        layers = range(params.skip_first, len(shapes) - params.skip_last)
        sensitivity = measure_sensitivity(group_scores, list(layers))

    def make(ratio: float) -> Plan:
        plan = build_plan(
            shapes,
            group_scores,
            total_params,
            params,
            ratio,
            fluctuation,
            scores.block_influence,
            sensitivity,
        )
        plan.sigmas = details.get("sigmas")
        if sensitivity is not None:
            plan.sensitivity = sensitivity.to_json()
        return plan

    if params.ppl_bound is None:
        return make(params.ratio)
    if holdout_perplexity is None:
        raise PruningError(
            "prune.ppl_bound is set but no held-back calibration data was given"
        )
    low, high = 0.0, params.ratio
    best = make(0.0)
    best.holdout_ppl = holdout_perplexity(best)
    if best.holdout_ppl > params.ppl_bound:
        raise PruningError(
            f"the unpruned model's held-back perplexity {best.holdout_ppl:.2f} "
            "already "
            f"exceeds ppl_bound {params.ppl_bound}; raise the bound"
        )
    search = []
    for _ in range(6):
        ratio = high if not search else (low + high) / 2
        candidate = make(ratio)
        ppl = holdout_perplexity(candidate)
        search.append({"ratio": ratio, "holdout_ppl": ppl})
        if ppl <= params.ppl_bound:
            low, best = ratio, candidate
            best.holdout_ppl = ppl
            if ratio == high:
                break
        else:
            high = ratio
    best.ppl_bound = params.ppl_bound
    best.ppl_search = search
    return best


def one_shot_plan(
    scores,
    shapes: list[LayerShape],
    total_params: int,
    params: PruneParams,
    attention_fallback: bool = False,
    measure_sensitivity=None,
) -> tuple[Plan, PruneParams]:
    """The one-shot plan of ``params`` and the params that made it. With
    ``attention_fallback``, a ratio that MLP channels alone cannot reach (50% of
    SmolLM2 with its first and last layers kept) prunes attention heads as well,
    the comparison's rule for every method; otherwise the plan's
    :class:`PruningError` is raised."""
    try:
        plan = plan_from_scores(
            scores, shapes, total_params, params, None, measure_sensitivity
        )
    except PruningError:
        if not attention_fallback or params.prune_attention:
            raise
        params = params.model_copy(update={"prune_attention": True})
        plan = plan_from_scores(
            scores, shapes, total_params, params, None, measure_sensitivity
        )
    return plan, params


def plot_kept_fraction(plan: Plan, path) -> None:
    """Bar plot of the kept fraction of heads and MLP channels per layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = plan.layers
    index = [layer.index for layer in layers]
    heads = [layer.num_heads / len(layer.head_scores) for layer in layers]
    channels = [layer.intermediate_size / len(layer.channel_scores) for layer in layers]
    fig, ax = plt.subplots(figsize=(9, 3.5))
    ax.bar([i - 0.2 for i in index], heads, width=0.4, label="query heads kept")
    ax.bar([i + 0.2 for i in index], channels, width=0.4, label="MLP channels kept")
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("kept fraction")
    ax.set_ylim(0, 1.05)
    ax.set_title(
        f"{plan.importance} / {plan.allocation}: "
        f"{plan.achieved_ratio:.1%} of parameters removed"
    )
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
