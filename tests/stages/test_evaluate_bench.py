"""The evaluate and bench stages end to end on the tiny fixture."""

from __future__ import annotations

import json

import pytest

from saap.errors import DataError
from saap.params import BenchParams, EvaluateParams
from stages import bench, evaluate

pytestmark = pytest.mark.integration

SMALL_EVAL = EvaluateParams(
    profiles={"quick": {"limit": 4, "ppl_max_windows": 4, "fidelity_windows": 4}},
    batch_size=4,
    ppl_seq_len=32,
    prompts=["the model"],
    max_new_tokens=4,
    resamples=200,
)


def test_evaluate_stage_writes_whole_deterministic_metrics(
    tiny_model_dir, text_dir, eval_dir, tmp_path
):
    out = tmp_path / "metrics/eval/dense.json"
    first = evaluate.run(SMALL_EVAL, "dense", tiny_model_dir, text_dir, eval_dir, out)
    written = json.loads(out.read_text())
    assert written["schema"] == "saap.eval/v2"
    assert written["profile"] == "quick" and len(written["eval_config_hash"]) == 16
    assert set(written["zero_shot"]) == set(SMALL_EVAL.tasks)
    documents = json.loads((tmp_path / "metrics/eval/dense.documents.json").read_text())
    assert documents["eval_config_hash"] == written["eval_config_hash"]
    for task, scores in written["zero_shot"].items():
        assert 0.0 <= scores["acc"] <= 1.0, task
        assert scores["n"] == 4 and scores["acc_stderr"] >= 0.0
        # lm-eval defines acc_norm for the multiple-choice tasks with long choices
        has_norm = task not in ("boolq", "winogrande")
        assert ("acc_norm" in scores) == has_norm, task
        assert scores["metric"] == ("acc_norm" if has_norm else "acc")
        per_doc = documents["zero_shot"][task]
        assert per_doc["doc_id"] == [0, 1, 2, 3]
        # the task score is the mean of its per-document results
        metric = scores["metric"]
        assert sum(per_doc[metric]) / 4 == pytest.approx(scores[metric])
    reported = [s[s["metric"]] for s in written["zero_shot"].values()]
    assert written["mean_acc"] == pytest.approx(sum(reported) / len(reported))
    assert all(len(v) == 4 for v in documents["perplexity"].values())
    assert written["fidelity"] is None  # no --dense: no fidelity
    assert set(written["perplexity"]) == {"ptb", "wiki", "c4"}
    assert all(v > 1 for v in written["perplexity"].values())
    assert written["generations"][0]["prompt"] == "the model"
    assert (tmp_path / "metrics/eval/dense.generations.md").read_text().startswith("# ")
    second = evaluate.run(SMALL_EVAL, "dense", tiny_model_dir, text_dir, eval_dir, out)
    assert first["zero_shot"] == second["zero_shot"]
    assert first["perplexity"] == second["perplexity"]


def test_evaluate_against_itself_has_zero_kl_and_full_agreement(
    tiny_model_dir, text_dir, eval_dir, tmp_path
):
    out = tmp_path / "same.json"
    metrics = evaluate.run(
        SMALL_EVAL, "same", tiny_model_dir, text_dir, eval_dir, out, tiny_model_dir
    )
    fidelity = metrics["fidelity"]
    assert fidelity["windows"] == 4 and fidelity["corpus"] == "c4"
    assert fidelity["kl"]["value"] == pytest.approx(0.0, abs=1e-6)
    assert fidelity["kl"]["upper"] == pytest.approx(0.0, abs=1e-6)
    assert fidelity["top1_agreement"]["value"] == 1.0


def test_evaluate_fidelity_sees_a_damaged_model(
    tiny_model_dir, text_dir, eval_dir, tmp_path
):
    from saap.model import load_model, save_checkpoint

    model, tokenizer = load_model(tiny_model_dir)
    import torch

    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.down_proj.weight.mul_(0.0)  # remove every MLP's output
    damaged = tmp_path / "damaged"
    save_checkpoint(model, tokenizer, damaged)
    metrics = evaluate.run(
        SMALL_EVAL, "damaged", damaged, text_dir, eval_dir, tmp_path / "d.json",
        tiny_model_dir,
    )
    kl = metrics["fidelity"]["kl"]
    assert kl["lower"] > 1e-3 and kl["lower"] <= kl["value"] <= kl["upper"]
    assert metrics["fidelity"]["top1_agreement"]["value"] < 1.0


def test_profiles_change_the_config_hash(tiny_model_dir, text_dir, eval_dir):
    from saap.evaluation.report import eval_config_hash

    quick = SMALL_EVAL.resolved()
    other = EvaluateParams.model_validate(
        SMALL_EVAL.model_dump()
        | {"profiles": {"quick": {"limit": 5, "ppl_max_windows": 4}}}
    ).resolved()
    assert eval_config_hash(quick, text_dir, eval_dir) == eval_config_hash(
        SMALL_EVAL.resolved(), text_dir, eval_dir
    )
    assert eval_config_hash(quick, text_dir, eval_dir) != eval_config_hash(
        other, text_dir, eval_dir
    )


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


def test_bench_stage_reports_interleaved_speedups(tiny_model_dir, tmp_path):
    params = BenchParams(prompt_len=8, decode_tokens=4, repeats=4, warmup=1, threads=1)
    dense = bench.run(params, "dense", tiny_model_dir, tmp_path / "dense.json", None)
    assert dense["decode_tokens_per_s"] > 0 and dense["prefill_tokens_per_s"] > 0
    assert dense["params"] > 0 and dense["disk_bytes"] > 0
    assert dense["threads"] == 1 and dense["peak_rss_mb"] > 0
    assert "speedup_vs_dense" not in dense
    again = bench.run(
        params, "same", tiny_model_dir, tmp_path / "same.json", tiny_model_dir
    )
    ratios = again["speedup_vs_dense"]
    assert ratios["decode_ideal"] == pytest.approx(1.0)
    assert ratios["macs_ratio"] == pytest.approx(1.0)
    assert ratios["runtime"] == "pytorch-eager"
    for kind in ("decode", "prefill"):
        interval = ratios[kind]
        assert interval["n"] == 4
        assert interval["lower"] <= interval["value"] <= interval["upper"]
        assert len(ratios["timings"]["dense"][kind]) == 4


def test_bench_eager_repeats_leave_the_llamacpp_repeats(
    tiny_model_dir, tmp_path, monkeypatch
):
    import saap.runtime.llamacpp as llamacpp

    seen = {}

    def llamacpp_benchmark(tools, gguf, params, dense_gguf):
        seen["repeats"] = params.repeats
        return {"runtime": "llama.cpp", "repeats": params.repeats, "types": {}}

    monkeypatch.setattr(llamacpp, "ensure_llamacpp", lambda: None)
    monkeypatch.setattr(bench, "llamacpp_benchmark", llamacpp_benchmark)
    folder = tmp_path / "gguf"
    folder.mkdir()
    (folder / "export.json").write_text(json.dumps({"gguf": {"files": {}}}))
    params = BenchParams(
        prompt_len=8, decode_tokens=4, repeats=5, eager_repeats=2, warmup=0, threads=1
    )
    out = bench.run(
        params, "c", tiny_model_dir, tmp_path / "c.json", tiny_model_dir, folder, folder
    )
    assert out["repeats"] == 2 and out["speedup_vs_dense"]["decode"]["n"] == 2
    assert len(out["speedup_vs_dense"]["timings"]["dense"]["decode"]) == 2
    assert seen["repeats"] == 5 and out["llamacpp"]["repeats"] == 5
    # unset: the eager runtime takes bench.repeats too
    out = bench.run(
        params.model_copy(update={"eager_repeats": None}),
        "c",
        tiny_model_dir,
        tmp_path / "c.json",
        tiny_model_dir,
    )
    assert out["repeats"] == 5 and out["speedup_vs_dense"]["decode"]["n"] == 5
    with pytest.raises(ValueError, match="eager_repeats"):
        BenchParams(eager_repeats=1)


def tiny_gguf(path, values: int) -> None:
    import numpy as np
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), "llama")
    writer.add_tensor("w", np.zeros(values, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_dense_record_comes_from_the_candidates_interleaved_rounds(
    tiny_model_dir, tmp_path
):
    params = BenchParams(prompt_len=8, decode_tokens=4, repeats=4, warmup=1, threads=1)
    candidate = bench.run(
        params, "finetuned", tiny_model_dir, tmp_path / "c.json", tiny_model_dir
    )
    # llama.cpp rounds as bench@<variant> records them, and the dense GGUF files
    folder = tmp_path / "gguf"
    folder.mkdir()
    tiny_gguf(folder / "dense-f16.gguf", 64)
    (folder / "export.json").write_text(
        json.dumps({"gguf": {"files": {"f16": {"file": "dense-f16.gguf"}}}})
    )
    rounds = {"prefill": [100.0, 120.0, 110.0], "decode": [20.0, 24.0, 22.0]}
    candidate["llamacpp"] = {
        "runtime": "llama.cpp",
        "threads": 1,
        "types": {"f16": {"timings": {"dense": rounds, "candidate": rounds}}},
    }
    (tmp_path / "c.json").write_text(json.dumps(candidate))
    dense = bench.derive_dense(
        tmp_path / "c.json", tiny_model_dir, folder, tmp_path / "dense.json"
    )
    assert json.loads((tmp_path / "dense.json").read_text()) == dense
    eager = candidate["speedup_vs_dense"]["timings"]["dense"]
    expected = bench.bench.speed_metrics(
        [8 / v for v in eager["prefill"]], [1 / v for v in eager["decode"]], 8
    )
    for key, value in expected.items():
        assert dense[key] == pytest.approx(value)
    assert dense["variant"] == "dense" and dense["measured_with"] == "finetuned"
    assert dense["params"] == candidate["params"]  # the same tiny checkpoint
    assert dense["repeats"] == 4 and "peak_rss_mb" not in dense
    f16 = dense["llamacpp"]["types"]["f16"]
    assert f16["decode_tokens_per_s"] == 22.0 and f16["prefill_tokens_per_s"] == 110.0
    assert f16["tensor_bytes"] == 64 * 4 and dense["llamacpp"]["threads"] == 1
    # a record benched without the dense model cannot give the dense figures
    alone = bench.run(params, "alone", tiny_model_dir, tmp_path / "a.json", None)
    assert "speedup_vs_dense" not in alone
    with pytest.raises(DataError, match="--dense models/base"):
        bench.derive_dense(tmp_path / "a.json", tiny_model_dir, None, tmp_path / "d")
    with pytest.raises(DataError, match="bench the candidate first"):
        bench.derive_dense(tmp_path / "no.json", tiny_model_dir, None, tmp_path / "d")
    assert not (tmp_path / "d").exists()
