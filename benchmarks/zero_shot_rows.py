"""Zero-shot evaluation with lm-eval's own ``HFLM`` against ``HFLM`` projecting
only the continuation rows (``saap.evaluation.zeroshot.continuation_lm``):
time per evaluation of the seven tasks, variants interleaved round by round
(order reversed every other round), ratio paired by round with a 95%
t-interval; and whether every per-document result is the same.

Usage: ``.venv/bin/python benchmarks/zero_shot_rows.py [--model models/finetuned]
[--limit 50] [--rounds 4] [--out docs/bench_zero_shot_rows.md]``
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

import saap.evaluation.zeroshot as zeroshot
from saap.comparison import seed_ratio
from saap.evaluation.zeroshot import BUILTIN_TASKS, evaluate_zero_shot
from saap.model import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", type=Path, default=Path("models/finetuned"))
    parser.add_argument("--eval", type=Path, default=Path("data/eval"))
    parser.add_argument("--limit", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    model, tokenizer = load_model(args.model, dtype=torch.bfloat16)
    tasks = list(BUILTIN_TASKS)
    rows_lm = zeroshot.continuation_lm
    variants = {"lm-eval HFLM": lambda hflm: hflm, "continuation rows": rows_lm}
    seconds = {name: [] for name in variants}
    documents = {}
    try:
        for round_ in range(args.rounds):
            order = list(variants) if round_ % 2 == 0 else list(reversed(variants))
            for name in order:
                zeroshot.continuation_lm = variants[name]
                started = time.perf_counter()
                _, documents[name] = evaluate_zero_shot(
                    model, tokenizer, args.eval, tasks, args.limit, args.batch_size
                )
                seconds[name].append(time.perf_counter() - started)
                print(round_, name, round(seconds[name][-1], 1), flush=True)
    finally:
        zeroshot.continuation_lm = rows_lm
    reference, rows = (documents[name] for name in variants)
    values = differ = 0
    for task in tasks:
        for metric, column in reference[task].items():
            if metric == "doc_id":
                continue
            values += len(column)
            differ += sum(
                a != b for a, b in zip(column, rows[task][metric], strict=True)
            )
    ratio = seed_ratio(seconds["continuation rows"], seconds["lm-eval HFLM"])
    lines = [
        "# Zero-shot: lm-eval's HFLM against continuation rows only",
        "",
        f"`.venv/bin/python benchmarks/zero_shot_rows.py --model {args.model} "
        f"--limit {args.limit} --rounds {args.rounds}` ({os.cpu_count()} CPUs, bf16, "
        f"batch {args.batch_size}; the seven tasks, first {args.limit} documents "
        "each; variants interleaved, order reversed every other round).",
        "",
        "| variant | seconds per round |",
        "|---|---|",
    ]
    for name, values_s in seconds.items():
        lines.append(f"| {name} | {', '.join(f'{v:.1f}' for v in values_s)} |")
    lines += [
        "",
        f"Continuation rows / HFLM time, paired by round: **{ratio.value:.2f} "
        f"[{ratio.lower:.2f}, {ratio.upper:.2f}]** (95% t-interval, {ratio.n} "
        f"rounds). Per-document results (acc, acc_norm): {differ} of {values} "
        "differ.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
