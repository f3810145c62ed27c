"""Edge benchmark in llama.cpp on SmolLM2-135M: dense, SAAP 20%, SAAP 50% and
ShortGPT 20% (whole layers removed), each exported to GGUF (f16, q8_0, q4_0):
file size, prefill and decode tokens/s at batch 1, the decode speedup over the
dense file of the same type (interleaved runs, 95% bootstrap interval) beside the
ideal one (tensor bytes), and PTB perplexity of each file (llama-perplexity, 64
windows of 128 tokens). The f16 speed gate (lower bound >= gates.min_decode_speedup)
is decided in three independent interleaved runs to show whether its verdict
is stable.

Usage (after ``dvc repro importance``: models/base, data/text and
artifacts/importance exist; llama.cpp is built by ``make llamacpp``)::

    .venv/bin/python benchmarks/edge_smollm2.py [--repeats 12] [--verdict-runs 3]

Writes docs/bench_edge.md and docs/bench_edge.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from saap.evaluation.bench import llamacpp_benchmark
from saap.export import get_exporter
from saap.methods import build_arm_plan, prune_params_for
from saap.model import count_params, layer_shapes, load_model, save_checkpoint
from saap.params import ExportParams, load_section
from saap.prune import prune_model
from saap.runtime.llamacpp import ensure_llamacpp, perplexity
from saap.scores import load_scores

ARMS = [
    # key, label, compare method, ratio
    ("saap20", "SAAP 20%", "saap", 0.2),
    ("saap50", "SAAP 50%", "saap", 0.5),
    ("shortgpt20", "ShortGPT 20% (layers)", "shortgpt", 0.2),
]


def build_arms(base: Path, importance: Path, params_file: Path, out: Path) -> dict:
    model, tokenizer = load_model(base)
    scores = load_scores(importance)
    prune_base = load_section(params_file, "prune")
    shapes, total = layer_shapes(model), count_params(model)
    dirs = {"dense": base}
    layers = {}
    for key, _, method, ratio in ARMS:
        params = prune_params_for(method, ratio, prune_base)
        plan = build_arm_plan(scores, shapes, total, params)
        means = scores.input_means if plan.bias_compensation else None
        pruned = prune_model(model, plan, means)
        save_checkpoint(pruned, tokenizer, out / key)
        dirs[key] = out / key
        layers[key] = len(layer_shapes(pruned))
    return {"dirs": dirs, "layers": layers}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", type=Path, default=Path("models/base"))
    parser.add_argument("--importance", type=Path, default=Path("artifacts/importance"))
    parser.add_argument("--text", type=Path, default=Path("data/text"))
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--repeats", type=int, default=12)
    parser.add_argument("--verdict-runs", type=int, default=3)
    parser.add_argument("--ppl-chunks", type=int, default=64)
    parser.add_argument("--out", type=Path, default=Path("docs/bench_edge.md"))
    parser.add_argument(
        "--render-only", action="store_true", help="re-render the .md from the .json"
    )
    args = parser.parse_args()
    if args.render_only:
        report = json.loads(args.out.with_suffix(".json").read_text())
        args.out.write_text(render(report))
        return
    torch.set_num_threads(2)
    tools = ensure_llamacpp()
    export_params = load_section(args.params, "export")
    export_params = ExportParams(**(export_params.model_dump() | {"threads": 2}))
    gates = load_section(args.params, "gates")
    bench = load_section(args.params, "bench").model_copy(
        update={"repeats": args.repeats}
    )
    ptb = args.text / "ptb_test.txt"
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="edge-") as tmp:
        tmp = Path(tmp)
        arms = build_arms(args.model, args.importance, args.params, tmp / "models")
        files, manifests = {}, {}
        for key, folder in arms["dirs"].items():
            manifest = get_exporter("gguf").export(
                folder, tmp / "gguf" / key, export_params
            )
            manifests[key] = manifest
            files[key] = {
                kind: tmp / "gguf" / key / entry["file"]
                for kind, entry in manifest["files"].items()
            }
        rows = []
        for key, label in [("dense", "Dense"), *[(a[0], a[1]) for a in ARMS]]:
            for kind, path in files[key].items():
                entry = manifests[key]["files"][kind]
                row = {
                    "key": key,
                    "label": label,
                    "type": kind,
                    "bytes": entry["bytes"],
                    "fallbacks": entry["fallback_count"],
                    "ppl_ptb": perplexity(tools, path, ptb, 128, args.ppl_chunks, 2)[
                        "ppl"
                    ],
                }
                if key != "dense":
                    runs = args.verdict_runs if kind == gates.speed_gguf_type else 1
                    row["runs"] = []
                    for _ in range(runs):
                        result = llamacpp_benchmark(
                            tools, {kind: path}, bench, {kind: files["dense"][kind]}
                        )["types"][kind]
                        decode = result["speedup"]["decode"]
                        row["runs"].append(
                            {
                                "decode": result["decode_tokens_per_s"],
                                "prefill": result["prefill_tokens_per_s"],
                                "dense_decode": result["dense_decode_tokens_per_s"],
                                "dense_prefill": result["dense_prefill_tokens_per_s"],
                                "speedup": decode,
                                "prefill_speedup": result["speedup"]["prefill"],
                                "ideal": result["decode_ideal"],
                                "verdict": "pass"
                                if decode["lower"] >= gates.min_decode_speedup
                                else "fail",
                            }
                        )
                rows.append(row)
                print(json.dumps(row), flush=True)
    seconds = time.perf_counter() - started
    report = {
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "threads": bench.threads,
        },
        "llama_cpp": {
            k: tools.info.get(k) for k in ("source", "options", "build_seconds")
        },
        "bench": bench.model_dump(),
        "gate": {"type": gates.speed_gguf_type, "min": gates.min_decode_speedup},
        "layers": arms["layers"],
        "rows": rows,
        "seconds": seconds,
        "revision": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip(),
    }
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    args.out.write_text(render(report))
    print(f"wrote {args.out} in {seconds:.0f} s")


def render(report: dict) -> str:
    gate = report["gate"]
    lines = [
        "# Edge benchmark: llama.cpp on SmolLM2-135M",
        "",
        f"Written by `benchmarks/edge_smollm2.py` at revision {report['revision']} in "
        f"{report['seconds'] / 60:.1f} min. llama.cpp {report['llama_cpp']['source']}, "
        f"built with {_flags(report['llama_cpp']['options'])}; batch 1, "
        f"{report['bench']['threads']} threads, prompt {report['bench']['prompt_len']} "
        f"tokens, {report['bench']['decode_tokens']} decoded; each speedup from "
        f"{report['bench']['repeats']} llama-bench runs of the candidate interleaved "
        "with the dense file of the same type (order swapped every round), geometric "
        "mean of the per-round ratios with a 95% bootstrap interval over rounds. "
        "Ideal = tensor bytes of the dense file / the candidate's (what decoding one "
        "token reads). PTB perplexity: llama-perplexity, "
        "64 windows of 128 tokens (second half of each scored).",
        "",
        "| model | type | size MiB | PTB ppl | prefill tok/s | decode tok/s | "
        "decode speedup [95% CI] | ideal | prefill speedup |",
        "|---|---|---:|---:|---:|---:|---|---:|---:|",
    ]
    for row in report["rows"]:
        size = row["bytes"] / 2**20
        if "runs" not in row:
            # the dense file's speeds are those measured beside each candidate
            lines.append(
                f"| {row['label']} | {row['type']} | {size:.1f} | {row['ppl_ptb']:.2f} "
                "| (in each row below) | (in each row below) | 1 | 1 | 1 |"
            )
            continue
        run = row["runs"][0]
        s = run["speedup"]
        lines.append(
            f"| {row['label']} | {row['type']} | {size:.1f} | {row['ppl_ptb']:.2f} | "
            f"{run['prefill']:.0f} (dense {run['dense_prefill']:.0f}) | "
            f"{run['decode']:.1f} (dense {run['dense_decode']:.1f}) | "
            f"{s['value']:.3f} [{s['lower']:.3f}, {s['upper']:.3f}] | "
            f"{run['ideal']:.3f} | {run['prefill_speedup']['value']:.3f} |"
        )
    lines += [
        "",
        f"## Speed-gate verdicts ({gate['type']}, lower bound >= {gate['min']}), "
        "repeated runs",
        "",
        "| model | run | decode speedup [95% CI] | verdict |",
        "|---|---:|---|---|",
    ]
    for row in report["rows"]:
        if row["type"] != gate["type"] or "runs" not in row:
            continue
        for i, run in enumerate(row["runs"], 1):
            s = run["speedup"]
            lines.append(
                f"| {row['label']} | {i} | {s['value']:.3f} [{s['lower']:.3f}, "
                f"{s['upper']:.3f}] | {run['verdict']} |"
            )
    verdicts = {
        row["label"]: {run["verdict"] for run in row["runs"]}
        for row in report["rows"]
        if row["type"] == gate["type"] and "runs" in row
    }
    stable = all(len(v) == 1 for v in verdicts.values())
    lines += [
        "",
        "Verdicts agree across runs for every model."
        if stable
        else "Verdicts differ between runs for: "
        + ", ".join(k for k, v in verdicts.items() if len(v) > 1)
        + ".",
        "",
        f"Layers written: {report['layers']} (dense: 30).",
        "",
    ]
    return "\n".join(lines)


def _flags(options: dict) -> str:
    on = [
        k.removeprefix("GGML_")
        for k, v in options.items()
        if k.startswith("GGML_") and v == "ON"
    ]
    return "GGML_NATIVE=OFF, " + " ".join(on)


if __name__ == "__main__":
    main()
