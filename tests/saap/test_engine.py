"""The pruning engine on tiny fixtures: estimators, plans, surgery, checkpoints."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from saap.errors import PruningError
from saap.importance.estimators import SAAP_METRICS, base_names, collect_for
from saap.model import count_params, layer_shapes, load_model, save_checkpoint
from saap.params import PruneParams
from saap.plan import build_plan, plan_from_scores
from saap.prune import prune_model
from saap.scores import load_scores, save_scores, scores_from_stats

pytestmark = pytest.mark.unit

ALL_ESTIMATORS = base_names()


def scores_for(model, windows, estimators=ALL_ESTIMATORS):
    stats = collect_for(model, windows, 2, list(estimators), progress=False)
    return scores_from_stats(
        stats, estimators, seed=0, meta={"num_layers": len(stats.layers)}
    )


def params(**overrides) -> PruneParams:
    base = dict(ratio=0.2, skip_first=1, skip_last=1, prune_attention=True)
    base.update(overrides)
    return PruneParams(**base)


@pytest.mark.parametrize(
    "estimator", [*(e for e in ALL_ESTIMATORS if e != "random"), "saap"]
)
def test_planted_dead_structures_rank_last(tiny_model_dir, windows, estimator):
    model, _ = load_model(tiny_model_dir)
    layer = model.model.layers[1]
    with torch.no_grad():
        # dead MLP channel 7: its gate and up rows and its down column
        layer.mlp.gate_proj.weight[7] = 0
        layer.mlp.up_proj.weight[7] = 0
        layer.mlp.down_proj.weight[:, 7] = 0
        # dead query head 3 (head_dim 16): q rows and o columns
        layer.self_attn.q_proj.weight[48:64] = 0
        layer.self_attn.o_proj.weight[:, 48:64] = 0
    # saap is derived: it fuses the jackknifed scores of its inputs
    computed = scores_for(
        model, windows, list(SAAP_METRICS) if estimator == "saap" else [estimator]
    )
    scores = computed.estimator(estimator)[1]
    mlp, heads = scores["mlp"], scores["q_head"]
    assert mlp[7] < torch.cat([mlp[:7], mlp[8:]]).min()
    assert heads[3] < heads[:3].min()


def test_planted_dead_kv_group_ranks_last(tiny_model_dir, windows):
    model, _ = load_model(tiny_model_dir)
    attn = model.model.layers[2].self_attn
    with torch.no_grad():
        # kv group 0 = kv head 0 with query heads 0 and 1
        attn.q_proj.weight[:32] = 0
        attn.k_proj.weight[:16] = 0
        attn.v_proj.weight[:16] = 0
        attn.o_proj.weight[:, :32] = 0
    result = scores_for(model, windows, ["taylor_element1", "magnitude", "flap"])
    for name in ("taylor_element1", "magnitude", "flap"):
        groups = result.scores[name][2]["kv_group"]
        assert groups[0] < groups[1], name


@pytest.mark.parametrize("fixture", ["tiny_model_dir", "tiny_mha_dir", "tiny_qwen_dir"])
@pytest.mark.parametrize("allocation", ["uniform", "global", "adaptive"])
@pytest.mark.parametrize("unit", ["query_head", "kv_group"])
def test_exact_parameter_count_and_shapes(request, windows, fixture, allocation, unit):
    model, _ = load_model(request.getfixturevalue(fixture))
    scores = scores_for(model, windows, ["taylor_vector", "taylor_element1"])
    plan = plan_from_scores(
        scores,
        layer_shapes(model),
        count_params(model),
        params(allocation=allocation, attention_unit=unit),
    )
    pruned = prune_model(model, plan)
    # the plan's count is the real count of the smaller model
    assert count_params(model) - count_params(pruned) == plan.removed_params
    # within one MLP channel (3 x hidden 64 = 192 parameters) of the target
    assert abs(plan.removed_params - plan.target_removed) <= 192
    for entry, shape in zip(plan.layers, layer_shapes(pruned), strict=True):
        assert shape.num_heads == len(entry.kept_heads)
        assert shape.num_kv_heads == len(entry.kept_kv_heads)
        assert shape.num_heads % shape.num_kv_heads == 0
        assert shape.intermediate_size == len(entry.kept_channels)
    # skipped layers are untouched
    assert plan.layers[0].intermediate_size == 128
    assert plan.layers[-1].num_heads == model.config.num_attention_heads
    logits = pruned(windows[:2]).logits
    assert logits.shape == (2, windows.shape[1], model.config.vocab_size)
    assert torch.isfinite(logits).all()


def test_query_head_unit_keeps_every_kv_head(tiny_model_dir, windows):
    model, _ = load_model(tiny_model_dir)
    scores = scores_for(model, windows, ["taylor_element1"])
    plan = plan_from_scores(
        scores,
        layer_shapes(model),
        count_params(model),
        params(ratio=0.3, attention_unit="query_head"),
    )
    pruned_layers = [layer for layer in plan.layers if layer.num_heads < 4]
    assert pruned_layers, "a 30% plan should prune some heads"
    for layer in pruned_layers:
        assert layer.kept_kv_heads == [0, 1]
        # one head kept in each kv group (heads 0-1 -> group 0, heads 2-3 -> group 1)
        assert sorted(h // 2 for h in layer.kept_heads) == [0, 1]


def test_uniform_allocation_gives_equal_layer_widths(tiny_model_dir, windows):
    model, _ = load_model(tiny_model_dir)
    scores = scores_for(model, windows, ["taylor_element1"])
    plan = plan_from_scores(
        scores,
        layer_shapes(model),
        count_params(model),
        params(
            allocation="uniform",
            importance="taylor_element1",
            prune_attention=False,
            ratio=0.1,
        ),
    )
    widths = [layer.intermediate_size for layer in plan.layers[1:-1]]
    # uniform ratio; the top-up may take one more channel from some layers
    assert max(widths) - min(widths) <= 1


def test_adaptive_allocation_is_non_uniform(tiny_model_dir, windows):
    model, _ = load_model(tiny_model_dir)
    scores = scores_for(model, windows, ["taylor_vector", "taylor_element1"])
    plan = plan_from_scores(
        scores,
        layer_shapes(model),
        count_params(model),
        params(prune_attention=False, adaptive_spread=0.5),
    )
    widths = [layer.intermediate_size for layer in plan.layers[1:-1]]
    assert max(widths) - min(widths) > 5
    importances = [layer.layer_importance for layer in plan.layers[1:-1]]
    # the more important layer keeps more channels
    order = sorted(range(2), key=lambda i: importances[i])
    assert widths[order[0]] <= widths[order[1]]


def test_zero_ratio_plan_gives_identical_logits(tiny_model_dir, windows):
    model, _ = load_model(tiny_model_dir)
    scores = scores_for(model, windows, ["taylor_element1"])
    plan = plan_from_scores(
        scores, layer_shapes(model), count_params(model), params(ratio=0.0)
    )
    pruned = prune_model(model, plan)
    assert count_params(pruned) == count_params(model)
    with torch.no_grad():
        assert torch.equal(pruned(windows).logits, model(windows).logits)


def test_replay_is_bit_identical_and_deterministic(tiny_model_dir, windows):
    model, _ = load_model(tiny_model_dir)
    first = scores_for(model, windows)
    second = scores_for(load_model(tiny_model_dir)[0], windows)
    for name in first.scores:
        for a, b in zip(first.scores[name], second.scores[name], strict=True):
            assert all(torch.equal(a[k], b[k]) for k in a), name
    plan_a = plan_from_scores(first, layer_shapes(model), count_params(model), params())
    plan_b = plan_from_scores(
        second, layer_shapes(model), count_params(model), params()
    )
    assert plan_a == plan_b
    state_a = prune_model(model, plan_a).state_dict()
    state_b = prune_model(load_model(tiny_model_dir)[0], plan_a).state_dict()
    assert state_a.keys() == state_b.keys()
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)


def test_checkpoint_reloads_with_saap_and_plain_transformers(
    tiny_model_dir, windows, tmp_path
):
    model, tokenizer = load_model(tiny_model_dir)
    scores = scores_for(model, windows, ["taylor_element1"])
    plan = plan_from_scores(
        scores, layer_shapes(model), count_params(model), params(ratio=0.3)
    )
    pruned = prune_model(model, plan)
    save_checkpoint(pruned, tokenizer, tmp_path)
    reloaded, _ = load_model(tmp_path)
    plain = AutoModelForCausalLM.from_pretrained(
        tmp_path, trust_remote_code=True
    ).eval()
    with torch.no_grad():
        expected = pruned(windows).logits
        assert torch.equal(reloaded(windows).logits, expected)
        assert torch.equal(plain(windows).logits, expected)
    # generate() with the KV cache equals greedy decoding without it
    prompt = windows[:1, :8]
    cached = plain.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=True)
    uncached = plain.generate(
        prompt, max_new_tokens=6, do_sample=False, use_cache=False
    )
    assert torch.equal(cached, uncached)


def test_bias_compensation_adds_biases_and_helps(tiny_model_dir, windows):
    model, _ = load_model(tiny_model_dir)
    stats_scores = scores_for(model, windows, ["flap"])
    plan = plan_from_scores(
        stats_scores,
        layer_shapes(model),
        count_params(model),
        params(importance="flap", allocation="global"),
    )
    plain = prune_model(model, plan)
    compensated = prune_model(model, plan, stats_scores.input_means)
    layer = compensated.model.layers[1]
    assert (
        layer.mlp.down_proj.bias is not None and layer.self_attn.o_proj.bias is not None
    )
    with torch.no_grad():
        dense = model(windows).logits
        error_plain = (plain(windows).logits - dense).square().mean()
        error_comp = (compensated(windows).logits - dense).square().mean()
    assert error_comp < error_plain


def test_scores_round_trip(tiny_model_dir, windows, tmp_path):
    model, _ = load_model(tiny_model_dir)
    scores = scores_for(model, windows)
    save_scores(scores, tmp_path)
    loaded = load_scores(tmp_path)
    for name in scores.scores:
        for a, b in zip(scores.scores[name], loaded.scores[name], strict=True):
            assert all(torch.equal(a[k], b[k]) for k in a)
    fused, fused_again = loaded.estimator("saap"), scores.estimator("saap")
    assert torch.equal(fused[1]["mlp"], fused_again[1]["mlp"])


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (dict(ratio=0.95, max_layer_ratio=0.5), "allow at most"),
        (dict(skip_first=2, skip_last=2), "leave no prunable layer"),
    ],
)
def test_impossible_plans_fail_clearly(tiny_model_dir, windows, overrides, match):
    model, _ = load_model(tiny_model_dir)
    scores = scores_for(model, windows, ["taylor_element1"])
    with pytest.raises(PruningError, match=match):
        plan_from_scores(
            scores, layer_shapes(model), count_params(model), params(**overrides)
        )


def test_plan_for_another_model_is_rejected(tiny_model_dir, tiny_mha_dir, windows):
    gqa, _ = load_model(tiny_model_dir)
    mha, _ = load_model(tiny_mha_dir)
    scores = scores_for(mha, windows, ["taylor_element1"])
    plan = build_plan(
        layer_shapes(mha),
        scores.estimator("taylor_element1"),
        count_params(mha),
        params(attention_unit="kv_group", ratio=0.3),
        0.3,
    )
    with pytest.raises(PruningError, match="made for another model"):
        prune_model(gqa, plan)


def test_unsupported_architecture_is_named(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    from saap.model import layer_shapes as shapes

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(PruningError, match="'gpt2' is not supported"):
        shapes(model)


def test_layer_removal_drops_whole_layers(tiny_model_dir, windows, tmp_path):
    model, tokenizer = load_model(tiny_model_dir)
    scores = scores_for(model, windows, ["taylor_element1"])
    total = count_params(model)
    plan = plan_from_scores(
        scores,
        layer_shapes(model),
        total,
        params(allocation="layers", importance="taylor_element1", ratio=0.3),
    )
    # one layer (~33k of 167k parameters) goes whole, MLP channels top up the rest
    assert len(plan.removed_layers) == 1
    lowest = min(plan.prunable_layers, key=lambda i: float(scores.block_influence[i]))
    assert plan.removed_layers == [lowest]
    pruned = prune_model(model, plan)
    assert pruned.config.num_hidden_layers == 3
    assert total - count_params(pruned) == plan.removed_params
    assert abs(plan.removed_params - plan.target_removed) <= 192
    save_checkpoint(pruned, tokenizer, tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True)
    with torch.no_grad():
        assert torch.equal(reloaded(windows).logits, pruned(windows).logits)
    cached = reloaded.generate(windows[:1, :8], max_new_tokens=4, do_sample=False)
    assert cached.shape == (1, 12)


def test_performance_bound_picks_largest_ratio_under_it(tiny_model_dir, windows):
    from saap.evaluation.perplexity import perplexity

    model, _ = load_model(tiny_model_dir)
    scores = scores_for(model, windows, ["taylor_element1"])
    holdout = windows[:4]
    dense = perplexity(model, holdout)

    def held_back(plan):
        return perplexity(prune_model(model, plan), holdout)

    bound = dense * 1.05
    plan = plan_from_scores(
        scores,
        layer_shapes(model),
        count_params(model),
        params(ratio=0.25, ppl_bound=bound, prune_attention=False),
        held_back,
    )
    assert plan.holdout_ppl <= bound
    assert plan.ratio_requested <= 0.25
    # every tried ratio above the chosen one broke the bound
    for trial in plan.ppl_search:
        if trial["ratio"] > plan.ratio_requested:
            assert trial["holdout_ppl"] > bound


def test_short_calibration_text_is_refused():
    from saap.data import sample_windows
    from saap.errors import DataError

    with pytest.raises(DataError, match="yields 2 non-overlapping windows of 8 tokens"):
        sample_windows([list(range(10)), list(range(9))], 5, 8, seed=0)


@pytest.mark.parametrize("allocation", ["uniform", "global", "adaptive", "layers"])
def test_runtime_aware_widths_are_multiples_and_meet_the_budget(
    tiny_model_dir, windows, allocation
):
    model, _ = load_model(tiny_model_dir)
    scores = scores_for(model, windows, ["taylor_element1"])
    multiple = 16
    plan = plan_from_scores(
        scores,
        layer_shapes(model),
        count_params(model),
        params(allocation=allocation, prune_attention=False, width_multiple=multiple),
    )
    widths = [layer.intermediate_size for layer in plan.kept_layers()]
    assert all(w % multiple == 0 for w in widths), widths
    assert any(w < 128 for w in widths)
    # within half a block of channels (3 x hidden 64 parameters each)
    assert abs(plan.removed_params - plan.target_removed) <= multiple * 192 / 2
    pruned = prune_model(model, plan)
    assert count_params(model) - count_params(pruned) == plan.removed_params
