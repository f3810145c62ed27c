"""Gate audit through the evaluate and bench stages on the tiny fixture (fast):
the dense model offered as a candidate passes retention, perplexity and
fidelity, and its speedup interval contains 1, so the speed gate keeps it out.

Random pruning is audited on the real model (tests/data/test_gates_slow.py):
the tiny fixture is untrained, so removing 20% of it at random hardly changes
its outputs (measured: KL 0.003, perplexity ratio 0.99) and proves nothing."""

from __future__ import annotations

import json

import pytest

from saap.gates import evaluate_gates
from saap.params import BenchParams, EvaluateParams, GatesParams
from stages import bench, evaluate

pytestmark = pytest.mark.integration

EVAL = EvaluateParams(
    profiles={"quick": {"limit": 6, "ppl_max_windows": 8, "fidelity_windows": 8}},
    batch_size=4,
    ppl_seq_len=32,
    ppl_corpora=["ptb"],
    prompts=[],
    resamples=500,
)
BENCH = BenchParams(prompt_len=8, decode_tokens=8, repeats=12, warmup=2, threads=1)


def stage_evidence(variant, model_dir, dense_dir, text_dir, eval_dir, out) -> dict:
    path = out / f"{variant}.json"
    metrics = evaluate.run(
        EVAL, variant, model_dir, text_dir, eval_dir, path, dense_dir
    )
    documents = json.loads(path.with_suffix(".documents.json").read_text())
    bench_metrics = (
        bench.run(BENCH, variant, model_dir, out / f"bench-{variant}.json", dense_dir)
        if dense_dir
        else {}
    )
    return {"eval": metrics, "documents": documents, "bench": bench_metrics}


def test_dense_offered_as_candidate_passes_but_is_no_speedup(
    tiny_model_dir, text_dir, eval_dir, tmp_path
):
    args = (text_dir, eval_dir, tmp_path)
    dense = stage_evidence("dense", tiny_model_dir, None, *args)
    same = stage_evidence("same", tiny_model_dir, tiny_model_dir, *args)
    gates = {r.name: r for r in evaluate_gates(same, dense, GatesParams())}
    for name in ("accuracy_retention", "ppl_ratio", "fidelity_kl", "no_regression"):
        assert gates[name].passed, gates[name]
    assert gates["accuracy_retention"].value == pytest.approx(1.0)
    assert gates["ppl_ratio"].value == pytest.approx(1.0)
    speed = gates["decode_speedup"]
    assert speed.lower <= 1.0 <= speed.upper and not speed.passed
