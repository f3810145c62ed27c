"""Sampling speed of the ``teacher-text`` stage by batch size: tokens/s of
``saap.teacher_text.generate_teacher_text`` (transformers' ``generate`` with a
dynamic KV cache, temperature sampling over the whole vocabulary) from the dense
model, one batch of ``--length`` tokens per arm and round, arms interleaved
round by round (order reversed every other round) after one untimed batch each,
so machine drift hits all arms alike. The batch size changes which text is drawn
(batch ``k`` is seeded with ``seed * 1000003 + k``), not its distribution.

Usage (after ``dvc repro assets``)::

    .venv/bin/python benchmarks/teacher_text_speed.py --batches 64,128,256 \
        --rounds 3 --out docs/bench_teacher_text_speed.md
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from finetune_smollm2 import cpu_name  # the script folder is on sys.path

from saap.comparison import seed_ratio
from saap.model import load_model, torch_dtype
from saap.params import TeacherTextParams, load_section
from saap.teacher_text import generate_teacher_text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--model", default="models/base")
    parser.add_argument("--batches", default="64,128,256")
    parser.add_argument("--length", type=int, default=None, help="default: params")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=None, help="markdown report (+ .json)")
    args = parser.parse_args(argv)

    base: TeacherTextParams = load_section(args.params, "teacher_text")
    length = args.length or base.length
    sizes = [int(b) for b in args.batches.split(",")]
    torch.set_num_threads(2)
    model, tokenizer = load_model(args.model, dtype=torch_dtype(base.dtype))
    model.eval()

    def arm(rows: int, seed: int) -> float:
        params = base.model_copy(
            update={"tokens": rows * length, "length": length, "batch_size": rows,
                    "seed": seed}
        )  # fmt: skip
        began = time.perf_counter()
        _, sampled = generate_teacher_text(model, tokenizer, params)
        return sampled / (time.perf_counter() - began)

    for rows in sizes:  # untimed: first calls allocate and warm the kernels
        arm(rows, seed=10_000)
    speeds: dict[int, list[float]] = {rows: [] for rows in sizes}
    for r in range(args.rounds):
        order = sizes if r % 2 == 0 else sizes[::-1]
        for rows in order:
            speeds[rows].append(arm(rows, seed=r + 1))
            print(
                f"round {r}: batch {rows}: {speeds[rows][-1]:.0f} tokens/s", flush=True
            )

    reference = sizes[0]
    lines = [
        "# Teacher-text sampling speed by batch size",
        "",
        f"Command: `.venv/bin/python benchmarks/teacher_text_speed.py --batches "
        f"{args.batches} --length {length} --rounds {args.rounds}` on "
        f"{torch.get_num_threads()} "
        f"threads of {cpu_name()}, torch {torch.__version__}, model "
        f"`{args.model}` in {next(model.parameters()).dtype}; one batch of "
        f"{length} tokens per arm and round, arms interleaved (order reversed "
        "every other round) after one untimed batch each. tokens/s: sampled "
        "tokens over the wall time of `generate_teacher_text` (decoding to text "
        "included).",
        "",
        "| batch | tokens/s per round | mean | vs batch "
        f"{reference}, 95% CI (by round) |",
        "|---:|---|---:|---|",
    ]
    for rows in sizes:
        per_round = ", ".join(f"{v:.0f}" for v in speeds[rows])
        if rows == reference:
            versus = "1"
        elif args.rounds >= 2:
            ratio = seed_ratio(speeds[rows], speeds[reference])
            versus = f"{ratio.value:.2f}x [{ratio.lower:.2f}, {ratio.upper:.2f}]"
        else:
            versus = "- (1 round)"
        lines.append(
            f"| {rows} | {per_round} | {statistics.mean(speeds[rows]):.0f} | {versus} |"
        )
    report = "\n".join(lines) + "\n"
    print(report)
    if args.out:
        out = Path(args.out)
        out.write_text(report)
        out.with_suffix(".json").write_text(
            json.dumps({"length": length, "tokens_per_s": speeds}, indent=1) + "\n"
        )


if __name__ == "__main__":
    main()
