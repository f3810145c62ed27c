"""The comparison's pieces on the tiny fixture: each method's plan, the
attention fallback at high ratios, recovery choice, and the gathered table."""

from __future__ import annotations

import numpy as np
import pytest

from saap.comparison import (
    against_baselines,
    baselines_table,
    results_table,
    seed_ratio,
    summarise,
    t95,
)
from saap.errors import DataError, ParamsError, PruningError
from saap.importance.estimators import collect_for
from saap.methods import (
    METHODS,
    arm_importance,
    arm_plan,
    build_arm_plan,
    default_method,
    prune_params_for,
    pruning_label,
    recovery_methods,
)
from saap.model import count_params, layer_shapes, load_model
from saap.params import CompareParams, PruneParams, parse_section
from saap.scores import scores_from_stats

pytestmark = pytest.mark.unit


@pytest.fixture
def model_and_scores(tiny_model_dir, windows):
    model, _ = load_model(tiny_model_dir)
    estimators = sorted({m.importance for m in METHODS.values()} - {"saap"})
    stats = collect_for(model, windows, 2, estimators, progress=False)
    scores = scores_from_stats(stats, estimators, seed=0, meta={"seconds": 1.0})
    return model, scores


BASE = PruneParams(skip_first=1, skip_last=1)


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_meets_the_same_budget(model_and_scores, method):
    model, scores = model_and_scores
    total = count_params(model)
    params = prune_params_for(method, 0.2, BASE)
    plan = build_arm_plan(scores, layer_shapes(model), total, params)
    # SAAP's arms fuse as the prune section does (its default: saap_rank)
    assert plan.importance == arm_importance(METHODS[method], BASE)
    assert plan.allocation == METHODS[method].allocation
    assert plan.bias_compensation is METHODS[method].bias_compensation
    assert abs(plan.achieved_ratio - 0.2) < 0.02


def test_shortgpt_removes_whole_layers_once_the_budget_allows(model_and_scores):
    model, scores = model_and_scores
    total = count_params(model)
    params = prune_params_for("shortgpt", 0.3, BASE)  # a layer is ~22% here
    plan = build_arm_plan(scores, layer_shapes(model), total, params)
    assert len(plan.removed_layers) == 1
    assert abs(plan.achieved_ratio - 0.3) < 0.02


def test_high_ratio_falls_back_to_attention_for_every_method(model_and_scores):
    model, scores = model_and_scores
    total = count_params(model)
    shapes = layer_shapes(model)
    low = build_arm_plan(scores, shapes, total, prune_params_for("saap", 0.1, BASE))
    assert low.prune_attention is False
    for method in ("saap", "llm_pruner_element1", "flap"):
        plan = build_arm_plan(
            scores, shapes, total, prune_params_for(method, 0.3, BASE)
        )  # MLP channels of layers 1-2 allow at most 26% here
        assert plan.prune_attention is True
        assert abs(plan.achieved_ratio - 0.3) < 0.02


def test_recovery_methods():
    params = CompareParams(recover=["saap", "wanda_sp"])
    assert recovery_methods("saap", params) == ["group", "lora"]
    assert recovery_methods("wanda_sp", params) == ["lora"]
    assert recovery_methods("flap", params) == []
    assert recovery_methods("dense", params) == []


def test_bad_compare_params_name_the_key():
    with pytest.raises(ParamsError, match=r"compare\.ratios"):
        parse_section("compare", {"ratios": [0.2, 1.5]})
    with pytest.raises(ParamsError, match=r"compare\.methods"):
        parse_section("compare", {"methods": ["llm_pruner"]})


def _seed_row(ppl: float, acc: float, params: int = 70) -> dict:
    return {
        "params": params,
        "ppl": {"ptb": ppl, "wiki": ppl / 2},
        "acc": {"piqa": acc, "boolq": acc},
        "mean_acc": acc,
        "prune_s": 1.0,
        "kept_fraction": [1.0, 0.5],
        "removed_layers": [],
    }


def test_summary_reports_mean_and_spread_over_seeds():
    bench = {"decode_tokens_per_s": 10.0, "weight_bytes_per_token": 100}
    records = [
        {
            "method": "saap",
            "label": "SAAP",
            "ratio": 0.2,
            "seeds": [_seed_row(10.0, 0.5), _seed_row(12.0, 0.7)],
            "recovered": [
                {
                    "finetune": "group",
                    "params": 70,
                    "ppl": {"ptb": 9.0, "wiki": 4.5},
                    "acc": {"piqa": 0.8, "boolq": 0.8},
                    "mean_acc": 0.8,
                    "finetune_s": 3.0,
                    "tokens": 100,
                }
            ],
            "bench": bench | {"weight_bytes_per_token": 80},
        },
        {
            "method": "dense",
            "label": "Dense",
            "ratio": 0.0,
            "seeds": [_seed_row(5.0, 0.9, params=100)],
            "recovered": [],
            "bench": bench,
        },
    ]
    rows = summarise(records)
    assert [(r["method"], r["recovery"]) for r in rows] == [
        ("dense", None),
        ("saap", None),
        ("saap", "group"),
    ]
    saap = rows[1]
    assert saap["ppl"]["ptb"][0] == pytest.approx(11.0)
    assert saap["ppl"]["ptb"][1] == pytest.approx(2**0.5)  # sample std of 10, 12
    assert saap["speedup_ideal"] == pytest.approx(1.25)
    table = results_table(rows)
    assert "| 20% | SAAP | - | 0.0 | 11.0 ± 1.4 |" in table
    assert "| 20% | SAAP | group |" in table


def test_interleaved_speedup_is_reported_with_its_interval():
    speedup = {
        "decode": {"value": 1.2, "lower": 1.1, "upper": 1.3},
        "decode_ideal": 1.25,
    }
    records = [
        {
            "method": "saap",
            "label": "SAAP",
            "ratio": 0.2,
            "seeds": [_seed_row(10.0, 0.5), _seed_row(12.0, 0.7)],
            "recovered": [],
            "bench": {
                "decode_tokens_per_s": 12.0,
                "repeats": 6,
                "speedup_vs_dense": speedup,
            },
        },
        {
            "method": "dense",
            "label": "Dense",
            "ratio": 0.0,
            "seeds": [_seed_row(5.0, 0.9, params=100)],
            "recovered": [],
            # another process's figure: not what the interleaved arm divides by
            "bench": {"decode_tokens_per_s": 5.0, "weight_bytes_per_token": 100},
        },
    ]
    saap = summarise(records)[1]
    assert saap["speedup_measured"] == pytest.approx(1.2)
    assert saap["speedup_interval"] == (1.1, 1.3)
    assert "| 1.20 [1.10, 1.30] / 1.25 |" in results_table(summarise(records))


def _docs_row(correct: list[float], kl: float | None) -> dict:
    row = _seed_row(10.0, sum(correct) / len(correct))
    row["documents"] = {"piqa": correct, "boolq": correct}
    row["acc"] = {"piqa": row["mean_acc"], "boolq": row["mean_acc"]}
    row["kl"] = {"value": kl, "lower": kl, "upper": kl} if kl is not None else None
    return row


def test_summary_separates_rows_only_where_the_paired_interval_does():
    n = 300
    dense = [1.0] * 240 + [0.0] * 60  # 0.8
    same = list(dense)
    same[0] = 0.0  # one document of 300 differs: not separated from the best
    worse = [0.0 if i % 3 == 0 else v for i, v in enumerate(dense)]  # ~0.53

    def record(method, ratio, docs, kl):
        return {
            "method": method,
            "label": method,
            "ratio": ratio,
            "seeds": [_docs_row(docs, kl)],
            "recovered": [],
        }

    rows = summarise(
        [
            record("dense", 0.0, dense, None),
            record("saap", 0.2, dense, 0.1),
            record("flap", 0.2, same, 0.2),
            record("random", 0.2, worse, 2.0),
        ],
        resamples=500,
    )
    by_method = {r["method"]: r for r in rows}
    assert len(dense) == n
    assert by_method["saap"]["vs_best"] == "best"
    assert by_method["saap"]["retention"]["value"] == pytest.approx(1.0)
    assert by_method["flap"]["vs_best"] == "not separated"
    assert by_method["random"]["vs_best"] == "below best"
    assert by_method["random"]["retention"]["upper"] < 0.8
    assert by_method["random"]["kl"] == (2.0, 0.0)
    table = results_table(rows)
    assert "not separated" in table and "below best" in table


def _seeds(ptb: list[float], kl: list[float]) -> list[dict]:
    return [
        {"seed": i, "ppl": {"ptb": p, "wiki": p / 2}, "kl": {"value": k}}
        for i, (p, k) in enumerate(zip(ptb, kl, strict=True))
    ]


def _record(method: str, ratio: float, ptb: list[float], kl: list[float]) -> dict:
    return {"method": method, "label": method, "ratio": ratio, "seeds": _seeds(ptb, kl)}


def test_default_is_paired_with_every_baseline_over_seeds():
    records = [
        _record("saap_ls", 0.2, [100.0, 110.0, 105.0], [0.50, 0.52, 0.51]),
        # ahead of flap on every seed by about 10%, clearly
        _record("flap", 0.2, [110.0, 121.0, 115.5], [0.55, 0.57, 0.56]),
        # wanda_sp: worse on average but noisy, so not separated
        _record("wanda_sp", 0.2, [90.0, 140.0, 100.0], [0.40, 0.60, 0.55]),
        # other SAAP variants and dense are not baselines
        _record("saap", 0.2, [200.0, 210.0, 205.0], [0.9, 0.9, 0.9]),
        {"method": "dense", "label": "Dense", "ratio": 0.0, "seeds": []},
    ]
    entries = {e["metric"]: e for e in against_baselines(records, "saap_ls")}
    assert set(entries) == {"ptb", "wiki", "kl"}
    ptb = entries["ptb"]
    by = {b["method"]: b for b in ptb["baselines"]}
    assert set(by) == {"flap", "wanda_sp"}
    assert by["flap"]["verdict"] == "ahead"
    assert by["flap"]["ratio"]["value"] == pytest.approx(1 / 1.1)
    assert by["wanda_sp"]["verdict"] == "not separated"
    # the best baseline is the lowest mean: wanda_sp (110.0) against flap (115.5)
    assert ptb["best"] == "wanda_sp"
    assert ptb["margin"] == pytest.approx(110.0 - 105.0)
    assert ptb["margin_over_sd"] is False  # wanda's sd (26.5) exceeds the margin
    table = baselines_table(list(entries.values()))
    assert (
        "| 20% | PTB ppl | flap | 115.5 ± 5.5 | 0.909 [0.909, 0.909] | ahead |" in table
    )
    assert "- 20%, PTB ppl: SAAP default 105.0 ± 5.0, best baseline wanda_sp" in table
    assert table.count("goal missed") == 3


def test_default_method_is_the_arm_of_the_prune_section():
    prune = PruneParams(importance="saap", allocation="adaptive", least_squares=True)
    assert default_method(prune) == "saap_ls"
    assert default_method(prune.model_copy(update={"least_squares": False})) == "saap"
    bias = prune.model_copy(update={"least_squares": False, "bias_compensation": True})
    assert default_method(bias) == "saap_bc"
    assert default_method(prune.model_copy(update={"allocation": "uniform"})) is None
    # SAAP's arms fuse as the prune section does (rank scale included); the
    # published methods keep their own estimator
    rank = prune.model_copy(update={"importance": "saap_rank"})
    assert default_method(rank) == "saap_ls"
    assert prune_params_for("saap_ls", 0.5, rank).importance == "saap_rank"
    assert prune_params_for("saap", 0.5, prune).importance == "saap"
    assert prune_params_for("flap_ls", 0.5, rank).importance == "flap"
    assert default_method(prune.model_copy(update={"importance": "flap"})) is None


def test_seed_ratio_is_the_geometric_mean_with_a_t_interval():
    # log ratios 0.1, 0.2, 0.3: mean 0.2, sd 0.1, 2 degrees of freedom (t 4.303)
    reference = np.array([10.0, 20.0, 30.0])
    candidate = reference * np.exp([0.1, 0.2, 0.3])
    interval = seed_ratio(candidate, reference)
    half = 4.303 * 0.1 / 3**0.5
    assert interval.value == pytest.approx(np.exp(0.2))
    assert interval.lower == pytest.approx(np.exp(0.2 - half))
    assert interval.upper == pytest.approx(np.exp(0.2 + half))
    assert interval.n == 3
    # the same ratio on every seed: no spread, whatever the scale of the values
    same = seed_ratio(reference * 0.9, reference)
    assert same.lower == pytest.approx(0.9) and same.upper == pytest.approx(0.9)
    assert seed_ratio(reference, candidate).value == pytest.approx(np.exp(-0.2))


def test_seed_ratio_refuses_what_it_cannot_pair():
    with pytest.raises(DataError, match="same seeds, at least 2"):
        seed_ratio([1.0], [2.0])
    with pytest.raises(DataError, match="same seeds"):
        seed_ratio([1.0, 2.0], [1.0, 2.0, 3.0])
    with pytest.raises(DataError, match="positive"):
        seed_ratio([1.0, 0.0], [1.0, 2.0])


def test_t_quantiles_are_conservative_between_table_entries():
    assert t95(2) == pytest.approx(4.303)
    assert t95(11) == t95(10)  # the larger quantile of the two neighbours
    assert t95(100) == pytest.approx(1.960)
    with pytest.raises(DataError, match="degree of freedom"):
        t95(0)


def test_only_saap_methods_prune_in_steps():
    base = BASE.model_copy(update={"max_step_ratio": 0.3, "iterations": 1})
    assert prune_params_for("saap_ls", 0.5, base).steps == 2
    assert prune_params_for("saap", 0.2, base).steps == 1
    for method in ("flap_ls", "flap", "wanda_sp", "llm_pruner_element1"):
        assert prune_params_for(method, 0.5, base).steps == 1, method
    stepped = base.model_copy(update={"iterations": 2})
    assert prune_params_for("flap_ls", 0.2, stepped).steps == 1


def test_arm_plan_prunes_in_steps_as_the_prune_stage_does(model_and_scores, windows):
    model, scores = model_and_scores
    base = BASE.model_copy(update={"max_step_ratio": 0.15, "iterations": 1})
    stepped = prune_params_for("saap", 0.25, base)
    assert stepped.steps == 2 and pruning_label("saap", stepped) == "saap, 2 steps"
    plan = arm_plan(model, stepped, scores, windows, batch_size=2)
    assert plan.steps == 2 and abs(plan.achieved_ratio - 0.25) < 0.02
    with pytest.raises(PruningError, match="max_step_ratio"):
        arm_plan(model, stepped, scores)
    # one step: the one-shot plan of build_arm_plan, unchanged
    flap = prune_params_for("flap", 0.25, base)
    assert pruning_label("flap", flap) == "flap"
    one = arm_plan(model, flap, scores)
    same = build_arm_plan(scores, layer_shapes(model), count_params(model), flap)
    assert one.dumps() == same.dumps()
