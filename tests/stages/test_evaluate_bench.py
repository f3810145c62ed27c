"""The evaluate and bench stages end to end on the tiny fixture."""

from __future__ import annotations

import json

import pytest

from saap.errors import DataError
from saap.params import BenchParams, EvaluateParams
from stages import bench, evaluate

pytestmark = pytest.mark.integration

SMALL_EVAL = EvaluateParams(
    limit=4,
    batch_size=4,
    ppl_max_windows=4,
    ppl_seq_len=32,
    prompts=["the model"],
    max_new_tokens=4,
)


def test_evaluate_stage_writes_whole_deterministic_metrics(
    tiny_model_dir, text_dir, eval_dir, tmp_path
):
    out = tmp_path / "metrics/eval/dense.json"
    first = evaluate.run(SMALL_EVAL, "dense", tiny_model_dir, text_dir, eval_dir, out)
    written = json.loads(out.read_text())
    assert written["schema"] == "saap.eval/v1"
    assert set(written["zero_shot"]) == set(SMALL_EVAL.tasks)
    for task, scores in written["zero_shot"].items():
        assert 0.0 <= scores["acc"] <= 1.0, task
        assert scores["n"] == 4
    assert set(written["perplexity"]) == {"ptb", "wiki", "c4"}
    assert all(v > 1 for v in written["perplexity"].values())
    assert written["generations"][0]["prompt"] == "the model"
    assert (tmp_path / "metrics/eval/dense.generations.md").read_text().startswith("# ")
    second = evaluate.run(SMALL_EVAL, "dense", tiny_model_dir, text_dir, eval_dir, out)
    assert first["zero_shot"] == second["zero_shot"]
    assert first["perplexity"] == second["perplexity"]


def test_evaluate_failure_keeps_previous_metrics(tiny_model_dir, text_dir, tmp_path):
    out = tmp_path / "dense.json"
    out.write_text('{"previous": true}')
    with pytest.raises(DataError, match="assets stage writes it"):
        evaluate.run(
            SMALL_EVAL, "dense", tiny_model_dir, text_dir, tmp_path / "none", out
        )
    assert json.loads(out.read_text()) == {"previous": True}


def test_evaluate_rejects_checkpoint_that_does_not_load(text_dir, eval_dir, tmp_path):
    from saap.errors import SourceError

    with pytest.raises(SourceError, match="not a checkpoint folder"):
        evaluate.run(SMALL_EVAL, "x", tmp_path, text_dir, eval_dir, tmp_path / "m.json")


def test_bench_stage_reports_speedups(tiny_model_dir, tmp_path):
    params = BenchParams(prompt_len=8, decode_tokens=4, repeats=2, warmup=1, threads=1)
    dense = bench.run(params, "dense", tiny_model_dir, tmp_path / "dense.json", None)
    assert dense["decode_tokens_per_s"] > 0 and dense["prefill_tokens_per_s"] > 0
    assert dense["params"] > 0 and dense["disk_bytes"] > 0
    assert dense["threads"] == 1 and dense["peak_rss_mb"] > 0
    again = bench.run(
        params, "same", tiny_model_dir, tmp_path / "same.json", tmp_path / "dense.json"
    )
    ratios = again["speedup_vs_dense"]
    assert ratios["decode_ideal"] == pytest.approx(1.0)
    assert ratios["macs_ratio"] == pytest.approx(1.0)
