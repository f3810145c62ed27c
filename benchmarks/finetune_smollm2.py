"""Recovery benchmark on SmolLM2-135M pruned 20% by SAAP: PTB and Wikipedia
perplexity before fine-tuning, after LLM-Pruner's LoRA and after SAAP group
fine-tuning, with the same data and budget; wall time and tokens/s.

Usage (after ``dvc repro prune``)::

    .venv/bin/python benchmarks/finetune_smollm2.py [--steps 20] [--windows 100]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from saap.evaluation.perplexity import perplexity
from saap.evaluation.report import corpus_windows
from saap.finetune import merge, split_records
from saap.model import load_model, native_bfloat16
from saap.params import FinetuneParams
from saap.plan import load_plan
from saap.recovery import RecoveryData, recover
from stages.finetune import read_records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", type=Path, default=Path("models/pruned"))
    parser.add_argument("--plan", type=Path, default=Path("artifacts/plan/plan.json"))
    parser.add_argument("--data", type=Path, default=Path("data/instruct/alpaca.json"))
    parser.add_argument("--text", type=Path, default=Path("data/text"))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--windows", type=int, default=100)
    parser.add_argument("--out", type=Path, default=Path("docs/bench_finetune.md"))
    args = parser.parse_args()
    torch.set_num_threads(2)
    plan = load_plan(args.plan)
    records = read_records(args.data)
    _, tokenizer = load_model(args.model)
    corpora = {
        c: corpus_windows(tokenizer, args.text, c, 128, args.windows)
        for c in ("ptb", "wiki")
    }

    def ppl(model) -> dict[str, float]:
        model = model.to(torch.bfloat16)
        return {c: perplexity(model, w) for c, w in corpora.items()}

    model, _ = load_model(args.model)
    rows = [("pruned, no fine-tuning", ppl(model), None)]
    for method in ("lora", "group_lora"):
        params = FinetuneParams(method=method, max_steps=args.steps)
        train, val = split_records(records, params.val_size, params.seed)
        model, _ = load_model(args.model)
        with tempfile.TemporaryDirectory() as resume:
            started = time.perf_counter()
            peft_model, result = recover(
                model,
                tokenizer,
                RecoveryData(train, val),
                params,
                Path(resume),
                plan,
            )
            wall = time.perf_counter() - started
        merged = merge(peft_model)
        rows.append(
            (
                f"{method} ({params.max_steps} steps x {params.batch_size})",
                ppl(merged),
                (result, wall),
            )
        )
        print(method, rows[-1][1], result.tokens, result.tokens_per_s, flush=True)

    precision = (
        "bf16 autocast, float32 master weights"
        if native_bfloat16()
        else "float32: this CPU has no native bf16"
    )
    lines = [
        "# Recovery benchmark: SmolLM2-135M pruned 20% by SAAP (default plan)",
        "",
        "Command: `.venv/bin/python benchmarks/finetune_smollm2.py "
        f"--steps {args.steps} --windows {args.windows}` on 2 CPU threads "
        f"({precision}; transformers Trainer). Data: the bundled Alpaca sample "
        "(999 records, 50 held out for "
        "validation), cutoff 256 tokens. Perplexity: first "
        f"{args.windows} windows of 128 tokens (PTB test; the evaluation half of "
        "the Wikipedia prose, which is not WikiText-2).",
        "",
        "| model | PTB ppl | Wiki ppl | trainable params | tokens | wall s | tokens/s "
        "| best step | val loss |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label, scores, extra in rows:
        if extra is None:
            lines.append(
                f"| {label} | {scores['ptb']:.1f} | {scores['wiki']:.1f} | "
                "- | - | - | - | - | - |"
            )
        else:
            result, wall = extra
            best = result.val_losses.get(result.best_step)
            lines.append(
                f"| {label} | {scores['ptb']:.1f} | {scores['wiki']:.1f} | "
                f"{result.trainable_params:,} | {result.tokens:,} | {wall:.0f} | "
                f"{result.tokens_per_s:.0f} | {result.best_step} | {best:.3f} |"
            )
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
