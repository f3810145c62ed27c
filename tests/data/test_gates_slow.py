"""Gate audit on the real SmolLM2-135M (slow): a random-pruned 20% candidate is
rejected; the dense model offered as a candidate passes retention, perplexity
and fidelity, and its llama.cpp speed against itself (the same f16 GGUF run
interleaved with itself) is near 1.0x and does not pass the speed gate."""

from __future__ import annotations

import json

import pytest
from realkit import prune_real

from saap.evaluation.bench import llamacpp_benchmark
from saap.evaluation.report import evaluate_model
from saap.export.gguf import write_gguf
from saap.gates import evaluate_gates
from saap.model import (
    compute_dtype,
    save_checkpoint,
)
from saap.params import (
    BenchParams,
    EvaluateParams,
    GatesParams,
)
from saap.runtime.llamacpp import ensure_llamacpp

pytestmark = pytest.mark.slow

SETTINGS = EvaluateParams(
    profiles={"quick": {"limit": 20, "ppl_max_windows": 40, "fidelity_windows": 16}},
    ppl_corpora=["ptb"],
    prompts=[],
).resolved()
BENCH = BenchParams(decode_tokens=16, repeats=8)


def evidence(model, tokenizer, assets, reference, gguf=None, dense_gguf=None) -> dict:
    metrics, documents = evaluate_model(
        model,
        tokenizer,
        assets / "data/text",
        assets / "data/eval",
        SETTINGS,
        "candidate",
        "in-memory",
        reference=reference,
    )
    bench = {}
    if gguf is not None:
        bench["llamacpp"] = llamacpp_benchmark(
            ensure_llamacpp(), {"f16": gguf}, BENCH, {"f16": dense_gguf}
        )
    return {"eval": metrics, "documents": documents, "bench": bench}


def test_gates_reject_random_pruning_and_pass_the_dense_model(
    real_assets, record_property, tmp_path
):
    model, tokenizer, random_pruned = prune_real(real_assets, "random", "uniform")
    save_checkpoint(random_pruned, tokenizer, tmp_path / "random")
    source = ensure_llamacpp().source
    write_gguf(real_assets / "models/base", tmp_path / "dense.gguf", source)
    write_gguf(tmp_path / "random", tmp_path / "random.gguf", source)
    random_pruned = random_pruned.to(compute_dtype())
    dense = model.to(compute_dtype())

    dense_gguf = tmp_path / "dense.gguf"
    dense_evidence = evidence(dense, tokenizer, real_assets, None)
    as_candidate = evidence(
        dense, tokenizer, real_assets, dense, dense_gguf, dense_gguf
    )
    damaged = evidence(
        random_pruned,
        tokenizer,
        real_assets,
        dense,
        tmp_path / "random.gguf",
        dense_gguf,
    )
    params = GatesParams()
    same = {r.name: r for r in evaluate_gates(as_candidate, dense_evidence, params)}
    bad = {r.name: r for r in evaluate_gates(damaged, dense_evidence, params)}
    record_property(
        "gates",
        json.dumps(
            {
                "dense": {k: v.as_dict() for k, v in same.items()},
                "random": {k: v.as_dict() for k, v in bad.items()},
            }
        ),
    )
    print(json.dumps({k: (v.value, v.lower, v.upper) for k, v in bad.items()}))

    # the dense model against itself: identical documents, zero KL
    for name in ("accuracy_retention", "ppl_ratio", "fidelity_kl"):
        assert same[name].passed, same[name]
    assert same["accuracy_retention"].value == pytest.approx(1.0)
    assert same["fidelity_kl"].upper == pytest.approx(0.0, abs=1e-6)
    speed = same["decode_speedup"]
    # a model timed against itself: near 1.0x (a 95% interval over a few noisy
    # rounds on a shared machine can miss 1.0 itself, so not asserted), and the
    # gate must not mistake it for a speedup of at least 1.05
    assert 0.8 < speed.value < 1.25, speed
    assert speed.lower < params.min_decode_speedup, speed
    assert not speed.passed

    # random pruning of 20%: perplexity and fidelity reject it clearly
    assert not all(r.passed for r in bad.values())
    assert not bad["ppl_ratio"].passed and bad["ppl_ratio"].lower > 2.0
    assert not bad["fidelity_kl"].passed and bad["fidelity_kl"].lower > params.max_kl
