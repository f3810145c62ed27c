"""Gate audit through the evaluate and bench stages on the tiny fixture (fast):
the dense model offered as a candidate passes retention, perplexity and
fidelity, and its llama.cpp speed against itself (its GGUF run interleaved with
itself) is near 1.0x, so the speed gate keeps it out.

Random pruning is audited on the real model (tests/data/test_gates_slow.py):
the tiny fixture is untrained, so removing 20% of it at random hardly changes
its outputs (measured: KL 0.003, perplexity ratio 0.99) and proves nothing."""

from __future__ import annotations

import json

import pytest

from saap.gates import evaluate_gates
from saap.params import BenchParams, EvaluateParams, ExportParams, GatesParams
from stages import bench, evaluate, export

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
    bench_metrics = {}
    if dense_dir:
        # the fixture's byte-level BPE splits text as GPT-2 does
        params = ExportParams(gguf_types=["f16"], pre_tokenizer="gpt-2", threads=1)
        gguf = out / f"gguf-{variant}"
        export.run(params, variant, model_dir, gguf)
        bench_metrics = bench.run(
            BENCH,
            variant,
            model_dir,
            out / f"bench-{variant}.json",
            dense_dir,
            gguf,
            gguf,
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
    assert "llama.cpp f16 GGUF" in speed.detail
    assert 0.7 < speed.value < 1.4, speed
    assert speed.lower < 1.05 and not speed.passed, speed
