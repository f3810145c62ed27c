"""Gate semantics on synthetic evidence: bounds decide, damage-only accuracy in
the quick profile, fail closed on missing or unlike evaluations, champion."""

from __future__ import annotations

import numpy as np
import pytest

from saap.evaluation.intervals import mean_interval, paired_speedup
from saap.evaluation.zeroshot import mean_score, task_scores
from saap.gates import evaluate_gates
from saap.params import GatesParams

pytestmark = pytest.mark.unit

TASKS = {"piqa": True, "boolq": False}  # task -> has acc_norm


def evidence(
    correct: dict[str, np.ndarray],
    nll: np.ndarray,
    *,
    kl: np.ndarray | None = None,
    speed: tuple[np.ndarray, np.ndarray] | None = None,
    profile: str = "quick",
    config: str = "cfg",
    params: int = 100,
) -> dict:
    """``{"eval", "documents", "bench"}`` as the stages write them."""
    documents = {
        task: {"doc_id": list(range(len(values)))}
        | {m: values.tolist() for m in (["acc", "acc_norm"] if norm else ["acc"])}
        for (task, norm), values in zip(TASKS.items(), correct.values(), strict=True)
    }
    scores = {task: task_scores(docs) for task, docs in documents.items()}
    fidelity = None
    if kl is not None:
        fidelity = {
            "corpus": "c4",
            "windows": len(kl),
            "kl": mean_interval(kl).as_dict(),
        }
    bench = {}
    if speed is not None:
        bench["llamacpp"] = {
            "runtime": "llama.cpp",
            "threads": 2,
            "types": {
                "f16": {
                    "decode_ideal": 1.25,
                    "speedup": {"decode": paired_speedup(*speed).as_dict()},
                }
            },
        }
    return {
        "eval": {
            "zero_shot": scores,
            "mean_acc": mean_score(scores),
            "perplexity": {"ptb": float(np.exp(nll.mean()))},
            "params": params,
            "profile": profile,
            "eval_config_hash": config,
            "fidelity": fidelity,
            "resamples": 1000,
            "seed": 0,
        },
        "documents": {"zero_shot": documents, "perplexity": {"ptb": nll.tolist()}},
        "bench": bench,
    }


RNG = np.random.default_rng(0)
N = 400
DENSE_DOCS = {t: (RNG.random(N) < 0.6).astype(float) for t in TASKS}
DENSE_NLL = RNG.normal(4.0, 0.3, 64)
TIMES = RNG.normal(20.0, 0.4, 12)


def good_candidate(**overrides) -> dict:
    """Like dense on 97% of documents, 30% higher perplexity, low KL, 1.3x."""
    flip = {t: RNG.random(N) < 0.03 for t in TASKS}
    docs = {t: np.where(flip[t], 1 - DENSE_DOCS[t], DENSE_DOCS[t]) for t in TASKS}
    kwargs = dict(
        kl=np.abs(RNG.normal(0.2, 0.05, 64)),
        speed=(TIMES * 1.3 * RNG.normal(1, 0.01, 12), TIMES),
        params=80,
    ) | overrides
    return evidence(docs, DENSE_NLL + 0.26, **kwargs)


def by_name(results):
    return {r.name: r for r in results}


def dense() -> dict:
    return evidence(DENSE_DOCS, DENSE_NLL)


def test_a_good_candidate_passes_every_gate():
    results = by_name(evaluate_gates(good_candidate(), dense(), GatesParams()))
    assert all(r.passed for r in results.values()), results
    ppl = results["ppl_ratio"]
    assert ppl.lower <= ppl.value <= ppl.upper and ppl.value == pytest.approx(
        np.exp(0.26)
    )
    assert results["accuracy_retention"].mode == "damage_only"  # quick profile
    assert results["no_regression"].detail == "no champion"


def test_at_least_gate_needs_its_lower_bound_over_the_threshold():
    # rounds alternate 1.00x and 1.16x: the geometric mean 1.077x clears 1.05,
    # but with 12 rounds the bootstrap's lower bound does not
    rounds = np.tile([1.0, 1.16], 6)
    slow = good_candidate(speed=(TIMES * rounds, TIMES))
    gate = by_name(evaluate_gates(slow, dense(), GatesParams()))["decode_speedup"]
    assert gate.value > 1.05 and gate.lower < 1.05 and not gate.passed


def test_at_most_gate_needs_its_upper_bound_under_the_threshold():
    candidate = good_candidate()
    kl_upper = candidate["eval"]["fidelity"]["kl"]["upper"]
    kl_value = candidate["eval"]["fidelity"]["kl"]["value"]
    between = (kl_value + kl_upper) / 2  # point under it, upper bound over it
    gate = by_name(
        evaluate_gates(candidate, dense(), GatesParams(max_kl=between))
    )["fidelity_kl"]
    assert not gate.passed and gate.value < between < gate.upper


def test_quick_accuracy_blocks_only_clear_damage_nightly_decides():
    # 0.89 retention with +-0.05: in quick the interval still reaches 0.9 -> pass
    drop = {t: DENSE_DOCS[t] * (RNG.random(N) > 0.11) for t in TASKS}
    quick = evidence(drop, DENSE_NLL + 0.1, kl=np.full(8, 0.1), speed=(TIMES, TIMES))
    gate = by_name(evaluate_gates(quick, dense(), GatesParams()))["accuracy_retention"]
    assert gate.value < 0.9 < gate.upper and gate.passed
    # the same numbers in a deciding profile fail (lower bound under 0.9 and an
    # interval wider than max_half_width)
    nightly = GatesParams(accuracy_decides_in=["quick"])
    gate = by_name(evaluate_gates(quick, dense(), nightly))["accuracy_retention"]
    assert gate.mode == "decides" and not gate.passed
    # where accuracy decides, an interval wider than max_half_width fails closed
    # even when its lower bound clears the threshold
    strict = GatesParams(accuracy_decides_in=["quick"], max_half_width=0.005)
    gate = by_name(evaluate_gates(good_candidate(), dense(), strict))[
        "accuracy_retention"
    ]
    assert gate.lower > 0.9 and not gate.passed
    assert "too few documents to decide" in gate.detail


def test_missing_inputs_fail_closed_with_the_reason():
    candidate = good_candidate(kl=None, speed=None)
    results = by_name(evaluate_gates(candidate, dense(), GatesParams()))
    assert not results["fidelity_kl"].passed
    assert "no fidelity" in results["fidelity_kl"].detail
    assert not results["decode_speedup"].passed
    assert "no interleaved llama.cpp timing" in results["decode_speedup"].detail


def test_unlike_evaluations_are_not_compared():
    candidate = good_candidate()
    other = evidence(DENSE_DOCS, DENSE_NLL, config="other")
    results = by_name(evaluate_gates(candidate, other, GatesParams()))
    for name in ("accuracy_retention", "ppl_ratio"):
        assert not results[name].passed and "different configs" in results[name].detail
    champion = evidence(DENSE_DOCS, DENSE_NLL, config="other", params=80)
    gate = by_name(evaluate_gates(candidate, dense(), GatesParams(), champion))[
        "no_regression"
    ]
    assert not gate.passed and "another config" in gate.detail


def test_a_candidate_identical_to_the_champion_shows_no_regression():
    candidate = good_candidate()
    gate = by_name(evaluate_gates(candidate, dense(), GatesParams(), candidate))[
        "no_regression"
    ]
    assert gate.passed and gate.value == gate.lower == gate.upper == 0.0


def test_a_worse_candidate_regresses_against_the_champion():
    champion = good_candidate()
    worse = good_candidate()
    worse["documents"]["perplexity"]["ptb"] = (
        np.asarray(champion["documents"]["perplexity"]["ptb"]) + 0.1
    ).tolist()  # 10% higher perplexity on every window than the champion
    gate = by_name(evaluate_gates(worse, dense(), GatesParams(), champion))[
        "no_regression"
    ]
    assert not gate.passed and "FAIL" in gate.detail
    bigger = good_candidate(params=120)
    smaller_champion = bigger | {"eval": bigger["eval"] | {"params": 80}}
    gate = by_name(evaluate_gates(bigger, dense(), GatesParams(), smaller_champion))[
        "no_regression"
    ]
    assert not gate.passed and "params 120 <= 80 (FAIL)" in gate.detail


def test_a_corpus_the_candidate_trained_on_cannot_judge_it():
    """Distilled on PTB's train split, a candidate's PTB perplexity is
    in-domain: the perplexity gates fail closed naming the fix; on a corpus it
    did not train on they judge it as usual."""

    def also_on_wiki(entry: dict) -> dict:
        entry["eval"]["perplexity"]["wiki"] = entry["eval"]["perplexity"]["ptb"]
        entry["documents"]["perplexity"]["wiki"] = entry["documents"]["perplexity"][
            "ptb"
        ]
        return entry

    candidate = also_on_wiki(good_candidate())
    candidate["eval"]["in_domain"] = ["ptb"]
    champion = also_on_wiki(good_candidate())
    results = by_name(evaluate_gates(candidate, dense(), GatesParams(), champion))
    for name in ("ppl_ratio", "no_regression"):
        assert not results[name].passed
        assert "ptb is in-domain for the candidate" in results[name].detail
        assert "set gates.ppl_corpus" in results[name].detail
    # a champion trained in-domain cannot be compared on that corpus either
    plain = also_on_wiki(good_candidate())
    gate = by_name(evaluate_gates(plain, dense(), GatesParams(), candidate))[
        "no_regression"
    ]
    assert not gate.passed and "in-domain for the champion" in gate.detail
    on_wiki = GatesParams(ppl_corpus="wiki")
    results = by_name(
        evaluate_gates(candidate, also_on_wiki(dense()), on_wiki, champion)
    )
    assert results["ppl_ratio"].passed and results["no_regression"].passed
