"""Pruning benchmark on SmolLM2-135M (2-core CPU): wall time and peak memory of
importance + ranking + pruning at 20%, and PTB perplexity of the dense model and
of each estimator's 20% model.

Usage (after ``dvc repro assets calibration``, i.e. models/base, data/text and
data/calibration exist)::

    .venv/bin/python benchmarks/prune_smollm2.py [--windows 300]
"""

from __future__ import annotations

import argparse
import platform
import resource
import time
from pathlib import Path

import torch

from saap.calibration import load_calibration
from saap.evaluation.perplexity import perplexity
from saap.evaluation.report import corpus_windows
from saap.importance.estimators import collect_for
from saap.model import count_params, layer_shapes, load_model
from saap.params import ImportanceParams, PruneParams
from saap.plan import plan_from_scores
from saap.prune import prune_model
from saap.scores import scores_from_stats

ROWS = [
    # label, importance, allocation, extra prune params
    ("random (uniform)", "random", "uniform", {}),
    ("magnitude (uniform)", "magnitude", "uniform", {}),
    ("LLM-Pruner taylor_vector (uniform)", "taylor_vector", "uniform", {}),
    ("LLM-Pruner taylor_element1 (uniform)", "taylor_element1", "uniform", {}),
    ("LLM-Pruner taylor_element2 (uniform)", "taylor_element2", "uniform", {}),
    ("Wanda-sp (uniform)", "wanda_sp", "uniform", {}),
    ("FLAP (global, bias compensation)", "flap", "global", {"bias_compensation": True}),
    ("SAAP fused (uniform)", "saap", "uniform", {}),
    ("SAAP fused + adaptive (default)", "saap", "adaptive", {}),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", type=Path, default=Path("models/base"))
    parser.add_argument("--calibration", type=Path, default=Path("data/calibration"))
    parser.add_argument("--text", type=Path, default=Path("data/text"))
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--windows", type=int, default=300)
    parser.add_argument("--out", type=Path, default=Path("docs/bench_pruning.md"))
    args = parser.parse_args()
    torch.set_num_threads(2)

    # the timed part: what the importance, ranking and prune stages do at 20%
    started = time.perf_counter()
    model, tokenizer = load_model(args.model)
    loaded = time.perf_counter()
    windows = load_calibration(args.calibration)["input_ids"]
    estimators = list(ImportanceParams().estimators)
    stats = collect_for(model, windows, 4, estimators)
    scores = scores_from_stats(stats, estimators, 0, {"num_layers": len(stats.layers)})
    estimated = time.perf_counter()
    shapes, total = layer_shapes(model), count_params(model)
    default = PruneParams(ratio=args.ratio)
    plan = plan_from_scores(scores, shapes, total, default)
    pruned = prune_model(model, plan)
    done = time.perf_counter()
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    removed = 1 - count_params(pruned) / total
    del pruned

    ptb = corpus_windows(tokenizer, args.text, "ptb", 128, args.windows)
    rows = []
    dense_ppl = perplexity(model.to(torch.bfloat16), ptb, progress=True, desc="dense")
    model.float()
    rows.append(("dense", "-", "-", total, dense_ppl))
    for label, importance, allocation, extra in ROWS:
        params = PruneParams(
            ratio=args.ratio, importance=importance, allocation=allocation, **extra
        )
        plan = plan_from_scores(scores, shapes, total, params)
        means = scores.input_means if params.bias_compensation else None
        small = prune_model(model, plan, means).to(torch.bfloat16)
        ppl = perplexity(small, ptb, progress=True, desc=label)
        rows.append((label, importance, allocation, count_params(small), ppl))
        print(f"{label}: {ppl:.1f}", flush=True)

    lines = [
        "# Pruning benchmark: SmolLM2-135M, 20% of parameters removed",
        "",
        f"Machine: {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}.",
        "Command: `.venv/bin/python benchmarks/prune_smollm2.py`",
        "",
        "## Time and memory of importance + ranking + pruning (default SAAP plan)",
        "",
        f"- load model (float32): {loaded - started:.1f} s",
        f"- calibration statistics + all {len(estimators)} estimators "
        f"({windows.shape[0]} x {windows.shape[1]} tokens): {estimated - loaded:.1f} s",
        f"- ranking + physical pruning: {done - estimated:.1f} s",
        f"- **total wall: {done - started:.1f} s** (target: 60 s); "
        f"removed {removed:.2%} of {total:,} parameters",
        f"- peak resident memory: {peak_mb:.0f} MB (the float32 model is "
        f"{total * 4 / 2**20:.0f} MB)",
        "",
        f"## PTB test perplexity (first {ptb.shape[0]} windows of 128 tokens, bf16), "
        "no fine-tuning",
        "",
        "| method | importance | allocation | parameters | PTB ppl |",
        "|---|---|---|---:|---:|",
    ]
    for label, importance, allocation, n, ppl in rows:
        lines.append(f"| {label} | {importance} | {allocation} | {n:,} | {ppl:.1f} |")
    lines += [
        "",
        "All rows prune MLP channels only (`prune.prune_attention: false`, see "
        "docs/method.md) of layers 3..27, from the same calibration windows.",
    ]
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
