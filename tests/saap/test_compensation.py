"""Least-squares compensation on the tiny fixture: the refit reconstructs the
dense layer's output better than FLAP's bias, and is exact when nothing is cut."""

from __future__ import annotations

import pytest
import torch

from saap.compensation import (
    fit_moments_of,
    input_grams,
    least_squares_refit,
    moment_error,
    plan_grams,
    ridge_solve,
    sequential_refit,
)
from saap.importance.estimators import collect_for
from saap.model import count_params, layer_shapes, load_model
from saap.params import PruneParams
from saap.plan import plan_from_scores
from saap.prune import prune_compensated, prune_model
from saap.scores import scores_from_stats

pytestmark = pytest.mark.unit


def flap_plan(model, windows, **overrides):
    stats = collect_for(model, windows, 2, ["flap"], progress=False)
    scores = scores_from_stats(stats, ["flap"], 0, {"num_layers": 4})
    settings = dict(
        ratio=0.25,
        skip_first=1,
        skip_last=1,
        prune_attention=True,
        importance="flap",
        allocation="global",
    )
    params = PruneParams(**(settings | overrides))
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


def hooked(model, windows, part, output):
    """Per decoder layer, the input of ``part`` as (tokens, C), with its output
    too where ``output``: ``(x, y)``."""
    captured = {}

    def keep(index):
        def hook(_module, args, out=None):
            x = args[0].detach().flatten(0, 1)
            captured[index] = (x, out.detach().flatten(0, 1)) if output else x

        return hook

    modules = [layer.get_submodule(part) for layer in model.model.layers]
    hooks = [
        m.register_forward_hook(keep(i))
        if output
        else m.register_forward_pre_hook(keep(i))
        for i, m in enumerate(modules)
    ]
    with torch.no_grad():
        model(windows)
    for hook in hooks:
        hook.remove()
    return captured


def projection_io(model, windows, part):
    """Per decoder layer, the input and output of ``part`` as (tokens, C)."""
    return hooked(model, windows, part, output=True)


def mlp_plan(model, windows, inputs, ridge):
    plan, scores = flap_plan(
        model, windows, prune_attention=False, least_squares=True, ridge=ridge
    )
    plan.least_squares = True
    plan.least_squares_inputs = inputs
    return plan, scores


@pytest.mark.parametrize("inputs", ["pruned", "pruned_to_dense"])
def test_sequential_refit_of_the_first_cut_layer_is_the_dense_refit(
    tiny_model_dir, windows, inputs
):
    """MLP channels only: the first cut layer's down_proj sees exactly the dense
    inputs of its kept channels, so both refits agree there; later layers see
    the pruned model's drift, and the sequential refit differs."""
    model, _ = load_model(tiny_model_dir)
    plan, _ = mlp_plan(model, windows, inputs, 1e-2)
    cut = [i for i, e in enumerate(plan.layers) if e.ratio > 0]
    assert len(cut) >= 2, cut
    sequential = prune_compensated(model, plan, windows)
    plan.least_squares_inputs = "dense"
    dense_fit = prune_compensated(model, plan, windows)
    first, later = cut[0], cut[1]
    a = sequential.model.layers[first].mlp.down_proj
    b = dense_fit.model.layers[first].mlp.down_proj
    assert torch.allclose(a.weight, b.weight, atol=1e-4)
    assert torch.allclose(a.bias, b.bias, atol=1e-4)
    a = sequential.model.layers[later].mlp.down_proj
    b = dense_fit.model.layers[later].mlp.down_proj
    assert not torch.allclose(a.weight, b.weight, atol=1e-4)


def mlp_inputs(model, windows):
    """Per decoder layer, the input of the MLP block (after its norm) as (tokens,
    hidden)."""
    return hooked(model, windows, "mlp", output=False)


def down_errors(candidates, index, x, target):
    errors = {}
    for name, candidate in candidates.items():
        linear = candidate.model.layers[index].mlp.down_proj
        with torch.no_grad():
            errors[name] = float((linear(x) - target).square().sum())
    return errors


@pytest.mark.parametrize("ridge", [1e-6, 1e-2])
def test_sequential_refit_is_the_best_fit_on_the_pruned_states(
    tiny_model_dir, windows, ridge
):
    """``pruned``: on the MLP inputs of the pruned model itself, each refitted
    down_proj reproduces what the dense MLP's down_proj gives on those inputs (all
    channels) at least as well as the dense-input refit and the plain slice."""
    model, _ = load_model(tiny_model_dir)
    plan, _ = mlp_plan(model, windows, "pruned", ridge)
    candidates = {"sequential": prune_compensated(model, plan, windows)}
    plan.least_squares_inputs = "dense"
    candidates["dense"] = prune_compensated(model, plan, windows)
    candidates["plain"] = prune_model(model, plan)
    states = mlp_inputs(candidates["sequential"], windows)
    slack = 1 + 1e-4 if ridge < 1e-4 else 1 + 1e-2
    for index, entry in enumerate(plan.layers):
        if entry.ratio == 0:
            continue
        mlp = model.model.layers[index].mlp
        with torch.no_grad():
            full = mlp.act_fn(mlp.gate_proj(states[index])) * mlp.up_proj(states[index])
            target = mlp.down_proj(full)
        x = full[:, torch.as_tensor(entry.kept_channels)]
        errors = down_errors(candidates, index, x, target)
        assert errors["sequential"] <= errors["dense"] * slack, (index, errors)
        assert errors["sequential"] < errors["plain"], (index, errors)


@pytest.mark.parametrize("ridge", [1e-6, 1e-2])
def test_sequential_refit_to_dense_outputs_is_the_best_fit_of_them(
    tiny_model_dir, windows, ridge
):
    """``pruned_to_dense``: on the inputs each down_proj gets in the pruned
    model, the refit reconstructs the dense model's own down_proj output at
    least as well as the dense-input refit and the plain slice, and the logits
    on the calibration windows come closer to the dense ones."""
    model, _ = load_model(tiny_model_dir)
    plan, _ = mlp_plan(model, windows, "pruned_to_dense", ridge)
    candidates = {"sequential": prune_compensated(model, plan, windows)}
    plan.least_squares_inputs = "dense"
    candidates["dense"] = prune_compensated(model, plan, windows)
    candidates["plain"] = prune_model(model, plan)
    targets = projection_io(model, windows, "mlp.down_proj")
    inputs = projection_io(candidates["sequential"], windows, "mlp.down_proj")
    slack = 1 + 1e-4 if ridge < 1e-4 else 1 + 1e-2
    for index, entry in enumerate(plan.layers):
        if entry.ratio == 0:
            continue
        errors = down_errors(candidates, index, inputs[index][0], targets[index][1])
        assert errors["sequential"] <= errors["dense"] * slack, (index, errors)
        assert errors["sequential"] < errors["plain"], (index, errors)
    with torch.no_grad():
        dense = model(windows).logits
        err_seq = (candidates["sequential"](windows).logits - dense).square().mean()
        err_dense = (candidates["dense"](windows).logits - dense).square().mean()
    assert err_seq < err_dense


def test_sequential_refit_saves_and_reloads(tiny_model_dir, windows, tmp_path):
    """A projection without a bias gets one for the refit; the checkpoint's config
    records it, so the saved model reloads with the same logits."""
    from saap.model import save_checkpoint

    model, tokenizer = load_model(tiny_model_dir)
    plan, _ = mlp_plan(model, windows, "pruned", 1.0)
    assert "least_squares_inputs" in plan.to_json()
    pruned = prune_compensated(model, plan, windows)
    save_checkpoint(pruned, tokenizer, tmp_path / "m")
    again, _ = load_model(tmp_path / "m")
    with torch.no_grad():
        assert torch.allclose(pruned(windows).logits, again(windows).logits, atol=1e-5)


def test_least_squares_without_windows_says_what_to_pass(tiny_model_dir, windows):
    from saap.errors import PruningError

    model, _ = load_model(tiny_model_dir)
    plan, _ = mlp_plan(model, windows, "pruned", 1.0)
    with pytest.raises(PruningError, match="calibration windows"):
        prune_compensated(model, plan, None)
    plan.least_squares_inputs = "sideways"
    with pytest.raises(PruningError, match="'sideways'.*'dense', 'pruned'"):
        prune_compensated(model, plan, windows)


def test_ridge_grid_chooses_on_held_back_windows(tiny_model_dir, windows):
    """Each projection takes a ridge of the grid; a grid of one value is that
    ridge; the choice needs held-back windows and says how to get them."""
    from saap.errors import PruningError

    model, _ = load_model(tiny_model_dir)
    fit, holdout = windows[:6], windows[6:]
    plan, _ = mlp_plan(model, fit, "pruned", 0.3)
    single = prune_compensated(model, plan, fit)
    plan.ridge_grid = [0.3]
    one = prune_compensated(model, plan, fit, holdout=holdout)
    for a, b in zip(single.parameters(), one.parameters(), strict=True):
        assert torch.equal(a, b)
    grid = [1e-3, 0.3, 30.0]
    plan.ridge_grid = grid
    assert plan.to_json()["ridge_grid"] == grid
    pruned = prune_model(model, plan, bias_for_cut=True)
    report = sequential_refit(model, pruned, plan, fit, 0.3, "self", grid, holdout)
    assert report and all(r["ridge"] in grid for r in report)
    # the first cut layer sees the same inputs whatever the grid: its choice is
    # the grid value with the lowest held-back error
    singles = []
    for ridge in grid:
        alone = prune_model(model, plan, bias_for_cut=True)
        first = sequential_refit(model, alone, plan, fit, 0.3, "self", [ridge], holdout)
        singles.append(first[0]["holdout_after"])
    assert report[0]["ridge"] == grid[min(range(3), key=singles.__getitem__)]
    assert report[0]["holdout_after"] == pytest.approx(min(singles))
    with pytest.raises(PruningError, match="holdout_samples"):
        prune_compensated(model, plan, fit)


def test_reconstruction_error_from_moments_is_the_error_over_tokens():
    """The refit report's errors come from the fit's moments: the same sum of
    squares as over the tokens, for the fitted and for any other (W, b)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(500, 24, generator=gen, dtype=torch.float64) + 0.5
    y = torch.randn(500, 10, generator=gen, dtype=torch.float64)
    moments = (x.T @ x, x.sum(0), 500.0, y.T @ x, y.sum(0), float(y.square().sum()))
    for seed in range(3):
        gen.manual_seed(seed)
        w = torch.randn(10, 24, generator=gen, dtype=torch.float64)
        b = torch.randn(10, generator=gen, dtype=torch.float64)
        direct = float((x @ w.T + b - y).square().sum())
        assert moment_error(w, b, *moments) == pytest.approx(direct, rel=1e-10)
    # the least-squares solution: a small residual, still exact
    solution = torch.linalg.lstsq(torch.cat([x, torch.ones(500, 1)], 1), y).solution
    w, b = solution[:-1].T, solution[-1]
    direct = float((x @ w.T + b - y).square().sum())
    assert moment_error(w, b, *moments) == pytest.approx(direct, rel=1e-8)


def test_fit_moments_in_float32_blocks_match_float64():
    """The refit's moments, multiplied in float32 blocks and summed in float64,
    equal the float64 moments to float32 precision, whatever the block size
    (one block, blocks that do not divide the tokens); the ridge solution from
    them equals the float64 one to 1e-5."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 700, 48, generator=gen) + 0.5
    y = torch.randn(2, 700, 20, generator=gen) + x[..., :20]
    x64, y64 = x.reshape(-1, 48).double(), y.reshape(-1, 20).double()
    exact = (
        x64.T @ x64,
        x64.sum(0),
        1400.0,
        y64.T @ x64,
        y64.sum(0),
        float(y64.square().sum()),
    )
    prior = torch.randn(20, 48, generator=gen, dtype=torch.float64)
    w_exact, b_exact = ridge_solve(*exact[:5], prior, 0.1)
    for chunk in (1400, 256, 333):
        moments = fit_moments_of(x, y, chunk)
        assert moments[2] == 1400.0
        for got, want in zip(moments, exact, strict=True):
            assert torch.as_tensor(got).dtype == torch.as_tensor(want).dtype
            assert torch.allclose(
                torch.as_tensor(got), torch.as_tensor(want), rtol=1e-5, atol=1e-3
            )
        w, b = ridge_solve(*moments[:5], prior, 0.1)
        assert torch.allclose(w, w_exact, atol=1e-5)
        assert torch.allclose(b, b_exact, atol=1e-5)


@pytest.mark.parametrize("attention", [False, True])
def test_sequential_refit_fits_on_what_the_refitted_model_feeds(
    tiny_model_dir, windows, attention
):
    """The refit carries the pruned hidden states layer by layer without running
    each layer twice (the layer's residual before the MLP plus the refitted
    down_proj of the kept channels): a fresh forward of the refitted model gives
    every refitted projection the very inputs it was fitted on, so its
    reconstruction error there is the one the refit reported."""
    model, _ = load_model(tiny_model_dir)
    plan, _ = flap_plan(
        model, windows, prune_attention=attention, least_squares=True, ridge=1e-2
    )
    plan.least_squares, plan.least_squares_inputs = True, "pruned"
    pruned = prune_model(model, plan, bias_for_cut=True)
    report = sequential_refit(model, pruned, plan, windows, 1e-2, "self")
    assert {r["projection"] for r in report} == (
        {"o", "down"} if attention else {"down"}
    )
    fresh = {
        # the attention's input: the output of the layer's first norm
        "o": hooked(pruned, windows, "input_layernorm", output=True),
        "down": mlp_inputs(pruned, windows),
    }
    # pruned layer i is dense layer plan.layers[...]: no layer is removed here
    assert not any(e.removed for e in plan.layers)
    for row in report:
        index, which = row["layer"], row["projection"]
        dense_layer, layer = model.model.layers[index], pruned.model.layers[index]
        with torch.no_grad():
            if which == "down":
                mlp, h = dense_layer.mlp, fresh["down"][index]
                full = mlp.act_fn(mlp.gate_proj(h)) * mlp.up_proj(h)
                target = mlp.down_proj(full)
                x = full[:, torch.as_tensor(plan.layers[index].kept_channels)]
                out = layer.mlp.down_proj(x)
            else:
                # the dense attention's output on the pruned layer's input
                # against the refitted (kept heads') attention's
                kwargs = _layer_kwargs(model, windows)
                h = fresh["o"][index][1].reshape(*windows.shape, -1)
                target = dense_layer.self_attn(hidden_states=h, **kwargs)[0]
                out = layer.self_attn(hidden_states=h, **kwargs)[0]
                target, out = target.flatten(0, 1), out.flatten(0, 1)
        error = float((out.double() - target.double()).square().sum())
        scale = float(target.double().square().sum())
        assert error / scale == pytest.approx(row["error_after"], rel=1e-3, abs=1e-7), (
            row
        )


def _layer_kwargs(model, windows):
    """Keyword arguments the model passes to its decoder layers (positions,
    rotary embeddings, mask)."""
    from saap.compensation import first_layer_inputs

    return first_layer_inputs(model, windows)[1]
