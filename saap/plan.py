"""Layer ranking, per-layer ratio allocation and the pruning plan.

A plan says, for every decoder layer, which query heads, key/value heads and MLP
channels are kept. It is built from group scores in three steps:

1. per layer, the *removal steps* of attention and of the MLP, cheapest-to-lose
   first (an attention step removes one kv group, or one query head from every kv
   group so that the head count stays a multiple of the kv-head count);
2. an allocation strategy decides how many steps each prunable layer takes so
   that the parameters removed meet ``ratio * total parameters``:
   ``uniform`` (one ratio for all prunable layers, LLM-Pruner), ``global`` (one
   threshold over per-layer standardised scores, FLAP) or ``adaptive`` (SAAP:
   per-layer ratios from the layer ranking by fused importance and fluctuation);
3. MLP channels top the removal up until the target is met within one channel.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import torch

from saap.errors import PruningError
from saap.model import LayerShape
from saap.params import PruneParams

log = logging.getLogger(__name__)


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


def removed_layer_entry(index: int, shape: LayerShape, scores: dict) -> dict:
    """Plan entry of a layer removed whole."""
    return {
        "index": index,
        "prunable": True,
        "removed": True,
        "attention_unit": "layer",
        "ratio": 1.0,
        "kept_heads": [],
        "kept_kv_heads": [],
        "kept_channels": [],
        "num_heads": 0,
        "num_kv_heads": 0,
        "intermediate_size": 0,
        "head_scores": scores["q_head"].tolist(),
        "kv_group_scores": scores["kv_group"].tolist(),
        "channel_scores": scores["mlp"].tolist(),
        "layer_importance": None,
        "fluctuation": None,
    }


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


def build_plan(
    shapes: list[LayerShape],
    scores: list[dict[str, torch.Tensor]],
    total_params: int,
    params: PruneParams,
    ratio: float,
    fluctuation: torch.Tensor | None = None,
    block_influence: torch.Tensor | None = None,
) -> dict:
    """The plan (a JSON-ready dict) that removes ``ratio`` of ``total_params``."""
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
    ranking = None
    removed_layers: list[int] = []
    if params.allocation == "layers" and ratio > 0:
        if block_influence is None:
            raise PruningError("layer removal needs the block influence of each layer")
        options, removed_layers = remove_layers(
            options, prunable, block_influence, target
        )
        whole = sum(shapes[i].num_params() for i in removed_layers)
        steps = top_up(options, [(0, 0) for _ in options], target - whole)
    elif params.allocation == "uniform" or ratio == 0:
        weights = torch.tensor(
            [1.0 if i in prunable else 0.0 for i in range(num_layers)]
        )
        steps = ratio_schedule(options, target, weights)
    elif params.allocation == "global":
        steps = global_threshold(options, scores, target)
    else:
        if fluctuation is None:
            fluctuation = torch.zeros(num_layers)
        ranking = layer_ranking(
            scores, fluctuation, prunable, params.fluctuation_weight
        )
        relative = adaptive_weights(ranking, params.adaptive_spread)
        weights = torch.zeros(num_layers)
        weights[prunable] = relative
        steps = ratio_schedule(options, target, weights)
    removed = removed_params(options, steps)
    removed += sum(shapes[i].num_params() for i in removed_layers)
    layers = []
    for index, (option, (attn_steps, mlp_steps)) in enumerate(
        zip(options, steps, strict=True)
    ):
        if index in removed_layers:
            layers.append(removed_layer_entry(index, option.shape, scores[index]))
            continue
        shape = option.shape
        layer_scores = scores[index]
        if option.attn_unit == "query_head":
            keep_per_group = shape.group_size - attn_steps
            per_group = layer_scores["q_head"].reshape(
                shape.num_kv_heads, shape.group_size
            )
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
        layers.append(
            {
                "index": index,
                "prunable": index in prunable,
                "attention_unit": option.attn_unit,
                "ratio": layer_removed / shape.num_params(),
                "kept_heads": kept_heads.tolist(),
                "kept_kv_heads": kept_kv.tolist(),
                "kept_channels": kept_channels.tolist(),
                "num_heads": int(kept_heads.numel()),
                "num_kv_heads": int(kept_kv.numel()),
                "intermediate_size": int(kept_channels.numel()),
                "head_scores": layer_scores["q_head"].tolist(),
                "kv_group_scores": layer_scores["kv_group"].tolist(),
                "channel_scores": layer_scores["mlp"].tolist(),
                "layer_importance": (
                    float(ranking[prunable.index(index)])
                    if ranking is not None and index in prunable
                    else None
                ),
                "fluctuation": float(fluctuation[index])
                if fluctuation is not None
                else None,
            }
        )
    return {
        "version": 1,
        "ratio_requested": ratio,
        "total_params": total_params,
        "target_removed": target,
        "removed_params": removed,
        "achieved_ratio": removed / total_params,
        "importance": params.importance,
        "allocation": params.allocation,
        "attention_unit": params.attention_unit,
        "prunable_layers": prunable,
        "removed_layers": removed_layers,
        "layers": layers,
    }


def plan_from_scores(
    scores,
    shapes: list[LayerShape],
    total_params: int,
    params: PruneParams,
    holdout_perplexity=None,
) -> dict:
    """The plan for ``params`` from an :class:`~saap.scores.ImportanceScores`.

    With ``params.ppl_bound`` set, ``holdout_perplexity(plan) -> float`` is called
    on candidate plans and the largest ratio (bisection, 1/64 resolution of
    ``params.ratio``) whose held-back perplexity stays under the bound is chosen.
    """
    group_scores = scores.estimator(params.importance)
    sigmas = scores.fused()[1] if params.importance == "saap" else None
    fluctuation = scores.fluctuation()

    def make(ratio: float) -> dict:
        plan = build_plan(
            shapes,
            group_scores,
            total_params,
            params,
            ratio,
            fluctuation,
            scores.block_influence,
        )
        plan["sigmas"] = sigmas
        return plan

    if params.ppl_bound is None:
        return make(params.ratio)
    if holdout_perplexity is None:
        raise PruningError(
            "prune.ppl_bound is set but no held-back calibration data was given"
        )
    low, high = 0.0, params.ratio
    best = make(0.0)
    best["holdout_ppl"] = holdout_perplexity(best)
    if best["holdout_ppl"] > params.ppl_bound:
        raise PruningError(
            f"the unpruned model's held-back perplexity {best['holdout_ppl']:.2f} "
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
            best["holdout_ppl"] = ppl
            if ratio == high:
                break
        else:
            high = ratio
    best["ppl_bound"] = params.ppl_bound
    best["ppl_search"] = search
    return best


def plot_kept_fraction(plan: dict, path) -> None:
    """Bar plot of the kept fraction of heads and MLP channels per layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = plan["layers"]
    index = [layer["index"] for layer in layers]
    heads = [layer["num_heads"] / len(layer["head_scores"]) for layer in layers]
    channels = [
        layer["intermediate_size"] / len(layer["channel_scores"]) for layer in layers
    ]
    fig, ax = plt.subplots(figsize=(9, 3.5))
    ax.bar([i - 0.2 for i in index], heads, width=0.4, label="query heads kept")
    ax.bar([i + 0.2 for i in index], channels, width=0.4, label="MLP channels kept")
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("kept fraction")
    ax.set_ylim(0, 1.05)
    ax.set_title(
        f"{plan['importance']} / {plan['allocation']}: "
        f"{plan['achieved_ratio']:.1%} of parameters removed"
    )
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
