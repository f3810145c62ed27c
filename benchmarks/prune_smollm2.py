"""Pruning benchmark on SmolLM2-135M (2-core CPU): wall time and peak memory of
importance + ranking + pruning as the pipeline's stages do them (params.yaml's
importance and prune sections, the least-squares refit included), and PTB
perplexity of the dense model, of each estimator's model without compensation
and of the pipeline's default plan.

Usage (after ``dvc repro assets calibration``, i.e. models/base, data/text and
data/calibration exist)::

    .venv/bin/python benchmarks/prune_smollm2.py [--ratio 0.2] [--windows 300]
"""

from __future__ import annotations

import argparse
import platform
import resource
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from saap.calibration import load_calibration
from saap.evaluation.perplexity import perplexity
from saap.evaluation.report import corpus_windows
from saap.model import count_params, layer_shapes, load_model
from saap.params import PruneParams, load_section
from saap.plan import plan_from_scores
from saap.prune import prune_compensated, prune_model
from saap.scores import save_scores
from stages import importance as importance_stage
from stages import ranking as ranking_stage

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
    ("SAAP fused + adaptive (no compensation)", "saap", "adaptive", {}),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--model", type=Path, default=Path("models/base"))
    parser.add_argument("--calibration", type=Path, default=Path("data/calibration"))
    parser.add_argument("--text", type=Path, default=Path("data/text"))
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--windows", type=int, default=300)
    parser.add_argument("--out", type=Path, default=Path("docs/bench_pruning.md"))
    args = parser.parse_args()
    torch.set_num_threads(2)
    importance_params = load_section(args.params, "importance")
    default = load_section(args.params, "prune").model_copy(
        update={"ratio": args.ratio}
    )

    # the timed part: what the importance, ranking and prune stages compute
    # (each stage loads the model itself; writing results is left out)
    started = time.perf_counter()
    scores = importance_stage.compute(importance_params, args.model, args.calibration)
    estimated = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        save_scores(scores, Path(tmp))
        plan = ranking_stage.run(
            default,
            args.model,
            Path(tmp),
            args.calibration,
            importance_params.batch_size,
        )
    ranked = time.perf_counter()
    model, tokenizer = load_model(args.model, dtype=torch.float32)
    calibration = load_calibration(args.calibration)
    pruned = prune_compensated(
        model,
        plan,
        calibration["input_ids"],
        scores.input_means,
        calibration.get("holdout_ids"),
    )
    done = time.perf_counter()
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    total = count_params(model)
    pruned_params = count_params(pruned)
    removed = 1 - pruned_params / total
    compensation = (
        "least-squares refit"
        if plan.least_squares
        else "bias compensation"
        if plan.bias_compensation
        else "no compensation"
    )
    shapes = layer_shapes(model)
    revision = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()

    ptb = corpus_windows(tokenizer, args.text, "ptb", 128, args.windows)
    rows = []
    dense_ppl = perplexity(model.to(torch.bfloat16), ptb, progress=True, desc="dense")
    model.float()
    rows.append(("dense", "-", "-", total, dense_ppl))
    default_ppl = perplexity(pruned.to(torch.bfloat16), ptb, desc="default")
    del pruned
    for label, importance, allocation, extra in ROWS:
        params = PruneParams(
            ratio=args.ratio, importance=importance, allocation=allocation, **extra
        )
        row_plan = plan_from_scores(scores, shapes, total, params)
        means = scores.input_means if params.bias_compensation else None
        small = prune_model(model, row_plan, means).to(torch.bfloat16)
        ppl = perplexity(small, ptb, progress=True, desc=label)
        rows.append((label, importance, allocation, count_params(small), ppl))
        print(f"{label}: {ppl:.1f}", flush=True)
    rows.append(
        (
            f"pipeline default ({default.importance} {'+'.join(default.saap_metrics)}, "
            f"{default.allocation}, {compensation}, {default.steps} step(s))",
            default.importance,
            default.allocation,
            pruned_params,
            default_ppl,
        )
    )

    lines = [
        f"# Pruning benchmark: SmolLM2-135M, {args.ratio:.0%} of parameters removed",
        "",
        f"Machine: {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}.",
        f"Command: `.venv/bin/python benchmarks/prune_smollm2.py --ratio {args.ratio}`"
        f" at revision `{revision}`.",
        "",
        f"## Time and memory of importance + ranking + pruning ({args.params}'s "
        f"importance and prune sections at ratio {args.ratio})",
        "",
        "What the importance, ranking and prune stages compute, each loading the "
        "float32 model itself; writing their outputs is not timed.",
        "",
        f"- importance (calibration statistics with per-window gradients, "
        f"importance.per_window: {importance_params.per_window}, "
        f"{len(importance_params.estimators)} estimators, "
        f"{calibration['input_ids'].shape[0]} x {calibration['input_ids'].shape[1]} "
        f"tokens): {estimated - started:.1f} s",
        f"- ranking (plan: {default.importance}, {default.allocation}, "
        f"{default.steps} step(s)): {ranked - estimated:.1f} s",
        f"- pruning with the plan's compensation ({compensation}): "
        f"{done - ranked:.1f} s",
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
        "docs/method.md) of layers 3..27, from the same calibration windows; all "
        "but the last without compensation (FLAP's with its bias), the last "
        "as the pipeline's stages build it.",
    ]
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
