"""One place per extension: an estimator, an allocation, a recovery method or a
comparison method added in one place is accepted by params.yaml and used by the
pipeline's functions; unknown names fail with the known ones."""

from __future__ import annotations

import contextlib

import pytest
import torch

from saap.allocation import ALLOCATIONS, Allocation, top_up
from saap.errors import ParamsError
from saap.finetune import split_records
from saap.importance.estimators import ESTIMATORS, EstimatorSpec, collect_for
from saap.methods import METHODS, Method, build_arm_plan, prune_params_for
from saap.model import count_params, layer_shapes, load_model
from saap.params import PruneParams, parse_section
from saap.plan import Plan, plan_from_scores
from saap.prune import prune_model
from saap.recovery import RECOVERIES, LoraRecovery, RecoveryData, recover
from saap.registry import Registry
from saap.scores import scores_from_stats
from tests.saap.test_finetune import RECORDS, tiny_params

pytestmark = pytest.mark.unit

# the tiny fixture has 4 layers: prune the middle two
SMALL = {"skip_first": 1, "skip_last": 1}


@contextlib.contextmanager
def registered(registry: Registry, name: str, entry):
    registry.add(name, entry)
    try:
        yield entry
    finally:
        registry.remove(name)


def channel_index(stats, index, generator):
    """Toy estimator: later MLP channels and heads are more important."""
    shape = stats.layers[index].shape
    return {
        "q_head": torch.arange(shape.num_heads, dtype=torch.float32),
        "kv_group": torch.arange(shape.num_kv_heads, dtype=torch.float32),
        "mlp": torch.arange(shape.intermediate_size, dtype=torch.float32),
    }


def mlp_only_threshold(ctx):
    """Toy allocation: MLP channels by raw score across layers, nothing else."""
    return Allocation(top_up(ctx.options, [(0, 0)] * len(ctx.options), ctx.target))


@pytest.fixture
def model_and_stats(tiny_model_dir, windows):
    model, _ = load_model(tiny_model_dir)
    return model, collect_for(model, windows, 2, [], progress=False)


def test_a_new_estimator_is_one_registration(model_and_stats):
    model, stats = model_and_stats
    spec = EstimatorSpec("channel_index", channel_index)
    with registered(ESTIMATORS, "channel_index", spec):
        importance = parse_section("importance", {"estimators": ["channel_index"]})
        prune = parse_section(
            "prune", {"importance": "channel_index", "ratio": 0.15, **SMALL}
        )
        scores = scores_from_stats(stats, list(importance.estimators), 0, {})
        plan = plan_from_scores(scores, layer_shapes(model), count_params(model), prune)
        assert plan.importance == "channel_index"
        # the lowest-index channels go first
        pruned = [layer for layer in plan.layers if layer.intermediate_size < 128]
        assert pruned and all(0 not in layer.kept_channels for layer in pruned)
    with pytest.raises(ParamsError, match="unknown estimator 'channel_index'"):
        parse_section("prune", {"importance": "channel_index"})


def test_a_new_allocation_is_one_registration(model_and_stats):
    model, stats = model_and_stats
    scores = scores_from_stats(stats, [], 0, {})
    with registered(ALLOCATIONS, "mlp_only_threshold", mlp_only_threshold):
        params = parse_section(
            "prune",
            {"allocation": "mlp_only_threshold", "ratio": 0.15, **SMALL},
        )
        plan = plan_from_scores(
            scores, layer_shapes(model), count_params(model), params
        )
        assert plan.allocation == "mlp_only_threshold"
        assert abs(plan.achieved_ratio - 0.15) < 0.01
        assert Plan.from_json(plan.to_json()) == plan
    with pytest.raises(ParamsError, match="prune.allocation: .*uniform, global"):
        parse_section("prune", {"allocation": "mlp_only_threshold"})


class FirstLayerOnly(LoraRecovery):
    """Toy recovery: LoRA on the first decoder layer only."""

    name = "first_layer_only"

    def rank_pattern(self, params, plan):
        return {
            f"model.layers.{i}.{part}.{module}": (4 if i == 0 else 1)
            for i in range(4)
            for part, modules in (
                ("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
                ("mlp", ("gate_proj", "up_proj", "down_proj")),
            )
            for module in modules
        }


def test_a_new_recovery_is_one_registration(tiny_model_dir, tmp_path):
    with registered(RECOVERIES, "first_layer_only", FirstLayerOnly()):
        assert parse_section("finetune", {"method": "first_layer_only"})
        model, tokenizer = load_model(tiny_model_dir)
        train, val = split_records(RECORDS, 2, 0)
        params = tiny_params(method="first_layer_only", max_steps=2)
        trained, result = recover(
            model,
            tokenizer,
            RecoveryData(train, val),
            params,
            tmp_path,
            progress=False,
        )
        ranks = {
            name: module.r["default"]
            for name, module in trained.named_modules()
            if name.endswith("q_proj") and hasattr(module, "r")
        }
        assert ranks and {r for n, r in ranks.items() if ".layers.0." in n} == {4}
        assert result.steps == 2
    with pytest.raises(ParamsError, match="finetune.method: .*known: lora, group"):
        parse_section("finetune", {"method": "first_layer_only"})


def test_a_new_comparison_method_is_one_registration(model_and_stats):
    model, stats = model_and_stats
    scores = scores_from_stats(stats, ["magnitude"], 0, {})
    method = Method("Magnitude, global", "magnitude", "global")
    with registered(METHODS, "magnitude_global", method):
        compare = parse_section("compare", {"methods": ["dense", "magnitude_global"]})
        assert compare.methods == ["dense", "magnitude_global"]
        params = prune_params_for("magnitude_global", 0.15, PruneParams(**SMALL))
        plan = build_arm_plan(scores, layer_shapes(model), count_params(model), params)
        assert (plan.importance, plan.allocation) == ("magnitude", "global")
        assert count_params(prune_model(model, plan)) < count_params(model)


def test_names_are_unique_and_unknown_ones_are_named():
    with pytest.raises(ValueError, match="registered twice"):
        ALLOCATIONS.add("uniform", mlp_only_threshold)
    with pytest.raises(ParamsError, match="unknown allocation 'knapsack'; known"):
        ALLOCATIONS.get("knapsack")
