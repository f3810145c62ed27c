"""Allocation: how many removal steps each decoder layer takes to meet the target.

Every layer offers *removal steps* of attention and of the MLP, cheapest-to-lose
first (:func:`layer_options`: an attention step removes one kv group, or one
query head from every kv group so that the head count stays a multiple of the
kv-head count). An allocation strategy decides the steps per layer so that the
parameters removed meet the target; MLP channels top the removal up until the
target is met within one channel. Strategies are registered in
:data:`ALLOCATIONS` and named by ``prune.allocation``:

- ``uniform``: one ratio for all prunable layers (LLM-Pruner);
- ``global``: one threshold over per-layer standardised scores (FLAP);
- ``adaptive``: per-layer ratios from the layer ranking by importance and
  fluctuation (SAAP);
- ``layers``: whole layers of lowest block influence, then MLP channels (ShortGPT);
- ``sensitivity``: MLP channels removed where the measured loss increase of each
  layer (saap/sensitivity.py) predicts the smallest total increase.

Adding one is a function ``(AllocationContext) -> Allocation`` decorated with
``@ALLOCATIONS.register("name")`` plus its test.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from saap.errors import PruningError
from saap.model import LayerShape
from saap.params import PruneParams
from saap.registry import Registry

log = logging.getLogger(__name__)

UnitScores = dict[str, torch.Tensor]


@dataclass(frozen=True)
class LayerOptions:
    """The removal steps available in one layer, in removal order."""

    shape: LayerShape
    attn_unit: str  # "kv_group" or "query_head"
    attn_step_scores: torch.Tensor  # (steps,) ascending
    attn_step_cost: int
    mlp_order: torch.Tensor  # channel indices, least important first
    mlp_scores_sorted: torch.Tensor
    mlp_cost: int
    max_attn_steps: int
    max_mlp_steps: int

    @property
    def attn_units(self) -> int:
        """Units the attention ratio is measured in."""
        return (
            self.shape.group_size
            if self.attn_unit == "query_head"
            else self.shape.num_kv_heads
        )


def effective_unit(shape: LayerShape, requested: str) -> str:
    """Query-head pruning needs kv groups of more than one head; else whole groups."""
    return (
        "query_head"
        if requested == "query_head" and shape.group_size > 1
        else "kv_group"
    )


def query_head_steps(q_scores: torch.Tensor, shape: LayerShape) -> torch.Tensor:
    """Score of step j = mean of the j-th least important head of every kv group."""
    per_group = q_scores.reshape(shape.num_kv_heads, shape.group_size)  # (KV, g)
    return per_group.sort(dim=1).values.mean(0)  # (g,)


def layer_options(
    shape: LayerShape,
    scores: dict[str, torch.Tensor],
    params: PruneParams,
    prunable: bool,
) -> LayerOptions:
    """Removal steps of one layer under ``params`` (none if not prunable)."""
    unit = effective_unit(shape, params.attention_unit)
    hd, d, b = shape.head_dim, shape.hidden_size, int(shape.qkv_bias)
    if unit == "query_head":
        step_scores = query_head_steps(scores["q_head"], shape)
        step_cost = shape.num_kv_heads * hd * (2 * d + b)
        max_steps = shape.group_size - 1
    else:
        step_scores = scores["kv_group"].sort().values
        step_cost = shape.group_size * hd * (2 * d + b) + 2 * hd * (d + b)
        max_steps = shape.num_kv_heads - 1
    mlp_sorted, mlp_order = scores["mlp"].sort(stable=True)
    units = shape.group_size if unit == "query_head" else shape.num_kv_heads
    cap = params.max_layer_ratio
    return LayerOptions(
        shape=shape,
        attn_unit=unit,
        attn_step_scores=step_scores,
        attn_step_cost=step_cost,
        mlp_order=mlp_order,
        mlp_scores_sorted=mlp_sorted,
        mlp_cost=3 * d + 2 * int(shape.mlp_bias),
        max_attn_steps=min(max_steps, int(cap * units))
        if prunable and params.prune_attention
        else 0,
        max_mlp_steps=(
            min(shape.intermediate_size - 1, int(cap * shape.intermediate_size))
            if prunable and params.prune_mlp
            else 0
        ),
    )


def steps_for_ratio(option: LayerOptions, ratio: float) -> tuple[int, int]:
    """Attention and MLP steps a layer takes to lose ``ratio`` of its units."""
    attn = min(option.max_attn_steps, int(round(ratio * option.attn_units)))
    mlp = min(option.max_mlp_steps, int(ratio * option.shape.intermediate_size))
    return attn, mlp


def removed_params(options: list[LayerOptions], steps: list[tuple[int, int]]) -> int:
    return sum(
        a * o.attn_step_cost + m * o.mlp_cost
        for o, (a, m) in zip(options, steps, strict=True)
    )


def top_up(
    options: list[LayerOptions], steps: list[tuple[int, int]], target: int
) -> list[tuple[int, int]]:
    """Remove further MLP channels, least important next channel first, until the
    removed count is within half a channel of ``target``."""
    steps = list(steps)
    removed = removed_params(options, steps)
    while True:
        best, best_score = None, None
        for index, (option, (_, mlp)) in enumerate(zip(options, steps, strict=True)):
            if mlp >= option.max_mlp_steps or removed + option.mlp_cost / 2 > target:
                continue
            score = float(option.mlp_scores_sorted[mlp])
            if best_score is None or score < best_score:
                best, best_score = index, score
        if best is None:
            return steps
        attn, mlp = steps[best]
        steps[best] = (attn, mlp + 1)
        removed += options[best].mlp_cost


def round_widths(
    options: list[LayerOptions],
    steps: list[tuple[int, int]],
    target: int,
    multiple: int,
) -> list[tuple[int, int]]:
    """Runtime-aware widths: every pruned layer's kept MLP width becomes a multiple
    of ``multiple`` (unpruned layers keep theirs). Each width is rounded to the
    nearest allowed one, then whole blocks of ``multiple`` channels are removed
    (lowest mean score of the next block first) or given back (highest mean score
    of the last removed block first) until the removed count is within half a
    block of ``target``."""
    if multiple <= 1:
        return list(steps)

    def allowed(option: LayerOptions) -> list[int]:
        """MLP step counts that leave a multiple of ``multiple`` (or remove none)."""
        width = option.shape.intermediate_size
        return [0] + sorted(
            width - kept
            for kept in range(multiple, width, multiple)
            if 0 < width - kept <= option.max_mlp_steps
        )

    def block_score(option: LayerOptions, start: int, stop: int) -> float:
        return float(option.mlp_scores_sorted[start:stop].mean())

    rounded = []
    for option, (attn, mlp) in zip(options, steps, strict=True):
        choices = allowed(option)
        rounded.append((attn, min(choices, key=lambda c: (abs(c - mlp), c))))
    removed = removed_params(options, rounded)
    while True:
        # the move (layer, new step count) that best closes the gap
        moves = []
        for index, (option, (_, mlp)) in enumerate(zip(options, rounded, strict=True)):
            choices = allowed(option)
            position = choices.index(mlp)
            if removed < target and position + 1 < len(choices):
                more = choices[position + 1]
                moves.append((block_score(option, mlp, more), index, more))
            if removed > target and position > 0:
                fewer = choices[position - 1]
                moves.append((-block_score(option, fewer, mlp), index, fewer))
        if not moves:
            return rounded
        _, index, new = min(moves)
        attn, mlp = rounded[index]
        change = (new - mlp) * options[index].mlp_cost
        gap = abs(target - removed)
        if abs(target - removed - change) >= gap:
            return rounded
        rounded[index] = (attn, new)
        removed += change


def ratio_schedule(
    options: list[LayerOptions], target: int, layer_weights: torch.Tensor
) -> list[tuple[int, int]]:
    """Largest mean ratio ``r`` with layer ratios ``r * weight_l`` under ``target``."""
    low, high = 0.0, 1.0 / max(float(layer_weights.max()), 1e-6)
    for _ in range(50):
        mid = (low + high) / 2
        steps = [
            steps_for_ratio(o, mid * float(w))
            for o, w in zip(options, layer_weights, strict=True)
        ]
        if removed_params(options, steps) <= target:
            low = mid
        else:
            high = mid
    steps = [
        steps_for_ratio(o, low * float(w))
        for o, w in zip(options, layer_weights, strict=True)
    ]
    return top_up(options, steps, target)


def standardised(values: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """``(values - mean) / std`` with the mean and std of ``reference``."""
    std = reference.std() if reference.numel() > 1 else torch.tensor(1.0)
    return (values - reference.mean()) / std.clamp_min(1e-12)


def global_threshold(
    options: list[LayerOptions], scores: list[dict[str, torch.Tensor]], target: int
) -> list[tuple[int, int]]:
    """FLAP: steps scored on their layer's standardised scale, lowest removed first."""
    candidates = []  # (score, layer, kind)
    for index, option in enumerate(options):
        kind_ref = scores[index][
            "q_head" if option.attn_unit == "query_head" else "kv_group"
        ]
        attn_z = standardised(option.attn_step_scores, kind_ref)
        mlp_z = standardised(option.mlp_scores_sorted, scores[index]["mlp"])
        candidates += [
            (float(attn_z[j]), index, "attn") for j in range(option.max_attn_steps)
        ]
        candidates += [
            (float(mlp_z[j]), index, "mlp") for j in range(option.max_mlp_steps)
        ]
    candidates.sort(key=lambda c: c[0])
    steps = [[0, 0] for _ in options]
    removed = 0
    for _, index, kind in candidates:
        option = options[index]
        cost = option.attn_step_cost if kind == "attn" else option.mlp_cost
        if removed + cost > target + option.mlp_cost / 2:
            continue
        steps[index][0 if kind == "attn" else 1] += 1
        removed += cost
    return top_up(options, [(a, m) for a, m in steps], target)


def remove_layers(
    options: list[LayerOptions],
    prunable: list[int],
    block_influence: torch.Tensor,
    target: int,
) -> tuple[list[LayerOptions], list[int]]:
    """ShortGPT: drop whole prunable layers, lowest block influence first, while the
    removed parameters stay within ``target``; the remaining layers' MLP channels
    then top the budget up."""
    removed: list[int] = []
    total = 0
    for index in sorted(prunable, key=lambda i: float(block_influence[i])):
        size = options[index].shape.num_params()
        if total + size > target:
            break
        removed.append(index)
        total += size
    kept_options = [
        replace(o, max_attn_steps=0, max_mlp_steps=0) if i in removed else o
        for i, o in enumerate(options)
    ]
    return kept_options, sorted(removed)


def layer_ranking(
    scores: list[dict[str, torch.Tensor]],
    fluctuation: torch.Tensor,
    prunable: list[int],
    fluctuation_weight: float,
) -> torch.Tensor:
    """Layer importance (higher = keep more) of the prunable layers.

    Log of the layer's mean group score (MLP and attention, each relative to its
    kind's mean over prunable layers) plus ``fluctuation_weight`` times the
    standardised fluctuation: a layer whose importance swings with the input is
    treated as more important, since pruning it is riskier.
    """
    mlp = torch.stack([scores[i]["mlp"].mean() for i in prunable])
    attn = torch.stack([scores[i]["q_head"].mean() for i in prunable])
    level = (
        mlp / mlp.mean().clamp_min(1e-12) + attn / attn.mean().clamp_min(1e-12)
    ) / 2
    level = torch.log(level.clamp_min(1e-12))
    fluct = fluctuation[prunable]
    return standardised(level, level) + fluctuation_weight * standardised(fluct, fluct)


def adaptive_weights(importance: torch.Tensor, spread: float) -> torch.Tensor:
    """Relative ratio per layer: ``1 + spread`` for the least important layer down to
    ``1 - spread`` for the most important, linear in rank."""
    n = importance.numel()
    if n == 1:
        return torch.ones(1)
    rank = importance.argsort().argsort().float()  # 0 = least important
    return 1 + spread * (1 - 2 * rank / (n - 1))


@dataclass(frozen=True)
class AllocationContext:
    """What a strategy may read: per-layer removal options and scores, the
    prunable layers, the target (parameters to remove) and the prune section."""

    options: list[LayerOptions]
    scores: list[UnitScores]
    prunable: list[int]
    target: int
    params: PruneParams
    fluctuation: torch.Tensor
    block_influence: torch.Tensor | None = None
    # saap.sensitivity.Sensitivity, measured where the strategy needs it
    sensitivity: Any | None = None


@dataclass
class Allocation:
    """Steps per layer ``(attention steps, MLP steps)``, the layers removed whole,
    and the layer importance of the prunable layers where a ranking was used."""

    steps: list[tuple[int, int]]
    removed_layers: list[int] = field(default_factory=list)
    ranking: torch.Tensor | None = None


ALLOCATIONS: Registry = Registry("allocation", "saap/allocation.py registers them")


def prunable_weights(ctx: AllocationContext) -> torch.Tensor:
    return torch.tensor(
        [1.0 if i in ctx.prunable else 0.0 for i in range(len(ctx.options))]
    )


@ALLOCATIONS.register("uniform")
def uniform(ctx: AllocationContext) -> Allocation:
    """One ratio for every prunable layer (LLM-Pruner)."""
    return Allocation(ratio_schedule(ctx.options, ctx.target, prunable_weights(ctx)))


@ALLOCATIONS.register("global")
def global_(ctx: AllocationContext) -> Allocation:
    """One threshold over per-layer standardised scores (FLAP)."""
    return Allocation(global_threshold(ctx.options, ctx.scores, ctx.target))


@ALLOCATIONS.register("adaptive")
def adaptive(ctx: AllocationContext) -> Allocation:
    """Per-layer ratios linear in the layer ranking, +-``adaptive_spread`` (SAAP)."""
    ranking = layer_ranking(
        ctx.scores, ctx.fluctuation, ctx.prunable, ctx.params.fluctuation_weight
    )
    weights = torch.zeros(len(ctx.options))
    weights[ctx.prunable] = adaptive_weights(ranking, ctx.params.adaptive_spread)
    return Allocation(ratio_schedule(ctx.options, ctx.target, weights), ranking=ranking)


@ALLOCATIONS.register("layers")
def layers(ctx: AllocationContext) -> Allocation:
    """Whole layers of lowest block influence, MLP channels top up (ShortGPT)."""
    if ctx.block_influence is None:
        raise PruningError("layer removal needs the block influence of each layer")
    options, removed = remove_layers(
        ctx.options, ctx.prunable, ctx.block_influence, ctx.target
    )
    whole = sum(ctx.options[i].shape.num_params() for i in removed)
    steps = top_up(options, [(0, 0) for _ in options], ctx.target - whole)
    return Allocation(steps, removed_layers=removed)


def predicted_increase(sensitivity, layer: int, fraction: float) -> float:
    """Loss increase of ``layer`` losing ``fraction`` of its MLP channels,
    interpolated linearly between the measured fractions (0 at 0; extrapolated
    from the last two beyond the last)."""
    xs = [0.0, *sensitivity.fractions]
    ys = [0.0, *(float(v) for v in sensitivity.table[layer])]
    for k in range(1, len(xs)):
        if fraction <= xs[k] or k == len(xs) - 1:
            slope = (ys[k] - ys[k - 1]) / (xs[k] - xs[k - 1])
            return ys[k - 1] + slope * (fraction - xs[k - 1])
    return ys[-1]


@ALLOCATIONS.register("sensitivity")
def sensitivity(ctx: AllocationContext) -> Allocation:
    """Measured sensitivity (SAAP's performance requirement by measurement): MLP
    channels are removed in chunks of 1/32 of a layer, each time from the layer
    whose predicted loss increase per removed parameter is smallest (greedy
    knapsack over the interpolated table), until the budget; MLP channels top
    up the rest."""
    table = ctx.sensitivity
    if table is None:
        raise PruningError(
            "the sensitivity allocation needs measured layer sensitivities: the "
            "ranking stage measures them on the held-back calibration windows "
            "(calibration.holdout_samples > 0)"
        )
    if any(o.max_attn_steps for o in ctx.options):
        raise PruningError(
            "the sensitivity allocation prunes MLP channels only; set "
            "prune.prune_attention to false or choose another allocation"
        )
    options = ctx.options
    mlp = [0 for _ in options]
    removed = 0
    while True:
        best, best_cost = None, None
        for index in ctx.prunable:
            option = options[index]
            width = option.shape.intermediate_size
            chunk = max(1, width // 32)
            if mlp[index] + chunk > option.max_mlp_steps:
                continue
            size = chunk * option.mlp_cost
            if removed + size > ctx.target:
                continue
            cost = (
                predicted_increase(table, index, (mlp[index] + chunk) / width)
                - predicted_increase(table, index, mlp[index] / width)
            ) / size
            if best_cost is None or cost < best_cost:
                best, best_cost = index, cost
        if best is None:
            break
        chunk = max(1, options[best].shape.intermediate_size // 32)
        mlp[best] += chunk
        removed += chunk * options[best].mlp_cost
    steps = top_up(options, [(0, m) for m in mlp], ctx.target)
    middle = len(table.fractions) // 2
    ranking = -table.table[ctx.prunable, middle].float()
    return Allocation(steps, ranking=ranking)
