"""Least-squares compensation on the tiny fixture: the refit reconstructs the
dense layer's output better than FLAP's bias, and is exact when nothing is cut."""

from __future__ import annotations

import pytest
import torch

from saap.compensation import input_grams, least_squares_refit, plan_grams
from saap.importance.estimators import collect_for
from saap.model import count_params, layer_shapes, load_model
from saap.params import PruneParams
from saap.plan import plan_from_scores
from saap.prune import prune_model
from saap.scores import scores_from_stats

pytestmark = pytest.mark.unit


def flap_plan(model, windows, **overrides):
    stats = collect_for(model, windows, 2, ["flap"], progress=False)
    scores = scores_from_stats(stats, ["flap"], 0, {"num_layers": 4})
    params = PruneParams(
        ratio=0.25,
        skip_first=1,
        skip_last=1,
        prune_attention=True,
        importance="flap",
        allocation="global",
        **overrides,
    )
    plan = plan_from_scores(scores, layer_shapes(model), count_params(model), params)
    plan.ridge = params.ridge
    return plan, scores


def layer_inputs(model, windows, index):
    """The inputs of o_proj and down_proj of layer ``index`` as (tokens, C)."""
    captured = {}

    def keep(which):
        def hook(_module, args):
            captured[which] = args[0].detach().reshape(-1, args[0].shape[-1])

        return hook

    layer = model.model.layers[index]
    hooks = [
        layer.self_attn.o_proj.register_forward_pre_hook(keep("o")),
        layer.mlp.down_proj.register_forward_pre_hook(keep("down")),
    ]
    with torch.no_grad():
        model(windows)
    for hook in hooks:
        hook.remove()
    return captured


def test_refit_keeping_every_channel_is_the_identity(tiny_model_dir, windows):
    model, _ = load_model(tiny_model_dir)
    grams = input_grams(model, windows, [1])
    linear = model.model.layers[1].mlp.down_proj
    kept = torch.arange(linear.weight.shape[1])
    weight, bias = least_squares_refit(linear.weight, None, kept, grams[1]["down"], 0.1)
    assert torch.allclose(weight, linear.weight, atol=1e-5)
    assert torch.allclose(bias, torch.zeros_like(bias), atol=1e-5)


@pytest.mark.parametrize("ridge", [1e-4, 1e-2, 1.0])
def test_least_squares_beats_bias_compensation(tiny_model_dir, windows, ridge):
    model, _ = load_model(tiny_model_dir)
    plan, scores = flap_plan(model, windows, ridge=ridge)
    bias_only = prune_model(model, plan, scores.input_means)
    refit = prune_model(model, plan, None, plan_grams(model, plan, windows))
    plain = prune_model(model, plan)
    inputs = layer_inputs(model, windows, 1)
    entry = plan.layers[1]
    assert entry.ratio > 0
    dense_layer = model.model.layers[1]
    kept = {
        "o": torch.cat([torch.arange(h * 16, (h + 1) * 16) for h in entry.kept_heads]),
        "down": torch.as_tensor(entry.kept_channels),
    }
    for which, part in (("o", "self_attn.o_proj"), ("down", "mlp.down_proj")):
        x = inputs[which]
        target = dense_layer.get_submodule(part)(x)
        errors = {}
        for name, candidate in (("plain", plain), ("bias", bias_only), ("ls", refit)):
            linear = candidate.model.layers[1].get_submodule(part)
            with torch.no_grad():
                errors[name] = float(
                    (linear(x[:, kept[which]]) - target).square().sum()
                )
        # the layer's output reconstruction error on calibration inputs
        assert errors["ls"] <= errors["bias"] * (1 + 1e-6) < errors["plain"], errors
        if ridge <= 1e-2:
            assert errors["ls"] < 0.9 * errors["bias"], errors
    with torch.no_grad():
        dense = model(windows).logits
        err_bias = (bias_only(windows).logits - dense).square().mean()
        err_ls = (refit(windows).logits - dense).square().mean()
    assert err_ls < err_bias
