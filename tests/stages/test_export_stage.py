"""The export stage and the llama.cpp bench end to end on the tiny fixture."""

from __future__ import annotations

import json

import pytest

from saap.errors import DataError, ExportError
from saap.params import BenchParams, ExportParams
from stages import bench, export

pytestmark = pytest.mark.integration

# the fixture's byte-level BPE splits text as GPT-2 does
PARAMS = ExportParams(gguf_types=["f16", "q8_0"], pre_tokenizer="gpt-2", threads=1)


def test_export_writes_every_type_and_a_failure_keeps_the_previous(
    tiny_model_dir, tmp_path
):
    out = tmp_path / "models/gguf/dense"
    manifest = export.run(PARAMS, "dense", tiny_model_dir, out)
    assert manifest["schema"] == "saap.export/v1"
    files = manifest["gguf"]["files"]
    assert sorted(p.name for p in out.iterdir()) == [
        "export.json",
        "model-f16.gguf",
        "model-q8_0.gguf",
    ]
    assert files["q8_0"]["bytes"] == (out / "model-q8_0.gguf").stat().st_size
    assert manifest["gguf"]["written"]["architecture"] == "llama"  # uniform layers
    assert manifest["gguf"]["llama_cpp"]["options"]["GGML_NATIVE"] == "OFF"
    # what the build is, not how long it took here: the same export on another
    # machine of the same kind is the same bytes
    assert not {"build_seconds", "jobs"} & set(manifest["gguf"]["llama_cpp"])
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    # an unknown pre-tokenizer (llama.cpp refuses the file): a named error, and
    # the previous export is left as it was, with no partial file beside it
    bad = PARAMS.model_copy(update={"pre_tokenizer": None})
    with pytest.raises(ExportError, match="export.pre_tokenizer"):
        export.run(bad, "dense", tiny_model_dir, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in out.parent.iterdir()) == ["dense"]


def test_bench_runs_llamacpp_interleaved_with_dense(tiny_model_dir, tmp_path):
    dense_dir = tmp_path / "gguf/dense"
    export.run(PARAMS, "dense", tiny_model_dir, dense_dir)
    params = BenchParams(prompt_len=8, decode_tokens=4, repeats=4, warmup=1, threads=1)
    result = bench.run(
        params,
        "same",
        tiny_model_dir,
        tmp_path / "same.json",
        tiny_model_dir,
        dense_dir,
        dense_dir,
    )
    runtime = result["llamacpp"]
    assert runtime["runtime"] == "llama.cpp" and set(runtime["types"]) == {
        "f16",
        "q8_0",
    }
    for entry in runtime["types"].values():
        assert entry["decode_ideal"] == pytest.approx(1.0)
        assert entry["decode_tokens_per_s"] > 0 and entry["prefill_tokens_per_s"] > 0
        for phase in ("decode", "prefill"):
            interval = entry["speedup"][phase]
            assert interval["n"] == 4
            assert interval["lower"] <= interval["value"] <= interval["upper"]
            assert len(entry["timings"]["dense"][phase]) == 4
    assert result["runtime"] == "pytorch-eager" and "speedup_vs_dense" in result
    assert json.loads((tmp_path / "same.json").read_text())["llamacpp"]["types"]


def test_bench_without_export_names_the_stage_to_run(tiny_model_dir, tmp_path):
    params = BenchParams(prompt_len=8, decode_tokens=4, repeats=2, warmup=0, threads=1)
    with pytest.raises(DataError, match="run the export stage first"):
        bench.run(
            params, "x", tiny_model_dir, tmp_path / "x.json", None, tmp_path / "none"
        )
    assert not (tmp_path / "x.json").exists()
