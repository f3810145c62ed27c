"""Iterative pruning: the target reached in several smaller steps, the model
re-scored between them (``prune.iterations``, or more where a step would remove
more than ``prune.max_step_ratio``: :attr:`saap.params.PruneParams.steps`).

Step ``k`` of ``n`` removes what brings the total removed to ``k/n`` of the
target, planned on the model pruned by the steps before it, from calibration
statistics of that model. The steps compose into one plan on the base model
(:func:`compose`), so the prune stage replays it as it replays a one-shot plan
and compensation (bias, least squares) is applied once, from the dense model's
inputs, at the end. Between steps the pruned model is, by default, the plain
slice; ``build`` can make it the compensated one instead, so a later step
scores the model its pruning will actually be applied to.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace

import torch

from saap.errors import PruningError
from saap.importance.estimators import ESTIMATORS, collect_for
from saap.model import count_params, layer_shapes
from saap.params import PruneParams
from saap.plan import LayerPlan, Plan, one_shot_plan, plan_from_scores
from saap.prune import prune_compensated, prune_model, record_compensation
from saap.scores import scores_from_stats

log = logging.getLogger(__name__)


def compose(first: Plan, second: Plan, base_shapes, base_total: int) -> Plan:
    """The plan on the base model that equals replaying ``first`` and then
    ``second`` (made on ``first``'s pruned model). Scores are the first plan's
    (base-model indices); sigmas are the second's."""
    if first.removed_layers or second.removed_layers:
        raise PruningError("iterative pruning cannot compose plans that drop layers")
    layers = []
    kept_total = base_total
    for shape, one, two in zip(base_shapes, first.layers, second.layers, strict=True):
        heads = [one.kept_heads[h] for h in two.kept_heads]
        kv = [one.kept_kv_heads[k] for k in two.kept_kv_heads]
        channels = [one.kept_channels[c] for c in two.kept_channels]
        kept = replace(
            shape,
            num_heads=len(heads),
            num_kv_heads=len(kv),
            intermediate_size=len(channels),
        )
        removed = shape.num_params() - kept.num_params()
        kept_total -= removed
        layers.append(
            LayerPlan(
                index=one.index,
                prunable=one.prunable,
                attention_unit=one.attention_unit,
                ratio=removed / shape.num_params(),
                kept_heads=heads,
                kept_kv_heads=kv,
                kept_channels=channels,
                num_heads=len(heads),
                num_kv_heads=len(kv),
                intermediate_size=len(channels),
                head_scores=one.head_scores,
                kv_group_scores=one.kv_group_scores,
                channel_scores=one.channel_scores,
                layer_importance=two.layer_importance,
                fluctuation=two.fluctuation,
            )
        )
    removed_params = base_total - kept_total
    return replace(
        first,
        removed_params=removed_params,
        achieved_ratio=removed_params / base_total,
        layers=layers,
        sigmas=second.sigmas,
    )


def compensating_build(
    model,
    params: PruneParams,
    windows: torch.Tensor,
    input_means=None,
    holdout: torch.Tensor | None = None,
) -> Callable[[Plan], torch.nn.Module]:
    """A ``build`` for :func:`iterative_plan`: the plan so far replayed on
    ``model`` with ``params``' compensation, as the prune stage will build it."""

    def build(plan: Plan) -> torch.nn.Module:
        plan.prune_attention = params.prune_attention
        record_compensation(plan, params)
        return prune_compensated(model, plan, windows, input_means, holdout)

    return build


def iterative_plan(
    model,
    windows: torch.Tensor,
    params: PruneParams,
    first_scores,
    batch_size: int,
    progress: bool = True,
    build: Callable[[Plan], torch.nn.Module] | None = None,
    per_window: str = "stored",
) -> Plan:
    """The plan reaching ``params.ratio`` of ``model``'s parameters in
    ``params.steps`` steps; ``first_scores`` (the importance stage's) plan the
    first step, fresh statistics of the pruned model each later one. ``build``
    makes that pruned model from the plan so far (on ``model``); default: the
    plain slice, ``prune_model(model, plan)``. ``per_window``: how the later
    steps' statistics form per-window gradients (``importance.per_window``)."""
    steps = params.steps
    if params.allocation in ("layers", "sensitivity") or params.ppl_bound is not None:
        raise PruningError(
            f"prune.iterations {steps} works with the uniform, global and adaptive "
            "allocations and no ppl_bound; set prune.iterations to 1"
        )
    base_shapes = layer_shapes(model)
    base_total = count_params(model)
    target = round(params.ratio * base_total)
    estimators = (
        list(params.saap_metrics)
        if ESTIMATORS[params.importance].derived
        else [params.importance]
    )
    current, plan, scores = model, None, first_scores
    for step in range(1, steps + 1):
        if scores is None:
            stats = collect_for(
                current, windows, batch_size, estimators, progress, per_window
            )
            scores = scores_from_stats(
                stats, estimators, params.seed, {"num_layers": len(base_shapes)}
            )
        total = count_params(current)
        removed = base_total - total
        goal = round(target * step / steps)
        step_params = params.model_copy(
            update={
                "ratio": max(goal - removed, 0) / total,
                "iterations": 1,
                "max_step_ratio": None,
            }
        )
        step_plan = plan_from_scores(scores, layer_shapes(current), total, step_params)
        plan = (
            step_plan
            if plan is None
            else compose(plan, step_plan, base_shapes, base_total)
        )
        log.info(
            "iterative pruning: step %d/%d removes %.4f of the base model in all",
            step,
            steps,
            plan.achieved_ratio,
        )
        if step < steps:
            current = build(plan) if build is not None else prune_model(model, plan)
            scores = None
    plan.ratio_requested = params.ratio
    plan.target_removed = target
    plan.steps = steps if steps > 1 else None
    return plan


def stepped_plan(
    model,
    params: PruneParams,
    windows: torch.Tensor,
    scores,
    batch_size: int,
    holdout: torch.Tensor | None = None,
    progress: bool = True,
    attention_fallback: bool = False,
    per_window: str = "stored",
    refit_windows: torch.Tensor | None = None,
) -> Plan:
    """The plan of ``params.steps`` steps as the prune stage builds it: later
    steps score the compensated model where ``params`` compensates (the refit
    between steps, fitted on ``refit_windows``: default ``windows``, the ones
    scored; saap.calibration.fit_windows), the compensation settings recorded
    in the plan. With
    ``attention_fallback``, a ratio that MLP channels alone cannot reach prunes
    attention heads as well (:func:`saap.plan.one_shot_plan`, the comparison's rule).
    Either way a one-shot plan of the whole ratio is made first, so a ratio no
    plan can reach (e.g. above ``max_layer_ratio`` allows) fails before any step
    with the one-shot error."""
    shapes, total = layer_shapes(model), count_params(model)
    _, params = one_shot_plan(scores, shapes, total, params, attention_fallback)
    build = None
    if params.least_squares or params.bias_compensation:
        fit = windows if refit_windows is None else refit_windows
        build = compensating_build(model, params, fit, scores.input_means, holdout)
    plan = iterative_plan(
        model, windows, params, scores, batch_size, progress, build, per_window
    )
    plan.prune_attention = params.prune_attention
    record_compensation(plan, params)
    return plan
