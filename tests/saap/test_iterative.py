"""Iterative pruning on the tiny fixture: composed plans replay the steps
exactly, and the target is met."""

from __future__ import annotations

import pytest
import torch

from saap.errors import PruningError
from saap.importance.estimators import collect_for
from saap.iterative import compose, iterative_plan, stepped_plan
from saap.model import count_params, layer_shapes, load_model
from saap.params import PruneParams
from saap.plan import plan_from_scores
from saap.prune import prune_model
from saap.scores import scores_from_stats

pytestmark = pytest.mark.unit

NAMES = ["taylor_element1", "wanda_sp"]


def scores_of(model, windows):
    stats = collect_for(model, windows, 2, NAMES, progress=False)
    return scores_from_stats(stats, NAMES, 0, {"num_layers": 4})


def params(**overrides) -> PruneParams:
    base = dict(ratio=0.3, skip_first=1, skip_last=1, prune_attention=True)
    return PruneParams(**(base | overrides))


def test_composed_plan_replays_both_steps(tiny_model_dir, windows):
    model, _ = load_model(tiny_model_dir)
    first = plan_from_scores(
        scores_of(model, windows),
        layer_shapes(model),
        count_params(model),
        params(ratio=0.15),
    )
    once = prune_model(model, first)
    second = plan_from_scores(
        scores_of(once, windows),
        layer_shapes(once),
        count_params(once),
        params(ratio=0.15),
    )
    twice = prune_model(once, second)
    composed = compose(first, second, layer_shapes(model), count_params(model))
    direct = prune_model(model, composed)
    assert count_params(direct) == count_params(twice)
    assert composed.removed_params == count_params(model) - count_params(direct)
    with torch.no_grad():
        assert torch.equal(direct(windows).logits, twice(windows).logits)


@pytest.mark.parametrize("allocation", ["uniform", "global", "adaptive"])
def test_iterations_meet_the_target(tiny_model_dir, windows, allocation):
    model, _ = load_model(tiny_model_dir)
    p = params(allocation=allocation, iterations=3, prune_attention=False, ratio=0.2)
    plan = iterative_plan(model, windows, p, scores_of(model, windows), 2, False)
    # each step within half an MLP channel (192 parameters) of its share
    assert abs(plan.removed_params - plan.target_removed) <= 3 * 192
    pruned = prune_model(model, plan)
    assert count_params(model) - count_params(pruned) == plan.removed_params
    assert plan.ratio_requested == 0.2
    one_shot = plan_from_scores(
        scores_of(model, windows),
        layer_shapes(model),
        count_params(model),
        p.model_copy(update={"iterations": 1}),
    )
    # re-scoring changed which channels go (the same budget, another choice)
    assert [e.kept_channels for e in plan.layers] != [
        e.kept_channels for e in one_shot.layers
    ]


def test_iterations_refuse_layer_removal(tiny_model_dir, windows):
    model, _ = load_model(tiny_model_dir)
    with pytest.raises(PruningError, match="iterations"):
        iterative_plan(
            model,
            windows,
            params(allocation="layers", iterations=2),
            scores_of(model, windows),
            2,
            False,
        )


def test_later_steps_score_the_model_build_makes(tiny_model_dir, windows):
    """``build`` makes the model a later step scores (e.g. the compensated one);
    it gets the plan so far, and what it returns decides the next step."""
    model, _ = load_model(tiny_model_dir)
    p = params(iterations=2, prune_attention=False, ratio=0.2)
    first = scores_of(model, windows)
    built = []

    def build(plan):
        built.append(plan.achieved_ratio)
        pruned = prune_model(model, plan)
        with torch.no_grad():  # another model than the plain slice
            for layer in pruned.model.layers:
                layer.mlp.up_proj.weight.mul_(-1.0)
        return pruned

    plain = iterative_plan(model, windows, p, first, 2, False)
    other = iterative_plan(model, windows, p, first, 2, False, build)
    assert len(built) == 1 and 0 < built[0] < 0.2
    assert [e.kept_channels for e in plain.layers] != [
        e.kept_channels for e in other.layers
    ]
    assert abs(other.removed_params - other.target_removed) <= 2 * 192


def test_max_step_ratio_prunes_in_steps_with_the_refit_between(tiny_model_dir, windows):
    """A ratio above ``max_step_ratio`` is reached in steps; the plan records the
    compensation, and the model the prune stage builds from it meets the target."""
    model, _ = load_model(tiny_model_dir)
    p = params(
        ratio=0.2,
        prune_attention=False,
        max_step_ratio=0.1,
        least_squares=True,
        least_squares_inputs="pruned",
    )
    assert p.steps == 2
    scores = scores_of(model, windows)
    plan = stepped_plan(model, p, windows, scores, 2, progress=False)
    assert plan.least_squares and plan.least_squares_inputs == "pruned"
    assert abs(plan.removed_params - plan.target_removed) <= 2 * 192
    one_shot = plan_from_scores(scores, layer_shapes(model), count_params(model), p)
    assert [e.kept_channels for e in plan.layers] != [
        e.kept_channels for e in one_shot.layers
    ]
    # the later step's statistics form per-window gradients as importance.per_window
    # says: the second pass gives the same plan; the setting reaches them
    second = stepped_plan(
        model, p, windows, scores, 2, progress=False, per_window="second_pass"
    )
    assert [e.kept_channels for e in second.layers] == [
        e.kept_channels for e in plan.layers
    ]
    with pytest.raises(ValueError, match="'twice' is not known"):
        stepped_plan(model, p, windows, scores, 2, progress=False, per_window="twice")


def test_stepped_plan_fails_first_with_the_one_shot_error(tiny_model_dir, windows):
    model, _ = load_model(tiny_model_dir)
    p = params(ratio=0.95, max_layer_ratio=0.5, max_step_ratio=0.1)
    with pytest.raises(PruningError, match="ratio 0.95"):
        stepped_plan(model, p, windows, scores_of(model, windows), 2, progress=False)


def test_stepped_plan_falls_back_to_attention_like_the_comparison(
    tiny_model_dir, windows
):
    model, _ = load_model(tiny_model_dir)
    scores = scores_of(model, windows)
    # MLP channels alone reach ~0.26 of the fixture, with attention 0.31
    p = params(ratio=0.29, prune_attention=False, max_step_ratio=0.15)
    with pytest.raises(PruningError):
        plan_from_scores(scores, layer_shapes(model), count_params(model), p)
    with pytest.raises(PruningError):
        stepped_plan(model, p, windows, scores, 2, progress=False)
    plan = stepped_plan(
        model, p, windows, scores, 2, progress=False, attention_fallback=True
    )
    assert plan.prune_attention
    assert abs(plan.removed_params - plan.target_removed) <= 4 * 192
