"""The per-window pass on the tiny fixture: the Fisher diagonal from per-window
gradients, and jackknife replicates that are the fused estimators themselves."""

from __future__ import annotations

import pytest
import torch

from saap.fusion import jackknife_sigma
from saap.importance.estimators import collect_for, jackknifed
from saap.importance.stats import layer_projections
from saap.model import load_model
from saap.scores import scores_from_stats

pytestmark = pytest.mark.unit

FUSABLE = [
    "taylor_vector",
    "taylor_vector_group",
    "taylor_element1",
    "wanda_sp",
    "flap",
]


def scores_of(model, windows, names):
    stats = collect_for(model, windows, 3, names, progress=False)
    return scores_from_stats(stats, names, 0, {"num_layers": len(stats.layers)})


def test_fusable_estimators_give_replicates():
    assert all(jackknifed(n) for n in FUSABLE)
    assert not any(jackknifed(n) for n in ("magnitude", "random", "taylor_element2"))


def test_fisher_is_the_mean_of_per_window_squared_gradients(tiny_model_dir, windows):
    model, _ = load_model(tiny_model_dir)
    stats = collect_for(model, windows, 3, ["taylor_element2"], progress=False)
    # by hand: one backward per window
    layer = model.model.layers[1]
    params = layer_projections(layer)
    expected = {n: torch.zeros_like(p) for n, p in params.items()}
    for p in params.values():
        p.requires_grad_(True)
    for window in windows.split(1):
        model.zero_grad(set_to_none=True)
        model(input_ids=window, labels=window).loss.backward()
        for n, p in params.items():
            expected[n] += p.grad.square() / windows.shape[0]
    for n in params:
        assert torch.allclose(stats.layers[1].fisher[n], expected[n], rtol=1e-4)
    # not the square of batch-mean gradients
    assert not torch.allclose(
        stats.layers[1].fisher["gate"], stats.grads[1]["gate"].square(), rtol=0.1
    )


@pytest.mark.parametrize("name", FUSABLE)
def test_replicate_is_the_estimator_without_that_window(tiny_model_dir, windows, name):
    model, _ = load_model(tiny_model_dir)
    full = scores_of(model, windows, [name])
    left_out = 2
    rest = torch.cat([windows[:left_out], windows[left_out + 1 :]])
    without = scores_of(model, rest, [name])
    for layer in range(len(full.scores[name])):
        for kind, replicates in full.replicates[name][layer].items():
            assert replicates.shape[0] == windows.shape[0]
            expected = without.scores[name][layer][kind]
            assert torch.allclose(
                replicates[left_out], expected, rtol=1e-3, atol=1e-6
            ), (name, layer, kind)


def test_sigma_is_zero_on_identical_windows(tiny_model_dir, windows):
    model, _ = load_model(tiny_model_dir)
    same = windows[:1].repeat(6, 1)
    scores = scores_of(model, same, FUSABLE)
    varied = scores_of(model, windows, FUSABLE)
    for name in FUSABLE:
        for kind in ("q_head", "mlp"):
            stacked = torch.cat([r[kind] for r in scores.replicates[name]], 1)
            assert jackknife_sigma(stacked) == pytest.approx(0.0, abs=1e-3), name
            spread = torch.cat([r[kind] for r in varied.replicates[name]], 1)
            assert jackknife_sigma(spread) > 1e-2, name
    for fusion in ("saap", "saap_rank"):
        _, details = scores.estimate(fusion, FUSABLE)
        assert all(s < 1e-3 for s in details["sigmas"]["mlp"].values()), fusion
