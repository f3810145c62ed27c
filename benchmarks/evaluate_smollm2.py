"""How long ``evaluate`` takes on SmolLM2-135M (dense, bfloat16, 2 CPU threads):
the default evaluation (params.yaml: limit 50 per task, 200 perplexity windows
per corpus, generations) and each zero-shot task on its full set, timed one task
at a time; then the dense model's edge benchmark (decode tokens/s).

Results are appended to a JSON file as each part finishes, so an interrupted run
keeps what it measured; the Markdown report is rewritten after every part.

Usage (after ``dvc repro assets``)::

    .venv/bin/python benchmarks/evaluate_smollm2.py               # everything
    .venv/bin/python benchmarks/evaluate_smollm2.py --partial hellaswag=2000

``--partial TASK=N`` runs that task on its first N documents only and reports
the full-set time as a linear extrapolation, marked as such.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from saap.atomic import write_json
from saap.evaluation.bench import benchmark_with
from saap.evaluation.report import evaluate_model
from saap.evaluation.zeroshot import BUILTIN_TASKS, evaluate_zero_shot, task_objects
from saap.model import compute_dtype, load_model
from saap.params import BenchParams, load_section


def request_counts(eval_dir: Path, task: str, limit: int | None) -> tuple[int, int]:
    """(documents, loglikelihood requests) lm-eval makes for ``task``: one request
    per answer choice of each document."""
    with tempfile.TemporaryDirectory() as tmp:
        loaded = task_objects(eval_dir, [task], Path(tmp))[task]
        docs = list(loaded.eval_docs)
        if limit is not None:
            docs = docs[:limit]
        return len(docs), sum(len(loaded.doc_to_choice(doc)) for doc in docs)


def report(results: dict, out: Path) -> None:
    commands = " then ".join(f"`{c}`" for c in results.get("commands", []))
    lines = [
        "# Evaluation time: SmolLM2-135M dense on this machine",
        "",
        f"Commands: {commands} (bfloat16, 2 CPU threads, lm-eval batch size "
        f"{results.get('batch_size')}; each run replaces the parts it measures).",
        "",
    ]
    default = results.get("default")
    if default:
        lines += [
            "## Default evaluation (params.yaml)",
            "",
            f"limit {default['limit']} per task, {default['windows']} perplexity "
            "windows of 128 tokens on each of PTB / wiki / C4, 4 generations: "
            f"**{default['wall_s']:.0f} s** (perplexity "
            f"{default['seconds']['perplexity']} s, zero-shot "
            f"{default['seconds']['zero_shot']} s, generation "
            f"{default['seconds']['generation']} s).",
            "",
        ]
    tasks = results.get("tasks", {})
    if tasks:
        lines += [
            "## Zero-shot tasks on their full sets (one task at a time)",
            "",
            "| task | docs run | of | requests run | wall s | requests/s | acc | "
            "acc_norm | full-set s |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        total, extrapolated = 0.0, False
        for task, row in tasks.items():
            full = row["wall_s"] * row["docs_total"] / row["docs"]
            partial = row["docs"] < row["docs_total"]
            extrapolated |= partial
            total += full
            norm = row["scores"].get("acc_norm")
            lines.append(
                f"| {task} | {row['docs']} | {row['docs_total']} | {row['requests']} "
                f"| {row['wall_s']:.0f} | {row['requests'] / row['wall_s']:.1f} | "
                f"{row['scores']['acc']:.4f} | "
                f"{'-' if norm is None else f'{norm:.4f}'} | "
                f"{full:.0f}{' (extrapolated)' if partial else ''} |"
            )
        lines += [
            "",
            f"Zero-shot on the full sets of the tasks above: **{total / 60:.1f} min**"
            + (
                " (partly extrapolated linearly from the documents run)"
                if extrapolated
                else " (measured)"
            )
            + ".",
            "",
        ]
    bench = results.get("bench")
    if bench:
        lines += [
            "## Dense edge benchmark (bench params)",
            "",
            f"decode {bench['decode_tokens_per_s']:.1f} tokens/s at batch 1 with KV "
            f"cache (median of {bench['repeats']}), prefill "
            f"{bench['prefill_tokens_per_s']:.0f} tokens/s, time to first token "
            f"{bench['time_to_first_token_s'] * 1000:.0f} ms, {bench['threads']} "
            "threads.",
            "",
        ]
    out.write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", type=Path, default=Path("models/base"))
    parser.add_argument("--text", type=Path, default=Path("data/text"))
    parser.add_argument("--eval", type=Path, default=Path("data/eval"))
    parser.add_argument("--tasks", nargs="*", default=list(BUILTIN_TASKS))
    parser.add_argument("--partial", nargs="*", default=[], metavar="TASK=N")
    parser.add_argument("--skip-default", action="store_true")
    parser.add_argument(
        "--report-only", action="store_true", help="Rewrite the .md from the JSON"
    )
    parser.add_argument("--json", type=Path, default=Path("docs/bench_evaluate.json"))
    parser.add_argument("--out", type=Path, default=Path("docs/bench_evaluate.md"))
    args = parser.parse_args()
    command = " ".join(["python benchmarks/evaluate_smollm2.py", *sys.argv[1:]])
    partial = {k: int(v) for k, v in (p.split("=") for p in args.partial)}
    torch.set_num_threads(2)
    params = load_section("params.yaml", "evaluate").resolved("quick")
    results = json.loads(args.json.read_text()) if args.json.is_file() else {}
    if args.report_only:
        report(results, args.out)
        return
    results.setdefault("commands", []).append(command)
    results["batch_size"] = params.batch_size
    model, tokenizer = load_model(args.model, dtype=compute_dtype())

    def save() -> None:
        write_json(args.json, results)
        report(results, args.out)

    if not args.skip_default:
        started = time.perf_counter()
        metrics, _ = evaluate_model(
            model, tokenizer, args.text, args.eval, params, "dense", str(args.model)
        )
        results["default"] = {
            "limit": params.limit,
            "windows": params.ppl_max_windows,
            "wall_s": time.perf_counter() - started,
            "seconds": metrics["seconds"],
            "mean_acc": metrics["mean_acc"],
            "perplexity": metrics["perplexity"],
        }
        save()
        print("default", results["default"], flush=True)

    results.setdefault("tasks", {})
    for task in args.tasks:
        limit = partial.get(task)
        docs, requests = request_counts(args.eval, task, limit)
        docs_total, _ = request_counts(args.eval, task, None)
        started = time.perf_counter()
        scores = evaluate_zero_shot(
            model, tokenizer, args.eval, [task], limit, params.batch_size
        )[0][task]
        results["tasks"][task] = {
            "docs": docs,
            "docs_total": docs_total,
            "requests": requests,
            "wall_s": time.perf_counter() - started,
            "scores": scores,
        }
        save()
        print(task, results["tasks"][task], flush=True)

    bench_params = load_section("params.yaml", "bench")
    assert isinstance(bench_params, BenchParams)
    results["bench"] = benchmark_with(model, args.model, bench_params)
    save()
    print("bench", results["bench"], flush=True)


if __name__ == "__main__":
    main()
