"""Pruning benchmark on SmolLM2-135M (2-core CPU): wall time and peak memory of
importance + ranking + pruning as the pipeline's stages do them (params.yaml's
importance and prune sections, the least-squares refit included), and PTB
perplexity of the dense model, of each estimator's model without compensation
and of the pipeline's default plan.

With ``--base REV``, the timed part also runs against the code of revision
``REV`` (a git worktree): each round one fresh process per revision, the order
reversed every other round, the time ratio paired by round (95% t-interval).
The child processes import ``saap`` and ``stages`` from their own tree and run
this file's timed part there; models and data are this checkout's.

Usage (after ``dvc repro assets calibration``, i.e. models/base, data/text and
data/calibration exist)::

    .venv/bin/python benchmarks/prune_smollm2.py [--ratio 0.2] [--windows 300]
        [--base REV --rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from saap.calibration import fit_windows, load_calibration
from saap.comparison import seed_ratio
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
    # SAAP's rows fuse as the prune section does (prune.importance and
    # prune.saap_metrics: the metrics importance.jackknife gives replicates of)
    ("SAAP fused (uniform)", "saap", "uniform", {}),
    ("SAAP fused + adaptive (no compensation)", "saap", "adaptive", {}),
]


def timed(args, importance_params, default) -> dict:
    """What the importance, ranking and prune stages compute (each stage loads
    the model itself; writing results is left out), timed part by part."""
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
        fit_windows(calibration),
        scores.input_means,
        calibration.get("holdout_ids"),
    )
    done = time.perf_counter()
    return {
        "seconds": {
            "importance": estimated - started,
            "ranking": ranked - estimated,
            "prune": done - ranked,
            "total": done - started,
        },
        "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "scores": scores,
        "plan": plan,
        "model": model,
        "tokenizer": tokenizer,
        "calibration": calibration,
        "pruned": pruned,
    }


def against_revision(args) -> list[str]:
    """The timed part at this checkout and at ``args.base``, alternating fresh
    processes: a table of seconds per part and the paired ratio."""
    here = Path(__file__).resolve().parents[1]
    script = Path(__file__).resolve()
    base = subprocess.run(
        ["git", "rev-parse", "--short", args.base],
        capture_output=True,
        text=True,
        check=True,
        cwd=here,
    ).stdout.strip()
    runs = {"this checkout": [], f"revision {base}": []}
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "base"
        subprocess.run(
            ["git", "worktree", "add", "--detach", "-q", str(tree), base],
            check=True,
            cwd=here,
        )
        trees = dict(zip(runs, (here, tree), strict=True))
        try:
            for round_ in range(args.rounds):
                order = list(runs) if round_ % 2 == 0 else list(runs)[::-1]
                for label in order:
                    tree_dir = trees[label]
                    command = [
                        sys.executable,
                        str(script),
                        "--time-only",
                        "--ratio",
                        str(args.ratio),
                        "--params",
                        str(tree_dir / "params.yaml"),
                        "--model",
                        str(args.model.resolve()),
                        "--calibration",
                        str(args.calibration.resolve()),
                    ]
                    env = dict(os.environ, PYTHONPATH=str(tree_dir))
                    out = subprocess.run(
                        command,
                        cwd=tree_dir,
                        env=env,
                        capture_output=True,
                        text=True,
                        check=True,
                    ).stdout
                    result = json.loads(out.strip().splitlines()[-1])
                    runs[label].append(result)
                    print(f"round {round_} {label}: {result}", flush=True)
        finally:
            subprocess.run(
                ["git", "worktree", "remove", "--force", str(tree)], cwd=here
            )
    parts = ["importance", "ranking", "prune", "total"]
    lines = [
        f"## Against revision `{base}` (the same timed part, alternating processes)",
        "",
        f"`--base {args.base} --rounds {args.rounds}`: each round one fresh process "
        "per revision, importing that revision's `saap` and `stages` (a git "
        "worktree) with its params.yaml; the order reversed every other round.",
        "",
        "| code | " + " | ".join(f"{p} (s)" for p in parts) + " | peak RSS (MB) |",
        "|---|" + "---|" * (len(parts) + 1),
    ]
    for label, results in runs.items():
        cells = [", ".join(f"{r['seconds'][p]:.1f}" for r in results) for p in parts]
        peak = max(r["peak_mb"] for r in results)
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {peak:.0f} |")
    lines.append("")
    new, old = runs.values()
    for p in ("importance", "prune", "total"):
        ratio = seed_ratio(
            [r["seconds"][p] for r in new], [r["seconds"][p] for r in old]
        )
        lines.append(
            f"- {p}, this checkout / `{base}`, paired by round: **{ratio.value:.3f} "
            f"[{ratio.lower:.3f}, {ratio.upper:.3f}]** (95% t, {args.rounds} rounds)"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--model", type=Path, default=Path("models/base"))
    parser.add_argument("--calibration", type=Path, default=Path("data/calibration"))
    parser.add_argument("--text", type=Path, default=Path("data/text"))
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--windows", type=int, default=300)
    parser.add_argument("--out", type=Path, default=Path("docs/bench_pruning.md"))
    parser.add_argument("--base", default=None, help="also time this revision")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--time-only",
        action="store_true",
        help="print the timed part's seconds as JSON and stop (the --base runs)",
    )
    args = parser.parse_args()
    torch.set_num_threads(2)
    importance_params = load_section(args.params, "importance")
    default = load_section(args.params, "prune").model_copy(
        update={"ratio": args.ratio}
    )
    if args.time_only:
        result = timed(args, importance_params, default)
        print(json.dumps({"seconds": result["seconds"], "peak_mb": result["peak_mb"]}))
        return
    versus = against_revision(args) if args.base else []
    versus_args = f" --base {args.base} --rounds {args.rounds}" if args.base else ""

    result = timed(args, importance_params, default)
    scores, plan = result["scores"], result["plan"]
    model, tokenizer = result["model"], result["tokenizer"]
    calibration, pruned = result["calibration"], result["pruned"]
    seconds, peak_mb = result["seconds"], result["peak_mb"]
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
        if importance == "saap":
            importance = default.importance
            extra = extra | {"saap_metrics": default.saap_metrics}
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
        "Command: `.venv/bin/python benchmarks/prune_smollm2.py --ratio "
        f"{args.ratio}{versus_args}`"
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
        f"tokens): {seconds['importance']:.1f} s",
        f"- ranking (plan: {default.importance}, {default.allocation}, "
        f"{default.steps} step(s)): {seconds['ranking']:.1f} s",
        f"- pruning with the plan's compensation ({compensation}): "
        f"{seconds['prune']:.1f} s",
        f"- **total wall: {seconds['total']:.1f} s** (target: 60 s); "
        f"removed {removed:.2%} of {total:,} parameters",
        f"- peak resident memory: {peak_mb:.0f} MB (the float32 model is "
        f"{total * 4 / 2**20:.0f} MB)",
        "",
        *(versus + [""] if versus else []),
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
