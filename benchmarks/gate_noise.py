"""How noisy is each promotion gate, per evaluation profile, and do repeated gate
evaluations of the same candidate agree?

For each profile: the dense model is evaluated once (or its evaluation by the
pipeline is reused, ``--dense-metrics``); the candidate is evaluated
``--repeats`` times from scratch and benchmarked in llama.cpp (its exported GGUF
interleaved with the dense one) ``--bench-repeats`` times, and the gates are
computed from each repeat.
Reported: the wall time of one candidate evaluation, every gate's value,
interval and half-width per repeat, whether the per-document results of the
repeated evaluations are identical to each other and to the pipeline's own
(``--candidate-documents``: another process, another day), and whether the
verdicts agree. The evaluation is deterministic, so what varies between repeats
is the timing.

Results go to a JSON file as each repeat finishes (an interrupted run keeps
what it measured) and are rendered to docs/bench_gates.md.

Usage (after ``dvc repro finetune``)::

    .venv/bin/python benchmarks/gate_noise.py --profile quick \
        --dense-metrics metrics/eval/dense.json \
        --candidate-documents metrics/eval/finetuned.documents.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from saap.atomic import write_json
from saap.evaluation.bench import llamacpp_benchmark
from saap.evaluation.report import evaluate_model
from saap.gates import evaluate_gates
from saap.model import compute_dtype, load_model
from saap.params import load_section
from saap.runtime.llamacpp import cpu_flags, ensure_llamacpp
from stages.bench import gguf_files

SPEED_ESTIMATOR = "median of the per-round log-ratios, bootstrap over rounds"


def revision() -> str:
    """The code revision measured: the commit, marked when the tree differs."""
    head = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    return head + (" with uncommitted changes" if dirty else "") if head else ""


def machine() -> str:
    flags = cpu_flags()
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        cpuinfo = []
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in cpuinfo
            if line.startswith("model name")
        ),
        platform.processor() or platform.machine(),
    )
    native = "avx512_bf16" in flags or "amx_bf16" in flags
    return f"{model}, {os.cpu_count()} CPUs, bf16 {'native' if native else 'emulated'}"


def report(results: dict, out: Path) -> None:
    lines = [
        "# Gate noise: interval widths and repeated verdicts per profile",
        "",
        "Candidate: the `make run` model (per profile below) against dense "
        "SmolLM2-135M; 2 CPU threads. Commands: "
        + " then ".join(f"`{c}`" for c in results.get("commands", []))
        + ". Intervals are 95% paired bootstrap intervals (2,000 resamples); the "
        "speedup interval bootstraps the interleaved repeat pairs of one llama.cpp "
        "bench run (the gate's GGUF type, against the dense file of that type).",
        "",
    ]
    lines += [f"Note: {note}" for note in results.get("notes", [])]
    if results.get("notes"):
        lines.append("")
    for profile, run in results.get("profiles", {}).items():
        settings = run["settings"]
        limits = settings["task_limits"] or {}
        lines += [
            f"## Profile `{profile}`",
            "",
            f"- Candidate: {run.get('candidate', results.get('candidate'))}"
            + (f"; code revision {run['revision']}" if run.get("revision") else "")
            + (f"; machine: {run['machine']}" if run.get("machine") else "")
            + ".",
            *[f"- Note: {note}" for note in run.get("notes", [])],
            f"- Documents: {run['documents']} paired zero-shot documents "
            f"(limit {settings['limit'] or 'none'} per task"
            + (f", caps {limits}" if limits else "")
            + f"); perplexity windows per corpus: "
            f"{settings['ppl_max_windows'] or 'all'}; fidelity windows: "
            f"{settings['fidelity_windows']}.",
            f"- Time: dense evaluation {run['dense_s']:.0f} s (stage sections); "
            "one candidate "
            f"evaluation {run['repeats'][0]['eval_s']:.0f} s; one interleaved "
            f"bench {run['repeats'][0]['bench_s']:.0f} s.",
            "- Repeated evaluations of the candidate identical to each other and "
            "to the pipeline's evaluate stage (per-document results, per-window "
            f"NLL and KL): {run.get('identical_evaluations', 'n/a')}; the "
            "repeats below re-time the speedup (interleaved bench) each time.",
            "- Speedup estimator: "
            + run.get(
                "speed_estimator",
                "mean of the per-round log-ratios (the estimator before the "
                "median; see the last section)",
            )
            + ".",
            "",
            "| repeat | gate | value | 95% interval | half-width | threshold "
            "| mode | verdict |",
            "|---|---|---:|---|---:|---|---|---|",
        ]
        for index, repeat in enumerate(run["repeats"], start=1):
            for gate in repeat["gates"]:
                if gate["value"] is None:
                    interval, half = "-", "-"
                else:
                    interval = f"[{gate['lower']:.4f}, {gate['upper']:.4f}]"
                    half = f"{(gate['upper'] - gate['lower']) / 2:.4f}"
                value = "-" if gate["value"] is None else f"{gate['value']:.4f}"
                bound = "<=" if gate["direction"] == "at_most" else ">="
                lines.append(
                    f"| {index} | {gate['name']} | {value} | {interval} | {half} | "
                    f"{bound} {gate['threshold']} | {gate['mode']} | "
                    f"{'pass' if gate['passed'] else 'FAIL'} |"
                )
        verdicts = [
            tuple(g["passed"] for g in repeat["gates"]) for repeat in run["repeats"]
        ]
        agree = len(set(verdicts)) == 1
        lines += [
            "",
            f"Verdicts of the {len(verdicts)} repeats "
            f"{'agree' if agree else 'DISAGREE'}: "
            + ", ".join("promote" if all(v) else "keep champion" for v in verdicts)
            + ".",
            "",
        ]
    check = results.get("speed_checks")
    if check:
        rows = check["repeats"]
        verdicts = ["pass" if r["gate"]["passed"] else "FAIL" for r in rows]
        lines += [
            "## The speed gate re-timed",
            "",
            f"`{check['command']}`: the speed gate alone (the other gates are "
            "deterministic), re-timed back to back; llama.cpp "
            f"{check['gguf_type']} "
            f"decode, {check['bench']['repeats']} interleaved rounds of "
            f"{check['bench']['prompt_len']} prompt + "
            f"{check['bench']['decode_tokens']} decoded tokens; estimator: "
            f"{check['estimator']}.",
            "",
            "| repeat | decode speedup | 95% interval | half-width | verdict "
            "| bench s |",
            "|---|---:|---|---:|---|---:|",
        ]
        for index, r in enumerate(rows, start=1):
            g = r["gate"]
            lines.append(
                f"| {index} | {g['value']:.4f} | [{g['lower']:.4f}, {g['upper']:.4f}] "
                f"| {(g['upper'] - g['lower']) / 2:.4f} | {verdicts[index - 1]} "
                f"| {r['bench_s']:.0f} |"
            )
        lines += [
            "",
            f"Verdicts {'agree' if len(set(verdicts)) == 1 else 'DISAGREE'}: "
            + ", ".join(verdicts)
            + ".",
            "",
        ]
    out.write_text("\n".join(lines) + "\n")


def speed_checks(args) -> None:
    """The speed gate alone, re-timed ``args.speed_only`` times in a row."""
    from saap.gates import _speed_gate

    bench = load_section("params.yaml", "bench")
    gates = load_section("params.yaml", "gates")
    results = json.loads(args.json.read_text()) if args.json.is_file() else {}
    command = " ".join(["python benchmarks/gate_noise.py", *sys.argv[1:]])
    kind = gates.speed_gguf_type
    check = {
        "command": command,
        "bench": bench.model_dump(),
        "estimator": SPEED_ESTIMATOR,
        "gguf_type": kind,
        "repeats": [],
    }
    results["speed_checks"] = check
    for index in range(args.speed_only):
        started = time.perf_counter()
        runtime = llamacpp_benchmark(
            ensure_llamacpp(),
            {kind: gguf_files(args.gguf)[kind]},
            bench,
            {kind: gguf_files(args.dense_gguf)[kind]},
        )
        gate = _speed_gate({"bench": {"llamacpp": runtime}}, gates)
        check["repeats"].append(
            {"bench_s": time.perf_counter() - started, "gate": gate.as_dict()}
        )
        write_json(args.json, results)
        report(results, args.out)
        print(index + 1, round(gate.value or 0, 4), gate.passed, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--profile", help="evaluation profile (not with --speed-only)")
    parser.add_argument("--repeats", type=int, default=1, help="candidate evals")
    parser.add_argument(
        "--note",
        action="append",
        help="a remark recorded with this profile's run (repeatable)",
    )
    parser.add_argument("--bench-repeats", type=int, default=3, help="benches")
    parser.add_argument(
        "--dense-metrics",
        type=Path,
        default=None,
        help="reuse this dense evaluation (its .documents.json beside it)",
    )
    parser.add_argument(
        "--candidate-documents",
        type=Path,
        default=None,
        help="the pipeline's evaluation of the candidate, to check identity",
    )
    parser.add_argument("--dense", type=Path, default=Path("models/base"))
    parser.add_argument("--candidate", type=Path, default=Path("models/finetuned"))
    parser.add_argument(
        "--gguf", type=Path, default=Path("models/gguf/finetuned"), help="export"
    )
    parser.add_argument("--dense-gguf", type=Path, default=Path("models/gguf/dense"))
    parser.add_argument("--text", type=Path, default=Path("data/text"))
    parser.add_argument("--eval", type=Path, default=Path("data/eval"))
    parser.add_argument("--json", type=Path, default=Path("docs/bench_gates.json"))
    parser.add_argument("--out", type=Path, default=Path("docs/bench_gates.md"))
    parser.add_argument(
        "--report-only", action="store_true", help="render --out from --json"
    )
    parser.add_argument(
        "--speed-only",
        type=int,
        default=0,
        help="only re-time the speed gate this many times (the other gates are "
        "deterministic: identical on every evaluation)",
    )
    args = parser.parse_args()
    if args.report_only:
        report(json.loads(args.json.read_text()), args.out)
        return
    if args.speed_only:
        speed_checks(args)
        return
    if not args.profile:
        parser.error("--profile is required (quick or nightly)")
    torch.set_num_threads(2)
    command = " ".join(["python benchmarks/gate_noise.py", *sys.argv[1:]])
    settings = load_section("params.yaml", "evaluate").resolved(args.profile)
    bench = load_section("params.yaml", "bench")
    gates = load_section("params.yaml", "gates")
    results = json.loads(args.json.read_text()) if args.json.is_file() else {}
    results.setdefault("commands", []).append(command)
    prune = load_section("params.yaml", "prune")
    finetune = load_section("params.yaml", "finetune")
    candidate_label = (
        f"{prune.importance} {prune.ratio:.0%}, allocation {prune.allocation}, "
        f"recovery {finetune.method} {finetune.max_steps} steps"
        + (f", lr {finetune.learning_rate}" if finetune.learning_rate else "")
        + f", dtype {compute_dtype()}"
    )
    dense, tokenizer = load_model(args.dense, dtype=compute_dtype())
    candidate, _ = load_model(args.candidate, dtype=compute_dtype())

    def evaluate(model, reference):
        started = time.perf_counter()
        metrics, documents = evaluate_model(
            model,
            tokenizer,
            args.text,
            args.eval,
            settings,
            "candidate" if reference is not None else "dense",
            "",
            reference=reference,
        )
        return metrics, documents, time.perf_counter() - started

    if args.dense_metrics:
        dense_metrics = json.loads(args.dense_metrics.read_text())
        dense_documents = json.loads(
            args.dense_metrics.with_suffix(".documents.json").read_text()
        )
        dense_s = dense_metrics["seconds"]
        dense_s = sum(dense_s.values())
    else:
        dense_metrics, dense_documents, dense_s = evaluate(dense, None)
    run = {
        "settings": settings.model_dump(),
        "documents": dense_metrics["documents_evaluated"],
        "dense_s": dense_s,
        "speed_estimator": SPEED_ESTIMATOR,
        "candidate": candidate_label,
        "revision": revision(),
        "machine": machine(),
        "notes": args.note or [],
        "repeats": [],
    }
    results.setdefault("profiles", {})[args.profile] = run
    dense_evidence = {"eval": dense_metrics, "documents": dense_documents}
    first_documents = (
        json.loads(args.candidate_documents.read_text())
        if args.candidate_documents
        else None
    )
    evaluations = args.repeats
    benches = args.bench_repeats
    metrics = documents = None
    eval_s = 0.0
    for index in range(max(evaluations, benches)):
        if index < evaluations:
            metrics, documents, eval_s = evaluate(candidate, dense)
            if first_documents is None:
                first_documents = documents
            else:
                same = documents == first_documents
                run["identical_evaluations"] = run.get(
                    "identical_evaluations", True
                ) and bool(same)
            if metrics["eval_config_hash"] != dense_metrics["eval_config_hash"]:
                raise SystemExit(
                    "the dense evaluation was made with another config: "
                    f"{dense_metrics['eval_config_hash']} vs "
                    f"{metrics['eval_config_hash']}"
                )
        started = time.perf_counter()
        kind = gates.speed_gguf_type
        runtime = llamacpp_benchmark(
            ensure_llamacpp(),
            {kind: gguf_files(args.gguf)[kind]},
            bench,
            {kind: gguf_files(args.dense_gguf)[kind]},
        )
        bench_s = time.perf_counter() - started
        evidence = {
            "eval": metrics,
            "documents": documents,
            "bench": {"llamacpp": runtime},
        }
        verdicts = evaluate_gates(evidence, dense_evidence, gates)
        run["repeats"].append(
            {
                "eval_s": eval_s,
                "evaluated_again": index < evaluations,
                "bench_s": bench_s,
                "gates": [g.as_dict() for g in verdicts],
            }
        )
        write_json(args.json, results)
        report(results, args.out)
        print(
            args.profile,
            index + 1,
            {g.name: (round(g.value or 0, 4), g.passed) for g in verdicts},
            flush=True,
        )


if __name__ == "__main__":
    main()
