"""The measured-sensitivity allocation on the tiny fixture."""

from __future__ import annotations

import pytest
import torch

from saap.allocation import predicted_increase
from saap.errors import PruningError
from saap.importance.estimators import collect_for
from saap.model import count_params, layer_shapes, load_model
from saap.params import PruneParams
from saap.plan import plan_from_scores
from saap.prune import prune_model
from saap.scores import scores_from_stats
from saap.sensitivity import Sensitivity, measure_sensitivity

pytestmark = pytest.mark.unit


def params(**overrides) -> PruneParams:
    base = dict(
        ratio=0.15,
        skip_first=1,
        skip_last=1,
        importance="taylor_element1",
        allocation="sensitivity",
    )
    return PruneParams(**(base | overrides))


def test_interpolation_between_measured_fractions():
    table = Sensitivity([0.25, 0.5], torch.tensor([[0.1, 0.5]], dtype=torch.float64), 2)
    assert predicted_increase(table, 0, 0.0) == 0.0
    assert predicted_increase(table, 0, 0.125) == pytest.approx(0.05)
    assert predicted_increase(table, 0, 0.375) == pytest.approx(0.3)
    assert predicted_increase(table, 0, 0.75) == pytest.approx(0.9)  # extrapolated


def test_insensitive_layer_loses_more_channels(tiny_model_dir, windows):
    model, _ = load_model(tiny_model_dir)
    with torch.no_grad():
        # layer 1's MLP writes almost nothing (safe to prune), layer 2's a lot
        model.model.layers[1].mlp.down_proj.weight.mul_(1e-3)
        model.model.layers[2].mlp.down_proj.weight.mul_(30)
    stats = collect_for(model, windows, 2, ["taylor_element1"], progress=False)
    scores = scores_from_stats(stats, ["taylor_element1"], 0, {"num_layers": 4})
    measured = []

    def measure(group_scores, layers):
        table = measure_sensitivity(model, group_scores, layers, windows)
        measured.append(table)
        return table

    plan = plan_from_scores(
        scores, layer_shapes(model), count_params(model), params(), None, measure
    )
    table = measured[0].table
    assert table[1].abs().max() < table[2].min()  # layer 2 is the sensitive one
    assert table[2, 0] < table[2, 1] < table[2, 2]
    assert plan.layers[1].intermediate_size < plan.layers[2].intermediate_size
    assert abs(plan.removed_params - plan.target_removed) <= 192
    assert plan.sensitivity["fractions"] == [0.25, 0.5, 0.75]
    pruned = prune_model(model, plan)
    assert count_params(model) - count_params(pruned) == plan.removed_params


def test_sensitivity_needs_measurements_and_mlp_only(tiny_model_dir, windows):
    model, _ = load_model(tiny_model_dir)
    stats = collect_for(model, windows, 2, ["taylor_element1"], progress=False)
    scores = scores_from_stats(stats, ["taylor_element1"], 0, {"num_layers": 4})
    shapes, total = layer_shapes(model), count_params(model)
    with pytest.raises(PruningError, match="holdout_samples"):
        plan_from_scores(scores, shapes, total, params())

    def measure(group_scores, layers):
        return measure_sensitivity(model, group_scores, layers, windows[:2])

    with pytest.raises(PruningError, match="MLP channels only"):
        plan_from_scores(
            scores, shapes, total, params(prune_attention=True), None, measure
        )
